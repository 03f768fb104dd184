//! Presence and discovery: which Raiden user holds which address (provably), what it can do, and
//! whether it is online.
//!
//! So far: [`identity`] (user ids, displayname signatures), [`capabilities`] (the `avatar_url` form)
//! and [`model`] (the sans-IO directory: verification binding, presence, best user per address).
//! Feeding it from the inbox and profile look-ups, persisting it, and its HTTP API come next (issue 3).

pub mod capabilities;
pub mod identity;
pub mod model;
