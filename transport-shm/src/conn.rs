//! [`ShmConnection`]: the data path over one peer's pair of shared rings.
//!
//! Each direction is a byte stream through one single-producer/single-consumer ring: a
//! message is its 56-byte [`FrameHeader`] followed by its payload, written wherever the
//! stream is (wrapping at the ring's end). The producer copies as much as fits and
//! publishes it with a store of `tail`; the consumer copies published bytes into the
//! destination and frees them with a store of `head`. Neither needs the whole message in the
//! ring at once, so messages larger than the ring stream through it, and a large message is
//! published in pieces so the receiver's copy overlaps the sender's.
//!
//! Everything is non-blocking and single-threaded: progress happens only inside `isend`,
//! `irecv`, `test` and `send_abort`, so request memory is touched only there.
//!
//! **Waking.** A busy stream costs no syscalls: each side only rings the other's doorbell (an
//! eventfd) when the other announced that it is about to sleep. The announcement is a
//! "wake me when your counter reaches X" value in shared memory, stored by
//! [`wait_fds`](Connection::wait_fds) right before the caller polls: store it, re-check the
//! counter, and if it is already there make the caller's `poll` return at once (by ringing
//! one's own doorbell); the other side publishes its counter, then reads the value. All
//! four accesses are sequentially consistent, so at least one side sees the other's store:
//! a wake-up is never lost. X is chosen so that the sleeper has real work when woken (a
//! whole header, the rest of a message or half a ring of data; room for the rest of a
//! frame or half a ring), not one wake-up per published piece. The ringer clears the
//! value as it rings, so a sleeper is rung at most once per sleep; in its next `test` the
//! sleeper clears what is left and drains its doorbell only if a value was cleared for it
//! (one still set means no ring came, and the read, a syscall, is skipped).
//!
//! **Liveness.** The Unix socket of the handshake stays open for the connection's life. Its
//! end of stream means the peer process is gone (even after `SIGKILL`: the kernel closes
//! the socket), so `poll` on it wakes a waiting rank at once, and [`test`](Connection::test)
//! reports the peer as failed. It also carries a copy of every abort frame, so an abort
//! reaches the peer whatever state the ring is in.

use std::cell::Cell;
use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering::{Acquire, SeqCst};
use std::time::{Duration, Instant};

use devccl_core::conn_state::{ConnState, RecvTarget, check_frame_len};
use devccl_core::memory::RegionSlice;
use devccl_core::transport::{
    Completion, Connection, Interest, PayloadSink, Peeked, RecvLayout, RecvRequest, ReqId, SendRequest, TransportKind,
};
use devccl_core::wire::{FrameHeader, FrameType, HEADER_LEN, MAX_ABORT_REASON};
use devccl_core::{Error, Rank, Result, Seq};
use nix::sys::socket::{MsgFlags, recv};

use crate::shm::{Mapping, RingId};

/// Requests a connection holds per direction before `isend`/`irecv` answer "not now".
pub const MAX_INFLIGHT: usize = 64;

/// Most bytes copied between two publications of a counter. Small enough that the other
/// side starts copying a large message's first piece while this side copies the next, and
/// frees ring space early; large enough that the counter stores (one locked instruction and
/// a cache-line transfer each) vanish next to the copy.
const PIECE: usize = 64 << 10;

/// Tests without progress between two looks at the socket when the caller never sleeps
/// (a caller that sleeps in `poll` learns about the socket from `poll`).
const SOCKET_CHECK_EVERY: u32 = 1024;

/// How long `send_abort` may block on the socket.
const ABORT_BUDGET: Duration = Duration::from_millis(100);

const SEND: u64 = 0;
const RECV: u64 = 1;

/// `wait_fds` set the consumer's wake-up point on the incoming ring.
const ARMED_RX: u8 = 1;
/// `wait_fds` set the producer's wake-up point on the outgoing ring.
const ARMED_TX: u8 = 2;
/// `wait_fds` rang this side's own doorbell (something had already moved).
const ARMED_SELF_RUNG: u8 = 4;

#[derive(Debug)]
struct SendSlot {
    id: ReqId,
    hdr: [u8; HEADER_LEN],
    src: RegionSlice,
    /// Bytes of header + payload written into the ring so far.
    sent: usize,
}

#[derive(Debug, Clone, Copy)]
enum RecvPhase {
    /// Waiting for the 56-byte header.
    Header,
    /// Header checked; `got` payload bytes copied to the destination.
    Payload { got: usize },
}

#[derive(Debug)]
struct RecvSlot {
    id: ReqId,
    expect: FrameHeader,
    target: RecvTarget,
    phase: RecvPhase,
}

/// The pieces of an established connection, as the handshake produces them.
#[derive(Debug)]
pub(crate) struct Parts {
    pub me: Rank,
    pub peer: Rank,
    /// The peer's published address, or "accepted" (for messages).
    pub remote: String,
    /// The peer's process id, where the socket reveals it (for messages).
    pub peer_pid: Option<i32>,
    pub map: Mapping,
    /// True on the side that created the mapping (the connector).
    pub connector: bool,
    /// This side's doorbell (polled here, rung by the peer).
    pub bell: OwnedFd,
    /// The peer's doorbell.
    pub peer_bell: OwnedFd,
    pub sock: UnixStream,
}

/// One peer's shared-memory connection: a ring per direction, a doorbell per side, and the
/// Unix socket that tells whether the peer is alive.
#[derive(Debug)]
pub struct ShmConnection {
    me: Rank,
    peer: Rank,
    remote: String,
    peer_pid: Option<i32>,
    map: Mapping,
    ring: u64,
    tx_ring: RingId,
    rx_ring: RingId,
    /// Producer side: bytes written into the outgoing ring (ours; the shared copy is only
    /// ever stored to), the last value published, and the consumer's head as last read.
    tail: u64,
    tail_published: u64,
    peer_head: u64,
    /// Consumer side: bytes consumed from the incoming ring, last published, and the
    /// producer's tail as last read.
    head: u64,
    head_published: u64,
    peer_tail: u64,
    bell: OwnedFd,
    peer_bell: OwnedFd,
    sock: UnixStream,
    sendq: VecDeque<SendSlot>,
    recvq: VecDeque<RecvSlot>,
    /// Request ids, unreported completions, the sticky failure.
    st: ConnState,
    /// What `wait_fds` did before the caller slept (`ARMED_*` bits): the next `test` clears
    /// the wake-up points and drains the doorbell if it was rung. A `Cell` because
    /// `wait_fds` takes `&self`.
    armed: Cell<u8>,
    /// Bytes moved (either way) since the last `wait_fds`. Callers decide to sleep on
    /// completions, but a message larger than the ring takes many calls to complete: while
    /// bytes flow, `wait_fds` makes the caller's `poll` return at once instead of letting it
    /// sleep through the transfer (and stall the peer, which needs this side to drain and
    /// refill the rings).
    flowed: Cell<bool>,
    /// Consecutive `test`s that moved nothing (see `SOCKET_CHECK_EVERY`).
    idle: u32,
    /// Bytes read from the socket so far (an abort frame in transit).
    ctl: Vec<u8>,
    /// False once a partially written frame was abandoned: nothing more may be written into
    /// the outgoing ring, because the peer would read it as that frame's payload.
    tx_in_sync: bool,
}

/// Ring a doorbell. Errors are ignored: a full counter (2^64 - 2 rings) cannot happen, and
/// a dead peer is reported through the socket.
fn ring_bell(fd: &OwnedFd) {
    let _ = nix::unistd::write(fd, &1u64.to_ne_bytes());
}

impl ShmConnection {
    pub(crate) fn new(p: Parts) -> ShmConnection {
        let (tx_ring, rx_ring) = if p.connector {
            (RingId::ToAcceptor, RingId::ToConnector)
        } else {
            (RingId::ToConnector, RingId::ToAcceptor)
        };
        ShmConnection {
            me: p.me,
            peer: p.peer,
            remote: p.remote,
            peer_pid: p.peer_pid,
            ring: p.map.ring_bytes() as u64,
            map: p.map,
            tx_ring,
            rx_ring,
            tail: 0,
            tail_published: 0,
            peer_head: 0,
            head: 0,
            head_published: 0,
            peer_tail: 0,
            bell: p.bell,
            peer_bell: p.peer_bell,
            sock: p.sock,
            sendq: VecDeque::with_capacity(MAX_INFLIGHT),
            recvq: VecDeque::with_capacity(MAX_INFLIGHT),
            st: ConnState::default(),
            armed: Cell::new(0),
            flowed: Cell::new(false),
            idle: 0,
            ctl: Vec::new(),
            tx_in_sync: true,
        }
    }

    /// Size of each ring in bytes.
    pub fn ring_bytes(&self) -> usize {
        self.ring as usize
    }

    /// The peer's process id, when the socket's credentials revealed it.
    pub fn peer_pid(&self) -> Option<i32> {
        self.peer_pid
    }

    fn who(&self) -> String {
        match self.peer_pid {
            Some(pid) => format!("{}, pid {pid}", self.remote),
            None => self.remote.clone(),
        }
    }

    fn closed_error(&self, detail: &str) -> Error {
        Error::remote(
            self.peer,
            format!("rank {} closed its connection (process exited?) [shm {}: {detail}]", self.peer, self.who()),
        )
    }

    fn corrupt(&self, what: String) -> Error {
        Error::remote(
            self.peer,
            format!("shared ring with rank {} is corrupt ({what}) [shm {}]", self.peer, self.who()),
        )
    }

    fn aborted(&self, reason: &[u8]) -> Error {
        Error::remote(self.peer, format!("rank {} aborted: {}", self.peer, String::from_utf8_lossy(reason)))
    }

    /// Re-read the consumer's head of the outgoing ring. Returns the free space.
    fn refresh_peer_head(&mut self) -> Result<u64> {
        let h = self.map.head(self.tx_ring).load(Acquire);
        // The head only moves forward and never passes what we wrote.
        if h < self.peer_head || h > self.tail {
            return Err(self.corrupt(format!(
                "consumer head moved from {} to {h}, producer tail is {}",
                self.peer_head, self.tail
            )));
        }
        self.peer_head = h;
        Ok(self.ring - (self.tail - h))
    }

    /// Re-read the producer's tail of the incoming ring. Returns the bytes available.
    fn refresh_peer_tail(&mut self) -> Result<u64> {
        let t = self.map.tail(self.rx_ring).load(Acquire);
        if t < self.peer_tail || t - self.head > self.ring {
            return Err(self.corrupt(format!(
                "producer tail moved from {} to {t}, consumer head is {}",
                self.peer_tail, self.head
            )));
        }
        self.peer_tail = t;
        Ok(t - self.head)
    }

    /// Publish the outgoing ring's tail; wake the consumer if it sleeps.
    fn publish_tail(&mut self) {
        if self.tail == self.tail_published {
            return;
        }
        self.map.tail(self.tx_ring).store(self.tail, SeqCst);
        self.tail_published = self.tail;
        let wake_at = self.map.consumer_wake_at(self.tx_ring);
        // Load first: the value sits on the line just written, and a swap on every
        // publication would be a locked write each time. Clearing it here means one ring
        // per sleep, however many pieces follow.
        let w = wake_at.load(SeqCst);
        if w != 0 && self.tail >= w && wake_at.swap(0, SeqCst) != 0 {
            ring_bell(&self.peer_bell);
        }
    }

    /// Publish the incoming ring's head; wake the producer if it waits for space.
    fn publish_head(&mut self) {
        if self.head == self.head_published {
            return;
        }
        self.map.head(self.rx_ring).store(self.head, SeqCst);
        self.head_published = self.head;
        let wake_at = self.map.producer_wake_at(self.rx_ring);
        let w = wake_at.load(SeqCst);
        if w != 0 && self.head >= w && wake_at.swap(0, SeqCst) != 0 {
            ring_bell(&self.peer_bell);
        }
    }

    /// Write queued frames into the outgoing ring until it is full or the queue empty.
    /// Returns whether anything moved.
    fn progress_send(&mut self) -> Result<bool> {
        let mut moved = false;
        let r = self.progress_send_inner(&mut moved);
        // Publish whatever was written, also on error (those bytes are whole frames or the
        // peer will see the socket close anyway).
        self.publish_tail();
        if moved {
            self.flowed.set(true);
        }
        r.map(|()| moved)
    }

    fn progress_send_inner(&mut self, moved: &mut bool) -> Result<()> {
        let ring = self.ring;
        while !self.sendq.is_empty() {
            let total = HEADER_LEN + self.sendq[0].src.len();
            while self.sendq[0].sent < total {
                let mut free = ring - (self.tail - self.peer_head);
                if free == 0 {
                    free = self.refresh_peer_head()?;
                    if free == 0 {
                        return Ok(());
                    }
                }
                let slot = &mut self.sendq[0];
                let n = (free as usize).min(total - slot.sent).min(PIECE);
                let mut pos = self.tail;
                let mut left = n;
                if slot.sent < HEADER_LEN {
                    let h = (HEADER_LEN - slot.sent).min(left);
                    self.map.write(self.tx_ring, pos, &slot.hdr[slot.sent..slot.sent + h]);
                    pos += h as u64;
                    left -= h;
                }
                if left > 0 {
                    let off = slot.sent + (n - left) - HEADER_LEN;
                    let (map, ring_id) = (&self.map, self.tx_ring);
                    slot.src.with_bytes(|p| map.write(ring_id, pos, &p[off..off + left]))?;
                }
                slot.sent += n;
                self.tail += n as u64;
                *moved = true;
                if self.tail - self.tail_published >= PIECE as u64 {
                    self.publish_tail();
                }
            }
            let slot = self.sendq.pop_front().expect("front");
            self.st.done.insert(slot.id, Completion::Sent { bytes: slot.src.len() });
        }
        Ok(())
    }

    /// Copy published bytes into posted receives. Returns whether anything moved.
    fn progress_recv(&mut self) -> Result<bool> {
        let mut moved = false;
        let r = self.progress_recv_inner(&mut moved);
        self.publish_head();
        if moved {
            self.flowed.set(true);
        }
        r.map(|()| moved)
    }

    fn progress_recv_inner(&mut self, moved: &mut bool) -> Result<()> {
        while let Some(slot) = self.recvq.front() {
            match slot.phase {
                RecvPhase::Header => {
                    let expect = slot.expect;
                    let Some(got) = self.next_header()? else {
                        return Ok(());
                    };
                    expect.check(&got, self.me, self.peer)?;
                    self.head += HEADER_LEN as u64;
                    self.recvq[0].phase = RecvPhase::Payload { got: 0 };
                    *moved = true;
                }
                RecvPhase::Payload { got } => {
                    let need = slot.target.len() - got;
                    if need == 0 {
                        let slot = self.recvq.pop_front().expect("front");
                        self.st.done.insert(
                            slot.id,
                            Completion::Received { bytes: slot.target.len(), layout: RecvLayout::InPlace },
                        );
                        continue;
                    }
                    let mut avail = self.peer_tail - self.head;
                    if avail == 0 {
                        avail = self.refresh_peer_tail()?;
                        if avail == 0 {
                            return Ok(());
                        }
                    }
                    let n = (avail as usize).min(need).min(PIECE);
                    let (map, ring_id, head) = (&self.map, self.rx_ring, self.head);
                    match &mut self.recvq[0].target {
                        RecvTarget::Copy(dst) => {
                            dst.sub(got..got + n).with_bytes_mut(|d| map.read(ring_id, head, d))?
                        }
                        RecvTarget::Sink { sink, .. } => map.with_published(ring_id, head, n, |a, b| {
                            sink.consume(got, a)?;
                            if b.is_empty() { Ok(()) } else { sink.consume(got + a.len(), b) }
                        })?,
                    }
                    self.head += n as u64;
                    self.recvq[0].phase = RecvPhase::Payload { got: got + n };
                    *moved = true;
                    if self.head - self.head_published >= PIECE as u64 {
                        self.publish_head();
                    }
                }
            }
        }
        Ok(())
    }

    /// The header of the next frame in the incoming ring, left unconsumed, once it was
    /// published whole; `Ok(None)` until then. An abort frame is consumed and returned as
    /// the peer's error, garbage as a remote error.
    fn next_header(&mut self) -> Result<Option<FrameHeader>> {
        let mut avail = self.peer_tail - self.head;
        if avail < HEADER_LEN as u64 {
            avail = self.refresh_peer_tail()?;
            if avail < HEADER_LEN as u64 {
                return Ok(None);
            }
        }
        // Decoded from a private copy: the checks and the use of the header afterwards see
        // the same bytes, whatever the ring holds later.
        let mut raw = [0u8; HEADER_LEN];
        self.map.read(self.rx_ring, self.head, &mut raw);
        let got = FrameHeader::decode(&raw).map_err(|e| {
            let why = match e {
                Error::Remote { message, .. } => message,
                other => other.to_string(),
            };
            Error::remote(
                self.peer,
                format!("garbage in the shared ring from rank {} [shm {}]: {why}", self.peer, self.who()),
            )
        })?;
        if got.frame == FrameType::Abort {
            let total = (HEADER_LEN + got.len as usize) as u64;
            if total > self.ring {
                return Err(self.corrupt(format!("abort frame of {total} bytes in a ring of {}", self.ring)));
            }
            if avail < total {
                avail = self.refresh_peer_tail()?;
                if avail < total {
                    return Ok(None);
                }
            }
            let mut reason = vec![0u8; got.len as usize];
            self.map.read(self.rx_ring, self.head + HEADER_LEN as u64, &mut reason);
            self.head += total;
            return Err(self.aborted(&reason));
        }
        Ok(Some(got))
    }

    /// The producer tail at which a receiver about to sleep wants its doorbell rung: a
    /// whole header when waiting for one (a shorter wait could not make progress, a longer
    /// one could miss a frame shorter than expected, which must fail promptly as a
    /// mismatch), else the rest of the payload or half a ring, whichever is less, so a
    /// sleeper is not woken for every piece of a large message. Always beyond what was
    /// already seen.
    fn rx_wake_at(&self) -> u64 {
        let want = match self.recvq.front().map(|s| (s.phase, s.target.len())) {
            Some((RecvPhase::Payload { got }, len)) => ((len - got) as u64).min(self.ring / 2),
            _ => HEADER_LEN as u64,
        };
        (self.head + want.max(1)).max(self.peer_tail + 1)
    }

    /// The consumer head at which a sender blocked on a full ring wants its doorbell rung:
    /// when the rest of its current frame fits, or half the ring is free, whichever comes
    /// first (a consumer with a receive posted drains everything published, so the ring
    /// always empties far enough).
    fn tx_wake_at(&self) -> u64 {
        let left = self.sendq.front().map_or(1, |s| (HEADER_LEN + s.src.len() - s.sent) as u64);
        let need = left.min(self.ring / 2).max(1);
        // Blocked means full: free space after the head reaches h is h - (tail - ring).
        (self.tail + need).saturating_sub(self.ring).max(self.peer_head + 1)
    }

    /// Clear the wake-up points `wait_fds` set (`armed`) and drain this side's doorbell if
    /// it was rung. Returns whether it was. The peer clears a point when it rings, so one
    /// found still set means no ring came through it, and the read (a syscall) is skipped
    /// when the caller was woken by something else, such as another connection.
    fn disarm(&mut self, armed: u8) -> bool {
        let mut rung = armed & ARMED_SELF_RUNG != 0;
        if armed & ARMED_RX != 0 {
            rung |= self.map.consumer_wake_at(self.rx_ring).swap(0, SeqCst) == 0;
        }
        if armed & ARMED_TX != 0 {
            rung |= self.map.producer_wake_at(self.tx_ring).swap(0, SeqCst) == 0;
        }
        if rung {
            // A ring that lands after this read leaves the doorbell readable: the next sleep
            // then returns at once, one spurious wake-up, never a lost one.
            let mut b = [0u8; 8];
            let _ = nix::unistd::read(&self.bell, &mut b);
        }
        rung
    }

    /// Name the doorbell and the socket to sleep on, and announce the sleep: for the next
    /// frame's header or the rest of the current payload (`rx`), for room in the outgoing
    /// ring (`tx`).
    fn arm<'a>(&'a self, out: &mut Vec<(BorrowedFd<'a>, Interest)>, rx: bool, tx: bool) {
        out.push((self.bell.as_fd(), Interest::Read));
        // Readable on an abort frame and on end of stream (the peer died).
        out.push((self.sock.as_fd(), Interest::Read));
        // Announce the sleep, then look again: whatever the peer publishes after our look
        // sees the announcement and rings (see the module docs).
        let mut armed = self.armed.get();
        let mut ready = self.flowed.replace(false);
        if rx {
            let at = self.rx_wake_at();
            self.map.consumer_wake_at(self.rx_ring).store(at, SeqCst);
            ready |= self.map.tail(self.rx_ring).load(SeqCst) >= at;
            armed |= ARMED_RX;
        }
        if tx {
            // Not actually blocked (space left since the last look): no reason to sleep.
            ready |= self.tail - self.peer_head < self.ring;
            let at = self.tx_wake_at();
            self.map.producer_wake_at(self.tx_ring).store(at, SeqCst);
            ready |= self.map.head(self.tx_ring).load(SeqCst) >= at;
            armed |= ARMED_TX;
        }
        if ready {
            // Something moved between the caller's last `test` and now: make its `poll`
            // return at once.
            ring_bell(&self.bell);
            armed |= ARMED_SELF_RUNG;
        }
        self.armed.set(armed);
    }

    /// Look at the socket without blocking: end of stream is the peer's death, bytes are an
    /// abort frame that did not fit the ring.
    fn check_socket(&mut self) -> Result<()> {
        match self.socket_closed()? {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Like [`ShmConnection::check_socket`], but a clean end of stream (the peer exited
    /// without leaving an abort frame) comes back as `Ok(Some(closed error))`.
    fn socket_closed(&mut self) -> Result<Option<Error>> {
        let mut buf = [0u8; 1024];
        loop {
            match recv(self.sock.as_raw_fd(), &mut buf, MsgFlags::MSG_DONTWAIT) {
                Ok(0) => {
                    // An abort sent just before exiting explains the exit better.
                    self.parse_ctl()?;
                    if !self.ctl.is_empty() {
                        return Err(self.closed_error("end of stream inside an abort frame"));
                    }
                    return Ok(Some(self.closed_error("end of stream")));
                }
                Ok(n) => {
                    self.ctl.extend_from_slice(&buf[..n]);
                    self.parse_ctl()?;
                }
                Err(nix::errno::Errno::EAGAIN) => return Ok(None),
                Err(nix::errno::Errno::EINTR) => {}
                Err(e @ (nix::errno::Errno::ECONNRESET | nix::errno::Errno::EPIPE)) => {
                    return Ok(Some(self.closed_error(&e.to_string())));
                }
                Err(e) => {
                    return Err(Error::system(
                        format!("reading the shm control socket of rank {}", self.peer),
                        io::Error::from(e),
                    ));
                }
            }
        }
    }

    /// Interpret the bytes received on the socket: only whole abort frames may come.
    fn parse_ctl(&mut self) -> Result<()> {
        if self.ctl.len() < HEADER_LEN {
            return Ok(());
        }
        let h = FrameHeader::decode(&self.ctl[..HEADER_LEN]).map_err(|e| {
            Error::remote(self.peer, format!("garbage on the shm control socket from rank {}: {e}", self.peer))
        })?;
        if h.frame != FrameType::Abort {
            return Err(Error::remote(
                self.peer,
                format!(
                    "rank {} sent a {:?} frame on the shm control socket (only aborts go there)",
                    self.peer, h.frame
                ),
            ));
        }
        let end = HEADER_LEN + h.len as usize;
        if self.ctl.len() >= end {
            return Err(self.aborted(&self.ctl[HEADER_LEN..end]));
        }
        Ok(())
    }

    /// Both directions, `first` first. Returns whether anything moved.
    fn progress(&mut self, first: u64) -> Result<bool> {
        // Both directions always: a caller waiting on its sends alone must still drain the
        // peer's sends to it, or two ranks both sending more than a ring would deadlock.
        let (a, b) = if first == SEND {
            (self.progress_send()?, self.progress_recv()?)
        } else {
            (self.progress_recv()?, self.progress_send()?)
        };
        Ok(a || b)
    }

    /// Write an abort frame into the outgoing ring if the stream is at a frame boundary and
    /// the whole frame fits now. Returns whether it was written.
    fn abort_via_ring(&mut self, frame: &[&[u8]; 2]) -> bool {
        let total = (frame[0].len() + frame[1].len()) as u64;
        let at_boundary = self.sendq.front().is_none_or(|s| s.sent == 0);
        if !self.tx_in_sync || !at_boundary || total > self.ring {
            return false;
        }
        let free = match self.refresh_peer_head() {
            Ok(f) => f,
            Err(_) => return false,
        };
        if free < total {
            return false;
        }
        self.map.write(self.tx_ring, self.tail, frame[0]);
        self.map.write(self.tx_ring, self.tail + frame[0].len() as u64, frame[1]);
        self.tail += total;
        self.publish_tail();
        true
    }

    /// Write an abort frame on the socket, bounded by `ABORT_BUDGET`.
    fn abort_via_socket(&mut self, frame: &[&[u8]; 2]) -> bool {
        let deadline = Instant::now() + ABORT_BUDGET;
        let mut bytes = Vec::with_capacity(frame[0].len() + frame[1].len());
        bytes.extend_from_slice(frame[0]);
        bytes.extend_from_slice(frame[1]);
        // The socket is in blocking mode (timeouts bound each write); nothing else writes
        // to it after the handshake.
        crate::handshake::write_all_by(&self.sock, &bytes, deadline).is_ok()
    }
}

impl Connection for ShmConnection {
    fn peer(&self) -> Rank {
        self.peer
    }

    fn kind(&self) -> TransportKind {
        TransportKind::Shm
    }

    fn isend(&mut self, req: SendRequest) -> Result<Option<ReqId>> {
        check_frame_len("isend", &req.header, &req.src)?;
        self.st.check(self.peer)?;
        if self.sendq.len() >= MAX_INFLIGHT {
            return Ok(None);
        }
        let id = self.st.new_id(SEND);
        self.sendq.push_back(SendSlot { id, hdr: req.header.encode(), src: req.src, sent: 0 });
        if self.sendq.len() == 1 {
            // Eager: an idle stream takes the frame now, so a small message is visible to
            // the peer before this call returns.
            if let Err(e) = self.progress_send() {
                self.st.fail(&e);
                return Err(e);
            }
        }
        Ok(Some(id))
    }

    fn irecv(&mut self, req: RecvRequest) -> Result<Option<ReqId>> {
        check_frame_len("irecv", &req.expect, &req.dst)?;
        self.st.check(self.peer)?;
        if self.recvq.len() >= MAX_INFLIGHT {
            return Ok(None);
        }
        let id = self.st.new_id(RECV);
        self.recvq.push_back(RecvSlot {
            id,
            expect: req.expect,
            target: RecvTarget::Copy(req.dst),
            phase: RecvPhase::Header,
        });
        Ok(Some(id))
    }

    fn accepts_sinks(&self) -> bool {
        true
    }

    fn irecv_sink(&mut self, expect: FrameHeader, sink: Box<dyn PayloadSink>) -> Result<Option<ReqId>> {
        self.st.check(self.peer)?;
        if self.recvq.len() >= MAX_INFLIGHT {
            return Ok(None);
        }
        let id = self.st.new_id(RECV);
        let target = RecvTarget::Sink { len: expect.len as usize, sink };
        self.recvq.push_back(RecvSlot { id, expect, target, phase: RecvPhase::Header });
        Ok(Some(id))
    }

    fn test(&mut self, req: ReqId) -> Result<Option<Completion>> {
        if let Some(c) = self.st.done.remove(&req) {
            return Ok(Some(c));
        }
        self.st.check(self.peer)?;
        let armed = self.armed.replace(0);
        // Woken from a sleep, but not by the peer's doorbell: perhaps by the socket.
        let other_wake = armed != 0 && !self.disarm(armed);
        let mut r = self.progress(req.0 & 1);
        if let Ok(moved) = r {
            if moved {
                self.idle = 0;
            } else if !self.st.done.contains_key(&req) {
                self.idle = self.idle.wrapping_add(1);
                if other_wake || self.idle.is_multiple_of(SOCKET_CHECK_EVERY) {
                    r = self.check_socket().map(|()| false);
                }
            }
        }
        self.st.settle(req, r.map(drop))
    }

    fn wait_fds<'a>(&'a self, out: &mut Vec<(BorrowedFd<'a>, Interest)>) {
        let rx = !self.recvq.is_empty();
        let tx = !self.sendq.is_empty() && self.tx_in_sync;
        if rx || tx {
            self.arm(out, rx, tx);
        }
    }

    fn peek(&mut self) -> Result<Peeked> {
        self.st.check(self.peer)?;
        if !self.recvq.is_empty() {
            return Err(Error::Internal(format!(
                "peek on the shm connection from rank {} with receives posted",
                self.peer
            )));
        }
        let armed = self.armed.replace(0);
        if armed != 0 {
            self.disarm(armed);
        }
        let r = match self.next_header() {
            Ok(Some(h)) => Ok(Peeked::Frame(h)),
            Ok(None) => match self.socket_closed() {
                Ok(None) => Ok(Peeked::Nothing),
                // The peer exited: what it published before is in the ring by now.
                Ok(Some(closed)) => match self.next_header() {
                    Ok(Some(h)) => Ok(Peeked::Frame(h)),
                    Ok(None) => Ok(Peeked::Closed(closed)),
                    Err(e) => Err(e),
                },
                Err(e) => Err(e),
            },
            Err(e) => Err(e),
        };
        if let Err(e) = &r {
            self.st.fail(e);
        }
        r
    }

    fn peek_fds<'a>(&'a self, out: &mut Vec<(BorrowedFd<'a>, Interest)>) {
        self.arm(out, true, false);
    }

    fn send_abort(&mut self, seq: Seq, reason: &str) {
        let mut cut = reason.len().min(MAX_ABORT_REASON);
        while !reason.is_char_boundary(cut) {
            cut -= 1;
        }
        let payload = &reason.as_bytes()[..cut];
        let hdr = FrameHeader::abort(seq, payload.len()).encode();
        let frame = [&hdr[..], payload];
        // Through the ring when the stream is at a frame boundary and the frame fits (a
        // busy peer sees it without a syscall, right after the data that preceded it), and
        // always on the socket too: the ring may be full, in the middle of a frame (where an
        // abort would be read as payload), or hold data the peer has no receive posted for,
        // while the socket wakes a sleeping peer whatever it waits for.
        let in_ring = self.abort_via_ring(&frame);
        if !self.abort_via_socket(&frame) && !in_ring {
            tracing::debug!(peer = %self.peer, "abort frame not delivered within {ABORT_BUDGET:?}");
        }
        // Frames queued behind the abort must never follow it.
        self.tx_in_sync = false;
        self.st.fail_locally(format!("this rank aborted: {reason}"));
    }

    fn peer_failure(&mut self) -> Option<Error> {
        // Every abort frame also travels on the control socket, and the socket's end of
        // stream is the peer's death: both are visible without touching the rings.
        self.check_socket().err()
    }

    fn cancel(&mut self) {
        let mut desync = false;
        if self.sendq.front().is_some_and(|s| s.sent > 0 && s.sent < HEADER_LEN + s.src.len()) {
            // The peer would read whatever we write next as this frame's payload.
            self.tx_in_sync = false;
            desync = true;
        }
        if matches!(self.recvq.front().map(|s| s.phase), Some(RecvPhase::Payload { .. })) {
            desync = true;
        }
        self.sendq.clear();
        self.recvq.clear();
        // The caller is abandoning everything; the sticky failure stays.
        self.st.abandon();
        if desync {
            self.st
                .fail_locally(format!("shm connection to rank {} was cancelled in the middle of a frame", self.peer));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use devccl_core::memory::Region;
    use devccl_core::testing::conformance::{drive, header, pattern};
    use nix::sys::eventfd::{EfdFlags, EventFd};

    /// A connected pair in this process without the handshake, plus a third mapping of the
    /// same memory through which a test plays a faulty peer.
    fn local_pair(ring: usize) -> (Box<dyn Connection>, Box<dyn Connection>, Mapping) {
        let (a, b, evil, _) = local_pair_with_socket(ring);
        (a, b, evil)
    }

    /// As `local_pair`, plus a duplicate of rank 0's end of the socket.
    fn local_pair_with_socket(ring: usize) -> (Box<dyn Connection>, Box<dyn Connection>, Mapping, UnixStream) {
        let (map_a, memfd) = Mapping::create(ring).unwrap();
        let map_b = Mapping::open(&memfd, ring).unwrap();
        let evil = Mapping::open(&memfd, ring).unwrap();
        let (sa, sb) = UnixStream::pair().unwrap();
        let raw = sa.try_clone().unwrap();
        let bell_a: OwnedFd = EventFd::from_flags(EfdFlags::EFD_NONBLOCK).unwrap().into();
        let bell_b: OwnedFd = EventFd::from_flags(EfdFlags::EFD_NONBLOCK).unwrap().into();
        let a = ShmConnection::new(Parts {
            me: Rank(0),
            peer: Rank(1),
            remote: "test".into(),
            peer_pid: None,
            map: map_a,
            connector: true,
            bell: bell_a.try_clone().unwrap(),
            peer_bell: bell_b.try_clone().unwrap(),
            sock: sa,
        });
        let b = ShmConnection::new(Parts {
            me: Rank(1),
            peer: Rank(0),
            remote: "test".into(),
            peer_pid: Some(4242),
            map: map_b,
            connector: false,
            bell: bell_b,
            peer_bell: bell_a,
            sock: sb,
        });
        (Box::new(a), Box::new(b), evil, raw)
    }

    fn recv_err(b: &mut Box<dyn Connection>, len: usize) -> String {
        let dst = Region::alloc(len);
        let r = b.irecv(RecvRequest { expect: header(1, 0, len), dst: dst.full() }).unwrap().unwrap();
        let e = drive(&mut [b], &[(0, r)], Duration::from_secs(5)).unwrap_err();
        assert!(matches!(e, Error::Remote { peer: Some(Rank(0)), .. }), "{e:?}");
        e.to_string()
    }

    #[test]
    fn garbage_in_the_ring_is_a_remote_error() {
        let (_a, mut b, evil) = local_pair(4096);
        evil.write(RingId::ToAcceptor, 0, &[0xee; HEADER_LEN]);
        evil.tail(RingId::ToAcceptor).store(HEADER_LEN as u64, SeqCst);
        let m = recv_err(&mut b, 8);
        assert!(m.contains("garbage in the shared ring from rank 0") && m.contains("magic"), "{m}");
        assert!(m.contains("pid 4242"), "{m}");
        // A header with one flipped bit fails its checksum.
        let (_a, mut b, evil) = local_pair(4096);
        let mut h = header(1, 0, 8).encode();
        h[30] ^= 4;
        evil.write(RingId::ToAcceptor, 0, &h);
        evil.tail(RingId::ToAcceptor).store(HEADER_LEN as u64, SeqCst);
        assert!(recv_err(&mut b, 8).contains("checksum"));
    }

    #[test]
    fn impossible_counters_are_caught() {
        // A tail more than a ring ahead of the head.
        let (_a, mut b, evil) = local_pair(4096);
        evil.tail(RingId::ToAcceptor).store(4097, SeqCst);
        assert!(recv_err(&mut b, 8).contains("corrupt"));
        // A tail that moves backwards.
        let (mut a, mut b, evil) = local_pair(4096);
        let src = Region::from_vec(pattern(1, 100));
        let s = a.isend(SendRequest { header: header(1, 0, 100), src: src.full() }).unwrap().unwrap();
        assert!(a.test(s).unwrap().is_some());
        let dst = Region::alloc(60);
        let r = b.irecv(RecvRequest { expect: header(1, 0, 100), dst: Region::alloc(100).full() }).unwrap().unwrap();
        drive(&mut [&mut b], &[(0, r)], Duration::from_secs(5)).unwrap();
        evil.tail(RingId::ToAcceptor).store(10, SeqCst);
        let r = b.irecv(RecvRequest { expect: header(2, 0, 60), dst: dst.full() }).unwrap().unwrap();
        let e = drive(&mut [&mut b], &[(0, r)], Duration::from_secs(5)).unwrap_err().to_string();
        assert!(e.contains("corrupt") && e.contains("tail moved"), "{e}");
        // A consumer head beyond what was written, seen by a producer waiting for space.
        let (mut a, _b, evil) = local_pair(4096);
        let big = Region::from_vec(pattern(2, 10_000));
        let s = a.isend(SendRequest { header: header(1, 0, 10_000), src: big.full() }).unwrap().unwrap();
        assert!(a.test(s).unwrap().is_none());
        evil.head(RingId::ToAcceptor).store(1 << 40, SeqCst);
        let e = drive(&mut [&mut a], &[(0, s)], Duration::from_secs(5)).unwrap_err().to_string();
        assert!(e.contains("corrupt") && e.contains("head moved"), "{e}");
    }

    #[test]
    fn oversized_abort_frame_and_stray_socket_bytes_are_refused() {
        // An abort reason of 4096 bytes cannot fit a 4096-byte ring with its header.
        let (_a, mut b, evil) = local_pair(4096);
        evil.write(RingId::ToAcceptor, 0, &FrameHeader::abort(Seq(1), 4096).encode());
        evil.tail(RingId::ToAcceptor).store(HEADER_LEN as u64, SeqCst);
        assert!(recv_err(&mut b, 8).contains("abort frame of 4152 bytes"));
        // A data frame on the socket, where only aborts may come.
        let (_a, mut b, _evil, raw) = local_pair_with_socket(4096);
        use std::io::Write;
        (&raw).write_all(&header(1, 0, 8).encode()).unwrap();
        let m = recv_err(&mut b, 8);
        assert!(m.contains("only aborts go there"), "{m}");
    }
}
