//! Slow or many clients cannot hold the HTTP listeners: connections that never finish their headers
//! are hung up after `header_read_timeout_secs` (on every listener) while normal requests are served;
//! past `max_connections` a listener closes new connections at once; a request whose body never ends
//! is answered 408 after `request_timeout_secs`, and a body over the limit 413.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const HEADER_TIMEOUT: Duration = Duration::from_secs(3);
/// Longest this test waits for anything (a guard against hanging, not a measurement).
const GUARD: Duration = Duration::from_secs(120);

/// Raises this process's open-files limit: the test holds both ends of every connection.
fn raise_open_files_limit(needed: u64) {
    let limit = rlimit::increase_nofile_limit(u64::MAX).expect("raise the open-files limit");
    assert!(limit >= needed, "the open-files limit is {limit}; this test needs {needed}");
}

/// Connects, sends the start of a request and never the end of its headers; returns how long after
/// starting to connect the server closed the connection (read end of file or reset).
async fn slow_client(addr: SocketAddr, connected: tokio::sync::mpsc::Sender<()>) -> Duration {
    let started = Instant::now();
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(b"GET /_switchboard/client/versions HTTP/1.1\r\nHost: slow\r\n").await.unwrap();
    connected.send(()).await.unwrap();
    let mut buffer = [0_u8; 256];
    loop {
        let read = tokio::time::timeout(GUARD, stream.read(&mut buffer))
            .await
            .unwrap_or_else(|_| panic!("a slow client was still connected after {GUARD:?}"));
        match read {
            Ok(0) | Err(_) => return started.elapsed(),
            Ok(_) => {} // an answer before closing is fine too
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_are_hung_up_after_the_header_timeout_while_others_are_served() {
    const CLIENT_SLOW: usize = 1200;
    const OTHER_SLOW: usize = 20;
    raise_open_files_limit(4 * (CLIENT_SLOW as u64) + 1000);
    let dir = tempfile::tempdir().unwrap();
    let mut config = common::config(&common::sqlite_url(dir.path()), "http://127.0.0.1:9");
    config.turn.mode = switchboard::config::TurnMode::Off;
    config.client.header_read_timeout_secs = HEADER_TIMEOUT.as_secs();
    config.appservice.header_read_timeout_secs = HEADER_TIMEOUT.as_secs();
    config.ops.header_read_timeout_secs = HEADER_TIMEOUT.as_secs();
    let running = common::start(config).await;

    let (connected, mut connections) = tokio::sync::mpsc::channel(CLIENT_SLOW + 2 * OTHER_SLOW);
    let mut clients = tokio::task::JoinSet::new();
    for (addr, count) in
        [(running.client, CLIENT_SLOW), (running.appservice, OTHER_SLOW), (running.ops, OTHER_SLOW)]
    {
        for _ in 0..count {
            clients.spawn(slow_client(addr, connected.clone()));
        }
    }
    for _ in 0..CLIENT_SLOW + 2 * OTHER_SLOW {
        connections.recv().await.expect("every slow client connects");
    }
    common::eventually(GUARD, "the client listener to hold every slow client", || async {
        let metrics = running.metrics().await;
        let open = common::metric(&metrics, "switchboard_http_connections{listener=\"client\"}");
        (open >= CLIENT_SLOW as u64).then_some(())
    })
    .await;

    // With them all connected, a normal request is served.
    let versions =
        reqwest::get(format!("http://{}/_switchboard/client/versions", running.client)).await.unwrap();
    assert_eq!(versions.status(), 200);
    assert_eq!(versions.json::<serde_json::Value>().await.unwrap()["versions"][0], "v1");

    // Every slow client is hung up, none before the header timeout.
    let mut hang_ups = Vec::new();
    while let Some(closed_after) = clients.join_next().await {
        hang_ups.push(closed_after.unwrap());
    }
    hang_ups.sort();
    let (first, median, last) = (hang_ups[0], hang_ups[hang_ups.len() / 2], hang_ups[hang_ups.len() - 1]);
    eprintln!(
        "{} slow clients hung up after {first:?} (first), {median:?} (median), {last:?} (last); header timeout {HEADER_TIMEOUT:?}",
        hang_ups.len()
    );
    assert!(first >= HEADER_TIMEOUT, "a slow client was hung up after {first:?}, before the timeout");
    let metrics = running.metrics().await;
    for (listener, count) in [("client", CLIENT_SLOW), ("appservice", OTHER_SLOW), ("ops", OTHER_SLOW)] {
        let timeouts = common::metric(
            &metrics,
            &format!("switchboard_http_header_timeouts_total{{listener=\"{listener}\"}}"),
        );
        assert!(timeouts >= count as u64, "{listener}: {timeouts} header timeouts counted, expected {count}");
    }
    running.stop().await.unwrap();
}

#[tokio::test]
async fn past_max_connections_new_connections_are_closed_at_once_and_counted() {
    const CAP: usize = 50;
    raise_open_files_limit(4 * CAP as u64 + 1000);
    let dir = tempfile::tempdir().unwrap();
    let mut config = common::config(&common::sqlite_url(dir.path()), "http://127.0.0.1:9");
    config.turn.mode = switchboard::config::TurnMode::Off;
    config.client.max_connections = CAP;
    // Far longer than the test: only the cap can close a connection here.
    config.client.header_read_timeout_secs = 3600;
    let running = common::start(config).await;

    let mut held = Vec::new();
    for _ in 0..CAP {
        let mut stream = TcpStream::connect(running.client).await.unwrap();
        stream.write_all(b"GET /_switchboard/client/versions HTTP/1.1\r\n").await.unwrap();
        held.push(stream);
    }
    common::eventually(GUARD, "the client listener to hold the slow clients", || async {
        let open =
            common::metric(&running.metrics().await, "switchboard_http_connections{listener=\"client\"}");
        (open == CAP as u64).then_some(())
    })
    .await;

    // One more is closed without an answer, and counted.
    let mut extra = TcpStream::connect(running.client).await.unwrap();
    let _ = extra.write_all(b"GET /_switchboard/client/versions HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let mut buffer = Vec::new();
    let _ = tokio::time::timeout(GUARD, extra.read_to_end(&mut buffer))
        .await
        .expect("a connection past the cap was kept open");
    assert!(buffer.is_empty(), "answered past the cap: {buffer:?}");
    let refused = common::metric(
        &running.metrics().await,
        "switchboard_http_connections_refused_total{listener=\"client\"}",
    );
    assert_eq!(refused, 1);

    // Once the slow clients go, the listener serves again.
    drop(held);
    common::eventually(GUARD, "a request served after the slow clients left", || async {
        let url = format!("http://{}/_switchboard/client/versions", running.client);
        let response = reqwest::get(url).await.ok()?;
        (response.status() == 200).then_some(())
    })
    .await;
    running.stop().await.unwrap();
}

#[tokio::test]
async fn a_body_that_never_ends_is_answered_408_and_one_over_the_limit_413() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = common::config(&common::sqlite_url(dir.path()), "http://127.0.0.1:9");
    config.turn.mode = switchboard::config::TurnMode::Off;
    config.directory.anonymous_read = true;
    config.client.request_timeout_secs = 1;
    let max_body = config.client.max_body_bytes;
    let running = common::start(config).await;
    let query = "/_switchboard/client/v1/peers/query";

    // Headers announce 100 bytes; 10 come, then nothing.
    let mut stream = TcpStream::connect(running.client).await.unwrap();
    let head = format!(
        "POST {query} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(b"{\"addresse").await.unwrap();
    let mut answer = vec![0_u8; 4096];
    let read = tokio::time::timeout(GUARD, stream.read(&mut answer))
        .await
        .expect("no answer to a request whose body never ends")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer[..read]);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("\"errcode\":\"M_UNKNOWN\""), "{answer}");

    // A body over max_body_bytes: 413 M_TOO_LARGE.
    let body = format!("{{\"addresses\": [\"{}\"]}}", "0".repeat(max_body));
    let response = reqwest::Client::new()
        .post(format!("http://{}{query}", running.client))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 413);
    assert_eq!(response.json::<serde_json::Value>().await.unwrap()["errcode"], "M_TOO_LARGE");
    running.stop().await.unwrap();
}
