//! Why the server closes a session, as WebSocket close codes, and how it
//! closes so that the close frame reaches the client.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_tungstenite::tungstenite::{
    error::{Error as WsError, ProtocolError},
    protocol::{frame::coding::CloseCode, CloseFrame},
};

/// A close code and its fixed reason text; see the close code table in
/// PROTOCOL.md.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CloseReason {
    /// The WebSocket close code (1000–4999) sent in the close frame.
    pub code: u16,
    /// The short reason text sent with it, e.g. `slow consumer`.
    pub reason: &'static str,
}

impl CloseReason {
    /// 1000: the session ended normally (the server answers a client's
    /// close with the client's own code; this is for closes it starts).
    pub const NORMAL: CloseReason = CloseReason::new(1000, "normal closure");
    /// 1001: the server is shutting down; reconnect to another node or later.
    pub const GOING_AWAY: CloseReason = CloseReason::new(1001, "server shutting down");
    /// 1008: the client did not read fast enough and its send queue filled
    /// up. (A write that times out cannot deliver a close frame at all; that
    /// connection is dropped, which the client sees as 1006.)
    pub const SLOW_CONSUMER: CloseReason = CloseReason::new(1008, "slow consumer: send queue full");
    /// 4002: the client kept sending past the rate limit (see
    /// [`Config::rate_limit`](crate::Config::rate_limit)); distinct from a slow
    /// consumer's 1008 so clients can tell the two apart.
    pub const RATE_LIMITED: CloseReason = CloseReason::new(4002, "rate limit exceeded");
    /// 1002: the client broke the WebSocket protocol (RFC 6455 §7.4.1):
    /// an unmasked frame, reserved bits or opcodes, a control frame over
    /// 125 bytes or fragmented, a continuation with nothing to continue,
    /// a malformed close frame.
    pub const PROTOCOL_ERROR: CloseReason = CloseReason::new(1002, "protocol error");
    /// 1007: a text message (or a close reason) that is not UTF-8.
    pub const INVALID_UTF8: CloseReason = CloseReason::new(1007, "invalid UTF-8 in text");
    /// 1009: a message exceeded the configured maximum size.
    pub const MESSAGE_TOO_BIG: CloseReason = CloseReason::new(1009, "message too big");
    /// 4000: no pong or other traffic from the client within the ping timeout.
    pub const HEARTBEAT_TIMEOUT: CloseReason = CloseReason::new(4000, "heartbeat timeout");
    /// 4003: the device let more critical deliveries go unacknowledged than
    /// `--ack-window` allows (see [`crate::inflight`]); it recovers from
    /// its acknowledged position when it reconnects.
    pub const ACK_WINDOW: CloseReason =
        CloseReason::new(4003, "too many unacknowledged deliveries");
    /// 1013: the server could not read where the device stands (the broker
    /// is unreachable), so it cannot promise what it missed; reconnect
    /// with back-off.
    pub const TRY_AGAIN_LATER: CloseReason = CloseReason::new(1013, "try again later");
    /// 4001: the token the session was opened with has expired; reconnect
    /// with a fresh one.
    pub const TOKEN_EXPIRED: CloseReason = CloseReason::new(4001, "token expired");

    /// 1001 for a session closed by a draining server, with a hint of when
    /// to reconnect: `server shutting down; reconnect after N ms`, N one of
    /// 0, 125, …, 875 (picked at random per session by the caller), so
    /// that its clients do not all come back in the same instant. Clients
    /// that read it wait that long plus their own jitter.
    pub fn going_away_after(slot: usize) -> CloseReason {
        const HINTS: [CloseReason; 8] = [
            CloseReason::new(1001, "server shutting down; reconnect after 0 ms"),
            CloseReason::new(1001, "server shutting down; reconnect after 125 ms"),
            CloseReason::new(1001, "server shutting down; reconnect after 250 ms"),
            CloseReason::new(1001, "server shutting down; reconnect after 375 ms"),
            CloseReason::new(1001, "server shutting down; reconnect after 500 ms"),
            CloseReason::new(1001, "server shutting down; reconnect after 625 ms"),
            CloseReason::new(1001, "server shutting down; reconnect after 750 ms"),
            CloseReason::new(1001, "server shutting down; reconnect after 875 ms"),
        ];
        HINTS[slot % HINTS.len()]
    }

    /// A close code and its reason.
    pub const fn new(code: u16, reason: &'static str) -> CloseReason {
        CloseReason { code, reason }
    }

    /// How to close after reading from a client failed with `err`, or
    /// `None` when there is no one left to tell (the connection is gone,
    /// or the closing handshake is already under way).
    ///
    /// RFC 6455 §7.1.7: an endpoint that fails the connection sends a
    /// close frame with the reason first, rather than just dropping TCP.
    pub fn for_read_error(err: &WsError) -> Option<CloseReason> {
        match err {
            WsError::Capacity(_) => Some(CloseReason::MESSAGE_TOO_BIG),
            WsError::Utf8(_) => Some(CloseReason::INVALID_UTF8),
            WsError::Protocol(
                ProtocolError::ResetWithoutClosingHandshake
                | ProtocolError::SendAfterClosing
                | ProtocolError::ReceivedAfterClosing,
            ) => None,
            WsError::Protocol(_) => Some(CloseReason::PROTOCOL_ERROR),
            _ => None,
        }
    }

    /// The close frame to send.
    pub fn frame(self) -> CloseFrame {
        CloseFrame {
            code: CloseCode::from(self.code),
            reason: self.reason.into(),
        }
    }
}

/// How long [`linger`] waits for the client to close its side.
pub const LINGER: Duration = Duration::from_secs(2);

/// Ends the server's side of `io` (a FIN after what was written) and reads
/// and discards what the client still sends until it closes its side or
/// `within` passes.
///
/// A socket closed with unread bytes in its receive buffer (the rest of an
/// oversized or broken message) is reset rather than closed, and a reset
/// can destroy the close frame or HTTP answer still on its way to the
/// client; draining first lets it arrive.
pub async fn linger<S>(io: &mut S, within: Duration)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let drain = async {
        let _ = io.shutdown().await;
        let mut buf = [0u8; 4096];
        while let Ok(1..) = io.read(&mut buf).await {}
    };
    let _ = tokio::time::timeout(within, drain).await;
}
