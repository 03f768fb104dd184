//! The browser client and the Python client when Switchboard itself goes away mid-stream. Each talks
//! to a Rust [`Client`] over a relay-only data channel that it opened, messages streaming both ways;
//! Switchboard (and with it the TURN relay the channel goes through) stops, and Matrix carries the
//! rest: every message arrives exactly once and in order on both sides, and both see Switchboard
//! go. Switchboard restarts on the same ports: both reconnect, the client under test calls again,
//! a second channel comes up, and 100 more messages each way cross it, once and in order. The client
//! under test is the caller because the Rust client calls again only towards peers it `open`ed (its
//! own case is `switchboard_stopped_mid_stream_…` in client_e2e.rs). Each side must end with exactly
//! two channels: a call that came up on one side only (the Python client once dropped the Rust
//! client's first messages when they overtook the DATA_CHANNEL_ACK) fails the test.

mod common;

use common::browser::{Browser, browser_tools, checksum, wait};
use common::pypeer::{PyPeer, python};

use std::ops::Range;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::json;
use switchboard::client::{Client, ClientConfig, ClientEvent, ClientEvents, Path};
use tokio::sync::watch;

const CAPS: &str = "webRTC=1&toDevice=1&switchboard=1";
/// How long any one step may take.
const STEP: Duration = Duration::from_secs(60);
/// Messages each way in the stream that Switchboard stops in the middle of.
const STREAM: usize = 300;
/// The stream goes in chunks of `CHUNK` messages each way, one chunk every `PACE`: about 3 s.
const CHUNK: usize = 10;
const PACE: Duration = Duration::from_millis(100);
/// Switchboard stops once this many messages of the stream have crossed the channel each way.
const BEFORE_STOP: usize = 80;
/// Messages each way over the channel that comes up after the restart.
const AFTER: usize = 100;

/// Message `index` from the Rust client.
fn rust_message(index: usize) -> Bytes {
    Bytes::from(format!("r{index}:{}", "y".repeat(60)))
}

/// What the Rust client's event stream brought so far.
#[derive(Default)]
struct Seen {
    messages: Vec<Bytes>,
    ups: Vec<Path>,
    switchboard: Vec<bool>,
}

fn log(mut events: ClientEvents) -> watch::Receiver<Seen> {
    let (tx, rx) = watch::channel(Seen::default());
    tokio::spawn(async move {
        while let Some(event) = events.next().await {
            tx.send_modify(|seen| match event {
                ClientEvent::Message { bytes, .. } => seen.messages.push(bytes),
                ClientEvent::ChannelUp { path, .. } => seen.ups.push(path),
                ClientEvent::ChannelDown { reason, .. } => println!("rust: channel down: {reason}"),
                ClientEvent::Switchboard { connected } => seen.switchboard.push(connected),
                _ => {}
            });
        }
    });
    rx
}

/// What the client under test reported so far.
struct Report {
    received: usize,
    /// Its Switchboard connection reports, in order (true: connected).
    switchboard: Vec<bool>,
    /// The paths of the channels it reported up.
    ups: Vec<String>,
}

impl Report {
    fn of_browser(lines: &[serde_json::Value]) -> Report {
        let of = |ev: &'static str| lines.iter().filter(move |line| line["ev"] == ev);
        Report {
            received: of("message").count(),
            switchboard: of("switchboard").map(|line| line["connected"] == true).collect(),
            ups: of("channelup").map(|line| line["path"].as_str().unwrap_or_default().to_owned()).collect(),
        }
    }

    fn of_python(seen: &common::pypeer::PySeen) -> Report {
        Report { received: seen.messages.len(), switchboard: seen.switchboard.clone(), ups: seen.ups.clone() }
    }
}

/// The client under test, driven from here; its peer is the Rust client.
trait Other {
    /// Its message `index`, as the Rust client should receive it.
    fn message(index: usize) -> Bytes;
    /// Wants a channel to `address`: it calls, and calls again whenever the channel dies.
    async fn open(&mut self, address: &str);
    /// Sends its messages `range` to `address`, in order.
    async fn send(&mut self, address: &str, range: Range<usize>);
    fn report(&self) -> Report;
    /// Waits (at most [`STEP`]) until `done` holds for its report.
    async fn wait(&mut self, what: &str, done: impl FnMut(&Report) -> bool);
    /// It received the Rust client's messages `0..count` once, in order, intact.
    fn assert_received(&self, count: usize);
    /// How much it has handed to Matrix towards `address` so far (only growth is compared).
    async fn matrix_sent(&mut self, address: &str) -> u64;
    async fn quit(self);
}

/// Chromium running the browser client (tests/browser/drive.mjs).
struct BrowserSide(Browser);

impl Other for BrowserSide {
    fn message(index: usize) -> Bytes {
        common::browser::message(index).into()
    }

    async fn open(&mut self, address: &str) {
        self.0.run(json!({"cmd": "open", "address": address})).await;
    }

    async fn send(&mut self, address: &str, range: Range<usize>) {
        let command = json!({"cmd": "send", "address": address, "from": range.start, "count": range.len()});
        self.0.run(command).await;
    }

    fn report(&self) -> Report {
        Report::of_browser(&self.0.lines.borrow())
    }

    async fn wait(&mut self, what: &str, mut done: impl FnMut(&Report) -> bool) {
        let what = format!("the browser: {what}");
        common::browser::wait(&mut self.0.lines, &what, |lines| done(&Report::of_browser(lines))).await;
    }

    fn assert_received(&self, count: usize) {
        let got = self.0.events("message");
        assert_eq!(got.len(), count, "messages in the browser");
        for (index, message) in got.iter().enumerate() {
            let expected = rust_message(index);
            assert_eq!(message["len"], expected.len(), "message {index}: {message}");
            assert_eq!(message["sum"], checksum(&expected), "message {index} intact and in order: {message}");
        }
    }

    /// The message lines (fragments) the browser client sent to `address` through Matrix.
    async fn matrix_sent(&mut self, address: &str) -> u64 {
        let answer = self.0.run(json!({"cmd": "stats", "address": address})).await;
        answer["stats"]["matrixLines"].as_u64().expect("the browser client's stats count Matrix lines")
    }

    async fn quit(self) {
        self.0.quit().await;
    }
}

/// The Python client (clients/python/tests/driven_peer.py).
struct PythonSide(PyPeer);

impl Other for PythonSide {
    fn message(index: usize) -> Bytes {
        Bytes::from(format!("py-{index}"))
    }

    async fn open(&mut self, address: &str) {
        self.0.command(&format!("open {address}")).await;
    }

    async fn send(&mut self, address: &str, range: Range<usize>) {
        self.0.command(&format!("send {address} {} {}", range.start, range.len())).await;
    }

    fn report(&self) -> Report {
        Report::of_python(&self.0.seen.borrow())
    }

    async fn wait(&mut self, what: &str, mut done: impl FnMut(&Report) -> bool) {
        self.0.wait(what, |seen| done(&Report::of_python(seen))).await;
    }

    fn assert_received(&self, count: usize) {
        let expected: Vec<Vec<u8>> = (0..count).map(|index| rust_message(index).to_vec()).collect();
        assert_eq!(self.0.seen.borrow().messages, expected, "the Rust client's messages once, in order");
    }

    /// The Matrix lines (fragments) it sent, from its `stats`.
    async fn matrix_sent(&mut self, address: &str) -> u64 {
        self.0.stats(address).await.0
    }

    async fn quit(self) {
        self.0.quit().await;
    }
}

/// Synapse and Switchboard (in this process, on SQLite in `dir`), and two Raiden users: `rust`
/// for the Rust client, `other` for the client under test.
struct Stack {
    dir: tempfile::TempDir,
    database: String,
    synapse: common::Synapse,
    running: common::Running,
    /// Switchboard's client base URL.
    switchboard: String,
    rust: common::raiden::Raiden,
    other: common::raiden::Raiden,
}

impl Stack {
    /// `None` (after `skip`) without Synapse.
    async fn start() -> Option<Stack> {
        if let Ok(filter) = std::env::var("TEST_LOG") {
            let _ = tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init();
        }
        let dir = tempfile::tempdir().unwrap();
        let database = common::sqlite_url(dir.path());
        let (synapse, running) = common::with_synapse(&database, None).await?;
        let rust = synapse.register_raiden(CAPS).await;
        let other = synapse.register_raiden(CAPS).await;
        let switchboard = format!("http://{}", running.client);
        Some(Stack { dir, database, synapse, running, switchboard, rust, other })
    }

    /// The Rust client, on Switchboard (before the client under test, so that the call goes
    /// through the WebSocket rather than Matrix); back on it within 2 s of a restart.
    async fn rust_client(&self) -> (Client, watch::Receiver<Seen>) {
        let mut config =
            ClientConfig::new(self.synapse.base_url.parse().unwrap(), &self.rust.user.access_token);
        config.switchboard = Some(self.switchboard.parse().unwrap());
        config.relay_only = true;
        config.reconnect_backoff.max = Duration::from_secs(2);
        let (client, events) =
            tokio::time::timeout(STEP, Client::connect(config)).await.expect("connect in time").unwrap();
        let mut seen = log(events);
        wait(&mut seen, "on Switchboard", |seen| seen.switchboard == [true]).await;
        (client, seen)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_client_loses_nothing_when_switchboard_stops_mid_stream_and_upgrades_again_on_restart() {
    let modules = match browser_tools() {
        Ok(modules) => modules,
        Err(why) => return common::skip(&why),
    };
    let Some(stack) = Stack::start().await else { return };
    let (rust, seen) = stack.rust_client().await;
    let page = format!("{}/_switchboard/client/v1/demo.html", stack.switchboard);
    let mut browser = Browser::launch(&page, &modules).await;
    let options = json!({
        "homeserver": stack.synapse.base_url, "accessToken": stack.other.user.access_token,
        "switchboard": stack.switchboard, "relayOnly": true,
        // As the Rust client's: back on Switchboard, and calling again, within 2 s.
        "reconnectBackoff": {"initial": 500, "max": 2000},
        "upgradeBackoff": {"initial": 500, "max": 2000},
    });
    browser.run(json!({"cmd": "start", "options": options, "watch": []})).await;
    outage_and_restart(stack, rust, seen, BrowserSide(browser)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_client_loses_nothing_when_switchboard_stops_mid_stream_and_upgrades_again_on_restart() {
    let Some(python) = python() else { return };
    let Some(stack) = Stack::start().await else { return };
    let (rust, seen) = stack.rust_client().await;
    let token_file = stack.dir.path().join("other.token");
    std::fs::write(&token_file, &stack.other.user.access_token).unwrap();
    let py = PyPeer::start(&python, &stack.synapse.base_url, &stack.switchboard, &token_file);
    outage_and_restart(stack, rust, seen, PythonSide(py)).await;
}

/// The scenario, read top to bottom: the client under test opens a channel to the Rust client;
/// Switchboard stops mid-stream and Matrix carries the rest; Switchboard restarts and a second
/// channel carries 100 more each way.
async fn outage_and_restart<O: Other>(
    stack: Stack,
    rust: Client,
    mut seen: watch::Receiver<Seen>,
    mut other: O,
) {
    let started = Instant::now();
    let (to_rust, to_other) = (stack.rust.address.clone(), stack.other.address.clone());
    other.wait("on Switchboard", |report| report.switchboard == [true]).await;
    other.open(&to_rust).await;
    wait(&mut seen, "channel up", |seen| !seen.ups.is_empty()).await;
    other.wait("channel up", |report| !report.ups.is_empty()).await;
    assert_eq!(seen.borrow().ups, [Path::Relay], "relay-only ICE: through Switchboard's TURN relay");
    assert_eq!(other.report().ups, ["relay"]);
    println!("channel up after {:?}", started.elapsed());

    let ports = [stack.running.appservice.port(), stack.running.client.port(), stack.running.ops.port()];
    let stopped =
        stream_across_the_stop(stack.running, &rust, &mut seen, &mut other, &to_rust, &to_other).await;

    // Switchboard comes back on the same ports: both reconnect, and the client under test calls again.
    let toml = common::config_toml(&stack.database, &stack.synapse.base_url, ports);
    let restarted = Instant::now();
    let running = common::start(switchboard::config::Config::from_toml_str(&toml).unwrap()).await;
    println!("Switchboard restarted {:?} after it stopped", restarted - stopped);
    wait(&mut seen, "back on Switchboard", |seen| seen.switchboard.len() >= 3).await;
    other.wait("back on Switchboard", |report| report.switchboard.len() >= 3).await;
    println!("both back on Switchboard {:?} after the restart", restarted.elapsed());
    wait(&mut seen, "second channel", |seen| seen.ups.len() >= 2).await;
    other.wait("second channel", |report| report.ups.len() >= 2).await;
    println!("upgraded again {:?} after the restart", restarted.elapsed());

    hundred_more_each_way_over_the_new_channel(&rust, &mut seen, &mut other, &to_rust, &to_other).await;

    // Settle: nothing arrives twice, late.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_rust_received::<O>(&seen.borrow(), STREAM + AFTER);
    other.assert_received(STREAM + AFTER);
    assert_eq!(seen.borrow().ups, [Path::Relay, Path::Relay]);
    assert_eq!(other.report().ups, ["relay", "relay"]);
    // Gone once, back once.
    assert_eq!(seen.borrow().switchboard, [true, false, true], "the Rust client's Switchboard reports");
    assert_eq!(other.report().switchboard, [true, false, true], "Switchboard reports");
    println!("scenario: {:?}", started.elapsed());
    other.quit().await;
    rust.shutdown().await;
    running.stop().await.unwrap();
}

/// Both send `0..STREAM`, a chunk each way every `PACE`; once `BEFORE_STOP` each way have crossed
/// the channel, Switchboard stops (the stream goes on meanwhile). The rest arrive through Matrix,
/// once and in order, and both sides see Switchboard go. Returns when it stopped.
async fn stream_across_the_stop<O: Other>(
    running: common::Running,
    rust: &Client,
    seen: &mut watch::Receiver<Seen>,
    other: &mut O,
    to_rust: &str,
    to_other: &str,
) -> Instant {
    let mut running = Some(running);
    let mut stopping = None;
    let mut stopped = Instant::now();
    for start in (0..STREAM).step_by(CHUNK) {
        if start == BEFORE_STOP {
            wait(seen, "the stream's first messages", |seen| seen.messages.len() >= BEFORE_STOP).await;
            other.wait("the stream's first messages", |report| report.received >= BEFORE_STOP).await;
            // So far all over the channel: nothing handed to Matrix.
            let stats = rust.stats(to_other).await.unwrap().unwrap();
            assert!(stats.dc_data_frames >= BEFORE_STOP as u64 && stats.matrix_lines == 0, "{stats:?}");
            assert_eq!(other.matrix_sent(to_rust).await, 0, "nothing through Matrix before the stop");
            // Switchboard and its TURN relay stop: the channel stalls (a PING unanswered for 2 s).
            stopped = Instant::now();
            stopping = running.take().map(|running| tokio::spawn(running.stop()));
        }
        for index in start..start + CHUNK {
            rust.send(to_other, rust_message(index)).await.unwrap();
        }
        other.send(to_rust, start..start + CHUNK).await;
        tokio::time::sleep(PACE).await;
    }
    println!("the stream went on for {:?} after Switchboard began to stop", stopped.elapsed());
    let stop = stopping.expect("Switchboard stopped mid-stream");
    tokio::time::timeout(STEP, stop).await.expect("Switchboard stopped in time").unwrap().unwrap();

    wait(seen, "the whole stream", |seen| seen.messages.len() >= STREAM).await;
    other.wait("the whole stream", |report| report.received >= STREAM).await;
    println!("the whole stream arrived {:?} after Switchboard stopped", stopped.elapsed());
    assert_rust_received::<O>(&seen.borrow(), STREAM);
    other.assert_received(STREAM);
    let stats = rust.stats(to_other).await.unwrap().unwrap();
    println!("rust figures after the stop: {stats:?}");
    assert!(stats.matrix_lines > 0, "Matrix carried the Rust client's messages: {stats:?}");
    let sent = other.matrix_sent(to_rust).await;
    assert!(sent > 0, "Matrix carried the other side's messages");
    wait(seen, "Switchboard gone", |seen| seen.switchboard == [true, false]).await;
    other.wait("Switchboard gone", |report| report.switchboard == [true, false]).await;
    stopped
}

/// After the second upgrade: messages `STREAM..STREAM + AFTER` each way, all over the new channel
/// (nothing more handed to Matrix on either side).
async fn hundred_more_each_way_over_the_new_channel<O: Other>(
    rust: &Client,
    seen: &mut watch::Receiver<Seen>,
    other: &mut O,
    to_rust: &str,
    to_other: &str,
) {
    let before = rust.stats(to_other).await.unwrap().unwrap();
    let other_before = other.matrix_sent(to_rust).await;
    let range = STREAM..STREAM + AFTER;
    for index in range.clone() {
        rust.send(to_other, rust_message(index)).await.unwrap();
    }
    other.send(to_rust, range).await;
    wait(seen, "the messages over the new channel", |seen| seen.messages.len() >= STREAM + AFTER).await;
    other.wait("the messages over the new channel", |report| report.received >= STREAM + AFTER).await;
    let after = rust.stats(to_other).await.unwrap().unwrap();
    println!("rust figures at the end: {after:?}");
    assert!(after.dc_data_frames >= before.dc_data_frames + AFTER as u64, "over the new channel: {after:?}");
    assert_eq!(after.matrix_lines, before.matrix_lines, "none through Matrix: {after:?}");
    assert_eq!(other.matrix_sent(to_rust).await, other_before, "none of the other side's through Matrix");
}

/// The Rust client received the other side's messages `0..count` once, in order, intact.
fn assert_rust_received<O: Other>(seen: &Seen, count: usize) {
    assert_eq!(seen.messages.len(), count, "messages in the Rust client");
    for (index, bytes) in seen.messages.iter().enumerate() {
        assert_eq!(*bytes, O::message(index), "message {index} intact and in order");
    }
}
