//! Test harness shared by the integration tests: in-process Switchboard on port 0, fresh databases on
//! both backends, and a real Synapse on a free loopback port.
//!
//! Tests that need PostgreSQL or Synapse skip (with a message) when those are not installed, unless
//! `SWITCHBOARD_TEST_REQUIRE_ALL` is set, as `tests/run` does: then a missing piece fails the test.

// Each test binary uses part of the harness; `User::user_id` mirrors the Matrix field name.
#![allow(dead_code, clippy::struct_field_names)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

pub mod browser;
pub mod netns;
pub mod pypeer;
pub mod raiden;
pub mod turn_client;
pub mod ws;

use serde_json::{Value, json};
use switchboard::config::Config;
use switchboard::{Listeners, RunError};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub const AS_TOKEN: &str = "test-as-token-aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
pub const HS_TOKEN: &str = "test-hs-token-hhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhh";
pub const TURN_SECRET: &str = "test-turn-secret-tttttttttttttttttttttttttttttttttttttttt";
pub const SERVER_NAME: &str = "localhost";

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn require_all() -> bool {
    std::env::var_os("SWITCHBOARD_TEST_REQUIRE_ALL").is_some()
}

/// Says why a test cannot run here; fails it when every piece is required.
pub fn skip(why: &str) {
    assert!(!require_all(), "required but unavailable: {why}");
    eprintln!("SKIPPED: {why}");
}

/// A configuration for tests: loopback listeners on port 0, the given database and homeserver.
pub fn config(database_url: &str, homeserver_url: &str) -> Config {
    Config::from_toml_str(&config_toml(database_url, homeserver_url, [0, 0, 0]))
        .expect("test config is valid")
}

/// A manual clock starting at the wall time (TURN credentials and Matrix data carry wall-clock
/// times), for tests that step it.
pub fn stepped_clock() -> switchboard::clock::Clock {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis();
    switchboard::clock::Clock::manual(i64::try_from(now).unwrap())
}

/// The TOML of a test configuration with the given appservice, client and ops ports.
pub fn config_toml(database_url: &str, homeserver_url: &str, [appservice, client, ops]: [u16; 3]) -> String {
    format!(
        r#"
[homeserver]
server_name = "{SERVER_NAME}"
url = "{homeserver_url}"
request_timeout_secs = 10
[appservice]
listen = "127.0.0.1:{appservice}"
url = "http://127.0.0.1:{appservice}"
as_token = "{AS_TOKEN}"
hs_token = "{HS_TOKEN}"
max_transaction_bytes = 1048576
[client]
listen = "127.0.0.1:{client}"
[ops]
listen = "127.0.0.1:{ops}"
[database]
url = "{database_url}"
[turn]
shared_secret = "{TURN_SECRET}"
listen = "127.0.0.1:0"
allowed_peers = ["127.0.0.0/8"]
[log]
level = "info,switchboard=debug"
"#
    )
}

/// Switchboard in this process, registered with a real Synapse. `registration_hs_token` replaces the
/// token Synapse is told to present (to test a wrong one). `None` when Synapse is unavailable.
pub async fn with_synapse(
    database_url: &str,
    registration_hs_token: Option<&str>,
) -> Option<(Synapse, Running)> {
    with_synapse_on(database_url, registration_hs_token, |_| {}, switchboard::clock::Clock::system()).await
}

/// [`with_synapse`] with `adjust` applied to the config, on `clock`.
pub async fn with_synapse_on(
    database_url: &str,
    registration_hs_token: Option<&str>,
    adjust: impl FnOnce(&mut Config),
    clock: switchboard::clock::Clock,
) -> Option<(Synapse, Running)> {
    let mut config = config(database_url, "http://127.0.0.1:9");
    adjust(&mut config);
    let listeners = bind(&config).await;
    let appservice = listeners.appservice.local_addr().unwrap();
    config.appservice.url = format!("http://{appservice}").parse().unwrap();
    let registration_dir = tempfile::tempdir().unwrap();
    let mut registration = switchboard::appservice::registration::render(&config);
    if let Some(token) = registration_hs_token {
        registration = registration.replace(HS_TOKEN, token);
    }
    let path = registration_dir.path().join("registration.yaml");
    std::fs::write(&path, registration).unwrap();
    let synapse = Synapse::start(&[&path]).await?;
    config.homeserver.url = synapse.base_url.parse().unwrap();
    let running = start_on_clock(config, listeners, clock);
    running.wait_listening().await;
    Some((synapse, running))
}

pub fn sqlite_url(dir: &Path) -> String {
    format!("sqlite://{}", dir.join("switchboard.db").display())
}

/// A fresh, empty PostgreSQL database, or `None` (after `skip`) when no server is configured.
pub async fn fresh_postgres() -> Option<String> {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let Ok(admin) = std::env::var("SWITCHBOARD_TEST_POSTGRES_URL") else {
        skip("SWITCHBOARD_TEST_POSTGRES_URL is not set (tests/run starts a PostgreSQL and sets it)");
        return None;
    };
    let name = format!(
        "switchboard_test_{}_{}_{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed),
        rand::random::<u32>()
    );
    let mut conn =
        <sqlx::PgConnection as sqlx::Connection>::connect(&admin).await.expect("connect to test PostgreSQL");
    sqlx::Executor::execute(&mut conn, format!("CREATE DATABASE {name}").as_str())
        .await
        .expect("create test database");
    let (base, _) = admin.rsplit_once('/').expect("admin URL has a database part");
    Some(format!("{base}/{name}"))
}

/// The database URLs of both backends: SQLite in `dir`, and PostgreSQL when available.
pub async fn backends(dir: &Path) -> Vec<(&'static str, String)> {
    let mut backends = vec![("sqlite", sqlite_url(dir))];
    if let Some(url) = fresh_postgres().await {
        backends.push(("postgres", url));
    }
    backends
}

/// Switchboard running in this process.
pub struct Running {
    pub appservice: SocketAddr,
    pub client: SocketAddr,
    pub ops: SocketAddr,
    /// The embedded TURN relay's UDP (and TCP) address, and its TLS listener's.
    pub turn: Option<SocketAddr>,
    pub turn_tls: Option<SocketAddr>,
    clock: switchboard::clock::Clock,
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), RunError>>,
}

/// Binds the three listeners of `config` (port 0 → any free port).
pub async fn bind(config: &Config) -> Listeners {
    Listeners::bind(config).await.expect("bind listeners")
}

/// Starts Switchboard on already-bound listeners.
pub fn start_on(config: Config, listeners: Listeners) -> Running {
    start_on_clock(config, listeners, switchboard::clock::Clock::system())
}

/// Starts Switchboard on `clock` (a `Clock::manual` that the test steps) and waits until it listens.
pub async fn start_with_clock(config: Config, clock: switchboard::clock::Clock) -> Running {
    let listeners = bind(&config).await;
    let running = start_on_clock(config, listeners, clock);
    running.wait_listening().await;
    running
}

/// [`start_on`] with a given clock.
pub fn start_on_clock(config: Config, listeners: Listeners, clock: switchboard::clock::Clock) -> Running {
    let appservice = listeners.appservice.local_addr().unwrap();
    let client = listeners.client.local_addr().unwrap();
    let ops = listeners.ops.local_addr().unwrap();
    let turn = listeners.turn.as_ref().map(|turn| turn.local_addr().unwrap());
    let turn_tls = listeners.turn.as_ref().and_then(switchboard::turn::io::Listeners::tls_local_addr);
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(switchboard::run_with_clock(config, listeners, clock.clone(), shutdown.clone()));
    Running { appservice, client, ops, turn, turn_tls, clock, shutdown, task }
}

pub async fn start(config: Config) -> Running {
    let listeners = bind(&config).await;
    let running = start_on(config, listeners);
    running.wait_listening().await;
    running
}

impl Running {
    pub fn appservice_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.appservice)
    }

    pub fn ops_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.ops)
    }

    /// Waits until `/health` answers (the store is open and migrated by then).
    pub async fn wait_listening(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(response) = reqwest::get(self.ops_url("/health")).await
                && response.status().is_success()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("Switchboard did not start listening within 30 s");
    }

    /// The metrics once every TURN relay shard has published after this call (see
    /// [`published_turn_metrics`]). A stepped clock is stepped a second at a time until they have.
    pub async fn turn_metrics(&self) -> String {
        published_turn_metrics(&self.ops_url("/metrics"), &self.clock).await
    }

    pub async fn metrics(&self) -> String {
        reqwest::get(self.ops_url("/metrics")).await.unwrap().text().await.unwrap()
    }

    /// Cancels, waits for a clean stop, and returns `run`'s result.
    pub async fn stop(self) -> Result<(), RunError> {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .expect("Switchboard stops within 30 s")
            .expect("run task did not panic")
    }
}

/// The sum of the counter lines starting with `prefix` (0 when absent).
pub fn metric(metrics: &str, prefix: &str) -> u64 {
    metrics
        .lines()
        .filter(|line| line.starts_with(prefix))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// The metrics at `url` once every TURN relay shard has published after this call. Shards publish
/// their gauges and counters once a second and count each pass in
/// `switchboard_turn_shard_ticks_total{shard}` under the shard's lock, so a pass counted after this
/// call began has seen every packet the shard handled before it. The shards tick on `clock`: a
/// stepped one is stepped a second per poll.
pub async fn published_turn_metrics(url: &str, clock: &switchboard::clock::Clock) -> String {
    async fn ticks(url: &str) -> Option<(String, std::collections::BTreeMap<String, u64>)> {
        let text = reqwest::get(url).await.ok()?.text().await.ok()?;
        let ticks = text
            .lines()
            .filter_map(|line| line.strip_prefix("switchboard_turn_shard_ticks_total{shard=\""))
            .filter_map(|rest| {
                let (shard, count) = rest.split_once("\"} ")?;
                Some((shard.to_owned(), count.parse().ok()?))
            })
            .collect();
        Some((text, ticks))
    }
    let (_, before) = eventually(Duration::from_secs(10), "the relay's shard ticks", || async {
        ticks(url).await.filter(|(_, ticks)| !ticks.is_empty())
    })
    .await;
    eventually(Duration::from_secs(10), "a pass of every relay shard", || async {
        clock.advance(Duration::from_secs(1));
        let (text, now) = ticks(url).await?;
        let passed = now.iter().all(|(shard, count)| count > before.get(shard).unwrap_or(&0));
        passed.then_some(text)
    })
    .await
}

/// The resident set size of a process once it has settled: read every 100 ms until two readings
/// agree (at most 5 s; then the last reading).
pub async fn settled_rss(pid: u32) -> u64 {
    let mut last = rss_bytes(pid);
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = rss_bytes(pid);
        if now == last {
            break;
        }
        last = now;
    }
    last
}

/// CPU seconds (user + system) a process has used so far, from /proc/PID/stat.
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may hold spaces) start after the last ')': utime is
    // the 14th field of the line, stime the 15th, in clock ticks of USER_HZ (100 on Linux).
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    #[allow(clippy::cast_precision_loss)]
    let seconds = ticks as f64 / 100.0;
    seconds
}

/// Resident set size of a process, in bytes (from /proc).
pub fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).expect("VmRSS in /proc/<pid>/status");
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
}

/// The number after the last `key` in the output of coturn's `turnutils_uclient` (e.g.
/// `tot_recv_msgs=`, `Total lost packets`).
pub fn uclient_number(output: &str, key: &str) -> Option<u64> {
    output.lines().rev().find_map(|line| {
        let rest = &line[line.find(key)? + key.len()..];
        rest.trim_start().split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
    })
}

/// A loopback port free for TCP and UDP, for a server the test starts later: only for programs
/// that cannot bind port 0 and tell us what they bound (Synapse, coturn's tools). Switchboard in
/// this process gets bound listeners ([`bind`]); as a process it binds port 0 and logs its ports
/// ([`ANY_PORTS`]). The port is drawn at random
/// below Linux's ephemeral range (32768-60999): a port the kernel handed out for `bind(0)` is soon
/// handed to another test again, and outgoing connections take ports from that range, so between
/// this check and the server's bind one of them could take it.
pub fn free_port() -> u16 {
    for _ in 0..1000 {
        let port = rand::random_range(20_000..32_768);
        let free = std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
            && std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok();
        if free {
            return port;
        }
    }
    panic!("no free loopback port in 20000-32767");
}

/// A self-signed P-256 certificate for `localhost` and its key, as PEM files in `dir` (by
/// `openssl`), for TLS listeners under test.
pub fn self_signed_certificate(dir: &Path) -> (PathBuf, PathBuf) {
    let (certificate, key) = (dir.join("turn.crt"), dir.join("turn.key"));
    let openssl = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"])
        .args(["-subj", "/CN=localhost", "-days", "1", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&certificate)
        .output()
        .expect("run openssl");
    assert!(openssl.status.success(), "{}", String::from_utf8_lossy(&openssl.stderr));
    (certificate, key)
}

/// Polls `check` every 50 ms until it returns `Some`, for at most `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A real Synapse, with a fresh SQLite database, on a free loopback port; killed on drop.
pub struct Synapse {
    child: Child,
    pub base_url: String,
    registration_shared_secret: String,
    pub dir: tempfile::TempDir,
    http: reqwest::Client,
}

/// A Matrix user with an access token.
#[derive(Debug, Clone)]
pub struct User {
    pub user_id: String,
    pub access_token: String,
    pub device_id: String,
}

fn synapse_python() -> Option<PathBuf> {
    let python = std::env::var_os("SWITCHBOARD_SYNAPSE_PYTHON")
        .map_or_else(|| repo_root().join(".cache/synapse-venv/bin/python"), PathBuf::from);
    python.exists().then_some(python)
}

impl Synapse {
    /// Starts Synapse with the given appservice registration files; `None` (after `skip`) when the
    /// Synapse venv is missing.
    pub async fn start(registrations: &[&Path]) -> Option<Synapse> {
        Self::start_on_port(registrations, free_port()).await
    }

    /// As [`Synapse::start`], on a given loopback port.
    pub async fn start_on_port(registrations: &[&Path], port: u16) -> Option<Synapse> {
        Self::start_with(registrations, port, &[]).await
    }

    /// As [`Synapse::start_on_port`], with more arguments for deploy/synapse/homeserver.py (such as
    /// `--turn-shared-secret`).
    pub async fn start_with(registrations: &[&Path], port: u16, args: &[&str]) -> Option<Synapse> {
        let Some(python) = synapse_python() else {
            skip("no Synapse venv (deploy/synapse/install creates .cache/synapse-venv)");
            return None;
        };
        let dir = tempfile::tempdir().unwrap();
        let mut writer = Command::new(&python);
        writer
            .arg(repo_root().join("deploy/synapse/homeserver.py"))
            .args(["--dir", dir.path().to_str().unwrap(), "--server-name", SERVER_NAME])
            .args(["--port", &port.to_string()]);
        for registration in registrations {
            writer.arg("--registration").arg(registration);
        }
        writer.args(args);
        let output = writer.output().expect("run homeserver.py");
        assert!(output.status.success(), "homeserver.py failed: {}", String::from_utf8_lossy(&output.stderr));
        let written: Value =
            serde_json::from_slice(output.stdout.trim_ascii()).expect("homeserver.py prints JSON");
        let log = std::fs::File::create(dir.path().join("stderr.log")).unwrap();
        let child = Command::new(&python)
            .args(["-m", "synapse.app.homeserver", "-c"])
            .arg(dir.path().join("homeserver.yaml"))
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start Synapse");
        let synapse = Synapse {
            child,
            base_url: format!("http://127.0.0.1:{port}"),
            registration_shared_secret: written["registration_shared_secret"].as_str().unwrap().to_owned(),
            dir,
            http: reqwest::Client::new(),
        };
        let health = format!("{}/health", synapse.base_url);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(response) = synapse.http.get(&health).send().await
                && response.status().is_success()
            {
                break;
            }
            assert!(Instant::now() < deadline, "Synapse did not start: {}", synapse.log_tail());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Some(synapse)
    }

    /// The Synapse process's id (for its CPU time in /proc).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_tail(&self) -> String {
        let mut text = std::fs::read_to_string(self.dir.path().join("stderr.log")).unwrap_or_default();
        text += &std::fs::read_to_string(self.dir.path().join("homeserver.log")).unwrap_or_default();
        text.chars().rev().take(3000).collect::<Vec<_>>().into_iter().rev().collect()
    }

    /// Registers a user through the shared-secret admin API and returns it logged in.
    pub async fn register(&self, localpart: &str) -> User {
        use hmac::{Hmac, Mac};
        let url = format!("{}/_synapse/admin/v1/register", self.base_url);
        let nonce: Value = self.http.get(&url).send().await.unwrap().json().await.unwrap();
        let nonce = nonce["nonce"].as_str().unwrap();
        let password = format!("pw-{localpart}");
        let mut mac = Hmac::<sha1::Sha1>::new_from_slice(self.registration_shared_secret.as_bytes()).unwrap();
        mac.update(format!("{nonce}\0{localpart}\0{password}\0notadmin").as_bytes());
        let body = json!({
            "nonce": nonce, "username": localpart, "password": password, "admin": false,
            "mac": hex::encode(mac.finalize().into_bytes()),
        });
        let response = self.http.post(&url).json(&body).send().await.unwrap();
        let status = response.status();
        let answer: Value = response.json().await.unwrap();
        assert!(status.is_success(), "register {localpart}: {answer}");
        User {
            user_id: answer["user_id"].as_str().unwrap().to_owned(),
            access_token: answer["access_token"].as_str().unwrap().to_owned(),
            device_id: answer["device_id"].as_str().unwrap().to_owned(),
        }
    }

    /// A client-server API call as `user`; panics on an error answer.
    pub async fn call(&self, user: &User, method: reqwest::Method, path: &str, body: &Value) -> Value {
        let response = self
            .http
            .request(method, format!("{}{path}", self.base_url))
            .bearer_auth(&user.access_token)
            .json(body)
            .send()
            .await
            .unwrap();
        let status = response.status();
        let answer: Value = response.json().await.unwrap_or(Value::Null);
        assert!(status.is_success(), "{path}: {status} {answer}");
        answer
    }

    /// Creates a room with `creator`, invites and joins `members`; returns the room id.
    pub async fn shared_room(&self, creator: &User, members: &[&User]) -> String {
        let invite: Vec<&str> = members.iter().map(|m| m.user_id.as_str()).collect();
        let room = self
            .call(
                creator,
                reqwest::Method::POST,
                "/_matrix/client/v3/createRoom",
                &json!({ "invite": invite }),
            )
            .await;
        let room_id = room["room_id"].as_str().unwrap().to_owned();
        for member in members {
            let path = format!("/_matrix/client/v3/join/{}", urlencode(&room_id));
            self.call(member, reqwest::Method::POST, &path, &json!({})).await;
        }
        room_id
    }

    /// Sends a text message; returns its event id.
    pub async fn send_text(&self, user: &User, room_id: &str, txn: &str, body: &str) -> String {
        let path = format!("/_matrix/client/v3/rooms/{}/send/m.room.message/{txn}", urlencode(room_id));
        let answer =
            self.call(user, reqwest::Method::PUT, &path, &json!({ "msgtype": "m.text", "body": body })).await;
        answer["event_id"].as_str().unwrap().to_owned()
    }
}

impl Synapse {
    /// Asks Synapse to ping our appservice (`POST /_matrix/client/v1/appservice/{id}/ping`).
    pub async fn ping_appservice(&self) -> (reqwest::StatusCode, Value) {
        let response = self
            .http
            .post(format!("{}/_matrix/client/v1/appservice/switchboard/ping", self.base_url))
            .bearer_auth(AS_TOKEN)
            .json(&json!({ "transaction_id": format!("test-{}", rand::random::<u32>()) }))
            .send()
            .await
            .unwrap();
        let status = response.status();
        (status, response.json().await.unwrap_or(Value::Null))
    }
}

impl Drop for Synapse {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn urlencode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// A Raiden-style user id localpart: `0x` and 40 lower-case hex digits, unique per call.
pub fn raiden_localpart() -> String {
    format!("0x{:040x}", rand::random::<u128>())
}

/// Every stored inbox item of the database at `url`, read through a fresh connection.
pub async fn stored_items(url: &str) -> Vec<switchboard::store::StoredItem> {
    let store = switchboard::store::Store::connect(url, 1).await.unwrap();
    let mut items = Vec::new();
    loop {
        let after = items.last().map_or(0, |i: &switchboard::store::StoredItem| i.id);
        let page = store.items_after(after, 1000).await.unwrap();
        if page.is_empty() {
            break;
        }
        items.extend(page);
    }
    store.close().await;
    items
}

/// Ports for [`Process::start`] that let the process bind any free ports (port 0) itself; the test
/// reads the ports it bound from its start-up log line ([`Process::wait_for`] does this first), so
/// no port is checked free and released for a later bind that another program could win.
pub const ANY_PORTS: [u16; 3] = [0, 0, 0];

/// The `switchboard serve` binary as a child process (for crash, signal and log tests).
pub struct Process {
    child: Child,
    pub config: PathBuf,
    pub log: PathBuf,
    /// The appservice, client and ops ports ([`ANY_PORTS`] until read from the log).
    pub ports: [u16; 3],
    /// The embedded TURN relay's port, once read from the log.
    pub turn_port: Option<u16>,
    /// A program that execs the binary with its arguments (such as `prlimit …`); empty: none.
    wrapper: Vec<String>,
}

impl Process {
    /// Writes `toml` as the config in `dir` and starts `switchboard serve`, stderr appended to a log.
    pub fn start(dir: &Path, toml: &str, ports: [u16; 3]) -> Process {
        Self::start_wrapped(dir, toml, ports, &[])
    }

    /// As [`Process::start`], the binary run by `wrapper` (a program that execs its arguments).
    pub fn start_wrapped(dir: &Path, toml: &str, ports: [u16; 3], wrapper: &[&str]) -> Process {
        let config = dir.join("switchboard.toml");
        std::fs::write(&config, toml).unwrap();
        let log = dir.join("switchboard.log");
        let wrapper: Vec<String> = wrapper.iter().map(|s| (*s).to_owned()).collect();
        let child = Self::spawn(&wrapper, &config, &log);
        Process { child, config, log, ports, turn_port: None, wrapper }
    }

    /// Waits (at most 30 s) for the log line `switchboard.start: listening` and takes the ports
    /// from it; then writes them into the config, so that [`Process::restart`] binds the same ones.
    /// Fails at once if the process exits first.
    pub async fn listening(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let (ports, turn_port) = loop {
            if let Some(found) = logged_ports(&self.log_text()) {
                break found;
            }
            if let Some(status) = self.try_wait() {
                panic!("switchboard exited ({status}) before listening\n{}", self.log_tail());
            }
            assert!(Instant::now() < deadline, "not listening after 30 s\n{}", self.log_tail());
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        self.ports = ports;
        self.turn_port = turn_port;
        let mut config: toml::Table = std::fs::read_to_string(&self.config).unwrap().parse().unwrap();
        for (section, port) in [("appservice", ports[0]), ("client", ports[1]), ("ops", ports[2])] {
            config[section]["listen"] = toml::Value::String(format!("127.0.0.1:{port}"));
        }
        config["appservice"]["url"] = toml::Value::String(format!("http://127.0.0.1:{}", ports[0]));
        if let (Some(port), Some(turn)) = (turn_port, config.get_mut("turn")) {
            turn["listen"] = toml::Value::String(format!("127.0.0.1:{port}"));
        }
        std::fs::write(&self.config, config.to_string()).unwrap();
    }

    fn spawn(wrapper: &[String], config: &Path, log: &Path) -> Child {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
        let binary = env!("CARGO_BIN_EXE_switchboard");
        let mut command = match wrapper.split_first() {
            Some((program, arguments)) => {
                let mut command = Command::new(program);
                command.args(arguments).arg(binary);
                command
            }
            None => Command::new(binary),
        };
        command
            .args(["serve", "-c"])
            .arg(config)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start switchboard")
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        self.child.kill().expect("SIGKILL switchboard");
        self.child.wait().unwrap();
    }

    /// Starts the binary again on the same config (after `kill`).
    pub fn restart(&mut self) {
        self.child = Self::spawn(&self.wrapper, &self.config, &self.log);
    }

    pub fn try_wait(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().unwrap()
    }

    /// Sends SIGTERM (through the `kill` program: the crate forbids `unsafe`).
    pub fn sigterm(&self) {
        let pid = self.child.id().to_string();
        assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    }

    /// SIGTERM, then waits at most 15 s for the exit status.
    pub async fn terminate(mut self) -> std::process::ExitStatus {
        self.sigterm();
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "did not exit within 15 s of SIGTERM");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits at most 30 s until the ops listener answers `path` with a success status. Fails at once
    /// if the process exits; a failure shows the last answer and the end of the log.
    pub async fn wait_for(&mut self, path: &str) {
        if self.ports == ANY_PORTS {
            self.listening().await;
        }
        let url = format!("http://127.0.0.1:{}{path}", self.ports[2]);
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut last_answer;
        loop {
            if let Some(status) = self.try_wait() {
                panic!("switchboard exited ({status}) before {url} answered\n{}", self.log_tail());
            }
            match reqwest::get(&url).await {
                Ok(response) if response.status().is_success() => return,
                Ok(response) => {
                    last_answer =
                        format!("{}: {}", response.status(), response.text().await.unwrap_or_default());
                }
                Err(error) => last_answer = error.to_string(),
            }
            assert!(
                Instant::now() < deadline,
                "timed out after 30s waiting for {url}; last answer: {last_answer}\n{}",
                self.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The log's last 40 lines.
    fn log_tail(&self) -> String {
        let text = self.log_text();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

/// An inbox item as a consumer gets it: `body` (with its `type` and `sender`) from transaction
/// `txn_id`, under inbox id `id`, with no receipt time (it counts as observed when applied).
pub fn inbox_item(
    id: i64,
    txn_id: &str,
    kind: switchboard::appservice::inbox::ItemKind,
    body: &Value,
) -> switchboard::appservice::inbox::Input {
    switchboard::appservice::inbox::Input {
        id,
        txn_id: txn_id.to_owned(),
        kind,
        event_type: body["type"].as_str().unwrap().to_owned(),
        sender: body["sender"].as_str().map(str::to_owned),
        room_id: None,
        event_id: None,
        to_user_id: None,
        body: serde_json::value::to_raw_value(body).unwrap(),
        stored_at: 0,
    }
}

/// The appservice, client and ops ports, and the TURN port, from the last `switchboard.start:
/// listening` line of a log (text or JSON).
fn logged_ports(log: &str) -> Option<([u16; 3], Option<u16>)> {
    let line = log.lines().rev().find(|line| line.contains("switchboard.start: listening"))?;
    let port = |key: &str| -> Option<u16> {
        let start = [format!("{key}="), format!("\"{key}\":\"")]
            .iter()
            .find_map(|prefix| line.find(prefix.as_str()).map(|at| at + prefix.len()))?;
        let value = line[start..].trim_start_matches("Some(");
        let end = value.find(|c: char| !(c.is_ascii_alphanumeric() || matches!(c, '.' | ':' | '[' | ']')))?;
        value[..end].parse::<SocketAddr>().ok().map(|addr| addr.port())
    };
    Some(([port("appservice")?, port("client")?, port("ops")?], port("turn")))
}

impl Drop for Process {
    /// A failed test must not leave a `switchboard serve` behind.
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A real Synapse with Switchboard registered, Switchboard running as a process on `db`; `edit`
/// may change the TOML. `None` when Synapse is unavailable.
///
/// Switchboard starts first, on ports it binds itself, so that the registration can name its
/// appservice port; Synapse (a program we cannot hand a socket to) gets a port checked free.
pub async fn synapse_and_process(
    dir: &Path,
    db: &str,
    edit: impl Fn(String) -> String,
) -> Option<(Synapse, Process)> {
    synapse_python().or_else(|| {
        skip("no Synapse venv (deploy/synapse/install creates .cache/synapse-venv)");
        None
    })?;
    let synapse_port = free_port();
    let homeserver = format!("http://127.0.0.1:{synapse_port}");
    let mut process = Process::start(dir, &edit(config_toml(db, &homeserver, ANY_PORTS)), ANY_PORTS);
    process.listening().await;
    let config = Config::load(&process.config).unwrap();
    let registration = dir.join("registration.yaml");
    std::fs::write(&registration, switchboard::appservice::registration::render(&config)).unwrap();
    let synapse = Synapse::start_on_port(&[&registration], synapse_port).await?;
    // Check the homeserver now rather than at the next health-check backoff.
    let ping = format!("http://127.0.0.1:{}/ping", process.ports[2]);
    let _ = reqwest::Client::new().post(ping).send().await;
    Some((synapse, process))
}

/// A redis-server of the test's own on a free loopback port, without persistence; killed on drop.
/// [`Redis::stop`] and [`Redis::restart`] take it away and bring it back on the same port.
pub struct Redis {
    child: Option<Child>,
    pub port: u16,
    dir: tempfile::TempDir,
}

impl Redis {
    /// Starts one and waits until it answers, or `None` (after `skip`) without `redis-server`
    /// (`deploy/prerequisites --tests` installs it).
    pub async fn start() -> Option<Redis> {
        if Command::new("redis-server").arg("--version").output().is_err() {
            skip("redis-server is not installed (deploy/prerequisites --tests)");
            return None;
        }
        let mut redis = Redis { child: None, port: free_port(), dir: tempfile::tempdir().unwrap() };
        redis.restart().await;
        Some(redis)
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Kills it (as a crash would) and waits until it has exited.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it (again) on its port and waits until it answers `PING`.
    pub async fn restart(&mut self) {
        self.stop();
        let log = std::fs::File::create(self.dir.path().join("redis.log")).unwrap();
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .current_dir(self.dir.path())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start redis-server");
        self.child = Some(child);
        let port = self.port;
        eventually(Duration::from_secs(10), "redis-server to answer", || async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.ok()?;
            stream.write_all(b"PING\r\n").await.ok()?;
            let mut answer = [0u8; 7];
            stream.read_exact(&mut answer).await.ok()?;
            (&answer == b"+PONG\r\n").then_some(())
        })
        .await;
    }
}

impl Drop for Redis {
    /// No redis-server outlives its test.
    fn drop(&mut self) {
        self.stop();
    }
}

/// The client benchmarks' Switchboard config: the relay's per-allocation cap
/// (`bandwidth_bytes_per_sec`, 1 MiB/s by default) would measure the cap, not the channel, so it is
/// off (as coturn's default); quieter logs.
pub fn client_bench_toml(toml: &str) -> String {
    toml.replace("allowed_peers = [\"127.0.0.0/8\"]", "allowed_peers = [\"127.0.0.0/8\"]\nbandwidth_bytes_per_sec = 0")
        .replace(
            "level = \"info,switchboard=debug\"",
            "level = \"warn,switchboard=info,switchboard::signalling=warn,switchboard::directory=warn,switchboard::http=warn,switchboard::appservice=warn,switchboard::homeserver=warn\"",
        )
}
