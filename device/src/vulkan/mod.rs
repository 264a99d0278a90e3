//! The Vulkan backend of devccl's [`Device`] trait (DESIGN §4a), through ash.
//!
//! - The loader (`libvulkan.so.1`) is loaded at run time; without it, or without a device,
//!   every entry point answers [`Error::Unsupported`] with the reason. The loader's own
//!   variables (`VK_ICD_FILENAMES`, `VK_DRIVER_FILES`) choose the drivers as usual.
//! - Memory: `alloc` makes a storage buffer in device-local memory (a region of kind
//!   `MemKind::Vulkan`, whose address is an opaque identity); `alloc_staging` makes
//!   host-visible, coherent, persistently mapped memory (a `Host` region the CPU and transports
//!   use directly, which shaders and copies bind as a buffer).
//! - Memory behind file descriptors (`export.rs`): `alloc_exportable` makes a dedicated buffer
//!   whose memory can be exported (`VK_KHR_external_memory_fd`): a dma-buf where the device
//!   exports `DMA_BUF_EXT`, else an `OPAQUE_FD` that the process can map, with the buffer's
//!   offset in it located when it is allocated.
//! - Every operation records one command buffer, submits it with a fence and answers
//!   [`Pending::Running`]; the fence is tested with vkGetFenceStatus. Copies and gathers are
//!   vkCmdCopyBuffer; reductions, the avg epilogue and the fused gather-and-reduce are compute
//!   shaders written in WGSL (`device/shaders/`), compiled to SPIR-V by naga at build time, one
//!   module per dtype, pipelines created on first use.
//! - Results are bit-identical to the host's (`devccl_core::op`): IEEE arithmetic with exact
//!   integer paths wherever the device may deviate (subnormals, special values, division).
//! - Dtypes whose shaders need a missing feature (shaderInt64: i64, u64; shaderFloat64 and
//!   shaderInt64: f64) are reduced on the host ([`Device::host_fallback`] says so).
//!   `DEVCCL_VULKAN_DISABLE=int64,float64` pretends those features are missing.
//!
//! `unsafe` code (Vulkan calls, mapped memory) lives in this module only; each block says why
//! it is sound.

#[cfg(feature = "vulkan")]
mod device;
#[cfg(feature = "vulkan")]
mod exec;
#[cfg(feature = "vulkan")]
mod export;
#[cfg(feature = "vulkan")]
mod fallback;
#[cfg(feature = "vulkan")]
mod instance;
#[cfg(feature = "vulkan")]
mod memory;
#[cfg(feature = "vulkan")]
mod ops;
#[cfg(feature = "vulkan")]
mod pipelines;
#[cfg(feature = "vulkan")]
mod plan;
#[cfg(feature = "vulkan")]
mod transfer;

#[cfg(feature = "vulkan")]
pub use device::{VulkanDevice, VulkanOptions, list, open, open_vulkan, open_with};
#[cfg(feature = "vulkan")]
pub use instance::VulkanFeatures;

/// Built without the `vulkan` feature: every device is unsupported.
#[cfg(not(feature = "vulkan"))]
pub fn open(index: u32) -> devccl_core::Result<std::sync::Arc<dyn devccl_core::device::Device>> {
    Err(devccl_core::Error::Unsupported {
        reason: format!("vulkan:{index}: devccl-device was built without the `vulkan` feature"),
    })
}
