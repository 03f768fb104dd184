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
//! - Profiles and presence carry the time they were observed; one observed earlier than what the
//!   directory holds is ignored, so that a stale push replayed from the inbox cannot overwrite a
//!   fresher answer of the homeserver.
//! - Signatures are recovered only for a displayname that is new or changed; callers holding the
//!   directory behind a lock recover them before taking it ([`Directory::verification`],
//!   [`Directory::apply_verified_profile`]).

use std::collections::HashMap;
use std::sync::Arc;

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
///
/// Kept small, because a directory may hold millions: strings are boxed, and the `avatar_url` (with
/// the capabilities parsed from it) is shared between all users that have the same one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub user_id: Box<str>,
    /// The address the user id claims.
    pub address: Address,
    /// The displayname proves the claim.
    pub verified: bool,
    /// Presence as the homeserver reported it; see [`User::presence`].
    pub homeserver_presence: Presence,
    /// Live signalling connections of this user: while there is one, the user is online.
    pub connections: u32,
    pub displayname: Option<Box<str>>,
    pub avatar: Option<Arc<Avatar>>,
    /// Unix milliseconds when the presence was observed (a push received, a request sent).
    pub presence_at_ms: i64,
    /// Unix milliseconds of the user's last activity, when known.
    pub last_active_ms: Option<i64>,
    /// Unix milliseconds when the profile was last observed (0: never, or restored from a row
    /// written before this was stored).
    pub profile_at_ms: i64,
}

/// An `avatar_url` and the capabilities it carries, if it is a capabilities URL.
#[derive(Debug, PartialEq, Eq)]
pub struct Avatar {
    pub url: Box<str>,
    pub capabilities: Option<Capabilities>,
}

impl User {
    /// The user's presence: online while it has a live signalling connection, else what the
    /// homeserver said.
    pub fn presence(&self) -> Presence {
        if self.connections > 0 { Presence::Online } else { self.homeserver_presence }
    }

    pub fn avatar_url(&self) -> Option<&str> {
        self.avatar.as_deref().map(|avatar| &*avatar.url)
    }

    pub fn capabilities(&self) -> Option<&Capabilities> {
        self.avatar.as_deref().and_then(|avatar| avatar.capabilities.as_ref())
    }

    /// The server part of the user id.
    pub fn server_name(&self) -> &str {
        server_name(&self.user_id)
    }

    /// When the directory last observed anything of this user (profile or presence).
    pub fn seen_at_ms(&self) -> i64 {
        self.profile_at_ms.max(self.presence_at_ms)
    }
}

fn server_name(user_id: &str) -> &str {
    user_id.split_once(':').map_or("", |(_, server)| server)
}

/// What changed, for the change feed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Change {
    pub address: Address,
    pub what: Changed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Changed {
    /// The user's presence as seen through [`User::presence`] (reachable or not, online or away).
    Presence,
    /// The profile: whether the verification flipped and whether the capabilities (the
    /// `avatar_url`) changed; both false when only the displayname did.
    Profile { verification: bool, capabilities: bool },
}

/// Avatars interned before the first sweep of unused ones.
const AVATAR_SWEEP_MIN: usize = 1024;

#[derive(Debug, Default)]
pub struct Directory {
    /// Users by the address they claim (usually one each), in no particular order.
    by_address: HashMap<Address, Vec<User>>,
    /// Interned avatars by URL.
    avatars: HashMap<Box<str>, Arc<Avatar>>,
    /// Interned avatars after the last sweep.
    avatars_swept: usize,
    len: usize,
    /// This homeserver's server name: users of other servers are remote ones ([`Self::remote_len`]).
    local_server: Box<str>,
    /// Users of other servers.
    remote: usize,
}

impl Directory {
    /// A directory in which every user is a remote one (see [`Self::for_server`]).
    pub fn new() -> Self {
        Self::default()
    }

    /// A directory for the homeserver `server_name`: users of other servers are counted apart
    /// ([`Self::remote_len`]), so that they can be bounded.
    pub fn for_server(server_name: &str) -> Self {
        Self { local_server: server_name.into(), ..Self::default() }
    }

    /// Records a user's profile (from an `m.room.member` event or a profile look-up) observed at
    /// `observed_ms`; ignored when older than the profile held. Users whose id is not a Raiden user
    /// id are ignored. The signature is recovered only when the displayname is new or changed.
    pub fn apply_profile(
        &mut self,
        user_id: &str,
        displayname: Option<&str>,
        avatar_url: Option<&str>,
        observed_ms: i64,
    ) -> Option<Change> {
        let verified =
            self.verification(user_id, displayname).unwrap_or_else(|| verify(user_id, displayname));
        self.apply_verified_profile(user_id, displayname, avatar_url, verified, observed_ms)
    }

    /// The verification of `displayname` for `user_id` when the directory already knows it (the
    /// user has that displayname); `None` when the signature must be recovered ([`verify`]).
    pub fn verification(&self, user_id: &str, displayname: Option<&str>) -> Option<bool> {
        if displayname.is_none() {
            return Some(false);
        }
        self.user(user_id).filter(|user| user.displayname.as_deref() == displayname).map(|user| user.verified)
    }

    /// As [`Self::apply_profile`], with the verification already computed ([`verify`] of the same
    /// user id and displayname, so that no signature is recovered here).
    pub fn apply_verified_profile(
        &mut self,
        user_id: &str,
        displayname: Option<&str>,
        avatar_url: Option<&str>,
        verified: bool,
        observed_ms: i64,
    ) -> Option<Change> {
        if self.user(user_id).is_some_and(|user| observed_ms < user.profile_at_ms) {
            return None;
        }
        let change = self.set_profile(user_id, displayname, avatar_url, verified);
        if let Some(user) = self.user_mut(user_id) {
            user.profile_at_ms = observed_ms;
        }
        change
    }

    /// Records a profile whose verification was already computed (by [`Self::apply_profile`],
    /// before it was stored), observed at `profile_at_ms`.
    pub(crate) fn restore_profile(
        &mut self,
        user_id: &str,
        displayname: Option<&str>,
        avatar_url: Option<&str>,
        verified: bool,
        profile_at_ms: i64,
    ) {
        self.apply_verified_profile(user_id, displayname, avatar_url, verified, profile_at_ms);
    }

    /// Sets the profile (of a Raiden user id); `None` when nothing changed.
    fn set_profile(
        &mut self,
        user_id: &str,
        displayname: Option<&str>,
        avatar_url: Option<&str>,
        verified: bool,
    ) -> Option<Change> {
        let avatar = avatar_url.map(|url| self.intern_avatar(url));
        let user = self.entry(user_id)?;
        if user.verified == verified && user.displayname.as_deref() == displayname && user.avatar == avatar {
            return None;
        }
        let what = Changed::Profile {
            verification: user.verified != verified,
            capabilities: user.avatar_url() != avatar_url,
        };
        user.verified = verified;
        user.displayname = displayname.map(Box::from);
        user.avatar = avatar;
        Some(Change { address: user.address, what })
    }

    /// Records a user's presence, observed at `observed_ms`; `last_active_ms` when the source says
    /// when the user was last active. A presence observed before the one held is ignored (its
    /// activity still counts).
    pub fn apply_presence(
        &mut self,
        user_id: &str,
        presence: Presence,
        last_active_ms: Option<i64>,
        observed_ms: i64,
    ) -> Option<Change> {
        let user = self.entry(user_id)?;
        if observed_ms < user.presence_at_ms {
            user.last_active_ms = last_active_ms.max(user.last_active_ms);
            return None;
        }
        let before = user.presence();
        user.presence_at_ms = observed_ms;
        user.homeserver_presence = presence;
        user.last_active_ms = last_active_ms.max(user.last_active_ms);
        (user.presence() != before).then_some(Change { address: user.address, what: Changed::Presence })
    }

    /// Records that a signalling connection of `user_id` opened (`opened`) or closed at `now_ms`.
    /// While a user has one, it is online.
    pub fn apply_connection(&mut self, user_id: &str, opened: bool, now_ms: i64) -> Option<Change> {
        let user = self.entry(user_id)?;
        let before = user.presence();
        if opened {
            user.connections = user.connections.saturating_add(1);
            user.last_active_ms = user.last_active_ms.max(Some(now_ms));
        } else {
            user.connections = user.connections.saturating_sub(1);
        }
        (user.presence() != before).then_some(Change { address: user.address, what: Changed::Presence })
    }

    /// Records that a known user was active at `at_ms` (it sent an event); true when that is newer
    /// than what was known. Unknown users are not added: activity alone says nothing of a profile.
    pub fn apply_activity(&mut self, user_id: &str, at_ms: i64) -> bool {
        match self.user_mut(user_id) {
            Some(user) if user.last_active_ms < Some(at_ms) => {
                user.last_active_ms = Some(at_ms);
                true
            }
            _ => false,
        }
    }

    /// Every known user, in no particular order.
    pub fn users(&self) -> impl Iterator<Item = &User> {
        self.by_address.values().flatten()
    }

    /// The known user, if any.
    pub fn user(&self, user_id: &str) -> Option<&User> {
        let address = claimed_address(user_id)?;
        self.by_address.get(&address)?.iter().find(|user| &*user.user_id == user_id)
    }

    fn user_mut(&mut self, user_id: &str) -> Option<&mut User> {
        let address = claimed_address(user_id)?;
        self.by_address.get_mut(&address)?.iter_mut().find(|user| &*user.user_id == user_id)
    }

    /// The users claiming `address`, in no particular order (empty when none).
    pub fn claimants(&self, address: &Address) -> &[User] {
        self.by_address.get(address).map_or(&[], Vec::as_slice)
    }

    /// Every user claiming `address`, best first (verified before unverified).
    pub fn users_of(&self, address: &Address) -> Vec<&User> {
        let mut users: Vec<&User> = self.claimants(address).iter().collect();
        users.sort_by(|a, b| rank(b).cmp(&rank(a)).then_with(|| a.user_id.cmp(&b.user_id)));
        users
    }

    /// The verified, reachable user to contact for `address`.
    pub fn best(&self, address: &Address) -> Option<&User> {
        self.claimants(address)
            .iter()
            .filter(|user| user.verified && user.presence().reachable())
            .max_by(|a, b| rank(a).cmp(&rank(b)).then_with(|| b.user_id.cmp(&a.user_id)))
    }

    /// Whether any verified user of `address` is online or unavailable.
    pub fn reachable(&self, address: &Address) -> bool {
        self.best(address).is_some()
    }

    /// Whether any user claims `address`.
    pub fn knows(&self, address: &Address) -> bool {
        self.by_address.contains_key(address)
    }

    pub fn len(&self) -> usize {
        self.len
    }

    /// Users of other servers than the one given to [`Self::for_server`].
    pub fn remote_len(&self) -> usize {
        self.remote
    }

    /// Whether `user_id` is of another server than the one given to [`Self::for_server`].
    pub fn is_remote(&self, user_id: &str) -> bool {
        server_name(user_id) != &*self.local_server
    }

    /// Up to `count` remote users seen longest ago ([`User::seen_at_ms`]), without a live
    /// connection, with that time: what [`Self::evict`] is given when remote users are bounded.
    /// Reads every user: call it under a read lock, not a write lock.
    pub fn oldest_remote(&self, count: usize) -> Vec<(i64, Box<str>)> {
        let mut remote: Vec<(i64, &str)> = self
            .users()
            .filter(|user| user.connections == 0 && self.is_remote(&user.user_id))
            .map(|user| (user.seen_at_ms(), &*user.user_id))
            .collect();
        if count < remote.len() {
            remote.select_nth_unstable(count);
            remote.truncate(count);
        }
        remote.into_iter().map(|(seen, user_id)| (seen, user_id.into())).collect()
    }

    /// Removes the users given (as [`Self::oldest_remote`] returns them) that were not seen since
    /// nor connected; returns those removed.
    pub fn evict(&mut self, victims: Vec<(i64, Box<str>)>) -> Vec<String> {
        let mut evicted = Vec::with_capacity(victims.len());
        for (seen_at_ms, user_id) in victims {
            let Some(address) = claimed_address(&user_id) else { continue };
            let Some(users) = self.by_address.get_mut(&address) else { continue };
            let Some(index) = users.iter().position(|user| user.user_id == user_id) else { continue };
            let user = &users[index];
            if user.seen_at_ms() != seen_at_ms || user.connections > 0 {
                continue;
            }
            users.swap_remove(index);
            if users.is_empty() {
                self.by_address.remove(&address);
            }
            self.len -= 1;
            if self.is_remote(&user_id) {
                self.remote -= 1;
            }
            evicted.push(user_id.into_string());
        }
        evicted
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn entry(&mut self, user_id: &str) -> Option<&mut User> {
        let address = claimed_address(user_id)?;
        let users = self.by_address.entry(address).or_default();
        let index = if let Some(index) = users.iter().position(|user| &*user.user_id == user_id) {
            index
        } else {
            // Most addresses have one user: do not let the vector over-allocate.
            users.reserve_exact(1);
            users.push(User {
                user_id: user_id.into(),
                address,
                verified: false,
                homeserver_presence: Presence::Offline,
                connections: 0,
                displayname: None,
                avatar: None,
                presence_at_ms: 0,
                last_active_ms: None,
                profile_at_ms: 0,
            });
            self.len += 1;
            if server_name(user_id) != &*self.local_server {
                self.remote += 1;
            }
            users.len() - 1
        };
        users.get_mut(index)
    }

    /// The shared [`Avatar`] for `url`; avatars no user holds any more are swept now and then.
    fn intern_avatar(&mut self, url: &str) -> Arc<Avatar> {
        if let Some(avatar) = self.avatars.get(url) {
            return avatar.clone();
        }
        if self.avatars.len() >= (2 * self.avatars_swept).max(AVATAR_SWEEP_MIN) {
            self.avatars.retain(|_, avatar| Arc::strong_count(avatar) > 1);
            self.avatars_swept = self.avatars.len();
        }
        let avatar = Arc::new(Avatar { url: url.into(), capabilities: Capabilities::parse(url).ok() });
        self.avatars.insert(url.into(), avatar.clone());
        avatar
    }
}

/// Whether `displayname` is a signature of `user_id` by the address it claims (a secp256k1
/// recovery, ~150 µs: see [`Directory::verification`] for when it can be skipped).
pub fn verify(user_id: &str, displayname: Option<&str>) -> bool {
    displayname.is_some_and(|name| verify_displayname(user_id, name).is_ok())
}

/// How good a user is to contact: verified first, then presence, then recent activity.
fn rank(user: &User) -> (bool, Presence, Option<i64>) {
    (user.verified, user.presence(), user.last_active_ms)
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
        let change = dir.apply_profile(USER, Some(SIGNATURE), Some(CAPS), 0);
        assert_eq!(
            change,
            Some(Change {
                address: address(),
                what: Changed::Profile { verification: true, capabilities: true }
            })
        );
        let what = dir.apply_profile(USER, Some(SIGNATURE), None, 0).map(|c| c.what);
        assert_eq!(what, Some(Changed::Profile { verification: false, capabilities: true }));
        dir.apply_profile(USER, Some(SIGNATURE), Some(CAPS), 0);
        assert_eq!(dir.best(&address()), None, "offline until presence says otherwise");
        assert_eq!(
            dir.apply_presence(USER, Presence::Online, Some(1_000), 0),
            Some(Change { address: address(), what: Changed::Presence })
        );
        let best = dir.best(&address()).unwrap();
        assert_eq!(best.user_id.as_ref(), USER);
        assert!(best.verified && best.capabilities().unwrap().webrtc());
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
        dir.apply_profile(ROAMED, Some(SIGNATURE), Some(CAPS), 0);
        dir.apply_presence(ROAMED, Presence::Online, Some(5_000), 0);
        assert!(!dir.user(ROAMED).unwrap().verified);
        assert_eq!(dir.best(&address()), None);
        // Garbage displaynames neither.
        dir.apply_profile(ROAMED, Some("0xnothex"), None, 0);
        assert_eq!(dir.best(&address()), None);

        dir.apply_profile(USER, Some(SIGNATURE), None, 0);
        dir.apply_presence(USER, Presence::Unavailable, Some(1_000), 0);
        let users = dir.users_of(&address());
        assert_eq!(users.len(), 2);
        assert_eq!(
            users[0].user_id.as_ref(),
            USER,
            "the verified user ranks first though the impostor is online"
        );
        assert_eq!(dir.best(&address()).unwrap().user_id.as_ref(), USER);
    }

    #[test]
    fn best_presence_wins_among_verified_users() {
        // The same key signed the roamed user id (on another homeserver): both users are verified.
        const ROAMED_SIGNATURE: &str = "0x83f09a358fd0ca4998b47f95062e5c2637a7cce24cf4731a9c69ce15b8fa053a\
                                        09d018ec145ded2665e8b6da027b7a2d2a398ac2120ac6433903339cb13659d51c";
        let mut dir = Directory::new();
        dir.apply_profile(USER, Some(SIGNATURE), None, 0);
        dir.apply_profile(ROAMED, Some(ROAMED_SIGNATURE), None, 0);
        assert!(dir.user(ROAMED).unwrap().verified);
        dir.apply_presence(USER, Presence::Unavailable, Some(9_000), 0);
        dir.apply_presence(ROAMED, Presence::Online, Some(1_000), 0);
        assert_eq!(dir.best(&address()).unwrap().user_id.as_ref(), ROAMED, "online beats unavailable");
        dir.apply_presence(ROAMED, Presence::Unavailable, None, 0);
        assert_eq!(dir.best(&address()).unwrap().user_id.as_ref(), USER, "then the most recent activity");
        dir.apply_presence(USER, Presence::Offline, None, 0);
        assert_eq!(dir.best(&address()).unwrap().user_id.as_ref(), ROAMED, "offline users are not reachable");
    }

    #[test]
    fn non_raiden_users_and_repeats_change_nothing() {
        let mut dir = Directory::new();
        assert_eq!(dir.apply_profile("@alice:example.org", Some("Alice"), None, 0), None);
        assert_eq!(dir.apply_presence("@alice:example.org", Presence::Online, None, 0), None);
        assert!(dir.is_empty());
        assert!(dir.apply_profile(USER, Some(SIGNATURE), Some(CAPS), 0).is_some());
        assert_eq!(dir.apply_profile(USER, Some(SIGNATURE), Some(CAPS), 0), None, "same profile: no change");
        assert!(dir.apply_presence(USER, Presence::Online, None, 0).is_some());
        assert_eq!(
            dir.apply_presence(USER, Presence::Online, Some(7), 0),
            None,
            "activity alone is not a change"
        );
        assert_eq!(dir.len(), 1);
    }

    #[test]
    fn a_signalling_connection_makes_a_user_online_until_it_closes() {
        let mut dir = Directory::new();
        dir.apply_profile(USER, Some(SIGNATURE), Some(CAPS), 0);
        assert_eq!(
            dir.apply_connection(USER, true, 5_000).map(|c| c.what),
            Some(Changed::Presence),
            "connected = online"
        );
        assert_eq!(dir.best(&address()).unwrap().last_active_ms, Some(5_000));
        assert_eq!(dir.apply_connection(USER, true, 6_000), None, "a second connection changes nothing");
        assert_eq!(dir.apply_presence(USER, Presence::Offline, None, 7_000), None, "still connected");
        assert!(dir.reachable(&address()));
        assert_eq!(dir.apply_connection(USER, false, 8_000), None);
        assert_eq!(
            dir.apply_connection(USER, false, 9_000).map(|c| c.what),
            Some(Changed::Presence),
            "the last one closed: the homeserver's presence again"
        );
        assert!(!dir.reachable(&address()));
    }

    #[test]
    fn users_with_the_same_avatar_share_it() {
        const OTHER: &str = "@0x0000000000000000000000000000000000000001:example.org";
        let mut dir = Directory::new();
        dir.apply_profile(USER, None, Some(CAPS), 0);
        dir.apply_profile(OTHER, None, Some(CAPS), 0);
        let (a, b) = (dir.user(USER).unwrap(), dir.user(OTHER).unwrap());
        assert!(Arc::ptr_eq(a.avatar.as_ref().unwrap(), b.avatar.as_ref().unwrap()));
        assert_eq!(a.avatar_url(), Some(CAPS));
        // Avatars nobody holds any more are swept once enough new ones arrive.
        for i in 0..3 * AVATAR_SWEEP_MIN {
            dir.apply_profile(OTHER, None, Some(&format!("mxc://example.org/{i}")), 0);
        }
        assert!(dir.avatars.len() <= 2 * AVATAR_SWEEP_MIN, "{}", dir.avatars.len());
        assert!(dir.avatars.contains_key(CAPS), "still held by USER");
        assert_eq!(dir.len(), 2);
    }

    #[test]
    fn an_update_observed_before_the_one_held_is_ignored() {
        let mut dir = Directory::new();
        dir.apply_profile(USER, Some(SIGNATURE), Some(CAPS), 2_000);
        assert_eq!(dir.apply_profile(USER, Some("0xolder"), None, 1_000), None, "older profile ignored");
        assert!(dir.user(USER).unwrap().verified);
        assert!(dir.apply_presence(USER, Presence::Online, Some(5), 2_000).is_some());
        assert_eq!(dir.apply_presence(USER, Presence::Offline, Some(1_500), 1_000), None, "older presence");
        let user = dir.user(USER).unwrap();
        assert_eq!((user.presence(), user.presence_at_ms), (Presence::Online, 2_000));
        assert_eq!(user.last_active_ms, Some(1_500), "its activity still counts");
        assert!(dir.apply_presence(USER, Presence::Offline, None, 2_000).is_some(), "same time: applied");
    }

    #[test]
    fn remote_users_are_counted_and_the_oldest_evicted() {
        const REMOTE: &str = "@0x0000000000000000000000000000000000000001:remote.example";
        const LATER: &str = "@0x0000000000000000000000000000000000000002:remote.example";
        let mut dir = Directory::for_server("example.org");
        dir.apply_profile(USER, Some(SIGNATURE), None, 1);
        dir.apply_profile(REMOTE, None, None, 1);
        dir.apply_presence(LATER, Presence::Online, None, 5);
        assert_eq!((dir.len(), dir.remote_len()), (3, 2));
        let oldest = dir.oldest_remote(1);
        assert_eq!(oldest, vec![(1, Box::from(REMOTE))]);
        dir.apply_presence(REMOTE, Presence::Online, None, 6);
        assert!(dir.evict(oldest).is_empty(), "seen since: kept");
        assert_eq!(dir.evict(dir.oldest_remote(1)), vec![LATER.to_owned()]);
        assert_eq!((dir.len(), dir.remote_len()), (2, 1));
        assert!(dir.user(LATER).is_none() && !dir.knows(&claimed_address(LATER).unwrap()));
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
