//! NVIDIA GPU memory as a dma-buf: `cuMemGetHandleForAddressRange(DMA_BUF_FD)` through
//! cudarc (dynamic loading: nothing links libcuda; without a driver every entry point answers
//! [`Error::Unsupported`] instead of letting cudarc panic).
//!
//! Facts (devmem-uapi §5.1, checked on the project's H100 box): the device must report
//! `CU_DEVICE_ATTRIBUTE_DMA_BUF_SUPPORTED` (open GPU kernel modules); pointer and size must be
//! 4 KiB aligned and inside one `cuMemAlloc` allocation; the PCIe mapping flag may be refused
//! (`CUDA_ERROR_NOT_SUPPORTED` on driver 580) and then flags 0 works.

use serde::Serialize;

#[cfg(feature = "cuda")]
use crate::dmabuf::{DmaBuf, DmabufSource, ExportedBuffer, SourceKind};
use crate::error::{Error, Result};

/// Alignment of exported ranges (host page).
pub const EXPORT_ALIGN: u64 = 4096;

/// A CUDA device as [`devices`] sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CudaDevice {
    pub ordinal: usize,
    pub name: String,
    /// `CU_DEVICE_ATTRIBUTE_DMA_BUF_SUPPORTED`.
    pub dma_buf_supported: bool,
    /// `cuDriverGetVersion` (e.g. 13000).
    pub driver_version: i32,
}

/// Which `cuMemGetHandleForAddressRange` flags produced the fd.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ExportFlags {
    /// `CU_MEM_RANGE_FLAG_DMA_BUF_MAPPING_TYPE_PCIE` (forced PCIe BAR1 mapping).
    Pcie,
    /// Flags 0 (after the PCIe flag was refused).
    Default,
}

/// Check that `ptr` / `len` can be exported (4 KiB aligned, non-empty).
pub fn check_export_range(ptr: u64, len: usize) -> Result<()> {
    if len == 0 {
        return Err(Error::invalid("CUDA dma-buf export of 0 bytes"));
    }
    if !ptr.is_multiple_of(EXPORT_ALIGN) || !(len as u64).is_multiple_of(EXPORT_ALIGN) {
        return Err(Error::invalid(format!(
            "CUDA dma-buf export range {ptr:#x}+{len:#x} is not 4 KiB aligned \
             (cuMemGetHandleForAddressRange would answer CUDA_ERROR_INVALID_VALUE)"
        )));
    }
    Ok(())
}

#[cfg(not(feature = "cuda"))]
fn no_feature() -> Error {
    Error::unsupported("devccl-transport-devmem was built without the `cuda` feature")
}

/// Every CUDA device with its dma-buf capability. [`Error::Unsupported`] when libcuda is
/// absent or the driver has no usable device.
#[cfg(not(feature = "cuda"))]
pub fn devices() -> Result<Vec<CudaDevice>> {
    Err(no_feature())
}

/// The CUDA source (built without the `cuda` feature: never available).
#[cfg(not(feature = "cuda"))]
#[derive(Debug)]
pub struct CudaSource {
    _priv: (),
}

#[cfg(not(feature = "cuda"))]
impl CudaSource {
    /// Always [`Error::Unsupported`] in this build.
    pub fn open(_ordinal: usize) -> Result<Self> {
        Err(no_feature())
    }
}

#[cfg(not(feature = "cuda"))]
impl crate::dmabuf::DmabufSource for CudaSource {
    fn kind(&self) -> crate::dmabuf::SourceKind {
        crate::dmabuf::SourceKind::Cuda
    }

    fn describe(&self) -> String {
        "cuda (not built)".into()
    }

    fn allocate(&self, _len: usize) -> Result<crate::dmabuf::ExportedBuffer> {
        Err(no_feature())
    }
}

/// Whether the CUDA driver library (libcuda) can be loaded.
#[cfg(not(feature = "cuda"))]
pub fn driver_present() -> bool {
    false
}

#[cfg(feature = "cuda")]
pub use imp::{CudaSource, devices, driver_present};

#[cfg(feature = "cuda")]
mod imp {
    use std::os::fd::{FromRawFd, OwnedFd};
    use std::sync::Arc;

    use cudarc::driver::result::{self, DriverError};
    use cudarc::driver::{CudaContext, sys};

    use super::*;

    const NO_DRIVER: &str = "libcuda not found (no NVIDIA driver on this machine): \
        the CUDA dma-buf source is unavailable (fix: install the NVIDIA driver with its open \
        GPU kernel modules)";

    fn cuda_err(op: &'static str, e: DriverError) -> Error {
        let name = e.error_name().map(|c| c.to_string_lossy().into_owned()).unwrap_or_else(|_| "CUDA_ERROR_?".into());
        Error::Cuda { op, code: e.0 as u32, name }
    }

    /// Whether the CUDA driver library (libcuda) can be loaded.
    pub fn driver_present() -> bool {
        // SAFETY: only tries to dlopen the library by its known names; no CUDA call is made.
        unsafe { sys::is_culib_present() }
    }

    fn init() -> Result<()> {
        if !driver_present() {
            return Err(Error::unsupported(NO_DRIVER));
        }
        result::init().map_err(|e| {
            Error::unsupported(format!(
                "the CUDA driver is installed but cuInit failed: {} (no usable GPU?)",
                cuda_err("cuInit", e)
            ))
        })
    }

    fn driver_version() -> i32 {
        let mut v: std::ffi::c_int = 0;
        // SAFETY: the driver library is loaded (checked by init); `v` is a valid out-pointer.
        let r = unsafe { sys::cuDriverGetVersion(&mut v) };
        if r == sys::CUresult::CUDA_SUCCESS { v } else { 0 }
    }

    fn dma_buf_supported(dev: sys::CUdevice) -> Result<bool> {
        // SAFETY: `dev` came from cuDeviceGet after a successful cuInit.
        let v = unsafe {
            result::device::get_attribute(dev, sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_DMA_BUF_SUPPORTED)
        }
        .map_err(|e| cuda_err("cuDeviceGetAttribute(DMA_BUF_SUPPORTED)", e))?;
        Ok(v != 0)
    }

    /// Every CUDA device with its dma-buf capability. [`Error::Unsupported`] when libcuda is
    /// absent or the driver has no usable device.
    pub fn devices() -> Result<Vec<CudaDevice>> {
        init()?;
        let n = result::device::get_count().map_err(|e| cuda_err("cuDeviceGetCount", e))?;
        let ver = driver_version();
        let mut out = Vec::new();
        for i in 0..n {
            let dev = result::device::get(i).map_err(|e| cuda_err("cuDeviceGet", e))?;
            let name = result::device::get_name(dev).map_err(|e| cuda_err("cuDeviceGetName", e))?;
            out.push(CudaDevice {
                ordinal: i as usize,
                name,
                dma_buf_supported: dma_buf_supported(dev)?,
                driver_version: ver,
            });
        }
        Ok(out)
    }

    /// A CUDA device that can export dma-bufs.
    #[derive(Debug)]
    pub struct CudaSource {
        ctx: Arc<CudaContext>,
        name: String,
    }

    /// Device memory from `cuMemAlloc` (not the stream-ordered pool: pool memory is not a
    /// documented export source), freed on drop.
    struct DeviceAlloc {
        ctx: Arc<CudaContext>,
        dptr: sys::CUdeviceptr,
    }

    impl Drop for DeviceAlloc {
        fn drop(&mut self) {
            let _ = self.ctx.bind_to_thread();
            // SAFETY: `dptr` came from cuMemAlloc in this context and is freed exactly once;
            // the exported dma-buf fd was closed before (ExportedBuffer field order).
            let _ = unsafe { result::free_sync(self.dptr) };
        }
    }

    impl CudaSource {
        /// Open device `ordinal` (primary context). [`Error::Unsupported`] without a driver,
        /// without such a device, or when the device reports `DMA_BUF_SUPPORTED` = 0.
        pub fn open(ordinal: usize) -> Result<Self> {
            init()?;
            let n = result::device::get_count().map_err(|e| cuda_err("cuDeviceGetCount", e))?;
            if ordinal as i64 >= n as i64 {
                return Err(Error::unsupported(format!("CUDA device {ordinal} does not exist ({n} devices)")));
            }
            let ctx = CudaContext::new(ordinal).map_err(|e| cuda_err("cuDevicePrimaryCtxRetain", e))?;
            let name = ctx.name().map_err(|e| cuda_err("cuDeviceGetName", e))?;
            if !dma_buf_supported(ctx.cu_device())? {
                return Err(Error::unsupported(format!(
                    "CUDA device {ordinal} ({name}) reports DMA_BUF_SUPPORTED=0: load NVIDIA's \
                     open GPU kernel modules (the proprietary modules cannot export dma-bufs)"
                )));
            }
            Ok(CudaSource { ctx, name })
        }

        /// Device name.
        pub fn name(&self) -> &str {
            &self.name
        }

        /// The context (to allocate with cudarc and export the result).
        pub fn context(&self) -> &Arc<CudaContext> {
            &self.ctx
        }

        /// Export `[dptr, dptr+len)` (inside one allocation, 4 KiB aligned) as a dma-buf:
        /// first with the PCIe mapping flag, then with flags 0 when the driver refuses it.
        pub fn export_range(&self, dptr: u64, len: usize) -> Result<(DmaBuf, ExportFlags)> {
            check_export_range(dptr, len)?;
            self.ctx.bind_to_thread().map_err(|e| cuda_err("cuCtxSetCurrent", e))?;
            let attempt = |flags: u64| -> std::result::Result<i32, DriverError> {
                let mut fd: std::ffi::c_int = -1;
                // SAFETY: the context is current; `fd` is a valid out-pointer for an int; the
                // range was checked for alignment and the driver validates it against its
                // allocations (CUDA_ERROR_INVALID_VALUE otherwise).
                let r = unsafe {
                    sys::cuMemGetHandleForAddressRange(
                        (&mut fd as *mut std::ffi::c_int).cast(),
                        dptr,
                        len,
                        sys::CUmemRangeHandleType::CU_MEM_RANGE_HANDLE_TYPE_DMA_BUF_FD,
                        flags,
                    )
                };
                if r == sys::CUresult::CUDA_SUCCESS { Ok(fd) } else { Err(DriverError(r)) }
            };
            let pcie = sys::CUmemRangeFlags::CU_MEM_RANGE_FLAG_DMA_BUF_MAPPING_TYPE_PCIE as u64;
            let (fd, how) = match attempt(pcie) {
                Ok(fd) => (fd, ExportFlags::Pcie),
                Err(e) => {
                    tracing::debug!(error = ?e, "PCIe dma-buf mapping refused, retrying with flags 0");
                    let fd = attempt(0).map_err(|e| cuda_err("cuMemGetHandleForAddressRange", e))?;
                    (fd, ExportFlags::Default)
                }
            };
            if fd < 0 {
                return Err(Error::Malformed {
                    op: "cuMemGetHandleForAddressRange",
                    iface: format!("cuda:{}", self.ctx.ordinal()),
                    what: format!("success with fd {fd}"),
                });
            }
            // SAFETY: the driver returned a fresh dma-buf fd owned by the caller.
            let owned = unsafe { OwnedFd::from_raw_fd(fd) };
            Ok((DmaBuf::new(owned, len as u64), how))
        }
    }

    impl DmabufSource for CudaSource {
        fn kind(&self) -> SourceKind {
            SourceKind::Cuda
        }

        fn describe(&self) -> String {
            format!("cuda:{} {}", self.ctx.ordinal(), self.name)
        }

        fn allocate(&self, len: usize) -> Result<ExportedBuffer> {
            if len == 0 {
                return Err(Error::invalid("CUDA allocation of 0 bytes"));
            }
            let size = (len as u64).div_ceil(EXPORT_ALIGN) * EXPORT_ALIGN;
            self.ctx.bind_to_thread().map_err(|e| cuda_err("cuCtxSetCurrent", e))?;
            // SAFETY: the context is current on this thread; the memory is owned by
            // `DeviceAlloc`, which frees it once.
            let dptr = unsafe { result::malloc_sync(size as usize) }.map_err(|e| cuda_err("cuMemAlloc", e))?;
            let alloc = DeviceAlloc { ctx: self.ctx.clone(), dptr };
            let (dmabuf, flags) = self.export_range(dptr, size as usize)?;
            Ok(ExportedBuffer::new(
                dmabuf,
                format!(
                    "cuMemAlloc {size} bytes at {dptr:#x}, cuMemGetHandleForAddressRange flags={}",
                    match flags {
                        ExportFlags::Pcie => "PCIE",
                        ExportFlags::Default => "0",
                    }
                ),
                Box::new(alloc),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alignment_is_checked_before_any_cuda_call() {
        assert!(check_export_range(0x7fb3_de80_0000, 4 << 20).is_ok());
        assert!(matches!(check_export_range(0x7fb3_de80_0064, 4096), Err(Error::InvalidUsage { .. })));
        assert!(matches!(check_export_range(0x7fb3_de80_0000, 4097), Err(Error::InvalidUsage { .. })));
        assert!(check_export_range(0, 0).is_err());
    }

    #[test]
    fn no_driver_is_unsupported_not_a_panic() {
        if driver_present() {
            eprintln!("skip: a CUDA driver is present here");
            return;
        }
        let e = CudaSource::open(0).unwrap_err();
        match &e {
            Error::Unsupported { reason } => {
                #[cfg(feature = "cuda")]
                assert!(reason.starts_with("libcuda not found"), "{reason}");
                let _ = reason;
            }
            other => panic!("expected Unsupported, got {other:?}"),
        }
        assert!(matches!(devices(), Err(Error::Unsupported { .. })));
    }
}
