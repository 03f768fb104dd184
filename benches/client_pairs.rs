//! The three clients against each other, in one run: for every ordered pair of {Rust, Python,
//! browser}, the sender's upgrade time, the round-trip time and the one-way latency of
//! Raiden-shaped messages through the embedded TURN relay; and the payment-shaped run of the client
//! bench (benches/client.rs) with each kind as the mediator, over data channels and over Matrix
//! to-device side by side.
//!
//! - One real Synapse and the release `switchboard serve` (SQLite, the embedded relay on loopback,
//!   `bandwidth_bytes_per_sec = 0` as in the client bench). Every client is a fresh Raiden user,
//!   relay-only: a `switchboard::client::Client` in this process, the Python package driven by
//!   `clients/python/tests/driven_peer.py`, or the browser module in Debian's Chromium driven by
//!   `tests/browser/drive.mjs`. The three build the same messages: Raiden-shaped JSON of a given size
//!   stamped with the sender's wall clock (`sent_ms`).
//! - **Pairs**: the listener echoes every message and records its one-way latency (its wall clock at
//!   the message event minus the stamp; the processes share one clock, the page's is
//!   `performance.timeOrigin + performance.now()`, good to about 0.1 ms). Once Switchboard's
//!   discovery shows the listener reachable, the sender opens a channel to it (the upgrade: `open` →
//!   the sender's channel up) and sends `SWITCHBOARD_BENCH_PAIR_MESSAGES` (default 200) messages of
//!   3,200 bytes one at a time, each timed until its echo.
//! - **Payments**: the 1-mediator payment of the client bench (8 hops, 20 messages, Raiden's sizes;
//!   every node answers each hop with a Delivered, and a Processed for a balance proof, then sends
//!   the next hop when it is its own) between an initiator I and a target T that are Rust clients
//!   and a mediator M of each kind. Each node reports the wall-clock time of its last message of
//!   each payment; a payment's time is from I's first send to the latest of the three. Over data
//!   channels (I→M, T→M and I→T opened first) `SWITCHBOARD_BENCH_PAIR_PAYMENTS` (default 50)
//!   payments, over to-device (no channel opened) `SWITCHBOARD_BENCH_PAIR_MATRIX_PAYMENTS` (default
//!   20), each after a warm-up of a tenth; and the CPU time Synapse and Switchboard spent per payment.
//! - The chart (the CDFs of one-way latency per pair and of payment time per mediator and path) is
//!   written to `SWITCHBOARD_BENCH_PAIRS_CHART` (default docs/client-pairs.png).
//!
//! Run: `cargo bench --bench client_pairs` (after tests/run: Synapse's venv, the test venv with the
//! Python client, Chromium and playwright-core). Kinds that cannot run here are left out with a line;
//! `SWITCHBOARD_BENCH_PAIR_KINDS` (e.g. `rust,browser`) keeps only those.

// Counts and milliseconds far below 2^52.
#![allow(clippy::cast_precision_loss)]

#[path = "shared/cdf.rs"]
mod cdf;
#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use cdf::{percentile, sorted};
use common::browser::{Browser, browser_tools};
use common::pypeer::PyPeer;
use common::raiden::Raiden;
use plotters::style::RGBColor;
use serde_json::{Value, json};
use switchboard::client::{Client, ClientConfig, ClientEvent};
use tokio::sync::mpsc;

const CAPS: &str = "webRTC=1&toDevice=1&switchboard=1";
const SIZE: usize = 3_200;
/// Longest wait for a client to be on Switchboard, a channel, an echo or a payment.
const WAIT: Duration = Duration::from_secs(75);

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Rust,
    Python,
    Browser,
}

/// Wall-clock milliseconds: the clocks of the processes on this machine agree.
fn now_ms() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64() * 1000.0
}

/// A Raiden-shaped JSON message of `size` bytes (at least its fields), stamped with the time; the
/// same as driven_peer.py's `bench_message` and drive.mjs's `bench.message`.
fn message(kind: &str, payment: u64, hop: usize, ident: u64, size: usize) -> Bytes {
    let head = json!({
        "type": kind, "payment": payment, "hop": hop, "message_identifier": ident.to_string(),
        "sent_ms": now_ms(),
    })
    .to_string();
    let fixed = head.len() - 1 + ",\"padding\":\"\"}".len();
    let padding = "x".repeat(size.saturating_sub(fixed));
    Bytes::from(format!("{},\"padding\":\"{padding}\"}}", &head[..head.len() - 1]))
}

/// The 8 hops of a 1-mediator payment (benches/client.rs): sender, receiver, type, size, and
/// whether the receiver answers with a Processed besides its Delivered.
const HOPS: [(char, char, &str, usize, bool); 8] = [
    ('I', 'M', "LockedTransfer", 3_200, true),
    ('M', 'T', "LockedTransfer", 3_200, true),
    ('T', 'I', "SecretRequest", 536, false),
    ('I', 'T', "RevealSecret", 297, false),
    ('T', 'M', "RevealSecret", 297, false),
    ('M', 'I', "RevealSecret", 297, false),
    ('I', 'M', "Unlock", 568, true),
    ('M', 'T', "Unlock", 568, true),
];
const ROLES: [char; 3] = ['I', 'M', 'T'];

/// A Rust client in this process: its events forwarded to an unbounded queue (so that a task that
/// sends while it reads them never holds up the client), and what its modes recorded.
struct RustNode {
    client: Client,
    events: Option<mpsc::UnboundedReceiver<ClientEvent>>,
    oneway: Arc<Mutex<Vec<f64>>>,
    paid: Option<mpsc::UnboundedReceiver<(u64, f64)>>,
}

impl RustNode {
    async fn event(&mut self, what: &str, mut wanted: impl FnMut(&ClientEvent) -> bool) -> ClientEvent {
        let events = self.events.as_mut().expect("the events, not yet handed to a mode");
        tokio::time::timeout(WAIT, async {
            loop {
                let event = events.recv().await.expect("the client runs");
                if wanted(&event) {
                    return event;
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{what} within {WAIT:?}"))
    }

    /// Hands the events to `handle`, called for each message's bytes with the client.
    fn on_messages<F>(&mut self, mut handle: F)
    where
        F: FnMut(Client, String, Bytes) -> tokio::task::JoinHandle<()> + Send + 'static,
    {
        let mut events = self.events.take().expect("one mode per node");
        let client = self.client.clone();
        tokio::spawn(async move {
            while let Some(event) = events.recv().await {
                if let ClientEvent::Message { address, bytes } = event {
                    // Each message's answers are sent before the next message is looked at.
                    let _ = handle(client.clone(), address, bytes).await;
                }
            }
        });
    }
}

/// One client of any kind, driven the same way.
enum Node {
    Rust(RustNode),
    Python(PyPeer),
    Browser(Browser),
}

/// The stack and the tools.
struct Env {
    synapse: common::Synapse,
    switchboard: common::Process,
    switchboard_url: String,
    python: Option<PathBuf>,
    browser: Option<PathBuf>,
    dir: tempfile::TempDir,
}

impl Env {
    fn available(&self, kind: Kind) -> bool {
        match kind {
            Kind::Rust => true,
            Kind::Python => self.python.is_some(),
            Kind::Browser => self.browser.is_some(),
        }
    }

    /// A client of a fresh Raiden user, on Switchboard.
    async fn node(&self, kind: Kind) -> (Node, Raiden) {
        let raiden = self.synapse.register_raiden(CAPS).await;
        let token = &raiden.user.access_token;
        let node = match kind {
            Kind::Rust => {
                let mut config = ClientConfig::new(self.synapse.base_url.parse().unwrap(), token);
                config.switchboard = Some(self.switchboard_url.parse().unwrap());
                config.relay_only = true;
                let (client, mut events) = Client::connect(config).await.expect("the client connects");
                let (tx, rx) = mpsc::unbounded_channel();
                // Ends when the client stops.
                tokio::spawn(async move {
                    while let Some(event) = events.next().await {
                        if tx.send(event).is_err() {
                            break;
                        }
                    }
                });
                let mut node = RustNode { client, events: Some(rx), oneway: Arc::default(), paid: None };
                node.event("the Rust client on Switchboard", |e| {
                    matches!(e, ClientEvent::Switchboard { connected: true })
                })
                .await;
                Node::Rust(node)
            }
            Kind::Python => {
                let token_file = self.dir.path().join(format!("{}.token", raiden.address));
                std::fs::write(&token_file, token).unwrap();
                let python = self.python.as_ref().unwrap();
                let mut peer =
                    PyPeer::start(python, &self.synapse.base_url, &self.switchboard_url, &token_file);
                peer.wait("the Python client on Switchboard", |seen| seen.switchboard.last() == Some(&true))
                    .await;
                Node::Python(peer)
            }
            Kind::Browser => {
                let page = format!("{}/_switchboard/client/v1/demo.html", self.switchboard_url);
                let mut browser = Browser::launch(&page, self.browser.as_ref().unwrap()).await;
                let options = json!({
                    "homeserver": self.synapse.base_url, "accessToken": token,
                    "switchboard": self.switchboard_url, "relayOnly": true,
                });
                // `quiet`: messages are not reported to Node one by one (the bench modes stay in the page).
                browser.run(json!({"cmd": "start", "options": options, "watch": [], "quiet": true})).await;
                browser
                    .until("the browser on Switchboard", |ev| {
                        ev["ev"] == "switchboard" && ev["connected"] == true
                    })
                    .await;
                Node::Browser(browser)
            }
        };
        (node, raiden)
    }

    /// Waits (at most 30 s) until Switchboard's discovery says `address` is reachable, as a client
    /// watching it would see: a user that has just registered and connected may not be yet (its
    /// profile is being verified), and a call to it would then go through Matrix.
    async fn reachable(&self, token: &str, address: &str) {
        let url = format!("{}/_switchboard/client/v1/peers/{address}", self.switchboard_url);
        let http = reqwest::Client::new();
        for _ in 0..300 {
            let answer = http.get(&url).bearer_auth(token).send().await;
            if let Ok(answer) = answer
                && let Ok(body) = answer.json::<Value>().await
                && body["reachable"] == true
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("{address} not reachable through Switchboard within 30 s");
    }
}

/// An answer's list of milliseconds.
fn floats(value: &Value) -> Vec<f64> {
    value.as_array().expect("a list").iter().map(|v| v.as_f64().expect("a number")).collect()
}

impl Node {
    /// From now on: records the one-way latency of every message, and echoes it.
    async fn stamp(&mut self) {
        match self {
            Node::Rust(node) => {
                let oneway = node.oneway.clone();
                node.on_messages(move |client, address, bytes| {
                    let sent: Value = serde_json::from_slice(&bytes).expect("a bench message");
                    oneway.lock().unwrap().push(now_ms() - sent["sent_ms"].as_f64().unwrap());
                    tokio::spawn(async move { client.send(&address, bytes).await.expect("the echo") })
                });
            }
            Node::Python(peer) => peer.command("stamp").await,
            Node::Browser(browser) => {
                browser.run(json!({"cmd": "stamp"})).await;
            }
        }
    }

    /// The one-way latencies recorded since [`Node::stamp`].
    async fn oneway(&mut self) -> Vec<f64> {
        match self {
            Node::Rust(node) => std::mem::take(&mut *node.oneway.lock().unwrap()),
            Node::Python(peer) => {
                peer.command("oneway").await;
                floats(&peer.seen.borrow().other.iter().rfind(|e| e["event"] == "oneway").unwrap()["ms"])
            }
            Node::Browser(browser) => floats(&browser.run(json!({"cmd": "oneway"})).await["ms"]),
        }
    }

    /// Opens a channel to `to` and times `count` messages one at a time until each one's echo:
    /// (upgrade ms, round trips in ms, path).
    async fn pingpong(&mut self, to: &str, count: usize) -> (f64, Vec<f64>, String) {
        match self {
            Node::Rust(node) => {
                let called = Instant::now();
                node.client.open(to).await.unwrap();
                let up = |e: &ClientEvent| matches!(e, ClientEvent::ChannelUp { address, .. } if address.eq_ignore_ascii_case(to));
                node.event("the channel up", up).await;
                let upgrade = called.elapsed().as_secs_f64() * 1000.0;
                let mut rtts = Vec::with_capacity(count);
                for i in 0..count as u64 {
                    let sent = message("LockedTransfer", 0, 0, i, SIZE);
                    let started = Instant::now();
                    node.client.send(to, sent.clone()).await.unwrap();
                    node.event(
                        "the echo",
                        |e| matches!(e, ClientEvent::Message { bytes, .. } if *bytes == sent),
                    )
                    .await;
                    rtts.push(started.elapsed().as_secs_f64() * 1000.0);
                }
                let stats = node.client.stats(to).await.unwrap().unwrap();
                (
                    upgrade,
                    rtts,
                    stats.path.map_or_else(|| "none".to_owned(), |p| format!("{p:?}").to_lowercase()),
                )
            }
            Node::Python(peer) => {
                peer.command(&format!("pingpong {to} {count} {SIZE}")).await;
                let seen = peer.seen.borrow();
                let answer = seen.other.iter().rfind(|e| e["event"] == "pingpong").unwrap();
                (
                    answer["upgrade_ms"].as_f64().unwrap(),
                    floats(&answer["rtt_ms"]),
                    answer["path"].to_string(),
                )
            }
            Node::Browser(browser) => {
                let command = json!({"cmd": "pingpong", "address": to, "count": count, "size": SIZE});
                let answer = browser.run(command).await;
                (
                    answer["upgrade_ms"].as_f64().unwrap(),
                    floats(&answer["rtt_ms"]),
                    answer["path"].to_string(),
                )
            }
        }
    }

    /// Plays `role` of a payment between `addresses` (I, M, T) from now on.
    async fn payer(&mut self, role: char, addresses: &[String; 3]) {
        match self {
            Node::Rust(node) => {
                let (tx, rx) = mpsc::unbounded_channel();
                node.paid = Some(rx);
                let addresses = addresses.clone();
                let expected = HOPS
                    .iter()
                    .map(|h| usize::from(h.1 == role) + usize::from(h.0 == role) * (1 + usize::from(h.4)))
                    .sum::<usize>();
                let mut arrived: HashMap<u64, usize> = HashMap::new();
                let mut ident = 0;
                node.on_messages(move |client, _, bytes| {
                    let arrived_ms = now_ms();
                    let value: Value = serde_json::from_slice(&bytes).expect("a payment message");
                    let payment = value["payment"].as_u64().unwrap();
                    let hop = usize::try_from(value["hop"].as_u64().unwrap()).unwrap();
                    let mut answers = Vec::new();
                    if value["type"] != "Processed" && value["type"] != "Delivered" {
                        let (from, to, _, _, processed) = HOPS[hop];
                        assert_eq!(to, role, "hop {hop} reached its receiver");
                        let back = &addresses[ROLES.iter().position(|r| *r == from).unwrap()];
                        if processed {
                            answers.push((back.clone(), "Processed", hop, 216));
                        }
                        answers.push((back.clone(), "Delivered", hop, 226));
                        if let Some(&(next_from, next_to, kind, size, _)) = HOPS.get(hop + 1)
                            && next_from == role
                        {
                            let next = &addresses[ROLES.iter().position(|r| *r == next_to).unwrap()];
                            answers.push((next.clone(), kind, hop + 1, size));
                        }
                    }
                    let count = arrived.entry(payment).or_default();
                    *count += 1;
                    if *count == expected {
                        arrived.remove(&payment);
                        let _ = tx.send((payment, arrived_ms));
                    }
                    let answers: Vec<_> = answers
                        .into_iter()
                        .map(|(to, kind, hop, size)| {
                            ident += 1;
                            (to, message(kind, payment, hop, ident, size))
                        })
                        .collect();
                    tokio::spawn(async move {
                        for (to, bytes) in answers {
                            client.send(&to, bytes).await.expect("a payment message sent");
                        }
                    })
                });
            }
            Node::Python(peer) => {
                peer.command(&format!("payer {role} {}", addresses.join(" "))).await;
            }
            Node::Browser(browser) => {
                let [i, m, t] = addresses;
                let command =
                    json!({"cmd": "payer", "role": role.to_string(), "addresses": {"I": i, "M": m, "T": t}});
                browser.run(command).await;
            }
        }
    }

    /// The wall-clock time of this node's last message of `payment`.
    async fn paid(&mut self, payment: u64) -> f64 {
        let is_it = |e: &Value| e["payment"].as_u64() == Some(payment);
        match self {
            Node::Rust(node) => {
                let paid = node.paid.as_mut().unwrap();
                let (number, last) = tokio::time::timeout(WAIT, paid.recv())
                    .await
                    .unwrap_or_else(|_| panic!("payment {payment} within {WAIT:?}"))
                    .unwrap();
                assert_eq!(number, payment, "payments complete one after the other");
                last
            }
            Node::Python(peer) => {
                peer.wait(&format!("payment {payment}"), |seen| {
                    seen.other.iter().any(|e| e["event"] == "paid" && is_it(e))
                })
                .await;
                let seen = peer.seen.borrow();
                seen.other.iter().rfind(|e| e["event"] == "paid" && is_it(e)).unwrap()["last_ms"]
                    .as_f64()
                    .unwrap()
            }
            Node::Browser(browser) => {
                browser.until(&format!("payment {payment}"), |e| e["ev"] == "paid" && is_it(e)).await;
                let event = browser.events("paid").into_iter().rfind(|e| is_it(e)).unwrap();
                event["last_ms"].as_f64().unwrap()
            }
        }
    }

    fn rust(&mut self) -> &mut RustNode {
        match self {
            Node::Rust(node) => node,
            _ => panic!("a Rust node"),
        }
    }

    async fn quit(self) {
        match self {
            Node::Rust(node) => node.client.shutdown().await,
            Node::Python(peer) => peer.quit().await,
            Node::Browser(browser) => browser.quit().await,
        }
    }
}

/// One ordered pair's figures.
struct PairRun {
    sender: Kind,
    listener: Kind,
    path: String,
    upgrade_ms: f64,
    rtt: Vec<f64>,
    oneway: Vec<f64>,
}

async fn pair_run(env: &Env, sender: Kind, listener: Kind, count: usize) -> PairRun {
    let (mut to, to_user) = env.node(listener).await;
    to.stamp().await;
    let (mut from, from_user) = env.node(sender).await;
    env.reachable(&from_user.user.access_token, &to_user.address).await;
    let (upgrade_ms, rtt, path) = from.pingpong(&to_user.address, count).await;
    let oneway = to.oneway().await;
    assert_eq!(oneway.len(), count, "the listener saw every message once");
    from.quit().await;
    to.quit().await;
    PairRun { sender, listener, path, upgrade_ms, rtt: sorted(rtt), oneway: sorted(oneway) }
}

struct PaymentRun {
    mediator: Kind,
    channels: bool,
    times: Vec<f64>,
    synapse_cpu_ms: f64,
    switchboard_cpu_ms: f64,
}

impl PaymentRun {
    fn name(&self) -> String {
        let path = if self.channels { "data channels" } else { "to-device" };
        format!("{:?} mediator, {path}", self.mediator)
    }
}

/// `n` payments (after a warm-up of a tenth) between two Rust clients and a mediator of `mediator`'s
/// kind, over data channels when `channels`, else over to-device.
async fn payment_run(env: &Env, mediator: Kind, channels: bool, n: u64) -> PaymentRun {
    let (mut i, i_user) = env.node(Kind::Rust).await;
    let (mut m, m_user) = env.node(mediator).await;
    let (mut t, t_user) = env.node(Kind::Rust).await;
    let addresses = [i_user.address.clone(), m_user.address.clone(), t_user.address.clone()];
    if channels {
        env.reachable(&i_user.user.access_token, &m_user.address).await;
        env.reachable(&i_user.user.access_token, &t_user.address).await;
        for (opener, to) in [('I', &m_user.address), ('T', &m_user.address), ('I', &t_user.address)] {
            let node = if opener == 'I' { i.rust() } else { t.rust() };
            node.client.open(to).await.unwrap();
            node.event(
                "a payment channel up",
                |e| matches!(e, ClientEvent::ChannelUp { address, .. } if address.eq_ignore_ascii_case(to)),
            )
            .await;
        }
    }
    let before = i.rust().client.stats(&m_user.address).await.unwrap();
    for (node, role) in [(&mut i, 'I'), (&mut m, 'M'), (&mut t, 'T')] {
        node.payer(role, &addresses).await;
    }
    let warm_up = (n / 10).max(1);
    let mut times = Vec::new();
    let mut cpu = (0.0, 0.0);
    for payment in 0..warm_up + n {
        if payment == warm_up {
            cpu = (common::cpu_seconds(env.synapse.pid()), common::cpu_seconds(env.switchboard.pid()));
        }
        let started = now_ms();
        let client = i.rust().client.clone();
        client.send(&m_user.address, message("LockedTransfer", payment, 0, payment, 3_200)).await.unwrap();
        let mut last = 0.0_f64;
        for node in [&mut i, &mut m, &mut t] {
            last = last.max(node.paid(payment).await);
        }
        if payment >= warm_up {
            times.push(last - started);
        }
    }
    let per = |before: f64, after: f64| (after - before) * 1000.0 / n as f64;
    let synapse_cpu_ms = per(cpu.0, common::cpu_seconds(env.synapse.pid()));
    let switchboard_cpu_ms = per(cpu.1, common::cpu_seconds(env.switchboard.pid()));
    let after = i.rust().client.stats(&m_user.address).await.unwrap();
    // The path the run claims: over channels no Matrix line between I and M, over to-device no frame.
    let (before, after) = (before.unwrap_or_else(|| after.unwrap()), after.unwrap());
    if channels {
        assert_eq!(after.matrix_lines, before.matrix_lines, "I→M carried over the data channel only");
    } else {
        assert_eq!(after.dc_data_frames, 0, "I→M carried over to-device only");
    }
    for node in [i, m, t] {
        node.quit().await;
    }
    PaymentRun { mediator, channels, times: sorted(times), synapse_cpu_ms, switchboard_cpu_ms }
}

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    runtime.block_on(run());
}

async fn run() {
    let count = usize::try_from(env_number("SWITCHBOARD_BENCH_PAIR_MESSAGES", 200)).unwrap();
    let dc_payments = env_number("SWITCHBOARD_BENCH_PAIR_PAYMENTS", 50);
    let matrix_payments = env_number("SWITCHBOARD_BENCH_PAIR_MATRIX_PAYMENTS", 20);
    let dir = tempfile::tempdir().unwrap();
    let db = common::sqlite_url(dir.path());
    let Some((synapse, switchboard)) =
        common::synapse_and_process(dir.path(), &db, |toml| common::client_bench_toml(&toml)).await
    else {
        eprintln!("no Synapse venv: run deploy/synapse/install");
        return;
    };
    let browser = browser_tools().map_err(|why| eprintln!("browser: left out ({why})")).ok();
    let python = common::pypeer::python();
    let switchboard_url = format!("http://127.0.0.1:{}", switchboard.ports[1]);
    let env = Env { synapse, switchboard, switchboard_url, python, browser, dir };
    // SWITCHBOARD_BENCH_PAIR_KINDS: a comma-separated subset of rust, python, browser (default all).
    let wanted =
        std::env::var("SWITCHBOARD_BENCH_PAIR_KINDS").unwrap_or_else(|_| "rust,python,browser".to_owned());
    let kinds: Vec<Kind> = [Kind::Rust, Kind::Python, Kind::Browser]
        .into_iter()
        .filter(|k| {
            env.available(*k) && wanted.split(',').any(|w| w.trim().eq_ignore_ascii_case(&format!("{k:?}")))
        })
        .collect();

    let mut pairs = Vec::new();
    for &sender in &kinds {
        for &listener in &kinds {
            println!("{sender:?} → {listener:?}…");
            let run = pair_run(&env, sender, listener, count).await;
            println!(
                "  upgrade {:.1} ms, RTT p50 {:.2} ms, one-way p50 {:.2} ms",
                run.upgrade_ms,
                percentile(&run.rtt, 50.0),
                percentile(&run.oneway, 50.0)
            );
            pairs.push(run);
        }
    }
    let mut payments = Vec::new();
    for &mediator in &kinds {
        for channels in [true, false] {
            let n = if channels { dc_payments } else { matrix_payments };
            println!("payments, {mediator:?} mediator, channels {channels}…");
            payments.push(payment_run(&env, mediator, channels, n).await);
        }
    }
    report(count, &pairs, &payments);
    let chart = std::env::var_os("SWITCHBOARD_BENCH_PAIRS_CHART")
        .map_or_else(|| common::repo_root().join("docs/client-pairs.png"), PathBuf::from);
    match draw_chart(&chart, &pairs, &payments) {
        Ok(()) => println!("\nchart: {}", chart.display()),
        Err(e) => eprintln!("\nno chart: {e}"),
    }
}

fn report(count: usize, pairs: &[PairRun], payments: &[PaymentRun]) {
    println!("\n## Pairs through the relay: {count} messages of {SIZE} B, one at a time (ms)\n");
    println!(
        "| sender → listener | path | upgrade | RTT p50 | RTT p99 | one-way p50 | one-way p99 |\n|---|---|---:|---:|---:|---:|---:|"
    );
    for run in pairs {
        println!(
            "| {:?} → {:?} | {} | {:.1} | {:.2} | {:.2} | {:.2} | {:.2} |",
            run.sender,
            run.listener,
            run.path.trim_matches('"'),
            run.upgrade_ms,
            percentile(&run.rtt, 50.0),
            percentile(&run.rtt, 99.0),
            percentile(&run.oneway, 50.0),
            percentile(&run.oneway, 99.0),
        );
    }
    println!("\n## Payment: 1 mediator, 8 hops, 20 messages, end to end (ms)\n");
    println!(
        "| mediator, path | p50 | p90 | p99 | n | Synapse CPU ms / payment | Switchboard CPU ms / payment | to-device ÷ data channels (p50) |\n|---|---:|---:|---:|---:|---:|---:|---:|"
    );
    for run in payments {
        let ratio = if run.channels {
            payments
                .iter()
                .find(|other| other.mediator == run.mediator && !other.channels)
                .map_or_else(String::new, |matrix| {
                    format!("{:.0}×", percentile(&matrix.times, 50.0) / percentile(&run.times, 50.0))
                })
        } else {
            String::new()
        };
        println!(
            "| {} | {:.1} | {:.1} | {:.1} | {} | {:.2} | {:.2} | {ratio} |",
            run.name(),
            percentile(&run.times, 50.0),
            percentile(&run.times, 90.0),
            percentile(&run.times, 99.0),
            run.times.len(),
            run.synapse_cpu_ms,
            run.switchboard_cpu_ms,
        );
    }
}

/// The chart's two panels: one-way latency per pair, payment time per mediator and path.
fn draw_chart(
    path: &std::path::Path,
    pairs: &[PairRun],
    payments: &[PaymentRun],
) -> Result<(), Box<dyn std::error::Error>> {
    // The sender's kind is the hue, the listener's the shade; the mediator's kind is the hue, and
    // to-device the lighter line.
    let hue = |kind: Kind| match kind {
        Kind::Rust => (200u8, 70u8, 40u8),
        Kind::Python => (40, 110, 200),
        Kind::Browser => (30, 150, 80),
    };
    let shade = |(r, g, b): (u8, u8, u8), kind: Kind| {
        let percent: u16 = match kind {
            Kind::Rust => 100,
            Kind::Python => 70,
            Kind::Browser => 45,
        };
        let scale = |c: u8| u8::try_from(u16::from(c) * percent / 100).unwrap();
        RGBColor(scale(r), scale(g), scale(b))
    };
    let pair_series: Vec<cdf::Series> = pairs
        .iter()
        .map(|p| {
            (
                format!("{:?} → {:?}", p.sender, p.listener),
                shade(hue(p.sender), p.listener),
                p.oneway.as_slice(),
            )
        })
        .collect();
    let payment_series: Vec<cdf::Series> = payments
        .iter()
        .map(|p| {
            let (r, g, b) = hue(p.mediator);
            // To-device: the same hue, lighter.
            let light = |c: u8| c + (255 - c) / 2;
            let color = if p.channels { RGBColor(r, g, b) } else { RGBColor(light(r), light(g), light(b)) };
            (p.name(), color, p.times.as_slice())
        })
        .collect();
    cdf::draw(
        path,
        (1500, 620),
        [
            ("One-way latency through the relay, 3.2 kB (CDF)", pair_series),
            ("1-mediator payment, 20 messages (CDF)", payment_series),
        ],
    )
}
