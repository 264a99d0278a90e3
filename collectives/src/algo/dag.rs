//! A hazard-tracking front end to [`Builder`]: generators say *what* each step reads and
//! writes, the tracker adds the dependencies.
//!
//! Every generator must order every pair of steps that touch overlapping bytes when at least
//! one of them writes (read-after-write, write-after-read, write-after-write), in place as
//! well as out of place. Writing those edges by hand for seven collectives and six
//! algorithms is where bugs hide, so generators go through [`Dag`]: it keeps, per buffer, a
//! map of byte ranges to the step that last wrote them and the steps that read them since,
//! and gives each new step exactly the edges its accesses need. Emission order is program
//! order: a step depends on the earlier steps it conflicts with, never on later ones.
//!
//! In-place calls bind Input and Output to one piece of memory, and a generator does not
//! know which kind of call it serves. The tracker therefore places Input and Output in one
//! coordinate space, aligned the way the collective's in-place convention aligns them (see
//! [`Io`]), and treats overlapping ranges as the same memory. That is exact for in-place
//! calls and merely conservative for out-of-place ones. It also checks, in debug builds,
//! that the schedule computes the same values either way: it never reads Input after the
//! aliased Output bytes were overwritten (in place that would read the new value, out of
//! place the old), never reads Output or scratch bytes it has not written, and never writes
//! Input.
//!
//! It also guards a property of the executor: a `RecvReduce` is posted (and takes a staging
//! slot) before its dependencies complete. If it waited on data from *another* peer, a fast
//! peer could fill every staging slot with arrived-but-blocked reductions and starve the
//! slow peer it waits on. Debug builds assert that a `RecvReduce` from `p` depends only on
//! local work and on earlier messages from `p` (which arrive first on the same FIFO);
//! generators combine cross-peer data with a plain `Recv` into scratch plus a local
//! `Reduce` instead, which waits for its dependencies *before* posting.

use std::collections::BTreeMap;
use std::ops::Range;

use devccl_core::Rank;

use crate::schedule::{Buf, Builder, Loc, StepId, StepKind};

/// How Input and Output may alias (in-place calls), in elements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Io {
    /// Input element `i` and Output element `j` are the same memory in an in-place call when
    /// `in_base + i == out_base + j` (all-reduce: both 0; all-gather: `in_base` is the
    /// rank's block; reduce-scatter: `out_base` is).
    Shared { in_base: usize, out_base: usize },
    /// The collective has no in-place form: Input and Output never alias.
    Separate,
}

/// A buffer position in elements: `(buffer, element offset)`.
pub(crate) type At = (Buf, usize);

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Space {
    /// Output, and Input when it may alias Output.
    Io,
    /// Input when it never aliases Output.
    In,
    Scratch(u16),
    Staging(u16),
}

/// Which data a step (transitively) waits for: nothing remote, one peer's messages, or
/// several peers'.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wait {
    Local,
    Peer(usize),
    Many,
}

impl Wait {
    fn join(self, o: Wait) -> Wait {
        match (self, o) {
            (Wait::Local, x) | (x, Wait::Local) => x,
            (Wait::Peer(a), Wait::Peer(b)) if a == b => Wait::Peer(a),
            _ => Wait::Many,
        }
    }
}

#[derive(Debug, Clone)]
struct Seg {
    /// Last step that wrote these bytes.
    writer: Option<StepId>,
    /// Steps that read them since.
    readers: Vec<StepId>,
    /// Output/scratch view: written by this schedule (so reading it is meaningful in both
    /// in-place and out-of-place calls).
    defined: bool,
    /// Input view: still holds the caller's input in both kinds of call.
    input_ok: bool,
}

/// Segment map of one buffer: key = start, each segment runs to the next key.
#[derive(Debug)]
struct Segs(BTreeMap<usize, Seg>);

impl Segs {
    fn new() -> Segs {
        let mut m = BTreeMap::new();
        m.insert(0, Seg { writer: None, readers: Vec::new(), defined: false, input_ok: true });
        Segs(m)
    }

    fn split(&mut self, at: usize) {
        let (&start, seg) = self.0.range(..=at).next_back().expect("segment map starts at 0");
        if start != at {
            let seg = seg.clone();
            self.0.insert(at, seg);
        }
    }

    /// Segments overlapping `r` (read only, no splitting).
    fn overlapping(&self, r: &Range<usize>) -> impl Iterator<Item = &Seg> {
        let first = *self.0.range(..=r.start).next_back().expect("segment map starts at 0").0;
        self.0.range(first..r.end).map(|(_, s)| s)
    }

    /// Segments exactly covering `r` (split at its ends).
    fn covering(&mut self, r: &Range<usize>) -> impl Iterator<Item = &mut Seg> {
        self.split(r.start);
        self.split(r.end);
        self.0.range_mut(r.start..r.end).map(|(_, s)| s)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum View {
    Input,
    Output,
    Scratch,
}

/// One memory access of a step, resolved to its space.
#[derive(Debug, Clone)]
struct Access {
    space: Space,
    range: Range<usize>,
    view: View,
}

/// Builder front end that derives every hazard edge (see the module docs).
#[derive(Debug)]
pub(crate) struct Dag<'b> {
    b: &'b mut Builder,
    esize: usize,
    io: Io,
    in_len: usize,
    out_len: usize,
    /// Elements of the scratch buffers this Dag declared, by handle.
    scratch_len: BTreeMap<u16, usize>,
    spaces: BTreeMap<Space, Segs>,
    /// `Wait` of the steps this Dag emitted, indexed by `id - first`.
    waits: Vec<Wait>,
    first: StepId,
}

impl<'b> Dag<'b> {
    /// A tracker over `b` for a call whose Input has `in_len` and Output `out_len` elements
    /// of `esize` bytes.
    pub(crate) fn new(b: &'b mut Builder, esize: usize, io: Io, in_len: usize, out_len: usize) -> Dag<'b> {
        debug_assert!(esize > 0, "zero-sized elements");
        let first = b.len() as StepId;
        Dag {
            b,
            esize,
            io,
            in_len,
            out_len,
            scratch_len: BTreeMap::new(),
            spaces: BTreeMap::new(),
            waits: Vec::new(),
            first,
        }
    }

    /// Declare a scratch buffer of `elems` elements.
    pub(crate) fn scratch(&mut self, elems: usize) -> Buf {
        let buf = self.b.scratch(elems * self.esize);
        if let Buf::Scratch(i) = buf {
            self.scratch_len.insert(i, elems);
        }
        buf
    }

    fn loc(&self, at: At) -> Loc {
        Loc::new(at.0, at.1 * self.esize)
    }

    fn access(&self, at: At, len: usize) -> Access {
        let (buf, off) = at;
        let (space, base, view, limit) = match (buf, self.io) {
            (Buf::Input, Io::Shared { in_base, .. }) => (Space::Io, in_base, View::Input, self.in_len),
            (Buf::Input, Io::Separate) => (Space::In, 0, View::Input, self.in_len),
            (Buf::Output, Io::Shared { out_base, .. }) => (Space::Io, out_base, View::Output, self.out_len),
            (Buf::Output, Io::Separate) => (Space::Io, 0, View::Output, self.out_len),
            (Buf::Scratch(i), _) => (
                Space::Scratch(i),
                0,
                View::Scratch,
                // A scratch buffer declared before this Dag: not bounds-checked here.
                self.scratch_len.get(&i).copied().unwrap_or(usize::MAX),
            ),
            // Staging buffers exist only after lowering, never in a generator's hands.
            (Buf::Staging(i), _) => (Space::Staging(i), 0, View::Scratch, usize::MAX),
        };
        debug_assert!(off + len <= limit, "{buf:?}[{off}..{}] is outside its {limit} elements", off + len);
        Access { space, range: base + off..base + off + len, view }
    }

    fn wait_of(&self, s: StepId) -> Wait {
        if s < self.first { Wait::Local } else { self.waits[(s - self.first) as usize] }
    }

    /// Emit `kind`, which reads `reads` and writes `writes` (Input writes are bugs), after
    /// `extra` and after every earlier step it conflicts with. `identity` marks a Copy from
    /// Input onto its own in-place alias (a no-op in place, so the Input view stays valid).
    fn emit(
        &mut self,
        kind: StepKind,
        reads: &[Access],
        writes: &[Access],
        identity: bool,
        extra: &[Option<StepId>],
    ) -> StepId {
        let mut deps: Vec<Option<StepId>> = extra.to_vec();
        let tagged = reads.iter().map(|a| (a, false)).chain(writes.iter().map(|a| (a, true)));
        for (a, is_write) in tagged.filter(|(a, _)| !a.range.is_empty()) {
            let Some(segs) = self.spaces.get(&a.space) else {
                continue;
            };
            for s in segs.overlapping(&a.range) {
                deps.push(s.writer);
                if is_write {
                    deps.extend(s.readers.iter().copied().map(Some));
                }
            }
        }
        deps.sort_unstable();
        deps.dedup();
        let peer = kind.peer().map(Rank::idx);
        let staged = matches!(kind, StepKind::RecvReduce { .. });
        let mut wait = deps.iter().flatten().fold(Wait::Local, |w, &d| w.join(self.wait_of(d)));
        if let (true, Some(p)) = (staged, peer) {
            debug_assert!(
                matches!(wait, Wait::Local) || wait == Wait::Peer(p),
                "RecvReduce from rank {p} would wait on another peer's data ({wait:?}) while holding a staging slot: {kind:?}"
            );
        }
        if let (false, Some(p)) = (matches!(kind, StepKind::Send { .. }), peer) {
            wait = wait.join(Wait::Peer(p));
        }
        let id = self.b.step(kind, &deps);
        debug_assert_eq!(id, self.first + self.waits.len() as StepId, "steps added behind the Dag's back");
        self.waits.push(wait);
        for a in reads.iter().filter(|a| !a.range.is_empty()) {
            let segs = self.spaces.entry(a.space).or_insert_with(Segs::new);
            for s in segs.covering(&a.range) {
                match a.view {
                    View::Input => debug_assert!(
                        s.input_ok || a.space == Space::In,
                        "reads Input after its in-place alias was overwritten: {:?}",
                        a
                    ),
                    View::Output | View::Scratch => {
                        debug_assert!(s.defined, "reads {:?} {:?} before writing it", a.view, a.range)
                    }
                }
                s.readers.push(id);
            }
        }
        for a in writes.iter().filter(|a| !a.range.is_empty()) {
            debug_assert!(a.view != View::Input, "writes the caller's Input");
            let segs = self.spaces.entry(a.space).or_insert_with(Segs::new);
            for s in segs.covering(&a.range) {
                s.writer = Some(id);
                s.readers.clear();
                s.defined = true;
                s.input_ok &= identity;
            }
        }
        id
    }

    /// Send `len` elements at `src` to `peer`.
    pub(crate) fn send(&mut self, peer: usize, src: At, len: usize) -> StepId {
        self.send_after(peer, src, len, &[])
    }

    /// [`Dag::send`] with extra ordering (control dependencies, e.g. barrier rounds).
    pub(crate) fn send_after(&mut self, peer: usize, src: At, len: usize, after: &[Option<StepId>]) -> StepId {
        let r = self.access(src, len);
        let kind = StepKind::Send { peer: Rank::from(peer), src: self.loc(src), len: len * self.esize };
        self.emit(kind, &[r], &[], false, after)
    }

    /// Receive `len` elements from `peer` straight into `dst`.
    pub(crate) fn recv(&mut self, peer: usize, dst: At, len: usize) -> StepId {
        self.recv_after(peer, dst, len, &[])
    }

    /// [`Dag::recv`] with extra ordering.
    pub(crate) fn recv_after(&mut self, peer: usize, dst: At, len: usize, after: &[Option<StepId>]) -> StepId {
        let w = self.access(dst, len);
        let kind = StepKind::Recv { peer: Rank::from(peer), dst: self.loc(dst), len: len * self.esize };
        self.emit(kind, &[], &[w], false, after)
    }

    /// Receive `len` elements from `peer` and store `dst = base op incoming`.
    pub(crate) fn recv_reduce(&mut self, peer: usize, dst: At, base: At, len: usize, finish: bool) -> StepId {
        let (r, w) = (self.access(base, len), self.access(dst, len));
        debug_assert!(same_or_disjoint(&r, &w), "RecvReduce base {base:?} partly overlaps dst {dst:?}");
        let kind = StepKind::RecvReduce {
            peer: Rank::from(peer),
            dst: self.loc(dst),
            base: self.loc(base),
            len: len * self.esize,
            finish,
        };
        self.emit(kind, &[r], &[w], false, &[])
    }

    /// Local `dst = src` (skipped by the executor when both are the same memory).
    pub(crate) fn copy(&mut self, src: At, dst: At, len: usize) -> StepId {
        let (r, w) = (self.access(src, len), self.access(dst, len));
        debug_assert!(same_or_disjoint(&r, &w), "Copy {src:?} partly overlaps {dst:?}");
        let identity = r.space == w.space && r.range == w.range;
        let kind = StepKind::Copy { src: self.loc(src), dst: self.loc(dst), len: len * self.esize };
        self.emit(kind, &[r], &[w], identity, &[])
    }

    /// Local `dst = dst op src`.
    pub(crate) fn reduce(&mut self, src: At, dst: At, len: usize, finish: bool) -> StepId {
        let (r, w) = (self.access(src, len), self.access(dst, len));
        debug_assert!(
            r.space != w.space || r.range.end <= w.range.start || w.range.end <= r.range.start || len == 0,
            "Reduce {src:?} overlaps its destination {dst:?}"
        );
        let kind = StepKind::Reduce { src: self.loc(src), dst: self.loc(dst), len: len * self.esize, finish };
        self.emit(kind, &[r, w.clone()], &[w], false, &[])
    }
}

fn same_or_disjoint(a: &Access, b: &Access) -> bool {
    a.space != b.space || a.range == b.range || a.range.end <= b.range.start || b.range.end <= a.range.start
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deps_of(s: &crate::schedule::Schedule, step: StepId) -> Vec<StepId> {
        (0..s.len() as StepId).filter(|&p| s.successors(p).contains(&step)).collect()
    }

    #[test]
    fn derives_raw_war_waw() {
        let mut b = Builder::new();
        let mut d = Dag::new(&mut b, 4, Io::Shared { in_base: 0, out_base: 0 }, 100, 100);
        let s0 = d.send(1, (Buf::Input, 0), 10); // reads In[0..10] (= Out[0..10] in place)
        let r1 = d.recv(1, (Buf::Output, 5), 10); // WAR on s0 (overlap 5..10)
        let s2 = d.send(2, (Buf::Output, 12), 2); // RAW on r1
        let r3 = d.recv(2, (Buf::Output, 50), 5); // independent
        let r4 = d.recv(3, (Buf::Output, 0), 20); // WAW r1, WAR s0 and s2
        let s = b.build();
        assert_eq!(deps_of(&s, r1), vec![s0]);
        assert_eq!(deps_of(&s, s2), vec![r1]);
        assert!(deps_of(&s, r3).is_empty());
        assert_eq!(deps_of(&s, r4), vec![s0, r1, s2]);
    }

    #[test]
    fn identity_copy_keeps_input_readable() {
        let mut b = Builder::new();
        let mut d = Dag::new(&mut b, 1, Io::Shared { in_base: 8, out_base: 0 }, 4, 16);
        d.copy((Buf::Input, 0), (Buf::Output, 8), 4);
        d.send(1, (Buf::Input, 0), 4);
        d.send(1, (Buf::Output, 8), 4);
    }

    #[test]
    #[cfg(debug_assertions)]
    #[should_panic(expected = "in-place alias was overwritten")]
    fn reading_clobbered_input_is_caught() {
        let mut b = Builder::new();
        let mut d = Dag::new(&mut b, 1, Io::Shared { in_base: 0, out_base: 0 }, 4, 4);
        d.recv(1, (Buf::Output, 0), 4);
        d.send(2, (Buf::Input, 2), 1);
    }

    #[test]
    #[cfg(debug_assertions)]
    #[should_panic(expected = "another peer's data")]
    fn cross_peer_recv_reduce_is_caught() {
        let mut b = Builder::new();
        let mut d = Dag::new(&mut b, 1, Io::Shared { in_base: 0, out_base: 0 }, 4, 4);
        d.recv_reduce(1, (Buf::Output, 0), (Buf::Input, 0), 4, false);
        d.recv_reduce(2, (Buf::Output, 0), (Buf::Output, 0), 4, true);
    }
}
