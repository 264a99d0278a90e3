//! A rank program for the multi-process tests (not installed for users): runs all-reduces
//! over the real TCP transport and injects faults on request.
//!
//! Environment (besides the launcher's RANK/WORLD_SIZE/MASTER_*):
//! - `WORKER_ITERS` (default 20), `WORKER_COUNT` elements (default 100000), `WORKER_DTYPE`.
//! - `WORKER_DIE_RANK` + `WORKER_DIE_AT`: that rank kills itself (SIGKILL) before iteration N.
//! - `WORKER_STALL_RANK` + `WORKER_STALL_AT`: that rank stops calling (sleeps) at iteration N.
//! - `WORKER_MISMATCH_RANK`: that rank calls with a different count (or dtype with
//!   `WORKER_MISMATCH=dtype`).
//! - `WORKER_SLEEP_MS`: pause between iterations (lets a test poke the data port).
//! Prints `endpoint <addr>` first, then `ok <iters>` or `error: <message>`; exit 0/1.

use std::time::Duration;

use devccl::{Communicator, DType, ReduceOp};
use devccl_core::memory::Region;

fn env<T: std::str::FromStr>(k: &str) -> Option<T> {
    std::env::var(k).ok().and_then(|v| v.parse().ok())
}

fn main() {
    let comm = match Communicator::init() {
        Ok(c) => c,
        Err(e) => {
            println!("error: {e}");
            std::process::exit(1);
        }
    };
    let rank = comm.rank();
    for p in comm.peers().iter().filter(|p| p.rank.idx() == rank) {
        for e in &p.endpoints {
            println!("endpoint {} {}", e.kind, e.address);
        }
    }
    let iters: usize = env("WORKER_ITERS").unwrap_or(20);
    let count: usize = env("WORKER_COUNT").unwrap_or(100_000);
    let dtype: DType = std::env::var("WORKER_DTYPE").ok().and_then(|d| d.parse().ok()).unwrap_or(DType::F32);
    let sleep = Duration::from_millis(env("WORKER_SLEEP_MS").unwrap_or(0));
    let n = comm.world_size();
    let op = ReduceOp::Sum;
    for it in 0..iters {
        if env::<usize>("WORKER_DIE_RANK") == Some(rank) && env::<usize>("WORKER_DIE_AT") == Some(it) {
            let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
        }
        if env::<usize>("WORKER_STALL_RANK") == Some(rank) && env::<usize>("WORKER_STALL_AT") == Some(it) {
            std::thread::sleep(Duration::from_secs(3600));
        }
        let (mut dt, mut cnt) = (dtype, count);
        if env::<usize>("WORKER_MISMATCH_RANK") == Some(rank) {
            if std::env::var("WORKER_MISMATCH").as_deref() == Ok("dtype") {
                dt = DType::I32;
            } else {
                cnt = count + 1;
            }
        }
        let input = devccl::check::input(dt, op, rank, 0, cnt);
        let r = Region::from_vec(input);
        if let Err(e) = comm.all_reduce_regions(r.full(), r.full(), dt, op) {
            println!("error: {e}");
            // A second call must fail fast with the poisoned cause.
            if let Err(again) = comm.all_reduce_regions(r.full(), r.full(), dt, op) {
                println!("after: {again}");
            }
            std::process::exit(1);
        }
        let want = devccl::check::reduced(dt, op, n, 0, cnt).expect("reference");
        let got = r.into_vec::<u8>().expect("sole owner");
        if got != want {
            println!("error: wrong result at iteration {it}");
            std::process::exit(2);
        }
        std::thread::sleep(sleep);
    }
    let counters: Vec<String> = comm.transport_counters().iter().map(|(k, v)| format!("{k}={v}")).collect();
    println!("ok {iters} {}", counters.join(" "));
}
