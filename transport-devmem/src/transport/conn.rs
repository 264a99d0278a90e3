//! [`DevmemConnection`]: one peer's devmem connection, a set of TCP sockets.
//!
//! Lane 0 is the *control* socket: ordinary TCP (never steered to a bound queue, so its bytes
//! arrive in host memory the CPU reads), carrying every message's 56-byte frame header in
//! order, and abort frames. Lanes 1.. are *data* sockets, steered to the RX pool's queues:
//! message `k` of a direction sends its payload, bare, on data lane `k % lanes`. (Headers
//! cannot travel with the payload: on a NIC that splits headers, every payload byte of a
//! steered flow lands in the pool, which for GPU memory the CPU cannot read.)
//!
//! Receive: the header comes from the control socket and is checked against the posted
//! receive; the payload is read with `recvmsg(MSG_SOCK_DEVMEM)` on its data lane, never more
//! than the message's remaining bytes per call, and each `SCM_DEVMEM_DMABUF` cmsg becomes a
//! [`Fragment`] in the pool (its token kept), each `SCM_DEVMEM_LINEAR` spill (and any data a
//! steering miss left without cmsgs) is copied into a spill buffer the pool's device reads.
//! The receive completes [`RecvLayout::Scattered`]; its tokens go back to the kernel with
//! `SO_DEVMEM_DONTNEED` when the executor calls [`Connection::recv_consumed`] (the device
//! gathered the fragments), merged into ranges, in calls within the kernel's limits.
//!
//! Send: the header goes on the control socket; the payload from TX-bound memory goes
//! zero-copy (`sendmsg` with `SCM_DEVMEM_DMABUF`, offsets into the exported descriptor), and
//! the send completes only when the error queue says the kernel is done with the memory.
//! Other host memory goes as ordinary bytes on the same socket; device memory that cannot be
//! sent from is copied to host staging by its device first.
//!
//! Everything is non-blocking and runs inside `isend`/`irecv`/`test`/`recv_consumed`.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read};
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use devccl_core::conn_state::{ConnState, check_frame_len};
use devccl_core::device::Pending;
use devccl_core::memory::{DeviceId, MemKind, Region, RegionSlice};
use devccl_core::transport::{
    Completion, Connection, Fragment, Interest, Peeked, RecvLayout, RecvRequest, ReqId, SendRequest, Spill,
    TransportKind, wait_ready,
};
use devccl_core::wire::{FrameHeader, FrameType, HEADER_LEN, MAX_ABORT_REASON};
use devccl_core::{Error, Rank, Result, Seq};
use socket2::Socket;

use super::Shared;
use super::counters::{self as ctr};
use super::tx::{TxBinding, TxRoute};
use crate::seam::{ERRQUEUE_CONTROL_LEN, KernelSteering, RX_CMSG_SPACE};
use crate::sys::cmsg::{DmabufToken, ErrqueueEntry, RxCmsg, TokenBatcher, ZcTracker, parse_errqueue, parse_rx_cmsgs};

/// Requests a connection holds per direction before `isend`/`irecv` answer "not now".
pub const MAX_INFLIGHT: usize = 32;

/// Most stream bytes one `recvmsg(MSG_SOCK_DEVMEM)` consumes (the linear buffer's size).
const LINEAR_LEN: usize = 256 << 10;

/// Control buffer of a devmem `recvmsg`: room for a fragment every 160 bytes of
/// [`LINEAR_LEN`] (the kernel returns short when it fills up, never fails).
const CONTROL_LEN: usize = (LINEAR_LEN / 160) * RX_CMSG_SPACE;

/// Control socket read buffer: many headers per `read`, and always room for an abort frame.
const CTRL_BUF: usize = 64 << 10;

/// The first bytes on each control socket: "this side's data sockets are steered". No payload
/// goes out before the peer's arrived, so none lands on a queue the peer did not steer yet.
pub(crate) const READY: &[u8; 8] = b"DVMREADY";

/// How long `send_abort` may take.
const ABORT_BUDGET: Duration = Duration::from_millis(100);

const SEND: usize = 0;
const RECV: usize = 1;

fn send_flags() -> i32 {
    libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT
}

/// The control socket.
#[derive(Debug)]
struct Ctrl {
    sock: Socket,
    /// Encoded frames not yet written: `out[pos..]`; `ends` are frame boundaries in `out`.
    out: Vec<u8>,
    pos: usize,
    ends: VecDeque<usize>,
    /// False once a frame was left half-written (nothing more may follow).
    tx_in_sync: bool,
    rbuf: Box<[u8]>,
    rstart: usize,
    rend: usize,
    /// Data headers read, not yet matched with a receive.
    headers: VecDeque<FrameHeader>,
    /// The peer closed the control socket.
    eof: bool,
    /// The peer's [`READY`] arrived (its data sockets are steered).
    peer_ready: bool,
}

impl Ctrl {
    fn queue(&mut self, bytes: &[u8]) {
        self.out.extend_from_slice(bytes);
        self.ends.push_back(self.out.len());
    }

    fn pending_out(&self) -> bool {
        self.pos < self.out.len()
    }

    fn buffered(&self) -> usize {
        self.rend - self.rstart
    }

    /// The end of the frame being written when it is partly on the wire.
    fn partial_end(&self) -> Option<usize> {
        self.ends.iter().copied().find(|&e| e > self.pos).filter(|_| self.pos > 0 && !self.at_boundary())
    }

    fn at_boundary(&self) -> bool {
        self.pos == 0 || self.ends.iter().any(|&e| e == self.pos)
    }
}

/// Where a send's payload comes from.
#[derive(Debug)]
enum Route {
    /// Zero-copy from a TX binding; `offset`: the slice's start in the exported descriptor.
    Devmem { binding: Arc<TxBinding>, offset: u64 },
    /// Ordinary bytes from host memory.
    Bytes,
    /// Ordinary bytes from a host staging copy the device is making (or made).
    Staged { copy: Pending, staging: Region },
}

#[derive(Debug)]
struct TxItem {
    id: ReqId,
    src: RegionSlice,
    sent: usize,
    route: Route,
    /// Zero-copy send numbers this payload used (first, last).
    zc: Option<(u32, u32)>,
}

/// A payload handed to the kernel zero-copy, waiting for its completions.
#[derive(Debug)]
struct ZcWait {
    id: ReqId,
    bytes: usize,
    first: u32,
    last: u32,
}

/// A data socket.
#[derive(Debug)]
struct Lane {
    sock: Socket,
    sendq: VecDeque<TxItem>,
    zc: ZcTracker,
    zc_wait: VecDeque<ZcWait>,
    /// Tokens to return on this socket.
    tokens: TokenBatcher,
    eof: bool,
    rx_in_sync: bool,
    tx_in_sync: bool,
}

#[derive(Debug, Clone, Copy)]
enum RxState {
    /// Waiting for the header from the control socket.
    Header,
    /// Header matched; `got` payload bytes read from data lane `lane`.
    Payload { lane: usize, got: usize },
}

/// A posted receive.
#[derive(Debug)]
struct RxItem {
    id: ReqId,
    expect: FrameHeader,
    dst: RegionSlice,
    /// Message index in this direction (its data lane is `index % lanes`).
    index: u64,
    state: RxState,
    frags: Vec<Fragment>,
    tokens: TokenBatcher,
    /// Fragment bytes this receive holds in the pool.
    held: u64,
    spill: Option<(Region, Vec<Fragment>)>,
}

/// A completed scattered receive the executor has not consumed yet.
#[derive(Debug)]
struct Held {
    lane: usize,
    tokens: TokenBatcher,
    bytes: u64,
    spill: Option<Region>,
}

/// One peer's devmem connection (see the module docs).
#[derive(Debug)]
pub struct DevmemConnection {
    me: Rank,
    peer: Rank,
    remote: SocketAddr,
    sh: Arc<Shared>,
    ctrl: Ctrl,
    lanes: Vec<Lane>,
    recvs: VecDeque<RxItem>,
    held: HashMap<ReqId, Held>,
    posted: [u64; 2],
    pending_sends: usize,
    linear: Box<[u8]>,
    control: Box<[u8]>,
    errq: Box<[u8]>,
    /// Since when a receive has waited for a full pool.
    stalled: Option<Instant>,
    st: ConnState,
    _steering: Vec<Box<dyn KernelSteering>>,
}

/// Socket errors that mean the peer closed (or reset) the connection.
fn closed_kind(k: io::ErrorKind) -> bool {
    use io::ErrorKind as K;
    matches!(k, K::ConnectionReset | K::ConnectionAborted | K::BrokenPipe | K::NotConnected | K::UnexpectedEof)
}

impl DevmemConnection {
    /// A connection over connected, handshaken, prepared sockets: `ctrl`, then the data
    /// sockets.
    pub(crate) fn new(
        me: Rank,
        peer: Rank,
        remote: SocketAddr,
        sh: Arc<Shared>,
        ctrl: Socket,
        data: Vec<Socket>,
        steering: Vec<Box<dyn KernelSteering>>,
    ) -> Result<DevmemConnection> {
        if data.is_empty() {
            return Err(Error::Internal(format!("devmem connection to rank {peer} without data sockets")));
        }
        let prep = |s: &Socket, what: &str| -> Result<()> {
            let sys = |e| Error::system(format!("configure the devmem {what} socket to rank {peer} ({remote})"), e);
            s.set_nonblocking(true).map_err(sys)?;
            s.set_tcp_nodelay(true).map_err(sys)?;
            s.set_read_timeout(None).map_err(sys)?;
            s.set_write_timeout(None).map_err(sys)
        };
        prep(&ctrl, "control")?;
        let mut lanes = Vec::with_capacity(data.len());
        for sock in data {
            prep(&sock, "data")?;
            lanes.push(Lane {
                sock,
                sendq: VecDeque::with_capacity(MAX_INFLIGHT),
                zc: ZcTracker::new(),
                zc_wait: VecDeque::new(),
                tokens: TokenBatcher::new(),
                eof: false,
                rx_in_sync: true,
                tx_in_sync: true,
            });
        }
        let mut c = DevmemConnection {
            me,
            peer,
            remote,
            sh,
            ctrl: Ctrl {
                sock: ctrl,
                out: Vec::with_capacity(4096),
                pos: 0,
                ends: VecDeque::new(),
                tx_in_sync: true,
                rbuf: vec![0u8; CTRL_BUF].into_boxed_slice(),
                rstart: 0,
                rend: 0,
                headers: VecDeque::new(),
                eof: false,
                peer_ready: false,
            },
            lanes,
            recvs: VecDeque::with_capacity(MAX_INFLIGHT),
            held: HashMap::new(),
            posted: [0; 2],
            pending_sends: 0,
            linear: vec![0u8; LINEAR_LEN].into_boxed_slice(),
            control: vec![0u8; CONTROL_LEN].into_boxed_slice(),
            errq: vec![0u8; ERRQUEUE_CONTROL_LEN.max(256)].into_boxed_slice(),
            stalled: None,
            st: ConnState::default(),
            _steering: steering,
        };
        c.ctrl.queue(READY);
        c.flush_ctrl()?;
        Ok(c)
    }

    /// Data sockets.
    pub fn lanes(&self) -> usize {
        self.lanes.len()
    }

    fn closed_error(&self, what: &str, detail: &str) -> Error {
        Error::remote(
            self.peer,
            format!(
                "rank {} closed the connection (process exited?) [devmem {}, {what}: {detail}]",
                self.peer, self.remote
            ),
        )
    }

    fn io_error(&self, what: &str, doing: &str, e: io::Error) -> Error {
        if closed_kind(e.kind()) {
            return self.closed_error(what, &format!("{doing}: {e}"));
        }
        Error::system(format!("{doing} rank {} ({}) on the devmem {what}", self.peer, self.remote), e)
    }

    /// An answer of the kernel's devmem socket calls that this transport cannot read.
    fn kernel_error(&self, lane: usize, what: String) -> Error {
        Error::system(
            format!(
                "devmem recvmsg from rank {} ({}) on data lane {lane} ({} kernel)",
                self.peer,
                self.remote,
                self.sh.kernel.name()
            ),
            io::Error::new(io::ErrorKind::InvalidData, what),
        )
    }

    // ---------------------------------------------------------------------------------
    // Control socket.

    /// Write queued control frames until the socket would block.
    fn flush_ctrl(&mut self) -> Result<()> {
        while self.ctrl.pending_out() {
            let r = self.ctrl.sock.send_with_flags(&self.ctrl.out[self.ctrl.pos..], send_flags());
            match r {
                Ok(n) => self.ctrl.pos += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.io_error("control socket", "sending to", e)),
            }
        }
        self.ctrl.out.clear();
        self.ctrl.pos = 0;
        self.ctrl.ends.clear();
        Ok(())
    }

    /// Parse the complete frames buffered on the control socket: data headers are queued, an
    /// abort frame or garbage is the peer's error.
    fn parse_ctrl(&mut self) -> Result<()> {
        if !self.ctrl.peer_ready {
            let c = &self.ctrl;
            let n = c.buffered().min(READY.len());
            if c.rbuf[c.rstart..c.rstart + n] != READY[..n] {
                return Err(Error::remote(
                    self.peer,
                    format!(
                        "garbage on the devmem control connection from rank {} ({}): {:02x?} is not its ready message",
                        self.peer,
                        self.remote,
                        &c.rbuf[c.rstart..c.rstart + n]
                    ),
                ));
            }
            if n < READY.len() {
                return Ok(());
            }
            self.ctrl.rstart += READY.len();
            self.ctrl.peer_ready = true;
        }
        while self.ctrl.buffered() >= HEADER_LEN {
            let c = &self.ctrl;
            let h = FrameHeader::decode(&c.rbuf[c.rstart..c.rstart + HEADER_LEN]).map_err(|e| {
                let why = match e {
                    Error::Remote { message, .. } => message,
                    other => other.to_string(),
                };
                Error::remote(
                    self.peer,
                    format!(
                        "garbage on the devmem control connection from rank {} ({}): {why}",
                        self.peer, self.remote
                    ),
                )
            })?;
            if h.frame == FrameType::Abort {
                let len = h.len as usize;
                if c.buffered() < HEADER_LEN + len {
                    return Ok(());
                }
                let at = c.rstart + HEADER_LEN;
                let reason = String::from_utf8_lossy(&c.rbuf[at..at + len]).into_owned();
                self.ctrl.rstart = at + len;
                return Err(Error::remote(self.peer, format!("rank {} aborted: {reason}", self.peer)));
            }
            self.ctrl.headers.push_back(h);
            self.ctrl.rstart += HEADER_LEN;
        }
        Ok(())
    }

    /// Read what the control socket has (non-blocking) and parse it.
    fn pump_ctrl(&mut self) -> Result<()> {
        loop {
            self.parse_ctrl()?;
            if self.ctrl.eof {
                return Ok(());
            }
            let c = &mut self.ctrl;
            if c.rstart == c.rend {
                (c.rstart, c.rend) = (0, 0);
            } else if c.rbuf.len() - c.rend < HEADER_LEN + MAX_ABORT_REASON {
                c.rbuf.copy_within(c.rstart..c.rend, 0);
                (c.rstart, c.rend) = (0, c.rend - c.rstart);
            }
            let mut s: &Socket = &c.sock;
            match s.read(&mut c.rbuf[c.rend..]) {
                Ok(0) => c.eof = true,
                Ok(n) => c.rend += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if closed_kind(e.kind()) => c.eof = true,
                Err(e) => return Err(self.io_error("control socket", "receiving from", e)),
            }
        }
    }

    /// The error for a control stream that ended: between frames (the peer exited) or inside
    /// one.
    fn ctrl_end_error(&self) -> Error {
        let detail = if self.ctrl.buffered() > 0 { "end of stream in the middle of a frame" } else { "end of stream" };
        self.closed_error("control socket", detail)
    }

    // ---------------------------------------------------------------------------------
    // Receive.

    /// Give each receive waiting for its header the next header read.
    fn match_headers(&mut self) -> Result<()> {
        let n = self.lanes.len() as u64;
        for i in 0..self.recvs.len() {
            if !matches!(self.recvs[i].state, RxState::Header) {
                continue;
            }
            let Some(h) = self.ctrl.headers.pop_front() else {
                if self.ctrl.eof {
                    return Err(self.ctrl_end_error());
                }
                return Ok(());
            };
            let r = &mut self.recvs[i];
            r.expect.check(&h, self.me, self.peer)?;
            r.state = RxState::Payload { lane: (r.index % n) as usize, got: 0 };
        }
        Ok(())
    }

    /// Move every receive as far as the data at hand allows.
    fn progress_rx(&mut self) -> Result<()> {
        if self.recvs.is_empty() {
            return Ok(());
        }
        self.pump_ctrl()?;
        self.match_headers()?;
        for l in 0..self.lanes.len() {
            // The first receive reading on lane `l` (later ones wait for it).
            while let Some(i) =
                self.recvs.iter().position(|r| matches!(r.state, RxState::Payload { lane, .. } if lane == l))
            {
                if self.recv_done(i)? {
                    continue;
                }
                if !self.read_lane(i)? {
                    break;
                }
            }
        }
        Ok(())
    }

    /// Complete receive `i` if all of its payload is in; true when it was.
    fn recv_done(&mut self, i: usize) -> Result<bool> {
        let r = &self.recvs[i];
        let RxState::Payload { lane, got } = r.state else { return Ok(false) };
        if got < r.dst.len() {
            return Ok(false);
        }
        let r = self.recvs.remove(i).expect("present");
        let bytes = r.dst.len();
        if bytes == 0 {
            self.st.done.insert(r.id, Completion::Received { bytes, layout: RecvLayout::InPlace });
            return Ok(true);
        }
        let (spill_region, spill) = match r.spill {
            Some((region, pieces)) => (Some(region.clone()), Some(Spill { region, pieces })),
            None => (None, None),
        };
        self.held.insert(r.id, Held { lane, tokens: r.tokens, bytes: r.held, spill: spill_region });
        let layout = RecvLayout::Scattered { pool: self.sh.pool.region.clone(), frags: r.frags, spill };
        self.st.done.insert(r.id, Completion::Received { bytes, layout });
        Ok(true)
    }

    /// One `recvmsg(MSG_SOCK_DEVMEM)` for receive `i` on its data lane. `Ok(false)`: the
    /// socket had nothing (or the pool is full).
    fn read_lane(&mut self, i: usize) -> Result<bool> {
        let RxState::Payload { lane: l, got } = self.recvs[i].state else { return Ok(false) };
        let len = self.recvs[i].dst.len();
        let cap = (len - got).min(LINEAR_LEN);
        let r = loop {
            let r =
                self.sh.kernel.recvmsg_devmem(self.lanes[l].sock.as_fd(), &mut self.linear[..cap], &mut self.control);
            match r {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                other => break other,
            }
        };
        let (n, clen) = match r {
            Ok((0, _)) => {
                self.lanes[l].eof = true;
                return Err(self.closed_error(&format!("data lane {l}"), "end of stream in the middle of a payload"));
            }
            Ok(x) => x,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                self.check_stall(i)?;
                return Ok(false);
            }
            Err(e) => {
                self.lanes[l].eof |= closed_kind(e.kind());
                return Err(self.io_error(&format!("data lane {l}"), "devmem recvmsg from", e));
            }
        };
        self.stalled = None;
        if n > cap {
            return Err(self.kernel_error(l, format!("recvmsg consumed {n} bytes, more than the {cap} asked")));
        }
        let cmsgs = parse_rx_cmsgs(&self.control[..clen.min(self.control.len())])
            .map_err(|e| self.kernel_error(l, format!("control data that is not devmem cmsgs: {}", e.0)))?;
        if cmsgs.is_empty() {
            // Ordinary data: the flow was not steered to a bound queue.
            ctr::add(&self.sh.counters, |c| &c.rx_unsteered_bytes, n as u64);
            self.spill(i, got, 0, n)?;
        } else {
            let pool = &self.sh.pool;
            let (pool_id, pool_len, base, fd_len) = (pool.id(), pool.len() as u64, pool.offset, pool.fd_len);
            let mut pos = got;
            let mut lin = 0usize;
            for c in &cmsgs {
                match *c {
                    RxCmsg::Linear { size } => {
                        let size = size as usize;
                        if lin + size > n || pos + size > got + n {
                            return Err(self.kernel_error(l, format!("{size} linear bytes beyond the {n} received")));
                        }
                        ctr::add(&self.sh.counters, |c| &c.rx_linear_spills, 1);
                        ctr::add(&self.sh.counters, |c| &c.rx_linear_bytes, size as u64);
                        self.spill(i, pos, lin, size)?;
                        lin += size;
                        pos += size;
                    }
                    RxCmsg::Dmabuf(d) => {
                        let size = d.frag_size as usize;
                        if d.dmabuf_id != pool_id {
                            return Err(self.kernel_error(
                                l,
                                format!(
                                    "a fragment of binding {} (this transport's RX pool is binding {pool_id})",
                                    d.dmabuf_id
                                ),
                            ));
                        }
                        let end = d.frag_offset.checked_add(size as u64);
                        if size == 0 || end.is_none_or(|e| e > fd_len) {
                            return Err(self.kernel_error(
                                l,
                                format!("fragment {d:?} does not lie in the {fd_len}-byte descriptor of the RX pool"),
                            ));
                        }
                        if pos + size > got + n {
                            return Err(
                                self.kernel_error(l, format!("fragments describe more than the {n} bytes received"))
                            );
                        }
                        let c = &self.sh.counters;
                        ctr::add(c, |c| &c.rx_fragments, 1);
                        ctr::add(c, |c| &c.rx_fragment_bytes, size as u64);
                        ctr::add(c, |c| &c.tokens_outstanding, 1);
                        if d.frag_offset < base || d.frag_offset + size as u64 > base + pool_len {
                            // Outside the region the device reads (the descriptor is larger):
                            // copy it out through the host mapping; its token goes back at once.
                            ctr::add(c, |c| &c.rx_outside_fragments, 1);
                            self.copy_outside(i, pos, d.frag_offset as usize, size)?;
                            self.lanes[l].tokens.push(d.frag_token);
                            pos += size;
                            continue;
                        }
                        let r = &mut self.recvs[i];
                        let src_off = d.frag_offset - base;
                        r.frags.push(Fragment { src_off, len: d.frag_size, dst_off: pos as u64 });
                        r.tokens.push(d.frag_token);
                        r.held += size as u64;
                        self.sh.pool.hold(size as u64);
                        pos += size;
                    }
                }
            }
            if pos != got + n {
                return Err(
                    self.kernel_error(l, format!("cmsgs describe {} bytes but recvmsg consumed {n}", pos - got))
                );
            }
        }
        if let RxState::Payload { got: g, .. } = &mut self.recvs[i].state {
            *g += n;
            if *g == len {
                // Acknowledge the message's last bytes at once: the sender's zero-copy
                // completion (and so its send) waits for our ACK, which TCP would delay.
                let _ = self.lanes[l].sock.set_tcp_quickack(true);
            }
        }
        // Tokens of fragments copied out of the descriptor go back at once.
        self.flush_tokens(l)?;
        Ok(true)
    }

    /// Copy a fragment the kernel placed outside the pool region (`at` in the descriptor)
    /// into receive `i`'s spill buffer, through the host mapping of the descriptor.
    fn copy_outside(&mut self, i: usize, dst_off: usize, at: usize, len: usize) -> Result<()> {
        let Some(o) = &self.sh.pool.outside else {
            return Err(Error::Internal("a fragment outside the RX pool without a mapping of it".into()));
        };
        let bytes = o.view.slice(at..at + len).to_vec()?;
        let r = &mut self.recvs[i];
        if r.spill.is_none() {
            r.spill = Some((self.sh.pool.take_spill(r.dst.len())?, Vec::new()));
        }
        let (region, pieces) = r.spill.as_mut().expect("made above");
        region.slice(dst_off..dst_off + len).with_bytes_mut(|b| b.copy_from_slice(&bytes))?;
        match pieces.last_mut() {
            Some(p) if p.dst_off + u64::from(p.len) == dst_off as u64 => p.len += len as u32,
            _ => pieces.push(Fragment { src_off: dst_off as u64, len: len as u32, dst_off: dst_off as u64 }),
        }
        Ok(())
    }

    /// Copy `len` bytes at `at` of the linear buffer into receive `i`'s spill buffer, for
    /// destination offset `dst_off`.
    fn spill(&mut self, i: usize, dst_off: usize, at: usize, len: usize) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let r = &mut self.recvs[i];
        if r.spill.is_none() {
            r.spill = Some((self.sh.pool.take_spill(r.dst.len())?, Vec::new()));
        }
        let (region, pieces) = r.spill.as_mut().expect("made above");
        region.slice(dst_off..dst_off + len).with_bytes_mut(|b| b.copy_from_slice(&self.linear[at..at + len]))?;
        match pieces.last_mut() {
            Some(p) if p.dst_off + u64::from(p.len) == dst_off as u64 => p.len += len as u32,
            _ => pieces.push(Fragment { src_off: dst_off as u64, len: len as u32, dst_off: dst_off as u64 }),
        }
        Ok(())
    }

    /// A receive found no data: if the pool is full (the application holds it), remember
    /// since when; a pool that stays full fails the receive, naming the pool.
    fn check_stall(&mut self, i: usize) -> Result<()> {
        let pool = &self.sh.pool;
        if !pool.looks_full() {
            self.stalled = None;
            return Ok(());
        }
        let now = Instant::now();
        let since = *self.stalled.get_or_insert_with(|| {
            ctr::add(&self.sh.counters, |c| &c.rx_pool_stalls, 1);
            tracing::debug!(peer = %self.peer, held = pool.held(), pool = pool.len(), "devmem RX pool full: the receive waits");
            now
        });
        if now - since < self.sh.stall_limit {
            return Ok(());
        }
        let r = &self.recvs[i];
        let RxState::Payload { got, .. } = r.state else { return Ok(()) };
        let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
        let tokens = self.sh.counters.tokens_outstanding.load(std::sync::atomic::Ordering::Relaxed);
        let hint = if r.dst.len() as u64 > pool.len() as u64 {
            format!("; a {}-byte message cannot fit a pool of {} bytes", r.dst.len(), pool.len())
        } else {
            String::new()
        };
        Err(Error::Timeout {
            what: format!(
                "rank {} receiving message {} ({} bytes, {got} in) from rank {} over devmem: the RX pool ({} bytes = {:.1} \
                 MiB on {}, DEVCCL_DEVMEM_POOL_BYTES) stayed full: {} bytes in {tokens} fragments are held by receives not \
                 consumed yet{hint}; raise DEVCCL_DEVMEM_POOL_BYTES or lower DEVCCL_CHUNK",
                self.me,
                r.expect.msg,
                r.dst.len(),
                self.peer,
                pool.len(),
                mib(pool.len() as u64),
                pool.device.describe(),
                pool.held(),
            ),
            after: now - since,
        })
    }

    /// Return the tokens queued on lane `l` (merged ranges, at most 128 ranges and 1024
    /// fragments per call; every batch is sent even when one frees fewer than asked).
    fn flush_tokens(&mut self, l: usize) -> Result<()> {
        if self.lanes[l].tokens.is_empty() {
            return Ok(());
        }
        let batches = self.lanes[l].tokens.batches();
        let total = self.lanes[l].tokens.frags();
        self.lanes[l].tokens.clear();
        let c = self.sh.counters.clone();
        ctr::sub(&c, |c| &c.tokens_outstanding, total);
        let mut err = None;
        for b in batches {
            let want: u64 = b.iter().map(|t| u64::from(t.token_count)).sum();
            match self.sh.kernel.dontneed(self.lanes[l].sock.as_fd(), &DmabufToken::encode_all(&b)) {
                Ok(freed) => {
                    ctr::add(&c, |c| &c.dontneed_calls, 1);
                    ctr::add(&c, |c| &c.tokens_returned, want);
                    if u64::from(freed) < want {
                        ctr::add(&c, |c| &c.dontneed_short, 1);
                        tracing::debug!(want, freed, lane = l, "SO_DEVMEM_DONTNEED freed fewer fragments than asked");
                    }
                }
                Err(e) => {
                    // The socket closes (and the kernel releases the tokens) with the
                    // connection; the error says why the receive path stopped.
                    ctr::add(&c, |c| &c.tokens_released_on_close, want);
                    err.get_or_insert(e);
                }
            }
        }
        match err {
            None => Ok(()),
            Some(e) => Err(self.io_error(&format!("data lane {l}"), "SO_DEVMEM_DONTNEED on", e)),
        }
    }

    /// Return every token this connection holds (receives in progress and completed ones
    /// not yet consumed), after the caller gave up on them.
    fn return_all_tokens(&mut self) {
        let pool = self.sh.pool.clone();
        for r in self.recvs.drain(..) {
            if let RxState::Payload { lane, .. } = r.state {
                for t in r.tokens.ranges() {
                    self.lanes[lane].tokens.push_range(t.token_start, t.token_count);
                }
            }
            pool.release(r.held);
            if let Some((s, _)) = r.spill {
                pool.give_spill(s);
            }
        }
        for (_, h) in self.held.drain() {
            for t in h.tokens.ranges() {
                self.lanes[h.lane].tokens.push_range(t.token_start, t.token_count);
            }
            pool.release(h.bytes);
            if let Some(s) = h.spill {
                pool.give_spill(s);
            }
        }
        for l in 0..self.lanes.len() {
            if let Err(e) = self.flush_tokens(l) {
                tracing::debug!(peer = %self.peer, lane = l, "returning tokens: {e}");
            }
        }
    }

    // ---------------------------------------------------------------------------------
    // Send.

    /// How to send `src`.
    fn route(&self, src: &RegionSlice) -> Result<Route> {
        let pool_dev = &self.sh.pool.device;
        let kind = src.region.kind();
        let dev = match kind {
            MemKind::Host => self.sh.host.clone(),
            k if k.device() == Some(pool_dev.id()) => pool_dev.clone(),
            k => {
                return Err(Error::Unsupported {
                    reason: format!(
                        "the devmem connection to rank {} sends host or {} memory, not {k:?} (the call should have \
                         been staged)",
                        self.peer,
                        pool_dev.id()
                    ),
                });
            }
        };
        match self.sh.tx.route(&*dev, &src.region) {
            TxRoute::Devmem { binding, offset } => {
                Ok(Route::Devmem { binding, offset: offset + src.range.start as u64 })
            }
            TxRoute::Bytes { why } if kind.is_host() => {
                self.sh.note_fallback(&why);
                Ok(Route::Bytes)
            }
            TxRoute::Bytes { why } => {
                self.sh.note_fallback(&why);
                let staging = self.sh.take_staging(src.len())?;
                let copy = dev.copy(&staging.slice(0..src.len()), src)?;
                ctr::add(&self.sh.counters, |c| &c.tx_staged_bytes, src.len() as u64);
                Ok(Route::Staged { copy, staging })
            }
        }
    }

    /// Write queued payloads of lane `l` until the socket would block.
    fn progress_send_lane(&mut self, l: usize) -> Result<()> {
        loop {
            let lane = &mut self.lanes[l];
            let Some(item) = lane.sendq.front_mut() else { break };
            let total = item.src.len();
            if item.sent < total {
                let r = match &mut item.route {
                    Route::Devmem { binding, offset } => {
                        let at = *offset + item.sent as u64;
                        let r =
                            self.sh.kernel.sendmsg_devmem(lane.sock.as_fd(), binding.id(), &[(at, total - item.sent)]);
                        if let Ok(n) = r
                            && n > 0
                        {
                            let zid = lane.zc.on_send();
                            item.zc = Some((item.zc.map_or(zid, |z| z.0), zid));
                            ctr::add(&self.sh.counters, |c| &c.tx_devmem_sends, 1);
                            ctr::add(&self.sh.counters, |c| &c.tx_devmem_bytes, n as u64);
                        }
                        r
                    }
                    Route::Bytes => {
                        let (sock, sent) = (&lane.sock, item.sent);
                        let r = item.src.with_bytes(|p| sock.send_with_flags(&p[sent..], send_flags()))?;
                        if let Ok(n) = r {
                            self.sh.count_fallback(sent == 0, n);
                        }
                        r
                    }
                    Route::Staged { copy, staging } => {
                        if !copy.test()? {
                            return Ok(());
                        }
                        let (sock, sent) = (&lane.sock, item.sent);
                        let r = staging.with_bytes(sent..total, |p| sock.send_with_flags(p, send_flags()))?;
                        if let Ok(n) = r {
                            self.sh.count_fallback(sent == 0, n);
                        }
                        r
                    }
                };
                match r {
                    Ok(n) => self.lanes[l].sendq.front_mut().expect("front").sent += n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(self.io_error(&format!("data lane {l}"), "sending to", e)),
                }
                continue;
            }
            let item = lane.sendq.pop_front().expect("front");
            if let Route::Staged { staging, .. } = item.route {
                self.sh.give_staging(staging);
            }
            match item.zc {
                Some((first, last)) => lane.zc_wait.push_back(ZcWait { id: item.id, bytes: total, first, last }),
                None => {
                    self.pending_sends -= 1;
                    self.st.done.insert(item.id, Completion::Sent { bytes: total });
                }
            }
        }
        Ok(())
    }

    /// Read lane `l`'s zero-copy completions; sends whose every `sendmsg` completed are done.
    fn reap_completions(&mut self, l: usize) -> Result<()> {
        if self.lanes[l].zc_wait.is_empty() {
            return Ok(());
        }
        loop {
            let r = self.sh.kernel.read_errqueue(self.lanes[l].sock.as_fd(), &mut self.errq);
            let n = match r {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(self.io_error(&format!("data lane {l}"), "reading the error queue of", e)),
            };
            if n == 0 {
                break;
            }
            let entries = parse_errqueue(&self.errq[..n.min(self.errq.len())])
                .map_err(|e| self.kernel_error(l, format!("error-queue data that is not a completion: {}", e.0)))?;
            for e in entries {
                match e {
                    ErrqueueEntry::Zerocopy(c) => {
                        self.lanes[l].zc.complete(c);
                        ctr::add(&self.sh.counters, |c| &c.tx_completions, c.count());
                        if c.copied {
                            ctr::add(&self.sh.counters, |c| &c.tx_completions_copied, c.count());
                        }
                    }
                    ErrqueueEntry::Other(x) => {
                        return Err(Error::system(
                            format!("devmem zero-copy send to rank {} on data lane {l}", self.peer),
                            io::Error::from_raw_os_error(x.ee_errno as i32),
                        ));
                    }
                }
            }
        }
        let lane = &mut self.lanes[l];
        while let Some(w) = lane.zc_wait.front() {
            let mut id = w.first;
            let done = loop {
                if !lane.zc.is_complete(id) {
                    break false;
                }
                if id == w.last {
                    break true;
                }
                id = id.wrapping_add(1);
            };
            if !done {
                break;
            }
            let w = lane.zc_wait.pop_front().expect("front");
            self.pending_sends -= 1;
            self.st.done.insert(w.id, Completion::Sent { bytes: w.bytes });
        }
        Ok(())
    }

    fn progress_tx(&mut self) -> Result<()> {
        self.flush_ctrl()?;
        if !self.ctrl.peer_ready {
            if self.pending_sends == 0 {
                return Ok(());
            }
            self.pump_ctrl()?;
            if !self.ctrl.peer_ready {
                if self.ctrl.eof {
                    return Err(self.ctrl_end_error());
                }
                return Ok(());
            }
        }
        for l in 0..self.lanes.len() {
            if !self.lanes[l].sendq.is_empty() {
                self.progress_send_lane(l)?;
            }
            self.reap_completions(l)?;
        }
        Ok(())
    }

    fn progress(&mut self) -> Result<()> {
        self.progress_tx()?;
        self.progress_rx()
    }

    /// Write `bytes` on the control socket within `deadline` (abort path).
    fn write_ctrl_bounded(&mut self, deadline: Instant) -> bool {
        loop {
            match self.flush_ctrl() {
                Ok(()) if !self.ctrl.pending_out() => return true,
                Ok(()) => {}
                Err(_) => return false,
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            if !wait_ready(&[(self.ctrl.sock.as_fd(), Interest::Write)], deadline - now).unwrap_or(false) {
                return false;
            }
        }
    }
}

impl Connection for DevmemConnection {
    fn peer(&self) -> Rank {
        self.peer
    }

    fn kind(&self) -> TransportKind {
        TransportKind::Devmem
    }

    fn reaches(&self, device: DeviceId) -> bool {
        device.is_host() || device == self.sh.pool.device.id()
    }

    fn isend(&mut self, req: SendRequest) -> Result<Option<ReqId>> {
        check_frame_len("isend", &req.header, &req.src)?;
        self.st.check(self.peer)?;
        if self.pending_sends >= MAX_INFLIGHT {
            return Ok(None);
        }
        let route = if req.src.is_empty() { None } else { Some(self.route(&req.src)?) };
        let l = (self.posted[SEND] % self.lanes.len() as u64) as usize;
        self.posted[SEND] += 1;
        let id = self.st.new_id(SEND as u64);
        self.ctrl.queue(&req.header.encode());
        match route {
            None => self.st.done.insert(id, Completion::Sent { bytes: 0 }),
            Some(route) => {
                self.pending_sends += 1;
                self.lanes[l].sendq.push_back(TxItem { id, src: req.src, sent: 0, route, zc: None });
            }
        }
        // Eager: the header and (on an idle lane, once the peer steered) the payload leave now.
        let r = self.flush_ctrl().and_then(|()| if self.ctrl.peer_ready { self.progress_send_lane(l) } else { Ok(()) });
        if let Err(e) = r {
            self.st.fail(&e);
            return Err(e);
        }
        Ok(Some(id))
    }

    fn irecv(&mut self, req: RecvRequest) -> Result<Option<ReqId>> {
        check_frame_len("irecv", &req.expect, &req.dst)?;
        self.st.check(self.peer)?;
        if self.recvs.len() >= MAX_INFLIGHT {
            return Ok(None);
        }
        let k = req.dst.region.kind();
        if !k.is_host() && k.device() != Some(self.sh.pool.device.id()) {
            return Err(Error::Unsupported {
                reason: format!(
                    "the devmem connection from rank {} receives into host or {} memory, not {k:?} (the call should \
                     have been staged)",
                    self.peer,
                    self.sh.pool.device.id()
                ),
            });
        }
        let index = self.posted[RECV];
        self.posted[RECV] += 1;
        let id = self.st.new_id(RECV as u64);
        // A zero-byte message has nothing on a data lane; its header still arrives in order.
        let frags = Vec::with_capacity(req.dst.len().div_ceil(4096) + usize::from(!req.dst.is_empty()));
        self.recvs.push_back(RxItem {
            id,
            expect: req.expect,
            dst: req.dst,
            index,
            state: RxState::Header,
            frags,
            tokens: TokenBatcher::new(),
            held: 0,
            spill: None,
        });
        Ok(Some(id))
    }

    fn test(&mut self, req: ReqId) -> Result<Option<Completion>> {
        if let Some(c) = self.st.done.remove(&req) {
            return Ok(Some(c));
        }
        self.st.check(self.peer)?;
        let r = self.progress();
        self.st.settle(req, r)
    }

    fn recv_consumed(&mut self, req: ReqId) -> Result<()> {
        let Some(h) = self.held.remove(&req) else { return Ok(()) };
        for t in h.tokens.ranges() {
            self.lanes[h.lane].tokens.push_range(t.token_start, t.token_count);
        }
        self.sh.pool.release(h.bytes);
        if let Some(s) = h.spill {
            self.sh.pool.give_spill(s);
        }
        let r = self.flush_tokens(h.lane);
        if let Err(e) = &r {
            self.st.fail(e);
        }
        r
    }

    fn wait_fds<'a>(&'a self, out: &mut Vec<(BorrowedFd<'a>, Interest)>) {
        let read = !self.recvs.is_empty() || (!self.ctrl.peer_ready && self.pending_sends > 0);
        if let Some(i) = Interest::of(read, self.ctrl.pending_out()) {
            out.push((self.ctrl.sock.as_fd(), i));
        }
        for (l, lane) in self.lanes.iter().enumerate() {
            let read = self.recvs.iter().any(|r| matches!(r.state, RxState::Payload { lane, .. } if lane == l));
            // Completions of the simulated kernel are not visible to poll, and a staged copy
            // runs on a device: ask for writability, which a healthy socket reports at once,
            // so the caller comes back to `test` promptly.
            let write = self.ctrl.peer_ready && (!lane.sendq.is_empty() || !lane.zc_wait.is_empty());
            if let Some(i) = Interest::of(read, write) {
                out.push((lane.sock.as_fd(), i));
            }
        }
    }

    fn peek(&mut self) -> Result<Peeked> {
        self.st.check(self.peer)?;
        if self.recvs.iter().any(|r| matches!(r.state, RxState::Header)) {
            return Err(Error::Internal(format!(
                "peek on the devmem connection from rank {} while a receive waits for the next header",
                self.peer
            )));
        }
        if let Err(e) = self.pump_ctrl() {
            self.st.fail(&e);
            return Err(e);
        }
        if let Some(h) = self.ctrl.headers.front() {
            return Ok(Peeked::Frame(*h));
        }
        if self.ctrl.eof {
            let e = self.ctrl_end_error();
            if self.ctrl.buffered() > 0 {
                self.st.fail(&e);
                return Err(e);
            }
            return Ok(Peeked::Closed(e));
        }
        Ok(Peeked::Nothing)
    }

    fn peek_fds<'a>(&'a self, out: &mut Vec<(BorrowedFd<'a>, Interest)>) {
        out.push((self.ctrl.sock.as_fd(), Interest::Read));
    }

    fn send_abort(&mut self, seq: Seq, reason: &str) {
        let deadline = Instant::now() + ABORT_BUDGET;
        if self.ctrl.tx_in_sync {
            let mut cut = reason.len().min(MAX_ABORT_REASON);
            while !reason.is_char_boundary(cut) {
                cut -= 1;
            }
            let payload = &reason.as_bytes()[..cut];
            let mut frame = FrameHeader::abort(seq, payload.len()).encode().to_vec();
            frame.extend_from_slice(payload);
            self.ctrl.queue(&frame);
            if !self.write_ctrl_bounded(deadline) {
                tracing::debug!(peer = %self.peer, "devmem abort frame not delivered within {ABORT_BUDGET:?}");
            }
        }
        self.st.fail_locally(format!("this rank aborted: {reason}"));
    }

    fn cancel(&mut self) {
        let mut desync = false;
        // A frame half on the control wire is finished (the abort that follows needs a frame
        // boundary); every later one is dropped.
        if let Some(end) = self.ctrl.partial_end() {
            self.ctrl.out.truncate(end);
            self.ctrl.ends.retain(|&e| e <= end);
        } else if self.ctrl.at_boundary() {
            self.ctrl.out.truncate(self.ctrl.pos);
            self.ctrl.ends.retain(|&e| e <= self.ctrl.pos);
        }
        for lane in &mut self.lanes {
            if lane.sendq.front().is_some_and(|t| t.sent > 0 && t.sent < t.src.len()) {
                lane.tx_in_sync = false;
                desync = true;
            }
            for t in lane.sendq.drain(..) {
                if let Route::Staged { staging, .. } = t.route {
                    self.sh.give_staging(staging);
                }
            }
            lane.zc_wait.clear();
        }
        for r in &self.recvs {
            if let RxState::Payload { lane, got } = r.state
                && got > 0
                && got < r.dst.len()
            {
                self.lanes[lane].rx_in_sync = false;
                desync = true;
            }
        }
        // Nothing reads the pool for these receives any more (the executor waits for its
        // device work before it cancels): their tokens go back now.
        self.return_all_tokens();
        self.pending_sends = 0;
        self.st.abandon();
        if desync {
            self.st.fail_locally(format!(
                "devmem connection to rank {} was cancelled in the middle of a payload",
                self.peer
            ));
        }
    }

    fn peer_failure(&mut self) -> Option<Error> {
        if !self.recvs.is_empty() {
            return None;
        }
        const DISCARD_LIMIT: usize = 1 << 16;
        for _ in 0..DISCARD_LIMIT / HEADER_LEN {
            match self.pump_ctrl() {
                Err(e) => return Some(e),
                Ok(()) if self.ctrl.headers.is_empty() => {
                    return self.ctrl.eof.then(|| self.ctrl_end_error());
                }
                // Data headers nobody will receive any more: skip them.
                Ok(()) => self.ctrl.headers.clear(),
            }
        }
        None
    }
}

impl Drop for DevmemConnection {
    fn drop(&mut self) {
        // Tear-down: tokens back (or released by the close below), then the sockets; the
        // pool's binding goes with the transport, after every socket.
        self.return_all_tokens();
        let c = self.sh.counters.clone();
        for lane in &self.lanes {
            let left = lane.tokens.frags();
            if left > 0 {
                ctr::sub(&c, |c| &c.tokens_outstanding, left);
                ctr::add(&c, |c| &c.tokens_released_on_close, left);
            }
            self.sh.kernel.close_socket(lane.sock.as_fd());
        }
    }
}
