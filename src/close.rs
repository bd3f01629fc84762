//! Why the server closes a session, as WebSocket close codes.

use tokio_tungstenite::tungstenite::protocol::{frame::coding::CloseCode, CloseFrame};

/// A close code and its fixed reason text; see the close code table in
/// PROTOCOL.md.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CloseReason {
    pub code: u16,
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
    /// 1008: the client kept sending past the rate limit.
    pub const RATE_LIMITED: CloseReason = CloseReason::new(1008, "rate limit exceeded");
    /// 1009: a message exceeded the configured maximum size.
    pub const MESSAGE_TOO_BIG: CloseReason = CloseReason::new(1009, "message too big");
    /// 4000: no pong or other traffic from the client within the ping timeout.
    pub const HEARTBEAT_TIMEOUT: CloseReason = CloseReason::new(4000, "heartbeat timeout");
    /// 4001: the token the session was opened with has expired; reconnect
    /// with a fresh one.
    pub const TOKEN_EXPIRED: CloseReason = CloseReason::new(4001, "token expired");

    pub const fn new(code: u16, reason: &'static str) -> CloseReason {
        CloseReason { code, reason }
    }

    /// The close frame to send.
    pub fn frame(self) -> CloseFrame {
        CloseFrame {
            code: CloseCode::from(self.code),
            reason: self.reason.into(),
        }
    }
}
