//! The browser client (`clients/browser/switchboard.js`): Switchboard serves it with caching and
//! CORS headers, and a real Chromium (driven by playwright-core, `tests/browser/drive.mjs`) loads it
//! from Switchboard's origin and talks to the Rust client through Matrix and the TURN relay.

mod common;

use common::browser::{Browser, browser_tools, checksum};

use std::path::Path as FsPath;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::{Value, json};
use switchboard::client::{Client, ClientConfig, ClientEvent, ClientEvents, Path};
use tokio::process::Command;
use tokio::sync::watch;

const CAPS: &str = "webRTC=1&toDevice=1&switchboard=1";
/// How long any one step may take.
const STEP: Duration = Duration::from_secs(60);
/// Messages each way in the first data channel phase.
const COUNT: usize = 400;
/// Messages each way sent across the cut.
const ACROSS_CUT: usize = 60;
/// Messages each way over the channel that comes up again.
const AFTER: usize = 40;

const FILES: [(&str, &str); 3] = [
    ("switchboard.js", "text/javascript; charset=utf-8"),
    ("switchboard.d.ts", "application/typescript; charset=utf-8"),
    ("demo.html", "text/html; charset=utf-8"),
];

#[tokio::test]
async fn client_files_are_served_with_caching_and_cors_headers() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = common::config(&common::sqlite_url(dir.path()), "http://127.0.0.1:9");
    // The API's own CORS list must not narrow the public files' `*`.
    config.client.cors_allowed_origins = vec!["https://app.example.org".to_owned()];
    let running = common::start(config).await;
    let client = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap();
    for (name, content_type) in FILES {
        let url = format!("http://{}/_switchboard/client/v1/{name}", running.client);
        let first = client.get(&url).header("Origin", "https://other.example").send().await.unwrap();
        assert_eq!(first.status(), 200, "{name}");
        let headers = first.headers().clone();
        assert_eq!(headers["content-type"], content_type, "{name}");
        assert_eq!(headers["access-control-allow-origin"], "*", "{name}");
        assert_eq!(headers["cache-control"], "public, max-age=300, must-revalidate", "{name}");
        let etag = headers["etag"].to_str().unwrap().to_owned();
        assert!(etag.starts_with('"') && etag.ends_with('"'), "{name}: a strong ETag {etag}");
        let body = first.bytes().await.unwrap();
        let on_disk = std::fs::read(common::repo_root().join("clients/browser").join(name)).unwrap();
        assert_eq!(body.as_ref(), on_disk.as_slice(), "{name}: the embedded file");

        let again = client.get(&url).header("If-None-Match", &etag).send().await.unwrap();
        assert_eq!(again.status(), 304, "{name}");
        assert_eq!(again.headers()["etag"], etag.as_str());
        assert_eq!(again.headers()["access-control-allow-origin"], "*");
        assert!(again.bytes().await.unwrap().is_empty(), "{name}: 304 has no body");

        let listed =
            client.get(&url).header("If-None-Match", format!("\"x\", W/{etag}")).send().await.unwrap();
        assert_eq!(listed.status(), 304, "{name}: a tag in a list (weak comparison)");
        let stale = client.get(&url).header("If-None-Match", "\"stale\"").send().await.unwrap();
        assert_eq!(stale.status(), 200, "{name}: another tag gets the file");
    }
    let api = format!("http://{}/_switchboard/client/versions", running.client);
    let api = client.get(&api).header("Origin", "https://other.example").send().await.unwrap();
    assert!(api.headers().get("access-control-allow-origin").is_none(), "the API keeps its own CORS");
    running.stop().await.unwrap();
}

/// Message `i` from the Rust side: `r<i>:` and 60 `y`; number 50 is 40,002 bytes of two-byte
/// characters (three fragments).
fn rust_message(i: usize) -> Bytes {
    let body = if i == 50 { "é".repeat(20_000) } else { "y".repeat(60) };
    Bytes::from(format!("r{i}:{body}"))
}

/// Message `i` from the browser, as the Rust client's events carry it.
fn browser_message(i: usize) -> Bytes {
    common::browser::message(i).into()
}

/// What the Rust client saw.
#[derive(Default)]
struct Seen {
    messages: Vec<Bytes>,
    ups: Vec<Path>,
    downs: Vec<String>,
    switchboard: Vec<bool>,
}

fn log(mut events: ClientEvents) -> watch::Receiver<Seen> {
    let (tx, rx) = watch::channel(Seen::default());
    tokio::spawn(async move {
        while let Some(event) = events.next().await {
            tx.send_modify(|seen| match event {
                ClientEvent::Message { bytes, .. } => seen.messages.push(bytes),
                ClientEvent::ChannelUp { path, .. } => seen.ups.push(path),
                ClientEvent::ChannelDown { reason, .. } => seen.downs.push(reason),
                ClientEvent::Switchboard { connected } => seen.switchboard.push(connected),
                _ => {}
            });
        }
    });
    rx
}

async fn wait<T>(rx: &mut watch::Receiver<T>, what: &str, done: impl FnMut(&T) -> bool) {
    tokio::time::timeout(STEP, rx.wait_for(done))
        .await
        .unwrap_or_else(|_| panic!("{what} within {STEP:?}"))
        .expect("the log ended");
}

/// What every browser test here starts from: playwright-core, a real Synapse with Switchboard
/// in-process (SQLite, its embedded relay) and Switchboard's client URL; `None` (skipped, or failed
/// when every piece is required) when the browser or Synapse cannot run here.
struct Stack {
    modules: std::path::PathBuf,
    synapse: common::Synapse,
    running: common::Running,
    switchboard: String,
    _dir: tempfile::TempDir,
}

async fn stack() -> Option<Stack> {
    let modules = browser_tools().map_err(|why| common::skip(&why)).ok()?;
    let dir = tempfile::tempdir().unwrap();
    let (synapse, running) = common::with_synapse(&common::sqlite_url(dir.path()), None).await?;
    let switchboard = format!("http://{}", running.client);
    Some(Stack { modules, synapse, running, switchboard, _dir: dir })
}

/// Every message from the Rust side reached the browser once, in order, intact: `r0`… `r<count-1>`.
fn assert_browser_got(browser: &Browser, count: usize) {
    assert_browser_got_from(browser, count, rust_message);
}

/// Every message `from(i)` reached the browser once, in order, intact.
fn assert_browser_got_from(browser: &Browser, count: usize, from: fn(usize) -> Bytes) {
    let got = browser.events("message");
    assert_eq!(got.len(), count, "messages in the browser");
    for (i, message) in got.iter().enumerate() {
        let expected = from(i);
        assert_eq!(message["len"], expected.len(), "message {i}: {message}");
        assert_eq!(message["sum"], checksum(&expected), "message {i} intact and in order: {message}");
    }
}

/// Every message from the browser reached the Rust client once, in order, intact.
fn assert_rust_got(seen: &Seen, count: usize) {
    assert_eq!(seen.messages.len(), count, "messages in the Rust client");
    for (i, bytes) in seen.messages.iter().enumerate() {
        assert_eq!(*bytes, browser_message(i), "message {i} intact and in order");
    }
}

/// Who calls in [`interop`].
#[derive(Clone, Copy, PartialEq, Eq)]
enum Opener {
    Rust,
    Browser,
}

/// The scenario: both on Switchboard; messages through Matrix before any channel; the opener
/// calls, both sides see the channel up through the relay; messages both ways over it; the channel
/// is cut mid-stream (by the side that did not open) and messages continue over Matrix; the opener
/// calls again and more messages cross the new channel. Returns the browser (for a screenshot).
#[allow(clippy::too_many_lines)] // one scenario, read top to bottom
async fn interop(opener: Opener, screenshot: Option<&FsPath>) {
    let Some(Stack { modules, synapse, running, switchboard, _dir }) = stack().await else { return };
    let started = Instant::now();
    let alice = synapse.register_raiden(CAPS).await;
    let bob = synapse.register_raiden(CAPS).await;
    let mut config = ClientConfig::new(synapse.base_url.parse().unwrap(), &alice.user.access_token);
    config.switchboard = Some(switchboard.parse().unwrap());
    config.relay_only = true;
    let (rust, events) = Client::connect(config).await.unwrap();
    let mut seen = log(events);
    wait(&mut seen, "the Rust client on Switchboard", |seen| seen.switchboard == [true]).await;

    let mut browser =
        Browser::launch(&format!("{switchboard}/_switchboard/client/v1/demo.html"), &modules).await;
    let options = json!({
        "homeserver": synapse.base_url, "accessToken": bob.user.access_token,
        "switchboard": switchboard, "relayOnly": true,
        "upgradeBackoff": {"initial": 500, "max": 2000},
    });
    browser.run(json!({"cmd": "start", "options": options, "watch": [alice.address]})).await;
    browser
        .until("the browser on Switchboard", |ev| ev["ev"] == "switchboard" && ev["connected"] == true)
        .await;
    browser
        .until("alice's presence", |ev| {
            ev["ev"] == "presence"
                && ev["address"].as_str().is_some_and(|a| a.eq_ignore_ascii_case(&alice.address))
        })
        .await;

    // Through Matrix first: the delivery layer alone, before any channel.
    for i in 0..10 {
        rust.send(&bob.address, rust_message(i)).await.unwrap();
    }
    browser.run(json!({"cmd": "send", "address": alice.address, "from": 0, "count": 10})).await;
    wait(&mut seen, "10 messages through Matrix", |seen| seen.messages.len() >= 10).await;
    wait(&mut browser.lines, "10 messages in the browser", |lines| {
        lines.iter().filter(|ev| ev["ev"] == "message").count() >= 10
    })
    .await;
    assert!(seen.borrow().ups.is_empty(), "no channel yet");

    // The upgrade.
    let upgrade = Instant::now();
    match opener {
        Opener::Rust => rust.open(&bob.address).await.unwrap(),
        Opener::Browser => {
            browser.run(json!({"cmd": "open", "address": alice.address})).await;
        }
    }
    wait(&mut seen, "the Rust side's channel up", |seen| !seen.ups.is_empty()).await;
    browser.until("the browser's channel up", |ev| ev["ev"] == "channelup").await;
    eprintln!("upgrade: {:?}", upgrade.elapsed());
    assert_eq!(seen.borrow().ups, [Path::Relay], "relay-only ICE: through the TURN relay");
    assert_eq!(browser.events("channelup")[0]["path"], "relay");

    // Both ways over the channel.
    let frames_before = rust.stats(&bob.address).await.unwrap().unwrap().dc_data_frames;
    let sending = send_range(&rust, &bob.address, 10..COUNT);
    browser.run(json!({"cmd": "send", "address": alice.address, "from": 10, "count": COUNT - 10})).await;
    sending.await.unwrap();
    wait(&mut seen, "the browser's messages", |seen| seen.messages.len() >= COUNT).await;
    wait(&mut browser.lines, "the Rust side's messages", |lines| {
        lines.iter().filter(|ev| ev["ev"] == "message").count() >= COUNT
    })
    .await;
    let stats = rust.stats(&bob.address).await.unwrap().unwrap();
    assert!(stats.dc_data_frames >= frames_before + (COUNT as u64) - 10, "over the channel: {stats:?}");
    let rtt = browser.run(json!({"cmd": "stats", "address": alice.address})).await;
    eprintln!("browser stats: {}", rtt["stats"]);
    assert_eq!(rtt["stats"]["path"], "relay");
    if let Some(path) = screenshot {
        browser.run(json!({"cmd": "screenshot", "path": path})).await;
    }

    // The cut, mid-stream: the side that did not open drops the channel.
    let matrix_before = rust.stats(&bob.address).await.unwrap().unwrap().matrix_lines;
    let half = COUNT + ACROSS_CUT / 2;
    let sending = send_range(&rust, &bob.address, COUNT..half);
    match opener {
        Opener::Rust => {
            browser.run(json!({"cmd": "reset", "address": alice.address})).await;
        }
        Opener::Browser => rust.reset_channel(&bob.address).await.unwrap(),
    }
    browser.run(json!({"cmd": "send", "address": alice.address, "from": COUNT, "count": half - COUNT})).await;
    sending.await.unwrap();
    wait(&mut seen, "the Rust side's channel down", |seen| !seen.downs.is_empty()).await;
    browser.until("the browser's channel down", |ev| ev["ev"] == "channeldown").await;
    // With the channel down (the opener waits its backoff before calling again): Matrix.
    let sending = send_range(&rust, &bob.address, half..COUNT + ACROSS_CUT);
    let count = COUNT + ACROSS_CUT - half;
    browser.run(json!({"cmd": "send", "address": alice.address, "from": half, "count": count})).await;
    sending.await.unwrap();
    let total = COUNT + ACROSS_CUT;
    wait(&mut seen, "the messages across the cut", |seen| seen.messages.len() >= total).await;
    wait(&mut browser.lines, "the messages across the cut in the browser", |lines| {
        lines.iter().filter(|ev| ev["ev"] == "message").count() >= total
    })
    .await;

    let carried = rust.stats(&bob.address).await.unwrap().unwrap().matrix_lines - matrix_before;
    eprintln!("across the cut: {carried} of the Rust side's fragments went through Matrix");
    assert!(carried > 0, "Matrix carried messages while the channel was down");
    eprintln!(
        "channel down: rust {:?}, browser {}",
        seen.borrow().downs,
        browser.events("channeldown")[0]["reason"]
    );

    // The opener calls again; more messages over the new channel.
    wait(&mut seen, "the Rust side's channel up again", |seen| seen.ups.len() >= 2).await;
    wait(&mut browser.lines, "the browser's channel up again", |lines| {
        lines.iter().filter(|ev| ev["ev"] == "channelup").count() >= 2
    })
    .await;
    let frames_before = rust.stats(&bob.address).await.unwrap().unwrap().dc_data_frames;
    let sending = send_range(&rust, &bob.address, total..total + AFTER);
    browser.run(json!({"cmd": "send", "address": alice.address, "from": total, "count": AFTER})).await;
    sending.await.unwrap();
    let total = total + AFTER;
    wait(&mut seen, "the messages over the new channel", |seen| seen.messages.len() >= total).await;
    wait(&mut browser.lines, "the messages over the new channel in the browser", |lines| {
        lines.iter().filter(|ev| ev["ev"] == "message").count() >= total
    })
    .await;
    let stats = rust.stats(&bob.address).await.unwrap().unwrap();
    assert!(stats.dc_data_frames >= frames_before + AFTER as u64, "over the new channel: {stats:?}");
    // Settle: nothing arrives twice late.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_rust_got(&seen.borrow(), total);
    assert_browser_got(&browser, total);
    assert_eq!(seen.borrow().ups, [Path::Relay, Path::Relay]);
    let console = browser.events("console");
    assert!(
        console.iter().all(|line| !line.to_string().contains(&bob.user.access_token)),
        "no token in the page's console"
    );
    eprintln!("scenario: {:?}", started.elapsed());
    browser.quit().await;
    rust.shutdown().await;
    running.stop().await.unwrap();
}

/// Sends Rust messages `range` to `to`, in order, each awaited.
fn send_range(client: &Client, to: &str, range: std::ops::Range<usize>) -> tokio::task::JoinHandle<()> {
    let client = client.clone();
    let to = to.to_owned();
    tokio::spawn(async move {
        for i in range {
            client.send(&to, rust_message(i)).await.unwrap_or_else(|error| panic!("send {i}: {error}"));
        }
    })
}

/// The delivery layer's own tests (clients/browser/switchboard.test.mjs: the byte examples of
/// docs/protocol.md, and two peers over a simulated network that reorders, fails and cuts, over
/// 200 seeds), run with Node's test runner.
#[tokio::test]
async fn delivery_layer_unit_tests_pass_under_node() {
    if std::process::Command::new("node").arg("--version").output().is_err() {
        return common::skip("no node");
    }
    let output = tokio::time::timeout(
        Duration::from_secs(120),
        Command::new("node").arg("--test").arg(common::repo_root().join("clients/browser/")).output(),
    )
    .await
    .expect("node --test in time")
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}{}", String::from_utf8_lossy(&output.stderr));
    // node's summary: `# tests N`, `# pass N`, `# fail 0`; all of the suite's 11 tests ran.
    let count = |key: &str| {
        stdout.lines().find_map(|line| line.strip_prefix(key)).and_then(|n| n.trim().parse::<u32>().ok())
    };
    assert_eq!(count("# fail "), Some(0), "{stdout}");
    assert_eq!(count("# pass "), count("# tests "), "every test passed, none skipped: {stdout}");
    assert!(count("# pass ").is_some_and(|n| n >= 11), "the whole suite ran: {stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_opens_to_the_browser_through_the_relay_and_survives_a_cut() {
    interop(Opener::Rust, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_opens_to_rust_through_the_relay_and_survives_a_cut() {
    // The demo page with its live channel, as docs/browser-demo.png shows it: refreshed with
    // `SWITCHBOARD_TEST_SCREENSHOT=docs/browser-demo.png cargo nextest run --test client_browser
    // browser_opens` (a relative path is from the repository); by default into a temporary
    // directory, so that a test run leaves the tree as it was.
    let dir = tempfile::tempdir().unwrap();
    let screenshot = std::env::var_os("SWITCHBOARD_TEST_SCREENSHOT")
        .map_or_else(|| dir.path().join("demo.png"), |path| common::repo_root().join(path));
    interop(Opener::Browser, Some(&screenshot)).await;
    let png = std::fs::read(&screenshot).expect("the screenshot was written");
    assert!(png.starts_with(b"\x89PNG"), "a PNG");
}

/// Two browsers (two Chromium processes, the module against itself): one opens, the channel comes
/// up through the relay on both sides and carries 100 messages each way; the other cuts it
/// mid-stream, the next messages go through Matrix, the opener calls again, and 100 more each way
/// cross the new channel: every message once and in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_browsers_upgrade_through_the_relay_survive_a_cut_and_upgrade_again() {
    let Some(Stack { modules, synapse, running, switchboard, _dir }) = stack().await else { return };
    let page = format!("{switchboard}/_switchboard/client/v1/demo.html");
    let alice = synapse.register_raiden(CAPS).await;
    let bob = synapse.register_raiden(CAPS).await;
    let mut a = Browser::launch(&page, &modules).await;
    let mut b = Browser::launch(&page, &modules).await;
    for (browser, user, peer) in [(&mut a, &alice, &bob), (&mut b, &bob, &alice)] {
        let options = json!({
            "homeserver": synapse.base_url, "accessToken": user.user.access_token,
            "switchboard": switchboard, "relayOnly": true,
            "upgradeBackoff": {"initial": 500, "max": 2000},
        });
        browser.run(json!({"cmd": "start", "options": options, "watch": [peer.address]})).await;
        browser.until("on Switchboard", |ev| ev["ev"] == "switchboard" && ev["connected"] == true).await;
    }
    let upgrade = Instant::now();
    a.run(json!({"cmd": "open", "address": bob.address})).await;
    a.until("alice's channel up", |ev| ev["ev"] == "channelup").await;
    b.until("bob's channel up", |ev| ev["ev"] == "channelup").await;
    eprintln!("upgrade: {:?}", upgrade.elapsed());
    assert_eq!(a.events("channelup")[0]["path"], "relay");
    assert_eq!(b.events("channelup")[0]["path"], "relay");
    let messages = |lines: &Vec<Value>| lines.iter().filter(|ev| ev["ev"] == "message").count();
    let stats = async |browser: &mut Browser, address: &str| {
        browser.run(json!({"cmd": "stats", "address": address})).await["stats"].clone()
    };
    a.run(json!({"cmd": "send", "address": bob.address, "from": 0, "count": COUNT})).await;
    b.run(json!({"cmd": "send", "address": alice.address, "from": 0, "count": COUNT})).await;
    for browser in [&mut a, &mut b] {
        wait(&mut browser.lines, "the messages over the channel", |lines| messages(lines) >= COUNT).await;
    }
    let before = stats(&mut b, &alice.address).await;
    assert!(before["dcDataFrames"].as_u64().unwrap() >= COUNT as u64, "over the channel: {before}");

    // The cut, by the side that did not open; both go on sending.
    b.run(json!({"cmd": "reset", "address": alice.address})).await;
    let total = COUNT + ACROSS_CUT;
    a.run(json!({"cmd": "send", "address": bob.address, "from": COUNT, "count": ACROSS_CUT})).await;
    b.run(json!({"cmd": "send", "address": alice.address, "from": COUNT, "count": ACROSS_CUT})).await;
    for browser in [&mut a, &mut b] {
        browser.until("the channel down", |ev| ev["ev"] == "channeldown").await;
        wait(&mut browser.lines, "the messages across the cut", |lines| messages(lines) >= total).await;
    }
    let after = stats(&mut b, &alice.address).await;
    let carried = after["matrixLines"].as_u64().unwrap() - before["matrixLines"].as_u64().unwrap();
    eprintln!("across the cut: {carried} of bob's fragments went through Matrix");
    assert!(carried > 0, "Matrix carried messages while the channel was down: {after}");

    // The opener calls again; more messages over the new channel.
    for browser in [&mut a, &mut b] {
        wait(&mut browser.lines, "the channel up again", |lines| {
            lines.iter().filter(|ev| ev["ev"] == "channelup").count() >= 2
        })
        .await;
    }
    let frames_before = stats(&mut a, &bob.address).await["dcDataFrames"].as_u64().unwrap();
    a.run(json!({"cmd": "send", "address": bob.address, "from": total, "count": AFTER})).await;
    b.run(json!({"cmd": "send", "address": alice.address, "from": total, "count": AFTER})).await;
    let total = total + AFTER;
    for browser in [&mut a, &mut b] {
        wait(&mut browser.lines, "the messages over the new channel", |lines| messages(lines) >= total).await;
    }
    let frames = stats(&mut a, &bob.address).await["dcDataFrames"].as_u64().unwrap();
    assert!(frames >= frames_before + AFTER as u64, "over the new channel: {frames_before} → {frames}");
    // Settle: nothing arrives twice late.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_browser_got_from(&a, total, browser_message);
    assert_browser_got_from(&b, total, browser_message);
    a.quit().await;
    b.quit().await;
    running.stop().await.unwrap();
}

/// The browser sends to two peers through Matrix alone (no channel): each gets every message once,
/// in order. The module once gave all its peers one stream id, so the first batch to the second
/// peer had the txn id of the first batch to the first one; the homeserver took it as a retry and
/// never delivered it, and the message was lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_browser_reaches_two_peers_through_matrix_alone() {
    let Some(Stack { modules, synapse, running, switchboard, _dir }) = stack().await else { return };
    let [alice, bob, carol] = [
        synapse.register_raiden(CAPS).await,
        synapse.register_raiden(CAPS).await,
        synapse.register_raiden(CAPS).await,
    ];
    let mut peers = Vec::new();
    for user in [&bob, &carol] {
        // Rust clients without Switchboard: Matrix is the only way.
        let config = ClientConfig::new(synapse.base_url.parse().unwrap(), &user.user.access_token);
        let (client, events) = Client::connect(config).await.unwrap();
        peers.push((client, log(events), &user.address));
    }
    let mut browser =
        Browser::launch(&format!("{switchboard}/_switchboard/client/v1/demo.html"), &modules).await;
    let options = json!({"homeserver": synapse.base_url, "accessToken": alice.user.access_token, "switchboard": switchboard});
    browser.run(json!({"cmd": "start", "options": options, "watch": []})).await;
    for (_, _, address) in &peers {
        browser.run(json!({"cmd": "send", "address": address, "from": 0, "count": 20})).await;
    }
    for (client, seen, address) in &mut peers {
        wait(seen, &format!("{address}'s 20 messages"), |seen| seen.messages.len() >= 20).await;
        let seen = seen.borrow();
        assert_eq!(seen.messages, (0..20).map(browser_message).collect::<Vec<_>>(), "once, in order");
        assert!(seen.ups.is_empty(), "no channel: Matrix carried them");
        let stats = client.stats(&alice.address).await.unwrap().unwrap();
        assert_eq!(stats.dc_data_frames, 0, "{stats:?}");
    }
    for (client, _, _) in peers {
        client.shutdown().await;
    }
    browser.quit().await;
    running.stop().await.unwrap();
}

/// The Rust client and the browser open at the same moment: the broker's glare rule keeps one call,
/// and the pair ends with one channel, which carries messages both ways once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_and_the_browser_opening_at_once_end_with_one_channel() {
    let Some(Stack { modules, synapse, running, switchboard, _dir }) = stack().await else { return };
    let alice = synapse.register_raiden(CAPS).await;
    let bob = synapse.register_raiden(CAPS).await;
    let mut config = ClientConfig::new(synapse.base_url.parse().unwrap(), &alice.user.access_token);
    config.switchboard = Some(switchboard.parse().unwrap());
    config.relay_only = true;
    let (rust, events) = Client::connect(config).await.unwrap();
    let mut seen = log(events);
    wait(&mut seen, "the Rust client on Switchboard", |seen| seen.switchboard == [true]).await;
    let mut browser =
        Browser::launch(&format!("{switchboard}/_switchboard/client/v1/demo.html"), &modules).await;
    let options = json!({
        "homeserver": synapse.base_url, "accessToken": bob.user.access_token,
        "switchboard": switchboard, "relayOnly": true,
    });
    browser.run(json!({"cmd": "start", "options": options, "watch": [alice.address]})).await;
    browser
        .until("the browser on Switchboard", |ev| ev["ev"] == "switchboard" && ev["connected"] == true)
        .await;

    let browser_opens = browser.run(json!({"cmd": "open", "address": alice.address}));
    let (_, opened) = tokio::join!(browser_opens, rust.open(&bob.address));
    opened.unwrap();
    wait(&mut seen, "the Rust side's channel up", |seen| !seen.ups.is_empty()).await;
    browser.until("the browser's channel up", |ev| ev["ev"] == "channelup").await;

    let count = 100;
    let sending = send_range(&rust, &bob.address, 0..count);
    browser.run(json!({"cmd": "send", "address": alice.address, "from": 0, "count": count})).await;
    sending.await.unwrap();
    wait(&mut seen, "the browser's messages", |seen| seen.messages.len() >= count).await;
    wait(&mut browser.lines, "the Rust side's messages", |lines| {
        lines.iter().filter(|ev| ev["ev"] == "message").count() >= count
    })
    .await;
    let (rust_ups, rust_downs) = (seen.borrow().ups.len(), seen.borrow().downs.len());
    let (browser_ups, browser_downs) =
        (browser.events("channelup").len(), browser.events("channeldown").len());
    println!("rust: {rust_ups} up, {rust_downs} down; browser: {browser_ups} up, {browser_downs} down");
    assert_eq!(rust_ups, rust_downs + 1, "rust: one channel up");
    assert_eq!(browser_ups, browser_downs + 1, "browser: one channel up");
    let stats = rust.stats(&bob.address).await.unwrap().unwrap();
    // The channel carried them (all of them unless it stalled under load: then Matrix meanwhile).
    assert!(stats.dc_data_frames > 0, "the channel carried messages: {stats:?}");
    assert_rust_got(&seen.borrow(), count);
    assert_browser_got(&browser, count);
    browser.quit().await;
    rust.shutdown().await;
    running.stop().await.unwrap();
}
