//! SIGTERM stops accepting, lets an in-flight transaction finish and store, and exits 0; `serve`
//! raises its soft limit of open files to the hard one.

mod common;

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn sigterm_finishes_the_in_flight_transaction_and_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let db = common::sqlite_url(dir.path());
    let toml = common::config_toml(&db, "http://127.0.0.1:9", common::ANY_PORTS);
    let mut child = common::Process::start(dir.path(), &toml, common::ANY_PORTS);
    child.wait_for("/health").await;
    let ports = child.ports;

    // Start a transaction and send only half of its body.
    let body = br#"{"events": [{"type": "m.room.message", "event_id": "$inflight", "content": {"body": "in flight"}}]}"#;
    let (first, rest) = body.split_at(body.len() / 2);
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", ports[0])).await.unwrap();
    let head = format!(
        "PUT /_matrix/app/v1/transactions/1 HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        common::HS_TOKEN,
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(first).await.unwrap();
    // Wait until the server holds the connection (not just the kernel's accept queue).
    let metrics = format!("http://127.0.0.1:{}/metrics", ports[2]);
    common::eventually(Duration::from_secs(10), "the transaction's connection accepted", || async {
        let text = reqwest::get(&metrics).await.ok()?.text().await.ok()?;
        (common::metric(&text, "switchboard_http_connections{listener=\"appservice\"}") == 1).then_some(())
    })
    .await;

    child.sigterm();
    // The listeners close (no new connections), while the process waits for the transaction.
    common::eventually(Duration::from_secs(10), "the ops listener to close", || async {
        tokio::net::TcpStream::connect(("127.0.0.1", ports[2])).await.is_err().then_some(())
    })
    .await;
    assert!(child.try_wait().is_none(), "still running while a transaction is in flight");

    stream.write_all(rest).await.unwrap();
    let mut answer = vec![0; 1024];
    let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut answer)).await.unwrap().unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    drop(stream);

    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(status) = child.try_wait() {
            break status;
        }
        assert!(Instant::now() < deadline, "did not exit within 15 s of SIGTERM");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(status.code(), Some(0));
    let items = common::stored_items(&db).await;
    assert_eq!(items.len(), 1);
    assert_eq!(items[0].event_id.as_deref(), Some("$inflight"));
}

/// The soft and hard "Max open files" of a process, from /proc.
fn open_files_limits(pid: u32) -> (u64, u64) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits.lines().find(|line| line.starts_with("Max open files")).unwrap();
    let numbers: Vec<u64> = line.split_whitespace().filter_map(|word| word.parse().ok()).collect();
    (numbers[0], numbers[1])
}

#[tokio::test]
async fn serve_raises_its_open_files_limit_to_the_hard_limit() {
    let (_, hard) = open_files_limits(std::process::id());
    let soft = 256.min(hard);
    if soft == hard {
        common::skip("the hard limit of open files is too low to lower the soft one under it");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let db = common::sqlite_url(dir.path());
    let toml = common::config_toml(&db, "http://127.0.0.1:9", common::ANY_PORTS);
    // systemd starts services with a soft limit of 1024 under a far higher hard one.
    let limit = format!("--nofile={soft}:{hard}");
    let mut child =
        common::Process::start_wrapped(dir.path(), &toml, common::ANY_PORTS, &["prlimit", &limit, "--"]);
    child.wait_for("/health").await;
    assert_eq!(open_files_limits(child.pid()), (hard, hard), "{}", child.log_text());
    assert!(child.log_text().contains("open files limit"), "{}", child.log_text());
    assert_eq!(child.terminate().await.code(), Some(0));
}
