//! The homeserver client against a real Synapse: whoami, masquerading, sender registration.

mod common;

use std::sync::Arc;

use reqwest::Method;
use serde_json::Value;
use switchboard::homeserver::HomeserverClient;
use switchboard::telemetry::Metrics;

#[tokio::test]
async fn whoami_masquerading_and_sender_registration_work_against_synapse() {
    let dir = tempfile::tempdir().unwrap();
    let db = common::sqlite_url(dir.path());
    let Some((synapse, running)) = common::with_synapse(&db, None).await else {
        return;
    };
    let config = common::config(&db, &synapse.base_url);
    let client = HomeserverClient::new(&config, Arc::new(Metrics::new())).unwrap();

    let raiden = synapse.register(&common::raiden_localpart()).await;
    let alice = synapse.register("alice").await;

    // whoami answers the token's owner and device; a wrong token is the homeserver's M_UNKNOWN_TOKEN.
    let who = client.whoami(&raiden.access_token).await.unwrap();
    assert_eq!(who.user_id.as_str(), raiden.user_id);
    assert_eq!(who.device_id.as_deref().map(ruma::DeviceId::as_str), Some(raiden.device_id.as_str()));
    let wrong = client.whoami("not-a-token").await.unwrap_err();
    assert_eq!(wrong.errcode(), Some("M_UNKNOWN_TOKEN"));

    // Not cached here (the client API's token checks cache): a logged-out token is unknown at once.
    synapse.call(&raiden, Method::POST, "/_matrix/client/v3/logout", &serde_json::json!({})).await;
    let logged_out = client.whoami(&raiden.access_token).await.unwrap_err();
    assert_eq!(logged_out.errcode(), Some("M_UNKNOWN_TOKEN"));

    // Masquerading as a namespaced user (with its device) works; outside the namespace it does not.
    let raiden_id = ruma::UserId::parse(&raiden.user_id).unwrap();
    let whoami_path = ["_matrix", "client", "v3", "account", "whoami"];
    let request = client.request_as(Method::GET, &whoami_path, &raiden_id, None);
    let as_raiden: Value = client.send(request).await.unwrap();
    assert_eq!(as_raiden["user_id"], raiden.user_id.as_str());
    let alice_id = ruma::UserId::parse(&alice.user_id).unwrap();
    let request = client.request_as(Method::GET, &whoami_path, &alice_id, None);
    let refused = client.send::<Value>(request).await.unwrap_err();
    assert_eq!(refused.errcode(), Some("M_FORBIDDEN"), "{refused}");
    let unknown_device: ruma::OwnedDeviceId = "NOSUCHDEVICE".into();
    let request = client.request_as(Method::GET, &whoami_path, &raiden_id, Some(&unknown_device));
    let refused = client.send::<Value>(request).await.unwrap_err();
    assert_eq!(refused.errcode(), Some("M_UNKNOWN_DEVICE"), "{refused}");

    // Registering the sender user is idempotent.
    client.ensure_sender_registered().await.unwrap();
    client.ensure_sender_registered().await.unwrap();
    // And the health check reports the ping round-trip.
    let status = client.check().await;
    assert!(status.reachable && status.last_error.is_none(), "{status:?}");
    assert!(status.appservice_ping_ms.is_some());
    running.stop().await.unwrap();
}
