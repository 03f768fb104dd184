//! One allocation asking for 200,000 permissions: past `permissions_per_allocation` every request is
//! refused with 508 and nothing of it is installed, so the relay's memory stays flat. (Before the
//! cap each permission stayed for its 5 minutes: ~9 MB for this flood, and as much again for each
//! allocation a user could make.)

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use common::turn_client::{Client, code, peer_attribute};
use stun::message::{CLASS_SUCCESS_RESPONSE, METHOD_CREATE_PERMISSION, Message};

/// Peers per CreatePermission request, and requests in the flood.
const PER_REQUEST: u32 = 100;
const REQUESTS: u32 = 2_000;

/// CreatePermission for peers `from..from + PER_REQUEST` (on loopback, which the test allows).
async fn permit(client: &Client, from: u32) -> Message {
    let peers = (from..from + PER_REQUEST)
        .map(|n| peer_attribute(SocketAddr::from((Ipv4Addr::from_bits(0x7F00_0000 + n), 9))))
        .collect();
    client.request(METHOD_CREATE_PERMISSION, peers).await
}

#[tokio::test]
async fn an_allocation_asking_for_200000_permissions_is_refused_past_the_cap_and_memory_stays_flat() {
    let dir = tempfile::tempdir().unwrap();
    let toml = common::config_toml(&common::sqlite_url(dir.path()), "http://127.0.0.1:9", common::ANY_PORTS);
    let mut process = common::Process::start(dir.path(), &toml, common::ANY_PORTS);
    process.wait_for("/health").await;
    let (ports, turn_port) = (process.ports, process.turn_port.expect("the relay's port in the log"));
    let metrics_url = format!("http://127.0.0.1:{}/metrics", ports[2]);

    let relay: SocketAddr = format!("127.0.0.1:{turn_port}").parse().unwrap();
    let mut client = Client::new(relay, "@alice:localhost").await;
    let allocated = client.allocate(vec![]).await;
    assert_eq!(allocated.typ.class, CLASS_SUCCESS_RESPONSE, "{allocated}");

    // Within the cap: installed. Warm up (allocator arenas) by refreshing them, then measure.
    assert_eq!(permit(&client, 1).await.typ.class, CLASS_SUCCESS_RESPONSE);
    for _ in 0..50 {
        assert_eq!(permit(&client, 1).await.typ.class, CLASS_SUCCESS_RESPONSE);
    }
    let before = common::settled_rss(process.pid()).await / 1024;

    let mut refused = 0;
    for request in 1..=REQUESTS {
        let answer = permit(&client, 1 + request * PER_REQUEST).await;
        if code(&answer) == Some(508) {
            refused += 1;
        }
    }
    let after = common::rss_bytes(process.pid()) / 1024;
    eprintln!("RSS before {before} KiB, after {} permissions asked for {after} KiB", REQUESTS * PER_REQUEST);
    assert_eq!(refused, REQUESTS, "every request past the cap is refused with 508");
    assert!(after < before + 2048, "RSS grew by {} KiB", after.saturating_sub(before));

    // The metrics (published each second) show the refusals and only what fits.
    let udp = |name: &str| format!("switchboard_turn_{name}{{transport=\"udp\"}}");
    let text = common::eventually(Duration::from_secs(10), "the refusals in the metrics", || async {
        let text = reqwest::get(&metrics_url).await.ok()?.text().await.ok()?;
        (common::metric(&text, &udp("permission_refusals_total")) == u64::from(REQUESTS)).then_some(text)
    })
    .await;
    assert_eq!(common::metric(&text, &udp("permissions")), u64::from(PER_REQUEST));
    // What was installed is still there to refresh.
    assert_eq!(permit(&client, 1).await.typ.class, CLASS_SUCCESS_RESPONSE);
    assert_eq!(process.terminate().await.code(), Some(0));
}
