//! Shared mappings of the memory a simulated binding is made of (the simulator's only unsafe
//! code): the RX pool is mapped writable (the simulated NIC writes payload into it), a TX
//! buffer read-only (the simulated NIC reads payload out of it).
//!
//! The fd may be a dma-buf, a memfd or any other mappable file (Vulkan exports a memfd on
//! lavapipe). The mapping keeps the memory alive after the caller closes its fd, as the
//! kernel's dma-buf attachment does. For a dma-buf, every CPU access is bracketed with
//! `DMA_BUF_IOCTL_SYNC`, as the dma-buf rules ask of CPU users.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::ptr::NonNull;

use crate::sys::errno;

/// `DMA_BUF_IOCTL_SYNC` = `_IOW('b', 0, struct dma_buf_sync)`.
const DMA_BUF_IOCTL_SYNC: libc::Ioctl = 0x4008_6200;
const DMA_BUF_SYNC_READ: u64 = 1;
const DMA_BUF_SYNC_WRITE: u64 = 2;
const DMA_BUF_SYNC_START: u64 = 0;
const DMA_BUF_SYNC_END: u64 = 4;

/// What kind of fd a binding was made from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FdKind {
    DmaBuf,
    Other,
}

/// A `MAP_SHARED` mapping of a whole file.
#[derive(Debug)]
pub(crate) struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
    /// A duplicate of the fd, kept for `DMA_BUF_IOCTL_SYNC` (dma-bufs only).
    sync_fd: Option<OwnedFd>,
}

// SAFETY: the mapping is plain shared memory owned by this value; every access goes through
// `write` / `read`, which copy with raw pointers inside bounds, so it may move between and be
// used from several threads (callers serialise writes to the same bytes).
unsafe impl Send for Mapping {}
// SAFETY: as above; `&Mapping` only exposes bounds-checked copies.
unsafe impl Sync for Mapping {}

/// Why an fd cannot back a simulated binding, as the kernel would say it: `EBADF` for an fd
/// that is not open, `EINVAL` for one that is neither a dma-buf nor mappable memory.
fn bad_fd(e: &io::Error) -> i32 {
    if e.raw_os_error() == Some(errno::EBADF) { errno::EBADF } else { errno::EINVAL }
}

/// Size of the file behind `fd` (`lseek(SEEK_END)`, which dma-bufs and memfds answer), the
/// file offset restored. Errors carry the errno the kernel's `dma_buf_get` would give.
pub(crate) fn file_size(fd: BorrowedFd<'_>) -> Result<u64, i32> {
    // SAFETY: fcntl(F_GETFD) only reads the fd table.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFD) } < 0 {
        return Err(errno::EBADF);
    }
    // SAFETY: lseek has no memory-safety preconditions.
    let cur = unsafe { libc::lseek(fd.as_raw_fd(), 0, libc::SEEK_CUR) };
    if cur < 0 {
        return Err(bad_fd(&io::Error::last_os_error()));
    }
    // SAFETY: as above.
    let end = unsafe { libc::lseek(fd.as_raw_fd(), 0, libc::SEEK_END) };
    let err = io::Error::last_os_error();
    // SAFETY: as above (restores the offset the caller had).
    unsafe { libc::lseek(fd.as_raw_fd(), cur, libc::SEEK_SET) };
    if end < 0 { Err(bad_fd(&err)) } else { Ok(end as u64) }
}

fn kind_of(fd: BorrowedFd<'_>) -> FdKind {
    match std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())) {
        Ok(p) => {
            let p = p.to_string_lossy();
            if p.starts_with("/dmabuf:") || p.starts_with("anon_inode:dmabuf") { FdKind::DmaBuf } else { FdKind::Other }
        }
        Err(_) => FdKind::Other,
    }
}

impl Mapping {
    /// Map the first `len` bytes of `fd`, `MAP_SHARED` and populated (a NIC's DMA takes no
    /// page faults), writable or read-only. `Err(errno)`:
    /// `EINVAL` when the fd cannot be mapped (the kernel's answer for a non-dma-buf).
    pub(crate) fn map(fd: BorrowedFd<'_>, len: usize, writable: bool) -> Result<Mapping, i32> {
        if len == 0 {
            return Err(errno::EINVAL);
        }
        let prot = libc::PROT_READ | if writable { libc::PROT_WRITE } else { 0 };
        // SAFETY: a fresh mapping at an address of the kernel's choice; `len` > 0; the result
        // is checked before use and unmapped exactly once in Drop.
        let p = unsafe {
            libc::mmap(std::ptr::null_mut(), len, prot, libc::MAP_SHARED | libc::MAP_POPULATE, fd.as_raw_fd(), 0)
        };
        if p == libc::MAP_FAILED {
            return Err(bad_fd(&io::Error::last_os_error()));
        }
        let sync_fd = if kind_of(fd) == FdKind::DmaBuf { fd.try_clone_to_owned().ok() } else { None };
        Ok(Mapping { ptr: NonNull::new(p.cast()).expect("mmap returned NULL"), len, sync_fd })
    }

    /// Mapped length.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    fn sync(&self, flags: u64) {
        if let Some(fd) = &self.sync_fd {
            let arg = flags;
            // SAFETY: live dma-buf fd; DMA_BUF_IOCTL_SYNC reads one u64 through the pointer,
            // which points to a local that outlives the call. Failure only means the exporter
            // needs no cache maintenance.
            unsafe { libc::ioctl(fd.as_fd().as_raw_fd(), DMA_BUF_IOCTL_SYNC, &arg as *const u64) };
        }
    }

    /// Copy `src` to `off` (as the NIC's DMA write would). Panics outside the mapping.
    #[cfg(test)]
    pub(crate) fn write(&self, off: usize, src: &[u8]) {
        assert!(off.checked_add(src.len()).is_some_and(|end| end <= self.len), "write outside the mapping");
        self.sync(DMA_BUF_SYNC_START | DMA_BUF_SYNC_WRITE);
        // SAFETY: `off + src.len() <= len` (checked above), so the destination lies inside the
        // live mapping; `src` is a Rust slice, which cannot overlap memory this process maps
        // here only through this value.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), self.ptr.as_ptr().add(off), src.len()) };
        self.sync(DMA_BUF_SYNC_END | DMA_BUF_SYNC_WRITE);
    }

    /// Copy `dst.len()` bytes from `off` (as the NIC's DMA read would). Panics outside the
    /// mapping.
    pub(crate) fn read(&self, off: usize, dst: &mut [u8]) {
        assert!(off.checked_add(dst.len()).is_some_and(|end| end <= self.len), "read outside the mapping");
        self.sync(DMA_BUF_SYNC_START | DMA_BUF_SYNC_READ);
        // SAFETY: `off + dst.len() <= len` (checked above): the source lies inside the live
        // mapping; `dst` is an exclusive Rust slice and cannot overlap it.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.as_ptr().add(off), dst.as_mut_ptr(), dst.len()) };
        self.sync(DMA_BUF_SYNC_END | DMA_BUF_SYNC_READ);
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` describe a mapping made in `map` and not unmapped before.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn fd_checks_answer_like_dma_buf_get() {
        let f = std::fs::File::from(crate::sys::placeholder_fd().unwrap());
        f.set_len(3 * 4096).unwrap();
        assert_eq!(file_size(f.as_fd()), Ok(3 * 4096));
        let m = Mapping::map(f.as_fd(), 8192, true).unwrap();
        m.write(4000, b"abc");
        let mut b = [0u8; 3];
        m.read(4000, &mut b);
        assert_eq!(&b, b"abc");
        let (r, _w) = std::io::pipe().unwrap();
        assert_eq!(file_size(r.as_fd()), Err(errno::EINVAL), "a pipe is not a dma-buf");
        // SAFETY: no process can have this fd number open (above the kernel's `nr_open`
        // ceiling); the borrow only reaches fcntl(F_GETFD), which answers EBADF.
        let closed = unsafe { BorrowedFd::borrow_raw(i32::MAX - 10) };
        assert_eq!(file_size(closed), Err(errno::EBADF));
        assert_eq!(Mapping::map(f.as_fd(), 0, true).unwrap_err(), errno::EINVAL);
    }
}

/// Where one packet of a vectored receive goes: pool bytes (`len` at `off` of the mapping) or
/// host memory (a spilled packet's linear part).
pub(crate) enum Dest<'a> {
    Pool { off: usize, len: usize },
    Host(&'a mut [u8]),
}

impl Mapping {
    /// One non-blocking `recvmsg` from `fd` straight into `dests`, in order (as the NIC's DMA
    /// writes packets into the pool): the one copy TCP's receive makes. Panics when a pool
    /// destination lies outside the mapping.
    pub(crate) fn recv_into(&self, fd: BorrowedFd<'_>, dests: &mut [Dest<'_>]) -> io::Result<usize> {
        let iov: Vec<libc::iovec> = dests
            .iter_mut()
            .map(|d| match d {
                Dest::Pool { off, len } => {
                    assert!(off.checked_add(*len).is_some_and(|end| end <= self.len), "receive outside the mapping");
                    // SAFETY: `off + len <= self.len` (checked above): inside the live mapping.
                    libc::iovec { iov_base: unsafe { self.ptr.as_ptr().add(*off) }.cast(), iov_len: *len }
                }
                Dest::Host(b) => libc::iovec { iov_base: b.as_mut_ptr().cast(), iov_len: b.len() },
            })
            .collect();
        // SAFETY: an all-zero msghdr is valid.
        let mut mh: libc::msghdr = unsafe { std::mem::zeroed() };
        mh.msg_iov = iov.as_ptr() as *mut libc::iovec;
        mh.msg_iovlen = iov.len() as _;
        self.sync(DMA_BUF_SYNC_START | DMA_BUF_SYNC_WRITE);
        let r = loop {
            // SAFETY: live fd; every iovec points to writable memory of its length that stays
            // valid across the call: pool ranges inside this live mapping (reserved by the
            // pool for these packets; nothing in this process reads them until the fragments
            // are reported) and host slices borrowed exclusively through `dests`.
            let rc = unsafe { libc::recvmsg(fd.as_raw_fd(), &mut mh, libc::MSG_DONTWAIT) };
            if rc >= 0 {
                break Ok(rc as usize);
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                break Err(e);
            }
        };
        self.sync(DMA_BUF_SYNC_END | DMA_BUF_SYNC_WRITE);
        r
    }
}
