//! Reduction operators and the CPU reduction kernels.
//!
//! Semantics, per element, identical on every path (ring, tree, recursive doubling):
//! - `sum`, `prod`: floats use IEEE arithmetic in the element's own precision (f16, bf16 and
//!   the fp8 types are widened to f32 for one operation and rounded back once,
//!   round-to-nearest-even, as NCCL does); integers wrap
//!   on overflow (two's complement), like NCCL and C unsigned arithmetic.
//! - `min`, `max`: a NaN operand propagates (like torch).
//! - `avg`: the sum (as above), divided once at the end by the world size. Floats divide in
//!   the element's precision (f16/bf16 via f32, rounded once); integers divide truncating
//!   toward zero, so `avg` of i32 `[1, 2]` is `1` and of `[-1, -2]` is `-1`.
//!
//! The loops are written so the compiler vectorises them (one monomorphised loop per
//! dtype × op, no per-element dispatch). Large buffers are split over rayon's pool when
//! [`set_parallel_threshold`] allows it.

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};

use half::{bf16, f16};
use rayon::prelude::*;

use crate::dtype::{DType, F8E4M3, F8E5M2};
use crate::error::{Error, Result};

/// A reduction operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum ReduceOp {
    /// Sum.
    Sum = 0,
    /// Product.
    Prod = 1,
    /// Minimum.
    Min = 2,
    /// Maximum.
    Max = 3,
    /// Sum divided by the number of ranks (once, at the end).
    Avg = 4,
}

impl ReduceOp {
    /// Every op, in wire-code order.
    pub const ALL: [ReduceOp; 5] = [ReduceOp::Sum, ReduceOp::Prod, ReduceOp::Min, ReduceOp::Max, ReduceOp::Avg];

    /// The name nccl-tests prints in its `redop` column.
    pub const fn name(self) -> &'static str {
        match self {
            ReduceOp::Sum => "sum",
            ReduceOp::Prod => "prod",
            ReduceOp::Min => "min",
            ReduceOp::Max => "max",
            ReduceOp::Avg => "avg",
        }
    }

    /// Decode the wire code.
    pub fn from_code(code: u8) -> Option<ReduceOp> {
        ReduceOp::ALL.get(code as usize).copied()
    }

    /// The wire code.
    pub const fn code(self) -> u8 {
        self as u8
    }

    /// The operator applied between partial results (avg accumulates as a sum).
    pub const fn combine_op(self) -> ReduceOp {
        match self {
            ReduceOp::Avg => ReduceOp::Sum,
            o => o,
        }
    }
}

impl fmt::Display for ReduceOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for ReduceOp {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "sum" => ReduceOp::Sum,
            "prod" | "product" => ReduceOp::Prod,
            "min" => ReduceOp::Min,
            "max" => ReduceOp::Max,
            "avg" | "mean" => ReduceOp::Avg,
            _ => return Err(Error::usage(format!("unknown reduce op '{s}' (expected sum prod min max avg)"))),
        })
    }
}

/// Buffers at least this large (bytes) are reduced on rayon's pool; `usize::MAX` disables.
static PARALLEL_MIN_BYTES: AtomicUsize = AtomicUsize::new(usize::MAX);

/// Let reductions of at least `bytes` bytes run on several threads (`None` disables).
/// Worth it only when a rank has idle cores (one rank per node, many cores); when every core
/// already runs a rank, threads only add switching.
pub fn set_parallel_threshold(bytes: Option<usize>) {
    PARALLEL_MIN_BYTES.store(bytes.unwrap_or(usize::MAX).max(64 << 10), Ordering::Relaxed);
}

trait Arith: bytemuck::Pod + Send + Sync {
    fn sum(a: Self, b: Self) -> Self;
    fn prod(a: Self, b: Self) -> Self;
    fn min(a: Self, b: Self) -> Self;
    fn max(a: Self, b: Self) -> Self;
    fn div_n(a: Self, n: usize) -> Self;
}

macro_rules! arith_int {
    ($t:ty) => {
        impl Arith for $t {
            #[inline(always)]
            fn sum(a: Self, b: Self) -> Self {
                a.wrapping_add(b)
            }
            #[inline(always)]
            fn prod(a: Self, b: Self) -> Self {
                a.wrapping_mul(b)
            }
            #[inline(always)]
            fn min(a: Self, b: Self) -> Self {
                if b < a { b } else { a }
            }
            #[inline(always)]
            fn max(a: Self, b: Self) -> Self {
                if b > a { b } else { a }
            }
            #[inline(always)]
            fn div_n(a: Self, n: usize) -> Self {
                // Division by a count that does not fit the type (e.g. 300 ranks of u8):
                // the exact quotient is |a| < n, which truncates to 0.
                match <$t>::try_from(n) {
                    Ok(d) => a.wrapping_div(d),
                    Err(_) => 0,
                }
            }
        }
    };
}
arith_int!(i8);
arith_int!(u8);
arith_int!(i32);
arith_int!(i64);
arith_int!(u32);
arith_int!(u64);

macro_rules! arith_float {
    ($t:ty) => {
        impl Arith for $t {
            #[inline(always)]
            fn sum(a: Self, b: Self) -> Self {
                a + b
            }
            #[inline(always)]
            fn prod(a: Self, b: Self) -> Self {
                a * b
            }
            #[inline(always)]
            fn min(a: Self, b: Self) -> Self {
                if a < b || a.is_nan() { a } else { b }
            }
            #[inline(always)]
            fn max(a: Self, b: Self) -> Self {
                if a > b || a.is_nan() { a } else { b }
            }
            #[inline(always)]
            fn div_n(a: Self, n: usize) -> Self {
                a / (n as $t)
            }
        }
    };
}
arith_float!(f32);
arith_float!(f64);

macro_rules! arith_half {
    ($t:ty) => {
        impl Arith for $t {
            #[inline(always)]
            fn sum(a: Self, b: Self) -> Self {
                <$t>::from_f32(a.to_f32() + b.to_f32())
            }
            #[inline(always)]
            fn prod(a: Self, b: Self) -> Self {
                <$t>::from_f32(a.to_f32() * b.to_f32())
            }
            #[inline(always)]
            fn min(a: Self, b: Self) -> Self {
                let (x, y) = (a.to_f32(), b.to_f32());
                if x < y || x.is_nan() { a } else { b }
            }
            #[inline(always)]
            fn max(a: Self, b: Self) -> Self {
                let (x, y) = (a.to_f32(), b.to_f32());
                if x > y || x.is_nan() { a } else { b }
            }
            #[inline(always)]
            fn div_n(a: Self, n: usize) -> Self {
                <$t>::from_f32(a.to_f32() / n as f32)
            }
        }
    };
}
arith_half!(f16);
arith_half!(bf16);
arith_half!(F8E4M3);
arith_half!(F8E5M2);

#[inline(always)]
fn binop<T: Arith>(op: ReduceOp) -> fn(T, T) -> T {
    match op {
        ReduceOp::Sum | ReduceOp::Avg => T::sum,
        ReduceOp::Prod => T::prod,
        ReduceOp::Min => T::min,
        ReduceOp::Max => T::max,
    }
}

/// `dst[i] = dst[i] op src[i]`, typed. One loop per (type, op) so it vectorises.
fn typed_in_place<T: Arith>(op: ReduceOp, dst: &mut [T], src: &[T]) {
    macro_rules! run {
        ($f:path) => {{
            let par = PARALLEL_MIN_BYTES.load(Ordering::Relaxed);
            if std::mem::size_of_val(dst) >= par {
                let chunk = (256 << 10) / std::mem::size_of::<T>();
                dst.par_chunks_mut(chunk).zip(src.par_chunks(chunk)).for_each(|(d, s)| {
                    for (x, y) in d.iter_mut().zip(s) {
                        *x = $f(*x, *y);
                    }
                });
            } else {
                for (x, y) in dst.iter_mut().zip(src) {
                    *x = $f(*x, *y);
                }
            }
        }};
    }
    match op {
        ReduceOp::Sum | ReduceOp::Avg => run!(T::sum),
        ReduceOp::Prod => run!(T::prod),
        ReduceOp::Min => run!(T::min),
        ReduceOp::Max => run!(T::max),
    }
}

/// `dst[i] = a[i] op b[i]`, typed.
fn typed_to<T: Arith>(op: ReduceOp, dst: &mut [T], a: &[T], b: &[T]) {
    macro_rules! run {
        ($f:path) => {{
            for ((x, y), z) in dst.iter_mut().zip(a).zip(b) {
                *x = $f(*y, *z);
            }
        }};
    }
    match op {
        ReduceOp::Sum | ReduceOp::Avg => run!(T::sum),
        ReduceOp::Prod => run!(T::prod),
        ReduceOp::Min => run!(T::min),
        ReduceOp::Max => run!(T::max),
    }
}

fn check_lens(dtype: DType, dst: usize, src: usize) -> Result<()> {
    if dst != src {
        return Err(Error::Internal(format!("reduce: length mismatch {dst} vs {src} bytes")));
    }
    if !dst.is_multiple_of(dtype.size()) {
        return Err(Error::Internal(format!("reduce: {dst} bytes is not a whole number of {dtype}")));
    }
    Ok(())
}

fn bytes_in_place<T: Arith>(op: ReduceOp, dst: &mut [u8], src: &[u8]) {
    match (bytemuck::try_cast_slice_mut::<u8, T>(dst), bytemuck::try_cast_slice::<u8, T>(src)) {
        (Ok(d), Ok(s)) => typed_in_place(op, d, s),
        (d, s) => {
            // Unaligned memory (rare: a caller's byte buffer at an odd address). Correct, slower.
            let _ = (d, s);
            let f = binop::<T>(op);
            let n = std::mem::size_of::<T>();
            for (dc, sc) in dst.chunks_exact_mut(n).zip(src.chunks_exact(n)) {
                let v = f(bytemuck::pod_read_unaligned(dc), bytemuck::pod_read_unaligned(sc));
                dc.copy_from_slice(bytemuck::bytes_of(&v));
            }
        }
    }
}

fn bytes_to<T: Arith>(op: ReduceOp, dst: &mut [u8], a: &[u8], b: &[u8]) {
    match (
        bytemuck::try_cast_slice_mut::<u8, T>(dst),
        bytemuck::try_cast_slice::<u8, T>(a),
        bytemuck::try_cast_slice::<u8, T>(b),
    ) {
        (Ok(d), Ok(x), Ok(y)) => typed_to(op, d, x, y),
        _ => {
            let f = binop::<T>(op);
            let n = std::mem::size_of::<T>();
            for ((dc, ac), bc) in dst.chunks_exact_mut(n).zip(a.chunks_exact(n)).zip(b.chunks_exact(n)) {
                let v = f(bytemuck::pod_read_unaligned(ac), bytemuck::pod_read_unaligned(bc));
                dc.copy_from_slice(bytemuck::bytes_of(&v));
            }
        }
    }
}

fn bytes_div<T: Arith>(buf: &mut [u8], n: usize) {
    match bytemuck::try_cast_slice_mut::<u8, T>(buf) {
        Ok(b) => b.iter_mut().for_each(|x| *x = T::div_n(*x, n)),
        Err(_) => {
            let sz = std::mem::size_of::<T>();
            for c in buf.chunks_exact_mut(sz) {
                let v = T::div_n(bytemuck::pod_read_unaligned(c), n);
                c.copy_from_slice(bytemuck::bytes_of(&v));
            }
        }
    }
}

macro_rules! dispatch {
    ($dtype:expr, $f:ident, $($arg:expr),*) => {
        match $dtype {
            DType::F32 => $f::<f32>($($arg),*),
            DType::F64 => $f::<f64>($($arg),*),
            DType::F16 => $f::<f16>($($arg),*),
            DType::BF16 => $f::<bf16>($($arg),*),
            DType::I8 => $f::<i8>($($arg),*),
            DType::U8 => $f::<u8>($($arg),*),
            DType::I32 => $f::<i32>($($arg),*),
            DType::I64 => $f::<i64>($($arg),*),
            DType::U32 => $f::<u32>($($arg),*),
            DType::U64 => $f::<u64>($($arg),*),
            DType::F8E4M3 => $f::<F8E4M3>($($arg),*),
            DType::F8E5M2 => $f::<F8E5M2>($($arg),*),
        }
    };
}

/// `dst[i] = dst[i] op src[i]` over raw bytes holding `dtype` elements.
/// `Avg` accumulates as `Sum`; call [`finish_avg`] once at the end.
pub fn reduce_in_place(dtype: DType, op: ReduceOp, dst: &mut [u8], src: &[u8]) -> Result<()> {
    check_lens(dtype, dst.len(), src.len())?;
    dispatch!(dtype, bytes_in_place, op, dst, src);
    Ok(())
}

/// `dst[i] = a[i] op b[i]` over raw bytes holding `dtype` elements.
pub fn reduce_to(dtype: DType, op: ReduceOp, dst: &mut [u8], a: &[u8], b: &[u8]) -> Result<()> {
    check_lens(dtype, dst.len(), a.len())?;
    check_lens(dtype, dst.len(), b.len())?;
    dispatch!(dtype, bytes_to, op, dst, a, b);
    Ok(())
}

/// Divide every element by `n` (the `avg` epilogue).
pub fn finish_avg(dtype: DType, buf: &mut [u8], n: usize) -> Result<()> {
    if !buf.len().is_multiple_of(dtype.size()) {
        return Err(Error::Internal("finish_avg: partial element".into()));
    }
    if n > 1 {
        dispatch!(dtype, bytes_div, buf, n);
    }
    Ok(())
}

/// A reference reduction of whole per-rank inputs, in rank order, for tests and checks:
/// `out = in[0] op in[1] op ... op in[n-1]` (then `/ n` for avg).
pub fn reference_reduce(dtype: DType, op: ReduceOp, inputs: &[&[u8]]) -> Result<Vec<u8>> {
    let first = inputs.first().ok_or_else(|| Error::Internal("reference_reduce: no inputs".into()))?;
    let mut acc = first.to_vec();
    for x in &inputs[1..] {
        reduce_in_place(dtype, op, &mut acc, x)?;
    }
    if op == ReduceOp::Avg {
        finish_avg(dtype, &mut acc, inputs.len())?;
    }
    Ok(acc)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b<T: bytemuck::Pod>(v: &[T]) -> Vec<u8> {
        bytemuck::cast_slice(v).to_vec()
    }

    #[test]
    fn float_ops() {
        let mut d = b(&[1.0f32, 5.0, -3.0, f32::NAN]);
        reduce_in_place(DType::F32, ReduceOp::Max, &mut d, &b(&[2.0f32, 4.0, f32::NAN, 1.0])).unwrap();
        let r: &[f32] = bytemuck::cast_slice(&d);
        assert_eq!(r[..2], [2.0, 5.0]);
        assert!(r[2].is_nan() && r[3].is_nan(), "NaN propagates from either side");
    }

    #[test]
    fn int_wraps_and_avg_truncates() {
        let mut d = b(&[120i8, -128, 7, -7]);
        reduce_in_place(DType::I8, ReduceOp::Sum, &mut d, &b(&[10i8, -1, 0, 0])).unwrap();
        assert_eq!(bytemuck::cast_slice::<u8, i8>(&d), &[-126, 127, 7, -7]);
        finish_avg(DType::I8, &mut d, 2).unwrap();
        assert_eq!(bytemuck::cast_slice::<u8, i8>(&d), &[-63, 63, 3, -3]);
        let mut u = vec![200u8, 3];
        finish_avg(DType::U8, &mut u, 300).unwrap();
        assert_eq!(u, [0, 0]);
    }

    #[test]
    fn half_types_round_once() {
        let a = [bf16::from_f32(1.0), bf16::from_f32(3.0)];
        let c = [bf16::from_f32(2.0), bf16::from_f32(0.5)];
        let mut d = b(&a);
        reduce_in_place(DType::BF16, ReduceOp::Prod, &mut d, &b(&c)).unwrap();
        assert_eq!(bytemuck::cast_slice::<u8, bf16>(&d), &[bf16::from_f32(2.0), bf16::from_f32(1.5)]);
        let mut h = b(&[f16::from_f32(3.0)]);
        finish_avg(DType::F16, &mut h, 2).unwrap();
        assert_eq!(bytemuck::cast_slice::<u8, f16>(&h), &[f16::from_f32(1.5)]);
    }

    #[test]
    fn new_dtypes_reduce() {
        let mut u = b(&[u32::MAX, 7]);
        reduce_in_place(DType::U32, ReduceOp::Sum, &mut u, &b(&[2u32, 1])).unwrap();
        assert_eq!(bytemuck::cast_slice::<u8, u32>(&u), &[1, 8], "u32 wraps");
        finish_avg(DType::U32, &mut u, 3).unwrap();
        assert_eq!(bytemuck::cast_slice::<u8, u32>(&u), &[0, 2]);
        let mut w = b(&[u64::MAX, 3]);
        reduce_in_place(DType::U64, ReduceOp::Max, &mut w, &b(&[1u64, 9])).unwrap();
        assert_eq!(bytemuck::cast_slice::<u8, u64>(&w), &[u64::MAX, 9]);
        // fp8: one rounding per step, through f32: 1.0 + 0.0625 ties to even (1.0) in E4M3.
        let mut x = vec![F8E4M3::from_f32(1.0).0, F8E4M3::from_f32(448.0).0];
        reduce_in_place(DType::F8E4M3, ReduceOp::Sum, &mut x, &[F8E4M3::from_f32(0.0625).0, F8E4M3::from_f32(448.0).0])
            .unwrap();
        assert_eq!(F8E4M3(x[0]).to_f32(), 1.0);
        assert!(F8E4M3(x[1]).to_f32().is_nan(), "E4M3 overflow is NaN");
        let mut y = vec![F8E5M2::from_f32(3.0).0];
        reduce_in_place(DType::F8E5M2, ReduceOp::Prod, &mut y, &[F8E5M2::from_f32(-2.0).0]).unwrap();
        assert_eq!(F8E5M2(y[0]).to_f32(), -6.0);
        finish_avg(DType::F8E5M2, &mut y, 4).unwrap();
        assert_eq!(F8E5M2(y[0]).to_f32(), -1.5);
    }

    #[test]
    fn unaligned_path_matches_aligned() {
        let x: Vec<f64> = (0..9).map(|i| i as f64).collect();
        let y: Vec<f64> = (0..9).map(|i| (i * 2) as f64).collect();
        let mut store = [0u8; 9 * 8 + 1];
        store[1..].copy_from_slice(&b(&x));
        reduce_in_place(DType::F64, ReduceOp::Sum, &mut store[1..], &b(&y)).unwrap();
        let mut aligned = b(&x);
        reduce_in_place(DType::F64, ReduceOp::Sum, &mut aligned, &b(&y)).unwrap();
        assert_eq!(&store[1..], &aligned[..]);
    }

    #[test]
    fn reduce_to_and_reference() {
        let xs = [b(&[1i32, 2]), b(&[3i32, -4]), b(&[5i32, 6])];
        let refs: Vec<&[u8]> = xs.iter().map(|v| v.as_slice()).collect();
        let r = reference_reduce(DType::I32, ReduceOp::Avg, &refs).unwrap();
        assert_eq!(bytemuck::cast_slice::<u8, i32>(&r), &[3, 1]);
        let mut d = vec![0u8; 8];
        reduce_to(DType::I32, ReduceOp::Min, &mut d, &xs[0], &xs[1]).unwrap();
        assert_eq!(bytemuck::cast_slice::<u8, i32>(&d), &[1, -4]);
        assert!(reduce_in_place(DType::I32, ReduceOp::Sum, &mut d, &xs[0][..4]).is_err());
    }
}
