//! The writer: the only thing that writes to a connection's socket, driven
//! by the session's task.

use std::{
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::Bytes;
use futures_util::SinkExt;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio_tungstenite::{
    tungstenite::{
        error::{Error as WsError, ProtocolError},
        Message,
    },
    WebSocketStream,
};
use tracing::debug;

use super::socket::Socket;
use crate::{
    close::CloseReason,
    deadline::{Deadlines, Drain},
    frame::Outgoing,
    queue::{Batch, SessionQueue},
    session::Session,
    Config,
};

/// Most frames the writer moves from the queue into one socket write.
const WRITE_BATCH: usize = 64;

/// Flushes what the codec and the stream still hold, for at most `within`.
/// The codec answers a client's close and reports the connection closed
/// without flushing, and a TLS stream holds what was written until then.
pub(crate) async fn flush_rest<S>(ws: &mut WebSocketStream<S>, within: Duration)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let flush = async {
        // The codec's buffer (it reports ConnectionClosed once written),
        // then the stream's.
        let _ = SinkExt::flush(&mut *ws).await;
        let _ = ws.get_mut().flush().await;
    };
    let _ = tokio::time::timeout(within, flush).await;
}

/// [`flush_rest`], for a session's socket.
pub(super) async fn flush_socket<S>(socket: &mut Socket<S>, within: Duration)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let flush = async {
        let _ = std::future::poll_fn(|cx| socket.poll_flush(cx)).await;
        let _ = socket.stream_mut().flush().await;
    };
    let _ = tokio::time::timeout(within, flush).await;
}

/// Something for the writer to do.
pub(super) enum Work {
    Batch(Batch),
    Redeliver,
}

/// How a write ended.
#[derive(Debug, PartialEq)]
pub(super) enum Outcome {
    /// Frames (or a ping) went out.
    Wrote,
    /// The close went out: only the client's answering close is left to
    /// read.
    Closed,
    /// The client closed first: the codec answers its close.
    ClientClosed,
    /// Writing failed: nothing more can be written.
    Failed,
}

/// `period` from now (far in the future for a period past the clock's
/// range).
fn after(period: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(period)
        .unwrap_or_else(|| now + Duration::from_secs(86_400 * 365 * 30))
}

/// What was handed to the socket and is not flushed yet.
struct Unflushed {
    frames: u64,
    closing: bool,
}

/// Drains the session's queue into the socket in batches (one flush per
/// batch), pings on an interval, redelivers what a device has not
/// acknowledged, and closes silent clients. The session's task waits for
/// its [`next_work`](Writer::next_work), hands it to
/// [`begin`](Writer::begin), and polls the socket's flush until it is done;
/// one batch is written at a time.
pub(super) struct Writer {
    /// Grown on demand: an idle session should not carry room for 64 frames.
    batch: Vec<Outgoing>,
    /// The session's next heartbeat and its token's expiry, kept by the
    /// process's deadline thread rather than a timer of the session's own
    /// (see [`deadline`](crate::deadline)).
    deadlines: Deadlines,
    /// Only a device's session waits for acknowledgements.
    acknowledges: bool,
    /// Only a session that acknowledges ever sets it.
    redelivery: super::Timer,
    unflushed: Option<Unflushed>,
    open: bool,
}

impl Writer {
    /// `drain`: the server whose shutdown closes the session. `unflushed`:
    /// frames already written into the socket's buffer, to be flushed
    /// first.
    pub(super) fn new(session: &Session, config: &Config, drain: Drain, unflushed: u64) -> Writer {
        let deadlines = Deadlines::register(session.queue().clone(), drain);
        deadlines.heartbeat_at(after(config.ping_interval));
        Writer {
            batch: Vec::new(),
            deadlines,
            acknowledges: session.device_key().is_some(),
            redelivery: super::Timer::default(),
            unflushed: (unflushed > 0).then_some(Unflushed {
                frames: unflushed,
                closing: false,
            }),
            open: true,
        }
    }

    /// Whether anything more may be written: not after the close, a
    /// client's close, or a failed write.
    pub(super) fn is_open(&self) -> bool {
        self.open
    }

    /// Whether a batch waits for the socket's flush.
    pub(super) fn is_flushing(&self) -> bool {
        self.unflushed.is_some()
    }

    /// Closes the session with TOKEN_EXPIRED at `at` (or never), replacing
    /// the expiry set before.
    pub(super) fn expire_at(&self, at: Option<Instant>) {
        self.deadlines.expire_at(at);
    }

    /// Waits for something to do. Cancel-safe: frames leave the queue only
    /// when it completes. `just_polled`: [`poll_queue`](Writer::poll_queue)
    /// found the queue empty in this same poll of the task, so the first
    /// poll skips it.
    pub(super) async fn next_work(&mut self, queue: &SessionQueue, just_polled: bool) -> Work {
        let redelivery = match self.acknowledges {
            true => queue.next_redelivery(),
            false => None,
        };
        let batch = &mut self.batch;
        tokio::select! {
            biased;
            _ = self.redelivery.until(redelivery) => Work::Redeliver,
            batch = super::after_first(just_polled, |cx| queue.poll_batch(cx, batch, WRITE_BATCH)) => Work::Batch(batch),
        }
    }

    /// The queue's next batch, if there is one now.
    pub(super) fn poll_queue(&mut self, queue: &SessionQueue, cx: &mut Context<'_>) -> Poll<Work> {
        queue
            .poll_batch(cx, &mut self.batch, WRITE_BATCH)
            .map(Work::Batch)
    }

    /// Does `work`: hands its frames, and the ping or close, to the socket
    /// and starts the flush. `None` when there was nothing to write;
    /// otherwise the flush, to be finished with
    /// [`poll_flush`](Socket::poll_flush) while it is pending, and its
    /// result given to [`written`](Writer::written).
    pub(super) fn begin<S>(
        &mut self,
        work: Work,
        socket: &mut Socket<S>,
        cx: &mut Context<'_>,
        session: &Session,
        config: &Config,
    ) -> Option<Poll<Result<(), WsError>>>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let queue = session.queue();
        let mut closing = false;
        // The frames themselves wait in `batch`.
        let control = match work {
            Work::Batch(Batch::Frames) => None,
            Work::Batch(Batch::Close(reason)) => {
                debug!(session = %session.id(), code = reason.code, reason = reason.reason, "closing");
                closing = true;
                Some(Message::Close(Some(reason.frame())))
            }
            Work::Batch(Batch::Heartbeat) => {
                // The next one is a ping interval from now, whatever this
                // one does.
                self.deadlines.heartbeat_at(after(config.ping_interval));
                // While a handler runs the session reads nothing, so the
                // client cannot show it is alive; silence only counts
                // between frames.
                if !session.is_handling() && session.silent_for() > config.ping_timeout {
                    queue.close(CloseReason::HEARTBEAT_TIMEOUT);
                    return None;
                }
                // Quiet for a while: give back the batch's buffer and the
                // queue's, which a burst grew (a busy session keeps them:
                // growing them for every batch costs fan-out).
                self.batch = Vec::new();
                socket.shrink();
                queue.shrink();
                Some(Message::Ping(Bytes::new()))
            }
            Work::Redeliver => {
                let again = queue.redeliver(tokio::time::Instant::now());
                session.node().counters().redelivered.inc_by(again as u64);
                return None;
            }
        };
        self.unflushed = Some(Unflushed {
            frames: self.batch.len() as u64,
            closing,
        });
        Some(match socket.write_batch(cx, &mut self.batch, control) {
            Ok(()) => socket.poll_flush(cx),
            Err(err) => Poll::Ready(Err(err)),
        })
    }

    /// Takes the result of the flush [`begin`](Writer::begin) started.
    pub(super) fn written(&mut self, result: Result<(), WsError>, session: &Session) -> Outcome {
        let Some(Unflushed { frames, closing }) = self.unflushed.take() else {
            return Outcome::Wrote;
        };
        let outcome = match result {
            Ok(()) if closing => Outcome::Closed,
            Ok(()) => {
                session.count_sent(frames);
                Outcome::Wrote
            }
            Err(
                WsError::AlreadyClosed
                | WsError::ConnectionClosed
                | WsError::Protocol(ProtocolError::SendAfterClosing),
            ) if !closing => Outcome::ClientClosed,
            Err(err) => {
                debug!(session = %session.id(), %err, "write failed");
                Outcome::Failed
            }
        };
        if outcome != Outcome::Wrote {
            self.open = false;
        }
        outcome
    }

    /// Writes what is queued and the close, for at most `--write-timeout`:
    /// for a session that can read nothing more.
    pub(super) async fn finish<S>(
        &mut self,
        socket: &mut Socket<S>,
        session: &Session,
        config: &Config,
    ) where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let finish = async {
            if self.is_flushing() {
                let flushed = std::future::poll_fn(|cx| socket.poll_flush(cx)).await;
                self.written(flushed, session);
            }
            while self.open {
                let work = self.next_work(session.queue(), false).await;
                let begun =
                    super::with_context(|cx| self.begin(work, socket, cx, session, config)).await;
                let flushed = match begun {
                    None => continue,
                    Some(Poll::Ready(flushed)) => flushed,
                    Some(Poll::Pending) => std::future::poll_fn(|cx| socket.poll_flush(cx)).await,
                };
                self.written(flushed, session);
            }
        };
        let _ = tokio::time::timeout(config.write_timeout, finish).await;
    }
}
