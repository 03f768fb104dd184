//! Who is calling the client API: the [`Caller`] extractor, and the token checks behind it.
//!
//! A client presents its Matrix access token (see [`super::access_token`]); [`Auth`] asks the
//! homeserver who it belongs to (`GET /_matrix/client/v3/account/whoami`) and remembers the answer,
//! so that the homeserver cannot be flooded through us:
//! - a valid token is trusted for `[homeserver] whoami_cache_secs`: a token revoked on the
//!   homeserver (logout) stops working here at most that long after;
//! - a token the homeserver does not know is answered 401 for `whoami_negative_cache_secs` without
//!   asking again;
//! - concurrent checks of one token share one `whoami` call;
//! - requests whose token is not known to be valid, and that would start a `whoami` call or are
//!   answered from the unknown-token cache, count against a per-source budget (`[client]
//!   unknown_token_per_sec`, `unknown_token_burst`; a source is an IPv4 address or an IPv6 /64 of
//!   the peer); past it they are answered 429 `M_LIMIT_EXCEEDED` with `retry_after_ms`. A token that
//!   turns out valid gives its request back; requests joining a call in flight are not counted.
//!
//! Tokens are kept only as SHA-256 hashes. Each cache holds at most `whoami_cache_entries` tokens
//! and forgets the least recently used first.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, FromRef, FromRequestParts, OptionalFromRequestParts};
use hashlink::LruCache;
use http::StatusCode;
use http::request::Parts;
use sha2::{Digest, Sha256};
use tokio::sync::OnceCell;

use super::MatrixError;
use crate::clock::Clock;
use crate::config::Config;
use crate::homeserver::{HomeserverClient, HomeserverError, Whoami};
use crate::telemetry::{CacheLabel, Metrics};

/// Sources whose budget of unknown-token requests is remembered; the least recently seen are
/// forgotten first (and start again with a full burst).
const MAX_SOURCES: usize = 100_000;

/// The caller of a client API route, whose access token the homeserver vouched for.
///
/// As an extractor it answers 401 `M_MISSING_TOKEN` without a token, 401 `M_UNKNOWN_TOKEN` when the
/// homeserver does not know it, 429 `M_LIMIT_EXCEEDED` when its source sent too many unknown tokens,
/// and 503 when the homeserver cannot be asked. `Option<Caller>` is for routes open to anonymous
/// callers: `None` without a token, and a token, when given, is still checked.
#[derive(Debug, Clone)]
pub struct Caller(pub Whoami);

impl<S: Send + Sync> FromRequestParts<S> for Caller
where
    Auth: FromRef<S>,
{
    type Rejection = MatrixError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, MatrixError> {
        let token = super::access_token(&parts.headers, &parts.uri).ok_or_else(|| {
            MatrixError::new(StatusCode::UNAUTHORIZED, "M_MISSING_TOKEN", "Missing access token")
        })?;
        Auth::from_ref(state).check(&token, peer(parts)).await.map(Caller)
    }
}

impl<S: Send + Sync> OptionalFromRequestParts<S> for Caller
where
    Auth: FromRef<S>,
{
    type Rejection = MatrixError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Option<Self>, MatrixError> {
        match super::access_token(&parts.headers, &parts.uri) {
            None => Ok(None),
            Some(token) => Auth::from_ref(state).check(&token, peer(parts)).await.map(|w| Some(Caller(w))),
        }
    }
}

/// The peer's address, as `serve` records it (absent when a router is called directly).
fn peer(parts: &Parts) -> Option<IpAddr> {
    parts.extensions.get::<ConnectInfo<SocketAddr>>().map(|ConnectInfo(addr)| addr.ip())
}

/// What [`Auth`] is configured with.
#[derive(Debug, Clone)]
pub struct AuthSettings {
    pub known_ttl: Duration,
    pub unknown_ttl: Duration,
    pub cache_entries: usize,
    /// Unknown-token requests per second per source; 0: no limit.
    pub unknown_per_sec: u32,
    pub unknown_burst: u32,
}

impl AuthSettings {
    pub fn from_config(config: &Config) -> Self {
        Self {
            known_ttl: config.whoami_cache_ttl(),
            unknown_ttl: Duration::from_secs(config.homeserver.whoami_negative_cache_secs),
            cache_entries: config.homeserver.whoami_cache_entries,
            unknown_per_sec: config.client.unknown_token_per_sec,
            unknown_burst: config.client.unknown_token_burst,
        }
    }
}

/// Checks client access tokens with the homeserver (see the module doc). Cheap to clone.
#[derive(Clone)]
pub struct Auth {
    inner: Arc<Inner>,
}

struct Inner {
    homeserver: Arc<HomeserverClient>,
    clock: Clock,
    metrics: Arc<Metrics>,
    settings: AuthSettings,
    state: Mutex<State>,
}

/// SHA-256 of an access token: what is kept instead of the token.
type TokenHash = [u8; 32];

struct State {
    /// Valid tokens: who they belong to, until when.
    known: LruCache<TokenHash, (Whoami, Instant)>,
    /// Tokens the homeserver does not know, until when.
    unknown: LruCache<TokenHash, Instant>,
    /// `whoami` calls in flight, shared by every request with that token; an entry goes with its
    /// last waiter.
    in_flight: HashMap<TokenHash, Arc<OnceCell<Outcome>>>,
    /// Each source's budget of unknown-token requests.
    sources: LruCache<IpAddr, Bucket>,
}

#[derive(Debug, Clone)]
enum Outcome {
    Known(Whoami),
    Unknown,
    Failed,
}

/// A token bucket: `tokens` requests allowed at `at`, refilled at the configured rate.
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Auth {
    pub fn new(
        homeserver: Arc<HomeserverClient>,
        settings: AuthSettings,
        clock: Clock,
        metrics: Arc<Metrics>,
    ) -> Self {
        let state = State {
            known: LruCache::new(settings.cache_entries),
            unknown: LruCache::new(settings.cache_entries),
            in_flight: HashMap::new(),
            sources: LruCache::new(MAX_SOURCES),
        };
        Self { inner: Arc::new(Inner { homeserver, clock, metrics, settings, state: Mutex::new(state) }) }
    }

    /// Who `token` belongs to, for a request from `source`.
    pub async fn check(&self, token: &str, source: Option<IpAddr>) -> Result<Whoami, MatrixError> {
        let inner = &*self.inner;
        let key: TokenHash = Sha256::digest(token.as_bytes()).into();
        let source = source_key(source);
        let (flight, starts_call) = {
            let mut state = inner.state();
            let now = inner.clock.now();
            if let Some((whoami, expires)) = state.known.get(&key)
                && *expires > now
            {
                return Ok(whoami.clone());
            }
            let unknown = state.unknown.get(&key).is_some_and(|expires| *expires > now);
            // Joining a call in flight costs the homeserver nothing: only the first request is charged.
            let starts_call = !unknown && !state.in_flight.contains_key(&key);
            if (unknown || starts_call)
                && let Err(retry_after) = state.charge(source, now, &inner.settings)
            {
                inner.metrics.http.unknown_token_limited.inc();
                return Err(MatrixError::limit_exceeded(
                    "Too many requests with unknown access tokens from this address",
                    retry_after,
                ));
            }
            if unknown {
                return Err(unknown_token());
            }
            let cell = state.in_flight.entry(key).or_default().clone();
            inner.metrics.http.token_checks_waiting.inc();
            (Flight { auth: inner, key, cell: Some(cell) }, starts_call)
        };
        let cell = flight.cell.as_ref().expect("set until dropped");
        let outcome = cell.get_or_init(|| inner.ask(token, key)).await.clone();
        drop(flight);
        match outcome {
            Outcome::Known(whoami) => {
                if starts_call {
                    inner.state().refund(source, &inner.settings);
                }
                Ok(whoami)
            }
            Outcome::Unknown => Err(unknown_token()),
            Outcome::Failed => Err(MatrixError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "M_UNKNOWN",
                "Cannot reach the homeserver to check the token",
            )),
        }
    }
}

impl Inner {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The one `whoami` call of a flight; remembers its answer (failures are not remembered).
    #[tracing::instrument(name = "http.whoami", skip_all)]
    async fn ask(&self, token: &str, key: TokenHash) -> Outcome {
        self.metrics.http.whoami_calls.inc();
        let outcome = match self.homeserver.whoami(token).await {
            Ok(whoami) => Outcome::Known(whoami),
            Err(HomeserverError::Matrix { status: 401 | 403, .. }) => Outcome::Unknown,
            Err(error) => {
                tracing::warn!(%error, "http.auth cannot check an access token");
                Outcome::Failed
            }
        };
        let now = self.clock.now();
        let mut state = self.state();
        match &outcome {
            Outcome::Known(whoami) => {
                state.unknown.remove(&key);
                state.known.insert(key, (whoami.clone(), now + self.settings.known_ttl));
            }
            Outcome::Unknown => {
                state.known.remove(&key);
                state.unknown.insert(key, now + self.settings.unknown_ttl);
            }
            Outcome::Failed => {}
        }
        self.publish(&state);
        outcome
    }

    fn publish(&self, state: &State) {
        let entries = &self.metrics.http.token_cache_entries;
        for (cache, len) in
            [("known", state.known.len()), ("unknown", state.unknown.len()), ("sources", state.sources.len())]
        {
            entries.get_or_create(&CacheLabel { cache }).set(i64::try_from(len).unwrap_or(i64::MAX));
        }
    }
}

/// A request's share of a `whoami` flight, counted in `token_checks_waiting` while it lasts; the last
/// one to leave removes the flight, whether it finished or every waiter was cancelled (a client that
/// hangs up must not leave an entry behind).
struct Flight<'a> {
    auth: &'a Inner,
    key: TokenHash,
    cell: Option<Arc<OnceCell<Outcome>>>,
}

impl Drop for Flight<'_> {
    fn drop(&mut self) {
        self.auth.metrics.http.token_checks_waiting.dec();
        let mut state = self.auth.state();
        // Released under the lock, so that exactly one waiter sees the map's reference alone.
        drop(self.cell.take());
        if state.in_flight.get(&self.key).is_some_and(|cell| Arc::strong_count(cell) == 1) {
            state.in_flight.remove(&self.key);
        }
    }
}

impl State {
    /// Takes one request from `source`'s budget, or says how long until it has one.
    fn charge(&mut self, source: IpAddr, now: Instant, settings: &AuthSettings) -> Result<(), Duration> {
        if settings.unknown_per_sec == 0 {
            return Ok(());
        }
        let rate = f64::from(settings.unknown_per_sec);
        let burst = f64::from(settings.unknown_burst);
        if self.sources.get(&source).is_none() {
            self.sources.insert(source, Bucket { tokens: burst, at: now });
        }
        let bucket = self.sources.get_mut(&source).expect("inserted above");
        bucket.tokens =
            (bucket.tokens + now.saturating_duration_since(bucket.at).as_secs_f64() * rate).min(burst);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - bucket.tokens) / rate))
        }
    }

    /// Gives back a request taken by [`State::charge`]: its token was valid.
    fn refund(&mut self, source: IpAddr, settings: &AuthSettings) {
        if let Some(bucket) = self.sources.peek_mut(&source) {
            bucket.tokens = (bucket.tokens + 1.0).min(f64::from(settings.unknown_burst));
        }
    }
}

fn unknown_token() -> MatrixError {
    MatrixError::new(StatusCode::UNAUTHORIZED, "M_UNKNOWN_TOKEN", "Unknown access token")
}

/// What a peer address counts as: itself for IPv4 (also when IPv4-mapped), its /64 for IPv6 (one
/// host or site is usually given a whole /64); all peers of unknown address are one source.
fn source_key(address: Option<IpAddr>) -> IpAddr {
    match address {
        None => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        Some(IpAddr::V4(v4)) => IpAddr::V4(v4),
        Some(IpAddr::V6(v6)) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from_bits(v6.to_bits() & !u128::from(u64::MAX))),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(per_sec: u32, burst: u32) -> AuthSettings {
        AuthSettings {
            known_ttl: Duration::from_secs(60),
            unknown_ttl: Duration::from_secs(60),
            cache_entries: 2,
            unknown_per_sec: per_sec,
            unknown_burst: burst,
        }
    }

    fn state() -> State {
        State {
            known: LruCache::new(2),
            unknown: LruCache::new(2),
            in_flight: HashMap::new(),
            sources: LruCache::new(2),
        }
    }

    #[test]
    fn a_source_gets_its_burst_then_the_rate() {
        let settings = settings(2, 3);
        let mut state = state();
        let clock = Clock::manual(0);
        let source = source_key(Some("192.0.2.1".parse().unwrap()));
        for _ in 0..3 {
            assert!(state.charge(source, clock.now(), &settings).is_ok());
        }
        let retry = state.charge(source, clock.now(), &settings).unwrap_err();
        assert_eq!(retry, Duration::from_millis(500));
        clock.advance(Duration::from_millis(500));
        assert!(state.charge(source, clock.now(), &settings).is_ok());
        state.refund(source, &settings);
        assert!(state.charge(source, clock.now(), &settings).is_ok(), "a refund gives one back");
        assert!(state.charge(source, clock.now(), &settings).is_err());
    }

    #[test]
    fn an_ipv6_slash_64_is_one_source_and_mapped_ipv4_is_ipv4() {
        let a = source_key(Some("2001:db8:1:2::1".parse().unwrap()));
        assert_eq!(a, source_key(Some("2001:db8:1:2:ffff::9".parse().unwrap())));
        assert_ne!(a, source_key(Some("2001:db8:1:3::1".parse().unwrap())));
        assert_eq!(
            source_key(Some("::ffff:192.0.2.1".parse().unwrap())),
            source_key(Some("192.0.2.1".parse().unwrap()))
        );
    }

    #[tokio::test]
    async fn a_check_whose_callers_all_hang_up_leaves_nothing_in_flight() {
        // A homeserver that accepts connections and never answers.
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", silent.local_addr().unwrap());
        let toml = format!(
            "[homeserver]\nserver_name = \"example.org\"\nurl = \"{url}\"\n[appservice]\nas_token = \"{}\"\n\
             hs_token = \"{}\"\n[turn]\nmode = \"off\"\n",
            "a".repeat(40),
            "h".repeat(40)
        );
        let config = Config::from_toml_str(&toml).unwrap();
        let metrics = Arc::new(Metrics::new());
        let homeserver = Arc::new(HomeserverClient::new(&config, metrics.clone()).unwrap());
        let auth =
            Auth::new(homeserver, AuthSettings::from_config(&config), Clock::manual(0), metrics.clone());
        let waiting = || metrics.http.token_checks_waiting.get();

        let checks: Vec<_> = (0..3)
            .map(|_| {
                let auth = auth.clone();
                tokio::spawn(async move { auth.check("some-token", None).await })
            })
            .collect();
        for _ in 0..1000 {
            if waiting() == 3 {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert_eq!(waiting(), 3, "the three checks wait for one whoami call");
        assert_eq!(auth.inner.state().in_flight.len(), 1);
        for check in checks {
            check.abort();
            assert!(check.await.unwrap_err().is_cancelled());
        }
        assert_eq!(waiting(), 0);
        assert!(auth.inner.state().in_flight.is_empty(), "the flight went with its last waiter");
    }

    #[test]
    fn caches_forget_the_least_recently_used_token_first() {
        let mut state = state();
        let now = Instant::now();
        state.unknown.insert([1; 32], now);
        state.unknown.insert([2; 32], now);
        state.unknown.get(&[1; 32]);
        state.unknown.insert([3; 32], now);
        assert!(state.unknown.contains_key(&[1; 32]) && state.unknown.contains_key(&[3; 32]));
        assert!(!state.unknown.contains_key(&[2; 32]), "the oldest is evicted, not everything");
    }
}
