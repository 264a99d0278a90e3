//! The shared memory of one connection: a memfd mapped `MAP_SHARED` by both processes,
//! holding two single-producer/single-consumer byte rings and the counters that coordinate
//! them. This is the crate's only module with `unsafe` code (DESIGN §8): the mapping itself,
//! the atomics that live in it, the byte copies into and out of it, and adopting descriptors
//! received with `SCM_RIGHTS`.
//!
//! Layout of the memfd (offsets in bytes):
//!
//! ```text
//!      0  control page, 4096 bytes
//!           0  8 magic "DVCSHM\0\0" | 8 4 layout version | 12 4 reserved | 16 8 ring bytes
//!         128  ring 0, producer line: tail (u64) at +0, consumer-wake-at (u64) at +8
//!         256  ring 0, consumer line: head (u64) at +0, producer-wake-at (u64) at +8
//!         384  ring 1, producer line
//!         512  ring 1, consumer line
//!   4096         ring 0 data: connector → acceptor, `ring` bytes
//!   4096 + ring  ring 1 data: acceptor → connector, `ring` bytes
//! ```
//!
//! `tail` and `head` count bytes since the connection began (they never wrap in practice: a
//! u64 of bytes); a byte's place in the ring is its count modulo the ring size, a power of
//! two. Each counter sits on its own 128-byte line (two 64-byte lines, because the adjacent-
//! line prefetcher fetches in pairs) so the producer's stores to `tail` do not bounce the
//! line the consumer stores `head` to. A sleeping side leaves its wake-up condition ("ring
//! me when your counter reaches X", 0 for none) on the *other* side's line, next to the
//! counter that side publishes, so checking it costs the publisher no extra cache miss.
//! Each side's authoritative copy of its own counter is
//! kept privately by the connection; values read from the peer are validated before use, so
//! a faulty peer can corrupt message bytes (which the frame header checksum and length
//! checks catch) but never make this process read or write outside the mapping.

use std::num::NonZeroUsize;
use std::os::fd::{AsFd, FromRawFd, OwnedFd, RawFd};
use std::ptr::NonNull;
use std::sync::atomic::AtomicU64;

use nix::fcntl::{FallocateFlags, FcntlArg, SealFlag, fallocate, fcntl};
use nix::sys::memfd::{MFdFlags, memfd_create};
use nix::sys::mman::{MapFlags, ProtFlags, mmap, munmap};
use nix::sys::stat::fstat;

/// Size of the control page in front of the rings.
pub(crate) const CTRL_BYTES: usize = 4096;
/// Distance between counters (two cache lines; see the module docs).
const LINE: usize = 128;
const MAGIC: [u8; 8] = *b"DVCSHM\0\0";
const LAYOUT_VERSION: u32 = 1;
/// Smallest ring accepted (one page).
pub(crate) const MIN_RING: usize = 4096;
/// Largest ring accepted (1 GiB: far beyond any useful size, a bound on what a peer may
/// ask this process to map).
pub(crate) const MAX_RING: usize = 1 << 30;

/// Which of the two rings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RingId {
    /// Connector → acceptor.
    ToAcceptor = 0,
    /// Acceptor → connector.
    ToConnector = 1,
}

/// Total memfd size for rings of `ring` bytes.
pub(crate) fn mapping_len(ring: usize) -> usize {
    CTRL_BYTES + 2 * ring
}

/// Check a ring size: a power of two within `MIN_RING..=MAX_RING`.
pub(crate) fn check_ring_size(ring: usize) -> Result<(), String> {
    if !ring.is_power_of_two() || !(MIN_RING..=MAX_RING).contains(&ring) {
        return Err(format!("ring size {ring} is not a power of two between {MIN_RING} and {MAX_RING} bytes"));
    }
    Ok(())
}

/// A connection's shared mapping. Unmapped on drop.
#[derive(Debug)]
pub(crate) struct Mapping {
    base: NonNull<u8>,
    len: usize,
    ring: usize,
}

// SAFETY: the mapping is plain shared memory owned by this value; it is not tied to the
// thread that created it, and all access to it goes through `&self` methods whose shared
// parts are atomics or raw byte copies (see `write`/`read`).
unsafe impl Send for Mapping {}

impl Mapping {
    /// Connector side: create the memfd, size and seal it, map it and write the control
    /// page. Returns the mapping and the memfd to pass to the peer.
    pub(crate) fn create(ring: usize) -> std::io::Result<(Mapping, OwnedFd)> {
        check_ring_size(ring).map_err(std::io::Error::other)?;
        let len = mapping_len(ring);
        let fd = memfd_create(c"devccl-shm", MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING)?;
        nix::unistd::ftruncate(&fd, len as i64)?;
        // Allocate the pages now: a memory limit then fails this call cleanly, instead of
        // turning a later first touch (here or in the peer) into SIGBUS.
        fallocate(&fd, FallocateFlags::empty(), 0, len as i64)?;
        // Fixed size from now on: the acceptor checks for SHRINK before mapping, since a
        // file shrunk under a live mapping turns the next access into SIGBUS.
        fcntl(&fd, FcntlArg::F_ADD_SEALS(SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_SEAL))?;
        let map = Mapping::map(&fd, len, ring)?;
        // SAFETY: the control page lies inside the fresh mapping (len > CTRL_BYTES), nobody
        // else has the memfd yet, and the bytes written are plain data.
        unsafe {
            let p = map.base.as_ptr();
            std::ptr::copy_nonoverlapping(MAGIC.as_ptr(), p, 8);
            std::ptr::copy_nonoverlapping(LAYOUT_VERSION.to_ne_bytes().as_ptr(), p.add(8), 4);
            std::ptr::copy_nonoverlapping((ring as u64).to_ne_bytes().as_ptr(), p.add(16), 8);
        }
        Ok((map, fd))
    }

    /// Acceptor side: validate the peer's memfd (size, seals, control page) and map it.
    /// The error says what was wrong, for the rejection log.
    pub(crate) fn open(fd: &OwnedFd, ring: usize) -> Result<Mapping, String> {
        check_ring_size(ring)?;
        let len = mapping_len(ring);
        let st = fstat(fd).map_err(|e| format!("fstat on the shared-memory descriptor: {e}"))?;
        if (st.st_mode & libc::S_IFMT) != libc::S_IFREG {
            return Err("the shared-memory descriptor is not a memfd (not a regular file)".into());
        }
        if st.st_size != len as i64 {
            return Err(format!("shared-memory file has {} bytes, the setup message implies {len}", st.st_size));
        }
        let seals = fcntl(fd, FcntlArg::F_GET_SEALS)
            .map_err(|e| format!("the shared-memory descriptor is not a sealable memfd: {e}"))?;
        if seals & SealFlag::F_SEAL_SHRINK.bits() == 0 {
            return Err("the shared-memory file is not sealed against shrinking".into());
        }
        let map = Mapping::map(fd, len, ring).map_err(|e| format!("mmap: {e}"))?;
        let mut head = [0u8; 24];
        // SAFETY: 24 bytes at the start of a mapping of at least CTRL_BYTES; copied out as
        // plain bytes (the peer may be writing them, which can only yield wrong values,
        // checked below).
        unsafe { std::ptr::copy_nonoverlapping(map.base.as_ptr(), head.as_mut_ptr(), 24) };
        if head[0..8] != MAGIC {
            return Err(format!("bad magic {:02x?} in the shared control page", &head[0..8]));
        }
        let version = u32::from_ne_bytes(head[8..12].try_into().expect("4 bytes"));
        if version != LAYOUT_VERSION {
            return Err(format!("shared layout version {version} (this build speaks {LAYOUT_VERSION})"));
        }
        let r = u64::from_ne_bytes(head[16..24].try_into().expect("8 bytes"));
        if r != ring as u64 {
            return Err(format!("control page says rings of {r} bytes, the setup message {ring}"));
        }
        Ok(map)
    }

    fn map(fd: &OwnedFd, len: usize, ring: usize) -> std::io::Result<Mapping> {
        let nz = NonZeroUsize::new(len).ok_or_else(|| std::io::Error::other("empty mapping"))?;
        // SAFETY: a fresh shared mapping of a file we hold, at an address the kernel picks,
        // so it aliases no Rust object. MAP_POPULATE faults the pages in now rather than on
        // the data path.
        let base = unsafe {
            mmap(
                None,
                nz,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED | MapFlags::MAP_POPULATE,
                fd.as_fd(),
                0,
            )
        }?;
        Ok(Mapping { base: base.cast(), len, ring })
    }

    /// Ring size in bytes.
    pub(crate) fn ring_bytes(&self) -> usize {
        self.ring
    }

    fn u64_at(&self, off: usize) -> &AtomicU64 {
        debug_assert!(off + 8 <= CTRL_BYTES && off.is_multiple_of(8));
        // SAFETY: `off` is one of the fixed, 8-aligned offsets inside the control page (the
        // mapping is page-aligned), the memory lives as long as `self`, and it is only ever
        // accessed atomically, by both processes.
        unsafe { AtomicU64::from_ptr(self.base.as_ptr().add(off).cast::<u64>()) }
    }

    fn producer_line(r: RingId) -> usize {
        LINE + (r as usize) * 2 * LINE
    }

    fn consumer_line(r: RingId) -> usize {
        Mapping::producer_line(r) + LINE
    }

    /// Bytes ever written into ring `r` (stored by its producer).
    pub(crate) fn tail(&self, r: RingId) -> &AtomicU64 {
        self.u64_at(Mapping::producer_line(r))
    }

    /// Set by `r`'s consumer before it sleeps waiting for data: the tail at which the
    /// producer must ring it (0: not sleeping).
    pub(crate) fn consumer_wake_at(&self, r: RingId) -> &AtomicU64 {
        self.u64_at(Mapping::producer_line(r) + 8)
    }

    /// Bytes ever consumed from ring `r` (stored by its consumer).
    pub(crate) fn head(&self, r: RingId) -> &AtomicU64 {
        self.u64_at(Mapping::consumer_line(r))
    }

    /// Set by `r`'s producer before it sleeps waiting for space: the head at which the
    /// consumer must ring it (0: not sleeping).
    pub(crate) fn producer_wake_at(&self, r: RingId) -> &AtomicU64 {
        self.u64_at(Mapping::consumer_line(r) + 8)
    }

    fn data(&self, r: RingId) -> *mut u8 {
        // SAFETY: both rings lie inside the mapping: CTRL_BYTES + 2 * ring == len.
        unsafe { self.base.as_ptr().add(CTRL_BYTES + (r as usize) * self.ring) }
    }

    /// Copy `src` into ring `r` starting at stream position `pos`, wrapping at the end.
    /// The caller (the producer) owns those bytes: they lie between the consumer's head and
    /// head + ring.
    pub(crate) fn write(&self, r: RingId, pos: u64, src: &[u8]) {
        assert!(src.len() <= self.ring, "write larger than the ring");
        let off = (pos as usize) & (self.ring - 1);
        let first = src.len().min(self.ring - off);
        let d = self.data(r);
        // SAFETY: `off + first <= ring` and `src.len() - first <= off`, so both copies stay
        // inside ring `r`; `src` is process-private memory, so the ranges do not overlap.
        // No reference to ring memory is ever formed: the peer process may touch these bytes
        // only if it violates the head/tail protocol, which can garble the data it will read
        // but is no memory-safety hazard for this process (plain bytes, no invariants).
        unsafe {
            std::ptr::copy_nonoverlapping(src.as_ptr(), d.add(off), first);
            std::ptr::copy_nonoverlapping(src.as_ptr().add(first), d, src.len() - first);
        }
    }

    /// Copy `dst.len()` bytes out of ring `r` starting at stream position `pos`, wrapping
    /// at the end. The caller (the consumer) owns those bytes: the producer published them
    /// (release store of `tail`, acquired by the caller) and will not reuse them before the
    /// caller advances `head` past them.
    /// Look at the `len` published bytes of ring `r` from `pos` in place: `f` gets them as
    /// one or two slices (two when they wrap at the ring's end).
    pub(crate) fn with_published<R>(&self, r: RingId, pos: u64, len: usize, f: impl FnOnce(&[u8], &[u8]) -> R) -> R {
        assert!(len <= self.ring, "view larger than the ring");
        let off = (pos as usize) & (self.ring - 1);
        let first = len.min(self.ring - off);
        let s = self.data(r);
        // SAFETY: both ranges lie inside ring `r` of the live mapping. The caller passes
        // published bytes (`pos..pos+len` below the producer's tail, above our head): the
        // producer does not write them again until we advance the head, which cannot happen
        // while these borrows live (`f` returns first). A misbehaving peer writing anyway
        // can only change the values read, never the memory's validity.
        let (a, b) =
            unsafe { (std::slice::from_raw_parts(s.add(off), first), std::slice::from_raw_parts(s, len - first)) };
        f(a, b)
    }

    pub(crate) fn read(&self, r: RingId, pos: u64, dst: &mut [u8]) {
        assert!(dst.len() <= self.ring, "read larger than the ring");
        let off = (pos as usize) & (self.ring - 1);
        let first = dst.len().min(self.ring - off);
        let s = self.data(r);
        // SAFETY: as in `write`, with the copy direction reversed; `dst` is private memory
        // (exclusively borrowed), the source ranges stay inside ring `r`.
        unsafe {
            std::ptr::copy_nonoverlapping(s.add(off), dst.as_mut_ptr(), first);
            std::ptr::copy_nonoverlapping(s, dst.as_mut_ptr().add(first), dst.len() - first);
        }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `base..base+len` is the mapping made in `map`, unmapped exactly once here;
        // no reference into it outlives `self` (the atomics borrow `self`).
        if let Err(e) = unsafe { munmap(self.base.cast(), self.len) } {
            tracing::warn!("munmap of the shared rings failed: {e}");
        }
    }
}

/// Take ownership of a descriptor that `recvmsg` just installed from an `SCM_RIGHTS`
/// message.
pub(crate) fn adopt_received_fd(raw: RawFd) -> OwnedFd {
    // SAFETY: the kernel installed `raw` in this process's table while receiving the
    // message; nothing else knows the number, so this is its only owner and it is closed
    // exactly once, when the OwnedFd drops.
    unsafe { OwnedFd::from_raw_fd(raw) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    #[test]
    fn create_open_and_wrap() {
        let (a, fd) = Mapping::create(4096).unwrap();
        let b = Mapping::open(&fd, 4096).unwrap();
        assert!(Mapping::open(&fd, 8192).unwrap_err().contains("bytes"));
        // A write straddling the end of the ring comes out whole on the other mapping.
        let src: Vec<u8> = (0..1000u32).map(|i| i as u8).collect();
        a.write(RingId::ToConnector, 4096 * 3 + 3600, &src);
        let mut dst = vec![0u8; 1000];
        b.read(RingId::ToConnector, 4096 * 7 + 3600, &mut dst);
        assert_eq!(dst, src);
        a.tail(RingId::ToAcceptor).store(77, Ordering::SeqCst);
        assert_eq!(b.tail(RingId::ToAcceptor).load(Ordering::SeqCst), 77);
        assert_eq!(b.head(RingId::ToAcceptor).load(Ordering::SeqCst), 0);
        b.consumer_wake_at(RingId::ToConnector).store(12345, Ordering::SeqCst);
        assert_eq!(a.consumer_wake_at(RingId::ToConnector).load(Ordering::SeqCst), 12345);
        assert_eq!(a.producer_wake_at(RingId::ToConnector).load(Ordering::SeqCst), 0);
        // Every counter has its own place.
        let all = [
            a.tail(RingId::ToAcceptor),
            a.consumer_wake_at(RingId::ToAcceptor),
            a.head(RingId::ToAcceptor),
            a.producer_wake_at(RingId::ToAcceptor),
            a.tail(RingId::ToConnector),
            a.consumer_wake_at(RingId::ToConnector),
            a.head(RingId::ToConnector),
            a.producer_wake_at(RingId::ToConnector),
        ];
        for (i, x) in all.iter().enumerate() {
            x.store(i as u64 + 100, Ordering::SeqCst);
        }
        for (i, x) in all.iter().enumerate() {
            assert_eq!(x.load(Ordering::SeqCst), i as u64 + 100);
        }
    }

    #[test]
    fn open_rejects_foreign_files() {
        assert!(check_ring_size(3000).is_err());
        assert!(check_ring_size(2048).is_err());
        assert!(check_ring_size(1 << 31).is_err());
        // An unsealed memfd of the right size: refused (it could shrink under the mapping).
        let fd = memfd_create(c"t", MFdFlags::MFD_CLOEXEC).unwrap();
        nix::unistd::ftruncate(&fd, mapping_len(4096) as i64).unwrap();
        assert!(Mapping::open(&fd, 4096).unwrap_err().contains("seal"));
        // Sealed but never initialised: bad magic.
        let fd = memfd_create(c"t", MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING).unwrap();
        nix::unistd::ftruncate(&fd, mapping_len(4096) as i64).unwrap();
        fcntl(&fd, FcntlArg::F_ADD_SEALS(SealFlag::F_SEAL_SHRINK)).unwrap();
        assert!(Mapping::open(&fd, 4096).unwrap_err().contains("magic"));
        // Not a regular file at all.
        let ev = nix::sys::eventfd::EventFd::new().unwrap();
        let owned: OwnedFd = ev.as_fd().try_clone_to_owned().unwrap();
        assert!(Mapping::open(&owned, 4096).is_err());
    }
}
