//! Device and pinned host memory: the owners region keepers hold, the views that mark them,
//! and a small pool of pinned blocks for fragment tables.

use std::ffi::c_void;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use cudarc::driver::sys;
use devccl_core::Result;
use devccl_core::memory::{MemKind, Region};

use super::device::Shared;
use super::dmabuf;

/// The view attached to device memory devccl allocated on `cuda:N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CudaMemView {
    /// The device ordinal.
    pub ordinal: u32,
}

/// The view attached to staging memory: host memory pinned (page-locked, portable) and mapped
/// for `cuda:N`, which kernels read and write directly at `device_ptr` (UVA).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CudaStagingView {
    /// The device ordinal it was allocated for.
    pub ordinal: u32,
    /// Its address for the device.
    pub device_ptr: u64,
}

/// Owns a `cuMemAlloc` allocation; frees it (with the context current) when the region goes.
#[derive(Debug)]
pub(crate) struct DeviceAlloc {
    shared: Arc<Shared>,
    ptr: u64,
    len: usize,
}

impl Drop for DeviceAlloc {
    fn drop(&mut self) {
        // Every fence that used the memory held a clone of the region, so no queued work of
        // ours still touches it.
        self.shared.free(Freeable::Device(self.ptr), self.len, Counted::Device);
    }
}

/// Owns a `cuMemHostAlloc` allocation.
#[derive(Debug)]
pub(crate) struct PinnedAlloc {
    shared: Arc<Shared>,
    host: *mut c_void,
    len: usize,
}

// SAFETY: the pointer is only handed to the driver (to free it); the bytes themselves are
// reached through the owning region's lock.
unsafe impl Send for PinnedAlloc {}

impl Drop for PinnedAlloc {
    fn drop(&mut self) {
        self.shared.free(Freeable::Pinned(self.host), self.len, Counted::Staging);
    }
}

/// Memory to give back to the driver.
#[derive(Debug)]
pub(crate) enum Freeable {
    /// From cuMemAlloc.
    Device(u64),
    /// From cuMemHostAlloc.
    Pinned(*mut c_void),
}

// SAFETY: only the driver dereferences these pointers (to free them), from any thread.
unsafe impl Send for Freeable {}

/// Which live-bytes counter an allocation is in.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Counted {
    Device,
    Staging,
    Not,
}

impl Shared {
    /// Free memory nobody uses any more. `cuMemFree` and `cuMemFreeHost` may wait for the
    /// whole device; while a gate holds a caller's stream (until a collective, maybe this
    /// thread's, opens it) that wait could deadlock, so the free then happens on a helper
    /// thread instead.
    pub(crate) fn free(self: &Arc<Self>, what: Freeable, len: usize, counted: Counted) {
        if self.holding.load(Ordering::Acquire) == 0 {
            return free_now(self, what, len, counted);
        }
        let reaper = self.reaper.get_or_init(|| spawn_reaper(self));
        let job = (what, len, counted);
        if let Err(std::sync::mpsc::SendError((what, len, counted))) = reaper.send(job) {
            free_now(self, what, len, counted);
        }
    }
}

type FreeJob = (Freeable, usize, Counted);

fn spawn_reaper(shared: &Arc<Shared>) -> std::sync::mpsc::Sender<FreeJob> {
    let (tx, rx) = std::sync::mpsc::channel::<FreeJob>();
    let s = shared.clone();
    let spawned = std::thread::Builder::new().name(format!("devccl-cuda{}-free", shared.ordinal)).spawn(move || {
        for (what, len, counted) in rx {
            free_now(&s, what, len, counted);
        }
    });
    if let Err(e) = spawned {
        tracing::warn!("{}: no helper thread for frees ({e}); freeing inline", shared.ctx.label);
        return std::sync::mpsc::channel().0;
    }
    tx
}

fn free_now(shared: &Shared, what: Freeable, len: usize, counted: Counted) {
    let r = shared.ctx.bind().and_then(|()| match what {
        // SAFETY: the pointer came from cuMemAlloc, is freed exactly once, and is unused.
        Freeable::Device(p) => shared.ctx.check("cuMemFree", unsafe { sys::cuMemFree_v2(p) }),
        // SAFETY: the pointer came from cuMemHostAlloc, is freed exactly once, and is unused.
        Freeable::Pinned(p) => shared.ctx.check("cuMemFreeHost", unsafe { sys::cuMemFreeHost(p) }),
    });
    if let Err(e) = r {
        tracing::warn!("{}: freeing {len} bytes: {e}", shared.ctx.label);
    }
    match counted {
        Counted::Device => shared.live_device.fetch_sub(len as u64, Ordering::Relaxed),
        Counted::Staging => shared.live_staging.fetch_sub(len as u64, Ordering::Relaxed),
        Counted::Not => 0,
    };
}

/// Pinned, portable, device-mapped host memory (not write-combined: the CPU reads it too).
/// Returns the host pointer and the device address.
pub(crate) fn host_alloc(shared: &Shared, len: usize) -> Result<(*mut c_void, u64)> {
    shared.ctx.bind()?;
    let mut host: *mut c_void = std::ptr::null_mut();
    let flags = sys::CU_MEMHOSTALLOC_PORTABLE | sys::CU_MEMHOSTALLOC_DEVICEMAP;
    // SAFETY: an out-pointer to a local; the context is current.
    shared.ctx.check("cuMemHostAlloc", unsafe { sys::cuMemHostAlloc(&mut host, len, flags) })?;
    let mut dev: sys::CUdeviceptr = 0;
    // SAFETY: `host` was just allocated with DEVICEMAP; an out-pointer to a local.
    let r = unsafe { sys::cuMemHostGetDevicePointer_v2(&mut dev, host, 0) };
    if let Err(e) = shared.ctx.check("cuMemHostGetDevicePointer", r) {
        // SAFETY: freeing what we just allocated, unused.
        unsafe { sys::cuMemFreeHost(host) };
        return Err(e);
    }
    Ok((host, dev))
}

/// `len` bytes of device memory as a region of `MemKind::Cuda`.
pub(crate) fn alloc_device(shared: &Arc<Shared>, len: usize) -> Result<Region> {
    if len == 0 {
        let (kind, view) = device_kind(shared);
        // SAFETY: an empty region; its (dangling) address is never used.
        return Ok(unsafe { Region::from_device(std::ptr::null_mut(), 0, kind, true, None, view) });
    }
    let ptr = cu_alloc(shared, len)?;
    Ok(owned_region(shared, ptr, ptr, len))
}

/// `len` bytes of device memory at a page boundary with whole pages behind them (at least
/// one), which `cuMemGetHandleForAddressRange` can export in full: cuMemAlloc of the pages,
/// and of one page more where the driver's address was not page-aligned.
pub(crate) fn alloc_device_paged(shared: &Arc<Shared>, len: usize) -> Result<Region> {
    let need = dmabuf::alloc_size(len);
    let ptr = cu_alloc(shared, need as usize)?;
    if let Some(start) = dmabuf::aligned_start(ptr, need, need) {
        return Ok(owned_region(shared, ptr, start, len));
    }
    shared.free(Freeable::Device(ptr), 0, Counted::Not);
    let size = need + dmabuf::EXPORT_ALIGN;
    let ptr = cu_alloc(shared, size as usize)?;
    let start = dmabuf::aligned_start(ptr, size, need).expect("one spare page holds a page boundary");
    Ok(owned_region(shared, ptr, start, len))
}

fn device_kind(shared: &Shared) -> (MemKind, Option<Arc<dyn std::any::Any + Send + Sync>>) {
    let view = Arc::new(CudaMemView { ordinal: shared.ordinal }) as Arc<dyn std::any::Any + Send + Sync>;
    (MemKind::Cuda { device: shared.ordinal as i32 }, Some(view))
}

/// `cuMemAlloc` of `size` bytes (not yet counted or owned).
fn cu_alloc(shared: &Shared, size: usize) -> Result<u64> {
    shared.ctx.bind()?;
    let mut ptr: sys::CUdeviceptr = 0;
    // SAFETY: an out-pointer to a local; the context is current.
    shared.ctx.check("cuMemAlloc", unsafe { sys::cuMemAlloc_v2(&mut ptr, size) })?;
    Ok(ptr)
}

/// The region of `len` bytes at `start` inside the allocation at `ptr`, which it owns
/// (counted as `len` live device bytes).
fn owned_region(shared: &Arc<Shared>, ptr: u64, start: u64, len: usize) -> Region {
    shared.live_device.fetch_add(len as u64, Ordering::Relaxed);
    let keeper = DeviceAlloc { shared: shared.clone(), ptr, len };
    let (kind, view) = device_kind(shared);
    // SAFETY: `start..start+len` is device memory of the allocation the keeper owns, which
    // lives as long as the region; the CPU never dereferences a Cuda region's address.
    unsafe { Region::from_device(start as usize as *mut u8, len, kind, true, Some(Box::new(keeper)), view) }
}

/// `len` bytes of staging memory as a region of `MemKind::Host` with a [`CudaStagingView`].
pub(crate) fn alloc_staging(shared: &Arc<Shared>, len: usize) -> Result<Region> {
    if len == 0 {
        let view = Arc::new(CudaStagingView { ordinal: shared.ordinal, device_ptr: 0 });
        // SAFETY: an empty region; its (dangling) address is never used.
        return Ok(unsafe { Region::from_device(std::ptr::null_mut(), 0, MemKind::Host, true, None, Some(view)) });
    }
    let (host, dev) = host_alloc(shared, len)?;
    shared.live_staging.fetch_add(len as u64, Ordering::Relaxed);
    let keeper = PinnedAlloc { shared: shared.clone(), host, len };
    let view = Arc::new(CudaStagingView { ordinal: shared.ordinal, device_ptr: dev });
    // SAFETY: `host..host+len` is CPU-accessible pinned memory owned by the keeper for the
    // region's life; nobody else has the pointer.
    Ok(unsafe { Region::from_device(host.cast(), len, MemKind::Host, true, Some(Box::new(keeper)), Some(view)) })
}

/// A pinned block that holds one launch's fragment table (the kernel reads it over UVA).
#[derive(Debug)]
pub(crate) struct PinnedBlock {
    host: *mut u8,
    dev: u64,
    cap: usize,
}

// SAFETY: the block is owned by exactly one table buffer (or the pool) at a time.
unsafe impl Send for PinnedBlock {}

/// Pinned blocks by capacity, reused across launches (pinned allocations are slow).
#[derive(Debug, Default)]
pub(crate) struct TablePool {
    free: std::sync::Mutex<Vec<PinnedBlock>>,
}

/// Free blocks kept per device; more are released.
const POOL_KEEP: usize = 64;

impl TablePool {
    fn take(&self, len: usize) -> Option<PinnedBlock> {
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        let i = free.iter().position(|b| b.cap >= len)?;
        Some(free.swap_remove(i))
    }

    fn give(&self, shared: &Arc<Shared>, block: PinnedBlock) {
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        if free.len() < POOL_KEEP {
            free.push(block);
            return;
        }
        drop(free);
        shared.free(Freeable::Pinned(block.host.cast()), block.cap, Counted::Not);
    }
}

/// A fragment table in pinned memory, returned to the pool when dropped (fences drop it only
/// after the kernel that reads it finished).
#[derive(Debug)]
pub(crate) struct TableBuf {
    shared: Arc<Shared>,
    block: Option<PinnedBlock>,
}

impl TableBuf {
    /// A pinned copy of `bytes`.
    pub fn new(shared: &Arc<Shared>, bytes: &[u8]) -> Result<TableBuf> {
        let block = match shared.tables.take(bytes.len()) {
            Some(b) => b,
            None => {
                let cap = bytes.len().next_power_of_two().max(4096);
                let (host, dev) = host_alloc(shared, cap)?;
                PinnedBlock { host: host.cast(), dev, cap }
            }
        };
        // SAFETY: the block holds `cap >= bytes.len()` bytes and is owned by us alone; no
        // launch reads it until it is handed to one after this copy.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), block.host, bytes.len()) };
        Ok(TableBuf { shared: shared.clone(), block: Some(block) })
    }

    /// The table's device address.
    pub fn device_ptr(&self) -> u64 {
        self.block.as_ref().map_or(0, |b| b.dev)
    }
}

impl Drop for TableBuf {
    fn drop(&mut self) {
        if let Some(b) = self.block.take() {
            self.shared.tables.give(&self.shared, b);
        }
    }
}
