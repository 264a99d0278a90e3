//! devccl: collective communication over TCP (and, where the hardware allows, devmem TCP).
//!
//! ```no_run
//! # fn main() -> devccl::Result<()> {
//! // Under torchrun or `devccl launch`: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT are set.
//! let comm = devccl::Communicator::init()?;
//! let mut grad = vec![1.0f32; 1024];
//! comm.all_reduce(&mut grad, devccl::ReduceOp::Sum)?;
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]

pub mod algo;
pub mod api;
pub mod check;
pub mod comm;
pub mod device_buf;
pub mod exec;
pub mod lower;
pub mod registry;
pub mod schedule;
pub mod select;
pub mod work;

#[cfg(any(test, feature = "test-util"))]
pub mod testing;

pub use api::{Collective, P2pOp, StreamWork};
pub use comm::{Call, Communicator, InitOptions};
pub use devccl_core::memory::DeviceId;
pub use devccl_core::wire::CollKind;
pub use devccl_core::{CommId, DType, Element, Error, Fault, Rank, ReduceOp, Result};
pub use device_buf::DeviceBuffer;
pub use work::Work;
