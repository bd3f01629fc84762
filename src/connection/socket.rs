//! A session's WebSocket, driven by the session's one task.
//!
//! tungstenite keeps the protocol's state (frames, fragments, the close
//! handshake, answering pings) apart from the stream, and reads and writes
//! through blocking-style `Read`/`Write` calls. [`Socket`] lends it the
//! stream for one call at a time, with the polling task's context, and maps
//! "would block" to `Poll::Pending`. Unlike tokio-tungstenite's stream, it
//! is never split: reading and writing are done by the same task, so there
//! is no lock between two halves, and no waker proxy per direction that
//! wakes both halves on every readiness event.
//!
//! The session's outgoing frames skip the codec: tungstenite copies each
//! message into its write buffer before writing it, which for a fan-out
//! is a copy of every shared delivery per recipient, and a per-connection
//! buffer that grows to the largest batch. [`Socket::write_batch`] writes
//! them with one vectored write from their own buffers, each behind the
//! header tungstenite formats (and a reply's own header, which is kept
//! apart from its payload: see [`Outgoing`]); the codec still writes what
//! the protocol owes (pongs, the close) and the session's first frame.
//!
//! So do the client's whole data frames, while the codec holds nothing and
//! owes nothing: [`Socket::poll_read`] takes a final, masked binary or text
//! frame straight from the bytes the stream read (parsed with tungstenite's
//! `FrameHeader::parse`), where the codec would have copied it into its
//! 512 B buffer a piece at a time. Everything else goes through the codec,
//! and `tests::same_as_the_codec` checks that the two read alike.

use std::{
    io::{self, IoSlice, Read, Write},
    pin::Pin,
    task::{ready, Context, Poll},
};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::tungstenite::{
    error::{Error as WsError, ProtocolError},
    protocol::{
        frame::{
            coding::{Data, OpCode},
            FrameHeader,
        },
        Role, WebSocketConfig, WebSocketContext,
    },
    Message,
};

use crate::{frame::Outgoing, stream::ReadReady};

/// One server-side WebSocket: the stream and the protocol's state.
pub(crate) struct Socket<S> {
    stream: S,
    protocol: WebSocketContext,
    /// The connection is closed or failed: reads have nothing more.
    ended: bool,
    /// The last read found no whole frame and the stream would block, or
    /// took the last byte the codec had: until the stream is readable,
    /// another read would find nothing.
    starved: bool,
    /// Bytes handed to the codec that the messages it returned do not
    /// account for, counting each message as one frame with the shortest
    /// header a client can send: at least what its read buffer still
    /// holds. At zero the buffer is empty, and the next read can wait for
    /// the stream's readiness instead of going through the codec (a read
    /// that finds nothing costs about twice a readiness check). A client
    /// that fragments its messages, or pads its headers, leaves it above
    /// zero: the reads go through the codec, as before.
    unparsed: u64,
    /// The codec may hold bytes it has not written: something was handed
    /// to it, or one of its writes would have blocked, since its last
    /// complete flush.
    codec_owes: bool,
    /// Binary messages handed over by [`write_batch`](Socket::write_batch)
    /// and not all written yet, written straight from their buffers: after
    /// what the codec holds, and once the first byte is out, with the
    /// codec's writes held (a pong it owes waits), so its frames cannot
    /// land inside one of these.
    outgoing: Vec<Outgoing>,
    /// Of `outgoing`: the messages written in full, and the bytes of the
    /// next one (its headers included) written so far.
    sent: usize,
    sent_of_next: usize,
    /// The ping or close handed over with `outgoing`, for the codec once
    /// they are written: a close must come last.
    then: Option<Message>,
}

/// Most messages put in one vectored write (up to three slices each: the
/// WebSocket header, the frame's header, its payload).
const MAX_VECTORED: usize = 64;
/// The longest header of a frame from the server (unmasked): 2 bytes and
/// an 8-byte length.
const MAX_HEADER: usize = 10;

/// Writes of at most this many bytes are copied together and written as
/// one buffer.
const SMALL_WRITE: usize = 512;
/// Of those, writes this short (most replies) join in a smaller buffer.
const SHORT_WRITE: usize = 128;

impl<S> Socket<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    /// The server's side of an upgraded connection.
    pub(crate) fn new(stream: S, config: WebSocketConfig) -> Socket<S> {
        Socket {
            stream,
            protocol: WebSocketContext::new(Role::Server, Some(config)),
            ended: false,
            starved: false,
            unparsed: 0,
            codec_owes: false,
            outgoing: Vec::new(),
            sent: 0,
            sent_of_next: 0,
            then: None,
        }
    }

    /// Hands `frames` (each a binary message), then `then` (a ping or the
    /// close), to the next flush, in that order. `frames` is left empty
    /// (with the capacity of an earlier batch: the two buffers take turns).
    /// The error is for a connection that is closing or closed.
    pub(crate) fn write_batch(
        &mut self,
        cx: &mut Context<'_>,
        frames: &mut Vec<Outgoing>,
        then: Option<Message>,
    ) -> Result<(), WsError> {
        debug_assert!(self.outgoing.is_empty(), "one batch at a time");
        if !frames.is_empty() && !self.protocol.can_write() {
            frames.clear();
            return Err(WsError::Protocol(ProtocolError::SendAfterClosing));
        }
        if !self.stream.is_write_vectored() {
            // One write per slice would be one system call per header:
            // the codec's buffer does better. (TLS streams are vectored:
            // rustls packs the slices into records.)
            for frame in frames.drain(..) {
                self.write(cx, Message::Binary(frame.into_bytes()))?;
            }
        } else if !frames.is_empty() {
            std::mem::swap(&mut self.outgoing, frames);
            // For the codec once the frames are written.
            self.then = then;
            return Ok(());
        }
        then.map_or(Ok(()), |then| self.write(cx, then))
    }

    /// Gives back the memory of the last batch's list, when it is written.
    pub(crate) fn shrink(&mut self) {
        if self.outgoing.is_empty() {
            self.outgoing = Vec::new();
        }
    }

    /// Writes what [`write_batch`](Socket::write_batch) handed over, then
    /// hands its ping or close to the codec.
    fn poll_write_outgoing(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        while self.sent < self.outgoing.len() {
            let pending = &self.outgoing[self.sent..];
            let stream = Pin::new(&mut self.stream);
            // A reply or two (the usual case) without setting up room for
            // a full batch's slices.
            let (frames, of_next) = ready!(match pending.len() {
                1 | 2 => poll_write_frames::<2, _>(stream, cx, pending, self.sent_of_next),
                _ => poll_write_frames::<MAX_VECTORED, _>(stream, cx, pending, self.sent_of_next),
            })?;
            self.sent += frames;
            self.sent_of_next = of_next;
        }
        let then = self.then.take();
        self.drop_outgoing();
        match then {
            // The client's close came while the batch was written: the
            // codec answers it, and a ping or our close has no place.
            Some(_) if !self.protocol.can_write() => Poll::Ready(Ok(())),
            Some(then) => Poll::Ready(self.write(cx, then)),
            None => Poll::Ready(Ok(())),
        }
    }

    /// Adds `message` to what is written at the next flush. It is taken
    /// even when the socket cannot take more right now; the error is for a
    /// connection that is closing or closed.
    pub(crate) fn write(&mut self, cx: &mut Context<'_>, message: Message) -> Result<(), WsError> {
        self.codec_owes = true;
        let (protocol, mut io) = self.lend(cx);
        match would_block(protocol.write(&mut io, message)) {
            // Buffered: the flush writes it.
            Poll::Pending => Ok(()),
            Poll::Ready(result) => result,
        }
    }

    /// Adds `message` to what the first flush writes, before the socket is
    /// polled: only buffers it (tungstenite writes out only past its write
    /// buffer's size, far more than one frame).
    pub(crate) fn write_first(&mut self, message: Message) -> Result<(), WsError> {
        self.write(&mut Context::from_waker(std::task::Waker::noop()), message)
    }

    /// Writes out everything written so far, and the answers tungstenite
    /// owes the client (pongs, the close). A closed connection has nothing
    /// more to flush: that is not an error.
    pub(crate) fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        if !self.outgoing.is_empty() {
            // What the codec holds goes first: a pong it could write only
            // in part (the socket was full) must end before a frame starts.
            if !self.is_mid_batch() {
                let flushed = match self.codec_owes {
                    true => ready!(self.poll_flush_codec(cx)),
                    false => Ok(()),
                };
                if flushed.is_err() || !self.protocol.can_write() {
                    self.drop_outgoing();
                    return Poll::Ready(flushed);
                }
            }
            if let Err(err) = ready!(self.poll_write_outgoing(cx)) {
                self.drop_outgoing();
                return Poll::Ready(Err(err));
            }
        }
        match self.codec_owes {
            true => self.poll_flush_codec(cx),
            // Only the stream may hold something (a TLS stream does).
            false => Pin::new(&mut self.stream)
                .poll_flush(cx)
                .map_err(WsError::Io),
        }
    }

    fn poll_flush_codec(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        let (protocol, mut io) = self.lend(cx);
        let flushed = match would_block(protocol.flush(&mut io)) {
            Poll::Ready(Err(WsError::ConnectionClosed)) => Poll::Ready(Ok(())),
            other => other,
        };
        if let Poll::Ready(Ok(())) = flushed {
            self.codec_owes = false;
        }
        flushed
    }

    /// Part of a batch is written and the rest is not: nothing else may
    /// be written now.
    fn is_mid_batch(&self) -> bool {
        self.sent > 0 || self.sent_of_next > 0
    }

    /// Forgets the batch: written, or no longer writable (the connection
    /// failed or closed).
    fn drop_outgoing(&mut self) {
        self.outgoing.clear();
        self.sent = 0;
        self.sent_of_next = 0;
        self.then = None;
    }

    /// The stream beneath, for the last steps of a close.
    pub(crate) fn stream_mut(&mut self) -> &mut S {
        &mut self.stream
    }

    fn lend<'a, 'b>(
        &'a mut self,
        cx: &'a mut Context<'b>,
    ) -> (&'a mut WebSocketContext, Io<'a, 'b, S>) {
        let hold_writes = self.is_mid_batch();
        let io = Io {
            stream: &mut self.stream,
            cx,
            read: 0,
            write_blocked: false,
            hold_writes,
        };
        (&mut self.protocol, io)
    }
}

impl<S> Socket<S>
where
    S: AsyncRead + AsyncWrite + Unpin + ReadReady,
{
    /// The next message; `None` once the connection is closed (after the
    /// close handshake, or when the stream ends). An error ends it too:
    /// nothing more is read after one.
    pub(crate) fn poll_read(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Message, WsError>>> {
        if self.ended {
            return Poll::Ready(None);
        }
        // The codec holds nothing, owes nothing and is open: a whole data
        // frame at the front of what the stream reads next is taken from
        // there, which is all the codec would do with it. Anything else
        // (control frames, fragments, a frame cut short or invalid) is left
        // to the codec. The stream's read is a readiness check itself.
        if self.unparsed == 0 && !self.codec_owes && self.protocol.can_write() {
            // The codec's limits, the frame's and the message's: a frame
            // taken whole is both.
            let config = self.protocol.get_config();
            let max = [config.max_frame_size, config.max_message_size]
                .into_iter()
                .map(|limit| limit.unwrap_or(usize::MAX))
                .min()
                .unwrap_or(usize::MAX);
            match self.stream.poll_take(cx, |bytes| whole_message(bytes, max)) {
                Poll::Pending => {
                    self.starved = true;
                    return Poll::Pending;
                }
                Poll::Ready(Ok(Some(message))) => {
                    self.starved = true;
                    return Poll::Ready(Some(Ok(message)));
                }
                Poll::Ready(Ok(None)) => self.starved = false,
                Poll::Ready(Err(err)) => {
                    self.ended = true;
                    return Poll::Ready(Some(Err(WsError::Io(err))));
                }
            }
        }
        if self.starved {
            if self.stream.poll_read_ready(cx).is_pending() {
                return Poll::Pending;
            }
            self.starved = false;
        }
        let (protocol, mut io) = self.lend(cx);
        let read = would_block(protocol.read(&mut io));
        let write_blocked = io.write_blocked;
        self.unparsed += io.read;
        self.codec_owes |= write_blocked;
        match read {
            // Unless an answer the codec owes (a pong, a close) could not
            // be written: the next read tries that again.
            Poll::Pending => {
                self.starved = !write_blocked;
                Poll::Pending
            }
            Poll::Ready(Ok(message)) => {
                self.unparsed = self.unparsed.saturating_sub(shortest_frame(&message));
                // The codec owes the pong or the close's answer, which its
                // next read or flush writes.
                self.codec_owes |= matches!(message, Message::Ping(_) | Message::Close(_));
                // After a ping or a close, the codec's next read writes the
                // pong or reports the end, whatever the stream holds; and,
                // as above, a read retries what the codec could not write.
                let data = matches!(
                    message,
                    Message::Binary(_) | Message::Text(_) | Message::Pong(_)
                );
                self.starved = data && self.unparsed == 0 && !write_blocked;
                Poll::Ready(Some(Ok(message)))
            }
            Poll::Ready(Err(err)) => {
                self.ended = true;
                match err {
                    WsError::AlreadyClosed | WsError::ConnectionClosed => Poll::Ready(None),
                    err => Poll::Ready(Some(Err(err))),
                }
            }
        }
    }
}

/// One vectored write of up to `N` of `frames` (each behind its
/// WebSocket header), the first `skip` bytes of which were written before.
/// Returns how many frames are now written in full, and the bytes written
/// of the next.
fn poll_write_frames<const N: usize, S: AsyncWrite>(
    stream: Pin<&mut S>,
    cx: &mut Context<'_>,
    frames: &[Outgoing],
    mut skip: usize,
) -> Poll<Result<(usize, usize), WsError>> {
    let frames = &frames[..frames.len().min(N)];
    let mut headers = [[0u8; MAX_HEADER]; N];
    let mut header_lens = [0u8; N];
    for (i, frame) in frames.iter().enumerate() {
        header_lens[i] = binary_header(frame.len(), &mut headers[i])?;
    }
    // Up to three slices per frame (an empty part takes none);
    // `[IoSlice; 3 * N]` needs a const expression.
    let mut slices = [[IoSlice::new(&[]); 3]; N];
    let mut used = 0;
    let before = skip;
    for (i, frame) in frames.iter().enumerate() {
        let parts = [
            &headers[i][..header_lens[i] as usize],
            frame.header(),
            frame.payload(),
        ];
        for part in parts {
            let cut = skip.min(part.len());
            skip -= cut;
            if cut < part.len() {
                slices[used / 3][used % 3] = IoSlice::new(&part[cut..]);
                used += 1;
            }
        }
    }
    let slices = &slices.as_flattened()[..used];
    let total: usize = slices.iter().map(|slice| slice.len()).sum();
    let mut written = match total <= SMALL_WRITE {
        // A small write costs the kernel less as one buffer (`send`) than
        // as slices (`writev`), and the copy costs less than the difference.
        // The buffer is zeroed first: sized for the usual short reply, that
        // costs a few stores rather than a 512-byte `memset` per write.
        true if total <= SHORT_WRITE => {
            ready!(poll_write_joined::<SHORT_WRITE, S>(stream, cx, slices))?
        }
        true => ready!(poll_write_joined::<SMALL_WRITE, S>(stream, cx, slices))?,
        false => ready!(stream.poll_write_vectored(cx, slices))?,
    };
    if written == 0 {
        return Poll::Ready(Err(WsError::Io(io::ErrorKind::WriteZero.into())));
    }
    written += before;
    let mut done = 0;
    for (i, frame) in frames.iter().enumerate() {
        let whole = header_lens[i] as usize + frame.len();
        if written < whole {
            break;
        }
        written -= whole;
        done += 1;
    }
    Poll::Ready(Ok((done, written)))
}

/// One `poll_write` of `slices` (at most `N` bytes together) copied into
/// one buffer.
fn poll_write_joined<const N: usize, S: AsyncWrite>(
    stream: Pin<&mut S>,
    cx: &mut Context<'_>,
    slices: &[IoSlice<'_>],
) -> Poll<io::Result<usize>> {
    let mut joined = [0u8; N];
    let mut at = 0;
    for slice in slices {
        joined[at..at + slice.len()].copy_from_slice(slice);
        at += slice.len();
    }
    stream.poll_write(cx, &joined[..at])
}

/// Formats the header of a final binary frame of `len` bytes from the
/// server into `out`; returns its length.
fn binary_header(len: usize, out: &mut [u8; MAX_HEADER]) -> Result<u8, WsError> {
    let header = FrameHeader {
        opcode: OpCode::Data(Data::Binary),
        ..FrameHeader::default()
    };
    let mut rest = &mut out[..];
    header.format(len as u64, &mut rest)?;
    Ok((MAX_HEADER - rest.len()) as u8)
}

/// The message of the whole frame at the front of `bytes`, and the bytes
/// it took, when the codec would make one of it on its own: a final,
/// masked binary or text frame (text that is UTF-8) of at most `max`
/// bytes, without reserved bits. `None` for anything else, for the codec
/// to read (and to fail where it must).
fn whole_message(bytes: &[u8], max: usize) -> Option<(usize, Message)> {
    let mut cursor = io::Cursor::new(bytes);
    let (header, len) = FrameHeader::parse(&mut cursor).ok()??;
    let mask = header.mask?;
    let text = match header.opcode {
        OpCode::Data(Data::Binary) => false,
        OpCode::Data(Data::Text) => true,
        _ => return None,
    };
    if !header.is_final || header.rsv1 || header.rsv2 || header.rsv3 || len > max as u64 {
        return None;
    }
    let start = cursor.position() as usize;
    // Without a size limit, a length near 2⁶⁴ must not wrap.
    let end = start.checked_add(usize::try_from(len).ok()?)?;
    let payload = Bytes::from(unmasked(bytes.get(start..end)?, mask));
    let message = match text {
        false => Message::Binary(payload),
        true => Message::Text(payload.try_into().ok()?),
    };
    Some((end, message))
}

/// A copy of `masked` without the client's mask (RFC 6455, 5.3), made in
/// one pass 16 bytes at a time: the compiler turns each block into one
/// vector XOR, and no `memcpy` runs (see [`crate::copy`] for why a large
/// one can be slow here). A word at a time after a copy cost about an
/// instruction per byte.
fn unmasked(masked: &[u8], mask: [u8; 4]) -> Vec<u8> {
    // 16 is a multiple of 4: every block starts at the mask's first byte,
    // and so does the rest after them.
    let mask16: [u8; 16] = std::array::from_fn(|i| mask[i % 4]);
    let mut payload = Vec::with_capacity(masked.len());
    let spare = &mut payload.spare_capacity_mut()[..masked.len()];
    let mut blocks = spare.chunks_exact_mut(16);
    let mut from_blocks = masked.chunks_exact(16);
    for (block, from) in (&mut blocks).zip(&mut from_blocks) {
        for ((byte, from), mask) in block.iter_mut().zip(from).zip(mask16) {
            byte.write(from ^ mask);
        }
    }
    let (rest, from_rest) = (blocks.into_remainder(), from_blocks.remainder());
    for ((byte, from), mask) in rest.iter_mut().zip(from_rest).zip(mask16) {
        byte.write(from ^ mask);
    }
    // SAFETY: the loops above wrote every one of the first `masked.len()`
    // bytes (the blocks and the rest together are exactly that long).
    unsafe { payload.set_len(masked.len()) };
    payload
}

/// The fewest bytes `message` can take on the wire from a client: one
/// masked frame, its length in the shortest form. (A close message may
/// carry the codec's own reason rather than the client's: counted empty.)
fn shortest_frame(message: &Message) -> u64 {
    let len = match message {
        Message::Close(_) => 0,
        message => message.len() as u64,
    };
    let extended = match len {
        0..=125 => 0,
        126..=0xFFFF => 2,
        _ => 8,
    };
    2 + extended + 4 + len
}

/// `Poll::Pending` for an error that only says the stream would block.
fn would_block<T>(result: Result<T, WsError>) -> Poll<Result<T, WsError>> {
    match result {
        Err(WsError::Io(err)) if err.kind() == io::ErrorKind::WouldBlock => Poll::Pending,
        other => Poll::Ready(other),
    }
}

/// The stream, seen as blocking I/O for the length of one call: polled
/// with the task's context, so that "would block" has registered the task
/// to be woken.
struct Io<'a, 'b, S> {
    stream: &'a mut S,
    cx: &'a mut Context<'b>,
    /// Bytes read.
    read: u64,
    /// A write or flush would have blocked.
    write_blocked: bool,
    /// Writes wait: the socket is in the middle of a batch of its own.
    hold_writes: bool,
}

impl<S: AsyncRead + Unpin> Read for Io<'_, '_, S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut buf = ReadBuf::new(buf);
        match Pin::new(&mut *self.stream).poll_read(self.cx, &mut buf) {
            Poll::Ready(Ok(())) => {
                let n = buf.filled().len();
                self.read += n as u64;
                Ok(n)
            }
            Poll::Ready(Err(err)) => Err(err),
            Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
        }
    }
}

impl<S: AsyncWrite + Unpin> Write for Io<'_, '_, S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.hold_writes {
            self.write_blocked = true;
            return Err(io::ErrorKind::WouldBlock.into());
        }
        match Pin::new(&mut *self.stream).poll_write(self.cx, buf) {
            Poll::Ready(result) => result,
            Poll::Pending => {
                self.write_blocked = true;
                Err(io::ErrorKind::WouldBlock.into())
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.hold_writes {
            self.write_blocked = true;
            return Err(io::ErrorKind::WouldBlock.into());
        }
        match Pin::new(&mut *self.stream).poll_flush(self.cx) {
            Poll::Ready(result) => result,
            Poll::Pending => {
                self.write_blocked = true;
                Err(io::ErrorKind::WouldBlock.into())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::future::poll_fn;

    use bytes::Bytes;
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::{
        tungstenite::protocol::{frame::coding::CloseCode, CloseFrame},
        WebSocketStream,
    };

    use super::*;

    fn pair(
        buffer: usize,
    ) -> (
        WebSocketStream<tokio::io::DuplexStream>,
        Socket<tokio::io::DuplexStream>,
    ) {
        let (client_io, server_io) = tokio::io::duplex(buffer);
        let client = WebSocketStream::from_raw_socket(client_io, Role::Client, None);
        let client = futures_util::FutureExt::now_or_never(client).expect("made at once");
        (client, Socket::new(server_io, WebSocketConfig::default()))
    }

    /// Messages go both ways in order, a ping is answered without being
    /// asked, and the client's close is answered and ends the reads.
    #[tokio::test]
    async fn messages_go_both_ways_and_the_clients_close_is_answered() {
        let (mut client, mut server) = pair(64 * 1024);
        for message in [
            Message::binary(&b"a"[..]),
            Message::Ping(Bytes::from_static(b"p")),
            Message::binary(&b"b"[..]),
        ] {
            client.send(message).await.unwrap();
        }
        let mut read = Vec::new();
        while read.len() < 3 {
            read.push(poll_fn(|cx| server.poll_read(cx)).await.unwrap().unwrap());
        }
        assert_eq!(read[0], Message::binary(&b"a"[..]));
        assert!(matches!(read[1], Message::Ping(_)));
        assert_eq!(read[2], Message::binary(&b"b"[..]));

        poll_fn(|cx| Poll::Ready(server.write(cx, Message::binary(&b"reply"[..]))))
            .await
            .unwrap();
        poll_fn(|cx| server.poll_flush(cx)).await.unwrap();
        assert!(matches!(client.next().await, Some(Ok(Message::Pong(_)))));
        assert_eq!(
            client.next().await.unwrap().unwrap(),
            Message::binary(&b"reply"[..])
        );

        let bye = CloseFrame {
            code: CloseCode::Normal,
            reason: "bye".into(),
        };
        client.close(Some(bye.clone())).await.unwrap();
        let close = poll_fn(|cx| server.poll_read(cx)).await.unwrap().unwrap();
        assert_eq!(close, Message::Close(Some(bye.clone())));
        assert!(poll_fn(|cx| server.poll_read(cx)).await.is_none(), "closed");
        poll_fn(|cx| server.poll_flush(cx)).await.unwrap();
        // The client's close is answered with the same code.
        match client.next().await {
            Some(Ok(Message::Close(Some(answer)))) => assert_eq!(answer.code, CloseCode::Normal),
            other => panic!("expected the answering close, got {other:?}"),
        }
    }

    /// Messages that arrive together are all read without waiting for
    /// more to arrive, whatever the form of their headers, fragmented or
    /// not, and whatever the codec's read size: a read may wait for the
    /// socket's readiness only once the codec holds nothing.
    #[tokio::test]
    async fn messages_that_arrive_together_are_read_without_waiting_for_more() {
        use tokio::io::AsyncWriteExt;
        use tokio_tungstenite::tungstenite::protocol::frame::Frame;

        use crate::{read_ahead::ReadAhead, stream::SessionStream};

        fn wire(frame: Frame, out: &mut Vec<u8>) {
            let mut frame = frame;
            frame.header_mut().mask = Some([7, 1, 9, 3]);
            frame.format(out).unwrap();
        }
        let sizes = [0usize, 1, 125, 126, 4096, 65535, 65536, 70_000];
        let mut bytes = Vec::new();
        let mut expected = Vec::new();
        for (i, &size) in sizes.iter().enumerate() {
            let data = Bytes::from(vec![i as u8; size]);
            wire(
                Frame::message(data.clone(), OpCode::Data(Data::Binary), true),
                &mut bytes,
            );
            expected.push(Message::Binary(data));
        }
        wire(
            Frame::message("héllo", OpCode::Data(Data::Text), true),
            &mut bytes,
        );
        expected.push(Message::text("héllo"));
        wire(Frame::ping(&b"p"[..]), &mut bytes);
        expected.push(Message::Ping(Bytes::from_static(b"p")));
        // Many short messages, all in the codec's buffer at the end: an
        // estimate off by one byte a message would leave the last waiting.
        for _ in 0..20 {
            wire(
                Frame::message(Bytes::new(), OpCode::Data(Data::Binary), true),
                &mut bytes,
            );
            expected.push(Message::Binary(Bytes::new()));
        }
        let whole_frames = (bytes.len(), expected.len());
        // Three fragments, then a five-byte message whose length takes
        // the 16-bit form it does not need: more bytes than the shortest.
        for (part, opcode, last) in [
            (&b"ab"[..], OpCode::Data(Data::Binary), false),
            (&b"cd"[..], OpCode::Data(Data::Continue), false),
            (&b"ef"[..], OpCode::Data(Data::Continue), true),
        ] {
            wire(Frame::message(part, opcode, last), &mut bytes);
        }
        expected.push(Message::binary(&b"abcdef"[..]));
        bytes.extend_from_slice(&[0x82, 0x80 | 126, 0, 5, 0, 0, 0, 0]);
        bytes.extend_from_slice(b"hello");
        expected.push(Message::binary(&b"hello"[..]));
        wire(
            Frame::message(&b"last"[..], OpCode::Data(Data::Binary), true),
            &mut bytes,
        );
        expected.push(Message::binary(&b"last"[..]));

        for read_buffer in [64, 512, 128 * 1024] {
            // Whole, shortest frames: afterwards the codec holds nothing,
            // and the count says so. The client stays open: no end of
            // stream wakes a waiting read.
            let (mut client, mut server) = connect(read_buffer).await;
            client.write_all(&bytes[..whole_frames.0]).await.unwrap();
            read_all(&mut server, &expected[..whole_frames.1], read_buffer).await;
            let nothing = poll_fn(|cx| Poll::Ready(server.poll_read(cx).is_pending())).await;
            assert!(nothing, "read buffer {read_buffer}: nothing more was sent");

            // A ping alone: the read after it writes the pong.
            let mut ping = Vec::new();
            wire(Frame::ping(&b"q"[..]), &mut ping);
            client.write_all(&ping).await.unwrap();
            let ping = [Message::Ping(Bytes::from_static(b"q"))];
            read_all(&mut server, &ping, read_buffer).await;
            let nothing = poll_fn(|cx| Poll::Ready(server.poll_read(cx).is_pending())).await;
            assert!(nothing, "read buffer {read_buffer}: nothing after the ping");
            let mut pong = Vec::new();
            while !pong.windows(3).any(|w| w == [0x8A, 1, b'q']) {
                let mut buf = [0u8; 256];
                let n = tokio::time::timeout(
                    std::time::Duration::from_secs(5),
                    tokio::io::AsyncReadExt::read(&mut client, &mut buf),
                )
                .await
                .unwrap_or_else(|_| panic!("read buffer {read_buffer}: no pong"))
                .unwrap();
                assert!(n > 0, "read buffer {read_buffer}: closed without a pong");
                pong.extend_from_slice(&buf[..n]);
            }

            // A close, however its reason is reported, ends the reads.
            // (Code 1005 may not be sent: the codec reports its own reason.)
            let mut close = Vec::new();
            let close_frame = Frame::close(Some(CloseFrame {
                code: CloseCode::from(1005),
                reason: "".into(),
            }));
            wire(close_frame, &mut close);
            client.write_all(&close).await.unwrap();
            let read = poll_fn(|cx| server.poll_read(cx)).await;
            assert!(matches!(read, Some(Ok(Message::Close(_)))), "{read:?}");
            let end = tokio::time::timeout(
                std::time::Duration::from_secs(5),
                poll_fn(|cx| server.poll_read(cx)),
            )
            .await
            .unwrap_or_else(|_| panic!("read buffer {read_buffer}: reads did not end"));
            assert!(end.is_none(), "{end:?}");

            // Fragments and padded headers take more bytes than counted:
            // the count stays above zero, and reads go through the codec.
            let (mut client, mut server) = connect(read_buffer).await;
            client.write_all(&bytes).await.unwrap();
            read_all(&mut server, &expected, read_buffer).await;
            let nothing = poll_fn(|cx| Poll::Ready(server.poll_read(cx).is_pending())).await;
            assert!(nothing, "read buffer {read_buffer}: nothing more was sent");
        }

        async fn connect(
            read_buffer: usize,
        ) -> (tokio::net::TcpStream, Socket<ReadAhead<SessionStream>>) {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let client = tokio::net::TcpStream::connect(listener.local_addr().unwrap());
            let (client, (server_tcp, _)) = tokio::try_join!(client, listener.accept()).unwrap();
            let config = WebSocketConfig::default().read_buffer_size(read_buffer);
            let server = Socket::new(ReadAhead::new(SessionStream::Tcp(server_tcp)), config);
            (client, server)
        }

        async fn read_all<S>(server: &mut Socket<S>, expected: &[Message], read_buffer: usize)
        where
            S: AsyncRead + AsyncWrite + Unpin + ReadReady,
        {
            for (i, want) in expected.iter().enumerate() {
                let read = tokio::time::timeout(
                    std::time::Duration::from_secs(5),
                    poll_fn(|cx| server.poll_read(cx)),
                )
                .await;
                let got = read
                    .unwrap_or_else(|_| panic!("read buffer {read_buffer}: message {i} never read"))
                    .unwrap()
                    .unwrap();
                assert_eq!(&got, want, "read buffer {read_buffer}: message {i}");
            }
        }
    }

    /// Over TCP, a read that found nothing leaves the socket's readiness
    /// to wake the task; what arrives later is read, a ping sent meanwhile
    /// is answered, and a client that goes away is noticed.
    #[tokio::test]
    async fn a_starved_read_wakes_for_what_arrives_later() {
        use crate::{read_ahead::ReadAhead, stream::SessionStream};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client_tcp = tokio::net::TcpStream::connect(listener.local_addr().unwrap());
        let (client_tcp, (server_tcp, _)) =
            tokio::try_join!(client_tcp, listener.accept()).unwrap();
        let mut client = WebSocketStream::from_raw_socket(client_tcp, Role::Client, None).await;
        let stream = ReadAhead::new(SessionStream::Tcp(server_tcp));
        let mut server = Socket::new(stream, WebSocketConfig::default());

        for round in 0..3u8 {
            let nothing = poll_fn(|cx| Poll::Ready(server.poll_read(cx).is_pending())).await;
            assert!(nothing, "round {round}: nothing sent yet");
            assert!(server.starved, "round {round}");
            let reader = async { poll_fn(|cx| server.poll_read(cx)).await };
            let sender = async {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                client
                    .send(Message::Ping(Bytes::from_static(b"p")))
                    .await
                    .unwrap();
                client.send(Message::binary(vec![round; 3])).await.unwrap();
            };
            let (read, ()) = tokio::join!(reader, sender);
            assert!(matches!(read, Some(Ok(Message::Ping(_)))), "{read:?}");
            let read = poll_fn(|cx| server.poll_read(cx)).await;
            assert_eq!(read.unwrap().unwrap(), Message::binary(vec![round; 3]));
            poll_fn(|cx| server.poll_flush(cx)).await.unwrap();
            assert!(matches!(client.next().await, Some(Ok(Message::Pong(_)))));
        }
        // Gone without a close handshake: an error, then nothing more.
        drop(client);
        let read = poll_fn(|cx| server.poll_read(cx)).await;
        assert!(matches!(read, Some(Err(_))), "{read:?}");
        assert!(poll_fn(|cx| server.poll_read(cx)).await.is_none(), "ended");
    }

    /// A batch too large for the socket's buffers goes out over several
    /// writes, whole and in order, with headers of every length form; a
    /// pong the codec owes meanwhile waits for the batch's end, and the
    /// ping handed over with the batch follows it.
    #[tokio::test]
    async fn a_batch_is_written_whole_around_a_pong_the_codec_owes() {
        use crate::{read_ahead::ReadAhead, stream::SessionStream};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        // Small kernel buffers, so the batch cannot fit in them.
        let client_socket = tokio::net::TcpSocket::new_v4().unwrap();
        client_socket.set_recv_buffer_size(64 * 1024).unwrap();
        let client_tcp = client_socket.connect(listener.local_addr().unwrap());
        let (client_tcp, (server_tcp, _)) =
            tokio::try_join!(client_tcp, listener.accept()).unwrap();
        socket2::SockRef::from(&server_tcp)
            .set_send_buffer_size(64 * 1024)
            .unwrap();
        let mut client = WebSocketStream::from_raw_socket(client_tcp, Role::Client, None).await;
        let stream = ReadAhead::new(SessionStream::Tcp(server_tcp));
        let mut server = Socket::new(stream, WebSocketConfig::default());

        let sizes = [0usize, 1, 125, 126, 65_535, 65_536, 3_000_000, 7];
        let sent: Vec<Bytes> = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| Bytes::from(vec![i as u8; n]))
            .collect();
        let mut batch = sent.iter().cloned().map(Outgoing::from).collect();
        poll_fn(|cx| {
            Poll::Ready(server.write_batch(cx, &mut batch, Some(Message::Ping("hb".into()))))
        })
        .await
        .unwrap();
        assert!(batch.is_empty(), "the socket took the frames");
        let flushed = poll_fn(|cx| Poll::Ready(server.poll_flush(cx))).await;
        assert!(
            flushed.is_pending(),
            "3 MB do not fit in the socket's buffers"
        );

        client
            .send(Message::Ping(Bytes::from_static(b"p")))
            .await
            .unwrap();
        let reading = async {
            let mut got = Vec::new();
            while got.len() < sent.len() + 2 {
                got.push(client.next().await.unwrap().unwrap());
            }
            got
        };
        let serving = async {
            let read = poll_fn(|cx| server.poll_read(cx)).await;
            assert!(matches!(read, Some(Ok(Message::Ping(_)))), "{read:?}");
            poll_fn(|cx| server.poll_flush(cx)).await.unwrap();
        };
        let (got, ()) = tokio::join!(reading, serving);
        for (i, frame) in sent.iter().enumerate() {
            assert_eq!(got[i], Message::Binary(frame.clone()), "frame {i}");
        }
        let mut rest: Vec<String> = got[sent.len()..]
            .iter()
            .map(|message| format!("{message:?}"))
            .collect();
        rest.sort();
        assert_eq!(rest.len(), 2);
        assert!(rest[0].starts_with("Ping"), "{rest:?}");
        assert!(rest[1].starts_with("Pong"), "{rest:?}");
    }

    /// A stream without vectored writes (an in-memory pipe) takes a batch
    /// through the codec: the frames, then the close, in order; nothing
    /// more is taken after the close.
    #[tokio::test]
    async fn a_batch_goes_through_the_codec_on_a_stream_without_vectored_writes() {
        let (mut client, mut server) = pair(64 * 1024);
        let mut batch = vec![
            Bytes::from_static(b"one").into(),
            Bytes::from_static(b"two").into(),
        ];
        let bye = CloseFrame {
            code: CloseCode::Away,
            reason: "bye".into(),
        };
        poll_fn(|cx| {
            Poll::Ready(server.write_batch(cx, &mut batch, Some(Message::Close(Some(bye.clone())))))
        })
        .await
        .unwrap();
        poll_fn(|cx| server.poll_flush(cx)).await.unwrap();
        assert_eq!(
            client.next().await.unwrap().unwrap(),
            Message::binary(&b"one"[..])
        );
        assert_eq!(
            client.next().await.unwrap().unwrap(),
            Message::binary(&b"two"[..])
        );
        assert_eq!(
            client.next().await.unwrap().unwrap(),
            Message::Close(Some(bye))
        );
        let mut late = vec![Bytes::from_static(b"late").into()];
        let refused = poll_fn(|cx| Poll::Ready(server.write_batch(cx, &mut late, None))).await;
        assert!(
            matches!(
                refused,
                Err(WsError::Protocol(ProtocolError::SendAfterClosing))
            ),
            "{refused:?}"
        );
    }

    /// An in-memory pipe that says it writes vectored, so batches take
    /// the socket's own path over it.
    struct Vectored(tokio::io::DuplexStream);

    impl AsyncRead for Vectored {
        fn poll_read(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for Vectored {
        fn poll_write(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
        }

        fn is_write_vectored(&self) -> bool {
            true
        }

        fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.get_mut().0).poll_flush(cx)
        }

        fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
        }
    }

    impl ReadReady for Vectored {
        fn poll_read_ready(&mut self, _: &mut Context<'_>) -> Poll<()> {
            Poll::Ready(())
        }
    }

    /// A pong the codec could write only in part (the pipe was full) is
    /// finished before the next batch starts: the client reads whole
    /// frames.
    #[tokio::test]
    async fn a_pong_written_in_part_ends_before_a_batch_starts() {
        let (client_io, server_io) = tokio::io::duplex(64);
        let mut client = WebSocketStream::from_raw_socket(client_io, Role::Client, None).await;
        let mut server = Socket::new(Vectored(server_io), WebSocketConfig::default());

        // 42 of the pipe's 64 bytes taken.
        let mut batch = vec![Bytes::from(vec![1u8; 40]).into()];
        poll_fn(|cx| Poll::Ready(server.write_batch(cx, &mut batch, None)))
            .await
            .unwrap();
        poll_fn(|cx| server.poll_flush(cx)).await.unwrap();
        // The answer to a 100-byte ping is 102 bytes: 22 fit.
        let ping = Bytes::from(vec![9u8; 100]);
        let sending = client.send(Message::Ping(ping.clone()));
        let reading = poll_fn(|cx| server.poll_read(cx));
        let (sent, read) = tokio::join!(sending, reading);
        sent.unwrap();
        assert!(matches!(read, Some(Ok(Message::Ping(_)))), "{read:?}");
        // The next read writes the pong, as far as it fits.
        let more = poll_fn(|cx| Poll::Ready(server.poll_read(cx).is_pending())).await;
        assert!(more, "nothing more to read");

        let mut batch = vec![Bytes::from_static(b"after").into()];
        poll_fn(|cx| Poll::Ready(server.write_batch(cx, &mut batch, None)))
            .await
            .unwrap();
        let reading = async {
            let mut got = Vec::new();
            for _ in 0..3 {
                got.push(client.next().await.unwrap().unwrap());
            }
            got
        };
        let both = async { tokio::join!(reading, poll_fn(|cx| server.poll_flush(cx))) };
        let (got, flushed) = tokio::time::timeout(std::time::Duration::from_secs(10), both)
            .await
            .expect("whole frames arrive");
        flushed.unwrap();
        assert_eq!(got[0], Message::Binary(Bytes::from(vec![1u8; 40])));
        assert_eq!(got[1], Message::Pong(ping));
        assert_eq!(got[2], Message::binary(&b"after"[..]));
    }

    /// The client's close, read while a batch with our close is half
    /// written: the batch ends whole, the codec answers the client's close,
    /// and ours is dropped without an error.
    #[tokio::test]
    async fn a_clients_close_during_a_batch_is_answered_after_it() {
        let (client_io, server_io) = tokio::io::duplex(64);
        let mut client = WebSocketStream::from_raw_socket(client_io, Role::Client, None).await;
        let mut server = Socket::new(Vectored(server_io), WebSocketConfig::default());

        let big = Bytes::from(vec![3u8; 200]);
        let ours = CloseFrame {
            code: CloseCode::Away,
            reason: "ours".into(),
        };
        let mut batch = vec![big.clone().into()];
        poll_fn(|cx| {
            Poll::Ready(server.write_batch(
                cx,
                &mut batch,
                Some(Message::Close(Some(ours.clone()))),
            ))
        })
        .await
        .unwrap();
        let flushed = poll_fn(|cx| Poll::Ready(server.poll_flush(cx))).await;
        assert!(flushed.is_pending(), "200 B do not fit in 64");

        let theirs = CloseFrame {
            code: CloseCode::Normal,
            reason: "theirs".into(),
        };
        client
            .send(Message::Close(Some(theirs.clone())))
            .await
            .unwrap();
        let read = poll_fn(|cx| server.poll_read(cx)).await;
        assert_eq!(read.unwrap().unwrap(), Message::Close(Some(theirs)));

        let reading = async {
            let first = client.next().await.unwrap().unwrap();
            let second = client.next().await.unwrap().unwrap();
            (first, second)
        };
        let both = async { tokio::join!(reading, poll_fn(|cx| server.poll_flush(cx))) };
        let ((first, second), flushed) =
            tokio::time::timeout(std::time::Duration::from_secs(10), both)
                .await
                .expect("the batch and the answer arrive");
        flushed.unwrap();
        assert_eq!(first, Message::Binary(big));
        match second {
            Message::Close(Some(answer)) => assert_eq!(answer.code, CloseCode::Normal),
            other => panic!("expected the answer to the client's close, got {other:?}"),
        }
    }

    /// A client that does not read makes the flush wait, not fail, and
    /// what was written still arrives in full once it reads.
    #[tokio::test]
    async fn a_flush_waits_for_a_client_that_does_not_read() {
        let (mut client, mut server) = pair(1024);
        let big = Bytes::from(vec![7u8; 8 * 1024]);
        poll_fn(|cx| Poll::Ready(server.write(cx, Message::Binary(big.clone()))))
            .await
            .unwrap();
        let flushed = poll_fn(|cx| Poll::Ready(server.poll_flush(cx))).await;
        assert!(flushed.is_pending(), "1 KiB of room for 8 KiB");
        let (read, flushed) = tokio::join!(client.next(), poll_fn(|cx| server.poll_flush(cx)));
        flushed.unwrap();
        assert_eq!(read.unwrap().unwrap(), Message::Binary(big));
    }

    /// A frame that claims a length near 2⁶⁴, with no size limit to stop
    /// it first, is left to the codec: no overflow, no panic.
    #[test]
    fn a_length_near_two_to_the_64_is_left_to_the_codec() {
        let mut frame = vec![0x82, 0x80 | 127];
        frame.extend_from_slice(&u64::MAX.to_be_bytes());
        frame.extend_from_slice(&[1, 2, 3, 4, 5, 6]);
        assert!(whole_message(&frame, usize::MAX).is_none());
    }

    /// Whatever a client sends, in whatever pieces it arrives, the socket
    /// reads the same messages, and ends the same way, as the codec alone
    /// reading the same bytes: the frames it takes straight from the
    /// stream are exactly those the codec would have made the same message
    /// of, and everything else (fragments, control frames, invalid or
    /// oversized frames, frames cut short) still goes through the codec.
    mod same_as_the_codec {
        use std::io::Cursor;

        use proptest::{collection::vec, prelude::*};
        use tokio::io::AsyncWriteExt;
        use tokio_tungstenite::tungstenite::protocol::WebSocket;

        use super::*;
        use crate::read_ahead::ReadAhead;

        /// Limits small enough for the frames below to cross them.
        const MAX: usize = 1024;

        fn config() -> WebSocketConfig {
            WebSocketConfig::default()
                .max_message_size(Some(MAX))
                .max_frame_size(Some(MAX))
        }

        /// One frame as a client could put it on the wire, valid or not.
        #[derive(Debug, Clone)]
        struct RawFrame {
            opcode: u8,
            fin: bool,
            rsv: bool,
            masked: bool,
            /// A 16-bit length where 7 bits would do.
            padded: bool,
            mask: [u8; 4],
            payload: Vec<u8>,
        }

        impl RawFrame {
            fn wire(&self, out: &mut Vec<u8>) {
                out.push(
                    self.opcode | if self.fin { 0x80 } else { 0 } | if self.rsv { 0x40 } else { 0 },
                );
                let masked = if self.masked { 0x80 } else { 0 };
                match self.payload.len() {
                    len if len < 126 && !self.padded => out.push(masked | len as u8),
                    len if len <= 0xFFFF => {
                        out.push(masked | 126);
                        out.extend_from_slice(&(len as u16).to_be_bytes());
                    }
                    len => {
                        out.push(masked | 127);
                        out.extend_from_slice(&(len as u64).to_be_bytes());
                    }
                }
                if self.masked {
                    out.extend_from_slice(&self.mask);
                }
                out.extend(
                    self.payload
                        .iter()
                        .enumerate()
                        .map(|(i, b)| b ^ if self.masked { self.mask[i % 4] } else { 0 }),
                );
            }
        }

        fn raw_frame() -> impl Strategy<Value = RawFrame> {
            let opcode = prop_oneof![
                8 => Just(2u8),
                4 => Just(1u8),
                2 => Just(0u8),
                1 => Just(8u8),
                2 => Just(9u8),
                1 => Just(10u8),
                1 => Just(3u8),
                1 => Just(11u8),
            ];
            let payload = prop_oneof![
                6 => vec(any::<u8>(), 0..140),
                3 => any::<String>().prop_map(String::into_bytes),
                1 => vec(any::<u8>(), MAX - 8..MAX + 8),
            ];
            (
                opcode,
                prop::bool::weighted(0.85),
                prop::bool::weighted(0.03),
                prop::bool::weighted(0.97),
                prop::bool::weighted(0.1),
                any::<[u8; 4]>(),
                payload,
            )
                .prop_map(|(opcode, fin, rsv, masked, padded, mask, payload)| {
                    RawFrame {
                        opcode,
                        fin,
                        rsv,
                        masked,
                        padded,
                        mask,
                        payload,
                    }
                })
        }

        /// What a reader made of the bytes: its messages, then how it ended.
        fn outcome(messages: Vec<Message>, end: Option<WsError>) -> Vec<String> {
            let mut seen: Vec<String> = messages.iter().map(|m| format!("{m:?}")).collect();
            seen.push(match end {
                None | Some(WsError::ConnectionClosed | WsError::AlreadyClosed) => "closed".into(),
                Some(err) => format!("error: {err}"),
            });
            seen
        }

        /// The codec alone, reading `bytes` and then the stream's end.
        fn codec_reads(bytes: &[u8]) -> Vec<String> {
            struct Wire(Cursor<Vec<u8>>);
            impl Read for Wire {
                fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                    self.0.read(buf)
                }
            }
            impl Write for Wire {
                fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
                    Ok(buf.len())
                }
                fn flush(&mut self) -> io::Result<()> {
                    Ok(())
                }
            }
            let wire = Wire(Cursor::new(bytes.to_vec()));
            let mut codec = WebSocket::from_raw_socket(wire, Role::Server, Some(config()));
            let mut messages = Vec::new();
            loop {
                match codec.read() {
                    Ok(message) => messages.push(message),
                    Err(err) => return outcome(messages, Some(err)),
                }
            }
        }

        /// The session's socket, reading `bytes` as they arrive in pieces
        /// `cuts` long (each read until it would wait), then the end.
        async fn socket_reads(bytes: &[u8], cuts: &[usize]) -> Vec<String> {
            let (mut client, server) = tokio::io::duplex(4 << 20);
            let mut socket = Socket::new(ReadAhead::new(server), config());
            let mut messages = Vec::new();
            let mut rest = bytes;
            let mut cuts = cuts.iter().copied().cycle();
            while !rest.is_empty() {
                let (piece, after) =
                    rest.split_at(cuts.next().unwrap_or(usize::MAX).min(rest.len()));
                rest = after;
                client.write_all(piece).await.unwrap();
                loop {
                    match poll_fn(|cx| Poll::Ready(socket.poll_read(cx))).await {
                        Poll::Pending => break,
                        Poll::Ready(Some(Ok(message))) => messages.push(message),
                        Poll::Ready(Some(Err(err))) => return outcome(messages, Some(err)),
                        Poll::Ready(None) => return outcome(messages, None),
                    }
                }
            }
            client.shutdown().await.unwrap();
            loop {
                match poll_fn(|cx| socket.poll_read(cx)).await {
                    Some(Ok(message)) => messages.push(message),
                    Some(Err(err)) => return outcome(messages, Some(err)),
                    None => return outcome(messages, None),
                }
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]
            #[test]
            fn whatever_arrives_is_read_as_the_codec_reads_it(
                frames in vec(raw_frame(), 0..16),
                cuts in vec(1usize..300, 0..8),
            ) {
                let mut bytes = Vec::new();
                for frame in &frames {
                    frame.wire(&mut bytes);
                }
                let expected = codec_reads(&bytes);
                let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
                let got = runtime.block_on(socket_reads(&bytes, &cuts));
                prop_assert_eq!(got, expected);
            }
        }
    }

    /// Batches are written whole and in order however little the stream
    /// takes per write: small batches joined into one buffer, larger ones
    /// as slices, either cut anywhere.
    mod batches {
        use proptest::{collection::vec, prelude::*};
        use tokio_tungstenite::tungstenite::protocol::Role;

        use super::*;
        use crate::frame::Frame;

        /// A pipe that takes at most `most` bytes per write, from as many
        /// slices as that covers.
        struct Narrow {
            pipe: tokio::io::DuplexStream,
            most: usize,
        }

        impl AsyncRead for Narrow {
            fn poll_read(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                buf: &mut ReadBuf<'_>,
            ) -> Poll<io::Result<()>> {
                Pin::new(&mut self.get_mut().pipe).poll_read(cx, buf)
            }
        }

        impl AsyncWrite for Narrow {
            fn poll_write(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                buf: &[u8],
            ) -> Poll<io::Result<usize>> {
                let this = self.get_mut();
                let most = this.most.min(buf.len());
                Pin::new(&mut this.pipe).poll_write(cx, &buf[..most])
            }

            fn poll_write_vectored(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                bufs: &[IoSlice<'_>],
            ) -> Poll<io::Result<usize>> {
                let mut joined = Vec::new();
                for buf in bufs {
                    joined.extend_from_slice(buf);
                }
                self.poll_write(cx, &joined)
            }

            fn is_write_vectored(&self) -> bool {
                true
            }

            fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                Pin::new(&mut self.get_mut().pipe).poll_flush(cx)
            }

            fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                Pin::new(&mut self.get_mut().pipe).poll_shutdown(cx)
            }
        }

        impl ReadReady for Narrow {
            fn poll_read_ready(&mut self, _: &mut Context<'_>) -> Poll<()> {
                Poll::Ready(())
            }
        }

        async fn written(batches: &[Vec<Outgoing>], most: usize, pipe: usize) -> Vec<Bytes> {
            let (client_io, server_io) = tokio::io::duplex(pipe);
            let mut client = WebSocketStream::from_raw_socket(client_io, Role::Client, None).await;
            let narrow = Narrow {
                pipe: server_io,
                most,
            };
            let mut server = Socket::new(narrow, WebSocketConfig::default());
            let count: usize = batches.iter().map(Vec::len).sum();
            let writing = async {
                for batch in batches {
                    let mut batch = batch.clone();
                    poll_fn(|cx| Poll::Ready(server.write_batch(cx, &mut batch, None)))
                        .await
                        .unwrap();
                    poll_fn(|cx| server.poll_flush(cx)).await.unwrap();
                }
            };
            let reading = async {
                let mut got = Vec::new();
                while got.len() < count {
                    match client.next().await {
                        Some(Ok(Message::Binary(data))) => got.push(data),
                        other => panic!("{other:?}"),
                    }
                }
                got
            };
            // A frame cut or garbled on the way leaves the client waiting.
            let both = async { tokio::join!(writing, reading).1 };
            tokio::time::timeout(std::time::Duration::from_secs(10), both)
                .await
                .expect("every frame arrives")
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(128))]
            #[test]
            fn batches_arrive_whole_and_in_order(
                sizes in vec(vec((0usize..1500, 0u8..3), 1..8), 1..6),
                most in 1usize..700,
                pipe in 1usize..2048,
            ) {
                let mut n = 0u8;
                // Frames encoded whole, and replies with a header of 4 or
                // 8 bytes kept apart from their payload.
                let batches: Vec<Vec<Outgoing>> = sizes
                    .iter()
                    .map(|batch| {
                        batch
                            .iter()
                            .map(|&(len, header)| {
                                n = n.wrapping_add(1);
                                let payload = Bytes::from(vec![n; len]);
                                let frame = Frame::new(u32::from(n), payload.clone());
                                match header {
                                    0 => Outgoing::from(payload),
                                    1 => Outgoing::from(frame),
                                    _ => Outgoing::from(frame.with_request_id(Some(7))),
                                }
                            })
                            .collect()
                    })
                    .collect();
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_time()
                    .build()
                    .unwrap();
                let got = runtime.block_on(written(&batches, most, pipe));
                let expected: Vec<Bytes> = batches
                    .into_iter()
                    .flatten()
                    .map(Outgoing::into_bytes)
                    .collect();
                prop_assert_eq!(got, expected);
            }
        }
    }
}
