//! The byte stream under a session's WebSocket.
//!
//! hyper hands an upgraded connection over as its `Upgraded`: the
//! connection boxed behind a buffer of what was read past the request, two
//! dynamic layers on every read and write. A plain TCP connection is taken
//! back out of it, which also lets a session ask whether the socket has
//! anything to read without reading it (see [`ReadReady`]). A TLS
//! connection keeps hyper's stream.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
};

use hyper_util::rt::TokioIo;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};

use crate::read_ahead::ReadAhead;

/// A stream that can tell whether a read could make progress without
/// reading.
///
/// A session that found nothing to read asks this before reading again:
/// a read goes through the WebSocket codec and its buffers, and a session
/// looks for the next frame two or three times per frame it handles,
/// while the readiness of a socket is one check. (With hyper's layers
/// gone too: 8,991 → 8,155 user-space instructions per round trip of a
/// depth-1 echo, `valgrind --tool=callgrind`.)
pub(crate) trait ReadReady {
    /// `Ready` when a read may bring data, the end of the stream or an
    /// error; `Pending`, with the task registered to be woken, while it
    /// would block. A stream that cannot tell is always ready.
    fn poll_read_ready(&mut self, cx: &mut Context<'_>) -> Poll<()>;

    /// Offers `take` the next bytes to read, so that it can take whole
    /// frames from them without a copy into a codec's buffer (see
    /// [`ReadAhead::poll_take`]). A stream that cannot offers nothing:
    /// `Ok(None)`.
    fn poll_take<T>(
        &mut self,
        cx: &mut Context<'_>,
        take: impl FnOnce(&[u8]) -> Option<(usize, T)>,
    ) -> Poll<io::Result<Option<T>>> {
        let _ = (cx, take);
        Poll::Ready(Ok(None))
    }
}

/// The stream of an upgraded connection.
#[derive(Debug)]
pub(crate) enum SessionStream {
    /// A plain TCP connection, taken back from hyper.
    Tcp(TcpStream),
    /// Anything else (a TLS connection), as hyper hands it over.
    Upgraded(TokioIo<hyper::upgrade::Upgraded>),
}

/// The stream of an upgraded connection, with what hyper read past the
/// upgrade request (a client may send its first frames without waiting for
/// the 101) read first.
pub(crate) fn upgraded(upgraded: hyper::upgrade::Upgraded) -> ReadAhead<SessionStream> {
    match upgraded.downcast::<TokioIo<TcpStream>>() {
        Ok(parts) => {
            ReadAhead::with_pending(SessionStream::Tcp(parts.io.into_inner()), &parts.read_buf)
        }
        Err(upgraded) => ReadAhead::new(SessionStream::Upgraded(TokioIo::new(upgraded))),
    }
}

impl ReadReady for SessionStream {
    fn poll_read_ready(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        match self {
            // An error is for the read to report.
            SessionStream::Tcp(tcp) => tcp.poll_read_ready(cx).map(drop),
            SessionStream::Upgraded(_) => Poll::Ready(()),
        }
    }
}

impl AsyncRead for SessionStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            SessionStream::Tcp(tcp) => Pin::new(tcp).poll_read(cx, buf),
            SessionStream::Upgraded(io) => Pin::new(io).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for SessionStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            SessionStream::Tcp(tcp) => Pin::new(tcp).poll_write(cx, buf),
            SessionStream::Upgraded(io) => Pin::new(io).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            SessionStream::Tcp(tcp) => Pin::new(tcp).poll_write_vectored(cx, bufs),
            SessionStream::Upgraded(io) => Pin::new(io).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            SessionStream::Tcp(tcp) => tcp.is_write_vectored(),
            SessionStream::Upgraded(io) => io.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            SessionStream::Tcp(tcp) => Pin::new(tcp).poll_flush(cx),
            SessionStream::Upgraded(io) => Pin::new(io).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            SessionStream::Tcp(tcp) => Pin::new(tcp).poll_shutdown(cx),
            SessionStream::Upgraded(io) => Pin::new(io).poll_shutdown(cx),
        }
    }
}

/// Ready at once while bytes read ahead wait.
impl<S: ReadReady + AsyncRead + Unpin> ReadReady for ReadAhead<S> {
    fn poll_read_ready(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        match self.inner_if_drained() {
            Some(inner) => inner.poll_read_ready(cx),
            None => Poll::Ready(()),
        }
    }

    fn poll_take<T>(
        &mut self,
        cx: &mut Context<'_>,
        take: impl FnOnce(&[u8]) -> Option<(usize, T)>,
    ) -> Poll<io::Result<Option<T>>> {
        ReadAhead::poll_take(self, cx, take)
    }
}

/// In-memory pipes (tests) cannot tell: always ready.
#[cfg(test)]
impl ReadReady for tokio::io::DuplexStream {
    fn poll_read_ready(&mut self, _: &mut Context<'_>) -> Poll<()> {
        Poll::Ready(())
    }
}
