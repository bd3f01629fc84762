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

use std::{
    io::{self, Read, Write},
    pin::Pin,
    task::{Context, Poll},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::tungstenite::{
    error::Error as WsError,
    protocol::{Role, WebSocketConfig, WebSocketContext},
    Message,
};

use crate::stream::ReadReady;

/// One server-side WebSocket: the stream and the protocol's state.
pub(crate) struct Socket<S> {
    stream: S,
    protocol: WebSocketContext,
    /// The connection is closed or failed: reads have nothing more.
    ended: bool,
    /// The last read found no whole frame and the stream would block:
    /// until the stream is readable, another read would find the same.
    starved: bool,
}

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
        }
    }

    /// Adds `message` to what is written at the next flush. It is taken
    /// even when the socket cannot take more right now; the error is for a
    /// connection that is closing or closed.
    pub(crate) fn write(&mut self, cx: &mut Context<'_>, message: Message) -> Result<(), WsError> {
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
        let (protocol, mut io) = self.lend(cx);
        match would_block(protocol.flush(&mut io)) {
            Poll::Ready(Err(WsError::ConnectionClosed)) => Poll::Ready(Ok(())),
            other => other,
        }
    }

    /// The stream beneath, for the last steps of a close.
    pub(crate) fn stream_mut(&mut self) -> &mut S {
        &mut self.stream
    }

    fn lend<'a, 'b>(
        &'a mut self,
        cx: &'a mut Context<'b>,
    ) -> (&'a mut WebSocketContext, Io<'a, 'b, S>) {
        let io = Io {
            stream: &mut self.stream,
            cx,
            write_blocked: false,
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
        if self.starved {
            if self.stream.poll_read_ready(cx).is_pending() {
                return Poll::Pending;
            }
            self.starved = false;
        }
        let (protocol, mut io) = self.lend(cx);
        let read = would_block(protocol.read(&mut io));
        let write_blocked = io.write_blocked;
        match read {
            // Unless an answer the codec owes (a pong, a close) could not
            // be written: the next read tries that again.
            Poll::Pending => {
                self.starved = !write_blocked;
                Poll::Pending
            }
            Poll::Ready(Ok(message)) => Poll::Ready(Some(Ok(message))),
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
    /// A write or flush would have blocked.
    write_blocked: bool,
}

impl<S: AsyncRead + Unpin> Read for Io<'_, '_, S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut buf = ReadBuf::new(buf);
        match Pin::new(&mut *self.stream).poll_read(self.cx, &mut buf) {
            Poll::Ready(Ok(())) => Ok(buf.filled().len()),
            Poll::Ready(Err(err)) => Err(err),
            Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
        }
    }
}

impl<S: AsyncWrite + Unpin> Write for Io<'_, '_, S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match Pin::new(&mut *self.stream).poll_write(self.cx, buf) {
            Poll::Ready(result) => result,
            Poll::Pending => {
                self.write_blocked = true;
                Err(io::ErrorKind::WouldBlock.into())
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
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
}
