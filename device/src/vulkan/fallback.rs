//! Reductions of dtypes whose shaders need a feature the device lacks (shaderInt64 for i64/u64,
//! shaderFloat64 and shaderInt64 for f64): the operands are downloaded, reduced on the host
//! with devccl_core::op (the reference semantics), and the result uploaded. Correct, slower;
//! counted in `host_fallbacks`. Blocking: the answer is [`Pending::Done`].

use devccl_core::device::{Pending, ReduceArgs, Scattered};
use devccl_core::memory::RegionSlice;
use devccl_core::op::{self, ReduceOp};
use devccl_core::{DType, Result};

use super::VulkanDevice;

fn read(dev: &VulkanDevice, s: &RegionSlice) -> Result<Vec<u8>> {
    let mut v = vec![0u8; s.len()];
    dev.transfers.download(&dev.exec, s, &mut v)?;
    Ok(v)
}

fn epilogue(dtype: DType, op: ReduceOp, finish: Option<usize>, d: &mut [u8]) -> Result<()> {
    match finish {
        Some(n) if op == ReduceOp::Avg => op::finish_avg(dtype, d, n),
        _ => Ok(()),
    }
}

/// `dst = a op b` on the host.
pub(super) fn reduce(dev: &VulkanDevice, r: &ReduceArgs<'_>) -> Result<Pending> {
    dev.note_fallback(r.dtype);
    let a = read(dev, r.a)?;
    let b = read(dev, r.b)?;
    let mut out = vec![0u8; a.len()];
    op::reduce_to(r.dtype, r.op, &mut out, &a, &b)?;
    epilogue(r.dtype, r.op, r.finish, &mut out)?;
    dev.transfers.upload(&dev.exec, r.dst, &out)?;
    Ok(Pending::Done)
}

/// `dst /= n` on the host.
pub(super) fn finish_avg(dev: &VulkanDevice, dtype: DType, dst: &RegionSlice, n: usize) -> Result<Pending> {
    dev.note_fallback(dtype);
    let mut v = read(dev, dst)?;
    op::finish_avg(dtype, &mut v, n)?;
    dev.transfers.upload(&dev.exec, dst, &v)?;
    Ok(Pending::Done)
}

/// `dst = base op gathered`: gathered on the device (a copy, no shader), reduced on the host.
pub(super) fn gather_reduce(
    dev: &VulkanDevice,
    args: (DType, ReduceOp),
    dst: &RegionSlice,
    base: &RegionSlice,
    src: Scattered<'_>,
    finish: Option<usize>,
) -> Result<Pending> {
    let (dtype, op) = args;
    dev.note_fallback(dtype);
    let tmp = devccl_core::device::Device::alloc(dev, dst.len())?;
    if let Some(sub) = dev.gather_sub(&tmp.full(), src)? {
        sub.wait()?;
    }
    let g = read(dev, &tmp.full())?;
    let mut out = read(dev, base)?;
    op::reduce_in_place(dtype, op, &mut out, &g)?;
    epilogue(dtype, op, finish, &mut out)?;
    dev.transfers.upload(&dev.exec, dst, &out)?;
    Ok(Pending::Done)
}
