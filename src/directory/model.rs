//! The directory's state, without IO: who claims which address, who proved it, what they can do and
//! how present they are. Callers feed profiles and presence in (with the time, for last activity)
//! and ask who to reach for an address; each change reports which address it touched, for the
//! change feed.
//!
//! Rules:
//! - A user is bound to an address only when its displayname is a signature of its user id by that
//!   address; other users of the address are kept as unverified and are never the one returned for it.
//! - An address may have several users (one per homeserver it roamed to); the best is the verified
//!   one with the best presence (online, then unavailable), then the most recent activity.

use std::collections::HashMap;

use serde::Serialize;

use super::capabilities::Capabilities;
use super::identity::{Address, claimed_address, verify_displayname};

/// A user's presence, ordered from worst to best.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Presence {
    #[default]
    Offline,
    Unavailable,
    Online,
}

impl Presence {
    /// The Matrix presence string; unknown values count as offline.
    pub fn from_matrix(presence: &str) -> Self {
        match presence {
            "online" => Presence::Online,
            "unavailable" => Presence::Unavailable,
            _ => Presence::Offline,
        }
    }

    /// The Matrix presence string.
    pub fn as_matrix(self) -> &'static str {
        match self {
            Presence::Online => "online",
            Presence::Unavailable => "unavailable",
            Presence::Offline => "offline",
        }
    }

    /// Online and unavailable users can be reached.
    pub fn reachable(self) -> bool {
        self != Presence::Offline
    }
}

/// What the directory knows of one Raiden user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub user_id: String,
    /// The address the user id claims.
    pub address: Address,
    /// The displayname proves the claim.
    pub verified: bool,
    pub displayname: Option<String>,
    /// The `avatar_url` as given (kept to store it); `capabilities` is parsed from it.
    pub avatar_url: Option<String>,
    pub capabilities: Option<Capabilities>,
    pub presence: Presence,
    /// Unix milliseconds when the presence was learnt.
    pub presence_at_ms: i64,
    /// Unix milliseconds of the user's last activity, when known.
    pub last_active_ms: Option<i64>,
}

/// What changed, for the change feed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Change {
    pub address: Address,
    pub what: Changed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Changed {
    /// Displayname (and with it verification) or capabilities.
    Profile,
    Presence,
}

#[derive(Debug, Default)]
pub struct Directory {
    users: HashMap<String, User>,
    by_address: HashMap<Address, Vec<String>>,
}

impl Directory {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records a user's profile (from an `m.room.member` event or a profile look-up). Users whose id
    /// is not a Raiden user id are ignored.
    pub fn apply_profile(
        &mut self,
        user_id: &str,
        displayname: Option<&str>,
        avatar_url: Option<&str>,
    ) -> Option<Change> {
        let user = self.entry(user_id)?;
        let verified = displayname.is_some_and(|name| verify_displayname(user_id, name).is_ok());
        let capabilities = avatar_url.and_then(|url| Capabilities::parse(url).ok());
        let displayname = displayname.map(str::to_owned);
        let avatar_url = avatar_url.map(str::to_owned);
        if user.verified == verified && user.displayname == displayname && user.avatar_url == avatar_url {
            return None;
        }
        user.verified = verified;
        user.displayname = displayname;
        user.avatar_url = avatar_url;
        user.capabilities = capabilities;
        Some(Change { address: user.address, what: Changed::Profile })
    }

    /// Records a user's presence, learnt at `now_ms`; `last_active_ms` when the source says when the
    /// user was last active.
    pub fn apply_presence(
        &mut self,
        user_id: &str,
        presence: Presence,
        last_active_ms: Option<i64>,
        now_ms: i64,
    ) -> Option<Change> {
        let user = self.entry(user_id)?;
        user.presence_at_ms = now_ms;
        let last_active_ms = last_active_ms.max(user.last_active_ms);
        if user.presence == presence && user.last_active_ms == last_active_ms {
            return None;
        }
        let presence_changed = user.presence != presence;
        user.presence = presence;
        user.last_active_ms = last_active_ms;
        presence_changed.then_some(Change { address: user.address, what: Changed::Presence })
    }

    /// Records that a known user was active at `at_ms` (it sent an event); true when that is newer
    /// than what was known. Unknown users are not added: activity alone says nothing of a profile.
    pub fn apply_activity(&mut self, user_id: &str, at_ms: i64) -> bool {
        match self.users.get_mut(user_id) {
            Some(user) if user.last_active_ms < Some(at_ms) => {
                user.last_active_ms = Some(at_ms);
                true
            }
            _ => false,
        }
    }

    /// Every known user, in no particular order.
    pub fn users(&self) -> impl Iterator<Item = &User> {
        self.users.values()
    }

    /// The known user, if any.
    pub fn user(&self, user_id: &str) -> Option<&User> {
        self.users.get(user_id)
    }

    /// Every user claiming `address`, best first (verified before unverified).
    pub fn users_of(&self, address: &Address) -> Vec<&User> {
        let mut users: Vec<&User> =
            self.by_address.get(address).into_iter().flatten().filter_map(|id| self.users.get(id)).collect();
        users.sort_by(|a, b| rank(b).cmp(&rank(a)).then_with(|| a.user_id.cmp(&b.user_id)));
        users
    }

    /// The verified, reachable user to contact for `address`.
    pub fn best(&self, address: &Address) -> Option<&User> {
        self.users_of(address).into_iter().find(|user| user.verified && user.presence.reachable())
    }

    /// Whether any verified user of `address` is online or unavailable.
    pub fn reachable(&self, address: &Address) -> bool {
        self.best(address).is_some()
    }

    pub fn len(&self) -> usize {
        self.users.len()
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    fn entry(&mut self, user_id: &str) -> Option<&mut User> {
        if !self.users.contains_key(user_id) {
            let address = claimed_address(user_id)?;
            self.by_address.entry(address).or_default().push(user_id.to_owned());
            self.users.insert(
                user_id.to_owned(),
                User {
                    user_id: user_id.to_owned(),
                    address,
                    verified: false,
                    displayname: None,
                    avatar_url: None,
                    capabilities: None,
                    presence: Presence::Offline,
                    presence_at_ms: 0,
                    last_active_ms: None,
                },
            );
        }
        self.users.get_mut(user_id)
    }
}

/// How good a user is to contact: verified first, then presence, then recent activity.
fn rank(user: &User) -> (bool, Presence, Option<i64>) {
    (user.verified, user.presence, user.last_active_ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    // Signed with eth-account (see identity.rs): the user id below, by its own address.
    const USER: &str = "@0x2c7536e3605d9c16a7a3d7b1898e529396a65c23:example.org";
    const ROAMED: &str = "@0x2c7536e3605d9c16a7a3d7b1898e529396a65c23:other.example";
    const SIGNATURE: &str = "0x465cfd0e1acba2f1142a1e5c1c0aa539a23871410ae2cfcfbea5f058c610c626\
                             702365fe24a5978f29c219626059474727eb1a9967497a989805c0217fc68c8a1b";
    const CAPS: &str = "mxc://raiden.network/cap?webRTC=1&Receive=1";

    fn address() -> Address {
        Address::parse("0x2c7536e3605d9c16a7a3d7b1898e529396a65c23").unwrap()
    }

    #[test]
    fn verified_online_user_is_the_one_to_reach() {
        let mut dir = Directory::new();
        let change = dir.apply_profile(USER, Some(SIGNATURE), Some(CAPS));
        assert_eq!(change, Some(Change { address: address(), what: Changed::Profile }));
        assert_eq!(dir.best(&address()), None, "offline until presence says otherwise");
        assert_eq!(
            dir.apply_presence(USER, Presence::Online, Some(1_000), 0),
            Some(Change { address: address(), what: Changed::Presence })
        );
        let best = dir.best(&address()).unwrap();
        assert_eq!(best.user_id, USER);
        assert!(best.verified && best.capabilities.as_ref().unwrap().webrtc());
        assert!(dir.reachable(&address()));
        assert_eq!(
            dir.apply_presence(USER, Presence::Offline, None, 0).map(|c| c.what),
            Some(Changed::Presence)
        );
        assert!(!dir.reachable(&address()));
        assert_eq!(dir.user(USER).unwrap().last_active_ms, Some(1_000), "last activity is kept");
    }

    #[test]
    fn impostor_is_never_verified_and_never_shadows_the_user() {
        let mut dir = Directory::new();
        // Claims the victim's address on another server, with the victim's displayname copied over
        // (a signature of the victim's user id, not of its own) — and is online.
        dir.apply_profile(ROAMED, Some(SIGNATURE), Some(CAPS));
        dir.apply_presence(ROAMED, Presence::Online, Some(5_000), 0);
        assert!(!dir.user(ROAMED).unwrap().verified);
        assert_eq!(dir.best(&address()), None);
        // Garbage displaynames neither.
        dir.apply_profile(ROAMED, Some("0xnothex"), None);
        assert_eq!(dir.best(&address()), None);

        dir.apply_profile(USER, Some(SIGNATURE), None);
        dir.apply_presence(USER, Presence::Unavailable, Some(1_000), 0);
        let users = dir.users_of(&address());
        assert_eq!(users.len(), 2);
        assert_eq!(users[0].user_id, USER, "the verified user ranks first though the impostor is online");
        assert_eq!(dir.best(&address()).unwrap().user_id, USER);
    }

    #[test]
    fn best_presence_wins_among_verified_users() {
        // The same key signed the roamed user id (on another homeserver): both users are verified.
        const ROAMED_SIGNATURE: &str = "0x83f09a358fd0ca4998b47f95062e5c2637a7cce24cf4731a9c69ce15b8fa053a\
                                        09d018ec145ded2665e8b6da027b7a2d2a398ac2120ac6433903339cb13659d51c";
        let mut dir = Directory::new();
        dir.apply_profile(USER, Some(SIGNATURE), None);
        dir.apply_profile(ROAMED, Some(ROAMED_SIGNATURE), None);
        assert!(dir.user(ROAMED).unwrap().verified);
        dir.apply_presence(USER, Presence::Unavailable, Some(9_000), 0);
        dir.apply_presence(ROAMED, Presence::Online, Some(1_000), 0);
        assert_eq!(dir.best(&address()).unwrap().user_id, ROAMED, "online beats unavailable");
        dir.apply_presence(ROAMED, Presence::Unavailable, None, 0);
        assert_eq!(dir.best(&address()).unwrap().user_id, USER, "then the most recent activity");
        dir.apply_presence(USER, Presence::Offline, None, 0);
        assert_eq!(dir.best(&address()).unwrap().user_id, ROAMED, "offline users are not reachable");
    }

    #[test]
    fn non_raiden_users_and_repeats_change_nothing() {
        let mut dir = Directory::new();
        assert_eq!(dir.apply_profile("@alice:example.org", Some("Alice"), None), None);
        assert_eq!(dir.apply_presence("@alice:example.org", Presence::Online, None, 0), None);
        assert!(dir.is_empty());
        assert!(dir.apply_profile(USER, Some(SIGNATURE), Some(CAPS)).is_some());
        assert_eq!(dir.apply_profile(USER, Some(SIGNATURE), Some(CAPS)), None, "same profile: no change");
        assert!(dir.apply_presence(USER, Presence::Online, None, 0).is_some());
        assert_eq!(
            dir.apply_presence(USER, Presence::Online, Some(7), 0),
            None,
            "activity alone is not a change"
        );
        assert_eq!(dir.len(), 1);
    }

    #[test]
    fn matrix_presence_strings() {
        assert_eq!(Presence::from_matrix("online"), Presence::Online);
        assert_eq!(Presence::from_matrix("unavailable"), Presence::Unavailable);
        assert_eq!(Presence::from_matrix("offline"), Presence::Offline);
        assert_eq!(Presence::from_matrix("busy"), Presence::Offline);
        assert!(Presence::Unavailable.reachable() && !Presence::Offline.reachable());
    }
}
