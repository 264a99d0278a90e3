//! Device memory behind file descriptors (`VK_KHR_external_memory_fd`, and
//! `VK_EXT_external_memory_dma_buf` where the driver has it): what the device can export,
//! checked once when it is opened, and the descriptors of exportable buffers.
//!
//! A dma-buf (`DMA_BUF_EXT`) is preferred: it is what a NIC binds. Otherwise an opaque fd
//! (`OPAQUE_FD`) serves the simulated kernel, which maps it: each exportable buffer is then
//! host-visible memory, and where its bytes lie in the descriptor is found when it is
//! allocated (lavapipe's opaque fds are memfds, `/memfd:llvmpipe memory fd`, with the
//! allocator's header in front of the bytes).

use std::ffi::{CStr, c_char};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};

use ash::vk;
use devccl_core::device::ExportKind;
use devccl_core::{Error, Result};

use super::VulkanOptions;
use super::instance::Instance;

/// The handle type exportable buffers are made with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Handle {
    /// `DMA_BUF_EXT` or `OPAQUE_FD`.
    pub(super) ty: vk::ExternalMemoryHandleTypeFlags,
    /// What the descriptor is to devccl.
    pub(super) kind: ExportKind,
    /// The driver exports this handle type only from dedicated allocations (devccl always makes
    /// dedicated ones for exportable buffers; kept for the record).
    pub(super) dedicated_only: bool,
}

impl Handle {
    fn name(&self) -> &'static str {
        if self.ty == vk::ExternalMemoryHandleTypeFlags::DMA_BUF_EXT { "DMA_BUF_EXT" } else { "OPAQUE_FD" }
    }
}

/// Usage every devccl buffer has (the export query must ask for exactly this).
pub(super) const USAGE: vk::BufferUsageFlags = vk::BufferUsageFlags::from_raw(
    vk::BufferUsageFlags::STORAGE_BUFFER.as_raw()
        | vk::BufferUsageFlags::TRANSFER_SRC.as_raw()
        | vk::BufferUsageFlags::TRANSFER_DST.as_raw(),
);

/// What a physical device offers, found before the logical device is created.
#[derive(Debug)]
pub(super) struct Probe {
    extensions: Vec<&'static CStr>,
    handle: std::result::Result<Handle, String>,
}

impl Probe {
    /// Look at `pd`'s extensions and exportable handle types (`name` for messages).
    pub(super) fn new(inst: &Instance, pd: vk::PhysicalDevice, name: &str, opts: &VulkanOptions) -> Probe {
        // SAFETY: `pd` came from this instance.
        let exts = unsafe { inst.raw.enumerate_device_extension_properties(pd) }.unwrap_or_default();
        let has = |n: &CStr| exts.iter().any(|e| e.extension_name_as_c_str() == Ok(n));
        let fd_ext = ash::khr::external_memory_fd::NAME;
        let dmabuf_ext = ash::ext::external_memory_dma_buf::NAME;
        if !has(fd_ext) || opts.disable_external_memory {
            let how = if opts.disable_external_memory { " (disabled by VulkanOptions)" } else { "" };
            let handle = Err(format!(
                "{name} lacks {}{how}: it cannot export memory through a file descriptor",
                fd_ext.to_string_lossy()
            ));
            return Probe { extensions: Vec::new(), handle };
        }
        let mut extensions = vec![fd_ext];
        let mut candidates = Vec::new();
        if has(dmabuf_ext) {
            extensions.push(dmabuf_ext);
            candidates.push((vk::ExternalMemoryHandleTypeFlags::DMA_BUF_EXT, ExportKind::DmaBuf));
        }
        candidates.push((vk::ExternalMemoryHandleTypeFlags::OPAQUE_FD, ExportKind::Mappable));
        let handle = candidates
            .into_iter()
            .find_map(|(ty, kind)| {
                let info = vk::PhysicalDeviceExternalBufferInfo::default().usage(USAGE).handle_type(ty);
                let mut props = vk::ExternalBufferProperties::default();
                // SAFETY: `pd` came from this instance, created for Vulkan 1.1 (where this query
                // is core); `props` is a valid output structure without extensions.
                unsafe { inst.raw.get_physical_device_external_buffer_properties(pd, &info, &mut props) };
                let features = props.external_memory_properties.external_memory_features;
                features.contains(vk::ExternalMemoryFeatureFlags::EXPORTABLE).then_some(Handle {
                    ty,
                    kind,
                    dedicated_only: features.contains(vk::ExternalMemoryFeatureFlags::DEDICATED_ONLY),
                })
            })
            .ok_or_else(|| {
                format!(
                    "{name} exports neither DMA_BUF_EXT nor OPAQUE_FD storage buffers \
                     (vkGetPhysicalDeviceExternalBufferProperties)"
                )
            });
        Probe { extensions, handle }
    }

    /// The device extensions to enable.
    pub(super) fn extension_names(&self) -> Vec<*const c_char> {
        self.extensions.iter().map(|e| e.as_ptr()).collect()
    }
}

/// A logical device's export support.
pub(super) struct Export {
    handle: std::result::Result<Handle, String>,
    /// `vkGetMemoryFdKHR` (with the extension only).
    api: Option<ash::khr::external_memory_fd::Device>,
}

impl std::fmt::Debug for Export {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Export").field("handle", &self.handle).finish_non_exhaustive()
    }
}

impl Export {
    /// Support of `dev`, created with the extensions `probe` asked for.
    pub(super) fn new(inst: &Instance, dev: &ash::Device, probe: Probe) -> Export {
        let api = probe.handle.is_ok().then(|| ash::khr::external_memory_fd::Device::new(&inst.raw, dev));
        if let Ok(h) = &probe.handle {
            tracing::debug!("exportable memory: {} (dedicated only: {})", h.name(), h.dedicated_only);
        }
        Export { handle: probe.handle, api }
    }

    /// The handle type, or why the device cannot export.
    pub(super) fn handle(&self) -> Result<Handle> {
        self.handle.clone().map_err(|reason| Error::Unsupported { reason })
    }

    /// `vkGetMemoryFdKHR` for `memory`, allocated exportable as `h`: a new descriptor.
    pub(super) fn memory_fd(&self, dev_name: &str, memory: vk::DeviceMemory, h: Handle) -> Result<OwnedFd> {
        let api =
            self.api.as_ref().ok_or_else(|| Error::Internal("export without VK_KHR_external_memory_fd".into()))?;
        let info = vk::MemoryGetFdInfoKHR::default().memory(memory).handle_type(h.ty);
        // SAFETY: `memory` is a live allocation of this device made with VkExportMemoryAllocateInfo
        // naming `h.ty`, and the extension was enabled (`api` exists only then).
        let fd = unsafe { api.get_memory_fd(&info) }
            .map_err(|e| Error::Device { device: dev_name.into(), message: format!("vkGetMemoryFdKHR: {e}") })?;
        if fd < 0 {
            return Err(Error::Device { device: dev_name.into(), message: format!("vkGetMemoryFdKHR gave fd {fd}") });
        }
        // SAFETY: vkGetMemoryFdKHR hands the caller a new descriptor to own.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    /// Where `memory` (`len` bytes, allocated exportable as `h`) lies in the descriptors it
    /// exports, and their size. A dma-buf of a dedicated allocation is that allocation. An
    /// opaque fd is the driver's business: it is useful only when the buffer's bytes can be
    /// found and mapped through it, which is checked here for each buffer (lavapipe's is a
    /// memfd whose first page holds its allocator's header: the bytes start one page in).
    pub(super) fn locate(
        &self,
        dev: &ash::Device,
        dev_name: &str,
        memory: vk::DeviceMemory,
        len: u64,
        h: Handle,
    ) -> Result<(u64, u64)> {
        let fd = self.memory_fd(dev_name, memory, h)?;
        if h.kind == ExportKind::DmaBuf {
            use std::io::Seek;
            let size = std::fs::File::from(fd).seek(std::io::SeekFrom::End(0));
            return Ok((0, size.unwrap_or(len)));
        }
        let what = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
            .map(|p| p.display().to_string())
            .unwrap_or_else(|_| "?".into());
        let unusable = |why: String| Error::Unsupported {
            reason: format!(
                "{dev_name} exports no dma-buf (VK_EXT_external_memory_dma_buf), and its OPAQUE_FD descriptors \
                 ({what}) cannot serve as mappable memory: {why}"
            ),
        };
        // SAFETY: host-visible memory (required for this handle type), not mapped by anyone
        // else; unmapped again below before anything else can map it.
        let p = unsafe { dev.map_memory(memory, 0, vk::WHOLE_SIZE, vk::MemoryMapFlags::empty()) }
            .map_err(|e| unusable(format!("vkMapMemory: {e}")))?;
        let at = devccl_core::memory::fd::mapped_offset(fd.as_fd(), p as usize);
        // SAFETY: mapped just above, and nothing kept the pointer.
        unsafe { dev.unmap_memory(memory) };
        let at = at.map_err(|e| unusable(format!("the buffer's host mapping is not a mapping of it ({e})")))?;
        devccl_core::memory::fd::map_fd(fd.as_fd(), at, len as usize, true)
            .map_err(|e| unusable(format!("{len} bytes at offset {at} cannot be mapped ({e})")))?;
        let fd_len = std::fs::File::from(fd).metadata().map(|m| m.len()).unwrap_or(at + len);
        tracing::trace!("{dev_name}: exportable buffer at offset {at} of {what} ({fd_len} bytes)");
        Ok((at, fd_len))
    }
}
