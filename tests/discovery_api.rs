//! The discovery API's own rules, with the homeserver down: authentication (and the anonymous-read
//! switch), address validation and query limits. Discovery through a real Synapse is in
//! synapse_directory.rs.

mod common;

use reqwest::StatusCode;
use serde_json::{Value, json};

const ADDRESS: &str = "0x2c7536E3605D9C16a7a3D7b1898e529396a65c23";

async fn get(running: &common::Running, path: &str, token: Option<&str>) -> (StatusCode, Value) {
    let mut request =
        reqwest::Client::new().get(format!("http://{}/_switchboard/client/v1{path}", running.client));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.unwrap();
    (response.status(), response.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn anonymous_reads_only_when_allowed_and_tokens_are_checked_when_given() {
    let dir = tempfile::tempdir().unwrap();
    let config = common::config(&common::sqlite_url(dir.path()), "http://127.0.0.1:9");
    let closed = common::start(config.clone()).await;
    let (status, error) = get(&closed, &format!("/peers/{ADDRESS}"), None).await;
    assert_eq!((status, error["errcode"].as_str()), (StatusCode::UNAUTHORIZED, Some("M_MISSING_TOKEN")));
    // The homeserver is down: a token cannot be checked, and the client is told so.
    let (status, error) = get(&closed, &format!("/peers/{ADDRESS}"), Some("some-token")).await;
    assert_eq!((status, error["errcode"].as_str()), (StatusCode::SERVICE_UNAVAILABLE, Some("M_UNKNOWN")));
    closed.stop().await.unwrap();

    let mut open = config;
    open.directory.anonymous_read = true;
    let open = common::start(open).await;
    let (status, peer) = get(&open, &format!("/peers/{}", ADDRESS.to_lowercase()), None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(peer, json!({ "address": ADDRESS, "reachable": false, "users": [] }));
    let (status, error) = get(&open, &format!("/address/{ADDRESS}/metadata"), None).await;
    assert_eq!((status, error["errcode"].as_str()), (StatusCode::NOT_FOUND, Some("M_NOT_FOUND")));
    open.stop().await.unwrap();
}

#[tokio::test]
async fn invalid_addresses_and_oversized_queries_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = common::config(&common::sqlite_url(dir.path()), "http://127.0.0.1:9");
    config.directory.anonymous_read = true;
    let running = common::start(config).await;
    for bad in
        ["0x1234", "2c7536e3605d9c16a7a3d7b1898e529396a65c23", "0x2c7536E3605D9C16a7a3D7b1898e529396a65C23"]
    {
        let (status, error) = get(&running, &format!("/peers/{bad}"), None).await;
        assert_eq!(
            (status, error["errcode"].as_str()),
            (StatusCode::BAD_REQUEST, Some("M_INVALID_PARAM")),
            "{bad}"
        );
    }
    let query = |body: Value| {
        reqwest::Client::new()
            .post(format!("http://{}/_switchboard/client/v1/peers/query", running.client))
            .json(&body)
            .send()
    };
    let too_many: Vec<String> = (0..1001).map(|i| format!("0x{i:040x}")).collect();
    let response = query(json!({ "addresses": too_many })).await.unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    assert_eq!(response.json::<Value>().await.unwrap()["errcode"], "M_INVALID_PARAM");
    let response = query(json!({ "address": [ADDRESS] })).await.unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    assert_eq!(response.json::<Value>().await.unwrap()["errcode"], "M_BAD_JSON");
    let answer: Value = query(json!({ "addresses": [ADDRESS] })).await.unwrap().json().await.unwrap();
    assert_eq!(answer[ADDRESS]["users"], json!([]));
    running.stop().await.unwrap();
}
