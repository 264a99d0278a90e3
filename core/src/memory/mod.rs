//! Memory regions: where a collective's bytes live, and who may touch them when.
//!
//! A [`Region`] is a view of memory (host, CUDA device, or a dma-buf) that transports and the
//! executor share. Transports queue requests that refer to a [`RegionSlice`] and touch its
//! bytes later, inside their own progress calls. Soundness rests on one rule: memory is only
//! dereferenced through [`Region::with_bytes`] / [`Region::with_bytes_mut`], which hold the
//! region's lock and check that the region has not been *revoked*. A region made from a
//! borrowed slice ([`Region::scoped`]) is revoked before the borrow ends, so a transport that
//! still holds a request after the collective returned (after an error, say) finds the
//! region dead and reports an error instead of writing into freed memory.
//!
//! This module is one of the few places in devccl with `unsafe` code; each block says why it
//! is sound.

use std::any::Any;
use std::fmt;
use std::ops::Range;
use std::ptr::NonNull;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::error::{Error, Result};

pub mod fd;

/// What kind of memory a region is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemKind {
    /// Ordinary host memory the CPU can read and write.
    Host,
    /// CUDA device memory (not dereferenceable by the CPU).
    Cuda {
        /// CUDA device ordinal.
        device: i32,
    },
    /// A Vulkan buffer (device-local memory of Vulkan device `device`; the region's address
    /// is not a pointer, offsets are relative to the buffer).
    Vulkan {
        /// Index of the device in devccl's Vulkan device list.
        device: u32,
    },
    /// A dma-buf (fd + offset); the CPU cannot assume it can map it.
    DmaBuf {
        /// The dma-buf file descriptor (owned elsewhere).
        fd: i32,
        /// Offset of this region inside the dma-buf.
        offset: u64,
    },
}

impl MemKind {
    /// True when the CPU may dereference the memory.
    pub fn is_host(&self) -> bool {
        matches!(self, MemKind::Host)
    }

    /// The device that computes on this memory (`None` for dma-bufs, which are not a compute
    /// device of their own).
    pub fn device(&self) -> Option<DeviceId> {
        match self {
            MemKind::Host => Some(DeviceId::Host),
            MemKind::Cuda { device } => Some(DeviceId::Cuda(*device as u32)),
            MemKind::Vulkan { device } => Some(DeviceId::Vulkan(*device)),
            MemKind::DmaBuf { .. } => None,
        }
    }
}

/// A compute device: where reductions on a region run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DeviceId {
    /// The CPU.
    Host,
    /// CUDA device by ordinal.
    Cuda(u32),
    /// Vulkan device by index in devccl's device list.
    Vulkan(u32),
}

impl DeviceId {
    /// True for the CPU.
    pub fn is_host(self) -> bool {
        self == DeviceId::Host
    }

    /// The memory kind of this device's own (device-local) memory.
    pub fn mem_kind(self) -> MemKind {
        match self {
            DeviceId::Host => MemKind::Host,
            DeviceId::Cuda(d) => MemKind::Cuda { device: d as i32 },
            DeviceId::Vulkan(d) => MemKind::Vulkan { device: d },
        }
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceId::Host => f.write_str("host"),
            DeviceId::Cuda(d) => write!(f, "cuda:{d}"),
            DeviceId::Vulkan(d) => write!(f, "vulkan:{d}"),
        }
    }
}

impl std::str::FromStr for DeviceId {
    type Err = Error;

    /// `host`, `cpu`, `cuda`, `cuda:N`, `vulkan`, `vulkan:N`.
    fn from_str(s: &str) -> Result<DeviceId> {
        let s = s.trim().to_ascii_lowercase();
        let (name, idx) = match s.split_once(':') {
            Some((n, i)) => {
                let i = i.parse::<u32>().map_err(|_| Error::usage(format!("device '{s}': '{i}' is not an index")))?;
                (n.to_string(), i)
            }
            None => (s.clone(), 0),
        };
        match name.as_str() {
            "host" | "cpu" => Ok(DeviceId::Host),
            "cuda" | "gpu" => Ok(DeviceId::Cuda(idx)),
            "vulkan" | "vk" => Ok(DeviceId::Vulkan(idx)),
            _ => Err(Error::usage(format!("unknown device '{s}' (expected host, cuda[:N] or vulkan[:N])"))),
        }
    }
}

struct Inner {
    ptr: NonNull<u8>,
    len: usize,
    kind: MemKind,
    writable: bool,
    /// `true` while the memory may be touched; set to `false` by revocation.
    alive: Mutex<bool>,
    /// Owns the memory for regions made from owned buffers (dropped with the region).
    keeper: Mutex<Option<Box<dyn Any + Send>>>,
    /// A device backend's handle on this memory (its buffer object, or the fact that host
    /// memory is pinned/mapped for it); see [`Region::device_view`].
    view: Option<Arc<dyn Any + Send + Sync>>,
}

// SAFETY: the raw pointer is only dereferenced under `alive`'s lock (see module docs), so
// sharing the handle between threads cannot create unsynchronised access.
unsafe impl Send for Inner {}
// SAFETY: as above; every access goes through the mutex.
unsafe impl Sync for Inner {}

/// A shared handle to a region of memory. Cloning is cheap (reference count).
#[derive(Clone)]
pub struct Region(Arc<Inner>);

impl fmt::Debug for Region {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Region")
            .field("ptr", &self.0.ptr)
            .field("len", &self.0.len)
            .field("kind", &self.0.kind)
            .field("writable", &self.0.writable)
            .finish()
    }
}

/// 64-byte aligned storage unit for scratch buffers.
#[derive(Clone, Copy, bytemuck::Zeroable, bytemuck::Pod)]
#[repr(C, align(64))]
struct Line([u8; 64]);

impl Region {
    /// A region over memory the caller vouches for.
    ///
    /// # Safety
    /// `ptr..ptr+len` must stay valid (and, for host memory with `writable`, writable and not
    /// accessed by anyone else) until [`Region::revoke`] is called or the last clone of the
    /// region is dropped; `keeper`, if any, is dropped then (use it to own the memory).
    pub unsafe fn from_raw(
        ptr: *mut u8,
        len: usize,
        kind: MemKind,
        writable: bool,
        keeper: Option<Box<dyn Any + Send>>,
    ) -> Region {
        // SAFETY: forwarded contract.
        unsafe { Region::from_device(ptr, len, kind, writable, keeper, None) }
    }

    /// Like [`Region::from_raw`], with a device backend's handle attached (its buffer object
    /// for device memory, or a marker that host memory is pinned or mapped for the device).
    /// For device kinds `ptr` is the device address (CUDA) or an opaque base (Vulkan) and is
    /// never dereferenced by the CPU.
    ///
    /// # Safety
    /// As for [`Region::from_raw`]; for host memory, `ptr..ptr+len` must be CPU-accessible.
    pub unsafe fn from_device(
        ptr: *mut u8,
        len: usize,
        kind: MemKind,
        writable: bool,
        keeper: Option<Box<dyn Any + Send>>,
        view: Option<Arc<dyn Any + Send + Sync>>,
    ) -> Region {
        let ptr = NonNull::new(ptr).unwrap_or(NonNull::dangling());
        Region(Arc::new(Inner { ptr, len, kind, writable, alive: Mutex::new(true), keeper: Mutex::new(keeper), view }))
    }

    /// The device backend's handle attached at creation, if any (backends downcast it to
    /// their own buffer type).
    pub fn device_view(&self) -> Option<&Arc<dyn Any + Send + Sync>> {
        self.0.view.as_ref()
    }

    /// Fails once the region was revoked: device backends check this before they queue work
    /// on the memory (the executor waits for queued work before a call returns).
    pub fn ensure_live(&self) -> Result<()> {
        self.live().map(|_| ())
    }

    /// A zeroed host region of `len` bytes, 64-byte aligned (scratch, staging).
    pub fn alloc(len: usize) -> Region {
        let mut v: Vec<Line> = vec![Line([0; 64]); len.div_ceil(64)];
        let ptr = v.as_mut_ptr().cast::<u8>();
        // SAFETY: the Vec's heap block does not move when the Vec is moved into the keeper,
        // it lives as long as the region, and nobody else can reach it.
        unsafe { Region::from_raw(ptr, len, MemKind::Host, true, Some(Box::new(v))) }
    }

    /// A host region that owns `v`. Get it back with [`Region::into_vec`].
    pub fn from_vec<T: bytemuck::Pod + Send>(mut v: Vec<T>) -> Region {
        let len = std::mem::size_of_val(v.as_slice());
        let ptr = v.as_mut_ptr().cast::<u8>();
        // SAFETY: as in `alloc`: the heap block is owned by the keeper for the region's life.
        unsafe { Region::from_raw(ptr, len, MemKind::Host, true, Some(Box::new(v))) }
    }

    /// Take back the vector given to [`Region::from_vec`]. Fails (returning the region) while
    /// other clones exist, e.g. a transport still holds a request on it.
    pub fn into_vec<T: bytemuck::Pod + Send>(self) -> std::result::Result<Vec<T>, Region> {
        match Arc::try_unwrap(self.0) {
            Ok(inner) => {
                let keeper = inner.keeper.into_inner().unwrap_or_else(|e| e.into_inner());
                match keeper.map(|k| k.downcast::<Vec<T>>()) {
                    Some(Ok(v)) => Ok(*v),
                    Some(Err(k)) => {
                        // Wrong type asked for: rebuild the region unchanged.
                        let r = Region(Arc::new(Inner {
                            ptr: inner.ptr,
                            len: inner.len,
                            kind: inner.kind,
                            writable: inner.writable,
                            alive: inner.alive,
                            keeper: Mutex::new(Some(k)),
                            view: inner.view,
                        }));
                        Err(r)
                    }
                    None => panic!("into_vec on a region that does not own a Vec"),
                }
            }
            Err(arc) => Err(Region(arc)),
        }
    }

    /// Take back the owner given as `keeper` (e.g. a device allocation handed to an
    /// asynchronous collective). Fails (returning the region) while other clones exist or
    /// when the keeper is not a `K`.
    pub fn into_keeper<K: Any + Send>(self) -> std::result::Result<K, Region> {
        let inner = match Arc::try_unwrap(self.0) {
            Ok(inner) => inner,
            Err(arc) => return Err(Region(arc)),
        };
        let keeper = inner.keeper.into_inner().unwrap_or_else(|e| e.into_inner());
        match keeper.map(|k| k.downcast::<K>()) {
            Some(Ok(k)) => Ok(*k),
            other => {
                let keeper = match other {
                    Some(Err(k)) => Some(k),
                    _ => None,
                };
                Err(Region(Arc::new(Inner {
                    ptr: inner.ptr,
                    len: inner.len,
                    kind: inner.kind,
                    writable: inner.writable,
                    alive: inner.alive,
                    keeper: Mutex::new(keeper),
                    view: inner.view,
                })))
            }
        }
    }

    /// Run `f` with a writable region over `buf`; the region is revoked when `f` returns, so
    /// nothing can touch `buf` afterwards even if a clone of the region was kept.
    pub fn scoped<R>(buf: &mut [u8], f: impl FnOnce(&Region) -> R) -> R {
        // SAFETY: `buf` is exclusively borrowed for the whole call, and the region is revoked
        // (under its lock, so no access is in progress) before the borrow ends.
        let r = unsafe { Region::from_raw(buf.as_mut_ptr(), buf.len(), MemKind::Host, true, None) };
        let guard = RevokeOnDrop(r.clone());
        let out = f(&r);
        drop(guard);
        out
    }

    /// Like [`Region::scoped`] for a shared borrow: the region is read-only.
    pub fn scoped_ref<R>(buf: &[u8], f: impl FnOnce(&Region) -> R) -> R {
        // SAFETY: read-only region (writes are refused at `with_bytes_mut`), revoked before the
        // shared borrow ends.
        let r = unsafe { Region::from_raw(buf.as_ptr().cast_mut(), buf.len(), MemKind::Host, false, None) };
        let guard = RevokeOnDrop(r.clone());
        let out = f(&r);
        drop(guard);
        out
    }

    /// Revoke: from now on every access fails. Waits for an access in progress to finish.
    pub fn revoke(&self) {
        *lock(&self.0.alive) = false;
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.0.len
    }

    /// True when the region has no bytes.
    pub fn is_empty(&self) -> bool {
        self.0.len == 0
    }

    /// The memory kind.
    pub fn kind(&self) -> &MemKind {
        &self.0.kind
    }

    /// The raw address (for device memory handed to drivers; never dereferenced here).
    pub fn addr(&self) -> usize {
        self.0.ptr.as_ptr() as usize
    }

    /// True when both handles are the same region.
    pub fn same(&self, other: &Region) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }

    /// True when writes are allowed.
    pub fn writable(&self) -> bool {
        self.0.writable
    }

    /// A slice of this region.
    pub fn slice(&self, range: Range<usize>) -> RegionSlice {
        RegionSlice { region: self.clone(), range }
    }

    /// The whole region as a slice.
    pub fn full(&self) -> RegionSlice {
        self.slice(0..self.len())
    }

    fn check(&self, range: &Range<usize>) -> Result<()> {
        if range.start > range.end || range.end > self.0.len {
            return Err(Error::Internal(format!("range {range:?} outside region of {} bytes", self.0.len)));
        }
        if !self.0.kind.is_host() {
            return Err(Error::Unsupported {
                reason: format!("the CPU cannot access {:?} memory directly", self.0.kind),
            });
        }
        Ok(())
    }

    fn live(&self) -> Result<MutexGuard<'_, bool>> {
        let g = lock(&self.0.alive);
        if !*g {
            return Err(Error::Internal("memory region used after its collective returned".into()));
        }
        Ok(g)
    }

    /// Read `range` of a host region.
    pub fn with_bytes<R>(&self, range: Range<usize>, f: impl FnOnce(&[u8]) -> R) -> Result<R> {
        self.check(&range)?;
        let _g = self.live()?;
        // SAFETY: host memory, in bounds (checked), alive (checked under the lock we hold, so
        // revocation waits for us), and no mutable view exists: mutable views are only made
        // under this same lock.
        let s = unsafe { std::slice::from_raw_parts(self.0.ptr.as_ptr().add(range.start), range.len()) };
        Ok(f(s))
    }

    /// Write `range` of a writable host region.
    pub fn with_bytes_mut<R>(&self, range: Range<usize>, f: impl FnOnce(&mut [u8]) -> R) -> Result<R> {
        self.check(&range)?;
        if !self.0.writable {
            return Err(Error::Internal("write to a read-only region".into()));
        }
        let _g = self.live()?;
        // SAFETY: as in `with_bytes`; the lock makes this the only view while `f` runs.
        let s = unsafe { std::slice::from_raw_parts_mut(self.0.ptr.as_ptr().add(range.start), range.len()) };
        Ok(f(s))
    }

    /// Read `src` while writing `dst`. The two may be the same region (disjoint ranges) or
    /// different regions.
    pub fn with_pair<R>(dst: &RegionSlice, src: &RegionSlice, f: impl FnOnce(&mut [u8], &[u8]) -> R) -> Result<R> {
        if dst.region.same(&src.region) {
            let (d, s) = (&dst.range, &src.range);
            if d.start < s.end && s.start < d.end && !d.is_empty() && !s.is_empty() {
                if d == s {
                    return Err(Error::Internal("with_pair on the identical range".into()));
                }
                return Err(Error::Internal(format!("overlapping ranges {d:?} and {s:?}")));
            }
            let lo = d.start.min(s.start);
            let hi = d.end.max(s.end);
            dst.region.with_bytes_mut(lo..hi, |whole| {
                if d.start <= s.start {
                    let (a, b) = whole.split_at_mut(s.start - lo);
                    f(&mut a[d.start - lo..d.end - lo], &b[..s.len()])
                } else {
                    let (a, b) = whole.split_at_mut(d.start - lo);
                    f(&mut b[..d.len()], &a[s.start - lo..s.end - lo])
                }
            })
        } else {
            // Lock in address order so two threads pairing the same regions cannot deadlock.
            if dst.region.addr() <= src.region.addr() {
                dst.region
                    .with_bytes_mut(dst.range.clone(), |d| src.region.with_bytes(src.range.clone(), |s| f(d, s)))?
            } else {
                src.region
                    .with_bytes(src.range.clone(), |s| dst.region.with_bytes_mut(dst.range.clone(), |d| f(d, s)))?
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

struct RevokeOnDrop(Region);

impl Drop for RevokeOnDrop {
    fn drop(&mut self) {
        self.0.revoke();
    }
}

/// A byte range of a region: what a transport request refers to.
#[derive(Clone, Debug)]
pub struct RegionSlice {
    /// The region.
    pub region: Region,
    /// Byte range within it.
    pub range: Range<usize>,
}

impl RegionSlice {
    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.range.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.range.is_empty()
    }

    /// A sub-slice, `range` relative to this slice.
    pub fn sub(&self, range: Range<usize>) -> RegionSlice {
        debug_assert!(range.end <= self.len());
        RegionSlice { region: self.region.clone(), range: self.range.start + range.start..self.range.start + range.end }
    }

    /// Read the bytes.
    pub fn with_bytes<R>(&self, f: impl FnOnce(&[u8]) -> R) -> Result<R> {
        self.region.with_bytes(self.range.clone(), f)
    }

    /// Write the bytes.
    pub fn with_bytes_mut<R>(&self, f: impl FnOnce(&mut [u8]) -> R) -> Result<R> {
        self.region.with_bytes_mut(self.range.clone(), f)
    }

    /// True when both denote the same bytes of the same region.
    pub fn same_as(&self, other: &RegionSlice) -> bool {
        self.region.same(&other.region) && self.range == other.range
    }

    /// True when both share at least one byte.
    pub fn overlaps(&self, other: &RegionSlice) -> bool {
        self.region.same(&other.region) && self.range.start < other.range.end && other.range.start < self.range.end
    }

    /// Copy into a new Vec (tests, small messages).
    pub fn to_vec(&self) -> Result<Vec<u8>> {
        self.with_bytes(|b| b.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scoped_region_is_revoked_after_scope() {
        let mut buf = vec![1u8; 16];
        let kept = Region::scoped(&mut buf, |r| {
            r.with_bytes_mut(0..4, |b| b.fill(7)).unwrap();
            r.clone()
        });
        assert_eq!(&buf[..5], &[7, 7, 7, 7, 1]);
        assert!(kept.with_bytes(0..4, |_| ()).is_err(), "access after scope must fail");
    }

    #[test]
    fn read_only_and_bounds() {
        let buf = vec![3u8; 8];
        Region::scoped_ref(&buf, |r| {
            assert!(r.with_bytes_mut(0..1, |_| ()).is_err());
            assert!(r.with_bytes(0..9, |_| ()).is_err());
            assert_eq!(r.with_bytes(2..4, |b| b.to_vec()).unwrap(), vec![3, 3]);
        });
    }

    #[test]
    fn vec_round_trip_and_pair() {
        let r = Region::from_vec(vec![1u32, 2, 3, 4]);
        let a = r.slice(0..8);
        let b = r.slice(8..16);
        Region::with_pair(&a, &b, |d, s| d.copy_from_slice(s)).unwrap();
        Region::with_pair(&b.sub(0..4), &a.sub(4..8), |d, s| d.copy_from_slice(s)).unwrap();
        assert!(Region::with_pair(&a, &r.slice(4..12), |_, _| ()).is_err());
        drop((a, b));
        let v: Vec<u32> = r.into_vec().unwrap();
        assert_eq!(v, vec![3, 4, 4, 4]);
        let s = Region::alloc(100);
        assert_eq!(s.len(), 100);
        assert_eq!(s.addr() % 64, 0);
    }
}
