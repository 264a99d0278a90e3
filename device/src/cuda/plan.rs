//! Launch planning: which kernel an operation runs, on what grid, with which parameters.
//!
//! Pure code, no driver: the CUDA device launches what it plans, and devccl's tests run the
//! same plans through a CPU build of the kernel source, so the parameter conventions (op
//! codes, the epilogue's divisors, the fragment table) are checked without a GPU.

use devccl_core::dtype::DType;
use devccl_core::op::ReduceOp;
use devccl_core::transport::Fragment;

/// Threads per block.
pub const THREADS: u32 = 256;
/// Blocks per multiprocessor for grid-stride kernels (2048 resident threads per SM).
pub const BLOCKS_PER_SM: u32 = 8;
/// Fragments longer than this are split into several table entries (at destination offsets
/// that are multiples of 8, so no element is split that was not already), one block each.
pub const MAX_PIECE: u64 = 16 << 10;
/// Bytes per fragment table entry (`struct Frag` in the kernel source).
pub const FRAG_BYTES: usize = 24;

/// What a kernel does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    /// `dst = a op b`, then the epilogue.
    Reduce,
    /// `dst /= n`.
    Finish,
    /// Fragments to their places.
    Gather,
    /// `dst = base op gathered`, then the epilogue.
    GatherReduce,
}

/// One kernel entry point.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct KernelId {
    /// What it does.
    pub family: Family,
    /// Its element type (`None` for the byte gather).
    pub dtype: Option<DType>,
}

impl KernelId {
    /// The entry point's name in the kernel source.
    pub fn name(&self) -> String {
        let t = self.dtype.map(DType::short_name).unwrap_or("");
        match self.family {
            Family::Reduce => format!("devccl_reduce_{t}"),
            Family::Finish => format!("devccl_finish_{t}"),
            Family::Gather => "devccl_gather".into(),
            Family::GatherReduce => format!("devccl_gather_reduce_{t}"),
        }
    }

    /// Dense index into [`all_kernels`].
    pub fn index(&self) -> usize {
        let d = self.dtype.map_or(0, |d| d.code() as usize);
        match self.family {
            Family::Reduce => d,
            Family::Finish => DType::ALL.len() + d,
            Family::GatherReduce => 2 * DType::ALL.len() + d,
            Family::Gather => 3 * DType::ALL.len(),
        }
    }
}

/// Every entry point, in [`KernelId::index`] order.
pub fn all_kernels() -> Vec<KernelId> {
    let per = |family| DType::ALL.iter().map(move |&d| KernelId { family, dtype: Some(d) });
    per(Family::Reduce)
        .chain(per(Family::Finish))
        .chain(per(Family::GatherReduce))
        .chain(std::iter::once(KernelId { family: Family::Gather, dtype: None }))
        .collect()
}

/// A kernel parameter. Pointers are device addresses.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Arg {
    /// A device address.
    Ptr(u64),
    /// The device address of this launch's fragment table (placed by the launcher).
    Table,
    /// `unsigned long long`.
    U64(u64),
    /// `int`.
    I32(i32),
    /// `float`.
    F32(f32),
    /// `double`.
    F64(f64),
}

/// A planned kernel launch.
#[derive(Debug, Clone, PartialEq)]
pub struct Launch {
    /// The entry point.
    pub kernel: KernelId,
    /// Blocks.
    pub grid: u32,
    /// Threads per block.
    pub block: u32,
    /// Parameters, in order.
    pub args: Vec<Arg>,
    /// The fragment table's bytes (`Frag` entries), empty when the kernel takes none.
    pub table: Vec<u8>,
}

/// The epilogue `/ n` in every representation the kernels take.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Epilogue {
    /// Divide at all.
    pub on: bool,
    /// Integer divisor; 0 when `n` does not fit the type (the quotient is then 0).
    pub idiv: u64,
    /// `n as f32` (f32 and the narrow floats).
    pub fdiv: f32,
    /// `n as f64`.
    pub ddiv: f64,
}

/// The divisor for `dst /= n`; off when `n <= 1` (as on the host).
pub fn divisor(dtype: DType, n: usize) -> Epilogue {
    Epilogue { on: n > 1, idiv: int_divisor(dtype, n), fdiv: n as f32, ddiv: n as f64 }
}

/// The epilogue of a reduction: only for avg with `finish`.
pub fn epilogue(dtype: DType, op: ReduceOp, finish: Option<usize>) -> Epilogue {
    match finish {
        Some(n) if op == ReduceOp::Avg => divisor(dtype, n),
        _ => Epilogue { on: false, ..divisor(dtype, 1) },
    }
}

fn int_divisor(dtype: DType, n: usize) -> u64 {
    let n = n as u64;
    let max = match dtype {
        DType::I8 => i8::MAX as u64,
        DType::U8 => u8::MAX as u64,
        DType::I32 => i32::MAX as u64,
        DType::U32 => u32::MAX as u64,
        DType::I64 => i64::MAX as u64,
        _ => u64::MAX,
    };
    if n <= max { n } else { 0 }
}

/// The kernels' op code (avg combines as a sum).
pub fn op_code(op: ReduceOp) -> i32 {
    match op.combine_op() {
        ReduceOp::Sum | ReduceOp::Avg => 0,
        ReduceOp::Prod => 1,
        ReduceOp::Min => 2,
        ReduceOp::Max => 3,
    }
}

/// Blocks for `items` work items of one thread each, capped for grid-stride loops.
pub fn grid_for(items: u64, sm_count: u32) -> u32 {
    let cap = sm_count.max(1) as u64 * BLOCKS_PER_SM as u64;
    items.div_ceil(THREADS as u64).clamp(1, cap) as u32
}

fn epi_args(e: Epilogue) -> [Arg; 4] {
    [Arg::I32(e.on as i32), Arg::U64(e.idiv), Arg::F32(e.fdiv), Arg::F64(e.ddiv)]
}

/// `dst = a op b` over `bytes` bytes, then the epilogue.
#[allow(clippy::too_many_arguments)]
pub fn reduce(
    dtype: DType,
    op: ReduceOp,
    finish: Option<usize>,
    dst: u64,
    a: u64,
    b: u64,
    bytes: usize,
    sm_count: u32,
) -> Launch {
    let n = (bytes / dtype.size()) as u64;
    let mut args = vec![Arg::Ptr(dst), Arg::Ptr(a), Arg::Ptr(b), Arg::U64(n), Arg::I32(op_code(op))];
    args.extend(epi_args(epilogue(dtype, op, finish)));
    Launch {
        kernel: KernelId { family: Family::Reduce, dtype: Some(dtype) },
        grid: grid_for((bytes as u64).div_ceil(16), sm_count),
        block: THREADS,
        args,
        table: Vec::new(),
    }
}

/// `dst /= n` over `bytes` bytes; `None` when there is nothing to do (`n <= 1`).
pub fn finish_avg(dtype: DType, dst: u64, bytes: usize, n: usize, sm_count: u32) -> Option<Launch> {
    let e = divisor(dtype, n);
    if !e.on || bytes == 0 {
        return None;
    }
    let count = (bytes / dtype.size()) as u64;
    Some(Launch {
        kernel: KernelId { family: Family::Finish, dtype: Some(dtype) },
        grid: grid_for((bytes as u64).div_ceil(16), sm_count),
        block: THREADS,
        args: vec![Arg::Ptr(dst), Arg::U64(count), Arg::U64(e.idiv), Arg::F32(e.fdiv), Arg::F64(e.ddiv)],
        table: Vec::new(),
    })
}

/// The fragment table for fragments sorted by `dst_off` (as `check_fragments` returns them):
/// long fragments split into pieces of at most [`MAX_PIECE`] bytes at destination offsets that
/// are multiples of 8. Returns the bytes and the entry count.
pub fn fragment_table(frags: &[Fragment]) -> (Vec<u8>, u64) {
    let mut table = Vec::with_capacity(frags.len() * FRAG_BYTES);
    let mut entries = 0u64;
    for f in frags {
        let end = f.dst_off + f.len as u64;
        let mut at = f.dst_off;
        while at < end {
            let piece_end = ((at + MAX_PIECE) & !7).min(end);
            let src = f.src_off + (at - f.dst_off);
            table.extend_from_slice(&src.to_le_bytes());
            table.extend_from_slice(&at.to_le_bytes());
            table.extend_from_slice(&((piece_end - at) as u32).to_le_bytes());
            table.extend_from_slice(&0u32.to_le_bytes());
            entries += 1;
            at = piece_end;
        }
    }
    (table, entries)
}

/// Gather fragments (sorted by `dst_off`) from the pool at `pool` into `dst`.
pub fn gather(dst: u64, pool: u64, frags: &[Fragment], sm_count: u32) -> Launch {
    let (table, entries) = fragment_table(frags);
    Launch {
        kernel: KernelId { family: Family::Gather, dtype: None },
        grid: grid_for(entries * THREADS as u64, sm_count),
        block: THREADS,
        args: vec![Arg::Ptr(dst), Arg::Ptr(pool), Arg::Table, Arg::U64(entries)],
        table,
    }
}

/// `dst = base op gathered` (fragments sorted by `dst_off`), then the epilogue.
#[allow(clippy::too_many_arguments)]
pub fn gather_reduce(
    dtype: DType,
    op: ReduceOp,
    finish: Option<usize>,
    dst: u64,
    base: u64,
    pool: u64,
    frags: &[Fragment],
    sm_count: u32,
) -> Launch {
    let (table, entries) = fragment_table(frags);
    let mut args =
        vec![Arg::Ptr(dst), Arg::Ptr(base), Arg::Ptr(pool), Arg::Table, Arg::U64(entries), Arg::I32(op_code(op))];
    args.extend(epi_args(epilogue(dtype, op, finish)));
    Launch {
        kernel: KernelId { family: Family::GatherReduce, dtype: Some(dtype) },
        grid: grid_for(entries * THREADS as u64, sm_count),
        block: THREADS,
        args,
        table,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_indices_agree() {
        let all = all_kernels();
        assert_eq!(all.len(), 3 * DType::ALL.len() + 1);
        for (i, k) in all.iter().enumerate() {
            assert_eq!(k.index(), i, "{}", k.name());
        }
        assert_eq!(all[0].name(), "devccl_reduce_f32");
        assert_eq!(all.last().unwrap().name(), "devccl_gather");
    }

    #[test]
    fn table_splits_long_fragments_on_multiples_of_8() {
        let f = Fragment { src_off: 5, len: (MAX_PIECE * 2 + 11) as u32, dst_off: 3 };
        let (t, n) = fragment_table(&[f]);
        assert_eq!(n, 3);
        assert_eq!(t.len(), 3 * FRAG_BYTES);
        let entry = |i: usize| {
            let e = &t[i * FRAG_BYTES..(i + 1) * FRAG_BYTES];
            let u = |r: std::ops::Range<usize>| u64::from_le_bytes(e[r].try_into().unwrap());
            (u(0..8), u(8..16), u32::from_le_bytes(e[16..20].try_into().unwrap()) as u64)
        };
        let mut at = 3;
        for i in 0..3 {
            let (src, dst, len) = entry(i);
            assert_eq!(dst, at);
            assert_eq!(src, 5 + (dst - 3));
            assert!(len <= MAX_PIECE);
            at += len;
            if i < 2 {
                assert_eq!(at % 8, 0);
            }
        }
        assert_eq!(at, 3 + f.len as u64);
    }

    #[test]
    fn divisors_follow_the_host() {
        assert_eq!(divisor(DType::I8, 300).idiv, 0);
        assert_eq!(divisor(DType::I8, 127).idiv, 127);
        assert_eq!(divisor(DType::U64, usize::MAX).idiv, u64::MAX);
        assert!(!divisor(DType::F32, 1).on);
        assert!(!epilogue(DType::F32, ReduceOp::Sum, Some(4)).on);
        assert!(epilogue(DType::F32, ReduceOp::Avg, Some(4)).on);
        assert_eq!(op_code(ReduceOp::Avg), 0);
        assert_eq!(grid_for(0, 132), 1);
        assert_eq!(grid_for(u64::MAX / 2, 132), 132 * BLOCKS_PER_SM);
    }
}
