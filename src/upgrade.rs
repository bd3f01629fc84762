//! The WebSocket opening handshake on top of the HTTP stack: every way it
//! can fail is a named cause with one HTTP status.

use axum::{
    extract::Request,
    http::{header, HeaderMap, HeaderValue, Method, StatusCode},
    response::{IntoResponse, Response},
};
use hyper::upgrade::OnUpgrade;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

/// Why an upgrade request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum UpgradeError {
    /// 405: the handshake must be a GET.
    #[error("WebSocket handshake must use GET")]
    MethodNotAllowed,
    /// 426: not a WebSocket upgrade request (e.g. a plain browser visit).
    #[error("this endpoint speaks WebSocket only; send an Upgrade: websocket request")]
    NotWebSocket,
    /// 426: a WebSocket version other than 13.
    #[error("unsupported Sec-WebSocket-Version; this server speaks 13")]
    UnsupportedVersion,
    /// 400: the Sec-WebSocket-Key header is missing.
    #[error("missing Sec-WebSocket-Key header")]
    MissingKey,
    /// 400: the Sec-WebSocket-Key is not the base64 of 16 bytes (RFC 6455
    /// §4.2.1 item 5).
    #[error("Sec-WebSocket-Key must be the base64 encoding of 16 bytes")]
    InvalidKey,
    /// 500: the HTTP connection cannot be taken over (not HTTP/1.1).
    #[error("connection cannot be upgraded")]
    NotUpgradable,
    /// 503: the server is at its connection limit or shutting down.
    #[error("server is at capacity or shutting down; retry later")]
    Unavailable,
    /// 403: a browser page from an origin that is not allowed.
    #[error("origin not allowed")]
    OriginNotAllowed,
    /// 429: too many connections from the client's address.
    #[error("too many connections from this address")]
    TooManyFromAddress,
}

impl UpgradeError {
    /// The HTTP status this refusal is answered with.
    pub fn status(self) -> StatusCode {
        match self {
            UpgradeError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            UpgradeError::NotWebSocket | UpgradeError::UnsupportedVersion => {
                StatusCode::UPGRADE_REQUIRED
            }
            UpgradeError::MissingKey | UpgradeError::InvalidKey => StatusCode::BAD_REQUEST,
            UpgradeError::NotUpgradable => StatusCode::INTERNAL_SERVER_ERROR,
            UpgradeError::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            UpgradeError::OriginNotAllowed => StatusCode::FORBIDDEN,
            UpgradeError::TooManyFromAddress => StatusCode::TOO_MANY_REQUESTS,
        }
    }
}

/// `Retry-After` seconds when the server is busy for a moment (too many
/// handshakes at once): clients should come back soon, with jitter.
pub const RETRY_AFTER_BUSY: u32 = 1;
/// `Retry-After` seconds when the server or this address is full, or the
/// server is shutting down.
pub const RETRY_AFTER_UNAVAILABLE: u32 = 5;

impl IntoResponse for UpgradeError {
    fn into_response(self) -> Response {
        let mut response = (self.status(), format!("{self}\n")).into_response();
        if matches!(
            self,
            UpgradeError::Unavailable | UpgradeError::TooManyFromAddress
        ) {
            response.headers_mut().insert(
                header::RETRY_AFTER,
                HeaderValue::from(RETRY_AFTER_UNAVAILABLE),
            );
        }
        if self.status() == StatusCode::UPGRADE_REQUIRED {
            let headers = response.headers_mut();
            headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
            headers.insert(
                header::SEC_WEBSOCKET_VERSION,
                HeaderValue::from_static("13"),
            );
        }
        response
    }
}

fn header_has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .any(|item| item.trim().eq_ignore_ascii_case(token))
}

/// Whether `key` is the base64 of 16 bytes, as RFC 6455 requires of a
/// Sec-WebSocket-Key (24 characters, the last two `==`).
fn is_valid_key(key: &[u8]) -> bool {
    use base64::Engine;
    let mut nonce = [0u8; 18];
    key.len() == 24
        && matches!(
            base64::engine::general_purpose::STANDARD.decode_slice(key, &mut nonce),
            Ok(16)
        )
}

/// Checks a WebSocket upgrade request and builds the 101 response; the
/// returned [`OnUpgrade`] resolves to the raw connection once it is sent.
///
/// # Errors
/// The [`UpgradeError`] naming what is wrong with the request.
pub fn accept(request: &mut Request) -> Result<(Response, OnUpgrade), UpgradeError> {
    if request.method() != Method::GET {
        return Err(UpgradeError::MethodNotAllowed);
    }
    let headers = request.headers();
    if !header_has_token(headers, header::CONNECTION, "upgrade")
        || !header_has_token(headers, header::UPGRADE, "websocket")
    {
        return Err(UpgradeError::NotWebSocket);
    }
    if headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .map(HeaderValue::as_bytes)
        != Some(b"13")
    {
        return Err(UpgradeError::UnsupportedVersion);
    }
    let key = headers
        .get(header::SEC_WEBSOCKET_KEY)
        .ok_or(UpgradeError::MissingKey)?;
    if !is_valid_key(key.as_bytes()) {
        return Err(UpgradeError::InvalidKey);
    }
    let accept = derive_accept_key(key.as_bytes());
    let on_upgrade = request
        .extensions_mut()
        .remove::<OnUpgrade>()
        .ok_or(UpgradeError::NotUpgradable)?;
    let response = Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, "websocket")
        .header(header::SEC_WEBSOCKET_ACCEPT, accept)
        .body(axum::body::Body::empty())
        .map_err(|_| UpgradeError::NotUpgradable)?;
    Ok((response, on_upgrade))
}
