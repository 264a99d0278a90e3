//! In-memory transport: ranks are threads of one process, messages are copied through
//! per-direction queues, wake-ups go through an eventfd per queue so the executor waits on
//! it with the same `poll(2)` path as for sockets. No sockets, no timing dependence.

use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::Instant;

use nix::sys::eventfd::{EfdFlags, EventFd};

use crate::conn_state::{RecvTarget, check_frame_len};
use crate::error::{Error, Result};
use crate::transport::{
    CommContext, Completion, Connection, Endpoint, Interest, LinkProperties, PayloadSink, Peeked, RecvLayout,
    RecvRequest, ReqId, SendRequest, Transport, TransportKind,
};
use crate::types::{Rank, Seq};
use crate::wire::{FrameHeader, FrameType};

/// Receives a connection posts before answering "not now" (small, so the executor's retry
/// path is exercised by every mesh test).
const MAX_POSTED_RECVS: usize = 8;

struct Frame {
    header: FrameHeader,
    payload: Vec<u8>,
}

struct Queue {
    frames: Mutex<VecDeque<Frame>>,
    bell: EventFd,
    closed: AtomicBool,
}

impl Queue {
    fn new() -> Arc<Queue> {
        Arc::new(Queue {
            frames: Mutex::new(VecDeque::new()),
            bell: EventFd::from_value_and_flags(0, EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC).expect("eventfd"),
            closed: AtomicBool::new(false),
        })
    }

    fn push(&self, f: Frame) {
        self.frames.lock().unwrap_or_else(|e| e.into_inner()).push_back(f);
        let _ = self.bell.write(1);
    }

    fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        let _ = self.bell.write(1);
    }
}

#[derive(Default)]
struct Hub {
    /// Links made by `connect(from → to)` waiting for `to` to accept: (tx of from, rx of from).
    links: Mutex<HashMap<(u32, u32), (Arc<Queue>, Arc<Queue>)>>,
    cv: Condvar,
    /// Connections accept payload sinks and feed them in small, irregular pieces (so the
    /// executor's reduce-on-arrival path, elements split across pieces included, is tested).
    sinks: bool,
}

/// One rank's in-memory transport.
pub struct MemTransport {
    hub: Arc<Hub>,
    rank: Rank,
    ctx: OnceLock<CommContext>,
}

impl std::fmt::Debug for MemTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MemTransport(rank {})", self.rank)
    }
}

/// Transports for an `n`-rank mesh in this process.
pub fn mesh(n: usize) -> Vec<MemTransport> {
    mesh_with(n, false)
}

/// Like [`mesh`]; with `sinks`, connections take payload sinks and hand them each payload in
/// irregular pieces of 1 to 61 bytes.
pub fn mesh_with(n: usize, sinks: bool) -> Vec<MemTransport> {
    let hub = Arc::new(Hub { sinks, ..Hub::default() });
    (0..n).map(|r| MemTransport { hub: hub.clone(), rank: Rank::from(r), ctx: OnceLock::new() }).collect()
}

impl Transport for MemTransport {
    fn kind(&self) -> TransportKind {
        TransportKind::Mem
    }

    fn endpoint(&self) -> Endpoint {
        Endpoint { kind: TransportKind::Mem, address: format!("mem:{}", self.rank), caps: vec![] }
    }

    fn properties(&self) -> LinkProperties {
        LinkProperties {
            name: "in-memory".into(),
            speed_mbps: 100_000,
            latency_us: 1.0,
            max_inflight: MAX_POSTED_RECVS,
            lanes: 1,
            scattered_rx: false,
            device_memory: false,
        }
    }

    fn activate(&self, ctx: CommContext) -> Result<()> {
        self.ctx.set(ctx).map_err(|_| Error::Internal("transport activated twice".into()))
    }

    fn connect(&self, peer: Rank, _remote: &Endpoint, _deadline: Instant) -> Result<Box<dyn Connection>> {
        let (tx, rx) = (Queue::new(), Queue::new());
        let mut links = self.hub.links.lock().unwrap_or_else(|e| e.into_inner());
        links.insert((self.rank.0, peer.0), (tx.clone(), rx.clone()));
        self.hub.cv.notify_all();
        Ok(Box::new(MemConn::new(self.rank, peer, tx, rx, self.hub.sinks)))
    }

    fn accept(&self, peer: Rank, deadline: Instant) -> Result<Box<dyn Connection>> {
        let mut links = self.hub.links.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some((their_tx, their_rx)) = links.remove(&(peer.0, self.rank.0)) {
                return Ok(Box::new(MemConn::new(self.rank, peer, their_rx, their_tx, self.hub.sinks)));
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::Timeout {
                    what: format!("rank {} waiting for rank {peer} to connect (in-memory)", self.rank),
                    after: std::time::Duration::ZERO,
                });
            }
            links = self.hub.cv.wait_timeout(links, deadline - now).unwrap_or_else(|e| e.into_inner()).0;
        }
    }
}

struct MemConn {
    me: Rank,
    peer: Rank,
    tx: Arc<Queue>,
    rx: Arc<Queue>,
    next: u64,
    recvs: VecDeque<(ReqId, FrameHeader, RecvTarget)>,
    done: HashMap<ReqId, Completion>,
    sinks: bool,
}

impl std::fmt::Debug for MemConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MemConn({} -> {})", self.me, self.peer)
    }
}

impl MemConn {
    fn new(me: Rank, peer: Rank, tx: Arc<Queue>, rx: Arc<Queue>, sinks: bool) -> MemConn {
        MemConn { me, peer, tx, rx, next: 0, recvs: VecDeque::new(), done: HashMap::new(), sinks }
    }

    fn id(&mut self) -> ReqId {
        self.next += 1;
        ReqId(self.next)
    }

    fn closed_error(&self) -> Error {
        Error::remote(
            self.peer,
            format!("rank {} closed its connection to rank {} (process exited or failed)", self.peer, self.me),
        )
    }

    fn aborted(&self, frame: &Frame) -> Error {
        Error::remote(self.peer, format!("rank {} aborted: {}", self.peer, String::from_utf8_lossy(&frame.payload)))
    }

    fn progress_recvs(&mut self) -> Result<()> {
        let _ = self.rx.bell.read();
        while let Some((id, expect, _)) = self.recvs.front() {
            // Closed is read before the queue: a frame pushed before the close is seen.
            let closed = self.rx.closed.load(Ordering::SeqCst);
            let Some(frame) = self.rx.frames.lock().unwrap_or_else(|e| e.into_inner()).pop_front() else {
                if closed {
                    return Err(self.closed_error());
                }
                return Ok(());
            };
            if frame.header.frame == FrameType::Abort {
                return Err(self.aborted(&frame));
            }
            expect.check(&frame.header, self.me, self.peer)?;
            let id = *id;
            let (_, _, target) = self.recvs.pop_front().expect("front");
            match target {
                RecvTarget::Copy(dst) => dst.with_bytes_mut(|d| d.copy_from_slice(&frame.payload))?,
                RecvTarget::Sink { mut sink, .. } => {
                    // Irregular pieces: 1..=61 bytes, from a tiny deterministic generator.
                    let (mut at, mut x) = (0usize, (id.0 as usize).wrapping_mul(2654435761) | 1);
                    while at < frame.payload.len() {
                        x ^= x << 7;
                        x ^= x >> 9;
                        let n = (1 + x % 61).min(frame.payload.len() - at);
                        sink.consume(at, &frame.payload[at..at + n])?;
                        at += n;
                    }
                }
            }
            self.done.insert(id, Completion::Received { bytes: frame.payload.len(), layout: RecvLayout::InPlace });
        }
        Ok(())
    }
}

impl Connection for MemConn {
    fn peer(&self) -> Rank {
        self.peer
    }

    fn kind(&self) -> TransportKind {
        TransportKind::Mem
    }

    fn isend(&mut self, req: SendRequest) -> Result<Option<ReqId>> {
        check_frame_len("isend", &req.header, &req.src)?;
        if self.tx.closed.load(Ordering::SeqCst) {
            return Err(Error::remote(self.peer, format!("connection to rank {} is closed", self.peer)));
        }
        let payload = req.src.to_vec()?;
        let bytes = payload.len();
        self.tx.push(Frame { header: req.header, payload });
        let id = self.id();
        self.done.insert(id, Completion::Sent { bytes });
        Ok(Some(id))
    }

    fn irecv(&mut self, req: RecvRequest) -> Result<Option<ReqId>> {
        check_frame_len("irecv", &req.expect, &req.dst)?;
        if self.recvs.len() >= MAX_POSTED_RECVS {
            return Ok(None);
        }
        let id = self.id();
        self.recvs.push_back((id, req.expect, RecvTarget::Copy(req.dst)));
        Ok(Some(id))
    }

    fn accepts_sinks(&self) -> bool {
        self.sinks
    }

    fn irecv_sink(&mut self, expect: FrameHeader, sink: Box<dyn PayloadSink>) -> Result<Option<ReqId>> {
        if !self.sinks {
            return Err(Error::Unsupported { reason: "this in-memory mesh was made without sinks".into() });
        }
        if self.recvs.len() >= MAX_POSTED_RECVS {
            return Ok(None);
        }
        let id = self.id();
        self.recvs.push_back((id, expect, RecvTarget::Sink { len: expect.len as usize, sink }));
        Ok(Some(id))
    }

    fn test(&mut self, req: ReqId) -> Result<Option<Completion>> {
        if let Some(c) = self.done.remove(&req) {
            return Ok(Some(c));
        }
        self.progress_recvs()?;
        Ok(self.done.remove(&req))
    }

    fn wait_fds<'a>(&'a self, out: &mut Vec<(BorrowedFd<'a>, Interest)>) {
        if !self.recvs.is_empty() {
            out.push((self.rx.bell.as_fd(), Interest::Read));
        }
    }

    fn peek(&mut self) -> Result<Peeked> {
        if !self.recvs.is_empty() {
            return Err(Error::Internal(format!(
                "peek on the connection from rank {} with receives posted",
                self.peer
            )));
        }
        // Drain the doorbell first: a frame pushed after this read rings it again.
        let _ = self.rx.bell.read();
        let closed = self.rx.closed.load(Ordering::SeqCst);
        let q = self.rx.frames.lock().unwrap_or_else(|e| e.into_inner());
        match q.front() {
            Some(f) if f.header.frame == FrameType::Abort => Err(self.aborted(f)),
            Some(f) => Ok(Peeked::Frame(f.header)),
            None if closed => Ok(Peeked::Closed(self.closed_error())),
            None => Ok(Peeked::Nothing),
        }
    }

    fn peek_fds<'a>(&'a self, out: &mut Vec<(BorrowedFd<'a>, Interest)>) {
        out.push((self.rx.bell.as_fd(), Interest::Read));
    }

    fn send_abort(&mut self, seq: Seq, reason: &str) {
        let payload = reason.as_bytes()[..reason.len().min(crate::wire::MAX_ABORT_REASON)].to_vec();
        self.tx.push(Frame { header: FrameHeader::abort(seq, payload.len()), payload });
    }

    fn cancel(&mut self) {
        self.recvs.clear();
        self.done.clear();
    }

    fn peer_failure(&mut self) -> Option<Error> {
        let mut q = self.rx.frames.lock().unwrap_or_else(|e| e.into_inner());
        while let Some(f) = q.pop_front() {
            if f.header.frame == FrameType::Abort {
                return Some(Error::remote(
                    self.peer,
                    format!("rank {} aborted: {}", self.peer, String::from_utf8_lossy(&f.payload)),
                ));
            }
        }
        if self.rx.closed.load(Ordering::SeqCst) {
            return Some(Error::remote(self.peer, format!("rank {} closed its connection", self.peer)));
        }
        None
    }
}

impl Drop for MemConn {
    fn drop(&mut self) {
        self.tx.close();
    }
}
