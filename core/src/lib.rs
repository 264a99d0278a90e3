//! devccl-core: the types every part of devccl shares.
//!
//! - [`dtype`], [`op`]: element types, reduction operators and the CPU reduction kernels.
//! - [`memory`]: regions of host or device memory that transports read and write.
//! - [`device`]: the `Device` trait (copies, reductions, gathers on the memory's own device,
//!   tested like transport requests) and the host device.
//! - [`transport`]: the transport contract every transport implements (DESIGN §4);
//!   [`conn_state`]: the request bookkeeping connections share; [`handshake`]: the
//!   connection handshake of stream transports; [`listen`]: the listening side they share.
//! - [`scatter`]: gathering a scattered (devmem) receive into its destination on a device.
//! - [`wire`]: the one wire codec (frame headers, handshake messages).
//! - [`config`]: the one place that reads `DEVCCL_*` and launcher variables.
//! - [`bootstrap`]: the gRPC rendezvous (server and client).
//! - [`auth`]: shared-secret authentication.
//! - `testing` (feature `test-util`): an in-memory transport, an N-rank mesh, and the
//!   conformance suite every transport must pass.

pub mod auth;
pub mod bootstrap;
pub mod config;
pub mod conn_state;
pub mod device;
pub mod dtype;
pub mod error;
pub mod handshake;
pub mod listen;
pub mod memory;
pub mod op;
pub mod scatter;
pub mod transport;
pub mod types;
pub mod wire;

#[cfg(any(test, feature = "test-util"))]
pub mod testing;

pub use dtype::{DType, Element};
pub use error::{Error, Fault, Result};
pub use op::ReduceOp;
pub use types::{CommId, Rank, Seq};
