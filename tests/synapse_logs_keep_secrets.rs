//! A whole run at debug level, against a real Synapse, logs no token or secret: not the
//! appservice's tokens, not a client's Matrix access token, not a TURN password it was given; and
//! nothing at info level or above names a client's IP address.

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

    // A client from its own loopback address: directory and TURN credentials with its Matrix
    // token, a look-up with an unknown token, then STUN and an unauthenticated Allocate to the relay.
    let client_ip = std::net::IpAddr::from([127, 0, 0, 77]);
    let client = reqwest::Client::builder().local_address(client_ip).build().unwrap();
    let client_api = format!("http://127.0.0.1:{}/_switchboard/client/v1", ports[1]);
    let turn =
        client.get(format!("{client_api}/turn")).bearer_auth(&raiden.access_token).send().await.unwrap();
    assert_eq!(turn.status(), 200);
    let turn: Value = turn.json().await.unwrap();
    let turn_password = turn["password"].as_str().unwrap().to_owned();
    let peer = format!("{client_api}/peers/0x{}", "ab".repeat(20));
    let known = client.get(&peer).bearer_auth(&raiden.access_token).send().await.unwrap();
    assert!(known.status() == 200 || known.status() == 404, "{}", known.status());
    let leaked_client_token = "syt_unknown-client-token-that-must-not-be-logged";
    let unknown = client.get(&peer).bearer_auth(leaked_client_token).send().await.unwrap();
    assert_eq!(unknown.status(), 401);
    let relay = turn["uris"][0].as_str().unwrap(); // turn:127.0.0.1:PORT?transport=udp
    let relay: std::net::SocketAddr = relay["turn:".len()..].split('?').next().unwrap().parse().unwrap();
    let socket = tokio::net::UdpSocket::bind((client_ip, 0)).await.unwrap();
    for method in [0x0001_u16, 0x0003] {
        // A Binding, then an Allocate without credentials (answered 401).
        let mut request = method.to_be_bytes().to_vec();
        request.extend_from_slice(&[0, 0, 0x21, 0x12, 0xA4, 0x42]);
        request.extend_from_slice(&rand::random::<[u8; 12]>());
        socket.send_to(&request, relay).await.unwrap();
        let mut answer = [0u8; 1500];
        tokio::time::timeout(Duration::from_secs(10), socket.recv_from(&mut answer))
            .await
            .expect("the relay answers")
            .unwrap();
    }

    let log_path = switchboard.log.clone();
    assert!(switchboard.terminate().await.success());
    let log = std::fs::read_to_string(&log_path).unwrap();
    for secret in [
        common::AS_TOKEN,
        common::HS_TOKEN,
        common::TURN_SECRET,
        leaked_wrong_token,
        &raiden.access_token,
        leaked_client_token,
        &turn_password,
    ] {
        assert!(!log.contains(secret), "a secret appears in the logs: {secret}");
    }
    // The logs are not empty: JSON lines that tell the story of the run.
    let lines: Vec<Value> =
        log.lines().map(|l| serde_json::from_str(l).expect("every line is JSON")).collect();
    let client_ip = client_ip.to_string();
    for line in &lines {
        let level = line["level"].as_str().unwrap_or_default();
        if level != "DEBUG" && level != "TRACE" {
            assert!(!line.to_string().contains(&client_ip), "a client's address logged at {level}: {line}");
        }
    }
    let messages: Vec<&str> = lines.iter().filter_map(|l| l["message"].as_str()).collect();
    assert!(messages.iter().any(|m| m.contains("switchboard.start")), "{messages:?}");
    assert!(messages.iter().any(|m| m.contains("appservice.transaction stored")), "{messages:?}");
    assert!(messages.iter().any(|m| m.contains("wrong homeserver token")), "{messages:?}");
    assert!(messages.iter().any(|m| m.contains("stopped cleanly")), "{messages:?}");
}
