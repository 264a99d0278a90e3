//! [`TcpConnection`]: the data path over a peer's lanes.
//!
//! Message `k` of a direction travels on lane `k % lanes`; both sides count the same way, so
//! every lane is an independent FIFO and ordering is restored by posting order alone (no
//! sequence numbers on the wire beyond the frame header's own). A frame is the 56-byte
//! [`FrameHeader`] followed by its payload.
//!
//! Everything is non-blocking and single-threaded: progress happens only inside `isend`,
//! `irecv`, `test` and `send_abort`, so payload memory is touched only there. A send hands
//! header and payload to the kernel with one `sendmsg` per attempt. A receive reads through a
//! small per-lane buffer (one syscall typically brings a small message's header and payload,
//! and often the next message's too); a large payload's remainder is read straight into the
//! destination.

use std::collections::VecDeque;
use std::io::{self, IoSlice, Read};
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd};
use std::time::{Duration, Instant};

use devccl_core::conn_state::{ConnState, RecvTarget, check_frame_len};
use devccl_core::memory::RegionSlice;
use devccl_core::transport::{
    Completion, Connection, Interest, PayloadSink, Peeked, RecvLayout, RecvRequest, ReqId, SendRequest, TransportKind,
    wait_ready,
};
use devccl_core::wire::{FrameHeader, FrameType, HEADER_LEN, MAX_ABORT_REASON};
use devccl_core::{Error, Rank, Result, Seq};
use nix::sys::socket::MsgFlags;
use socket2::Socket;

/// Requests a connection holds per direction before `isend`/`irecv` answer "not now".
pub const MAX_INFLIGHT: usize = 32;

/// Per-lane receive buffer. Large enough that a burst of small messages costs one syscall,
/// and that an abort frame (header + at most 4 KiB of reason) always fits.
const RBUF_LEN: usize = 64 << 10;

/// Payload remainders at least this large are read directly into the destination; smaller
/// ones go through the lane buffer so the same syscall can pick up the following frames.
const DIRECT_READ_MIN: usize = 16 << 10;

/// How long `send_abort` may take in total.
const ABORT_BUDGET: Duration = Duration::from_millis(100);

const SEND: u64 = 0;
const RECV: u64 = 1;

fn send_flags() -> i32 {
    // MSG_NOSIGNAL: writing to a connection the peer closed must be an error, not a SIGPIPE
    // that kills a host process (Python, for one) that did not ignore the signal.
    MsgFlags::MSG_NOSIGNAL.bits()
}

#[derive(Debug)]
struct SendSlot {
    id: ReqId,
    hdr: [u8; HEADER_LEN],
    src: RegionSlice,
    /// Bytes of header + payload handed to the kernel so far.
    sent: usize,
}

impl SendSlot {
    fn total(&self) -> usize {
        HEADER_LEN + self.src.len()
    }
}

#[derive(Debug, Clone, Copy)]
enum RecvPhase {
    /// Waiting for the 56-byte header (nothing of this frame consumed yet).
    Header,
    /// Header checked; `got` payload bytes written to the destination.
    Payload { got: usize },
}

#[derive(Debug)]
struct RecvSlot {
    id: ReqId,
    expect: FrameHeader,
    target: RecvTarget,
    phase: RecvPhase,
}

#[derive(Debug)]
struct Lane {
    sock: Socket,
    sendq: VecDeque<SendSlot>,
    recvq: VecDeque<RecvSlot>,
    rbuf: Box<[u8]>,
    /// Unconsumed received bytes are `rbuf[rstart..rend]`.
    rstart: usize,
    rend: usize,
    /// False once a partially written frame was abandoned: nothing more may be written
    /// (not even an abort frame) because the peer would parse it as payload.
    tx_in_sync: bool,
    /// False once a partially read frame was abandoned: the stream can no longer be parsed.
    rx_in_sync: bool,
    /// The peer closed (or reset) this socket: nothing more arrives beyond the buffer.
    eof: bool,
}

impl Lane {
    fn buffered(&self) -> usize {
        self.rend - self.rstart
    }

    /// True when buffered bytes alone let the front receive advance (used by `wait_fds`,
    /// since `poll` cannot see data already pulled out of the kernel).
    fn recv_ready_without_io(&self) -> bool {
        match self.recvq.front().map(|s| &s.phase) {
            Some(RecvPhase::Header) => self.buffered() >= HEADER_LEN,
            Some(RecvPhase::Payload { .. }) => self.buffered() > 0,
            None => false,
        }
    }
}

/// One peer's TCP connection: `lanes` sockets, each an independent FIFO per direction.
#[derive(Debug)]
pub struct TcpConnection {
    me: Rank,
    peer: Rank,
    remote: SocketAddr,
    lanes: Vec<Lane>,
    /// Messages posted so far per direction; message k uses lane k % lanes.
    posted: [u64; 2],
    /// Requests not yet complete per direction.
    pending: [usize; 2],
    /// Request ids, unreported completions, the sticky failure.
    st: ConnState,
}

impl TcpConnection {
    /// Wrap connected, handshaken sockets (lane order) as a connection. Buffer sizes, when
    /// configured, were set before connecting (they bound the window scale negotiated then).
    pub(crate) fn new(me: Rank, peer: Rank, remote: SocketAddr, socks: Vec<Socket>) -> Result<TcpConnection> {
        let mut lanes = Vec::with_capacity(socks.len());
        for (l, sock) in socks.into_iter().enumerate() {
            let sys = |e| Error::system(format!("configure TCP lane {l} to rank {peer} ({remote})"), e);
            sock.set_nonblocking(true).map_err(sys)?;
            // Small frames (headers, 8-byte all-reduces) must leave at once, not wait
            // for an ACK to coalesce with later data.
            sock.set_tcp_nodelay(true).map_err(sys)?;
            // The handshake used blocking reads with timeouts; clear them.
            sock.set_read_timeout(None).map_err(sys)?;
            sock.set_write_timeout(None).map_err(sys)?;
            lanes.push(Lane {
                sock,
                sendq: VecDeque::with_capacity(MAX_INFLIGHT),
                recvq: VecDeque::with_capacity(MAX_INFLIGHT),
                rbuf: vec![0u8; RBUF_LEN].into_boxed_slice(),
                rstart: 0,
                rend: 0,
                tx_in_sync: true,
                rx_in_sync: true,
                eof: false,
            });
        }
        if lanes.is_empty() {
            return Err(Error::Internal(format!("TCP connection to rank {peer} without sockets")));
        }
        Ok(TcpConnection { me, peer, remote, lanes, posted: [0; 2], pending: [0; 2], st: ConnState::default() })
    }

    /// Number of sockets.
    pub fn lanes(&self) -> usize {
        self.lanes.len()
    }

    /// The peer's socket address.
    pub fn remote_addr(&self) -> SocketAddr {
        self.remote
    }

    /// The error for a socket failure while talking to the peer.
    fn io_error(&self, lane: usize, doing: &str, e: io::Error) -> Error {
        use io::ErrorKind as K;
        match e.kind() {
            k if closed_kind(k) => self.closed_error(lane, &format!("{doing}: {e}")),
            K::TimedOut | K::HostUnreachable | K::NetworkUnreachable => Error::remote(
                self.peer,
                format!("rank {} ({}) is unreachable (lane {lane}, {doing}): {e}", self.peer, self.remote),
            ),
            _ => Error::system(format!("{doing} rank {} ({}), lane {lane}", self.peer, self.remote), e),
        }
    }

    fn closed_error(&self, lane: usize, detail: &str) -> Error {
        Error::remote(
            self.peer,
            format!(
                "rank {} closed the connection (process exited?) [{}, lane {lane}: {detail}]",
                self.peer, self.remote
            ),
        )
    }

    /// Make progress on every lane of direction `dir`.
    fn progress(&mut self, dir: u64) -> Result<()> {
        for l in 0..self.lanes.len() {
            if dir == SEND {
                if !self.lanes[l].sendq.is_empty() {
                    self.progress_send_lane(l, false)?;
                }
            } else if !self.lanes[l].recvq.is_empty() {
                self.progress_recv_lane(l)?;
            }
        }
        Ok(())
    }

    /// Write queued frames of lane `l` until the socket would block (or, with `front_only`,
    /// until the front frame is finished).
    fn progress_send_lane(&mut self, l: usize, front_only: bool) -> Result<()> {
        let flags = send_flags();
        loop {
            let lane = &mut self.lanes[l];
            let Some(slot) = lane.sendq.front_mut() else {
                return Ok(());
            };
            let total = slot.total();
            if slot.sent < total {
                let sock = &lane.sock;
                let sent = slot.sent;
                let hdr = &slot.hdr;
                let r = slot.src.with_bytes(|p| {
                    if sent < HEADER_LEN {
                        sock.send_vectored_with_flags(&[IoSlice::new(&hdr[sent..]), IoSlice::new(p)], flags)
                    } else {
                        sock.send_with_flags(&p[sent - HEADER_LEN..], flags)
                    }
                })?;
                match r {
                    Ok(n) => slot.sent += n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(self.io_error(l, "sending to", e)),
                }
            }
            if slot.sent == total {
                let slot = lane.sendq.pop_front().expect("front");
                self.pending[SEND as usize] -= 1;
                self.st.done.insert(slot.id, Completion::Sent { bytes: slot.src.len() });
                if front_only {
                    return Ok(());
                }
            }
        }
    }

    /// Read into lane `l`'s buffer. `Ok(false)`: the socket would block.
    fn fill(&mut self, l: usize) -> Result<bool> {
        let lane = &mut self.lanes[l];
        if lane.rstart == lane.rend {
            (lane.rstart, lane.rend) = (0, 0);
        } else if lane.rbuf.len() - lane.rend < HEADER_LEN + MAX_ABORT_REASON {
            // Too little room at the tail for a header or an abort frame: move the (small)
            // unconsumed rest to the front. Payload bytes never wait here long, so this
            // copies at most one partial header or abort frame.
            lane.rbuf.copy_within(lane.rstart..lane.rend, 0);
            (lane.rstart, lane.rend) = (0, lane.rend - lane.rstart);
        }
        loop {
            let lane = &mut self.lanes[l];
            let mut sock: &Socket = &lane.sock;
            match sock.read(&mut lane.rbuf[lane.rend..]) {
                Ok(0) => {
                    lane.eof = true;
                    let mid = lane.buffered() > 0
                        || matches!(lane.recvq.front().map(|s| &s.phase), Some(RecvPhase::Payload { .. }));
                    let detail = if mid { "end of stream in the middle of a frame" } else { "end of stream" };
                    return Err(self.closed_error(l, detail));
                }
                Ok(n) => {
                    lane.rend += n;
                    return Ok(true);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    lane.eof |= closed_kind(e.kind());
                    return Err(self.io_error(l, "receiving from", e));
                }
            }
        }
    }

    /// The header of the next frame on lane `l`, left unconsumed, once it is buffered
    /// (reading what the socket has without blocking); `Ok(None)` until then. An abort frame
    /// is consumed and returned as the peer's error, garbage as a remote error.
    fn next_header(&mut self, l: usize) -> Result<Option<FrameHeader>> {
        loop {
            let lane = &self.lanes[l];
            if lane.buffered() < HEADER_LEN {
                if !self.fill(l)? {
                    return Ok(None);
                }
                continue;
            }
            let raw = &lane.rbuf[lane.rstart..lane.rstart + HEADER_LEN];
            let got = match FrameHeader::decode(raw) {
                Ok(h) => h,
                Err(e) => {
                    let why = match e {
                        Error::Remote { message, .. } => message,
                        other => other.to_string(),
                    };
                    return Err(Error::remote(
                        self.peer,
                        format!(
                            "garbage on the data connection from rank {} ({}, lane {l}): {why}",
                            self.peer, self.remote
                        ),
                    ));
                }
            };
            if got.frame == FrameType::Abort {
                let len = got.len as usize;
                if lane.buffered() < HEADER_LEN + len {
                    if !self.fill(l)? {
                        return Ok(None);
                    }
                    continue;
                }
                let lane = &mut self.lanes[l];
                let at = lane.rstart + HEADER_LEN;
                let reason = String::from_utf8_lossy(&lane.rbuf[at..at + len]).into_owned();
                lane.rstart = at + len;
                return Err(Error::remote(self.peer, format!("rank {} aborted: {reason}", self.peer)));
            }
            return Ok(Some(got));
        }
    }

    /// Complete as many receives of lane `l` as the data at hand allows.
    fn progress_recv_lane(&mut self, l: usize) -> Result<()> {
        loop {
            let Some(phase) = self.lanes[l].recvq.front().map(|s| s.phase) else {
                return Ok(());
            };
            match phase {
                RecvPhase::Header => {
                    let Some(got) = self.next_header(l)? else {
                        return Ok(());
                    };
                    let lane = &mut self.lanes[l];
                    let slot = lane.recvq.front_mut().expect("front");
                    slot.expect.check(&got, self.me, self.peer)?;
                    lane.rstart += HEADER_LEN;
                    slot.phase = RecvPhase::Payload { got: 0 };
                }
                RecvPhase::Payload { got } => {
                    let lane = &mut self.lanes[l];
                    let slot = lane.recvq.front_mut().expect("front");
                    let need = slot.target.len() - got;
                    if need == 0 {
                        let slot = lane.recvq.pop_front().expect("front");
                        self.pending[RECV as usize] -= 1;
                        self.st.done.insert(
                            slot.id,
                            Completion::Received { bytes: slot.target.len(), layout: RecvLayout::InPlace },
                        );
                        continue;
                    }
                    let have = lane.rend - lane.rstart;
                    if have > 0 {
                        let n = have.min(need);
                        let src = &lane.rbuf[lane.rstart..lane.rstart + n];
                        match &mut slot.target {
                            RecvTarget::Copy(dst) => {
                                dst.sub(got..got + n).with_bytes_mut(|d| d.copy_from_slice(src))?
                            }
                            RecvTarget::Sink { sink, .. } => sink.consume(got, src)?,
                        }
                        lane.rstart += n;
                        slot.phase = RecvPhase::Payload { got: got + n };
                        continue;
                    }
                    let RecvTarget::Copy(dst) = &slot.target else {
                        // Sinks are fed through the lane buffer.
                        if !self.fill(l)? {
                            return Ok(());
                        }
                        continue;
                    };
                    if need < DIRECT_READ_MIN {
                        if !self.fill(l)? {
                            return Ok(());
                        }
                        continue;
                    }
                    // Large remainder: straight into the destination, never past this frame.
                    let sock = &lane.sock;
                    let r = dst.sub(got..got + need).with_bytes_mut(|d| {
                        let mut s: &Socket = sock;
                        s.read(d)
                    })?;
                    match r {
                        Ok(0) => {
                            return Err(self.closed_error(l, "end of stream in the middle of a frame"));
                        }
                        Ok(n) => slot.phase = RecvPhase::Payload { got: got + n },
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(self.io_error(l, "receiving from", e)),
                    }
                }
            }
        }
    }

    /// Write `bytes` to lane `l` within `deadline` (abort path). `Ok(true)` when all of it
    /// went out; a partial write leaves the lane out of sync.
    fn write_bounded(&mut self, l: usize, parts: [&[u8]; 2], deadline: Instant) -> bool {
        let total = parts[0].len() + parts[1].len();
        let mut sent = 0;
        while sent < total {
            let lane = &self.lanes[l];
            let r = if sent < parts[0].len() {
                lane.sock
                    .send_vectored_with_flags(&[IoSlice::new(&parts[0][sent..]), IoSlice::new(parts[1])], send_flags())
            } else {
                lane.sock.send_with_flags(&parts[1][sent - parts[0].len()..], send_flags())
            };
            match r {
                Ok(n) => sent += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if !wait_writable(&lane.sock, deadline) {
                        break;
                    }
                }
                Err(_) => break,
            }
        }
        if sent > 0 && sent < total {
            self.lanes[l].tx_in_sync = false;
        }
        sent == total
    }
}

/// Socket errors that mean the peer closed (or reset) the connection.
fn closed_kind(k: io::ErrorKind) -> bool {
    use io::ErrorKind as K;
    matches!(k, K::ConnectionReset | K::ConnectionAborted | K::BrokenPipe | K::NotConnected | K::UnexpectedEof)
}

/// Wait until `sock` is writable or `deadline` passes; false on timeout.
fn wait_writable(sock: &Socket, deadline: Instant) -> bool {
    let now = Instant::now();
    if now >= deadline {
        return false;
    }
    wait_ready(&[(sock.as_fd(), Interest::Write)], deadline - now).unwrap_or(false)
}

impl Connection for TcpConnection {
    fn peer(&self) -> Rank {
        self.peer
    }

    fn kind(&self) -> TransportKind {
        TransportKind::Tcp
    }

    fn isend(&mut self, req: SendRequest) -> Result<Option<ReqId>> {
        check_frame_len("isend", &req.header, &req.src)?;
        self.st.check(self.peer)?;
        if self.pending[SEND as usize] >= MAX_INFLIGHT {
            return Ok(None);
        }
        let l = (self.posted[SEND as usize] % self.lanes.len() as u64) as usize;
        self.posted[SEND as usize] += 1;
        let id = self.st.new_id(SEND);
        let idle = self.lanes[l].sendq.is_empty();
        self.lanes[l].sendq.push_back(SendSlot { id, hdr: req.header.encode(), src: req.src, sent: 0 });
        self.pending[SEND as usize] += 1;
        if idle {
            // Eager: an idle lane takes the frame now (one syscall for a small message), so
            // latency does not wait for the caller's first `test`.
            if let Err(e) = self.progress_send_lane(l, false) {
                self.st.fail(&e);
                return Err(e);
            }
        }
        Ok(Some(id))
    }

    fn irecv(&mut self, req: RecvRequest) -> Result<Option<ReqId>> {
        check_frame_len("irecv", &req.expect, &req.dst)?;
        self.st.check(self.peer)?;
        if self.pending[RECV as usize] >= MAX_INFLIGHT {
            return Ok(None);
        }
        let l = (self.posted[RECV as usize] % self.lanes.len() as u64) as usize;
        self.posted[RECV as usize] += 1;
        let id = self.st.new_id(RECV);
        self.lanes[l].recvq.push_back(RecvSlot {
            id,
            expect: req.expect,
            target: RecvTarget::Copy(req.dst),
            phase: RecvPhase::Header,
        });
        self.pending[RECV as usize] += 1;
        Ok(Some(id))
    }

    fn accepts_sinks(&self) -> bool {
        true
    }

    fn irecv_sink(&mut self, expect: FrameHeader, sink: Box<dyn PayloadSink>) -> Result<Option<ReqId>> {
        self.st.check(self.peer)?;
        if self.pending[RECV as usize] >= MAX_INFLIGHT {
            return Ok(None);
        }
        let l = (self.posted[RECV as usize] % self.lanes.len() as u64) as usize;
        self.posted[RECV as usize] += 1;
        let id = self.st.new_id(RECV);
        let target = RecvTarget::Sink { len: expect.len as usize, sink };
        self.lanes[l].recvq.push_back(RecvSlot { id, expect, target, phase: RecvPhase::Header });
        self.pending[RECV as usize] += 1;
        Ok(Some(id))
    }

    fn test(&mut self, req: ReqId) -> Result<Option<Completion>> {
        if let Some(c) = self.st.done.remove(&req) {
            return Ok(Some(c));
        }
        self.st.check(self.peer)?;
        // The request's own direction first; then the other one too, so a caller that
        // waits on its sends alone still drains the peer's sends to it (two ranks both
        // blocked in large sends would otherwise fill each other's buffers and deadlock).
        let dir = req.0 & 1;
        let mut r = self.progress(dir);
        if r.is_ok() && !self.st.done.contains_key(&req) {
            r = self.progress(dir ^ 1);
        }
        self.st.settle(req, r)
    }

    fn wait_fds<'a>(&'a self, out: &mut Vec<(BorrowedFd<'a>, Interest)>) {
        for lane in &self.lanes {
            let read = !lane.recvq.is_empty();
            let write = !lane.sendq.is_empty();
            // Bytes already in the lane buffer are invisible to poll: ask for writability
            // too, which a healthy socket reports at once, so the caller comes back to
            // `test` promptly.
            if let Some(interest) = Interest::of(read, write || lane.recv_ready_without_io()) {
                out.push((lane.sock.as_fd(), interest));
            }
        }
    }

    fn peek(&mut self) -> Result<Peeked> {
        self.st.check(self.peer)?;
        // The next message arrives on the lane the next receive would be posted on.
        let l = (self.posted[RECV as usize] % self.lanes.len() as u64) as usize;
        if !self.lanes[l].recvq.is_empty() {
            return Err(Error::Internal(format!(
                "peek on the connection from rank {} while a receive is posted on lane {l}",
                self.peer
            )));
        }
        match self.next_header(l) {
            Ok(Some(h)) => Ok(Peeked::Frame(h)),
            Ok(None) => Ok(Peeked::Nothing),
            // Closed between frames: the peer exited; a later receive finds the same end.
            Err(e) if self.lanes[l].eof && self.lanes[l].buffered() == 0 => Ok(Peeked::Closed(e)),
            Err(e) => {
                self.st.fail(&e);
                Err(e)
            }
        }
    }

    fn peek_fds<'a>(&'a self, out: &mut Vec<(BorrowedFd<'a>, Interest)>) {
        let l = (self.posted[RECV as usize] % self.lanes.len() as u64) as usize;
        out.push((self.lanes[l].sock.as_fd(), Interest::Read));
    }

    fn send_abort(&mut self, seq: Seq, reason: &str) {
        let deadline = Instant::now() + ABORT_BUDGET;
        let mut cut = reason.len().min(MAX_ABORT_REASON);
        while !reason.is_char_boundary(cut) {
            cut -= 1;
        }
        let payload = &reason.as_bytes()[..cut];
        let hdr = FrameHeader::abort(seq, payload.len()).encode();
        // On every lane, so the peer sees it whichever lane its next receive waits on.
        for l in 0..self.lanes.len() {
            // Finish a frame already partly on the wire first: an abort inside it would be
            // read as payload.
            let partial = self.lanes[l].sendq.front().is_some_and(|s| s.sent > 0 && s.sent < s.total());
            if partial && self.lanes[l].tx_in_sync {
                loop {
                    if self.progress_send_lane(l, true).is_err() {
                        self.lanes[l].tx_in_sync = false;
                        break;
                    }
                    let still = self.lanes[l].sendq.front().is_some_and(|s| s.sent > 0 && s.sent < s.total());
                    if !still {
                        break;
                    }
                    if !wait_writable(&self.lanes[l].sock, deadline) {
                        self.lanes[l].tx_in_sync = false;
                        break;
                    }
                }
            }
            if !self.lanes[l].tx_in_sync {
                continue;
            }
            if !self.write_bounded(l, [&hdr, payload], deadline) {
                tracing::debug!(peer = %self.peer, lane = l, "abort frame not delivered within {ABORT_BUDGET:?}");
            }
        }
        // Frames queued behind the abort must never follow it.
        self.st.fail_locally(format!("this rank aborted: {reason}"));
    }

    fn peer_failure(&mut self) -> Option<Error> {
        // Bounded: a failure report must not turn into a long drain of a busy stream.
        const DISCARD_LIMIT: usize = 16 << 20;
        for l in 0..self.lanes.len() {
            if !self.lanes[l].recvq.is_empty() || !self.lanes[l].rx_in_sync {
                continue; // mid-frame or still in use: we cannot parse from here
            }
            let mut discarded = 0usize;
            while discarded < DISCARD_LIMIT {
                while self.lanes[l].buffered() < HEADER_LEN {
                    match self.fill(l) {
                        Ok(true) => {}
                        Ok(false) => break,
                        Err(e) => return Some(e), // the peer closed or reset
                    }
                }
                let lane = &self.lanes[l];
                if lane.buffered() < HEADER_LEN {
                    break;
                }
                let Ok(h) = FrameHeader::decode(&lane.rbuf[lane.rstart..lane.rstart + HEADER_LEN]) else {
                    break;
                };
                let len = h.len as usize;
                if h.frame == FrameType::Abort {
                    while self.lanes[l].buffered() < HEADER_LEN + len {
                        match self.fill(l) {
                            Ok(true) => {}
                            Ok(false) | Err(_) => break,
                        }
                    }
                    let lane = &self.lanes[l];
                    let at = lane.rstart + HEADER_LEN;
                    let end = (at + len).min(lane.rend);
                    let reason = String::from_utf8_lossy(&lane.rbuf[at..end]).into_owned();
                    return Some(Error::remote(self.peer, format!("rank {} aborted: {reason}", self.peer)));
                }
                // A data frame nobody will read any more: skip it.
                let mut skip = HEADER_LEN + len;
                while skip > 0 {
                    let lane = &mut self.lanes[l];
                    let n = lane.buffered().min(skip);
                    lane.rstart += n;
                    skip -= n;
                    discarded += n;
                    if skip > 0 {
                        match self.fill(l) {
                            Ok(true) => {}
                            Ok(false) => {
                                self.lanes[l].rx_in_sync = false;
                                break;
                            }
                            Err(e) => return Some(e),
                        }
                    }
                }
                if !self.lanes[l].rx_in_sync {
                    break;
                }
            }
        }
        None
    }

    fn cancel(&mut self) {
        let mut desync = false;
        for lane in &mut self.lanes {
            if lane.sendq.front().is_some_and(|s| s.sent > 0 && s.sent < s.total()) {
                // The peer would read whatever we write next as this frame's payload.
                lane.tx_in_sync = false;
                desync = true;
            }
            if matches!(lane.recvq.front().map(|s| &s.phase), Some(RecvPhase::Payload { .. })) {
                desync = true;
                lane.rx_in_sync = false;
            }
            lane.sendq.clear();
            lane.recvq.clear();
        }
        self.pending = [0; 2];
        // The caller is abandoning everything; the sticky failure stays.
        self.st.abandon();
        if desync {
            self.st.fail_locally(format!("connection to rank {} was cancelled in the middle of a frame", self.peer));
        }
    }
}
