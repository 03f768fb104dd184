//! The store's behaviour, run identically against SQLite and PostgreSQL.

mod common;

use std::sync::Arc;
use std::time::Duration;

use switchboard::appservice::inbox::{ItemKind, Subscription};
use switchboard::clock::Clock;
use switchboard::store::{DirectoryRow, Ingested, NewItem, Pruned, Retention, Store};

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

        let mut consumer =
            Subscription::open(store.clone(), "directory", "main", Clock::system()).await.unwrap();
        let batch = consumer.next().await.unwrap();
        assert_eq!(batch.len(), 3, "{backend}");
        consumer.ack(batch[1].id).await.unwrap(); // handled two of three, then "crashes"
        drop(consumer);
        store.close().await;

        let store = open(&url).await;
        let mut consumer =
            Subscription::open(store.clone(), "directory", "main", Clock::system()).await.unwrap();
        let again = consumer.next().await.unwrap();
        assert_eq!(again.len(), 1, "{backend}: only the unacknowledged item comes back");
        assert_eq!(again[0].event_id.as_deref(), Some("$2"));

        // A new consumer starts from the beginning; an unrelated one is unaffected by acks.
        let mut fresh = Subscription::open(store.clone(), "calls", "main", Clock::system()).await.unwrap();
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

/// Two instances on one database: while one has taken an inbox id and not yet committed, the
/// other's ingest must not commit a larger id, or a reader reading "after id N" would pass the
/// smaller one and never see it. A reader's snapshots taken meanwhile must each be a prefix of the
/// final inbox.
///
/// The slow writer: on PostgreSQL a real `Store::ingest` whose insert a trigger holds for 1.5 s (the
/// advisory lock is what makes the other instance wait); on SQLite a connection holding the write
/// lock with an inserted row for as long (SQLite's writer lock is what makes it wait).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_writer_never_commits_past_an_uncommitted_inbox_id() {
    const HOLD: Duration = Duration::from_millis(1500);
    let dir = tempfile::tempdir().unwrap();
    for (backend, url) in common::backends(dir.path()).await {
        let slow_instance = open(&url).await;
        let fast_instance = open(&url).await;
        let reader = open(&url).await;
        let slow_body = r#"{"type":"t","event_id":"$slow"}"#;
        let slow = if backend == "postgres" {
            let admin = sqlx::PgPool::connect(&url).await.unwrap();
            sqlx::raw_sql(&format!(
                "CREATE FUNCTION hold_slow() RETURNS trigger AS $$ BEGIN \
                 IF NEW.txn_id = 'slow' THEN PERFORM pg_sleep({}); END IF; RETURN NEW; END $$ LANGUAGE plpgsql; \
                 CREATE TRIGGER hold_slow AFTER INSERT ON inbox FOR EACH ROW EXECUTE FUNCTION hold_slow();",
                HOLD.as_secs_f64()
            ))
            .execute(&admin)
            .await
            .unwrap();
            let writer = tokio::spawn(async move {
                slow_instance.ingest("slow", "f", 0, &[event("$slow", slow_body)]).await.unwrap();
            });
            // Wait until the slow writer holds its id (its insert sleeps in the trigger).
            common::eventually(Duration::from_secs(10), "the slow insert to hold its id", || async {
                let sleeping: i64 = sqlx::query_scalar(
                    "SELECT COUNT(*) FROM pg_stat_activity WHERE wait_event = 'PgSleep' AND datname = current_database()",
                )
                .fetch_one(&admin)
                .await
                .unwrap();
                (sleeping > 0).then_some(())
            })
            .await;
            writer
        } else {
            let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
            let mut held = pool.begin_with("BEGIN IMMEDIATE").await.unwrap();
            sqlx::query("INSERT INTO inbox (txn_id, kind, event_type, event_id, body, stored_at) VALUES ('slow', 'event', 't', '$slow', $1, 0)")
                .bind(slow_body)
                .execute(&mut *held)
                .await
                .unwrap();
            tokio::spawn(async move {
                tokio::time::sleep(HOLD).await;
                held.commit().await.unwrap();
                drop(slow_instance);
            })
        };

        let fast = tokio::spawn(async move {
            let body = r#"{"type":"t","event_id":"$fast"}"#;
            fast_instance.ingest("fast", "f", 0, &[event("$fast", body)]).await.unwrap();
        });
        let mut snapshots = Vec::new();
        while !(slow.is_finished() && fast.is_finished()) && snapshots.len() < 500 {
            let ids: Vec<String> =
                reader.items_after(0, 10).await.unwrap().into_iter().filter_map(|i| i.event_id).collect();
            snapshots.push(ids);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        slow.await.unwrap();
        fast.await.unwrap();
        let last: Vec<String> =
            reader.items_after(0, 10).await.unwrap().into_iter().filter_map(|i| i.event_id).collect();
        assert_eq!(last, ["$slow", "$fast"], "{backend}: ids in commit order");
        assert!(snapshots.len() > 5, "{backend}: the reader looked while the slow writer held its id");
        for snapshot in &snapshots {
            assert!(
                last.starts_with(snapshot),
                "{backend}: a reader saw {snapshot:?} before the final {last:?}"
            );
        }
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

const MINUTE_MS: i64 = 60_000;
const RETENTION: Retention =
    Retention { items_after_ms: 10 * MINUTE_MS, consumer_timeout_ms: 24 * 60 * MINUTE_MS };

/// Stores transaction `txn` with `count` events at `now_ms`.
async fn ingest_events(store: &Store, txn: &str, count: usize, now_ms: i64) {
    let ids: Vec<String> = (0..count).map(|i| format!("${txn}.{i}")).collect();
    let bodies: Vec<String> = ids.iter().map(|id| format!(r#"{{"type":"t","event_id":"{id}"}}"#)).collect();
    let items: Vec<NewItem<'_>> = ids.iter().zip(&bodies).map(|(id, body)| event(id, body)).collect();
    store.ingest(txn, "f", now_ms, &items).await.unwrap();
}

/// Items are deleted only once every consumer of every instance has handled them and they are
/// older than the retention; a consumer gone for longer than its timeout stops holding them back.
#[tokio::test]
async fn handled_items_are_pruned_after_the_retention_and_unhandled_ones_kept() {
    let dir = tempfile::tempdir().unwrap();
    for (backend, url) in common::backends(dir.path()).await {
        let store = open(&url).await;
        let clock = Clock::manual(1_000_000_000_000);
        ingest_events(&store, "1", 3, clock.unix_millis()).await;
        let mut main = Subscription::open(store.clone(), "directory", "main", clock.clone()).await.unwrap();
        let mut other = Subscription::open(store.clone(), "directory", "other", clock.clone()).await.unwrap();
        let items = main.next().await.unwrap();
        main.ack(items[2].id).await.unwrap();
        let items = other.next().await.unwrap();
        other.ack(items[0].id).await.unwrap(); // the other instance has handled one of three

        clock.advance(Duration::from_secs(9 * 60));
        assert_eq!(
            store.prune(clock.unix_millis(), &RETENTION).await.unwrap().items,
            0,
            "{backend}: too young"
        );
        clock.advance(Duration::from_secs(2 * 60));
        let pruned = store.prune(clock.unix_millis(), &RETENTION).await.unwrap();
        assert_eq!(pruned.items, 1, "{backend}: only what both instances handled");
        assert_eq!(store.inbox_len().await.unwrap(), 2, "{backend}");

        // A fresh subscription of the other instance still gets what it has not handled.
        let mut reopened =
            Subscription::open(store.clone(), "directory", "other", clock.clone()).await.unwrap();
        assert_eq!(reopened.next().await.unwrap().len(), 2, "{backend}");

        // The other instance goes away for good: a day later its position no longer counts.
        clock.advance(Duration::from_secs(24 * 3600 + 60));
        ingest_events(&store, "2", 1, clock.unix_millis()).await;
        let items = main.next().await.unwrap();
        main.ack(items[0].id).await.unwrap();
        clock.advance(Duration::from_secs(11 * 60));
        let pruned = store.prune(clock.unix_millis(), &RETENTION).await.unwrap();
        assert_eq!(pruned.items, 3, "{backend}: a consumer gone for a day holds nothing back");
        assert_eq!(store.inbox_len().await.unwrap(), 0, "{backend}");
        store.close().await;
    }
}

/// A consumer that has opened its subscription but acknowledged nothing yet (a new instance still on
/// its first batch) holds items back like any other.
#[tokio::test]
async fn a_consumer_holds_items_back_from_its_first_batch() {
    let dir = tempfile::tempdir().unwrap();
    for (backend, url) in common::backends(dir.path()).await {
        let store = open(&url).await;
        let clock = Clock::manual(1_000_000_000_000);
        ingest_events(&store, "1", 3, clock.unix_millis()).await;
        let mut old = Subscription::open(store.clone(), "directory", "main", clock.clone()).await.unwrap();
        let items = old.next().await.unwrap();
        old.ack(items[2].id).await.unwrap();
        let mut new = Subscription::open(store.clone(), "directory", "second", clock.clone()).await.unwrap();
        clock.advance(Duration::from_secs(11 * 60));
        assert_eq!(store.prune(clock.unix_millis(), &RETENTION).await.unwrap().items, 0, "{backend}");
        assert_eq!(new.next().await.unwrap().len(), 3, "{backend}: the new instance gets every item");
        store.close().await;
    }
}

/// Positions only move forward, and each instance has its own.
#[tokio::test]
async fn inbox_positions_are_monotonic_and_per_instance() {
    let dir = tempfile::tempdir().unwrap();
    for (backend, url) in common::backends(dir.path()).await {
        let store = open(&url).await;
        store.set_cursor("directory", "a", 50, 1).await.unwrap();
        store.set_cursor("directory", "a", 30, 2).await.unwrap(); // a late acknowledgement
        assert_eq!(store.cursor("directory", "a").await.unwrap(), 50, "{backend}: moved backwards");
        store.set_cursor("directory", "a", 70, 3).await.unwrap();
        assert_eq!(store.cursor("directory", "a").await.unwrap(), 70, "{backend}");
        assert_eq!(store.cursor("directory", "b").await.unwrap(), 0, "{backend}: shared between instances");
        assert_eq!(store.cursor("calls", "a").await.unwrap(), 0, "{backend}: shared between consumers");
        store.close().await;
    }
}

/// Transaction ids older than the retention are deleted, but for the newest 100: the homeserver
/// retries only its latest transaction, which must still be recognised.
#[tokio::test]
async fn old_transaction_ids_are_pruned_but_the_newest_are_kept() {
    let dir = tempfile::tempdir().unwrap();
    for (backend, url) in common::backends(dir.path()).await {
        let store = open(&url).await;
        let clock = Clock::manual(1_000_000_000_000);
        for txn in 0..150 {
            store.ingest(&txn.to_string(), "f", clock.unix_millis(), &[]).await.unwrap();
            clock.advance(Duration::from_millis(10));
        }
        clock.advance(Duration::from_secs(3600));
        let pruned = store.prune(clock.unix_millis(), &RETENTION).await.unwrap();
        assert_eq!(pruned, Pruned { items: 0, transactions: 50 }, "{backend}");
        // The latest are still recognised as retries; a pruned id counts as new.
        let again = |txn: &'static str| store.ingest(txn, "f", clock.unix_millis(), &[]);
        assert_eq!(again("149").await.unwrap(), Ingested::Duplicate, "{backend}");
        assert_eq!(again("50").await.unwrap(), Ingested::Duplicate, "{backend}");
        assert!(matches!(again("49").await.unwrap(), Ingested::New { .. }), "{backend}: 49 was pruned");
        store.close().await;
    }
}

/// A long ingestion run with a consumer keeping up: with pruning, the inbox holds about one
/// retention's worth of items however long the run.
#[tokio::test]
async fn the_inbox_stays_bounded_in_a_long_ingestion_run() {
    let dir = tempfile::tempdir().unwrap();
    for (backend, url) in common::backends(dir.path()).await {
        let store = open(&url).await;
        let clock = Clock::manual(1_000_000_000_000);
        let mut consumer =
            Subscription::open(store.clone(), "directory", "main", clock.clone()).await.unwrap();
        let mut largest = 0;
        // 120 minutes, 100 items a minute; the retention is 10 minutes.
        for minute in 0..120 {
            ingest_events(&store, &minute.to_string(), 100, clock.unix_millis()).await;
            let items = consumer.next().await.unwrap();
            consumer.ack(items.last().unwrap().id).await.unwrap();
            clock.advance(Duration::from_secs(60));
            store.prune(clock.unix_millis(), &RETENTION).await.unwrap();
            largest = largest.max(store.inbox_len().await.unwrap());
        }
        assert!(largest <= 1_100, "{backend}: the inbox grew to {largest} items");
        assert!(largest >= 1_000, "{backend}: items younger than the retention were deleted ({largest})");
        store.close().await;
    }
}
