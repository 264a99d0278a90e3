//! Tree algorithms: NCCL's double binary tree for all-reduce, broadcast and reduce, and
//! binomial trees for gather and scatter.
//!
//! **Double binary tree** (Sanders, Speck & Träff; NCCL `ncclGetDtree`). Tree 0 is the
//! binary tree NCCL builds from rank bits: a rank's parent is found by moving its lowest set
//! bit one place up, so odd ranks are leaves and rank 0 is the root with a single child.
//! Tree 1 is the same tree mirrored (`n-1-v`, even `n`) or shifted by one (odd `n`), which
//! makes most of tree 0's leaves interior in tree 1 and vice versa. Each tree carries half
//! of the data, chunk by chunk, so every rank sends and receives about the whole buffer
//! once per phase while the depth stays `log2 n`: bandwidth close to the ring's with
//! logarithmic latency.
//!
//! - [`all_reduce`]: per chunk and tree, reduce up (a node combines its input with what its
//!   children send and forwards the partial; the root finishes), then broadcast down. The
//!   broadcast of chunk `c` is emitted `LAG` chunks after its reduction so the reduction of
//!   later chunks is not queued behind it on a shared connection.
//! - [`broadcast`] / [`reduce`]: the trees are built on ranks relabelled so that the root
//!   is 0. Tree 0 is rooted there; tree 1's root receives its half from the root first
//!   (broadcast) or hands the finished half to it last (reduce).
//!
//! **Binomial trees** ([`gather`], [`scatter`]): relabelled rank `v` has children
//! `v + 2^k` for every `2^k` below its lowest set bit; subtrees are contiguous runs of
//! relabelled ranks, so each edge carries one run of blocks, gathered in (or scattered from)
//! a scratch buffer at interior ranks. ceil(log2 n) rounds; the root moves `(n-1)` blocks.

use std::ops::Range;

use super::dag::{At, Dag, Io};
use super::{Shape, SlotRing, block, pieces, sub_mod};
use crate::schedule::{Buf, Builder};

/// Chunks between a chunk's reduction and its broadcast in emission order (all-reduce), or
/// its hand-over to the root (reduce).
const LAG: usize = 4;

/// Parent of `v` in NCCL's binary tree over `0..n` (root 0): clear the lowest set bit and
/// set the next one up, or just clear it when that leaves the world.
fn btree_parent(v: usize, n: usize) -> Option<usize> {
    if v == 0 {
        return None;
    }
    let bit = 1 << v.trailing_zeros();
    let up = (v ^ bit) | (bit << 1);
    Some(if up >= n { v ^ bit } else { up })
}

/// Parent of `v` in tree `t` of the double binary tree over `0..n`.
pub(crate) fn dtree_parent(t: usize, v: usize, n: usize) -> Option<usize> {
    debug_assert!(v < n && t < 2);
    if t == 0 {
        btree_parent(v, n)
    } else if n % 2 == 1 {
        btree_parent((v + n - 1) % n, n).map(|u| (u + 1) % n)
    } else {
        btree_parent(n - 1 - v, n).map(|u| n - 1 - u)
    }
}

/// Root of tree `t`.
pub(crate) fn dtree_root(t: usize, n: usize) -> usize {
    match t {
        0 => 0,
        _ if n % 2 == 1 => 1 % n,
        _ => n - 1,
    }
}

/// One rank's place in one tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Node {
    /// Parent, `None` at the root.
    pub(crate) parent: Option<usize>,
    /// Children, ascending (at most two).
    pub(crate) children: Vec<usize>,
}

/// Rank `v`'s node in tree `t` (children found by asking every rank for its parent, so
/// parent and child lists agree by construction).
pub(crate) fn dtree_node(t: usize, v: usize, n: usize) -> Node {
    let children: Vec<usize> = (0..n).filter(|&u| u != v && dtree_parent(t, u, n) == Some(v)).collect();
    debug_assert!(children.len() <= 2, "binary tree node with {} children", children.len());
    Node { parent: dtree_parent(t, v, n), children }
}

/// The double binary tree as seen by one rank, in relabelled ranks (`v = rank - root`).
#[derive(Debug)]
struct Trees {
    n: usize,
    root: usize,
    v: usize,
    nodes: [Node; 2],
    /// Elements each tree carries.
    halves: [Range<usize>; 2],
    ce: usize,
}

impl Trees {
    fn new(sh: &Shape) -> Trees {
        let (n, v) = (sh.n, sub_mod(sh.rank, sh.root, sh.n));
        Trees {
            n,
            root: sh.root,
            v,
            nodes: [dtree_node(0, v, n), dtree_node(1, v, n)],
            halves: [block(sh.count, 2, 0), block(sh.count, 2, 1)],
            ce: sh.chunk_elems(),
        }
    }

    fn real(&self, v: usize) -> usize {
        (v + self.root) % self.n
    }

    fn nchunks(&self) -> usize {
        self.halves.iter().map(|h| h.len().div_ceil(self.ce)).max().unwrap_or(0)
    }

    /// Chunk `c` of tree `t`'s half (empty past its end).
    fn chunk(&self, t: usize, c: usize) -> Range<usize> {
        super::chunk_of(&self.halves[t], self.ce, c)
    }

    /// Slot rings for the second child's stream in each tree where this rank has two.
    fn second_child_slots(&self, d: &mut Dag<'_>) -> [Option<SlotRing>; 2] {
        let ring = |d: &mut Dag<'_>, t: usize| {
            let h = &self.halves[t];
            (self.nodes[t].children.len() == 2).then(|| SlotRing::new(d, h.len().div_ceil(self.ce), self.ce, h.len()))
        };
        [ring(d, 0), ring(d, 1)]
    }

    /// Reduce chunk `c` of tree `t` toward the tree's root: this rank's input combined with
    /// its children's partials in `acc` (input alone at a leaf), then sent to the parent.
    /// The tree's root finishes. Returns where this rank's partial is.
    ///
    /// The first child's data is reduced as it arrives (its destination is untouched so
    /// far); the second child's lands in a slot and is added once the first is in, so no
    /// staged receive waits on another peer.
    fn up(&self, d: &mut Dag<'_>, t: usize, c: usize, acc: Option<Buf>, slots: &[Option<SlotRing>; 2]) -> At {
        let r = self.chunk(t, c);
        let len = r.len();
        let node = &self.nodes[t];
        let mine = (Buf::Input, r.start);
        let here = match node.children[..] {
            [] => mine,
            [first, ..] => {
                let at = (acc.expect("interior ranks have an accumulator"), r.start);
                let root = node.parent.is_none();
                d.recv_reduce(self.real(first), at, mine, len, root && node.children.len() == 1);
                if let Some(&second) = node.children.get(1) {
                    let s = slots[t].expect("two children have a slot ring").at(c, len);
                    d.recv(self.real(second), s, len);
                    d.reduce(s, at, len, root);
                }
                at
            }
        };
        if let Some(p) = node.parent {
            d.send(self.real(p), here, len);
        }
        here
    }
}

/// Double-binary-tree all-reduce (see the module docs).
pub fn all_reduce(b: &mut Builder, sh: Shape) {
    let cnt = sh.count;
    if cnt == 0 {
        return;
    }
    let mut d = Dag::new(b, sh.esize, Io::Shared { in_base: 0, out_base: 0 }, cnt, cnt);
    if sh.n == 1 {
        d.copy((Buf::Input, 0), (Buf::Output, 0), cnt);
        return;
    }
    let tr = Trees::new(&Shape { root: 0, ..sh });
    let slots = tr.second_child_slots(&mut d);
    let nch = tr.nchunks();
    for i in 0..nch + LAG {
        for t in 0..2 {
            if i < nch && !tr.chunk(t, i).is_empty() {
                tr.up(&mut d, t, i, Some(Buf::Output), &slots);
            }
        }
        let Some(c) = i.checked_sub(LAG) else {
            continue;
        };
        for t in 0..2 {
            let r = tr.chunk(t, c);
            if r.is_empty() {
                continue;
            }
            let node = &tr.nodes[t];
            if let Some(p) = node.parent {
                d.recv(tr.real(p), (Buf::Output, r.start), r.len());
            }
            for &ch in &node.children {
                d.send(tr.real(ch), (Buf::Output, r.start), r.len());
            }
        }
    }
}

/// Double-binary-tree broadcast from `root` (see the module docs): tree 0 is rooted at the
/// root; tree 1's root first receives its half from the root, and the root, already
/// holding the data, takes no part in tree 1 beyond feeding its own children.
pub fn broadcast(b: &mut Builder, sh: Shape) {
    let cnt = sh.count;
    if cnt == 0 {
        return;
    }
    let mut d = Dag::new(b, sh.esize, Io::Shared { in_base: 0, out_base: 0 }, cnt, cnt);
    let tr = Trees::new(&sh);
    if tr.v == 0 {
        d.copy((Buf::Input, 0), (Buf::Output, 0), cnt);
    }
    if sh.n == 1 {
        return;
    }
    let x1 = dtree_root(1, sh.n);
    debug_assert_ne!(x1, 0);
    for c in 0..tr.nchunks() {
        for t in 0..2 {
            let r = tr.chunk(t, c);
            if r.is_empty() {
                continue;
            }
            if t == 1 {
                if tr.v == 0 {
                    d.send(tr.real(x1), (Buf::Input, r.start), r.len());
                } else if tr.v == x1 {
                    d.recv(tr.real(0), (Buf::Output, r.start), r.len());
                }
            }
            let node = &tr.nodes[t];
            if let (Some(p), false) = (node.parent, tr.v == 0) {
                d.recv(tr.real(p), (Buf::Output, r.start), r.len());
            }
            let src = if tr.v == 0 { Buf::Input } else { Buf::Output };
            for &ch in node.children.iter().filter(|&&ch| ch != 0) {
                d.send(tr.real(ch), (src, r.start), r.len());
            }
        }
    }
}

/// Double-binary-tree reduce to `root` (see the module docs). Tree 1's root finishes its
/// half and hands it to the root. Non-root Outputs are left untouched: interior ranks
/// accumulate in a scratch buffer of `count` elements.
pub fn reduce(b: &mut Builder, sh: Shape) {
    let cnt = sh.count;
    if cnt == 0 {
        return;
    }
    let mut d = Dag::new(b, sh.esize, Io::Shared { in_base: 0, out_base: 0 }, cnt, cnt);
    if sh.n == 1 {
        d.copy((Buf::Input, 0), (Buf::Output, 0), cnt);
        return;
    }
    let tr = Trees::new(&sh);
    let x1 = dtree_root(1, sh.n);
    let interior = tr.nodes.iter().any(|nd| !nd.children.is_empty());
    // A full-size accumulator (not a slot ring): the first child's staged receive must not
    // wait for a slot freed by the second child's stream.
    let acc = if tr.v == 0 { Some(Buf::Output) } else { interior.then(|| d.scratch(cnt)) };
    let slots = tr.second_child_slots(&mut d);
    let nch = tr.nchunks();
    for i in 0..nch + LAG {
        for t in 0..2 {
            if i < nch && !tr.chunk(t, i).is_empty() {
                tr.up(&mut d, t, i, acc, &slots);
            }
        }
        let Some(c) = i.checked_sub(LAG) else {
            continue;
        };
        let r = tr.chunk(1, c);
        if r.is_empty() {
            continue;
        }
        if tr.v == x1 {
            d.send(tr.real(0), (acc.expect("tree 1's root is interior"), r.start), r.len());
        } else if tr.v == 0 {
            d.recv(tr.real(x1), (Buf::Output, r.start), r.len());
        }
    }
}

/// Lowest set bit of relabelled rank `v`, `n` (the whole world) for the root.
fn binomial_span(v: usize, n: usize) -> usize {
    if v == 0 { n.next_power_of_two().max(1) } else { 1 << v.trailing_zeros() }
}

/// Relabelled ranks of `v`'s binomial subtree: `v` and everything below it.
fn subtree(v: usize, n: usize) -> Range<usize> {
    v..(v + binomial_span(v, n)).min(n)
}

/// Children of `v`, smallest subtree first.
fn binomial_children(v: usize, n: usize) -> Vec<usize> {
    let span = binomial_span(v, n);
    (0..usize::BITS).map(|k| 1usize << k).take_while(|&bit| bit < span).map(|bit| v + bit).filter(|&u| u < n).collect()
}

/// Parent of `v` (not the root).
fn binomial_parent(v: usize) -> usize {
    debug_assert!(v > 0);
    v - (1 << v.trailing_zeros())
}

/// A run of relabelled ranks cut where the real ranks wrap past `n-1`, so each piece is
/// contiguous in real-rank order too. Both ends of an edge cut the same run the same way.
fn wrap_split(run: Range<usize>, root: usize, n: usize) -> Vec<Range<usize>> {
    let w = n - root;
    if root != 0 && run.start < w && w < run.end { vec![run.start..w, w..run.end] } else { vec![run] }
}

/// Binomial-tree gather to `root`: interior ranks collect their subtree's blocks in
/// scratch (relabelled order) and forward them as one run; the root receives each child's
/// run straight into Output. Non-root Outputs are untouched.
pub fn gather(b: &mut Builder, sh: Shape) {
    let (n, cnt, root) = (sh.n, sh.count, sh.root);
    if cnt == 0 {
        return;
    }
    let mut d = Dag::new(b, sh.esize, Io::Shared { in_base: sh.rank * cnt, out_base: 0 }, cnt, n * cnt);
    let v = sub_mod(sh.rank, root, n);
    let real = |v: usize| (v + root) % n;
    let ce = sh.chunk_elems();
    let children = binomial_children(v, n);
    if v == 0 {
        d.copy((Buf::Input, 0), (Buf::Output, root * cnt), cnt);
        for &ch in &children {
            for run in wrap_split(subtree(ch, n), root, n) {
                let base = real(run.start) * cnt;
                for c in pieces(0..run.len() * cnt, ce) {
                    d.recv(real(ch), (Buf::Output, base + c.start), c.len());
                }
            }
        }
        return;
    }
    let mine = subtree(v, n);
    // Where this rank's outgoing run lives: its input alone at a leaf, else scratch.
    let store = if children.is_empty() {
        Buf::Input
    } else {
        let tmp = d.scratch(mine.len() * cnt);
        d.copy((Buf::Input, 0), (tmp, 0), cnt);
        for &ch in &children {
            for run in wrap_split(subtree(ch, n), root, n) {
                let base = (run.start - v) * cnt;
                for c in pieces(0..run.len() * cnt, ce) {
                    d.recv(real(ch), (tmp, base + c.start), c.len());
                }
            }
        }
        tmp
    };
    for run in wrap_split(mine, root, n) {
        let base = (run.start - v) * cnt;
        for c in pieces(0..run.len() * cnt, ce) {
            d.send(real(binomial_parent(v)), (store, base + c.start), c.len());
        }
    }
}

/// Binomial-tree scatter from `root`: the root sends each child its subtree's run of
/// blocks (largest subtree first); interior ranks receive their run into scratch, keep
/// their block and pass the rest on.
pub fn scatter(b: &mut Builder, sh: Shape) {
    let (n, cnt, root) = (sh.n, sh.count, sh.root);
    if cnt == 0 {
        return;
    }
    let mut d = Dag::new(b, sh.esize, Io::Shared { in_base: 0, out_base: sh.rank * cnt }, n * cnt, cnt);
    let v = sub_mod(sh.rank, root, n);
    let real = |v: usize| (v + root) % n;
    let ce = sh.chunk_elems();
    let children = binomial_children(v, n);
    let store = if v == 0 {
        d.copy((Buf::Input, root * cnt), (Buf::Output, 0), cnt);
        Buf::Input
    } else {
        let mine = subtree(v, n);
        let store = if children.is_empty() { Buf::Output } else { d.scratch(mine.len() * cnt) };
        for run in wrap_split(mine, root, n) {
            let base = (run.start - v) * cnt;
            for c in pieces(0..run.len() * cnt, ce) {
                d.recv(real(binomial_parent(v)), (store, base + c.start), c.len());
            }
        }
        if !children.is_empty() {
            d.copy((store, 0), (Buf::Output, 0), cnt);
        }
        store
    };
    // Runs are contiguous in real order in the root's Input, relabelled order in scratch.
    let store_at = |u: usize| if v == 0 { real(u) * cnt } else { (u - v) * cnt };
    for &ch in children.iter().rev() {
        for run in wrap_split(subtree(ch, n), root, n) {
            let base = store_at(run.start);
            for c in pieces(0..run.len() * cnt, ce) {
                d.send(real(ch), (store, base + c.start), c.len());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn double_binary_trees_are_trees() {
        for n in 1..=70 {
            for t in 0..2 {
                let roots: Vec<usize> = (0..n).filter(|&v| dtree_parent(t, v, n).is_none()).collect();
                assert_eq!(roots, vec![dtree_root(t, n)], "n={n} t={t}");
                for v in 0..n {
                    let node = dtree_node(t, v, n);
                    assert!(node.children.len() <= 2);
                    // Every rank reaches the root in at most n hops.
                    let (mut u, mut hops) = (v, 0);
                    while let Some(p) = dtree_parent(t, u, n) {
                        u = p;
                        hops += 1;
                        assert!(hops <= n, "cycle at n={n}");
                    }
                }
            }
        }
    }

    #[test]
    fn double_tree_spreads_interior_work() {
        // NCCL's point: a rank is interior (forwards data) in at most one tree, for even n.
        for n in (2..=64).step_by(2) {
            for v in 0..n {
                let interior = (0..2).filter(|&t| !dtree_node(t, v, n).children.is_empty()).count();
                assert!(interior <= 1, "n={n} v={v} interior in both trees");
            }
        }
    }

    #[test]
    fn binomial_subtrees_partition() {
        for n in 1..=40 {
            assert_eq!(subtree(0, n), 0..n);
            for v in 0..n {
                let mut covered = vec![v];
                for ch in binomial_children(v, n) {
                    assert_eq!(binomial_parent(ch), v);
                    covered.extend(subtree(ch, n));
                }
                covered.sort_unstable();
                assert_eq!(covered, subtree(v, n).collect::<Vec<_>>(), "n={n} v={v}");
            }
        }
    }
}
