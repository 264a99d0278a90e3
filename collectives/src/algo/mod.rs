//! Schedule generators. Each algorithm writes one rank's part of a collective as a
//! [`Builder`] DAG; none of them names a transport.
//!
//! A generator is a pure function of its [`Shape`] (and, for the few irregular calls, of its
//! explicit arguments): every rank runs the same code on its own rank number, so the k-th
//! message one rank sends to another is, by construction, the k-th message the other
//! expects. Generators describe memory accesses through the internal hazard tracker
//! (`dag.rs`), which derives every read/write ordering edge, in place and out of place.
//!
//! | collective      | algorithms (first = default preference)        |
//! |-----------------|------------------------------------------------|
//! | all_reduce      | ring, tree, halving_doubling, recursive_doubling |
//! | reduce_scatter  | ring, halving_doubling, direct                 |
//! | all_gather      | ring, recursive_doubling, direct               |
//! | broadcast       | ring, tree, direct                             |
//! | reduce          | ring, tree, direct                             |
//! | all_to_all(_v)  | direct                                         |
//! | gather, scatter | direct, tree (binomial)                        |
//! | send/recv       | direct ([`p2p`])                               |
//! | barrier         | dissemination                                  |
//!
//! docs/algorithms.md lists, for each, the steps and the bytes each rank puts on the wire.

mod dag;
pub mod direct;
pub mod dissemination;
pub mod hd;
pub mod p2p;
pub mod rd;
pub mod ring;
pub mod tree;

use std::fmt;
use std::ops::Range;

use devccl_core::wire::CollKind;

use crate::schedule::Builder;

/// Largest message a generator emits (the frame header's length field is 32 bits; smaller
/// messages also keep one transfer from monopolising a connection).
pub const MAX_MESSAGE_BYTES: usize = 1 << 30;

/// Staging depth of scratch slot rings (pipelined streams reuse `SLOTS` chunk-sized slots;
/// a receive into a slot waits until the previous occupant has been consumed).
const SLOTS: usize = 8;

/// Elements `[i*count/n, (i+1)*count/n)`: n near-equal blocks (sizes differ by at most one).
pub fn block(count: usize, n: usize, i: usize) -> Range<usize> {
    let at = |k: usize| ((k as u128 * count as u128) / n as u128) as usize;
    at(i)..at(i + 1)
}

/// Split `range` (elements) into `nchunks` pieces of `chunk` elements (the last ones may be
/// short or empty); returns piece `c`.
pub fn chunk_of(range: &Range<usize>, chunk: usize, c: usize) -> Range<usize> {
    let s = (range.start + c * chunk).min(range.end);
    let e = (s + chunk).min(range.end);
    s..e
}

/// What every generator is told about the call on this rank.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    /// This rank.
    pub rank: usize,
    /// World size.
    pub n: usize,
    /// Elements: the whole buffer for all-reduce/broadcast/reduce; per rank for all-gather
    /// (input), reduce-scatter (output), gather/scatter/all-to-all (per destination).
    pub count: usize,
    /// Bytes per element.
    pub esize: usize,
    /// Pipeline chunk in bytes.
    pub chunk_bytes: usize,
    /// Root rank (rooted collectives; 0 otherwise).
    pub root: usize,
}

impl Shape {
    /// Chunk size in elements (at least one, and at most [`MAX_MESSAGE_BYTES`]).
    pub fn chunk_elems(&self) -> usize {
        (self.chunk_bytes.min(MAX_MESSAGE_BYTES) / self.esize).max(1)
    }
}

/// `range` cut into consecutive pieces of at most `ce` elements (nothing when empty).
pub(crate) fn pieces(range: Range<usize>, ce: usize) -> impl Iterator<Item = Range<usize>> {
    debug_assert!(ce > 0);
    let end = range.end;
    range.step_by(ce).map(move |a| a..(a + ce).min(end))
}

/// A ring of `SLOTS` chunk-sized scratch slots for a stream of chunks: chunk `c` lives in
/// slot `c % SLOTS`. Reusing a slot makes the tracker order the new receive after the old
/// occupant's last reader, which is the flow control of the stream.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SlotRing {
    buf: crate::schedule::Buf,
    slot: usize,
    nslots: usize,
}

impl SlotRing {
    /// Slots for `nchunks` chunks of at most `ce` (and at most `count`) elements.
    pub(crate) fn new(d: &mut dag::Dag<'_>, nchunks: usize, ce: usize, count: usize) -> SlotRing {
        let slot = ce.min(count).max(1);
        let nslots = nchunks.clamp(1, SLOTS);
        SlotRing { buf: d.scratch(slot * nslots), slot, nslots }
    }

    /// Where chunk `c` (of `len` elements, at most one slot) goes.
    pub(crate) fn at(&self, c: usize, len: usize) -> dag::At {
        debug_assert!(len <= self.slot, "chunk of {len} elements in a {}-element slot", self.slot);
        (self.buf, (c % self.nslots) * self.slot)
    }
}

/// `(a - b) mod n` for ranks.
pub(crate) fn sub_mod(a: usize, b: usize, n: usize) -> usize {
    (a + n - b % n) % n
}

/// Numbered algorithms (the code travels in every frame header so ranks that chose
/// differently detect it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Algo {
    /// Ring: pipelined chunks around (or along) a ring of ranks; bandwidth-optimal.
    Ring = 1,
    /// Recursive doubling: log2(n) rounds of pairwise exchange (Bruck's variant for
    /// all-gather on non-powers of two; folding for all-reduce). Latency-optimal.
    RecursiveDoubling = 2,
    /// Halving-doubling (Rabenseifner): recursive-halving reduce-scatter, then
    /// recursive-doubling all-gather.
    HalvingDoubling = 3,
    /// Trees: NCCL's double binary tree for all-reduce, broadcast and reduce; binomial trees
    /// for gather and scatter.
    Tree = 4,
    /// Direct (linear / pairwise): every rank talks to every peer; for small sizes, and the
    /// only form of all-to-all and point-to-point.
    Direct = 5,
    /// Dissemination barrier: ceil(log2 n) rounds of empty messages.
    Dissemination = 6,
}

impl Algo {
    /// Every algorithm, in code order.
    pub const ALL: [Algo; 6] =
        [Algo::Ring, Algo::RecursiveDoubling, Algo::HalvingDoubling, Algo::Tree, Algo::Direct, Algo::Dissemination];

    /// Name as in `DEVCCL_ALGO`.
    pub const fn name(self) -> &'static str {
        match self {
            Algo::Ring => "ring",
            Algo::RecursiveDoubling => "recursive_doubling",
            Algo::HalvingDoubling => "halving_doubling",
            Algo::Tree => "tree",
            Algo::Direct => "direct",
            Algo::Dissemination => "dissemination",
        }
    }

    /// Parse a name or alias (case-insensitive, `-` and `_` alike): ring;
    /// recursive_doubling / rd; halving_doubling / rabenseifner / hd; tree /
    /// double_binary_tree; direct / linear / pairwise; dissemination.
    pub fn from_name(s: &str) -> Option<Algo> {
        let s = s.trim().to_ascii_lowercase().replace('-', "_");
        Some(match s.as_str() {
            "ring" => Algo::Ring,
            "recursive_doubling" | "rd" => Algo::RecursiveDoubling,
            "halving_doubling" | "rabenseifner" | "hd" => Algo::HalvingDoubling,
            "tree" | "double_binary_tree" => Algo::Tree,
            "direct" | "linear" | "pairwise" => Algo::Direct,
            "dissemination" => Algo::Dissemination,
            _ => return None,
        })
    }

    /// The wire code.
    pub const fn code(self) -> u8 {
        self as u8
    }

    /// Decode a wire code.
    pub fn from_code(code: u8) -> Option<Algo> {
        Algo::ALL.into_iter().find(|a| a.code() == code)
    }
}

impl fmt::Display for Algo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Which algorithms implement `coll`, the default preference first. `AllToAllV` and
/// `SendRecv` have their own generators ([`direct::all_to_all_v`], [`p2p`]); every other
/// pair listed here is built by [`build`].
pub fn supported(coll: CollKind) -> &'static [Algo] {
    use Algo::*;
    match coll {
        CollKind::AllReduce => &[Ring, Tree, HalvingDoubling, RecursiveDoubling],
        CollKind::ReduceScatter => &[Ring, HalvingDoubling, Direct],
        CollKind::AllGather => &[Ring, RecursiveDoubling, Direct],
        CollKind::Broadcast => &[Ring, Tree, Direct],
        CollKind::Reduce => &[Ring, Tree, Direct],
        CollKind::AllToAll | CollKind::AllToAllV | CollKind::SendRecv => &[Direct],
        CollKind::Gather | CollKind::Scatter => &[Direct, Tree],
        CollKind::Barrier => &[Dissemination],
    }
}

/// Write this rank's schedule of `coll` with `algo` into `b` (the uniform-shape collectives:
/// everything but all_to_all_v and send/recv, whose shapes are per peer). Errors name the
/// pair when `algo` does not implement `coll`.
pub fn build(coll: CollKind, algo: Algo, b: &mut Builder, sh: Shape) -> Result<(), String> {
    debug_assert!(sh.n >= 1 && sh.rank < sh.n && sh.root < sh.n, "bad shape {sh:?}");
    use Algo::*;
    match (coll, algo) {
        (CollKind::AllReduce, Ring) => ring::all_reduce(b, sh),
        (CollKind::AllReduce, Tree) => tree::all_reduce(b, sh),
        (CollKind::AllReduce, HalvingDoubling) => hd::all_reduce(b, sh),
        (CollKind::AllReduce, RecursiveDoubling) => rd::all_reduce(b, sh),
        (CollKind::ReduceScatter, Ring) => ring::reduce_scatter(b, sh),
        (CollKind::ReduceScatter, HalvingDoubling) => hd::reduce_scatter(b, sh),
        (CollKind::ReduceScatter, Direct) => direct::reduce_scatter(b, sh),
        (CollKind::AllGather, Ring) => ring::all_gather(b, sh),
        (CollKind::AllGather, RecursiveDoubling) => rd::all_gather(b, sh),
        (CollKind::AllGather, Direct) => direct::all_gather(b, sh),
        (CollKind::Broadcast, Ring) => ring::broadcast(b, sh),
        (CollKind::Broadcast, Tree) => tree::broadcast(b, sh),
        (CollKind::Broadcast, Direct) => direct::broadcast(b, sh),
        (CollKind::Reduce, Ring) => ring::reduce(b, sh),
        (CollKind::Reduce, Tree) => tree::reduce(b, sh),
        (CollKind::Reduce, Direct) => direct::reduce(b, sh),
        (CollKind::AllToAll, Direct) => direct::all_to_all(b, sh),
        (CollKind::Gather, Direct) => direct::gather(b, sh),
        (CollKind::Gather, Tree) => tree::gather(b, sh),
        (CollKind::Scatter, Direct) => direct::scatter(b, sh),
        (CollKind::Scatter, Tree) => tree::scatter(b, sh),
        (CollKind::Barrier, Dissemination) => dissemination::barrier(b, sh),
        (CollKind::AllToAllV, _) => {
            return Err("all_to_all_v has per-peer counts: build it with algo::direct::all_to_all_v".into());
        }
        (CollKind::SendRecv, _) => {
            return Err("send/recv are built with algo::p2p::{send, recv}".into());
        }
        (coll, algo) => return Err(format!("algorithm '{algo}' does not implement {coll:?}")),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for a in Algo::ALL {
            assert_eq!(Algo::from_name(a.name()), Some(a));
            assert_eq!(Algo::from_code(a.code()), Some(a));
        }
        for (alias, a) in [
            ("rd", Algo::RecursiveDoubling),
            ("HD", Algo::HalvingDoubling),
            ("rabenseifner", Algo::HalvingDoubling),
            ("double-binary-tree", Algo::Tree),
            ("linear", Algo::Direct),
        ] {
            assert_eq!(Algo::from_name(alias), Some(a));
        }
        assert_eq!(Algo::from_name("butterfly"), None);
    }

    #[test]
    fn pieces_cover() {
        assert_eq!(pieces(3..10, 4).collect::<Vec<_>>(), vec![3..7, 7..10]);
        assert_eq!(pieces(5..5, 4).count(), 0);
    }

    #[test]
    fn blocks_cover_exactly() {
        for count in [0usize, 1, 7, 13, 1000] {
            for n in 1..20 {
                let mut next = 0;
                for i in 0..n {
                    let b = block(count, n, i);
                    assert_eq!(b.start, next);
                    assert!(b.len() <= count.div_ceil(n));
                    next = b.end;
                }
                assert_eq!(next, count);
            }
        }
    }
}
