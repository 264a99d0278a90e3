//! The device layer: what computes on a collective's memory (DESIGN §4a).
//!
//! A [`Device`] owns one kind of memory (host, one CUDA GPU, one Vulkan device) and runs the
//! few operations a collective needs on it: copies between its memory and host staging
//! memory, the element-wise reduction `dst = a op b` (with the avg epilogue), and the devmem
//! unpack — a gather of `{src_off, len, dst_off}` fragments, alone or fused with a
//! reduction. Every operation is asynchronous: it is queued and answers [`Pending`], which
//! the executor tests without blocking, exactly like a transport request. The host device
//! runs each operation at once and answers [`Pending::Done`].
//!
//! Operands are [`RegionSlice`]s. Each must be memory this device can reach: its own memory
//! (`MemKind::Cuda` / `MemKind::Vulkan`), or host *staging* memory it allocated with
//! [`Device::alloc_staging`] (pinned, or host-visible, so kernels read it directly). The host
//! device reaches all host memory. A destination may be the very same slice as the first
//! operand (`dst = dst op b`); any other overlap between a destination and an operand is an
//! error.
//!
//! Same schedule, same bits: every backend applies exactly the host's per-element operations
//! ([`crate::op`]), in the same operand order, with IEEE arithmetic and no fused
//! multiply-add, so a result never depends on where the data lived.

use std::fmt;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::memory::{DeviceId, Region, RegionSlice};
use crate::op::{ReduceOp, finish_avg, reduce_in_place, reduce_to};
use crate::transport::Fragment;

/// Queued device work, tested without blocking.
pub trait Fence: Send + fmt::Debug {
    /// True once the work finished; an error is the device's failure (the work's outputs are
    /// then undefined). Never blocks for long.
    fn test(&mut self) -> Result<bool>;
}

/// The answer of a device operation: finished already, or running behind a fence.
#[derive(Debug)]
pub enum Pending {
    /// Finished (host device, empty operations).
    Done,
    /// Queued; test the fence.
    Running(Box<dyn Fence>),
}

impl Pending {
    /// Non-blocking: true once finished.
    pub fn test(&mut self) -> Result<bool> {
        match self {
            Pending::Done => Ok(true),
            Pending::Running(f) => {
                if f.test()? {
                    *self = Pending::Done;
                    Ok(true)
                } else {
                    Ok(false)
                }
            }
        }
    }

    /// Block until finished or `deadline` (then [`Error::Timeout`] naming `what`).
    pub fn wait(mut self, deadline: Instant, what: &str) -> Result<()> {
        let start = Instant::now();
        let mut spins = 0u32;
        while !self.test()? {
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::Timeout { what: format!("device work did not finish: {what}"), after: now - start });
            }
            spins += 1;
            if spins < 64 {
                std::thread::yield_now();
            } else {
                std::thread::sleep(Duration::from_micros(20));
            }
        }
        Ok(())
    }
}

/// A reduction `dst = a op b` (with `finish`, then the avg epilogue `/ n` when `op` is avg).
#[derive(Debug, Clone, Copy)]
pub struct ReduceArgs<'a> {
    /// Element type.
    pub dtype: DType,
    /// The call's operator (`Avg` combines as a sum).
    pub op: ReduceOp,
    /// Destination; may be the same slice as `a`.
    pub dst: &'a RegionSlice,
    /// Left operand.
    pub a: &'a RegionSlice,
    /// Right operand.
    pub b: &'a RegionSlice,
    /// `Some(n)`: these elements are final; for `Avg`, divide by `n`.
    pub finish: Option<usize>,
}

/// A fragment list in a receive pool (the devmem RX layout): the fragments cover the
/// destination exactly once.
#[derive(Debug, Clone, Copy)]
pub struct Scattered<'a> {
    /// The pool the fragments' `src_off` refer to.
    pub pool: &'a Region,
    /// The fragments; `dst_off` is relative to the destination slice.
    pub frags: &'a [Fragment],
}

/// Bytes and counts a device reports (tests check that failures leak nothing).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeviceStats {
    /// Device-local bytes allocated by devccl and not yet freed.
    pub live_device_bytes: u64,
    /// Staging (pinned / host-visible) bytes allocated and not yet freed.
    pub live_staging_bytes: u64,
    /// Operations queued so far.
    pub ops: u64,
    /// Reductions that fell back to the host because the device lacks a feature.
    pub host_fallbacks: u64,
}

/// What a file descriptor handed to the kernel (a devmem binding) or to the simulated kernel
/// refers to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportKind {
    /// A dma-buf: what `NETDEV_CMD_BIND_RX` / `BIND_TX` take on a real kernel.
    DmaBuf,
    /// An fd the process can `mmap` (a memfd, or a Vulkan opaque fd backed by one) that is not
    /// a dma-buf: only the simulated kernel can use it.
    Mappable,
}

/// Device memory exported through a file descriptor (for devmem bindings).
#[derive(Debug)]
pub struct Exported {
    /// The descriptor (owned: close it when the binding no longer needs it).
    pub fd: std::os::fd::OwnedFd,
    /// Where the exported region starts inside what `fd` refers to.
    pub offset: u64,
    /// The size of what `fd` refers to.
    pub fd_len: u64,
    /// A dma-buf, or only mappable.
    pub kind: ExportKind,
}

/// A point in a caller's device queue (a CUDA stream), captured when a stream-ordered
/// collective is called: everything the caller had queued on that stream by then.
pub trait QueuePoint: Send + fmt::Debug {
    /// Make the device's internal queues wait for that point before any later operation
    /// (called once, when the collective starts running). Never blocks the host.
    fn order_internal(&mut self) -> Result<()>;
}

/// A gate in callers' device queues: work queued on a queue after [`QueueGate::hold`] does not
/// start until [`QueueGate::open`]. A stream-ordered collective holds the caller's stream
/// with it and opens it when it ends, successfully or not, so the stream can never wait
/// forever.
pub trait QueueGate: Send + Sync + fmt::Debug {
    /// Queue a wait for the gate on `queue` (a raw `CUstream`; 0 is the legacy default
    /// stream). Never blocks the host.
    fn hold(&self, queue: u64) -> Result<()>;
    /// Open the gate (idempotent): queues holding on it proceed.
    fn open(&self);
    /// True once opened.
    fn is_open(&self) -> bool;
}

/// One compute device. Implementations are thread-safe: several communicators (and the
/// ranks of an in-process mesh) may share one.
pub trait Device: Send + Sync + fmt::Debug {
    /// Which device.
    fn id(&self) -> DeviceId;
    /// Human-readable name (`vulkan:0 llvmpipe (LLVM 15.0.6, 256 bits)`).
    fn describe(&self) -> String;
    /// `len` bytes of this device's own memory (contents undefined).
    fn alloc(&self, len: usize) -> Result<Region>;
    /// `len` bytes of host memory the device reaches directly (pinned / host-visible), for
    /// staging: a region of kind `Host` that the CPU and transports read and write.
    fn alloc_staging(&self, len: usize) -> Result<Region>;
    /// `dst = src` (same length): device↔device, device↔staging.
    fn copy(&self, dst: &RegionSlice, src: &RegionSlice) -> Result<Pending>;
    /// `dst = a op b`, then the epilogue when `finish` says so.
    fn reduce(&self, r: ReduceArgs<'_>) -> Result<Pending>;
    /// The avg epilogue alone: `dst /= n` (nothing for other ops).
    fn finish_avg(&self, dtype: DType, dst: &RegionSlice, n: usize) -> Result<Pending>;
    /// Gather fragments from a pool into `dst` (the devmem unpack).
    fn gather(&self, dst: &RegionSlice, src: Scattered<'_>) -> Result<Pending>;
    /// Fused gather-and-reduce: `dst = base op gathered` (fragments read once, straight
    /// from the pool), then the epilogue when `finish` says so.
    #[allow(clippy::too_many_arguments)]
    fn gather_reduce(
        &self,
        dtype: DType,
        op: ReduceOp,
        dst: &RegionSlice,
        base: &RegionSlice,
        src: Scattered<'_>,
        finish: Option<usize>,
    ) -> Result<Pending>;
    /// Blocking: write host bytes into device memory (tests, examples, result checks).
    fn upload(&self, dst: &RegionSlice, src: &[u8]) -> Result<()>;
    /// Blocking: read device memory into host bytes.
    fn download(&self, src: &RegionSlice, dst: &mut [u8]) -> Result<()>;
    /// Why reductions of `dtype` do not run on this device (they run on the host instead,
    /// staged), or `None` when they do.
    fn host_fallback(&self, dtype: DType) -> Option<String> {
        let _ = dtype;
        None
    }
    /// Counters.
    fn stats(&self) -> DeviceStats {
        DeviceStats::default()
    }
    /// `len` bytes of this device's memory that can also be exported through a file
    /// descriptor (the devmem RX pool, TX buffers): the region (of this device's own kind; for
    /// the host device CPU memory) and the export. Devices that cannot export answer
    /// [`Error::Unsupported`] saying why.
    fn alloc_exportable(&self, len: usize) -> Result<(Region, Exported)> {
        let _ = len;
        Err(Error::Unsupported {
            reason: format!("{} cannot export memory through a file descriptor", self.describe()),
        })
    }
    /// Export memory this device allocated (or, for CUDA, any device allocation) through a
    /// file descriptor covering at least `region` (devmem TX). Memory that cannot be exported
    /// answers [`Error::Unsupported`] with the reason.
    fn export(&self, region: &Region) -> Result<Exported> {
        let _ = region;
        Err(Error::Unsupported { reason: format!("{} cannot export this memory", self.describe()) })
    }
    /// Capture everything queued so far on the caller's queue `queue` (a raw `CUstream`), so
    /// a collective can order its device work after it. Devices without caller-visible
    /// queues (host, Vulkan) answer [`Error::Unsupported`].
    fn queue_point(&self, queue: u64) -> Result<Box<dyn QueuePoint>> {
        let _ = queue;
        Err(Error::Unsupported { reason: format!("{} has no stream ordering", self.describe()) })
    }
    /// A fresh, closed gate for callers' queues (see [`QueueGate`]).
    fn queue_gate(&self) -> Result<Arc<dyn QueueGate>> {
        Err(Error::Unsupported { reason: format!("{} has no stream ordering", self.describe()) })
    }
}

/// Check the shapes every backend requires: equal lengths, whole elements, the destination
/// writable and overlapping no operand except by being exactly `a`.
pub fn check_reduce(r: &ReduceArgs<'_>) -> Result<()> {
    let e = r.dtype.size();
    let n = r.dst.len();
    if r.a.len() != n || r.b.len() != n {
        return Err(Error::Internal(format!(
            "reduce: lengths differ (dst {n}, a {}, b {} bytes)",
            r.a.len(),
            r.b.len()
        )));
    }
    if !n.is_multiple_of(e) {
        return Err(Error::Internal(format!("reduce: {n} bytes is not a whole number of {}", r.dtype)));
    }
    check_dst(r.dst, &[r.a, r.b], Some(r.a))
}

/// `dst` must be writable and overlap no operand in `srcs` (except `allowed`, exactly).
pub fn check_dst(dst: &RegionSlice, srcs: &[&RegionSlice], allowed: Option<&RegionSlice>) -> Result<()> {
    if !dst.region.writable() && !dst.is_empty() {
        return Err(Error::Internal("device operation into a read-only region".into()));
    }
    for s in srcs {
        if dst.overlaps(s) && !allowed.is_some_and(|a| a.same_as(s) && s.same_as(dst)) {
            return Err(Error::Internal(format!(
                "device operation: destination {:?} overlaps an operand {:?}",
                dst.range, s.range
            )));
        }
    }
    Ok(())
}

/// Check a fused gather-and-reduce's shapes (every backend's): fragments covering the
/// destination exactly once, a base of the destination's length (or the destination itself),
/// whole elements, and a pool that is not the destination's region. Returns the fragments
/// sorted by destination offset.
pub fn check_gather_reduce(
    dtype: DType,
    dst: &RegionSlice,
    base: &RegionSlice,
    src: &Scattered<'_>,
) -> Result<Vec<Fragment>> {
    let frags = check_fragments(dst.len(), src)?;
    check_dst(dst, &[base], Some(base))?;
    if src.pool.same(&dst.region) {
        return Err(Error::Internal("gather from the destination's own region".into()));
    }
    if base.len() != dst.len() || !dst.len().is_multiple_of(dtype.size()) {
        return Err(Error::Internal(format!(
            "gather_reduce: {} destination bytes, {} base bytes: not equal whole numbers of {dtype}",
            dst.len(),
            base.len()
        )));
    }
    Ok(frags)
}

/// Check that fragments cover a destination of `len` bytes exactly once and lie inside the
/// pool. Returns them sorted by destination offset.
pub fn check_fragments(len: usize, src: &Scattered<'_>) -> Result<Vec<Fragment>> {
    let mut frags = src.frags.to_vec();
    frags.sort_unstable_by_key(|f| f.dst_off);
    let mut at = 0u64;
    for f in &frags {
        if f.dst_off != at {
            return Err(Error::Internal(format!(
                "fragments do not cover the {len}-byte destination exactly once (gap or overlap at byte {at}, next \
                 fragment {f:?})"
            )));
        }
        let end = f.src_off.checked_add(f.len as u64);
        if end.is_none_or(|e| e > src.pool.len() as u64) {
            return Err(Error::Internal(format!("fragment {f:?} outside a {}-byte pool", src.pool.len())));
        }
        at += f.len as u64;
    }
    if at != len as u64 {
        return Err(Error::Internal(format!("fragments cover {at} of {len} bytes")));
    }
    Ok(frags)
}

/// Bytes the host's gather-and-reduce gathers before reducing them (fits in L2).
const HOST_GATHER_REDUCE_BLOCK: usize = 64 << 10;

/// The CPU as a device: today's reduction loops, run at once.
#[derive(Debug, Default)]
pub struct HostDevice;

/// The process's host device.
pub fn host() -> Arc<dyn Device> {
    static HOST: OnceLock<Arc<dyn Device>> = OnceLock::new();
    HOST.get_or_init(|| Arc::new(HostDevice)).clone()
}

fn epilogue(dtype: DType, op: ReduceOp, finish: Option<usize>, d: &mut [u8]) -> Result<()> {
    match finish {
        Some(n) if op == ReduceOp::Avg => finish_avg(dtype, d, n),
        _ => Ok(()),
    }
}

impl HostDevice {
    /// `dst = a op b` on host memory, for any aliasing [`check_reduce`] allows.
    fn reduce_now(r: &ReduceArgs<'_>) -> Result<()> {
        let (dtype, op) = (r.dtype, r.op);
        if r.dst.same_as(r.a) {
            if r.b.region.same(&r.dst.region) {
                // Both operands in the destination's region: read b first (one lock at a time).
                let b = r.b.to_vec()?;
                return r.dst.with_bytes_mut(|d| {
                    reduce_in_place(dtype, op, d, &b)?;
                    epilogue(dtype, op, r.finish, d)
                })?;
            }
            return Region::with_pair(r.dst, r.b, |d, b| {
                reduce_in_place(dtype, op, d, b)?;
                epilogue(dtype, op, r.finish, d)
            })?;
        }
        if r.b.region.same(&r.dst.region) || r.b.region.same(&r.a.region) {
            let b = r.b.to_vec()?;
            return Region::with_pair(r.dst, r.a, |d, a| {
                reduce_to(dtype, op, d, a, &b)?;
                epilogue(dtype, op, r.finish, d)
            })?;
        }
        Region::with_pair(r.dst, r.a, |d, a| {
            r.b.with_bytes(|b| reduce_to(dtype, op, d, a, b))??;
            epilogue(dtype, op, r.finish, d)
        })?
    }

    fn gather_now(dst: &RegionSlice, src: &Scattered<'_>) -> Result<()> {
        let frags = check_fragments(dst.len(), src)?;
        if src.pool.same(&dst.region) {
            return Err(Error::Internal("gather from the destination's own region".into()));
        }
        // One look at the pool for all fragments (not a lock per fragment).
        dst.with_bytes_mut(|d| {
            src.pool.with_bytes(0..src.pool.len(), |p| {
                for f in &frags {
                    let (so, len, dof) = (f.src_off as usize, f.len as usize, f.dst_off as usize);
                    d[dof..dof + len].copy_from_slice(&p[so..so + len]);
                }
            })
        })?
    }
}

impl Device for HostDevice {
    fn id(&self) -> DeviceId {
        DeviceId::Host
    }

    fn describe(&self) -> String {
        "host (CPU)".into()
    }

    fn alloc(&self, len: usize) -> Result<Region> {
        Ok(Region::alloc(len))
    }

    fn alloc_staging(&self, len: usize) -> Result<Region> {
        Ok(Region::alloc(len))
    }

    fn copy(&self, dst: &RegionSlice, src: &RegionSlice) -> Result<Pending> {
        if dst.len() != src.len() {
            return Err(Error::Internal(format!("copy: {} bytes into {}", src.len(), dst.len())));
        }
        if !dst.same_as(src) && !dst.is_empty() {
            Region::with_pair(dst, src, |d, s| d.copy_from_slice(s))?;
        }
        Ok(Pending::Done)
    }

    fn reduce(&self, r: ReduceArgs<'_>) -> Result<Pending> {
        check_reduce(&r)?;
        if !r.dst.is_empty() {
            HostDevice::reduce_now(&r)?;
        }
        Ok(Pending::Done)
    }

    fn finish_avg(&self, dtype: DType, dst: &RegionSlice, n: usize) -> Result<Pending> {
        if !dst.is_empty() {
            dst.with_bytes_mut(|d| finish_avg(dtype, d, n))??;
        }
        Ok(Pending::Done)
    }

    fn gather(&self, dst: &RegionSlice, src: Scattered<'_>) -> Result<Pending> {
        HostDevice::gather_now(dst, &src)?;
        Ok(Pending::Done)
    }

    fn gather_reduce(
        &self,
        dtype: DType,
        op: ReduceOp,
        dst: &RegionSlice,
        base: &RegionSlice,
        src: Scattered<'_>,
        finish: Option<usize>,
    ) -> Result<Pending> {
        let frags = check_gather_reduce(dtype, dst, base, &src)?;
        // Gather a block of whole elements into a cache-sized buffer, then reduce the block in
        // one call: each fragment is read once, and a fragment boundary inside an element
        // costs nothing. (Reducing fragment by fragment paid a lock, a dispatch and a copy per
        // fragment: slower than gathering the whole receive first.)
        let block = HOST_GATHER_REDUCE_BLOCK / dtype.size() * dtype.size();
        let mut temp = vec![0u8; block.min(dst.len())];
        let mut pieces = frags.iter().map(|f| (f.src_off as usize, f.len as usize));
        let mut cur: Option<(usize, usize)> = None;
        let mut start = 0;
        while start < dst.len() {
            let n = block.min(dst.len() - start);
            src.pool.with_bytes(0..src.pool.len(), |p| {
                let mut filled = 0;
                while filled < n {
                    let (so, left) = cur.take().or_else(|| pieces.next()).expect("checked: fragments cover dst");
                    let k = left.min(n - filled);
                    temp[filled..filled + k].copy_from_slice(&p[so..so + k]);
                    filled += k;
                    if k < left {
                        cur = Some((so + k, left - k));
                    }
                }
            })?;
            let (d, a) = (dst.sub(start..start + n), base.sub(start..start + n));
            Region::scoped_ref(&temp[..n], |r| {
                HostDevice::reduce_now(&ReduceArgs { dtype, op, dst: &d, a: &a, b: &r.full(), finish })
            })?;
            start += n;
        }
        Ok(Pending::Done)
    }

    fn upload(&self, dst: &RegionSlice, src: &[u8]) -> Result<()> {
        if dst.len() != src.len() {
            return Err(Error::usage(format!("upload of {} bytes into {}", src.len(), dst.len())));
        }
        dst.with_bytes_mut(|d| d.copy_from_slice(src))
    }

    fn download(&self, src: &RegionSlice, dst: &mut [u8]) -> Result<()> {
        if dst.len() != src.len() {
            return Err(Error::usage(format!("download of {} bytes into {}", src.len(), dst.len())));
        }
        src.with_bytes(|s| dst.copy_from_slice(s))
    }

    /// A memfd mapped shared (see [`crate::memory::fd::alloc_exportable`]): a udmabuf
    /// dma-buf where `/dev/udmabuf` takes it, else the memfd itself ([`ExportKind::Mappable`]).
    fn alloc_exportable(&self, len: usize) -> Result<(Region, Exported)> {
        crate::memory::fd::alloc_exportable(len)
    }

    /// A fresh descriptor for memory [`Device::alloc_exportable`] made (or a region over a
    /// mapped descriptor); heap memory answers [`Error::Unsupported`].
    fn export(&self, region: &Region) -> Result<Exported> {
        crate::memory::fd::export(region)
    }
}

/// Conformance checks every [`Device`] must pass against the host reference (used by each
/// backend's tests): every dtype × op × awkward counts and offsets, gathers of unaligned
/// fragments, the fused gather-and-reduce. Returns the first difference as an error.
pub mod conformance {
    use super::*;
    use crate::transport::Fragment;

    /// Deterministic bytes that are valid, NaN-free values of `dtype` (small integers and
    /// halves, so every path rounds the same).
    pub fn values(dtype: DType, count: usize, seed: u64) -> Vec<u8> {
        let mut out = Vec::with_capacity(count * dtype.size());
        let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        for _ in 0..count {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let v = ((x >> 33) % 17) as i64 - 8; // [-8, 8]
            let h = v as f64 / 2.0;
            match dtype {
                DType::F32 => out.extend((h as f32).to_le_bytes()),
                DType::F64 => out.extend(h.to_le_bytes()),
                DType::F16 => out.extend(half::f16::from_f64(h).to_le_bytes()),
                DType::BF16 => out.extend(half::bf16::from_f64(h).to_le_bytes()),
                DType::F8E4M3 => out.push(crate::dtype::F8E4M3::from_f32(h as f32).0),
                DType::F8E5M2 => out.push(crate::dtype::F8E5M2::from_f32(h as f32).0),
                DType::I8 => out.push(v as i8 as u8),
                DType::U8 => out.push((x >> 40) as u8),
                DType::I32 => out.extend(((x >> 20) as i32).to_le_bytes()),
                DType::U32 => out.extend(((x >> 17) as u32).to_le_bytes()),
                DType::I64 => out.extend((x as i64).to_le_bytes()),
                DType::U64 => out.extend(x.rotate_left(7).to_le_bytes()),
            }
        }
        out
    }

    fn new_buf(dev: &dyn Device, bytes: &[u8]) -> Result<Region> {
        let r = dev.alloc(bytes.len())?;
        dev.upload(&r.full(), bytes)?;
        Ok(r)
    }

    fn read(dev: &dyn Device, s: &RegionSlice) -> Result<Vec<u8>> {
        let mut v = vec![0u8; s.len()];
        dev.download(s, &mut v)?;
        Ok(v)
    }

    fn differ(what: &str, got: &[u8], want: &[u8]) -> Result<()> {
        if got == want {
            return Ok(());
        }
        let i = got.iter().zip(want).position(|(a, b)| a != b).unwrap_or(got.len().min(want.len()));
        Err(Error::Internal(format!(
            "{what}: differs from the host reference at byte {i} (got {:?}, want {:?}; {} vs {} bytes)",
            &got[i.min(got.len())..(i + 8).min(got.len())],
            &want[i.min(want.len())..(i + 8).min(want.len())],
            got.len(),
            want.len()
        )))
    }

    /// Every dtype × op, each count in `counts`, at element offsets 0 and 3, in place and
    /// out of place, with the operand in device memory and in staging memory; then the avg
    /// epilogue alone. Compares bytes with the host device.
    pub fn reductions(dev: &dyn Device, counts: &[usize]) -> Result<()> {
        let host = HostDevice;
        let deadline = || Instant::now() + Duration::from_secs(60);
        for dtype in DType::ALL {
            for op in ReduceOp::ALL {
                for &count in counts {
                    for skew in [0usize, 3] {
                        let e = dtype.size();
                        let total = (count + skew) * e;
                        let a = values(dtype, count + skew, 1 + count as u64);
                        let b = values(dtype, count + skew, 1000 + count as u64);
                        let span = skew * e..total;
                        let what = format!("{} {dtype} {op} count {count} skew {skew}", dev.describe());
                        for finish in [None, Some(3)] {
                            // Host reference: dst = a op b.
                            let mut want = a.clone();
                            let ra = Region::from_vec(want.clone());
                            let rb = Region::from_vec(b.clone());
                            host.reduce(ReduceArgs {
                                dtype,
                                op,
                                dst: &ra.slice(span.clone()),
                                a: &ra.slice(span.clone()),
                                b: &rb.slice(span.clone()),
                                finish,
                            })?;
                            ra.with_bytes(0..total, |v| want.copy_from_slice(v))?;
                            // In place, operand in device memory.
                            let da = new_buf(dev, &a)?;
                            let db = new_buf(dev, &b)?;
                            dev.reduce(ReduceArgs {
                                dtype,
                                op,
                                dst: &da.slice(span.clone()),
                                a: &da.slice(span.clone()),
                                b: &db.slice(span.clone()),
                                finish,
                            })?
                            .wait(deadline(), &what)?;
                            differ(&format!("{what} in place finish={finish:?}"), &read(dev, &da.full())?, &want)?;
                            // Out of place, operand b in staging memory.
                            let out = new_buf(dev, &vec![0xa5u8; total])?;
                            let sb = dev.alloc_staging(total)?;
                            sb.with_bytes_mut(0..total, |s| s.copy_from_slice(&b))?;
                            let da2 = new_buf(dev, &a)?;
                            dev.reduce(ReduceArgs {
                                dtype,
                                op,
                                dst: &out.slice(span.clone()),
                                a: &da2.slice(span.clone()),
                                b: &sb.slice(span.clone()),
                                finish,
                            })?
                            .wait(deadline(), &what)?;
                            let got = read(dev, &out.slice(span.clone()))?;
                            differ(&format!("{what} from staging finish={finish:?}"), &got, &want[span.clone()])?;
                            let head = read(dev, &out.slice(0..skew * e))?;
                            if head.iter().any(|&x| x != 0xa5) {
                                return Err(Error::Internal(format!("{what}: wrote before its range")));
                            }
                        }
                    }
                }
            }
            // The epilogue alone.
            let count = counts.iter().copied().max().unwrap_or(1);
            let a = values(dtype, count, 77);
            let mut want = a.clone();
            finish_avg(dtype, &mut want, 3)?;
            let da = new_buf(dev, &a)?;
            dev.finish_avg(dtype, &da.full(), 3)?.wait(deadline(), "finish_avg")?;
            differ(&format!("{} finish_avg {dtype}", dev.describe()), &read(dev, &da.full())?, &want)?;
        }
        Ok(())
    }

    /// Copies device↔staging↔device at odd offsets and lengths.
    pub fn copies(dev: &dyn Device) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        for len in [0usize, 1, 3, 4, 7, 4096 + 5, (1 << 20) + 3] {
            let data = values(DType::U8, len + 9, len as u64);
            let src = new_buf(dev, &data)?;
            let stg = dev.alloc_staging(len + 9)?;
            dev.copy(&stg.slice(1..1 + len), &src.slice(5..5 + len))?.wait(deadline, "d2h")?;
            let got = stg.slice(1..1 + len).to_vec()?;
            differ(&format!("{} d2h len {len}", dev.describe()), &got, &data[5..5 + len])?;
            let dst = new_buf(dev, &vec![0u8; len + 9])?;
            dev.copy(&dst.slice(2..2 + len), &stg.slice(1..1 + len))?.wait(deadline, "h2d")?;
            let dst2 = dev.alloc(len + 9)?;
            dev.copy(&dst2.slice(3..3 + len), &dst.slice(2..2 + len))?.wait(deadline, "d2d")?;
            differ(
                &format!("{} h2d+d2d len {len}", dev.describe()),
                &read(dev, &dst2.slice(3..3 + len))?,
                &data[5..5 + len],
            )?;
        }
        Ok(())
    }

    /// Fragments at odd offsets and lengths, out of order, splitting elements; the gather and
    /// the fused gather-and-reduce for every dtype × op.
    pub fn gathers(dev: &dyn Device, pool_in_staging: bool) -> Result<()> {
        let deadline = || Instant::now() + Duration::from_secs(60);
        let host = HostDevice;
        for dtype in DType::ALL {
            let e = dtype.size();
            let count = 1031usize;
            let len = count * e;
            let payload = values(dtype, count, 5);
            // Cut the payload into fragments of 1..=700 bytes and scatter them over a pool.
            let mut frags = Vec::new();
            let (mut at, mut k) = (0usize, 0u64);
            while at < len {
                let flen = ((k * 389 + 17) % 700 + 1).min((len - at) as u64) as usize;
                frags.push(Fragment { src_off: 0, len: flen as u32, dst_off: at as u64 });
                at += flen;
                k += 1;
            }
            let pool_len = len * 2 + 4096;
            let mut pool_bytes = values(DType::U8, pool_len, 9);
            // Place fragments in reverse order at odd pool offsets.
            let mut off = 3usize;
            for f in frags.iter_mut().rev() {
                f.src_off = off as u64;
                let d = f.dst_off as usize;
                pool_bytes[off..off + f.len as usize].copy_from_slice(&payload[d..d + f.len as usize]);
                off += f.len as usize + 5;
            }
            let pool = if pool_in_staging {
                let p = dev.alloc_staging(pool_len)?;
                p.with_bytes_mut(0..pool_len, |s| s.copy_from_slice(&pool_bytes))?;
                p
            } else {
                new_buf(dev, &pool_bytes)?
            };
            let src = Scattered { pool: &pool, frags: &frags };
            let dst = new_buf(dev, &vec![0u8; len + e])?;
            dev.gather(&dst.slice(e..e + len), src)?.wait(deadline(), "gather")?;
            differ(&format!("{} gather {dtype}", dev.describe()), &read(dev, &dst.slice(e..e + len))?, &payload)?;
            for op in ReduceOp::ALL {
                for finish in [None, Some(2)] {
                    let base = values(dtype, count, 11);
                    let want = {
                        let d = Region::from_vec(base.clone());
                        let p = Region::from_vec(payload.clone());
                        host.reduce(ReduceArgs { dtype, op, dst: &d.full(), a: &d.full(), b: &p.full(), finish })?;
                        d.full().to_vec()?
                    };
                    let db = new_buf(dev, &base)?;
                    dev.gather_reduce(dtype, op, &db.full(), &db.full(), src, finish)?
                        .wait(deadline(), "gather_reduce")?;
                    differ(
                        &format!("{} gather_reduce {dtype} {op} finish={finish:?}", dev.describe()),
                        &read(dev, &db.full())?,
                        &want,
                    )?;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_device_conforms() {
        let d = HostDevice;
        conformance::reductions(&d, &[0, 1, 7, 1031]).unwrap();
        conformance::copies(&d).unwrap();
        conformance::gathers(&d, true).unwrap();
    }

    #[test]
    fn fragments_must_cover_exactly_once() {
        let pool = Region::alloc(64);
        let f = |src_off, len, dst_off| Fragment { src_off, len, dst_off };
        let ok = [f(10, 4, 4), f(0, 4, 0)];
        assert_eq!(check_fragments(8, &Scattered { pool: &pool, frags: &ok }).unwrap()[0].dst_off, 0);
        for bad in [vec![f(0, 4, 0)], vec![f(0, 4, 0), f(0, 4, 2)], vec![f(62, 4, 0), f(0, 4, 4)]] {
            assert!(check_fragments(8, &Scattered { pool: &pool, frags: &bad }).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn overlapping_destination_is_refused() {
        let r = Region::alloc(64);
        let (a, b) = (r.slice(0..16), r.slice(8..24));
        let args = ReduceArgs { dtype: DType::F32, op: ReduceOp::Sum, dst: &a, a: &b, b: &b, finish: None };
        assert!(HostDevice.reduce(args).is_err());
        let c = r.slice(32..48);
        // dst == a, b elsewhere in the same region: fine.
        HostDevice
            .reduce(ReduceArgs { dtype: DType::F32, op: ReduceOp::Sum, dst: &a, a: &a, b: &c, finish: None })
            .unwrap();
    }
}
