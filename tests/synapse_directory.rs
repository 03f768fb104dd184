//! A Raiden user whose displayname is a valid signature and whose avatar carries capabilities, on a
//! real Synapse, is discoverable through the client API, and reachable once it goes online (the
//! delay is printed, not bounded: a loaded machine must not fail the test); an impostor is listed
//! unverified and never shadows it.

mod common;

use std::time::{Duration, Instant};

use reqwest::Method;
use reqwest::StatusCode;
use serde_json::{Value, json};
use switchboard::store::DirectoryRow;

/// The eth-account example key's address, and its `personal_sign` of the user id on "localhost".
const LOCALPART: &str = "0x2c7536e3605d9c16a7a3d7b1898e529396a65c23";
const SIGNATURE: &str = "0xb0e955ff35d78250fcd1518aaffdf801964decc705ceba5efd205f5eea30e781\
                         6a6d0813ff5745c18c61350d6d747331d47d208f9b9ed5129e87c9bb05c0928e1b";
const CAPS: &str = "mxc://raiden.network/cap?Receive=1&Mediate=1&Delivery=1&webRTC=1&toDevice=1";

async fn row(db: &str, user_id: &str) -> Option<DirectoryRow> {
    let store = switchboard::store::Store::connect(db, 1).await.unwrap();
    let rows = store.directory_users().await.unwrap();
    store.close().await;
    rows.into_iter().find(|row| row.user_id == user_id)
}

#[tokio::test]
async fn signed_user_with_capabilities_is_discoverable_and_reachable_once_online() {
    let dir = tempfile::tempdir().unwrap();
    let db = common::sqlite_url(dir.path());
    let Some((synapse, running)) = common::with_synapse(&db, None).await else { return };

    let raiden = synapse.register(LOCALPART).await;
    let profile =
        |field: &str| format!("/_matrix/client/v3/profile/{}/{field}", common::urlencode(&raiden.user_id));
    synapse.call(&raiden, Method::PUT, &profile("displayname"), &json!({ "displayname": SIGNATURE })).await;
    synapse.call(&raiden, Method::PUT, &profile("avatar_url"), &json!({ "avatar_url": CAPS })).await;

    // Joining a room sends the member event (with the profile) to the appservice.
    let client = reqwest::Client::new();
    let api = |path: &str| format!("http://{}/_switchboard/client/v1{path}", running.client);
    let peer_url = api(&format!("/peers/{LOCALPART}"));
    synapse.call(&raiden, Method::POST, "/_matrix/client/v3/createRoom", &json!({})).await;
    let peer: Value = common::eventually(Duration::from_secs(10), "the user in the directory", || async {
        let peer: Value =
            client.get(&peer_url).bearer_auth(&raiden.access_token).send().await.ok()?.json().await.ok()?;
        (peer["users"][0]["capabilities"]["webRTC"] == true).then_some(peer)
    })
    .await;
    assert_eq!(peer["address"], "0x2c7536E3605D9C16a7a3D7b1898e529396a65c23");
    assert_eq!(peer["users"][0]["user_id"], raiden.user_id.as_str());
    assert_eq!(peer["users"][0]["verified"], true, "the displayname proves the address");
    assert_eq!(peer["reachable"], false, "offline until presence says otherwise");

    // Online: the metadata Raiden's path-finding service used to answer (usually well within a
    // second of the presence change; printed for the record).
    let status = format!("/_matrix/client/v3/presence/{}/status", common::urlencode(&raiden.user_id));
    let metadata_url = api(&format!("/address/{}/metadata", "0x2c7536E3605D9C16a7a3D7b1898e529396a65c23"));
    let started = Instant::now();
    synapse.call(&raiden, Method::PUT, &status, &json!({ "presence": "online" })).await;
    let metadata: Value = common::eventually(Duration::from_secs(10), "the user reachable", || async {
        let response = client.get(&metadata_url).bearer_auth(&raiden.access_token).send().await.ok()?;
        (response.status() == StatusCode::OK).then_some(())?;
        response.json().await.ok()
    })
    .await;
    eprintln!("reachable {:?} after the presence change", started.elapsed());
    assert_eq!(
        metadata,
        json!({ "user_id": raiden.user_id, "capabilities": CAPS, "displayname": SIGNATURE })
    );

    // Errors a client can act on.
    let response = client.get(&metadata_url).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(response.json::<Value>().await.unwrap()["errcode"], "M_MISSING_TOKEN");
    let response = client.get(&metadata_url).bearer_auth("not-a-token").send().await.unwrap();
    assert_eq!(response.json::<Value>().await.unwrap()["errcode"], "M_UNKNOWN_TOKEN");
    let response = client.get(api("/peers/0x1234")).bearer_auth(&raiden.access_token).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    assert_eq!(response.json::<Value>().await.unwrap()["errcode"], "M_INVALID_PARAM");
    let unknown = "0x0000000000000000000000000000000000000001";
    let response = client
        .get(api(&format!("/address/{unknown}/metadata")))
        .bearer_auth(&raiden.access_token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    let answer: Value = client
        .post(api("/peers/query"))
        .bearer_auth(&raiden.access_token)
        .json(&json!({ "addresses": [LOCALPART, unknown] }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(answer[LOCALPART]["reachable"], true);
    assert_eq!(answer[unknown]["users"], json!([]));

    // An impostor claiming the same address on this server (a suffixed user id) with the user's
    // displayname copied over is stored unverified, and never shadows the real user.
    let impostor = synapse.register(&format!("{LOCALPART}.0a1b2c3d")).await;
    let impostor_name =
        format!("/_matrix/client/v3/profile/{}/displayname", common::urlencode(&impostor.user_id));
    synapse.call(&impostor, Method::PUT, &impostor_name, &json!({ "displayname": SIGNATURE })).await;
    synapse.call(&impostor, Method::POST, "/_matrix/client/v3/createRoom", &json!({})).await;
    let impostor_row = common::eventually(Duration::from_secs(10), "the impostor in the directory", || {
        row(&db, &impostor.user_id)
    })
    .await;
    assert_eq!(impostor_row.displayname.as_deref(), Some(SIGNATURE));
    let read = |url: &str| client.get(url).bearer_auth(&raiden.access_token).send();
    let peer: Value = read(&peer_url).await.unwrap().json().await.unwrap();
    let users = peer["users"].as_array().unwrap();
    assert_eq!(users.len(), 2);
    assert_eq!(users[0]["user_id"], raiden.user_id.as_str(), "the verified user first");
    assert_eq!(users[1]["user_id"], impostor.user_id.as_str());
    assert_eq!(users[1]["verified"], false);
    let metadata: Value = read(&metadata_url).await.unwrap().json().await.unwrap();
    assert_eq!(metadata["user_id"], raiden.user_id.as_str(), "the impostor never shadows the user");
    running.stop().await.unwrap();
}
