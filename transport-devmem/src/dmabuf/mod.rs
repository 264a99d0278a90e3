//! Dma-buf sources: memory a NIC can be bound to.
//!
//! Every source sits behind [`DmabufSource`]; each one answers [`Error::Unsupported`] with a
//! reason (and the fix) where the machine lacks it. [`discover`] lists what this machine has.

use std::fmt;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use serde::Serialize;

use crate::error::{Error, Result};

pub mod cuda;
pub mod udmabuf;

pub use cuda::{CudaDevice, CudaSource};
pub use udmabuf::UdmabufSource;

/// A dma-buf file descriptor and its size.
#[derive(Debug)]
pub struct DmaBuf {
    fd: OwnedFd,
    len: u64,
}

impl DmaBuf {
    /// Wrap an owned dma-buf fd of `len` bytes.
    pub fn new(fd: OwnedFd, len: u64) -> Self {
        DmaBuf { fd, len }
    }

    /// Size in bytes as exported.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Zero-sized.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Size as the kernel sees it (`lseek(fd, 0, SEEK_END)`, which dma-bufs support).
    pub fn size_by_lseek(&self) -> std::io::Result<u64> {
        udmabuf::lseek_end(self.fd.as_fd())
    }

    /// Exporter name from `/proc/self/fdinfo/<fd>` (`exp_name`, e.g. `nv_dmabuf`, `udmabuf`).
    pub fn exporter(&self) -> Option<String> {
        fdinfo_field(self.fd.as_raw_fd(), "exp_name")
    }
}

impl AsFd for DmaBuf {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// A field of `/proc/self/fdinfo/<fd>`.
pub fn fdinfo_field(fd: i32, key: &str) -> Option<String> {
    let s = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).ok()?;
    s.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        (k.trim() == key).then(|| v.trim().to_owned())
    })
}

/// Memory exported as a dma-buf plus whatever keeps that memory alive.
///
/// Field order matters: the dma-buf fd is closed before the backing memory is freed.
pub struct ExportedBuffer {
    dmabuf: DmaBuf,
    /// How it was exported (e.g. `"cuMemGetHandleForAddressRange flags=0"`).
    how: String,
    _backing: Box<dyn Send>,
}

impl fmt::Debug for ExportedBuffer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExportedBuffer").field("dmabuf", &self.dmabuf).field("how", &self.how).finish_non_exhaustive()
    }
}

impl ExportedBuffer {
    pub(crate) fn new(dmabuf: DmaBuf, how: String, backing: Box<dyn Send>) -> Self {
        ExportedBuffer { dmabuf, how, _backing: backing }
    }

    /// The dma-buf.
    pub fn dmabuf(&self) -> &DmaBuf {
        &self.dmabuf
    }

    /// How it was exported.
    pub fn how(&self) -> &str {
        &self.how
    }
}

/// Which kind of memory a source hands out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    /// NVIDIA GPU memory through the CUDA driver.
    Cuda,
    /// Host memory through `/dev/udmabuf`.
    Udmabuf,
}

/// Something that allocates memory and exports it as a dma-buf.
pub trait DmabufSource: fmt::Debug + Send {
    /// Kind.
    fn kind(&self) -> SourceKind;

    /// Human-readable description (device name...).
    fn describe(&self) -> String;

    /// Allocate at least `len` bytes (rounded up to the source's granularity) and export them.
    fn allocate(&self, len: usize) -> Result<ExportedBuffer>;
}

/// What [`discover`] found about one source.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SourceStatus {
    pub kind: SourceKind,
    /// Device (e.g. `"cuda:0 NVIDIA H100 80GB HBM3"`, `"/dev/udmabuf"`).
    pub device: String,
    /// Can export dma-bufs.
    pub available: bool,
    /// Why not / details.
    pub detail: String,
}

/// Every dma-buf source of this machine, available or not (CUDA devices with
/// `DMA_BUF_SUPPORTED`, udmabuf). Never panics without a driver.
pub fn discover() -> Vec<SourceStatus> {
    let mut out = Vec::new();
    match cuda::devices() {
        Ok(devs) if devs.is_empty() => out.push(SourceStatus {
            kind: SourceKind::Cuda,
            device: "cuda".into(),
            available: false,
            detail: "the CUDA driver reports no devices".into(),
        }),
        Ok(devs) => {
            for d in devs {
                out.push(SourceStatus {
                    kind: SourceKind::Cuda,
                    device: format!("cuda:{} {}", d.ordinal, d.name),
                    available: d.dma_buf_supported,
                    detail: if d.dma_buf_supported {
                        format!("DMA_BUF_SUPPORTED=1, driver API {}", d.driver_version)
                    } else {
                        "DMA_BUF_SUPPORTED=0: load NVIDIA's open GPU kernel modules \
                         (the proprietary modules cannot export dma-bufs)"
                            .into()
                    },
                });
            }
        }
        Err(e) => out.push(SourceStatus {
            kind: SourceKind::Cuda,
            device: "cuda".into(),
            available: false,
            detail: unsupported_reason(&e),
        }),
    }
    match UdmabufSource::open() {
        Ok(_) => out.push(SourceStatus {
            kind: SourceKind::Udmabuf,
            device: udmabuf::DEV_UDMABUF.into(),
            available: true,
            detail: "host memory (memfd) exported through /dev/udmabuf".into(),
        }),
        Err(e) => out.push(SourceStatus {
            kind: SourceKind::Udmabuf,
            device: udmabuf::DEV_UDMABUF.into(),
            available: false,
            detail: unsupported_reason(&e),
        }),
    }
    out
}

/// The reason of an `Unsupported` error, or the error's text.
pub fn unsupported_reason(e: &Error) -> String {
    match e {
        Error::Unsupported { reason } => reason.clone(),
        other => other.to_string(),
    }
}

/// Open the first available source: CUDA device 0, then udmabuf.
pub fn first_available() -> Result<Box<dyn DmabufSource>> {
    let cuda_err = match CudaSource::open(0) {
        Ok(s) => return Ok(Box::new(s)),
        Err(e) => e,
    };
    let udmabuf_err = match UdmabufSource::open() {
        Ok(s) => return Ok(Box::new(s)),
        Err(e) => e,
    };
    Err(Error::unsupported(format!(
        "no dma-buf source: CUDA: {}; udmabuf: {}",
        unsupported_reason(&cuda_err),
        unsupported_reason(&udmabuf_err)
    )))
}
