//! [`CudaDevice`]: one GPU's primary context, its internal streams (a set of three per calling
//! thread, see `streams.rs`), the kernels, and the [`Device`] operations queued on them.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::{CudaContext, sys};
use devccl_core::device::{
    Device, DeviceStats, Exported, Pending, QueueGate, QueuePoint, ReduceArgs, Scattered, check_dst, check_fragments,
    check_gather_reduce, check_reduce,
};
use devccl_core::dtype::DType;
use devccl_core::memory::{DeviceId, MemKind, Region, RegionSlice};
use devccl_core::op::ReduceOp;
use devccl_core::{Error, Result};

use super::dmabuf;
use super::driver::{Ctx, DriverInfo, Event, Stream, describe, version_text};
use super::fence::CudaFence;
use super::kernels::Kernels;
use super::memory::{Counted, CudaStagingView, Freeable, TableBuf, TablePool, alloc_device, alloc_staging};
use super::nvrtc;
use super::ordering::{CudaQueueGate, CudaQueuePoint, GatePool};
use super::plan::{self, Launch};
use super::streams::{self, StreamSet, StreamSets};

/// The state every handle on one device shares (fences, keepers and gates hold an `Arc`).
#[derive(Debug)]
pub(crate) struct Shared {
    pub ordinal: u32,
    pub ctx: Ctx,
    pub name: String,
    pub cc: (u32, u32),
    pub sm_count: u32,
    pub driver_version: i32,
    pub stream_sets: StreamSets,
    pub stream_mem_ops: AtomicBool,
    pub force_gate_fallback: bool,
    pub gates: GatePool,
    pub tables: TablePool,
    events: Mutex<Vec<Event>>,
    kernels: OnceLock<std::result::Result<Kernels, (bool, String)>>,
    pub live_device: AtomicU64,
    pub live_staging: AtomicU64,
    pub ops: AtomicU64,
    /// Gates holding a caller's stream (held at least once, not yet open).
    pub holding: AtomicUsize,
    /// The thread that frees memory while gates hold streams (see `Shared::free`).
    pub reaper: OnceLock<std::sync::mpsc::Sender<(Freeable, usize, Counted)>>,
}

impl Shared {
    /// A pooled event (created when the pool is empty). The context must be current.
    pub fn event(&self) -> Result<Event> {
        if let Some(ev) = self.events.lock().unwrap_or_else(|e| e.into_inner()).pop() {
            return Ok(ev);
        }
        self.ctx.new_event()
    }

    /// Return an event whose recorded work nobody waits for any more.
    pub fn put_event(&self, ev: Event) {
        self.events.lock().unwrap_or_else(|e| e.into_inner()).push(ev);
    }

    /// The kernels, compiled (once per process and architecture) and loaded on first use.
    fn kernels(&self) -> Result<&Kernels> {
        let k = self.kernels.get_or_init(|| {
            let image = nvrtc::compile(self.cc.0, self.cc.1).map_err(|e| match e {
                Error::Unsupported { reason } => (true, reason),
                other => (false, other.to_string()),
            })?;
            self.ctx.bind().map_err(|e| (false, e.to_string()))?;
            let k = Kernels::load(&self.ctx.cu, &image).map_err(|e| (true, e))?;
            tracing::debug!(device = %self.ctx.label, from = k.from, "devccl CUDA kernels loaded");
            Ok(k)
        });
        k.as_ref().map_err(|(unsupported, reason)| {
            let reason = format!("{}: {reason}", self.ctx.label);
            if *unsupported { Error::Unsupported { reason } } else { Error::Internal(reason) }
        })
    }

    /// The device address of an operand, after checking it is live and reachable.
    fn addr(&self, s: &RegionSlice) -> Result<u64> {
        s.region.ensure_live()?;
        if s.range.end > s.region.len() {
            return Err(Error::Internal(format!("range {:?} outside a {}-byte region", s.range, s.region.len())));
        }
        let base = match s.region.kind() {
            MemKind::Cuda { device } if *device as u32 == self.ordinal => s.region.addr() as u64,
            MemKind::Cuda { device } => {
                return Err(Error::usage(format!(
                    "cuda:{device} memory handed to {} (devccl does not copy between GPUs)",
                    self.ctx.label
                )));
            }
            MemKind::Host => self.host_addr(&s.region)?,
            other => {
                return Err(Error::Unsupported { reason: format!("{} cannot reach {other:?} memory", self.ctx.label) });
            }
        };
        Ok(base + s.range.start as u64)
    }

    /// Host memory: this device's staging, or memory pinned for it by someone else.
    fn host_addr(&self, r: &Region) -> Result<u64> {
        let view = r.device_view().and_then(|v| v.as_ref().downcast_ref::<CudaStagingView>());
        if let Some(v) = view.filter(|v| v.ordinal == self.ordinal) {
            return Ok(v.device_ptr);
        }
        self.ctx.bind()?;
        let addr = r.addr() as u64;
        let mut dev: sys::CUdeviceptr = 0;
        let attr = sys::CUpointer_attribute_enum::CU_POINTER_ATTRIBUTE_DEVICE_POINTER;
        // SAFETY: an out-pointer to a local of the attribute's type (CUdeviceptr); the
        // address is only looked up, never dereferenced.
        let res = unsafe { sys::cuPointerGetAttribute((&mut dev as *mut u64).cast(), attr, addr) };
        res.result().map_err(|e| {
            Error::usage(format!(
                "host memory at {addr:#x} is not pinned for {} ({}): use its alloc_staging, or register the memory \
                 with cuMemHostRegister",
                self.ctx.label,
                describe(e)
            ))
        })?;
        Ok(dev)
    }

    /// Queue work with `enqueue` on `stream` and answer a fence recorded after it.
    fn submit(
        self: &Arc<Self>,
        stream: Stream,
        keep: Vec<Region>,
        table: Option<TableBuf>,
        what: &'static str,
        enqueue: impl FnOnce() -> Result<()>,
    ) -> Result<Pending> {
        self.ctx.bind()?;
        let ev = self.event()?;
        if let Err(e) = enqueue() {
            self.put_event(ev);
            return Err(e);
        }
        if let Err(e) = self.ctx.record(ev, stream) {
            // The work is queued but has no fence: wait for it before its memory may go.
            let _ = self.ctx.sync_stream(stream);
            self.put_event(ev);
            return Err(e);
        }
        self.ops.fetch_add(1, Ordering::Relaxed);
        Ok(Pending::Running(Box::new(CudaFence::new(self.clone(), ev, keep, table, what))))
    }

    /// Launch a planned kernel on the compute stream.
    fn launch(self: &Arc<Self>, l: Launch, keep: Vec<Region>, what: &'static str) -> Result<Pending> {
        let kernels = self.kernels()?;
        let table = if l.table.is_empty() { None } else { Some(TableBuf::new(self, &l.table)?) };
        let table_ptr = table.as_ref().map_or(0, TableBuf::device_ptr);
        let stream = streams::for_this_thread(self)?.compute;
        self.submit(stream, keep, table, what, || kernels.launch(&self.ctx, stream, &l, table_ptr))
    }

    /// Block until `ev`, recorded now on `stream`, passed.
    fn wait_here(&self, stream: Stream) -> Result<()> {
        let ev = self.event()?;
        let r = self.ctx.record(ev, stream).and_then(|()| self.ctx.sync_event(ev));
        self.put_event(ev);
        r
    }
}

/// One CUDA GPU as a devccl [`Device`]: its primary context (the one torch uses), devccl's
/// kernels, and internal streams (three per calling thread). Get it with [`super::open_cuda`].
#[derive(Debug, Clone)]
pub struct CudaDevice {
    pub(crate) shared: Arc<Shared>,
}

impl CudaDevice {
    /// Open device `ordinal` (callers go through the process-wide registry).
    pub(crate) fn open_new(ordinal: u32, info: DriverInfo) -> std::result::Result<CudaDevice, String> {
        if ordinal as i64 >= info.devices as i64 {
            return Err(format!("cuda:{ordinal}: no such device ({} CUDA device(s) visible)", info.devices));
        }
        let cu = CudaContext::new(ordinal as usize)
            .map_err(|e| format!("cuda:{ordinal}: cannot retain the primary context: {}", describe(e)))?;
        let name = cu.name().unwrap_or_else(|_| "CUDA device".into());
        let ctx = Ctx { cu, label: format!("cuda:{ordinal} {name}") };
        let shared = Shared::new(ordinal, ctx, name, info).map_err(|e| e.to_string())?;
        Ok(CudaDevice { shared: Arc::new(shared) })
    }

    /// The device ordinal.
    pub fn ordinal(&self) -> u32 {
        self.shared.ordinal
    }

    /// The device's name (`NVIDIA H200`).
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// Compute capability (`(9, 0)` for sm_90).
    pub fn compute_capability(&self) -> (u32, u32) {
        self.shared.cc
    }

    /// The primary context (shared with torch and any other user of the primary context).
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.shared.ctx.cu
    }

    /// Compile (once per process) and load the kernels now instead of at the first kernel;
    /// answers where they were loaded from (`cubin` or `ptx`).
    pub fn load_kernels(&self) -> Result<&'static str> {
        self.shared.kernels().map(|k| k.from)
    }

    /// True when gates wait with stream memory operations (false: host-function fallback).
    pub fn gates_use_stream_memory_ops(&self) -> bool {
        self.shared.stream_mem_ops.load(Ordering::Relaxed) && !self.shared.force_gate_fallback
    }

    /// A gate that always uses the host-function fallback (tests; drivers without stream
    /// memory operations get it anyway).
    pub fn queue_gate_host_fallback(&self) -> Result<Arc<dyn QueueGate>> {
        Ok(Arc::new(CudaQueueGate::new(&self.shared, true)?))
    }

    /// Make the caller's raw stream `stream` wait for everything queued so far on devccl's
    /// internal streams (never blocks the host).
    pub fn order_stream_after_internal(&self, stream: u64) -> Result<()> {
        let s = &self.shared;
        s.ctx.bind()?;
        for internal in s.stream_sets.every().iter().flat_map(|set| set.all()) {
            let ev = s.event()?;
            let r = s.ctx.record(ev, internal).and_then(|()| s.ctx.wait_event(Stream::from_raw(stream), ev));
            s.put_event(ev);
            r?;
        }
        Ok(())
    }

    /// `Ok` when the device can export dma-bufs (`CU_DEVICE_ATTRIBUTE_DMA_BUF_SUPPORTED` = 1),
    /// else `Unsupported` saying what to load.
    pub fn dma_buf_supported(&self) -> Result<()> {
        dmabuf::check_supported(&self.shared)
    }

    /// Export `[start, start + len)` of this device's memory (whole 4 KiB pages of one
    /// allocation; see [`super::dmabuf::cover`] for a region's) as a dma-buf: with the PCIe
    /// mapping flag, else with flags 0. The one copy of this logic in devccl: other users
    /// (the devmem transport's dma-buf sources) should call it.
    pub fn export_range(&self, start: u64, len: u64) -> Result<(std::os::fd::OwnedFd, dmabuf::ExportFlags)> {
        dmabuf::check_supported(&self.shared)?;
        dmabuf::export_range(&self.shared, start, len)
    }

    /// Block until everything queued on devccl's internal streams finished.
    pub fn synchronize(&self) -> Result<()> {
        self.shared.ctx.bind()?;
        let sets = self.shared.stream_sets.every();
        sets.iter().flat_map(|set| set.all()).try_for_each(|s| self.shared.ctx.sync_stream(s))
    }

    fn copy_stream(&self, dst: &RegionSlice, src: &RegionSlice) -> Result<Stream> {
        let s = streams::for_this_thread(&self.shared)?;
        Ok(match (dst.region.kind().is_host(), src.region.kind().is_host()) {
            (true, false) => s.d2h,
            (false, false) => s.compute,
            _ => s.h2d,
        })
    }

    fn reduce_launch(&self, r: &ReduceArgs<'_>) -> Result<Launch> {
        let s = &self.shared;
        let (d, a, b) = (s.addr(r.dst)?, s.addr(r.a)?, s.addr(r.b)?);
        Ok(plan::reduce(r.dtype, r.op, r.finish, d, a, b, r.dst.len(), s.sm_count))
    }
}

impl Shared {
    fn new(ordinal: u32, ctx: Ctx, name: String, info: DriverInfo) -> Result<Shared> {
        use sys::CUdevice_attribute_enum as A;
        ctx.bind()?;
        let major = ctx.attribute(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)? as u32;
        let minor = ctx.attribute(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)? as u32;
        let sm_count = ctx.attribute(A::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?.max(1) as u32;
        if ctx.attribute(A::CU_DEVICE_ATTRIBUTE_UNIFIED_ADDRESSING)? != 1 {
            return Err(Error::Unsupported { reason: format!("{}: no unified addressing", ctx.label) });
        }
        // Stream memory operations are always there since CUDA 12; before, an attribute says.
        let mem_ops = info.version >= 12000 || ctx.attribute(A::CU_DEVICE_ATTRIBUTE_CAN_USE_STREAM_MEM_OPS_V1)? == 1;
        let first = Arc::new(StreamSet::new(&ctx)?);
        let force_gate_fallback = devccl_core::config::DeviceConfig::from_env()?.cuda_gate_fallback;
        Ok(Shared {
            ordinal,
            ctx,
            name,
            cc: (major, minor),
            sm_count,
            driver_version: info.version,
            stream_sets: StreamSets::with(first),
            stream_mem_ops: AtomicBool::new(mem_ops),
            force_gate_fallback,
            gates: GatePool::default(),
            tables: TablePool::default(),
            events: Mutex::default(),
            kernels: OnceLock::new(),
            live_device: AtomicU64::new(0),
            live_staging: AtomicU64::new(0),
            ops: AtomicU64::new(0),
            holding: AtomicUsize::new(0),
            reaper: OnceLock::new(),
        })
    }
}

fn len_mismatch(what: &str, got: usize, want: usize) -> Error {
    Error::usage(format!("{what} of {got} bytes into {want}"))
}

impl Device for CudaDevice {
    fn id(&self) -> DeviceId {
        DeviceId::Cuda(self.shared.ordinal)
    }

    fn describe(&self) -> String {
        let s = &self.shared;
        format!("{} (sm_{}{}, driver {})", s.ctx.label, s.cc.0, s.cc.1, version_text(s.driver_version))
    }

    fn alloc(&self, len: usize) -> Result<Region> {
        alloc_device(&self.shared, len)
    }

    fn alloc_staging(&self, len: usize) -> Result<Region> {
        alloc_staging(&self.shared, len)
    }

    fn copy(&self, dst: &RegionSlice, src: &RegionSlice) -> Result<Pending> {
        if dst.len() != src.len() {
            return Err(Error::Internal(format!("copy: {} bytes into {}", src.len(), dst.len())));
        }
        if dst.is_empty() || dst.same_as(src) {
            return Ok(Pending::Done);
        }
        check_dst(dst, &[src], None)?;
        let s = &self.shared;
        let (d, sp, len) = (s.addr(dst)?, s.addr(src)?, dst.len());
        let stream = self.copy_stream(dst, src)?;
        let keep = vec![dst.region.clone(), src.region.clone()];
        s.submit(stream, keep, None, "copy", || {
            // SAFETY: both ranges are live memory this device reaches (checked by `addr`),
            // disjoint (checked above), and kept alive by the fence until the copy finished.
            s.ctx.check("cuMemcpyAsync", unsafe { sys::cuMemcpyAsync(d, sp, len, stream.0) })
        })
    }

    fn reduce(&self, r: ReduceArgs<'_>) -> Result<Pending> {
        check_reduce(&r)?;
        if r.dst.is_empty() {
            return Ok(Pending::Done);
        }
        let l = self.reduce_launch(&r)?;
        let keep = vec![r.dst.region.clone(), r.a.region.clone(), r.b.region.clone()];
        self.shared.launch(l, keep, "reduce")
    }

    fn finish_avg(&self, dtype: DType, dst: &RegionSlice, n: usize) -> Result<Pending> {
        if !dst.len().is_multiple_of(dtype.size()) {
            return Err(Error::Internal("finish_avg: partial element".into()));
        }
        if dst.is_empty() {
            return Ok(Pending::Done);
        }
        if !dst.region.writable() {
            return Err(Error::Internal("device operation into a read-only region".into()));
        }
        let s = &self.shared;
        match plan::finish_avg(dtype, s.addr(dst)?, dst.len(), n, s.sm_count) {
            Some(l) => s.launch(l, vec![dst.region.clone()], "finish_avg"),
            None => Ok(Pending::Done),
        }
    }

    fn gather(&self, dst: &RegionSlice, src: Scattered<'_>) -> Result<Pending> {
        let frags = check_fragments(dst.len(), &src)?;
        if src.pool.same(&dst.region) {
            return Err(Error::Internal("gather from the destination's own region".into()));
        }
        if !dst.region.writable() && !dst.is_empty() {
            return Err(Error::Internal("device operation into a read-only region".into()));
        }
        if dst.is_empty() {
            return Ok(Pending::Done);
        }
        let s = &self.shared;
        let (d, pool) = (s.addr(dst)?, s.addr(&src.pool.full())?);
        let l = plan::gather(d, pool, &frags, s.sm_count);
        s.launch(l, vec![dst.region.clone(), src.pool.clone()], "gather")
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
        if dst.is_empty() {
            return Ok(Pending::Done);
        }
        let s = &self.shared;
        let (d, b, pool) = (s.addr(dst)?, s.addr(base)?, s.addr(&src.pool.full())?);
        let l = plan::gather_reduce(dtype, op, finish, d, b, pool, &frags, s.sm_count);
        s.launch(l, vec![dst.region.clone(), base.region.clone(), src.pool.clone()], "gather_reduce")
    }

    fn upload(&self, dst: &RegionSlice, src: &[u8]) -> Result<()> {
        if dst.len() != src.len() {
            return Err(len_mismatch("upload", src.len(), dst.len()));
        }
        if dst.is_empty() {
            return Ok(());
        }
        if dst.region.kind().is_host() {
            return dst.with_bytes_mut(|d| d.copy_from_slice(src));
        }
        if !dst.region.writable() {
            return Err(Error::Internal("upload into a read-only region".into()));
        }
        let s = &self.shared;
        let d = s.addr(dst)?;
        s.ctx.bind()?;
        let stream = streams::for_this_thread(s)?.h2d;
        // SAFETY: `d..d+len` is live device memory of this device; `src` is borrowed until
        // the copy finished (we wait below before returning).
        let r = unsafe { sys::cuMemcpyHtoDAsync_v2(d, src.as_ptr().cast(), src.len(), stream.0) };
        s.ctx.check("cuMemcpyHtoDAsync", r)?;
        s.wait_here(stream)
    }

    fn download(&self, src: &RegionSlice, dst: &mut [u8]) -> Result<()> {
        if dst.len() != src.len() {
            return Err(len_mismatch("download", src.len(), dst.len()));
        }
        if dst.is_empty() {
            return Ok(());
        }
        if src.region.kind().is_host() {
            return src.with_bytes(|s| dst.copy_from_slice(s));
        }
        let s = &self.shared;
        let sp = s.addr(src)?;
        s.ctx.bind()?;
        let stream = streams::for_this_thread(s)?.d2h;
        // SAFETY: `sp..sp+len` is live device memory of this device; `dst` is exclusively
        // borrowed until the copy finished (we wait below before returning).
        let r = unsafe { sys::cuMemcpyDtoHAsync_v2(dst.as_mut_ptr().cast(), sp, dst.len(), stream.0) };
        s.ctx.check("cuMemcpyDtoHAsync", r)?;
        s.wait_here(stream)
    }

    fn stats(&self) -> DeviceStats {
        let s = &self.shared;
        DeviceStats {
            live_device_bytes: s.live_device.load(Ordering::Relaxed),
            live_staging_bytes: s.live_staging.load(Ordering::Relaxed),
            ops: s.ops.load(Ordering::Relaxed),
            host_fallbacks: 0,
        }
    }

    /// `cuMemAlloc` of whole pages at a page boundary, exported as a dma-buf (offset 0);
    /// `Unsupported` unless the device reports `CU_DEVICE_ATTRIBUTE_DMA_BUF_SUPPORTED` = 1.
    fn alloc_exportable(&self, len: usize) -> Result<(Region, Exported)> {
        dmabuf::alloc_exportable(&self.shared, len)
    }

    /// A dma-buf of the 4 KiB pages covering `region` (this device's memory, devccl's or a
    /// foreign allocation's), the region `offset` bytes in (see [`super::dmabuf::cover`]).
    fn export(&self, region: &Region) -> Result<Exported> {
        dmabuf::export_region(&self.shared, region)
    }

    fn queue_point(&self, queue: u64) -> Result<Box<dyn QueuePoint>> {
        Ok(Box::new(CudaQueuePoint::capture(&self.shared, Stream::from_raw(queue))?))
    }

    fn queue_gate(&self) -> Result<Arc<dyn QueueGate>> {
        Ok(Arc::new(CudaQueueGate::new(&self.shared, self.shared.force_gate_fallback)?))
    }
}
