//! Host memory behind a file descriptor (the devmem data path: RX pools and TX buffers).
//!
//! - [`alloc_exportable`]: a memfd (sealed against shrinking and growing) mapped `MAP_SHARED`
//!   into a [`Region`] of kind `Host`. Its export is a udmabuf dma-buf over the memfd where
//!   `/dev/udmabuf` exists and accepts it ([`ExportKind::DmaBuf`]), else the memfd itself
//!   ([`ExportKind::Mappable`]: only the simulated kernel can use it).
//! - [`map_fd`]: a `Host` region over a shared mapping of bytes of any descriptor the process
//!   can map (a memfd, a Vulkan opaque fd backed by one, a dma-buf). The simulated NIC writes
//!   received payload into an RX pool and reads TX payload through such a region; the tests
//!   look at exported memory from the side with it.
//! - [`export`]: a fresh descriptor for a region either of them made.
//!
//! The pages are shared with whatever else maps the descriptor (a device, the simulator).
//! As with a device's staging memory, the other side may touch them only between the
//! operations that order it (a device's fenced operations, the transport's protocol).

use std::ffi::c_void;
use std::fmt;
use std::io;
use std::num::NonZeroUsize;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::ptr::NonNull;
use std::sync::{Arc, OnceLock};

use nix::errno::Errno;
use nix::fcntl::{FcntlArg, OFlag, SealFlag, fcntl, open};
use nix::sys::memfd::{MFdFlags, memfd_create};
use nix::sys::mman::{MapFlags, ProtFlags, mmap, munmap};
use nix::sys::stat::Mode;
use nix::unistd::{Whence, ftruncate, lseek};

use super::{MemKind, Region};
use crate::device::{ExportKind, Exported};
use crate::error::{Error, Result};

/// The udmabuf device node (CONFIG_UDMABUF).
pub const DEV_UDMABUF: &str = "/dev/udmabuf";

/// The reason [`export`] gives for host memory it did not make.
pub const NOT_BEHIND_FD: &str =
    "host memory from the heap is not behind a file descriptor; allocate it with alloc_exportable";

/// The host's page size.
pub fn page_size() -> usize {
    static PAGE: OnceLock<usize> = OnceLock::new();
    *PAGE.get_or_init(|| {
        // SAFETY: sysconf reads a constant of the system; it has no preconditions.
        let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        if p > 0 { p as usize } else { 4096 }
    })
}

/// A shared mapping of a descriptor, and what exporting memory inside it hands out. It is the
/// view and the keeper of the regions [`alloc_exportable`] and [`map_fd`] make: the mapping
/// goes (and the descriptor is closed) with the last of them.
pub struct FdMemory {
    base: NonNull<u8>,
    map_len: usize,
    /// Where the mapping starts in the descriptor (page-aligned).
    map_offset: u64,
    /// What [`export`] duplicates: the memfd, the udmabuf over it, or the mapped descriptor.
    export_fd: OwnedFd,
    kind: ExportKind,
    fd_len: u64,
}

// SAFETY: the mapping is plain shared memory, valid until `Drop`; this type never
// dereferences it (regions do, under their lock), so it may move and be shared across threads.
unsafe impl Send for FdMemory {}
// SAFETY: as above; nothing here is mutated after construction.
unsafe impl Sync for FdMemory {}

impl fmt::Debug for FdMemory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FdMemory")
            .field("fd", &self.export_fd.as_raw_fd())
            .field("kind", &self.kind)
            .field("fd_len", &self.fd_len)
            .field("map_offset", &self.map_offset)
            .field("map_len", &self.map_len)
            .finish()
    }
}

impl FdMemory {
    /// What the descriptor [`export`] hands out is.
    pub fn kind(&self) -> ExportKind {
        self.kind
    }

    /// The size of what the descriptor refers to.
    pub fn fd_len(&self) -> u64 {
        self.fd_len
    }

    /// Map `len` bytes (at least one page) of `fd` from the page-aligned `map_offset`. Not
    /// populated: a devmem RX pool is allocated before the kernel is asked to bind it, and
    /// where it refuses (most hosts) populating would only cost every communicator's init.
    fn map(fd: BorrowedFd<'_>, map_offset: u64, len: usize, writable: bool) -> io::Result<(NonNull<u8>, usize)> {
        let map_len = len.max(1);
        let prot = if writable { ProtFlags::PROT_READ | ProtFlags::PROT_WRITE } else { ProtFlags::PROT_READ };
        let off = libc::off_t::try_from(map_offset).map_err(|_| io::Error::from(Errno::EOVERFLOW))?;
        let size = NonZeroUsize::new(map_len).expect("at least one byte");
        // SAFETY: a fresh shared mapping chosen by the kernel (no address hint), so it aliases
        // none of our memory; it is unmapped exactly once, by `Drop`.
        let p = unsafe { mmap(None, size, prot, MapFlags::MAP_SHARED, fd, off) }?;
        Ok((p.cast(), map_len))
    }

    /// A region of `len` bytes at `at` in the mapping, with `mem` as its view and keeper.
    fn region(mem: Arc<FdMemory>, at: usize, len: usize, writable: bool) -> Region {
        debug_assert!(at + len <= mem.map_len);
        // SAFETY: `at + len` lies inside the mapping (callers map at least that much), which
        // stays mapped until the last clone of `mem` drops; the region holds one as keeper and
        // one as view. Other mappings of the same pages touch them only between the operations
        // that order them (module docs), as with staging memory.
        let ptr = unsafe { mem.base.as_ptr().add(at) };
        let keeper: Box<dyn std::any::Any + Send> = Box::new(mem.clone());
        let view: Arc<dyn std::any::Any + Send + Sync> = mem;
        // SAFETY: as above; CPU-accessible host memory for the region's life.
        unsafe { Region::from_device(ptr, len, MemKind::Host, writable, Some(keeper), Some(view)) }
    }
}

impl Drop for FdMemory {
    fn drop(&mut self) {
        // SAFETY: our own mapping, made by `map` with this length; every region over it held
        // an `Arc` to us, so none is left to touch it.
        if let Err(e) = unsafe { munmap(self.base.cast::<c_void>(), self.map_len) } {
            tracing::warn!("munmap of {} bytes of exportable memory: {e}", self.map_len);
        }
    }
}

fn sys(what: &str, e: Errno) -> Error {
    Error::system(what.to_string(), e.into())
}

/// `len` bytes of host memory behind a file descriptor, zeroed: a memfd of `len` rounded up
/// to whole pages (at least one), sealed against shrinking and growing, mapped shared. The
/// region has kind `Host`; the export starts at offset 0 and is a udmabuf dma-buf where
/// `/dev/udmabuf` takes the memfd, else a duplicate of the memfd.
pub fn alloc_exportable(len: usize) -> Result<(Region, Exported)> {
    let page = page_size();
    let size = len.max(1).checked_next_multiple_of(page).ok_or_else(|| Error::usage(format!("{len} bytes")))?;
    let memfd = memfd_create(c"devccl-exportable", MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING)
        .map_err(|e| sys("memfd_create", e))?;
    let off = libc::off_t::try_from(size).map_err(|_| Error::usage(format!("{len} bytes is too large")))?;
    ftruncate(&memfd, off).map_err(|e| sys(&format!("ftruncate of a memfd to {size} bytes"), e))?;
    fcntl(&memfd, FcntlArg::F_ADD_SEALS(SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW))
        .map_err(|e| sys("F_ADD_SEALS on a memfd", e))?;
    let (base, map_len) = FdMemory::map(memfd.as_fd(), 0, size, true)
        .map_err(|e| Error::system(format!("mmap of a {size}-byte memfd"), e))?;
    let (export_fd, kind) = match udmabuf::create(&memfd, size as u64) {
        Some(dmabuf) => (dmabuf, ExportKind::DmaBuf),
        None => (memfd, ExportKind::Mappable),
    };
    let mem = Arc::new(FdMemory { base, map_len, map_offset: 0, export_fd, kind, fd_len: size as u64 });
    let region = FdMemory::region(mem, 0, len, true);
    let exported = export(&region)?;
    Ok((region, exported))
}

/// A `Host` region over `len` bytes at `offset` of `fd` (anything the process can `mmap`
/// shared: a memfd, a Vulkan opaque fd backed by one, a dma-buf), mapped read-write when
/// `writable`. The descriptor is duplicated, so the caller may close its own; the region can
/// be exported again with [`export`].
pub fn map_fd(fd: BorrowedFd<'_>, offset: u64, len: usize, writable: bool) -> Result<Region> {
    let fd_len = lseek(fd, 0, Whence::SeekEnd).map_err(|e| sys("lseek(SEEK_END) on a descriptor to map", e))? as u64;
    let end = offset.checked_add(len as u64);
    if end.is_none_or(|end| end > fd_len) {
        return Err(Error::usage(format!("{len} bytes at offset {offset} lie outside the {fd_len}-byte descriptor")));
    }
    let export_fd = fd.try_clone_to_owned().map_err(|e| Error::system("dup of a descriptor to map", e))?;
    let kind = if is_dmabuf(fd) { ExportKind::DmaBuf } else { ExportKind::Mappable };
    let page = page_size() as u64;
    let map_offset = offset / page * page;
    let at = (offset - map_offset) as usize;
    let (base, map_len) = FdMemory::map(fd, map_offset, at + len, writable)
        .map_err(|e| Error::system(format!("mmap of {len} bytes at offset {offset} of a descriptor"), e))?;
    let mem = Arc::new(FdMemory { base, map_len, map_offset, export_fd, kind, fd_len });
    Ok(FdMemory::region(mem, at, len, writable))
}

/// A fresh descriptor for `region` (made by [`alloc_exportable`] or [`map_fd`]) with the
/// region's offset inside it. Other host memory answers [`Error::Unsupported`].
pub fn export(region: &Region) -> Result<Exported> {
    let mem = region.device_view().and_then(|v| v.downcast_ref::<FdMemory>());
    let Some(mem) = mem.filter(|_| region.kind().is_host()) else {
        let reason = match region.kind() {
            MemKind::Host => NOT_BEHIND_FD.to_string(),
            other => format!("the host device cannot export {other:?} memory; export it with its own device"),
        };
        return Err(Error::Unsupported { reason });
    };
    region.ensure_live()?;
    let at = region.addr().checked_sub(mem.base.as_ptr() as usize).filter(|at| at + region.len() <= mem.map_len);
    let at = at.ok_or_else(|| Error::Internal("exported region outside its mapping".into()))?;
    let fd = mem.export_fd.try_clone().map_err(|e| Error::system("dup of an exported descriptor", e))?;
    Ok(Exported { fd, offset: mem.map_offset + at as u64, fd_len: mem.fd_len, kind: mem.kind })
}

/// Where the process's shared mapping at `addr` (made by anyone: a driver's mapping of its
/// memory) lies in the file `fd` refers to: the byte offset in the file of the byte at `addr`.
/// [`Error::Unsupported`] when `addr` is not in a shared mapping of that very file (told by
/// `/proc/self/maps`: the mapping's inode and device against `fstat(fd)`).
pub fn mapped_offset(fd: BorrowedFd<'_>, addr: usize) -> Result<u64> {
    let st = nix::sys::stat::fstat(fd).map_err(|e| sys("fstat of a descriptor", e))?;
    let maps = std::fs::read_to_string("/proc/self/maps").map_err(|e| Error::system("read /proc/self/maps", e))?;
    let vma = maps.lines().filter_map(parse_maps_line).find(|m| m.start <= addr && addr < m.end);
    let Some(vma) = vma else {
        return Err(Error::Unsupported { reason: format!("address {addr:#x} is not mapped") });
    };
    let dev = st.st_dev as u64;
    // glibc's dev_t encoding (what fstat gives) against /proc's major:minor.
    let (major, minor) = (((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff), (dev & 0xff) | ((dev >> 12) & !0xff));
    if !vma.shared || vma.inode != st.st_ino as u64 || (vma.major, vma.minor) != (major, minor) {
        return Err(Error::Unsupported {
            reason: format!(
                "address {addr:#x} lies in {}, not in a shared mapping of the descriptor's file (inode {})",
                vma.line, st.st_ino
            ),
        });
    }
    Ok(vma.offset + (addr - vma.start) as u64)
}

/// One line of `/proc/self/maps`.
#[derive(Debug, PartialEq, Eq)]
struct Vma {
    start: usize,
    end: usize,
    shared: bool,
    offset: u64,
    major: u64,
    minor: u64,
    inode: u64,
    line: String,
}

/// `start-end perms offset major:minor inode [path]`, all hexadecimal but the inode.
fn parse_maps_line(line: &str) -> Option<Vma> {
    let mut f = line.split_ascii_whitespace();
    let (start, end) = f.next()?.split_once('-')?;
    let perms = f.next()?;
    let offset = u64::from_str_radix(f.next()?, 16).ok()?;
    let (major, minor) = f.next()?.split_once(':')?;
    let hex = |s: &str| u64::from_str_radix(s, 16).ok();
    Some(Vma {
        start: usize::from_str_radix(start, 16).ok()?,
        end: usize::from_str_radix(end, 16).ok()?,
        shared: perms.as_bytes().get(3) == Some(&b's'),
        offset,
        major: hex(major)?,
        minor: hex(minor)?,
        inode: f.next()?.parse().ok()?,
        line: line.to_string(),
    })
}

/// True when `fd` is a dma-buf (its `/proc/self/fdinfo` names an exporter).
pub fn is_dmabuf(fd: BorrowedFd<'_>) -> bool {
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd())).unwrap_or_default();
    info.lines().any(|l| l.starts_with("exp_name:"))
}

/// Host memory as a dma-buf through `/dev/udmabuf` (devmem-uapi §5.3).
/// The udmabuf ioctl (`/dev/udmabuf`, CONFIG_UDMABUF): host memory as a dma-buf.
pub mod udmabuf {
    use super::*;

    /// `struct udmabuf_create`.
    #[repr(C)]
    pub(super) struct Create {
        memfd: u32,
        flags: u32,
        offset: u64,
        size: u64,
    }

    /// `UDMABUF_FLAGS_CLOEXEC`.
    const CLOEXEC: u32 = 1;

    // UDMABUF_CREATE = _IOW('u', 0x42, struct udmabuf_create) = 0x40187542.
    nix::ioctl_write_ptr!(ioctl_create, b'u', 0x42, Create);

    /// `UDMABUF_CREATE` on the open udmabuf node `dev`: a dma-buf over the first `size`
    /// bytes of `memfd`, which must be sealed against shrinking (udmabuf refuses write seals).
    pub fn create_on(dev: BorrowedFd<'_>, memfd: BorrowedFd<'_>, size: u64) -> io::Result<OwnedFd> {
        let arg = Create { memfd: memfd.as_raw_fd() as u32, flags: CLOEXEC, offset: 0, size };
        // SAFETY: `dev` is an open descriptor and `arg` a `struct udmabuf_create` that outlives
        // the call; the kernel only reads it and returns a new descriptor.
        let fd = unsafe { ioctl_create(dev.as_raw_fd(), &arg) }.map_err(io::Error::from)?;
        // SAFETY: UDMABUF_CREATE returned a fresh descriptor that nobody else owns.
        Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) })
    }

    /// A udmabuf over all `size` bytes of `memfd` (sealed against shrinking), or `None` where
    /// there is no `/dev/udmabuf` or it refuses (the memfd itself is exported then).
    pub(super) fn create(memfd: &OwnedFd, size: u64) -> Option<OwnedFd> {
        if !Path::new(DEV_UDMABUF).exists() {
            return None;
        }
        let made = open(DEV_UDMABUF, OFlag::O_RDWR | OFlag::O_CLOEXEC, Mode::empty())
            .map_err(io::Error::from)
            .and_then(|dev| create_on(dev.as_fd(), memfd.as_fd(), size));
        match made {
            Ok(fd) => Some(fd),
            Err(e) => {
                tracing::debug!("{DEV_UDMABUF} refused {size} bytes ({e}); exporting the memfd itself");
                None
            }
        }
    }

    #[cfg(test)]
    #[test]
    fn ioctl_number_and_layout() {
        assert_eq!(std::mem::size_of::<Create>(), 24);
        assert_eq!(nix::request_code_write!(b'u', 0x42, std::mem::size_of::<Create>()), 0x4018_7542);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::{Device, HostDevice};

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
    }

    #[test]
    fn exported_memory_is_the_regions_both_ways() {
        let page = page_size();
        for len in [0usize, 1, 4095, 4096, (1 << 20) + 3] {
            let (r, e) = HostDevice.alloc_exportable(len).unwrap();
            assert_eq!((r.len(), r.kind()), (len, &MemKind::Host));
            assert_eq!(e.offset, 0);
            assert_eq!(e.fd_len, len.max(1).next_multiple_of(page) as u64, "len {len}");
            let udmabuf = Path::new(DEV_UDMABUF).exists();
            if !udmabuf {
                assert_eq!(e.kind, ExportKind::Mappable);
            }
            assert_eq!(lseek(e.fd.as_fd(), 0, Whence::SeekEnd).unwrap() as u64, e.fd_len);
            assert_eq!(r.full().to_vec().unwrap(), vec![0u8; len], "zeroed");
            // The exporter's side writes, a separate mapping of the fd reads; then back.
            let side = map_fd(e.fd.as_fd(), e.offset, len, true).unwrap();
            assert!(!side.same(&r) && (len == 0 || side.addr() != r.addr()), "a separate mapping");
            let a = pattern(len, 1);
            r.full().with_bytes_mut(|b| b.copy_from_slice(&a)).unwrap();
            assert_eq!(side.full().to_vec().unwrap(), a);
            let b = pattern(len, 99);
            side.full().with_bytes_mut(|s| s.copy_from_slice(&b)).unwrap();
            assert_eq!(r.full().to_vec().unwrap(), b);
            // A second export: a new descriptor for the same memory.
            let e2 = HostDevice.export(&r).unwrap();
            assert_ne!(e2.fd.as_raw_fd(), e.fd.as_raw_fd());
            assert_eq!((e2.offset, e2.fd_len, e2.kind), (e.offset, e.fd_len, e.kind));
            let side2 = map_fd(e2.fd.as_fd(), 0, len, false).unwrap();
            assert_eq!(side2.full().to_vec().unwrap(), b);
            assert!(side2.full().with_bytes_mut(|_| ()).is_err(), "mapped read-only");
            // The mapped region exports too (a duplicate of the descriptor it maps).
            let e3 = export(&side).unwrap();
            assert_eq!((e3.offset, e3.fd_len, e3.kind), (0, e.fd_len, e.kind));
            if e.kind == ExportKind::Mappable {
                // Sealed: the memfd can neither shrink nor grow.
                let seals = fcntl(&e.fd, FcntlArg::F_GET_SEALS).unwrap();
                let want = SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW;
                assert!(SealFlag::from_bits_truncate(seals).contains(want), "{seals:#x}");
                assert!(ftruncate(&e.fd, 0).is_err() && ftruncate(&e.fd, (e.fd_len * 2) as i64).is_err());
            }
            // The memory outlives the region while a descriptor is held.
            drop((r, side, side2));
            let later = map_fd(e.fd.as_fd(), 0, len, false).unwrap();
            assert_eq!(later.full().to_vec().unwrap(), b);
        }
    }

    #[test]
    fn offsets_inside_the_descriptor() {
        let len = 3 * page_size() + 100;
        let (r, e) = alloc_exportable(len).unwrap();
        let data = pattern(len, 7);
        r.full().with_bytes_mut(|b| b.copy_from_slice(&data)).unwrap();
        // Unaligned windows of the descriptor: each maps the bytes at that offset.
        for (off, n) in [(0usize, 1usize), (5, 4091), (4095, 2), (4096, 4096), (len - 1, 1), (len, 0)] {
            let w = map_fd(e.fd.as_fd(), off as u64, n, true).unwrap();
            assert_eq!(w.full().to_vec().unwrap(), &data[off..off + n], "window {off}+{n}");
            let x = export(&w).unwrap();
            assert_eq!(x.offset, off as u64);
            if n > 0 {
                w.slice(n - 1..n).with_bytes_mut(|b| b[0] = 0xee).unwrap();
                assert_eq!(r.slice(off + n - 1..off + n).to_vec().unwrap(), [0xee]);
                r.slice(off + n - 1..off + n).with_bytes_mut(|b| b[0] = data[off + n - 1]).unwrap();
            }
        }
        let fd_len = e.fd_len as usize;
        assert!(matches!(map_fd(e.fd.as_fd(), 1, fd_len, false), Err(Error::InvalidUsage(_))));
        assert!(matches!(map_fd(e.fd.as_fd(), u64::MAX, 2, false), Err(Error::InvalidUsage(_))));
    }

    #[test]
    fn where_a_mapping_lies_in_its_file() {
        let page = page_size();
        let (r, e) = alloc_exportable(3 * page).unwrap();
        assert_eq!(mapped_offset(e.fd.as_fd(), r.addr()).unwrap(), 0);
        assert_eq!(mapped_offset(e.fd.as_fd(), r.addr() + page + 5).unwrap(), page as u64 + 5);
        let w = map_fd(e.fd.as_fd(), page as u64 + 7, 100, false).unwrap();
        assert_eq!(mapped_offset(e.fd.as_fd(), w.addr()).unwrap(), page as u64 + 7);
        // Another file's mapping, heap memory: not this file.
        let (other, oe) = alloc_exportable(10).unwrap();
        assert!(matches!(mapped_offset(e.fd.as_fd(), other.addr()), Err(Error::Unsupported { .. })));
        assert!(mapped_offset(oe.fd.as_fd(), other.addr()).is_ok());
        let heap = Region::alloc(64);
        let err = mapped_offset(e.fd.as_fd(), heap.addr()).unwrap_err();
        assert!(err.to_string().contains("not in a shared mapping") || err.to_string().contains("not mapped"), "{err}");
        let line = "7f12a4000000-7f12a4004000 rw-s 00001000 00:01 4731                       /memfd:x (deleted)";
        let v = parse_maps_line(line).unwrap();
        assert_eq!(
            (v.start, v.end, v.shared, v.offset, v.major, v.minor, v.inode),
            (0x7f12a4000000, 0x7f12a4004000, true, 0x1000, 0, 1, 4731)
        );
        assert!(!parse_maps_line("55d0c0a00000-55d0c0a21000 rw-p 00000000 00:00 0   [heap]").unwrap().shared);
    }

    #[test]
    fn memory_not_behind_a_descriptor_is_refused() {
        for r in [Region::alloc(64), Region::from_vec(vec![1u8; 10]), HostDevice.alloc(4096).unwrap()] {
            match HostDevice.export(&r).unwrap_err() {
                Error::Unsupported { reason } => assert_eq!(reason, NOT_BEHIND_FD),
                other => panic!("expected Unsupported, got {other:?}"),
            }
        }
        let mut buf = [0u8; 8];
        Region::scoped(&mut buf, |r| assert!(matches!(HostDevice.export(r), Err(Error::Unsupported { .. }))));
        // SAFETY: a device-kind region the CPU never dereferences; only its kind is looked at.
        let dev = unsafe { Region::from_raw(0x1000 as *mut u8, 64, MemKind::Cuda { device: 0 }, true, None) };
        let e = HostDevice.export(&dev).unwrap_err();
        assert!(e.to_string().contains("its own device"), "{e}");
        // A revoked region cannot be exported.
        let (r, _e) = alloc_exportable(10).unwrap();
        r.revoke();
        assert!(matches!(export(&r), Err(Error::Internal(_))));
    }

    #[test]
    fn the_host_device_computes_on_exportable_memory() {
        // The simulated NIC writes fragments through its own mapping; the host device gathers.
        let (pool, e) = HostDevice.alloc_exportable(10_000).unwrap();
        let nic = map_fd(e.fd.as_fd(), e.offset, 10_000, true).unwrap();
        nic.slice(3..7).with_bytes_mut(|b| b.copy_from_slice(b"DEFG")).unwrap();
        nic.slice(9000..9003).with_bytes_mut(|b| b.copy_from_slice(b"ABC")).unwrap();
        let frags = [
            crate::transport::Fragment { src_off: 9000, len: 3, dst_off: 0 },
            crate::transport::Fragment { src_off: 3, len: 4, dst_off: 3 },
        ];
        let dst = Region::alloc(7);
        HostDevice.gather(&dst.full(), crate::device::Scattered { pool: &pool, frags: &frags }).unwrap();
        assert_eq!(dst.full().to_vec().unwrap(), b"ABCDEFG");
        // And the TX direction: the device writes, the NIC's mapping reads.
        HostDevice.copy(&pool.slice(100..107), &dst.full()).unwrap();
        assert_eq!(nic.slice(100..107).to_vec().unwrap(), b"ABCDEFG");
    }
}
