//! What the relay's shards share: allocations per user and in all (the quotas, 486 and 508), each
//! source's budget of unauthenticated requests, and its open TCP and TLS connections. Everything
//! else about an allocation lives in the one shard that holds it; these counts must be global, or a
//! user could take the quota once per core. The lock is held for a map look-up, never across IO.
//!
//! A source is an IPv4 address or an IPv6 /64: one host or site is usually given a whole /64, so
//! counting single IPv6 addresses would give it 2^64 budgets.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::net::IpAddr;
use std::sync::{Mutex, MutexGuard, PoisonError};

/// Sources tracked by the unauthenticated-request limiter before new ones are refused (after the
/// idle ones have been forgotten): bounds its memory under a spoofed-source flood.
const SOURCES_MAX: usize = 65_536;

/// Why an allocation was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The user holds `user_quota` allocations (486).
    UserQuota,
    /// The relay holds `total_quota` allocations (508).
    TotalQuota,
}

#[derive(Debug)]
pub struct Limits {
    user_quota: usize,
    total_quota: usize,
    /// Unauthenticated requests per second per source IP (burst: twice as many); 0: no limit.
    unauthenticated_per_sec: u32,
    /// Open stream (TCP, TLS) connections per source IP; 0: no limit.
    connections_per_source: usize,
    /// Open stream connections in all; 0: no limit.
    max_connections: usize,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    per_user: HashMap<Box<str>, usize>,
    total: usize,
    /// Token buckets of unauthenticated requests per source: (tokens, last refill in unix ms).
    sources: HashMap<IpAddr, (f64, u64)>,
    /// One entry per tracked source: when its bucket was last computed to be full again. A source
    /// used since is due early, and is then rescheduled rather than forgotten; forgetting idle
    /// sources therefore looks at the ones that are due, not at the whole table.
    refills: BinaryHeap<Reverse<(u64, IpAddr)>>,
    /// Open stream connections per source (only sources with at least one).
    connections: HashMap<IpAddr, usize>,
    /// Open stream connections in all.
    open_connections: usize,
}

impl Limits {
    pub fn new(user_quota: usize, total_quota: usize, unauthenticated_per_sec: u32) -> Self {
        Self {
            user_quota,
            total_quota,
            unauthenticated_per_sec,
            connections_per_source: 0,
            max_connections: 0,
            state: Mutex::default(),
        }
    }

    /// Limits open TCP and TLS connections to `per_source` per source IP and `total` in all
    /// (0: no limit).
    #[must_use]
    pub fn with_connections(self, per_source: usize, total: usize) -> Self {
        Self { connections_per_source: per_source, max_connections: total, ..self }
    }

    /// Counts a new stream connection from `source`, unless it has `connections_per_source` open or
    /// the relay `max_connections`.
    pub fn open_connection(&self, source: IpAddr) -> bool {
        let mut state = self.state();
        if self.max_connections != 0 && state.open_connections >= self.max_connections {
            return false;
        }
        let open = state.connections.entry(source_key(source)).or_default();
        if self.connections_per_source != 0 && *open >= self.connections_per_source {
            return false;
        }
        *open += 1;
        state.open_connections += 1;
        true
    }

    /// Forgets a connection counted by [`Limits::open_connection`].
    pub fn close_connection(&self, source: IpAddr) {
        let source = source_key(source);
        let mut state = self.state();
        if let Some(open) = state.connections.get_mut(&source) {
            *open -= 1;
            if *open == 0 {
                state.connections.remove(&source);
            }
            state.open_connections -= 1;
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Counts a new allocation of `username`, unless a quota is reached.
    pub fn take(&self, username: &str) -> Result<(), Refusal> {
        let mut state = self.state();
        let held = state.per_user.get(username).copied().unwrap_or(0);
        if held >= self.user_quota {
            return Err(Refusal::UserQuota);
        }
        if state.total >= self.total_quota {
            return Err(Refusal::TotalQuota);
        }
        state.total += 1;
        *state.per_user.entry(username.into()).or_default() += 1;
        Ok(())
    }

    /// Forgets an allocation of `username` counted by [`Limits::take`].
    pub fn release(&self, username: &str) {
        let mut state = self.state();
        if let Some(count) = state.per_user.get_mut(username) {
            *count -= 1;
            if *count == 0 {
                state.per_user.remove(username);
            }
            state.total -= 1;
        }
    }

    /// Allocations counted now (all shards).
    #[cfg(test)]
    fn allocations(&self) -> usize {
        self.state().total
    }

    /// Whether an unauthenticated request from `source` may be answered now; spends one token.
    pub fn allow_unauthenticated(&self, source: IpAddr, now_ms: u64) -> bool {
        let rate = f64::from(self.unauthenticated_per_sec);
        if rate == 0.0 {
            return true;
        }
        let burst = 2.0 * rate;
        let source = source_key(source);
        let mut state = self.state();
        let new = !state.sources.contains_key(&source);
        if new && state.sources.len() >= SOURCES_MAX {
            // Forget sources whose bucket has refilled: they are no different from new ones.
            forget_refilled(&mut state, now_ms, rate);
            if state.sources.len() >= SOURCES_MAX {
                return false;
            }
        }
        let bucket = state.sources.entry(source).or_insert((burst, now_ms));
        let tokens = refilled(*bucket, now_ms, rate).min(burst);
        let allowed = tokens >= 1.0;
        *bucket = (if allowed { tokens - 1.0 } else { tokens }, now_ms);
        if new {
            let due = full_at(*bucket, now_ms, rate);
            state.refills.push(Reverse((due, source)));
        }
        allowed
    }

    /// Forgets the sources whose budget has refilled (called about once a second).
    pub fn forget_idle_sources(&self, now_ms: u64) {
        let rate = f64::from(self.unauthenticated_per_sec);
        if rate > 0.0 {
            forget_refilled(&mut self.state(), now_ms, rate);
        }
    }

    /// Sources the limiter remembers (and checks it has one refill entry for each).
    #[cfg(test)]
    fn tracked_sources(&self) -> usize {
        let state = self.state();
        assert_eq!(state.refills.len(), state.sources.len(), "one refill entry per source");
        state.sources.len()
    }
}

/// What `address` is counted as: itself for IPv4 (also when IPv4-mapped), its /64 for IPv6.
fn source_key(address: IpAddr) -> IpAddr {
    match address.to_canonical() {
        IpAddr::V6(v6) => IpAddr::V6(std::net::Ipv6Addr::from_bits(v6.to_bits() & !u128::from(u64::MAX))),
        v4 @ IpAddr::V4(_) => v4,
    }
}

/// Forgets the sources due in `state.refills` whose bucket is full at `now_ms`, and reschedules the
/// due ones that were used since.
fn forget_refilled(state: &mut State, now_ms: u64, rate: f64) {
    while let Some(&Reverse((due, source))) = state.refills.peek() {
        if due > now_ms {
            break;
        }
        state.refills.pop();
        let Some(bucket) = state.sources.get(&source).copied() else { continue };
        if refilled(bucket, now_ms, rate) >= 2.0 * rate {
            state.sources.remove(&source);
        } else {
            state.refills.push(Reverse((full_at(bucket, now_ms, rate), source)));
        }
    }
}

/// When `bucket` holds a full burst (twice the rate) again; after `now_ms`, so that a rescheduled
/// source is never due twice at one time.
fn full_at((tokens, at): (f64, u64), now_ms: u64, rate: f64) -> u64 {
    let missing_secs = (2.0 * rate - tokens).max(0.0) / rate;
    // At most two seconds' worth of milliseconds: no truncation, no sign to lose.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let missing_ms = (missing_secs * 1000.0).ceil() as u64;
    at.saturating_add(missing_ms).max(now_ms + 1)
}

/// The tokens of `bucket` at `now_ms`, before the cap.
fn refilled((tokens, at): (f64, u64), now_ms: u64, rate: f64) -> f64 {
    #[allow(clippy::cast_precision_loss)] // milliseconds since the last request: far below 2^52
    let elapsed_secs = now_ms.saturating_sub(at) as f64 / 1000.0;
    tokens + elapsed_secs * rate
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: u64 = 1_700_000_000_000;

    #[test]
    fn stream_connections_are_limited_per_source_and_released() {
        let limits = Limits::new(1, 1, 0).with_connections(2, 0);
        let (a, b): (IpAddr, IpAddr) = ("192.0.2.1".parse().unwrap(), "192.0.2.2".parse().unwrap());
        assert!(limits.open_connection(a));
        assert!(limits.open_connection(a));
        assert!(!limits.open_connection(a), "a third from the same source");
        assert!(limits.open_connection(b), "another source has its own count");
        limits.close_connection(a);
        assert!(limits.open_connection(a), "a closed one makes room");
        for _ in 0..3 {
            limits.close_connection(a);
            limits.close_connection(b);
        }
        assert!(limits.state().connections.is_empty(), "closed sources are forgotten");
        assert_eq!(limits.state().open_connections, 0);
        let unlimited = Limits::new(1, 1, 0);
        assert!((0..1000).all(|_| unlimited.open_connection(a)));
    }

    #[test]
    fn stream_connections_are_limited_in_all() {
        let limits = Limits::new(1, 1, 0).with_connections(2, 3);
        let ip = |last: u8| IpAddr::from([192, 0, 2, last]);
        assert!(limits.open_connection(ip(1)));
        assert!(limits.open_connection(ip(2)));
        assert!(limits.open_connection(ip(3)));
        assert!(!limits.open_connection(ip(4)), "a fourth in all, from a new source");
        assert!(!limits.state().connections.contains_key(&ip(4)), "a refused source is not tracked");
        limits.close_connection(ip(4));
        assert!(!limits.open_connection(ip(5)), "closing what was refused frees nothing");
        limits.close_connection(ip(2));
        assert!(limits.open_connection(ip(4)), "a closed one makes room");
    }

    #[test]
    fn an_ipv6_slash_64_is_one_source_and_mapped_ipv4_is_ipv4() {
        let limits = Limits::new(1, 1, 0).with_connections(1, 0);
        let ip = |text: &str| text.parse::<IpAddr>().unwrap();
        assert!(limits.open_connection(ip("2001:db8:1:2::1")));
        assert!(!limits.open_connection(ip("2001:db8:1:2:ffff::9")), "the same /64");
        assert!(limits.open_connection(ip("2001:db8:1:3::1")), "another /64");
        assert!(limits.open_connection(ip("::ffff:192.0.2.1")));
        assert!(!limits.open_connection(ip("192.0.2.1")), "IPv4-mapped is the IPv4 address");
        assert!(limits.open_connection(ip("::ffff:192.0.2.2")), "not every mapped address in one");
        limits.close_connection(ip("2001:db8:1:2::77"));
        assert!(limits.open_connection(ip("2001:db8:1:2::1")), "closed from anywhere in the /64");
    }

    #[test]
    fn quotas_count_per_user_and_in_all_and_are_released() {
        let limits = Limits::new(2, 3, 0);
        assert_eq!(limits.take("alice"), Ok(()));
        assert_eq!(limits.take("alice"), Ok(()));
        assert_eq!(limits.take("alice"), Err(Refusal::UserQuota));
        assert_eq!(limits.take("bob"), Ok(()));
        assert_eq!(limits.take("carol"), Err(Refusal::TotalQuota));
        limits.release("alice");
        assert_eq!(limits.allocations(), 2);
        assert_eq!(limits.take("carol"), Ok(()));
        limits.release("nobody");
        assert_eq!(limits.allocations(), 3, "releasing what was never taken changes nothing");
    }

    #[test]
    fn the_unauthenticated_budget_is_a_burst_of_twice_the_rate_refilled_over_time() {
        let limits = Limits::new(1, 1, 5);
        let source: IpAddr = "192.0.2.1".parse().unwrap();
        let answered = (0..20).filter(|_| limits.allow_unauthenticated(source, T0)).count();
        assert_eq!(answered, 10);
        assert!(limits.allow_unauthenticated("192.0.2.2".parse().unwrap(), T0), "another source");
        assert!(!limits.allow_unauthenticated(source, T0 + 100), "half a token after 100 ms");
        assert!(limits.allow_unauthenticated(source, T0 + 300), "refilled");
        limits.forget_idle_sources(T0 + 10_000);
        assert_eq!(limits.tracked_sources(), 0, "refilled buckets are forgotten");
    }

    #[test]
    fn the_limiter_table_is_bounded() {
        let limits = Limits::new(1, 1, 1);
        for n in 0..u32::try_from(SOURCES_MAX).unwrap() {
            assert!(limits.allow_unauthenticated(IpAddr::from(n.to_be_bytes()), T0));
        }
        assert!(!limits.allow_unauthenticated("198.51.100.1".parse().unwrap(), T0), "table full");
        assert!(
            limits.allow_unauthenticated("198.51.100.1".parse().unwrap(), T0 + 2_000),
            "idle ones forgotten"
        );
        assert_eq!(limits.tracked_sources(), 1);
    }

    #[test]
    fn a_source_in_use_is_kept_and_forgotten_once_its_budget_has_refilled() {
        let limits = Limits::new(1, 1, 5);
        let source: IpAddr = "192.0.2.1".parse().unwrap();
        assert!(limits.allow_unauthenticated(source, T0));
        // Due at T0 + 200 ms (one token back); used again just before: rescheduled, not forgotten.
        assert!(limits.allow_unauthenticated(source, T0 + 150));
        limits.forget_idle_sources(T0 + 200);
        assert_eq!(limits.tracked_sources(), 1);
        assert!(!limits.state().refills.is_empty());
        // 8.75 tokens after its last use at T0 + 150: full (10) 250 ms later, forgotten then.
        limits.forget_idle_sources(T0 + 399);
        assert_eq!(limits.tracked_sources(), 1);
        limits.forget_idle_sources(T0 + 400);
        assert_eq!(limits.tracked_sources(), 0);
    }
}
