//! The signalling WebSocket client (protocol v1) (being built).
