//! Error codes of error frames, and the error type handlers return.

use std::fmt;

/// Stable numeric codes carried by `wsproto.v1.Error` frames.
///
/// The numbers never change meaning. Codes below 1000 belong to the
/// protocol; applications use 1000 and up through [`HandlerError::new`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum ErrorCode {
    /// The binary message is shorter than its header (4 bytes, or 8 with a request id).
    FrameTooShort = 1,
    /// Reserved bits 30..24 of the opcode word are set.
    ReservedFlags = 2,
    /// A text message arrived; the protocol is binary frames only.
    TextNotSupported = 3,
    /// No handler is registered for the opcode (or it is server → client only).
    UnknownOpcode = 10,
    /// The payload does not decode as the opcode's payload type.
    BadPayload = 11,
    /// The handler failed for a reason that is not the client's fault.
    Internal = 12,
    /// The request would take the session past a limit (e.g. friends, subscriptions).
    LimitExceeded = 13,
    /// A topic or room name is not valid (see PROTOCOL.md, Topics).
    InvalidTopic = 14,
    /// The session may not subscribe or publish there.
    PermissionDenied = 15,
    /// SAY to a room the session has not joined.
    NotInRoom = 16,
    /// The session sends frames faster than `--rate-limit`; the frame was
    /// not processed. More than `--rate-burst` refusals with no quiet second
    /// between them close the session with 4002.
    RateLimited = 17,
    /// REFRESH_TOKEN was refused: the token does not verify, is for another
    /// user, or the server does not authenticate.
    InvalidToken = 18,
    /// The broker cannot take the request now (a cluster node that cannot
    /// reach Redis, for a stream with history); nothing was done: retry
    /// shortly.
    Unavailable = 19,
}

impl ErrorCode {
    /// The code's number on the wire.
    pub fn as_u32(self) -> u32 {
        self as u32
    }

    /// Upper-case name, as in PROTOCOL.md.
    pub fn name(self) -> &'static str {
        match self {
            ErrorCode::FrameTooShort => "FRAME_TOO_SHORT",
            ErrorCode::ReservedFlags => "RESERVED_FLAGS",
            ErrorCode::TextNotSupported => "TEXT_NOT_SUPPORTED",
            ErrorCode::UnknownOpcode => "UNKNOWN_OPCODE",
            ErrorCode::BadPayload => "BAD_PAYLOAD",
            ErrorCode::Internal => "INTERNAL",
            ErrorCode::LimitExceeded => "LIMIT_EXCEEDED",
            ErrorCode::InvalidTopic => "INVALID_TOPIC",
            ErrorCode::PermissionDenied => "PERMISSION_DENIED",
            ErrorCode::NotInRoom => "NOT_IN_ROOM",
            ErrorCode::RateLimited => "RATE_LIMITED",
            ErrorCode::InvalidToken => "INVALID_TOKEN",
            ErrorCode::Unavailable => "UNAVAILABLE",
        }
    }

    /// The protocol code with this number, if any.
    pub fn from_u32(code: u32) -> Option<ErrorCode> {
        [
            ErrorCode::FrameTooShort,
            ErrorCode::ReservedFlags,
            ErrorCode::TextNotSupported,
            ErrorCode::UnknownOpcode,
            ErrorCode::BadPayload,
            ErrorCode::Internal,
            ErrorCode::LimitExceeded,
            ErrorCode::InvalidTopic,
            ErrorCode::PermissionDenied,
            ErrorCode::NotInRoom,
            ErrorCode::RateLimited,
            ErrorCode::InvalidToken,
            ErrorCode::Unavailable,
        ]
        .into_iter()
        .find(|c| c.as_u32() == code)
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.as_u32(), self.name())
    }
}

/// A handler's refusal; becomes an error frame for the request, echoing its
/// request id. The connection stays open.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message} (code {code})")]
pub struct HandlerError {
    code: u32,
    message: String,
}

impl HandlerError {
    /// An error with an application-defined code (1000 and up by convention).
    pub fn new(code: u32, message: impl Into<String>) -> HandlerError {
        HandlerError {
            code,
            message: message.into(),
        }
    }

    /// An error with a protocol code.
    pub fn protocol(code: ErrorCode, message: impl Into<String>) -> HandlerError {
        HandlerError::new(code.as_u32(), message)
    }

    /// The payload does not fit the opcode.
    pub fn bad_payload(message: impl Into<String>) -> HandlerError {
        HandlerError::protocol(ErrorCode::BadPayload, message)
    }

    /// Something failed on the server's side.
    pub fn internal(message: impl Into<String>) -> HandlerError {
        HandlerError::protocol(ErrorCode::Internal, message)
    }

    /// The [`ErrorCode`] number the ERROR frame carries.
    pub fn code(&self) -> u32 {
        self.code
    }

    /// The human-readable text the ERROR frame carries.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl From<crate::topic::TopicError> for HandlerError {
    fn from(err: crate::topic::TopicError) -> HandlerError {
        HandlerError::protocol(ErrorCode::InvalidTopic, err.to_string())
    }
}

impl From<prost::DecodeError> for HandlerError {
    fn from(err: prost::DecodeError) -> HandlerError {
        HandlerError::bad_payload(format!("payload is not a valid message: {err}"))
    }
}
