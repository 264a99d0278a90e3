//! TX bindings: memory sent from is exported once through its device
//! ([`Device::export`]) and bound for TX (`NETDEV_CMD_BIND_TX`) once per allocation, cached
//! by the allocation's identity (the region's device view), and unbound when the allocation
//! is gone (its view can no longer be upgraded). Sends then name the binding and offsets into
//! the exported descriptor.
//!
//! Memory that cannot be exported (host memory from the heap, device buffers not allocated
//! exportable) and every send after the kernel refused TX binding go as ordinary bytes: what
//! a real devmem socket does with host memory.

use std::any::Any;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

use devccl_core::device::{Device, Exported};
use devccl_core::memory::Region;

use super::counters::{self, Counters};
use crate::seam::{DevmemKernel, KernelBinding};

/// A TX binding and the descriptor it was made from (kept open while the binding lives).
#[derive(Debug)]
pub(crate) struct TxBinding {
    binding: Box<dyn KernelBinding>,
    _exported: Exported,
    counters: Arc<Counters>,
}

impl TxBinding {
    /// The binding id sends name.
    pub(crate) fn id(&self) -> u32 {
        self.binding.id()
    }
}

impl Drop for TxBinding {
    fn drop(&mut self) {
        counters::sub(&self.counters, |c| &c.tx_bindings, 1);
    }
}

/// How one region is sent.
#[derive(Debug, Clone)]
pub(crate) enum TxRoute {
    /// Zero-copy from the binding, the region starting at `offset` in its descriptor.
    Devmem { binding: Arc<TxBinding>, offset: u64 },
    /// As ordinary bytes (the reason, for the first log line).
    Bytes { why: Arc<str> },
}

#[derive(Debug)]
struct Entry {
    /// The allocation (region view); dead once the memory is gone.
    view: Weak<dyn Any + Send + Sync>,
    /// Bound, or why not.
    bound: Result<Arc<TxBinding>, Arc<str>>,
    /// Offsets in the descriptor of the regions seen over this allocation (by address).
    offsets: HashMap<usize, u64>,
}

/// The TX bindings of one transport.
#[derive(Debug)]
pub(crate) struct TxCache {
    kernel: Arc<dyn DevmemKernel>,
    ifindex: u32,
    counters: Arc<Counters>,
    /// Set once the kernel refused a TX bind: later sends do not ask again.
    refused: Mutex<Option<Arc<str>>>,
    entries: Mutex<HashMap<usize, Entry>>,
}

fn view_key(view: &Arc<dyn Any + Send + Sync>) -> usize {
    Arc::as_ptr(view).cast::<()>() as usize
}

impl TxCache {
    pub(crate) fn new(kernel: Arc<dyn DevmemKernel>, ifindex: u32, counters: Arc<Counters>) -> TxCache {
        TxCache { kernel, ifindex, counters, refused: Mutex::new(None), entries: Mutex::new(HashMap::new()) }
    }

    /// Why TX binding is off for this transport, once the kernel refused it.
    pub(crate) fn refused(&self) -> Option<Arc<str>> {
        lock(&self.refused).clone()
    }

    /// Remember that the kernel refuses TX binds (every send goes as ordinary bytes).
    pub(crate) fn refuse(&self, why: &str) {
        lock(&self.refused).get_or_insert_with(|| why.into());
    }

    /// Bindings alive.
    pub(crate) fn len(&self) -> usize {
        lock(&self.entries).values().filter(|e| e.bound.is_ok()).count()
    }

    /// Drop the bindings of allocations that are gone.
    pub(crate) fn purge(&self) {
        lock(&self.entries).retain(|_, e| e.view.strong_count() > 0);
    }

    /// How to send `region`, exported by `dev` (its own device, or the host).
    pub(crate) fn route(&self, dev: &dyn Device, region: &Region) -> TxRoute {
        if let Some(why) = self.refused() {
            return TxRoute::Bytes { why };
        }
        let Some(view) = region.device_view() else {
            return TxRoute::Bytes { why: "the memory is not behind a file descriptor (heap memory)".into() };
        };
        let key = view_key(view);
        let mut entries = lock(&self.entries);
        if entries.get(&key).is_some_and(|e| e.view.strong_count() == 0) {
            entries.remove(&key);
        }
        if !entries.contains_key(&key) {
            if entries.len() >= 64 {
                entries.retain(|_, e| e.view.strong_count() > 0);
            }
            let bound = self.bind(dev, region);
            entries.insert(key, Entry { view: Arc::downgrade(view), bound, offsets: HashMap::new() });
        }
        let e = entries.get_mut(&key).expect("inserted");
        let binding = match &e.bound {
            Ok(b) => b.clone(),
            Err(why) => return TxRoute::Bytes { why: why.clone() },
        };
        let offset = match e.offsets.get(&region.addr()) {
            Some(&o) => o,
            None => match dev.export(region) {
                Ok(x) => {
                    e.offsets.insert(region.addr(), x.offset);
                    x.offset
                }
                Err(err) => return TxRoute::Bytes { why: format!("export failed: {err}").into() },
            },
        };
        TxRoute::Devmem { binding, offset }
    }

    /// Export `region`'s allocation and bind it for TX.
    fn bind(&self, dev: &dyn Device, region: &Region) -> Result<Arc<TxBinding>, Arc<str>> {
        let exported = dev.export(region).map_err(|e| Arc::<str>::from(format!("{}: {e}", dev.describe())))?;
        match self.kernel.bind_tx(self.ifindex, std::os::fd::AsFd::as_fd(&exported.fd)) {
            Ok(binding) => {
                counters::add(&self.counters, |c| &c.tx_bindings, 1);
                tracing::debug!(id = binding.id(), bytes = exported.fd_len, device = %dev.describe(), "devmem TX binding");
                Ok(Arc::new(TxBinding { binding, _exported: exported, counters: self.counters.clone() }))
            }
            Err(e) => {
                counters::add(&self.counters, |c| &c.tx_bind_refusals, 1);
                let why: Arc<str> = format!("the {} kernel refused bind-tx: {e}", self.kernel.name()).into();
                tracing::info!("devmem TX: {why}; sends go as ordinary bytes on the same sockets");
                self.refuse(&why);
                Err(why)
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
