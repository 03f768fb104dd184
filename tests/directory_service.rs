//! The directory service without a homeserver: inbox items in, the per-address change feed out, the
//! signalling hook (connected = online), and every change saved to the store.

mod common;

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use switchboard::appservice::inbox::{Input, ItemKind};
use switchboard::clock::Clock;
use switchboard::directory::identity::Address;
use switchboard::directory::model::{Change, Changed, Presence};
use switchboard::directory::service::{AddressFeed, DirectoryService, Settings};
use switchboard::homeserver::HomeserverClient;
use switchboard::store::Store;
use switchboard::telemetry::Metrics;

/// The eth-account example key's user on "localhost" and its `personal_sign` of that user id.
const USER: &str = "@0x2c7536e3605d9c16a7a3d7b1898e529396a65c23:localhost";
const SIGNATURE: &str = "0xb0e955ff35d78250fcd1518aaffdf801964decc705ceba5efd205f5eea30e781\
                         6a6d0813ff5745c18c61350d6d747331d47d208f9b9ed5129e87c9bb05c0928e1b";
const OTHER: &str = "@0x0000000000000000000000000000000000000001:localhost";
const CAPS: &str = "mxc://raiden.network/cap?webRTC=1";

fn item(id: i64, kind: ItemKind, body: &Value) -> Input {
    common::inbox_item(id, "1", kind, body)
}

fn join(id: i64, user_id: &str, displayname: &str, avatar_url: &str) -> Input {
    let body = json!({
        "type": "m.room.member", "sender": user_id, "state_key": user_id, "origin_server_ts": 1,
        "content": { "membership": "join", "displayname": displayname, "avatar_url": avatar_url },
    });
    item(id, ItemKind::Event, &body)
}

fn presence(id: i64, user_id: &str, presence: &str) -> Input {
    let body = json!({ "type": "m.presence", "sender": user_id, "content": { "presence": presence } });
    item(id, ItemKind::Ephemeral, &body)
}

async fn next(feed: &mut AddressFeed) -> Change {
    tokio::time::timeout(Duration::from_secs(5), feed.next()).await.expect("a change within 5 s").unwrap()
}

#[tokio::test]
async fn feed_hook_and_store_follow_the_inbox() {
    let dir = tempfile::tempdir().unwrap();
    let url = common::sqlite_url(dir.path());
    let config = common::config(&url, "http://127.0.0.1:9");
    let store = Arc::new(Store::connect(&url, 2).await.unwrap());
    store.migrate().await.unwrap();
    let metrics = Arc::new(Metrics::new());
    let homeserver = Arc::new(HomeserverClient::new(&config, metrics.clone()).unwrap());
    let mut settings = Settings::from_config(&config);
    settings.lookups_per_sec = 0; // no homeserver here
    let clock = Clock::manual(0);
    let service = DirectoryService::load(store.clone(), homeserver, metrics, settings, clock).await.unwrap();
    let address = Address::parse("0x2c7536e3605d9c16a7a3d7b1898e529396a65c23").unwrap();
    let mut feed = service.feed(address);

    // Another address's changes are not in this feed.
    service.apply(&[join(1, OTHER, "not a signature", CAPS)], 1_000).await.unwrap();
    service.apply(&[join(2, USER, SIGNATURE, CAPS)], 2_000).await.unwrap();
    assert_eq!(next(&mut feed).await.what, Changed::Profile { verification: true, capabilities: true });
    service.apply(&[presence(3, USER, "online")], 3_000).await.unwrap();
    assert_eq!(next(&mut feed).await, Change { address, what: Changed::Presence });
    assert!(service.read().reachable(&address));

    // Offline on the homeserver, but a live signalling connection makes the user online.
    service.apply(&[presence(4, USER, "offline")], 4_000).await.unwrap();
    assert_eq!(next(&mut feed).await.what, Changed::Presence);
    assert!(!service.read().reachable(&address));
    let connection = service.connected(USER).expect("a Raiden user");
    assert_eq!(next(&mut feed).await.what, Changed::Presence);
    assert_eq!(service.read().best(&address).unwrap().presence(), Presence::Online);
    drop(connection);
    assert_eq!(next(&mut feed).await.what, Changed::Presence);
    assert!(!service.read().reachable(&address));
    assert!(service.connected("@alice:localhost").is_none(), "not a Raiden user");

    // A to-device message is activity, at the time it arrives.
    let later: i64 = 5_000;
    let to_device = json!({ "type": "m.room.message", "sender": USER, "content": { "body": "x" } });
    service.apply(&[item(5, ItemKind::ToDevice, &to_device)], later).await.unwrap();
    assert_eq!(service.read().user(USER).unwrap().last_active_ms, Some(later));

    // Everything the inbox brought is stored (connections are live state, not stored).
    let rows = store.directory_users().await.unwrap();
    let row = rows.iter().find(|row| row.user_id == USER).unwrap();
    assert_eq!((row.displayname.as_deref(), row.verified), (Some(SIGNATURE), Some(true)));
    assert_eq!((row.avatar_url.as_deref(), row.presence.as_str()), (Some(CAPS), "offline"));
    assert_eq!(row.last_active_ms, Some(later));
    let other = rows.iter().find(|row| row.user_id == OTHER).unwrap();
    assert_eq!(other.verified, Some(false));
    store.close().await;
}
