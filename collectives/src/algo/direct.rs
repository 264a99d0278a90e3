//! Direct (linear / pairwise) algorithms: every rank exchanges with every peer it has data
//! for, in one logical round.
//!
//! Peers are visited in shifted order — at turn `k` rank `r` sends to `r+k` and receives
//! from `r-k` — so at every turn each rank sends to exactly one peer and receives from
//! exactly one, instead of everyone hitting rank 0 first. Large transfers are chunked.
//! One latency for everything, but the root of a rooted collective moves `(n-1)` times the
//! data through its own link: the right choice for small messages and for all-to-all.
//!
//! Reductions at one rank combine the first incoming stream as it arrives (it lands on
//! memory nothing else touched) and receive the others into per-peer slot rings, added in
//! peer order, so staged receives never wait on another peer.

use std::ops::Range;

use super::dag::{Dag, Io};
use super::{Shape, SlotRing, pieces, sub_mod};
use crate::schedule::{Buf, Builder};

/// Combine, at one rank, contributions that arrive from `peers` (in this order) over
/// `range` (elements), with this rank's own `mine`: `dst = mine op p0 op p1 ...`, finished.
/// Every stream is cut into the same chunks, chunk `c` of each peer's stream being the
/// `c`-th message from it.
fn reduce_from(d: &mut Dag<'_>, peers: &[usize], mine: (Buf, usize), dst: (Buf, usize), len: usize, ce: usize) {
    if len == 0 {
        return;
    }
    let Some((&first, rest)) = peers.split_first() else {
        d.copy(mine, dst, len);
        return;
    };
    let nch = len.div_ceil(ce);
    let rings: Vec<SlotRing> = rest.iter().map(|_| SlotRing::new(d, nch, ce, len)).collect();
    for (k, c) in pieces(0..len, ce).enumerate() {
        let at = (dst.0, dst.1 + c.start);
        d.recv_reduce(first, at, (mine.0, mine.1 + c.start), c.len(), rest.is_empty());
        for (i, (&p, ring)) in rest.iter().zip(&rings).enumerate() {
            let s = ring.at(k, c.len());
            d.recv(p, s, c.len());
            d.reduce(s, at, c.len(), i + 1 == rest.len());
        }
    }
}

/// Send `range` of `src` to `peer` in chunks.
fn send_range(d: &mut Dag<'_>, peer: usize, src: Buf, range: Range<usize>, ce: usize) {
    for c in pieces(range, ce) {
        d.send(peer, (src, c.start), c.len());
    }
}

/// Receive `len` elements from `peer` into `dst` at `at`, in chunks.
fn recv_range(d: &mut Dag<'_>, peer: usize, dst: Buf, at: usize, len: usize, ce: usize) {
    for c in pieces(0..len, ce) {
        d.recv(peer, (dst, at + c.start), c.len());
    }
}

/// Direct reduce-scatter: block `j` of every rank's input goes to rank `j`, which reduces
/// the `n` contributions. Each rank sends and receives `(n-1)*count` elements.
pub fn reduce_scatter(b: &mut Builder, sh: Shape) {
    let (r, n, cnt) = (sh.rank, sh.n, sh.count);
    if cnt == 0 {
        return;
    }
    let ce = sh.chunk_elems();
    let mut d = Dag::new(b, sh.esize, Io::Shared { in_base: 0, out_base: r * cnt }, n * cnt, cnt);
    for k in 1..n {
        let to = (r + k) % n;
        send_range(&mut d, to, Buf::Input, to * cnt..(to + 1) * cnt, ce);
    }
    let from: Vec<usize> = (1..n).map(|k| sub_mod(r, k, n)).collect();
    reduce_from(&mut d, &from, (Buf::Input, r * cnt), (Buf::Output, 0), cnt, ce);
}

/// Direct all-gather: every rank sends its input to every peer.
pub fn all_gather(b: &mut Builder, sh: Shape) {
    let (r, n, cnt) = (sh.rank, sh.n, sh.count);
    if cnt == 0 {
        return;
    }
    let ce = sh.chunk_elems();
    let mut d = Dag::new(b, sh.esize, Io::Shared { in_base: r * cnt, out_base: 0 }, cnt, n * cnt);
    d.copy((Buf::Input, 0), (Buf::Output, r * cnt), cnt);
    for k in 1..n {
        send_range(&mut d, (r + k) % n, Buf::Input, 0..cnt, ce);
        let from = sub_mod(r, k, n);
        recv_range(&mut d, from, Buf::Output, from * cnt, cnt, ce);
    }
}

/// Direct broadcast: the root sends the whole buffer to every other rank (chunk by chunk,
/// round-robin over the peers so all of them start early).
pub fn broadcast(b: &mut Builder, sh: Shape) {
    let (r, n, cnt, root) = (sh.rank, sh.n, sh.count, sh.root);
    if cnt == 0 {
        return;
    }
    let ce = sh.chunk_elems();
    let mut d = Dag::new(b, sh.esize, Io::Shared { in_base: 0, out_base: 0 }, cnt, cnt);
    if r == root {
        d.copy((Buf::Input, 0), (Buf::Output, 0), cnt);
        for c in pieces(0..cnt, ce) {
            for k in 1..n {
                d.send((root + k) % n, (Buf::Input, c.start), c.len());
            }
        }
    } else {
        recv_range(&mut d, root, Buf::Output, 0, cnt, ce);
    }
}

/// Direct reduce: every rank sends its input to the root, which reduces them. Non-root
/// Outputs are untouched.
pub fn reduce(b: &mut Builder, sh: Shape) {
    let (r, n, cnt, root) = (sh.rank, sh.n, sh.count, sh.root);
    if cnt == 0 {
        return;
    }
    let ce = sh.chunk_elems();
    let mut d = Dag::new(b, sh.esize, Io::Shared { in_base: 0, out_base: 0 }, cnt, cnt);
    if r == root {
        let from: Vec<usize> = (1..n).map(|k| (root + k) % n).collect();
        reduce_from(&mut d, &from, (Buf::Input, 0), (Buf::Output, 0), cnt, ce);
    } else {
        send_range(&mut d, root, Buf::Input, 0..cnt, ce);
    }
}

/// Direct (pairwise) all-to-all: block `j` of Input goes to rank `j`, block `i` of Output
/// comes from rank `i`. At turn `k` rank `r` sends to `r+k` and receives from `r-k`.
/// Out of place only.
pub fn all_to_all(b: &mut Builder, sh: Shape) {
    let (n, cnt) = (sh.n, sh.count);
    let counts = vec![cnt; n];
    let displs: Vec<usize> = (0..n).map(|i| i * cnt).collect();
    all_to_all_v(b, sh.rank, n, sh.esize, &counts, &displs, &counts, &displs, sh.chunk_bytes);
}

/// Direct all-to-all with per-peer counts and displacements (in elements): rank `r` sends
/// `send_counts[j]` elements at `send_displs[j]` of its Input to rank `j` and receives
/// `recv_counts[i]` elements from rank `i` at `recv_displs[i]` of its Output. Ranks must
/// agree pairwise (`send_counts[j]` on `i` equals `recv_counts[i]` on `j`); a disagreement
/// is caught by the frame header's length check. Out of place only.
#[allow(clippy::too_many_arguments)]
pub fn all_to_all_v(
    b: &mut Builder,
    rank: usize,
    n: usize,
    esize: usize,
    send_counts: &[usize],
    send_displs: &[usize],
    recv_counts: &[usize],
    recv_displs: &[usize],
    chunk_bytes: usize,
) {
    debug_assert!(rank < n);
    debug_assert!(send_counts.len() == n && send_displs.len() == n && recv_counts.len() == n && recv_displs.len() == n);
    debug_assert_eq!(
        send_counts[rank], recv_counts[rank],
        "rank {rank} sends itself a different count than it expects"
    );
    let ext = |c: &[usize], d: &[usize]| c.iter().zip(d).map(|(c, d)| c + d).max().unwrap_or(0);
    let shape = Shape { rank, n, count: 0, esize, chunk_bytes, root: 0 };
    let ce = shape.chunk_elems();
    let mut d = Dag::new(b, esize, Io::Separate, ext(send_counts, send_displs), ext(recv_counts, recv_displs));
    if send_counts[rank] > 0 {
        d.copy((Buf::Input, send_displs[rank]), (Buf::Output, recv_displs[rank]), send_counts[rank]);
    }
    for k in 1..n {
        let to = (rank + k) % n;
        send_range(&mut d, to, Buf::Input, send_displs[to]..send_displs[to] + send_counts[to], ce);
        let from = sub_mod(rank, k, n);
        recv_range(&mut d, from, Buf::Output, recv_displs[from], recv_counts[from], ce);
    }
}

/// Direct gather: every rank sends its input to the root, which places block `i` at
/// `i*count` of its Output. Non-root Outputs are untouched.
pub fn gather(b: &mut Builder, sh: Shape) {
    let (r, n, cnt, root) = (sh.rank, sh.n, sh.count, sh.root);
    if cnt == 0 {
        return;
    }
    let ce = sh.chunk_elems();
    let mut d = Dag::new(b, sh.esize, Io::Shared { in_base: r * cnt, out_base: 0 }, cnt, n * cnt);
    if r == root {
        d.copy((Buf::Input, 0), (Buf::Output, root * cnt), cnt);
        for k in 1..n {
            let from = (root + k) % n;
            recv_range(&mut d, from, Buf::Output, from * cnt, cnt, ce);
        }
    } else {
        send_range(&mut d, root, Buf::Input, 0..cnt, ce);
    }
}

/// Direct scatter: the root sends block `i` of its Input to rank `i`.
pub fn scatter(b: &mut Builder, sh: Shape) {
    let (r, n, cnt, root) = (sh.rank, sh.n, sh.count, sh.root);
    if cnt == 0 {
        return;
    }
    let ce = sh.chunk_elems();
    let mut d = Dag::new(b, sh.esize, Io::Shared { in_base: 0, out_base: r * cnt }, n * cnt, cnt);
    if r == root {
        d.copy((Buf::Input, root * cnt), (Buf::Output, 0), cnt);
        for k in 1..n {
            let to = (root + k) % n;
            send_range(&mut d, to, Buf::Input, to * cnt..(to + 1) * cnt, ce);
        }
    } else {
        recv_range(&mut d, root, Buf::Output, 0, cnt, ce);
    }
}
