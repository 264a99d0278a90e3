//! Schedule generators. Each algorithm writes one rank's part of a collective as a
//! [`Builder`](crate::schedule::Builder) DAG; none of them names a transport.
//!
//! docs/algorithms.md lists, for each, the steps and the bytes each rank puts on the wire.

pub mod ring;

use std::ops::Range;

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
    /// Chunk size in elements (at least one).
    pub fn chunk_elems(&self) -> usize {
        (self.chunk_bytes / self.esize).max(1)
    }
}

/// Numbered algorithms (the code travels in every frame header so ranks that chose
/// differently detect it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Algo {
    /// Ring: reduce-scatter then all-gather around a ring, chunked and pipelined.
    Ring = 1,
}

impl Algo {
    /// Name as in `DEVCCL_ALGO`.
    pub const fn name(self) -> &'static str {
        match self {
            Algo::Ring => "ring",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
