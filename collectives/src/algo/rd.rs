//! Recursive doubling: latency-optimal exchanges in ceil(log2 n) rounds.
//!
//! [`all_reduce`]: in round `k` every rank swaps its whole (partially reduced) vector with
//! the rank whose number differs in bit `k` and reduces; after log2(n) rounds every rank
//! holds the full reduction. For a world that is not a power of two the first `2*rem` ranks
//! (`rem = n - 2^floor(log2 n)`) pair up first: each even one hands its input to its odd
//! neighbour and sits out, getting the result back at the end (MPICH's scheme). Each round
//! moves the whole vector, so this is for small messages; rounds are pipelined by chunk.
//!
//! [`all_gather`]: on a power of two, round `k` swaps the `2^k` blocks gathered so far with
//! the partner across bit `k`. Otherwise Bruck's algorithm: in round `k` rank `r` sends the
//! `min(2^k, n-2^k)` blocks it holds starting at its own to `r-2^k` and receives as many
//! from `r+2^k`; blocks land directly at their final offsets, so no rotation is needed.

use std::ops::Range;

use super::dag::{Dag, Io};
use super::{Shape, pieces, sub_mod};
use crate::schedule::{Buf, Builder};

/// Largest power of two not above `n` (n >= 1).
pub(crate) fn pof2_floor(n: usize) -> usize {
    debug_assert!(n >= 1);
    1 << (usize::BITS - 1 - n.leading_zeros())
}

/// Where rank `r` stands after the non-power-of-two fold: `None` for the even ranks below
/// `2*rem` (they sit out), else its rank among the `2^k` active ones.
pub(crate) fn fold_rank(r: usize, rem: usize) -> Option<usize> {
    if r < 2 * rem { (r % 2 == 1).then_some(r / 2) } else { Some(r - rem) }
}

/// The real rank of active rank `nr`.
pub(crate) fn unfold_rank(nr: usize, rem: usize) -> usize {
    if nr < rem { 2 * nr + 1 } else { nr + rem }
}

/// The fold of a world that is not a power of two, around an all-reduce of `cnt` elements
/// among the `2^k` active ranks. A rank that sits out hands its input to its odd partner
/// and receives the result: its whole part is added here and it gets `None`. An active rank
/// that absorbed a partner first reduces the partner's input into Output (not finished:
/// the active ranks' exchange follows) and must later [`fold_out`]. Returns the active rank
/// and whether it absorbed a partner.
pub(crate) fn fold_in(d: &mut Dag<'_>, r: usize, rem: usize, cnt: usize, ce: usize) -> Option<(usize, bool)> {
    let Some(nr) = fold_rank(r, rem) else {
        for c in pieces(0..cnt, ce) {
            d.send(r + 1, (Buf::Input, c.start), c.len());
        }
        for c in pieces(0..cnt, ce) {
            d.recv(r + 1, (Buf::Output, c.start), c.len());
        }
        return None;
    };
    let folded = r < 2 * rem;
    if folded {
        for c in pieces(0..cnt, ce) {
            d.recv_reduce(r - 1, (Buf::Output, c.start), (Buf::Input, c.start), c.len(), false);
        }
    }
    Some((nr, folded))
}

/// Hand the finished result back to the partner that sat out (see [`fold_in`]).
pub(crate) fn fold_out(d: &mut Dag<'_>, r: usize, cnt: usize, ce: usize) {
    for c in pieces(0..cnt, ce) {
        d.send(r - 1, (Buf::Output, c.start), c.len());
    }
}

/// Recursive-doubling all-reduce (see the module docs).
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
    let p2 = pof2_floor(n);
    let rem = n - p2;
    let rounds = p2.trailing_zeros() as usize;
    // A folded pair means n >= 3, so rounds >= 1 and the fold never finishes an element.
    let Some((nr, folded)) = fold_in(&mut d, r, rem, cnt, ce) else { return };
    // Incoming vectors of rounds that reduce into an already reduced Output land here
    // first: a RecvReduce there would hold a staging slot while waiting for another peer.
    let tmp = (folded || rounds > 1).then(|| d.scratch(cnt));
    for k in 0..rounds {
        let peer = unfold_rank(nr ^ (1 << k), rem);
        let last = k + 1 == rounds;
        // Round 0 of an unfolded rank reads its input directly (no copy into Output).
        let fresh = k == 0 && !folded;
        for c in pieces(0..cnt, ce) {
            let src = if fresh { (Buf::Input, c.start) } else { (Buf::Output, c.start) };
            d.send(peer, src, c.len());
            if fresh {
                d.recv_reduce(peer, (Buf::Output, c.start), (Buf::Input, c.start), c.len(), last);
            } else {
                let t = (tmp.expect("allocated for reducing rounds"), c.start);
                d.recv(peer, t, c.len());
                d.reduce(t, (Buf::Output, c.start), c.len(), last);
            }
        }
    }
    if folded {
        fold_out(&mut d, r, cnt, ce);
    }
}

/// Element ranges of Output holding blocks `first, first+1, ..., first+m-1` (mod n): the
/// second range is empty unless the run wraps past the last block. Sender and receiver
/// split a run the same way, so their messages match.
pub(crate) fn wrapped_blocks(first: usize, m: usize, n: usize, cnt: usize) -> [Range<usize>; 2] {
    debug_assert!(first < n && m <= n);
    if first + m <= n {
        [first * cnt..(first + m) * cnt, 0..0]
    } else {
        [first * cnt..n * cnt, 0..(first + m - n) * cnt]
    }
}

/// Recursive-doubling all-gather (Bruck's variant off powers of two; see the module docs).
pub fn all_gather(b: &mut Builder, sh: Shape) {
    let (r, n, cnt) = (sh.rank, sh.n, sh.count);
    if cnt == 0 {
        return;
    }
    let mut d = Dag::new(b, sh.esize, Io::Shared { in_base: r * cnt, out_base: 0 }, cnt, n * cnt);
    d.copy((Buf::Input, 0), (Buf::Output, r * cnt), cnt);
    let ce = sh.chunk_elems();
    let mut dist = 1;
    while dist < n {
        let (to, from, mine, theirs) = if n.is_power_of_two() {
            // Swap aligned groups of `dist` blocks with the partner across bit log2(dist).
            let p = r ^ dist;
            let group = |x: usize| [(x & !(dist - 1)) * cnt..((x & !(dist - 1)) + dist) * cnt, 0..0];
            (p, p, group(r), group(p))
        } else {
            let m = dist.min(n - dist);
            (
                sub_mod(r, dist, n),
                (r + dist) % n,
                wrapped_blocks(r, m, n, cnt),
                wrapped_blocks((r + dist) % n, m, n, cnt),
            )
        };
        for range in mine {
            for c in pieces(range, ce) {
                // The first round sends this rank's own block: read it from Input rather
                // than wait for the copy into Output.
                let src = if dist == 1 { (Buf::Input, c.start - r * cnt) } else { (Buf::Output, c.start) };
                d.send(to, src, c.len());
            }
        }
        for range in theirs {
            for c in pieces(range, ce) {
                d.recv(from, (Buf::Output, c.start), c.len());
            }
        }
        dist *= 2;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fold_maps_back() {
        for n in 1..40 {
            let p2 = pof2_floor(n);
            assert!(p2 <= n && 2 * p2 > n && p2.is_power_of_two());
            let rem = n - p2;
            let active: Vec<usize> = (0..n).filter_map(|r| fold_rank(r, rem)).collect();
            assert_eq!(active, (0..p2).collect::<Vec<_>>());
            for r in 0..n {
                if let Some(nr) = fold_rank(r, rem) {
                    assert_eq!(unfold_rank(nr, rem), r);
                }
            }
        }
    }
}
