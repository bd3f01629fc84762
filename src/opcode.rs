//! Opcode numbers and what their payloads are.
//!
//! 0–99 are reserved for the protocol itself; 100 and up are application
//! opcodes. The table in [`BUILTIN`] is what the CLI uses to name opcodes,
//! parse `--json` payloads and pretty-print replies.

/// Server → client: a frame could not be acted on (`wsproto.v1.Error`).
pub const ERROR: u32 = 1;
/// Server → client: first frame of every session (`wsproto.v1.Welcome`).
pub const WELCOME: u32 = 2;
/// Client → server: application-level heartbeat, for clients that cannot
/// send WebSocket pings. Any payload; the server answers [`PONG`].
pub const PING: u32 = 3;
/// Server → client: answer to [`PING`], echoing its payload.
pub const PONG: u32 = 4;
/// Server → client: a request that carried a request id succeeded and has
/// no other reply. Empty payload.
pub const ACK: u32 = 5;
/// Client → server: replace the session's token before it expires
/// (`wsproto.v1.RefreshToken`); replies `TokenRefreshed`.
pub const REFRESH_TOKEN: u32 = 6;

/// Client → server: subscribe to topics (`wsproto.v1.Subscribe`).
pub const SUBSCRIBE: u32 = 10;
/// Client → server: end subscriptions (`wsproto.v1.Unsubscribe`).
pub const UNSUBSCRIBE: u32 = 11;
/// Client → server: publish to a topic (`wsproto.v1.Publish`); replies `Published`.
pub const PUBLISH: u32 = 12;
/// Server → client: a message for this session (`wsproto.v1.Delivery`).
pub const DELIVERY: u32 = 13;
/// Client → server: join a room (`wsproto.v1.Join`); replies `Presence`.
pub const JOIN: u32 = 14;
/// Client → server: leave a room (`wsproto.v1.Leave`).
pub const LEAVE: u32 = 15;
/// Client → server: say something in a room (`wsproto.v1.Say`); replies `Published`.
pub const SAY: u32 = 16;
/// Client → server: message a user or session (`wsproto.v1.Send`); replies `Published`.
pub const SEND: u32 = 17;
/// Client → server: who is in a room, or how many subscribe to a topic
/// (`wsproto.v1.PresenceRequest`); replies `Presence`.
pub const PRESENCE: u32 = 18;
/// Server → client: a member joined or left a room (`wsproto.v1.PresenceEvent`).
pub const PRESENCE_EVENT: u32 = 19;
/// Server → client: messages of a followed stream are missing and cannot be
/// delivered (`wsproto.v1.Gap`).
pub const GAP: u32 = 20;
/// Client → server: messages processed up to these positions, kept for the
/// device (`wsproto.v1.Acknowledge`).
pub const ACKNOWLEDGE: u32 = 21;

/// First opcode available to applications.
pub const FIRST_APPLICATION: u32 = 100;
/// Echo: replies with the same opcode and payload.
pub const ECHO: u32 = 100;
/// Add friend: the payload is a name (UTF-8); replies `wsproto.v1.FriendAdded`.
pub const ADD_FRIEND: u32 = 110;
/// Get info: payload `wsproto.v1.InfoRequest` (may be empty); replies `wsproto.v1.Info`.
pub const GET_INFO: u32 = 111;

/// What a payload contains, as far as tools need to know.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PayloadKind {
    /// This direction does not use the opcode.
    None,
    /// Nothing (the payload is empty).
    Empty,
    /// Any bytes, opaque to the protocol.
    Bytes,
    /// UTF-8 text.
    Text,
    /// A protobuf message of this fully-qualified name.
    Message(&'static str),
}

/// One opcode of the built-in protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpcodeSpec {
    /// The opcode number (24 bits).
    pub code: u32,
    /// Upper-case name, as used in docs and logs.
    pub name: &'static str,
    /// Payload of a client → server frame with this opcode.
    pub request: PayloadKind,
    /// Payload of a server → client frame with this opcode.
    pub reply: PayloadKind,
}

/// Every opcode the protocol and the built-in handlers define.
pub const BUILTIN: &[OpcodeSpec] = &[
    OpcodeSpec {
        code: ERROR,
        name: "ERROR",
        request: PayloadKind::None,
        reply: PayloadKind::Message("wsproto.v1.Error"),
    },
    OpcodeSpec {
        code: WELCOME,
        name: "WELCOME",
        request: PayloadKind::None,
        reply: PayloadKind::Message("wsproto.v1.Welcome"),
    },
    OpcodeSpec {
        code: PING,
        name: "PING",
        request: PayloadKind::Bytes,
        reply: PayloadKind::None,
    },
    OpcodeSpec {
        code: PONG,
        name: "PONG",
        request: PayloadKind::None,
        reply: PayloadKind::Bytes,
    },
    OpcodeSpec {
        code: ACK,
        name: "ACK",
        request: PayloadKind::None,
        reply: PayloadKind::Empty,
    },
    OpcodeSpec {
        code: REFRESH_TOKEN,
        name: "REFRESH_TOKEN",
        request: PayloadKind::Message("wsproto.v1.RefreshToken"),
        reply: PayloadKind::Message("wsproto.v1.TokenRefreshed"),
    },
    OpcodeSpec {
        code: SUBSCRIBE,
        name: "SUBSCRIBE",
        request: PayloadKind::Message("wsproto.v1.Subscribe"),
        reply: PayloadKind::Message("wsproto.v1.Subscribed"),
    },
    OpcodeSpec {
        code: UNSUBSCRIBE,
        name: "UNSUBSCRIBE",
        request: PayloadKind::Message("wsproto.v1.Unsubscribe"),
        reply: PayloadKind::None,
    },
    OpcodeSpec {
        code: PUBLISH,
        name: "PUBLISH",
        request: PayloadKind::Message("wsproto.v1.Publish"),
        reply: PayloadKind::Message("wsproto.v1.Published"),
    },
    OpcodeSpec {
        code: DELIVERY,
        name: "DELIVERY",
        request: PayloadKind::None,
        reply: PayloadKind::Message("wsproto.v1.Delivery"),
    },
    OpcodeSpec {
        code: JOIN,
        name: "JOIN",
        request: PayloadKind::Message("wsproto.v1.Join"),
        reply: PayloadKind::Message("wsproto.v1.Presence"),
    },
    OpcodeSpec {
        code: LEAVE,
        name: "LEAVE",
        request: PayloadKind::Message("wsproto.v1.Leave"),
        reply: PayloadKind::None,
    },
    OpcodeSpec {
        code: SAY,
        name: "SAY",
        request: PayloadKind::Message("wsproto.v1.Say"),
        reply: PayloadKind::Message("wsproto.v1.Published"),
    },
    OpcodeSpec {
        code: SEND,
        name: "SEND",
        request: PayloadKind::Message("wsproto.v1.Send"),
        reply: PayloadKind::Message("wsproto.v1.Published"),
    },
    OpcodeSpec {
        code: PRESENCE,
        name: "PRESENCE",
        request: PayloadKind::Message("wsproto.v1.PresenceRequest"),
        reply: PayloadKind::Message("wsproto.v1.Presence"),
    },
    OpcodeSpec {
        code: PRESENCE_EVENT,
        name: "PRESENCE_EVENT",
        request: PayloadKind::None,
        reply: PayloadKind::Message("wsproto.v1.PresenceEvent"),
    },
    OpcodeSpec {
        code: GAP,
        name: "GAP",
        request: PayloadKind::None,
        reply: PayloadKind::Message("wsproto.v1.Gap"),
    },
    OpcodeSpec {
        code: ACKNOWLEDGE,
        name: "ACKNOWLEDGE",
        request: PayloadKind::Message("wsproto.v1.Acknowledge"),
        reply: PayloadKind::None,
    },
    OpcodeSpec {
        code: ECHO,
        name: "ECHO",
        request: PayloadKind::Bytes,
        reply: PayloadKind::Bytes,
    },
    OpcodeSpec {
        code: ADD_FRIEND,
        name: "ADD_FRIEND",
        request: PayloadKind::Text,
        reply: PayloadKind::Message("wsproto.v1.FriendAdded"),
    },
    OpcodeSpec {
        code: GET_INFO,
        name: "GET_INFO",
        request: PayloadKind::Message("wsproto.v1.InfoRequest"),
        reply: PayloadKind::Message("wsproto.v1.Info"),
    },
];

/// The spec of a built-in opcode.
pub fn spec(code: u32) -> Option<&'static OpcodeSpec> {
    BUILTIN.iter().find(|spec| spec.code == code)
}

/// The name of a built-in opcode, or `"?"`.
pub fn name(code: u32) -> &'static str {
    spec(code).map_or("?", |spec| spec.name)
}

/// True for opcodes the protocol reserves (0–99).
pub fn is_reserved(code: u32) -> bool {
    code < FIRST_APPLICATION
}
