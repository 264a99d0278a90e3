//! Ring all-reduce: reduce-scatter then all-gather (Patarasuk & Yuan; NCCL's runRing).
//!
//! The buffer is cut into `n` blocks and every block into chunks. In reduce-scatter step `s`
//! (0..n-1) rank `r` sends block `r-s` to `r+1` and receives block `r-s-1` from `r-1`,
//! reducing it with its own contribution; after `n-1` steps rank `r` holds block `r+1` fully
//! reduced (and, for avg, divided once). All-gather step `s` then forwards block `r+1-s` and
//! receives block `r-s` straight into the output. Dependencies are per chunk, so chunk `c`
//! of step `s+1` leaves as soon as chunk `c` of step `s` is reduced: the ring pipelines.
//! Each rank sends and receives `2(n-1)/n` of the buffer.
//!
//! The other ring collectives are the halves and chains of the same idea:
//! [`reduce_scatter`] is the first phase with `n*count` inputs, [`all_gather`] the second,
//! [`broadcast`] a chain from the root and [`reduce`] a chain toward it; all are pipelined by
//! chunks.

use devccl_core::Rank;

use super::dag::{Dag, Io};
use super::{Shape, SlotRing, block, chunk_of, pieces, sub_mod};
use crate::schedule::{Buf, Builder, Loc, StepId, StepKind};

/// Ring all-reduce on one rank.
pub fn all_reduce(b: &mut Builder, sh: Shape) {
    let (r, n, esize) = (sh.rank, sh.n, sh.esize);
    if sh.count == 0 {
        return;
    }
    if n == 1 {
        b.step(
            StepKind::Copy { src: Loc::new(Buf::Input, 0), dst: Loc::new(Buf::Output, 0), len: sh.count * esize },
            &[],
        );
        return;
    }
    let next = Rank::from((r + 1) % n);
    let prev = Rank::from((r + n - 1) % n);
    let ce = sh.chunk_elems();
    let nch = sh.count.div_ceil(n).div_ceil(ce).max(1);
    let blk = |i: isize| block(sh.count, n, i.rem_euclid(n as isize) as usize);
    let ri = r as isize;

    // reduce-scatter
    let mut reduced: Vec<Option<StepId>> = vec![None; nch]; // last reduce of chunk c
    let mut rs_send: Vec<Vec<Option<StepId>>> = vec![vec![None; nch]; n - 1];
    for (s, sent) in rs_send.iter_mut().enumerate() {
        let si = s as isize;
        let sb = blk(ri - si);
        let rb = blk(ri - si - 1);
        for c in 0..nch {
            let sc = chunk_of(&sb, ce, c);
            if !sc.is_empty() {
                let src = Loc::new(if s == 0 { Buf::Input } else { Buf::Output }, sc.start * esize);
                let dep = if s == 0 { None } else { reduced[c] };
                sent[c] = Some(b.step(StepKind::Send { peer: next, src, len: sc.len() * esize }, &[dep]));
            }
            let rc = chunk_of(&rb, ce, c);
            reduced[c] = if rc.is_empty() {
                None
            } else {
                let at = rc.start * esize;
                Some(b.step(
                    StepKind::RecvReduce {
                        peer: prev,
                        dst: Loc::new(Buf::Output, at),
                        base: Loc::new(Buf::Input, at),
                        len: rc.len() * esize,
                        finish: s == n - 2,
                    },
                    &[],
                ))
            };
        }
    }
    // all-gather: `reduced` now holds the final reduces of block r+1
    let mut got: Vec<Option<StepId>> = reduced;
    for (s, rs_sent) in rs_send.iter().enumerate() {
        let si = s as isize;
        let sb = blk(ri + 1 - si);
        let rb = blk(ri - si);
        for c in 0..nch {
            let sc = chunk_of(&sb, ce, c);
            if !sc.is_empty() {
                b.step(
                    StepKind::Send { peer: next, src: Loc::new(Buf::Output, sc.start * esize), len: sc.len() * esize },
                    &[got[c]],
                );
            }
            let rc = chunk_of(&rb, ce, c);
            got[c] = if rc.is_empty() {
                None
            } else {
                // The destination was last read by our reduce-scatter send of the same block.
                let war = rs_sent[c];
                Some(b.step(
                    StepKind::Recv { peer: prev, dst: Loc::new(Buf::Output, rc.start * esize), len: rc.len() * esize },
                    &[war],
                ))
            };
        }
    }
}

/// Ring reduce-scatter: Input holds `n` blocks of `count` elements, Output gets the
/// reduction of block `rank`.
///
/// Step `s` (0..n-1) sends the partial of block `r-s-1` to `r+1` and receives the partial of
/// block `r-s-2` from `r-1`, adding this rank's contribution as it lands. The last step's
/// block is `r` itself and lands in Output (finished). Partials alternate between two
/// block-sized scratch buffers, so a receive of step `s+2` only waits for step `s+1`'s send
/// of the same chunk. In place, Output is Input's block `rank`, which no step reads before
/// the final reduction.
pub fn reduce_scatter(b: &mut Builder, sh: Shape) {
    let (r, n, cnt) = (sh.rank, sh.n, sh.count);
    if cnt == 0 {
        return;
    }
    let mut d = Dag::new(b, sh.esize, Io::Shared { in_base: 0, out_base: r * cnt }, n * cnt, cnt);
    if n == 1 {
        d.copy((Buf::Input, 0), (Buf::Output, 0), cnt);
        return;
    }
    let (next, prev) = ((r + 1) % n, sub_mod(r, 1, n));
    let ce = sh.chunk_elems();
    let partial = if n > 2 { [d.scratch(cnt), d.scratch(cnt)] } else { [Buf::Output; 2] };
    for s in 0..n - 1 {
        let sb = sub_mod(r, s + 1, n);
        let rb = sub_mod(r, s + 2, n);
        debug_assert!(s < n - 2 || rb == r, "the last step reduces this rank's block");
        for c in pieces(0..cnt, ce) {
            let src = if s == 0 { (Buf::Input, sb * cnt + c.start) } else { (partial[(s - 1) % 2], c.start) };
            d.send(next, src, c.len());
            let base = (Buf::Input, rb * cnt + c.start);
            if s == n - 2 {
                d.recv_reduce(prev, (Buf::Output, c.start), base, c.len(), true);
            } else {
                d.recv_reduce(prev, (partial[s % 2], c.start), base, c.len(), false);
            }
        }
    }
}

/// Ring all-gather: Input is `count` elements, Output `n` blocks; block `i` is rank `i`'s
/// input.
///
/// This rank's block is copied into place (nothing to do in place, where Input *is* that
/// block); step `s` then forwards block `r-s` to `r+1` (step 0 straight from Input) and
/// receives block `r-s-1` from `r-1` into its final place. Per-chunk dependencies pipeline
/// the steps.
pub fn all_gather(b: &mut Builder, sh: Shape) {
    let (r, n, cnt) = (sh.rank, sh.n, sh.count);
    if cnt == 0 {
        return;
    }
    let mut d = Dag::new(b, sh.esize, Io::Shared { in_base: r * cnt, out_base: 0 }, cnt, n * cnt);
    d.copy((Buf::Input, 0), (Buf::Output, r * cnt), cnt);
    let (next, prev) = ((r + 1) % n, sub_mod(r, 1, n));
    let ce = sh.chunk_elems();
    for s in 0..n - 1 {
        let sb = sub_mod(r, s, n);
        let rb = sub_mod(r, s + 1, n);
        for c in pieces(0..cnt, ce) {
            let src = if s == 0 { (Buf::Input, c.start) } else { (Buf::Output, sb * cnt + c.start) };
            d.send(next, src, c.len());
            d.recv(prev, (Buf::Output, rb * cnt + c.start), c.len());
        }
    }
}

/// Ring broadcast: a pipelined chain `root -> root+1 -> ... -> root-1`. Each chunk is
/// forwarded as soon as it has arrived, so the chain costs one chunk per hop plus the
/// message once.
pub fn broadcast(b: &mut Builder, sh: Shape) {
    let (n, cnt) = (sh.n, sh.count);
    if cnt == 0 {
        return;
    }
    let v = sub_mod(sh.rank, sh.root, n);
    let real = |v: usize| (v + sh.root) % n;
    let mut d = Dag::new(b, sh.esize, Io::Shared { in_base: 0, out_base: 0 }, cnt, cnt);
    let ce = sh.chunk_elems();
    if v == 0 {
        d.copy((Buf::Input, 0), (Buf::Output, 0), cnt);
        if n > 1 {
            for c in pieces(0..cnt, ce) {
                d.send(real(1), (Buf::Input, c.start), c.len());
            }
        }
        return;
    }
    for c in pieces(0..cnt, ce) {
        d.recv(real(v - 1), (Buf::Output, c.start), c.len());
        if v + 1 < n {
            d.send(real(v + 1), (Buf::Output, c.start), c.len());
        }
    }
}

/// Ring reduce: a pipelined chain `root+1 -> root+2 -> ... -> root-1 -> root`; each rank
/// adds its input to the partial as it passes. Only the root's Output is written; the
/// others keep partials in a ring of chunk slots (scratch), so non-root Outputs are left
/// untouched.
pub fn reduce(b: &mut Builder, sh: Shape) {
    let (n, cnt) = (sh.n, sh.count);
    if cnt == 0 {
        return;
    }
    let v = sub_mod(sh.rank, sh.root, n);
    let real = |v: usize| (v + sh.root) % n;
    let mut d = Dag::new(b, sh.esize, Io::Shared { in_base: 0, out_base: 0 }, cnt, cnt);
    if n == 1 {
        d.copy((Buf::Input, 0), (Buf::Output, 0), cnt);
        return;
    }
    let ce = sh.chunk_elems();
    let next = real((v + 1) % n);
    let prev = real(if v == 0 { n - 1 } else { v - 1 });
    let slots = (v >= 2).then(|| SlotRing::new(&mut d, cnt.div_ceil(ce), ce, cnt));
    for (k, c) in pieces(0..cnt, ce).enumerate() {
        let mine = (Buf::Input, c.start);
        match (v, slots) {
            (0, _) => {
                d.recv_reduce(prev, (Buf::Output, c.start), mine, c.len(), true);
            }
            (1, _) => {
                d.send(next, mine, c.len());
            }
            (_, Some(slots)) => {
                let at = slots.at(k, c.len());
                d.recv_reduce(prev, at, mine, c.len(), false);
                d.send(next, at, c.len());
            }
            (_, None) => unreachable!("ranks past the chain's start have slots"),
        }
    }
}
