//! [`VulkanDevice`]: opening devices and the [`Device`] operations.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use devccl_core::device::{
    Device, DeviceStats, ExportKind, Exported, Pending, ReduceArgs, Scattered, check_dst, check_fragments,
    check_gather_reduce, check_reduce,
};
use devccl_core::memory::{DeviceId, Region, RegionSlice};
use devccl_core::{DType, Error, ReduceOp, Result};

use super::exec::{Exec, Submitted};
use super::instance::{Gpu, VulkanFeatures, instance};
use super::memory::{self, Buffer, Kind, Operand};
use super::pipelines::Entry;
use super::transfer::Transfers;
use super::{fallback, ops};

/// How to open a device (see [`open_with`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VulkanOptions {
    /// Act as if the device lacked shaderInt64 (i64, u64 and f64 reductions run on the host).
    pub disable_int64: bool,
    /// Act as if the device lacked shaderFloat64 (f64 reductions run on the host).
    pub disable_float64: bool,
    /// Compute every float sum and product with the exact integer paths the shaders otherwise
    /// keep for subnormals and special values (for tests of those paths; slower).
    pub soft_float: bool,
    /// Flush subnormal results of the hardware float operations, as some devices do (for tests
    /// that the exact paths take over wherever such a device would be wrong).
    pub flush_subnormals: bool,
    /// Act as if the device lacked `VK_KHR_external_memory_fd` (`alloc_exportable` and
    /// `export` answer `Unsupported` naming it).
    pub disable_external_memory: bool,
}

impl VulkanOptions {
    /// Options from the environment (`DEVCCL_VULKAN_DISABLE`, read by devccl's one config
    /// module: shaderInt64 / shaderFloat64, or int64 / float64).
    pub fn from_env() -> Result<VulkanOptions> {
        let c = devccl_core::config::DeviceConfig::from_env()?;
        Ok(VulkanOptions {
            disable_int64: c.vulkan_disable_int64,
            disable_float64: c.vulkan_disable_float64,
            ..VulkanOptions::default()
        })
    }
}

/// One Vulkan device: its logical device, queue, pools and pipelines.
pub struct VulkanDevice {
    index: u32,
    gpu: Arc<Gpu>,
    pub(super) exec: Arc<Exec>,
    pub(super) transfers: Transfers,
    opts: VulkanOptions,
    warned: [AtomicBool; 12],
}

impl fmt::Debug for VulkanDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VulkanDevice").field("name", &self.gpu.name).field("features", &self.gpu.features).finish()
    }
}

/// Open Vulkan device `index` (the process's shared instance; see [`open_vulkan`]).
pub fn open(index: u32) -> Result<Arc<dyn Device>> {
    Ok(open_vulkan(index)?)
}

/// The process's instance of Vulkan device `index`, opened on first use with the options in
/// the environment ([`VulkanOptions::from_env`]); the same instance [`open`] returns.
pub fn open_vulkan(index: u32) -> Result<Arc<VulkanDevice>> {
    static CACHE: OnceLock<Mutex<HashMap<u32, Arc<VulkanDevice>>>> = OnceLock::new();
    let mut cache = CACHE.get_or_init(Default::default).lock().unwrap_or_else(|e| e.into_inner());
    if let Some(d) = cache.get(&index) {
        return Ok(d.clone());
    }
    let d = open_with(index, &VulkanOptions::from_env()?)?;
    cache.insert(index, d.clone());
    Ok(d)
}

/// A separate instance of Vulkan device `index` with `opts` (its own logical device, queue
/// and memory; not shared). Regions of one instance are not operands of another.
pub fn open_with(index: u32, opts: &VulkanOptions) -> Result<Arc<VulkanDevice>> {
    let gpu = Arc::new(Gpu::open(index, opts)?);
    let exec = Exec::new(&gpu)?;
    Ok(Arc::new(VulkanDevice {
        index,
        gpu,
        exec,
        transfers: Transfers::default(),
        opts: opts.clone(),
        warned: [const { AtomicBool::new(false) }; 12],
    }))
}

/// Every Vulkan device, described as `vulkan:<index> <name>`. Errors only when Vulkan itself
/// is unusable (no loader, no driver).
pub fn list() -> Result<Vec<String>> {
    let inst = instance()?;
    Ok(inst.physical_devices()?.into_iter().enumerate().map(|(i, pd)| inst.describe(pd, i as u32)).collect())
}

/// An operation queued behind a fence.
fn running(sub: Submitted) -> Pending {
    Pending::Running(Box::new(sub))
}

impl VulkanDevice {
    /// The shader features in use (after [`VulkanOptions`]' disabling).
    pub fn features(&self) -> VulkanFeatures {
        self.gpu.features
    }

    /// The index in the device list.
    pub fn index(&self) -> u32 {
        self.index
    }

    /// What [`Device::alloc_exportable`] hands out on this device: dma-bufs
    /// (`VK_EXT_external_memory_dma_buf`) or mappable opaque fds; `Unsupported` saying why
    /// it exports nothing.
    pub fn export_kind(&self) -> Result<ExportKind> {
        Ok(self.gpu.export.handle()?.kind)
    }

    fn operand(&self, s: &RegionSlice, what: &str) -> Result<Operand> {
        memory::operand(&self.gpu, s, what)
    }

    /// Element-wise shaders need every operand at a multiple of the element size.
    fn aligned(&self, dtype: DType, ops: &[(&Operand, &str)]) -> Result<()> {
        let e = dtype.size() as u64;
        match ops.iter().find(|(o, _)| o.off % e != 0) {
            None => Ok(()),
            Some((o, what)) => Err(Error::usage(format!(
                "{}: the {what} starts at byte {} of its buffer, not a multiple of the {dtype} element size ({e})",
                self.gpu.name, o.off
            ))),
        }
    }

    /// The feature `dtype`'s shaders need and the device lacks (or was told to lack).
    fn missing(&self, dtype: DType) -> Option<&'static str> {
        let f = self.gpu.features;
        match dtype {
            DType::I64 | DType::U64 if !f.int64 => Some("shaderInt64"),
            DType::F64 if !f.float64 => Some("shaderFloat64"),
            DType::F64 if !f.int64 => Some("shaderInt64"),
            _ => None,
        }
    }

    /// Count a host fallback, and warn about the dtype once.
    pub(super) fn note_fallback(&self, dtype: DType) {
        self.gpu.stats.fallbacks.fetch_add(1, Ordering::Relaxed);
        if !self.warned[dtype.code() as usize].swap(true, Ordering::Relaxed)
            && let Some(why) = self.host_fallback(dtype)
        {
            tracing::warn!("{why}");
        }
    }

    fn counted(&self) {
        self.gpu.stats.ops.fetch_add(1, Ordering::Relaxed);
    }

    fn elementwise(&self, dtype: DType, entry: Entry, op: ReduceOp, finish: Option<usize>) -> Result<ops::Elementwise> {
        let pipe = self.exec.pipes.get(dtype, entry)?;
        Ok(ops::Elementwise::new(dtype, pipe, op, finish, &self.opts))
    }

    /// Queue the gather (a copy per fragment); `None` when there is nothing to copy.
    pub(super) fn gather_sub(&self, dst: &RegionSlice, src: Scattered<'_>) -> Result<Option<Submitted>> {
        let frags = check_fragments(dst.len(), &src)?;
        check_dst(dst, &[], None)?;
        if src.pool.same(&dst.region) {
            return Err(Error::Internal("gather from the destination's own region".into()));
        }
        let d = self.operand(dst, "gather destination")?;
        let p = self.operand(&src.pool.full(), "fragment pool")?;
        let regions = ops::copy_regions(&frags, p.off, d.off);
        if regions.is_empty() {
            return Ok(None);
        }
        let mut rec = self.exec.begin()?;
        rec.keep(&dst.region);
        rec.keep(src.pool);
        rec.copy(&p.buf, &d.buf, &regions);
        Ok(Some(rec.submit()?))
    }

    #[allow(clippy::too_many_arguments)]
    fn gather_reduce_queued(
        &self,
        dtype: DType,
        op: ReduceOp,
        dst: (&RegionSlice, &Operand),
        base: (&RegionSlice, &Operand),
        pool: (&Region, &Operand),
        frags: &[devccl_core::transport::Fragment],
        finish: Option<usize>,
    ) -> Result<Pending> {
        let plan = ops::plan_gather(&self.gpu, frags, dst.1.len);
        let entry = if plan.is_some() { Entry::GatherReduce } else { Entry::Reduce };
        let ew = self.elementwise(dtype, entry, op, finish)?;
        let mut rec = self.exec.begin()?;
        rec.keep(&dst.0.region);
        rec.keep(&base.0.region);
        rec.keep(pool.0);
        match plan {
            Some(groups) => ops::gather_reduce(&mut rec, &self.gpu, &ew, dst.1, base.1, pool.1, &groups)?,
            None => ops::gather_then_reduce(&mut rec, &self.gpu, &ew, dst.1, base.1, pool.1, frags)?,
        }
        self.counted();
        Ok(running(rec.submit()?))
    }
}

/// `Some(n)` when the avg epilogue applies.
fn finishing(op: ReduceOp, finish: Option<usize>) -> Option<usize> {
    finish.filter(|&n| op == ReduceOp::Avg && n > 1)
}

impl Device for VulkanDevice {
    fn id(&self) -> DeviceId {
        DeviceId::Vulkan(self.index)
    }

    fn describe(&self) -> String {
        self.gpu.name.clone()
    }

    fn alloc(&self, len: usize) -> Result<Region> {
        Ok(memory::device_region(Buffer::new(&self.gpu, len as u64, Kind::Device)?, self.index))
    }

    fn alloc_staging(&self, len: usize) -> Result<Region> {
        Ok(memory::staging_region(Buffer::new(&self.gpu, len as u64, Kind::Staging)?))
    }

    fn copy(&self, dst: &RegionSlice, src: &RegionSlice) -> Result<Pending> {
        if dst.len() != src.len() {
            return Err(Error::Internal(format!("copy: {} bytes into {}", src.len(), dst.len())));
        }
        let d = self.operand(dst, "copy destination")?;
        let s = self.operand(src, "copy source")?;
        if dst.is_empty() || dst.same_as(src) {
            return Ok(Pending::Done);
        }
        check_dst(dst, &[src], None)?;
        let mut rec = self.exec.begin()?;
        rec.keep(&dst.region);
        rec.keep(&src.region);
        rec.copy(&s.buf, &d.buf, &[ash::vk::BufferCopy { src_offset: s.off, dst_offset: d.off, size: d.len }]);
        self.counted();
        Ok(running(rec.submit()?))
    }

    fn reduce(&self, r: ReduceArgs<'_>) -> Result<Pending> {
        check_reduce(&r)?;
        let d = self.operand(r.dst, "reduce destination")?;
        let a = self.operand(r.a, "reduce operand a")?;
        let b = self.operand(r.b, "reduce operand b")?;
        if r.dst.is_empty() {
            return Ok(Pending::Done);
        }
        self.aligned(r.dtype, &[(&d, "destination"), (&a, "operand a"), (&b, "operand b")])?;
        if self.missing(r.dtype).is_some() {
            self.counted();
            return fallback::reduce(self, &r);
        }
        let ew = self.elementwise(r.dtype, Entry::Reduce, r.op, finishing(r.op, r.finish))?;
        let mut rec = self.exec.begin()?;
        for s in [r.dst, r.a, r.b] {
            rec.keep(&s.region);
        }
        ops::reduce(&mut rec, &self.gpu, &ew, &d, &a, &b)?;
        self.counted();
        Ok(running(rec.submit()?))
    }

    fn finish_avg(&self, dtype: DType, dst: &RegionSlice, n: usize) -> Result<Pending> {
        let d = self.operand(dst, "finish_avg destination")?;
        if !dst.len().is_multiple_of(dtype.size()) {
            return Err(Error::Internal("finish_avg: partial element".into()));
        }
        check_dst(dst, &[], None)?;
        if dst.is_empty() || n <= 1 {
            return Ok(Pending::Done);
        }
        self.aligned(dtype, &[(&d, "destination")])?;
        if self.missing(dtype).is_some() {
            self.counted();
            return fallback::finish_avg(self, dtype, dst, n);
        }
        let ew = self.elementwise(dtype, Entry::FinishAvg, ReduceOp::Avg, Some(n))?;
        let mut rec = self.exec.begin()?;
        rec.keep(&dst.region);
        ops::finish_avg(&mut rec, &self.gpu, &ew, &d)?;
        self.counted();
        Ok(running(rec.submit()?))
    }

    fn gather(&self, dst: &RegionSlice, src: Scattered<'_>) -> Result<Pending> {
        match self.gather_sub(dst, src)? {
            None => Ok(Pending::Done),
            Some(sub) => {
                self.counted();
                Ok(running(sub))
            }
        }
    }

    fn gather_reduce(
        &self,
        dtype: DType,
        op: ReduceOp,
        dst: &RegionSlice,
        base: &RegionSlice,
        src: Scattered<'_>,
        finish: Option<usize>,
    ) -> Result<Pending> {
        let frags = check_gather_reduce(dtype, dst, base, &src)?;
        let d = self.operand(dst, "gather_reduce destination")?;
        let b = self.operand(base, "gather_reduce base")?;
        let p = self.operand(&src.pool.full(), "fragment pool")?;
        if dst.is_empty() {
            return Ok(Pending::Done);
        }
        self.aligned(dtype, &[(&d, "destination"), (&b, "base")])?;
        if self.missing(dtype).is_some() {
            self.counted();
            return fallback::gather_reduce(self, (dtype, op), dst, base, src, finish);
        }
        let finish = finishing(op, finish);
        self.gather_reduce_queued(dtype, op, (dst, &d), (base, &b), (src.pool, &p), &frags, finish)
    }

    fn upload(&self, dst: &RegionSlice, src: &[u8]) -> Result<()> {
        self.transfers.upload(&self.exec, dst, src)
    }

    fn download(&self, src: &RegionSlice, dst: &mut [u8]) -> Result<()> {
        self.transfers.download(&self.exec, src, dst)
    }

    fn host_fallback(&self, dtype: DType) -> Option<String> {
        let feature = self.missing(dtype)?;
        let disabled = match feature {
            "shaderInt64" => self.opts.disable_int64,
            _ => self.opts.disable_float64,
        };
        let how = if disabled { " (disabled by DEVCCL_VULKAN_DISABLE)" } else { "" };
        Some(format!("vulkan:{} lacks {feature}{how}: {} reductions run on the host", self.index, dtype.short_name()))
    }

    fn stats(&self) -> DeviceStats {
        self.gpu.stats.snapshot()
    }

    /// A dedicated, device-local buffer allocated exportable (a dma-buf where the device
    /// exports those, else an opaque fd that can be mapped), counted as device memory.
    fn alloc_exportable(&self, len: usize) -> Result<(Region, Exported)> {
        let handle = self.gpu.export.handle()?;
        let region = memory::device_region(Buffer::exportable(&self.gpu, len as u64, handle)?, self.index);
        let exported = self.export(&region)?;
        Ok((region, exported))
    }

    /// A new descriptor for a buffer [`Device::alloc_exportable`] made (offset 0: each has its
    /// own memory); any other memory answers `Unsupported`.
    fn export(&self, region: &Region) -> Result<Exported> {
        self.gpu.export.handle()?;
        let o = self.operand(&region.full(), "exported region").map_err(|e| match e {
            Error::InvalidUsage(reason) => Error::Unsupported { reason },
            other => other,
        })?;
        let Some(fd) = o.buf.export_fd() else {
            return Err(Error::Unsupported {
                reason: format!(
                    "{}: this {:?} memory was not allocated exportable; allocate it with alloc_exportable",
                    self.gpu.name,
                    region.kind()
                ),
            });
        };
        let (fd, handle) = fd?;
        Ok(Exported { fd, offset: o.buf.fd_offset + o.off, fd_len: o.buf.fd_len, kind: handle.kind })
    }
}
