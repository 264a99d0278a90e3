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

use devccl_core::memory::{Region, RegionSlice};
use devccl_core::op::{finish_avg, reduce_in_place, reduce_to};
use devccl_core::transport::{
    Completion, Connection, Interest, PayloadSink, RecvLayout, RecvRequest, ReqId, SendRequest, wait_ready,
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
    /// operations, each operation's buffer).
    pub scratch: Vec<RegionSlice>,
}

impl Bindings {
    fn slice(&self, loc: Loc, len: usize) -> RegionSlice {
        match loc.buf {
            Buf::Input => self.input.sub(loc.off..loc.off + len),
            Buf::Output => self.output.sub(loc.off..loc.off + len),
            Buf::Scratch(i) => self.scratch[i as usize].sub(loc.off..loc.off + len),
        }
    }
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
    staging: Vec<Region>,
    seq: u64,
    p2p_tx: Vec<u64>,
    p2p_rx: Vec<u64>,
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
            staging: Vec::new(),
            seq: 0,
            p2p_tx: vec![0; world],
            p2p_rx: vec![0; world],
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
                self.fail_all(call.seq, &format!("rank {} failed in {}: {e}", self.rank, call.describe()));
                Err(e)
            }
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

    fn ensure_slots(&mut self, n: usize, size: usize) {
        self.staging.retain(|r| r.len() >= size);
        while self.staging.len() < n {
            self.staging.push(Region::alloc(size.max(64)));
        }
    }

    fn run_inner(&mut self, sched: &Schedule, calls: &[CallInfo], b: &Bindings) -> Result<()> {
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
        self.ensure_slots(nslots, sched.max_staged());
        let slot_quota = (nslots / staged_peers).max(1);
        let mut run = Run {
            sched,
            calls,
            msg_of,
            b,
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
        };
        for i in 0..n {
            if run.pending[i] == 0 && sched.steps[i].peer().is_none() {
                run.ready.push(i as StepId);
            }
        }
        // Latency-bound calls (every message small) may poll longer before sleeping.
        let small = sched.steps.iter().all(|s| s.len() <= SMALL_MESSAGE);
        let spin_budget = if small { self.spin.budget_small } else { self.spin.budget };
        let mut last_progress = Instant::now();
        loop {
            if let Some(e) = self.abort.error() {
                return Err(e);
            }
            let mut moved = self.post(&mut run)?;
            moved |= self.test_all(&mut run)?;
            while let Some(s) = run.ready.pop() {
                self.local_step(&mut run, s)?;
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
                return Err(self.stall_error(&run));
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
            let left = self.timeout - idle;
            wait_ready(&fds, left.min(Duration::from_millis(200)))?;
        }
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
                        (self.staging[slot].slice(0..len), Some(slot))
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
                        if let Completion::Received { layout: RecvLayout::Scattered { pool, frags }, .. } = &done {
                            // Gather what the transport left in its RX pool (devmem layout).
                            let dst = match slot {
                                Some(k) => self.staging[k].slice(0..run.sched.steps[s as usize].len()),
                                None => match run.sched.steps[s as usize] {
                                    StepKind::Recv { dst, len, .. } => run.b.slice(dst, len),
                                    _ => unreachable!(),
                                },
                            };
                            gather(pool, frags, &dst)?;
                            conn.recv_consumed(id)?;
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

    fn local_step(&mut self, run: &mut Run<'_>, s: StepId) -> Result<()> {
        let call = &run.calls[run.sched.call(s)];
        let (dtype, op) = (call.dtype, call.op.unwrap_or(ReduceOp::Sum));
        let world = self.world;
        let avg = op == ReduceOp::Avg;
        match run.sched.steps[s as usize].clone() {
            StepKind::RecvReduce { peer, dst, base, len, finish } => {
                let slot = run.slot_of[s as usize].take().expect("staged receive has a slot");
                let staged = self.staging[slot].slice(0..len);
                let d = run.b.slice(dst, len);
                if same_place(run.b, dst, base) {
                    Region::with_pair(&d, &staged, |d, x| {
                        reduce_in_place(dtype, op, d, x)?;
                        if finish && avg { finish_avg(dtype, d, world) } else { Ok(()) }
                    })??;
                } else {
                    let a = run.b.slice(base, len);
                    Region::with_pair(&d, &a, |d, a| {
                        staged.with_bytes(|x| reduce_to(dtype, op, d, a, x))??;
                        if finish && avg { finish_avg(dtype, d, world) } else { Ok(()) }
                    })??;
                }
                run.free_slots.push(slot);
                run.slots_used[peer.idx()] -= 1;
            }
            StepKind::Copy { src, dst, len } => {
                if !same_place(run.b, src, dst) {
                    Region::with_pair(&run.b.slice(dst, len), &run.b.slice(src, len), |d, x| d.copy_from_slice(x))?;
                }
            }
            StepKind::Reduce { src, dst, len, finish } => {
                Region::with_pair(&run.b.slice(dst, len), &run.b.slice(src, len), |d, x| {
                    reduce_in_place(dtype, op, d, x)?;
                    if finish && avg { finish_avg(dtype, d, world) } else { Ok(()) }
                })??;
            }
            StepKind::Finish { dst, len } => {
                if avg {
                    run.b.slice(dst, len).with_bytes_mut(|d| finish_avg(dtype, d, world))??;
                }
            }
            StepKind::Send { .. } | StepKind::Recv { .. } => unreachable!("network steps are not local"),
        }
        self.complete(run, s);
        Ok(())
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
        Buf::Scratch(_) => None,
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

/// Copy scattered fragments from a transport's RX pool into `dst`.
fn gather(pool: &Region, frags: &[devccl_core::transport::Fragment], dst: &RegionSlice) -> Result<()> {
    let mut covered = 0usize;
    dst.with_bytes_mut(|d| -> Result<()> {
        for f in frags {
            let (so, len, dof) = (f.src_off as usize, f.len as usize, f.dst_off as usize);
            if dof + len > d.len() {
                return Err(Error::Internal(format!("fragment {f:?} outside a {}-byte receive", d.len())));
            }
            pool.with_bytes(so..so + len, |s| d[dof..dof + len].copy_from_slice(s))?;
            covered += len;
        }
        Ok(())
    })??;
    if covered != dst.len() {
        return Err(Error::Internal(format!("fragments cover {covered} of {} bytes", dst.len())));
    }
    Ok(())
}
