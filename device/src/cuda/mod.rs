//! CUDA backend of devccl's device layer (DESIGN §4a), through cudarc's driver API.
//!
//! - **Driver**: loaded at run time. Without `libcuda.so.1` every entry point answers
//!   [`devccl_core::Error::Unsupported`] `"no CUDA driver (libcuda.so.1 not found)"`, never a panic
//!   (cudarc panics when a library or symbol is missing, so presence is checked first and
//!   first calls run under a panic guard).
//! - **Context**: each device's *primary* context (the one torch and the CUDA runtime use),
//!   made current on whichever thread calls the driver, Drop impls included.
//! - **Kernels**: one header-free CUDA C source ([`SOURCE`]) compiled once per process and
//!   architecture by NVRTC to CUBIN for the device's own `sm_XY` (PTX fallback), loaded into
//!   a device on its first kernel. Results match the host device bit for bit: IEEE arithmetic
//!   with explicit rounding, no FMA contraction, no flush-to-zero, the host's conversions for
//!   f16/bf16/fp8 and the host's NaN rules.
//! - **Memory**: `alloc` is `cuMemAlloc` (regions of `MemKind::Cuda`, address = device
//!   address); `alloc_staging` is pinned, portable, device-mapped host memory (not
//!   write-combined) that kernels read directly ([`CudaStagingView`]). Operands may be this
//!   device's memory (devccl's or anyone's, see [`region_from_device_ptr`]), its staging, or
//!   host memory pinned for it by someone else. While a gate holds a caller's stream, frees
//!   (which may wait for the whole device) run on a helper thread, so they cannot deadlock the
//!   collective that will open the gate.
//! - **Dma-bufs** ([`dmabuf`]): `export` covers a region of this device's memory (devccl's or
//!   foreign) with whole 4 KiB pages of its allocation; `alloc_exportable` allocates such
//!   pages. Both need `CU_DEVICE_ATTRIBUTE_DMA_BUF_SUPPORTED`.
//! - **Asynchrony**: operations run on internal non-blocking streams (device→host,
//!   host→device, compute; one such set per calling thread, so one communicator's ordering
//!   waits never sit in front of another's work); each answers a fence (a pooled event) that
//!   the executor tests.
//! - **Stream ordering**: [`Device::queue_point`] and [`Device::queue_gate`] order devccl's work
//!   with the caller's streams like NCCL, without blocking the host.
//!
//! Environment: `DEVCCL_NVRTC_PATH` (NVRTC library or its directory, see [`preload_nvrtc`]),
//! `DEVCCL_CUDA_GATE_FALLBACK=1` (gates use host functions instead of stream memory ops).
//!
//! `unsafe` in this module: driver FFI (each block says why it is sound).

#[cfg(feature = "cuda")]
mod device;
pub mod dmabuf;
#[cfg(feature = "cuda")]
mod driver;
#[cfg(feature = "cuda")]
mod fence;
#[cfg(feature = "cuda")]
mod interop;
#[cfg(feature = "cuda")]
mod kernels;
#[cfg(feature = "cuda")]
mod memory;
#[cfg(feature = "cuda")]
pub mod nvrtc;
#[cfg(feature = "cuda")]
mod ordering;
pub mod plan;
#[cfg(feature = "cuda")]
mod streams;

use std::sync::Arc;

#[cfg(not(feature = "cuda"))]
use devccl_core::Error;
use devccl_core::Result;
use devccl_core::device::Device;

/// The kernel source (CUDA C, header-free).
pub const SOURCE: &str = include_str!("kernels.cu");

#[cfg(feature = "cuda")]
pub use cudarc;
#[cfg(feature = "cuda")]
pub use device::CudaDevice;
#[cfg(feature = "cuda")]
pub use interop::{into_slice, raw_stream_of, region_from_device_ptr, region_owning, with_slice, with_slice_mut};
#[cfg(feature = "cuda")]
pub use memory::{CudaMemView, CudaStagingView};
#[cfg(feature = "cuda")]
pub use nvrtc::{KernelImage, nvrtc_status, preload_nvrtc};
#[cfg(feature = "cuda")]
pub use ordering::FALLBACK_DEADLINE;

/// Open CUDA device `ordinal` as a [`Device`]: the process's one instance (the same as
/// [`open_cuda`] answers).
pub fn open(ordinal: u32) -> Result<Arc<dyn Device>> {
    #[cfg(feature = "cuda")]
    return open_cuda(ordinal).map(|d| d as Arc<dyn Device>);
    #[cfg(not(feature = "cuda"))]
    Err(Error::Unsupported { reason: format!("cuda:{ordinal}: devccl was built without its `cuda` feature") })
}

/// Open CUDA device `ordinal`: the process's one instance, opened on first use. A device that
/// cannot be opened answers the same [`devccl_core::Error::Unsupported`] every time.
#[cfg(feature = "cuda")]
pub fn open_cuda(ordinal: u32) -> Result<Arc<CudaDevice>> {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};
    type Opened = std::result::Result<Arc<CudaDevice>, String>;
    static DEVICES: OnceLock<Mutex<HashMap<u32, Opened>>> = OnceLock::new();
    let mut devices = DEVICES.get_or_init(Default::default).lock().unwrap_or_else(|e| e.into_inner());
    let entry = devices.entry(ordinal).or_insert_with(|| open_new(ordinal).map(Arc::new));
    entry.clone().map_err(|reason| devccl_core::Error::Unsupported { reason })
}

#[cfg(feature = "cuda")]
fn open_new(ordinal: u32) -> std::result::Result<CudaDevice, String> {
    let info = driver::driver()?;
    nvrtc::nvrtc_ready()?;
    driver::guard(|| CudaDevice::open_new(ordinal, info))
}

/// The CUDA driver's version and device count, or why there is no usable driver.
pub fn driver_status() -> std::result::Result<String, String> {
    #[cfg(feature = "cuda")]
    return driver::driver()
        .map(|d| format!("CUDA driver {} ({} device(s))", driver::version_text(d.version), d.devices));
    #[cfg(not(feature = "cuda"))]
    Err("devccl was built without its `cuda` feature".into())
}
