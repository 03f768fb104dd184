//! The signalling relay of one instance: latency of one signal client → Switchboard → client, side by
//! side with the same signal through Synapse to-device; signals per second; memory per idle socket.
//!
//! - Switchboard runs as `switchboard serve` (release build) in its own process on SQLite, registered
//!   with a real Synapse (WARNING logs, rate limits raised for its users by
//!   deploy/synapse/homeserver.py). The clients are in this process (tokio-tungstenite, loopback,
//!   `TCP_NODELAY`), authenticated with `Authorization: Bearer <Synapse access token>`.
//! - Config changes for the bench, and only these: `[signalling] frames_per_sec` raised (the default
//!   of 100 a socket would cap the load, not the relay), `max_connections` 12,000 (the idle sockets
//!   plus the rest), `max_connections_per_user` 100 (so that 100 users hold 10,000 sockets: each
//!   Synapse registration costs a bcrypt hash); logs at `warn`.
//! - **Memory** first, on the fresh process: its RSS before and after opening
//!   `SWITCHBOARD_BENCH_IDLE` (default 10,000) authenticated idle sockets (each read, so pings are
//!   answered); bytes per socket.
//! - **Latency**: A sends a `signal` (`m.call.candidates`, ~300 bytes of content) to B's user id and
//!   the time until B's socket yields the `signal` frame is taken, one at a time (A's `delivered` is
//!   read before the next); 200 warm-up, then `SWITCHBOARD_BENCH_SIGNALS` (default 2,000). Reference
//!   in the same run: C `PUT /_matrix/client/v3/sendToDevice/m.call.candidates/{txn}` the same
//!   content to D, whose `/sync` long-poll loop yields it; 10 warm-up, then
//!   `SWITCHBOARD_BENCH_TO_DEVICE` (default 200). C and D have no sockets.
//! - **Throughput**: `SWITCHBOARD_BENCH_PAIRS` (default 8) sender/receiver pairs, each sender with
//!   up to 32 signals in flight (a permit per signal, given back by its `delivered`), 1 s warm-up then
//!   `SWITCHBOARD_BENCH_SECS` (default 10) s counted; then every receiver must have got every signal
//!   whose `delivered` was counted.
//!
//! - **Across instances** (when `SWITCHBOARD_TEST_POSTGRES_URL` names a PostgreSQL and
//!   `redis-server` is installed, as after tests/run): a second Synapse and two `switchboard serve`
//!   processes, a (registered with Synapse) and b, on one fresh PostgreSQL database and one Redis.
//!   Per run, the latency of A on a → B on b (through Redis) and, in the same run, A on a → B' on a;
//!   then the throughput of the 8 pairs with every sender on a and every receiver on b.
//!
//! Run: `cargo bench --bench signalling` (needs the Synapse venv: `deploy/synapse/install`).
//! `SWITCHBOARD_BENCH_RUNS` (default 3) runs of latency and throughput on one Switchboard; medians.

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio::sync::{Semaphore, mpsc};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Longest wait for one frame, one connection or one to-device message.
const WAIT: Duration = Duration::from_secs(10);
const RELAY_WARMUP: usize = 200;
const TO_DEVICE_WARMUP: usize = 10;
const IN_FLIGHT: usize = 32;
const IDLE_PER_USER: usize = 100;
/// Sockets opened at once while the idle ones are set up.
const CONNECTING: usize = 64;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.replace('_', "").parse().ok()).unwrap_or(default)
}

/// A `m.call.candidates` content of about 300 bytes: two host candidates and a srflx one.
fn candidates(call_id: &str) -> Value {
    json!({
        "call_id": call_id, "party_id": "p1", "version": "1",
        "candidates": [
            { "candidate": "candidate:842163049 1 udp 1677729535 203.0.113.7 54400 typ srflx raddr 192.168.1.20 rport 54400 generation 0", "sdpMid": "0", "sdpMLineIndex": 0 },
            { "candidate": "candidate:1467250027 1 udp 2122260223 192.168.1.20 54400 typ host generation 0", "sdpMid": "0", "sdpMLineIndex": 0 },
        ],
    })
}

fn signal_text(id: u64, to: &str, call_id: &str) -> String {
    json!({
        "type": "signal", "id": id, "to": to, "call_id": call_id, "event_type": "m.call.candidates",
        "content": candidates(call_id),
    })
    .to_string()
}

/// Opens an authenticated socket to the client listener on `port` and reads its `ready` frame.
async fn connect(port: u16, token: &str) -> Ws {
    let mut request =
        format!("ws://127.0.0.1:{port}/_switchboard/client/v1/connect").into_client_request().unwrap();
    request.headers_mut().insert("Authorization", format!("Bearer {token}").parse().unwrap());
    // Small client buffers: 10,000 sockets of this process must not take 1.3 GB.
    let config = WebSocketConfig::default().read_buffer_size(4096).write_buffer_size(0);
    let connecting = tokio_tungstenite::connect_async_with_config(request, Some(config), true);
    let (mut ws, _) =
        tokio::time::timeout(WAIT, connecting).await.expect("connected in time").expect("upgrade");
    let ready = next_of(&mut ws, "ready").await;
    assert!(ready.contains("\"user_id\""), "{ready}");
    ws
}

/// The next text frame whose `type` is `kind` (others, such as presence, skipped; 100 at most).
async fn next_of(ws: &mut Ws, kind: &str) -> String {
    let prefix = format!("{{\"type\":\"{kind}\"");
    for _ in 0..100 {
        match tokio::time::timeout(WAIT, ws.next()).await.expect("a frame in time") {
            Some(Ok(Message::Text(text))) if text.starts_with(&prefix) => return text.to_string(),
            Some(Ok(Message::Text(text))) => assert!(!text.starts_with("{\"type\":\"error\""), "{text}"),
            Some(Ok(_)) => {}
            other => panic!("waiting for {kind}: {other:?}"),
        }
    }
    panic!("no {kind} frame among 100");
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_precision_loss)]
    let at = ((sorted.len() - 1) as f64 * p / 100.0).round() as usize;
    sorted[at]
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// Latencies (ms, sorted) of `n` signals from `a` to `b`'s socket, one at a time.
async fn relay_latency(a: &mut Ws, b: &mut Ws, b_user: &str, n: usize, run: usize) -> Vec<f64> {
    let mut latencies = Vec::with_capacity(n);
    for i in 0..RELAY_WARMUP + n {
        let call_id = format!("relay-{run}-{i}");
        let text = signal_text(i as u64, b_user, &call_id);
        let started = Instant::now();
        a.send(Message::Text(text.into())).await.unwrap();
        let got = next_of(b, "signal").await;
        let elapsed = started.elapsed();
        assert!(got.contains(&call_id), "{got}");
        next_of(a, "delivered").await;
        if i >= RELAY_WARMUP {
            latencies.push(elapsed.as_secs_f64() * 1000.0);
        }
    }
    latencies.sort_by(f64::total_cmp);
    latencies
}

/// `user`'s `/sync` long-poll loop: each to-device event's `call_id`, with when it arrived, until
/// `stop` (or 100,000 polls).
async fn sync_loop(base_url: String, user: common::User, arrived: mpsc::UnboundedSender<(String, Instant)>) {
    let client = reqwest::Client::new();
    let mut since: Option<String> = None;
    for _ in 0..100_000 {
        let since_param = since.as_ref().map(|since| format!("&since={since}")).unwrap_or_default();
        let url = format!("{base_url}/_matrix/client/v3/sync?timeout=30000{since_param}");
        let Ok(response) = client.get(&url).bearer_auth(&user.access_token).send().await else { return };
        let Ok(answer) = response.json::<Value>().await else { return };
        let now = Instant::now();
        since = answer["next_batch"].as_str().map(str::to_owned);
        for event in answer["to_device"]["events"].as_array().into_iter().flatten() {
            if let Some(call_id) = event["content"]["call_id"].as_str()
                && arrived.send((call_id.to_owned(), now)).is_err()
            {
                return;
            }
        }
    }
}

/// Latencies (ms, sorted) of `n` to-device messages from `c` to `d` through Synapse.
async fn to_device_latency(
    synapse: &common::Synapse,
    c: &common::User,
    d: &common::User,
    arrived: &mut mpsc::UnboundedReceiver<(String, Instant)>,
    n: usize,
    run: usize,
) -> Vec<f64> {
    let http = reqwest::Client::builder().tcp_nodelay(true).build().unwrap();
    let mut latencies = Vec::with_capacity(n);
    for i in 0..TO_DEVICE_WARMUP + n {
        let call_id = format!("synapse-{run}-{i}");
        let body = json!({ "messages": { &d.user_id: { &d.device_id: candidates(&call_id) } } });
        let url =
            format!("{}/_matrix/client/v3/sendToDevice/m.call.candidates/bench-{run}-{i}", synapse.base_url);
        let started = Instant::now();
        let response = http.put(&url).bearer_auth(&c.access_token).json(&body).send().await.unwrap();
        assert!(response.status().is_success(), "sendToDevice: {}", response.status());
        let deadline = started + WAIT;
        let received = loop {
            let (got, at) = tokio::time::timeout_at(deadline.into(), arrived.recv())
                .await
                .expect("the to-device message within 10 s")
                .expect("the sync loop runs");
            if got == call_id {
                break at;
            }
        };
        if i >= TO_DEVICE_WARMUP {
            latencies.push(received.saturating_duration_since(started).as_secs_f64() * 1000.0);
        }
    }
    latencies.sort_by(f64::total_cmp);
    latencies
}

/// What one throughput run saw.
struct Throughput {
    per_second: f64,
    delivered: u64,
    received: u64,
}

/// Signals per second through `pairs` (sender token, receiver user id, receiver token), each sender
/// with `IN_FLIGHT` signals in flight, counted for `secs` after a 1 s warm-up. Senders connect to
/// `sender_port`, receivers to `receiver_port` (another instance's, to measure across instances).
async fn throughput(
    (sender_port, receiver_port): (u16, u16),
    pairs: &[(String, String, String)],
    secs: u64,
    run: usize,
) -> Throughput {
    let delivered = Arc::new(AtomicU64::new(0));
    let received = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = tokio::task::JoinSet::new();
    for (pair, (sender_token, receiver_user, receiver_token)) in pairs.iter().enumerate() {
        let peer = connect(receiver_port, receiver_token).await;
        let sender = connect(sender_port, sender_token).await;
        let (mut sink, mut stream) = sender.split();
        let permits = Arc::new(Semaphore::new(IN_FLIGHT));
        let (sent_tx, mut sent_rx) = tokio::sync::watch::channel(0u64);
        // The sender: one signal per permit, until `stop`.
        let (stop_s, permits_s, to) = (stop.clone(), permits.clone(), receiver_user.clone());
        let text = signal_text(0, &to, &format!("load-{run}-{pair}"));
        tasks.spawn(async move {
            let mut sent = 0u64;
            while !stop_s.load(Ordering::Relaxed) {
                let Ok(permit) = tokio::time::timeout(WAIT, permits_s.acquire()).await else {
                    panic!("no delivered within 10 s")
                };
                permit.unwrap().forget();
                sink.send(Message::Text(text.clone().into())).await.unwrap();
                sent += 1;
            }
            sent_tx.send(sent).unwrap();
            // Keep the sink (the socket) open until the reader has every answer.
            sent_tx.closed().await;
            drop(sink);
        });
        // The sender's reader: counts `delivered`, gives a permit back for each, until it has the
        // answers to all the sender sent.
        let delivered_r = delivered.clone();
        tasks.spawn(async move {
            let mut answered = 0u64;
            let mut total: Option<u64> = None;
            while total.is_none_or(|total| answered < total) {
                let frame = tokio::select! {
                    changed = sent_rx.changed(), if total.is_none() => {
                        changed.unwrap();
                        total = Some(*sent_rx.borrow_and_update());
                        continue;
                    }
                    frame = tokio::time::timeout(WAIT, stream.next()) => frame.expect("a frame in time"),
                };
                match frame {
                    Some(Ok(Message::Text(text))) if text.starts_with("{\"type\":\"delivered\"") => {
                        answered += 1;
                        delivered_r.fetch_add(1, Ordering::Relaxed);
                        permits.add_permits(1);
                    }
                    Some(Ok(Message::Text(text))) => {
                        assert!(!text.starts_with("{\"type\":\"error\""), "{text}");
                    }
                    Some(Ok(_)) => {}
                    other => panic!("sender socket: {other:?}"),
                }
            }
        });
        // The receiver: counts signal frames until `stop` and a quiet second.
        let (received_r, stop_r) = (received.clone(), stop.clone());
        tasks.spawn(async move {
            let mut peer = peer;
            loop {
                match tokio::time::timeout(Duration::from_secs(1), peer.next()).await {
                    Ok(Some(Ok(Message::Text(text)))) if text.starts_with("{\"type\":\"signal\"") => {
                        received_r.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(Some(Ok(_))) => {}
                    Ok(other) => panic!("receiver socket: {other:?}"),
                    Err(_) if stop_r.load(Ordering::Relaxed) => break,
                    Err(_) => {}
                }
            }
        });
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (from, started) = (delivered.load(Ordering::Relaxed), Instant::now());
    tokio::time::sleep(Duration::from_secs(secs)).await;
    let (to, elapsed) = (delivered.load(Ordering::Relaxed), started.elapsed());
    stop.store(true, Ordering::Relaxed);
    // The sender loops end at `stop` (each waits 10 s at most for a permit); the readers once every
    // answer is in; the receivers after a quiet second.
    tokio::time::timeout(Duration::from_secs(60), tasks.join_all()).await.expect("the load ends");
    #[allow(clippy::cast_precision_loss)]
    let per_second = (to - from) as f64 / elapsed.as_secs_f64();
    Throughput {
        per_second,
        delivered: delivered.load(Ordering::Relaxed),
        received: received.load(Ordering::Relaxed),
    }
}

/// Opens `count` idle sockets spread over `users` (`IDLE_PER_USER` each), each read until `stop` so
/// that pings are answered; returns once all are ready.
async fn open_idle(
    port: u16,
    users: &[common::User],
    count: usize,
    stop: &tokio_util::sync::CancellationToken,
) -> tokio::task::JoinSet<()> {
    let ready = Arc::new(AtomicU64::new(0));
    let connecting = Arc::new(Semaphore::new(CONNECTING));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..count {
        let token = users[i / IDLE_PER_USER].access_token.clone();
        let (ready, connecting, stop) = (ready.clone(), connecting.clone(), stop.clone());
        tasks.spawn(async move {
            let permit = connecting.acquire_owned().await.unwrap();
            let mut ws = connect(port, &token).await;
            drop(permit);
            ready.fetch_add(1, Ordering::Relaxed);
            loop {
                tokio::select! {
                    () = stop.cancelled() => break,
                    frame = ws.next() => match frame {
                        Some(Ok(_)) => {}
                        other => panic!("idle socket ended: {other:?}"),
                    },
                }
            }
            let _ = ws.close(None).await;
        });
    }
    let deadline = Instant::now() + Duration::from_secs(600);
    while ready.load(Ordering::Relaxed) < count as u64 {
        assert!(
            Instant::now() < deadline,
            "{} of {count} sockets ready after 600 s",
            ready.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tasks
}

/// The server's settled RSS before and with `idle` idle sockets of `users` open.
async fn idle_memory(server: &common::Process, users: &[common::User], idle: usize) -> (u64, u64) {
    let port = server.ports[1];
    let rss_before = common::settled_rss(server.pid()).await;
    let opening = Instant::now();
    let stop_idle = tokio_util::sync::CancellationToken::new();
    let idle_tasks = open_idle(port, users, idle, &stop_idle).await;
    let open_secs = opening.elapsed().as_secs_f64();
    let rss_after = common::settled_rss(server.pid()).await;
    let metrics = reqwest::get(format!("http://127.0.0.1:{}/metrics", server.ports[2])).await.unwrap();
    let open_metric = common::metric(&metrics.text().await.unwrap(), "switchboard_signalling_connections ");
    stop_idle.cancel();
    tokio::time::timeout(Duration::from_secs(120), idle_tasks.join_all()).await.expect("idle sockets close");
    eprintln!(
        "{idle} idle sockets opened in {open_secs:.1} s (server counts {open_metric}); RSS {rss_before} -> {rss_after}"
    );
    (rss_before, rss_after)
}

/// Registers `count` users, 8 at a time.
async fn register_many(synapse: &common::Synapse, prefix: &str, count: usize) -> Vec<common::User> {
    let names: Vec<String> = (0..count).map(|i| format!("{prefix}{i}")).collect();
    let mut users = Vec::with_capacity(count);
    for batch in names.chunks(8) {
        users.extend(futures_util::future::join_all(batch.iter().map(|name| synapse.register(name))).await);
    }
    users
}

/// The latency table: medians over runs of each run's percentiles.
fn print_latency(relay_runs: &[Vec<f64>], synapse_runs: &[Vec<f64>], signals: usize, to_device: usize) {
    let content_bytes = candidates("relay-0-0000").to_string().len();
    let med = |runs: &[Vec<f64>], p: f64| median(runs.iter().map(|r| percentile(r, p)).collect());
    let (relay_p50, synapse_p50) = (med(relay_runs, 50.0), med(synapse_runs, 50.0));
    println!(
        "\nOne instance, loopback; {content_bytes}-byte m.call.candidates content; {} runs, medians of per-run figures\n",
        relay_runs.len()
    );
    println!("| path | signals per run | p50 ms | p90 ms | p99 ms | p50 × relay |");
    println!("|---|---:|---:|---:|---:|---:|");
    for (name, runs_of, n) in [
        ("Switchboard relay, socket → socket", relay_runs, signals),
        ("Synapse to-device, PUT → /sync", synapse_runs, to_device),
    ] {
        println!(
            "| {name} | {n} | {:.3} | {:.3} | {:.3} | {:.1} |",
            med(runs_of, 50.0),
            med(runs_of, 90.0),
            med(runs_of, 99.0),
            med(runs_of, 50.0) / relay_p50,
        );
    }
    println!("\nSynapse / Switchboard p50 ratio: {:.1}", synapse_p50 / relay_p50);
}

/// The config edit of both instances of the cross-instance phase: the bench's settings, the shared
/// Redis and the instance's name.
fn instance_toml(toml: &str, redis_url: &str, instance: &str) -> String {
    bench_toml(toml).replace(
        "[database]\n",
        &format!("[cluster]\nredis_url = \"{redis_url}\"\n[database]\ninstance_name = \"{instance}\"\n"),
    )
}

/// The bench's config edit: quieter logs, room for the idle sockets, no per-socket frame limit.
fn bench_toml(toml: &str) -> String {
    // Warnings, and the start-up line that names the ports.
    let level = "warn,switchboard=info,switchboard::signalling=warn,switchboard::directory=warn,\
                 switchboard::http=warn,switchboard::appservice=warn,switchboard::homeserver=warn,\
                 switchboard::cluster=warn";
    toml.replace("level = \"info,switchboard=debug\"", &format!("level = \"{level}\""))
        + "[signalling]\nmax_connections = 12000\nmax_connections_per_user = 100\nframes_per_sec = 1000000\n"
}

/// Latency one instance → another through Redis, beside one instance → itself, and throughput across.
async fn cross_instance(runs: usize, signals: usize, pair_count: usize, secs: u64) {
    let Some(database) = common::fresh_postgres().await else {
        eprintln!("across instances: skipped (no SWITCHBOARD_TEST_POSTGRES_URL)");
        return;
    };
    let Some(redis) = common::Redis::start().await else {
        eprintln!("across instances: skipped (no redis-server)");
        return;
    };
    let dir_a = tempfile::tempdir().unwrap();
    let Some((synapse, mut a)) =
        common::synapse_and_process(dir_a.path(), &database, |toml| instance_toml(&toml, &redis.url(), "a"))
            .await
    else {
        return;
    };
    a.wait_for("/health").await;
    let dir_b = tempfile::tempdir().unwrap();
    let toml_b = common::config_toml(&database, &synapse.base_url, common::ANY_PORTS);
    let mut b =
        common::Process::start(dir_b.path(), &instance_toml(&toml_b, &redis.url(), "b"), common::ANY_PORTS);
    b.wait_for("/health").await;
    let (port_a, port_b) = (a.ports[1], b.ports[1]);

    let [sender, across, beside] =
        <[common::User; 3]>::try_from(register_many(&synapse, "x", 3).await).unwrap();
    let pairs: Vec<(String, String, String)> = register_many(&synapse, "xload", 2 * pair_count)
        .await
        .chunks(2)
        .map(|pair| (pair[0].access_token.clone(), pair[1].user_id.clone(), pair[1].access_token.clone()))
        .collect();
    let mut across_runs = Vec::new();
    let mut beside_runs = Vec::new();
    let mut load_runs = Vec::new();
    for run in 0..runs {
        let mut on_a = connect(port_a, &sender.access_token).await;
        let mut on_b = connect(port_b, &across.access_token).await;
        // Instance a learns through Redis that `across` is on b: probe until a signal crosses there
        // (one that went through Matrix meanwhile is read off b's socket too).
        let mut crossed = false;
        for attempt in 0..100 {
            let probe = format!("probe-{run}-{attempt}");
            on_a.send(Message::Text(signal_text(0, &across.user_id, &probe).into())).await.unwrap();
            crossed = next_of(&mut on_a, "delivered").await.contains("\"via\":\"relay\"");
            assert!(next_of(&mut on_b, "signal").await.contains(&probe));
            if crossed {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(crossed, "no signal from a reached b through Redis in 100 probes");
        let latency = relay_latency(&mut on_a, &mut on_b, &across.user_id, signals, run).await;
        drop(on_b);
        let mut beside_ws = connect(port_a, &beside.access_token).await;
        let same = relay_latency(&mut on_a, &mut beside_ws, &beside.user_id, signals, run).await;
        drop((on_a, beside_ws));
        let load = throughput((port_a, port_b), &pairs, secs, run).await;
        eprintln!(
            "across run {}: a → b p50 {:.3} p99 {:.3} ms; a → a p50 {:.3} p99 {:.3} ms; \
             {:.0} signals/s a → b ({} delivered, {} received)",
            run + 1,
            percentile(&latency, 50.0),
            percentile(&latency, 99.0),
            percentile(&same, 50.0),
            percentile(&same, 99.0),
            load.per_second,
            load.delivered,
            load.received,
        );
        assert_eq!(load.delivered, load.received, "every delivered signal reached its receiver");
        across_runs.push(latency);
        beside_runs.push(same);
        load_runs.push(load);
    }
    let med = |runs: &[Vec<f64>], p: f64| median(runs.iter().map(|r| percentile(r, p)).collect());
    println!("\nTwo instances (PostgreSQL, Redis), loopback; {runs} runs, medians of per-run figures\n");
    println!("| path | signals per run | p50 ms | p90 ms | p99 ms | p50 × one instance |");
    println!("|---|---:|---:|---:|---:|---:|");
    let one = med(&beside_runs, 50.0);
    for (name, runs_of) in
        [("instance a → instance a", &beside_runs), ("instance a → Redis → instance b", &across_runs)]
    {
        println!(
            "| {name} | {signals} | {:.3} | {:.3} | {:.3} | {:.2} |",
            med(runs_of, 50.0),
            med(runs_of, 90.0),
            med(runs_of, 99.0),
            med(runs_of, 50.0) / one,
        );
    }
    let per_second = median(load_runs.iter().map(|r| r.per_second).collect());
    println!(
        "\nThroughput a → b: {pair_count} pairs, {IN_FLIGHT} in flight each, {secs} s: {per_second:.0} signals/s (median; runs: {})",
        load_runs.iter().map(|r| format!("{:.0}", r.per_second)).collect::<Vec<_>>().join(", ")
    );
    drop((a, b, synapse, redis));
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let runs = env_usize("SWITCHBOARD_BENCH_RUNS", 3);
    let signals = env_usize("SWITCHBOARD_BENCH_SIGNALS", 2_000);
    let to_device = env_usize("SWITCHBOARD_BENCH_TO_DEVICE", 200);
    let pair_count = env_usize("SWITCHBOARD_BENCH_PAIRS", 8);
    let secs = env_usize("SWITCHBOARD_BENCH_SECS", 10) as u64;
    let idle = env_usize("SWITCHBOARD_BENCH_IDLE", 10_000);
    // Each idle socket is a file in this process too.
    let files = rlimit::increase_nofile_limit(u64::MAX).unwrap();
    assert!(files > idle as u64 + 1_000, "open-files limit {files} is too low for {idle} sockets");

    let dir = tempfile::tempdir().unwrap();
    let db = common::sqlite_url(dir.path());
    let Some((synapse, mut server)) =
        common::synapse_and_process(dir.path(), &db, |toml| bench_toml(&toml)).await
    else {
        eprintln!("no Synapse venv: run deploy/synapse/install");
        return;
    };
    server.wait_for("/health").await;
    let port = server.ports[1];

    let registering = Instant::now();
    let idle_users = register_many(&synapse, "idle", idle.div_ceil(IDLE_PER_USER)).await;
    let pairs: Vec<(common::User, common::User)> = register_many(&synapse, "load", 2 * pair_count)
        .await
        .chunks(2)
        .map(|pair| (pair[0].clone(), pair[1].clone()))
        .collect();
    let [a, b, c, d] = <[common::User; 4]>::try_from(register_many(&synapse, "lat", 4).await).unwrap();
    eprintln!("registered users in {:.1} s", registering.elapsed().as_secs_f64());

    // Memory, on the fresh process (one socket opened and closed first, so that lazily built state
    // is in the baseline).
    drop(connect(port, &a.access_token).await);
    let (rss_before, rss_after) = idle_memory(&server, &idle_users, idle).await;
    #[allow(clippy::cast_precision_loss)]
    let per_socket = rss_after.saturating_sub(rss_before) as f64 / idle as f64;

    // Latency and throughput, `runs` times, interleaved.
    let (arrived_tx, mut arrived) = mpsc::unbounded_channel();
    let sync = tokio::spawn(sync_loop(synapse.base_url.clone(), d.clone(), arrived_tx));
    let mut relay_runs = Vec::new();
    let mut synapse_runs = Vec::new();
    let mut load_runs = Vec::new();
    let load_pairs: Vec<(String, String, String)> = pairs
        .iter()
        .map(|(s, r)| (s.access_token.clone(), r.user_id.clone(), r.access_token.clone()))
        .collect();
    for run in 0..runs {
        let mut a_ws = connect(port, &a.access_token).await;
        let mut b_ws = connect(port, &b.access_token).await;
        let relay = relay_latency(&mut a_ws, &mut b_ws, &b.user_id, signals, run).await;
        drop((a_ws, b_ws));
        let through_synapse = to_device_latency(&synapse, &c, &d, &mut arrived, to_device, run).await;
        let load = throughput((port, port), &load_pairs, secs, run).await;
        eprintln!(
            "run {}: relay p50 {:.3} p99 {:.3} ms; Synapse to-device p50 {:.2} p99 {:.2} ms; \
             {:.0} signals/s ({} delivered, {} received)",
            run + 1,
            percentile(&relay, 50.0),
            percentile(&relay, 99.0),
            percentile(&through_synapse, 50.0),
            percentile(&through_synapse, 99.0),
            load.per_second,
            load.delivered,
            load.received,
        );
        assert_eq!(load.delivered, load.received, "every delivered signal reached its receiver");
        relay_runs.push(relay);
        synapse_runs.push(through_synapse);
        load_runs.push(load);
    }
    sync.abort();

    print_latency(&relay_runs, &synapse_runs, signals, to_device);
    let per_second = median(load_runs.iter().map(|r| r.per_second).collect());
    println!(
        "\nThroughput: {pair_count} pairs, {IN_FLIGHT} in flight each, {secs} s: {per_second:.0} signals/s (median; runs: {})",
        load_runs.iter().map(|r| format!("{:.0}", r.per_second)).collect::<Vec<_>>().join(", ")
    );
    #[allow(clippy::cast_precision_loss)]
    let mib = |bytes: u64| bytes as f64 / 1024.0 / 1024.0;
    println!(
        "\nMemory: RSS {:.1} MiB before, {:.1} MiB with {idle} idle sockets: {:.0} bytes ({:.1} KiB) per socket",
        mib(rss_before),
        mib(rss_after),
        per_socket,
        per_socket / 1024.0
    );
    drop((server, synapse));

    if std::env::var("SWITCHBOARD_BENCH_CROSS").as_deref() != Ok("0") {
        Box::pin(cross_instance(runs, signals, pair_count, secs)).await;
    }
}
