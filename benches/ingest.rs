//! Ingestion benchmark: 100-event Synapse-shaped appservice transactions pushed into an in-process
//! Switchboard, on SQLite and (when `SWITCHBOARD_TEST_POSTGRES_URL` is set) PostgreSQL, side by side
//! with a "null appservice" (parses the JSON, stores nothing) as the HTTP + JSON floor.
//!
//! ```text
//! tests/postgres                                   # optional: private PostgreSQL on 127.0.0.1:55432
//! SWITCHBOARD_TEST_POSTGRES_URL=postgres://postgres@127.0.0.1:55432/postgres cargo bench --bench ingest
//! ```
//!
//! Environment: `SWITCHBOARD_BENCH_TXNS` (measured transactions per run, default 300),
//! `SWITCHBOARD_BENCH_REPS` (repetitions, default 3).
//!
//! Modes, each measured after 20 warm-up transactions that are not counted:
//! - `seq`: one transaction in flight at a time over a keep-alive HTTP/1.1 connection, as Synapse does;
//! - `conc4`: four in flight (four connections);
//! - `dup`: the `seq` transaction ids PUT again (answered 200, nothing stored);
//! - `store.ingest`: `Store::ingest` called directly (no HTTP, no JSON parsing), to split the cost.
//!
//! Every Switchboard run is verified: the database holds exactly the events sent, byte for byte, and
//! the duplicate pass stored nothing. The table (medians of the repetitions) goes to stdout; progress
//! and per-run figures go to stderr.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::routing::put;
use axum::serve::ListenerExt;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;
use switchboard::Listeners;
use switchboard::config::Config;
use switchboard::store::{Ingested, ItemKind, NewItem, Store};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const AS_TOKEN: &str = "bench-as-token-aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
const HS_TOKEN: &str = "bench-hs-token-hhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhh";
const SERVER_NAME: &str = "localhost";
/// Nothing listens on the discard port: Switchboard tolerates a homeserver that is down.
const HOMESERVER_URL: &str = "http://127.0.0.1:9";
const EVENTS_PER_TXN: usize = 100;
const WARMUP_TXNS: usize = 20;
const CONCURRENCY: usize = 4;
const ROOMS: usize = 8;
const SENDERS: usize = 16;

// ---------------------------------------------------------------------------------------------
// Workload: Synapse-shaped transactions, generated before timing.
// ---------------------------------------------------------------------------------------------

/// One `m.room.message` event as Synapse 1.163 serialises it for an appservice.
struct Message {
    room_id: String,
    sender: String,
    event_id: String,
    json: String,
}

/// One transaction: its id (integers from 1, as Synapse counts), body and events.
struct Txn {
    id: String,
    body: Bytes,
    events: Vec<Message>,
}

struct Generator {
    rng: StdRng,
    next_event: u64,
    rooms: Vec<String>,
    senders: Vec<String>,
}

impl Generator {
    fn new(seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        // Room version 12: `!` and the unpadded base64url of a 32-byte hash, no server part.
        let rooms =
            (0..ROOMS).map(|_| format!("!{}", URL_SAFE_NO_PAD.encode(rng.random::<[u8; 32]>()))).collect();
        // Raiden users: `0x` and 40 hex digits.
        let senders = (0..SENDERS)
            .map(|_| format!("@0x{:08x}{:032x}:{SERVER_NAME}", rng.random::<u32>(), rng.random::<u128>()))
            .collect();
        Self { rng, next_event: 0, rooms, senders }
    }

    /// `$` and 43 base64url characters, random like the hash they encode, so they land at random
    /// places in the store's unique index as real ones do; the last 8 bytes count, so none repeats.
    fn event_id(&mut self) -> String {
        let mut hash: [u8; 32] = self.rng.random();
        hash[24..].copy_from_slice(&self.next_event.to_be_bytes());
        self.next_event += 1;
        format!("${}", URL_SAFE_NO_PAD.encode(hash))
    }

    /// 100 to 300 characters of words.
    fn text(&mut self) -> String {
        const LETTERS: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
        let len = self.rng.random_range(100..=300);
        let mut text = String::with_capacity(len);
        while text.len() < len {
            if !text.is_empty() {
                text.push(' ');
            }
            for _ in 0..self.rng.random_range(2..=10) {
                text.push(char::from(LETTERS[self.rng.random_range(0..LETTERS.len())]));
            }
        }
        text.truncate(len);
        text
    }

    fn event(&mut self, now_ms: u64) -> Message {
        let room_id = self.rooms[self.rng.random_range(0..ROOMS)].clone();
        let sender = self.senders[self.rng.random_range(0..SENDERS)].clone();
        let event_id = self.event_id();
        let age: u64 = self.rng.random_range(5..200);
        let mut unsigned = json!({ "age": age });
        // Synapse adds the client's transaction id when the event was sent by the appservice's user.
        if self.rng.random_bool(0.5) {
            unsigned["transaction_id"] = json!(format!("m{}.{}", now_ms - age, self.next_event));
        }
        let json = json!({
            "type": "m.room.message",
            "room_id": room_id,
            "sender": sender,
            "content": { "msgtype": "m.text", "body": self.text() },
            "origin_server_ts": now_ms - age,
            "unsigned": unsigned,
            "event_id": event_id,
            "user_id": sender,
            "age": age,
        })
        .to_string();
        Message { room_id, sender, event_id, json }
    }

    /// `count` transactions with ids 1..=count.
    fn transactions(&mut self, count: usize) -> Vec<Txn> {
        let now_ms = u64::try_from(
            SystemTime::now().duration_since(UNIX_EPOCH).expect("clock after 1970").as_millis(),
        )
        .expect("milliseconds fit u64");
        (1..=count)
            .map(|id| {
                let events: Vec<Message> = (0..EVENTS_PER_TXN).map(|_| self.event(now_ms)).collect();
                let mut body = String::from(r#"{"events":["#);
                for (i, event) in events.iter().enumerate() {
                    if i > 0 {
                        body.push(',');
                    }
                    body.push_str(&event.json);
                }
                body.push_str("]}");
                Txn { id: id.to_string(), body: Bytes::from(body), events }
            })
            .collect()
    }
}

// ---------------------------------------------------------------------------------------------
// Targets: the null appservice, Switchboard over HTTP, and Store::ingest directly.
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Db {
    Sqlite,
    Postgres,
}

impl Db {
    fn name(self) -> &'static str {
        match self {
            Db::Sqlite => "SQLite",
            Db::Postgres => "PostgreSQL",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Target {
    Null,
    Switchboard(Db),
}

impl Target {
    fn name(self) -> String {
        match self {
            Target::Null => "null appservice".to_owned(),
            Target::Switchboard(db) => format!("Switchboard {}", db.name()),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Mode {
    Seq,
    Conc4,
    Dup,
    /// `Store::ingest` called directly, one at a time (no HTTP, no JSON parsing).
    Direct,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Seq => "seq (1 in flight)",
            Mode::Conc4 => "conc4 (4 in flight)",
            Mode::Dup => "dup (re-PUT, 1 in flight)",
            Mode::Direct => "store.ingest direct (no HTTP)",
        }
    }

    /// The null appservice row a row is compared with.
    fn reference(self) -> Mode {
        match self {
            Mode::Direct => Mode::Seq,
            other => other,
        }
    }
}

/// A fresh database: SQLite in a temporary folder, or a new PostgreSQL database.
struct Database {
    url: String,
    _dir: Option<tempfile::TempDir>,
    postgres_name: Option<String>,
}

static DATABASES: AtomicUsize = AtomicUsize::new(0);

async fn fresh_database(db: Db, postgres_admin: Option<&str>) -> Database {
    match db {
        Db::Sqlite => {
            let dir = tempfile::tempdir().expect("temporary folder");
            let url = format!("sqlite://{}", dir.path().join("switchboard.db").display());
            Database { url, _dir: Some(dir), postgres_name: None }
        }
        Db::Postgres => {
            let admin = postgres_admin.expect("PostgreSQL admin URL");
            let name = format!(
                "switchboard_bench_{}_{}_{}",
                std::process::id(),
                DATABASES.fetch_add(1, Ordering::Relaxed),
                rand::random::<u32>()
            );
            let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(admin)
                .await
                .expect("connect to PostgreSQL");
            sqlx::Executor::execute(&mut conn, format!("CREATE DATABASE {name}").as_str())
                .await
                .expect("create bench database");
            let _ = sqlx::Connection::close(conn).await;
            let (base, _) = admin.rsplit_once('/').expect("admin URL has a database part");
            Database { url: format!("{base}/{name}"), _dir: None, postgres_name: Some(name) }
        }
    }
}

async fn drop_database(database: Database, postgres_admin: Option<&str>) {
    if let (Some(name), Some(admin)) = (&database.postgres_name, postgres_admin) {
        let mut conn =
            <sqlx::PgConnection as sqlx::Connection>::connect(admin).await.expect("connect to PostgreSQL");
        sqlx::Executor::execute(&mut conn, format!("DROP DATABASE {name} WITH (FORCE)").as_str())
            .await
            .expect("drop bench database");
        let _ = sqlx::Connection::close(conn).await;
    }
}

/// A server in this process: Switchboard or the null appservice.
struct Server {
    base_url: Arc<str>,
    ops: Option<SocketAddr>,
    shutdown: CancellationToken,
    task: JoinHandle<()>,
}

impl Server {
    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .expect("server stops within 30 s")
            .expect("server task did not panic");
    }

    async fn metrics(&self) -> String {
        let ops = self.ops.expect("Switchboard has an ops listener");
        reqwest::get(format!("http://{ops}/metrics"))
            .await
            .expect("GET /metrics")
            .text()
            .await
            .expect("metrics text")
    }
}

fn switchboard_config(database_url: &str) -> Config {
    Config::from_toml_str(&format!(
        r#"
[homeserver]
server_name = "{SERVER_NAME}"
url = "{HOMESERVER_URL}"
[appservice]
listen = "127.0.0.1:0"
url = "http://127.0.0.1:0"
as_token = "{AS_TOKEN}"
hs_token = "{HS_TOKEN}"
[client]
listen = "127.0.0.1:0"
[ops]
listen = "127.0.0.1:0"
[database]
url = "{database_url}"
[turn]
mode = "off"
[log]
level = "warn"
"#
    ))
    .expect("bench config is valid")
}

async fn start_switchboard(database_url: &str) -> Server {
    let config = switchboard_config(database_url);
    let listeners = Listeners::bind(&config).await.expect("bind listeners");
    let appservice = listeners.appservice.local_addr().expect("appservice address");
    let ops = listeners.ops.local_addr().expect("ops address");
    let shutdown = CancellationToken::new();
    let run = switchboard::run(config, listeners, shutdown.clone());
    let task = tokio::spawn(async move { run.await.expect("Switchboard ran and stopped cleanly") });
    // `/health` answers once the store is open and migrated.
    let mut up = false;
    for _ in 0..1500 {
        if let Ok(response) = reqwest::get(format!("http://{ops}/health")).await
            && response.status().is_success()
        {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(up, "Switchboard did not start listening within 30 s");
    Server { base_url: format!("http://{appservice}").into(), ops: Some(ops), shutdown, task }
}

/// The floor: authenticates nothing, parses the body into a `serde_json::Value`, answers `{}`.
async fn null_transaction(body: Bytes) -> Result<axum::Json<serde_json::Value>, http::StatusCode> {
    let parsed: serde_json::Value =
        serde_json::from_slice(&body).map_err(|_| http::StatusCode::BAD_REQUEST)?;
    std::hint::black_box(parsed);
    Ok(axum::Json(json!({})))
}

async fn start_null() -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind null appservice");
    let addr = listener.local_addr().expect("null appservice address");
    let router = Router::new().route("/_matrix/app/v1/transactions/{txn_id}", put(null_transaction));
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    // Same socket options as Switchboard: TCP_NODELAY on every accepted connection.
    let listener = listener.tap_io(|stream| {
        stream.set_nodelay(true).expect("TCP_NODELAY");
    });
    let task = tokio::spawn(async move {
        axum::serve(listener, router)
            .with_graceful_shutdown(stop.cancelled_owned())
            .await
            .expect("null appservice serves");
    });
    Server { base_url: format!("http://{addr}").into(), ops: None, shutdown, task }
}

// ---------------------------------------------------------------------------------------------
// Load and measurement.
// ---------------------------------------------------------------------------------------------

/// The figures of one measured pass.
#[derive(Clone, Copy, Debug)]
struct RunStats {
    events_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    /// Events per second of busy time over the last tenth of the run (one in flight only: the
    /// latencies are then in sending order), to see whether a growing inbox slows ingestion.
    last_tenth_events_per_s: f64,
}

/// Nearest-rank percentile of sorted latencies, in milliseconds.
fn percentile_ms(sorted: &[Duration], p: f64) -> f64 {
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss,
        reason = "rank of at most a few thousand latencies"
    )]
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1].as_secs_f64() * 1000.0
}

fn stats(elapsed: Duration, mut latencies: Vec<Duration>) -> RunStats {
    #[allow(clippy::cast_precision_loss, reason = "event counts far below 2^52")]
    let events = |transactions: usize| (transactions * EVENTS_PER_TXN) as f64;
    let last_tenth = &latencies[latencies.len() - latencies.len().div_ceil(10)..];
    let last_tenth_events_per_s =
        events(last_tenth.len()) / last_tenth.iter().sum::<Duration>().as_secs_f64();
    latencies.sort_unstable();
    RunStats {
        events_per_s: events(latencies.len()) / elapsed.as_secs_f64(),
        p50_ms: percentile_ms(&latencies, 0.50),
        p99_ms: percentile_ms(&latencies, 0.99),
        last_tenth_events_per_s,
    }
}

/// PUTs `txns[range]` with `concurrency` transactions in flight; returns the wall time and the
/// latency of each transaction (request sent → whole answer read).
async fn drive(
    client: &reqwest::Client,
    base_url: &Arc<str>,
    txns: &Arc<Vec<Txn>>,
    range: std::ops::Range<usize>,
    concurrency: usize,
) -> (Duration, Vec<Duration>) {
    let next = Arc::new(AtomicUsize::new(range.start));
    let end = range.end;
    let started = Instant::now();
    let workers: Vec<JoinHandle<Vec<Duration>>> = (0..concurrency)
        .map(|_| {
            let (client, base_url, txns, next) =
                (client.clone(), base_url.clone(), txns.clone(), next.clone());
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                // Bounded: each iteration claims a distinct index below `end`.
                for _ in 0..end {
                    let index = next.fetch_add(1, Ordering::Relaxed);
                    if index >= end {
                        break;
                    }
                    latencies.push(put_transaction(&client, &base_url, &txns[index]).await);
                }
                latencies
            })
        })
        .collect();
    let mut latencies = Vec::with_capacity(range.len());
    for worker in workers {
        latencies.extend(worker.await.expect("load worker did not panic"));
    }
    let elapsed = started.elapsed();
    assert_eq!(latencies.len(), range.len(), "every transaction was sent once");
    (elapsed, latencies)
}

async fn put_transaction(client: &reqwest::Client, base_url: &str, txn: &Txn) -> Duration {
    let started = Instant::now();
    let response = client
        .put(format!("{base_url}/_matrix/app/v1/transactions/{}", txn.id))
        .bearer_auth(HS_TOKEN)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(txn.body.clone())
        .send()
        .await
        .expect("PUT transaction");
    let status = response.status();
    let answer = response.bytes().await.expect("read answer");
    let elapsed = started.elapsed();
    assert!(
        status.is_success() && answer.as_ref() == b"{}",
        "transaction {} answered {status}: {}",
        txn.id,
        String::from_utf8_lossy(&answer)
    );
    elapsed
}

/// A fresh keep-alive HTTP/1.1 client, as Synapse's.
fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .http1_only()
        .tcp_nodelay(true)
        .pool_max_idle_per_host(CONCURRENCY)
        .timeout(Duration::from_secs(60))
        .build()
        .expect("HTTP client")
}

/// The sum of the metric lines starting with `prefix` (0 when absent).
fn metric(metrics: &str, prefix: &str) -> u64 {
    metrics
        .lines()
        .filter(|line| line.starts_with(prefix))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// Reads every stored item back through a fresh store and checks it is exactly what was sent: each
/// event once, byte for byte. Returns the number of stored items.
async fn verify_stored(url: &str, txns: &[Txn]) -> usize {
    let sent: HashMap<&str, (&str, &str)> = txns
        .iter()
        .flat_map(|txn| {
            txn.events.iter().map(move |e| (e.event_id.as_str(), (txn.id.as_str(), e.json.as_str())))
        })
        .collect();
    let store = Store::connect(url, 1).await.expect("open store to verify");
    let mut seen = 0_usize;
    let mut after = 0;
    // Bounded: one page per 5,000 items sent, plus the empty page.
    for _ in 0..=sent.len() / 5000 + 1 {
        let page = store.items_after(after, 5000).await.expect("read stored items");
        let Some(last) = page.last() else { break };
        after = last.id;
        for item in &page {
            let event_id = item.event_id.as_deref().expect("stored event has an event id");
            let (txn_id, json) =
                sent.get(event_id).unwrap_or_else(|| panic!("stored event {event_id} was never sent"));
            assert_eq!(item.kind, ItemKind::Event);
            assert_eq!(item.txn_id, *txn_id, "event {event_id} stored under another transaction");
            assert_eq!(item.body.get(), *json, "event {event_id} not stored byte for byte");
        }
        seen += page.len();
    }
    store.close().await;
    assert_eq!(seen, sent.len(), "stored items (with unique event ids) ≠ events sent");
    seen
}

struct Bench {
    txns: usize,
    postgres_admin: Option<String>,
    results: BTreeMap<(Mode, Target), Vec<RunStats>>,
}

impl Bench {
    fn record(&mut self, mode: Mode, target: Target, rep: usize, stats: RunStats) {
        let last_tenth = if mode == Mode::Conc4 {
            String::new()
        } else {
            format!("  (last tenth {:.0} events/s)", stats.last_tenth_events_per_s)
        };
        eprintln!(
            "  rep {rep}: {:<24} {:<30} {:>9.0} events/s  p50 {:>7.2} ms  p99 {:>7.2} ms{last_tenth}",
            target.name(),
            mode.name(),
            stats.events_per_s,
            stats.p50_ms,
            stats.p99_ms
        );
        self.results.entry((mode, target)).or_default().push(stats);
    }

    fn workload(&self, seed: u64) -> Arc<Vec<Txn>> {
        Arc::new(Generator::new(seed).transactions(WARMUP_TXNS + self.txns))
    }

    /// `seq` then `dup` on one server (the duplicate pass re-PUTs the ids `seq` stored).
    async fn seq_and_dup(&mut self, target: Target, rep: usize, seed: u64) {
        let txns = self.workload(seed);
        let measured = WARMUP_TXNS..txns.len();
        let (server, database) = self.start(target).await;
        let client = client();
        drive(&client, &server.base_url, &txns, 0..WARMUP_TXNS, 1).await;
        let (elapsed, latencies) = drive(&client, &server.base_url, &txns, measured.clone(), 1).await;
        self.record(Mode::Seq, target, rep, stats(elapsed, latencies));
        let before = match &server.ops {
            Some(_) => Some(server.metrics().await),
            None => None,
        };
        let (elapsed, latencies) = drive(&client, &server.base_url, &txns, measured, 1).await;
        self.record(Mode::Dup, target, rep, stats(elapsed, latencies));
        if let (Some(before), Some(database)) = (before, &database) {
            let after = server.metrics().await;
            let stored_metric = "switchboard_appservice_items_stored_total";
            let received = "switchboard_appservice_transactions_received_total";
            let duplicate = "switchboard_appservice_transactions_duplicate_total";
            let sent_events = txns.len() * EVENTS_PER_TXN;
            assert_eq!(metric(&before, stored_metric), sent_events as u64, "items stored metric");
            assert_eq!(metric(&after, stored_metric), sent_events as u64, "duplicates stored nothing");
            assert_eq!(metric(&after, received), txns.len() as u64, "transactions received");
            assert_eq!(metric(&after, duplicate), self.txns as u64, "duplicates answered");
            server.stop().await;
            let stored = verify_stored(&database.url, &txns).await;
            eprintln!(
                "  verified: {stored} events stored = {sent_events} sent ({} transactions), byte-exact; \
                 duplicate pass: {} transactions answered 200, 0 items stored",
                txns.len(),
                self.txns
            );
        } else {
            server.stop().await;
        }
        if let Some(database) = database {
            drop_database(database, self.postgres_admin.as_deref()).await;
        }
    }

    async fn conc4(&mut self, target: Target, rep: usize, seed: u64) {
        let txns = self.workload(seed);
        let (server, database) = self.start(target).await;
        let client = client();
        drive(&client, &server.base_url, &txns, 0..WARMUP_TXNS, CONCURRENCY).await;
        let (elapsed, latencies) =
            drive(&client, &server.base_url, &txns, WARMUP_TXNS..txns.len(), CONCURRENCY).await;
        self.record(Mode::Conc4, target, rep, stats(elapsed, latencies));
        server.stop().await;
        if let Some(database) = database {
            let stored = verify_stored(&database.url, &txns).await;
            eprintln!(
                "  verified: {stored} events stored = {} sent, byte-exact",
                txns.len() * EVENTS_PER_TXN
            );
            drop_database(database, self.postgres_admin.as_deref()).await;
        }
    }

    /// `Store::ingest` directly: the storage cost without HTTP and JSON parsing.
    async fn direct(&mut self, db: Db, rep: usize, seed: u64) {
        let txns = self.workload(seed);
        let database = fresh_database(db, self.postgres_admin.as_deref()).await;
        // The pool size of Switchboard's default configuration.
        let store = Store::connect(&database.url, 8).await.expect("open store");
        store.migrate().await.expect("migrate");
        let items: Vec<Vec<NewItem<'_>>> = txns
            .iter()
            .map(|txn| {
                txn.events
                    .iter()
                    .map(|e| NewItem {
                        kind: ItemKind::Event,
                        event_type: "m.room.message",
                        sender: Some(&e.sender),
                        room_id: Some(&e.room_id),
                        event_id: Some(&e.event_id),
                        to_user_id: None,
                        body: &e.json,
                    })
                    .collect()
            })
            .collect();
        let ingest = async |index: usize| {
            let started = Instant::now();
            let outcome =
                store.ingest(&txns[index].id, &txns[index].id, 0, &items[index]).await.expect("ingest");
            assert_eq!(outcome, Ingested::New { items: EVENTS_PER_TXN, reused_id: false });
            started.elapsed()
        };
        for index in 0..WARMUP_TXNS {
            ingest(index).await;
        }
        let started = Instant::now();
        let mut latencies = Vec::with_capacity(self.txns);
        for index in WARMUP_TXNS..txns.len() {
            latencies.push(ingest(index).await);
        }
        let elapsed = started.elapsed();
        store.close().await;
        self.record(Mode::Direct, Target::Switchboard(db), rep, stats(elapsed, latencies));
        verify_stored(&database.url, &txns).await;
        drop_database(database, self.postgres_admin.as_deref()).await;
    }

    async fn start(&self, target: Target) -> (Server, Option<Database>) {
        match target {
            Target::Null => (start_null().await, None),
            Target::Switchboard(db) => {
                let database = fresh_database(db, self.postgres_admin.as_deref()).await;
                (start_switchboard(&database.url).await, Some(database))
            }
        }
    }
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.len() % 2 == 1 { values[mid] } else { f64::midpoint(values[mid - 1], values[mid]) }
}

fn env_count(name: &str, default: usize) -> usize {
    std::env::var(name)
        .map_or(default, |v| v.parse().unwrap_or_else(|_| panic!("{name} is not a count: {v:?}")))
}

#[tokio::main]
async fn main() {
    // `cargo bench` passes `--bench`; this harness-less bench takes no arguments.
    let txns = env_count("SWITCHBOARD_BENCH_TXNS", 300).max(1);
    let reps = env_count("SWITCHBOARD_BENCH_REPS", 3).max(1);
    let postgres_admin = std::env::var("SWITCHBOARD_TEST_POSTGRES_URL").ok();
    let mut targets = vec![Target::Null, Target::Switchboard(Db::Sqlite)];
    if postgres_admin.is_some() {
        targets.push(Target::Switchboard(Db::Postgres));
    } else {
        eprintln!(
            "SWITCHBOARD_TEST_POSTGRES_URL is not set: PostgreSQL is skipped (start one with tests/postgres)"
        );
    }
    let cores = std::thread::available_parallelism().map_or(0, std::num::NonZero::get);
    eprintln!(
        "ingest bench: {txns} measured transactions × {EVENTS_PER_TXN} events per run (+{WARMUP_TXNS} warm-up), \
         {reps} repetitions, {cores} cores"
    );
    let mut bench = Bench { txns, postgres_admin, results: BTreeMap::new() };
    // Repetitions round-robin over the targets, so a noisy minute hits all of them alike.
    let mut seed = 0_u64;
    for rep in 1..=reps {
        eprintln!("repetition {rep}/{reps}");
        for &target in &targets {
            seed += 1;
            bench.seq_and_dup(target, rep, seed).await;
            seed += 1;
            bench.conc4(target, rep, seed).await;
            if let Target::Switchboard(db) = target {
                seed += 1;
                bench.direct(db, rep, seed).await;
            }
        }
    }
    print_table(&bench, reps, cores);
}

fn print_table(bench: &Bench, reps: usize, cores: usize) {
    println!(
        "\n{} transactions × {EVENTS_PER_TXN} events per run, {reps} runs, medians; {cores} cores; \
         ratio = median over runs of (events/s ÷ null appservice events/s in the same run and mode)\n",
        bench.txns
    );
    println!("| target | mode | events/s | p50 ms | p99 ms | × null appservice |");
    println!("|---|---|---:|---:|---:|---:|");
    for ((mode, target), runs) in &bench.results {
        let column = |f: fn(&RunStats) -> f64| median(&mut runs.iter().map(f).collect::<Vec<_>>());
        let ratio = bench.results.get(&(mode.reference(), Target::Null)).map_or_else(
            || "–".to_owned(),
            |null| {
                let mut ratios: Vec<f64> =
                    runs.iter().zip(null).map(|(run, null)| run.events_per_s / null.events_per_s).collect();
                format!("{:.2}", median(&mut ratios))
            },
        );
        println!(
            "| {} | {} | {:.0} | {:.2} | {:.2} | {ratio} |",
            target.name(),
            mode.name(),
            column(|s| s.events_per_s),
            column(|s| s.p50_ms),
            column(|s| s.p99_ms),
        );
    }
}
