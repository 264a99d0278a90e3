//! Collectives on device memory across real processes: every collective × dtype × op × count
//! on Vulkan buffers (lavapipe in CI) in 2, 3 and 4 processes, bit-identical to the same call
//! on host buffers; a peer killed in the middle of staged device collectives; the benchmark on
//! device buffers; and a clear, fast error for CUDA on a machine without a driver.
//!
//! Without a Vulkan device the Vulkan tests print why and pass, unless
//! `DEVCCL_REQUIRE_VULKAN=1` (CI sets it: lavapipe is installed by the project's scripts).

use std::process::Command;
use std::time::{Duration, Instant};

mod common;
use common::{bench_rows_ok, finish, spawn, survivors_of_kill, vulkan_or_skip};

const DEVCHECK: &str = env!("CARGO_BIN_EXE_devccl-devcheck");
const DEVCCL: &str = env!("CARGO_BIN_EXE_devccl");

/// Run the device matrix on `n` processes; every rank must print `ok <cases>`.
fn matrix(n: usize, env: &[(&str, &str)], limit: Duration) {
    let mut all = vec![("DEVCHECK_DEVICE", "vulkan"), ("DEVCHECK_MODE", "matrix"), ("LP_NUM_THREADS", "1")];
    all.extend_from_slice(env);
    let res = finish(spawn(DEVCHECK, n, &all, |_| vec![]), limit);
    for (r, (ok, out, took)) in res.iter().enumerate() {
        assert!(*ok && out.contains("ok "), "n={n} rank {r} after {took:?}: {out}");
    }
    println!("{n} ranks: {} in {:?}", res[0].1.trim(), res[0].2);
}

#[test]
fn every_collective_on_vulkan_buffers_matches_the_host_with_2_ranks() {
    if vulkan_or_skip("vulkan matrix, 2 ranks") {
        // Counts 0, 1, a prime and a large one (more than a chunk and a staging slot).
        matrix(2, &[("DEVCHECK_COUNTS", "0,1,7919,262147")], Duration::from_secs(400));
    }
}

#[test]
fn every_collective_on_vulkan_buffers_matches_the_host_with_3_ranks() {
    if vulkan_or_skip("vulkan matrix, 3 ranks") {
        matrix(
            3,
            &[("DEVCHECK_COUNTS", "0,1,7919,131101"), ("DEVCHECK_LARGE_DTYPES", "f32,bf16,i64,u8,f8e5m2")],
            Duration::from_secs(400),
        );
    }
}

#[test]
fn every_collective_on_vulkan_buffers_matches_the_host_with_4_ranks() {
    if vulkan_or_skip("vulkan matrix, 4 ranks") {
        matrix(
            4,
            &[("DEVCHECK_COUNTS", "0,1,7919,131101"), ("DEVCHECK_LARGE_DTYPES", "f32,f16,u64,i8,f8e4m3")],
            Duration::from_secs(400),
        );
    }
}

#[test]
fn a_peer_killed_during_staged_device_collectives_fails_clearly_and_leaks_nothing() {
    if !vulkan_or_skip("vulkan fault") {
        return;
    }
    let n = 3;
    let env = [
        ("DEVCHECK_DEVICE", "vulkan"),
        ("DEVCHECK_MODE", "fault"),
        ("DEVCHECK_KILL_RANK", "1"),
        ("DEVCHECK_KILL_MS", "1500"),
        ("DEVCHECK_COUNT", "2000000"),
        ("DEVCCL_TIMEOUT", "8"),
        ("DEVCCL_TRANSPORTS", "tcp"),
    ];
    let t0 = Instant::now();
    let res = finish(spawn(DEVCHECK, n, &env, |_| vec![]), Duration::from_secs(60));
    survivors_of_kill(&res, 1, Duration::from_secs(30));
    println!("fault case done in {:?}", t0.elapsed());
}

#[test]
fn bench_on_vulkan_buffers_has_no_wrong_results() {
    if !vulkan_or_skip("vulkan bench") {
        return;
    }
    let out = Command::new(DEVCCL)
        .args(["bench", "all_reduce", "--device", "vulkan", "-n", "2", "-b", "8", "-e", "16M", "-f", "4", "-c", "1"])
        .args(["-w", "1", "-i", "2"])
        .env("LP_NUM_THREADS", "1")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    bench_rows_ok(&text, 12); // 8 B .. 16 MiB by 4x
}

#[test]
fn cuda_bench_without_a_driver_fails_within_seconds_saying_why() {
    if let Ok(v) = devccl_device::cuda::driver_status() {
        println!("skipped: a CUDA driver is present ({v})");
        return;
    }
    let t0 = Instant::now();
    let out = Command::new(DEVCCL).args(["bench", "all_reduce", "--device", "cuda", "-n", "2"]).output().unwrap();
    let took = t0.elapsed();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("no CUDA driver (libcuda.so.1 not found)"), "{text}");
    assert!(!text.contains("panicked"), "{text}");
    assert!(took < Duration::from_secs(10), "took {took:?}");
}
