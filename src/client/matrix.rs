//! The Matrix base layer: the client's own `/sync`, to-device sends and discovery (being built).
