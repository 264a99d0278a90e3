//! Host memory as a dma-buf through `/dev/udmabuf` (CONFIG_UDMABUF): memfd + `UDMABUF_CREATE`
//! (the ioctl is core's `memory::fd::udmabuf::create_on`, its layout tested there).

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use crate::dmabuf::{DmaBuf, DmabufSource, ExportedBuffer, SourceKind};
use crate::error::{Error, Result};

/// The device node.
pub const DEV_UDMABUF: &str = "/dev/udmabuf";

/// `lseek(fd, 0, SEEK_END)`: the size of a dma-buf.
pub fn lseek_end(fd: BorrowedFd<'_>) -> io::Result<u64> {
    // SAFETY: live fd; lseek has no memory-safety preconditions.
    let r = unsafe { libc::lseek(fd.as_raw_fd(), 0, libc::SEEK_END) };
    if r < 0 { Err(io::Error::last_os_error()) } else { Ok(r as u64) }
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 { p as usize } else { 4096 }
}

/// The udmabuf source.
#[derive(Debug)]
pub struct UdmabufSource {
    dev: File,
}

impl UdmabufSource {
    /// Open `/dev/udmabuf`; [`Error::Unsupported`] with the reason when it is missing or
    /// not accessible.
    pub fn open() -> Result<Self> {
        Self::open_at(Path::new(DEV_UDMABUF))
    }

    /// Open a udmabuf device node at `path` (tests).
    pub fn open_at(path: &Path) -> Result<Self> {
        if !path.exists() {
            return Err(Error::unsupported(format!(
                "{} does not exist: the kernel was built without CONFIG_UDMABUF or the module \
                 is not loaded (fix: `modprobe udmabuf`, or a kernel with CONFIG_UDMABUF=y)",
                path.display()
            )));
        }
        let dev = OpenOptions::new().read(true).write(true).custom_flags(libc::O_CLOEXEC).open(path).map_err(|e| {
            if e.kind() == io::ErrorKind::PermissionDenied {
                Error::unsupported(format!(
                    "{} is not accessible to this user: {e} (fix: give the user access to \
                         the device node, e.g. a udev rule for group access)",
                    path.display()
                ))
            } else {
                Error::os("open", &path.display().to_string(), e)
            }
        })?;
        Ok(UdmabufSource { dev })
    }
}

impl DmabufSource for UdmabufSource {
    fn kind(&self) -> SourceKind {
        SourceKind::Udmabuf
    }

    fn describe(&self) -> String {
        format!("udmabuf ({DEV_UDMABUF}, host memory)")
    }

    fn allocate(&self, len: usize) -> Result<ExportedBuffer> {
        if len == 0 {
            return Err(Error::invalid("udmabuf allocation of 0 bytes"));
        }
        let page = page_size();
        let size = len.div_ceil(page) * page;
        let name = CString::new("devccl-udmabuf").expect("no NUL");
        // SAFETY: `name` is a valid C string; flags are plain bits.
        let raw = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_ALLOW_SEALING | libc::MFD_CLOEXEC) };
        if raw < 0 {
            return Err(Error::os("memfd_create", DEV_UDMABUF, io::Error::last_os_error()));
        }
        // SAFETY: `raw` is a fresh fd we own.
        let memfd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: live fd; ftruncate has no memory-safety preconditions.
        if unsafe { libc::ftruncate(memfd.as_raw_fd(), size as libc::off_t) } < 0 {
            return Err(Error::os("ftruncate", DEV_UDMABUF, io::Error::last_os_error()));
        }
        // udmabuf requires F_SEAL_SHRINK and refuses F_SEAL_WRITE.
        // SAFETY: live fd; F_ADD_SEALS takes an int argument.
        if unsafe { libc::fcntl(memfd.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_SHRINK) } < 0 {
            return Err(Error::os("F_ADD_SEALS", DEV_UDMABUF, io::Error::last_os_error()));
        }
        let dmabuf = devccl_core::memory::fd::udmabuf::create_on(self.dev.as_fd(), memfd.as_fd(), size as u64)
            .map_err(|e| Error::os("UDMABUF_CREATE", DEV_UDMABUF, e))?;
        Ok(ExportedBuffer::new(
            DmaBuf::new(dmabuf, size as u64),
            format!("udmabuf memfd {size} bytes"),
            Box::new(memfd),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_device_is_unsupported_with_reason() {
        let e = UdmabufSource::open_at(Path::new("/nonexistent/udmabuf")).unwrap_err();
        match e {
            Error::Unsupported { reason } => {
                assert!(reason.contains("CONFIG_UDMABUF"), "{reason}");
                assert!(reason.contains("modprobe udmabuf"), "{reason}");
            }
            other => panic!("expected Unsupported, got {other:?}"),
        }
    }

    #[test]
    fn this_machine_has_no_udmabuf() {
        // The build machine's 6.18 kernel has CONFIG_UDMABUF unset (devmem-uapi §4).
        if Path::new(DEV_UDMABUF).exists() {
            eprintln!("skip: {DEV_UDMABUF} exists here");
            return;
        }
        let e = UdmabufSource::open().unwrap_err();
        assert!(
            matches!(&e, Error::Unsupported { reason } if reason.starts_with("/dev/udmabuf does not exist")),
            "{e}"
        );
    }
}
