//! A Raiden user whose displayname is a valid signature and whose avatar carries capabilities, on a
//! real Synapse, reaches Switchboard's directory within a second; its presence follows; an impostor
//! is stored unverified.

mod common;

use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::json;
use switchboard::directory::model::Presence;
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
async fn signed_user_with_capabilities_reaches_the_directory_within_a_second() {
    let dir = tempfile::tempdir().unwrap();
    let db = common::sqlite_url(dir.path());
    let Some((synapse, running)) = common::with_synapse(&db, None).await else { return };

    let raiden = synapse.register(LOCALPART).await;
    let profile =
        |field: &str| format!("/_matrix/client/v3/profile/{}/{field}", common::urlencode(&raiden.user_id));
    synapse.call(&raiden, Method::PUT, &profile("displayname"), &json!({ "displayname": SIGNATURE })).await;
    synapse.call(&raiden, Method::PUT, &profile("avatar_url"), &json!({ "avatar_url": CAPS })).await;

    // Joining a room sends the member event (with the profile) to the appservice.
    let started = Instant::now();
    synapse.call(&raiden, Method::POST, "/_matrix/client/v3/createRoom", &json!({})).await;
    let stored = common::eventually(Duration::from_secs(10), "the user in the directory", || async {
        row(&db, &raiden.user_id).await.filter(|row| row.avatar_url.as_deref() == Some(CAPS))
    })
    .await;
    let elapsed = started.elapsed();
    assert!(elapsed < Duration::from_secs(1), "took {elapsed:?}");
    assert_eq!(stored.displayname.as_deref(), Some(SIGNATURE));
    let restored = switchboard::directory::restore(&[stored], 0, i64::MAX);
    let user = restored.user(&raiden.user_id).unwrap();
    assert!(user.verified, "the displayname proves the address");
    assert!(user.capabilities.as_ref().unwrap().webrtc());

    // Presence flows in as ephemeral data.
    let status = format!("/_matrix/client/v3/presence/{}/status", common::urlencode(&raiden.user_id));
    synapse.call(&raiden, Method::PUT, &status, &json!({ "presence": "online" })).await;
    common::eventually(Duration::from_secs(10), "online presence", || async {
        row(&db, &raiden.user_id).await.filter(|row| Presence::from_matrix(&row.presence) == Presence::Online)
    })
    .await;

    // An impostor claiming the same address on this server with a garbage displayname is stored
    // unverified, and never shadows the real user.
    let impostor = synapse.register(&format!("{LOCALPART}.0a1b2c3d")).await;
    let impostor_name =
        format!("/_matrix/client/v3/profile/{}/displayname", common::urlencode(&impostor.user_id));
    synapse.call(&impostor, Method::PUT, &impostor_name, &json!({ "displayname": SIGNATURE })).await;
    synapse.call(&impostor, Method::POST, "/_matrix/client/v3/createRoom", &json!({})).await;
    let impostor_row = common::eventually(Duration::from_secs(10), "the impostor in the directory", || {
        row(&db, &impostor.user_id)
    })
    .await;
    let both = [row(&db, &raiden.user_id).await.unwrap(), impostor_row];
    let restored = switchboard::directory::restore(&both, 0, i64::MAX);
    assert!(!restored.user(&impostor.user_id).unwrap().verified);
    let address = restored.user(&raiden.user_id).unwrap().address;
    assert_eq!(restored.best(&address).unwrap().user_id, raiden.user_id);
    running.stop().await.unwrap();
}
