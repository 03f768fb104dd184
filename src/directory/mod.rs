//! Presence and discovery: which Raiden user holds which address (provably), what it can do, and
//! whether it is online.
//!
//! So far: [`identity`] (user ids, displayname signatures) and [`capabilities`] (the `avatar_url`
//! form). Presence, the directory store and its HTTP API come next (issue 3).

pub mod capabilities;
pub mod identity;
