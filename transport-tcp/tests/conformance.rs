//! The core conformance suite over real sockets: IPv4 with 1 and 3 lanes, IPv6 loopback.

mod common;

use std::net::{SocketAddr, TcpListener};

use common::{pair_on, v4, v6};
use devccl_core::testing::conformance::run_all;

#[test]
fn conformance_ipv4_one_lane() {
    run_all(&|| pair_on(v4(), 1)).unwrap();
}

#[test]
fn conformance_ipv4_three_lanes() {
    run_all(&|| pair_on(v4(), 3)).unwrap();
}

#[test]
fn conformance_ipv6_loopback() {
    // A host with IPv6 disabled cannot run this; say so rather than fail.
    if TcpListener::bind(SocketAddr::new(v6(), 0)).is_err() {
        eprintln!("skipping: IPv6 loopback ([::1]) is not available here");
        return;
    }
    run_all(&|| pair_on(v6(), 2)).unwrap();
}
