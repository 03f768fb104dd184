//! One WebRTC peer connection and data channel per peer, on `webrtc` 0.17.2 (being built).
