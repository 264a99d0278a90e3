//! Planning (no Vulkan calls): splitting an operation into dispatches whose binding windows fit
//! maxStorageBufferRange, and grouping the fused gather-and-reduce's fragments.

use devccl_core::transport::Fragment;

/// A binding window over bytes `abs..abs+n` of a buffer: the window's start (rounded down to
/// `align`), its length (the end rounded up to a word), and the first byte's offset in it.
pub(super) fn window(abs: u64, n: u64, align: u64) -> (u64, u64, u32) {
    let start = abs / align * align;
    let end = (abs + n).next_multiple_of(4).max(start + 4);
    (start, end - start, (abs - start) as u32)
}

/// The largest number of destination bytes one dispatch handles, so every window (the bytes
/// plus up to `align - 1` before and 3 after) fits `max_range`; a multiple of 16, capped at
/// 1 GiB (so counts stay well inside u32 and the workgroup grid).
pub(super) fn chunk_limit(max_range: u64, align: u64) -> u64 {
    (max_range.saturating_sub(align + 4) / 16 * 16).clamp(16, 1 << 30)
}

/// `(start, len)` chunks of `len` bytes, each at most `limit` (a multiple of 16, so chunk
/// boundaries stay element-aligned).
pub(super) fn chunks(len: u64, limit: u64) -> impl Iterator<Item = (u64, u64)> {
    (0..len.div_ceil(limit)).map(move |i| (i * limit, limit.min(len - i * limit)))
}

/// The most workgroups one dispatch launches; the shaders loop (grid-stride) over the rest.
const GRID_CAP: u64 = 4096;

/// A 2-D grid of 256-invocation workgroups for `units` work items (at most [`GRID_CAP`]
/// workgroups; each invocation loops with the grid's stride), within `max`
/// (maxComputeWorkGroupCount x and y).
pub(super) fn grid(units: u64, max: [u32; 3]) -> (u32, u32) {
    let groups = units.div_ceil(256).clamp(1, GRID_CAP);
    let x = groups.min(u64::from(max[0]));
    let y = groups.div_ceil(x);
    debug_assert!(y <= u64::from(max[1]));
    (x as u32, y as u32)
}

/// `len` gathered bytes at destination byte `dst` from pool byte `src`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Piece {
    pub(super) dst: u64,
    pub(super) src: u64,
    pub(super) len: u64,
}

/// One dispatch of the fused gather-and-reduce: destination bytes `start..end` (relative to the
/// operation's destination) and the pieces covering them, clipped, with `dst` relative to
/// `start`; `pool_lo..pool_hi` is their span in the pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Group {
    pub(super) start: u64,
    pub(super) end: u64,
    pub(super) pieces: Vec<Piece>,
    pub(super) pool_lo: u64,
    pub(super) pool_hi: u64,
}

/// Fragments (sorted by destination, covering it exactly once) as pieces of at most `max`
/// bytes, empty ones dropped.
fn pieces(frags: &[Fragment], max: u64) -> Vec<Piece> {
    let mut out = Vec::with_capacity(frags.len());
    for f in frags {
        let mut at = 0u64;
        while at < u64::from(f.len) {
            let len = max.min(u64::from(f.len) - at);
            out.push(Piece { dst: f.dst_off + at, src: f.src_off + at, len });
            at += len;
        }
    }
    out
}

/// Split a fused gather-and-reduce into groups whose destination span and pool span each fit
/// `limit` bytes and whose tables hold at most `max_pieces` entries. Group boundaries fall on
/// 8-byte boundaries of the destination (element boundaries for every dtype), so an element
/// whose bytes come from several fragments is never split between dispatches; the pieces
/// around a boundary are clipped into both groups.
///
/// `None` when no such split exists (the few bytes around a boundary come from places in the
/// pool farther apart than `limit`): the caller then gathers into scratch memory first.
pub(super) fn groups(frags: &[Fragment], len: u64, limit: u64, max_pieces: usize) -> Option<Vec<Group>> {
    let pieces = pieces(frags, (limit / 4).max(8));
    let mut bounds = boundaries(&pieces, limit, max_pieces.max(16))?;
    bounds.push(len);
    let mut out = Vec::with_capacity(bounds.len());
    let mut j = 0usize;
    for w in bounds.windows(2) {
        let (s, e) = (w[0], w[1]);
        while j < pieces.len() && pieces[j].dst + pieces[j].len <= s {
            j += 1;
        }
        let mut g = Group { start: s, end: e, pieces: Vec::new(), pool_lo: u64::MAX, pool_hi: 0 };
        for q in pieces[j..].iter().take_while(|q| q.dst < e) {
            let a = q.dst.max(s);
            let z = (q.dst + q.len).min(e);
            let p = Piece { dst: a - s, src: q.src + (a - q.dst), len: z - a };
            g.pool_lo = g.pool_lo.min(p.src);
            g.pool_hi = g.pool_hi.max(p.src + p.len);
            g.pieces.push(p);
        }
        out.push(g);
    }
    Some(out)
}

/// The group starts (the first is 0), chosen greedily.
fn boundaries(pieces: &[Piece], limit: u64, max_pieces: usize) -> Option<Vec<u64>> {
    let mut bounds = vec![0u64];
    let (mut start, mut lo, mut hi, mut count) = (0u64, u64::MAX, 0u64, 0usize);
    for (i, p) in pieces.iter().enumerate() {
        let (nlo, nhi) = (lo.min(p.src), hi.max(p.src + p.len));
        if nhi - nlo <= limit && p.dst + p.len - start <= limit && count < max_pieces {
            (lo, hi, count) = (nlo, nhi, count + 1);
            continue;
        }
        let b = p.dst / 8 * 8;
        if b <= start {
            return None;
        }
        bounds.push(b);
        start = b;
        // The new group also holds the tails (< 8 bytes) of the pieces that reach past `b`.
        (lo, hi, count) = (u64::MAX, 0, 0);
        for q in pieces[..=i].iter().rev().take_while(|q| q.dst + q.len > b) {
            let cut = b.saturating_sub(q.dst);
            (lo, hi, count) = (lo.min(q.src + cut), hi.max(q.src + q.len), count + 1);
        }
        if hi - lo > limit || p.dst + p.len - start > limit {
            return None;
        }
    }
    Some(bounds)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frag(src_off: u64, len: u32, dst_off: u64) -> Fragment {
        Fragment { src_off, len, dst_off }
    }

    /// Every group's pieces cover its range exactly once and fit the limits.
    fn check(gs: &[Group], len: u64, limit: u64) {
        let mut at = 0;
        for g in gs {
            assert_eq!(g.start, at);
            assert!(g.end - g.start <= limit && g.pool_hi - g.pool_lo <= limit, "{g:?}");
            let mut d = 0;
            for p in &g.pieces {
                assert_eq!(p.dst, d);
                d += p.len;
            }
            assert_eq!(d, g.end - g.start);
            at = g.end;
        }
        assert_eq!(at, len);
    }

    #[test]
    fn windows_and_chunks() {
        assert_eq!(window(21, 6, 16), (16, 12, 5));
        assert_eq!(window(32, 0, 16), (32, 4, 0));
        let limit = chunk_limit(128 << 20, 16);
        assert_eq!(limit % 16, 0);
        let (s, r, _) = window(15, limit, 16);
        assert!(s == 0 && r <= 128 << 20);
        let c: Vec<_> = chunks(40, 16).collect();
        assert_eq!(c, vec![(0, 16), (16, 16), (32, 8)]);
        assert_eq!(grid(256 * 70_000, [65535, 65535, 65535]), (GRID_CAP as u32, 1));
        assert_eq!(grid(256 * 70_000, [512, 65535, 65535]), (512, 8));
        assert_eq!(grid(1, [65535, 65535, 65535]), (1, 1));
    }

    #[test]
    fn one_group_when_everything_fits() {
        let frags = [frag(100, 5, 0), frag(0, 7, 5)];
        let gs = groups(&frags, 12, 1 << 20, 1000).unwrap();
        assert_eq!(gs.len(), 1);
        assert_eq!((gs[0].pool_lo, gs[0].pool_hi), (0, 105));
        check(&gs, 12, 1 << 20);
    }

    #[test]
    fn far_apart_fragments_split_on_element_boundaries() {
        // Destination 0..40 from two far regions of the pool, switching at byte 24.
        let frags = [frag(0, 24, 0), frag(10_000, 16, 24)];
        let gs = groups(&frags, 40, 1000, 1000).unwrap();
        check(&gs, 40, 1000);
        assert_eq!(gs.len(), 2);
        assert_eq!((gs[1].start, gs[1].pieces[0]), (24, Piece { dst: 0, src: 10_000, len: 16 }));
        // Split by the destination limit inside a piece: the boundary goes down to 8 bytes and
        // the earlier piece's tail is clipped into the next group too.
        let frags = [frag(0, 333, 0), frag(333, 333, 333), frag(666, 333, 666), frag(999, 333, 999)];
        let gs = groups(&frags, 1332, 1000, 1000).unwrap();
        check(&gs, 1332, 1000);
        assert_eq!((gs[1].start, gs[1].pieces[0]), (992, Piece { dst: 0, src: 992, len: 7 }));
        // An element whose bytes lie farther apart than the limit: no split exists.
        let bad = [frag(0, 21, 0), frag(10_000, 19, 21)];
        assert!(groups(&bad, 40, 1000, 1000).is_none());
    }

    #[test]
    fn long_fragments_and_piece_limits() {
        let frags = [frag(7, 10_000, 0)];
        let gs = groups(&frags, 10_000, 1024, 1000).unwrap();
        check(&gs, 10_000, 1024);
        assert!(gs.len() >= 10);
        let many: Vec<_> = (0..100).map(|i| frag(i * 3, 3, i * 3)).collect();
        let gs = groups(&many, 300, 1 << 20, 16).unwrap();
        check(&gs, 300, 1 << 20);
        assert!(gs.iter().all(|g| g.pieces.len() <= 17), "{}", gs.len());
    }
}
