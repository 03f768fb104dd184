//! The embedded TURN relay against coturn (Debian's `turnserver`), side by side in one run, under
//! identical `turnutils_uclient` loads relayed to a `turnutils_peer` echo on loopback:
//! - server CPU seconds per relayed message (client → peer and peer → client each count one),
//!   read from /proc before and after each load, and loss as uclient reports it;
//! - resident memory per idle allocation, with 5,000 allocations made by this bench's own client.
//!
//! Loads alternate between the two servers (who goes first alternates too), 5 runs each; medians,
//! and the median of each run's Switchboard ÷ coturn ratio. uclient staggers its clients'
//! starts, so messages per second say little: compare CPU per message.
//!
//! Run: `cargo bench --bench turn` (needs coturn: `deploy/prerequisites --tests`);
//! `SWITCHBOARD_BENCH_LOADS=1200` runs only the loads whose name contains "1200" (and the memory
//! measurement), `SWITCHBOARD_BENCH_LOADS=memory` none of them.

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "shared/coturn.rs"]
mod coturn;

use std::net::SocketAddr;
use std::process::{Command, Stdio};

use coturn::KillOnDrop;
use std::time::Duration;

use stun::attributes::{ATTR_NONCE, ATTR_REALM, ATTR_USERNAME};
use stun::message::{CLASS_REQUEST, METHOD_ALLOCATE, Message, MessageType, Setter};
use stun::textattrs::TextAttribute;

const RUNS: usize = 5;
const IDLE_ALLOCATIONS: usize = 5_000;
const SECRET: &str = common::TURN_SECRET;

/// A load: a name and uclient flags.
const LOADS: &[(&str, &[&str])] = &[
    ("50 streams × 160 B every 20 ms, channels", &["-m", "50", "-n", "500", "-l", "160", "-z", "20"]),
    ("100 streams × 160 B at full rate, channels", &["-m", "100", "-n", "400", "-l", "160", "-z", "0"]),
    ("50 streams × 1200 B every 20 ms, channels", &["-m", "50", "-n", "500", "-l", "1200", "-z", "20"]),
    (
        "50 streams × 160 B every 20 ms, send indications",
        &["-m", "50", "-n", "500", "-l", "160", "-z", "20", "-s"],
    ),
    ("50 streams × 160 B every 20 ms, TCP", &["-m", "50", "-n", "500", "-l", "160", "-z", "20", "-t"]),
    ("50 streams × 160 B every 20 ms, TLS", &["-m", "50", "-n", "500", "-l", "160", "-z", "20", "-t", "-S"]),
];

/// A relay under test: its name, process, TURN port and TURN-over-TLS port.
struct Server {
    name: &'static str,
    pid: u32,
    port: u16,
    tls_port: u16,
}

fn coturn(dir: &std::path::Path, port: u16, tls_port: u16) -> (Server, KillOnDrop) {
    let (certificate, key) = common::self_signed_certificate(dir);
    let tls = [
        "--tls-listening-port".into(),
        tls_port.to_string().into(),
        "--cert".into(),
        certificate.into_os_string(),
        "--pkey".into(),
        key.into_os_string(),
    ];
    let process = coturn::start(port, SECRET, common::SERVER_NAME, &tls);
    (Server { name: "coturn", pid: process.0.id(), port, tls_port }, process)
}

fn switchboard(dir: &std::path::Path, port: u16, tls_port: u16) -> (Server, common::Process) {
    let (certificate, key) = common::self_signed_certificate(dir);
    let ports = [common::free_port(), common::free_port(), common::free_port()];
    let toml = common::config_toml(&common::sqlite_url(dir), "http://127.0.0.1:9", ports)
        .replace("listen = \"127.0.0.1:0\"", &format!("listen = \"127.0.0.1:{port}\""))
        .replace(
            "allowed_peers = [\"127.0.0.0/8\"]",
            &format!(
                "allowed_peers = [\"127.0.0.0/8\"]\nbandwidth_bytes_per_sec = 0\nunauthenticated_per_sec = 0\n\
                 user_quota = 20000\ntotal_quota = 20000\nrelay_port_min = 50000\nrelay_port_max = 59999\n\
                 tls_listen = \"127.0.0.1:{tls_port}\"\ntls_certificate = \"{}\"\ntls_key = \"{}\"",
                certificate.display(),
                key.display()
            ),
        )
        .replace("level = \"info,switchboard=debug\"", "level = \"warn\"");
    let process = common::Process::start(dir, &toml, ports);
    (Server { name: "switchboard", pid: process.pid(), port, tls_port }, process)
}

/// Runs uclient with `flags` against `port`; returns (messages relayed, lost, output), or `None`
/// when it did not finish within 2 minutes (uclient can wait forever for a lost echo); then what
/// it printed goes to stderr, for the next look at why.
fn uclient(port: u16, peer: u16, flags: &[&str]) -> Option<(u64, u64, String)> {
    // stdbuf: line-buffered, so a killed uclient's output is not lost in its stdio buffer.
    let output = Command::new("timeout")
        .args(["120", "stdbuf", "-oL", "turnutils_uclient", "-W", SECRET, "-u", "bench", "-e"])
        .args(["127.0.0.1", "-r"])
        .arg(peer.to_string())
        .args(["-X", "-c", "-p", &port.to_string()])
        .args(flags)
        .arg("127.0.0.1")
        .output()
        .expect("run turnutils_uclient");
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    if !output.status.success() {
        let lines: Vec<&str> = text.lines().collect();
        eprintln!("uclient {flags:?} on port {port} ended with {}; its last lines:", output.status);
        eprintln!("{}", lines[lines.len().saturating_sub(30)..].join("\n"));
    }
    let after = |key: &str| common::uclient_number(&text, key);
    let relayed = after("tot_send_msgs=")? + after("tot_recv_msgs=")?;
    Some((relayed, after("Total lost packets")?, text))
}

/// Makes `count` allocations on `server` from as many sockets, kept open; returns the sockets.
/// A socket whose port a uclient run left an allocation on (437) is replaced by another.
fn allocate_many(server: SocketAddr, count: usize) -> Vec<std::net::UdpSocket> {
    let credentials = switchboard::turn::credentials::mint(
        SECRET.as_bytes(),
        "idle",
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs(),
        3600,
    );
    let mut sockets = Vec::with_capacity(count);
    let mut in_use = 0;
    while sockets.len() < count {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        socket.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        socket.connect(server).unwrap();
        match allocate(&socket, &credentials) {
            Ok(()) => sockets.push(socket),
            Err(437) if in_use < 1000 => in_use += 1,
            Err(code) => panic!("allocation refused with {code}"),
        }
    }
    sockets
}

/// The 401 dance and an Allocate on `socket`; the error code of a refusal.
fn allocate(
    socket: &std::net::UdpSocket,
    credentials: &switchboard::turn::credentials::Credentials,
) -> Result<(), u16> {
    let mut buffer = [0u8; 1500];
    let mut nonce_realm: Option<(String, String)> = None;
    loop {
        let mut setters: Vec<Box<dyn Setter>> = vec![
            Box::new(stun::agent::TransactionId::new()),
            Box::new(MessageType::new(METHOD_ALLOCATE, CLASS_REQUEST)),
            Box::new(turn::proto::reqtrans::RequestedTransport { protocol: turn::proto::PROTO_UDP }),
        ];
        if let Some((nonce, realm)) = &nonce_realm {
            setters.push(Box::new(TextAttribute::new(ATTR_USERNAME, credentials.username.clone())));
            setters.push(Box::new(TextAttribute::new(ATTR_REALM, realm.clone())));
            setters.push(Box::new(TextAttribute::new(ATTR_NONCE, nonce.clone())));
            setters.push(Box::new(stun::integrity::MessageIntegrity::new_long_term_integrity(
                credentials.username.clone(),
                realm.clone(),
                credentials.password.clone(),
            )));
        }
        let mut request = Message::new();
        request.build(&setters).unwrap();
        socket.send(&request.raw).unwrap();
        let length = socket.recv(&mut buffer).expect("an answer to Allocate");
        let mut answer = Message::new();
        answer.raw = buffer[..length].to_vec();
        answer.decode().unwrap();
        if answer.typ.class == stun::message::CLASS_SUCCESS_RESPONSE {
            return Ok(());
        }
        let mut code = stun::error_code::ErrorCodeAttribute::default();
        stun::message::Getter::get_from(&mut code, &answer).expect("an error code");
        match (code.code.0, &nonce_realm) {
            (401, None) => {
                let nonce = TextAttribute::get_from_as(&answer, ATTR_NONCE).unwrap().text;
                let realm = TextAttribute::get_from_as(&answer, ATTR_REALM).unwrap().text;
                nonce_realm = Some((nonce, realm));
            }
            (other, _) => return Err(other),
        }
    }
}

/// One uclient run against `server`: its CPU µs per relayed message and the messages lost; `None`
/// when uclient did not finish.
async fn measure(server: &Server, peer_port: u16, flags: &[&str]) -> Option<(f64, u64)> {
    let before = common::cpu_seconds(server.pid);
    let port = if flags.contains(&"-S") { server.tls_port } else { server.port };
    let (relayed, lost, output) = uclient(port, peer_port, flags)?;
    // Let the server finish what is in flight before reading its CPU time.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let cpu = common::cpu_seconds(server.pid) - before;
    assert!(relayed > 0, "{} relayed nothing:\n{output}", server.name);
    #[allow(clippy::cast_precision_loss)]
    let per_message = cpu / relayed as f64 * 1e6;
    Some((per_message, lost))
}

fn median(mut values: Vec<f64>) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let dir = tempfile::tempdir().unwrap();
    let peer_port = common::free_port();
    let _peer = KillOnDrop(
        Command::new("turnutils_peer")
            .args(["-L", "127.0.0.1", "-p", &peer_port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start turnutils_peer (apt-get install coturn)"),
    );
    let (coturn_dir, switchboard_dir) = (dir.path().join("coturn"), dir.path().join("switchboard"));
    std::fs::create_dir_all(&coturn_dir).unwrap();
    std::fs::create_dir_all(&switchboard_dir).unwrap();
    let (coturn, _coturn_process) = coturn(&coturn_dir, common::free_port(), common::free_port());
    let (switchboard, mut process) = switchboard(&switchboard_dir, common::free_port(), common::free_port());
    process.wait_for("/health").await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    println!(
        "| load | coturn µs/msg | Switchboard µs/msg | lost (coturn, Switchboard) | ratio of medians | median of paired ratios |"
    );
    println!("|---|---:|---:|---:|---:|---:|");
    // SWITCHBOARD_BENCH_LOADS=<text>: only the loads whose name contains it ("" or "memory": none).
    let only = std::env::var("SWITCHBOARD_BENCH_LOADS").ok();
    let chosen = LOADS
        .iter()
        .filter(|(name, _)| only.as_deref().is_none_or(|text| !text.is_empty() && name.contains(text)));
    let servers = [&coturn, &switchboard];
    for (load, flags) in chosen {
        let mut per_message: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
        let mut paired = Vec::new();
        let mut lost = [0u64; 2];
        let mut unfinished = [0u32; 2];
        for run in 0..RUNS {
            // Alternate who goes first: neither always follows the other's load.
            let order = if run % 2 == 0 { [0, 1] } else { [1, 0] };
            let mut this_run = [None, None];
            for index in order {
                if let Some((us, lost_now)) = measure(servers[index], peer_port, flags).await {
                    this_run[index] = Some(us);
                    per_message[index].push(us);
                    lost[index] += lost_now;
                } else {
                    eprintln!("{load}: uclient did not finish against {}", servers[index].name);
                    unfinished[index] += 1;
                }
            }
            if let [Some(coturn_us), Some(switchboard_us)] = this_run {
                paired.push(switchboard_us / coturn_us);
            }
        }
        if per_message.iter().any(Vec::is_empty) {
            println!("| {load} | (a server never finished: {unfinished:?}) | | | | |");
            continue;
        }
        let [coturn_us, switchboard_us] = per_message.map(median);
        let unfinished =
            if unfinished == [0, 0] { String::new() } else { format!(" (unfinished {unfinished:?})") };
        println!(
            "| {load} | {coturn_us:.2} | {switchboard_us:.2} | {}, {}{unfinished} | {:.2} | **{:.2}** |",
            lost[0],
            lost[1],
            switchboard_us / coturn_us,
            median(paired),
        );
    }

    println!(
        "\n| server | RSS before | RSS with {IDLE_ALLOCATIONS} idle allocations | bytes per allocation |"
    );
    println!("|---|---:|---:|---:|");
    for server in [&coturn, &switchboard] {
        let address: SocketAddr = format!("127.0.0.1:{}", server.port).parse().unwrap();
        let before = common::rss_bytes(server.pid);
        let sockets = allocate_many(address, IDLE_ALLOCATIONS);
        tokio::time::sleep(Duration::from_millis(500)).await;
        let after = common::rss_bytes(server.pid);
        #[allow(clippy::cast_precision_loss)]
        let bytes_each = after.saturating_sub(before) as f64 / IDLE_ALLOCATIONS as f64;
        let mib = |bytes: u64| {
            #[allow(clippy::cast_precision_loss)]
            let mib = bytes as f64 / 1_048_576.0;
            mib
        };
        println!("| {} | {:.1} MiB | {:.1} MiB | {bytes_each:.0} |", server.name, mib(before), mib(after));
        drop(sockets);
    }
    drop(process);
}
