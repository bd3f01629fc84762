//! The HTTP publish API, for backends: `POST /api/publish`.
//!
//! ```text
//! POST /api/publish
//! Authorization: Bearer <api key>          (or X-Api-Key: <api key>)
//! {"topic": "alarm.fire.b3", "data": "smoke in hall 3"}
//! ```
//!
//! The target is exactly one of `topic` (a name or pattern), `user`,
//! `session` or `"broadcast": true`; the payload is `data` (UTF-8 text) or
//! `data_base64`; `opcode` optionally tells clients what the data is for.
//! Answers `200 {"sessions": N, "seq": S, "nodes": K}` with the sessions on
//! this node the message was handed to and the nodes that took it; `400 {"error": …}` for a bad body; `401` for a
//! missing or wrong key; `404` when the server has no key (the API is off).

use std::time::Duration;

use axum::{
    body::Bytes,
    extract::Request,
    http::{header, HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    Json,
};
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;

use crate::{
    auth::bearer_token,
    broker::{Publication, Target},
    frame::MAX_OPCODE,
    node::Node,
    topic::Topic,
};

/// Why a publish request was refused, each with one HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 404: no API key is configured, so the API is off.
    #[error("the publish API is off: start the server with --api-key")]
    Disabled,
    /// 401: the key is missing or wrong.
    #[error("missing or invalid API key")]
    Unauthorized,
    /// 400: the body is not a valid publish request.
    #[error("{0}")]
    BadRequest(String),
    /// 413: the body is over [`MAX_BODY`] (or could not be read).
    #[error("request body over {MAX_BODY} bytes")]
    TooLarge,
    /// 503: the broker could not take the message.
    #[error("{0}")]
    Unavailable(String),
}

impl ApiError {
    /// The HTTP status this error is answered with.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::Disabled => StatusCode::NOT_FOUND,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

#[derive(Serialize)]
struct ErrorBody {
    error: String,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let body = Json(ErrorBody {
            error: self.to_string(),
        });
        match status {
            StatusCode::UNAUTHORIZED => {
                (status, [(header::WWW_AUTHENTICATE, "Bearer")], body).into_response()
            }
            _ => (status, body).into_response(),
        }
    }
}

/// The JSON body of `POST /api/publish`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublishRequest {
    pub topic: Option<String>,
    pub user: Option<String>,
    pub session: Option<String>,
    #[serde(default)]
    pub broadcast: bool,
    pub data: Option<String>,
    pub data_base64: Option<String>,
    #[serde(default)]
    pub opcode: u32,
}

/// The JSON answer of `POST /api/publish`.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct PublishResponse {
    /// Sessions on this node the message was handed to.
    pub sessions: usize,
    /// Sequence number within the topic (0 for other targets).
    pub seq: u64,
    /// Nodes of the deployment that took the message (1 on a single node).
    #[serde(default)]
    pub nodes: usize,
}

/// Checks the request's key against `expected` in constant time.
///
/// # Errors
/// [`ApiError::Disabled`] without a configured key, [`ApiError::Unauthorized`]
/// when the request's key is missing or differs.
pub fn authorize(expected: Option<&str>, headers: &HeaderMap) -> Result<(), ApiError> {
    let expected = expected.ok_or(ApiError::Disabled)?;
    let given =
        bearer_token(headers).or_else(|| headers.get("x-api-key").and_then(|v| v.to_str().ok()));
    match given {
        Some(given) if bool::from(given.as_bytes().ct_eq(expected.as_bytes())) => Ok(()),
        _ => Err(ApiError::Unauthorized),
    }
}

impl PublishRequest {
    /// Parses and checks a request body.
    ///
    /// # Errors
    /// [`ApiError::BadRequest`] saying what is wrong.
    pub fn parse(body: &[u8]) -> Result<PublishRequest, ApiError> {
        serde_json::from_slice(body)
            .map_err(|e| ApiError::BadRequest(format!("invalid JSON body: {e}")))
    }

    /// The publication this request asks for.
    ///
    /// # Errors
    /// [`ApiError::BadRequest`] when the target or the data is missing,
    /// ambiguous or invalid.
    pub fn publication(self) -> Result<Publication, ApiError> {
        let bad = |reason: String| ApiError::BadRequest(reason);
        let target = match (self.topic, self.user, self.session, self.broadcast) {
            (Some(topic), None, None, false) => {
                Target::Topic(Topic::parse(&topic).map_err(|e| bad(e.to_string()))?)
            }
            (None, Some(user), None, false) if !user.is_empty() => Target::User(user.into()),
            (None, None, Some(session), false) if !session.is_empty() => {
                Target::Session(session.into())
            }
            (None, None, None, true) => Target::Broadcast,
            _ => {
                return Err(bad(
                    "give exactly one target: topic, user, session or \"broadcast\": true".into(),
                ))
            }
        };
        let data = match (self.data, self.data_base64) {
            (Some(text), None) => Bytes::from(text),
            (None, Some(encoded)) => base64::engine::general_purpose::STANDARD
                .decode(encoded)
                .map_err(|e| bad(format!("data_base64 is not base64: {e}")))?
                .into(),
            _ => return Err(bad("give exactly one of data and data_base64".into())),
        };
        if self.opcode > MAX_OPCODE {
            return Err(bad(format!("opcode exceeds {MAX_OPCODE}")));
        }
        let mut publication = Publication::new(target, None, data);
        publication.opcode = self.opcode;
        Ok(publication)
    }
}

/// Largest request body accepted.
pub const MAX_BODY: usize = 1024 * 1024;
/// How long a client may take to send the body.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(10);

/// Handles one publish request end to end: the key is checked before the
/// body is read, and the body is bounded in size and time.
///
/// # Errors
/// An [`ApiError`] for the response.
pub async fn publish(
    node: &Node,
    api_key: Option<&str>,
    request: Request,
) -> Result<PublishResponse, ApiError> {
    authorize(api_key, request.headers())?;
    let body = tokio::time::timeout(
        BODY_TIMEOUT,
        axum::body::to_bytes(request.into_body(), MAX_BODY),
    )
    .await
    .map_err(|_| ApiError::BadRequest("request body took too long".into()))?
    .map_err(|_| ApiError::TooLarge)?;
    let publication = PublishRequest::parse(&body)?.publication()?;
    let published = node
        .publish(publication)
        .await
        .map_err(|e| ApiError::Unavailable(e.to_string()))?;
    Ok(PublishResponse {
        sessions: published.sessions,
        seq: published.seq,
        nodes: published.nodes,
    })
}
