//! `PUT /_matrix/app/v1/transactions/{txnId}` (spec: Application Service API, "Pushing events";
//! MSC2409 ephemeral data and to-device messages).
//!
//! The transaction id and every item it carries are committed to the store in one database
//! transaction before 200 is answered; a replayed id is answered 200 and not stored again.

use std::borrow::Cow;
use std::fmt::Write as _;
use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{Path, State};
use http::StatusCode;
use serde::Deserialize;
use serde::de::IgnoredAny;
use serde_json::value::RawValue;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::Appservice;
use crate::http::MatrixError;
use crate::store::{Ingested, ItemKind, NewItem};
use crate::telemetry::{Metrics, Rejection};

/// The body Synapse sends. Both the stable and the MSC2409 (`de.sorunome.msc2409.*`) keys are read;
/// when both carry the same data (Synapse duplicates ephemeral data under both), the stable one wins.
#[derive(Deserialize)]
struct Transaction<'a> {
    #[serde(default, borrow)]
    events: Vec<&'a RawValue>,
    #[serde(default, borrow)]
    ephemeral: Option<Vec<&'a RawValue>>,
    #[serde(default, borrow, rename = "de.sorunome.msc2409.ephemeral")]
    msc2409_ephemeral: Option<Vec<&'a RawValue>>,
    #[serde(default, borrow, rename = "to_device")]
    to_device: Option<Vec<&'a RawValue>>,
    #[serde(default, borrow, rename = "de.sorunome.msc2409.to_device")]
    msc2409_to_device: Option<Vec<&'a RawValue>>,
}

/// The fields of an item that the store indexes; the item itself is stored as received.
#[derive(Deserialize)]
struct ItemFields<'a> {
    #[serde(default, rename = "type", borrow)]
    event_type: Option<Indexed<'a>>,
    #[serde(default, borrow)]
    sender: Option<Indexed<'a>>,
    #[serde(default, borrow)]
    room_id: Option<Indexed<'a>>,
    #[serde(default, borrow)]
    event_id: Option<Indexed<'a>>,
    #[serde(default, borrow)]
    to_user_id: Option<Indexed<'a>>,
}

/// An indexed field as sent. An odd value (not a string, too long, holding NUL) is not indexed but
/// never refuses the transaction: Synapse would retry a refused transaction forever and hold every
/// later event behind it.
#[derive(Deserialize)]
#[serde(untagged)]
enum Indexed<'a> {
    Text(#[serde(borrow)] Cow<'a, str>),
    Other(IgnoredAny),
}

/// Longest indexed value, in bytes (Matrix identifiers are at most 255 bytes).
const MAX_INDEXED_BYTES: usize = 255;

impl Indexed<'_> {
    fn usable(&self) -> Option<&str> {
        match self {
            // PostgreSQL text cannot hold NUL; no Matrix identifier or event type contains one.
            Indexed::Text(text) if text.len() <= MAX_INDEXED_BYTES && !text.contains('\0') => Some(text),
            _ => None,
        }
    }
}

fn usable<'f>(field: Option<&'f Indexed<'_>>) -> Option<&'f str> {
    field.and_then(Indexed::usable)
}

#[tracing::instrument(name = "appservice.transaction", skip_all, fields(txn_id = tracing::field::Empty))]
pub(super) async fn put(
    State(appservice): State<Arc<Appservice>>,
    txn_id: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, MatrixError> {
    let started = appservice.clock.now();
    let metrics = &appservice.metrics;
    let Path(txn_id) = txn_id.map_err(|e| {
        refuse(metrics, Rejection::InvalidParam, "?");
        MatrixError::new(StatusCode::BAD_REQUEST, "M_INVALID_PARAM", format!("Invalid transaction id: {e}"))
    })?;
    // Synapse counts up from 1; anything long or with control characters is not from a homeserver
    // (and PostgreSQL could not index or hold it).
    if txn_id.is_empty() || txn_id.len() > MAX_INDEXED_BYTES || txn_id.chars().any(char::is_control) {
        refuse(metrics, Rejection::InvalidParam, "?");
        return Err(MatrixError::new(StatusCode::BAD_REQUEST, "M_INVALID_PARAM", "Invalid transaction id"));
    }
    tracing::Span::current().record("txn_id", txn_id.as_str());
    let body = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            refuse(metrics, Rejection::TooLarge, &txn_id);
            MatrixError::new(StatusCode::PAYLOAD_TOO_LARGE, "M_TOO_LARGE", "Transaction body is too large")
        } else {
            refuse(metrics, Rejection::NotJson, &txn_id);
            MatrixError::new(StatusCode::BAD_REQUEST, "M_NOT_JSON", "Cannot read the request body")
        }
    })?;
    let transaction: Transaction<'_> = serde_json::from_slice(&body).map_err(|e| {
        if e.is_syntax() || e.is_eof() {
            refuse(metrics, Rejection::NotJson, &txn_id);
            MatrixError::new(StatusCode::BAD_REQUEST, "M_NOT_JSON", "Body is not valid JSON")
        } else {
            refuse(metrics, Rejection::BadJson, &txn_id);
            MatrixError::new(StatusCode::BAD_REQUEST, "M_BAD_JSON", format!("Not a transaction: {e}"))
        }
    })?;
    // serde also reads a struct from a JSON array; a transaction is an object.
    if body.trim_ascii_start().first() != Some(&b'{') {
        refuse(metrics, Rejection::BadJson, &txn_id);
        return Err(MatrixError::new(
            StatusCode::BAD_REQUEST,
            "M_BAD_JSON",
            "A transaction is a JSON object",
        ));
    }
    let fields = Fields::parse(&transaction, metrics, &txn_id);
    let items = fields.items();

    let fingerprint = fingerprint(&items);
    let outcome = appservice
        .store
        .ingest(&txn_id, &fingerprint, appservice.clock.unix_millis(), &items)
        .await
        .map_err(|error| {
            metrics.database_errors.inc();
            metrics.reject(Rejection::Database);
            tracing::error!(%error, txn_id, "appservice.transaction could not be stored");
            MatrixError::unknown("Could not store the transaction; retry later")
        })?;
    match outcome {
        Ingested::New { items: stored, reused_id } => {
            metrics.transactions_received.inc();
            if reused_id {
                metrics.transactions_reused_id.inc();
                tracing::warn!(
                    txn_id,
                    "appservice.transaction id seen before with other content (was the homeserver's \
                     database reset?); stored as a new transaction"
                );
            }
            for kind in [ItemKind::Event, ItemKind::Ephemeral, ItemKind::ToDevice] {
                let count = items.iter().filter(|item| item.kind == kind).count();
                if count > 0 {
                    metrics.stored(kind, count as u64);
                }
            }
            tracing::debug!(txn_id, items = items.len(), stored, "appservice.transaction stored");
            if stored > 0 {
                // Other instances' inbox subscriptions wake at once; while Redis is down they poll.
                let _ = appservice.cluster.publish(super::inbox::WAKE_CHANNEL, Bytes::new()).await;
            }
        }
        Ingested::Duplicate => {
            metrics.transactions_duplicate.inc();
            tracing::debug!(txn_id, "appservice.transaction replayed; already stored");
        }
    }
    metrics
        .transaction_seconds
        .observe(appservice.clock.now().saturating_duration_since(started).as_secs_f64());
    Ok(Json(json!({})))
}

/// The indexed fields of every item, parsed from the borrowed body.
struct Fields<'a> {
    parsed: Vec<(ItemKind, ItemFields<'a>, &'a RawValue)>,
}

impl<'a> Fields<'a> {
    /// Reads the indexed fields of every item. Items that are not JSON objects cannot be indexed or
    /// handled by anyone; they are left out, counted and logged.
    fn parse(transaction: &Transaction<'a>, metrics: &Metrics, txn_id: &str) -> Self {
        let ephemeral = transaction.ephemeral.as_ref().or(transaction.msc2409_ephemeral.as_ref());
        let to_device = transaction.to_device.as_ref().or(transaction.msc2409_to_device.as_ref());
        let groups = [
            (ItemKind::Event, Some(&transaction.events)),
            (ItemKind::Ephemeral, ephemeral),
            (ItemKind::ToDevice, to_device),
        ];
        let mut parsed = Vec::new();
        for (kind, raws) in groups {
            for (index, raw) in raws.into_iter().flatten().enumerate() {
                // serde would also read the fields from a JSON array; an item is an object.
                let fields =
                    if raw.get().starts_with('{') { serde_json::from_str(raw.get()).ok() } else { None };
                if let Some(fields) = fields {
                    parsed.push((kind, fields, *raw));
                } else {
                    metrics.items_skipped.inc();
                    let kind = kind.as_str();
                    tracing::warn!(
                        txn_id,
                        kind,
                        index,
                        "appservice.transaction item is not an object; skipped"
                    );
                }
            }
        }
        Self { parsed }
    }

    fn items(&self) -> Vec<NewItem<'_>> {
        self.parsed
            .iter()
            .map(|(kind, fields, raw)| NewItem {
                kind: *kind,
                event_type: usable(fields.event_type.as_ref()).unwrap_or_default(),
                sender: usable(fields.sender.as_ref()),
                room_id: usable(fields.room_id.as_ref()),
                // Only room events have ids that identify them; EDUs and to-device messages do not.
                event_id: if *kind == ItemKind::Event { usable(fields.event_id.as_ref()) } else { None },
                to_user_id: usable(fields.to_user_id.as_ref()),
                body: raw.get(),
            })
            .collect()
    }
}

/// What tells a homeserver's retry of a transaction from a new transaction under a reused id.
///
/// A Synapse retry carries the same room events (with a newer `unsigned.age`) and none of the
/// ephemeral data or to-device messages of the first attempt. So the fingerprint is the hash of the
/// event ids when there are events, and of the other items as sent when there are none (a retry of
/// such a transaction carries nothing, and the store treats an empty transaction under a known id as
/// a retry).
fn fingerprint(items: &[NewItem<'_>]) -> String {
    let events: Vec<&str> = items.iter().filter_map(|item| item.event_id).collect();
    let parts: Vec<&str> =
        if events.is_empty() { items.iter().map(|item| item.body).collect() } else { events };
    let mut hash = Sha256::new();
    for part in parts {
        hash.update(part);
        hash.update(b"\0");
    }
    let mut hex = String::with_capacity(32);
    for byte in &hash.finalize()[..16] {
        let _ = write!(hex, "{byte:02x}");
    }
    hex
}

/// Counts and logs a refused transaction. The reason only: the body may hold private messages.
fn refuse(metrics: &Metrics, reason: Rejection, txn_id: &str) {
    metrics.reject(reason);
    tracing::warn!(txn_id, ?reason, "appservice.transaction refused");
}
