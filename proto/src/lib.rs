//! Generated gRPC types for devccl's rendezvous (bootstrap) service.
//!
//! The service definition lives in `proto/devccl/bootstrap/v1/bootstrap.proto`; this crate
//! holds only the code tonic/prost generate from it. The logic (server, client, signing) is
//! in `devccl_core::bootstrap`.
#![forbid(unsafe_code)]
#![allow(missing_docs, missing_debug_implementations, clippy::all)]

/// `devccl.bootstrap.*` packages.
pub mod bootstrap {
    /// `devccl.bootstrap.v1`: the rendezvous service, version 1.
    pub mod v1 {
        tonic::include_proto!("devccl.bootstrap.v1");
    }
}
