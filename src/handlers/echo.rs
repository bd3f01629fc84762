use crate::{Frame, HandlerResult, Reply, Session};

/// Opcode 100: replies with the payload unchanged (the bytes are shared, not copied).
pub fn echo(_session: &Session, frame: Frame) -> HandlerResult {
    Ok(Reply::Payload(frame.payload))
}
