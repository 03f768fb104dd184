//! The appservice API over real TCP: authentication, bad input, replay, queries and legacy paths.

mod common;

use std::sync::Arc;

use reqwest::StatusCode;
use serde_json::{Value, json};
use switchboard::store::Store;

use common::{HS_TOKEN, Running};

async fn start() -> (tempfile::TempDir, Running) {
    let dir = tempfile::tempdir().unwrap();
    let running = start_on(&common::sqlite_url(dir.path())).await;
    (dir, running)
}

async fn start_on(database_url: &str) -> Running {
    // The homeserver is down (nothing listens there): Switchboard must serve anyway.
    common::start(common::config(database_url, "http://127.0.0.1:9")).await
}

async fn stored(dir: &tempfile::TempDir) -> usize {
    let store = Arc::new(Store::connect(&common::sqlite_url(dir.path()), 1).await.unwrap());
    let count = store.items_after(0, 10_000).await.unwrap().len();
    store.close().await;
    count
}

fn transaction(n: usize) -> Value {
    let events: Vec<Value> = (0..n)
        .map(|i| {
            json!({
                "type": "m.room.message", "event_id": format!("$event{i}"), "room_id": "!room",
                "sender": "@alice:localhost", "content": { "msgtype": "m.text", "body": format!("hello {i}") },
                "origin_server_ts": 1_700_000_000_000_u64,
            })
        })
        .collect();
    json!({
        "events": events,
        "ephemeral": [{ "type": "m.presence", "sender": "@0xab:localhost", "content": { "presence": "online" } }],
        "de.sorunome.msc2409.ephemeral": [{ "type": "m.presence", "sender": "@0xab:localhost", "content": { "presence": "online" } }],
        "de.sorunome.msc2409.to_device": [{
            "type": "m.room.message", "sender": "@alice:localhost", "to_user_id": "@0xab:localhost",
            "to_device_id": "RAIDEN", "content": { "msgtype": "m.notice", "body": "{}" },
        }],
    })
}

async fn put(running: &Running, txn: &str, token: Option<&str>, body: reqwest::Body) -> (StatusCode, Value) {
    let mut request = reqwest::Client::new()
        .put(running.appservice_url(&format!("/_matrix/app/v1/transactions/{txn}")))
        .header("content-type", "application/json")
        .body(body);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.unwrap();
    let status = response.status();
    (status, response.json().await.unwrap_or(Value::Null))
}

fn json_body(value: &Value) -> reqwest::Body {
    reqwest::Body::from(serde_json::to_vec(value).unwrap())
}

#[tokio::test]
async fn transaction_is_stored_and_replay_is_not_processed_twice() {
    let (dir, running) = start().await;
    let body = transaction(3);
    assert_eq!(put(&running, "1", Some(HS_TOKEN), json_body(&body)).await, (StatusCode::OK, json!({})));
    // 3 events + 1 presence (the MSC2409 duplicate is not stored twice) + 1 to-device.
    assert_eq!(stored(&dir).await, 5);
    assert_eq!(put(&running, "1", Some(HS_TOKEN), json_body(&body)).await, (StatusCode::OK, json!({})));
    assert_eq!(stored(&dir).await, 5, "a replayed transaction id is not processed again");

    let metrics = running.metrics().await;
    assert_eq!(common::metric(&metrics, "switchboard_appservice_transactions_received_total"), 1);
    assert_eq!(common::metric(&metrics, "switchboard_appservice_transactions_duplicate_total"), 1);
    assert_eq!(common::metric(&metrics, "switchboard_appservice_items_stored_total{kind=\"event\"}"), 3);
    assert_eq!(common::metric(&metrics, "switchboard_appservice_items_stored_total{kind=\"to_device\"}"), 1);
    running.stop().await.unwrap();
}

/// Synapse's retry of a transaction carries the same events (with a newer `unsigned.age`) and drops
/// its ephemeral data and to-device messages; an id reused after a homeserver reset carries other
/// events. The first stores nothing new, the second is stored.
#[tokio::test]
async fn retries_add_nothing_and_a_reused_id_with_new_events_is_stored() {
    let (dir, running) = start().await;
    let original = transaction(2);
    assert_eq!(put(&running, "5", Some(HS_TOKEN), json_body(&original)).await.0, StatusCode::OK);
    assert_eq!(stored(&dir).await, 4);

    let mut retry = json!({ "events": original["events"].clone() });
    retry["events"][0]["unsigned"] = json!({ "age": 12_345 });
    assert_eq!(put(&running, "5", Some(HS_TOKEN), json_body(&retry)).await.0, StatusCode::OK);
    assert_eq!(stored(&dir).await, 4, "a retry adds nothing");

    let mut after_reset = transaction(1);
    after_reset["events"][0]["event_id"] = json!("$after-reset");
    after_reset["ephemeral"] = json!([]);
    after_reset["de.sorunome.msc2409.ephemeral"] = json!([]);
    after_reset["de.sorunome.msc2409.to_device"] = json!([]);
    assert_eq!(put(&running, "5", Some(HS_TOKEN), json_body(&after_reset)).await.0, StatusCode::OK);
    assert_eq!(stored(&dir).await, 5, "the new event under a reused id is stored");
    let metrics = running.metrics().await;
    assert_eq!(common::metric(&metrics, "switchboard_appservice_transactions_reused_id_total"), 1);
    running.stop().await.unwrap();
}

#[tokio::test]
async fn replay_is_recognised_across_a_restart() {
    let (dir, running) = start().await;
    let body = transaction(2);
    assert_eq!(put(&running, "7", Some(HS_TOKEN), json_body(&body)).await.0, StatusCode::OK);
    running.stop().await.unwrap();

    let config = common::config(&common::sqlite_url(dir.path()), "http://127.0.0.1:9");
    let running = common::start(config).await;
    assert_eq!(put(&running, "7", Some(HS_TOKEN), json_body(&body)).await.0, StatusCode::OK);
    assert_eq!(stored(&dir).await, 4);
    let metrics = running.metrics().await;
    assert_eq!(common::metric(&metrics, "switchboard_appservice_transactions_duplicate_total"), 1);
    running.stop().await.unwrap();
}

#[tokio::test]
async fn missing_token_is_401_and_wrong_token_is_403_and_nothing_is_stored() {
    let (dir, running) = start().await;
    let body = transaction(1);
    let (status, error) = put(&running, "1", None, json_body(&body)).await;
    assert_eq!((status, error["errcode"].as_str()), (StatusCode::UNAUTHORIZED, Some("M_UNAUTHORIZED")));
    let (status, error) = put(&running, "1", Some("wrong-token"), json_body(&body)).await;
    assert_eq!((status, error["errcode"].as_str()), (StatusCode::FORBIDDEN, Some("M_FORBIDDEN")));
    let (status, _) = put(&running, "1", Some(&HS_TOKEN[..HS_TOKEN.len() - 1]), json_body(&body)).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "a prefix of the token is not the token");
    assert_eq!(stored(&dir).await, 0);

    // The legacy query parameter is accepted too.
    let url = running.appservice_url(&format!("/_matrix/app/v1/transactions/2?access_token={HS_TOKEN}"));
    let response = reqwest::Client::new().put(url).json(&body).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(stored(&dir).await, 3);

    let metrics = running.metrics().await;
    assert_eq!(
        common::metric(&metrics, "switchboard_appservice_requests_rejected_total{reason=\"missing_token\"}"),
        1
    );
    assert_eq!(
        common::metric(&metrics, "switchboard_appservice_requests_rejected_total{reason=\"wrong_token\"}"),
        2
    );
    running.stop().await.unwrap();
}

#[tokio::test]
async fn bad_bodies_get_matrix_errors_and_nothing_is_stored() {
    let (dir, running) = start().await;
    let cases: [(&str, &[u8], StatusCode, &str); 6] = [
        ("not-json", b"{not json", StatusCode::BAD_REQUEST, "M_NOT_JSON"),
        ("truncated", br#"{"events": [{"type": "m.room.message""#, StatusCode::BAD_REQUEST, "M_NOT_JSON"),
        ("empty", b"", StatusCode::BAD_REQUEST, "M_NOT_JSON"),
        ("array", b"[]", StatusCode::BAD_REQUEST, "M_BAD_JSON"),
        ("events-not-array", br#"{"events": {}}"#, StatusCode::BAD_REQUEST, "M_BAD_JSON"),
        ("ephemeral-not-array", br#"{"events": [], "ephemeral": 5}"#, StatusCode::BAD_REQUEST, "M_BAD_JSON"),
    ];
    for (txn, body, status, errcode) in cases {
        let (got, error) = put(&running, txn, Some(HS_TOKEN), reqwest::Body::from(body.to_vec())).await;
        assert_eq!((got, error["errcode"].as_str()), (status, Some(errcode)), "case {txn}: {error}");
        assert!(error["error"].is_string(), "case {txn} explains itself");
    }
    // Over the limit (1 MiB in the test config): 413, whether or not the length is announced.
    let big = json!({ "events": [{ "type": "t", "content": { "body": "x".repeat(1_100_000) } }] });
    let (status, error) = put(&running, "big", Some(HS_TOKEN), json_body(&big)).await;
    assert_eq!((status, error["errcode"].as_str()), (StatusCode::PAYLOAD_TOO_LARGE, Some("M_TOO_LARGE")));
    let status_line = chunked_put(&running, "big-chunked", &serde_json::to_vec(&big).unwrap()).await;
    assert!(status_line.starts_with("HTTP/1.1 413"), "{status_line}");

    // Transaction ids that no homeserver sends (and PostgreSQL could not hold).
    for txn in ["a%00b", &"9".repeat(300)] {
        let (status, error) = put(&running, txn, Some(HS_TOKEN), json_body(&transaction(1))).await;
        assert_eq!(
            (status, error["errcode"].as_str()),
            (StatusCode::BAD_REQUEST, Some("M_INVALID_PARAM")),
            "{txn}"
        );
    }

    assert_eq!(stored(&dir).await, 0);
    // A rejected transaction id was not recorded: a correct retry with the same id is stored.
    let (status, _) = put(&running, "not-json", Some(HS_TOKEN), json_body(&transaction(1))).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(stored(&dir).await, 3);
    running.stop().await.unwrap();
}

#[tokio::test]
async fn queries_ping_thirdparty_and_legacy_paths_answer_as_the_spec_says() {
    let (dir, running) = start().await;
    let client = reqwest::Client::new();
    let get = |path: &str| client.get(running.appservice_url(path)).bearer_auth(HS_TOKEN).send();
    for path in [
        "/_matrix/app/v1/users/%400x6e46b62a245d9ee7758b8dd4b3f7e6f8fe4fec40%3Alocalhost",
        "/users/%40alice%3Alocalhost",
        "/_matrix/app/v1/rooms/%23room%3Alocalhost",
        "/rooms/%23room%3Alocalhost",
        "/_matrix/app/v1/thirdparty/protocol/irc",
        "/_matrix/app/v1/thirdparty/user/irc",
        "/_matrix/app/v1/thirdparty/location?alias=%23a%3Alocalhost",
        "/_matrix/app/unstable/thirdparty/protocol/irc",
    ] {
        let response = get(path).await.unwrap();
        assert_eq!(response.status(), StatusCode::NOT_FOUND, "{path}");
        let error: Value = response.json().await.unwrap();
        assert_eq!(error["errcode"], "M_NOT_FOUND", "{path}");
    }
    // Queries need the token like everything else.
    let response =
        client.get(running.appservice_url("/_matrix/app/v1/users/%40a%3Alocalhost")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);

    let ping = client
        .post(running.appservice_url("/_matrix/app/v1/ping"))
        .bearer_auth(HS_TOKEN)
        .json(&json!({ "transaction_id": "abc" }))
        .send()
        .await
        .unwrap();
    assert_eq!(ping.status(), StatusCode::OK);
    assert_eq!(ping.json::<Value>().await.unwrap(), json!({}));

    let legacy = client
        .put(running.appservice_url("/transactions/legacy-1"))
        .bearer_auth(HS_TOKEN)
        .json(&transaction(1))
        .send()
        .await
        .unwrap();
    assert_eq!(legacy.status(), StatusCode::OK);
    assert_eq!(stored(&dir).await, 3);

    let unknown = client.get(running.appservice_url("/_matrix/app/v1/nope")).send().await.unwrap();
    assert_eq!(unknown.status(), StatusCode::NOT_FOUND);
    assert_eq!(unknown.json::<Value>().await.unwrap()["errcode"], "M_UNRECOGNIZED");
    let wrong_method = client
        .get(running.appservice_url("/_matrix/app/v1/ping"))
        .bearer_auth(HS_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(wrong_method.status(), StatusCode::METHOD_NOT_ALLOWED);
    running.stop().await.unwrap();
}

#[tokio::test]
async fn ready_reports_an_unreachable_homeserver_while_health_is_ok() {
    let (_dir, running) = start().await;
    let health = reqwest::get(running.ops_url("/health")).await.unwrap();
    assert_eq!(health.status(), StatusCode::OK);
    let ready =
        common::eventually(std::time::Duration::from_secs(10), "a first homeserver check", || async {
            let response = reqwest::get(running.ops_url("/ready")).await.ok()?;
            let status = response.status();
            let body: Value = response.json().await.ok()?;
            body["homeserver"]["last_error"].is_string().then_some((status, body))
        })
        .await;
    assert_eq!(ready.0, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(ready.1["ready"], false);
    assert_eq!(ready.1["database"]["ok"], true);
    assert_eq!(ready.1["homeserver"]["reachable"], false);
    let metrics = reqwest::get(running.ops_url("/metrics")).await.unwrap().text().await.unwrap();
    assert!(metrics.contains("# TYPE switchboard_appservice_transactions_received counter"), "{metrics}");
    assert!(metrics.ends_with("# EOF\n"));
    running.stop().await.unwrap();
}

/// PUTs `body` with `Transfer-Encoding: chunked` (no announced length) and returns the status line.
async fn chunked_put(running: &Running, txn: &str, body: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(running.appservice).await.unwrap();
    let head = format!(
        "PUT /_matrix/app/v1/transactions/{txn} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {HS_TOKEN}\r\n\
         Content-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    for chunk in body.chunks(64 * 1024) {
        // The server may answer 413 and close before everything is written.
        if stream.write_all(format!("{:x}\r\n", chunk.len()).as_bytes()).await.is_err()
            || stream.write_all(chunk).await.is_err()
            || stream.write_all(b"\r\n").await.is_err()
        {
            break;
        }
    }
    let _ = stream.write_all(b"0\r\n\r\n").await;
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer).await;
    String::from_utf8_lossy(&answer).lines().next().unwrap_or_default().to_owned()
}

/// Mangled transactions (truncated, bytes flipped, spliced) never get a 5xx or crash the server,
/// on either backend: each is stored (200) or refused with a Matrix error (400/413).
#[tokio::test]
async fn mangled_transactions_never_get_a_server_error() {
    let dir = tempfile::tempdir().unwrap();
    for (_backend, url) in common::backends(dir.path()).await {
        mangle_against(start_on(&url).await).await;
    }
}

async fn mangle_against(running: Running) {
    use rand::{Rng, SeedableRng};
    let client = reqwest::Client::new();
    let valid = serde_json::to_vec(&transaction(3)).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5357_4244);
    let mut statuses = std::collections::BTreeMap::new();
    for n in 0..400 {
        let mut body = valid.clone();
        match n % 4 {
            0 => body.truncate(rng.random_range(0..body.len())),
            1 => {
                for _ in 0..rng.random_range(1..8) {
                    let at = rng.random_range(0..body.len());
                    body[at] = rng.random();
                }
            }
            2 => {
                let at = rng.random_range(0..body.len());
                let insert: &[u8] =
                    [&b"null"[..], b"[]", b"{}", b"\"\\ud800\"", b"1e999", b",", b"\xff"][n % 7];
                body.splice(at..at, insert.iter().copied());
            }
            _ => {
                let from = rng.random_range(0..body.len());
                let to = rng.random_range(from..body.len());
                body.drain(from..to);
            }
        }
        let response = client
            .put(running.appservice_url(&format!("/_matrix/app/v1/transactions/mangled-{n}")))
            .bearer_auth(HS_TOKEN)
            .body(body)
            .send()
            .await
            .expect("the server answers every request");
        let status = response.status();
        assert!(matches!(status.as_u16(), 200 | 400 | 413), "mangled body {n}: {status}");
        if status != StatusCode::OK {
            let error: Value = response.json().await.expect("errors are JSON");
            assert!(error["errcode"].as_str().is_some_and(|c| c.starts_with("M_")), "{error}");
        }
        *statuses.entry(status.as_u16()).or_insert(0) += 1;
    }
    assert!(statuses.get(&400).copied().unwrap_or(0) > 100, "most mangled bodies are refused: {statuses:?}");
    // The server is still healthy and stores a good transaction.
    assert_eq!(put(&running, "after", Some(HS_TOKEN), json_body(&transaction(1))).await.0, StatusCode::OK);
    running.stop().await.unwrap();
}

/// Odd items never refuse a transaction (Synapse would retry it forever and hold every later event
/// behind it): objects are stored with their odd fields left unindexed, non-objects are skipped.
#[tokio::test]
async fn odd_items_are_stored_or_skipped_without_refusing_the_transaction() {
    let dir = tempfile::tempdir().unwrap();
    for (backend, url) in common::backends(dir.path()).await {
        let running = start_on(&url).await;
        let long_id = format!("${}", "e".repeat(300));
        let body = json!({
            "events": [
                { "event_id": "$no-type", "content": {} },
                { "type": "m.room.message", "sender": 5, "event_id": "$sender-number" },
                { "type": "m.room.message", "sender": "@a\u{0}:x", "event_id": "$nul" },
                { "type": "m.room.message", "event_id": long_id },
                ["not", "an", "object"],
                "a string",
            ],
            "ephemeral": [null],
        });
        assert_eq!(
            put(&running, "odd", Some(HS_TOKEN), json_body(&body)).await,
            (StatusCode::OK, json!({})),
            "{backend}"
        );
        let items = common::stored_items(&url).await;
        assert_eq!(items.len(), 4, "{backend}: the four objects are stored");
        assert_eq!(items[0].event_type, "", "{backend}");
        assert_eq!(items[0].event_id.as_deref(), Some("$no-type"));
        assert_eq!(items[1].sender, None, "{backend}: a non-string sender is not indexed");
        assert_eq!(items[2].sender, None, "{backend}: a sender with NUL is not indexed");
        assert_eq!(items[2].event_id.as_deref(), Some("$nul"));
        assert_eq!(items[3].event_id, None, "{backend}: an over-long id is not indexed");
        let sent: Value = serde_json::from_str(items[2].body.get()).unwrap();
        assert_eq!(sent["sender"], "@a\u{0}:x", "{backend}: the body is kept as sent");
        let metrics = running.metrics().await;
        assert_eq!(common::metric(&metrics, "switchboard_appservice_items_skipped_total"), 3, "{backend}");
        running.stop().await.unwrap();
    }
}
