//! The store: SQLite (embedded, the default) or PostgreSQL (production, several instances) behind one
//! type.
//!
//! Both backends run the same runtime queries through sqlx's `Any` driver, so the SQL here is the
//! portable subset (`$N` placeholders, `ON CONFLICT`, `RETURNING`, integer epoch timestamps); each
//! backend has its own migration folder (`migrations/sqlite`, `migrations/postgres`) for its DDL.
//!
//! Invariants:
//! - A transaction id and everything it carried are committed together, or not at all.
//! - Inbox ids are committed in increasing order (one writer at a time: a lock in this process, an
//!   advisory lock across PostgreSQL instances), so a consumer reading "after id N" never skips a row
//!   that commits later with a smaller id.

use std::borrow::Cow;
use std::fmt::Write as _;
use std::str::FromStr;

use prometheus_client::encoding::{EncodeLabelValue, LabelValueEncoder};
use serde_json::value::RawValue;
use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::migrate::Migrator;
use sqlx::{AnyPool, Executor, Row};
use tokio::sync::{Mutex, watch};

static SQLITE_MIGRATIONS: Migrator = sqlx::migrate!("migrations/sqlite");
static POSTGRES_MIGRATIONS: Migrator = sqlx::migrate!("migrations/postgres");

/// Key of the PostgreSQL advisory lock that serialises inbox writers across instances.
const INBOX_WRITER_LOCK: i64 = 0x5357_4244_0001; // "SWBD" 1

/// Rows per multi-row INSERT: 9 parameters each stays far below both backends' parameter limits.
const INSERT_CHUNK: usize = 500;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error(
        "unsupported database URL (use sqlite://PATH or postgres://…; in-memory SQLite is not supported)"
    )]
    UnsupportedUrl,
    #[error("stored row is corrupt: {0}")]
    Corrupt(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// Which part of a transaction an inbox item came from.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum ItemKind {
    /// A timeline or state event (`events`).
    Event,
    /// An EDU such as `m.presence` (`ephemeral`).
    Ephemeral,
    /// A to-device message (`de.sorunome.msc2409.to_device`).
    ToDevice,
}

impl ItemKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ItemKind::Event => "event",
            ItemKind::Ephemeral => "ephemeral",
            ItemKind::ToDevice => "to_device",
        }
    }
}

/// Metric label values are the stored names: `event`, `ephemeral`, `to_device`.
impl EncodeLabelValue for ItemKind {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> std::fmt::Result {
        std::fmt::Write::write_str(encoder, self.as_str())
    }
}

impl FromStr for ItemKind {
    type Err = StoreError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "event" => Ok(ItemKind::Event),
            "ephemeral" => Ok(ItemKind::Ephemeral),
            "to_device" => Ok(ItemKind::ToDevice),
            other => Err(StoreError::Corrupt(format!("unknown inbox kind {other:?}"))),
        }
    }
}

/// One item of an incoming transaction, borrowed from the request body.
#[derive(Debug, Clone, Copy)]
pub struct NewItem<'a> {
    pub kind: ItemKind,
    pub event_type: &'a str,
    pub sender: Option<&'a str>,
    pub room_id: Option<&'a str>,
    pub event_id: Option<&'a str>,
    pub to_user_id: Option<&'a str>,
    pub body: &'a str,
}

/// One stored inbox item.
#[derive(Debug, Clone)]
pub struct StoredItem {
    pub id: i64,
    pub txn_id: String,
    pub kind: ItemKind,
    pub event_type: String,
    pub sender: Option<String>,
    pub room_id: Option<String>,
    pub event_id: Option<String>,
    pub to_user_id: Option<String>,
    pub body: Box<RawValue>,
    /// Unix milliseconds when its transaction was received; 0 for items stored before this was
    /// recorded (migration 0004).
    pub stored_at: i64,
}

/// The outcome of storing a transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ingested {
    /// Stored for the first time; `items` rows were added (an event already stored is not repeated).
    /// `reused_id`: this id was stored before with other content.
    New { items: usize, reused_id: bool },
    /// This transaction (id and content) was stored before: nothing was written.
    Duplicate,
}

pub struct Store {
    pool: AnyPool,
    backend: Backend,
    /// Serialises inbox writers in this process (see the module invariants).
    ingest_lock: Mutex<()>,
    /// The highest inbox id committed by this process, for subscribers to wait on.
    latest: watch::Sender<i64>,
    /// SQLite only: the task that checkpoints the WAL off the commit path.
    checkpointer: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for Store {
    fn drop(&mut self) {
        if let Some(task) = &self.checkpointer {
            task.abort();
        }
    }
}

impl Store {
    /// Opens a pool. SQLite files are created if missing and use WAL with full fsync on commit.
    pub async fn connect(url: &str, max_connections: u32) -> Result<Self, StoreError> {
        sqlx::any::install_default_drivers();
        let (backend, url) = if url.starts_with("sqlite:") {
            if url.contains(":memory:") || url.contains("mode=memory") {
                // Every pooled connection would get its own empty database.
                return Err(StoreError::UnsupportedUrl);
            }
            let url = if url.contains("mode=") {
                url.to_owned()
            } else if url.contains('?') {
                format!("{url}&mode=rwc")
            } else {
                format!("{url}?mode=rwc")
            };
            (Backend::Sqlite, url)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            (Backend::Postgres, url.to_owned())
        } else {
            return Err(StoreError::UnsupportedUrl);
        };
        let options = AnyConnectOptions::from_str(&url)?;
        let pool = AnyPoolOptions::new()
            .max_connections(max_connections)
            .after_connect(move |conn, _meta| {
                Box::pin(async move {
                    if backend == Backend::Sqlite {
                        // WAL lets readers run beside the writer; FULL fsyncs the WAL on every commit,
                        // so an answered transaction survives a power cut.
                        conn.execute("PRAGMA journal_mode = WAL").await?;
                        conn.execute("PRAGMA synchronous = FULL").await?;
                        conn.execute("PRAGMA busy_timeout = 5000").await?;
                        // Checkpoints run in `checkpoint_wal`, not inside a committing transaction.
                        conn.execute("PRAGMA wal_autocheckpoint = 0").await?;
                    }
                    Ok(())
                })
            })
            .connect_with(options)
            .await?;
        let checkpointer = (backend == Backend::Sqlite).then(|| tokio::spawn(checkpoint_wal(pool.clone())));
        Ok(Self { pool, backend, ingest_lock: Mutex::new(()), latest: watch::Sender::new(0), checkpointer })
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Applies pending migrations of this backend.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        let migrator = match self.backend {
            Backend::Sqlite => &SQLITE_MIGRATIONS,
            Backend::Postgres => &POSTGRES_MIGRATIONS,
        };
        migrator.run(&self.pool).await?;
        Ok(())
    }

    /// A cheap round trip, for readiness.
    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// Stores a transaction and its items in one database transaction. `fingerprint` identifies the
    /// content: the same id with the same fingerprint is a retry (nothing is written); with another
    /// fingerprint the id was reused, and the content is stored under `<txn_id>~<fingerprint>`
    /// (`reused_id`).
    pub async fn ingest(
        &self,
        txn_id: &str,
        fingerprint: &str,
        received_at_ms: i64,
        items: &[NewItem<'_>],
    ) -> Result<Ingested, StoreError> {
        let _writer = self.ingest_lock.lock().await;
        let mut tx = self.pool.begin().await?;
        if self.backend == Backend::Postgres {
            sqlx::query("SELECT pg_advisory_xact_lock($1)").bind(INBOX_WRITER_LOCK).execute(&mut *tx).await?;
        }
        // One INSERT on the common path; only a known id costs more.
        let mut key = Cow::Borrowed(txn_id);
        let mut reused_id = false;
        if !insert_transaction(&mut tx, txn_id, fingerprint, received_at_ms).await? {
            let seen: String =
                sqlx::query_scalar("SELECT fingerprint FROM appservice_transactions WHERE txn_id = $1")
                    .bind(txn_id)
                    .fetch_one(&mut *tx)
                    .await?;
            // An empty transaction under a known id is a retry whose ephemeral data was not resent.
            if seen == fingerprint || items.is_empty() {
                tx.rollback().await?;
                return Ok(Ingested::Duplicate);
            }
            key = Cow::Owned(format!("{txn_id}~{fingerprint}"));
            if !insert_transaction(&mut tx, &key, fingerprint, received_at_ms).await? {
                tx.rollback().await?; // a retry of the transaction that reused the id
                return Ok(Ingested::Duplicate);
            }
            reused_id = true;
        }
        let mut stored = 0;
        let mut max_id = None;
        for chunk in items.chunks(INSERT_CHUNK) {
            let sql = insert_items_sql(chunk.len(), self.backend);
            let mut query = sqlx::query(&sql);
            for item in chunk {
                query = query
                    .bind(key.as_ref())
                    .bind(item.kind.as_str())
                    .bind(item.event_type)
                    .bind(item.sender)
                    .bind(item.room_id)
                    .bind(item.event_id)
                    .bind(item.to_user_id)
                    .bind(item.body)
                    .bind(received_at_ms);
            }
            let ids = query.fetch_all(&mut *tx).await?;
            stored += ids.len();
            for row in ids {
                let id: i64 = row.try_get(0)?;
                max_id = max_id.max(Some(id));
            }
        }
        tx.commit().await?;
        if let Some(id) = max_id {
            self.latest.send_if_modified(|latest| {
                let newer = id > *latest;
                if newer {
                    *latest = id;
                }
                newer
            });
        }
        Ok(Ingested::New { items: stored, reused_id })
    }

    /// Up to `limit` inbox items with an id above `after`, in id order.
    pub async fn items_after(&self, after: i64, limit: i64) -> Result<Vec<StoredItem>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, txn_id, kind, event_type, sender, room_id, event_id, to_user_id, body, stored_at \
             FROM inbox WHERE id > $1 ORDER BY id LIMIT $2",
        )
        .bind(after)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|row| {
                let body: String = row.try_get("body")?;
                Ok(StoredItem {
                    id: row.try_get("id")?,
                    txn_id: row.try_get("txn_id")?,
                    kind: row.try_get::<String, _>("kind")?.parse()?,
                    event_type: row.try_get("event_type")?,
                    sender: row.try_get("sender")?,
                    room_id: row.try_get("room_id")?,
                    event_id: row.try_get("event_id")?,
                    to_user_id: row.try_get("to_user_id")?,
                    body: RawValue::from_string(body).map_err(|e| StoreError::Corrupt(e.to_string()))?,
                    stored_at: row.try_get("stored_at")?,
                })
            })
            .collect()
    }

    /// The last inbox id `consumer` has handled on `instance` (0 for one never seen).
    pub async fn cursor(&self, consumer: &str, instance: &str) -> Result<i64, StoreError> {
        let row = sqlx::query("SELECT last_id FROM inbox_positions WHERE consumer = $1 AND instance = $2")
            .bind(consumer)
            .bind(instance)
            .fetch_optional(&self.pool)
            .await?;
        Ok(match row {
            Some(row) => row.try_get(0)?,
            None => 0,
        })
    }

    /// Records that `consumer` on `instance` has handled every item up to `last_id`, at `now_ms`
    /// (which also marks it alive). Positions only move forward: a smaller `last_id` (a late or
    /// repeated acknowledgement) leaves the stored one as it is.
    pub async fn set_cursor(
        &self,
        consumer: &str,
        instance: &str,
        last_id: i64,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO inbox_positions (consumer, instance, last_id, updated_at) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (consumer, instance) DO UPDATE SET \
             last_id = CASE WHEN excluded.last_id > inbox_positions.last_id \
               THEN excluded.last_id ELSE inbox_positions.last_id END, \
             updated_at = excluded.updated_at",
        )
        .bind(consumer)
        .bind(instance)
        .bind(last_id)
        .bind(now_ms)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Deletes what no longer needs keeping (see [`Retention`]), in bounded batches. Returns what
    /// was deleted; a run that hit [`PRUNE_MAX_BATCHES`] leaves the rest to the next one.
    pub async fn prune(&self, now_ms: i64, retention: &Retention) -> Result<Pruned, StoreError> {
        let stored_before = now_ms.saturating_sub(retention.items_after_ms);
        let live_since = now_ms.saturating_sub(retention.consumer_timeout_ms);
        // The lowest position of the consumers still around; none at all holds everything back.
        let handled: Option<i64> =
            sqlx::query_scalar("SELECT MIN(last_id) FROM inbox_positions WHERE updated_at >= $1")
                .bind(live_since)
                .fetch_one(&self.pool)
                .await?;
        let mut pruned = Pruned::default();
        if let Some(handled) = handled {
            pruned.items = self
                .delete_in_batches(
                    "DELETE FROM inbox WHERE id IN \
                     (SELECT id FROM inbox WHERE id <= $1 AND stored_at < $2 ORDER BY id LIMIT $3)",
                    &[handled, stored_before],
                )
                .await?;
        }
        // Only the latest transaction can still be retried (the homeserver has one in flight at a
        // time), but a few more are kept whatever their age.
        let newest_kept: Option<i64> = sqlx::query_scalar(
            "SELECT MIN(received_at) FROM (SELECT received_at FROM appservice_transactions \
             ORDER BY received_at DESC LIMIT $1) newest",
        )
        .bind(TRANSACTIONS_ALWAYS_KEPT)
        .fetch_one(&self.pool)
        .await?;
        let transactions_before = stored_before.min(newest_kept.unwrap_or(i64::MIN));
        pruned.transactions = self
            .delete_in_batches(
                "DELETE FROM appservice_transactions WHERE txn_id IN \
                 (SELECT txn_id FROM appservice_transactions WHERE received_at < $1 LIMIT $2)",
                &[transactions_before],
            )
            .await?;
        Ok(pruned)
    }

    /// Runs `sql` with `binds` and then [`PRUNE_BATCH`] as its last parameter (its `LIMIT`) until it
    /// deletes less than a batch, at most [`PRUNE_MAX_BATCHES`] times.
    async fn delete_in_batches(&self, sql: &str, binds: &[i64]) -> Result<u64, StoreError> {
        let mut deleted = 0;
        for _ in 0..PRUNE_MAX_BATCHES {
            let mut query = sqlx::query(sql);
            for value in binds {
                query = query.bind(*value);
            }
            let done = query.bind(PRUNE_BATCH).execute(&self.pool).await?.rows_affected();
            deleted += done;
            if done < u64::try_from(PRUNE_BATCH).unwrap_or(u64::MAX) {
                break;
            }
        }
        Ok(deleted)
    }

    /// How many items the inbox holds (for the `switchboard_inbox_items` gauge).
    pub async fn inbox_len(&self) -> Result<i64, StoreError> {
        Ok(sqlx::query_scalar("SELECT COUNT(*) FROM inbox").fetch_one(&self.pool).await?)
    }

    /// Changes whenever this process commits new inbox items.
    pub fn watch_latest(&self) -> watch::Receiver<i64> {
        self.latest.subscribe()
    }
}

/// Rows deleted per statement when pruning, so that no prune holds the database for long.
const PRUNE_BATCH: i64 = 10_000;
/// Statements per prune: a backlog larger than this many batches is left to the next prune.
const PRUNE_MAX_BATCHES: usize = 100;
/// Transactions kept whatever their age, newest first.
const TRANSACTIONS_ALWAYS_KEPT: i64 = 100;

/// What [`Store::prune`] keeps.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    /// Inbox items every live consumer has handled are deleted once they were stored this long
    /// ago; so are transaction ids (but for the newest few, which the homeserver may still retry).
    pub items_after_ms: i64,
    /// A consumer position not moved for this long no longer holds items back.
    pub consumer_timeout_ms: i64,
}

/// What one [`Store::prune`] deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pruned {
    pub items: u64,
    pub transactions: u64,
}

/// One user of the directory as stored (see migrations/*/0002_directory.sql and 0003).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirectoryRow {
    pub user_id: String,
    pub displayname: Option<String>,
    pub avatar_url: Option<String>,
    /// Whether the displayname proves the user id's address; `None` when not recorded.
    pub verified: Option<bool>,
    /// `online`, `unavailable` or `offline`.
    pub presence: String,
    /// Unix milliseconds when the presence was learnt.
    pub presence_at: i64,
    /// Unix milliseconds of the user's last activity, when known.
    pub last_active_ms: Option<i64>,
    /// Unix milliseconds when the profile (displayname, avatar_url, verified) was observed; 0 when
    /// not known (see migrations/*/0005_directory_profile_at.sql).
    pub profile_at: i64,
}

/// Directory rows read per query when loading.
const DIRECTORY_PAGE: i64 = 10_000;

impl Store {
    /// Inserts or updates directory users, all in one database transaction. Monotonic, so that saves
    /// reaching the database out of order cannot put an older state back: the stored profile is
    /// replaced only by one observed at the same time or later (`profile_at`), the presence only by
    /// one with a `presence_at` not older, and the last activity only by a later one.
    pub async fn save_directory_users(&self, rows: &[DirectoryRow]) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        for row in rows {
            sqlx::query(
                "INSERT INTO directory_users (user_id, displayname, avatar_url, verified, profile_at, \
                 presence, presence_at, last_active_ms) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
                 ON CONFLICT (user_id) DO UPDATE SET \
                 displayname = CASE WHEN excluded.profile_at >= directory_users.profile_at \
                   THEN excluded.displayname ELSE directory_users.displayname END, \
                 avatar_url = CASE WHEN excluded.profile_at >= directory_users.profile_at \
                   THEN excluded.avatar_url ELSE directory_users.avatar_url END, \
                 verified = CASE WHEN excluded.profile_at >= directory_users.profile_at \
                   THEN excluded.verified ELSE directory_users.verified END, \
                 profile_at = CASE WHEN excluded.profile_at >= directory_users.profile_at \
                   THEN excluded.profile_at ELSE directory_users.profile_at END, \
                 presence = CASE WHEN excluded.presence_at >= directory_users.presence_at \
                   THEN excluded.presence ELSE directory_users.presence END, \
                 presence_at = CASE WHEN excluded.presence_at >= directory_users.presence_at \
                   THEN excluded.presence_at ELSE directory_users.presence_at END, \
                 last_active_ms = CASE WHEN directory_users.last_active_ms IS NULL \
                   OR excluded.last_active_ms > directory_users.last_active_ms \
                   THEN excluded.last_active_ms ELSE directory_users.last_active_ms END",
            )
            .bind(&row.user_id)
            .bind(row.displayname.as_deref())
            .bind(row.avatar_url.as_deref())
            .bind(row.verified.map(i64::from))
            .bind(row.profile_at)
            .bind(&row.presence)
            .bind(row.presence_at)
            .bind(row.last_active_ms)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Deletes directory users (evicted from the directory), all in one database transaction.
    pub async fn delete_directory_users(&self, user_ids: &[String]) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        for user_id in user_ids {
            sqlx::query("DELETE FROM directory_users WHERE user_id = $1")
                .bind(user_id)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Hands every stored directory user to `each`, in user id order, a page at a time (so that
    /// loading millions does not hold them all in memory twice).
    pub async fn each_directory_user(&self, mut each: impl FnMut(DirectoryRow)) -> Result<(), StoreError> {
        let mut after = String::new();
        loop {
            let rows = sqlx::query(
                "SELECT user_id, displayname, avatar_url, verified, profile_at, presence, presence_at, \
                 last_active_ms FROM directory_users WHERE user_id > $1 ORDER BY user_id LIMIT $2",
            )
            .bind(&after)
            .bind(DIRECTORY_PAGE)
            .fetch_all(&self.pool)
            .await?;
            let full = i64::try_from(rows.len()).is_ok_and(|n| n == DIRECTORY_PAGE);
            for row in rows {
                let row = DirectoryRow {
                    user_id: row.try_get("user_id")?,
                    displayname: row.try_get("displayname")?,
                    avatar_url: row.try_get("avatar_url")?,
                    verified: row.try_get::<Option<i64>, _>("verified")?.map(|v| v != 0),
                    presence: row.try_get("presence")?,
                    presence_at: row.try_get("presence_at")?,
                    last_active_ms: row.try_get("last_active_ms")?,
                    profile_at: row.try_get("profile_at")?,
                };
                after.clone_from(&row.user_id);
                each(row);
            }
            if !full {
                return Ok(());
            }
        }
    }

    /// Every stored directory user, by user id.
    pub async fn directory_users(&self) -> Result<Vec<DirectoryRow>, StoreError> {
        let mut rows = Vec::new();
        self.each_directory_user(|row| rows.push(row)).await?;
        Ok(rows)
    }
}

/// Records a transaction key; false when the key is already stored.
async fn insert_transaction(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    key: &str,
    fingerprint: &str,
    received_at_ms: i64,
) -> Result<bool, StoreError> {
    let inserted = sqlx::query(
        "INSERT INTO appservice_transactions (txn_id, fingerprint, received_at) VALUES ($1, $2, $3) \
         ON CONFLICT (txn_id) DO NOTHING",
    )
    .bind(key)
    .bind(fingerprint)
    .bind(received_at_ms)
    .execute(&mut **tx)
    .await?;
    Ok(inserted.rows_affected() == 1)
}

/// How often the SQLite WAL is checkpointed into the database file while it is being written.
const CHECKPOINT_INTERVAL: std::time::Duration = std::time::Duration::from_millis(250);
/// The checkpointer's longest pause while nothing is written (it doubles up to this): an idle
/// service should not wake up four times a second.
const CHECKPOINT_IDLE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(4);
/// WAL size (4 KiB frames) past which the checkpointer also truncates the WAL: 256 MiB.
const WAL_TRUNCATE_FRAMES: i64 = 65_536;

/// Copies the SQLite WAL into the database file from a background task, so that commits (and the
/// homeserver waiting on them) do not pay for it. `PASSIVE` never blocks readers or the writer, but
/// under a steady stream of commits the WAL may never find a quiet moment to start over; when it
/// has grown past [`WAL_TRUNCATE_FRAMES`], a `TRUNCATE` checkpoint (which waits for the writer, a
/// rare pause) bounds it. While the WAL does not change, the pauses grow to
/// [`CHECKPOINT_IDLE_INTERVAL`].
async fn checkpoint_wal(pool: AnyPool) {
    let mut pause = CHECKPOINT_INTERVAL;
    let mut last_frames = None;
    while !pool.is_closed() {
        tokio::time::sleep(pause).await;
        let result = async {
            // (busy, frames in the WAL, frames copied to the database)
            let (_, frames, copied): (i64, i64, i64) =
                sqlx::query_as("PRAGMA wal_checkpoint(PASSIVE)").fetch_one(&pool).await?;
            if frames > WAL_TRUNCATE_FRAMES {
                sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)").execute(&pool).await?;
            }
            Ok::<_, sqlx::Error>((frames, copied))
        };
        match result.await {
            Ok((frames, copied)) => {
                let unchanged = last_frames == Some(frames) && copied == frames;
                pause =
                    if unchanged { (pause * 2).min(CHECKPOINT_IDLE_INTERVAL) } else { CHECKPOINT_INTERVAL };
                last_frames = Some(frames);
            }
            Err(error) if !pool.is_closed() => {
                tracing::warn!(%error, "store.checkpoint failed; retrying");
                pause = CHECKPOINT_INTERVAL;
            }
            Err(_) => {}
        }
    }
}

/// The multi-row INSERT of `rows` inbox items.
///
/// SQLite gets anonymous `?` placeholders: for numbered ones sqlx looks each parameter's name up, a
/// linear scan per parameter, which cost ~20% of ingestion at 800 parameters (docs/benchmarks.md).
fn insert_items_sql(rows: usize, backend: Backend) -> String {
    const COLUMNS: usize = 9;
    let mut sql = String::from(
        "INSERT INTO inbox (txn_id, kind, event_type, sender, room_id, event_id, to_user_id, body, stored_at) \
         VALUES ",
    );
    for row in 0..rows {
        sql.push_str(if row == 0 { "(" } else { ", (" });
        for column in 0..COLUMNS {
            if column > 0 {
                sql.push_str(", ");
            }
            match backend {
                Backend::Sqlite => sql.push('?'),
                Backend::Postgres => {
                    let _ = write!(sql, "${}", row * COLUMNS + column + 1);
                }
            }
        }
        sql.push(')');
    }
    sql.push_str(" ON CONFLICT DO NOTHING RETURNING id");
    sql
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_sql_has_one_placeholder_per_value() {
        let pg = insert_items_sql(2, Backend::Postgres);
        assert!(
            pg.ends_with(
                "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9), ($10, $11, $12, $13, $14, $15, $16, $17, $18) \
                 ON CONFLICT DO NOTHING RETURNING id"
            ),
            "{pg}"
        );
        let sqlite = insert_items_sql(2, Backend::Sqlite);
        assert_eq!(sqlite.matches('?').count(), 18, "{sqlite}");
        assert!(
            sqlite.ends_with("(?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING RETURNING id"),
            "{sqlite}"
        );
    }
}
