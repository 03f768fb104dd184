//! A whole run at debug level, against a real Synapse, logs no token or secret.

mod common;

use std::time::Duration;

use serde_json::{Value, json};

#[tokio::test]
async fn debug_logs_of_a_full_run_contain_no_secret() {
    let dir = tempfile::tempdir().unwrap();
    let db = common::sqlite_url(dir.path());
    let debug_json = |toml: String| {
        toml.replace("level = \"info,switchboard=debug\"", "level = \"debug\"\nformat = \"json\"")
    };
    let Some((synapse, switchboard)) = common::synapse_and_process(dir.path(), &db, debug_json).await else {
        return;
    };
    let ports = switchboard.ports;

    // Exercise every path that handles a token: the start-up ping and registration (as_token),
    // transactions (hs_token), refused requests with wrong tokens in the header and the query.
    let ready = format!("http://127.0.0.1:{}/ready", ports[2]);
    common::eventually(Duration::from_secs(30), "switchboard ready", || async {
        reqwest::get(&ready).await.ok().filter(|r| r.status().is_success())
    })
    .await;
    assert!(synapse.ping_appservice().await.0.is_success());
    let raiden = synapse.register(&common::raiden_localpart()).await;
    let alice = synapse.register("alice").await;
    let room_id = synapse.shared_room(&alice, &[&raiden]).await;
    let event_id = synapse.send_text(&alice, &room_id, "t1", "hello").await;
    common::eventually(Duration::from_secs(30), "the message stored", || async {
        common::stored_items(&db).await.iter().any(|i| i.event_id.as_deref() == Some(&event_id)).then_some(())
    })
    .await;
    let leaked_wrong_token = "wrong-token-that-must-not-be-logged-0123456789";
    let http = reqwest::Client::new();
    let url = format!(
        "http://127.0.0.1:{}/_matrix/app/v1/transactions/x?access_token={leaked_wrong_token}",
        ports[0]
    );
    assert_eq!(http.put(&url).json(&json!({})).send().await.unwrap().status(), 403);
    let url = format!("http://127.0.0.1:{}/_matrix/app/v1/transactions/y", ports[0]);
    let refused = http.put(&url).bearer_auth(leaked_wrong_token).json(&json!({})).send().await.unwrap();
    assert_eq!(refused.status(), 403);

    let log_path = switchboard.log.clone();
    assert!(switchboard.terminate().await.success());
    let log = std::fs::read_to_string(&log_path).unwrap();
    for secret in [common::AS_TOKEN, common::HS_TOKEN, common::TURN_SECRET, leaked_wrong_token] {
        assert!(!log.contains(secret), "a secret appears in the logs: {secret}");
    }
    // The logs are not empty: JSON lines that tell the story of the run.
    let lines: Vec<Value> =
        log.lines().map(|l| serde_json::from_str(l).expect("every line is JSON")).collect();
    let messages: Vec<&str> = lines.iter().filter_map(|l| l["message"].as_str()).collect();
    assert!(messages.iter().any(|m| m.contains("switchboard.start")), "{messages:?}");
    assert!(messages.iter().any(|m| m.contains("appservice.transaction stored")), "{messages:?}");
    assert!(messages.iter().any(|m| m.contains("wrong homeserver token")), "{messages:?}");
    assert!(messages.iter().any(|m| m.contains("stopped cleanly")), "{messages:?}");
}
