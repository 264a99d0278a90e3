//! Deterministic, exactly representable test data for benchmarks' `#wrong` checks and for
//! tests: every order of reduction yields the same bits, so any difference is a bug.

use std::sync::Arc;

use devccl_core::device::Device;
use devccl_core::memory::RegionSlice;
use devccl_core::op::{finish_avg, reduce_in_place};
use devccl_core::wire::CollKind;
use devccl_core::{DType, Error, ReduceOp, Result};

use crate::{Collective, Communicator};
use half::{bf16, f16};

/// The small integer that rank `r` contributes at element `i` for `op`: values in [-4, 4]
/// (sums stay exact in every dtype up to thousands of ranks), or ±1 with a few 2s for
/// products (|product| stays a small power of two).
pub fn value(op: ReduceOp, r: usize, i: usize) -> i64 {
    match op {
        ReduceOp::Prod => {
            if (r + i).is_multiple_of(7) {
                2
            } else if (r * 3 + i).is_multiple_of(5) {
                -1
            } else {
                1
            }
        }
        _ => ((r * 7 + i * 3 + (i >> 4)) % 9) as i64 - 4,
    }
}

/// Append `v` as one `dtype` element (little endian).
pub fn encode(dtype: DType, v: i64, out: &mut Vec<u8>) {
    match dtype {
        DType::F32 => out.extend((v as f32).to_le_bytes()),
        DType::F64 => out.extend((v as f64).to_le_bytes()),
        DType::F16 => out.extend(f16::from_f64(v as f64).to_le_bytes()),
        DType::BF16 => out.extend(bf16::from_f64(v as f64).to_le_bytes()),
        DType::I8 => out.push(v as i8 as u8),
        DType::U8 => out.push(v as u8),
        DType::I32 => out.extend((v as i32).to_le_bytes()),
        DType::I64 => out.extend(v.to_le_bytes()),
        DType::U32 => out.extend((v as u32).to_le_bytes()),
        DType::U64 => out.extend((v as u64).to_le_bytes()),
        DType::F8E4M3 => out.push(devccl_core::dtype::F8E4M3::from_f32(v as f32).0),
        DType::F8E5M2 => out.push(devccl_core::dtype::F8E5M2::from_f32(v as f32).0),
    }
}

/// The value for `dtype`: fp8 keeps every partial sum exact too (E5M2 holds the integers
/// only up to 8), so its sums and averages take values in [-2, 2] from the first four ranks
/// and 0 from the others; products keep [`value`]'s ±1 and 2s (powers of two are exact).
pub fn value_for(dtype: DType, op: ReduceOp, r: usize, i: usize) -> i64 {
    let v = value(op, r, i);
    match dtype {
        DType::F8E4M3 | DType::F8E5M2 if op != ReduceOp::Prod => {
            if r < 4 {
                v / 2
            } else {
                0
            }
        }
        _ => v,
    }
}

/// Rank `r`'s input: `count` elements starting at logical element `first`.
pub fn input(dtype: DType, op: ReduceOp, r: usize, first: usize, count: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(count * dtype.size());
    for i in first..first + count {
        encode(dtype, value_for(dtype, op, r, i), &mut out);
    }
    out
}

/// The reduction over `ranks` of every rank's input for elements `first..first+count`.
pub fn reduced(dtype: DType, op: ReduceOp, ranks: usize, first: usize, count: usize) -> Result<Vec<u8>> {
    let mut acc = input(dtype, op, 0, first, count);
    for r in 1..ranks {
        reduce_in_place(dtype, op, &mut acc, &input(dtype, op, r, first, count))?;
    }
    if op == ReduceOp::Avg {
        finish_avg(dtype, &mut acc, ranks)?;
    }
    Ok(acc)
}

/// Number of elements of `got` that differ from `want` (bitwise).
pub fn count_wrong(dtype: DType, got: &[u8], want: &[u8]) -> u64 {
    let e = dtype.size();
    got.chunks_exact(e).zip(want.chunks_exact(e)).filter(|(a, b)| a != b).count() as u64
        + (got.len().abs_diff(want.len()) / e) as u64
}

/// One benchmark or test call as every rank of a job runs it: which collective, on how many
/// logical elements, with which inputs, and what each rank must end with. The nccl-tests
/// conventions: `total` elements per row (a multiple of the world size where the collective
/// splits by rank), all-gather and gather inputs are each rank's block of the logical
/// output, reduce-scatter and scatter outputs are blocks of the logical input, send/recv
/// passes the buffer around a ring, and all_to_all_v uses uneven counts on purpose.
#[derive(Debug, Clone, Copy)]
pub struct Case {
    /// The collective.
    pub coll: CollKind,
    /// Element type.
    pub dtype: DType,
    /// Reduction (reducing collectives).
    pub op: ReduceOp,
    /// Root (rooted collectives).
    pub root: usize,
    /// This rank.
    pub rank: usize,
    /// World size.
    pub n: usize,
    /// Logical elements of the call.
    pub total: usize,
}

/// all_to_all_v element count from rank i to rank j (uneven on purpose).
fn v_count(total: usize, n: usize, i: usize, j: usize) -> usize {
    let unit = (total / (2 * n * n)).max(1);
    if total == 0 { 0 } else { unit * (1 + (i + 2 * j) % 3) }
}

fn prefix(v: &[usize]) -> Vec<usize> {
    let mut acc = 0;
    v.iter()
        .map(|x| {
            let s = acc;
            acc += x;
            s
        })
        .collect()
}

/// True for the collectives that take a reduction operator.
pub fn reduces(c: CollKind) -> bool {
    matches!(c, CollKind::AllReduce | CollKind::Reduce | CollKind::ReduceScatter)
}

/// True for the collectives that take a root.
pub fn rooted(c: CollKind) -> bool {
    matches!(c, CollKind::Broadcast | CollKind::Reduce | CollKind::Gather | CollKind::Scatter)
}

/// True for collectives whose calls split `total` elements into one block per rank.
pub fn splits(c: CollKind) -> bool {
    !matches!(c, CollKind::AllReduce | CollKind::Broadcast | CollKind::Reduce | CollKind::SendRecv | CollKind::Barrier)
}

impl Case {
    /// A case of about `bytes` bytes (rounded down to whole elements, and to a multiple of
    /// the world size where the collective splits by rank).
    pub fn sized(coll: CollKind, dtype: DType, op: ReduceOp, root: usize, rank: usize, n: usize, bytes: usize) -> Case {
        let mut total = bytes / dtype.size();
        if splits(coll) {
            total -= total % n;
        }
        Case { coll, dtype, op, root, rank, n, total }
    }

    fn block(&self) -> usize {
        self.total / self.n
    }

    /// The collective descriptor of this rank's call.
    pub fn desc(&self) -> Collective {
        let (op, root) = (self.op, self.root);
        match self.coll {
            CollKind::AllReduce => Collective::AllReduce { op },
            CollKind::Broadcast => Collective::Broadcast { root },
            CollKind::Reduce => Collective::Reduce { op, root },
            CollKind::AllGather => Collective::AllGather,
            CollKind::ReduceScatter => Collective::ReduceScatter { op },
            CollKind::AllToAll => Collective::AllToAll,
            CollKind::AllToAllV => {
                let n = self.n;
                let sc: Vec<usize> = (0..n).map(|j| v_count(self.total, n, self.rank, j)).collect();
                let rc: Vec<usize> = (0..n).map(|i| v_count(self.total, n, i, self.rank)).collect();
                Collective::AllToAllV {
                    send_displs: prefix(&sc),
                    send_counts: sc,
                    recv_displs: prefix(&rc),
                    recv_counts: rc,
                }
            }
            CollKind::Gather => Collective::Gather { root },
            CollKind::Scatter => Collective::Scatter { root },
            CollKind::SendRecv | CollKind::Barrier => Collective::Barrier,
        }
    }

    /// (input elements, output elements) of this rank.
    pub fn lens(&self) -> (usize, usize) {
        let (t, b) = (self.total, self.block());
        match self.coll {
            CollKind::AllReduce | CollKind::Broadcast | CollKind::Reduce | CollKind::AllToAll | CollKind::SendRecv => {
                (t, t)
            }
            CollKind::AllGather | CollKind::Gather => (b, t),
            CollKind::ReduceScatter | CollKind::Scatter => (t, b),
            CollKind::AllToAllV => {
                let n = self.n;
                ((0..n).map(|j| v_count(t, n, self.rank, j)).sum(), (0..n).map(|i| v_count(t, n, i, self.rank)).sum())
            }
            CollKind::Barrier => (0, 0),
        }
    }

    /// Bytes of (input, output).
    pub fn byte_lens(&self) -> (usize, usize) {
        let (i, o) = self.lens();
        (i * self.dtype.size(), o * self.dtype.size())
    }

    /// Where the input sits inside the output (`true`) or the output inside the input
    /// (`false`) for the in-place form, at this element offset; `None` when the input is the
    /// output itself.
    pub fn in_place_offset(&self) -> Option<(bool, usize)> {
        let b = self.block();
        match self.coll {
            CollKind::AllGather | CollKind::Gather => Some((true, self.rank * b)),
            CollKind::ReduceScatter | CollKind::Scatter => Some((false, self.rank * b)),
            _ => None,
        }
    }

    /// True when the collective has no in-place form (the in-place run repeats the
    /// out-of-place one).
    pub fn no_in_place(&self) -> bool {
        matches!(self.coll, CollKind::SendRecv | CollKind::Barrier | CollKind::AllToAllV)
    }

    /// This rank's input bytes.
    pub fn input(&self) -> Vec<u8> {
        let (ni, _) = self.lens();
        let first = match self.coll {
            CollKind::AllGather | CollKind::Gather => self.rank * self.block(),
            _ => 0,
        };
        input(self.dtype, self.op, self.rank, first, ni)
    }

    /// The expected output bytes, or `None` where the output is not defined (reduce and
    /// gather off the root, barrier).
    pub fn expected(&self) -> Result<Option<Vec<u8>>> {
        let (d, op, n, r, b, t) = (self.dtype, self.op, self.n, self.rank, self.block(), self.total);
        let inp = |rank: usize, first: usize, count: usize| input(d, op, rank, first, count);
        Ok(Some(match self.coll {
            CollKind::AllReduce => reduced(d, op, n, 0, t)?,
            CollKind::Broadcast => inp(self.root, 0, t),
            CollKind::Reduce if r == self.root => reduced(d, op, n, 0, t)?,
            CollKind::Reduce | CollKind::Barrier => return Ok(None),
            CollKind::AllGather => (0..n).flat_map(|i| inp(i, i * b, b)).collect(),
            CollKind::Gather if r == self.root => (0..n).flat_map(|i| inp(i, i * b, b)).collect(),
            CollKind::Gather => return Ok(None),
            CollKind::ReduceScatter => reduced(d, op, n, r * b, b)?,
            CollKind::AllToAll => (0..n).flat_map(|i| inp(i, r * b, b)).collect(),
            CollKind::AllToAllV => (0..n)
                .flat_map(|i| {
                    let displ: usize = (0..r).map(|j| v_count(t, n, i, j)).sum();
                    inp(i, displ, v_count(t, n, i, r))
                })
                .collect(),
            CollKind::Scatter => inp(self.root, r * b, b),
            CollKind::SendRecv => inp((r + n - 1) % n, 0, t),
        }))
    }

    /// Run once out of place: `input` is read (for send/recv: `input` is sent, and must stay
    /// untouched; the receive lands in `output`).
    pub fn run(&self, c: &Communicator, input: RegionSlice, output: RegionSlice) -> Result<()> {
        let d = self.dtype;
        match self.coll {
            CollKind::SendRecv => {
                let (next, prev) = ((self.rank + 1) % self.n, (self.rank + self.n - 1) % self.n);
                if self.n == 1 {
                    return c.collective(&Collective::AllToAll, d, input, output);
                }
                let w = c.collective_async(&Collective::Send { peer: next, tag: 0 }, d, input.clone(), input);
                c.collective(&Collective::Recv { peer: prev, tag: 0 }, d, output.clone(), output)?;
                w.wait()
            }
            CollKind::Barrier => c.barrier(),
            _ => c.collective(&self.desc(), d, input, output),
        }
    }

    /// The in-place buffer's initial bytes: this rank's input placed where the in-place
    /// convention puts it (the whole buffer; inside the output for all-gather and gather;
    /// containing the output for reduce-scatter and scatter).
    pub fn in_place_bytes(&self) -> Vec<u8> {
        let (_, out_len) = self.lens();
        let input = self.input();
        match self.in_place_offset() {
            Some((true, at)) => {
                let e = self.dtype.size();
                let mut buf = vec![0u8; out_len * e];
                buf[at * e..at * e + input.len()].copy_from_slice(&input);
                buf
            }
            _ => input,
        }
    }

    /// Where the output lies inside the in-place buffer (bytes).
    pub fn in_place_output_range(&self) -> std::ops::Range<usize> {
        let (_, out_len) = self.lens();
        let e = self.dtype.size();
        match self.in_place_offset() {
            Some((false, at)) => at * e..(at + out_len) * e,
            _ => 0..out_len * e,
        }
    }

    /// Run once in place on `buf` (prepared from [`Case::in_place_bytes`]). Collectives
    /// without an in-place form run out of place from `input` into `output` instead.
    pub fn run_in_place(
        &self,
        c: &Communicator,
        buf: RegionSlice,
        input: RegionSlice,
        output: RegionSlice,
    ) -> Result<()> {
        if self.no_in_place() {
            return self.run(c, input, output);
        }
        let e = self.dtype.size();
        let (in_len, _) = self.lens();
        match self.in_place_offset() {
            None => c.collective(&self.desc(), self.dtype, buf.clone(), buf),
            Some((true, at)) => c.collective(&self.desc(), self.dtype, buf.sub(at * e..(at + in_len) * e), buf),
            Some((false, _)) => {
                let outr = self.in_place_output_range();
                c.collective(&self.desc(), self.dtype, buf.clone(), buf.sub(outr))
            }
        }
    }
}

/// One case's buffers on a device: the input (never written), the
/// out-of-place output, and the in-place buffer.
#[derive(Debug)]
pub struct CaseBuffers {
    /// The device holding them.
    pub dev: Arc<dyn Device>,
    /// The input (never written).
    pub input: RegionSlice,
    /// The out-of-place output.
    pub out: RegionSlice,
    /// The in-place buffer.
    pub ip: RegionSlice,
}

impl CaseBuffers {
    /// Allocate them on `dev` and upload the input.
    pub fn new(dev: &Arc<dyn Device>, case: &Case) -> Result<CaseBuffers> {
        let (ib, ob) = case.byte_lens();
        let ip_len = case.in_place_bytes().len();
        let alloc = |len: usize| -> Result<RegionSlice> { Ok(dev.alloc(len)?.slice(0..len)) };
        let b = CaseBuffers { dev: dev.clone(), input: alloc(ib)?, out: alloc(ob)?, ip: alloc(ip_len)? };
        b.dev.upload(&b.input, &case.input())?;
        Ok(b)
    }

    /// Like [`CaseBuffers::new`], allocated exportable ([`Device::alloc_exportable`]) where
    /// the device can (so devmem sends them zero-copy); plainly where it cannot.
    pub fn new_exportable(dev: &Arc<dyn Device>, case: &Case) -> Result<CaseBuffers> {
        let (ib, ob) = case.byte_lens();
        let ip_len = case.in_place_bytes().len();
        let alloc = |len: usize| -> Result<RegionSlice> {
            match dev.alloc_exportable(len) {
                Ok((r, _)) => Ok(r.slice(0..len)),
                Err(Error::Unsupported { .. }) => Ok(dev.alloc(len)?.slice(0..len)),
                Err(e) => Err(e),
            }
        };
        let b = CaseBuffers { dev: dev.clone(), input: alloc(ib)?, out: alloc(ob)?, ip: alloc(ip_len)? };
        b.dev.upload(&b.input, &case.input())?;
        Ok(b)
    }

    /// Download a slice of one of them.
    pub fn read(&self, s: &RegionSlice) -> Result<Vec<u8>> {
        let mut v = vec![0u8; s.len()];
        self.dev.download(s, &mut v)?;
        Ok(v)
    }

    /// One checked round (out of place, then in place from fresh buffers): wrong elements of
    /// each.
    pub fn check(&self, c: &Communicator, case: &Case, want: Option<&[u8]>) -> Result<[u64; 2]> {
        let (oop, ip) = self.outputs(c, case)?;
        let Some(w) = want else { return Ok([0, 0]) };
        Ok([count_wrong(case.dtype, &oop, w), count_wrong(case.dtype, &ip, w)])
    }

    /// Run one out-of-place and one in-place round (from fresh buffers) and return both
    /// outputs' bytes.
    pub fn outputs(&self, c: &Communicator, case: &Case) -> Result<(Vec<u8>, Vec<u8>)> {
        self.dev.upload(&self.out, &vec![0u8; self.out.len()])?;
        case.run(c, self.input.clone(), self.out.clone())?;
        let oop = self.read(&self.out)?;
        self.dev.upload(&self.out, &vec![0u8; self.out.len()])?;
        self.dev.upload(&self.ip, &case.in_place_bytes())?;
        case.run_in_place(c, self.ip.clone(), self.input.clone(), self.out.clone())?;
        // Collectives without an in-place form ran out of place again, into `out`.
        let ip = if case.no_in_place() { &self.out } else { &self.ip.sub(case.in_place_output_range()) };
        Ok((oop, self.read(ip)?))
    }
}
