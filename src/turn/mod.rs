//! TURN/STUN for peers that cannot reach each other directly.
//!
//! So far: [`credentials`] (the TURN REST scheme shared with Synapse and coturn) and [`api`], the
//! client endpoint that hands them out. The embedded relay comes next (issue 4).

pub mod api;
pub mod credentials;
pub mod nonce;
pub mod policy;
pub mod server;
