//! The frame codec: one binary WebSocket message is one [`Frame`].
//!
//! ```text
//! +--------------------------------+----------------------+-----------------+
//! | opcode word, u32 big-endian    | request id, u32 BE   | payload         |
//! | bit 31: R (request id follows) | present iff R is set | 0..n bytes      |
//! | bits 30..24: reserved, zero    |                      |                 |
//! | bits 23..0: opcode             |                      |                 |
//! +--------------------------------+----------------------+-----------------+
//! ```
//!
//! A frame without the R bit is exactly the original `[opcode][payload]`
//! layout. Decoding borrows the payload from the message buffer (no copy, no
//! allocation) and never panics: every length is checked before it is read.

use std::fmt;

use byteorder::{BigEndian, ByteOrder};
use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::error::{ErrorCode, HandlerError};

/// Length of the opcode word.
pub const OPCODE_LEN: usize = 4;
/// Length of the optional request id.
pub const REQUEST_ID_LEN: usize = 4;
/// Bit of the opcode word announcing a request id after it.
pub const REQUEST_ID_FLAG: u32 = 0x8000_0000;
/// Bits of the opcode word reserved for future flags; must be zero.
pub const RESERVED_FLAGS: u32 = 0x7F00_0000;
/// Largest opcode a frame can carry (24 bits).
pub const MAX_OPCODE: u32 = 0x00FF_FFFF;

/// One protocol message: an opcode, an optional request id and a payload.
#[derive(Clone, PartialEq, Eq)]
pub struct Frame {
    /// What the frame asks for or carries (see [`crate::opcode`]).
    pub opcode: u32,
    /// Set by a client that wants to match replies to requests; every reply
    /// and error frame for this frame echoes it.
    pub request_id: Option<u32>,
    /// Opcode-specific bytes; may be empty.
    pub payload: Bytes,
}

/// Why a message is not a valid frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The message ends before the 4-byte opcode word does.
    #[error("frame is {len} bytes long, shorter than its 4-byte opcode")]
    TooShort {
        /// Length of the message in bytes.
        len: usize,
    },
    /// The R bit is set but the message ends before the 4-byte request id.
    #[error("frame announces a request id but is only {len} bytes long")]
    MissingRequestId {
        /// The opcode, so the error reply can name it.
        opcode: u32,
        /// Length of the message in bytes.
        len: usize,
    },
    /// One of the reserved bits 30..24 of the opcode word is set.
    #[error("reserved bits {bits:#010x} of the opcode word are set")]
    ReservedFlags {
        /// The opcode, so the error reply can name it.
        opcode: u32,
        /// The request id, if one was announced and present, for the reply.
        request_id: Option<u32>,
        /// The reserved bits that were set, in place in the opcode word.
        bits: u32,
    },
}

impl FrameError {
    /// The opcode of the offending frame, or 0 when it has none.
    pub fn opcode(&self) -> u32 {
        match *self {
            FrameError::TooShort { .. } => 0,
            FrameError::MissingRequestId { opcode, .. }
            | FrameError::ReservedFlags { opcode, .. } => opcode,
        }
    }

    /// The code of the error frame a server answers this with.
    pub fn error_code(&self) -> ErrorCode {
        match self {
            FrameError::TooShort { .. } | FrameError::MissingRequestId { .. } => {
                ErrorCode::FrameTooShort
            }
            FrameError::ReservedFlags { .. } => ErrorCode::ReservedFlags,
        }
    }

    /// The request id of the offending frame, when it could be read.
    pub fn request_id(&self) -> Option<u32> {
        match *self {
            FrameError::ReservedFlags { request_id, .. } => request_id,
            _ => None,
        }
    }
}

impl Frame {
    /// A frame without a request id.
    ///
    /// # Panics
    /// If `opcode` exceeds [`MAX_OPCODE`]: opcodes are chosen by the program,
    /// so that is a programming error.
    pub fn new(opcode: u32, payload: impl Into<Bytes>) -> Frame {
        assert!(
            opcode <= MAX_OPCODE,
            "opcode {opcode} exceeds the 24-bit maximum"
        );
        Frame {
            opcode,
            request_id: None,
            payload: payload.into(),
        }
    }

    /// The same frame, carrying `request_id`.
    pub fn with_request_id(mut self, request_id: Option<u32>) -> Frame {
        self.request_id = request_id;
        self
    }

    /// The opcode of a message, without decoding the rest; `None` when it
    /// is too short to have one.
    pub fn peek_opcode(message: &[u8]) -> Option<u32> {
        let word = message.get(..OPCODE_LEN)?;
        Some(BigEndian::read_u32(word) & MAX_OPCODE)
    }

    /// Decodes one message. The payload is a slice of `message`, not a copy.
    ///
    /// # Errors
    /// [`FrameError`] when the message is too short for its header or sets
    /// reserved bits.
    pub fn decode(mut message: Bytes) -> Result<Frame, FrameError> {
        if message.len() < OPCODE_LEN {
            return Err(FrameError::TooShort { len: message.len() });
        }
        let word = BigEndian::read_u32(&message[..OPCODE_LEN]);
        let opcode = word & MAX_OPCODE;
        let has_id = word & REQUEST_ID_FLAG != 0;
        let header_len = if has_id {
            OPCODE_LEN + REQUEST_ID_LEN
        } else {
            OPCODE_LEN
        };
        let request_id = (has_id && message.len() >= header_len)
            .then(|| BigEndian::read_u32(&message[OPCODE_LEN..header_len]));
        let bits = word & RESERVED_FLAGS;
        if bits != 0 {
            return Err(FrameError::ReservedFlags {
                opcode,
                request_id,
                bits,
            });
        }
        if has_id && request_id.is_none() {
            return Err(FrameError::MissingRequestId {
                opcode,
                len: message.len(),
            });
        }
        // The header is skipped, not split off: a split of a buffer the
        // codec handed over whole would allocate a shared owner for it.
        message.advance(header_len);
        Ok(Frame {
            opcode,
            request_id,
            payload: message,
        })
    }

    /// Bytes this frame occupies once encoded.
    pub fn encoded_len(&self) -> usize {
        let id_len = if self.request_id.is_some() {
            REQUEST_ID_LEN
        } else {
            0
        };
        OPCODE_LEN + id_len + self.payload.len()
    }

    /// Appends the encoded frame to `dst`.
    pub fn encode_into(&self, dst: &mut impl BufMut) {
        let (header, header_len) = self.header();
        dst.put_slice(&header[..header_len as usize]);
        crate::copy::put_slice(dst, &self.payload);
    }

    /// The opcode word and request id as encoded, and their length.
    fn header(&self) -> (Header, u8) {
        let mut header = [0u8; OPCODE_LEN + REQUEST_ID_LEN];
        let opcode = self.opcode & MAX_OPCODE;
        let header_len = match self.request_id {
            Some(id) => {
                BigEndian::write_u32(&mut header[..OPCODE_LEN], opcode | REQUEST_ID_FLAG);
                BigEndian::write_u32(&mut header[OPCODE_LEN..], id);
                OPCODE_LEN + REQUEST_ID_LEN
            }
            None => {
                BigEndian::write_u32(&mut header[..OPCODE_LEN], opcode);
                OPCODE_LEN
            }
        };
        (header, header_len as u8)
    }

    /// Encodes the frame into one buffer, ready to be shared by every recipient.
    pub fn encode(&self) -> Bytes {
        let (header, header_len) = self.header();
        joined(&header[..header_len as usize], &self.payload)
    }

    /// The payload as UTF-8 text.
    ///
    /// # Errors
    /// A BAD_PAYLOAD [`HandlerError`] when it is not UTF-8.
    pub fn text(&self) -> Result<&str, HandlerError> {
        std::str::from_utf8(&self.payload)
            .map_err(|e| HandlerError::bad_payload(format!("payload is not UTF-8 text: {e}")))
    }

    /// The payload decoded as protobuf message `M`; an empty payload is `M`
    /// with every field at its default.
    ///
    /// # Errors
    /// A BAD_PAYLOAD [`HandlerError`] when it does not decode.
    pub fn message<M: prost::Message + Default>(&self) -> Result<M, HandlerError> {
        Ok(M::decode(self.payload.clone())?)
    }
}

/// A frame's encoded header: the opcode word and the request id.
type Header = [u8; OPCODE_LEN + REQUEST_ID_LEN];

/// `header` then `payload`, in one new buffer.
fn joined(header: &[u8], payload: &[u8]) -> Bytes {
    let mut buf = BytesMut::with_capacity(header.len() + payload.len());
    buf.put_slice(header);
    crate::copy::put_slice(&mut buf, payload);
    buf.freeze()
}

/// A frame on its way to the client: the encoded header kept apart from
/// the payload. Queuing a reply this way takes neither a buffer of its own
/// nor a copy of the payload (often the request's own bytes); the socket
/// writes the two together. A frame encoded once for many recipients
/// ([`Frame::encode`]) is one with an empty header.
#[derive(Clone, PartialEq, Eq)]
pub struct Outgoing {
    header: Header,
    header_len: u8,
    payload: Bytes,
}

impl Outgoing {
    /// The encoded header (empty for a frame encoded as a whole).
    pub fn header(&self) -> &[u8] {
        &self.header[..self.header_len as usize]
    }

    /// What follows the header.
    pub fn payload(&self) -> &Bytes {
        &self.payload
    }

    /// Bytes of the encoded frame.
    pub fn len(&self) -> usize {
        self.header_len as usize + self.payload.len()
    }

    /// Whether the encoded frame has no bytes at all.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The encoded frame in one buffer: a copy, unless the header is empty.
    pub fn into_bytes(self) -> Bytes {
        match self.header_len {
            0 => self.payload,
            _ => joined(self.header(), &self.payload),
        }
    }
}

impl From<Bytes> for Outgoing {
    /// A frame already encoded whole.
    fn from(encoded: Bytes) -> Outgoing {
        Outgoing {
            header: Header::default(),
            header_len: 0,
            payload: encoded,
        }
    }
}

impl From<Frame> for Outgoing {
    fn from(frame: Frame) -> Outgoing {
        let (header, header_len) = frame.header();
        Outgoing {
            header,
            header_len,
            payload: frame.payload,
        }
    }
}

impl From<&Frame> for Outgoing {
    fn from(frame: &Frame) -> Outgoing {
        Outgoing::from(frame.clone())
    }
}

impl PartialEq<Bytes> for Outgoing {
    /// Whether `encoded` is this frame encoded whole.
    fn eq(&self, encoded: &Bytes) -> bool {
        let (header, payload) = encoded.split_at(encoded.len().min(self.header().len()));
        header == self.header() && payload == self.payload
    }
}

impl fmt::Debug for Outgoing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Outgoing")
            .field("header", &Preview::new(self.header(), usize::MAX))
            .field("payload", &Preview::new(&self.payload, usize::MAX))
            .finish()
    }
}

impl fmt::Debug for Frame {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Frame")
            .field("opcode", &self.opcode)
            .field("request_id", &self.request_id)
            .field("payload", &Preview::new(&self.payload, usize::MAX))
            .finish()
    }
}

/// Displays bytes as text when they are printable UTF-8 and as hex otherwise, cut
/// after `limit` bytes; used by the debug log and the CLI.
pub struct Preview<'a> {
    bytes: &'a [u8],
    limit: usize,
}

impl<'a> Preview<'a> {
    /// A preview of at most `limit` bytes of `bytes`.
    pub fn new(bytes: &'a [u8], limit: usize) -> Preview<'a> {
        Preview { bytes, limit }
    }
}

impl fmt::Display for Preview<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let cut = self.bytes.len().min(self.limit);
        let shown = &self.bytes[..cut];
        let more = if cut < self.bytes.len() { "…" } else { "" };
        // A UTF-8 message cut in the middle of a character is still text.
        let text = match std::str::from_utf8(shown) {
            Ok(text) => Some(text),
            Err(e) if e.error_len().is_none() && cut < self.bytes.len() => {
                std::str::from_utf8(&shown[..e.valid_up_to()]).ok()
            }
            Err(_) => None,
        };
        // Control characters (beyond line breaks and tabs) mean binary data
        // that happens to be valid UTF-8.
        let printable = |text: &&str| {
            !text
                .chars()
                .any(|c| c.is_control() && !matches!(c, '\n' | '\r' | '\t'))
        };
        match text.filter(printable) {
            Some(text) => write!(f, "{text:?}{more}"),
            None => {
                f.write_str("0x")?;
                for byte in shown {
                    write!(f, "{byte:02x}")?;
                }
                f.write_str(more)
            }
        }
    }
}

impl fmt::Debug for Preview<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn plain_frame_is_opcode_then_payload() {
        let frame = Frame::new(110, "我们都好");
        let bytes = frame.encode();
        assert_eq!(&bytes[..4], &[0, 0, 0, 110]);
        assert_eq!(&bytes[4..], "我们都好".as_bytes());
        assert_eq!(Frame::decode(bytes).unwrap(), frame);
    }

    #[test]
    fn request_id_follows_flagged_opcode() {
        let frame = Frame::new(111, Bytes::new()).with_request_id(Some(7));
        let bytes = frame.encode();
        assert_eq!(&bytes[..], &[0x80, 0, 0, 111, 0, 0, 0, 7]);
        assert_eq!(Frame::decode(bytes).unwrap(), frame);
    }

    #[test]
    fn the_opcode_is_peeked_without_its_flags() {
        let frame = Frame::new(111, "x").with_request_id(Some(7)).encode();
        assert_eq!(Frame::peek_opcode(&frame), Some(111));
        assert_eq!(Frame::peek_opcode(&Frame::new(110, "").encode()), Some(110));
        assert_eq!(Frame::peek_opcode(&[0, 0, 110]), None);
    }

    #[test]
    fn empty_payload_is_valid() {
        let frame = Frame::decode(Bytes::from_static(&[0, 0, 0, 100])).unwrap();
        assert_eq!(frame.opcode, 100);
        assert!(frame.payload.is_empty());
    }

    #[test]
    fn short_messages_are_errors() {
        for len in 0..4 {
            let err = Frame::decode(Bytes::from(vec![0; len])).unwrap_err();
            assert_eq!(err, FrameError::TooShort { len });
            assert_eq!(err.opcode(), 0);
        }
        let err = Frame::decode(Bytes::from_static(&[0x80, 0, 0, 111, 1])).unwrap_err();
        assert_eq!(
            err,
            FrameError::MissingRequestId {
                opcode: 111,
                len: 5
            }
        );
    }

    #[test]
    fn reserved_bits_are_rejected_with_what_could_be_read() {
        let err = Frame::decode(Bytes::from_static(&[0x81, 0, 0, 100, 0, 0, 0, 9])).unwrap_err();
        assert_eq!(
            err,
            FrameError::ReservedFlags {
                opcode: 100,
                request_id: Some(9),
                bits: 0x0100_0000
            }
        );
        assert_eq!(err.request_id(), Some(9));
    }

    #[test]
    fn decode_borrows_the_payload() {
        let message = Bytes::from(vec![0, 0, 0, 100, 1, 2, 3]);
        let start = message.as_ptr() as usize;
        let frame = Frame::decode(message).unwrap();
        assert_eq!(frame.payload.as_ptr() as usize, start + 4);
    }

    #[test]
    fn preview_shows_text_or_hex() {
        assert_eq!(
            Preview::new("我们都好".as_bytes(), 64).to_string(),
            "\"我们都好\""
        );
        assert_eq!(Preview::new(&[0xff, 0x00], 64).to_string(), "0xff00");
        // Cut inside the second character: still text, marked as cut.
        assert_eq!(Preview::new("我们".as_bytes(), 4).to_string(), "\"我\"…");
        assert_eq!(Preview::new(&[1, 2, 3], 2).to_string(), "0x0102…");
        assert_eq!(Preview::new(b"a\x00b", 64).to_string(), "0x610062");
        assert_eq!(Preview::new(b"line\n", 64).to_string(), "\"line\\n\"");
    }

    fn any_frame() -> impl Strategy<Value = Frame> {
        (
            0..=MAX_OPCODE,
            proptest::option::of(any::<u32>()),
            proptest::collection::vec(any::<u8>(), 0..256),
        )
            .prop_map(|(opcode, request_id, payload)| {
                Frame::new(opcode, payload).with_request_id(request_id)
            })
    }

    proptest! {
        #[test]
        fn encode_then_decode_is_identity(frame in any_frame()) {
            let bytes = frame.encode();
            prop_assert_eq!(bytes.len(), frame.encoded_len());
            prop_assert_eq!(Frame::decode(bytes).unwrap(), frame);
        }

        #[test]
        fn a_frame_queued_with_its_header_apart_is_the_same_bytes(frame in any_frame()) {
            let encoded = frame.encode();
            let apart = Outgoing::from(&frame);
            prop_assert_eq!(apart.len(), encoded.len());
            prop_assert_eq!(&apart, &encoded);
            prop_assert_eq!(&[apart.header(), &apart.payload()[..]].concat()[..], &encoded[..]);
            prop_assert_eq!(Outgoing::from(frame).into_bytes(), encoded.clone());
            // Encoded whole: no header apart, and the same buffer.
            let whole = Outgoing::from(encoded.clone());
            prop_assert!(whole.header().is_empty());
            prop_assert_eq!(whole.into_bytes().as_ptr(), encoded.as_ptr());
        }

        #[test]
        fn decode_never_panics_and_valid_frames_reencode_exactly(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            if let Ok(frame) = Frame::decode(Bytes::from(bytes.clone())) {
                prop_assert_eq!(&frame.encode()[..], &bytes[..]);
            }
        }
    }
}
