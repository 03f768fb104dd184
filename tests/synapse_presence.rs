//! Presence and profiles against a real Synapse: an address nobody has seen is looked up on the
//! homeserver when a client asks for it; presence online → offline shows through the API; a
//! presence change lost while Switchboard was down is corrected by reconciliation after a restart;
//! and a restart keeps the directory without asking the homeserver.

mod common;

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

/// The eth-account example key's address, and its `personal_sign` of the user id on "localhost".
const LOCALPART: &str = "0x2c7536e3605d9c16a7a3d7b1898e529396a65c23";
const CHECKSUMMED: &str = "0x2c7536E3605D9C16a7a3D7b1898e529396a65c23";
const SIGNATURE: &str = "0xb0e955ff35d78250fcd1518aaffdf801964decc705ceba5efd205f5eea30e781\
                         6a6d0813ff5745c18c61350d6d747331d47d208f9b9ed5129e87c9bb05c0928e1b";
const CAPS: &str = "mxc://raiden.network/cap?Receive=1&webRTC=1&toDevice=1";

/// Registers the signed Raiden user and sets its profile, without joining any room (as Raiden 2.0+
/// nodes do): no event tells the appservice about it.
async fn signed_user(synapse: &common::Synapse) -> common::User {
    let user = synapse.register(LOCALPART).await;
    let profile =
        |field: &str| format!("/_matrix/client/v3/profile/{}/{field}", common::urlencode(&user.user_id));
    synapse.call(&user, Method::PUT, &profile("displayname"), &json!({ "displayname": SIGNATURE })).await;
    synapse.call(&user, Method::PUT, &profile("avatar_url"), &json!({ "avatar_url": CAPS })).await;
    user
}

async fn set_presence(synapse: &common::Synapse, user: &common::User, presence: &str) {
    let path = format!("/_matrix/client/v3/presence/{}/status", common::urlencode(&user.user_id));
    synapse.call(user, Method::PUT, &path, &json!({ "presence": presence })).await;
}

/// A client of Switchboard's discovery API on `client` (host:port), with `token`.
struct Api {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl Api {
    fn new(client: impl std::fmt::Display, token: &str) -> Self {
        Self {
            http: reqwest::Client::new(),
            base: format!("http://{client}/_switchboard/client/v1"),
            token: token.to_owned(),
        }
    }

    async fn get(&self, path: &str) -> (StatusCode, Value) {
        let response =
            self.http.get(format!("{}{path}", self.base)).bearer_auth(&self.token).send().await.unwrap();
        let status = response.status();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    async fn peer(&self, address: &str) -> Value {
        let (status, body) = self.get(&format!("/peers/{address}")).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body
    }
}

const PROFILE_FOUND: &str = r#"switchboard_directory_lookups_total{kind="profile",outcome="found"}"#;
const PROFILE_ABSENT: &str = r#"switchboard_directory_lookups_total{kind="profile",outcome="absent"}"#;
const PRESENCE_FOUND: &str = r#"switchboard_directory_lookups_total{kind="presence",outcome="found"}"#;

#[tokio::test]
async fn unknown_address_is_looked_up_when_asked_and_presence_shows_through_the_api() {
    let dir = tempfile::tempdir().unwrap();
    let db = common::sqlite_url(dir.path());
    let Some((synapse, running)) = common::with_synapse(&db, None).await else { return };
    let user = signed_user(&synapse).await;
    let api = Api::new(running.client, &user.access_token);

    // Nothing told Switchboard about this user: asking for its address looks it up on the homeserver.
    let peer = api.peer(CHECKSUMMED).await;
    assert_eq!(peer["users"][0]["user_id"], user.user_id.as_str(), "{peer}");
    assert_eq!(peer["users"][0]["verified"], true);
    assert_eq!(
        peer["users"][0]["capabilities"],
        json!({ "Receive": true, "webRTC": true, "toDevice": true })
    );
    assert_eq!(peer["users"][0]["presence"], "offline", "it never synced");
    assert_eq!(peer["reachable"], false);
    let metrics = running.metrics().await;
    assert_eq!(common::metric(&metrics, PROFILE_FOUND), 1, "{metrics}");
    assert!(common::metric(&metrics, PRESENCE_FOUND) >= 1, "{metrics}");

    // An address with no user on the homeserver is looked up once, then the absence is cached.
    let nobody = "0x0000000000000000000000000000000000000001";
    for _ in 0..3 {
        let (status, _) = api.get(&format!("/address/{nobody}/metadata")).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
    }
    let metrics = running.metrics().await;
    assert_eq!(common::metric(&metrics, PROFILE_ABSENT), 1, "{metrics}");

    // Online: reachable, with the metadata Raiden's path-finding service answered.
    set_presence(&synapse, &user, "online").await;
    let metadata_path = format!("/address/{CHECKSUMMED}/metadata");
    let metadata = common::eventually(Duration::from_secs(10), "the user online", || async {
        let (status, body) = api.get(&metadata_path).await;
        (status == StatusCode::OK).then_some(body)
    })
    .await;
    assert_eq!(metadata, json!({ "user_id": user.user_id, "capabilities": CAPS, "displayname": SIGNATURE }));

    // Offline: no longer reachable, and the peer lists the user as offline.
    set_presence(&synapse, &user, "offline").await;
    let peer = common::eventually(Duration::from_secs(10), "the user offline", || async {
        let peer = api.peer(LOCALPART).await;
        (peer["users"][0]["presence"] == "offline").then_some(peer)
    })
    .await;
    assert_eq!(peer["reachable"], false);
    assert_eq!(api.get(&metadata_path).await.0, StatusCode::NOT_FOUND);
    running.stop().await.unwrap();
}

/// Synapse drops presence pushes while the appservice is down and never retries them. After a
/// restart, Switchboard asks the homeserver for the presence of users it had as online.
#[tokio::test]
async fn presence_lost_while_down_is_reconciled_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let db = common::sqlite_url(dir.path());
    let Some((synapse, mut switchboard)) = common::synapse_and_process(dir.path(), &db, |toml| toml).await
    else {
        return;
    };
    switchboard.wait_for("/ready").await;
    let user = signed_user(&synapse).await;
    let api = Api::new(format!("127.0.0.1:{}", switchboard.ports[1]), &user.access_token);
    set_presence(&synapse, &user, "online").await;
    let metadata_path = format!("/address/{CHECKSUMMED}/metadata");
    common::eventually(Duration::from_secs(10), "the user online", || async {
        (api.get(&metadata_path).await.0 == StatusCode::OK).then_some(())
    })
    .await;

    // Down: the first push fails (and Synapse marks the appservice down), the second is dropped.
    switchboard.kill();
    set_presence(&synapse, &user, "unavailable").await;
    let synapse_db = format!("sqlite://{}?mode=ro", synapse.dir.path().join("homeserver.db").display());
    common::eventually(Duration::from_secs(30), "Synapse to mark the appservice down", || async {
        let mut db = <sqlx::SqliteConnection as sqlx::Connection>::connect(&synapse_db).await.ok()?;
        let state: Option<String> = sqlx::query_scalar("SELECT state FROM application_services_state")
            .fetch_optional(&mut db)
            .await
            .ok()?;
        (state.as_deref() == Some("down")).then_some(())
    })
    .await;
    set_presence(&synapse, &user, "offline").await;
    switchboard.restart();
    switchboard.wait_for("/health").await;

    // The stored presence (online, fresh) comes back first; reconciliation corrects it.
    let peer = common::eventually(Duration::from_secs(15), "the presence reconciled", || async {
        let (status, peer) = api.get(&format!("/peers/{LOCALPART}")).await;
        (status == StatusCode::OK && peer["users"][0]["presence"] == "offline").then_some(peer)
    })
    .await;
    assert_eq!(peer["reachable"], false);
    let metrics = reqwest::get(format!("http://127.0.0.1:{}/metrics", switchboard.ports[2]))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(common::metric(&metrics, PRESENCE_FOUND) >= 1, "asked the homeserver: {metrics}");
    assert_eq!(switchboard.terminate().await.code(), Some(0));
}

/// With homeserver look-ups off, everything the directory answers after a restart comes from the
/// store: the verified user, its capabilities and its (fresh) presence.
#[tokio::test]
async fn a_restart_keeps_the_directory() {
    let dir = tempfile::tempdir().unwrap();
    let db = common::sqlite_url(dir.path());
    let no_lookups = |toml: String| toml + "[directory]\nlookups_per_sec = 0\n";
    let Some((synapse, mut switchboard)) = common::synapse_and_process(dir.path(), &db, no_lookups).await
    else {
        return;
    };
    switchboard.wait_for("/ready").await;
    let user = signed_user(&synapse).await;
    // Without look-ups, the profile must come from a member event: join a room.
    synapse.call(&user, Method::POST, "/_matrix/client/v3/createRoom", &json!({})).await;
    set_presence(&synapse, &user, "online").await;
    let api = Api::new(format!("127.0.0.1:{}", switchboard.ports[1]), &user.access_token);
    let metadata_path = format!("/address/{CHECKSUMMED}/metadata");
    let before = common::eventually(Duration::from_secs(10), "the user online", || async {
        let (status, body) = api.get(&metadata_path).await;
        (status == StatusCode::OK).then_some(body)
    })
    .await;
    let peer_before = api.peer(LOCALPART).await;

    switchboard.kill();
    switchboard.restart();
    switchboard.wait_for("/health").await;
    let (status, after) = api.get(&metadata_path).await;
    assert_eq!(status, StatusCode::OK, "{after}");
    assert_eq!(after, before);
    let peer_after = api.peer(LOCALPART).await;
    assert_eq!(peer_after["users"][0]["verified"], true);
    assert_eq!(peer_after["users"][0]["capabilities"], peer_before["users"][0]["capabilities"]);
    assert_eq!(peer_after["users"][0]["presence"], "online");
    assert_eq!(peer_after["reachable"], true);
    assert_eq!(switchboard.terminate().await.code(), Some(0));
}
