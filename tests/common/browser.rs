//! The browser client in Debian's Chromium for the interop tests: `tests/browser/drive.mjs`
//! (playwright-core) opens the demo page Switchboard serves and runs the commands it reads on stdin;
//! what happens comes back as JSON lines.

use std::path::{Path as FsPath, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::watch;

/// How long any one step may take.
const STEP: Duration = Duration::from_secs(60);

/// Waits until `done` holds for what `rx` holds, at most [`STEP`].
pub async fn wait<T>(rx: &mut watch::Receiver<T>, what: &str, done: impl FnMut(&T) -> bool) {
    tokio::time::timeout(STEP, rx.wait_for(done))
        .await
        .unwrap_or_else(|_| panic!("{what} within {STEP:?}"))
        .expect("the log ended");
}

/// Message `i` of drive.mjs's `send`: `b<i>:` and 60 `x`; number 50 is 40,002 bytes of two-byte
/// characters (three fragments, cut at characters).
pub fn message(i: usize) -> Vec<u8> {
    let body = if i == 50 { "é".repeat(20_000) } else { "x".repeat(60) };
    format!("b{i}:{body}").into_bytes()
}

/// drive.mjs's checksum of a message.
pub fn checksum(bytes: &[u8]) -> u64 {
    bytes.iter().fold(7u32, |acc, &b| acc.wrapping_mul(31).wrapping_add(u32::from(b))).into()
}

/// Where playwright-core is, or why the browser tests cannot run here.
pub fn browser_tools() -> Result<PathBuf, String> {
    let modules = std::env::var_os("SWITCHBOARD_TEST_BROWSER_MODULES")
        .map_or_else(|| super::repo_root().join("tests/browser/node_modules"), PathBuf::from);
    if !FsPath::new("/usr/bin/chromium").exists() {
        return Err("no /usr/bin/chromium (deploy/prerequisites --tests)".to_owned());
    }
    if !modules.join("playwright-core/package.json").exists() {
        return Err(format!("no playwright-core in {} (tests/browser-tools)", modules.display()));
    }
    if std::process::Command::new("node").arg("--version").output().is_err() {
        return Err("no node".to_owned());
    }
    Ok(modules)
}

/// The browser: drive.mjs, its commands on stdin and its JSON lines on stdout.
pub struct Browser {
    child: Child,
    stdin: ChildStdin,
    pub lines: watch::Receiver<Vec<Value>>,
    _profile: tempfile::TempDir,
}

impl Browser {
    pub async fn launch(page: &str, modules: &FsPath) -> Browser {
        let profile = tempfile::tempdir().unwrap();
        let mut child = Command::new("node")
            .arg(super::repo_root().join("tests/browser/drive.mjs"))
            .arg(page)
            .arg(profile.path())
            .env("SWITCHBOARD_TEST_BROWSER_MODULES", modules)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("node runs");
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = watch::channel(Vec::new());
        tokio::spawn(async move {
            let mut reader = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                let value: Value =
                    serde_json::from_str(&line).unwrap_or_else(|_| json!({"ev": "raw", "line": line}));
                // The page's errors and its own log lines (calls that ended, frames dropped).
                if matches!(value["ev"].as_str(), Some("pageerror" | "failed" | "raw" | "console")) {
                    eprintln!("browser: {line}");
                }
                tx.send_modify(|lines| lines.push(value));
            }
        });
        let mut browser = Browser { child, stdin, lines, _profile: profile };
        browser.until("the page loaded", |ev| ev["ev"] == "loaded").await;
        browser
    }

    /// Runs a command and returns its answer.
    pub async fn run(&mut self, command: Value) -> Value {
        let name = command["cmd"].as_str().unwrap().to_owned();
        let before = self.lines.borrow().len();
        let mut line = command.to_string();
        line.push('\n');
        self.stdin.write_all(line.as_bytes()).await.unwrap();
        let what = format!("the browser's {name}");
        wait(&mut self.lines, &what, |lines| {
            lines[before..].iter().any(|ev| ev["cmd"] == name.as_str() && ev["ev"] != "raw")
        })
        .await;
        let answer =
            self.lines.borrow()[before..].iter().find(|ev| ev["cmd"] == name.as_str()).cloned().unwrap();
        assert_eq!(answer["ev"], "done", "{name}: {answer}");
        answer
    }

    pub async fn until(&mut self, what: &str, mut check: impl FnMut(&Value) -> bool) {
        wait(&mut self.lines, what, |lines| lines.iter().any(&mut check)).await;
    }

    pub fn events(&self, ev: &str) -> Vec<Value> {
        self.lines.borrow().iter().filter(|line| line["ev"] == ev).cloned().collect()
    }

    pub async fn quit(mut self) {
        let _ = self.stdin.write_all(b"{\"cmd\":\"quit\"}\n").await;
        let _ = tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await;
    }
}
