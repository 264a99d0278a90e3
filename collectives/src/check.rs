//! Deterministic, exactly representable test data for benchmarks' `#wrong` checks and for
//! tests: every order of reduction yields the same bits, so any difference is a bug.

use devccl_core::op::{finish_avg, reduce_in_place};
use devccl_core::{DType, ReduceOp, Result};
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
