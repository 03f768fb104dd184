//! The directory's write path under interleavings driven step by step: a homeserver stub that holds
//! its answers until told, a manual clock, and the service's inbox and discovery seams.
//!
//! - concurrent discovery of one unknown address waits for the one look-up in flight;
//! - a stale presence push replayed from the inbox does not overwrite a fresher reconciliation, and
//!   reconciliation rounds follow the (stepped) clock;
//! - saves that land out of order do not put an older state back (both backends);
//! - the look-up and watch tables evict their oldest entries, not everything;
//! - users of other servers are bounded, the ones seen longest ago evicted (memory and store);
//! - signatures are recovered only for new or changed displaynames, and not under the write lock.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::{Value, json};
use switchboard::appservice::inbox::{Input, ItemKind};
use switchboard::clock::Clock;
use switchboard::directory::identity::Address;
use switchboard::directory::model::{Presence, User};
use switchboard::directory::service::{DirectoryService, Settings};
use switchboard::homeserver::HomeserverClient;
use switchboard::store::{DirectoryRow, NewItem, Store};
use switchboard::telemetry::Metrics;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// The eth-account example key's user on "localhost" and its `personal_sign` of that user id.
const USER: &str = "@0x2c7536e3605d9c16a7a3d7b1898e529396a65c23:localhost";
const SIGNATURE: &str = "0xb0e955ff35d78250fcd1518aaffdf801964decc705ceba5efd205f5eea30e781\
                         6a6d0813ff5745c18c61350d6d747331d47d208f9b9ed5129e87c9bb05c0928e1b";
const CAPS: &str = "mxc://raiden.network/cap?webRTC=1";
const T0: i64 = 1_700_000_000_000;

fn address() -> Address {
    Address::parse("0x2c7536e3605d9c16a7a3d7b1898e529396a65c23").unwrap()
}

/// A homeserver that answers profile and presence requests from its tables, counting them; profile
/// answers wait while the gate is closed.
#[derive(Default)]
struct Stub {
    profiles: Mutex<HashMap<String, Value>>,
    presence: Mutex<HashMap<String, &'static str>>,
    profile_calls: AtomicUsize,
    presence_calls: AtomicUsize,
    gate: Mutex<Option<watch::Receiver<bool>>>,
}

impl Stub {
    fn profile_calls(&self) -> usize {
        self.profile_calls.load(Ordering::SeqCst)
    }

    fn presence_calls(&self) -> usize {
        self.presence_calls.load(Ordering::SeqCst)
    }
}

async fn profile(State(stub): State<Arc<Stub>>, Path(user_id): Path<String>) -> Response {
    stub.profile_calls.fetch_add(1, Ordering::SeqCst);
    let gate = stub.gate.lock().unwrap().clone();
    if let Some(mut gate) = gate {
        let _ = gate.wait_for(|open| *open).await;
    }
    let found = stub.profiles.lock().unwrap().get(&user_id).cloned();
    match found {
        Some(profile) => axum::Json(profile).into_response(),
        None => (StatusCode::NOT_FOUND, axum::Json(json!({"errcode": "M_NOT_FOUND", "error": "no profile"})))
            .into_response(),
    }
}

async fn presence(State(stub): State<Arc<Stub>>, Path(user_id): Path<String>) -> Response {
    stub.presence_calls.fetch_add(1, Ordering::SeqCst);
    let presence = stub.presence.lock().unwrap().get(&user_id).copied().unwrap_or("offline");
    axum::Json(json!({ "presence": presence })).into_response()
}

/// Serves `stub` on a loopback port; returns its URL.
async fn serve(stub: Arc<Stub>) -> String {
    let app = Router::new()
        .route("/_matrix/client/v3/profile/{user_id}", get(profile))
        .route("/_matrix/client/v3/presence/{user_id}/status", get(presence))
        .with_state(stub);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    url
}

struct Harness {
    service: Arc<DirectoryService>,
    store: Arc<Store>,
    metrics: Arc<Metrics>,
    clock: Clock,
    shutdown: CancellationToken,
    _dir: tempfile::TempDir,
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A directory service on a fresh SQLite store, a manual clock at `T0` and `stub` as its
/// homeserver, with its refresh loop running; `tune` adjusts the settings.
async fn harness(stub: &Arc<Stub>, tune: impl FnOnce(&mut Settings)) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let url = common::sqlite_url(dir.path());
    harness_on(stub, dir, &url, tune).await
}

/// [`harness`] on the database at `url` (`dir` is kept as long as the harness).
async fn harness_on(
    stub: &Arc<Stub>,
    dir: tempfile::TempDir,
    url: &str,
    tune: impl FnOnce(&mut Settings),
) -> Harness {
    let url = url.to_owned();
    let config = common::config(&url, &serve(stub.clone()).await);
    let store = Arc::new(Store::connect(&url, 2).await.unwrap());
    store.migrate().await.unwrap();
    let metrics = Arc::new(Metrics::new());
    let homeserver = Arc::new(HomeserverClient::new(&config, metrics.clone()).unwrap());
    let mut settings = Settings::from_config(&config);
    // No pacing between requests (1 s / u32::MAX is under a nanosecond): the tests step the clock
    // only where time is the point.
    settings.lookups_per_sec = u32::MAX;
    tune(&mut settings);
    let clock = Clock::manual(T0);
    let service = DirectoryService::load(store.clone(), homeserver, metrics.clone(), settings, clock.clone())
        .await
        .unwrap();
    let shutdown = CancellationToken::new();
    tokio::spawn(service.clone().refresh(shutdown.clone()));
    Harness { service, store, metrics, clock, shutdown, _dir: dir }
}

fn join_body(user_id: &str, displayname: Option<&str>, avatar_url: &str) -> Value {
    json!({
        "type": "m.room.member", "sender": user_id, "state_key": user_id, "origin_server_ts": 1,
        "content": { "membership": "join", "displayname": displayname, "avatar_url": avatar_url },
    })
}

fn presence_body(user_id: &str, presence: &str) -> Value {
    json!({ "type": "m.presence", "sender": user_id, "content": { "presence": presence } })
}

/// An inbox item as the consumer gets it, of a transaction that was not stored (so it counts as
/// observed when applied).
fn item(kind: ItemKind, body: &Value) -> Input {
    common::inbox_item(1, "not-stored", kind, body)
}

/// Stores a transaction received at `received_at_ms` carrying `body`, as the appservice does.
async fn ingest(store: &Store, txn_id: &str, received_at_ms: i64, kind: ItemKind, body: &Value) {
    let text = body.to_string();
    let item = NewItem {
        kind,
        event_type: body["type"].as_str().unwrap(),
        sender: body["sender"].as_str(),
        room_id: None,
        event_id: None,
        to_user_id: None,
        body: &text,
    };
    store.ingest(txn_id, txn_id, received_at_ms, &[item]).await.unwrap();
}

fn metric(metrics: &Metrics, name: &str) -> u64 {
    common::metric(&metrics.render(), name)
}

#[tokio::test]
async fn concurrent_discovery_of_an_unknown_address_waits_for_the_one_look_up_in_flight() {
    let stub = Arc::new(Stub::default());
    stub.profiles
        .lock()
        .unwrap()
        .insert(USER.to_owned(), json!({ "displayname": SIGNATURE, "avatar_url": CAPS }));
    stub.presence.lock().unwrap().insert(USER.to_owned(), "online");
    let (open, gate) = watch::channel(false);
    *stub.gate.lock().unwrap() = Some(gate);
    let h = harness(&stub, |_| {}).await;

    // Two clients ask for the same unknown address at once (one task, so both have asked before
    // anything else runs); each then reads the directory as its request handler would.
    let service = h.service.clone();
    let both = tokio::spawn(async move {
        let ask = || async {
            service.discover(&address()).await;
            service.read().best(&address()).map(|user| user.user_id.to_string())
        };
        tokio::join!(ask(), ask())
    });
    common::eventually(Duration::from_secs(10), "the profile request", || async {
        (stub.profile_calls() == 1).then_some(())
    })
    .await;
    open.send_replace(true);
    let (first, second) = tokio::time::timeout(Duration::from_secs(10), both).await.unwrap().unwrap();
    assert_eq!(first.as_deref(), Some(USER), "the first client sees the user");
    assert_eq!(second.as_deref(), Some(USER), "the second client waited for the same look-up");
    assert_eq!(stub.profile_calls(), 1, "one homeserver request for both");
}

#[tokio::test]
async fn a_stale_presence_push_replayed_from_the_inbox_does_not_overwrite_a_fresher_reconciliation() {
    let dir = tempfile::tempdir().unwrap();
    for (backend, url) in common::backends(dir.path()).await {
        let dir = tempfile::tempdir().unwrap();
        stale_push_after_reconciliation(backend, dir, &url).await;
    }
}

async fn stale_push_after_reconciliation(backend: &str, dir: tempfile::TempDir, url: &str) {
    let stub = Arc::new(Stub::default());
    stub.presence.lock().unwrap().insert(USER.to_owned(), "offline");
    let h = harness_on(&stub, dir, url, |settings| settings.reconcile_interval_ms = 60_000).await;
    // The inbox as the directory's subscription reads it: what was stored after its cursor.
    let mut cursor = 0;
    let mut unread = async |store: &Store| {
        let items = store.items_after(cursor, 10).await.unwrap();
        cursor = items.last().map_or(cursor, |item| item.id);
        items
    };
    // The user's profile arrived first, and was handled.
    ingest(&h.store, "t0", T0, ItemKind::Event, &join_body(USER, Some(SIGNATURE), CAPS)).await;
    h.service.apply(&unread(&h.store).await, T0).await.unwrap();
    // A push "online" is received at T0 + 1 s and stored, but Switchboard stops before the
    // directory handles it.
    ingest(&h.store, "t1", T0 + 1_000, ItemKind::Ephemeral, &presence_body(USER, "online")).await;

    // A client asks for the address, so it is reconciled in the next round, one interval (60 s)
    // after the first: the homeserver says offline.
    h.service.watch(&address(), T0);
    h.clock.advance(Duration::from_secs(60));
    let reconciled = T0 + 60_000;
    common::eventually(Duration::from_secs(10), "the reconciliation", || async {
        let model = h.service.read();
        (model.user(USER).is_some_and(|user| user.presence_at_ms >= reconciled)).then_some(())
    })
    .await;
    assert_eq!(stub.presence_calls(), 1, "{backend}");

    // Now the inbox is replayed from the directory's cursor: the older push must not win.
    h.service.apply(&unread(&h.store).await, h.clock.unix_millis()).await.unwrap();
    let user = h.service.read().user(USER).cloned().unwrap();
    assert_eq!(
        user.presence(),
        Presence::Offline,
        "{backend}: the push of T0 + 1 s overwrote the answer of T0 + 60 s"
    );
    assert!(!h.service.read().reachable(&address()));
    let rows = h.store.directory_users().await.unwrap();
    assert_eq!((rows[0].presence.as_str(), rows[0].presence_at), ("offline", reconciled), "{backend}");

    // A push received later than the reconciliation counts.
    h.clock.advance(Duration::from_secs(1));
    ingest(&h.store, "t2", T0 + 61_000, ItemKind::Ephemeral, &presence_body(USER, "online")).await;
    h.service.apply(&unread(&h.store).await, h.clock.unix_millis()).await.unwrap();
    assert!(h.service.read().reachable(&address()), "{backend}: a fresher push is applied");

    // Reconciliation rounds follow the clock: a step past the interval brings the next one.
    stub.presence.lock().unwrap().insert(USER.to_owned(), "unavailable");
    h.clock.advance(Duration::from_secs(61));
    common::eventually(Duration::from_secs(10), "the next round after a 61 s step", || async {
        let presence = h.service.read().user(USER).map(User::presence);
        (presence == Some(Presence::Unavailable)).then_some(())
    })
    .await;
    assert_eq!(stub.presence_calls(), 2, "{backend}");
}

#[tokio::test]
async fn saves_that_land_out_of_order_do_not_put_an_older_state_back() {
    let dir = tempfile::tempdir().unwrap();
    for (backend, url) in common::backends(dir.path()).await {
        let store = Store::connect(&url, 2).await.unwrap();
        store.migrate().await.unwrap();
        let row = |displayname: &str, presence: &str, at: i64, last_active: Option<i64>| DirectoryRow {
            user_id: USER.to_owned(),
            displayname: Some(displayname.to_owned()),
            avatar_url: Some(CAPS.to_owned()),
            verified: Some(false),
            presence: presence.to_owned(),
            presence_at: at,
            last_active_ms: last_active,
            profile_at: at,
        };
        let newer = row("newer", "offline", 2_000, Some(1_500));
        store.save_directory_users(std::slice::from_ref(&newer)).await.unwrap();
        // Computed before the newer one, saved after it.
        store.save_directory_users(&[row("older", "online", 1_000, Some(900))]).await.unwrap();
        assert_eq!(store.directory_users().await.unwrap(), vec![newer.clone()], "{backend}");
        // Presence and profile are ordered apart: a newer presence with an older profile keeps the
        // stored profile; activity only moves forward.
        let mut mixed = row("older", "unavailable", 3_000, None);
        mixed.profile_at = 1_000;
        store.save_directory_users(&[mixed]).await.unwrap();
        let stored = store.directory_users().await.unwrap().remove(0);
        assert_eq!(stored.displayname.as_deref(), Some("newer"), "{backend}");
        assert_eq!((stored.presence.as_str(), stored.presence_at), ("unavailable", 3_000), "{backend}");
        assert_eq!(stored.last_active_ms, Some(1_500), "{backend}");
        store.close().await;
    }
}

#[tokio::test]
async fn full_look_up_and_watch_tables_evict_their_oldest_entry_only() {
    let stub = Arc::new(Stub::default()); // nobody has a profile
    let h = harness(&stub, |settings| settings.table_max = 3).await;
    let addresses: Vec<Address> = (1..=4).map(|i| Address::parse(&format!("0x{i:040x}")).unwrap()).collect();
    for address in &addresses {
        h.service.discover(address).await;
    }
    assert_eq!(stub.profile_calls(), 4, "each unknown address looked up once");
    // The table holds 3: the fourth look-up evicted the first only. The second's absence is still
    // remembered; the first is asked again.
    h.service.discover(&addresses[1]).await;
    assert_eq!(stub.profile_calls(), 4, "a remembered absence is not asked again");
    h.service.discover(&addresses[0]).await;
    assert_eq!(stub.profile_calls(), 5, "the evicted one is asked again");
    let evicted = r#"switchboard_directory_table_evicted_total{table="looked_up"}"#;
    assert_eq!(metric(&h.metrics, evicted), 2);
    assert_eq!(metric(&h.metrics, r#"switchboard_directory_table_entries{table="looked_up"}"#), 3);
    assert_eq!(metric(&h.metrics, r#"switchboard_directory_table_entries{table="watched"}"#), 3);
    assert_eq!(metric(&h.metrics, r#"switchboard_directory_table_evicted_total{table="watched"}"#), 2);
}

#[tokio::test]
async fn users_of_other_servers_are_bounded_evicting_those_seen_longest_ago() {
    let stub = Arc::new(Stub::default());
    let h = harness(&stub, |settings| {
        settings.max_remote_users = 2;
        settings.lookups_per_sec = 0;
    })
    .await;
    let remote = |i: u32| format!("@0x{i:040x}:remote.example");
    // A local user and three remote ones, seen one second apart; the first remote one is seen again
    // (presence) after the second.
    h.service.apply(&[item(ItemKind::Event, &join_body(USER, Some(SIGNATURE), CAPS))], T0).await.unwrap();
    h.service.apply(&[item(ItemKind::Event, &join_body(&remote(1), None, CAPS))], T0 + 1_000).await.unwrap();
    h.service.apply(&[item(ItemKind::Event, &join_body(&remote(2), None, CAPS))], T0 + 2_000).await.unwrap();
    let seen_again = item(ItemKind::Ephemeral, &presence_body(&remote(1), "online"));
    h.service.apply(&[seen_again], T0 + 3_000).await.unwrap();
    h.service.apply(&[item(ItemKind::Event, &join_body(&remote(3), None, CAPS))], T0 + 4_000).await.unwrap();

    {
        let model = h.service.read();
        assert!(model.user(&remote(2)).is_none(), "the remote user seen longest ago is evicted");
        assert!(model.user(&remote(1)).is_some() && model.user(&remote(3)).is_some());
        assert!(model.user(USER).is_some(), "local users are not bounded");
        assert_eq!((model.len(), model.remote_len()), (3, 2));
    }
    assert_eq!(metric(&h.metrics, "switchboard_directory_remote_users_evicted_total"), 1);
    assert_eq!(metric(&h.metrics, "switchboard_directory_remote_users "), 2);
    let stored: Vec<String> =
        h.store.directory_users().await.unwrap().into_iter().map(|r| r.user_id).collect();
    assert!(!stored.contains(&remote(2)), "evicted from the store too: {stored:?}");
    assert_eq!(stored.len(), 3);

    // Restarted with a lower bound: the oldest are evicted as the directory loads.
    let dir = tempfile::tempdir().unwrap();
    let config = common::config(&common::sqlite_url(dir.path()), "http://127.0.0.1:9");
    let mut settings = Settings::from_config(&config);
    settings.max_remote_users = 1;
    let metrics = Arc::new(Metrics::new());
    let homeserver = Arc::new(HomeserverClient::new(&config, metrics.clone()).unwrap());
    let reloaded = DirectoryService::load(h.store.clone(), homeserver, metrics, settings, h.clock.clone())
        .await
        .unwrap();
    let model = reloaded.read();
    assert!(
        model.user(&remote(1)).is_none() && model.user(&remote(3)).is_some() && model.user(USER).is_some()
    );
}

/// Holding a read guard while waiting is the point: the apply must recover signatures before it
/// asks for the write lock.
#[allow(clippy::await_holding_lock)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signatures_are_recovered_only_when_new_or_changed_and_not_under_the_write_lock() {
    let stub = Arc::new(Stub::default());
    let h = harness(&stub, |settings| settings.lookups_per_sec = 0).await;
    let checks = || metric(&h.metrics, "switchboard_directory_signature_checks_total");
    let join =
        |displayname: &str, avatar: &str| item(ItemKind::Event, &join_body(USER, Some(displayname), avatar));
    h.service.apply(&[join(SIGNATURE, CAPS)], T0).await.unwrap();
    assert_eq!(checks(), 1);
    assert!(h.service.read().user(USER).unwrap().verified);
    // The same displayname again (the member event repeated, or with another avatar): no recovery.
    for i in 0..3 {
        h.service
            .apply(&[join(SIGNATURE, &format!("mxc://raiden.network/cap?webRTC={i}"))], T0 + 1)
            .await
            .unwrap();
    }
    assert_eq!(checks(), 1, "an unchanged displayname is not verified again");

    // A changed displayname is verified while a reader holds the directory: the recovery does not
    // wait for the write lock.
    let reader = h.service.read();
    let service = h.service.clone();
    let changed = item(ItemKind::Event, &join_body(USER, Some("0x1234"), CAPS));
    let apply = tokio::spawn(async move { service.apply(&[changed], T0 + 2).await });
    common::eventually(Duration::from_secs(10), "the recovery while a reader holds the lock", || async {
        (checks() == 2).then_some(())
    })
    .await;
    assert!(!apply.is_finished(), "the update itself waits for the reader");
    drop(reader);
    tokio::time::timeout(Duration::from_secs(10), apply).await.unwrap().unwrap().unwrap();
    assert!(!h.service.read().user(USER).unwrap().verified);
}
