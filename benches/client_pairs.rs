//! The three clients against each other: for every ordered pair of {Rust, Python, browser}, the
//! sender's upgrade time and the round-trip time of Raiden-shaped messages through the embedded
//! TURN relay, in one run.
//!
//! - One real Synapse and the release `switchboard serve` (SQLite, the embedded relay on loopback,
//!   `bandwidth_bytes_per_sec = 0` as in the client bench).
//! - The listener echoes every message (`switchboard peer --listen`, `python -m switchboard_client
//!   peer --listen`, or Chromium running the module with drive.mjs's `echo`); the sender opens a
//!   relay-only channel to it and sends `SWITCHBOARD_BENCH_PAIR_MESSAGES` (default 200) messages of
//!   3,200 bytes one at a time, each timed until its echo (`switchboard peer --to … --json`, the
//!   Python peer's twin, or drive.mjs's `pingpong`, which build the same messages). Every pair has
//!   two fresh Raiden users; the sender starts once Switchboard's discovery shows the listener
//!   reachable.
//! - Upgrade: from the sender's `open` to its channel up (the CLIs time it from the call, once on
//!   Switchboard; the browser from `open`).
//!
//! Run: `cargo bench --bench client_pairs` (after tests/run: Synapse's venv, the test venv with the
//! Python client, Chromium and playwright-core). Kinds that cannot run here are left out with a line.

// Milliseconds far below 2^52.
#![allow(clippy::cast_precision_loss)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use common::browser::{Browser, browser_tools};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

const CAPS: &str = "webRTC=1&toDevice=1&switchboard=1";
const SIZE: usize = 3_200;
/// Longest wait for a listener to be on Switchboard, or for a sender's whole run.
const WAIT: Duration = Duration::from_secs(120);

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Rust,
    Python,
    Browser,
}

/// What the stack and the tools are.
struct Env {
    homeserver: String,
    switchboard: String,
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

    /// `peer` of the Rust binary or the Python package, with the common options.
    fn cli(&self, kind: Kind, token_file: &Path) -> Command {
        let mut command = if kind == Kind::Rust {
            Command::new(env!("CARGO_BIN_EXE_switchboard"))
        } else {
            let mut command = Command::new(self.python.as_ref().unwrap());
            command.args(["-m", "switchboard_client"]);
            command
        };
        command
            .arg("peer")
            .args(["--homeserver", &self.homeserver, "--switchboard", &self.switchboard])
            .arg("--access-token-file")
            .arg(token_file)
            .arg("--relay-only")
            .kill_on_drop(true);
        command
    }

    async fn browser(&self, token: &str) -> Browser {
        let page = format!("{}/_switchboard/client/v1/demo.html", self.switchboard);
        let mut browser = Browser::launch(&page, self.browser.as_ref().unwrap()).await;
        let options = json!({
            "homeserver": self.homeserver, "accessToken": token,
            "switchboard": self.switchboard, "relayOnly": true,
        });
        // `quiet`: message events are not reported to Node one by one (the echo path stays in the page).
        browser.run(json!({"cmd": "start", "options": options, "watch": [], "quiet": true})).await;
        browser
            .until("the browser on Switchboard", |ev| ev["ev"] == "switchboard" && ev["connected"] == true)
            .await;
        browser
    }
}

/// A listener that echoes: a CLI process (on Switchboard once it said so on stderr) or a browser.
enum Listener {
    Cli(Child),
    Browser(Browser),
}

async fn listen(env: &Env, kind: Kind, token: &str, token_file: &Path) -> Listener {
    if kind == Kind::Browser {
        let mut browser = env.browser(token).await;
        browser.run(json!({"cmd": "echo"})).await;
        return Listener::Browser(browser);
    }
    let mut child = env
        .cli(kind, token_file)
        .args(["--listen", "--timeout", "0"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The CLIs say what happens on stderr.
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    tokio::time::timeout(WAIT, async {
        while let Ok(Some(line)) = lines.next_line().await {
            if line.contains("Switchboard connected") {
                return;
            }
        }
        panic!("the {kind:?} listener ended before Switchboard connected");
    })
    .await
    .expect("the listener on Switchboard");
    // Keep reading its lines so that it never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Listener::Cli(child)
}

/// The sender's report: `{"path", "upgrade_ms", "rtt_ms": {"p50", "p99"}, …}`.
async fn send(env: &Env, kind: Kind, token: &str, token_file: &Path, to: &str, count: usize) -> Value {
    if kind == Kind::Browser {
        let mut browser = env.browser(token).await;
        let answer =
            browser.run(json!({"cmd": "pingpong", "address": to, "count": count, "size": SIZE})).await;
        browser.quit().await;
        return answer;
    }
    let output = tokio::time::timeout(
        WAIT,
        env.cli(kind, token_file)
            .args(["--to", to, "--count", &count.to_string(), "--size", &SIZE.to_string(), "--json"])
            .args(["--timeout", "60"])
            .output(),
    )
    .await
    .expect("the sender within its time")
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{kind:?} sender: {stdout}{}", String::from_utf8_lossy(&output.stderr));
    serde_json::from_str(stdout.lines().last().unwrap_or_default()).expect("the --json line")
}

/// Waits (at most 30 s) until Switchboard's discovery says `address` is reachable, as a client
/// watching it would see: a user that has just registered and connected may not be yet (its
/// profile is being verified), and a call to it then goes through Matrix.
async fn reachable(env: &Env, token: &str, address: &str) {
    let url = format!("{}/_switchboard/client/v1/peers/{address}", env.switchboard);
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

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    runtime.block_on(run());
}

async fn run() {
    let count =
        std::env::var("SWITCHBOARD_BENCH_PAIR_MESSAGES").ok().and_then(|v| v.parse().ok()).unwrap_or(200);
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
    let env = Env {
        homeserver: synapse.base_url.clone(),
        switchboard: format!("http://127.0.0.1:{}", switchboard.ports[1]),
        python,
        browser,
        dir,
    };
    let kinds = [Kind::Rust, Kind::Python, Kind::Browser];
    let mut rows = Vec::new();
    for sender in kinds {
        for listener in kinds {
            if !env.available(sender) || !env.available(listener) {
                continue;
            }
            println!("{sender:?} → {listener:?}…");
            let from = synapse.register_raiden(CAPS).await;
            let to = synapse.register_raiden(CAPS).await;
            let from_file = env.dir.path().join(format!("{}.token", from.address));
            let to_file = env.dir.path().join(format!("{}.token", to.address));
            std::fs::write(&from_file, &from.user.access_token).unwrap();
            std::fs::write(&to_file, &to.user.access_token).unwrap();
            let echo = listen(&env, listener, &to.user.access_token, &to_file).await;
            reachable(&env, &from.user.access_token, &to.address).await;
            let report = send(&env, sender, &from.user.access_token, &from_file, &to.address, count).await;
            match echo {
                Listener::Cli(mut child) => {
                    let _ = child.kill().await;
                }
                Listener::Browser(browser) => browser.quit().await,
            }
            println!("  {report}");
            rows.push((sender, listener, report));
        }
    }

    println!("\n## Round trip through the relay, {count} messages of {SIZE} B, one at a time (ms)\n");
    println!("| sender → listener | path | upgrade | RTT p50 | RTT p99 |\n|---|---|---:|---:|---:|");
    for (sender, listener, report) in &rows {
        let number = |v: &Value| v.as_f64().map_or_else(|| "–".to_owned(), |v| format!("{v:.2}"));
        println!(
            "| {sender:?} → {listener:?} | {} | {} | {} | {} |",
            report["path"].as_str().unwrap_or("–"),
            number(&report["upgrade_ms"]),
            number(&report["rtt_ms"]["p50"]),
            number(&report["rtt_ms"]["p99"]),
        );
    }
    drop((synapse, switchboard));
}
