//! Regions over CUDA memory that callers own: foreign allocations (torch tensors, raw
//! `cuMemAlloc`), and scoped helpers for cudarc slices.

use std::any::Any;

use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DeviceRepr};
use devccl_core::device::Device;
use devccl_core::memory::{MemKind, Region};
use devccl_core::{Error, Result};

use super::device::CudaDevice;

/// A region over `len` bytes of device memory at device address `ptr` on `cuda:ordinal`
/// (allocated by anyone: torch, cudarc, `cuMemAlloc`). It carries no backend view: devccl's
/// kernels and copies work from the address alone.
///
/// # Safety
/// `ptr..ptr+len` must be device memory of `cuda:ordinal` (or memory it reaches at that
/// address, e.g. managed memory) that stays allocated until the region is revoked or its last
/// clone dropped (`keeper`, if any, is dropped then: use it to own the allocation), and nobody
/// may write it (or, when `writable`, access it) while devccl's queued work uses it.
pub unsafe fn region_from_device_ptr(
    ordinal: u32,
    ptr: u64,
    len: usize,
    writable: bool,
    keeper: Option<Box<dyn Any + Send>>,
) -> Region {
    let kind = MemKind::Cuda { device: ordinal as i32 };
    // SAFETY: forwarded contract; the CPU never dereferences a Cuda region's address.
    unsafe { Region::from_device(ptr as usize as *mut u8, len, kind, writable, keeper, None) }
}

/// The raw `CUstream` of a cudarc stream, for [`Device::queue_point`] and
/// [`devccl_core::device::QueueGate::hold`].
pub fn raw_stream_of(stream: &CudaStream) -> u64 {
    stream.cu_stream() as usize as u64
}

/// Run `f` with a read-only region over a cudarc slice. The slice must live in a device's
/// primary context (`CudaContext::new`, which is what devccl and torch use). Before `f` runs,
/// the host waits for the work the slice's stream had queued (whatever thread then runs
/// devccl's work sees the slice's contents); afterwards the slice's stream is ordered after
/// devccl's work, and the region is revoked when `f` returns.
pub fn with_slice<T: DeviceRepr, R>(s: &CudaSlice<T>, f: impl FnOnce(&Region) -> R) -> Result<R> {
    let stream = s.stream().clone();
    let dev = device_of(s.context())?;
    let (ptr, _record) = s.device_ptr(&stream);
    scoped(&dev, &stream, ptr, s.num_bytes(), false, f)
}

/// Like [`with_slice`], with a writable region.
pub fn with_slice_mut<T: DeviceRepr, R>(s: &mut CudaSlice<T>, f: impl FnOnce(&Region) -> R) -> Result<R> {
    let stream = s.stream().clone();
    let dev = device_of(s.context())?;
    let len = s.num_bytes();
    let (ptr, _record) = s.device_ptr_mut(&stream);
    scoped(&dev, &stream, ptr, len, true, f)
}

/// A writable region that owns a cudarc slice (for asynchronous and stream-ordered
/// collectives, whose memory must outlive the call: the region keeps the slice alive until
/// its last clone is gone). The slice must live in a device's primary context; the host waits
/// once for the work its stream had queued. Take the slice back with [`into_slice`].
pub fn region_owning<T: DeviceRepr + 'static>(mut s: CudaSlice<T>) -> Result<Region> {
    let stream = s.stream().clone();
    let dev = device_of(s.context())?;
    let len = s.num_bytes();
    let ptr = {
        let (ptr, _record) = s.device_ptr_mut(&stream);
        ptr
    };
    stream.synchronize().map_err(|e| dev.shared.ctx.err("cuStreamSynchronize", e))?;
    // SAFETY: the region owns the slice (its keeper), so the allocation lives as long as any
    // clone of the region; nobody else can reach the slice while the region has it.
    Ok(unsafe { region_from_device_ptr(dev.ordinal(), ptr, len, true, Some(Box::new(s))) })
}

/// The slice given to [`region_owning`], once no other clone of the region exists (no
/// collective still uses it); otherwise the region comes back.
pub fn into_slice<T: DeviceRepr + 'static>(r: Region) -> std::result::Result<CudaSlice<T>, Region> {
    r.into_keeper::<CudaSlice<T>>()
}

/// The devccl device whose primary context `ctx` is.
fn device_of(ctx: &CudaContext) -> Result<std::sync::Arc<CudaDevice>> {
    if !ctx.is_primary() {
        return Err(Error::usage(
            "the cudarc slice lives in a non-primary context; devccl works in each device's primary context \
             (create the context with CudaContext::new)",
        ));
    }
    let dev = super::open_cuda(ctx.ordinal() as u32)?;
    if dev.context().cu_ctx() != ctx.cu_ctx() {
        return Err(Error::usage(format!(
            "the cudarc slice's context is not the primary context of {}",
            dev.describe()
        )));
    }
    Ok(dev)
}

struct RevokeOnDrop(Region);

impl Drop for RevokeOnDrop {
    fn drop(&mut self) {
        self.0.revoke();
    }
}

fn scoped<R>(
    dev: &CudaDevice,
    stream: &CudaStream,
    ptr: u64,
    len: usize,
    writable: bool,
    f: impl FnOnce(&Region) -> R,
) -> Result<R> {
    let raw = raw_stream_of(stream);
    stream.synchronize().map_err(|e| dev.shared.ctx.err("cuStreamSynchronize", e))?;
    // SAFETY: the slice is borrowed for this whole call, so its memory outlives the region,
    // which is revoked before we return; a mutable borrow makes it the only writer.
    let region = unsafe { region_from_device_ptr(dev.ordinal(), ptr, len, writable, None) };
    let guard = RevokeOnDrop(region.clone());
    let out = f(&region);
    drop(guard);
    dev.order_stream_after_internal(raw)?;
    Ok(out)
}
