//! TURN credentials from Switchboard and from Synapse's own `/voip/turnServer` are interchangeable
//! when both hold the same shared secret: same username form, same password function.

mod common;

use reqwest::StatusCode;
use serde_json::Value;
use switchboard::turn::credentials;

const URI: &str = "turn:127.0.0.1:3478?transport=udp";

#[tokio::test]
async fn switchboard_and_synapse_mint_the_same_kind_of_credentials() {
    let dir = tempfile::tempdir().unwrap();
    let args = ["--turn-shared-secret", common::TURN_SECRET, "--turn-uri", URI, "--turn-user-lifetime", "1h"];
    let Some(synapse) = common::Synapse::start_with(&[], common::free_port(), &args).await else { return };
    let mut config = common::config(&common::sqlite_url(dir.path()), &synapse.base_url);
    config.turn.uris = vec![URI.to_owned()];
    config.turn.user_lifetime_secs = 3600;
    let running = common::start(config).await;
    let user = synapse.register("alice").await;

    let from_synapse =
        synapse.call(&user, reqwest::Method::GET, "/_matrix/client/v3/voip/turnServer", &Value::Null).await;
    let url = format!("http://{}/_switchboard/client/v1/turn", running.client);
    let http = reqwest::Client::new();
    let response = http.get(&url).bearer_auth(&user.access_token).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let from_switchboard: Value = response.json().await.unwrap();

    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    for (who, answer) in [("synapse", &from_synapse), ("switchboard", &from_switchboard)] {
        let username = answer["username"].as_str().unwrap();
        let (expiry, user_id) = username.split_once(':').unwrap();
        assert_eq!(user_id, user.user_id, "{who}: {answer}");
        let expiry: u64 = expiry.parse().unwrap();
        assert!(expiry.abs_diff(now + 3600) <= 5, "{who}: expires in an hour: {answer}");
        assert_eq!(credentials::expiry(username), Some(expiry));
        // The same password function: a relay holding the secret accepts both.
        assert_eq!(
            answer["password"],
            credentials::password(common::TURN_SECRET.as_bytes(), username),
            "{who}"
        );
        assert_eq!(answer["uris"], serde_json::json!([URI]), "{who}");
        assert_eq!(answer["ttl"], 3600, "{who}");
    }

    // Only users of the homeserver get credentials.
    let response = http.get(&url).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(response.json::<Value>().await.unwrap()["errcode"], "M_MISSING_TOKEN");
    let response = http.get(&url).bearer_auth("nope").send().await.unwrap();
    assert_eq!(response.json::<Value>().await.unwrap()["errcode"], "M_UNKNOWN_TOKEN");
    running.stop().await.unwrap();

    // External mode: no relay here, credentials for relays (a coturn fleet) that share the secret.
    let mut external = common::config(&common::sqlite_url(dir.path()), &synapse.base_url);
    external.turn.mode = switchboard::config::TurnMode::External;
    external.turn.uris = vec!["turn:turn.example.org:3478".to_owned()];
    let running = common::start(external).await;
    assert!(running.turn.is_none(), "no relay listener in external mode");
    let url = format!("http://{}/_switchboard/client/v1/turn", running.client);
    let answer: Value =
        http.get(&url).bearer_auth(&user.access_token).send().await.unwrap().json().await.unwrap();
    let username = answer["username"].as_str().unwrap();
    assert_eq!(answer["password"], credentials::password(common::TURN_SECRET.as_bytes(), username));
    assert_eq!(answer["uris"], serde_json::json!(["turn:turn.example.org:3478"]));
    running.stop().await.unwrap();

    // Off: neither a relay nor credentials.
    let mut off = common::config(&common::sqlite_url(dir.path()), &synapse.base_url);
    off.turn.mode = switchboard::config::TurnMode::Off;
    let running = common::start(off).await;
    assert!(running.turn.is_none());
    let url = format!("http://{}/_switchboard/client/v1/turn", running.client);
    let response = http.get(&url).bearer_auth(&user.access_token).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    assert_eq!(response.json::<Value>().await.unwrap()["errcode"], "M_NOT_FOUND");
    running.stop().await.unwrap();
}
