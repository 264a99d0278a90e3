//! The transport contract (DESIGN §4), modelled on NCCL's net plugin API with typed handles.
//!
//! A [`Transport`] is created per process and communicator before the rendezvous: it listens
//! and publishes an [`Endpoint`] through the rendezvous. After the rendezvous it is
//! [`activated`](Transport::activate) with the communicator's identity, and hands out one
//! [`Connection`] per peer (`connect` from the lower rank, `accept` on the higher).
//!
//! A connection is bidirectional and strictly ordered per direction: sends complete in the
//! order they were posted, receives match incoming messages in the order they were posted,
//! exactly like NCCL's `isend`/`irecv`. Both calls are non-blocking and may answer "not now"
//! (`Ok(None)`: the queue is full, post again later). [`Connection::test`] is non-blocking
//! and is where a transport makes progress; transports touch request memory only inside
//! `isend`/`irecv`/`test`, never from another thread, so once the caller stops calling them
//! nothing reads or writes its buffers.
//!
//! Receives are either written in place (TCP, shared memory) or, for devmem, left where the
//! NIC put them: [`RecvLayout::Scattered`] lists `{src_off, len, dst_off}` fragments in the
//! RX pool for the executor to gather (or gather-and-reduce) on the device, after which it
//! calls [`Connection::recv_consumed`] so the transport can return the kernel's tokens.

use std::fmt;
use std::os::fd::BorrowedFd;
use std::time::Instant;

use crate::auth::AuthKey;
use crate::error::{Error, Result};
use crate::memory::{DeviceId, MemKind, Region, RegionSlice};
use crate::types::{CommId, Rank, Seq};
use crate::wire::FrameHeader;

/// The transports devccl knows, in order of preference.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum TransportKind {
    /// Linux device-memory TCP.
    Devmem = 3,
    /// Shared memory between ranks of one host.
    Shm = 2,
    /// Plain TCP sockets.
    Tcp = 1,
    /// In-process queues (tests).
    Mem = 4,
}

impl TransportKind {
    /// Lower-case name (`DEVCCL_TRANSPORTS` spelling).
    pub const fn name(self) -> &'static str {
        match self {
            TransportKind::Devmem => "devmem",
            TransportKind::Shm => "shm",
            TransportKind::Tcp => "tcp",
            TransportKind::Mem => "mem",
        }
    }

    /// Parse a name.
    pub fn from_name(s: &str) -> Option<TransportKind> {
        [TransportKind::Devmem, TransportKind::Shm, TransportKind::Tcp, TransportKind::Mem]
            .into_iter()
            .find(|k| k.name() == s)
    }
}

impl fmt::Display for TransportKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What a transport publishes through the rendezvous so peers can reach it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// Which transport.
    pub kind: TransportKind,
    /// Transport-specific address (TCP: `ip:port`, bracketed for IPv6).
    pub address: String,
    /// Capabilities as key/value pairs (e.g. `lanes=4`, `devmem_rx=0`).
    pub caps: Vec<(String, String)>,
}

impl Endpoint {
    /// Value of a capability.
    pub fn cap(&self, key: &str) -> Option<&str> {
        self.caps.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }
}

/// Properties the selector's cost model reads.
#[derive(Debug, Clone, PartialEq)]
pub struct LinkProperties {
    /// Human-readable name (e.g. `tcp eth0 4 lanes`).
    pub name: String,
    /// Link speed in Mbit/s (0: unknown).
    pub speed_mbps: u64,
    /// One-way small-message latency estimate in microseconds.
    pub latency_us: f64,
    /// Requests a connection accepts per direction before answering "not now".
    pub max_inflight: usize,
    /// Parallel sockets (lanes) per connection.
    pub lanes: usize,
    /// True when receives may come back [`RecvLayout::Scattered`].
    pub scattered_rx: bool,
    /// True when the transport can read/write device memory without staging.
    pub device_memory: bool,
}

/// What a communicator tells its transports after the rendezvous.
#[derive(Debug, Clone)]
pub struct CommContext {
    /// The communicator.
    pub comm: CommId,
    /// This rank.
    pub rank: Rank,
    /// World size.
    pub world: usize,
    /// Authentication key when `DEVCCL_SECRET` is set.
    pub key: Option<AuthKey>,
}

/// A request handle, unique per connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ReqId(pub u64);

/// A message to send: header plus payload (`header.len == src.len()`).
#[derive(Debug, Clone)]
pub struct SendRequest {
    /// The frame header.
    pub header: FrameHeader,
    /// Payload.
    pub src: RegionSlice,
}

/// A message to receive: the header we expect and where its payload goes.
#[derive(Debug, Clone)]
pub struct RecvRequest {
    /// Expected header; a different one is a mismatch error.
    pub expect: FrameHeader,
    /// Destination (`expect.len == dst.len()`).
    pub dst: RegionSlice,
}

/// Consumes a received payload piece by piece, in order, instead of a destination buffer:
/// how the executor reduces straight out of a transport's receive buffers (shared-memory
/// rings), saving a copy. `offset` is the position of `bytes` in the payload; pieces arrive
/// in order and cover the payload exactly once, split anywhere (not on element boundaries).
pub trait PayloadSink: Send {
    /// Take the next piece.
    fn consume(&mut self, offset: usize, bytes: &[u8]) -> Result<()>;
}

/// One piece of a scattered receive: `len` bytes at `src_off` in the transport's RX pool
/// belong at `dst_off` in the destination slice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fragment {
    /// Offset in the RX pool.
    pub src_off: u64,
    /// Length in bytes.
    pub len: u32,
    /// Offset in the destination.
    pub dst_off: u64,
}

/// Payload bytes of a scattered receive that did not land in the RX pool: devmem's linear
/// spills (`SCM_DEVMEM_LINEAR`: the NIC did not split them off into device memory) and the
/// bytes of a flow that was not steered to a bound queue. The transport copied them into
/// `region`, host memory the pool's device reads directly (its staging memory), where they
/// stay until `recv_consumed`.
#[derive(Debug, Clone)]
pub struct Spill {
    /// Where the spilled bytes are.
    pub region: Region,
    /// Pieces: `src_off` in `region`, `dst_off` in the destination.
    pub pieces: Vec<Fragment>,
}

/// Where a received payload is.
#[derive(Debug, Clone)]
pub enum RecvLayout {
    /// In the destination slice already.
    InPlace,
    /// Left in the transport's RX pool; gather it, then call `recv_consumed`.
    Scattered {
        /// The RX pool region.
        pool: Region,
        /// The fragments in the pool. With `spill`'s pieces they cover the destination
        /// exactly once; without a spill, the fragments alone do.
        frags: Vec<Fragment>,
        /// Bytes that did not land in the pool, if any.
        spill: Option<Spill>,
    },
}

/// A finished request.
#[derive(Debug, Clone)]
pub enum Completion {
    /// The payload left the source buffer; it may be reused.
    Sent {
        /// Bytes sent.
        bytes: usize,
    },
    /// The payload arrived.
    Received {
        /// Bytes received.
        bytes: usize,
        /// Where.
        layout: RecvLayout,
    },
}

/// What [`Connection::peek`] found on the incoming side of a connection.
#[derive(Debug)]
pub enum Peeked {
    /// The header of the next incoming frame, which stays unconsumed: the next receive
    /// posted on the connection gets this frame.
    Frame(FrameHeader),
    /// Nothing (whole) there yet.
    Nothing,
    /// The peer closed its end at a frame boundary (its process exited): nothing more will
    /// arrive. The error is what a receive would report.
    Closed(Error),
}

/// What to wait for on a file descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interest {
    /// Readable.
    Read,
    /// Writable.
    Write,
    /// Either.
    Both,
}

impl Interest {
    /// Readability, writability, both, or nothing to wait for (`None`).
    pub fn of(read: bool, write: bool) -> Option<Interest> {
        match (read, write) {
            (true, true) => Some(Interest::Both),
            (true, false) => Some(Interest::Read),
            (false, true) => Some(Interest::Write),
            (false, false) => None,
        }
    }
}

/// A registered memory handle (device memory, dma-bufs).
#[derive(Debug, Clone)]
pub struct MemHandle {
    /// Transport-specific id (devmem: binding id).
    pub id: u64,
    /// The region's kind.
    pub kind: MemKind,
}

/// A transport instance (one per communicator per process).
pub trait Transport: Send + Sync + fmt::Debug {
    /// Which transport.
    fn kind(&self) -> TransportKind;
    /// Address and capabilities to publish through the rendezvous.
    fn endpoint(&self) -> Endpoint;
    /// Properties for the cost model.
    fn properties(&self) -> LinkProperties;
    /// Called once after the rendezvous; handshakes are checked against `ctx` from then on.
    fn activate(&self, ctx: CommContext) -> Result<()>;
    /// Connect to `peer`, which published `remote`. Blocks until connected or `deadline`.
    fn connect(&self, peer: Rank, remote: &Endpoint, deadline: Instant) -> Result<Box<dyn Connection>>;
    /// Wait for `peer`'s connection. Blocks until connected or `deadline`.
    fn accept(&self, peer: Rank, deadline: Instant) -> Result<Box<dyn Connection>>;
    /// Register memory for zero-copy use. Host memory needs nothing.
    fn register(&self, region: &Region) -> Result<MemHandle> {
        match region.kind() {
            MemKind::Host => Ok(MemHandle { id: 0, kind: MemKind::Host }),
            k => Err(Error::Unsupported { reason: format!("{} transport cannot use {k:?} memory", self.kind()) }),
        }
    }
    /// Stop accepting connections and release listeners.
    fn close(&self) {}
    /// Named counters for diagnostics (e.g. `rejected_handshakes`).
    fn counters(&self) -> Vec<(&'static str, u64)> {
        Vec::new()
    }
}

/// A bidirectional, per-direction FIFO connection to one peer.
pub trait Connection: Send + fmt::Debug {
    /// The peer.
    fn peer(&self) -> Rank;
    /// Which transport.
    fn kind(&self) -> TransportKind;
    /// Post a send. `Ok(None)`: queue full, try again after progress.
    fn isend(&mut self, req: SendRequest) -> Result<Option<ReqId>>;
    /// Post a receive. `Ok(None)`: queue full, try again after progress.
    fn irecv(&mut self, req: RecvRequest) -> Result<Option<ReqId>>;
    /// True when requests may name memory of `device` directly: sends read it and scattered
    /// receives into it are gathered by that device. Host memory always; TCP and shared
    /// memory nothing else; devmem also its RX pool's device (when that device's memory can
    /// be sent from). For a device it does not reach, the executor stages the call's buffers
    /// through pinned host slots (see `devccl::lower`).
    fn reaches(&self, device: DeviceId) -> bool {
        device.is_host()
    }
    /// True when [`Connection::irecv_sink`] is supported.
    fn accepts_sinks(&self) -> bool {
        false
    }
    /// Post a receive of `expect.len` bytes whose payload is handed to `sink` as it
    /// arrives (ordered with the connection's other receives). Only when
    /// [`Connection::accepts_sinks`]; completes as `Received { layout: InPlace }`.
    fn irecv_sink(&mut self, expect: FrameHeader, sink: Box<dyn PayloadSink>) -> Result<Option<ReqId>> {
        let _ = (expect, sink);
        Err(Error::Unsupported { reason: format!("{} connections do not take payload sinks", self.kind()) })
    }
    /// Non-blocking: the header of the next incoming frame, without consuming it (the next
    /// posted receive matches that frame as usual). Reads what is already available without
    /// blocking. Only valid while no posted receive could claim that frame (TCP: none on the
    /// lane the next message arrives on; other transports: none at all), else
    /// [`Error::Internal`]. An abort frame from the peer, garbage, or a stream cut inside a
    /// frame is the error a receive would return, and is remembered like one. Used by
    /// receives from any source, which look at every peer's next message before choosing.
    fn peek(&mut self) -> Result<Peeked> {
        Err(Error::Unsupported {
            reason: format!(
                "{} connections cannot look at an incoming message without receiving it, which a receive from \
                 any source needs",
                self.kind()
            ),
        })
    }
    /// Descriptors to wait on (for `poll`) after [`Connection::peek`] found nothing: they
    /// become ready when the next frame (or the peer's abort or close) may have arrived.
    /// The default names none (a caller then naps briefly between peeks).
    fn peek_fds<'a>(&'a self, out: &mut Vec<(BorrowedFd<'a>, Interest)>) {
        let _ = out;
    }
    /// Non-blocking: make progress and report whether `req` finished.
    fn test(&mut self, req: ReqId) -> Result<Option<Completion>>;
    /// The executor finished reading a scattered receive; its RX buffers may be recycled.
    fn recv_consumed(&mut self, _req: ReqId) -> Result<()> {
        Ok(())
    }
    /// Descriptors to wait on while requests are pending (for `poll`).
    fn wait_fds<'a>(&'a self, out: &mut Vec<(BorrowedFd<'a>, Interest)>);
    /// Best effort, bounded: tell the peer we are aborting and why.
    fn send_abort(&mut self, seq: Seq, reason: &str);
    /// Forget every pending request (after an error); no buffer is touched afterwards.
    fn cancel(&mut self);
    /// After a failure, without blocking: has the peer left a reason (an abort frame it sent,
    /// or a closed connection)? Data frames found on the way are discarded, so call this only
    /// once the connection's requests were cancelled. Used to name the root cause when a
    /// failure cascades through several ranks.
    fn peer_failure(&mut self) -> Option<Error> {
        None
    }
}

/// Block until one of `fds` is ready for its interest or `timeout` passes. Returns whether
/// any descriptor became ready. An empty set just sleeps (bounded by `timeout`).
pub fn wait_ready(fds: &[(BorrowedFd<'_>, Interest)], timeout: std::time::Duration) -> Result<bool> {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    if fds.is_empty() {
        std::thread::sleep(timeout.min(std::time::Duration::from_millis(1)));
        return Ok(false);
    }
    let mut pfds: Vec<PollFd<'_>> = fds
        .iter()
        .map(|(fd, i)| {
            let flags = match i {
                Interest::Read => PollFlags::POLLIN,
                Interest::Write => PollFlags::POLLOUT,
                Interest::Both => PollFlags::POLLIN | PollFlags::POLLOUT,
            };
            PollFd::new(*fd, flags)
        })
        .collect();
    let ms = timeout.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32;
    let t = PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX);
    match poll(&mut pfds, t) {
        Ok(n) => Ok(n > 0),
        Err(nix::errno::Errno::EINTR) => Ok(false),
        Err(e) => Err(Error::system("poll", std::io::Error::from(e))),
    }
}
