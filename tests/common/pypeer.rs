//! The Python client (`clients/python`) as a child process for the interop tests:
//! `clients/python/tests/driven_peer.py`, driven line by line on stdin, its events as JSON lines.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use base64::Engine as _;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::watch;

/// How long any one step may take.
const STEP: Duration = Duration::from_secs(60);

/// The test venv's Python with the package and aiortc, or `None` (skipped, or failed when every
/// piece is required).
pub fn python() -> Option<PathBuf> {
    let python = std::env::var_os("SWITCHBOARD_TEST_PYTHON")
        .map_or_else(|| super::repo_root().join(".cache/test-venv/bin/python"), PathBuf::from);
    let ok = std::process::Command::new(&python)
        .args(["-c", "import switchboard_client, aiortc, aiohttp, pytest"])
        .output()
        .is_ok_and(|out| out.status.success());
    if ok {
        Some(python)
    } else {
        super::skip("no Python with switchboard_client and aiortc (run tests/python-tools)");
        None
    }
}

/// What the Python client said so far (its JSON lines).
#[derive(Default)]
pub struct PySeen {
    pub ready: bool,
    pub switchboard: Vec<bool>,
    pub ups: Vec<String>,
    pub downs: usize,
    pub messages: Vec<Vec<u8>>,
    pub done: usize,
    /// The last `stats` answer: (Matrix lines sent, DATA frames sent).
    pub stats: Option<(u64, u64)>,
    /// Every other line (the benchmark's `pingpong`, `oneway` and `paid` answers).
    pub other: Vec<serde_json::Value>,
}

/// The Python client as a child process driven through stdin, its events in a watch channel.
pub struct PyPeer {
    child: Child,
    stdin: ChildStdin,
    pub seen: watch::Receiver<PySeen>,
}

impl PyPeer {
    pub fn start(
        python: &std::path::Path,
        homeserver: &str,
        switchboard: &str,
        token_file: &std::path::Path,
    ) -> Self {
        let mut child = Command::new(python)
            .arg(super::repo_root().join("clients/python/tests/driven_peer.py"))
            .args([homeserver, switchboard])
            .arg(token_file)
            .arg("--relay-only")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let (tx, seen) = watch::channel(PySeen::default());
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                let event: serde_json::Value = serde_json::from_str(&line).expect("a JSON line");
                tx.send_modify(|seen| match event["event"].as_str() {
                    Some("ready") => seen.ready = true,
                    Some("switchboard") => seen.switchboard.push(event["connected"].as_bool().unwrap()),
                    Some("up") => seen.ups.push(event["path"].as_str().unwrap().to_owned()),
                    Some("down") => {
                        println!("python: channel down: {}", event["reason"]);
                        seen.downs += 1;
                    }
                    Some("done") => seen.done += 1,
                    Some("stats") => {
                        seen.stats = Some((
                            event["matrix_lines"].as_u64().unwrap(),
                            event["dc_data_frames"].as_u64().unwrap(),
                        ));
                    }
                    Some("message") => seen.messages.push(
                        base64::engine::general_purpose::STANDARD
                            .decode(event["b64"].as_str().unwrap())
                            .unwrap(),
                    ),
                    _ => seen.other.push(event.clone()),
                });
            }
        });
        Self { child, stdin, seen }
    }

    /// Sends a command and waits until the Python side has carried it out.
    pub async fn command(&mut self, line: &str) {
        let before = self.seen.borrow().done;
        self.stdin.write_all(format!("{line}\n").as_bytes()).await.unwrap();
        self.stdin.flush().await.unwrap();
        self.wait(line, |seen| seen.done > before).await;
    }

    /// The Python side's figures towards `address`: (Matrix lines sent, DATA frames sent).
    pub async fn stats(&mut self, address: &str) -> (u64, u64) {
        self.command(&format!("stats {address}")).await;
        self.seen.borrow().stats.expect("a stats line before done")
    }

    /// Stops the Python client (it answers nothing to `quit`).
    pub async fn quit(mut self) {
        self.stdin.write_all(b"quit\n").await.unwrap();
        self.stdin.flush().await.unwrap();
        let status = tokio::time::timeout(Duration::from_secs(15), self.child.wait()).await;
        assert!(
            status.is_ok_and(|status| status.is_ok_and(|s| s.success())),
            "the Python client exited cleanly"
        );
    }

    pub async fn wait(&mut self, what: &str, mut done: impl FnMut(&PySeen) -> bool) {
        tokio::time::timeout(STEP, self.seen.wait_for(|seen| done(seen)))
            .await
            .unwrap_or_else(|_| panic!("python: {what} within {STEP:?}"))
            .expect("the Python client's output ended");
    }
}
