//! The store's behaviour, run identically against SQLite and PostgreSQL.

mod common;

use std::sync::Arc;
use std::time::Duration;

use switchboard::appservice::inbox::{ItemKind, Subscription};
use switchboard::store::{DirectoryRow, Ingested, NewItem, Store};

fn event<'a>(event_id: &'a str, body: &'a str) -> NewItem<'a> {
    NewItem {
        kind: ItemKind::Event,
        event_type: "m.room.message",
        sender: Some("@alice:localhost"),
        room_id: Some("!room"),
        event_id: Some(event_id),
        to_user_id: None,
        body,
    }
}

async fn open(url: &str) -> Arc<Store> {
    let store = Store::connect(url, 4).await.expect("connect");
    store.migrate().await.expect("migrate");
    Arc::new(store)
}

#[tokio::test]
async fn transaction_is_stored_once_on_both_backends() {
    let dir = tempfile::tempdir().unwrap();
    for (backend, url) in common::backends(dir.path()).await {
        let store = open(&url).await;
        let body = r#"{"type":"m.room.message","event_id":"$1","content":{"body":"héllo \"quoted\""}}"#;
        let to_device = r#"{"type":"m.room.message","sender":"@alice:localhost","to_user_id":"@0xab:localhost","to_device_id":"RAIDEN","content":{}}"#;
        let items = [
            event("$1", body),
            NewItem {
                kind: ItemKind::ToDevice,
                event_id: None,
                to_user_id: Some("@0xab:localhost"),
                ..event("", to_device)
            },
        ];
        assert_eq!(
            store.ingest("1", "f", 0, &items).await.unwrap(),
            Ingested::New { items: 2, reused_id: false },
            "{backend}"
        );
        assert_eq!(store.ingest("1", "f", 0, &items).await.unwrap(), Ingested::Duplicate, "{backend}");
        assert!(store.has_transaction("1").await.unwrap());
        assert!(!store.has_transaction("2").await.unwrap());

        let stored = store.items_after(0, 100).await.unwrap();
        assert_eq!(stored.len(), 2, "{backend}: a replayed transaction adds nothing");
        assert_eq!(stored[0].body.get(), body, "{backend}: body stored byte-exact");
        assert_eq!(stored[0].event_id.as_deref(), Some("$1"));
        assert_eq!(stored[1].kind, ItemKind::ToDevice);
        assert_eq!(stored[1].to_user_id.as_deref(), Some("@0xab:localhost"));
        assert!(stored[0].id < stored[1].id, "{backend}: arrival order kept");
    }
}

#[tokio::test]
async fn event_seen_in_two_transactions_is_stored_once() {
    let dir = tempfile::tempdir().unwrap();
    for (backend, url) in common::backends(dir.path()).await {
        let store = open(&url).await;
        let body = r#"{"type":"m.room.message","event_id":"$same"}"#;
        store.ingest("1", "f", 0, &[event("$same", body)]).await.unwrap();
        let second = store.ingest("2", "f", 0, &[event("$same", body), event("$other", body)]).await.unwrap();
        assert_eq!(second, Ingested::New { items: 1, reused_id: false }, "{backend}");
        assert_eq!(store.items_after(0, 100).await.unwrap().len(), 2, "{backend}");
    }
}

#[tokio::test]
async fn unacknowledged_items_are_handed_out_again_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    for (backend, url) in common::backends(dir.path()).await {
        let store = open(&url).await;
        let bodies: Vec<String> = (0..5).map(|i| format!(r#"{{"type":"t","event_id":"${i}"}}"#)).collect();
        let ids: Vec<String> = (0..5).map(|i| format!("${i}")).collect();
        let items: Vec<NewItem<'_>> = ids.iter().zip(&bodies).map(|(id, body)| event(id, body)).collect();
        store.ingest("1", "f", 0, &items[..3]).await.unwrap();

        let mut consumer = Subscription::open(store.clone(), "directory").await.unwrap();
        let batch = consumer.next().await.unwrap();
        assert_eq!(batch.len(), 3, "{backend}");
        consumer.ack(batch[1].id).await.unwrap(); // handled two of three, then "crashes"
        drop(consumer);
        store.close().await;

        let store = open(&url).await;
        let mut consumer = Subscription::open(store.clone(), "directory").await.unwrap();
        let again = consumer.next().await.unwrap();
        assert_eq!(again.len(), 1, "{backend}: only the unacknowledged item comes back");
        assert_eq!(again[0].event_id.as_deref(), Some("$2"));

        // A new consumer starts from the beginning; an unrelated one is unaffected by acks.
        let mut fresh = Subscription::open(store.clone(), "calls").await.unwrap();
        assert_eq!(fresh.next().await.unwrap().len(), 3, "{backend}");

        // Live items wake a waiting consumer.
        let waiting = tokio::spawn(async move { consumer.next().await.unwrap() });
        tokio::time::sleep(Duration::from_millis(50)).await;
        store.ingest("2", "f", 0, &items[3..]).await.unwrap();
        let live = tokio::time::timeout(Duration::from_secs(5), waiting).await.expect("woken").unwrap();
        assert_eq!(live.iter().map(|i| i.event_id.clone().unwrap()).collect::<Vec<_>>(), ["$3", "$4"]);
    }
}

#[tokio::test]
async fn migrations_are_idempotent() {
    let dir = tempfile::tempdir().unwrap();
    for (backend, url) in common::backends(dir.path()).await {
        let store = open(&url).await;
        store.migrate().await.unwrap_or_else(|e| panic!("{backend}: second migrate failed: {e}"));
        store.ping().await.unwrap();
    }
}

/// Two stores on one database (two instances) writing at once, on a multi-threaded runtime: a
/// reader still sees every item exactly once and in id order, so no id commits after a larger one.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writers_keep_ids_in_commit_order() {
    let dir = tempfile::tempdir().unwrap();
    for (backend, url) in common::backends(dir.path()).await {
        let instances = [open(&url).await, open(&url).await];
        let mut tasks = Vec::new();
        for t in 0..8 {
            let store = instances[t % 2].clone();
            tasks.push(tokio::spawn(async move {
                for n in 0..10 {
                    let id = format!("$t{t}n{n}");
                    let body = format!(r#"{{"type":"t","event_id":"{id}"}}"#);
                    store.ingest(&format!("{t}-{n}"), "f", 0, &[event(&id, &body)]).await.unwrap();
                }
            }));
        }
        // Read through a third instance: it only learns of the others' commits by polling.
        let reader = open(&url).await;
        let mut consumer = Subscription::open(reader, "reader").await.unwrap();
        let mut seen = Vec::new();
        while seen.len() < 80 {
            let batch =
                tokio::time::timeout(Duration::from_secs(10), consumer.next()).await.expect("items").unwrap();
            seen.extend(batch.into_iter().map(|i| i.id));
        }
        for task in tasks {
            task.await.unwrap();
        }
        let mut sorted = seen.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), 80, "{backend}: no item skipped or repeated");
        assert_eq!(sorted, seen, "{backend}: handed out in id order");
    }
}

#[tokio::test]
async fn reused_transaction_id_with_other_content_is_stored_not_dropped() {
    let dir = tempfile::tempdir().unwrap();
    for (backend, url) in common::backends(dir.path()).await {
        let store = open(&url).await;
        let first = r#"{"type":"t","event_id":"$before-reset"}"#;
        let second = r#"{"type":"t","event_id":"$after-reset"}"#;
        let one = store.ingest("1", "before", 0, &[event("$before-reset", first)]).await.unwrap();
        assert_eq!(one, Ingested::New { items: 1, reused_id: false });
        // A homeserver whose database was reset counts from 1 again, with other events.
        let again = store.ingest("1", "after", 0, &[event("$after-reset", second)]).await.unwrap();
        assert_eq!(again, Ingested::New { items: 1, reused_id: true }, "{backend}");
        // Its retries are recognised like any other.
        let retry = store.ingest("1", "after", 0, &[event("$after-reset", second)]).await.unwrap();
        assert_eq!(retry, Ingested::Duplicate, "{backend}");
        assert_eq!(store.items_after(0, 100).await.unwrap().len(), 2, "{backend}");
    }
}

/// The directory is stored and rebuilt on both backends: the stored verification is used (and
/// recomputed when missing), and presence older than the staleness limit comes back offline.
#[tokio::test]
async fn directory_survives_a_restart_and_stale_presence_is_offline() {
    use switchboard::directory::identity::Address;
    use switchboard::directory::model::{Directory, Presence};
    // Signed with eth-account by the well-known example key 0x4c0883a6…f362318.
    const FRESH: &str = "@0x2c7536e3605d9c16a7a3d7b1898e529396a65c23:example.org";
    const FRESH_SIGNATURE: &str = "0x465cfd0e1acba2f1142a1e5c1c0aa539a23871410ae2cfcfbea5f058c610c626\
                                   702365fe24a5978f29c219626059474727eb1a9967497a989805c0217fc68c8a1b";
    const STALE: &str = "@0x2c7536e3605d9c16a7a3d7b1898e529396a65c23:other.example";
    const STALE_SIGNATURE: &str = "0x83f09a358fd0ca4998b47f95062e5c2637a7cce24cf4731a9c69ce15b8fa053a\
                                   09d018ec145ded2665e8b6da027b7a2d2a398ac2120ac6433903339cb13659d51c";
    let address = Address::parse("0x2c7536E3605D9C16a7a3D7b1898e529396a65c23").unwrap();
    let dir = tempfile::tempdir().unwrap();
    for (backend, url) in common::backends(dir.path()).await {
        let mut directory = Directory::new();
        directory.apply_profile(FRESH, Some(FRESH_SIGNATURE), Some("mxc://raiden.network/cap?webRTC=1"), 0);
        directory.apply_presence(FRESH, Presence::Online, Some(9_000), 10_000);
        directory.apply_profile(STALE, Some(STALE_SIGNATURE), None, 0);
        directory.apply_presence(STALE, Presence::Online, Some(1_000), 1_000);
        directory.apply_profile("@0x0000000000000000000000000000000000000001:x", Some("garbage"), None, 0);
        let rows: Vec<_> = directory.users().map(switchboard::directory::to_row).collect();

        let store = open(&url).await;
        store.save_directory_users(&rows).await.unwrap();
        store.save_directory_users(&rows).await.unwrap(); // upserts, no duplicates
        store.close().await;

        let store = open(&url).await;
        let stored = store.directory_users().await.unwrap();
        assert_eq!(stored.len(), 3, "{backend}");
        // Restarted at t = 12 s with a 5 s limit: FRESH (learnt at 10 s) stays online, STALE (1 s) not.
        let restored = switchboard::directory::restore(&stored, 12_000, 5_000);
        let fresh = restored.user(FRESH).unwrap();
        assert!(fresh.verified && fresh.presence() == Presence::Online, "{backend}: {fresh:?}");
        assert!(fresh.capabilities().unwrap().webrtc());
        assert_eq!(fresh.last_active_ms, Some(9_000));
        let stale = restored.user(STALE).unwrap();
        assert!(stale.verified, "{backend}");
        assert_eq!(stale.presence(), Presence::Offline, "{backend}: stale presence is not trusted");
        assert!(!restored.user("@0x0000000000000000000000000000000000000001:x").unwrap().verified);
        assert_eq!(&*restored.best(&address).unwrap().user_id, FRESH, "{backend}");
        // The verification is stored, so a restart need not recover every signature again; rows
        // without one (written before it was stored) are verified when loaded.
        assert_eq!(stored.iter().filter(|row| row.verified == Some(true)).count(), 2, "{backend}");
        let mut unrecorded = stored.clone();
        for row in &mut unrecorded {
            row.verified = None;
        }
        let reverified = switchboard::directory::restore(&unrecorded, 12_000, 5_000);
        assert!(reverified.user(FRESH).unwrap().verified && reverified.user(STALE).unwrap().verified);
        assert!(!reverified.user("@0x0000000000000000000000000000000000000001:x").unwrap().verified);
        store.close().await;
    }
}

/// Loading reads the directory a page at a time: every row comes back once, in user id order,
/// across page boundaries (10,000 rows a page).
#[tokio::test]
async fn directory_loads_across_pages() {
    let dir = tempfile::tempdir().unwrap();
    for (backend, url) in common::backends(dir.path()).await {
        let rows: Vec<DirectoryRow> = (0..20_001u32)
            .map(|i| DirectoryRow {
                user_id: format!("@0x{i:040x}:example.org"),
                displayname: None,
                avatar_url: None,
                verified: Some(false),
                presence: "offline".to_owned(),
                presence_at: 0,
                last_active_ms: None,
                profile_at: 0,
            })
            .collect();
        let store = open(&url).await;
        store.save_directory_users(&rows).await.unwrap();
        let mut seen = Vec::new();
        store.each_directory_user(|row| seen.push(row.user_id)).await.unwrap();
        let expected: Vec<String> = rows.into_iter().map(|row| row.user_id).collect();
        assert_eq!(seen.len(), expected.len(), "{backend}");
        assert!(seen == expected, "{backend}: rows missing, repeated or out of order");
        store.close().await;
    }
}
