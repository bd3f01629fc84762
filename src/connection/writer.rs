//! The writer: the only task that writes to a connection's socket.

use std::{future::Future, sync::Arc, time::Duration};

use bytes::Bytes;
use futures_util::{stream::SplitSink, SinkExt};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio_tungstenite::{
    tungstenite::{
        error::{Error as WsError, ProtocolError},
        Message,
    },
    WebSocketStream,
};
use tracing::debug;

use crate::{close::CloseReason, queue::Batch, session::Session, signal::Signal, Config};

/// Most frames the writer moves from the queue into one socket write.
const WRITE_BATCH: usize = 64;

/// The write half of a connection.
pub(super) type Sink<S> = SplitSink<WebSocketStream<S>, Message>;

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

/// Writes the queued `frames`, then `control` (a ping or the close), into
/// the socket's buffer and flushes once: a burst of queued frames costs one
/// write, not one per frame.
async fn write_all<S>(
    sink: &mut Sink<S>,
    frames: &mut Vec<Bytes>,
    control: Option<Message>,
) -> Result<(), WsError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    for frame in frames.drain(..) {
        sink.feed(Message::Binary(frame)).await?;
    }
    if let Some(control) = control {
        sink.feed(control).await?;
    }
    sink.flush().await
}

enum WriterWork {
    Batch(Batch),
    Heartbeat,
    Redeliver,
}

/// The only task that writes to the socket: drains the queue in batches
/// (one flush per batch), pings on an interval and closes silent clients.
///
/// Returns the sink, so the session can flush what is left at the end.
// Not an `async fn`, whose arguments would stay in the task twice for the
// session's whole life: the loop borrows them from the block's captures.
#[allow(clippy::manual_async_fn)]
pub(super) fn write_loop<S>(
    mut sink: Sink<S>,
    session: Session,
    config: Arc<Config>,
    terminate: Signal,
) -> impl Future<Output = Sink<S>> + Send
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    async move {
        if write_until_done(&mut sink, &session, &config, &terminate).await == WriterEnd::Broken {
            terminate.fire();
        }
        sink
    }
}

/// How the writer ended.
#[derive(PartialEq)]
enum WriterEnd {
    /// The close was written, or the client closed first: the reader waits
    /// for, or answers, the client's close.
    Closing,
    /// Writing failed or timed out, or the session was terminated.
    Broken,
}

async fn write_until_done<S>(
    sink: &mut Sink<S>,
    session: &Session,
    config: &Config,
    terminate: &Signal,
) -> WriterEnd
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let queue = session.queue();
    // Grown on demand: an idle session should not carry room for 64 frames.
    let mut batch = Vec::new();
    let period = config.ping_interval;
    let mut heartbeat = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    // Only a device's session waits for acknowledgements.
    let acknowledges = session.device_key().is_some();
    // Only a session that acknowledges ever sets it.
    let mut redelivery_timer = super::Timer::default();
    // Only set once a write has to wait for the socket.
    let mut write_timer = super::Timer::default();
    let terminated = terminate.fired();
    tokio::pin!(terminated);
    loop {
        let redelivery = match acknowledges {
            true => queue.next_redelivery(),
            false => None,
        };
        let work = tokio::select! {
            biased;
            _ = &mut terminated => return WriterEnd::Broken,
            // Before the queue, so a queue that never empties cannot starve
            // the heartbeat.
            _ = heartbeat.tick() => WriterWork::Heartbeat,
            _ = redelivery_timer.until(redelivery) => WriterWork::Redeliver,
            batch = queue.next_batch(&mut batch, WRITE_BATCH) => WriterWork::Batch(batch),
        };
        let mut closing = false;
        // The frames themselves wait in `batch`.
        let control = match work {
            WriterWork::Batch(Batch::Frames) => None,
            WriterWork::Batch(Batch::Close(reason)) => {
                debug!(session = %session.id(), code = reason.code, reason = reason.reason, "closing");
                closing = true;
                Some(Message::Close(Some(reason.frame())))
            }
            // While a handler runs the reader is not reading, so the client
            // cannot show it is alive; silence only counts between frames.
            WriterWork::Heartbeat
                if !session.is_handling() && session.silent_for() > config.ping_timeout =>
            {
                queue.close(CloseReason::HEARTBEAT_TIMEOUT);
                continue;
            }
            WriterWork::Heartbeat => Some(Message::Ping(Bytes::new())),
            WriterWork::Redeliver => {
                let again = queue.redeliver(tokio::time::Instant::now());
                session.node().counters().redelivered.inc_by(again as u64);
                continue;
            }
        };
        let frames = batch.len() as u64;
        // The write first: its timer is only read and set when the socket
        // makes it wait.
        let written = tokio::select! {
            biased;
            _ = &mut terminated => return WriterEnd::Broken,
            written = write_all(sink, &mut batch, control) => Some(written),
            _ = write_timer.after(config.write_timeout) => None,
        };
        match written {
            Some(Ok(())) if closing => {
                // The reader waits for the client's answering close.
                return WriterEnd::Closing;
            }
            Some(Ok(())) => {
                session.count_sent(frames);
            }
            Some(Err(
                WsError::AlreadyClosed
                | WsError::ConnectionClosed
                | WsError::Protocol(ProtocolError::SendAfterClosing),
            )) if !closing => {
                // The client closed first: the reader answers its close and
                // ends the session; cutting it off here would lose that answer.
                return WriterEnd::Closing;
            }
            Some(Err(err)) => {
                debug!(session = %session.id(), %err, "write failed");
                return WriterEnd::Broken;
            }
            None => {
                debug!(session = %session.id(), "write timed out; slow consumer");
                queue.close(CloseReason::SLOW_CONSUMER);
                return WriterEnd::Broken;
            }
        }
    }
}
