//! Python buffers as devccl memory regions. This is the only module of the bindings with
//! `unsafe` code: turning a buffer export (PEP 3118) or a CUDA array interface into a
//! [`Region`].
//!
//! Two kinds of Python objects are accepted:
//!
//! - host memory through the buffer protocol (numpy arrays, `bytearray`, `memoryview`, the
//!   numpy views the `devccl` package makes of CPU torch tensors). While an export
//!   ([`PyUntypedBuffer`]) is held, the exporting object keeps the memory allocated and
//!   refuses to resize it (numpy arrays, `bytearray`, `array.array` all do);
//! - CUDA device memory through `__cuda_array_interface__` (version 2 or 3: shape, typestr,
//!   data, strides, stream) plus a `device` attribute naming the CUDA ordinal (an int, a
//!   `torch.device` or a cupy `Device`): torch CUDA tensors, cupy arrays, and the wrappers
//!   the `devccl` package makes of CUDA tensors of any dtype. The object itself is what
//!   keeps the device allocation alive (a torch tensor owns its storage), so the region
//!   keeps a strong reference to it.
//!
//! So a region must never outlive the export or object it points into. Two lifetimes are
//! used:
//!
//! - [`Lifetime::Call`] (blocking calls on host memory): regions own nothing; the exports stay
//!   in a [`CallGuard`] on the caller's stack, which *revokes* the regions before it releases
//!   the exports. A transport that still held a clone of a region afterwards would find it
//!   dead instead of touching released memory.
//! - [`Lifetime::Work`] (asynchronous and stream-ordered calls): each region owns its exports
//!   as its `keeper`, so the memory stays exported exactly as long as any part of devccl can
//!   reach it (for device memory: until the call's device work finished, since a call only
//!   completes after it). The last clone may be dropped on a devccl thread; the keepers'
//!   `Drop` attaches to the interpreter to release the export or the reference
//!   (`Python::try_attach`), which is safe there because devccl holds none of its locks
//!   while dropping finished work.
//!
//! Only C-contiguous memory is accepted (a strided view is refused with a message that says
//! how to fix it); the format (or typestr) fixes the element type unless the caller names one.

use std::any::Any;

use devccl::DType;
use devccl_core::memory::{MemKind, Region, RegionSlice};
use pyo3::buffer::PyUntypedBuffer;
use pyo3::exceptions::PyAttributeError;
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::errors::{Kind, err};

/// The supported element types, for messages.
const SUPPORTED: &str = "float32, float64, float16, bfloat16 (dtype='bf16' with a 2-byte view), int8, uint8, int32, \
                         int64, uint32, uint64, float8_e4m3fn / float8_e5m2 (dtype='f8e4m3' / 'f8e5m2' with a 1-byte \
                         view)";

/// A strong reference to a Python object that owns device memory, released attached to the
/// interpreter (promptly, whichever thread drops it).
struct Owner(Option<Py<PyAny>>);

impl Drop for Owner {
    fn drop(&mut self) {
        if let Some(obj) = self.0.take() {
            // When the interpreter is gone (or finalizing) the reference is handed to pyo3's
            // deferred pool instead, which is what dropping a `Py` does by itself.
            let _ = Python::try_attach(move |_py| drop(obj));
        }
    }
}

/// What pins the memory of one exported operand (held only to be dropped at the right time).
#[allow(dead_code)]
enum Keep {
    /// A buffer-protocol export of host memory.
    Buffer(PyUntypedBuffer),
    /// The object exposing device memory (its `__cuda_array_interface__`).
    Object(Owner),
}

/// A checked export of one Python object's memory.
pub(crate) struct Exported {
    keep: Keep,
    kind: MemKind,
    what: String,
    addr: usize,
    len: usize,
    writable: bool,
    item_size: usize,
    /// The element type the format names, if it is one of devccl's.
    format_dtype: Option<DType>,
    format: String,
    /// The stream a CUDA array interface names for synchronisation, if any.
    stream: Option<u64>,
}

impl Exported {
    fn span(&self) -> (usize, usize) {
        (self.addr, self.len)
    }

    fn end(&self) -> usize {
        self.addr + self.len
    }

    /// The element type: `want` when given (checked against the format), else the format's.
    /// A 1-byte integer view may carry an 8-bit float (numpy has no fp8 type), as a 2-byte
    /// view with no devccl type carries bfloat16.
    pub(crate) fn dtype(&self, py: Python<'_>, what: &str, want: Option<DType>) -> PyResult<DType> {
        let raw_fp8 =
            |w: DType, f: DType| matches!(w, DType::F8E4M3 | DType::F8E5M2) && matches!(f, DType::U8 | DType::I8);
        match (want, self.format_dtype) {
            (Some(w), Some(f)) if w != f && !raw_fp8(w, f) => Err(err(
                py,
                Kind::DType,
                format!(
                    "{what} holds {} elements (format '{}'), but dtype={} was given",
                    f.nccl_name(),
                    self.format,
                    w.nccl_name()
                ),
            )),
            (Some(w), _) if w.size() != self.item_size => Err(err(
                py,
                Kind::DType,
                format!(
                    "{what} has {}-byte elements (format '{}'), but dtype={} has {}-byte elements",
                    self.item_size,
                    self.format,
                    w.nccl_name(),
                    w.size()
                ),
            )),
            (Some(w), _) => Ok(w),
            (None, Some(f)) => Ok(f),
            (None, None) => Err(err(
                py,
                Kind::DType,
                format!(
                    "{what} has element format '{}' ({} bytes), which devccl does not support; supported: {SUPPORTED}",
                    self.format, self.item_size
                ),
            )),
        }
    }

    /// True for device memory with at least one byte (empty operands need no device).
    fn device_bytes(&self) -> bool {
        !self.kind.is_host() && self.len > 0
    }
}

/// The devccl element type a buffer format string names (struct-module syntax, native or
/// little-endian byte order on this little-endian host).
fn format_dtype(format: &str, item_size: usize) -> Option<DType> {
    let code = match format.as_bytes() {
        [b'@' | b'=' | b'<', c] | [c] => *c,
        _ => return None,
    };
    Some(match (code, item_size) {
        (b'f', 4) => DType::F32,
        (b'd', 8) => DType::F64,
        (b'e', 2) => DType::F16,
        (b'b', 1) => DType::I8,
        (b'B', 1) => DType::U8,
        (b'i' | b'l' | b'q', 4) => DType::I32,
        (b'i' | b'l' | b'q', 8) => DType::I64,
        (b'I' | b'L' | b'Q', 4) => DType::U32,
        (b'I' | b'L' | b'Q', 8) => DType::U64,
        _ => return None,
    })
}

/// The item size and devccl element type of an array-interface typestr (`<f4`, `|u1`,
/// `<V2` ...): byte order `<`, `|` or `=` (this host is little-endian), kind, size in bytes.
fn typestr_dtype(typestr: &str) -> Option<(usize, Option<DType>)> {
    let b = typestr.as_bytes();
    let (&order, &kind) = (b.first()?, b.get(1)?);
    let size: usize = typestr.get(2..)?.parse().ok().filter(|&s| s > 0)?;
    if !matches!(order, b'<' | b'|' | b'=') {
        return Some((size, None));
    }
    let dt = match (kind, size) {
        (b'f', 4) => Some(DType::F32),
        (b'f', 8) => Some(DType::F64),
        (b'f', 2) => Some(DType::F16),
        (b'i', 1) => Some(DType::I8),
        (b'u', 1) => Some(DType::U8),
        (b'i', 4) => Some(DType::I32),
        (b'i', 8) => Some(DType::I64),
        (b'u', 4) => Some(DType::U32),
        (b'u', 8) => Some(DType::U64),
        _ => None,
    };
    Some((size, dt))
}

/// True when `strides` (bytes; `None` means C order) describe C-contiguous memory of
/// `shape` with `item`-byte elements. Dimensions of extent 1 may have any stride; an empty
/// array is contiguous.
fn c_contiguous(shape: &[usize], strides: Option<&[isize]>, item: usize) -> bool {
    let Some(strides) = strides else { return true };
    if strides.len() != shape.len() {
        return false;
    }
    if shape.contains(&0) {
        return true;
    }
    let mut expect = item as isize;
    for (&n, &s) in shape.iter().zip(strides).rev() {
        if n != 1 && s != expect {
            return false;
        }
        expect = expect.saturating_mul(n as isize);
    }
    true
}

/// Export `obj`'s memory for a collective. `what` names the argument in messages; `write`
/// asks for writable memory (outputs). Objects with `__cuda_array_interface__` are device
/// memory; everything else must support the buffer protocol.
pub(crate) fn export(obj: &Bound<'_, PyAny>, what: &str, write: bool) -> PyResult<Exported> {
    let py = obj.py();
    match obj.getattr(intern!(py, "__cuda_array_interface__")) {
        Ok(cai) => export_cuda(obj, &cai, what, write),
        Err(e) if e.is_instance_of::<PyAttributeError>(py) => export_host(obj, what, write),
        Err(e) => Err(e),
    }
}

fn export_host(obj: &Bound<'_, PyAny>, what: &str, write: bool) -> PyResult<Exported> {
    let py = obj.py();
    let buf = PyUntypedBuffer::get(obj).map_err(|e| {
        let ty = obj.get_type().name().map(|n| n.to_string()).unwrap_or_else(|_| "object".into());
        err(
            py,
            Kind::Usage,
            format!(
                "{what}: a {ty} does not expose its memory through the buffer protocol or __cuda_array_interface__ \
                 ({e}); pass a numpy array, a CPU or CUDA torch tensor (through the devccl package), a bytearray or a \
                 memoryview"
            ),
        )
    })?;
    if !buf.is_c_contiguous() {
        return Err(err(
            py,
            Kind::Usage,
            format!(
                "{what} is not C-contiguous (shape {:?}, strides {:?} bytes); devccl only works on contiguous memory: pass \
                 numpy.ascontiguousarray(x) or tensor.contiguous()",
                buf.shape(),
                buf.strides()
            ),
        ));
    }
    if write && buf.readonly() {
        return Err(err(py, Kind::Usage, format!("{what} is read-only, but devccl must write into it")));
    }
    let format = buf.format().to_string_lossy().into_owned();
    let item_size = buf.item_size();
    Ok(Exported {
        kind: MemKind::Host,
        what: what.to_string(),
        addr: buf.buf_ptr() as usize,
        len: buf.len_bytes(),
        writable: !buf.readonly(),
        format_dtype: format_dtype(&format, item_size),
        item_size,
        format,
        stream: None,
        keep: Keep::Buffer(buf),
    })
}

/// The CUDA ordinal of the object's `device` attribute: an int, a `torch.device` (`index`)
/// or a cupy `Device` (`id`). The array interface itself does not say which device holds
/// the memory.
fn cuda_ordinal(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<i32> {
    let py = obj.py();
    let unknown = |detail: &str| {
        err(
            py,
            Kind::Usage,
            format!(
                "{what}: cannot tell which CUDA device holds this memory ({detail}); an object with \
                 __cuda_array_interface__ also needs a `device` attribute: the CUDA ordinal, a torch.device or a cupy \
                 Device"
            ),
        )
    };
    let dev = obj.getattr(intern!(py, "device")).map_err(|_| unknown("no `device` attribute"))?;
    if let Ok(i) = dev.extract::<i32>() {
        return Ok(i);
    }
    for attr in [intern!(py, "index"), intern!(py, "id")] {
        if let Ok(v) = dev.getattr(attr) {
            return v.extract::<Option<i32>>().ok().flatten().ok_or_else(|| unknown("the device has no index"));
        }
    }
    Err(unknown("`device` is neither an int nor has an index"))
}

fn export_cuda(obj: &Bound<'_, PyAny>, cai: &Bound<'_, PyAny>, what: &str, write: bool) -> PyResult<Exported> {
    let py = obj.py();
    let bad = |m: String| err(py, Kind::Usage, format!("{what}: invalid __cuda_array_interface__: {m}"));
    let d = cai.cast::<PyDict>().map_err(|_| bad("not a dict".into()))?;
    let item = |k: &str| -> PyResult<Option<Bound<'_, PyAny>>> { Ok(d.get_item(k)?.filter(|v| !v.is_none())) };
    let shape: Vec<usize> =
        item("shape")?.ok_or_else(|| bad("no 'shape'".into()))?.extract().map_err(|e| bad(format!("'shape': {e}")))?;
    let typestr: String = item("typestr")?
        .ok_or_else(|| bad("no 'typestr'".into()))?
        .extract()
        .map_err(|e| bad(format!("'typestr': {e}")))?;
    let (ptr, readonly): (usize, bool) = item("data")?
        .ok_or_else(|| bad("no 'data'".into()))?
        .extract()
        .map_err(|e| bad(format!("'data' must be (pointer, read_only): {e}")))?;
    let strides: Option<Vec<isize>> =
        item("strides")?.map(|s| s.extract()).transpose().map_err(|e| bad(format!("'strides': {e}")))?;
    if item("mask")?.is_some() {
        return Err(bad("masked arrays are not supported".into()));
    }
    let stream: Option<u64> =
        item("stream")?.map(|s| s.extract()).transpose().map_err(|e| bad(format!("'stream': {e}")))?;
    let (item_size, format_dtype) = typestr_dtype(&typestr).ok_or_else(|| bad(format!("typestr '{typestr}'")))?;
    if !c_contiguous(&shape, strides.as_deref(), item_size) {
        return Err(err(
            py,
            Kind::Usage,
            format!(
                "{what} is not C-contiguous (shape {shape:?}, strides {strides:?} bytes); devccl only works on \
                 contiguous memory: pass tensor.contiguous()"
            ),
        ));
    }
    if write && readonly {
        return Err(err(py, Kind::Usage, format!("{what} is read-only, but devccl must write into it")));
    }
    let len = shape
        .iter()
        .try_fold(item_size, |acc, &n| acc.checked_mul(n))
        .ok_or_else(|| bad(format!("shape {shape:?} overflows")))?;
    if len > 0 && ptr == 0 {
        return Err(bad("null data pointer".into()));
    }
    let device = cuda_ordinal(obj, what)?;
    Ok(Exported {
        kind: MemKind::Cuda { device },
        what: what.to_string(),
        addr: ptr,
        len,
        writable: !readonly,
        item_size,
        format_dtype,
        format: typestr,
        stream,
        keep: Keep::Object(Owner(Some(obj.clone().unbind()))),
    })
}

/// The buffers of one call, before they become regions.
pub(crate) enum Operands {
    /// One buffer is both input and output.
    InPlace(Exported),
    /// Separate (possibly absent, possibly aliasing) input and output.
    Separate(Option<Exported>, Option<Exported>),
}

impl Operands {
    /// The exports, in argument order.
    pub(crate) fn exports(&self) -> Vec<&Exported> {
        match self {
            Operands::InPlace(e) => vec![e],
            Operands::Separate(i, o) => i.iter().chain(o.iter()).collect(),
        }
    }
}

/// Where a call's memory lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Place {
    /// Host memory (or no memory at all).
    Host,
    /// CUDA memory of one device.
    Cuda {
        /// True when some operand has bytes (calls on empty device buffers need no device).
        bytes: bool,
        /// The first stream an array interface named, if any.
        stream: Option<u64>,
    },
}

fn kind_name(k: &MemKind) -> String {
    match k {
        MemKind::Host => "host memory".into(),
        MemKind::Cuda { device } => format!("CUDA memory on cuda:{device}"),
        other => format!("{other:?} memory"),
    }
}

/// Where the operands live; operands in different places (host and CUDA, or two CUDA
/// devices) are refused: devccl never copies between them behind the caller's back.
pub(crate) fn placement(py: Python<'_>, exports: &[&Exported]) -> PyResult<Place> {
    let Some(first) = exports.first() else { return Ok(Place::Host) };
    if let Some(other) = exports.iter().find(|e| e.kind != first.kind) {
        return Err(err(
            py,
            Kind::Usage,
            format!(
                "{} is {} but {} is {}: every buffer of a call must live on one device (devccl never copies between \
                 host and device memory); move them with .cpu() or .cuda()",
                first.what,
                kind_name(&first.kind),
                other.what,
                kind_name(&other.kind)
            ),
        ));
    }
    Ok(match first.kind {
        MemKind::Host => Place::Host,
        _ => Place::Cuda {
            bytes: exports.iter().any(|e| e.device_bytes()),
            stream: exports.iter().find_map(|e| e.stream),
        },
    })
}

/// How long the exports must outlive the call (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Lifetime {
    /// Blocking call: exports held by a [`CallGuard`].
    Call,
    /// Asynchronous or stream-ordered call: exports owned by the regions.
    Work,
}

/// Holds a blocking call's exports; dropping it (attached to the interpreter) revokes the
/// regions first, then releases the exports.
pub(crate) struct CallGuard {
    regions: Vec<Region>,
    _exports: Vec<Keep>,
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        // Revocation waits for any access in progress; afterwards no clone of these regions
        // can reach the memory, so releasing the exports (the fields, dropped next) is safe.
        for r in &self.regions {
            r.revoke();
        }
    }
}

/// The input and output regions of a call, and what keeps their memory alive.
pub(crate) struct Regions {
    /// Input slice.
    pub(crate) input: RegionSlice,
    /// Output slice (the same slice as `input` for in-place calls).
    pub(crate) output: RegionSlice,
    /// For [`Lifetime::Call`]: drop after the call returned, while attached.
    pub(crate) guard: Option<CallGuard>,
}

/// Builds regions, remembering which exports each one needs.
struct Maker {
    life: Lifetime,
    regions: Vec<Region>,
    exports: Vec<Keep>,
}

impl Maker {
    /// A region over `span` (address, length) of the memory pinned by `owned` (all of one
    /// kind: [`placement`] refused mixtures).
    fn region(&mut self, span: (usize, usize), writable: bool, owned: Vec<Exported>) -> Region {
        let (addr, len) = span;
        let kind = owned.first().map_or(MemKind::Host, |e| e.kind.clone());
        if len == 0 && !kind.is_host() {
            // No bytes to reach: an empty host region, so the call needs no device.
            return Region::alloc(0);
        }
        let keeper: Option<Box<dyn Any + Send>> = match self.life {
            Lifetime::Work => Some(Box::new(owned.into_iter().map(|e| e.keep).collect::<Vec<_>>())),
            Lifetime::Call => {
                self.exports.extend(owned.into_iter().map(|e| e.keep));
                None
            }
        };
        // SAFETY: `addr .. addr + len` is the memory of a live, C-contiguous export (checked
        // in `export`): host memory of a buffer-protocol export, or CUDA memory of device
        // `kind` that the object exposing `__cuda_array_interface__` owns (a torch tensor
        // owns its storage; the interface's contract is that the pointer stays valid while
        // the object lives). CUDA addresses are never dereferenced by the CPU: devccl hands
        // them to the CUDA device backend, whose work on them finishes before the call
        // completes. `writable` is only true when the caller's output over this memory is
        // writable, and devccl writes only through the output slice. What pins the memory
        // is in `owned` (moved just above): either the region's keeper, dropped only with
        // the region's last clone (Lifetime::Work), or the CallGuard, which revokes this
        // region before releasing it (Lifetime::Call). Concurrent use of the same memory by
        // other threads or CUDA streams while a collective runs is excluded by the API
        // contract (stream-ordered calls order themselves after the caller's stream), as
        // for any buffer handed to a collective.
        let r = unsafe { Region::from_device(addr as *mut u8, len, kind, writable, keeper, None) };
        if self.life == Lifetime::Call {
            self.regions.push(r.clone());
        }
        r
    }

    fn finish(self, input: RegionSlice, output: RegionSlice) -> Regions {
        let guard = match self.life {
            Lifetime::Call => Some(CallGuard { regions: self.regions, _exports: self.exports }),
            Lifetime::Work => None,
        };
        Regions { input, output, guard }
    }
}

/// Turn the operands into regions. Aliasing is decided by address, so two exports of the same
/// memory become one region (devccl recognises in-place calls by region identity): identical
/// ranges are an in-place call, an input inside the output (in-place all_gather) becomes a
/// slice of the output's region, and partial overlaps are refused. Call [`placement`] first:
/// addresses only compare within one kind of memory.
pub(crate) fn bind(py: Python<'_>, ops: Operands, life: Lifetime) -> PyResult<Regions> {
    let mut mk = Maker { life, regions: Vec::new(), exports: Vec::new() };
    let empty = || Region::alloc(0).full();
    match ops {
        Operands::InPlace(e) => {
            let r = mk.region(e.span(), e.writable, vec![e]);
            let s = r.full();
            Ok(mk.finish(s.clone(), s))
        }
        Operands::Separate(None, None) => Ok(mk.finish(empty(), empty())),
        Operands::Separate(Some(i), None) => {
            let r = mk.region(i.span(), false, vec![i]);
            Ok(mk.finish(r.full(), empty()))
        }
        Operands::Separate(None, Some(o)) => {
            let w = o.writable;
            let r = mk.region(o.span(), w, vec![o]);
            Ok(mk.finish(empty(), r.full()))
        }
        Operands::Separate(Some(i), Some(o)) => {
            let (il, ol) = (i.len, o.len);
            let disjoint = il == 0 || ol == 0 || i.end() <= o.addr || o.end() <= i.addr;
            if disjoint {
                let ri = mk.region(i.span(), false, vec![i]);
                let w = o.writable;
                let ro = mk.region(o.span(), w, vec![o]);
                Ok(mk.finish(ri.full(), ro.full()))
            } else if i.addr == o.addr && il == ol {
                let w = o.writable;
                let r = mk.region(o.span(), w, vec![o, i]);
                let s = r.full();
                Ok(mk.finish(s.clone(), s))
            } else if i.addr >= o.addr && i.end() <= o.end() {
                let off = i.addr - o.addr;
                let w = o.writable;
                let r = mk.region(o.span(), w, vec![o, i]);
                Ok(mk.finish(r.slice(off..off + il), r.full()))
            } else if o.addr >= i.addr && o.end() <= i.end() {
                let off = o.addr - i.addr;
                let w = o.writable;
                let r = mk.region(i.span(), w, vec![i, o]);
                Ok(mk.finish(r.full(), r.slice(off..off + ol)))
            } else {
                Err(err(
                    py,
                    Kind::Usage,
                    "input and output overlap partially; use separate buffers or the in-place form",
                ))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_map_to_devccl_dtypes() {
        for (f, size, want) in [
            ("f", 4, Some(DType::F32)),
            ("<d", 8, Some(DType::F64)),
            ("=e", 2, Some(DType::F16)),
            ("b", 1, Some(DType::I8)),
            ("B", 1, Some(DType::U8)),
            ("@i", 4, Some(DType::I32)),
            ("l", 8, Some(DType::I64)),
            ("q", 8, Some(DType::I64)),
            ("l", 4, Some(DType::I32)),
            (">f", 4, None),
            ("!i", 4, None),
            ("h", 2, None),
            ("H", 2, None),
            ("?", 1, None),
            ("Zf", 8, None),
            ("Q", 8, Some(DType::U64)),
            ("I", 4, Some(DType::U32)),
            ("", 1, None),
        ] {
            assert_eq!(format_dtype(f, size), want, "format {f:?} size {size}");
        }
    }

    #[test]
    fn typestrs_map_to_devccl_dtypes() {
        for (t, want) in [
            ("<f4", Some((4, Some(DType::F32)))),
            ("<f8", Some((8, Some(DType::F64)))),
            ("<f2", Some((2, Some(DType::F16)))),
            ("|i1", Some((1, Some(DType::I8)))),
            ("|u1", Some((1, Some(DType::U8)))),
            ("<i4", Some((4, Some(DType::I32)))),
            ("=i8", Some((8, Some(DType::I64)))),
            ("<u4", Some((4, Some(DType::U32)))),
            ("<u8", Some((8, Some(DType::U64)))),
            ("<u2", Some((2, None))),
            ("<i2", Some((2, None))),
            ("|V1", Some((1, None))),
            (">f4", Some((4, None))),
            ("|b1", Some((1, None))),
            ("<c8", Some((8, None))),
            ("<f", None),
            ("f4", None),
            ("<f0", None),
            ("", None),
        ] {
            assert_eq!(typestr_dtype(t), want, "typestr {t:?}");
        }
    }

    #[test]
    fn contiguity_of_array_interface_strides() {
        assert!(c_contiguous(&[3, 4], None, 4));
        assert!(c_contiguous(&[3, 4], Some(&[16, 4]), 4));
        assert!(!c_contiguous(&[3, 4], Some(&[4, 12]), 4), "Fortran order");
        assert!(!c_contiguous(&[3, 2], Some(&[16, 4]), 4), "a column slice");
        assert!(c_contiguous(&[3, 1], Some(&[4, 999]), 4), "extent-1 dims may have any stride");
        assert!(c_contiguous(&[0, 5], Some(&[7, 9]), 4), "empty arrays are contiguous");
        assert!(c_contiguous(&[], Some(&[]), 8), "0-d arrays are contiguous");
        assert!(!c_contiguous(&[4], Some(&[4, 4]), 4), "rank mismatch");
        assert!(!c_contiguous(&[4], Some(&[-4]), 4), "negative strides");
    }
}
