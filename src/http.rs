//! What every listener shares: Matrix error JSON, fallbacks, and serving a router until shutdown.

use std::borrow::Cow;

use axum::Json;
use axum::Router;
use axum::response::{IntoResponse, Response};
use axum::serve::ListenerExt;
use http::StatusCode;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// A Matrix error response: `{"errcode": "M_…", "error": "…"}` with its HTTP status.
#[derive(Debug, Clone)]
pub struct MatrixError {
    pub status: StatusCode,
    pub errcode: &'static str,
    pub error: Cow<'static, str>,
}

#[derive(Serialize)]
struct MatrixErrorBody<'a> {
    errcode: &'a str,
    error: &'a str,
}

impl MatrixError {
    pub fn new(status: StatusCode, errcode: &'static str, error: impl Into<Cow<'static, str>>) -> Self {
        Self { status, errcode, error: error.into() }
    }

    pub fn not_found(error: impl Into<Cow<'static, str>>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "M_NOT_FOUND", error)
    }

    pub fn unrecognized() -> Self {
        Self::new(StatusCode::NOT_FOUND, "M_UNRECOGNIZED", "Unrecognized request")
    }

    pub fn unknown(error: impl Into<Cow<'static, str>>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "M_UNKNOWN", error)
    }
}

impl IntoResponse for MatrixError {
    fn into_response(self) -> Response {
        let body = MatrixErrorBody { errcode: self.errcode, error: &self.error };
        (self.status, Json(body)).into_response()
    }
}

/// Fallback for unknown paths: 404 `M_UNRECOGNIZED`, as Matrix servers answer.
pub async fn unrecognized() -> MatrixError {
    MatrixError::unrecognized()
}

/// Fallback for a known path with the wrong method: 405 `M_UNRECOGNIZED`.
pub async fn method_not_allowed() -> MatrixError {
    MatrixError::new(StatusCode::METHOD_NOT_ALLOWED, "M_UNRECOGNIZED", "Method not allowed")
}

/// The token a request presents: `Authorization: Bearer <token>` (the scheme is case-insensitive,
/// RFC 9110 §11.1), or else the legacy `access_token` query parameter.
pub fn access_token(request: &axum::extract::Request) -> Option<String> {
    if let Some(value) = request.headers().get(http::header::AUTHORIZATION) {
        let (scheme, token) = value.to_str().ok()?.split_once(' ')?;
        return scheme.eq_ignore_ascii_case("bearer").then(|| token.trim().to_owned());
    }
    url::form_urlencoded::parse(request.uri().query()?.as_bytes())
        .find(|(key, _)| key == "access_token")
        .map(|(_, value)| value.into_owned())
}

/// Checks the Matrix access token a client API request presents (from [`access_token`]) with the
/// homeserver (`whoami`, cached): 401 `M_MISSING_TOKEN` without one, 401 `M_UNKNOWN_TOKEN` when the homeserver does not
/// know it, 503 when the homeserver cannot be asked.
pub async fn caller(
    homeserver: &crate::homeserver::HomeserverClient,
    token: Option<String>,
) -> Result<crate::homeserver::Whoami, MatrixError> {
    use crate::homeserver::HomeserverError;
    let token = token.ok_or_else(|| {
        MatrixError::new(StatusCode::UNAUTHORIZED, "M_MISSING_TOKEN", "Missing access token")
    })?;
    match homeserver.whoami(&token).await {
        Ok(whoami) => Ok(whoami),
        Err(HomeserverError::Matrix { status: 401 | 403, .. }) => {
            Err(MatrixError::new(StatusCode::UNAUTHORIZED, "M_UNKNOWN_TOKEN", "Unknown access token"))
        }
        Err(error) => {
            tracing::warn!(%error, "http.auth cannot check an access token");
            Err(MatrixError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "M_UNKNOWN",
                "Cannot reach the homeserver to check the token",
            ))
        }
    }
}

/// Middleware for client API routes that need a user: rejects requests without a valid access
/// token (see [`caller`]) and hands the [`crate::homeserver::Whoami`] to the handler as an
/// extension.
pub async fn require_user(
    axum::extract::State(homeserver): axum::extract::State<
        std::sync::Arc<crate::homeserver::HomeserverClient>,
    >,
    mut request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    match caller(&homeserver, access_token(&request)).await {
        Ok(whoami) => {
            request.extensions_mut().insert(whoami);
            next.run(request).await
        }
        Err(error) => error.into_response(),
    }
}

/// Gives a router the Matrix-style fallbacks.
pub fn with_fallbacks(router: Router) -> Router {
    router.fallback(unrecognized).method_not_allowed_fallback(method_not_allowed)
}

/// Serves `router` on `listener` until `shutdown` is cancelled, then lets in-flight requests finish.
///
/// Every accepted socket gets `TCP_NODELAY`: Synapse sends one transaction at a time, and without it
/// Nagle's algorithm and delayed ACKs add ~40 ms to each one.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let listener = listener.tap_io(|stream| {
        if let Err(error) = stream.set_nodelay(true) {
            tracing::warn!(%error, "cannot set TCP_NODELAY");
        }
    });
    axum::serve(listener, router).with_graceful_shutdown(shutdown.cancelled_owned()).await
}
