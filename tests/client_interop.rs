//! The browser client and the Python client with each other (the pairs with the Rust client are in
//! client_browser.rs and client_python.rs), against a real Synapse and Switchboard with its embedded
//! TURN relay, relay-only: each side opens in turn; messages both ways over the channel, exactly
//! once and in order (a three-fragment message among them); the channel cut by the side that did
//! not open, the messages going on through Matrix; the upgrade again. And both opening at once (the
//! broker's glare rule) ends with one channel.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::browser::{Browser, browser_tools, checksum, wait};
use common::pypeer::{PyPeer, python};
use serde_json::json;

const CAPS: &str = "webRTC=1&toDevice=1&switchboard=1";
/// Messages each way per phase.
const COUNT: usize = 100;

/// The Python side's message `i` (driven_peer.py's `send`).
fn python_message(i: usize) -> Vec<u8> {
    format!("py-{i}").into_bytes()
}

/// A Python client (alice) and a browser (bob), both on Switchboard, bob watching alice.
struct Pair {
    synapse: common::Synapse,
    running: common::Running,
    alice: common::raiden::Raiden,
    bob: common::raiden::Raiden,
    py: PyPeer,
    browser: Browser,
    _dir: tempfile::TempDir,
}

async fn pair() -> Option<Pair> {
    let modules = match browser_tools() {
        Ok(modules) => modules,
        Err(why) => {
            common::skip(&why);
            return None;
        }
    };
    let python: PathBuf = python()?;
    let dir = tempfile::tempdir().unwrap();
    let (synapse, running) = common::with_synapse(&common::sqlite_url(dir.path()), None).await?;
    let alice = synapse.register_raiden(CAPS).await;
    let bob = synapse.register_raiden(CAPS).await;
    let switchboard = format!("http://{}", running.client);
    let token_file = dir.path().join("alice.token");
    std::fs::write(&token_file, &alice.user.access_token).unwrap();
    let mut py = PyPeer::start(&python, &synapse.base_url, &switchboard, &token_file);
    let mut browser =
        Browser::launch(&format!("{switchboard}/_switchboard/client/v1/demo.html"), &modules).await;
    let options = json!({
        "homeserver": synapse.base_url, "accessToken": bob.user.access_token,
        "switchboard": switchboard, "relayOnly": true,
        "upgradeBackoff": {"initial": 500, "max": 2000},
    });
    browser.run(json!({"cmd": "start", "options": options, "watch": [alice.address]})).await;
    py.wait("on Switchboard", |seen| seen.switchboard == [true]).await;
    browser
        .until("the browser on Switchboard", |ev| ev["ev"] == "switchboard" && ev["connected"] == true)
        .await;
    browser
        .until("alice's presence", |ev| {
            ev["ev"] == "presence"
                && ev["address"].as_str().is_some_and(|a| a.eq_ignore_ascii_case(&alice.address))
        })
        .await;
    Some(Pair { synapse, running, alice, bob, py, browser, _dir: dir })
}

impl Pair {
    /// Messages `from..from + COUNT` each way, then until each side has `total` from the other.
    async fn exchange(&mut self, from: usize, total: usize) {
        let (alice, bob) = (self.alice.address.clone(), self.bob.address.clone());
        self.py.command(&format!("send {bob} {from} {COUNT}")).await;
        self.browser.run(json!({"cmd": "send", "address": alice, "from": from, "count": COUNT})).await;
        self.py.wait("the browser's messages", |seen| seen.messages.len() >= total).await;
        wait(&mut self.browser.lines, "the Python side's messages", |lines| {
            lines.iter().filter(|ev| ev["ev"] == "message").count() >= total
        })
        .await;
    }

    fn browser_ups(&self) -> usize {
        self.browser.events("channelup").len()
    }

    /// Every message reached the other side once, in order, intact.
    fn assert_all_once_in_order(&self, total: usize) {
        let want: Vec<Vec<u8>> = (0..total).map(common::browser::message).collect();
        assert_eq!(self.py.seen.borrow().messages, want, "the browser's messages at the Python side");
        let got = self.browser.events("message");
        assert_eq!(got.len(), total, "messages in the browser");
        for (i, message) in got.iter().enumerate() {
            let expected = python_message(i);
            assert_eq!(message["len"], expected.len(), "message {i}: {message}");
            assert_eq!(message["sum"], checksum(&expected), "message {i} intact and in order: {message}");
        }
    }

    async fn stop(self) {
        self.browser.quit().await;
        self.py.quit().await;
        self.running.stop().await.unwrap();
        drop(self.synapse);
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Opener {
    Browser,
    Python,
}

async fn upgrade_cut_and_upgrade_again(opener: Opener) {
    let Some(mut p) = pair().await else { return };
    let (alice, bob) = (p.alice.address.clone(), p.bob.address.clone());
    let started = Instant::now();
    match opener {
        Opener::Browser => {
            p.browser.run(json!({"cmd": "open", "address": alice})).await;
        }
        Opener::Python => p.py.command(&format!("open {bob}")).await,
    }
    p.py.wait("channel up", |seen| !seen.ups.is_empty()).await;
    p.browser.until("the browser's channel up", |ev| ev["ev"] == "channelup").await;
    println!("{opener:?} opens: channel up after {:?}", started.elapsed());
    assert_eq!(p.py.seen.borrow().ups[0], "relay");
    assert_eq!(p.browser.events("channelup")[0]["path"], "relay");

    p.exchange(0, COUNT).await;
    let (matrix_before, frames) = p.py.stats(&bob).await;
    assert!(frames >= COUNT as u64, "the channel carried the Python side's messages: {frames} DATA frames");

    // The side that did not open cuts the channel; messages go on, through Matrix until the opener
    // has called again.
    match opener {
        Opener::Browser => p.py.command(&format!("reset {bob}")).await,
        Opener::Python => {
            p.browser.run(json!({"cmd": "reset", "address": alice})).await;
        }
    }
    p.exchange(COUNT, 2 * COUNT).await;
    p.py.wait("the Python side's channel down", |seen| seen.downs >= 1).await;
    p.browser.until("the browser's channel down", |ev| ev["ev"] == "channeldown").await;
    let (matrix_after, _) = p.py.stats(&bob).await;
    println!("across the cut: {} Python lines went through Matrix", matrix_after - matrix_before);
    assert!(matrix_after > matrix_before, "Matrix carried messages across the cut");

    p.py.wait("the second channel", |seen| seen.ups.len() >= 2).await;
    wait(&mut p.browser.lines, "the browser's second channel", |lines| {
        lines.iter().filter(|ev| ev["ev"] == "channelup").count() >= 2
    })
    .await;
    println!("upgraded again after {:?}", started.elapsed());
    let (_, frames_before) = p.py.stats(&bob).await;
    p.exchange(2 * COUNT, 3 * COUNT).await;
    let (_, frames_after) = p.py.stats(&bob).await;
    assert!(frames_after > frames_before, "the new channel carried messages");
    // Settle: nothing arrives twice, late.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    p.assert_all_once_in_order(3 * COUNT);
    assert_eq!(p.py.seen.borrow().ups, ["relay", "relay"]);
    assert_eq!(p.browser_ups(), 2);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_browser_opens_to_python_through_the_relay_and_both_survive_a_cut() {
    upgrade_cut_and_upgrade_again(Opener::Browser).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_opens_to_the_browser_through_the_relay_and_both_survive_a_cut() {
    upgrade_cut_and_upgrade_again(Opener::Python).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_browser_and_python_opening_at_once_end_with_one_channel() {
    let Some(mut p) = pair().await else { return };
    let (alice, bob) = (p.alice.address.clone(), p.bob.address.clone());
    let python_opens = format!("open {bob}");
    let browser_opens = p.browser.run(json!({"cmd": "open", "address": alice}));
    let ((), _) = tokio::join!(p.py.command(&python_opens), browser_opens);
    p.py.wait("channel up", |seen| !seen.ups.is_empty()).await;
    p.browser.until("the browser's channel up", |ev| ev["ev"] == "channelup").await;
    p.exchange(0, COUNT).await;
    let (python_ups, python_downs) = (p.py.seen.borrow().ups.len(), p.py.seen.borrow().downs);
    let (browser_ups, browser_downs) = (p.browser_ups(), p.browser.events("channeldown").len());
    println!("python: {python_ups} up, {python_downs} down; browser: {browser_ups} up, {browser_downs} down");
    assert_eq!(python_ups, python_downs + 1, "python: one channel up");
    assert_eq!(browser_ups, browser_downs + 1, "browser: one channel up");
    // The channel carried them (all of them unless it stalled under load: then Matrix meanwhile).
    let (_, frames) = p.py.stats(&bob).await;
    assert!(frames > 0, "the channel carried messages: {frames} DATA frames");
    p.assert_all_once_in_order(COUNT);
    p.stop().await;
}
