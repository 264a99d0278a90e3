//! Vulkan backend (placeholder until the backend lands).
use std::sync::Arc;

use devccl_core::{Error, Result};

/// Open Vulkan device `index`.
pub fn open(index: u32) -> Result<Arc<dyn devccl_core::device::Device>> {
    Err(Error::Unsupported { reason: format!("vulkan:{index}: the Vulkan backend is not built") })
}
