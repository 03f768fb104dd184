//! A real Synapse delivers a room message and a to-device message to Switchboard's store.

mod common;

use std::time::Duration;

use serde_json::{Value, json};
use switchboard::appservice::inbox::ItemKind;

#[tokio::test]
async fn room_message_and_to_device_message_reach_the_store_on_both_backends() {
    let dir = tempfile::tempdir().unwrap();
    for (_backend, db) in common::backends(dir.path()).await {
        delivers_to(&db).await;
    }
}

async fn delivers_to(db: &str) {
    let Some((synapse, running)) = common::with_synapse(db, None).await else { return };

    let raiden = synapse.register(&common::raiden_localpart()).await;
    let alice = synapse.register("alice").await;
    let room_id = synapse.shared_room(&alice, &[&raiden]).await;
    let event_id = synapse.send_text(&alice, &room_id, "t1", "hello raiden").await;
    let signal = r#"{"type":"offer","sdp":"v=0","call_id":"a|b|1"}"#;
    let to_device = json!({ "messages": { &raiden.user_id: { &raiden.device_id: { "msgtype": "m.notice", "body": signal } } } });
    synapse
        .call(&alice, reqwest::Method::PUT, "/_matrix/client/v3/sendToDevice/m.room.message/td1", &to_device)
        .await;

    let items = common::eventually(Duration::from_secs(30), "both messages in the store", || async {
        let items = common::stored_items(db).await;
        let has_event = items.iter().any(|i| i.event_id.as_deref() == Some(event_id.as_str()));
        let has_to_device = items.iter().any(|i| i.kind == ItemKind::ToDevice);
        (has_event && has_to_device).then_some(items)
    })
    .await;

    let message = items.iter().find(|i| i.event_id.as_deref() == Some(event_id.as_str())).unwrap();
    assert_eq!(message.kind, ItemKind::Event);
    assert_eq!(message.event_type, "m.room.message");
    assert_eq!(message.room_id.as_deref(), Some(room_id.as_str()));
    assert_eq!(message.sender.as_deref(), Some(alice.user_id.as_str()));
    let body: Value = message.parse().unwrap();
    assert_eq!(body["content"]["body"], "hello raiden");

    let to_device: Vec<_> = items.iter().filter(|i| i.kind == ItemKind::ToDevice).collect();
    assert_eq!(to_device.len(), 1, "the to-device message is stored once");
    let to_device = to_device[0];
    assert_eq!(to_device.event_type, "m.room.message");
    assert_eq!(to_device.sender.as_deref(), Some(alice.user_id.as_str()));
    assert_eq!(to_device.to_user_id.as_deref(), Some(raiden.user_id.as_str()));
    let body: Value = to_device.parse().unwrap();
    assert_eq!(body["content"]["body"], signal);
    assert_eq!(body["to_device_id"], raiden.device_id.as_str());

    // Each room event is stored exactly once.
    let mut ids: Vec<_> = items.iter().filter_map(|i| i.event_id.clone()).collect();
    let before = ids.len();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), before);
    running.stop().await.unwrap();
}
