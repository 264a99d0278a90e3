//! Generated gRPC types for devccl's rendezvous (bootstrap) service.
#![forbid(unsafe_code)]
#![allow(missing_docs, missing_debug_implementations, clippy::all)]
