//! Gathering a scattered receive ([`RecvLayout::Scattered`]) into its destination on a
//! device: the devmem unpack, shared by the executor and the transport conformance suite.
//!
//! Without spilled bytes it is one [`Device::gather`] (or, by the caller, one fused
//! [`Device::gather_reduce`]). With spills the destination is cut into runs of consecutive
//! pieces from the same source: a gather per run of pool fragments, a copy per run of
//! spilled bytes, all queued at once and tested as one [`Pending`].
//!
//! A reducing receive with spills is still reduced straight from the pool where it can be
//! ([`split_for_reduce`]): element-aligned stretches that only pool fragments cover go to
//! [`Device::gather_reduce`]; the few stretches around spilled bytes (elements may straddle a
//! fragment and a spill) are gathered into the receive's slot and reduced from there.
//!
//! [`RecvLayout::Scattered`]: crate::transport::RecvLayout::Scattered
#![forbid(unsafe_code)]

use std::ops::Range;

use crate::device::{Device, Fence, Pending, Scattered};
use crate::error::{Error, Result};
use crate::memory::{Region, RegionSlice};
use crate::transport::{Fragment, Spill};

/// Several device operations tested as one.
#[derive(Debug)]
pub struct AllOf(Vec<Pending>);

impl Fence for AllOf {
    fn test(&mut self) -> Result<bool> {
        let mut all = true;
        for p in &mut self.0 {
            all &= p.test()?;
        }
        Ok(all)
    }
}

impl AllOf {
    /// One pending operation for all of `ops` (`Done` when all are).
    pub fn pending(mut ops: Vec<Pending>) -> Pending {
        ops.retain(|p| !matches!(p, Pending::Done));
        match ops.len() {
            0 => Pending::Done,
            1 => ops.pop().expect("one"),
            _ => Pending::Running(Box::new(AllOf(ops))),
        }
    }
}

/// Where one piece of the destination comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Pool,
    Spill,
}

/// Gather `frags` of `pool` and the pieces of `spill` into `dst` on `dev`, which must reach
/// the pool, the spill region (its own staging memory, or any host memory for the host
/// device) and `dst`. Together the pieces must cover `dst` exactly once.
pub fn gather(
    dev: &dyn Device,
    dst: &RegionSlice,
    pool: &Region,
    frags: &[Fragment],
    spill: Option<&Spill>,
) -> Result<Pending> {
    let Some(spill) = spill.filter(|s| !s.pieces.is_empty()) else {
        return dev.gather(dst, Scattered { pool, frags });
    };
    let mut all: Vec<(Source, Fragment)> =
        frags.iter().map(|&f| (Source::Pool, f)).chain(spill.pieces.iter().map(|&f| (Source::Spill, f))).collect();
    all.sort_unstable_by_key(|(_, f)| f.dst_off);
    let mut at = 0u64;
    for (_, f) in &all {
        if f.dst_off != at {
            return Err(Error::Internal(format!(
                "scattered receive: pieces do not cover the {}-byte destination exactly once (at byte {at}: {f:?})",
                dst.len()
            )));
        }
        at += u64::from(f.len);
    }
    if at != dst.len() as u64 {
        return Err(Error::Internal(format!("scattered receive: pieces cover {at} of {} bytes", dst.len())));
    }
    let mut ops = Vec::new();
    let mut i = 0;
    while i < all.len() {
        let src = all[i].0;
        let start = all[i].1.dst_off;
        let mut j = i;
        while j < all.len() && all[j].0 == src {
            j += 1;
        }
        let end = all[j - 1].1.dst_off + u64::from(all[j - 1].1.len);
        let run = dst.sub(start as usize..end as usize);
        match src {
            Source::Pool => {
                let rebased: Vec<Fragment> =
                    all[i..j].iter().map(|(_, f)| Fragment { dst_off: f.dst_off - start, ..*f }).collect();
                ops.push(dev.gather(&run, Scattered { pool, frags: &rebased })?);
            }
            Source::Spill => {
                // Consecutive spilled pieces usually sit consecutively in the spill region too:
                // one copy per stretch that does.
                let mut k = i;
                while k < j {
                    let (s0, d0) = (all[k].1.src_off, all[k].1.dst_off);
                    let mut len = u64::from(all[k].1.len);
                    let mut m = k + 1;
                    while m < j && all[m].1.src_off == s0 + len {
                        len += u64::from(all[m].1.len);
                        m += 1;
                    }
                    let (d, s) = ((d0 - start) as usize, s0 as usize);
                    ops.push(dev.copy(&run.sub(d..d + len as usize), &spill.region.slice(s..s + len as usize))?);
                    k = m;
                }
            }
        }
        i = j;
    }
    Ok(AllOf::pending(ops))
}

/// The pieces of `pieces` (offsets in a destination) that fall in `r`, cut to it, with
/// destination offsets relative to `r.start`.
pub fn clip(pieces: &[Fragment], r: &Range<usize>) -> Vec<Fragment> {
    pieces
        .iter()
        .filter_map(|f| {
            let (s, e) = (f.dst_off as usize, f.dst_off as usize + f.len as usize);
            let (x, y) = (s.max(r.start), e.min(r.end));
            (x < y).then(|| Fragment {
                src_off: f.src_off + (x - s) as u64,
                len: (y - x) as u32,
                dst_off: (x - r.start) as u64,
            })
        })
        .collect()
}

/// How a reducing receive of `len` bytes (elements of `elem` bytes) with spilled `pieces`
/// is reduced: `fused`, element-aligned ranges only pool fragments cover, each with its
/// fragments (relative to the range), for [`Device::gather_reduce`]; `mixed`, the
/// element-aligned ranges around spilled bytes, to gather (with [`gather`], after [`clip`])
/// and then reduce. Together they cover `0..len` in order, without overlap.
pub fn split_for_reduce(
    len: usize,
    elem: usize,
    frags: &[Fragment],
    pieces: &[Fragment],
) -> (Vec<(Range<usize>, Vec<Fragment>)>, Vec<Range<usize>>) {
    let mut spilled: Vec<&Fragment> = pieces.iter().collect();
    spilled.sort_unstable_by_key(|f| f.dst_off);
    let mut mixed: Vec<Range<usize>> = Vec::new();
    for p in spilled {
        let a = p.dst_off as usize / elem * elem;
        let b = ((p.dst_off as usize + p.len as usize).div_ceil(elem) * elem).min(len);
        match mixed.last_mut() {
            Some(m) if a <= m.end => m.end = m.end.max(b),
            _ => mixed.push(a..b),
        }
    }
    let mut fused = Vec::new();
    let mut at = 0;
    for m in mixed.iter().map(|m| m.start..m.end).chain(std::iter::once(len..len)) {
        if m.start > at {
            let r = at..m.start;
            fused.push((r.clone(), clip(frags, &r)));
        }
        at = m.end;
    }
    (fused, mixed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::HostDevice;
    use std::time::{Duration, Instant};

    #[test]
    fn runs_of_pool_fragments_and_spilled_bytes() {
        let payload: Vec<u8> = (0..100u8).collect();
        let pool = Region::alloc(200);
        let spill = Region::alloc(100);
        // Bytes 0..10 and 40..60 in the pool (reversed), 10..40 and 60..100 spilled (at their
        // own offsets in the spill region).
        let frags = vec![Fragment { src_off: 150, len: 20, dst_off: 40 }, Fragment { src_off: 7, len: 10, dst_off: 0 }];
        pool.slice(150..170).with_bytes_mut(|b| b.copy_from_slice(&payload[40..60])).unwrap();
        pool.slice(7..17).with_bytes_mut(|b| b.copy_from_slice(&payload[0..10])).unwrap();
        let pieces = vec![
            Fragment { src_off: 10, len: 15, dst_off: 10 },
            Fragment { src_off: 25, len: 15, dst_off: 25 },
            Fragment { src_off: 60, len: 40, dst_off: 60 },
        ];
        spill.full().with_bytes_mut(|b| b.copy_from_slice(&payload)).unwrap();
        let s = Spill { region: spill, pieces };
        let dst = Region::alloc(100);
        gather(&HostDevice, &dst.full(), &pool, &frags, Some(&s))
            .unwrap()
            .wait(Instant::now() + Duration::from_secs(5), "gather")
            .unwrap();
        assert_eq!(dst.full().to_vec().unwrap(), payload);
        // A gap is refused.
        let short = Spill { region: s.region.clone(), pieces: s.pieces[..2].to_vec() };
        assert!(gather(&HostDevice, &dst.full(), &pool, &frags, Some(&short)).is_err());
        // Without spilled bytes it is one gather.
        let only = vec![Fragment { src_off: 0, len: 100, dst_off: 0 }];
        gather(&HostDevice, &dst.full(), &s.region, &only, None).unwrap();
        assert_eq!(dst.full().to_vec().unwrap(), payload);
    }

    #[test]
    fn reducing_around_spills_covers_everything_once() {
        use crate::dtype::DType;
        use crate::op::ReduceOp;
        // 40 f32 (160 bytes): pool fragments 0..50 and 70..160, spilled 50..70 (splits two
        // elements). Expected: base + payload everywhere, each element once.
        let payload: Vec<f32> = (0..40).map(|i| i as f32).collect();
        let base: Vec<f32> = (0..40).map(|i| 1000.0 * i as f32).collect();
        let bytes = |v: &[f32]| v.iter().flat_map(|x| x.to_ne_bytes()).collect::<Vec<u8>>();
        let (pb, bb) = (bytes(&payload), bytes(&base));
        let pool = Region::alloc(400);
        pool.slice(200..250).with_bytes_mut(|b| b.copy_from_slice(&pb[0..50])).unwrap();
        pool.slice(10..100).with_bytes_mut(|b| b.copy_from_slice(&pb[70..160])).unwrap();
        let frags =
            vec![Fragment { src_off: 10, len: 90, dst_off: 70 }, Fragment { src_off: 200, len: 50, dst_off: 0 }];
        let spill = Spill { region: Region::alloc(20), pieces: vec![Fragment { src_off: 0, len: 20, dst_off: 50 }] };
        spill.region.full().with_bytes_mut(|b| b.copy_from_slice(&pb[50..70])).unwrap();
        let (fused, mixed) = split_for_reduce(160, 4, &frags, &spill.pieces);
        assert_eq!(mixed, vec![48..72]);
        assert_eq!(fused.iter().map(|(r, _)| r.clone()).collect::<Vec<_>>(), vec![0..48, 72..160]);
        let (dst, b, slot) = (Region::alloc(160), Region::alloc(160), Region::alloc(160));
        b.full().with_bytes_mut(|x| x.copy_from_slice(&bb)).unwrap();
        let dev = HostDevice;
        for (r, f) in &fused {
            let (d, a) = (dst.slice(r.clone()), b.slice(r.clone()));
            dev.gather_reduce(DType::F32, ReduceOp::Sum, &d, &a, Scattered { pool: &pool, frags: f }, None).unwrap();
        }
        for r in &mixed {
            let part = Spill { region: spill.region.clone(), pieces: clip(&spill.pieces, r) };
            gather(&dev, &slot.slice(r.clone()), &pool, &clip(&frags, r), Some(&part)).unwrap();
            let (d, a, x) = (dst.slice(r.clone()), b.slice(r.clone()), slot.slice(r.clone()));
            let args =
                crate::device::ReduceArgs { dtype: DType::F32, op: ReduceOp::Sum, dst: &d, a: &a, b: &x, finish: None };
            dev.reduce(args).unwrap();
        }
        let got = dst.full().to_vec().unwrap();
        let want: Vec<u8> = bytes(&payload.iter().zip(&base).map(|(p, q)| p + q).collect::<Vec<f32>>());
        assert_eq!(got, want);
    }
}
