//! Test utilities (feature `test-util`): an in-memory transport for N-rank meshes in one
//! process, and the conformance suite every transport must pass.

pub mod conformance;
mod mem;

pub use mem::{MemTransport, mesh, mesh_with};
