//! The Python client package (`clients/python`) against the real stack: a real Synapse and
//! Switchboard with its embedded TURN relay on loopback. Its own pytest suite runs with the stack
//! named in environment variables (unit tests, and Python ↔ Python through the relay with a cut
//! and a re-upgrade), and a Rust `Client` and a Python client talk to each other in both roles:
//! the upgrade through the relay, messages both ways exactly once and in order (a binary message
//! over 16 KiB among them, so fragments cross too), the channel cut by the Rust side (the rest
//! goes through Matrix, none lost or repeated), and the upgrade again.
//!
//! The Python interpreter is `$SWITCHBOARD_TEST_PYTHON` or `.cache/test-venv/bin/python`
//! (`tests/python-tools` makes it, with the package installed from `clients/python`).

mod common;

use common::pypeer::{PyPeer, python};

use std::time::{Duration, Instant};

use bytes::Bytes;
use switchboard::client::{Client, ClientConfig, ClientEvent, ClientEvents, Path};
use tokio::process::Command;
use tokio::sync::watch;

const CAPS: &str = "webRTC=1&toDevice=1&switchboard=1";
/// How long any one step may take.
const STEP: Duration = Duration::from_secs(60);
/// Messages each way per phase.
const COUNT: usize = 100;
/// A binary message that takes three fragments.
const BIG: usize = 40_000;

fn big_message() -> Vec<u8> {
    (0..BIG).map(|i| u8::try_from((i * 7 + 3) % 256).unwrap()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_package_tests_pass_against_the_real_stack() {
    let Some(python) = python() else { return };
    let dir = tempfile::tempdir().unwrap();
    let Some((synapse, running)) = common::with_synapse(&common::sqlite_url(dir.path()), None).await else {
        return;
    };
    let mut users = Vec::new();
    for _ in 0..5 {
        let raiden = synapse.register_raiden(CAPS).await;
        users.push(serde_json::json!({
            "address": raiden.address,
            "user_id": raiden.user.user_id,
            "access_token": raiden.user.access_token,
        }));
    }
    let started = Instant::now();
    let output = tokio::time::timeout(
        Duration::from_secs(300),
        Command::new(python)
            .args(["-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "clients/python/tests"])
            .current_dir(common::repo_root())
            .env("SWITCHBOARD_PY_HOMESERVER", &synapse.base_url)
            .env("SWITCHBOARD_PY_SWITCHBOARD", format!("http://{}", running.client))
            .env("SWITCHBOARD_PY_USERS", serde_json::Value::Array(users).to_string())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("pytest within 300 s")
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    println!("pytest in {:?}:\n{stdout}{}", started.elapsed(), String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success(), "pytest failed");
    let summary = stdout.lines().last().unwrap_or_default();
    assert!(summary.contains(" passed"), "{summary}");
    assert!(!summary.contains("skipped") && !summary.contains("failed"), "nothing skipped: {summary}");
    running.stop().await.unwrap();
}

/// What the Rust client's event stream brought so far.
#[derive(Default)]
struct RsSeen {
    messages: Vec<Bytes>,
    ups: Vec<Path>,
    downs: usize,
    switchboard: Vec<bool>,
}

fn log(mut events: ClientEvents) -> watch::Receiver<RsSeen> {
    let (tx, rx) = watch::channel(RsSeen::default());
    tokio::spawn(async move {
        while let Some(event) = events.next().await {
            tx.send_modify(|seen| match event {
                ClientEvent::Message { bytes, .. } => seen.messages.push(bytes),
                ClientEvent::ChannelUp { path, .. } => seen.ups.push(path),
                ClientEvent::ChannelDown { reason, .. } => {
                    println!("rust: channel down: {reason}");
                    seen.downs += 1;
                }
                ClientEvent::Switchboard { connected } => seen.switchboard.push(connected),
                _ => {}
            });
        }
    });
    rx
}

async fn wait(seen: &mut watch::Receiver<RsSeen>, what: &str, mut done: impl FnMut(&RsSeen) -> bool) {
    tokio::time::timeout(STEP, seen.wait_for(|seen| done(seen)))
        .await
        .unwrap_or_else(|_| panic!("rust: {what} within {STEP:?}"))
        .expect("the event log ended");
}

/// Messages `py-0`… (and the big one after the first `COUNT`) arrived once, in order.
fn assert_from_python(got: &[Bytes], count: usize) {
    let expected = expected_messages("py", count);
    let got: Vec<&[u8]> = got.iter().map(AsRef::as_ref).collect();
    assert_eq!(got.len(), expected.len(), "messages from Python");
    for (at, (got, want)) in got.iter().zip(&expected).enumerate() {
        assert_eq!(got, &want.as_slice(), "message {at} from Python, in order");
    }
}

fn expected_messages(prefix: &str, count: usize) -> Vec<Vec<u8>> {
    let mut all: Vec<Vec<u8>> = (0..count).map(|i| format!("{prefix}-{i}").into_bytes()).collect();
    all.insert(COUNT.min(count), big_message());
    all
}

/// Rust sends `rs-<i>` for `range`.
async fn rust_sends(client: &Client, to: &str, range: std::ops::Range<usize>) {
    for i in range {
        client.send(to, format!("rs-{i}")).await.unwrap();
    }
}

async fn interop(rust_opens: bool) {
    let Some(python) = python() else { return };
    let dir = tempfile::tempdir().unwrap();
    let Some((synapse, running)) = common::with_synapse(&common::sqlite_url(dir.path()), None).await else {
        return;
    };
    let alice = synapse.register_raiden(CAPS).await; // Rust
    let bob = synapse.register_raiden(CAPS).await; // Python
    let switchboard = format!("http://{}", running.client);
    let token_file = dir.path().join("bob.token");
    std::fs::write(&token_file, &bob.user.access_token).unwrap();
    let mut config = ClientConfig::new(synapse.base_url.parse().unwrap(), alice.user.access_token.clone());
    config.switchboard = Some(switchboard.parse().unwrap());
    config.relay_only = true;
    let (a, events) = tokio::time::timeout(STEP, Client::connect(config)).await.unwrap().unwrap();
    let mut a_seen = log(events);
    let mut py = PyPeer::start(&python, &synapse.base_url, &switchboard, &token_file);
    wait(&mut a_seen, "on Switchboard", |seen| seen.switchboard == [true]).await;
    py.wait("on Switchboard", |seen| seen.switchboard == [true]).await;

    let started = Instant::now();
    if rust_opens {
        a.open(&bob.address).await.unwrap();
    } else {
        py.command(&format!("open {}", alice.address)).await;
    }
    wait(&mut a_seen, "channel up", |seen| !seen.ups.is_empty()).await;
    py.wait("channel up", |seen| !seen.ups.is_empty()).await;
    println!("channel up after {:?} (rust opens: {rust_opens})", started.elapsed());
    assert_eq!(a_seen.borrow().ups[0], Path::Relay);
    assert_eq!(py.seen.borrow().ups[0], "relay");

    // Both ways over the channel, a three-fragment binary message each way after the first COUNT.
    rust_sends(&a, &bob.address, 0..COUNT).await;
    a.send(&bob.address, big_message()).await.unwrap();
    py.command(&format!("send {} 0 {COUNT}", alice.address)).await;
    py.command(&format!("sendbin {} {BIG}", alice.address)).await;
    wait(&mut a_seen, "Python's messages", |seen| seen.messages.len() > COUNT).await;
    py.wait("Rust's messages", |seen| seen.messages.len() > COUNT).await;
    let frames = a.stats(&bob.address).await.unwrap().unwrap().dc_data_frames;
    assert!(frames >= u64::try_from(COUNT).unwrap(), "the channel carried them: {frames} DATA frames");

    // The Rust side cuts the channel; the next messages go through Matrix, then both upgrade again.
    a.reset_channel(&bob.address).await.unwrap();
    rust_sends(&a, &bob.address, COUNT..2 * COUNT).await;
    py.command(&format!("send {} {COUNT} {COUNT}", alice.address)).await;
    wait(&mut a_seen, "Python's messages after the cut", |seen| seen.messages.len() > 2 * COUNT).await;
    py.wait("Rust's messages after the cut", |seen| seen.messages.len() > 2 * COUNT).await;
    let stats = a.stats(&bob.address).await.unwrap().unwrap();
    println!("rust figures after the cut: {stats:?}");
    assert!(stats.matrix_lines > 0, "some went through Matrix: {stats:?}");
    wait(&mut a_seen, "second channel", |seen| seen.ups.len() >= 2).await;
    py.wait("second channel", |seen| seen.ups.len() >= 2).await;
    println!("upgraded again after {:?}", started.elapsed());

    let frames = a.stats(&bob.address).await.unwrap().unwrap().dc_data_frames;
    rust_sends(&a, &bob.address, 2 * COUNT..3 * COUNT).await;
    py.command(&format!("send {} {} {COUNT}", alice.address, 2 * COUNT)).await;
    wait(&mut a_seen, "all of Python's messages", |seen| seen.messages.len() > 3 * COUNT).await;
    py.wait("all of Rust's messages", |seen| seen.messages.len() > 3 * COUNT).await;
    let stats = a.stats(&bob.address).await.unwrap().unwrap();
    // The new channel carried them (all of them unless it stalled for 2 s under load, when the
    // delivery layer sends through Matrix meanwhile, as it should).
    assert!(stats.dc_data_frames > frames, "the new channel carried messages: {stats:?}");
    println!("rust figures at the end: {stats:?}");

    assert_from_python(&a_seen.borrow().messages, 3 * COUNT);
    let expected = expected_messages("rs", 3 * COUNT);
    assert_eq!(py.seen.borrow().messages, expected, "Rust's messages once, in order");

    py.quit().await;
    a.shutdown().await;
    running.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_opens_to_python_through_the_relay_and_both_survive_a_cut() {
    interop(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_opens_to_rust_through_the_relay_and_both_survive_a_cut() {
    interop(false).await;
}

/// The Python peer CLI (`python -m switchboard_client peer`) `--json` report.
async fn python_peer(python: &std::path::Path, args: &[&str]) -> serde_json::Value {
    let output = tokio::time::timeout(
        STEP * 2,
        Command::new(python)
            .args(["-m", "switchboard_client", "peer"])
            .args(args)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the Python peer ended in time")
    .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!(
        "python peer {}:\n{stderr}",
        args.iter().find(|a| a.starts_with("--l") || a.starts_with("--t")).unwrap()
    );
    assert!(output.status.success(), "the Python peer succeeded: {stderr}");
    let stdout = String::from_utf8_lossy(&output.stdout);
    serde_json::from_str(stdout.lines().last().expect("a JSON line")).expect("the JSON report")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_peer_cli_and_rust_peer_echo_each_other_through_the_relay() {
    use switchboard::client::peer::{Mode, PeerOptions, run};
    let Some(python) = python() else { return };
    let dir = tempfile::tempdir().unwrap();
    let Some((synapse, running)) = common::with_synapse(&common::sqlite_url(dir.path()), None).await else {
        return;
    };
    let switchboard = format!("http://{}", running.client);
    let count = 20;
    for python_listens in [true, false] {
        let rust = synapse.register_raiden(CAPS).await;
        let py = synapse.register_raiden(CAPS).await;
        let token_file = dir.path().join("py.token");
        std::fs::write(&token_file, &py.user.access_token).unwrap();
        let mut config = ClientConfig::new(synapse.base_url.parse().unwrap(), rust.user.access_token.clone());
        config.switchboard = Some(switchboard.parse().unwrap());
        config.relay_only = true;
        let mode = if python_listens { Mode::To(py.address.clone()) } else { Mode::Listen };
        let options = PeerOptions { mode, count, size: 3200, timeout: STEP };
        let rust_peer =
            tokio::spawn(async move { run(config, &options, |line| println!("rust peer: {line}")).await });
        let count_arg = count.to_string();
        let mut args = vec![
            "--homeserver",
            &synapse.base_url,
            "--access-token-file",
            token_file.to_str().unwrap(),
            "--switchboard",
            &switchboard,
            "--relay-only",
            "--json",
            "--count",
            &count_arg,
            "--timeout",
            "60",
        ];
        args.extend(if python_listens { ["--listen", ""] } else { ["--to", &rust.address] });
        args.retain(|arg| !arg.is_empty());
        let py_report = python_peer(&python, &args).await;
        let rust_report = rust_peer.await.unwrap().map_err(|(error, _)| error.to_string()).unwrap();
        println!("python: {py_report}\nrust: {rust_report:?}");
        assert_eq!(py_report["path"], "relay");
        assert_eq!(rust_report.path, "relay");
        if python_listens {
            assert_eq!((py_report["received"].as_u64(), py_report["sent"].as_u64()), (Some(20), Some(20)));
            assert_eq!(rust_report.acknowledged, count);
        } else {
            assert_eq!(py_report["acknowledged"].as_u64(), Some(20));
            assert!(
                py_report["upgrade_ms"].as_f64().is_some() && py_report["rtt_ms"]["p50"].as_f64().is_some()
            );
            assert_eq!(rust_report.sent, count);
        }
    }
    running.stop().await.unwrap();
}

/// Both sides `open` at the same moment: the broker's glare rule keeps one call, and the pair ends
/// with one channel, which carries messages both ways once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_and_python_opening_at_once_end_with_one_channel() {
    let Some(python) = python() else { return };
    let dir = tempfile::tempdir().unwrap();
    let Some((synapse, running)) = common::with_synapse(&common::sqlite_url(dir.path()), None).await else {
        return;
    };
    let alice = synapse.register_raiden(CAPS).await; // Rust
    let bob = synapse.register_raiden(CAPS).await; // Python
    let switchboard = format!("http://{}", running.client);
    let token_file = dir.path().join("bob.token");
    std::fs::write(&token_file, &bob.user.access_token).unwrap();
    let mut config = ClientConfig::new(synapse.base_url.parse().unwrap(), alice.user.access_token.clone());
    config.switchboard = Some(switchboard.parse().unwrap());
    config.relay_only = true;
    let (a, events) = tokio::time::timeout(STEP, Client::connect(config)).await.unwrap().unwrap();
    let mut a_seen = log(events);
    let mut py = PyPeer::start(&python, &synapse.base_url, &switchboard, &token_file);
    wait(&mut a_seen, "on Switchboard", |seen| seen.switchboard == [true]).await;
    py.wait("on Switchboard", |seen| seen.switchboard == [true]).await;

    // Both open at once: the Python command is written before the Rust call is made.
    let open_alice = format!("open {}", alice.address);
    let ((), opened) = tokio::join!(py.command(&open_alice), a.open(&bob.address));
    opened.unwrap();
    wait(&mut a_seen, "channel up", |seen| !seen.ups.is_empty()).await;
    py.wait("channel up", |seen| !seen.ups.is_empty()).await;

    rust_sends(&a, &bob.address, 0..COUNT).await;
    py.command(&format!("send {} 0 {COUNT}", alice.address)).await;
    wait(&mut a_seen, "Python's messages", |seen| seen.messages.len() >= COUNT).await;
    py.wait("Rust's messages", |seen| seen.messages.len() >= COUNT).await;
    // One channel on each side. Normally the losing call never comes up (1 up, 0 down); a channel
    // given up under load (a write stalled for 5 s) is followed by a new one, so what is checked is
    // the end: one channel up on each side.
    let (rust_ups, rust_downs) = (a_seen.borrow().ups.len(), a_seen.borrow().downs);
    let (python_ups, python_downs) = (py.seen.borrow().ups.len(), py.seen.borrow().downs);
    println!("rust: {rust_ups} up, {rust_downs} down; python: {python_ups} up, {python_downs} down");
    assert_eq!(rust_ups, rust_downs + 1, "rust: one channel up");
    assert_eq!(python_ups, python_downs + 1, "python: one channel up");
    let stats = a.stats(&bob.address).await.unwrap().unwrap();
    // The channel carried them (all of them unless it stalled under load, when the delivery layer
    // sends through Matrix meanwhile, as it should).
    assert!(stats.dc_data_frames > 0, "the channel carried messages: {stats:?}");
    let got: Vec<Vec<u8>> = a_seen.borrow().messages.iter().map(|b| b.to_vec()).collect();
    let want =
        |prefix: &str| -> Vec<Vec<u8>> { (0..COUNT).map(|i| format!("{prefix}-{i}").into_bytes()).collect() };
    assert_eq!(got, want("py"), "Python's messages once, in order");
    assert_eq!(py.seen.borrow().messages, want("rs"), "Rust's messages once, in order");

    py.quit().await;
    a.shutdown().await;
    running.stop().await.unwrap();
}
