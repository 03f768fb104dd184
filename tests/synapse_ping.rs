//! Synapse's appservice ping round-trips through Switchboard, in both directions.

mod common;

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::Value;

#[tokio::test]
async fn ping_round_trips_and_fails_when_switchboard_is_down() {
    let dir = tempfile::tempdir().unwrap();
    let Some((synapse, running)) = common::with_synapse(&common::sqlite_url(dir.path()), None).await else {
        return;
    };

    // Synapse → Switchboard, asked by a client holding the as_token.
    let (status, pong) = synapse.ping_appservice().await;
    assert_eq!(status, StatusCode::OK, "{pong}");
    assert!(pong["duration_ms"].is_u64(), "{pong}");

    // Switchboard's own start-up ping makes it ready, with the round-trip Synapse measured.
    let ready: Value = common::eventually(Duration::from_secs(20), "/ready", || async {
        let response = reqwest::get(running.ops_url("/ready")).await.ok()?;
        (response.status() == StatusCode::OK).then_some(())?;
        response.json().await.ok()
    })
    .await;
    assert_eq!(ready["ready"], true);
    assert!(ready["homeserver"]["appservice_ping_ms"].is_u64(), "{ready}");
    assert!(ready["homeserver"]["last_error"].is_null(), "{ready}");

    // On demand, through the ops listener.
    let on_demand = reqwest::Client::new().post(running.ops_url("/ping")).send().await.unwrap();
    assert_eq!(on_demand.status(), StatusCode::OK);
    let on_demand: Value = on_demand.json().await.unwrap();
    assert!(on_demand["appservice_ping_ms"].is_u64(), "{on_demand}");

    // With Switchboard stopped, Synapse reports that it cannot reach it.
    running.stop().await.unwrap();
    let (status, error) = synapse.ping_appservice().await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{error}");
    assert_eq!(error["errcode"], "M_CONNECTION_FAILED");
}
