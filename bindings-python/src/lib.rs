//! Python bindings of devccl: the native module `devccl._native`.
//!
//! - [`comm`]: `Communicator` (init from the launcher's environment or explicitly, every
//!   collective through one descriptor method, abort, destroy).
//! - [`work`]: `Work`, the handle of an asynchronous or stream-ordered collective.
//! - [`rendezvous`]: `RendezvousServer`, for hosting the rendezvous in-process (the torch
//!   backend does, per process group).
//! - [`errors`]: the exception hierarchy (`DevcclError` and subclasses).
//! - [`buffer`]: buffer-protocol exports and CUDA array interfaces as devccl regions: the only
//!   `unsafe` code here.
//!
//! Blocking calls release the GIL. The Python package `devccl` (python/devccl) adds typed
//! per-collective methods, torch tensor support and the torch.distributed backend.

mod buffer;
mod comm;
mod errors;
mod rendezvous;
mod work;

use pyo3::prelude::*;

/// The names of the element types devccl supports, as `dtype=` accepts them.
#[pyfunction]
fn dtypes() -> Vec<&'static str> {
    devccl::DType::ALL
        .iter()
        .map(|d| match d {
            devccl::DType::F32 => "float32",
            devccl::DType::F64 => "float64",
            devccl::DType::F16 => "float16",
            devccl::DType::BF16 => "bfloat16",
            devccl::DType::I8 => "int8",
            devccl::DType::U8 => "uint8",
            devccl::DType::I32 => "int32",
            devccl::DType::I64 => "int64",
            devccl::DType::U32 => "uint32",
            devccl::DType::U64 => "uint64",
            devccl::DType::F8E4M3 => "float8_e4m3fn",
            devccl::DType::F8E5M2 => "float8_e5m2",
        })
        .collect()
}

/// The names of the reduction operators.
#[pyfunction]
fn reduce_ops() -> Vec<&'static str> {
    devccl::ReduceOp::ALL.iter().map(|o| o.name()).collect()
}

/// The native module.
#[pymodule]
#[pyo3(name = "_native")]
fn native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_class::<comm::PyCommunicator>()?;
    m.add_class::<work::PyWork>()?;
    m.add_class::<rendezvous::PyRendezvousServer>()?;
    m.add_function(wrap_pyfunction!(dtypes, m)?)?;
    m.add_function(wrap_pyfunction!(reduce_ops, m)?)?;
    errors::register(m)?;
    Ok(())
}
