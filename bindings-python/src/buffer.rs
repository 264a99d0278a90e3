//! Python buffers as devccl memory regions. This is the only module of the bindings with
//! `unsafe` code: turning a buffer export (PEP 3118) into a [`Region`].
//!
//! Soundness rests on the buffer protocol: while an export ([`PyUntypedBuffer`]) is held,
//! the exporting object keeps the memory allocated and refuses to resize it (numpy arrays,
//! `bytearray`, `array.array` all do). So a region must never outlive the export it points
//! into. Two lifetimes are used:
//!
//! - [`Lifetime::Call`] (blocking calls): regions own nothing; the exports stay in a
//!   [`CallGuard`] on the caller's stack, which *revokes* the regions before it releases the
//!   exports. A transport that still held a clone of a region afterwards would find it dead
//!   instead of touching released memory.
//! - [`Lifetime::Work`] (asynchronous calls): each region owns its exports as its `keeper`,
//!   so the memory stays exported exactly as long as any part of devccl can reach it. The
//!   last clone may be dropped on a devccl thread; [`PyUntypedBuffer`]'s `Drop` attaches to
//!   the interpreter to release the export (pyo3 0.30 behaviour: `Python::try_attach`), which
//!   is safe there because devccl holds none of its locks while dropping finished work.
//!
//! Only C-contiguous buffers are accepted (a strided view is refused with a message that says
//! how to fix it); the exported format fixes the element type unless the caller names one.

use std::any::Any;

use devccl::DType;
use devccl_core::memory::{MemKind, Region, RegionSlice};
use pyo3::buffer::PyUntypedBuffer;
use pyo3::prelude::*;

use crate::errors::{Kind, err};

/// A checked export of one Python object's memory.
pub(crate) struct Exported {
    buf: PyUntypedBuffer,
    addr: usize,
    len: usize,
    writable: bool,
    item_size: usize,
    /// The element type the format names, if it is one of devccl's.
    format_dtype: Option<DType>,
    format: String,
}

impl Exported {
    fn span(&self) -> (usize, usize) {
        (self.addr, self.len)
    }

    fn end(&self) -> usize {
        self.addr + self.len
    }

    /// The element type: `want` when given (checked against the format), else the format's.
    pub(crate) fn dtype(&self, py: Python<'_>, what: &str, want: Option<DType>) -> PyResult<DType> {
        match (want, self.format_dtype) {
            (Some(w), Some(f)) if w != f => Err(err(
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
                    "{what} has element format '{}' ({} bytes), which devccl does not support; supported: float32, \
                     float64, float16, bfloat16 (pass dtype='bf16' with a 2-byte view), int8, uint8, int32, int64",
                    self.format, self.item_size
                ),
            )),
        }
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

/// Export `obj`'s memory for a collective. `what` names the argument in messages; `write`
/// asks for writable memory (outputs).
pub(crate) fn export(obj: &Bound<'_, PyAny>, what: &str, write: bool) -> PyResult<Exported> {
    let py = obj.py();
    let buf = PyUntypedBuffer::get(obj).map_err(|e| {
        let ty = obj.get_type().name().map(|n| n.to_string()).unwrap_or_else(|_| "object".into());
        err(
            py,
            Kind::Usage,
            format!(
                "{what}: a {ty} does not expose its memory through the buffer protocol ({e}); pass a numpy array, a CPU \
                 torch tensor (through the devccl package), a bytearray or a memoryview"
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
        addr: buf.buf_ptr() as usize,
        len: buf.len_bytes(),
        writable: !buf.readonly(),
        format_dtype: format_dtype(&format, item_size),
        item_size,
        format,
        buf,
    })
}

/// The buffers of one call, before they become regions.
pub(crate) enum Operands {
    /// One buffer is both input and output.
    InPlace(Exported),
    /// Separate (possibly absent, possibly aliasing) input and output.
    Separate(Option<Exported>, Option<Exported>),
}

/// How long the exports must outlive the call (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Lifetime {
    /// Blocking call: exports held by a [`CallGuard`].
    Call,
    /// Asynchronous call: exports owned by the regions.
    Work,
}

/// Holds a blocking call's exports; dropping it (attached to the interpreter) revokes the
/// regions first, then releases the exports.
pub(crate) struct CallGuard {
    regions: Vec<Region>,
    _exports: Vec<PyUntypedBuffer>,
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
    exports: Vec<PyUntypedBuffer>,
}

impl Maker {
    /// A region over `span` (address, length) of the memory pinned by `owned`.
    fn region(&mut self, span: (usize, usize), writable: bool, owned: Vec<Exported>) -> Region {
        let (addr, len) = span;
        let keeper: Option<Box<dyn Any + Send>> = match self.life {
            Lifetime::Work => Some(Box::new(owned.into_iter().map(|e| e.buf).collect::<Vec<_>>())),
            Lifetime::Call => {
                self.exports.extend(owned.into_iter().map(|e| e.buf));
                None
            }
        };
        // SAFETY: `addr .. addr + len` is the memory of a live, C-contiguous buffer export
        // (checked in `export`); `writable` is only true when the caller's output export over
        // this memory is writable, and devccl writes only through the output slice. The
        // exports that pin this memory are in `owned` (moved just above): either the region's
        // keeper, dropped only with the region's last clone (Lifetime::Work), or the
        // CallGuard, which revokes this region before releasing them (Lifetime::Call).
        // Concurrent use of the same memory by other Python threads while a collective runs
        // is excluded by the API contract, as for any buffer handed to a collective.
        let r = unsafe { Region::from_raw(addr as *mut u8, len, MemKind::Host, writable, keeper) };
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
/// slice of the output's region, and partial overlaps are refused.
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
}
