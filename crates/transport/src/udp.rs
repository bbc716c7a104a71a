//! The endpoint's UDP socket as quinn drives it, registered with tokio for reading only.
//!
//! quinn's own tokio socket costs two syscalls per datagram that carry nothing:
//!
//! - It registers the socket for reading *and* writing. Linux reports a UDP socket writable
//!   again each time a sent datagram is freed (on loopback: as soon as it is delivered), so
//!   every send made the runtime's next `epoll_wait` return at once with nothing to do.
//! - It reads until `recvmmsg` fails with `EAGAIN`, as tokio's readiness tracking needs. A
//!   read that returned fewer datagrams than it asked for already drained the queue.
//!
//! Here sends go straight to the socket. quinn asks for writability before every send; that
//! is answered at once unless a send would have blocked since the socket was last seen
//! writable. Only then does a poller register for writability (a duplicate of the
//! descriptor, dropped once writable). A short read clears the read readiness itself;
//! tokio's tick keeps an arrival after the read from being lost (its event sets readiness
//! again and wakes the endpoint). At one client writing to a three-manager cluster that is
//! about a dozen syscalls less per write across the members.
//!
//! [`ReadinessProbe`] lets a runtime that is about to sleep ask, without a syscall on the
//! driver's side, whether a datagram already waits (see its docs).

use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll, ready};

use quinn::udp::{BATCH_SIZE, RecvMeta, Transmit, UdpSocketState};
use quinn::{AsyncUdpSocket, UdpPoller};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// A bound UDP socket for [`quinn::Endpoint::new_with_abstract_socket`].
#[derive(Debug)]
pub(crate) struct Socket {
    io: AsyncFd<std::net::UdpSocket>,
    state: UdpSocketState,
    /// A send would have blocked, and no poller has seen the socket writable since.
    blocked: AtomicBool,
}

impl Socket {
    /// Wraps `socket` (made non-blocking here); needs a tokio runtime.
    pub(crate) fn wrap(socket: std::net::UdpSocket) -> io::Result<Arc<Self>> {
        // UdpSocketState::new makes the socket non-blocking, as AsyncFd needs.
        let state = UdpSocketState::new((&socket).into())?;
        Ok(Arc::new(Socket {
            io: register(socket, Interest::READABLE)?,
            state,
            blocked: AtomicBool::new(false),
        }))
    }
}

/// Tells whether a datagram waits on an [`Endpoint`](crate::Endpoint)'s socket, without
/// blocking and without taking it: the socket is polled with a zero timeout.
///
/// For a runtime that polls briefly before it sleeps: a wake-up through the kernel costs
/// tens of microseconds on a virtual machine whose idle CPUs halt, and a thread that is
/// still running when the datagram arrives needs none. The probe holds the socket weakly,
/// so it never keeps a dropped endpoint's port bound.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> anyhow::Result<()> {
/// use starling_transport::{Endpoint, EndpointConfig, ring_provider};
/// let endpoint = Endpoint::bind(EndpointConfig::default(), ring_provider(), None)?;
/// let probe = endpoint.readiness_probe();
/// // Nothing was sent to the endpoint yet.
/// assert_eq!(probe.datagram_waiting(), Some(false));
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct ReadinessProbe(Weak<Socket>);

impl ReadinessProbe {
    pub(crate) fn new(socket: &Arc<Socket>) -> Self {
        ReadinessProbe(Arc::downgrade(socket))
    }

    /// `Some(true)` if a datagram (or a pending socket error) waits to be read,
    /// `Some(false)` if nothing does or the poll failed, `None` once the socket is closed.
    pub fn datagram_waiting(&self) -> Option<bool> {
        use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
        let socket = self.0.upgrade()?;
        let mut fds = [PollFd::new(socket.io.get_ref().as_fd(), PollFlags::POLLIN)];
        Some(matches!(poll(&mut fds, PollTimeout::ZERO), Ok(n) if n > 0))
    }

    /// Whether the endpoint's socket is still open, without a syscall.
    pub fn is_open(&self) -> bool {
        self.0.strong_count() > 0
    }
}

/// Registers `socket` with the runtime for `interest` only.
///
/// tokio deprecated the safe constructor because a generic `T` may hand out a descriptor it
/// does not own (tokio#8587); its replacement is `unsafe`, which this workspace forbids. A
/// `std::net::UdpSocket` owns its descriptor, which stays open until the `AsyncFd` drops it,
/// so the safe constructor is sound here.
#[allow(deprecated)]
fn register(
    socket: std::net::UdpSocket,
    interest: Interest,
) -> io::Result<AsyncFd<std::net::UdpSocket>> {
    AsyncFd::with_interest(socket, interest)
}

impl AsyncUdpSocket for Socket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        Box::pin(Writable {
            socket: self,
            wait: None,
        })
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        let sent = self.state.send(self.io.get_ref().into(), transmit);
        if sent
            .as_ref()
            .is_err_and(|e| e.kind() == io::ErrorKind::WouldBlock)
        {
            self.blocked.store(true, Ordering::Release);
        }
        sent
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        // What one `recvmmsg` asks for (quinn-udp's bound).
        let asked = bufs.len().min(meta.len()).min(BATCH_SIZE);
        loop {
            let mut guard = ready!(self.io.poll_read_ready(cx))?;
            match guard.try_io(|io| self.state.recv(io.get_ref().into(), bufs, meta)) {
                Ok(Ok(n)) => {
                    if n < asked {
                        // The queue is empty: no `recvmmsg` just to hear `EAGAIN`.
                        guard.clear_ready();
                    }
                    return Poll::Ready(Ok(n));
                }
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                // `EAGAIN`: readiness cleared; poll again to register the waker.
                Err(_would_block) => continue,
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.io.get_ref().local_addr()
    }

    fn may_fragment(&self) -> bool {
        self.state.may_fragment()
    }

    fn max_transmit_segments(&self) -> usize {
        self.state.max_gso_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.state.gro_segments()
    }
}

/// Waits for the socket to take sends again after one would have blocked: a duplicate of the
/// descriptor registered for writability while it waits, and dropped once it is writable.
#[derive(Debug)]
struct Writable {
    socket: Arc<Socket>,
    wait: Option<AsyncFd<std::net::UdpSocket>>,
}

impl UdpPoller for Writable {
    fn poll_writable(mut self: Pin<&mut Self>, cx: &mut Context) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.wait.is_none() && !this.socket.blocked.load(Ordering::Acquire) {
            return Poll::Ready(Ok(()));
        }
        let wait = match &mut this.wait {
            Some(wait) => wait,
            slot @ None => {
                let dup = this.socket.io.get_ref().try_clone()?;
                slot.insert(register(dup, Interest::WRITABLE)?)
            }
        };
        let ready = ready!(wait.poll_write_ready(cx)).map(drop);
        this.wait = None;
        this.socket.blocked.store(false, Ordering::Release);
        Poll::Ready(ready)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn pair() -> (Arc<Socket>, std::net::UdpSocket) {
        let receiver = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let sender = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        sender.connect(receiver.local_addr().unwrap()).unwrap();
        (Socket::wrap(receiver).unwrap(), sender)
    }

    /// Receives until `want` datagrams came, or fails after 10 s without one.
    async fn receive(socket: &Socket, want: usize) -> Vec<Vec<u8>> {
        let mut got = Vec::new();
        let mut storage = vec![[0u8; 64]; BATCH_SIZE];
        while got.len() < want {
            let mut meta = vec![RecvMeta::default(); BATCH_SIZE];
            let mut bufs: Vec<IoSliceMut<'_>> =
                storage.iter_mut().map(|b| IoSliceMut::new(b)).collect();
            let n = tokio::time::timeout(
                Duration::from_secs(10),
                std::future::poll_fn(|cx| socket.poll_recv(cx, &mut bufs, &mut meta)),
            )
            .await
            .expect("no datagram within 10 s: a wake-up was lost")
            .unwrap();
            for (m, b) in meta.iter().zip(&bufs).take(n) {
                got.push(b[..m.len].to_vec());
            }
        }
        got
    }

    #[tokio::test]
    async fn datagrams_after_a_short_read_still_wake_the_reader() {
        let (socket, sender) = pair();
        // More than one batch, then one datagram at a time: each read after the first short
        // one depends on an arrival setting readiness again.
        for i in 0..(2 * BATCH_SIZE + 3) as u32 {
            sender.send(&i.to_be_bytes()).unwrap();
        }
        let first = receive(&socket, 2 * BATCH_SIZE + 3).await;
        assert_eq!(first.len(), 2 * BATCH_SIZE + 3);
        for i in 0..20u32 {
            let sent = std::thread::spawn({
                let sender = sender.try_clone().unwrap();
                move || {
                    std::thread::sleep(Duration::from_millis(2));
                    sender.send(&i.to_be_bytes()).unwrap();
                }
            });
            assert_eq!(receive(&socket, 1).await, vec![i.to_be_bytes().to_vec()]);
            sent.join().unwrap();
        }
    }

    #[tokio::test]
    async fn the_probe_sees_a_waiting_datagram_and_lets_the_socket_go() {
        let (socket, sender) = pair();
        let probe = ReadinessProbe::new(&socket);
        assert_eq!(probe.datagram_waiting(), Some(false));
        assert!(probe.is_open());
        sender.send(b"x").unwrap();
        // Loopback delivers within the send; the probe does not take the datagram.
        assert_eq!(probe.datagram_waiting(), Some(true));
        assert_eq!(probe.datagram_waiting(), Some(true));
        assert_eq!(receive(&socket, 1).await, vec![b"x".to_vec()]);
        assert_eq!(probe.datagram_waiting(), Some(false));
        let addr = socket.io.get_ref().local_addr().unwrap();
        drop(socket);
        assert_eq!(probe.datagram_waiting(), None);
        assert!(!probe.is_open());
        // The probe holds no descriptor of its own: the port is free again.
        std::net::UdpSocket::bind(addr).expect("the port is still bound");
    }

    #[tokio::test]
    async fn a_send_goes_out_and_the_writable_poller_answers() {
        let (socket, peer) = pair();
        let to = peer.local_addr().unwrap();
        let payload = b"hello";
        socket
            .try_send(&Transmit {
                destination: to,
                ecn: None,
                contents: payload,
                segment_size: None,
                src_ip: None,
            })
            .unwrap();
        let mut buf = [0u8; 16];
        peer.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let n = peer.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], payload);
        // Nothing blocked: answered at once, without registering.
        let mut poller = socket.clone().create_io_poller();
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        assert!(poller.as_mut().poll_writable(&mut cx).is_ready());
        // After a send that would have blocked, the poller waits for the socket's writability
        // (an idle socket has it: reported by the registration, then cleared).
        for _ in 0..2 {
            socket.blocked.store(true, Ordering::Release);
            tokio::time::timeout(
                Duration::from_secs(10),
                std::future::poll_fn(|cx| poller.as_mut().poll_writable(cx)),
            )
            .await
            .expect("an idle socket never reported writable")
            .unwrap();
            assert!(!socket.blocked.load(Ordering::Acquire));
        }
    }
}
