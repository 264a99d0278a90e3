//! Buffers: device-local memory, persistently mapped staging memory, and the regions that
//! hand them to devccl; recognising a region as this device's operand.

use std::any::Any;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use ash::vk;
use devccl_core::device::ExportKind;
use devccl_core::memory::{MemKind, Region, RegionSlice};
use devccl_core::{Error, Result};

use super::export::{Handle, USAGE};
use super::instance::Gpu;

/// What a buffer is for (and which counter it is reported under).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    /// Device-local memory handed out by `alloc` (and transient scratch): live_device_bytes.
    Device,
    /// Host-visible, mapped memory handed out by `alloc_staging`: live_staging_bytes.
    Staging,
    /// Host-visible, mapped memory the backend keeps for itself (transfers, fragment tables);
    /// not reported.
    Internal,
}

/// A VkBuffer with its own VkDeviceMemory, destroyed when the last reference drops (regions,
/// queued operations and the backend's pools hold `Arc<Buffer>`s).
pub(super) struct Buffer {
    pub(super) gpu: Arc<Gpu>,
    pub(super) raw: vk::Buffer,
    memory: vk::DeviceMemory,
    /// Size of the VkBuffer: the requested length rounded up to 16 bytes (at least 16), so
    /// every word-aligned binding window stays inside it; for exportable buffers, to whole
    /// pages (at least one).
    pub(super) size: u64,
    /// Where the buffer's bytes start in its exported descriptors, and their size.
    pub(super) fd_offset: u64,
    pub(super) fd_len: u64,
    /// Allocated exportable (a dedicated allocation with VkExportMemoryAllocateInfo).
    pub(super) export: Option<Handle>,
    /// The requested length (what the counters report).
    len: u64,
    kind: Kind,
    /// The mapped address (host-visible kinds), else 0.
    mapped: usize,
    /// Counted in the device's statistics (set once the buffer is complete).
    counted: bool,
}

impl fmt::Debug for Buffer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Buffer").field("raw", &self.raw).field("size", &self.size).field("kind", &self.kind).finish()
    }
}

impl Buffer {
    /// A buffer of `len` bytes (storage, transfer source and destination) of `kind`.
    pub(super) fn new(gpu: &Arc<Gpu>, len: u64, kind: Kind) -> Result<Arc<Buffer>> {
        Buffer::create(gpu, len, kind, None)
    }

    /// A device-local buffer of `len` bytes in its own memory, which can be exported as
    /// `handle` (counted as device memory).
    pub(super) fn exportable(gpu: &Arc<Gpu>, len: u64, handle: Handle) -> Result<Arc<Buffer>> {
        Buffer::create(gpu, len, Kind::Device, Some(handle))
    }

    fn create(gpu: &Arc<Gpu>, len: u64, kind: Kind, export: Option<Handle>) -> Result<Arc<Buffer>> {
        let size = match export {
            None => len.max(1).next_multiple_of(16),
            Some(_) => len.max(1).next_multiple_of(devccl_core::memory::fd::page_size() as u64),
        };
        if size > gpu.limits.max_alloc {
            return Err(Error::Device {
                device: gpu.name.clone(),
                message: format!(
                    "cannot allocate {len} bytes: the device's largest allocation (maxMemoryAllocationSize) is {} bytes",
                    gpu.limits.max_alloc
                ),
            });
        }
        let info = vk::BufferCreateInfo::default().size(size).usage(USAGE).sharing_mode(vk::SharingMode::EXCLUSIVE);
        let mut external = vk::ExternalMemoryBufferCreateInfo::default();
        let info = match export {
            Some(h) => {
                external = external.handle_types(h.ty);
                info.push_next(&mut external)
            }
            None => info,
        };
        // SAFETY: valid device and create info (the handle type, if any, was reported exportable
        // for this usage by vkGetPhysicalDeviceExternalBufferProperties).
        let raw = unsafe { gpu.dev.create_buffer(&info, None) }.map_err(|e| gpu.err("vkCreateBuffer", e))?;
        let mut buf = Buffer {
            gpu: gpu.clone(),
            raw,
            memory: vk::DeviceMemory::null(),
            size,
            fd_offset: 0,
            fd_len: 0,
            export,
            len,
            kind,
            mapped: 0,
            counted: false,
        };
        // On error `buf` drops and destroys what was made so far.
        buf.bind_memory()?;
        if let Some(h) = export {
            (buf.fd_offset, buf.fd_len) = gpu.export.locate(&gpu.dev, &gpu.name, buf.memory, buf.size, h)?;
        }
        buf.gpu.stats_add(kind, len as i64);
        buf.counted = true;
        Ok(Arc::new(buf))
    }

    fn bind_memory(&mut self) -> Result<()> {
        let gpu = self.gpu.clone();
        // SAFETY: `raw` is a buffer of this device.
        let req = unsafe { gpu.dev.get_buffer_memory_requirements(self.raw) };
        type F = vk::MemoryPropertyFlags;
        let ty = match (self.kind, self.export) {
            // The simulated kernel maps an opaque fd: the memory must be host-visible.
            (Kind::Device, Some(h)) if h.kind == ExportKind::Mappable => {
                gpu.mem.pick(req.memory_type_bits, F::HOST_VISIBLE | F::HOST_COHERENT, F::DEVICE_LOCAL)
            }
            (Kind::Device, _) => gpu.mem.pick(req.memory_type_bits, F::empty(), F::DEVICE_LOCAL),
            (Kind::Staging | Kind::Internal, _) => {
                gpu.mem.pick(req.memory_type_bits, F::HOST_VISIBLE | F::HOST_COHERENT, F::HOST_CACHED)
            }
        }
        .ok_or_else(|| Error::Device {
            device: gpu.name.clone(),
            message: match self.export {
                Some(h) if h.kind == ExportKind::Mappable => {
                    "no host-visible, coherent memory type for a buffer exported as a mappable OPAQUE_FD".into()
                }
                _ => format!("no memory type for a {:?} buffer", self.kind),
            },
        })?;
        let info = vk::MemoryAllocateInfo::default().allocation_size(req.size).memory_type_index(ty);
        let mut exported = vk::ExportMemoryAllocateInfo::default();
        let mut dedicated = vk::MemoryDedicatedAllocateInfo::default();
        let info = match self.export {
            // Always a dedicated allocation: some drivers export only those (DEDICATED_ONLY),
            // and an exported descriptor should hold this buffer's bytes and nothing else.
            Some(h) => {
                exported = exported.handle_types(h.ty);
                dedicated = dedicated.buffer(self.raw);
                info.push_next(&mut exported).push_next(&mut dedicated)
            }
            None => info,
        };
        // SAFETY: valid device and allocate info; a dedicated allocation names this buffer,
        // which has no memory bound yet.
        self.memory = unsafe { gpu.dev.allocate_memory(&info, None) }
            .map_err(|e| gpu.err(&format!("vkAllocateMemory of {} bytes", req.size), e))?;
        // SAFETY: buffer and memory belong to this device; the memory is fresh and large enough.
        unsafe { gpu.dev.bind_buffer_memory(self.raw, self.memory, 0) }
            .map_err(|e| gpu.err("vkBindBufferMemory", e))?;
        if self.kind != Kind::Device {
            // SAFETY: host-visible memory, mapped once for the buffer's life.
            let p = unsafe { gpu.dev.map_memory(self.memory, 0, vk::WHOLE_SIZE, vk::MemoryMapFlags::empty()) }
                .map_err(|e| gpu.err("vkMapMemory", e))?;
            self.mapped = p as usize;
        }
        Ok(())
    }

    /// The mapped address of a host-visible buffer.
    pub(super) fn mapped(&self) -> *mut u8 {
        debug_assert!(self.mapped != 0);
        self.mapped as *mut u8
    }

    /// A new descriptor for the memory of an exportable buffer, and its handle type; `None`
    /// for other buffers.
    pub(super) fn export_fd(&self) -> Option<Result<(std::os::fd::OwnedFd, Handle)>> {
        let h = self.export?;
        Some(self.gpu.export.memory_fd(&self.gpu.name, self.memory, h).map(|fd| (fd, h)))
    }
}

impl Gpu {
    fn stats_add(&self, kind: Kind, delta: i64) {
        let counter = match kind {
            Kind::Device => &self.stats.device_bytes,
            Kind::Staging => &self.stats.staging_bytes,
            Kind::Internal => return,
        };
        if delta >= 0 {
            counter.fetch_add(delta as u64, Ordering::Relaxed);
        } else {
            counter.fetch_sub(delta.unsigned_abs(), Ordering::Relaxed);
        }
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        // SAFETY: the last reference is gone: no region, queued operation or pool can use the
        // buffer any more (queued operations hold a reference until their fence signalled).
        unsafe {
            if self.mapped != 0 {
                self.gpu.dev.unmap_memory(self.memory);
            }
            self.gpu.dev.destroy_buffer(self.raw, None);
            if self.memory != vk::DeviceMemory::null() {
                self.gpu.dev.free_memory(self.memory, None);
            }
        }
        if self.counted {
            self.gpu.stats_add(self.kind, -(self.len as i64));
        }
    }
}

/// A unique, never dereferenced address for a device region (regions are ordered and told
/// apart by address), spaced by the buffer's size.
fn fake_address(size: u64) -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0x7e00_0000_0000);
    let step = (size as usize).next_multiple_of(1 << 16) + (1 << 16);
    NEXT.fetch_add(step, Ordering::Relaxed)
}

/// The region of a device-local buffer: kind `Vulkan { device }`, an opaque address, the
/// buffer as keeper and view.
pub(super) fn device_region(buf: Arc<Buffer>, index: u32) -> Region {
    let addr = fake_address(buf.size) as *mut u8;
    let len = buf.len as usize;
    let view: Arc<dyn Any + Send + Sync> = buf.clone();
    // SAFETY: `MemKind::Vulkan` memory is never dereferenced by the CPU (Region refuses CPU
    // access to non-host kinds); the address is only an identity. The keeper owns the buffer.
    unsafe { Region::from_device(addr, len, MemKind::Vulkan { device: index }, true, Some(Box::new(buf)), Some(view)) }
}

/// The region of a mapped staging buffer: kind `Host`, the mapped address, the buffer as
/// keeper and view (so operations can bind it).
pub(super) fn staging_region(buf: Arc<Buffer>) -> Region {
    let ptr = buf.mapped();
    let len = buf.len as usize;
    let view: Arc<dyn Any + Send + Sync> = buf.clone();
    // SAFETY: the memory is host-visible, coherent and mapped for `size >= len` bytes until the
    // buffer is destroyed, which the keeper (and every other Arc) delays until the region and
    // all operations on it are gone. The CPU reaches it only through the region's lock.
    unsafe { Region::from_device(ptr, len, MemKind::Host, true, Some(Box::new(buf)), Some(view)) }
}

/// A slice of this device's buffer: the buffer and the absolute byte range in it.
#[derive(Debug, Clone)]
pub(super) struct Operand {
    pub(super) buf: Arc<Buffer>,
    pub(super) off: u64,
    pub(super) len: u64,
}

impl Operand {
    /// True when the operand is host-visible (staging) memory.
    pub(super) fn is_mapped(&self) -> bool {
        self.buf.mapped != 0
    }
}

/// Recognise `s` as memory of device `gpu` (its buffers or its staging); anything else (plain
/// host memory, another device's memory) is refused with a usage error.
pub(super) fn operand(gpu: &Arc<Gpu>, s: &RegionSlice, what: &str) -> Result<Operand> {
    let r = &s.region;
    if s.range.start > s.range.end || s.range.end > r.len() {
        return Err(Error::Internal(format!("{what}: range {:?} outside a {}-byte region", s.range, r.len())));
    }
    let buf = r.device_view().and_then(|v| Arc::downcast::<Buffer>(v.clone()).ok());
    let Some(buf) = buf.filter(|b| Arc::ptr_eq(&b.gpu, gpu)) else {
        return Err(Error::usage(format!(
            "{}: the {what} is {:?} memory this device did not allocate; pass its own buffers (alloc) or its \
             staging memory (alloc_staging)",
            gpu.name,
            r.kind()
        )));
    };
    r.ensure_live()?;
    Ok(Operand { buf, off: s.range.start as u64, len: s.len() as u64 })
}
