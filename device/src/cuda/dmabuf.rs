//! CUDA device memory as dma-bufs (devmem-uapi §5.1): `cuMemGetHandleForAddressRange`
//! (`CU_MEM_RANGE_HANDLE_TYPE_DMA_BUF_FD`) over whole 4 KiB pages of one allocation.
//!
//! Facts (checked on the project's H100 box): the device must report
//! `CU_DEVICE_ATTRIBUTE_DMA_BUF_SUPPORTED` (NVIDIA's open GPU kernel modules); pointer and
//! size must be 4 KiB aligned and inside one `cuMemAlloc` allocation (sub-ranges work); the
//! PCIe mapping flag may be refused (`CUDA_ERROR_NOT_SUPPORTED` on driver 580), and flags 0
//! works then.
//!
//! A region is exported as the page-aligned cover of its bytes ([`cover`]), so any region
//! works whose cover stays inside its allocation: devccl's exportable allocations always
//! (whole pages at a page-aligned address), most others (large `cuMemAlloc` blocks are
//! 2 MiB aligned). The region then starts `offset` bytes into the dma-buf.
//!
//! The arithmetic is pure and tested without a GPU; the driver calls need the `cuda` feature.

use devccl_core::{Error, Result};

/// Alignment and granularity of an exported range (the host page).
pub const EXPORT_ALIGN: u64 = 4096;

/// Which `cuMemGetHandleForAddressRange` flags produced a dma-buf.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportFlags {
    /// `CU_MEM_RANGE_FLAG_DMA_BUF_MAPPING_TYPE_PCIE` (a forced PCIe BAR1 mapping).
    Pcie,
    /// Flags 0 (after the PCIe flag was refused).
    Default,
}

/// The range exported for a region: `len` bytes from the page-aligned `start`, the region
/// beginning `offset` bytes in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cover {
    /// Device address of the first exported byte (a multiple of [`EXPORT_ALIGN`]).
    pub start: u64,
    /// Exported bytes (a non-zero multiple of [`EXPORT_ALIGN`]).
    pub len: u64,
    /// Where the region starts inside the export.
    pub offset: u64,
}

/// The whole pages covering the region `[addr, addr + len)` (at least one page, also for an
/// empty region), which must lie inside its allocation `[base, base + size)`.
pub fn cover(base: u64, size: u64, addr: u64, len: u64) -> Result<Cover> {
    let (region_end, alloc_end) = (addr.checked_add(len), base.checked_add(size));
    let (Some(region_end), Some(alloc_end)) = (region_end, alloc_end) else {
        return Err(Error::Internal(format!("CUDA range {addr:#x}+{len:#x} or {base:#x}+{size:#x} overflows")));
    };
    if addr < base || region_end > alloc_end {
        return Err(Error::usage(format!(
            "the region {addr:#x}+{len:#x} is not inside its CUDA allocation {base:#x}+{size:#x}"
        )));
    }
    let start = addr / EXPORT_ALIGN * EXPORT_ALIGN;
    let end = region_end.div_ceil(EXPORT_ALIGN).saturating_mul(EXPORT_ALIGN).max(start + EXPORT_ALIGN);
    if start < base || end > alloc_end {
        return Err(Error::Unsupported {
            reason: format!(
                "the 4 KiB pages {start:#x}..{end:#x} around the region {addr:#x}+{len:#x} leave its allocation \
                 {base:#x}+{size:#x}, and cuMemGetHandleForAddressRange exports only whole 4 KiB pages of one \
                 allocation: allocate the memory with alloc_exportable (or 4 KiB aligned in address and size)"
            ),
        });
    }
    Ok(Cover { start, len: end - start, offset: addr - start })
}

/// What an exportable allocation of `len` bytes asks `cuMemAlloc` for: whole pages, at least
/// one.
pub fn alloc_size(len: usize) -> u64 {
    (len as u64).max(1).div_ceil(EXPORT_ALIGN) * EXPORT_ALIGN
}

/// Where `need` bytes of whole pages start inside an allocation of `size` bytes at `ptr`: the
/// first page boundary at or after `ptr`, if they fit.
pub fn aligned_start(ptr: u64, size: u64, need: u64) -> Option<u64> {
    let start = ptr.checked_next_multiple_of(EXPORT_ALIGN)?;
    (start.checked_add(need)? <= ptr.checked_add(size)?).then_some(start)
}

#[cfg(feature = "cuda")]
pub(crate) use imp::{alloc_exportable, check_supported, export_range, export_region};

#[cfg(feature = "cuda")]
mod imp {
    use std::os::fd::{FromRawFd, OwnedFd};
    use std::sync::Arc;

    use cudarc::driver::sys;
    use devccl_core::device::{ExportKind, Exported};
    use devccl_core::memory::{MemKind, Region};

    use super::*;
    use crate::cuda::device::Shared;
    use crate::cuda::driver::describe;
    use crate::cuda::memory::alloc_device_paged;

    /// `Unsupported` unless the device reports `CU_DEVICE_ATTRIBUTE_DMA_BUF_SUPPORTED` = 1.
    pub(crate) fn check_supported(shared: &Shared) -> Result<()> {
        shared.ctx.bind()?;
        let a = sys::CUdevice_attribute_enum::CU_DEVICE_ATTRIBUTE_DMA_BUF_SUPPORTED;
        match shared.ctx.attribute(a)? {
            1 => Ok(()),
            v => Err(Error::Unsupported {
                reason: format!(
                    "{} reports CU_DEVICE_ATTRIBUTE_DMA_BUF_SUPPORTED = {v}: it cannot export dma-bufs (load NVIDIA's \
                     open GPU kernel modules; the proprietary ones cannot)",
                    shared.ctx.label
                ),
            }),
        }
    }

    /// Export `[start, start + len)` (whole pages of one allocation) as a dma-buf: with the
    /// PCIe mapping flag first, with flags 0 when the driver refuses it.
    pub(crate) fn export_range(shared: &Shared, start: u64, len: u64) -> Result<(OwnedFd, ExportFlags)> {
        if len == 0 || !start.is_multiple_of(EXPORT_ALIGN) || !len.is_multiple_of(EXPORT_ALIGN) {
            return Err(Error::Internal(format!("CUDA dma-buf export of {start:#x}+{len:#x}: not whole 4 KiB pages")));
        }
        shared.ctx.bind()?;
        let handle_type = sys::CUmemRangeHandleType::CU_MEM_RANGE_HANDLE_TYPE_DMA_BUF_FD;
        let call = |flags: u64| {
            let mut fd: std::ffi::c_int = -1;
            // SAFETY: the context is current; `fd` is an out-pointer to a local int (the
            // handle type's handle); the driver checks the range against its allocations.
            let r = unsafe {
                sys::cuMemGetHandleForAddressRange((&raw mut fd).cast(), start, len as usize, handle_type, flags)
            };
            r.result().map(|()| fd)
        };
        let pcie = sys::CUmemRangeFlags::CU_MEM_RANGE_FLAG_DMA_BUF_MAPPING_TYPE_PCIE as u64;
        let (fd, flags) = match call(pcie) {
            Ok(fd) => (fd, ExportFlags::Pcie),
            Err(refused) => match call(0) {
                Ok(fd) => (fd, ExportFlags::Default),
                Err(e) => {
                    let message = format!(
                        "cuMemGetHandleForAddressRange(DMA_BUF_FD) of {start:#x}+{len:#x} failed: {} (with the PCIe \
                         mapping flag: {})",
                        describe(e),
                        describe(refused)
                    );
                    return Err(Error::Device { device: shared.ctx.label.clone(), message });
                }
            },
        };
        if fd < 0 {
            let message = format!("cuMemGetHandleForAddressRange succeeded with fd {fd}");
            return Err(Error::Device { device: shared.ctx.label.clone(), message });
        }
        tracing::debug!("{}: dma-buf of {start:#x}+{len:#x} ({flags:?} mapping)", shared.ctx.label);
        // SAFETY: the driver returned a new descriptor the caller owns.
        Ok((unsafe { OwnedFd::from_raw_fd(fd) }, flags))
    }

    /// A dma-buf covering `region` (CUDA memory of this device, devccl's or anyone's): the
    /// page-aligned cover of the region inside its allocation, the region `offset` bytes in.
    pub(crate) fn export_region(shared: &Shared, region: &Region) -> Result<Exported> {
        match region.kind() {
            MemKind::Cuda { device } if *device as u32 == shared.ordinal => {}
            other => {
                return Err(Error::Unsupported {
                    reason: format!("{} exports its own device memory only, not {other:?} memory", shared.ctx.label),
                });
            }
        }
        region.ensure_live()?;
        check_supported(shared)?;
        let addr = region.addr() as u64;
        let (mut base, mut size): (sys::CUdeviceptr, usize) = (0, 0);
        // SAFETY: out-pointers to locals; the context is current (check_supported bound it);
        // the address is only looked up.
        let r = unsafe { sys::cuMemGetAddressRange_v2(&mut base, &mut size, addr) };
        r.result().map_err(|e| Error::Unsupported {
            reason: format!(
                "{}: {addr:#x} is not in a CUDA allocation of this context (cuMemGetAddressRange: {})",
                shared.ctx.label,
                describe(e)
            ),
        })?;
        let c = cover(base, size as u64, addr, region.len() as u64)?;
        let (fd, _flags) = export_range(shared, c.start, c.len)?;
        Ok(Exported { fd, offset: c.offset, fd_len: c.len, kind: ExportKind::DmaBuf })
    }

    /// `len` bytes of device memory at a page-aligned address with whole pages behind them
    /// (at least one), exported as a dma-buf.
    pub(crate) fn alloc_exportable(shared: &Arc<Shared>, len: usize) -> Result<(Region, Exported)> {
        check_supported(shared)?;
        let region = alloc_device_paged(shared, len)?;
        let exported = export_region(shared, &region)?;
        Ok((region, exported))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const B: u64 = 0x7f00_0020_0000;

    #[test]
    fn cover_is_whole_pages_inside_the_allocation() {
        let c = |base, size, addr, len| cover(base, size, addr, len);
        assert_eq!(c(B, 1 << 20, B, 1 << 20).unwrap(), Cover { start: B, len: 1 << 20, offset: 0 });
        assert_eq!(c(B, 1 << 20, B + 4099, 5000).unwrap(), Cover { start: B + 4096, len: 8192, offset: 3 });
        assert_eq!(c(B, 1 << 20, B + 4096, 4096).unwrap(), Cover { start: B + 4096, len: 4096, offset: 0 });
        assert_eq!(c(B, 1 << 20, B + 4095, 2).unwrap(), Cover { start: B, len: 8192, offset: 4095 });
        // Empty regions export one page.
        assert_eq!(c(B, 4096, B, 0).unwrap(), Cover { start: B, len: 4096, offset: 0 });
        assert!(c(B, 8192, B + 8192, 0).unwrap_err().to_string().contains("leave its allocation"));
        // Covers that leave the allocation: small or unaligned allocations.
        for (base, size, addr, len) in [(B, 100, B, 100), (B + 256, 8192, B + 256, 4096), (B, 4097, B + 4096, 1)] {
            let e = c(base, size, addr, len).unwrap_err();
            assert!(matches!(&e, Error::Unsupported { reason } if reason.contains("alloc_exportable")), "{e}");
        }
        // A region outside its allocation is a caller's error.
        assert!(matches!(c(B, 4096, B + 4000, 200), Err(Error::InvalidUsage(_))));
        assert!(matches!(c(B, 4096, B - 1, 1), Err(Error::InvalidUsage(_))));
        assert!(matches!(c(u64::MAX - 10, 5, u64::MAX - 10, 20), Err(Error::Internal(_))));
    }

    #[test]
    fn exportable_allocations_are_whole_aligned_pages() {
        assert_eq!([0, 1, 4095, 4096, 4097].map(alloc_size), [4096, 4096, 4096, 4096, 8192]);
        assert_eq!(alloc_size((1 << 20) + 3), (1 << 20) + 4096);
        assert_eq!(aligned_start(B, 4096, 4096), Some(B));
        assert_eq!(aligned_start(B + 512, 4096, 4096), None);
        assert_eq!(aligned_start(B + 512, 8192, 4096), Some(B + 4096));
        assert_eq!(aligned_start(u64::MAX - 100, 50, 4096), None);
        // An aligned start always yields a cover inside the allocation with offset 0.
        for len in [0usize, 1, 4095, 4096, (1 << 20) + 3] {
            let need = alloc_size(len);
            for ptr in [B, B + 512] {
                let size = if ptr.is_multiple_of(EXPORT_ALIGN) { need } else { need + EXPORT_ALIGN };
                let start = aligned_start(ptr, size, need).unwrap();
                let c = cover(ptr, size, start, len as u64).unwrap();
                assert_eq!((c.start, c.len, c.offset), (start, need, 0), "len {len} at {ptr:#x}");
            }
        }
    }
}
