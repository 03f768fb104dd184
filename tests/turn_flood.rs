//! 200,000 unauthenticated Allocates from loopback must not make the relay's memory grow: nonces are
//! stateless and the per-source limiter's table is bounded. (The `turn` 0.17.2 server kept a nonce
//! per such request, ~100 B each, forever.)

mod common;

use std::time::Duration;

use tokio::net::UdpSocket;

const FLOOD: usize = 200_000;
const SOCKETS: usize = 4;

/// A minimal Allocate (REQUESTED-TRANSPORT UDP, no credentials) with transaction id `n`.
fn allocate(n: u64) -> Vec<u8> {
    let mut packet = vec![0x00, 0x03, 0x00, 0x08, 0x21, 0x12, 0xA4, 0x42];
    packet.extend_from_slice(&[0; 4]);
    packet.extend_from_slice(&n.to_be_bytes());
    packet.extend_from_slice(&[0x00, 0x19, 0x00, 0x04, 17, 0, 0, 0]);
    packet
}

async fn send(sockets: &[UdpSocket], relay: std::net::SocketAddr, from: u64, count: usize) {
    for n in 0..count as u64 {
        let socket = &sockets[usize::try_from(n).unwrap() % sockets.len()];
        // The kernel may drop some under load; what matters is what reaches the relay.
        let _ = socket.send_to(&allocate(from + n), relay).await;
        if n % 256 == 0 {
            tokio::task::yield_now().await;
        }
    }
}

#[tokio::test]
async fn a_flood_of_unauthenticated_allocates_does_not_grow_memory() {
    let dir = tempfile::tempdir().unwrap();
    let toml = common::config_toml(&common::sqlite_url(dir.path()), "http://127.0.0.1:9", common::ANY_PORTS);
    let mut process = common::Process::start(dir.path(), &toml, common::ANY_PORTS);
    process.wait_for("/health").await;
    let (ports, turn_port) = (process.ports, process.turn_port.expect("the relay's port in the log"));
    let relay: std::net::SocketAddr = format!("127.0.0.1:{turn_port}").parse().unwrap();
    let mut sockets = Vec::new();
    for _ in 0..SOCKETS {
        sockets.push(UdpSocket::bind("127.0.0.1:0").await.unwrap());
    }

    let metrics_url = format!("http://127.0.0.1:{}/metrics", ports[2]);
    let clock = switchboard::clock::Clock::system();
    // Warm up (allocator arenas, the limiter's entry), then measure around the flood.
    send(&sockets, relay, 0, 2_000).await;
    let before = common::settled_rss(process.pid()).await / 1024;
    send(&sockets, relay, 10_000, FLOOD).await;
    // Handled once a pass of the shards counts no more rate-limited requests than the one before.
    let limited =
        |text: &str| common::metric(text, r#"switchboard_turn_rate_limited_total{transport="udp"}"#);
    let mut seen = limited(&common::published_turn_metrics(&metrics_url, &clock).await);
    for _ in 0..30 {
        let now = limited(&common::published_turn_metrics(&metrics_url, &clock).await);
        if now == seen {
            break;
        }
        seen = now;
    }
    assert!(seen > 0, "the flood was rate limited");
    let after = common::settled_rss(process.pid()).await / 1024;
    eprintln!("RSS before {before} KiB, after {FLOOD} Allocates {after} KiB");
    assert!(after < before + 2048, "RSS grew by {} KiB", after.saturating_sub(before));

    // Still serving: once the source's budget refills, an Allocate gets its 401 (asked every 200 ms).
    let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let answer = common::eventually(Duration::from_secs(10), "an answer to an Allocate", || async {
        let mut buffer = [0u8; 1500];
        client.send_to(&allocate(1), relay).await.unwrap();
        let received = tokio::time::timeout(Duration::from_millis(200), client.recv_from(&mut buffer)).await;
        let (length, _) = received.ok()?.ok()?;
        Some(buffer[..length].to_vec())
    })
    .await;
    assert_eq!(&answer[..2], &[0x01, 0x13], "an Allocate error response");
    assert!(answer.len() <= 3 * allocate(1).len(), "no amplification: {} bytes", answer.len());
    assert_eq!(process.terminate().await.code(), Some(0));
}
