//! A homeserver presenting the wrong hs_token is refused with 403 and nothing is stored.

mod common;

use std::time::Duration;

#[tokio::test]
async fn wrong_hs_token_is_refused_and_nothing_is_stored() {
    let dir = tempfile::tempdir().unwrap();
    let db = common::sqlite_url(dir.path());
    let wrong = "wrong-hs-token-wwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwwww";
    let Some((synapse, running)) = common::with_synapse(&db, Some(wrong)).await else {
        return;
    };

    let raiden = synapse.register(&common::raiden_localpart()).await;
    let alice = synapse.register("alice").await;
    let room_id = synapse.shared_room(&alice, &[&raiden]).await;
    synapse.send_text(&alice, &room_id, "t1", "must not be stored").await;

    // Synapse did push (and was refused): the refusal is counted.
    common::eventually(Duration::from_secs(30), "a refused transaction", || async {
        let metrics = running.metrics().await;
        (common::metric(&metrics, "switchboard_appservice_requests_rejected_total{reason=\"wrong_token\"}")
            >= 1)
            .then_some(())
    })
    .await;
    let metrics = running.metrics().await;
    assert_eq!(common::metric(&metrics, "switchboard_appservice_transactions_received_total"), 0);
    assert!(common::stored_items(&db).await.is_empty(), "nothing from a wrong token is stored");
    running.stop().await.unwrap();
}
