//! Fences: a pooled event recorded after an operation, tested without blocking. The fence
//! keeps the operation's regions (and its fragment table) alive until the work finished; a
//! fence dropped early waits for the work in its Drop, so no memory is freed under a kernel.

use std::fmt;
use std::sync::Arc;

use devccl_core::Result;
use devccl_core::device::Fence;
use devccl_core::memory::Region;

use super::device::Shared;
use super::driver::Event;
use super::memory::TableBuf;

/// Queued CUDA work.
pub(crate) struct CudaFence {
    shared: Arc<Shared>,
    event: Option<Event>,
    /// The operation's operands, alive until it finished.
    keep: Vec<Region>,
    /// The fragment table the kernel reads, if any.
    table: Option<TableBuf>,
    what: &'static str,
}

impl CudaFence {
    pub fn new(
        shared: Arc<Shared>,
        event: Event,
        keep: Vec<Region>,
        table: Option<TableBuf>,
        what: &'static str,
    ) -> Self {
        CudaFence { shared, event: Some(event), keep, table, what }
    }

    fn release(&mut self) {
        if let Some(ev) = self.event.take() {
            self.shared.put_event(ev);
        }
        self.keep.clear();
        self.table = None;
    }
}

impl fmt::Debug for CudaFence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CudaFence")
            .field("device", &self.shared.ctx.label)
            .field("what", &self.what)
            .field("done", &self.event.is_none())
            .finish()
    }
}

impl Fence for CudaFence {
    fn test(&mut self) -> Result<bool> {
        let Some(ev) = self.event else { return Ok(true) };
        self.shared.ctx.bind()?;
        if self.shared.ctx.query(ev)? {
            self.release();
            return Ok(true);
        }
        Ok(false)
    }
}

impl Drop for CudaFence {
    fn drop(&mut self) {
        let Some(ev) = self.event else { return };
        // Dropped before it finished (an error elsewhere): wait, so the memory it uses
        // outlives the work.
        let r = self.shared.ctx.bind().and_then(|()| self.shared.ctx.sync_event(ev));
        if let Err(e) = r {
            tracing::warn!("{}: waiting for an abandoned {}: {e}", self.shared.ctx.label, self.what);
        }
        self.release();
    }
}
