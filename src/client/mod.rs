//! The thin client: WebRTC data channels between two peers when they work, Matrix when they don't,
//! and every message delivered to the application exactly once and in order either way.
//!
//! Matrix is the base layer: the client runs its own `/sync` and sends its own to-device messages
//! with its own access token ([`matrix`]), so it keeps working with Switchboard down or absent.
//! Switchboard's signalling WebSocket ([`signal`]) brokers the upgrade to a data channel ([`rtc`]).
//! [`reliable`] numbers, acknowledges, replays and reorders messages across both transports; it is
//! sans-IO, so its rules are tested without a network. The wire format between clients is in
//! docs/protocol.md ("Messages between clients").

pub mod identity;
pub mod matrix;
pub mod reliable;
pub mod rtc;
pub mod signal;
