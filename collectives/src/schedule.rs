//! Schedules: what an algorithm asks the executor to do, as a DAG of primitive steps.
//!
//! An algorithm (see [`crate::algo`]) describes one collective on one rank as a list of
//! [`StepKind`]s with explicit dependencies — "send this chunk to the next rank once it has been
//! reduced", "receive into a staging slot and reduce into the output", "copy". The executor
//! ([`crate::exec`]) runs them with as many steps in flight as the transports allow, so the
//! chunks of a ring pipeline through the steps on their own.
//!
//! Messages between a pair of ranks match in schedule order: the k-th send to rank p on this
//! rank is the k-th receive from this rank on p. Algorithms therefore emit the steps of a
//! pair in the same order on both sides (they are written from one global description, so
//! this holds by construction; the frame header's message index checks it).

use devccl_core::Rank;

/// Which buffer of the call a step touches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Buf {
    /// The caller's input (the same memory as `Output` for in-place calls).
    Input,
    /// The caller's output.
    Output,
    /// A scratch buffer of the schedule (`Builder::scratch`).
    Scratch(u16),
    /// A host staging buffer added by [`crate::lower`] (pinned host memory the device reaches
    /// directly), never named by algorithms.
    Staging(u16),
}

/// A byte range of one buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Loc {
    /// Buffer.
    pub buf: Buf,
    /// Byte offset.
    pub off: usize,
}

impl Loc {
    /// Shorthand.
    pub fn new(buf: Buf, off: usize) -> Loc {
        Loc { buf, off }
    }
}

/// One primitive step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StepKind {
    /// Send `len` bytes at `src` to `peer`.
    Send {
        /// Destination rank.
        peer: Rank,
        /// Source.
        src: Loc,
        /// Bytes.
        len: usize,
    },
    /// Receive `len` bytes from `peer` straight into `dst`.
    Recv {
        /// Source rank.
        peer: Rank,
        /// Destination.
        dst: Loc,
        /// Bytes.
        len: usize,
    },
    /// Receive `len` bytes from `peer` into a staging slot, then `dst = base op incoming`
    /// (`base` may equal `dst`). With `finish`, the result is final: avg divides here.
    RecvReduce {
        /// Source rank.
        peer: Rank,
        /// Destination.
        dst: Loc,
        /// Local operand.
        base: Loc,
        /// Bytes.
        len: usize,
        /// Last reduction of these elements.
        finish: bool,
    },
    /// Local `dst = src`.
    Copy {
        /// Source.
        src: Loc,
        /// Destination.
        dst: Loc,
        /// Bytes.
        len: usize,
    },
    /// Local `dst = dst op src` (with `finish`: then divide for avg).
    Reduce {
        /// Source.
        src: Loc,
        /// Destination (and left operand).
        dst: Loc,
        /// Bytes.
        len: usize,
        /// Last reduction of these elements.
        finish: bool,
    },
    /// Local avg epilogue only: divide `len` bytes at `dst` by the world size.
    Finish {
        /// Where.
        dst: Loc,
        /// Bytes.
        len: usize,
    },
}

impl StepKind {
    /// The same step with every location passed through `f`.
    pub fn map_locs(&self, f: impl Fn(Loc) -> Loc) -> StepKind {
        match *self {
            StepKind::Send { peer, src, len } => StepKind::Send { peer, src: f(src), len },
            StepKind::Recv { peer, dst, len } => StepKind::Recv { peer, dst: f(dst), len },
            StepKind::RecvReduce { peer, dst, base, len, finish } => {
                StepKind::RecvReduce { peer, dst: f(dst), base: f(base), len, finish }
            }
            StepKind::Copy { src, dst, len } => StepKind::Copy { src: f(src), dst: f(dst), len },
            StepKind::Reduce { src, dst, len, finish } => StepKind::Reduce { src: f(src), dst: f(dst), len, finish },
            StepKind::Finish { dst, len } => StepKind::Finish { dst: f(dst), len },
        }
    }

    /// The peer of a network step.
    pub fn peer(&self) -> Option<Rank> {
        match self {
            StepKind::Send { peer, .. } | StepKind::Recv { peer, .. } | StepKind::RecvReduce { peer, .. } => {
                Some(*peer)
            }
            _ => None,
        }
    }

    /// Payload bytes of the step.
    pub fn len(&self) -> usize {
        match self {
            StepKind::Send { len, .. }
            | StepKind::Recv { len, .. }
            | StepKind::RecvReduce { len, .. }
            | StepKind::Copy { len, .. }
            | StepKind::Reduce { len, .. }
            | StepKind::Finish { len, .. } => *len,
        }
    }
}

/// Index of a step in its schedule.
pub type StepId = u32;

/// A finished schedule.
#[derive(Debug, Clone, Default)]
pub struct Schedule {
    /// Steps in emission (topological) order.
    pub steps: Vec<StepKind>,
    /// Number of dependencies of each step.
    pub ndeps: Vec<u32>,
    /// Successors of step i: `succ[succ_start[i]..succ_start[i+1]]`.
    pub succ_start: Vec<u32>,
    /// Flattened successor lists.
    pub succ: Vec<StepId>,
    /// Sizes of scratch buffers in bytes.
    pub scratch: Vec<usize>,
    /// Sizes of host staging buffers in bytes (added by [`crate::lower`]).
    pub staging: Vec<usize>,
    /// Which call of a multi-call run (batched point-to-point operations) each step belongs
    /// to; empty when every step belongs to call 0.
    pub call_of: Vec<u16>,
}

impl Schedule {
    /// The call step `s` belongs to.
    pub fn call(&self, s: StepId) -> usize {
        self.call_of.get(s as usize).map_or(0, |&c| c as usize)
    }

    /// Successors of a step.
    pub fn successors(&self, s: StepId) -> &[StepId] {
        let i = s as usize;
        &self.succ[self.succ_start[i] as usize..self.succ_start[i + 1] as usize]
    }

    /// Number of steps.
    pub fn len(&self) -> usize {
        self.steps.len()
    }

    /// True without steps.
    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }

    /// Largest receive-reduce payload (staging slot size).
    pub fn max_staged(&self) -> usize {
        self.steps
            .iter()
            .filter_map(|s| match s {
                StepKind::RecvReduce { len, .. } => Some(*len),
                _ => None,
            })
            .max()
            .unwrap_or(0)
    }
}

/// Builds a [`Schedule`]; dependencies must point to earlier steps.
#[derive(Debug, Default)]
pub struct Builder {
    steps: Vec<StepKind>,
    deps: Vec<(StepId, StepId)>,
    scratch: Vec<usize>,
    call_of: Vec<u16>,
    call: u16,
}

impl Builder {
    /// Empty builder.
    pub fn new() -> Builder {
        Builder::default()
    }

    /// Add a step that depends on `deps` (earlier steps; `None`s ignored).
    pub fn step(&mut self, kind: StepKind, deps: &[Option<StepId>]) -> StepId {
        let id = self.steps.len() as StepId;
        for d in deps.iter().flatten() {
            debug_assert!(*d < id, "dependency on a later step");
            self.deps.push((*d, id));
        }
        self.steps.push(kind);
        self.call_of.push(self.call);
        id
    }

    /// Steps added from now on belong to call `k` of a multi-call run.
    pub fn set_call(&mut self, k: u16) {
        self.call = k;
    }

    /// Declare a scratch buffer; returns its handle.
    pub fn scratch(&mut self, bytes: usize) -> Buf {
        self.scratch.push(bytes);
        Buf::Scratch((self.scratch.len() - 1) as u16)
    }

    /// Number of steps so far.
    pub fn len(&self) -> usize {
        self.steps.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }

    /// Append `other`'s steps after this builder's, as call `call` of a multi-call run, with
    /// every location passed through `remap` (and `other`'s scratch buffers renumbered).
    pub fn append(&mut self, other: Builder, call: u16, remap: impl Fn(Loc) -> Loc) {
        let base = self.steps.len() as StepId;
        let scratch_base = self.scratch.len() as u16;
        self.scratch.extend(&other.scratch);
        for step in &other.steps {
            self.steps.push(step.map_locs(|l| match l.buf {
                Buf::Scratch(k) => Loc::new(Buf::Scratch(k + scratch_base), l.off),
                Buf::Staging(_) => l,
                _ => remap(l),
            }));
            self.call_of.push(call);
        }
        self.deps.extend(other.deps.iter().map(|&(a, b)| (a + base, b + base)));
    }

    /// Merge independent sub-schedules ("channels") into one, interleaving their steps
    /// round-robin so their messages alternate on every connection (and so on the lanes of a
    /// multi-socket connection). Part `p`'s Input and Output locations are shifted by
    /// `in_shift` / `out_shift` bytes; its scratch buffers are renumbered. Both ranks of a pair
    /// merge the same parts the same way, so messages still pair up in order.
    pub fn interleave(parts: Vec<(Builder, usize, usize)>) -> Builder {
        let mut out = Builder::new();
        let mut new_id: Vec<Vec<StepId>> = parts.iter().map(|(b, _, _)| vec![0; b.steps.len()]).collect();
        let mut scratch_base = Vec::with_capacity(parts.len());
        for (b, _, _) in &parts {
            scratch_base.push(out.scratch.len() as u16);
            out.scratch.extend(&b.scratch);
        }
        let longest = parts.iter().map(|(b, _, _)| b.steps.len()).max().unwrap_or(0);
        for i in 0..longest {
            for (p, (b, in_shift, out_shift)) in parts.iter().enumerate() {
                let Some(step) = b.steps.get(i) else { continue };
                let moved = step.map_locs(|l| match l.buf {
                    Buf::Input => Loc::new(Buf::Input, l.off + in_shift),
                    Buf::Output => Loc::new(Buf::Output, l.off + out_shift),
                    Buf::Scratch(k) => Loc::new(Buf::Scratch(k + scratch_base[p]), l.off),
                    Buf::Staging(_) => l,
                });
                new_id[p][i] = out.steps.len() as StepId;
                out.steps.push(moved);
                out.call_of.push(b.call_of[i]);
            }
        }
        for (p, (b, _, _)) in parts.iter().enumerate() {
            for &(from, to) in &b.deps {
                out.deps.push((new_id[p][from as usize], new_id[p][to as usize]));
            }
        }
        out
    }

    /// Finish: build the successor lists.
    pub fn build(mut self) -> Schedule {
        let n = self.steps.len();
        self.deps.sort_unstable();
        self.deps.dedup();
        let mut ndeps = vec![0u32; n];
        let mut succ_start = vec![0u32; n + 1];
        for &(from, to) in &self.deps {
            ndeps[to as usize] += 1;
            succ_start[from as usize + 1] += 1;
        }
        for i in 0..n {
            succ_start[i + 1] += succ_start[i];
        }
        let succ = self.deps.iter().map(|&(_, to)| to).collect();
        let call_of = if self.call_of.iter().all(|&c| c == 0) { Vec::new() } else { self.call_of };
        Schedule { steps: self.steps, ndeps, succ_start, succ, scratch: self.scratch, staging: Vec::new(), call_of }
    }
}
