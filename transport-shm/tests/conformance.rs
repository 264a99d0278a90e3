//! The core conformance suite over real shared memory: the default ring, a small ring
//! (messages up to 64 times its size stream through it, and every frame wraps), and the
//! smallest ring allowed.

mod common;

use common::pair;
use devccl_core::testing::conformance::run_all;
use devccl_transport_shm::DEFAULT_RING_BYTES;

#[test]
fn conformance_default_ring() {
    run_all(&|| pair(DEFAULT_RING_BYTES)).unwrap();
}

#[test]
fn conformance_64k_ring() {
    run_all(&|| pair(64 << 10)).unwrap();
}

#[test]
fn conformance_4k_ring() {
    // Smaller than an abort frame with a long reason, so aborts take the socket path
    // whenever the ring holds anything.
    run_all(&|| pair(4 << 10)).unwrap();
}
