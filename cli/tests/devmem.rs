//! The devmem transport across real processes, on the simulated kernel
//! (`DEVCCL_DEVMEM=sim DEVCCL_TRANSPORTS=devmem`): every collective × dtype (every op for the
//! reducing ones) on Vulkan and host buffers, bit-identical to host buffers, with host and
//! Vulkan RX pools in 2, 3 and 4 processes; zero-copy sends; a stream that spills every byte;
//! a peer killed while tokens are out (nothing leaks); a pool too small (a clear error naming
//! its size); the benchmark; and, on the real kernel of this machine, the fallback to TCP with
//! the kernel's classified reason (in `DEVCCL_DEBUG=info` and `devccl doctor`).
//!
//! Vulkan is lavapipe in CI; without a Vulkan device those cases run on host buffers with a
//! host pool, unless `DEVCCL_REQUIRE_VULKAN=1`.

use std::collections::HashMap;
use std::process::Command;
use std::time::{Duration, Instant};

mod common;
use common::{bench_rows_ok, finish, spawn, survivors_of_kill, vulkan_or_skip};

const DEVCHECK: &str = env!("CARGO_BIN_EXE_devccl-devcheck");
const DEVCCL: &str = env!("CARGO_BIN_EXE_devccl");

/// Vulkan here? Else host buffers and a host pool (CI requires Vulkan).
fn vulkan() -> bool {
    vulkan_or_skip("devmem over a Vulkan pool")
}

const SIM: [(&str, &str); 3] = [("DEVCCL_DEVMEM", "sim"), ("DEVCCL_TRANSPORTS", "devmem"), ("LP_NUM_THREADS", "1")];

/// `name=value` pairs of a `devmem ...` / `devmem-after-destroy ...` line.
fn counters(out: &str, prefix: &str) -> HashMap<String, u64> {
    let line = out.lines().find(|l| l.starts_with(prefix)).unwrap_or_else(|| panic!("no `{prefix}` line: {out}"));
    line.split_whitespace()
        .skip(1)
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.trim_start_matches("devmem.").to_string(), v.parse().unwrap_or(0)))
        .collect()
}

/// The device matrix over devmem on `n` processes: every rank passes, used devmem, and gave
/// every token back.
fn matrix(n: usize, device: &str, pool: &str, extra: &[(&str, &str)]) -> Vec<HashMap<String, u64>> {
    let mut env: Vec<(&str, &str)> = SIM.to_vec();
    env.extend([("DEVCHECK_DEVICE", device), ("DEVCHECK_MODE", "matrix"), ("DEVCCL_DEVMEM_POOL", pool)]);
    env.extend_from_slice(extra);
    let t = Instant::now();
    let res = finish(spawn(DEVCHECK, n, &env, |_| vec![]), Duration::from_secs(300));
    let mut all = Vec::new();
    for (r, (ok, out, took)) in res.iter().enumerate() {
        assert!(*ok && out.contains("ok "), "n={n} {device} buffers, {pool} pool: rank {r} after {took:?}: {out}");
        let c = counters(out, "devmem ");
        assert!(c["rx_fragments"] + c["rx_linear_bytes"] > 0, "rank {r} received nothing over devmem: {c:?}");
        assert_eq!(c["tokens_outstanding"], 0, "rank {r}: {c:?}");
        let after = counters(out, "devmem-after-destroy");
        for k in ["tokens_outstanding", "sim_tokens_outstanding", "sim_bindings_rx", "sim_bindings_tx", "tx_bindings"] {
            assert_eq!(after[k], 0, "rank {r} after destroy, {k}: {after:?}");
        }
        all.push(c);
    }
    println!(
        "{n} ranks, {device} buffers, {pool} pool: {} in {:?}",
        res[0].1.lines().find(|l| l.starts_with("ok ")).unwrap_or(""),
        t.elapsed()
    );
    all
}

#[test]
fn every_collective_over_devmem_with_a_vulkan_pool_and_2_ranks() {
    let (device, pool) = if vulkan() { ("vulkan", "vulkan") } else { ("host", "host") };
    let c = matrix(2, device, pool, &[("DEVCHECK_COUNTS", "0,1,7919,65537")]);
    // Device buffers that are not exportable go out through host staging (counted).
    if device == "vulkan" {
        assert!(c[0]["tx_staged_bytes"] > 0, "{:?}", c[0]);
    }
}

#[test]
fn every_collective_over_devmem_with_a_host_pool_and_3_ranks() {
    let device = if vulkan() { "vulkan" } else { "host" };
    matrix(3, device, "host", &[("DEVCHECK_COUNTS", "0,1,7919,65537"), ("DEVCHECK_LARGE_DTYPES", "f32,bf16,i64,u8")]);
}

#[test]
fn every_collective_over_devmem_zero_copy_with_4_ranks() {
    let (device, pool) = if vulkan() { ("vulkan", "vulkan") } else { ("host", "host") };
    let c = matrix(
        4,
        device,
        pool,
        &[("DEVCHECK_EXPORTABLE", "1"), ("DEVCHECK_COUNTS", "1,7919"), ("DEVCHECK_LARGE_DTYPES", "f32,f16,u64,i8")],
    );
    for (r, c) in c.iter().enumerate() {
        assert!(c["tx_devmem_sends"] > 0 && c["tx_completions"] > 0, "rank {r} sent nothing zero-copy: {c:?}");
    }
}

#[test]
fn a_stream_that_spills_every_byte_is_correct_and_counted() {
    let c = matrix(
        2,
        "host",
        "host",
        &[
            ("DEVCCL_DEVMEM_SIM_LINEAR_SPILL", "1"),
            ("DEVCHECK_COUNTS", "1,7919,65537"),
            ("DEVCHECK_COLLS", "all_reduce,all_gather,reduce_scatter,broadcast,all_to_all"),
        ],
    );
    for (r, c) in c.iter().enumerate() {
        assert_eq!(c["rx_fragments"], 0, "rank {r}: {c:?}");
        assert!(c["rx_linear_spills"] > 0 && c["rx_linear_bytes"] > 0, "rank {r}: {c:?}");
    }
}

#[test]
fn a_peer_killed_while_tokens_are_out_leaks_nothing() {
    let device = if vulkan() { "vulkan" } else { "host" };
    let mut env: Vec<(&str, &str)> = SIM.to_vec();
    env.extend([
        ("DEVCHECK_DEVICE", device),
        ("DEVCHECK_MODE", "fault"),
        ("DEVCHECK_KILL_RANK", "1"),
        ("DEVCHECK_KILL_MS", "1500"),
        ("DEVCHECK_COUNT", "2000000"),
        ("DEVCCL_DEVMEM_POOL", device),
        ("DEVCCL_TIMEOUT", "8"),
    ]);
    let res = finish(spawn(DEVCHECK, 3, &env, |_| vec![]), Duration::from_secs(60));
    for (r, out) in survivors_of_kill(&res, 1, Duration::from_secs(30)) {
        let after = counters(out, "devmem-after-destroy");
        assert!(after["rx_fragments"] > 0, "rank {r} received over devmem: {after:?}");
        for k in ["tokens_outstanding", "sim_tokens_outstanding", "sim_bindings_rx", "sim_bindings_tx"] {
            assert_eq!(after[k], 0, "rank {r} leaked {k}: {after:?}");
        }
    }
}

#[test]
fn a_pool_too_small_fails_clearly_within_the_timeout() {
    let mut env: Vec<(&str, &str)> = SIM.to_vec();
    env.extend([
        ("DEVCHECK_DEVICE", "host"),
        ("DEVCHECK_MODE", "pool"),
        ("DEVCHECK_COUNT", "1048576"),
        ("DEVCCL_DEVMEM_POOL", "host"),
        ("DEVCCL_DEVMEM_POOL_BYTES", "256K"),
        ("DEVCCL_DEVMEM_SIM_LINEAR_SPILL", "0"),
        ("DEVCCL_CHUNK", "2M"),
        ("DEVCCL_ALGO", "ring"),
        ("DEVCCL_TIMEOUT", "6"),
    ]);
    let res = finish(spawn(DEVCHECK, 2, &env, |_| vec![]), Duration::from_secs(60));
    let mut named = 0;
    for (r, (ok, out, took)) in res.iter().enumerate() {
        assert!(*ok && out.contains("failed after"), "rank {r}: {out}");
        assert!(*took < Duration::from_secs(12), "rank {r} took {took:?}: {out}");
        if out.contains("RX pool (262144 bytes") && out.contains("DEVCCL_DEVMEM_POOL_BYTES") {
            named += 1;
        }
        let after = counters(out, "devmem-after-destroy");
        assert_eq!(after["tokens_outstanding"], 0, "rank {r}: {after:?}");
    }
    assert!(named >= 1, "no rank named the pool: {res:?}");
    // The same pool serves when messages fit: the receives wait for tokens, then proceed.
    env.retain(|(k, _)| !["DEVCCL_CHUNK", "DEVCHECK_MODE"].contains(k));
    env.extend([
        ("DEVCHECK_MODE", "matrix"),
        ("DEVCHECK_COLLS", "all_reduce"),
        ("DEVCHECK_COUNTS", "262147"),
        ("DEVCHECK_LARGE_DTYPES", "f32"),
        ("DEVCCL_NSOCKS", "1"),
    ]);
    let res = finish(spawn(DEVCHECK, 2, &env, |_| vec![]), Duration::from_secs(120));
    for (r, (ok, out, _)) in res.iter().enumerate() {
        assert!(*ok && out.contains("ok "), "rank {r} with a small pool: {out}");
    }
}

#[test]
fn bench_over_devmem_has_no_wrong_results_and_returns_every_token() {
    let out = Command::new(DEVCCL)
        .args(["bench", "all_reduce", "-n", "2", "-b", "8", "-e", "64M", "-f", "4", "-c", "1", "-w", "1", "-i", "2"])
        .env("DEVCCL_DEVMEM", "sim")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    bench_rows_ok(&text, 13); // 8 B .. 64 MiB by 4x
    assert!(text.contains("# devmem counters"), "{text}");
    let value = |name: &str| -> u64 {
        let line = text.lines().find(|l| l.contains(name)).unwrap_or_else(|| panic!("{name}: {text}"));
        let mut it = line.split_whitespace();
        it.find(|w| *w == name).and_then(|_| it.next()).and_then(|v| v.parse().ok()).expect("a value")
    };
    assert_eq!(value("tokens_outstanding"), 0, "{text}");
    assert!(value("rx_fragments") > 0 && value("tokens_returned") == value("rx_fragments"), "{text}");
}

#[test]
fn the_real_kernel_here_falls_back_to_tcp_saying_why() {
    // Both ranks allow devmem first; this machine's kernel refuses it (no devmem NIC): the
    // pair uses TCP and each rank's info line says why.
    let env = [
        ("DEVCHECK_DEVICE", "host"),
        ("DEVCHECK_COUNTS", "7919"),
        ("DEVCHECK_COLLS", "all_reduce"),
        ("DEVCCL_TRANSPORTS", "devmem,tcp"),
        ("DEVCCL_DEBUG", "info"),
    ];
    let res = finish(spawn(DEVCHECK, 2, &env, |_| vec![]), Duration::from_secs(60));
    for (r, (ok, out, _)) in res.iter().enumerate() {
        assert!(*ok && out.contains("ok "), "rank {r}: {out}");
        let line = out
            .lines()
            .find(|l| l.contains("connected") && l.contains("devmem not used"))
            .unwrap_or_else(|| panic!("rank {r}: no per-peer devmem line: {out}"));
        assert!(line.contains("transport=tcp") && line.contains("declined devmem"), "{line}");
        assert!(line.contains("bind-rx") && line.contains("(fix: "), "{line}");
        println!("rank {r}: {line}");
    }
    // Forced: a refusal is an error.
    let env = [("DEVCHECK_DEVICE", "host"), ("DEVCCL_TRANSPORTS", "devmem")];
    let res = finish(spawn(DEVCHECK, 2, &env, |_| vec![]), Duration::from_secs(60));
    for (r, (ok, out, _)) in res.iter().enumerate() {
        assert!(!ok && out.contains("DEVCCL_TRANSPORTS=devmem allows nothing else"), "rank {r}: {out}");
    }
    // Forced on rank 0 only (which hosts the rendezvous): rank 1 hears why at once, not at
    // its 20 s init deadline from a closed port.
    let env = [("DEVCHECK_DEVICE", "host")];
    let only_rank0 =
        |r: usize| if r == 0 { vec![("DEVCCL_TRANSPORTS".to_string(), "devmem".to_string())] } else { vec![] };
    let res = finish(spawn(DEVCHECK, 2, &env, only_rank0), Duration::from_secs(60));
    let (ok, out, took) = &res[1];
    assert!(!ok && out.contains("rank 0 failed before joining") && out.contains("allows nothing else"), "{out}");
    assert!(*took < Duration::from_secs(10), "rank 1 took {took:?}: {out}");
    // And the doctor's line.
    let out = Command::new(DEVCCL).args(["doctor"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    let line = text.lines().find(|l| l.contains("declined: devmem (real kernel)")).unwrap_or_else(|| panic!("{text}"));
    assert!(line.contains("bind-rx") && line.contains("fix:"), "{line}");
    assert!(text.contains("ethtool -G") && text.contains("tcp-data-split on") && text.contains("ntuple on"), "{text}");
}
