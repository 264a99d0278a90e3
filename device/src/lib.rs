//! devccl-device: the GPU backends of devccl's [`Device`] trait (DESIGN §4a).
//!
//! - [`cuda`] (feature `cuda`): CUDA GPUs through cudarc's driver API, kernels compiled once
//!   per process by NVRTC, the device's primary context (the one torch uses).
//! - [`vulkan`] (feature `vulkan`): Vulkan devices through ash, compute shaders written in
//!   WGSL and compiled to SPIR-V by naga at build time.
//!
//! [`open`] hands out one shared instance per device and process. Without a driver every
//! entry point answers [`Error::Unsupported`] with the reason (never a panic), and the reason
//! is logged once.
//!
//! `unsafe` code lives in this crate's backend modules only; each block says why it is sound.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

pub use devccl_core::device::{Device, DeviceStats, Fence, Pending, QueueGate, QueuePoint, ReduceArgs, Scattered};
pub use devccl_core::memory::DeviceId;
use devccl_core::memory::MemKind;
use devccl_core::{Error, Result};

pub mod cuda;
pub mod vulkan;

type Opened = std::result::Result<Arc<dyn Device>, String>;

fn registry() -> &'static Mutex<HashMap<DeviceId, Opened>> {
    static R: OnceLock<Mutex<HashMap<DeviceId, Opened>>> = OnceLock::new();
    R.get_or_init(Default::default)
}

/// The process's instance of device `id` (opened on first use). A device that cannot be
/// opened answers the same [`Error::Unsupported`] every time; the reason is logged once.
pub fn open(id: DeviceId) -> Result<Arc<dyn Device>> {
    if id.is_host() {
        return Ok(devccl_core::device::host());
    }
    let mut reg = registry().lock().unwrap_or_else(|e| e.into_inner());
    if let Some(r) = reg.get(&id) {
        return r.clone().map_err(|reason| Error::Unsupported { reason });
    }
    let r: Result<Arc<dyn Device>> = match id {
        DeviceId::Host => unreachable!("handled above"),
        DeviceId::Cuda(ordinal) => cuda::open(ordinal),
        DeviceId::Vulkan(index) => vulkan::open(index),
    };
    let entry = match r {
        Ok(d) => {
            tracing::info!(device = %d.describe(), "device opened");
            Ok(d)
        }
        Err(e) => {
            let reason = match e {
                Error::Unsupported { reason } => reason,
                other => other.to_string(),
            };
            tracing::warn!("{id}: {reason}");
            Err(reason)
        }
    };
    reg.insert(id, entry.clone());
    entry.map_err(|reason| Error::Unsupported { reason })
}

/// The device that computes on memory of `kind`.
pub fn for_kind(kind: &MemKind) -> Result<Arc<dyn Device>> {
    let id = kind.device().ok_or_else(|| {
        Error::usage(format!("{kind:?} memory has no compute device; pass host, CUDA or Vulkan memory"))
    })?;
    open(id)
}
