//! The executor: runs a [`Schedule`] over the connections of a communicator.
//!
//! One thread drives everything: it posts sends and receives in per-peer schedule order as
//! their dependencies complete, tests outstanding requests (which is where transports move
//! bytes), runs local reductions as soon as their inputs are there, and when nothing moved,
//! sleeps in `poll(2)` on the descriptors the transports name (after an optional short spin).
//! No thread hand-offs on the data path: a small all-reduce is a `writev` and a `read`.
//!
//! Every wait has a deadline: if nothing moves for the communicator's timeout, the call
//! fails naming the peers it was waiting for. On any error every connection is told (an
//! abort frame with the reason, so surviving ranks fail promptly naming the culprit), every
//! pending request is dropped, and the error is returned; the communicator then poisons
//! itself.

use std::os::fd::AsFd;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use devccl_core::device::{Device, Pending, ReduceArgs, Scattered};
use devccl_core::memory::{DeviceId, Region, RegionSlice};
use devccl_core::op::{finish_avg, reduce_in_place, reduce_to};
use devccl_core::scatter;
use devccl_core::transport::{
    Completion, Connection, Interest, PayloadSink, Peeked, RecvLayout, RecvRequest, ReqId, SendRequest, Spill,
    wait_ready,
};
use devccl_core::wire::{CollKind, FrameHeader, FrameType};
use devccl_core::{DType, Error, Rank, ReduceOp, Result, Seq};
use nix::sys::eventfd::{EfdFlags, EventFd};

use crate::schedule::{Buf, Loc, Schedule, StepId, StepKind};

/// What every frame of one call says about the call.
#[derive(Debug, Clone, Copy)]
pub struct CallInfo {
    /// Collective.
    pub coll: CollKind,
    /// Element type.
    pub dtype: DType,
    /// Reduction (reducing collectives).
    pub op: Option<ReduceOp>,
    /// Root (rooted collectives).
    pub root: Option<Rank>,
    /// Element count as called.
    pub count: u64,
    /// Sequence number.
    pub seq: Seq,
    /// Algorithm code.
    pub algo: u8,
    /// Point-to-point tag.
    pub tag: u32,
}

impl CallInfo {
    fn header(&self, msg: u32, len: usize, offset: usize) -> FrameHeader {
        FrameHeader {
            frame: FrameType::Data,
            coll: self.coll,
            dtype: self.dtype,
            op: self.op,
            algo: self.algo,
            root: self.root,
            seq: self.seq,
            count: self.count,
            msg,
            len: len as u32,
            offset: offset as u64,
            tag: self.tag,
        }
    }

    /// `all_reduce(float, sum, count=.., seq=..)`.
    pub fn describe(&self) -> String {
        self.header(0, 0, 0).describe()
    }
}

/// The memory one call runs on.
#[derive(Debug, Clone)]
pub struct Bindings {
    /// Input bytes.
    pub input: RegionSlice,
    /// Output bytes (same region and range as `input` for in-place calls).
    pub output: RegionSlice,
    /// Scratch buffers, as declared by the schedule (or, for batched point-to-point
    /// operations, each operation's buffer). Empty for device calls: the executor allocates
    /// them on the device (from its cache).
    pub scratch: Vec<RegionSlice>,
    /// Host staging buffers of a lowered schedule ([`crate::lower`]); filled by the executor.
    pub staging: Vec<RegionSlice>,
    /// The device that holds the call's memory and runs its copies and reductions.
    pub device: Arc<dyn Device>,
}

impl Bindings {
    /// Host-memory bindings (the CPU reduces).
    pub fn host(input: RegionSlice, output: RegionSlice, scratch: Vec<RegionSlice>) -> Bindings {
        Bindings { input, output, scratch, staging: Vec::new(), device: devccl_core::device::host() }
    }

    fn slice(&self, loc: Loc, len: usize) -> RegionSlice {
        match loc.buf {
            Buf::Input => self.input.sub(loc.off..loc.off + len),
            Buf::Output => self.output.sub(loc.off..loc.off + len),
            Buf::Scratch(i) => self.scratch[i as usize].sub(loc.off..loc.off + len),
            Buf::Staging(i) => self.staging[i as usize].sub(loc.off..loc.off + len),
        }
    }
}

/// Device buffers kept between calls (scratch and staging of device calls, receive slots),
/// so a training loop does not allocate device or pinned memory on every collective.
#[derive(Debug, Default)]
struct BufferCache {
    /// (device, staging?, buffer).
    free: Vec<(DeviceId, bool, Region)>,
}

impl BufferCache {
    /// Most bytes kept idle.
    const LIMIT: usize = 1 << 30;

    fn take(&mut self, dev: &dyn Device, staging: bool, len: usize) -> Result<Region> {
        let id = dev.id();
        let best = self
            .free
            .iter()
            .enumerate()
            .filter(|(_, (d, st, r))| *d == id && *st == staging && r.len() >= len)
            .min_by_key(|(_, (_, _, r))| r.len())
            .map(|(i, _)| i);
        if let Some(i) = best {
            return Ok(self.free.swap_remove(i).2);
        }
        let len = len.max(64);
        if staging { dev.alloc_staging(len) } else { dev.alloc(len) }
    }

    fn give(&mut self, dev: DeviceId, staging: bool, r: Region) {
        self.free.push((dev, staging, r));
        let mut total: usize = self.free.iter().map(|(_, _, r)| r.len()).sum();
        while total > Self::LIMIT && !self.free.is_empty() {
            // Drop the largest first: it is the least likely to be reused as is.
            let i = (0..self.free.len()).max_by_key(|&i| self.free[i].2.len()).expect("non-empty");
            total -= self.free.swap_remove(i).2.len();
        }
    }

    fn clear_device(&mut self, dev: DeviceId) {
        self.free.retain(|(d, _, _)| *d != dev);
    }
}

/// What finishing a queued device operation completes.
#[derive(Debug, Clone)]
enum After {
    /// The step.
    Step,
    /// A receive-reduce's reduction: then the step, and its slot is free again.
    SlotReduce { slot: usize, peer: usize },
    /// A scattered receive was gathered: return the pool's buffers to the transport, then
    /// either hand the step on (`arrived`: a receive-reduce waiting for its deps, gathered
    /// into its slot) or complete it. `via`: the pool's device gathered into its own staging
    /// buffer (`Run::via[i]`), which the CPU now copies into the host-memory target.
    Gathered { peer: usize, req: ReqId, slot: Option<usize>, arrived: bool, via: Option<usize> },
    /// A receive-reduce with spilled bytes: the fragment-only stretches were reduced from
    /// the pool and the `mixed` ones gathered into `slot`; now reduce those from the slot.
    SpillsGathered { peer: usize, req: ReqId, slot: usize, mixed: Vec<std::ops::Range<usize>> },
}

/// A device operation in flight.
#[derive(Debug)]
struct LocalOp {
    pending: Pending,
    step: StepId,
    after: After,
}

/// A communicator-wide abort signal: set once (by `abort()` or a rendezvous event), rings an
/// eventfd so a waiting executor wakes at once.
#[derive(Debug)]
pub struct AbortSignal {
    /// Who aborted (`None`: this process) and why.
    reason: OnceLock<(Option<Rank>, String)>,
    bell: EventFd,
}

impl AbortSignal {
    /// A fresh, unset signal.
    pub fn new() -> Result<Arc<AbortSignal>> {
        let bell = EventFd::from_value_and_flags(0, EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC)
            .map_err(|e| Error::system("eventfd", e.into()))?;
        Ok(Arc::new(AbortSignal { reason: OnceLock::new(), bell }))
    }

    /// Raise it for an abort of this process (first reason wins).
    pub fn raise(&self, reason: String) {
        let _ = self.reason.set((None, reason));
        let _ = self.bell.write(1);
    }

    /// Raise it for an abort that rank `from` announced through the rendezvous.
    pub fn raise_remote(&self, from: Rank, reason: String) {
        let _ = self.reason.set((Some(from), reason));
        let _ = self.bell.write(1);
    }

    /// The reason, once raised.
    pub fn reason(&self) -> Option<&str> {
        self.reason.get().map(|(_, r)| r.as_str())
    }

    /// The error a collective stopped by this signal returns: the peer's failure when a peer
    /// aborted (it names the culprit), `Aborted` when this process did.
    pub fn error(&self) -> Option<Error> {
        self.reason.get().map(|(from, r)| match from {
            Some(p) => Error::Remote { peer: Some(*p), message: r.clone() },
            None => Error::Aborted { cause: r.clone() },
        })
    }
}

/// A peer, as an any-source receive sees it.
#[derive(Debug)]
enum Candidate {
    /// Nothing from it yet: it may still send the message.
    Open,
    /// Its next message is something else (per-pair order: it cannot match in this call).
    Blocked(FrameHeader),
    /// Its connection closed between messages.
    Closed(Error),
}

impl Candidate {
    /// Why the peers that cannot match do not, for messages (`; rank 2's next message is
    /// ...; rank 3 closed ...`).
    fn notes(cand: &[Option<Candidate>]) -> String {
        cand.iter()
            .enumerate()
            .filter_map(|(p, c)| match c {
                Some(Candidate::Blocked(h)) => {
                    Some(format!("; rank {p}'s next message is {} (no match)", h.describe()))
                }
                Some(Candidate::Closed(e)) => Some(format!("; {e}")),
                _ => None,
            })
            .collect()
    }
}

/// How an any-source receive names itself in messages: `recv_any(float, count=4, tag=7)`.
fn any_source_name(call: &CallInfo) -> String {
    format!("recv_any({}, count={}, tag={})", call.dtype, call.count, call.tag)
}

/// Messages up to this size make a call "small" for [`Spin::budget_small`].
const SMALL_MESSAGE: usize = 64 << 10;

/// How to wait briefly before sleeping in `poll(2)` when nothing moved.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Spin {
    /// How long to keep polling after the last progress.
    pub budget: Duration,
    /// The budget for calls whose messages are all small (latency-bound: a wake-up from
    /// `poll` would dominate them).
    pub budget_small: Duration,
    /// Yield the CPU between polls (when ranks outnumber cores) instead of busy-spinning.
    pub yield_cpu: bool,
}

/// Runs schedules; owns the connections (index = peer rank) and the staging pool.
#[derive(Debug)]
pub struct Executor {
    /// This rank.
    pub rank: Rank,
    /// World size.
    pub world: usize,
    /// Connection to each peer (`None` for self and unconnected peers).
    pub conns: Vec<Option<Box<dyn Connection>>>,
    /// No-progress deadline.
    pub timeout: Duration,
    /// Busy-poll budget before sleeping.
    pub spin: Spin,
    /// Abort signal.
    pub abort: Arc<AbortSignal>,
    /// Receive-reduce slots, on `slots_dev` (host memory, or a device's staging memory).
    slots: Vec<Region>,
    slots_dev: DeviceId,
    cache: BufferCache,
    seq: u64,
    p2p_tx: Vec<u64>,
    p2p_rx: Vec<u64>,
    /// Where the next any-source receive starts looking (after the last source), so ready
    /// senders take turns.
    any_next: usize,
}

#[derive(Default)]
struct PeerQueue {
    sends: Vec<StepId>,
    recvs: Vec<StepId>,
    next_send: usize,
    next_recv: usize,
    /// Outstanding requests: (request, step, staging slot).
    inflight: Vec<(ReqId, StepId, Option<usize>)>,
}

/// Per-run state.
struct Run<'a> {
    sched: &'a Schedule,
    /// The calls of this run (one, or several batched point-to-point operations).
    calls: &'a [CallInfo],
    /// Message index of each network step within its own call, per peer and direction.
    msg_of: Vec<u32>,
    b: &'a Bindings,
    /// The call's memory is the CPU's (payload sinks may reduce on arrival).
    on_host: bool,
    /// Device operations in flight.
    local: Vec<LocalOp>,
    pending: Vec<u32>,
    arrived: Vec<bool>,
    /// Receive-reduces whose payload a transport sink reduced on arrival.
    sunk: Vec<bool>,
    slot_of: Vec<Option<usize>>,
    free_slots: Vec<usize>,
    /// Staging slots each peer holds, and the most it may: a fast peer must not take every
    /// slot with receives whose reductions wait on a slow peer's data (which would then find
    /// no slot to arrive in).
    slots_used: Vec<usize>,
    slot_quota: usize,
    ready: Vec<StepId>,
    done: usize,
    peers: Vec<PeerQueue>,
    peer_list: Vec<usize>,
    /// Scattered receives gathered by their pool's device into its staging memory, for a
    /// host-memory target: (that device, the staging buffer, the target).
    via: Vec<Option<(DeviceId, Region, RegionSlice)>>,
}

impl Executor {
    /// An executor over `conns`.
    pub fn new(
        rank: Rank,
        world: usize,
        conns: Vec<Option<Box<dyn Connection>>>,
        timeout: Duration,
        spin: Spin,
        abort: Arc<AbortSignal>,
    ) -> Executor {
        Executor {
            rank,
            world,
            conns,
            timeout,
            spin,
            abort,
            slots: Vec::new(),
            slots_dev: DeviceId::Host,
            cache: BufferCache::default(),
            seq: 0,
            p2p_tx: vec![0; world],
            p2p_rx: vec![0; world],
            any_next: 0,
        }
    }

    /// Sequence number of a point-to-point call: counted per peer and direction, because
    /// only the two ranks involved see it (collectives count on every rank).
    pub fn next_p2p_seq(&mut self, sched: &Schedule, call: usize) -> Seq {
        let first = sched.steps.iter().enumerate().filter(|(i, _)| sched.call(*i as StepId) == call).find_map(
            |(_, s)| match s {
                StepKind::Send { peer, .. } => Some((true, *peer)),
                StepKind::Recv { peer, .. } | StepKind::RecvReduce { peer, .. } => Some((false, *peer)),
                _ => None,
            },
        );
        let Some((is_send, peer)) = first else { return Seq(0) };
        let counter = if is_send { &mut self.p2p_tx } else { &mut self.p2p_rx };
        let s = Seq(counter[peer.idx()]);
        counter[peer.idx()] += 1;
        s
    }

    /// The next call's sequence number (every call on every rank counts, failed ones too).
    pub fn next_seq(&mut self) -> Seq {
        let s = Seq(self.seq);
        self.seq += 1;
        s
    }

    /// Run one schedule to completion. On error every peer is told and every request
    /// dropped before returning.
    pub fn run(&mut self, sched: &Schedule, calls: &[CallInfo], b: &Bindings) -> Result<()> {
        let call = &calls[0];
        match self.run_inner(sched, calls, b) {
            Ok(()) => Ok(()),
            Err(e) => {
                for c in self.conns.iter_mut().flatten() {
                    c.cancel();
                }
                let e = self.with_root_cause(e);
                let e = self.prefer_abort(e);
                self.fail_all(call.seq, &format!("rank {} failed in {}: {e}", self.rank, call.describe()));
                Err(e)
            }
        }
    }

    /// Choose the source of a receive from any rank (`call`: its dtype, count and tag; the
    /// sequence number is not known yet): the first peer whose next incoming message is the
    /// point-to-point message this rank expects next from it (its sequence number) and
    /// carries `call.tag`. Nothing is consumed: the caller then runs an ordinary receive
    /// from that peer, which checks size and dtype as usual.
    ///
    /// Per-pair order holds: a peer whose next message is something else (another tag, a
    /// collective) cannot match in this call. Waits, sleeping in `poll(2)` on the peers'
    /// connections, until a message matches, bounded by the communicator's timeout, and
    /// wakes on the abort signal. A peer that aborted or sent garbage fails the receive as
    /// a receive from it would; a peer whose connection closed between messages (it exited)
    /// is no longer a candidate. When no candidate is left (each closed, or blocked by a
    /// message that does not match), the receive fails at once. Fatal errors take the usual
    /// path (every peer is told); a transport without [`Connection::peek`] fails with
    /// `Unsupported` and leaves the communicator usable.
    pub fn match_any_source(&mut self, call: &CallInfo) -> Result<Rank> {
        match self.match_any_inner(call) {
            Ok(p) => Ok(p),
            Err(e) if !e.is_fatal() => Err(e),
            Err(e) => {
                for c in self.conns.iter_mut().flatten() {
                    c.cancel();
                }
                let e = self.prefer_abort(e);
                self.fail_all(call.seq, &format!("rank {} failed in {}: {e}", self.rank, any_source_name(call)));
                Err(e)
            }
        }
    }

    fn match_any_inner(&mut self, call: &CallInfo) -> Result<Rank> {
        let world = self.world;
        let started = Instant::now();
        let mut cand: Vec<Option<Candidate>> =
            (0..world).map(|p| self.conns[p].as_ref().map(|_| Candidate::Open)).collect();
        if cand.iter().all(Option::is_none) {
            return Err(Error::usage(format!("{}: no other rank to receive from", any_source_name(call))));
        }
        let start = self.any_next;
        loop {
            if let Some(e) = self.abort.error() {
                return Err(e);
            }
            for i in 0..world {
                let p = (start + i) % world;
                if !matches!(cand[p], Some(Candidate::Open)) {
                    continue;
                }
                let conn = self.conns[p].as_mut().expect("a candidate has a connection");
                match conn.peek()? {
                    Peeked::Nothing => {}
                    Peeked::Frame(h)
                        if h.frame == FrameType::Data
                            && h.coll == CollKind::SendRecv
                            && h.seq == Seq(self.p2p_rx[p])
                            && h.tag == call.tag =>
                    {
                        self.any_next = (p + 1) % world;
                        return Ok(Rank::from(p));
                    }
                    Peeked::Frame(h) => cand[p] = Some(Candidate::Blocked(h)),
                    Peeked::Closed(e) => cand[p] = Some(Candidate::Closed(e)),
                }
            }
            let open: Vec<usize> = (0..world).filter(|&p| matches!(cand[p], Some(Candidate::Open))).collect();
            if open.is_empty() {
                return Err(self.no_source_error(call, cand));
            }
            let idle = started.elapsed();
            if idle >= self.timeout {
                let ranks = open.iter().map(|p| format!("rank {p}")).collect::<Vec<_>>().join(", ");
                return Err(Error::Timeout {
                    what: format!(
                        "rank {} in {}: no message with tag {} arrived from any of {ranks}{}",
                        self.rank,
                        any_source_name(call),
                        call.tag,
                        Candidate::notes(&cand)
                    ),
                    after: self.timeout,
                });
            }
            if idle < self.spin.budget_small {
                if self.spin.yield_cpu {
                    std::thread::yield_now();
                } else {
                    std::hint::spin_loop();
                }
                continue;
            }
            let mut fds = Vec::with_capacity(open.len() + 1);
            fds.push((self.abort.bell.as_fd(), Interest::Read));
            let mut blind = false;
            for &p in &open {
                let before = fds.len();
                self.conns[p].as_ref().expect("checked").peek_fds(&mut fds);
                blind |= fds.len() == before;
            }
            // A connection without descriptors is peeked again after a short nap.
            let nap = if blind { Duration::from_millis(1) } else { Duration::from_millis(200) };
            wait_ready(&fds, (self.timeout - idle).min(nap))?;
        }
    }

    /// The error of an any-source receive that no peer can serve any more.
    fn no_source_error(&self, call: &CallInfo, mut cand: Vec<Option<Candidate>>) -> Error {
        let blocked: Vec<(usize, FrameHeader)> = cand
            .iter()
            .enumerate()
            .filter_map(|(p, c)| match c {
                Some(Candidate::Blocked(h)) => Some((p, *h)),
                _ => None,
            })
            .collect();
        let closed = cand.iter().filter(|c| matches!(c, Some(Candidate::Closed(_)))).count();
        match blocked.as_slice() {
            // One peer left, and it called something else: the usual mismatch.
            [(p, h)] if closed == 0 => Error::Mismatch {
                local_rank: self.rank,
                peer: Rank::from(*p),
                local: any_source_name(call),
                remote: h.describe(),
            },
            // Every peer closed: what a receive from the first would say.
            [] => cand
                .iter_mut()
                .find_map(|c| match c.take() {
                    Some(Candidate::Closed(e)) => Some(e),
                    _ => None,
                })
                .unwrap_or_else(|| Error::Internal("any-source receive without candidates".into())),
            [(p, _), ..] => Error::Remote {
                peer: Some(Rank::from(*p)),
                message: format!(
                    "rank {} in {} can receive from no rank{}",
                    self.rank,
                    any_source_name(call),
                    Candidate::notes(&cand)
                ),
            },
        }
    }

    /// A peer that failed because someone called `abort()` tells us before the rendezvous
    /// does (its abort frame races the rendezvous event). Wait briefly for that event, so an
    /// aborted communicator fails every rank's call with the same `Aborted` error.
    fn prefer_abort(&self, e: Error) -> Error {
        let Error::Remote { message, .. } = &e else { return e };
        if !message.contains("aborted the communicator") {
            return e;
        }
        let deadline = Instant::now() + Duration::from_secs(1);
        loop {
            if let Some(a @ Error::Aborted { .. }) = self.abort.error() {
                return a;
            }
            if Instant::now() >= deadline {
                return e;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// When a peer failed, other peers usually say why (their abort frames name the rank
    /// that died first). Look briefly for such reports and add them to the error, so every
    /// survivor names the culprit, not just the neighbour that gave up first.
    fn with_root_cause(&mut self, e: Error) -> Error {
        // A peer that closed may still have sent why; a timeout usually means a rank further
        // along is stuck, and the neighbours of that rank will time out too and say so.
        let (first, grace) = match &e {
            Error::Remote { peer: Some(p), message } => {
                (Some(*p).filter(|_| !message.contains("closed")), Duration::from_millis(50))
            }
            Error::Timeout { .. } => (None, (self.timeout / 2).min(Duration::from_secs(5))),
            _ => return e,
        };
        let deadline = Instant::now() + grace;
        let mut reports: Vec<String> = Vec::new();
        let mut seen = vec![false; self.world];
        if let Some(p) = first {
            seen[p.idx()] = true;
        }
        loop {
            for (p, c) in self.conns.iter_mut().enumerate() {
                let Some(c) = c else { continue };
                if seen[p] {
                    continue;
                }
                if let Some(Error::Remote { message: m, .. }) = c.peer_failure() {
                    seen[p] = true;
                    if m.contains("aborted") {
                        reports.push(m);
                    }
                }
            }
            if !reports.is_empty() || Instant::now() >= deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        if reports.is_empty() {
            return e;
        }
        let extra = reports.join("; ");
        match e {
            Error::Remote { peer, message } => Error::Remote { peer, message: format!("{message}; {extra}") },
            Error::Timeout { what, after } => Error::Timeout { what: format!("{what}; {extra}"), after },
            e => e,
        }
    }

    /// Tell every peer we are aborting and drop all requests.
    pub fn fail_all(&mut self, seq: Seq, reason: &str) {
        for c in self.conns.iter_mut().flatten() {
            c.cancel();
            c.send_abort(seq, reason);
        }
    }

    /// Receive-reduce slots: `n` of at least `size` bytes, in memory `dev` reduces from
    /// (host memory for the CPU, pinned/host-visible staging memory for a device).
    fn ensure_slots(&mut self, dev: &dyn Device, n: usize, size: usize) -> Result<()> {
        if self.slots_dev != dev.id() {
            self.slots.clear();
            self.slots_dev = dev.id();
        }
        self.slots.retain(|r| r.len() >= size);
        while self.slots.len() < n {
            let r = if dev.id().is_host() { Region::alloc(size.max(64)) } else { dev.alloc_staging(size.max(64))? };
            self.slots.push(r);
        }
        Ok(())
    }

    /// The call's bindings with the scratch buffers of a device call and the staging buffers
    /// of a lowered schedule taken from the cache.
    fn complete_bindings(&mut self, sched: &Schedule, b: &Bindings) -> Result<Bindings> {
        let mut full = b.clone();
        let dev = b.device.clone();
        if full.scratch.is_empty() && !sched.scratch.is_empty() {
            for &len in &sched.scratch {
                let r = if dev.id().is_host() { Region::alloc(len) } else { self.cache.take(&*dev, false, len)? };
                full.scratch.push(r.slice(0..len));
            }
        }
        for &len in sched.staging.iter().skip(full.staging.len()) {
            full.staging.push(self.cache.take(&*dev, true, len)?.slice(0..len));
        }
        Ok(full)
    }

    /// Give the buffers [`Executor::complete_bindings`] took back to the cache.
    fn release_bindings(&mut self, given: &Bindings, full: Bindings) {
        let id = full.device.id();
        if given.scratch.is_empty() && !id.is_host() {
            for s in full.scratch {
                self.cache.give(id, false, s.region);
            }
        }
        for s in full.staging.into_iter().skip(given.staging.len()) {
            self.cache.give(id, true, s.region);
        }
    }

    /// Forget the buffers kept for `dev` (after a failure on it).
    fn forget_device_buffers(&mut self, dev: DeviceId) {
        self.cache.clear_device(dev);
        if self.slots_dev == dev {
            self.slots.clear();
        }
    }

    fn run_inner(&mut self, sched: &Schedule, calls: &[CallInfo], given: &Bindings) -> Result<()> {
        let b = &self.complete_bindings(sched, given)?;
        let r = self.run_bound(sched, calls, b);
        match &r {
            Ok(()) => self.release_bindings(given, b.clone()),
            Err(_) if !b.device.id().is_host() => self.forget_device_buffers(b.device.id()),
            Err(_) => {}
        }
        r
    }

    fn run_bound(&mut self, sched: &Schedule, calls: &[CallInfo], b: &Bindings) -> Result<()> {
        let n = sched.len();
        let mut peers: Vec<PeerQueue> = (0..self.world).map(|_| PeerQueue::default()).collect();
        let mut staged_steps = 0usize;
        let mut staged_from = vec![false; self.world];
        // Message numbers count within each call, per peer and direction (what the peer's
        // matching call counts too). With one call that is the position in the peer's queue;
        // batches of several calls count per call.
        let mut msg_of = vec![0u32; n];
        let mut per_call: std::collections::HashMap<(usize, usize, bool), u32> = std::collections::HashMap::new();
        let multi = !sched.call_of.is_empty();
        for (i, s) in sched.steps.iter().enumerate() {
            let (peer, send) = match s {
                StepKind::Send { peer, .. } => (peer.idx(), true),
                StepKind::Recv { peer, .. } | StepKind::RecvReduce { peer, .. } => (peer.idx(), false),
                _ => continue,
            };
            let q = &mut peers[peer];
            msg_of[i] = if multi {
                let c = per_call.entry((sched.call(i as StepId), peer, send)).or_insert(0);
                *c += 1;
                *c - 1
            } else if send {
                q.sends.len() as u32
            } else {
                q.recvs.len() as u32
            };
            if send {
                q.sends.push(i as StepId);
            } else {
                if let StepKind::RecvReduce { .. } = s {
                    staged_steps += 1;
                    staged_from[peer] = true;
                }
                q.recvs.push(i as StepId);
            }
        }
        if calls.len() <= sched.call_of.iter().copied().max().unwrap_or(0) as usize {
            return Err(Error::Internal(format!(
                "schedule names call {} of {}",
                sched.call_of.iter().max().unwrap_or(&0),
                calls.len()
            )));
        }
        let peer_list: Vec<usize> =
            (0..self.world).filter(|&p| !peers[p].sends.is_empty() || !peers[p].recvs.is_empty()).collect();
        for &p in &peer_list {
            if self.conns[p].is_none() {
                return Err(Error::Internal(format!("rank {} has no connection to rank {p}", self.rank)));
            }
        }
        // Enough staging for every connection to keep its receive queue full.
        let staged_peers = staged_from.iter().filter(|&&x| x).count().max(1);
        let nslots = staged_steps.min(64.max(16 * staged_peers));
        self.ensure_slots(&*b.device, nslots, sched.max_staged())?;
        let slot_quota = (nslots / staged_peers).max(1);
        let mut run = Run {
            sched,
            calls,
            msg_of,
            b,
            on_host: b.device.id().is_host(),
            local: Vec::new(),
            pending: sched.ndeps.clone(),
            arrived: vec![false; n],
            sunk: vec![false; n],
            slot_of: vec![None; n],
            free_slots: (0..nslots).rev().collect(),
            slots_used: vec![0; self.world],
            slot_quota,
            ready: Vec::new(),
            done: 0,
            peers,
            peer_list,
            via: Vec::new(),
        };
        for i in 0..n {
            if run.pending[i] == 0 && sched.steps[i].peer().is_none() {
                run.ready.push(i as StepId);
            }
        }
        let r = self.drive(&mut run);
        if r.is_err() {
            // Device work already queued still reads and writes the call's buffers: let it
            // finish (bounded) before the caller may free them.
            Executor::drain_local(&mut run, Instant::now() + self.timeout.min(Duration::from_secs(30)));
        }
        r
    }

    /// Run the loop until every step finished or something failed.
    fn drive(&mut self, run: &mut Run<'_>) -> Result<()> {
        let n = run.sched.len();
        // Latency-bound calls (every message small) may poll longer before sleeping.
        let small = run.sched.steps.iter().all(|s| s.len() <= SMALL_MESSAGE);
        let spin_budget = if small { self.spin.budget_small } else { self.spin.budget };
        let mut last_progress = Instant::now();
        loop {
            if let Some(e) = self.abort.error() {
                return Err(e);
            }
            let mut moved = self.post(run)?;
            moved |= self.test_all(run)?;
            moved |= self.test_local(run)?;
            while let Some(s) = run.ready.pop() {
                self.local_step(run, s)?;
                moved = true;
            }
            if run.done == n {
                return Ok(());
            }
            if moved {
                last_progress = Instant::now();
                continue;
            }
            let idle = last_progress.elapsed();
            if idle >= self.timeout {
                return Err(self.stall_error(run));
            }
            if idle < spin_budget {
                if self.spin.yield_cpu {
                    // More ranks than cores: let the rank we wait for run on this core now
                    // instead of paying an idle-core wake-up later.
                    std::thread::yield_now();
                } else {
                    std::hint::spin_loop();
                }
                continue;
            }
            let mut fds = Vec::with_capacity(run.peer_list.len() * 2 + 1);
            fds.push((self.abort.bell.as_fd(), Interest::Read));
            for &p in &run.peer_list {
                let q = &run.peers[p];
                if !q.inflight.is_empty() {
                    self.conns[p].as_ref().expect("checked").wait_fds(&mut fds);
                }
            }
            if !run.local.is_empty() {
                // Device fences have no descriptor to sleep on (and poll sleeps in whole
                // milliseconds): nap briefly, then test sockets and fences again.
                std::thread::sleep(Duration::from_micros(20));
                continue;
            }
            let left = self.timeout - idle;
            wait_ready(&fds, left.min(Duration::from_millis(200)))?;
        }
    }

    /// Wait (bounded) for the queued device operations of a failed run, ignoring their
    /// results; anything still running at `deadline` is left to its fence's own drop.
    fn drain_local(run: &mut Run<'_>, deadline: Instant) {
        while !run.local.is_empty() && Instant::now() < deadline {
            run.local.retain_mut(|op| !matches!(op.pending.test(), Ok(true) | Err(_)));
            if !run.local.is_empty() {
                std::thread::sleep(Duration::from_micros(50));
            }
        }
        if !run.local.is_empty() {
            tracing::warn!(ops = run.local.len(), "device work still running after a failed collective");
        }
    }

    /// Queue `pending` as the device part of step `s`; finished work is handled at once.
    fn queue_local(&mut self, run: &mut Run<'_>, mut pending: Pending, s: StepId, after: After) -> Result<()> {
        if pending.test()? {
            return self.after_local(run, s, after);
        }
        run.local.push(LocalOp { pending, step: s, after });
        Ok(())
    }

    /// Test the device operations in flight; handle the finished ones.
    fn test_local(&mut self, run: &mut Run<'_>) -> Result<bool> {
        let mut moved = false;
        let mut i = 0;
        while i < run.local.len() {
            if run.local[i].pending.test()? {
                let op = run.local.swap_remove(i);
                self.after_local(run, op.step, op.after)?;
                moved = true;
            } else {
                i += 1;
            }
        }
        Ok(moved)
    }

    fn after_local(&mut self, run: &mut Run<'_>, s: StepId, after: After) -> Result<()> {
        match after {
            After::Step => self.complete(run, s),
            After::SlotReduce { slot, peer } => {
                run.free_slots.push(slot);
                run.slots_used[peer] -= 1;
                self.complete(run, s);
            }
            After::SpillsGathered { peer, req, slot, mixed } => {
                let StepKind::RecvReduce { dst, base, len, finish, .. } = run.sched.steps[s as usize] else {
                    return Err(Error::Internal(format!(
                        "spilled stretches gathered for step {s}, not a receive-reduce"
                    )));
                };
                let call = &run.calls[run.sched.call(s)];
                let (dtype, op, fin) = (call.dtype, call.op.unwrap_or(ReduceOp::Sum), finish.then_some(self.world));
                let (d, a, x) = (run.b.slice(dst, len), run.b.slice(base, len), self.slots[slot].slice(0..len));
                let dev = run.b.device.clone();
                let mut ops = Vec::with_capacity(mixed.len());
                for r in mixed {
                    let (d, a, x) = (d.sub(r.clone()), a.sub(r.clone()), x.sub(r));
                    ops.push(dev.reduce(ReduceArgs { dtype, op, dst: &d, a: &a, b: &x, finish: fin })?);
                }
                let after = After::Gathered { peer, req, slot: Some(slot), arrived: false, via: None };
                self.queue_local(run, scatter::AllOf::pending(ops), s, after)?;
            }
            After::Gathered { peer, req, slot, arrived, via } => {
                if let Some((dev, temp, target)) = via.and_then(|i| run.via[i].take()) {
                    let len = target.len();
                    Region::with_pair(&target, &temp.slice(0..len), |d, s| d.copy_from_slice(s))?;
                    self.cache.give(dev, true, temp);
                }
                self.conns[peer].as_mut().expect("checked").recv_consumed(req)?;
                if let (Some(k), false) = (slot, arrived) {
                    // Gathered and reduced in one go: the slot was never used.
                    run.free_slots.push(k);
                    run.slots_used[peer] -= 1;
                }
                if arrived {
                    run.arrived[s as usize] = true;
                    run.slot_of[s as usize] = slot;
                    if run.pending[s as usize] == 0 {
                        run.ready.push(s);
                    }
                } else {
                    self.complete(run, s);
                }
            }
        }
        Ok(())
    }

    /// Post every send/receive whose turn has come. Returns whether anything was posted.
    fn post(&mut self, run: &mut Run<'_>) -> Result<bool> {
        let mut moved = false;
        for pi in 0..run.peer_list.len() {
            let p = run.peer_list[pi];
            let conn = self.conns[p].as_mut().expect("checked");
            // Sends, in order, as their inputs become final.
            while let Some(&s) = run.peers[p].sends.get(run.peers[p].next_send) {
                if run.pending[s as usize] > 0 {
                    break;
                }
                let StepKind::Send { src, len, .. } = run.sched.steps[s as usize] else { unreachable!() };
                let header = run.calls[run.sched.call(s)].header(run.msg_of[s as usize], len, src.off);
                let req = SendRequest { header, src: run.b.slice(src, len) };
                match conn.isend(req)? {
                    Some(id) => {
                        run.peers[p].inflight.push((id, s, None));
                        run.peers[p].next_send += 1;
                        moved = true;
                    }
                    None => break,
                }
            }
            // Receives, in order: direct ones once their destination is free, staged ones
            // as soon as a slot is.
            while let Some(&s) = run.peers[p].recvs.get(run.peers[p].next_recv) {
                let msg = run.msg_of[s as usize];
                let call = &run.calls[run.sched.call(s)];
                // A reduction that may happen as the bytes arrive goes straight from the
                // transport's buffers into the output (no staging copy), where supported.
                if let StepKind::RecvReduce { dst, base, len, finish, .. } = run.sched.steps[s as usize]
                    && run.pending[s as usize] == 0
                    && run.on_host
                    && conn.accepts_sinks()
                {
                    let d = run.b.slice(dst, len);
                    let base = (!same_place(run.b, dst, base)).then(|| run.b.slice(base, len));
                    let op = call.op.unwrap_or(ReduceOp::Sum);
                    let sink = ReduceSink::new(call.dtype, op, d, base, finish.then_some(self.world));
                    match conn.irecv_sink(call.header(msg, len, dst.off), Box::new(sink))? {
                        Some(id) => {
                            run.sunk[s as usize] = true;
                            run.peers[p].inflight.push((id, s, None));
                            run.peers[p].next_recv += 1;
                            moved = true;
                            continue;
                        }
                        None => break,
                    }
                }
                let (dst, slot) = match run.sched.steps[s as usize] {
                    StepKind::Recv { dst, len, .. } => {
                        if run.pending[s as usize] > 0 {
                            break;
                        }
                        (run.b.slice(dst, len), None)
                    }
                    StepKind::RecvReduce { len, .. } => {
                        if run.slots_used[p] >= run.slot_quota {
                            break;
                        }
                        let Some(slot) = run.free_slots.pop() else { break };
                        run.slots_used[p] += 1;
                        (self.slots[slot].slice(0..len), Some(slot))
                    }
                    _ => unreachable!(),
                };
                let off = match run.sched.steps[s as usize] {
                    StepKind::Recv { dst, .. } | StepKind::RecvReduce { dst, .. } => dst.off,
                    _ => 0,
                };
                let req = RecvRequest { expect: call.header(msg, dst.len(), off), dst };
                match conn.irecv(req)? {
                    Some(id) => {
                        run.peers[p].inflight.push((id, s, slot));
                        run.peers[p].next_recv += 1;
                        moved = true;
                    }
                    None => {
                        if let Some(slot) = slot {
                            run.free_slots.push(slot);
                            run.slots_used[p] -= 1;
                        }
                        break;
                    }
                }
            }
        }
        Ok(moved)
    }

    /// Test every outstanding request; handle completions.
    fn test_all(&mut self, run: &mut Run<'_>) -> Result<bool> {
        let mut moved = false;
        for pi in 0..run.peer_list.len() {
            let p = run.peer_list[pi];
            let mut i = 0;
            while i < run.peers[p].inflight.len() {
                let (id, s, slot) = run.peers[p].inflight[i];
                let conn = self.conns[p].as_mut().expect("checked");
                match conn.test(id)? {
                    None => i += 1,
                    Some(done) => {
                        run.peers[p].inflight.remove(i);
                        moved = true;
                        if let Completion::Received { layout: RecvLayout::Scattered { pool, frags, spill }, .. } = done
                        {
                            self.unpack(run, p, id, s, slot, &pool, &frags, spill.as_ref())?;
                            continue;
                        }
                        match run.sched.steps[s as usize] {
                            StepKind::RecvReduce { .. } if run.sunk[s as usize] => self.complete(run, s),
                            StepKind::RecvReduce { .. } => {
                                run.arrived[s as usize] = true;
                                run.slot_of[s as usize] = slot;
                                if run.pending[s as usize] == 0 {
                                    run.ready.push(s);
                                }
                            }
                            _ => self.complete(run, s),
                        }
                    }
                }
            }
        }
        Ok(moved)
    }

    /// A receive that the transport left scattered in its pool (devmem): gather it — fused
    /// with the reduction when a receive-reduce's operand is ready and the call's device
    /// reads the pool, else into the destination or the slot — and return the pool's buffers
    /// once that finished.
    ///
    /// Who gathers: the device that reads the pool and writes the target. The pool's own
    /// device when the target is its memory (or its staging memory: the call's slots and
    /// staging buffers belong to the call's device); the host for a host pool and a host
    /// target; for a device pool and a host target, the pool's device gathers into its own
    /// staging memory and the CPU copies that into the target. Lowering (`lower.rs`) has
    /// staged every call on a device the connection does not reach, so no other case occurs.
    #[allow(clippy::too_many_arguments)]
    fn unpack(
        &mut self,
        run: &mut Run<'_>,
        peer: usize,
        req: ReqId,
        s: StepId,
        slot: Option<usize>,
        pool: &Region,
        frags: &[devccl_core::transport::Fragment],
        spill: Option<&Spill>,
    ) -> Result<()> {
        let call_dev = run.b.device.clone();
        let pool_dev = pool.kind().device().ok_or_else(|| {
            Error::Internal(format!(
                "rank {peer} sent into an RX pool of {:?} memory, which no device reads",
                pool.kind()
            ))
        })?;
        let call = &run.calls[run.sched.call(s)];
        let (dtype, op) = (call.dtype, call.op.unwrap_or(ReduceOp::Sum));
        let step = run.sched.steps[s as usize].clone();
        // Fused gather-and-reduce: fragments read once, straight from the pool.
        if let (StepKind::RecvReduce { dst, base, len, finish, .. }, Some(k)) = (&step, slot)
            && run.pending[s as usize] == 0
            && pool_dev == call_dev.id()
        {
            let (d, a) = (run.b.slice(*dst, *len), run.b.slice(*base, *len));
            let fin = finish.then_some(self.world);
            let Some(spill) = spill.filter(|x| !x.pieces.is_empty()) else {
                let pending = call_dev.gather_reduce(dtype, op, &d, &a, Scattered { pool, frags }, fin)?;
                return self.queue_local(
                    run,
                    pending,
                    s,
                    After::Gathered { peer, req, slot, arrived: false, via: None },
                );
            };
            // With spills: fused where only fragments lie; the stretches around spilled bytes
            // are gathered into the slot now and reduced from it once that finished.
            let (fused, mixed) = scatter::split_for_reduce(*len, dtype.size(), frags, &spill.pieces);
            let mut ops = Vec::with_capacity(fused.len() + mixed.len());
            for (r, f) in &fused {
                let (d, a) = (d.sub(r.clone()), a.sub(r.clone()));
                ops.push(call_dev.gather_reduce(dtype, op, &d, &a, Scattered { pool, frags: f }, fin)?);
            }
            let x = self.slots[k].slice(0..*len);
            for r in &mixed {
                let part = Spill { region: spill.region.clone(), pieces: scatter::clip(&spill.pieces, r) };
                ops.push(scatter::gather(&*call_dev, &x.sub(r.clone()), pool, &scatter::clip(frags, r), Some(&part))?);
            }
            let after = After::SpillsGathered { peer, req, slot: k, mixed };
            return self.queue_local(run, scatter::AllOf::pending(ops), s, after);
        }
        // Otherwise gather into the target: the slot of a receive-reduce, or the destination.
        let (target, arrived, call_staging) = match (&step, slot) {
            (StepKind::RecvReduce { len, .. }, Some(k)) => (self.slots[k].slice(0..*len), true, true),
            (StepKind::Recv { dst, len, .. }, None) => {
                (run.b.slice(*dst, *len), false, matches!(dst.buf, crate::schedule::Buf::Staging(_)))
            }
            (other, _) => return Err(Error::Internal(format!("scattered completion for {other:?}"))),
        };
        let host_target = target.region.kind().is_host();
        let owner = match target.region.kind().device() {
            Some(DeviceId::Host) if call_staging => call_dev.id(),
            Some(d) => d,
            None => return Err(Error::Internal(format!("receive into {:?} memory", target.region.kind()))),
        };
        let after = |via| After::Gathered { peer, req, slot, arrived, via };
        if owner == pool_dev || (host_target && pool_dev.is_host()) {
            // The pool's device into its own memory; else the CPU, host pool to host target.
            let gatherer = if owner == pool_dev { pool_dev } else { DeviceId::Host };
            let dev = if gatherer == call_dev.id() { call_dev } else { devccl_device::open(gatherer)? };
            let pending = scatter::gather(&*dev, &target, pool, frags, spill)?;
            return self.queue_local(run, pending, s, after(None));
        }
        if host_target {
            let dev = devccl_device::open(pool_dev)?;
            let temp = self.cache.take(&*dev, true, target.len())?;
            let pending = scatter::gather(&*dev, &temp.slice(0..target.len()), pool, frags, spill)?;
            run.via.push(Some((pool_dev, temp, target)));
            let i = run.via.len() - 1;
            return self.queue_local(run, pending, s, after(Some(i)));
        }
        Err(Error::Internal(format!(
            "rank {} cannot gather a receive from rank {peer}: its RX pool is on {pool_dev}, the destination on \
             {owner} (the schedule should have been staged)",
            self.rank
        )))
    }

    fn complete(&self, run: &mut Run<'_>, s: StepId) {
        run.done += 1;
        for &t in run.sched.successors(s) {
            let t_us = t as usize;
            run.pending[t_us] -= 1;
            if run.pending[t_us] == 0 {
                match run.sched.steps[t_us] {
                    StepKind::Send { .. } | StepKind::Recv { .. } => {} // posted by `post`
                    StepKind::RecvReduce { .. } => {
                        if run.arrived[t_us] {
                            run.ready.push(t);
                        }
                    }
                    _ => run.ready.push(t),
                }
            }
        }
    }

    /// Start a local step on the call's device (the host runs it at once).
    fn local_step(&mut self, run: &mut Run<'_>, s: StepId) -> Result<()> {
        let call = &run.calls[run.sched.call(s)];
        let (dtype, op) = (call.dtype, call.op.unwrap_or(ReduceOp::Sum));
        let world = self.world;
        let dev = run.b.device.clone();
        let (pending, after) = match run.sched.steps[s as usize] {
            StepKind::RecvReduce { peer, dst, base, len, finish } => {
                let slot = run.slot_of[s as usize].take().expect("staged receive has a slot");
                let (d, a, x) = (run.b.slice(dst, len), run.b.slice(base, len), self.slots[slot].slice(0..len));
                let fin = finish.then_some(world);
                let p = dev.reduce(ReduceArgs { dtype, op, dst: &d, a: &a, b: &x, finish: fin })?;
                (p, After::SlotReduce { slot, peer: peer.idx() })
            }
            StepKind::Copy { src, dst, len } if !same_place(run.b, src, dst) => {
                (dev.copy(&run.b.slice(dst, len), &run.b.slice(src, len))?, After::Step)
            }
            StepKind::Copy { .. } => (Pending::Done, After::Step),
            StepKind::Reduce { src, dst, len, finish } => {
                let (d, x) = (run.b.slice(dst, len), run.b.slice(src, len));
                let fin = finish.then_some(world);
                (dev.reduce(ReduceArgs { dtype, op, dst: &d, a: &d, b: &x, finish: fin })?, After::Step)
            }
            StepKind::Finish { dst, len } if op == ReduceOp::Avg => {
                (dev.finish_avg(dtype, &run.b.slice(dst, len), world)?, After::Step)
            }
            StepKind::Finish { .. } => (Pending::Done, After::Step),
            StepKind::Send { .. } | StepKind::Recv { .. } => unreachable!("network steps are not local"),
        };
        self.queue_local(run, pending, s, after)
    }

    fn stall_error(&self, run: &Run<'_>) -> Error {
        let mut from = Vec::new();
        let mut to = Vec::new();
        for &p in &run.peer_list {
            let q = &run.peers[p];
            let waiting_recv = q.next_recv < q.recvs.len()
                || q.inflight.iter().any(|(_, s, _)| !matches!(run.sched.steps[*s as usize], StepKind::Send { .. }));
            let waiting_send =
                q.inflight.iter().any(|(_, s, _)| matches!(run.sched.steps[*s as usize], StepKind::Send { .. }));
            if waiting_recv {
                from.push(p);
            }
            if waiting_send {
                to.push(p);
            }
        }
        let names = |v: &[usize]| v.iter().map(|p| format!("rank {p}")).collect::<Vec<_>>().join(", ");
        if !run.local.is_empty() {
            return Error::Timeout {
                what: format!(
                    "rank {} in {}: {} operation(s) on {} did not finish",
                    self.rank,
                    run.calls[0].describe(),
                    run.local.len(),
                    run.b.device.describe()
                ),
                after: self.timeout,
            };
        }
        Error::Timeout {
            what: format!(
                "rank {} in {}: no progress; waiting for data from {}{}",
                self.rank,
                run.calls[0].describe(),
                if from.is_empty() { "nobody".to_string() } else { names(&from) },
                if to.is_empty() { String::new() } else { format!(", and for {} to take our data", names(&to)) }
            ),
            after: self.timeout,
        }
    }
}

/// True when two locations denote the same bytes (in-place calls bind Input and Output to
/// one range of one region).
fn same_place(b: &Bindings, x: Loc, y: Loc) -> bool {
    if x == y {
        return true;
    }
    let base = |l: Loc| match l.buf {
        Buf::Input => Some(&b.input),
        Buf::Output => Some(&b.output),
        Buf::Scratch(_) | Buf::Staging(_) => None,
    };
    match (base(x), base(y)) {
        (Some(sx), Some(sy)) => sx.region.same(&sy.region) && sx.range.start + x.off == sy.range.start + y.off,
        _ => false,
    }
}

/// Reduces a payload into its destination as a transport hands it over, piece by piece:
/// `dst = base op piece` (or `dst op= piece` in place), then the avg epilogue when this is
/// the last reduction of those elements. Pieces may split elements; the split element is
/// carried over to the next piece.
struct ReduceSink {
    dtype: DType,
    op: ReduceOp,
    dst: RegionSlice,
    base: Option<RegionSlice>,
    finish_world: Option<usize>,
    carry: [u8; 8],
    carried: usize,
}

impl ReduceSink {
    fn new(
        dtype: DType,
        op: ReduceOp,
        dst: RegionSlice,
        base: Option<RegionSlice>,
        finish_world: Option<usize>,
    ) -> Self {
        ReduceSink { dtype, op, dst, base, finish_world, carry: [0; 8], carried: 0 }
    }

    /// Reduce whole elements `src` into the destination at byte offset `off`.
    fn apply(&self, off: usize, src: &[u8]) -> Result<()> {
        let (dtype, op) = (self.dtype, self.op);
        let d = self.dst.sub(off..off + src.len());
        let avg = |d: &mut [u8]| match self.finish_world {
            Some(n) if op == ReduceOp::Avg => finish_avg(dtype, d, n),
            _ => Ok(()),
        };
        match &self.base {
            None => d.with_bytes_mut(|d| {
                reduce_in_place(dtype, op, d, src)?;
                avg(d)
            })?,
            Some(b) => Region::with_pair(&d, &b.sub(off..off + src.len()), |d, a| {
                reduce_to(dtype, op, d, a, src)?;
                avg(d)
            })?,
        }
    }
}

impl PayloadSink for ReduceSink {
    fn consume(&mut self, mut off: usize, mut bytes: &[u8]) -> Result<()> {
        let e = self.dtype.size();
        if self.carried > 0 {
            let take = (e - self.carried).min(bytes.len());
            self.carry[self.carried..self.carried + take].copy_from_slice(&bytes[..take]);
            self.carried += take;
            bytes = &bytes[take..];
            off += take;
            if self.carried < e {
                return Ok(());
            }
            let elem = self.carry;
            self.apply(off - e, &elem[..e])?;
            self.carried = 0;
        }
        let whole = bytes.len() / e * e;
        if whole > 0 {
            self.apply(off, &bytes[..whole])?;
        }
        let rest = &bytes[whole..];
        self.carry[..rest.len()].copy_from_slice(rest);
        self.carried = rest.len();
        Ok(())
    }
}
