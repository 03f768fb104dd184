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
