//! Halving-doubling (Rabenseifner): a recursive-halving reduce-scatter, then (for
//! all-reduce) a recursive-doubling all-gather.
//!
//! The `p = 2^floor(log2 n)` active ranks split the data into `p` units. In halving step
//! `k` (distance `d = p/2, p/4, ..., 1`) a rank and its partner across bit `log2 d` each
//! keep one half of their current window of units, send the other half, and reduce what
//! they receive into the half they keep; after log2(p) steps each active rank `i` holds unit
//! `i` fully reduced, having sent `(p-1)/p` of the data. All-reduce then runs the steps
//! backwards (distance 1, 2, ..., p/2), swapping windows until everyone has everything.
//!
//! Non-powers of two fold first, as in [`super::rd`]: each of the first `rem` even ranks
//! hands its whole input to its odd neighbour and sits out. For all-reduce it gets the full
//! result back at the end; for reduce-scatter its unit is merged with its neighbour's (an
//! active rank `i < rem` owns the blocks of ranks `2i` and `2i+1`, so units have unequal
//! sizes) and the neighbour returns its block.

use std::ops::Range;

use super::dag::{Dag, Io};
use super::rd::{fold_in, fold_out, fold_rank, pof2_floor, unfold_rank};
use super::{Shape, block, pieces};
use crate::schedule::{Buf, Builder};

/// One halving step as seen by one active rank.
#[derive(Debug, Clone)]
struct Halving {
    /// Real rank of the partner.
    peer: usize,
    /// Elements sent to the partner (its half).
    give: Range<usize>,
    /// Elements received and reduced (this rank's half).
    keep: Range<usize>,
}

/// The halving steps of active rank `nr` among `p` active ranks whose unit `i` covers
/// elements `unit(i)` (contiguous, in order).
fn halving(nr: usize, p: usize, rem: usize, unit: &dyn Fn(usize) -> Range<usize>) -> Vec<Halving> {
    let span = |lo: usize, hi: usize| unit(lo).start..unit(hi - 1).end;
    let mut out = Vec::new();
    let mut dist = p / 2;
    while dist >= 1 {
        let lo = nr & !(2 * dist - 1);
        let (mine, theirs) = if nr & dist == 0 { (lo, lo + dist) } else { (lo + dist, lo) };
        out.push(Halving {
            peer: unfold_rank(nr ^ dist, rem),
            give: span(theirs, theirs + dist),
            keep: span(mine, mine + dist),
        });
        dist /= 2;
    }
    out
}

/// Halving-doubling all-reduce (see the module docs).
pub fn all_reduce(b: &mut Builder, sh: Shape) {
    let (r, n, cnt) = (sh.rank, sh.n, sh.count);
    if cnt == 0 {
        return;
    }
    let mut d = Dag::new(b, sh.esize, Io::Shared { in_base: 0, out_base: 0 }, cnt, cnt);
    if n == 1 {
        d.copy((Buf::Input, 0), (Buf::Output, 0), cnt);
        return;
    }
    let ce = sh.chunk_elems();
    let p = pof2_floor(n);
    let rem = n - p;
    let Some((nr, folded)) = fold_in(&mut d, r, rem, cnt, ce) else { return };
    let unit = |i: usize| block(cnt, p, i);
    let steps = halving(nr, p, rem, &unit);
    // Steps that reduce into Output already reduced from another peer receive into `tmp`
    // first (a RecvReduce there would hold a staging slot waiting on that other peer).
    let fresh = |k: usize| k == 0 && !folded;
    let tmp_len = steps.iter().enumerate().filter(|(k, _)| !fresh(*k)).map(|(_, s)| s.keep.len()).max().unwrap_or(0);
    let tmp = (tmp_len > 0).then(|| d.scratch(tmp_len));
    for (k, st) in steps.iter().enumerate() {
        let last = k + 1 == steps.len();
        for c in pieces(st.give.clone(), ce) {
            let src = if fresh(k) { Buf::Input } else { Buf::Output };
            d.send(st.peer, (src, c.start), c.len());
        }
        for c in pieces(st.keep.clone(), ce) {
            if fresh(k) {
                d.recv_reduce(st.peer, (Buf::Output, c.start), (Buf::Input, c.start), c.len(), last);
            } else {
                let t = (tmp.expect("sized for this step"), c.start - st.keep.start);
                d.recv(st.peer, t, c.len());
                d.reduce(t, (Buf::Output, c.start), c.len(), last);
            }
        }
    }
    // Doubling: swap ever larger windows, the halving steps in reverse.
    for st in steps.iter().rev() {
        // After the halving steps below this one, this rank holds what it kept here and
        // the partner what it kept: exactly what this rank gave.
        for c in pieces(st.keep.clone(), ce) {
            d.send(st.peer, (Buf::Output, c.start), c.len());
        }
        for c in pieces(st.give.clone(), ce) {
            d.recv(st.peer, (Buf::Output, c.start), c.len());
        }
    }
    if folded {
        fold_out(&mut d, r, cnt, ce);
    }
}

/// Halving-doubling reduce-scatter: Input holds `n` blocks of `count`, Output gets the
/// reduction of block `rank` (see the module docs).
///
/// Partial sums live in a scratch accumulator in Input coordinates; the last step receives
/// the partner's partial of this rank's block straight into Output and adds the
/// accumulator to it (the operators are commutative), which saves a final copy.
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
    let ce = sh.chunk_elems();
    let p = pof2_floor(n);
    let rem = n - p;
    let Some(nr) = fold_rank(r, rem) else {
        for c in pieces(0..n * cnt, ce) {
            d.send(r + 1, (Buf::Input, c.start), c.len());
        }
        for c in pieces(0..cnt, ce) {
            d.recv(r + 1, (Buf::Output, c.start), c.len());
        }
        return;
    };
    let folded = r < 2 * rem;
    // Active rank i owns the blocks of the real ranks it stands for.
    let unit = |i: usize| {
        if i < rem { 2 * i * cnt..(2 * i + 2) * cnt } else { (i + rem) * cnt..(i + rem + 1) * cnt }
    };
    let steps = halving(nr, p, rem, &unit);
    let mine = r * cnt..(r + 1) * cnt;
    debug_assert_eq!(steps.last().map(|s| s.keep.clone()), Some(unit(nr)));
    // Accumulator, in Input coordinates shifted by `acc_lo`: all of Input for a folded rank
    // (it first absorbs its neighbour's whole input), else the first step's half.
    let (acc_lo, acc_len) = if folded { (0, n * cnt) } else { (steps[0].keep.start, steps[0].keep.len()) };
    let needs_acc = folded || steps.len() > 1;
    let acc = needs_acc.then(|| d.scratch(acc_len));
    let at_acc = |e: usize| (acc.expect("accumulator in use"), e - acc_lo);
    if folded {
        for c in pieces(0..n * cnt, ce) {
            d.recv_reduce(r - 1, at_acc(c.start), (Buf::Input, c.start), c.len(), false);
        }
    }
    let fresh = |k: usize| k == 0 && !folded;
    let tmp_len = steps.iter().enumerate().filter(|(k, _)| !fresh(*k)).map(|(_, s)| s.keep.len()).max().unwrap_or(0);
    let tmp = (tmp_len > 0).then(|| d.scratch(tmp_len));
    // Messages of the last step never straddle a block boundary: a merged unit's two blocks
    // end up in different places (Output here, the sat-out neighbour there). Both partners
    // know which step is last, so they cut the same way.
    let cut = |range: Range<usize>, last: bool| -> Vec<Range<usize>> {
        if !last {
            return pieces(range, ce).collect();
        }
        let blocks = range.start / cnt..range.end.div_ceil(cnt);
        blocks.flat_map(|bk| pieces(range.start.max(bk * cnt)..range.end.min((bk + 1) * cnt), ce)).collect()
    };
    for (k, st) in steps.iter().enumerate() {
        let last = k + 1 == steps.len();
        for c in cut(st.give.clone(), last) {
            let src = if fresh(k) { (Buf::Input, c.start) } else { at_acc(c.start) };
            d.send(st.peer, src, c.len());
        }
        for c in cut(st.keep.clone(), last) {
            let into_output = last && c.start >= mine.start && c.end <= mine.end;
            match (fresh(k), into_output) {
                (true, true) => {
                    d.recv_reduce(st.peer, (Buf::Output, c.start - mine.start), (Buf::Input, c.start), c.len(), true);
                }
                (true, false) => {
                    d.recv_reduce(st.peer, at_acc(c.start), (Buf::Input, c.start), c.len(), last);
                }
                (false, true) => {
                    let o = (Buf::Output, c.start - mine.start);
                    d.recv(st.peer, o, c.len());
                    d.reduce(at_acc(c.start), o, c.len(), true);
                }
                (false, false) => {
                    let t = (tmp.expect("sized for this step"), c.start - st.keep.start);
                    d.recv(st.peer, t, c.len());
                    d.reduce(t, at_acc(c.start), c.len(), last);
                }
            }
        }
    }
    if folded {
        // The sat-out neighbour's block, finished here.
        for c in pieces((r - 1) * cnt..r * cnt, ce) {
            d.send(r - 1, at_acc(c.start), c.len());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn halving_partners_agree() {
        for n in 1..40usize {
            let p = pof2_floor(n);
            let rem = n - p;
            let cnt = 7;
            let unit = |i: usize| block(cnt * p, p, i);
            for nr in 0..p {
                let me = unfold_rank(nr, rem);
                let steps = halving(nr, p, rem, &unit);
                assert_eq!(steps.len(), p.trailing_zeros() as usize);
                assert_eq!(
                    steps.last().map(|s| s.keep.clone()).unwrap_or(0..cnt * p),
                    if p > 1 { unit(nr) } else { 0..cnt }
                );
                for (k, st) in steps.iter().enumerate() {
                    let pn = fold_rank(st.peer, rem).unwrap();
                    let theirs = &halving(pn, p, rem, &unit)[k];
                    assert_eq!(theirs.peer, me);
                    assert_eq!(theirs.give, st.keep);
                    assert_eq!(theirs.keep, st.give);
                }
            }
        }
    }
}
