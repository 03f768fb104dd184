//! Client access-token checks cannot be used to flood the homeserver: against a stub homeserver that
//! counts its `whoami` calls (counting is the point, so a stub), unknown tokens are remembered,
//! concurrent checks of one token share one call, a source sending unknown tokens is answered 429,
//! and a logged-out token stops working `whoami_cache_secs` after its last check (stepped clock).

mod common;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::{Value, json};
use switchboard::clock::Clock;
use switchboard::config::Config;
use tokio::sync::watch;

const TURN_PATH: &str = "/_switchboard/client/v1/turn";

/// A homeserver that knows `valid` tokens, counts `whoami` calls, and holds its answers while
/// `open` is false.
struct Homeserver {
    valid: Mutex<HashSet<String>>,
    calls: AtomicU64,
    open: watch::Sender<bool>,
}

impl Homeserver {
    async fn start() -> (Arc<Homeserver>, SocketAddr) {
        let homeserver = Arc::new(Homeserver {
            valid: Mutex::default(),
            calls: AtomicU64::new(0),
            open: watch::Sender::new(true),
        });
        let app = axum::Router::new()
            .route("/_matrix/client/v3/account/whoami", get(whoami))
            .with_state(homeserver.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (homeserver, addr)
    }

    fn calls(&self) -> u64 {
        self.calls.load(Ordering::SeqCst)
    }
}

async fn whoami(State(homeserver): State<Arc<Homeserver>>, headers: HeaderMap) -> Response {
    homeserver.calls.fetch_add(1, Ordering::SeqCst);
    let _ = homeserver.open.subscribe().wait_for(|open| *open).await;
    let token = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .trim_start_matches("Bearer ");
    if homeserver.valid.lock().unwrap().contains(token) {
        Json(json!({ "user_id": "@raiden:localhost", "device_id": "DEVICE" })).into_response()
    } else {
        (StatusCode::UNAUTHORIZED, Json(json!({ "errcode": "M_UNKNOWN_TOKEN", "error": "Unknown token" })))
            .into_response()
    }
}

fn config(dir: &std::path::Path, homeserver: SocketAddr) -> Config {
    let mut config = common::config(&common::sqlite_url(dir), &format!("http://{homeserver}"));
    // Credentials are minted whatever the relay mode; no relay is needed here.
    config.turn.mode = switchboard::config::TurnMode::External;
    config
}

/// `count` requests for TURN credentials, `concurrency` at a time, the i-th with `token(i)`; the
/// statuses and Matrix error bodies.
async fn requests(
    client: &reqwest::Client,
    addr: SocketAddr,
    count: usize,
    concurrency: usize,
    token: impl Fn(usize) -> String,
) -> Vec<(StatusCode, Value)> {
    let slots = Arc::new(tokio::sync::Semaphore::new(concurrency));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..count {
        let slot = slots.clone().acquire_owned().await.unwrap();
        let request = client.get(format!("http://{addr}{TURN_PATH}")).bearer_auth(token(i));
        tasks.spawn(async move {
            let response = request.send().await.unwrap();
            let status = response.status();
            let body = response.json::<Value>().await.unwrap_or(Value::Null);
            drop(slot);
            (status, body)
        });
    }
    tasks.join_all().await
}

fn count(answers: &[(StatusCode, Value)], status: StatusCode) -> usize {
    answers.iter().filter(|(s, _)| *s == status).count()
}

#[tokio::test]
async fn unknown_tokens_cost_few_whoami_calls_and_a_flooding_source_is_answered_429() {
    const REQUESTS: usize = 4000;
    const TOKENS: usize = 40;
    let client = reqwest::Client::new();

    // Without the per-source limit: each unknown token is asked once, then remembered.
    let (homeserver, hs_addr) = Homeserver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut unlimited = config(dir.path(), hs_addr);
    unlimited.client.unknown_token_per_sec = 0;
    let running = common::start_with_clock(unlimited, Clock::manual(1_700_000_000_000)).await;
    let answers =
        requests(&client, running.client, REQUESTS, 64, |i| format!("unknown-{}", i % TOKENS)).await;
    assert_eq!(count(&answers, StatusCode::UNAUTHORIZED), REQUESTS, "every unknown token is refused");
    assert!(answers.iter().all(|(_, body)| body["errcode"] == "M_UNKNOWN_TOKEN"));
    let calls = homeserver.calls();
    eprintln!("no rate limit: {calls} whoami calls for {REQUESTS} requests with {TOKENS} unknown tokens");
    assert_eq!(calls, TOKENS as u64, "one whoami call per unknown token");
    running.stop().await.unwrap();

    // With the default limit, even a fresh token on every request costs at most the burst.
    let (homeserver, hs_addr) = Homeserver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path(), hs_addr);
    let (rate, burst) = (config.client.unknown_token_per_sec, config.client.unknown_token_burst);
    let clock = Clock::manual(1_700_000_000_000);
    let running = common::start_with_clock(config, clock.clone()).await;
    let answers = requests(&client, running.client, REQUESTS, 64, |i| format!("random-{i}")).await;
    let calls = homeserver.calls();
    eprintln!(
        "default limit ({rate}/s, burst {burst}): {calls} whoami calls for {REQUESTS} requests with fresh tokens"
    );
    assert_eq!(calls, u64::from(burst));
    assert_eq!(count(&answers, StatusCode::UNAUTHORIZED), burst as usize);
    assert_eq!(count(&answers, StatusCode::TOO_MANY_REQUESTS), REQUESTS - burst as usize);
    let (_, limited) = answers.iter().find(|(s, _)| *s == StatusCode::TOO_MANY_REQUESTS).unwrap();
    assert_eq!(limited["errcode"], "M_LIMIT_EXCEEDED");
    let retry_after_ms = limited["retry_after_ms"].as_u64().expect("retry_after_ms");
    assert!(retry_after_ms > 0 && retry_after_ms <= 1000 / u64::from(rate), "{limited}");

    // After retry_after_ms the source may try again: a new valid token is checked (once), and gives
    // back the request it was charged.
    clock.advance(Duration::from_millis(retry_after_ms));
    homeserver.valid.lock().unwrap().insert("valid".to_owned());
    for _ in 0..3 {
        let answers = requests(&client, running.client, 1, 1, |_| "valid".to_owned()).await;
        assert_eq!(answers[0].0, StatusCode::OK, "{:?}", answers[0].1);
    }
    assert_eq!(homeserver.calls(), u64::from(burst) + 1, "the valid token is asked once");
    let metrics = running.metrics().await;
    assert_eq!(common::metric(&metrics, "switchboard_client_whoami_calls_total"), u64::from(burst) + 1);
    assert!(
        common::metric(&metrics, "switchboard_client_unknown_token_limited_total")
            >= (REQUESTS - burst as usize) as u64
    );
    running.stop().await.unwrap();
}

#[tokio::test]
async fn concurrent_checks_of_one_token_share_one_whoami_call() {
    const CONCURRENT: usize = 100;
    let (homeserver, hs_addr) = Homeserver::start().await;
    homeserver.valid.lock().unwrap().insert("valid".to_owned());
    homeserver.open.send_replace(false);
    let dir = tempfile::tempdir().unwrap();
    let running =
        common::start_with_clock(config(dir.path(), hs_addr), Clock::manual(1_700_000_000_000)).await;

    let client = reqwest::Client::new();
    let addr = running.client;
    let answers = tokio::spawn({
        let client = client.clone();
        async move { requests(&client, addr, CONCURRENT, CONCURRENT, |_| "valid".to_owned()).await }
    });
    // Every request is waiting on the homeserver before it answers.
    common::eventually(Duration::from_secs(60), "every request waiting for the token check", || async {
        let waiting = common::metric(&running.metrics().await, "switchboard_client_token_checks_waiting");
        (waiting == CONCURRENT as u64).then_some(())
    })
    .await;
    homeserver.open.send_replace(true);
    let answers = answers.await.unwrap();
    assert_eq!(
        count(&answers, StatusCode::OK),
        CONCURRENT,
        "{:?}",
        answers.iter().find(|(s, _)| *s != StatusCode::OK)
    );
    assert_eq!(homeserver.calls(), 1, "one whoami call for {CONCURRENT} concurrent requests");
    running.stop().await.unwrap();
}

#[tokio::test]
async fn a_logged_out_token_stops_working_after_whoami_cache_secs() {
    let (homeserver, hs_addr) = Homeserver::start().await;
    homeserver.valid.lock().unwrap().insert("valid".to_owned());
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path(), hs_addr);
    let ttl = Duration::from_secs(config.homeserver.whoami_cache_secs);
    let clock = Clock::manual(1_700_000_000_000);
    let running = common::start_with_clock(config, clock.clone()).await;
    let client = reqwest::Client::new();
    let status = || async { requests(&client, running.client, 1, 1, |_| "valid".to_owned()).await[0].0 };

    assert_eq!(status().await, StatusCode::OK);
    // Logout: the homeserver forgets the token. It is trusted until the cache entry expires...
    homeserver.valid.lock().unwrap().clear();
    assert_eq!(status().await, StatusCode::OK);
    clock.advance(ttl.checked_sub(Duration::from_secs(1)).unwrap());
    assert_eq!(status().await, StatusCode::OK);
    assert_eq!(homeserver.calls(), 1);
    // ...and no longer.
    clock.advance(Duration::from_secs(1));
    assert_eq!(status().await, StatusCode::UNAUTHORIZED);
    assert_eq!(homeserver.calls(), 2);
    eprintln!("a logged-out token stopped working {ttl:?} after its check (whoami_cache_secs)");
    running.stop().await.unwrap();
}

#[tokio::test]
async fn tokens_are_checked_against_a_real_synapse_with_few_calls() {
    const REQUESTS: usize = 1000;
    const TOKENS: usize = 20;
    let Some(synapse) = common::Synapse::start(&[]).await else {
        return;
    };
    let alice = synapse.register("alice").await;
    let dir = tempfile::tempdir().unwrap();
    let synapse_addr: SocketAddr = synapse.base_url.trim_start_matches("http://").parse().unwrap();
    let mut config = config(dir.path(), synapse_addr);
    // The per-source limit off: the unknown-token cache alone must keep the calls this low.
    config.client.unknown_token_per_sec = 0;
    let ttl = Duration::from_secs(config.homeserver.whoami_cache_secs);
    let clock = Clock::manual(1_700_000_000_000);
    let running = common::start_with_clock(config, clock.clone()).await;
    let client = reqwest::Client::new();
    let whoami_calls =
        || async { common::metric(&running.metrics().await, "switchboard_client_whoami_calls_total") };

    let alice_status =
        || async { requests(&client, running.client, 1, 1, |_| alice.access_token.clone()).await[0].0 };
    assert_eq!(alice_status().await, StatusCode::OK);
    let answers =
        requests(&client, running.client, REQUESTS, 32, |i| format!("unknown-{}", i % TOKENS)).await;
    assert_eq!(count(&answers, StatusCode::UNAUTHORIZED), REQUESTS);
    let calls = whoami_calls().await - 1;
    eprintln!("Synapse: {calls} whoami calls for {REQUESTS} requests with {TOKENS} unknown tokens");
    assert!(calls <= TOKENS as u64, "{calls} whoami calls");

    // Logged out on Synapse: trusted until whoami_cache_secs have passed, then refused.
    synapse.call(&alice, reqwest::Method::POST, "/_matrix/client/v3/logout", &json!({})).await;
    assert_eq!(alice_status().await, StatusCode::OK);
    clock.advance(ttl);
    assert_eq!(alice_status().await, StatusCode::UNAUTHORIZED);
    running.stop().await.unwrap();
}
