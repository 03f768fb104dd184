//! coturn's own test clients against the embedded relay: `turnutils_uclient` relays through it to
//! `turnutils_peer` (an echo peer) over UDP and TCP, with and without channels, and must lose
//! nothing, and over TLS;
//! `turnutils_stunclient` gets its mapped address. Debian package `coturn`, installed by tests/run.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

fn installed(tool: &str) -> bool {
    Command::new("sh").args(["-c", &format!("command -v {tool}")]).output().is_ok_and(|o| o.status.success())
}

/// The echo peer on a free loopback port; killed on drop.
struct Peer(std::process::Child, u16);

impl Peer {
    fn start() -> Self {
        let port = common::free_port();
        let child = Command::new("turnutils_peer")
            .args(["-L", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start turnutils_peer");
        Self(child, port)
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `turnutils_uclient` with `flags` and returns (messages sent, received, lost) and its output.
async fn uclient(
    relay: std::net::SocketAddr,
    peer: &Peer,
    flags: &[&str],
    clients: u32,
    messages: u32,
) -> (u64, u64, u64, String) {
    let output = tokio::process::Command::new("timeout")
        .args(["60", "turnutils_uclient", "-W", common::TURN_SECRET, "-u", "alice", "-e", "127.0.0.1"])
        .args(["-r", &peer.1.to_string(), "-X", "-c", "-l", "160", "-z", "5"])
        .args(["-m", &clients.to_string(), "-n", &messages.to_string(), "-p", &relay.port().to_string()])
        .args(flags)
        .arg("127.0.0.1")
        .output()
        .await
        .expect("run turnutils_uclient");
    let text =
        String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr);
    // uclient tries TLS 1.0 and 1.1 contexts at random, which rustls refuses, and retries: leave out
    // those lines so that a failure shows the figures.
    let text: String = text
        .lines()
        .filter(|line| !line.contains("tls_connect:") && !line.contains("SSL routines"))
        .flat_map(|line| [line, "\n"])
        .collect();
    let sent = common::uclient_number(&text, "tot_send_msgs=").unwrap_or(0);
    let received = common::uclient_number(&text, "tot_recv_msgs=").unwrap_or(0);
    let lost = common::uclient_number(&text, "Total lost packets").unwrap_or(u64::MAX);
    (sent, received, lost, text)
}

#[tokio::test]
async fn coturn_clients_relay_through_the_embedded_relay_without_loss() {
    if !installed("turnutils_uclient") {
        common::skip("coturn's test clients (Debian package coturn) are not installed");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (certificate, key) = common::self_signed_certificate(dir.path());
    let mut config = common::config(&common::sqlite_url(dir.path()), "http://127.0.0.1:9");
    config.turn.tls_listen = Some("127.0.0.1:0".parse().unwrap());
    config.turn.tls_certificate = Some(certificate);
    config.turn.tls_key = Some(key);
    // uclient never deallocates its UDP allocations, and every run is user "alice".
    config.turn.user_quota = 1000;
    let running = common::start(config).await;
    let relay = running.turn.expect("the embedded relay listens");
    let relay_tls = running.turn_tls.expect("the TLS listener listens");
    let peer = Peer::start();
    // The peer has bound its port once we no longer can.
    common::eventually(Duration::from_secs(10), "turnutils_peer to bind its port", || async {
        std::net::UdpSocket::bind(("127.0.0.1", peer.1)).is_err().then_some(())
    })
    .await;

    for (name, address, flags) in [
        ("UDP, channels", relay, &[][..]),
        ("UDP, send indications", relay, &["-s"][..]),
        ("TCP, channels", relay, &["-t"][..]),
        ("TCP, send indications", relay, &["-t", "-s"][..]),
        ("TLS, channels", relay_tls, &["-t", "-S"][..]),
    ] {
        let (sent, received, lost, output) = uclient(address, &peer, flags, 4, 50).await;
        assert_eq!(sent, 200, "{name}: every message sent\n{output}");
        assert_eq!((received, lost), (200, 0), "{name}: every message back, none lost\n{output}");
    }

    let output = tokio::process::Command::new("timeout")
        .args(["10", "turnutils_stunclient", "-p", &relay.port().to_string(), "127.0.0.1"])
        .output()
        .await
        .expect("run turnutils_stunclient");
    let text =
        String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr);
    assert!(text.contains("127.0.0.1"), "the mapped address: {text}");

    // The relay's counters, once its shards have published them (every second) as we expect; a
    // failure shows the last figures.
    let expected = [(("udp", 400), 8), (("tcp", 400), 0), (("tls", 200), 0)];
    let figures = |metrics: &str| {
        expected.map(|((transport, _), _)| {
            let relayed = |direction: &str| {
                let name = "switchboard_turn_relayed_packets_total";
                common::metric(
                    metrics,
                    &format!("{name}{{transport=\"{transport}\",direction=\"{direction}\"}}"),
                )
            };
            // uclient leaves its UDP allocations to expire; a TCP allocation ends with its connection.
            let allocations = common::metric(
                metrics,
                &format!("switchboard_turn_allocations{{transport=\"{transport}\"}}"),
            );
            ((relayed("to_peer"), relayed("to_client")), allocations)
        })
    };
    let wanted = expected.map(|((_, messages), allocations)| ((messages, messages), allocations));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let metrics = running.metrics().await;
        let seen = figures(&metrics);
        if seen == wanted {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "relayed (to_peer, to_client), allocations: {seen:?}, want {wanted:?}\n{metrics}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    running.stop().await.unwrap();
}
