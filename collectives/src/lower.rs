//! Lowering a schedule onto transports that cannot reach device memory (DESIGN §4a).
//!
//! Algorithms write device-blind schedules. When a call's buffers live on a GPU (or a Vulkan
//! device) and the connection to a peer can only move host memory (TCP, shared memory), its
//! network steps are rewritten before the schedule runs:
//!
//! - `Send { src }` becomes `Copy { src → staging slot }` (device to pinned host) and
//!   `Send { staging slot }`;
//! - `Recv { dst }` becomes `Recv { staging slot }` and `Copy { staging slot → dst }` (host to
//!   device);
//! - `RecvReduce` stays: the executor already receives it into a staging slot, which for a
//!   device call is pinned host memory the device's reduction kernel reads directly.
//!
//! Staging slots form one ring of `slots` per peer and direction, each slot as large as the
//! largest message of that ring. A slot is reused only after its previous message is done
//! with it — for sends, once the send completed; for receives, once the copy to the device
//! finished — which the lowering states as ordinary dependencies. Nothing else waits: the
//! device-to-host copies of the next `slots - 1` chunks run while this chunk is on the wire,
//! and host-to-device copies of arrived chunks overlap the receipt of the next ones, so the
//! pipeline comes from the DAG as every other overlap does. A send's copy depends on the same
//! steps the send did (its data being final); a receive into a slot depends only on the slot
//! being free, and the copy out of it on what the receive waited for (its destination no
//! longer being read), which decouples the wire from local hazards.
//!
//! Rings are per peer, so a fast peer can never take the slots a slow peer's messages need,
//! and messages to each peer keep their order, so frame matching is unchanged.

use devccl_core::Rank;

use crate::schedule::{Buf, Loc, Schedule, StepId, StepKind};

/// Slot stride alignment (cache line; also satisfies every dtype's alignment).
const SLOT_ALIGN: usize = 64;

/// One ring of staging slots (one peer, one direction).
#[derive(Debug, Clone)]
struct Ring {
    buf: u16,
    stride: usize,
    /// For each use so far, the step that releases its slot.
    releases: Vec<StepId>,
}

impl Ring {
    /// The slot location for the next use and the step it must wait for (the release of the
    /// use `slots` earlier).
    fn next(&self, slots: usize) -> (Loc, Option<StepId>) {
        let u = self.releases.len();
        let loc = Loc::new(Buf::Staging(self.buf), (u % slots) * self.stride);
        let wait = u.checked_sub(slots).map(|k| self.releases[k]);
        (loc, wait)
    }
}

/// Rewrite `sched` so every network step with a peer for which `staged(peer)` holds moves
/// host staging memory only (see the module docs). `slots` is the ring length per peer and
/// direction (at least 2). Schedules without such steps come back unchanged.
pub fn stage(sched: Schedule, staged: impl Fn(Rank) -> bool, slots: usize) -> Schedule {
    let slots = slots.max(2);
    let n = sched.steps.len();
    // Largest message per (peer, direction) that needs staging.
    let mut rings: std::collections::BTreeMap<(u32, bool), Ring> = Default::default();
    let mut sizes: std::collections::BTreeMap<(u32, bool), usize> = Default::default();
    for s in &sched.steps {
        let key = match s {
            StepKind::Send { peer, .. } if staged(*peer) => (peer.0, true),
            StepKind::Recv { peer, .. } if staged(*peer) => (peer.0, false),
            _ => continue,
        };
        let e = sizes.entry(key).or_insert(0);
        *e = (*e).max(s.len());
    }
    if sizes.is_empty() {
        return sched;
    }
    let mut staging = sched.staging.clone();
    for (key, max) in sizes {
        let stride = max.div_ceil(SLOT_ALIGN).max(1) * SLOT_ALIGN;
        rings.insert(key, Ring { buf: staging.len() as u16, stride, releases: Vec::new() });
        staging.push(stride * slots);
    }
    // Predecessors of each old step.
    let mut preds: Vec<Vec<StepId>> = vec![Vec::new(); n];
    for from in 0..n as StepId {
        for &to in sched.successors(from) {
            preds[to as usize].push(from);
        }
    }
    let mut out = Emitter::default();
    // The new step that stands for old step i (what its successors wait on).
    let mut done_by: Vec<StepId> = Vec::with_capacity(n);
    for (i, step) in sched.steps.iter().enumerate() {
        let call = sched.call(i as StepId) as u16;
        let old: Vec<StepId> = preds[i].iter().map(|&p| done_by[p as usize]).collect();
        let id = match *step {
            StepKind::Send { peer, src, len } if staged(peer) => {
                let ring = rings.get_mut(&(peer.0, true)).expect("sized above");
                let (slot, wait) = ring.next(slots);
                let copy = out.push(StepKind::Copy { src, dst: slot, len }, call, old.iter().copied().chain(wait));
                let send = out.push(StepKind::Send { peer, src: slot, len }, call, [copy]);
                ring.releases.push(send);
                send
            }
            StepKind::Recv { peer, dst, len } if staged(peer) => {
                let ring = rings.get_mut(&(peer.0, false)).expect("sized above");
                let (slot, wait) = ring.next(slots);
                let recv = out.push(StepKind::Recv { peer, dst: slot, len }, call, wait);
                let copy = out.push(StepKind::Copy { src: slot, dst, len }, call, old.iter().copied().chain([recv]));
                ring.releases.push(copy);
                copy
            }
            ref other => out.push(other.clone(), call, old),
        };
        done_by.push(id);
    }
    out.finish(sched.scratch, staging)
}

/// Accumulates lowered steps and edges (every edge points to an earlier step).
#[derive(Default)]
struct Emitter {
    steps: Vec<StepKind>,
    call_of: Vec<u16>,
    edges: Vec<(StepId, StepId)>,
}

impl Emitter {
    fn push(&mut self, step: StepKind, call: u16, deps: impl IntoIterator<Item = StepId>) -> StepId {
        let id = self.steps.len() as StepId;
        self.edges.extend(deps.into_iter().map(|d| (d, id)));
        self.steps.push(step);
        self.call_of.push(call);
        id
    }

    fn finish(mut self, scratch: Vec<usize>, staging: Vec<usize>) -> Schedule {
        let n = self.steps.len();
        self.edges.sort_unstable();
        self.edges.dedup();
        let mut ndeps = vec![0u32; n];
        let mut succ_start = vec![0u32; n + 1];
        for &(from, to) in &self.edges {
            debug_assert!(from < to, "lowering emitted a backward edge");
            ndeps[to as usize] += 1;
            succ_start[from as usize + 1] += 1;
        }
        for i in 0..n {
            succ_start[i + 1] += succ_start[i];
        }
        let succ = self.edges.iter().map(|&(_, to)| to).collect();
        let call_of = if self.call_of.iter().all(|&c| c == 0) { Vec::new() } else { self.call_of };
        Schedule { steps: self.steps, ndeps, succ_start, succ, scratch, staging, call_of }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedule::Builder;

    fn ring_like() -> Schedule {
        // Rank 0 of a 2-rank exchange in 5 chunks: send chunk c, receive chunk c.
        let mut b = Builder::new();
        for c in 0..5 {
            let off = c * 100;
            b.step(StepKind::Send { peer: Rank(1), src: Loc::new(Buf::Input, off), len: 100 }, &[]);
            b.step(StepKind::Recv { peer: Rank(1), dst: Loc::new(Buf::Output, off), len: 100 }, &[]);
        }
        b.build()
    }

    #[test]
    fn unstaged_peers_leave_the_schedule_alone() {
        let s = stage(ring_like(), |_| false, 4);
        assert_eq!(s.steps, ring_like().steps);
        assert!(s.staging.is_empty());
    }

    #[test]
    fn sends_and_receives_go_through_slot_rings() {
        let s = stage(ring_like(), |p| p == Rank(1), 2);
        assert_eq!(s.len(), 20, "each network step gains a copy");
        assert_eq!(s.staging, vec![128 * 2, 128 * 2], "one ring per direction, 64-byte strides");
        // Network steps only touch staging; copies move between staging and the buffers.
        for st in &s.steps {
            match st {
                StepKind::Send { src, .. } => assert!(matches!(src.buf, Buf::Staging(_))),
                StepKind::Recv { dst, .. } => assert!(matches!(dst.buf, Buf::Staging(_))),
                StepKind::Copy { src, dst, .. } => {
                    assert!(matches!(src.buf, Buf::Staging(_)) ^ matches!(dst.buf, Buf::Staging(_)))
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        // The third send's device-to-host copy reuses slot 0 and waits for the first send.
        let sends: Vec<StepId> =
            (0..s.len() as StepId).filter(|&i| matches!(s.steps[i as usize], StepKind::Send { .. })).collect();
        let third_copy = sends[2] - 1;
        assert!(s.successors(sends[0]).contains(&third_copy));
        assert_eq!(
            s.steps[third_copy as usize],
            StepKind::Copy {
                src: Loc::new(Buf::Input, 200),
                dst: Loc::new(Buf::Staging(1), 0), // rings ordered (peer, receive < send)
                len: 100
            }
        );
        // The third receive reuses slot 0 of the receive ring and waits for the first copy out.
        let recvs: Vec<StepId> =
            (0..s.len() as StepId).filter(|&i| matches!(s.steps[i as usize], StepKind::Recv { .. })).collect();
        assert!(s.successors(recvs[0] + 1).contains(&recvs[2]));
        // Every edge points forward (the DAG stays topologically ordered).
        for i in 0..s.len() as StepId {
            assert!(s.successors(i).iter().all(|&t| t > i));
        }
    }

    #[test]
    fn receive_waits_for_the_slot_and_the_copy_for_the_destination() {
        let mut b = Builder::new();
        let send = b.step(StepKind::Send { peer: Rank(1), src: Loc::new(Buf::Output, 0), len: 8 }, &[]);
        // Receive over the bytes just sent: must wait for the send (write-after-read).
        b.step(StepKind::Recv { peer: Rank(1), dst: Loc::new(Buf::Output, 0), len: 8 }, &[Some(send)]);
        let s = stage(b.build(), |_| true, 2);
        // copy0 send1 recv2 copy3: the receive itself waits for nothing, the copy out waits
        // for the send (the old hazard) and the receive.
        assert_eq!(s.ndeps, vec![0, 1, 0, 2]);
        assert!(s.successors(1).contains(&3));
    }
}
