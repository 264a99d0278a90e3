//! The collectives, as one descriptor ([`Collective`]) run over regions, plus typed
//! convenience methods over slices and vectors.
//!
//! Every call is validated here before anything is sent: wrong sizes, roots, peers or dtypes
//! are [`Error::InvalidUsage`] on the calling rank and leave the communicator usable. What
//! only the peers can see (they called something else, or with other sizes) is caught by the
//! frame headers during the call and fails every rank with a mismatch error.

use std::sync::{Arc, OnceLock};

use devccl_core::memory::{Region, RegionSlice};
use devccl_core::wire::CollKind;
use devccl_core::{DType, Element, Error, ReduceOp, Result};

use crate::algo::{self, Shape};
use crate::comm::{Call, Communicator};
use crate::schedule::Builder;
use crate::work::Work;

/// A collective and its parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Collective {
    /// Every rank gets the reduction of every rank's input. in = out = count.
    AllReduce {
        /// Reduction.
        op: ReduceOp,
    },
    /// Every rank gets the root's input. in = out = count (root reads in, all write out).
    Broadcast {
        /// Source rank.
        root: usize,
    },
    /// The root gets the reduction. in = count; out = count on the root (ignored elsewhere).
    Reduce {
        /// Reduction.
        op: ReduceOp,
        /// Destination rank.
        root: usize,
    },
    /// Every rank gets every rank's input, in rank order. out = n × in.
    AllGather,
    /// Rank r gets the reduction of block r of every rank's input. in = n × out.
    ReduceScatter {
        /// Reduction.
        op: ReduceOp,
    },
    /// Block j of rank i's input goes to block i of rank j's output. in = out = n × block.
    AllToAll,
    /// All-to-all with per-peer element counts and displacements (in elements).
    AllToAllV {
        /// Elements sent to each rank.
        send_counts: Vec<usize>,
        /// Where each rank's elements start in the input.
        send_displs: Vec<usize>,
        /// Elements received from each rank.
        recv_counts: Vec<usize>,
        /// Where each rank's elements go in the output.
        recv_displs: Vec<usize>,
    },
    /// The root gets every rank's input in rank order. out = n × in on the root.
    Gather {
        /// Destination rank.
        root: usize,
    },
    /// Rank r gets block r of the root's input. in = n × out on the root.
    Scatter {
        /// Source rank.
        root: usize,
    },
    /// Send the input to `peer` (matched in order with its `Recv` for the same tag).
    Send {
        /// Destination.
        peer: usize,
        /// Tag (both sides must agree).
        tag: u32,
    },
    /// Receive into the output from `peer`.
    Recv {
        /// Source.
        peer: usize,
        /// Tag.
        tag: u32,
    },
    /// Wait until every rank has entered.
    Barrier,
}

impl Collective {
    /// The wire kind.
    pub fn kind(&self) -> CollKind {
        match self {
            Collective::AllReduce { .. } => CollKind::AllReduce,
            Collective::Broadcast { .. } => CollKind::Broadcast,
            Collective::Reduce { .. } => CollKind::Reduce,
            Collective::AllGather => CollKind::AllGather,
            Collective::ReduceScatter { .. } => CollKind::ReduceScatter,
            Collective::AllToAll => CollKind::AllToAll,
            Collective::AllToAllV { .. } => CollKind::AllToAllV,
            Collective::Gather { .. } => CollKind::Gather,
            Collective::Scatter { .. } => CollKind::Scatter,
            Collective::Send { .. } | Collective::Recv { .. } => CollKind::SendRecv,
            Collective::Barrier => CollKind::Barrier,
        }
    }

    fn op(&self) -> Option<ReduceOp> {
        match self {
            Collective::AllReduce { op } | Collective::Reduce { op, .. } | Collective::ReduceScatter { op } => {
                Some(*op)
            }
            _ => None,
        }
    }

    fn root(&self) -> Option<usize> {
        match self {
            Collective::Broadcast { root }
            | Collective::Reduce { root, .. }
            | Collective::Gather { root }
            | Collective::Scatter { root } => Some(*root),
            _ => None,
        }
    }
}

/// One operation of a point-to-point batch ([`Communicator::p2p_batch`]).
#[derive(Debug, Clone)]
pub struct P2pOp {
    /// Send (`true`) or receive.
    pub send: bool,
    /// The other rank.
    pub peer: usize,
    /// Tag; both sides must agree.
    pub tag: u32,
    /// Element type.
    pub dtype: DType,
    /// What to send, or where to receive.
    pub buf: RegionSlice,
}

/// A validated call, ready to run.
struct Prepared {
    call: Call,
    shape: Shape,
    nchannels: usize,
    input: RegionSlice,
    output: RegionSlice,
    /// Device calls whose input must be copied first (see [`Communicator::prepare`]): the
    /// copy runs when the call starts executing, after the work it is ordered behind.
    pre_copy: Option<PreCopy>,
}

/// A private copy of a device input, taken when the call starts executing.
#[derive(Debug, Clone)]
struct PreCopy {
    src: RegionSlice,
    dst: RegionSlice,
}

fn elems(what: &str, s: &RegionSlice, dtype: DType) -> Result<usize> {
    if !s.len().is_multiple_of(dtype.size()) {
        return Err(Error::usage(format!("{what}: {} bytes is not a whole number of {dtype} elements", s.len())));
    }
    Ok(s.len() / dtype.size())
}

fn need(cond: bool, msg: impl FnOnce() -> String) -> Result<()> {
    if cond { Ok(()) } else { Err(Error::usage(msg())) }
}

/// True when two slices overlap in memory.
fn overlaps(a: &RegionSlice, b: &RegionSlice) -> bool {
    a.region.same(&b.region) && a.range.start < b.range.end && b.range.start < a.range.end
}

fn same(a: &RegionSlice, b: &RegionSlice) -> bool {
    a.region.same(&b.region) && a.range == b.range
}

impl Communicator {
    fn prepare(&self, c: &Collective, dtype: DType, input: RegionSlice, output: RegionSlice) -> Result<Prepared> {
        let (rank, n) = (self.rank(), self.world_size());
        let name = c.kind().name();
        if let Some(root) = c.root() {
            need(root < n, || format!("{name}: root {root} is not a rank of this {n}-rank communicator"))?;
        }
        let ni = elems(&format!("{name} input"), &input, dtype)?;
        let no = elems(&format!("{name} output"), &output, dtype)?;
        let in_place = same(&input, &output);
        if !in_place && !output.region.writable() && no > 0 {
            return Err(Error::usage(format!("{name}: the output is read-only")));
        }
        let mut input = input;
        let mut pre_copy = None;
        // All-reduce, broadcast and reduce run in place natively, and all-gather with the
        // input as this rank's block of the output. Every other overlap (reduce-scatter with
        // the output inside the input, in-place all-to-all, gather/scatter with the root's
        // block in place, ...) works on a private copy of the input taken now, at the call.
        let native = (in_place
            && matches!(c, Collective::AllReduce { .. } | Collective::Broadcast { .. } | Collective::Reduce { .. }))
            || matches!(c, Collective::AllGather);
        if overlaps(&input, &output) && !native {
            if !in_place
                && !matches!(
                    c,
                    Collective::ReduceScatter { .. }
                        | Collective::Gather { .. }
                        | Collective::Scatter { .. }
                        | Collective::AllToAll
                        | Collective::AllToAllV { .. }
                )
            {
                return Err(Error::usage(format!("{name}: input and output overlap without being the same buffer")));
            }
            // Host memory is copied now, at the call. Device memory may still be written by
            // work queued before this call (an earlier collective, the caller's stream): its
            // copy runs on the device when the call starts executing.
            let dev = crate::comm::device_of(&[&input])?;
            if dev.id().is_host() {
                input = copy_of(&input, self.config().timeout)?;
            } else {
                let copy = dev.alloc(input.len())?.full();
                pre_copy = Some(PreCopy { src: input, dst: copy.clone() });
                input = copy;
            }
        }
        let count = match c {
            Collective::AllReduce { .. } | Collective::Broadcast { .. } => {
                need(ni == no, || format!("{name}: input has {ni} elements but output has {no}"))?;
                no
            }
            Collective::Reduce { root, .. } => {
                need(rank != *root || ni == no, || {
                    format!("reduce: the root's input has {ni} elements but its output has {no}")
                })?;
                ni
            }
            Collective::AllGather => {
                need(no == n * ni, || format!("all_gather: output has {no} elements, needs {n} × {ni} = {}", n * ni))?;
                if overlaps(&input, &output) {
                    let at = rank * ni * dtype.size();
                    need(input.region.same(&output.region) && input.range.start == output.range.start + at, || {
                        "all_gather: an input inside the output must be the output's block for this rank (in-place all_gather)".into()
                    })?;
                }
                ni
            }
            Collective::ReduceScatter { .. } => {
                need(ni == n * no, || {
                    format!("reduce_scatter: input has {ni} elements, needs {n} × {no} = {}", n * no)
                })?;
                no
            }
            Collective::AllToAll => {
                need(ni == no, || format!("all_to_all: input has {ni} elements but output has {no}"))?;
                need(ni % n == 0, || format!("all_to_all: {ni} elements do not split into {n} equal blocks"))?;
                ni / n
            }
            Collective::AllToAllV { send_counts, send_displs, recv_counts, recv_displs } => {
                for (what, v) in [
                    ("send_counts", send_counts),
                    ("send_displs", send_displs),
                    ("recv_counts", recv_counts),
                    ("recv_displs", recv_displs),
                ] {
                    need(v.len() == n, || format!("all_to_all_v: {what} has {} entries for {n} ranks", v.len()))?;
                }
                for j in 0..n {
                    need(send_displs[j] + send_counts[j] <= ni, || {
                        format!("all_to_all_v: the block for rank {j} ends past the input ({ni} elements)")
                    })?;
                    need(recv_displs[j] + recv_counts[j] <= no, || {
                        format!("all_to_all_v: the block from rank {j} ends past the output ({no} elements)")
                    })?;
                }
                0
            }
            Collective::Gather { root } => {
                need(rank != *root || no == n * ni, || {
                    format!("gather: the root's output has {no} elements, needs {n} × {ni}")
                })?;
                ni
            }
            Collective::Scatter { root } => {
                need(rank != *root || ni == n * no, || {
                    format!("scatter: the root's input has {ni} elements, needs {n} × {no}")
                })?;
                no
            }
            Collective::Send { peer, .. } | Collective::Recv { peer, .. } => {
                need(*peer < n && *peer != rank, || {
                    format!(
                        "{}: peer {peer} is not another rank of this {n}-rank communicator",
                        if matches!(c, Collective::Send { .. }) { "send" } else { "recv" }
                    )
                })?;
                if matches!(c, Collective::Send { .. }) { ni } else { no }
            }
            Collective::Barrier => 0,
        };
        let bytes = match c {
            // The model prices the whole exchanged buffer for the block collectives.
            Collective::AllGather
            | Collective::ReduceScatter { .. }
            | Collective::AllToAll
            | Collective::Gather { .. }
            | Collective::Scatter { .. } => count * dtype.size() * n,
            _ => count * dtype.size(),
        };
        let plan = match c {
            Collective::AllToAllV { .. } | Collective::Send { .. } | Collective::Recv { .. } => crate::select::Plan {
                algo: crate::algo::Algo::Direct,
                chunk: self.config().chunk.unwrap_or(512 << 10),
                nchannels: 1,
                est_us: 0.0,
                forced: false,
            },
            _ => self.plan(c.kind(), bytes),
        };
        let shape = Shape { rank, n, count, esize: dtype.size(), chunk_bytes: plan.chunk, root: c.root().unwrap_or(0) };
        let tag = match c {
            Collective::Send { tag, .. } | Collective::Recv { tag, .. } => *tag,
            _ => 0,
        };
        let call = Call { coll: c.kind(), dtype, op: c.op(), root: c.root(), count, algo: plan.algo, tag };
        Ok(Prepared { call, shape, nchannels: plan.nchannels.max(1), input, output, pre_copy })
    }

    fn builder(c: &Collective, p: &Prepared) -> impl FnOnce(&mut Builder) + use<> {
        let (c, call, shape, nchannels) = (c.clone(), p.call, p.shape, p.nchannels);
        move |b: &mut Builder| match &c {
            Collective::AllToAllV { send_counts, send_displs, recv_counts, recv_displs } => algo::direct::all_to_all_v(
                b,
                shape.rank,
                shape.n,
                shape.esize,
                send_counts,
                send_displs,
                recv_counts,
                recv_displs,
                shape.chunk_bytes,
            ),
            Collective::Send { peer, .. } => algo::p2p::send(b, *peer, shape.count * shape.esize, shape.chunk_bytes),
            Collective::Recv { peer, .. } => algo::p2p::recv(b, *peer, shape.count * shape.esize, shape.chunk_bytes),
            Collective::AllReduce { .. } | Collective::Broadcast { .. } | Collective::Reduce { .. }
                if nchannels > 1 && shape.count >= nchannels =>
            {
                // Channels: the buffer cut into contiguous parts, one schedule each, merged so
                // their messages alternate (NCCL's channels; here they spread over the lanes).
                let parts = (0..nchannels)
                    .map(|c| {
                        let r = algo::block(shape.count, nchannels, c);
                        let mut sub = Builder::new();
                        let sh = Shape { count: r.len(), ..shape };
                        algo::build(call.coll, call.algo, &mut sub, sh)
                            .expect("selection only picks supported algorithms");
                        let shift = r.start * shape.esize;
                        (sub, shift, shift)
                    })
                    .collect();
                *b = Builder::interleave(parts);
            }
            _ => algo::build(call.coll, call.algo, b, shape).expect("selection only picks supported algorithms"),
        }
    }

    /// Run a collective on regions (blocking). `input` and `output` may be the same slice
    /// for in-place calls (all_reduce, broadcast, reduce, reduce_scatter's output inside its
    /// input is not supported; all_gather in place: `input` is the rank's block of `output`).
    /// Regions may be host memory or device memory (CUDA, Vulkan): reductions then run on
    /// that device, staged through pinned host memory where a transport cannot reach it.
    pub fn collective(&self, c: &Collective, dtype: DType, input: RegionSlice, output: RegionSlice) -> Result<()> {
        let job = self.prepared_job(c, dtype, input, output)?;
        self.engine().check_alive()?;
        self.engine().run_blocking(job)
    }

    /// Queue a collective on regions; returns at once.
    pub fn collective_async(&self, c: &Collective, dtype: DType, input: RegionSlice, output: RegionSlice) -> Work<()> {
        match self.prepared_job(c, dtype, input, output) {
            Ok(job) => self.submit_job(job),
            Err(e) => Work::failed(e),
        }
    }

    /// Stream-ordered collective on CUDA memory, like an NCCL call on `stream` (a raw
    /// `CUstream`; 0 is the legacy default stream): its device work waits for everything
    /// queued on `stream` before this call, and it returns without blocking the host. Work
    /// queued on a stream after [`StreamWork::hold`] on it waits for the collective (hold
    /// `stream` at once for NCCL's blocking-call semantics, or later, when the caller waits,
    /// for `async_op` semantics). Errors found before queueing return `Err` and hold nothing;
    /// errors during the call release held streams (the output is then undefined) and are
    /// reported by [`StreamWork::wait`]. The regions stay alive until the call finished.
    pub fn collective_on_stream(
        &self,
        c: &Collective,
        dtype: DType,
        input: RegionSlice,
        output: RegionSlice,
        stream: u64,
    ) -> Result<StreamWork> {
        let device = crate::comm::device_of(&[&input, &output])?;
        let (point, gate) = (device.queue_point(stream)?, device.queue_gate()?);
        let job = self.prepared_job(c, dtype, input, output)?;
        self.stream_ordered(job, point, gate)
    }

    /// Stream-ordered [`Communicator::p2p_batch`] (see [`Communicator::collective_on_stream`]).
    pub fn p2p_batch_on_stream(&self, ops: Vec<P2pOp>, stream: u64) -> Result<StreamWork> {
        let device = crate::comm::device_of(&ops.iter().map(|o| &o.buf).collect::<Vec<_>>())?;
        let (point, gate) = (device.queue_point(stream)?, device.queue_gate()?);
        let job = self.p2p_job(ops)?;
        self.stream_ordered(job, point, gate)
    }

    /// Queue `job` ordered after `point`, opening `gate` when it ends.
    fn stream_ordered(
        &self,
        mut job: crate::work::Job,
        mut point: Box<dyn devccl_core::device::QueuePoint>,
        gate: std::sync::Arc<dyn devccl_core::device::QueueGate>,
    ) -> Result<StreamWork> {
        self.engine().check_alive()?;
        let copy = job.before.take();
        job.before = Some(Box::new(move || {
            point.order_internal()?;
            copy.map_or(Ok(()), |f| f())
        }));
        let opened = gate.clone();
        job.after = Some(Box::new(move |_| opened.open()));
        Ok(StreamWork { work: self.submit_job(job), gate, source: None })
    }

    /// The job for a validated call, with the device pre-copy (if any) as its before hook.
    fn prepared_job(
        &self,
        c: &Collective,
        dtype: DType,
        input: RegionSlice,
        output: RegionSlice,
    ) -> Result<crate::work::Job> {
        let p = self.prepare(c, dtype, input, output)?;
        let build = Communicator::builder(c, &p);
        let mut job = self.job(p.call, build, p.input, p.output)?;
        if let Some(pc) = p.pre_copy {
            let dev = job.bindings.device.clone();
            let timeout = self.config().timeout;
            job.before = Some(Box::new(move || {
                dev.copy(&pc.dst, &pc.src)?
                    .wait(std::time::Instant::now() + timeout, "copying an overlapping input on the device")
            }));
        }
        Ok(job)
    }

    fn submit_job(&self, job: crate::work::Job) -> Work<()> {
        if let Err(e) = self.engine().check_alive() {
            return Work::failed(e);
        }
        let done = job.done.clone();
        self.engine().submit(job);
        Work::new(done, || Ok(()))
    }

    /// Run several sends and receives as one operation, like NCCL's group calls around
    /// send/recv or torch's `batch_isend_irecv`: they progress together, so two ranks that
    /// each send to the other before receiving cannot deadlock however large the messages
    /// are. Between a pair of ranks, messages still match in the order the operations are
    /// listed (sends against the peer's receives), and each receive's tag, size and dtype
    /// must match the corresponding send.
    pub fn p2p_batch(&self, ops: Vec<P2pOp>) -> Result<()> {
        let job = self.p2p_job(ops)?;
        self.engine().check_alive()?;
        self.engine().run_blocking(job)
    }

    /// Asynchronous [`Communicator::p2p_batch`].
    pub fn p2p_batch_async(&self, ops: Vec<P2pOp>) -> Work<()> {
        match self.p2p_job(ops) {
            Ok(job) => self.submit_job(job),
            Err(e) => Work::failed(e),
        }
    }

    fn p2p_job(&self, ops: Vec<P2pOp>) -> Result<crate::work::Job> {
        let (rank, n) = (self.rank(), self.world_size());
        if ops.is_empty() {
            return Err(Error::usage("p2p_batch: no operations"));
        }
        if ops.len() > u16::MAX as usize {
            return Err(Error::usage(format!("p2p_batch: {} operations (at most {})", ops.len(), u16::MAX)));
        }
        let chunk = self.config().chunk.unwrap_or(512 << 10);
        let mut b = Builder::new();
        let mut calls = Vec::with_capacity(ops.len());
        let mut scratch = Vec::with_capacity(ops.len());
        for (k, op) in ops.into_iter().enumerate() {
            let what = if op.send { "send" } else { "recv" };
            need(op.peer < n && op.peer != rank, || {
                format!("p2p_batch: {what} #{k}: peer {} is not another rank of this {n}-rank communicator", op.peer)
            })?;
            let count = elems(&format!("p2p_batch {what} #{k}"), &op.buf, op.dtype)?;
            if !op.send && !op.buf.region.writable() {
                return Err(Error::usage(format!("p2p_batch: recv #{k} into read-only memory")));
            }
            let mut sub = Builder::new();
            if op.send {
                algo::p2p::send(&mut sub, op.peer, op.buf.len(), chunk);
            } else {
                algo::p2p::recv(&mut sub, op.peer, op.buf.len(), chunk);
            }
            // Each operation's buffer becomes the run's scratch slot k.
            let slot = crate::schedule::Buf::Scratch(k as u16);
            b.append(sub, k as u16, |l| crate::schedule::Loc::new(slot, l.off));
            calls.push(crate::exec::CallInfo {
                coll: CollKind::SendRecv,
                dtype: op.dtype,
                op: None,
                root: None,
                count: count as u64,
                seq: devccl_core::Seq(0),
                algo: algo::Algo::Direct as u8,
                tag: op.tag,
            });
            scratch.push(op.buf);
        }
        let mut sched = b.build();
        sched.scratch.clear(); // the slots are the operations' own buffers
        let device = crate::comm::device_of(&scratch.iter().collect::<Vec<_>>())?;
        let sched = self.lower_for(sched, device.id());
        let empty = Region::alloc(0).full();
        let mut bindings = crate::exec::Bindings::host(empty.clone(), empty, scratch);
        bindings.device = device;
        Ok(crate::work::Job::new(sched, calls, bindings))
    }

    /// Typed blocking call over slices: `input` is read, `output` written (pass the same
    /// data as both through [`Communicator::collective_in_place`] for in-place forms).
    pub fn collective_into<T: Element>(&self, c: &Collective, input: &[T], output: &mut [T]) -> Result<()> {
        Region::scoped_ref(bytemuck::cast_slice(input), |i| {
            Region::scoped(bytemuck::cast_slice_mut(output), |o| self.collective(c, T::DTYPE, i.full(), o.full()))
        })
    }

    /// Typed blocking in-place call.
    pub fn collective_in_place<T: Element>(&self, c: &Collective, buf: &mut [T]) -> Result<()> {
        Region::scoped(bytemuck::cast_slice_mut(buf), |r| self.collective(c, T::DTYPE, r.full(), r.full()))
    }

    /// Broadcast `buf` from `root` (in place).
    pub fn broadcast<T: Element>(&self, buf: &mut [T], root: usize) -> Result<()> {
        self.collective_in_place(&Collective::Broadcast { root }, buf)
    }

    /// Reduce every rank's `send` into `recv` on `root` (`recv` is untouched elsewhere).
    pub fn reduce_into<T: Element>(&self, send: &[T], recv: &mut [T], op: ReduceOp, root: usize) -> Result<()> {
        self.collective_into(&Collective::Reduce { op, root }, send, recv)
    }

    /// Gather every rank's `send` into `recv` (n × len), in rank order.
    pub fn all_gather_into<T: Element>(&self, send: &[T], recv: &mut [T]) -> Result<()> {
        self.collective_into(&Collective::AllGather, send, recv)
    }

    /// Reduce `send` (n × len) and scatter: rank r gets block r of the reduction.
    pub fn reduce_scatter_into<T: Element>(&self, send: &[T], recv: &mut [T], op: ReduceOp) -> Result<()> {
        self.collective_into(&Collective::ReduceScatter { op }, send, recv)
    }

    /// Equal-split all-to-all.
    pub fn all_to_all_into<T: Element>(&self, send: &[T], recv: &mut [T]) -> Result<()> {
        self.collective_into(&Collective::AllToAll, send, recv)
    }

    /// All-to-all with per-rank counts and displacements (elements).
    pub fn all_to_all_v_into<T: Element>(
        &self,
        send: &[T],
        send_counts: &[usize],
        send_displs: &[usize],
        recv: &mut [T],
        recv_counts: &[usize],
        recv_displs: &[usize],
    ) -> Result<()> {
        let c = Collective::AllToAllV {
            send_counts: send_counts.to_vec(),
            send_displs: send_displs.to_vec(),
            recv_counts: recv_counts.to_vec(),
            recv_displs: recv_displs.to_vec(),
        };
        self.collective_into(&c, send, recv)
    }

    /// Gather every rank's `send` into `recv` on `root` (n × len there; pass `&mut []`
    /// elsewhere).
    pub fn gather_into<T: Element>(&self, send: &[T], recv: &mut [T], root: usize) -> Result<()> {
        self.collective_into(&Collective::Gather { root }, send, recv)
    }

    /// Scatter the root's `send` (n × len) so rank r gets block r in `recv` (pass `&[]`
    /// as `send` off the root).
    pub fn scatter_into<T: Element>(&self, send: &[T], recv: &mut [T], root: usize) -> Result<()> {
        self.collective_into(&Collective::Scatter { root }, send, recv)
    }

    /// Send `buf` to `peer`. Messages between a pair are received in the order sent; the
    /// receiver's tag must match.
    pub fn send<T: Element>(&self, buf: &[T], peer: usize, tag: u32) -> Result<()> {
        self.collective_into(&Collective::Send { peer, tag }, buf, &mut [])
    }

    /// Receive from `peer` into `buf`.
    pub fn recv<T: Element>(&self, buf: &mut [T], peer: usize, tag: u32) -> Result<()> {
        self.collective_into(&Collective::Recv { peer, tag }, &[], buf)
    }

    /// Receive into `output` from whichever rank sends first (like `MPI_ANY_SOURCE`, or
    /// torch's `recv` without `src`); returns the source rank. The message taken is the first
    /// found whose sender's next point-to-point message to this rank (in that pair's usual
    /// order) carries `tag`; a rank whose next message is something else does not match
    /// (nothing is skipped), and other ready messages stay queued for later receives. The
    /// receive then proceeds as [`Communicator::recv`] from that rank: its size and dtype
    /// must match the send. Runs in issue order with the communicator's other calls; the
    /// wait is bounded by the communicator's timeout (`Error::Timeout` naming the tag and the
    /// ranks), and ends at once on abort or when a sender failed. `output` may be host or
    /// device memory; it must not be empty (an empty send sends no message to match).
    pub fn recv_any(&self, dtype: DType, output: RegionSlice, tag: u32) -> Result<usize> {
        let (job, source) = self.recv_any_job(dtype, output, tag)?;
        self.engine().check_alive()?;
        self.engine().run_blocking(job)?;
        chosen(&source)
    }

    /// Typed [`Communicator::recv_any`] into a slice; returns the source rank.
    pub fn recv_any_into<T: Element>(&self, buf: &mut [T], tag: u32) -> Result<usize> {
        Region::scoped(bytemuck::cast_slice_mut(buf), |o| self.recv_any(T::DTYPE, o.full(), tag))
    }

    /// Asynchronous [`Communicator::recv_any`]: queued in issue order; `wait` returns the
    /// source rank. The region stays alive until the work finished.
    pub fn recv_any_async(&self, dtype: DType, output: RegionSlice, tag: u32) -> Work<usize> {
        match self.recv_any_job(dtype, output, tag) {
            Ok((job, source)) => self.submit_job(job).map(move |()| chosen(&source)),
            Err(e) => Work::failed(e),
        }
    }

    /// Stream-ordered [`Communicator::recv_any`] on CUDA memory (see
    /// [`Communicator::collective_on_stream`]); [`StreamWork::source`] names the source once
    /// the call finished.
    pub fn recv_any_on_stream(&self, dtype: DType, output: RegionSlice, tag: u32, stream: u64) -> Result<StreamWork> {
        let device = crate::comm::device_of(&[&output])?;
        let (point, gate) = (device.queue_point(stream)?, device.queue_gate()?);
        let (job, source) = self.recv_any_job(dtype, output, tag)?;
        let mut sw = self.stream_ordered(job, point, gate)?;
        sw.source = Some(source);
        Ok(sw)
    }

    /// The job of a receive from any rank: validated now, its schedule built once the job
    /// runs and the source is known.
    fn recv_any_job(
        &self,
        dtype: DType,
        output: RegionSlice,
        tag: u32,
    ) -> Result<(crate::work::Job, Arc<OnceLock<usize>>)> {
        let n = self.world_size();
        let count = elems("recv_any output", &output, dtype)?;
        need(n > 1, || format!("recv_any: no other rank to receive from in a {n}-rank communicator"))?;
        need(count > 0, || {
            "recv_any: the buffer is empty (an empty send sends no message, so there is nothing to match)".into()
        })?;
        need(output.region.writable(), || "recv_any: the output is read-only".into())?;
        let device = crate::comm::device_of(&[&output])?;
        let dev = device.id();
        let (bytes, chunk, lower) = (output.len(), self.config().chunk.unwrap_or(512 << 10), self.lowering());
        let build = Box::new(move |peer: usize| {
            let mut b = Builder::new();
            algo::p2p::recv(&mut b, peer, bytes, chunk);
            lower(b.build(), dev)
        });
        let info = crate::exec::CallInfo {
            coll: CollKind::SendRecv,
            dtype,
            op: None,
            root: None,
            count: count as u64,
            seq: devccl_core::Seq(0), // assigned when it runs
            algo: algo::Algo::Direct as u8,
            tag,
        };
        let empty = Region::alloc(0).full();
        let mut bindings = crate::exec::Bindings::host(empty, output, Vec::new());
        bindings.device = device;
        let mut job = crate::work::Job::new(Builder::new().build(), vec![info], bindings);
        let source = Arc::new(OnceLock::new());
        job.any = Some(crate::work::AnySource { build, source: source.clone() });
        Ok((job, source))
    }

    /// Block until every rank has called `barrier`.
    pub fn barrier(&self) -> Result<()> {
        self.collective_into::<u8>(&Collective::Barrier, &[], &mut [])
    }

    /// Asynchronous typed call: `buf` is the input and output (in-place forms) or the input
    /// (with `out_len` elements of output allocated); `wait` returns the output vector.
    pub fn collective_vec_async<T: Element>(
        &self,
        c: &Collective,
        input: Vec<T>,
        out_len: Option<usize>,
    ) -> Work<Vec<T>> {
        let inp = Region::from_vec(input);
        match out_len {
            None => {
                let w = self.collective_async(c, T::DTYPE, inp.full(), inp.full());
                w.map(move |()| {
                    inp.into_vec::<T>().map_err(|_| Error::Internal("buffer still shared after completion".into()))
                })
            }
            Some(len) => {
                let out = Region::from_vec(vec![T::zeroed(); len]);
                let w = self.collective_async(c, T::DTYPE, inp.full(), out.full());
                w.map(move |()| {
                    drop(inp);
                    out.into_vec::<T>().map_err(|_| Error::Internal("buffer still shared after completion".into()))
                })
            }
        }
    }

    /// Asynchronous all-gather: returns the n × len gathered vector.
    pub fn all_gather_async<T: Element>(&self, send: Vec<T>) -> Work<Vec<T>> {
        let len = send.len() * self.world_size();
        self.collective_vec_async(&Collective::AllGather, send, Some(len))
    }

    /// Asynchronous reduce-scatter: returns this rank's reduced block.
    pub fn reduce_scatter_async<T: Element>(&self, send: Vec<T>, op: ReduceOp) -> Work<Vec<T>> {
        let n = self.world_size();
        if !send.len().is_multiple_of(n) {
            return Work::failed(Error::usage(format!(
                "reduce_scatter: {} elements do not split into {n} blocks",
                send.len()
            )));
        }
        let len = send.len() / n;
        self.collective_vec_async(&Collective::ReduceScatter { op }, send, Some(len))
    }

    /// Asynchronous broadcast (in place).
    pub fn broadcast_async<T: Element>(&self, buf: Vec<T>, root: usize) -> Work<Vec<T>> {
        self.collective_vec_async(&Collective::Broadcast { root }, buf, None)
    }

    /// Asynchronous barrier.
    pub fn barrier_async(&self) -> Work<()> {
        let empty = Region::alloc(0);
        self.collective_async(&Collective::Barrier, DType::U8, empty.full(), empty.full())
    }

    /// Batch form: all-reduce many buffers as one operation (packed into one contiguous
    /// buffer, reduced, unpacked), which costs one round of latency instead of one per buffer.
    pub fn all_reduce_coalesced_async<T: Element>(&self, bufs: Vec<Vec<T>>, op: ReduceOp) -> Work<Vec<Vec<T>>> {
        let lens: Vec<usize> = bufs.iter().map(Vec::len).collect();
        let packed: Vec<T> = bufs.into_iter().flatten().collect();
        self.all_reduce_async(packed, op).map(move |flat| {
            let mut out = Vec::with_capacity(lens.len());
            let mut at = 0;
            for l in lens {
                out.push(flat[at..at + l].to_vec());
                at += l;
            }
            Ok(out)
        })
    }
}

/// The source an any-source receive chose (set when it finished successfully).
fn chosen(source: &OnceLock<usize>) -> Result<usize> {
    source.get().copied().ok_or_else(|| Error::Internal("recv_any finished without a source".into()))
}

/// A private host copy of `s` (in-place forms of collectives whose algorithms read the input
/// after the output has been written).
fn copy_of(s: &RegionSlice, timeout: std::time::Duration) -> Result<RegionSlice> {
    let dev = devccl_core::device::host();
    let r = dev.alloc(s.len())?;
    dev.copy(&r.full(), s)?.wait(std::time::Instant::now() + timeout, "copying an overlapping input")?;
    Ok(r.full())
}

/// A stream-ordered collective in flight ([`Communicator::collective_on_stream`]).
#[derive(Debug)]
pub struct StreamWork {
    work: Work<()>,
    gate: std::sync::Arc<dyn devccl_core::device::QueueGate>,
    /// The source of a receive from any rank ([`Communicator::recv_any_on_stream`]).
    source: Option<Arc<OnceLock<usize>>>,
}

impl StreamWork {
    /// Make work queued on `stream` from now on wait for the collective (never blocks the
    /// host; may be called for several streams, before or after the collective finished).
    pub fn hold(&self, stream: u64) -> Result<()> {
        self.gate.hold(stream)
    }

    /// True once the collective finished on the host side (its device work too).
    pub fn test(&self) -> bool {
        self.work.test()
    }

    /// Block the host until the collective finished; its error, if it failed.
    pub fn wait(self) -> Result<()> {
        self.work.wait()
    }

    /// Wait at most `timeout`; true when finished.
    pub fn wait_timeout(&self, timeout: std::time::Duration) -> bool {
        self.work.wait_timeout(timeout)
    }

    /// For a receive from any rank ([`Communicator::recv_any_on_stream`]): the source rank,
    /// once the call finished successfully; `None` before, after a failure, and for every
    /// other call.
    pub fn source(&self) -> Option<usize> {
        self.source.as_ref().and_then(|s| s.get().copied())
    }
}
