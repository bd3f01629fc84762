//! Opcode 6 REFRESH_TOKEN: a session swaps its token for a fresh one before
//! the old one expires, instead of being closed with 4001 and reconnecting.

use std::time::UNIX_EPOCH;

use wsproto_proto::v1;

use crate::{ErrorCode, Frame, HandlerError, HandlerResult, Reply, Session};

/// Verifies the new token like the one given at the upgrade; it must be for
/// the same user. Its claims and expiry take over; subscriptions and rooms
/// already held stay.
pub async fn refresh_token(session: Session, frame: Frame) -> HandlerResult {
    let request: v1::RefreshToken = frame.message()?;
    let refused = |why: String| HandlerError::protocol(ErrorCode::InvalidToken, why);
    let authenticator = session
        .authenticator()
        .ok_or_else(|| refused("this server does not authenticate (insecure mode)".into()))?;
    let identity = authenticator
        .verify(&request.token)
        .map_err(|err| refused(err.to_string()))?;
    if identity.user_id.as_deref() != session.user_id() {
        return Err(refused(format!(
            "the token is for {:?}, this session is {:?}",
            identity.user_id.as_deref().unwrap_or_default(),
            session.user_id().unwrap_or_default()
        )));
    }
    let expires_at_ms = identity
        .expires_at
        .and_then(|at| at.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |since| since.as_millis() as u64);
    session.replace_identity(identity);
    Ok(Reply::message(&v1::TokenRefreshed { expires_at_ms }))
}
