//! Ring all-reduce: reduce-scatter then all-gather (Patarasuk & Yuan; NCCL's runRing).
//!
//! The buffer is cut into `n` blocks and every block into chunks. In reduce-scatter step `s`
//! (0..n-1) rank `r` sends block `r-s` to `r+1` and receives block `r-s-1` from `r-1`,
//! reducing it with its own contribution; after `n-1` steps rank `r` holds block `r+1` fully
//! reduced (and, for avg, divided once). All-gather step `s` then forwards block `r+1-s` and
//! receives block `r-s` straight into the output. Dependencies are per chunk, so chunk `c`
//! of step `s+1` leaves as soon as chunk `c` of step `s` is reduced: the ring pipelines.
//! Each rank sends and receives `2(n-1)/n` of the buffer.

use devccl_core::Rank;

use super::{block, chunk_of, Shape};
use crate::schedule::{Buf, Builder, Loc, StepId, StepKind};

/// Ring all-reduce on one rank.
pub fn all_reduce(b: &mut Builder, sh: Shape) {
    let (r, n, esize) = (sh.rank, sh.n, sh.esize);
    if sh.count == 0 {
        return;
    }
    if n == 1 {
        b.step(StepKind::Copy { src: Loc::new(Buf::Input, 0), dst: Loc::new(Buf::Output, 0), len: sh.count * esize }, &[]);
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
    for s in 0..n - 1 {
        let si = s as isize;
        let sb = blk(ri - si);
        let rb = blk(ri - si - 1);
        for c in 0..nch {
            let sc = chunk_of(&sb, ce, c);
            if !sc.is_empty() {
                let src = Loc::new(if s == 0 { Buf::Input } else { Buf::Output }, sc.start * esize);
                let dep = if s == 0 { None } else { reduced[c] };
                rs_send[s][c] = Some(b.step(StepKind::Send { peer: next, src, len: sc.len() * esize }, &[dep]));
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
    for s in 0..n - 1 {
        let si = s as isize;
        let sb = blk(ri + 1 - si);
        let rb = blk(ri - si);
        for c in 0..nch {
            let sc = chunk_of(&sb, ce, c);
            if !sc.is_empty() {
                b.step(StepKind::Send { peer: next, src: Loc::new(Buf::Output, sc.start * esize), len: sc.len() * esize }, &[got[c]]);
            }
            let rc = chunk_of(&rb, ce, c);
            got[c] = if rc.is_empty() {
                None
            } else {
                // The destination was last read by our reduce-scatter send of the same block.
                let war = rs_send[s][c];
                Some(b.step(StepKind::Recv { peer: prev, dst: Loc::new(Buf::Output, rc.start * esize), len: rc.len() * esize }, &[war]))
            };
        }
    }
}
