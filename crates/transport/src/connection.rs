//! An admitted connection to one peer on one protocol, and the messages it carries:
//! requests with responses (a bi stream each), one-way messages (a uni stream each) and
//! datagrams.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;
use tracing::debug;

use crate::codec::{Decode, DecodeError, Encode, EncodeError, FRAME_HEADER, Frame};
use crate::error::{CloseCode, StreamCode};
use crate::identity::PeerIdentity;

/// Inbound messages queued for `accept`, and streams read at once, per connection.
const INBOUND_QUEUE: usize = 16;

/// Limits that apply to every message on a connection.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub(crate) max_frame: usize,
    pub(crate) request_timeout: Duration,
}

/// Why a message could not be sent or received.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MessageError {
    /// The connection was lost while the message was under way: it may or may not have
    /// reached the peer. Carries quinn's reason (a peer's close code shows here).
    #[error("connection lost: {0}")]
    ConnectionLost(#[from] quinn::ConnectionError),
    /// The connection was already closed when the message was to be sent: nothing was sent.
    #[error("connection closed before sending: {0}")]
    NotSent(quinn::ConnectionError),
    /// The peer refused the stream with a [`StreamCode`] (a too-large or malformed frame, an
    /// undecodable message, a timeout, or an application's own code). The request may or may
    /// not have been acted on only if the code says so; Starling's own codes mean it was not.
    #[error("peer refused the message: {0}")]
    Refused(StreamCode),
    /// A frame was larger than the limit. Nothing of it was read or sent.
    #[error("frame of {size} bytes is over the limit of {max} bytes")]
    FrameTooLarge {
        /// The frame's declared or actual size.
        size: usize,
        /// The configured limit.
        max: usize,
    },
    /// A stream ended before a whole frame arrived.
    #[error("stream ended inside a frame ({received} of {expected} bytes)")]
    Truncated {
        /// Bytes the frame header promised (header included).
        expected: usize,
        /// Bytes that arrived.
        received: usize,
    },
    /// More bytes followed the one frame a stream may carry.
    #[error("bytes after the end of the frame")]
    TrailingBytes,
    /// The peer finished the stream without answering.
    #[error("the peer closed the request without a response")]
    NoResponse,
    /// No answer within the request timeout; the stream was reset.
    #[error("no response within {0:?}")]
    Timeout(Duration),
    /// A datagram is larger than the connection can carry now.
    #[error("datagram of {size} bytes exceeds the connection's limit of {max} bytes")]
    DatagramTooLarge {
        /// Its size.
        size: usize,
        /// The connection's current limit (it grows with path MTU discovery).
        max: usize,
    },
    /// The peer does not accept datagrams, or they are disabled here.
    #[error("datagrams are not supported on this connection")]
    DatagramsUnsupported,
    /// The body could not be encoded; nothing was sent.
    #[error(transparent)]
    Encode(#[from] EncodeError),
    /// The body arrived but is not a valid message of the expected type.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// The stream was already closed locally.
    #[error("stream closed")]
    ClosedStream,
}

impl From<quinn::WriteError> for MessageError {
    fn from(e: quinn::WriteError) -> Self {
        match e {
            quinn::WriteError::Stopped(code) => {
                MessageError::Refused(StreamCode::from_varint(code))
            }
            quinn::WriteError::ConnectionLost(c) => MessageError::ConnectionLost(c),
            quinn::WriteError::ClosedStream | quinn::WriteError::ZeroRttRejected => {
                MessageError::ClosedStream
            }
        }
    }
}

impl From<quinn::ReadError> for MessageError {
    fn from(e: quinn::ReadError) -> Self {
        match e {
            quinn::ReadError::Reset(code) => MessageError::Refused(StreamCode::from_varint(code)),
            quinn::ReadError::ConnectionLost(c) => MessageError::ConnectionLost(c),
            _ => MessageError::ClosedStream,
        }
    }
}

impl From<quinn::ClosedStream> for MessageError {
    fn from(_: quinn::ClosedStream) -> Self {
        MessageError::ClosedStream
    }
}

impl MessageError {
    /// Whether the connection itself is gone (as opposed to one message failing).
    pub fn is_connection_lost(&self) -> bool {
        matches!(
            self,
            MessageError::ConnectionLost(_) | MessageError::NotSent(_)
        )
    }

    /// The code a peer's connection close carried, if that is why this failed.
    pub fn close_code(&self) -> Option<CloseCode> {
        match self {
            MessageError::ConnectionLost(quinn::ConnectionError::ApplicationClosed(c))
            | MessageError::NotSent(quinn::ConnectionError::ApplicationClosed(c)) => {
                Some(CloseCode::from_varint(c.error_code))
            }
            _ => None,
        }
    }

    fn stream_code(&self) -> StreamCode {
        match self {
            MessageError::FrameTooLarge { .. } => StreamCode::FRAME_TOO_LARGE,
            MessageError::Timeout(_) => StreamCode::TIMEOUT,
            _ => StreamCode::MALFORMED_FRAME,
        }
    }
}

/// Reads exactly one frame, and the end of the stream after it.
pub(crate) async fn read_frame(
    recv: &mut quinn::RecvStream,
    max: usize,
) -> Result<Frame, MessageError> {
    let mut header = [0u8; FRAME_HEADER];
    read_exact(recv, &mut header, 0, FRAME_HEADER).await?;
    let len = u32::from_be_bytes(header) as usize;
    if len > max {
        return Err(MessageError::FrameTooLarge { size: len, max });
    }
    // Grow the buffer only as bytes arrive: a header alone must not make us allocate.
    let mut frame = Frame::with_capacity(len.min(64 * 1024));
    while frame.len() < len {
        match recv.read_chunk(len - frame.len(), true).await? {
            Some(chunk) => frame.extend_from_slice(&chunk.bytes),
            None => {
                return Err(MessageError::Truncated {
                    expected: FRAME_HEADER + len,
                    received: FRAME_HEADER + frame.len(),
                });
            }
        }
    }
    let mut probe = [0u8; 1];
    match recv.read(&mut probe).await? {
        None => Ok(frame),
        Some(_) => Err(MessageError::TrailingBytes),
    }
}

async fn read_exact(
    recv: &mut quinn::RecvStream,
    buf: &mut [u8],
    offset: usize,
    expected: usize,
) -> Result<(), MessageError> {
    match recv.read_exact(buf).await {
        Ok(()) => Ok(()),
        Err(quinn::ReadExactError::FinishedEarly(n)) => {
            if offset == 0 && n == 0 {
                Err(MessageError::NoResponse)
            } else {
                Err(MessageError::Truncated {
                    expected,
                    received: offset + n,
                })
            }
        }
        Err(quinn::ReadExactError::ReadError(e)) => Err(e.into()),
    }
}

/// Writes one frame, finishes the stream, and waits until the peer acknowledged all of it
/// (so closing the connection right after cannot lose it).
async fn write_frame_acked(
    send: &mut quinn::SendStream,
    body: &[u8],
    max: usize,
) -> Result<(), MessageError> {
    write_frame(send, body, max).await?;
    match send.stopped().await {
        Ok(None) => Ok(()),
        Ok(Some(code)) => Err(MessageError::Refused(StreamCode::from_varint(code))),
        Err(quinn::StoppedError::ConnectionLost(e)) => Err(MessageError::ConnectionLost(e)),
        Err(quinn::StoppedError::ZeroRttRejected) => Err(MessageError::ClosedStream),
    }
}

fn check_size(size: usize, max: usize) -> Result<(), MessageError> {
    if size > max || u32::try_from(size).is_err() {
        return Err(MessageError::FrameTooLarge { size, max });
    }
    Ok(())
}

/// Writes one frame and finishes the stream.
pub(crate) async fn write_frame(
    send: &mut quinn::SendStream,
    body: &[u8],
    max: usize,
) -> Result<(), MessageError> {
    check_size(body.len(), max)?;
    // One buffer, handed over whole: the stream keeps it rather than a copy of each part.
    let mut frame = bytes::BytesMut::with_capacity(4 + body.len());
    frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
    frame.extend_from_slice(body);
    send.write_chunk(frame.freeze()).await?;
    send.finish()?;
    Ok(())
}

/// What arrives on a connection.
#[derive(Debug)]
#[non_exhaustive]
pub enum Inbound {
    /// A request that wants one response.
    Request(Request),
    /// A one-way message.
    Message(Frame),
}

/// A received request: its body and the means to answer it once.
///
/// Dropping a request without answering resets its stream with [`StreamCode::DROPPED`], so
/// the requester gets a prompt error rather than a timeout.
#[derive(Debug)]
pub struct Request {
    body: Frame,
    send: Option<quinn::SendStream>,
    max_frame: usize,
    timeout: Duration,
    // Keeps the connection open until the response is acknowledged, even if the handler
    // dropped every other handle.
    _conn: quinn::Connection,
}

impl Request {
    /// The request body.
    pub fn body(&self) -> &Frame {
        &self.body
    }

    /// Validates and deserializes the body.
    pub fn decode<T: Decode>(&self) -> Result<T, DecodeError> {
        self.body.decode()
    }

    /// Sends `body` as the response; returns once the requester's QUIC stack acknowledged it.
    pub async fn respond(mut self, body: &[u8]) -> Result<(), MessageError> {
        let mut send = self.send.take().ok_or(MessageError::ClosedStream)?;
        let timeout = self.timeout;
        match tokio::time::timeout(timeout, write_frame_acked(&mut send, body, self.max_frame))
            .await
        {
            Ok(result) => result,
            Err(_) => {
                let _ = send.reset(StreamCode::TIMEOUT.to_varint());
                Err(MessageError::Timeout(timeout))
            }
        }
    }

    /// Encodes `msg` and sends it as the response.
    pub async fn respond_with<T: Encode>(self, msg: &T) -> Result<(), MessageError> {
        let bytes = msg.encode()?;
        self.respond(&bytes).await
    }

    /// Refuses the request with `code`; the requester gets [`MessageError::Refused`].
    pub fn refuse(mut self, code: StreamCode) {
        if let Some(mut send) = self.send.take() {
            let _ = send.reset(code.to_varint());
        }
    }
}

impl Drop for Request {
    fn drop(&mut self) {
        if let Some(mut send) = self.send.take() {
            let _ = send.reset(StreamCode::DROPPED.to_varint());
        }
    }
}

struct Shared {
    conn: quinn::Connection,
    peer: Option<PeerIdentity>,
    alpn: Vec<u8>,
    limits: Limits,
    inbound: Mutex<Option<Arc<tokio::sync::Mutex<mpsc::Receiver<Inbound>>>>>,
}

/// An admitted connection on one protocol: the peer passed the protocol's policy.
///
/// Cheap to clone; all clones share the QUIC connection.
#[derive(Clone)]
pub struct Connection(Arc<Shared>);

/// A connection the endpoint keeps track of without keeping it open: once every
/// [`Connection`] clone is gone, the connection closes as usual and this no longer upgrades.
#[derive(Clone)]
pub(crate) struct WeakConnection(std::sync::Weak<Shared>);

impl WeakConnection {
    pub(crate) fn upgrade(&self) -> Option<Connection> {
        self.0.upgrade().map(Connection)
    }
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("peer", &self.0.peer)
            .field("remote", &self.0.conn.remote_address())
            .field("alpn", &String::from_utf8_lossy(&self.0.alpn))
            .finish()
    }
}

impl Connection {
    pub(crate) fn new(
        conn: quinn::Connection,
        peer: Option<PeerIdentity>,
        alpn: Vec<u8>,
        limits: Limits,
    ) -> Self {
        Connection(Arc::new(Shared {
            conn,
            peer,
            alpn,
            limits,
            inbound: Mutex::new(None),
        }))
    }

    pub(crate) fn downgrade(&self) -> WeakConnection {
        WeakConnection(Arc::downgrade(&self.0))
    }

    /// The peer's identity, or `None` for a certificate-less peer on an anonymous protocol
    /// (a joiner).
    pub fn peer(&self) -> Option<&PeerIdentity> {
        self.0.peer.as_ref()
    }

    /// The protocol (ALPN) of this connection.
    pub fn alpn(&self) -> &[u8] {
        &self.0.alpn
    }

    /// The peer's address.
    pub fn remote_address(&self) -> std::net::SocketAddr {
        self.0.conn.remote_address()
    }

    /// The current round-trip time estimate.
    pub fn rtt(&self) -> Duration {
        self.0.conn.rtt()
    }

    /// Why the connection closed, or `None` while it is open.
    pub fn close_reason(&self) -> Option<quinn::ConnectionError> {
        self.0.conn.close_reason()
    }

    /// Closes the connection with `code` and a short reason.
    pub fn close(&self, code: CloseCode, reason: &str) {
        self.0.conn.close(code.to_varint(), reason.as_bytes());
    }

    /// Waits until the connection is closed and returns why.
    pub async fn closed(&self) -> quinn::ConnectionError {
        self.0.conn.closed().await
    }

    /// The underlying quinn connection, for what this crate does not wrap (extra streams).
    pub fn quinn(&self) -> &quinn::Connection {
        &self.0.conn
    }

    /// Sends a request and waits for its response, both as raw frames, within the request
    /// timeout.
    pub async fn request(&self, body: &[u8]) -> Result<Frame, MessageError> {
        let limits = self.0.limits;
        check_size(body.len(), limits.max_frame)?;
        if let Some(reason) = self.0.conn.close_reason() {
            return Err(MessageError::NotSent(reason));
        }
        let mut streams = None;
        let exchange = async {
            let (send, recv) = self.0.conn.open_bi().await.map_err(MessageError::NotSent)?;
            let (send, recv) = streams.insert((send, recv));
            write_frame(send, body, limits.max_frame).await?;
            read_frame(recv, limits.max_frame).await
        };
        let result = tokio::time::timeout(limits.request_timeout, exchange).await;
        let (code, result) = match result {
            Ok(Ok(frame)) => return Ok(frame),
            Ok(Err(e)) if e.is_connection_lost() => return Err(e),
            Ok(Err(e)) => (e.stream_code(), Err(e)),
            Err(_) => (
                StreamCode::TIMEOUT,
                Err(MessageError::Timeout(limits.request_timeout)),
            ),
        };
        if let Some((mut send, mut recv)) = streams {
            let _ = send.reset(code.to_varint());
            let _ = recv.stop(code.to_varint());
        }
        result
    }

    /// Encodes `req`, sends it as a request and decodes the response as `Resp`.
    pub async fn call<Req: Encode, Resp: Decode>(&self, req: &Req) -> Result<Resp, MessageError> {
        let body = req.encode()?;
        let frame = self.request(&body).await?;
        Ok(frame.decode()?)
    }

    /// Sends a one-way message on its own stream; returns once it is handed to QUIC.
    pub async fn send(&self, body: &[u8]) -> Result<(), MessageError> {
        let limits = self.0.limits;
        check_size(body.len(), limits.max_frame)?;
        if let Some(reason) = self.0.conn.close_reason() {
            return Err(MessageError::NotSent(reason));
        }
        let deliver = async {
            let mut send = self
                .0
                .conn
                .open_uni()
                .await
                .map_err(MessageError::NotSent)?;
            let result = write_frame_acked(&mut send, body, limits.max_frame).await;
            Ok::<_, MessageError>((send, result))
        };
        match tokio::time::timeout(limits.request_timeout, deliver).await {
            Ok(Ok((_, result))) => result,
            Ok(Err(e)) => Err(e),
            // Dropping the stream here resets nothing by itself; the peer sees a truncated
            // frame or nothing, and refuses it.
            Err(_) => Err(MessageError::Timeout(limits.request_timeout)),
        }
    }

    /// Encodes `msg` and sends it one-way.
    pub async fn send_message<T: Encode>(&self, msg: &T) -> Result<(), MessageError> {
        let body = msg.encode()?;
        self.send(&body).await
    }

    /// The largest datagram the connection can carry now, or `None` without datagram support.
    pub fn max_datagram_size(&self) -> Option<usize> {
        self.0.conn.max_datagram_size()
    }

    /// Sends an unreliable datagram, checked against the connection's current limit.
    pub fn send_datagram(&self, body: &[u8]) -> Result<(), MessageError> {
        let max = self
            .max_datagram_size()
            .ok_or(MessageError::DatagramsUnsupported)?;
        if body.len() > max {
            return Err(MessageError::DatagramTooLarge {
                size: body.len(),
                max,
            });
        }
        self.0
            .conn
            .send_datagram(Bytes::copy_from_slice(body))
            .map_err(|e| match e {
                quinn::SendDatagramError::ConnectionLost(c) => MessageError::ConnectionLost(c),
                quinn::SendDatagramError::TooLarge => MessageError::DatagramTooLarge {
                    size: body.len(),
                    max,
                },
                _ => MessageError::DatagramsUnsupported,
            })
    }

    /// Waits for the next datagram, returned in an aligned buffer ready to decode.
    pub async fn read_datagram(&self) -> Result<Frame, MessageError> {
        let bytes = self.0.conn.read_datagram().await?;
        Ok(Frame::copy_from(&bytes))
    }

    /// Waits for the next request or one-way message from the peer.
    ///
    /// Each stream is read in its own task, under the frame limit and the request timeout,
    /// so a slow or hostile stream cannot hold up the others. A stream that breaks the rules
    /// is refused with a [`StreamCode`] and logged; it never reaches the caller. Returns
    /// [`MessageError::ConnectionLost`] once the connection is closed.
    pub async fn accept(&self) -> Result<Inbound, MessageError> {
        let rx = {
            let mut slot = self.0.inbound.lock().unwrap_or_else(|p| p.into_inner());
            slot.get_or_insert_with(|| Arc::new(tokio::sync::Mutex::new(self.spawn_pump())))
                .clone()
        };
        let mut rx = rx.lock().await;
        match rx.recv().await {
            Some(msg) => Ok(msg),
            None => Err(MessageError::ConnectionLost(
                self.0
                    .conn
                    .close_reason()
                    .unwrap_or(quinn::ConnectionError::LocallyClosed),
            )),
        }
    }

    fn spawn_pump(&self) -> mpsc::Receiver<Inbound> {
        let (tx, rx) = mpsc::channel(INBOUND_QUEUE);
        // At most this many streams are being read at once; with the queue, that bounds the
        // frames a peer can make this side buffer to 2 × INBOUND_QUEUE × max_frame.
        let reading = Arc::new(tokio::sync::Semaphore::new(INBOUND_QUEUE));
        let conn = self.0.conn.clone();
        let limits = self.0.limits;
        let peer = self.0.peer.as_ref().map(|p| p.node_id.to_string());
        tokio::spawn(async move {
            loop {
                let permit = tokio::select! {
                    p = reading.clone().acquire_owned() => match p {
                        Ok(p) => p,
                        Err(_) => break,
                    },
                    _ = tx.closed() => break,
                };
                tokio::select! {
                    bi = conn.accept_bi() => {
                        let Ok((send, recv)) = bi else { break };
                        let tx = tx.clone();
                        let peer = peer.clone();
                        let conn = conn.clone();
                        tokio::spawn(async move {
                            read_inbound(recv, Some(send), conn, limits, tx, peer).await;
                            drop(permit);
                        });
                    }
                    uni = conn.accept_uni() => {
                        let Ok(recv) = uni else { break };
                        let tx = tx.clone();
                        let peer = peer.clone();
                        let conn = conn.clone();
                        tokio::spawn(async move {
                            read_inbound(recv, None, conn, limits, tx, peer).await;
                            drop(permit);
                        });
                    }
                    _ = tx.closed() => break,
                }
            }
        });
        rx
    }
}

async fn read_inbound(
    mut recv: quinn::RecvStream,
    mut send: Option<quinn::SendStream>,
    conn: quinn::Connection,
    limits: Limits,
    tx: mpsc::Sender<Inbound>,
    peer: Option<String>,
) {
    let read = tokio::time::timeout(
        limits.request_timeout,
        read_frame(&mut recv, limits.max_frame),
    );
    let result = match read.await {
        Ok(r) => r,
        Err(_) => Err(MessageError::Timeout(limits.request_timeout)),
    };
    match result {
        Ok(body) => {
            let msg = match send.take() {
                Some(send) => Inbound::Request(Request {
                    body,
                    send: Some(send),
                    max_frame: limits.max_frame,
                    timeout: limits.request_timeout,
                    _conn: conn,
                }),
                None => Inbound::Message(body),
            };
            let _ = tx.send(msg).await;
        }
        Err(e) => {
            if e.is_connection_lost() {
                return;
            }
            let code = e.stream_code();
            debug!(peer = ?peer, error = %e, code = %code, "refused an inbound stream");
            let _ = recv.stop(code.to_varint());
            if let Some(mut s) = send.take() {
                let _ = s.reset(code.to_varint());
            }
        }
    }
}
