//! Recording the element-wise operations: binding windows, push constants, dispatch splits,
//! and the fused gather-and-reduce's fragment tables.

use ash::vk;
use devccl_core::{DType, ReduceOp, Result};

use super::VulkanOptions;
use super::exec::{Rec, Window};
use super::instance::Gpu;
use super::memory::{Buffer, Kind, Operand};
use super::plan::{self, Group};

/// `Params` of shaders/common.wgsl.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, bytemuck::Pod, bytemuck::Zeroable)]
struct Push {
    dst_off: u32,
    nbytes: u32,
    a_off: u32,
    b_off: u32,
    op: u32,
    flags: u32,
    div_lo: u32,
    div_hi: u32,
    frag_first: u32,
    nfrag: u32,
}

const _: () = assert!(std::mem::size_of::<Push>() == super::pipelines::PUSH_BYTES as usize);

/// Push-constant flag: apply the avg epilogue.
const FLAG_FINISH: u32 = 1;
/// Push-constant flag: take the exact integer float paths for every element (tests).
const FLAG_SOFT: u32 = 2;
/// Push-constant flag: flush subnormal results of the hardware float operations (tests).
const FLAG_FLUSH: u32 = 4;

/// The parts of an element-wise dispatch that do not depend on the operands.
#[derive(Debug, Clone, Copy)]
pub(super) struct Elementwise {
    dtype: DType,
    pipe: vk::Pipeline,
    op: u32,
    flags: u32,
    div: (u32, u32),
}

impl Elementwise {
    /// `op` combines (avg as sum); `finish = Some(n)` with `op` avg and n > 1 divides by n
    /// afterwards (the finish_avg entry point only reads the divisor).
    pub(super) fn new(
        dtype: DType,
        pipe: vk::Pipeline,
        op: ReduceOp,
        finish: Option<usize>,
        opts: &VulkanOptions,
    ) -> Self {
        let mut flags = if opts.soft_float { FLAG_SOFT } else { 0 };
        if opts.flush_subnormals {
            flags |= FLAG_FLUSH;
        }
        let mut div = (0, 0);
        if let Some(n) = finish.filter(|&n| op == ReduceOp::Avg && n > 1) {
            flags |= FLAG_FINISH;
            div = divisor(dtype, n);
        }
        Elementwise { dtype, pipe, op: u32::from(op.combine_op().code()), flags, div }
    }

    fn push(&self) -> Push {
        Push { op: self.op, flags: self.flags, div_lo: self.div.0, div_hi: self.div.1, ..Push::default() }
    }

    /// Invocations for `n` destination bytes from window byte `d_in`: one per word touched
    /// (8-byte dtypes: one per element).
    fn units(&self, d_in: u32, n: u64) -> u64 {
        let d = u64::from(d_in);
        if self.dtype.size() == 8 { n / 8 } else { (d + n - 1) / 4 - d / 4 + 1 }
    }
}

/// The divisor as the shaders want it: the bits of `n as f32` (f32 and narrower floats, which
/// divide in f32) or `n as f64`; integers get n itself, or 0 when n does not fit the type (the
/// host's quotient is then 0).
fn divisor(dtype: DType, n: usize) -> (u32, u32) {
    let split = |v: u64| (v as u32, (v >> 32) as u32);
    let int = |max: u64| split(if n as u64 <= max { n as u64 } else { 0 });
    match dtype {
        DType::F32 | DType::F16 | DType::BF16 | DType::F8E4M3 | DType::F8E5M2 => ((n as f32).to_bits(), 0),
        DType::F64 => split((n as f64).to_bits()),
        DType::I8 => int(i8::MAX as u64),
        DType::U8 => int(u64::from(u8::MAX)),
        DType::I32 => int(i32::MAX as u64),
        DType::U32 => int(u64::from(u32::MAX)),
        DType::I64 => int(i64::MAX as u64),
        DType::U64 => int(u64::MAX),
    }
}

/// Per-device planning constants.
struct Limits {
    align: u64,
    chunk: u64,
    max_groups: [u32; 3],
}

fn limits(gpu: &Gpu) -> Limits {
    let align = gpu.limits.offset_align;
    Limits { align, chunk: plan::chunk_limit(gpu.limits.max_range, align), max_groups: gpu.limits.max_groups }
}

/// The window over `n` bytes of `o` from its byte `c`, and the first byte's offset in it.
fn window(o: &Operand, c: u64, n: u64, align: u64) -> (Window, u32) {
    raw_window(&o.buf, o.off + c, n, align)
}

fn raw_window(buf: &Buffer, abs: u64, n: u64, align: u64) -> (Window, u32) {
    let (off, range, inner) = plan::window(abs, n, align);
    debug_assert!(off + range <= buf.size, "window {off}+{range} outside a {}-byte buffer", buf.size);
    (Window { buf: buf.raw, off, range }, inner)
}

/// `dst = a op b` (with the epilogue when `ew` says so), split into dispatches whose windows
/// fit the device's binding range.
pub(super) fn reduce(
    rec: &mut Rec<'_>,
    gpu: &Gpu,
    ew: &Elementwise,
    dst: &Operand,
    a: &Operand,
    b: &Operand,
) -> Result<()> {
    let l = limits(gpu);
    for (c, n) in plan::chunks(dst.len, l.chunk) {
        let (dw, d_in) = window(dst, c, n, l.align);
        let (aw, a_in) = window(a, c, n, l.align);
        let (bw, b_in) = window(b, c, n, l.align);
        let push = Push { dst_off: d_in, nbytes: n as u32, a_off: a_in, b_off: b_in, ..ew.push() };
        let grid = plan::grid(ew.units(d_in, n), l.max_groups);
        rec.dispatch(ew.pipe, &[dw, aw, bw, dw], bytemuck::bytes_of(&push), grid)?;
    }
    Ok(())
}

/// `dst /= n` in place.
pub(super) fn finish_avg(rec: &mut Rec<'_>, gpu: &Gpu, ew: &Elementwise, dst: &Operand) -> Result<()> {
    let l = limits(gpu);
    for (c, n) in plan::chunks(dst.len, l.chunk) {
        let (dw, d_in) = window(dst, c, n, l.align);
        let push = Push { dst_off: d_in, nbytes: n as u32, ..ew.push() };
        rec.dispatch(ew.pipe, &[dw; 4], bytemuck::bytes_of(&push), plan::grid(ew.units(d_in, n), l.max_groups))?;
    }
    Ok(())
}

/// The fused gather-and-reduce's groups for this device, or `None` when the fragments are too
/// scattered over a pool larger than one binding window (then [`gather_then_reduce`]).
pub(super) fn plan_gather(gpu: &Gpu, frags: &[devccl_core::transport::Fragment], len: u64) -> Option<Vec<Group>> {
    let l = limits(gpu);
    let max_pieces = (gpu.limits.max_range / 16).saturating_sub(l.align / 16 + 1).min(1 << 24) as usize;
    let groups = plan::groups(frags, len, l.chunk, max_pieces)?;
    // Many small dispatches cost more than one gather copy into scratch memory.
    (groups.len() as u64 <= 16 + len / (1 << 20)).then_some(groups)
}

/// `dst = base op gathered`, one dispatch per group, the fragment tables in a pooled
/// host-visible buffer (each group's table window starts aligned).
pub(super) fn gather_reduce(
    rec: &mut Rec<'_>,
    gpu: &Gpu,
    ew: &Elementwise,
    dst: &Operand,
    base: &Operand,
    pool: &Operand,
    groups: &[Group],
) -> Result<()> {
    let l = limits(gpu);
    let per_align = (l.align / 16).max(1);
    let mut firsts = Vec::with_capacity(groups.len());
    let mut total = 0u64;
    for g in groups {
        total = total.next_multiple_of(per_align);
        firsts.push(total);
        total += g.pieces.len() as u64;
    }
    let table = rec.aux(total * 16)?;
    let mut words = vec![0u32; (total * 4) as usize];
    for (g, &first) in groups.iter().zip(&firsts) {
        let n = g.end - g.start;
        let (pw, _) = raw_window(&pool.buf, pool.off + g.pool_lo, g.pool_hi - g.pool_lo, l.align);
        for (k, p) in g.pieces.iter().enumerate() {
            let e = ((first + k as u64) * 4) as usize;
            words[e] = p.dst as u32;
            words[e + 1] = (pool.off + p.src - pw.off) as u32;
            words[e + 2] = p.len as u32;
        }
        let tw = Window { buf: table.raw, off: first * 16, range: g.pieces.len() as u64 * 16 };
        let (dw, d_in) = window(dst, g.start, n, l.align);
        let (bw, b_in) = window(base, g.start, n, l.align);
        let push = Push { dst_off: d_in, nbytes: n as u32, a_off: b_in, nfrag: g.pieces.len() as u32, ..ew.push() };
        rec.dispatch(
            ew.pipe,
            &[dw, bw, pw, tw],
            bytemuck::bytes_of(&push),
            plan::grid(ew.units(d_in, n), l.max_groups),
        )?;
    }
    let bytes: &[u8] = bytemuck::cast_slice(&words);
    // SAFETY: `table` is mapped for at least `total * 16 == bytes.len()` bytes, and it came from
    // the pool just now, so no queued operation uses it; the GPU reads it only after submit
    // (host writes to coherent memory are visible to work submitted afterwards).
    unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), table.mapped(), bytes.len()) };
    Ok(())
}

/// The gather-and-reduce in two steps, for fragments too scattered to bind: copy the fragments
/// into a scratch buffer (vkCmdCopyBuffer), then reduce from it.
#[allow(clippy::too_many_arguments)]
pub(super) fn gather_then_reduce(
    rec: &mut Rec<'_>,
    gpu: &std::sync::Arc<Gpu>,
    ew: &Elementwise,
    dst: &Operand,
    base: &Operand,
    pool: &Operand,
    frags: &[devccl_core::transport::Fragment],
) -> Result<()> {
    let scratch = Buffer::new(gpu, dst.len, Kind::Device)?;
    rec.keep_buffer(scratch.clone());
    rec.copy(&pool.buf, &scratch, &copy_regions(frags, pool.off, 0));
    let gathered = Operand { buf: scratch, off: 0, len: dst.len };
    reduce(rec, gpu, ew, dst, base, &gathered)
}

/// vkCmdCopyBuffer regions for fragments (empty ones dropped), pool bytes from `src_base`,
/// destination bytes from `dst_base`.
pub(super) fn copy_regions(
    frags: &[devccl_core::transport::Fragment],
    src_base: u64,
    dst_base: u64,
) -> Vec<vk::BufferCopy> {
    frags
        .iter()
        .filter(|f| f.len > 0)
        .map(|f| vk::BufferCopy {
            src_offset: src_base + f.src_off,
            dst_offset: dst_base + f.dst_off,
            size: u64::from(f.len),
        })
        .collect()
}
