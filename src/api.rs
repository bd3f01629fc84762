//! The HTTP API for backends: `POST /api/publish` and `POST /api/history`.
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
//! An `Idempotency-Key: KEY` header (1–128 printable ASCII characters)
//! makes a retry harmless: the same key within a day publishes nothing
//! again and answers with the first publication's position and
//! `"duplicate": true`.
//!
//! Answers `200 {"sessions": N, "seq": S, "epoch": E, "nodes": K}` with the
//! message's position, the sessions on this node the message was handed to
//! and the nodes that took it; `400 {"error": …}` for a bad body; `401` for
//! a missing or wrong key; `404` when the server has no key (the API is
//! off); `503` when the broker cannot take it.
//!
//! ```text
//! POST /api/history
//! {"topic": "alarm.fire.b3", "since": {"epoch": "…", "seq": 40}, "limit": 100}
//! ```
//!
//! reads a topic's (or, with `room`, a room's) kept history: the messages
//! after `since` (from the start of the current epoch without it), oldest
//! first, at most `limit` (default and cap 1000). Answers
//! `200 {"epoch", "top", "recovered", "publications": [{"seq", "data" or
//! "data_base64", "opcode", "published_at_ms", "sender"?}]}`: `recovered`
//! is false when part of the range is no longer (or never was) in history,
//! or `since` is of another epoch.

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
    broker::{Position, Publication, Target},
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
            // Redis unreachable: a retry soon is expected to work.
            StatusCode::SERVICE_UNAVAILABLE => {
                (status, [(header::RETRY_AFTER, "1")], body).into_response()
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
    /// With `user`: a critical push, numbered in the user's stream, kept in
    /// its history, acknowledged and recovered per device.
    #[serde(default)]
    pub critical: bool,
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
    /// The epoch `seq` counts in (empty for targets that are not numbered).
    #[serde(default)]
    pub epoch: String,
    /// True when this request's `Idempotency-Key` was published before:
    /// nothing was published now, the position is the first publication's.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub duplicate: bool,
}

/// Most publications one history read returns.
pub const MAX_HISTORY_READ: usize = 1000;

/// A stream position in JSON.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct JsonPosition {
    pub epoch: String,
    pub seq: u64,
}

/// The JSON body of `POST /api/history`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HistoryRequest {
    pub topic: Option<String>,
    pub room: Option<String>,
    /// A user's stream of critical pushes.
    pub user: Option<String>,
    pub since: Option<JsonPosition>,
    pub limit: Option<usize>,
}

/// One kept message in a history answer.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct HistoryPublication {
    pub seq: u64,
    /// The payload, when it is UTF-8 text.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<String>,
    /// The payload, base64, when it is not text.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_base64: Option<String>,
    pub opcode: u32,
    pub published_at_ms: u64,
    /// The sending session and user, for messages sessions sent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sender: Option<HistorySender>,
}

/// Who sent a kept message.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct HistorySender {
    pub session_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
}

/// The JSON answer of `POST /api/history`.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct HistoryResponse {
    /// The stream's current epoch.
    pub epoch: String,
    /// Its latest sequence number in that epoch.
    pub top: u64,
    /// True when every message after `since` up to the last one returned
    /// (or up to `top`, when fewer than `limit` came back) is here.
    pub recovered: bool,
    pub publications: Vec<HistoryPublication>,
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
        if self.critical && self.user.is_none() {
            return Err(bad(
                "\"critical\" applies to user pushes; topics are critical by --topic-policy".into(),
            ));
        }
        let target = match (self.topic, self.user, self.session, self.broadcast) {
            (Some(topic), None, None, false) => {
                Target::Topic(Topic::parse(&topic).map_err(|e| bad(e.to_string()))?)
            }
            (None, Some(user), None, false) if !user.is_empty() => match self.critical {
                true => Target::UserStream(user.into()),
                false => Target::User(user.into()),
            },
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
    let key = idempotency_key(request.headers())?;
    let body = read_body(api_key, request).await?;
    let mut publication = PublishRequest::parse(&body)?.publication()?;
    publication.idempotency_key = key;
    let published = node
        .publish(publication)
        .await
        .map_err(|e| ApiError::Unavailable(e.to_string()))?;
    Ok(PublishResponse {
        sessions: published.sessions,
        seq: published.seq,
        nodes: published.nodes,
        epoch: published.epoch.to_string(),
        duplicate: published.duplicate,
    })
}

/// Longest `Idempotency-Key` accepted.
pub const MAX_IDEMPOTENCY_KEY: usize = 128;

/// The request's `Idempotency-Key`, if any: printable ASCII, at most
/// [`MAX_IDEMPOTENCY_KEY`] bytes.
fn idempotency_key(headers: &HeaderMap) -> Result<Option<std::sync::Arc<str>>, ApiError> {
    let Some(value) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let key = value
        .to_str()
        .ok()
        .filter(|k| !k.is_empty() && k.len() <= MAX_IDEMPOTENCY_KEY)
        .filter(|k| k.bytes().all(|b| b.is_ascii_graphic()))
        .ok_or_else(|| {
            ApiError::BadRequest(format!(
                "Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} printable ASCII characters"
            ))
        })?;
    Ok(Some(key.into()))
}

/// Reads the body of an authorized API request, bounded in size and time.
async fn read_body(api_key: Option<&str>, request: Request) -> Result<Bytes, ApiError> {
    authorize(api_key, request.headers())?;
    tokio::time::timeout(
        BODY_TIMEOUT,
        axum::body::to_bytes(request.into_body(), MAX_BODY),
    )
    .await
    .map_err(|_| ApiError::BadRequest("request body took too long".into()))?
    .map_err(|_| ApiError::TooLarge)
}

/// Handles one history request end to end.
///
/// # Errors
/// An [`ApiError`] for the response (503 when the broker cannot read).
pub async fn history(
    node: &Node,
    api_key: Option<&str>,
    request: Request,
) -> Result<HistoryResponse, ApiError> {
    let body = read_body(api_key, request).await?;
    let request: HistoryRequest = serde_json::from_slice(&body)
        .map_err(|e| ApiError::BadRequest(format!("invalid JSON body: {e}")))?;
    let bad = |reason: String| ApiError::BadRequest(reason);
    let stream = match (request.topic, request.room, request.user) {
        (None, None, Some(user)) if !user.is_empty() => Target::UserStream(user.into()),
        (Some(topic), None, None) => {
            let topic = Topic::parse(&topic).map_err(|e| bad(e.to_string()))?;
            Target::Topic(topic)
        }
        (None, Some(room), None) => {
            let name = Topic::parse(&room).map_err(|e| bad(e.to_string()))?;
            if !name.is_name() {
                return Err(bad("wildcards are not allowed in room names".into()));
            }
            Target::Room {
                room: room.into(),
                exclude: None,
            }
        }
        _ => return Err(bad("give exactly one of topic, room and user".into())),
    };
    let limit = request.limit.unwrap_or(MAX_HISTORY_READ);
    if limit == 0 || limit > MAX_HISTORY_READ {
        return Err(bad(format!(
            "limit must be between 1 and {MAX_HISTORY_READ}"
        )));
    }
    let since = request.since.map(|p| Position::new(p.epoch, p.seq));
    let history = node
        .broker()
        .history(&stream, since.as_ref(), limit)
        .await
        .map_err(|e| ApiError::Unavailable(e.to_string()))?;
    // Complete when the messages returned start right after `since` (in
    // this epoch) and run without a hole, up to the top or the limit.
    let after = since
        .as_ref()
        .filter(|p| *p.epoch == *history.epoch)
        .map(|p| p.seq);
    let same_epoch = since.is_none() || after.is_some();
    let mut expected = after.unwrap_or(0) + 1;
    let contiguous = history.publications.iter().all(|(seq, _)| {
        let ok = *seq == expected;
        expected += 1;
        ok
    });
    let reached = history.publications.len() == limit || expected > history.top;
    let recovered = same_epoch && contiguous && reached;
    let publications = history
        .publications
        .into_iter()
        .map(|(seq, publication)| {
            let (data, data_base64) = match std::str::from_utf8(&publication.data) {
                Ok(text) => (Some(text.to_owned()), None),
                Err(_) => (
                    None,
                    Some(base64::engine::general_purpose::STANDARD.encode(&publication.data)),
                ),
            };
            HistoryPublication {
                seq,
                data,
                data_base64,
                opcode: publication.opcode,
                published_at_ms: publication.published_at_ms,
                sender: publication.sender.map(|s| HistorySender {
                    session_id: s.session_id.to_string(),
                    user_id: s.user_id.map(|u| u.to_string()),
                }),
            }
        })
        .collect();
    Ok(HistoryResponse {
        epoch: history.epoch.to_string(),
        top: history.top,
        recovered,
        publications,
    })
}
