//! Discovery lookups over HTTP with a million known users, and what they cost in memory.
//!
//! - Seeds a SQLite database with `SWITCHBOARD_BENCH_USERS` (default 1,000,000) synthetic users
//!   (stored as verified and online; their displaynames are not real signatures, so the figure is
//!   the lookup path, not verification: `cargo bench --bench identity` measures that).
//! - Starts `switchboard serve` on it as its own process (release build, default `[directory]`
//!   settings, so every lookup also takes the look-up/watch path), with a real Synapse as its
//!   homeserver: requests carry a Synapse access token, checked with `whoami` and cached.
//! - A load generator in this process (one thread, raw HTTP/1.1 keep-alive on loopback, 64
//!   connections) asks `GET …/address/{a}/metadata` and `GET …/peers/{a}` for random known
//!   addresses, and, side by side in the same run, Synapse's own answer to "who is this user":
//!   `GET /_matrix/client/v3/profile/{userId}` (16 connections, one user: its best case).
//! - Resident memory: the server's RSS with the directory loaded minus its RSS with an empty one,
//!   per user. Load time: process start to `/health` with the directory loaded.
//!
//! Run: `cargo bench --bench directory` (needs the Synapse venv: `deploy/synapse/install`).
//! `SWITCHBOARD_BENCH_LOOKUPS` (default 200,000 per run) sets the run length; 3 runs, medians.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use rand::Rng;
use serde_json::json;
use sqlx::Connection;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

const RUNS: usize = 3;
/// Rows per seeding INSERT: 5 parameters each, under SQLite's limit of 32,766.
const ROWS_PER_INSERT: usize = 2_000;
const SWITCHBOARD_CONNECTIONS: usize = 64;
const SYNAPSE_CONNECTIONS: usize = 16;
const CAPABILITIES: [&str; 4] = [
    "mxc://raiden.network/cap?Delivery=1&Mediate=1&Receive=1&immutableMetadata=1&toDevice=1&webRTC=1",
    "mxc://raiden.network/cap?Delivery=0&Mediate=0&Receive=1&toDevice=1&webRTC=1",
    "mxc://raiden.network/cap?Delivery=1&Mediate=1&Receive=1&toDevice=1&webRTC=0",
    "mxc://raiden.network/cap?Receive=1&webRTC=1",
];

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.replace('_', "").parse().ok()).unwrap_or(default)
}

fn address(i: usize) -> String {
    format!("0x{i:040x}")
}

/// Writes `users` synthetic directory rows into the database at `url` (migrated first).
async fn seed(url: &str, users: usize) {
    let store = switchboard::store::Store::connect(url, 1).await.unwrap();
    store.migrate().await.unwrap();
    store.close().await;
    let mut db = sqlx::SqliteConnection::connect(url).await.unwrap();
    let now = switchboard_now_ms();
    let mut tx = db.begin().await.unwrap();
    for start in (0..users).step_by(ROWS_PER_INSERT) {
        let end = (start + ROWS_PER_INSERT).min(users);
        let values = vec!["(?, ?, ?, 1, 'online', ?, ?)"; end - start].join(", ");
        let sql = format!(
            "INSERT INTO directory_users \
             (user_id, displayname, avatar_url, verified, presence, presence_at, last_active_ms) VALUES {values}"
        );
        let mut query = sqlx::query(&sql);
        for i in start..end {
            // 0x + 130 hex digits, the length of a real signature.
            let displayname = format!("0x{:0>130}", format!("{i:x}"));
            query = query
                .bind(format!("@{}:bench.example", address(i)))
                .bind(displayname)
                .bind(CAPABILITIES[i % CAPABILITIES.len()])
                .bind(now)
                .bind(now - i64::try_from(i).unwrap());
        }
        query.execute(&mut *tx).await.unwrap();
    }
    tx.commit().await.unwrap();
    db.close().await.unwrap();
}

fn switchboard_now_ms() -> i64 {
    i64::try_from(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis())
        .unwrap()
}

/// Starts `switchboard serve` on `db` with `homeserver`, waits for `/health`; returns the process
/// and how long it took.
async fn serve(dir: &std::path::Path, db: &str, homeserver: &str) -> (common::Process, Duration) {
    let ports = [common::free_port(), common::free_port(), common::free_port()];
    // The synthetic users are of another server (bench.example): raise the bound on remote users
    // so that however many are seeded, all stay.
    let toml = common::config_toml(db, homeserver, ports)
        .replace("level = \"info,switchboard=debug\"", "level = \"warn\"")
        + "[directory]\nmax_remote_users = 100000000\n";
    let started = Instant::now();
    let process = common::Process::start(dir, &toml, ports);
    let health = format!("http://127.0.0.1:{}/health", ports[2]);
    common::eventually(Duration::from_secs(600), "switchboard /health", || async {
        reqwest::get(&health).await.ok().filter(|r| r.status().is_success()).map(|_| ())
    })
    .await;
    (process, started.elapsed())
}

/// What one load run measured.
struct Run {
    per_second: f64,
    p50_ms: f64,
    p99_ms: f64,
}

/// Sends `requests` GETs (paths from `path`) over `connections` keep-alive connections to `port`,
/// each waiting for its answer before the next; every answer must be 200.
async fn load(port: u16, token: &str, connections: usize, requests: usize, path: impl Fn() -> String) -> Run {
    let per_connection = requests / connections;
    let paths: Vec<Vec<String>> =
        (0..connections).map(|_| (0..per_connection).map(|_| path()).collect()).collect();
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for paths in paths {
        let token = token.to_owned();
        tasks.spawn(async move {
            let stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
            stream.set_nodelay(true).unwrap();
            let mut stream = BufReader::new(stream);
            let mut latencies = Vec::with_capacity(paths.len());
            let mut line = String::new();
            let mut body = Vec::new();
            for path in paths {
                let sent = Instant::now();
                let request = format!(
                    "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n\r\n"
                );
                stream.get_mut().write_all(request.as_bytes()).await.unwrap();
                line.clear();
                stream.read_line(&mut line).await.unwrap();
                assert!(line.starts_with("HTTP/1.1 200"), "{path}: {line}");
                let mut length = None;
                let mut chunked = false;
                loop {
                    line.clear();
                    stream.read_line(&mut line).await.unwrap();
                    if line == "\r\n" {
                        break;
                    }
                    let lower = line.to_ascii_lowercase();
                    if let Some(value) = lower.strip_prefix("content-length:") {
                        length = Some(value.trim().parse::<usize>().unwrap());
                    }
                    chunked |= lower.starts_with("transfer-encoding: chunked");
                }
                if chunked {
                    // Chunks until the empty one, then the final CRLF.
                    loop {
                        line.clear();
                        stream.read_line(&mut line).await.unwrap();
                        let size = usize::from_str_radix(line.trim(), 16).unwrap();
                        body.resize(size + 2, 0);
                        stream.read_exact(&mut body).await.unwrap();
                        if size == 0 {
                            break;
                        }
                    }
                } else {
                    body.resize(length.expect("a Content-Length"), 0);
                    stream.read_exact(&mut body).await.unwrap();
                }
                latencies.push(sent.elapsed().as_secs_f64() * 1000.0);
            }
            latencies
        });
    }
    let mut latencies: Vec<f64> = tasks.join_all().await.into_iter().flatten().collect();
    let elapsed = started.elapsed().as_secs_f64();
    latencies.sort_by(f64::total_cmp);
    let at = |p: usize| latencies[(latencies.len() - 1) * p / 100];
    #[allow(clippy::cast_precision_loss)]
    let per_second = latencies.len() as f64 / elapsed;
    Run { per_second, p50_ms: at(50), p99_ms: at(99) }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let users = env_usize("SWITCHBOARD_BENCH_USERS", 1_000_000);
    let lookups = env_usize("SWITCHBOARD_BENCH_LOOKUPS", 200_000);
    let dir = tempfile::tempdir().unwrap();

    let Some(synapse) = common::Synapse::start(&[]).await else {
        eprintln!("no Synapse venv: run deploy/synapse/install");
        return;
    };
    let client = synapse.register("bench").await;
    let profile_path =
        format!("/_matrix/client/v3/profile/{}/displayname", common::urlencode(&client.user_id));
    synapse.call(&client, reqwest::Method::PUT, &profile_path, &json!({ "displayname": "bench" })).await;
    let synapse_port: u16 = synapse.base_url.rsplit(':').next().unwrap().parse().unwrap();

    // The baseline: the same server with an empty directory.
    let empty_dir = dir.path().join("empty");
    std::fs::create_dir(&empty_dir).unwrap();
    let (empty, _) = serve(&empty_dir, &common::sqlite_url(&empty_dir), &synapse.base_url).await;
    let empty_rss = common::rss_bytes(empty.pid());
    drop(empty);

    let full_dir = dir.path().join("full");
    std::fs::create_dir(&full_dir).unwrap();
    let db = common::sqlite_url(&full_dir);
    let seeding = Instant::now();
    seed(&db, users).await;
    eprintln!("seeded {users} users in {:.1} s", seeding.elapsed().as_secs_f64());
    let (server, load_time) = serve(&full_dir, &db, &synapse.base_url).await;
    let port = server.ports[1];

    let random_address = || address(rand::rng().random_range(0..users));
    let metadata = || format!("/_switchboard/client/v1/address/{}/metadata", random_address());
    let peers = || format!("/_switchboard/client/v1/peers/{}", random_address());
    let synapse_profile = || format!("/_matrix/client/v3/profile/{}", common::urlencode(&client.user_id));
    let synapse_requests = (lookups / 40).max(SYNAPSE_CONNECTIONS);
    // Warm-up: connections, whoami cache, Synapse's caches.
    load(port, &client.access_token, SWITCHBOARD_CONNECTIONS, lookups / 10, metadata).await;
    load(synapse_port, &client.access_token, SYNAPSE_CONNECTIONS, synapse_requests / 10, synapse_profile)
        .await;

    let mut results: [Vec<Run>; 3] = [Vec::new(), Vec::new(), Vec::new()];
    for run in 0..RUNS {
        results[0].push(load(port, &client.access_token, SWITCHBOARD_CONNECTIONS, lookups, metadata).await);
        results[1].push(load(port, &client.access_token, SWITCHBOARD_CONNECTIONS, lookups / 2, peers).await);
        results[2].push(
            load(synapse_port, &client.access_token, SYNAPSE_CONNECTIONS, synapse_requests, synapse_profile)
                .await,
        );
        eprintln!("run {} of {RUNS} done", run + 1);
    }
    let loaded_rss = common::rss_bytes(server.pid());

    #[allow(clippy::cast_precision_loss)]
    let per_user = loaded_rss.saturating_sub(empty_rss) as f64 / users as f64;
    let reference = median(results[2].iter().map(|r| r.per_second).collect());
    println!("\n{users} known users; {lookups} lookups per run, {RUNS} runs, medians\n");
    println!("| target | lookups/s | p50 ms | p99 ms | × Synapse profile |");
    println!("|---|---:|---:|---:|---:|");
    for (name, runs) in [
        ("Switchboard `address/{a}/metadata`", &results[0]),
        ("Switchboard `peers/{a}`", &results[1]),
        ("Synapse `profile/{userId}` (one user)", &results[2]),
    ] {
        let per_second = median(runs.iter().map(|r| r.per_second).collect());
        println!(
            "| {name} | {per_second:.0} | {:.2} | {:.2} | {:.1} |",
            median(runs.iter().map(|r| r.p50_ms).collect()),
            median(runs.iter().map(|r| r.p99_ms).collect()),
            per_second / reference,
        );
    }
    #[allow(clippy::cast_precision_loss)]
    let mib = |bytes: u64| bytes as f64 / 1024.0 / 1024.0;
    println!(
        "\nRSS: {:.1} MiB empty, {:.1} MiB with {users} users: {per_user:.0} bytes per user",
        mib(empty_rss),
        mib(loaded_rss)
    );
    println!("Start with {users} users (process start to /health): {:.1} s", load_time.as_secs_f64());
    drop(server);
}
