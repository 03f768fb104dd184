//! Presence and discovery: which Raiden user holds which address (provably), what it can do, and
//! whether it is online.
//!
//! So far: [`identity`] (user ids, displayname signatures), [`capabilities`] (the `avatar_url` form)
//! and [`model`] (the sans-IO directory: verification binding, presence, best user per address).
//! [`restore`] and [`to_row`] move it to and from the store (`directory_users`); [`service`] feeds it
//! from the inbox; [`api`] answers discovery on the client listener. Profile look-ups and presence
//! reconciliation come next (issue 3).

pub mod api;
pub mod capabilities;
pub mod identity;
pub mod model;
pub mod service;

use crate::store::DirectoryRow;
use model::{Directory, Presence, User};

/// Rebuilds the directory from stored rows. Presence learnt more than `stale_after_ms` before
/// `now_ms` counts as offline until the homeserver confirms it (presence pushes are lossy).
pub fn restore(rows: &[DirectoryRow], now_ms: i64, stale_after_ms: i64) -> Directory {
    let mut directory = Directory::new();
    for row in rows {
        restore_row(&mut directory, row, now_ms, stale_after_ms);
    }
    directory
}

/// Adds one stored row to `directory` (see [`restore`]). The stored verification is trusted (it was
/// computed from the same user id and displayname); rows without one are verified now.
pub fn restore_row(directory: &mut Directory, row: &DirectoryRow, now_ms: i64, stale_after_ms: i64) {
    let (displayname, avatar_url) = (row.displayname.as_deref(), row.avatar_url.as_deref());
    match row.verified {
        Some(verified) => {
            directory.restore_profile(&row.user_id, displayname, avatar_url, verified, row.profile_at);
        }
        None => {
            directory.apply_profile(&row.user_id, displayname, avatar_url, row.profile_at);
        }
    }
    let fresh = now_ms.saturating_sub(row.presence_at) <= stale_after_ms;
    let presence = if fresh { Presence::from_matrix(&row.presence) } else { Presence::Offline };
    directory.apply_presence(&row.user_id, presence, row.last_active_ms, row.presence_at);
}

/// The stored form of a user.
pub fn to_row(user: &User) -> DirectoryRow {
    DirectoryRow {
        user_id: user.user_id.to_string(),
        displayname: user.displayname.as_deref().map(str::to_owned),
        avatar_url: user.avatar_url().map(str::to_owned),
        verified: Some(user.verified),
        presence: user.homeserver_presence.as_matrix().to_owned(),
        presence_at: user.presence_at_ms,
        last_active_ms: user.last_active_ms,
        profile_at: user.profile_at_ms,
    }
}
