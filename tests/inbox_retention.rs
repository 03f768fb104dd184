//! A running Switchboard prunes its inbox: once the directory has handled what the homeserver
//! pushed and the retention has passed (on a stepped clock), the items are gone and the metrics say
//! so.

mod common;

use std::time::Duration;

use serde_json::json;
use switchboard::clock::Clock;
use switchboard::store::Store;

#[tokio::test]
async fn handled_items_are_deleted_once_the_retention_has_passed() {
    let dir = tempfile::tempdir().unwrap();
    let db = common::sqlite_url(dir.path());
    let mut config = common::config(&db, "http://127.0.0.1:9");
    config.database.inbox_retention_secs = 600;
    let clock = Clock::manual(1_800_000_000_000);
    let listeners = common::bind(&config).await;
    let running = common::start_on_clock(config, listeners, clock.clone());
    running.wait_listening().await;

    let http = reqwest::Client::new();
    // Presence of users who are not Raiden nodes: the directory reads and acknowledges them.
    let transaction = |txn: u32| {
        json!({ "ephemeral": [
            { "type": "m.presence", "sender": format!("@alice{txn}:localhost"), "content": { "presence": "online" } }
        ]})
    };
    for txn in 0..5 {
        let url = running.appservice_url(&format!("/_matrix/app/v1/transactions/{txn}"));
        let response =
            http.put(&url).bearer_auth(common::HS_TOKEN).json(&transaction(txn)).send().await.unwrap();
        assert_eq!(response.status(), 200);
    }
    let store = Store::connect(&db, 1).await.unwrap();
    let last = store.items_after(0, 100).await.unwrap().last().unwrap().id;
    common::eventually(Duration::from_secs(30), "the directory to handle the inbox", || async {
        (store.cursor(switchboard::directory::service::CONSUMER, "main").await.unwrap() == last).then_some(())
    })
    .await;

    // Nine minutes on, nothing is deleted; eleven minutes on, everything is.
    clock.advance(Duration::from_secs(9 * 60));
    common::eventually(Duration::from_secs(30), "a prune", || async {
        let metrics = running.metrics().await;
        (common::metric(&metrics, "switchboard_inbox_items ") == 5).then_some(())
    })
    .await;
    clock.advance(Duration::from_secs(2 * 60));
    common::eventually(Duration::from_secs(30), "the handled items deleted", || async {
        let metrics = running.metrics().await;
        (common::metric(&metrics, "switchboard_inbox_pruned_items_total") == 5
            && common::metric(&metrics, "switchboard_inbox_items ") == 0)
            .then_some(())
    })
    .await;
    assert!(store.items_after(0, 100).await.unwrap().is_empty());
    // The latest transaction ids are kept: a retry of the last one, with its content, is answered
    // without storing it again.
    let url = running.appservice_url("/_matrix/app/v1/transactions/4");
    let retry = http.put(&url).bearer_auth(common::HS_TOKEN).json(&transaction(4)).send().await.unwrap();
    assert_eq!(retry.status(), 200);
    assert!(store.items_after(0, 100).await.unwrap().is_empty());
    store.close().await;
    running.stop().await.unwrap();
}
