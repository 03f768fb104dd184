//! Discovery on the client listener, authenticated with the caller's Matrix access token (a
//! [`Caller`]; with `[directory] anonymous_read`, requests without a token are served too):
//! - `GET /_switchboard/client/v1/address/{address}/metadata` → `{"user_id", "capabilities",
//!   "displayname"}` of the best reachable verified user (the shape Raiden's path-finding service
//!   answered; `capabilities` is the `avatar_url` string), or 404 `M_NOT_FOUND`;
//! - `GET /_switchboard/client/v1/peers/{address}` → `{address, reachable, users: [...]}`;
//! - `POST /_switchboard/client/v1/peers/query` with `{"addresses": [...]}` (at most 1,000) → a map
//!   by address (as given).
//!
//! Addresses are accepted checksummed or in one case; an invalid one is 400 `M_INVALID_PARAM`.
//! An address no user is known for is looked up on the homeserver first (see
//! [`DirectoryService::discover`]); a query does that for its first 16 unknown addresses.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{FromRef, FromRequestParts, OptionalFromRequestParts, Path, State};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::identity::Address;
use super::model::{Directory, Presence, User};
use super::service::DirectoryService;
use crate::clock::Clock;
use crate::http::{Auth, Caller, MatrixError};

/// Most addresses in one query.
const MAX_QUERY: usize = 1000;
/// Unknown addresses of one query that are looked up on the homeserver before answering.
const QUERY_LOOKUPS: usize = 16;

pub struct Api {
    pub directory: Arc<DirectoryService>,
    pub auth: Auth,
    /// Requests without a token are served (`[directory] anonymous_read`); a token, when given, is
    /// still checked.
    pub anonymous_read: bool,
    pub clock: Clock,
}

impl FromRef<Arc<Api>> for Auth {
    fn from_ref(api: &Arc<Api>) -> Auth {
        api.auth.clone()
    }
}

pub fn router(api: Arc<Api>) -> Router {
    Router::new()
        .route("/_switchboard/client/v1/address/{address}/metadata", get(metadata))
        .route("/_switchboard/client/v1/peers/{address}", get(peer))
        .route("/_switchboard/client/v1/peers/query", post(query))
        .with_state(api)
}

/// Whoever may read the directory: a [`Caller`], or with `anonymous_read` also a request without a
/// token (a token, when given, is still checked).
struct Reader;

impl FromRequestParts<Arc<Api>> for Reader {
    type Rejection = MatrixError;

    async fn from_request_parts(parts: &mut Parts, api: &Arc<Api>) -> Result<Self, MatrixError> {
        if api.anonymous_read {
            <Caller as OptionalFromRequestParts<_>>::from_request_parts(parts, api).await?;
        } else {
            <Caller as FromRequestParts<_>>::from_request_parts(parts, api).await?;
        }
        Ok(Reader)
    }
}

fn parse_address(text: &str) -> Result<Address, MatrixError> {
    Address::parse(text)
        .map_err(|e| MatrixError::new(StatusCode::BAD_REQUEST, "M_INVALID_PARAM", format!("{text}: {e}")))
}

#[derive(Serialize)]
struct Metadata<'a> {
    user_id: &'a str,
    capabilities: Option<&'a str>,
    displayname: Option<&'a str>,
}

#[tracing::instrument(name = "directory.metadata", level = "debug", skip_all)]
async fn metadata(
    _: Reader,
    State(api): State<Arc<Api>>,
    Path(address): Path<String>,
) -> Result<Response, MatrixError> {
    let address = parse_address(&address)?;
    api.directory.discover(&address).await;
    let directory = api.directory.read();
    let user =
        directory.best(&address).ok_or_else(|| MatrixError::not_found("No reachable verified user"))?;
    let body = Metadata {
        user_id: &user.user_id,
        capabilities: user.avatar_url(),
        displayname: user.displayname.as_deref(),
    };
    Ok(Json(body).into_response())
}

#[derive(Serialize)]
struct PeerUser<'a> {
    user_id: &'a str,
    presence: Presence,
    last_active_ago: Option<i64>,
    capabilities: Value,
    verified: bool,
}

/// What the directory says of `address`: `{address, reachable, users: [...]}` (also the
/// signalling `presence` frame).
pub(crate) fn peer_json(directory: &Directory, address: &Address, now_ms: i64) -> Value {
    let users: Vec<PeerUser<'_>> = directory
        .users_of(address)
        .into_iter()
        .map(|user: &User| PeerUser {
            user_id: &user.user_id,
            presence: user.presence(),
            last_active_ago: user.last_active_ms.map(|at| now_ms.saturating_sub(at).max(0)),
            capabilities: user.capabilities().map_or(Value::Null, |c| json!(c)),
            verified: user.verified,
        })
        .collect();
    json!({ "address": address.to_checksum(), "reachable": directory.reachable(address), "users": users })
}

#[tracing::instrument(name = "directory.peer", level = "debug", skip_all)]
async fn peer(
    _: Reader,
    State(api): State<Arc<Api>>,
    Path(address): Path<String>,
) -> Result<Json<Value>, MatrixError> {
    let address = parse_address(&address)?;
    api.directory.discover(&address).await;
    Ok(Json(peer_json(&api.directory.read(), &address, api.clock.unix_millis())))
}

/// Watches every address of a query, and looks up the first [`QUERY_LOOKUPS`] unknown ones on the
/// homeserver (concurrently); the others are answered as they are, and looked up when asked alone.
async fn discover_some(api: &Api, addresses: impl Iterator<Item = Address>) {
    let now_ms = api.clock.unix_millis();
    let mut lookups = tokio::task::JoinSet::new();
    for address in addresses {
        api.directory.watch(&address, now_ms);
        if lookups.len() < QUERY_LOOKUPS && !api.directory.read().knows(&address) {
            let directory = api.directory.clone();
            lookups.spawn(async move { directory.discover(&address).await });
        }
    }
    lookups.join_all().await;
}

#[derive(Deserialize)]
struct Query {
    addresses: Vec<String>,
}

#[tracing::instrument(name = "directory.query", level = "debug", skip_all)]
async fn query(
    _: Reader,
    State(api): State<Arc<Api>>,
    body: Result<Json<Query>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<Value>, MatrixError> {
    let Json(query) = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            return MatrixError::new(StatusCode::PAYLOAD_TOO_LARGE, "M_TOO_LARGE", "The query is too large");
        }
        MatrixError::new(
            StatusCode::BAD_REQUEST,
            "M_BAD_JSON",
            format!("Expected {{\"addresses\": [...]}}: {e}"),
        )
    })?;
    if query.addresses.len() > MAX_QUERY {
        return Err(MatrixError::new(
            StatusCode::BAD_REQUEST,
            "M_INVALID_PARAM",
            format!("At most {MAX_QUERY} addresses per query"),
        ));
    }
    let addresses = query
        .addresses
        .iter()
        .map(|text| Ok((text, parse_address(text)?)))
        .collect::<Result<Vec<_>, MatrixError>>()?;
    discover_some(&api, addresses.iter().map(|(_, address)| *address)).await;
    let directory = api.directory.read();
    let now_ms = api.clock.unix_millis();
    let answer: BTreeMap<&String, Value> = addresses
        .into_iter()
        .map(|(text, address)| (text, peer_json(&directory, &address, now_ms)))
        .collect();
    Ok(Json(json!(answer)))
}
