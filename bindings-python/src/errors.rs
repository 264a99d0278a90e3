//! The Python exception hierarchy and the mapping from devccl errors to it.
//!
//! ```text
//! DevcclError(RuntimeError)
//! ├── InvalidUsageError(DevcclError, ValueError)   caller mistake; nothing was sent
//! │   └── DTypeError(InvalidUsageError, TypeError) unsupported or inconsistent element type
//! ├── RemoteError                                  a peer failed or disagreed
//! │   └── MismatchError                            ranks called different collectives/sizes/dtypes
//! ├── DevcclTimeoutError                           no progress within DEVCCL_TIMEOUT
//! ├── AbortedError                                 the communicator was aborted or poisoned
//! ├── UnsupportedError                             not available here (e.g. CUDA memory without a driver)
//! ├── DevcclSystemError                            an OS call failed
//! └── InternalError                                a bug in devccl
//! ```
//!
//! The classes are made with `type(...)` when the module loads (several need two bases,
//! which `create_exception!` cannot express) and live in `devccl._native`; the `devccl`
//! package re-exports them.

use devccl::Error;
use pyo3::exceptions::{PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyTuple, PyType};

/// The exception classes, created once per interpreter.
struct Classes {
    base: Py<PyType>,
    usage: Py<PyType>,
    dtype: Py<PyType>,
    remote: Py<PyType>,
    mismatch: Py<PyType>,
    timeout: Py<PyType>,
    aborted: Py<PyType>,
    unsupported: Py<PyType>,
    system: Py<PyType>,
    internal: Py<PyType>,
}

static CLASSES: PyOnceLock<Classes> = PyOnceLock::new();

fn make<'py>(py: Python<'py>, name: &str, bases: &[&Bound<'py, PyType>], doc: &str) -> PyResult<Py<PyType>> {
    let ns = PyDict::new(py);
    ns.set_item("__module__", "devccl")?;
    ns.set_item("__doc__", doc)?;
    let bases = PyTuple::new(py, bases)?;
    let ty = py.get_type::<PyType>().call1((name, bases, ns))?;
    Ok(ty.cast_into::<PyType>()?.unbind())
}

fn create(py: Python<'_>) -> PyResult<Classes> {
    let rt = py.get_type::<PyRuntimeError>();
    let ve = py.get_type::<PyValueError>();
    let te = py.get_type::<PyTypeError>();
    let base = make(py, "DevcclError", &[&rt], "Base class of every error devccl raises.")?;
    let b = base.bind(py);
    let usage = make(
        py,
        "InvalidUsageError",
        &[b, &ve],
        "The caller passed something invalid (sizes, roots, peers, buffers). Nothing was sent; \
         the communicator stays usable.",
    )?;
    let dtype = make(
        py,
        "DTypeError",
        &[usage.bind(py), &te],
        "An element type devccl does not support, or input and output of different types.",
    )?;
    let remote = make(py, "RemoteError", &[b], "A peer failed, closed its connection, or sent something invalid.")?;
    let mismatch = make(
        py,
        "MismatchError",
        &[remote.bind(py)],
        "Ranks called different collectives, or the same one with different sizes, dtypes, ops or roots.",
    )?;
    let timeout = make(py, "DevcclTimeoutError", &[b], "A collective or init made no progress within its deadline.")?;
    let aborted = make(
        py,
        "AbortedError",
        &[b],
        "The communicator was aborted (by any rank) or poisoned by an earlier failure; every later call raises this.",
    )?;
    let unsupported = make(
        py,
        "UnsupportedError",
        &[b],
        "The request cannot be served here (e.g. CUDA memory on a machine without a CUDA driver).",
    )?;
    let system = make(py, "DevcclSystemError", &[b], "An operating-system call failed.")?;
    let internal = make(py, "InternalError", &[b], "A bug in devccl; please report it with the message.")?;
    Ok(Classes { base, usage, dtype, remote, mismatch, timeout, aborted, unsupported, system, internal })
}

fn classes(py: Python<'_>) -> &Classes {
    // Created in `register` at import; this cannot fail afterwards.
    CLASSES.get_or_init(py, || create(py).expect("creating devccl's exception classes"))
}

/// Create the classes and add them to the module.
pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    let c = match CLASSES.get(py) {
        Some(c) => c,
        None => {
            let made = create(py)?;
            CLASSES.get_or_init(py, || made)
        }
    };
    for (name, ty) in [
        ("DevcclError", &c.base),
        ("InvalidUsageError", &c.usage),
        ("DTypeError", &c.dtype),
        ("RemoteError", &c.remote),
        ("MismatchError", &c.mismatch),
        ("DevcclTimeoutError", &c.timeout),
        ("AbortedError", &c.aborted),
        ("UnsupportedError", &c.unsupported),
        ("DevcclSystemError", &c.system),
        ("InternalError", &c.internal),
    ] {
        m.add(name, ty.clone_ref(py))?;
    }
    Ok(())
}

/// Which Python class an error raised by the bindings themselves belongs to.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Kind {
    /// [`Error::InvalidUsage`].
    Usage,
    /// Element-type problems (a kind of usage error).
    DType,
}

/// A Python exception of `kind` with `msg`.
pub(crate) fn err(py: Python<'_>, kind: Kind, msg: impl Into<String>) -> PyErr {
    let c = classes(py);
    let ty = match kind {
        Kind::Usage => &c.usage,
        Kind::DType => &c.dtype,
    };
    PyErr::from_type(ty.bind(py).clone(), msg.into())
}

/// The Python exception for a devccl error, with its full message.
pub(crate) fn to_py(py: Python<'_>, e: Error) -> PyErr {
    let c = classes(py);
    let ty = match &e {
        Error::InvalidUsage(_) => &c.usage,
        Error::Remote { .. } => &c.remote,
        Error::Mismatch { .. } => &c.mismatch,
        Error::Timeout { .. } => &c.timeout,
        Error::Aborted { .. } => &c.aborted,
        Error::Unsupported { .. } => &c.unsupported,
        Error::System { .. } | Error::Device { .. } => &c.system,
        Error::Internal(_) => &c.internal,
        _ => &c.base,
    };
    PyErr::from_type(ty.bind(py).clone(), e.to_string())
}
