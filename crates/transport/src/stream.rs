//! Raw byte streams on an admitted connection, for protocols that bring their own framing
//! (Starling's remote API runs HTTP/1.1 over them, one exchange per stream).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::connection::{Connection, MessageError};

/// One bidirectional QUIC stream as a tokio byte stream: reads come from the peer's half,
/// writes go to ours. Shutting down the writer, or dropping the stream, finishes our half
/// (the peer reads EOF after the bytes written).
///
/// Unlike [`Connection::request`], nothing bounds the bytes that cross: the protocol on
/// top sets its own limits and timeouts.
#[derive(Debug)]
pub struct ByteStream {
    send: quinn::SendStream,
    recv: quinn::RecvStream,
}

impl AsyncRead for ByteStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.recv).poll_read(cx, buf)
    }
}

impl AsyncWrite for ByteStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        AsyncWrite::poll_write(Pin::new(&mut self.send), cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        AsyncWrite::poll_flush(Pin::new(&mut self.send), cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        AsyncWrite::poll_shutdown(Pin::new(&mut self.send), cx)
    }
}

impl Connection {
    /// Opens a bidirectional byte stream to the peer.
    ///
    /// Do not mix with [`Connection::request`] / [`Connection::accept`] on the same
    /// connection: the peer's [`Connection::accept`] would take the stream as a malformed
    /// request. Give byte streams their own protocol (ALPN).
    pub async fn open_stream(&self) -> Result<ByteStream, MessageError> {
        let (send, recv) = self.quinn().open_bi().await?;
        Ok(ByteStream { send, recv })
    }

    /// Waits for the peer to open a bidirectional byte stream; fails with
    /// [`MessageError::ConnectionLost`] once the connection is closed. The same caveat as
    /// [`Connection::open_stream`] applies.
    pub async fn accept_stream(&self) -> Result<ByteStream, MessageError> {
        let (send, recv) = self.quinn().accept_bi().await?;
        Ok(ByteStream { send, recv })
    }
}
