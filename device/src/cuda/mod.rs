//! CUDA backend (placeholder until the backend lands).
use std::sync::Arc;

use devccl_core::{Error, Result};

/// Open CUDA device `ordinal`.
pub fn open(ordinal: u32) -> Result<Arc<dyn devccl_core::device::Device>> {
    Err(Error::Unsupported { reason: format!("cuda:{ordinal}: the CUDA backend is not built") })
}
