//! The RX pool: one exportable allocation on the pool's device, bound once to the NIC's RX
//! queues for the transport's life (one per process, NIC and communicator), shared by all of
//! its connections. The kernel places received payload in it; the transport tracks how much
//! of it the application holds (fragments handed out, tokens not yet returned) to tell a
//! pool that is full from a peer that is slow.
//!
//! Spill buffers: bytes that did not land in the pool (linear spills, unsteered flows) are
//! copied into host memory the pool's device reads directly (its staging memory), kept in a
//! small cache by size.

use std::os::fd::AsFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use devccl_core::device::{Device, ExportKind, Exported};
use devccl_core::memory::{DeviceId, Region};
use devccl_core::{Error, Result};

use super::Refusal;
use crate::probe::{self, FdKind, Verdict};
use crate::seam::{DevmemKernel, KernelBinding};

/// What `device` exports, for messages: a dma-buf, or why a real kernel cannot bind it.
pub(crate) fn export_note(kind: ExportKind, device: &dyn Device) -> String {
    match kind {
        ExportKind::DmaBuf => "a dma-buf".into(),
        ExportKind::Mappable if device.id().is_host() => {
            "no real dma-buf: host memory exports a memfd (no /dev/udmabuf on this machine)".into()
        }
        ExportKind::Mappable => format!("no real dma-buf: {} exports a mappable fd, not a dma-buf", device.describe()),
    }
}

/// Identity of a pool in the process: (kernel, interface, queues, device).
type PoolKey = (usize, u32, Vec<u32>, DeviceId);

/// The pools bound in this process. A queue is bound once (the kernel refuses a second
/// memory provider), so every transport of the process on that NIC and those queues shares
/// one pool; it is unbound when the last of them goes.
fn pools() -> &'static Mutex<Vec<(PoolKey, Weak<RxPool>)>> {
    static POOLS: Mutex<Vec<(PoolKey, Weak<RxPool>)>> = Mutex::new(Vec::new());
    &POOLS
}

/// The process's pool for `queues` of `ifname` on `dev`: the one already bound, or a new
/// exportable allocation of `bytes` bound now. A refusal carries the kernel's answer,
/// classified by the probe.
pub(crate) fn bind(
    kernel: &Arc<dyn DevmemKernel>,
    dev: &Arc<dyn Device>,
    bytes: usize,
    ifname: &str,
    ifindex: u32,
    queues: &[u32],
) -> std::result::Result<Arc<RxPool>, Refusal> {
    let key: PoolKey = (Arc::as_ptr(kernel).cast::<()>() as usize, ifindex, queues.to_vec(), dev.id());
    let mut g = pools().lock().unwrap_or_else(|e| e.into_inner());
    g.retain(|(_, w)| w.strong_count() > 0);
    if let Some(p) = g.iter().find(|(k, _)| *k == key).and_then(|(_, w)| w.upgrade()) {
        if p.len() != bytes {
            tracing::debug!(have = p.len(), asked = bytes, "devmem: sharing the process's RX pool as it is");
        }
        return Ok(p);
    }
    let refuse = |verdict, reason: String| Refusal { verdict, reason };
    let (region, exported) = dev.alloc_exportable(bytes).map_err(|e| {
        refuse(
            Some(Verdict::NoDmabufSource),
            format!("devmem: the {bytes}-byte RX pool on {} cannot be exported: {e}", dev.describe()),
        )
    })?;
    let note = export_note(exported.kind, &**dev);
    let outside = outside_of(&exported, region.len()).map_err(|e| {
        refuse(None, format!("devmem: the RX pool's descriptor on {} cannot be mapped: {e}", dev.describe()))
    })?;
    let binding = match kernel.bind_rx(ifindex, exported.fd.as_fd(), queues) {
        Ok(b) => b,
        Err(e) => {
            let fd = if exported.kind == ExportKind::DmaBuf { FdKind::Dmabuf } else { FdKind::Placeholder };
            let res: std::result::Result<u32, crate::Error> = Err(e);
            let verdict = probe::classify_bind_rx(&res, fd);
            let Err(e) = res else { unreachable!("an error") };
            // The driver checks passed but the memory is not a dma-buf: nothing to bind.
            let verdict = if verdict == Verdict::Usable { Verdict::NoDmabufSource } else { verdict };
            let what = format!(
                "devmem ({} kernel): bind-rx of the {} MiB RX pool on {} ({note}) to {ifname} queue(s) {queues:?}: {e}",
                kernel.name(),
                bytes >> 20,
                dev.describe(),
            );
            // What TX would have said, for the record (bind-tx needs no queue and no privilege).
            let tx = match kernel.bind_tx(ifindex, exported.fd.as_fd()) {
                Ok(b) => format!("bind-tx bound (id {}) and released", b.id()),
                Err(e) => {
                    let res: std::result::Result<u32, crate::Error> = Err(e);
                    let v = probe::classify_bind_tx(&res, fd);
                    let Err(e) = res else { unreachable!("an error") };
                    format!("bind-tx: {e} -> {v}")
                }
            };
            let reason = format!(
                "{what} -> {verdict}: {} [{tx}] (fix: {})",
                verdict.reason().replace("<if>", ifname),
                verdict.fix().replace("<if>", ifname)
            );
            return Err(refuse(Some(verdict), reason));
        }
    };
    let p = Arc::new(RxPool::new(
        region,
        dev.clone(),
        binding,
        exported,
        outside,
        ifname.to_owned(),
        ifindex,
        queues.to_vec(),
    ));
    g.push((key, Arc::downgrade(&p)));
    Ok(p)
}

/// The bytes of the exported descriptor around the pool region, when the descriptor is
/// larger than the region (lavapipe's opaque fds: its allocator's header page comes first).
/// The kernel may place fragments anywhere in what it was given; those outside the region
/// are read through this host mapping (copied like spills, their tokens returned at once),
/// and the bytes that were there are put back once the binding is gone.
#[derive(Debug)]
pub(crate) struct Outside {
    /// A host mapping of the whole descriptor.
    pub(crate) view: Region,
    /// What was before and after the region when the pool was bound.
    saved: Vec<(usize, Vec<u8>)>,
}

/// A mapping of what lies around the region in its descriptor, if anything does.
fn outside_of(e: &Exported, len: usize) -> Result<Option<Outside>> {
    let (start, end) = (e.offset as usize, e.offset as usize + len);
    if start == 0 && e.fd_len as usize <= end {
        return Ok(None);
    }
    let view = devccl_core::memory::fd::map_fd(e.fd.as_fd(), 0, e.fd_len as usize, true)?;
    let mut saved = Vec::new();
    for r in [0..start, end..e.fd_len as usize] {
        if !r.is_empty() {
            saved.push((r.start, view.slice(r).to_vec()?));
        }
    }
    tracing::debug!(offset = start, len, fd_len = e.fd_len, "devmem RX pool: the descriptor is larger than the region");
    Ok(Some(Outside { view, saved }))
}

impl Drop for RxPool {
    fn drop(&mut self) {
        // Unbind, then put back what the NIC may have overwritten around the region, then
        // (the fields) close the descriptor and free the memory.
        drop(self.binding.take());
        if let Some(o) = &self.outside {
            for (at, bytes) in &o.saved {
                if let Err(e) = o.view.slice(*at..at + bytes.len()).with_bytes_mut(|b| b.copy_from_slice(bytes)) {
                    tracing::warn!("devmem RX pool: restoring {} bytes at {at} of its descriptor: {e}", bytes.len());
                }
            }
        }
    }
}

/// The RX pool of a transport.
#[derive(Debug)]
pub(crate) struct RxPool {
    /// The binding (dropped first, after every socket: connections hold the pool).
    binding: Option<Box<dyn KernelBinding>>,
    /// Where the region starts in the descriptor the kernel got, and how large that is.
    pub(crate) offset: u64,
    pub(crate) fd_len: u64,
    pub(crate) outside: Option<Outside>,
    /// The descriptor the binding was made from.
    pub(crate) exported: Exported,
    /// The pool's memory (the device's own kind).
    pub(crate) region: Region,
    /// The device that allocated it and gathers from it.
    pub(crate) device: Arc<dyn Device>,
    /// Interface and queues it is bound to.
    pub(crate) ifname: String,
    pub(crate) ifindex: u32,
    pub(crate) queues: Vec<u32>,
    /// Payload bytes of fragments the application holds (not yet returned).
    held: AtomicU64,
    spills: Mutex<Vec<Region>>,
}

impl RxPool {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        region: Region,
        device: Arc<dyn Device>,
        binding: Box<dyn KernelBinding>,
        exported: Exported,
        outside: Option<Outside>,
        ifname: String,
        ifindex: u32,
        queues: Vec<u32>,
    ) -> RxPool {
        RxPool {
            binding: Some(binding),
            offset: exported.offset,
            fd_len: exported.fd_len,
            outside,
            exported,
            region,
            device,
            ifname,
            ifindex,
            queues,
            held: AtomicU64::new(0),
            spills: Mutex::new(Vec::new()),
        }
    }

    /// Bytes in the pool.
    pub(crate) fn len(&self) -> usize {
        self.region.len()
    }

    /// The binding id fragments must carry.
    pub(crate) fn id(&self) -> u32 {
        self.binding.as_ref().map_or(0, |b| b.id())
    }

    /// Fragment bytes the application holds.
    pub(crate) fn held(&self) -> u64 {
        self.held.load(Ordering::Relaxed)
    }

    pub(crate) fn hold(&self, bytes: u64) {
        self.held.fetch_add(bytes, Ordering::Relaxed);
    }

    pub(crate) fn release(&self, bytes: u64) {
        self.held.fetch_sub(bytes, Ordering::Relaxed);
    }

    /// True when the application holds (nearly) the whole pool: the NIC then has no room for
    /// more payload until tokens come back. "Nearly": a pool is carved into 4 KiB buffers,
    /// partly filled ones count whole, and the kernel's own queues hold some.
    pub(crate) fn looks_full(&self) -> bool {
        let len = self.len() as u64;
        let slack = (len / 8).min(1 << 20);
        self.held() + slack >= len
    }

    /// A spill buffer of at least `len` bytes (host memory the pool's device reads).
    pub(crate) fn take_spill(&self, len: usize) -> Result<Region> {
        let mut g = self.spills.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = (0..g.len()).filter(|&i| g[i].len() >= len).min_by_key(|&i| g[i].len()) {
            return Ok(g.swap_remove(i));
        }
        drop(g);
        let len = len.max(4096);
        if self.device.id().is_host() {
            Ok(Region::alloc(len))
        } else {
            self.device.alloc_staging(len).map_err(|e| match e {
                Error::Unsupported { reason } => Error::Unsupported { reason: format!("spill buffer: {reason}") },
                other => other,
            })
        }
    }

    /// Give a spill buffer back (a few are kept).
    pub(crate) fn give_spill(&self, r: Region) {
        let mut g = self.spills.lock().unwrap_or_else(|e| e.into_inner());
        if g.len() < 16 {
            g.push(r);
        }
    }
}
