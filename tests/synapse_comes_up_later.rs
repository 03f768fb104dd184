//! Switchboard starts while the homeserver is down, says so in `/ready`, and becomes ready on its own
//! (retrying with backoff) once the homeserver comes up.

mod common;

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::Value;

async fn ready(running: &common::Running) -> (StatusCode, Value) {
    let response = reqwest::get(running.ops_url("/ready")).await.unwrap();
    (response.status(), response.json().await.unwrap())
}

#[tokio::test]
async fn switchboard_becomes_ready_when_the_homeserver_comes_up() {
    let dir = tempfile::tempdir().unwrap();
    let synapse_port = common::free_port();
    let mut config =
        common::config(&common::sqlite_url(dir.path()), &format!("http://127.0.0.1:{synapse_port}"));
    let listeners = common::bind(&config).await;
    config.appservice.url = format!("http://{}", listeners.appservice.local_addr().unwrap()).parse().unwrap();
    let registration = dir.path().join("registration.yaml");
    std::fs::write(&registration, switchboard::appservice::registration::render(&config)).unwrap();
    let running = common::start_on(config, listeners);
    running.wait_listening().await;

    let (status, body) = common::eventually(Duration::from_secs(10), "a first failed check", || async {
        let (status, body) = ready(&running).await;
        body["homeserver"]["last_error"].is_string().then_some((status, body))
    })
    .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["homeserver"]["reachable"], false);

    let Some(_synapse) = common::Synapse::start_on_port(&[&registration], synapse_port).await else { return };
    // Backoff is 1, 2, 4, 8, 16 s: the next retry comes within ~16 s of Synapse being up.
    let body = common::eventually(Duration::from_secs(45), "ready after the homeserver came up", || async {
        let (status, body) = ready(&running).await;
        (status == StatusCode::OK).then_some(body)
    })
    .await;
    assert_eq!(body["homeserver"]["reachable"], true);
    assert!(body["homeserver"]["appservice_ping_ms"].is_u64(), "{body}");
    running.stop().await.unwrap();
}
