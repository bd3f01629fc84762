//! Large socket reads without a per-connection read buffer.
//!
//! A WebSocket codec keeps a read buffer per connection; sized for
//! throughput (tokio-tungstenite's default is 128 KiB) it dominates the
//! memory of an idle connection, sized for idle connections it costs a read
//! system call per few frames. [`ReadAhead`] sits under the codec: it reads
//! up to [`CHUNK`] bytes at a time into a stack buffer, hands the codec what
//! it asked for, and keeps the rest only until the codec takes it. When the
//! socket has nothing to read, it holds no memory at all, so the codec's own
//! buffer can stay small.

use std::{
    io,
    mem::MaybeUninit,
    pin::Pin,
    task::{Context, Poll},
};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Bytes read from the socket at most per system call.
pub const CHUNK: usize = 32 * 1024;

/// A stream whose reads go through a stack buffer of [`CHUNK`] bytes; what
/// the reader did not take waits in a heap buffer that is freed as soon as
/// the socket runs dry.
#[derive(Debug)]
pub struct ReadAhead<S> {
    inner: S,
    /// Read from the socket, not yet taken by the reader.
    pending: BytesMut,
}

impl<S> ReadAhead<S> {
    pub fn new(inner: S) -> ReadAhead<S> {
        ReadAhead {
            inner,
            pending: BytesMut::new(),
        }
    }

    /// Reads `already` (read from the stream before) first.
    pub fn with_pending(inner: S, already: &[u8]) -> ReadAhead<S> {
        ReadAhead {
            inner,
            pending: BytesMut::from(already),
        }
    }

    /// The stream beneath, and whether everything read ahead was taken.
    pub fn inner_if_drained(&mut self) -> Option<&mut S> {
        self.pending.is_empty().then_some(&mut self.inner)
    }

    /// Offers `take` the bytes read ahead, or else those of one read from
    /// the stream: it returns how many it took from the front, and what it
    /// made of them, or `None` to take nothing. What it leaves is read
    /// next, by either. `Ok(None)` when nothing was taken (at the stream's
    /// end too: the next read reports it).
    ///
    /// A reader that understands whole frames takes them straight from the
    /// socket's bytes, without a copy into a buffer of its own.
    pub fn poll_take<T>(
        &mut self,
        cx: &mut Context<'_>,
        take: impl FnOnce(&[u8]) -> Option<(usize, T)>,
    ) -> Poll<io::Result<Option<T>>>
    where
        S: AsyncRead + Unpin,
    {
        if !self.pending.is_empty() {
            let taken = take(&self.pending).map(|(n, taken)| {
                self.pending.advance(n);
                taken
            });
            return Poll::Ready(Ok(taken));
        }
        let mut chunk = [MaybeUninit::<u8>::uninit(); CHUNK];
        let mut read = ReadBuf::uninit(&mut chunk);
        match Pin::new(&mut self.inner).poll_read(cx, &mut read) {
            Poll::Pending => {
                // Idle: give the memory of the last burst back.
                self.pending = BytesMut::new();
                return Poll::Pending;
            }
            Poll::Ready(result) => result?,
        }
        let filled = read.filled();
        let (n, taken) = match take(filled) {
            Some((n, taken)) => (n, Some(taken)),
            None => (0, None),
        };
        crate::copy::put_slice(&mut self.pending, &filled[n..]);
        Poll::Ready(Ok(taken))
    }

    /// Bytes read ahead and not yet taken; for tests.
    #[cfg(test)]
    pub fn pending(&self) -> usize {
        self.pending.len()
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for ReadAhead<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.pending.is_empty() && out.remaining() >= CHUNK {
            return Pin::new(&mut this.inner).poll_read(cx, out);
        }
        // The reader takes what fits; at the stream's end, nothing.
        let take = |bytes: &[u8]| {
            let n = bytes.len().min(out.remaining());
            out.put_slice(&bytes[..n]);
            Some((n, ()))
        };
        this.poll_take(cx, take).map_ok(drop)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for ReadAhead<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn small_reads_are_served_from_one_large_read_and_idle_holds_nothing() {
        let (mut client, server) = tokio::io::duplex(4 * CHUNK);
        let mut reader = ReadAhead::new(server);
        let sent: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
        client.write_all(&sent).await.unwrap();

        let mut got = Vec::new();
        let mut small = [0u8; 100];
        while got.len() < sent.len() {
            let n = reader.read(&mut small).await.unwrap();
            got.extend_from_slice(&small[..n]);
            if got.len() == 100 {
                assert_eq!(reader.pending(), sent.len() - 100, "one read took it all");
            }
        }
        assert_eq!(got, sent);

        // Nothing to read: the read-ahead memory is released.
        let waiting = tokio::time::timeout(
            std::time::Duration::from_millis(20),
            reader.read(&mut small),
        )
        .await;
        assert!(waiting.is_err());
        assert_eq!(reader.pending.capacity(), 0);

        client.write_all(b"more").await.unwrap();
        drop(client);
        let mut rest = Vec::new();
        reader.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"more");
    }
}
