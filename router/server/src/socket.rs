//! A client connection's socket, under tungstenite.
//!
//! It owns the bytes waiting to be written and what is known of the read side. A session's
//! frames are framed here: a text frame's header, then its payload, the very bytes the
//! owner serialized once for every subscriber (tungstenite would copy each frame into its
//! own buffer first). At the next flush, what is queued is joined into one per-thread buffer
//! and goes out in as few `send`s as it fills. What tungstenite writes itself (pings, pongs,
//! the close) joins the same queue when tungstenite writes them out. It also remembers whether the socket may have
//! bytes to read, so that a session woken only for pushes does not poll its read side for
//! nothing. It never blocks, never drops a queued byte, and never decides how much may
//! wait: bounding the queue is the session's job ([`Socket::queued`]).
//!
//! A plain TCP connection is held as a [`SharedTcp`], so that its session can lend the
//! stream's write side to the partition owners ([`Socket::sink`], the outbox's direct
//! path). While it is lent ([`Socket::set_lent`]) the socket writes nothing itself: what
//! tungstenite writes meanwhile waits in the queue, behind the bytes the session takes back.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use bytes::{Buf, Bytes, BytesMut};
use futures_util::task::AtomicWaker;
use switchyard_core::outbox::DirectSink;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// Queued frames are joined into writes of up to this many bytes...
const JOINED_WRITE: usize = 64 * 1024;
/// ...except a body at least this long at the front of the queue, written without a copy.
const DIRECT_WRITE: usize = 16 * 1024;

thread_local! {
    /// Where frames are joined for a write: one buffer per runtime thread, not per connection.
    static JOINED: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// One frame's worth of bytes: a header of up to 10 bytes kept inline, then its body.
struct Chunk {
    head: [u8; 10],
    head_len: u8,
    body: Body,
}

/// A chunk's body: a payload shared with every subscriber, or tungstenite's own bytes, to
/// which its next writes are appended (a flood of pongs grows one buffer, not the queue).
enum Body {
    Shared(Bytes),
    Own(BytesMut),
}

impl std::ops::Deref for Body {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            Body::Shared(b) => b,
            Body::Own(b) => b,
        }
    }
}

impl Chunk {
    fn len(&self) -> usize {
        self.head_len as usize + self.body.len()
    }

    /// The unwritten parts of the chunk when its first `done` bytes are written.
    fn parts(&self, done: usize) -> (&[u8], &[u8]) {
        let head = &self.head[..self.head_len as usize];
        if done < head.len() {
            (&head[done..], &self.body)
        } else {
            (&[], &self.body[done - head.len()..])
        }
    }
}

/// Set when the socket reports that it may be read, forwarding the wake-up to the reader.
#[derive(Default)]
struct ReadReady {
    woken: AtomicBool,
    reader: AtomicWaker,
}

impl Wake for ReadReady {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.reader.wake();
    }
}

/// The socket of one client connection: `S` with a queue of outgoing frames in front of
/// its write side and a readiness flag on its read side.
pub(crate) struct Socket<S> {
    io: S,
    queue: VecDeque<Chunk>,
    /// Bytes in `queue` not yet written.
    queued: usize,
    /// Bytes of the front chunk already written.
    front_done: usize,
    ready: Arc<ReadReady>,
    /// `ready` as a waker, made once.
    ready_waker: Waker,
    /// The last read found nothing: until `ready` is woken, another would find nothing too.
    read_idle: bool,
    /// The last write found the socket full: the next attempt offers only the front piece,
    /// so a socket that stays full costs no joining per attempt.
    write_full: bool,
    /// The write side, for the outbox's direct path (plain TCP only).
    sink: Option<Arc<dyn DirectSink>>,
    /// The write side is lent to the direct path: nothing is written from here.
    lent: bool,
}

impl<S> Socket<S> {
    pub(crate) fn new(io: S) -> Self {
        let ready = Arc::new(ReadReady::default());
        Socket {
            io,
            queue: VecDeque::new(),
            queued: 0,
            front_done: 0,
            ready_waker: Waker::from(ready.clone()),
            ready,
            read_idle: false,
            write_full: false,
            sink: None,
            lent: false,
        }
    }

    /// The socket over `io`, whose write side `sink` may be lent to the direct path.
    pub(crate) fn with_sink(io: S, sink: Arc<dyn DirectSink>) -> Self {
        Socket { sink: Some(sink), ..Socket::new(io) }
    }

    /// The write side to lend, if this socket has one.
    pub(crate) fn sink(&self) -> Option<Arc<dyn DirectSink>> {
        self.sink.clone()
    }

    /// Marks the write side lent (nothing is written from here) or taken back.
    pub(crate) fn set_lent(&mut self, lent: bool) {
        self.lent = lent;
    }

    /// Puts bytes the direct path framed but did not write in front of everything queued:
    /// they are the stream's next bytes (perhaps the rest of a frame it started).
    pub(crate) fn unshift_raw(&mut self, bytes: Bytes) {
        if bytes.is_empty() {
            return;
        }
        debug_assert_eq!(self.front_done, 0, "a lent socket writes nothing of its own");
        self.queued += bytes.len();
        self.queue.push_front(Chunk { head: [0; 10], head_len: 0, body: Body::Shared(bytes) });
    }

    /// Queues a text frame (server frames are not masked) whose payload is `body`.
    pub(crate) fn push_text(&mut self, body: Bytes) {
        let (head, head_len) = switchyard_proto::ws_text_head(body.len());
        self.queued += head_len + body.len();
        self.queue.push_back(Chunk { head, head_len: head_len as u8, body: Body::Shared(body) });
    }

    /// Bytes queued and not yet written.
    pub(crate) fn queued(&self) -> usize {
        self.queued
    }

    /// False only when the last read found nothing and the socket has not signalled since:
    /// polling the read side again could only return `Pending`. The reader that read is
    /// still registered then (only the signal takes it), so it will be woken.
    pub(crate) fn may_read(&self) -> bool {
        !self.read_idle || self.ready.woken.load(Ordering::Acquire)
    }

    /// Marks the first `n` queued bytes written.
    fn consume(&mut self, mut n: usize) {
        self.queued -= n;
        while n > 0 {
            let front = self.queue.front().expect("written bytes were queued");
            let left = front.len() - self.front_done;
            if n < left {
                self.front_done += n;
                return;
            }
            n -= left;
            self.front_done = 0;
            self.queue.pop_front();
        }
        if self.queue.is_empty() {
            // Everything is out: an idle connection keeps no queue (the next burst's one
            // allocation is cheaper than every idle connection holding slots).
            self.queue = VecDeque::new();
        }
    }
}

impl<S: AsyncWrite + Unpin> Socket<S> {
    /// Writes queued bytes until at most `keep` are left. Frames are joined into one
    /// buffer per write (one plain `send`, which costs the kernel less than a vectored
    /// write of the same small frames); a large frame's body is written from where it is.
    pub(crate) fn poll_drain(&mut self, cx: &mut Context<'_>, keep: usize) -> Poll<io::Result<()>> {
        while self.queued > keep {
            let (head, body) = self.queue.front().expect("queued bytes").parts(self.front_done);
            let written = if self.write_full || (head.is_empty() && body.len() >= DIRECT_WRITE) {
                let piece = if head.is_empty() { body } else { head };
                Pin::new(&mut self.io).poll_write(cx, piece)
            } else {
                JOINED.with_borrow_mut(|joined| {
                    joined.clear();
                    let mut done = self.front_done;
                    for chunk in &self.queue {
                        let (head, body) = chunk.parts(done);
                        done = 0;
                        joined.extend_from_slice(head);
                        let room = JOINED_WRITE.saturating_sub(joined.len());
                        joined.extend_from_slice(&body[..body.len().min(room)]);
                        if joined.len() >= JOINED_WRITE {
                            break;
                        }
                    }
                    let written = Pin::new(&mut self.io).poll_write(cx, joined);
                    if joined.capacity() > JOINED_WRITE * 2 {
                        *joined = Vec::new();
                    }
                    written
                })
            };
            match written {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => {
                    self.write_full = false;
                    self.consume(n);
                }
                Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {
                    self.write_full = true;
                    return Poll::Pending;
                }
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Socket<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.ready.reader.register(cx.waker());
        // Cleared before the read: a signal that comes during or after it is kept.
        this.ready.woken.store(false, Ordering::Release);
        let read = Pin::new(&mut this.io).poll_read(&mut Context::from_waker(&this.ready_waker), buf);
        this.read_idle = read.is_pending();
        read
    }
}

/// tungstenite's own writes (control frames, and whatever a session sends through it) are
/// copied into the queue behind the frames already there when tungstenite writes them out,
/// which is at its flush: a ping fed before later pushes may follow them (control frames
/// may come between any two frames).
impl<S: AsyncWrite + Unpin> AsyncWrite for Socket<S> {
    fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        match this.queue.back_mut() {
            // Appending is safe even to a partly written chunk: only its start was written.
            Some(Chunk { body: Body::Own(own), .. }) => own.extend_from_slice(buf),
            _ => this.queue.push_back(Chunk { head: [0; 10], head_len: 0, body: Body::Own(BytesMut::from(buf)) }),
        }
        this.queued += buf.len();
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.lent {
            // Written once the session takes the socket back (it flushes then).
            return Poll::Ready(Ok(()));
        }
        std::task::ready!(this.poll_drain(cx, 0))?;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        std::task::ready!(this.poll_drain(cx, 0))?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

/// A plain TCP stream shared between its session (reads, and writes while not lent) and the
/// direct path ([`DirectSink`]). Bytes the HTTP layer read past the upgrade request come
/// first.
pub(crate) struct SharedTcp {
    stream: Arc<TcpStream>,
    early: Bytes,
}

impl SharedTcp {
    /// The stream, after `early` (bytes already read from it).
    pub(crate) fn new(stream: TcpStream, early: Bytes) -> (Self, Arc<dyn DirectSink>) {
        // `early` is a view into the HTTP layer's read buffer: kept as it is, it would
        // keep that whole buffer alive for as long as the connection lasts.
        let early = if early.is_empty() { Bytes::new() } else { Bytes::copy_from_slice(&early) };
        let stream = Arc::new(stream);
        (SharedTcp { stream: stream.clone(), early }, Arc::new(TcpSink(stream)))
    }
}

/// The write side of a [`SharedTcp`], as lent to the direct path.
struct TcpSink(Arc<TcpStream>);

impl DirectSink for TcpSink {
    fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
        self.0.try_write(buf)
    }
}

impl AsyncRead for SharedTcp {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.early.is_empty() {
            let n = this.early.len().min(buf.remaining());
            buf.put_slice(&this.early[..n]);
            this.early.advance(n);
            return Poll::Ready(Ok(()));
        }
        loop {
            std::task::ready!(this.stream.poll_read_ready(cx))?;
            match this.stream.try_read(buf.initialize_unfilled()) {
                Ok(n) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncWrite for SharedTcp {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        loop {
            std::task::ready!(self.stream.poll_write_ready(cx))?;
            match self.stream.try_write(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                other => return Poll::Ready(other),
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        // What tokio's own stream does (a FIN), through a shared reference.
        Poll::Ready(socket2::SockRef::from(&*self.stream).shutdown(std::net::Shutdown::Write))
    }
}

#[cfg(test)]
mod tests {
    use std::future::poll_fn;

    use futures_util::StreamExt as _;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio_tungstenite::tungstenite::protocol::Role;
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::WebSocketStream;

    use super::*;

    /// A writer that takes at most `step` bytes per call.
    struct Trickle {
        out: Vec<u8>,
        step: usize,
    }

    impl AsyncWrite for Trickle {
        fn poll_write(mut self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
            let n = buf.len().min(self.step);
            self.out.extend_from_slice(&buf[..n]);
            Poll::Ready(Ok(n))
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    /// Frames of every header size, written in pieces that cut through headers and bodies,
    /// come out byte for byte as tungstenite would frame them, in order, with tungstenite's
    /// own writes in between.
    #[tokio::test]
    async fn frames_come_out_whole_and_in_order_through_partial_writes() {
        let bodies: Vec<Bytes> = [0usize, 1, 125, 126, 65_535, 65_536, 300]
            .iter()
            .map(|&n| Bytes::from((0..n).map(|i| b'a' + (i % 26) as u8).collect::<Vec<u8>>()))
            .collect();
        for step in [1, 7, 20_000, 100_000, 1 << 20] {
            let mut socket = Socket::new(Trickle { out: Vec::new(), step });
            for (i, body) in bodies.iter().enumerate() {
                socket.push_text(body.clone());
                if i == 2 {
                    Pin::new(&mut socket).poll_write(&mut Context::from_waker(Waker::noop()), b"ctl").is_ready();
                }
            }
            poll_fn(|cx| Pin::new(&mut socket).poll_flush(cx)).await.unwrap();
            assert_eq!((socket.queued(), socket.queue.len()), (0, 0));

            // What tungstenite itself would have written for the same frames.
            let (mut a, b) = tokio::io::duplex(1 << 20);
            let mut ws = WebSocketStream::from_raw_socket(b, Role::Server, None).await;
            let mut expected = Vec::new();
            for (i, body) in bodies.iter().enumerate() {
                futures_util::SinkExt::send(&mut ws, Message::text(String::from_utf8(body.to_vec()).unwrap()))
                    .await
                    .unwrap();
                let mut frame = vec![0; 10 + body.len()];
                let n = read_frame(&mut a, &mut frame).await;
                expected.extend_from_slice(&frame[..n]);
                if i == 2 {
                    expected.extend_from_slice(b"ctl");
                }
            }
            assert!(socket.io.out == expected, "step {step}");
        }
    }

    /// Reads exactly one server frame (unmasked) into `buf`, returning its length.
    async fn read_frame(r: &mut tokio::io::DuplexStream, buf: &mut [u8]) -> usize {
        r.read_exact(&mut buf[..2]).await.unwrap();
        let (ext, len) = match buf[1] {
            126 => (2, None),
            127 => (8, None),
            n => (0, Some(n as usize)),
        };
        r.read_exact(&mut buf[2..2 + ext]).await.unwrap();
        let len = len.unwrap_or_else(|| {
            let mut n = [0u8; 8];
            n[8 - ext..].copy_from_slice(&buf[2..2 + ext]);
            u64::from_be_bytes(n) as usize
        });
        r.read_exact(&mut buf[2 + ext..2 + ext + len]).await.unwrap();
        2 + ext + len
    }

    /// Once a read finds nothing, the read side is not worth polling until the socket
    /// signals; the signal (bytes arriving) makes it so again, and wakes the reader.
    #[tokio::test]
    async fn the_read_side_is_skipped_until_the_socket_signals() {
        let (mut peer, io) = tokio::io::duplex(1024);
        let mut ws = WebSocketStream::from_raw_socket(Socket::new(io), Role::Server, None).await;
        let flag = Arc::new(Flag::default());
        let waker = Waker::from(flag.clone());
        let cx = &mut Context::from_waker(&waker);
        assert!(ws.get_ref().may_read(), "a new socket may hold bytes already");
        assert!(ws.poll_next_unpin(cx).is_pending());
        assert!(!ws.get_ref().may_read(), "nothing came since the read found nothing");

        // A masked client frame: "hi".
        let mask = [1u8, 2, 3, 4];
        let mut frame = vec![0x81, 0x80 | 2];
        frame.extend_from_slice(&mask);
        frame.extend(b"hi".iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        peer.write_all(&frame).await.unwrap();
        assert!(flag.0.load(Ordering::Acquire), "the reader was woken");
        assert!(ws.get_ref().may_read());
        match ws.next().await.unwrap().unwrap() {
            Message::Text(t) => assert_eq!(t.as_str(), "hi"),
            other => panic!("{other:?}"),
        }
    }

    /// A socket whose peer stopped reading, until `open`.
    #[derive(Default)]
    struct Full {
        open: bool,
        attempts: Vec<usize>,
        out: Vec<u8>,
    }

    impl AsyncWrite for Full {
        fn poll_write(mut self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
            self.attempts.push(buf.len());
            if !self.open {
                return Poll::Pending;
            }
            self.out.extend_from_slice(buf);
            Poll::Ready(Ok(buf.len()))
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    /// A client that stops reading and floods pings: tungstenite's pongs grow one buffer,
    /// not the queue, and while the socket stays full each attempt offers only the front
    /// piece instead of joining the whole queue again. Once it drains, every byte comes out
    /// in order.
    #[test]
    fn a_full_socket_is_probed_and_a_pong_flood_grows_one_buffer() {
        let cx = &mut Context::from_waker(Waker::noop());
        let mut socket = Socket::new(Full::default());
        let body = Bytes::from(vec![b'x'; 300]);
        for _ in 0..3 {
            socket.push_text(body.clone());
        }
        assert!(socket.poll_drain(cx, 0).is_pending());
        assert_eq!(socket.io.attempts, [3 * 304], "the first attempt joins the queue");
        for _ in 0..1000 {
            assert!(matches!(Pin::new(&mut socket).poll_write(cx, &[0x8a, 0]), Poll::Ready(Ok(2))));
            assert!(socket.poll_drain(cx, 0).is_pending());
        }
        assert_eq!((socket.queue.len(), socket.queued()), (4, 3 * 304 + 2000));
        assert!(socket.io.attempts[1..].iter().all(|&n| n == 4), "only the front header is offered while full");

        socket.io.open = true;
        assert!(socket.poll_drain(cx, 0).is_ready());
        let mut expected = Vec::new();
        for _ in 0..3 {
            expected.extend_from_slice(&[0x81, 126, 1, 44]);
            expected.extend_from_slice(&body);
        }
        for _ in 0..1000 {
            expected.extend_from_slice(&[0x8a, 0]);
        }
        assert!(socket.io.out == expected);
        assert_eq!((socket.queue.len(), socket.queued()), (0, 0));
    }

    #[derive(Default)]
    struct Flag(AtomicBool);

    impl Wake for Flag {
        fn wake(self: Arc<Self>) {
            self.0.store(true, Ordering::Release);
        }
    }
}
