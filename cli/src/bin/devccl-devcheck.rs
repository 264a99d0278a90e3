//! A rank program for the device tests (not installed for users): every collective × dtype ×
//! op × count on device buffers, compared byte for byte with the same call on host buffers
//! and with the expected result; or a fault in the middle of staged device collectives.
//!
//! Environment (besides the launcher's RANK/WORLD_SIZE/MASTER_*):
//! - `DEVCHECK_DEVICE`: `vulkan`, `cuda`, `host`, ... (default vulkan).
//! - `DEVCHECK_MODE`: `matrix` (default), `fault` or `pool`.
//! - `DEVCHECK_EXPORTABLE=1`: allocate the buffers exportable (devmem sends them zero-copy).
//! - matrix: `DEVCHECK_COUNTS` (comma list, default `0,1,7919,65537`), `DEVCHECK_LARGE_DTYPES`
//!   (dtypes that also run the largest count; default all), `DEVCHECK_COLLS` (default all).
//! - fault: `DEVCHECK_KILL_RANK` SIGKILLs itself `DEVCHECK_KILL_MS` after the first large
//!   all-reduce started (`DEVCHECK_COUNT` f32 elements, default 4M); survivors report the
//!   error, drop the communicator and report the device memory still allocated.
//!
//! - pool: one all-reduce of `DEVCHECK_COUNT` f32 elements, expected to fail (a devmem RX pool
//!   too small for its messages); prints the error.
//!
//! Prints `ok <cases>`, `failed: <message>` (fault and pool modes: the error), `live <bytes>`
//! (fault mode: device + staging bytes still allocated after the communicator was dropped,
//! besides the caller's own buffer), or `error: <message>`; exit 0 when the check passed.
//! When devmem served a peer, the matrix also prints `devmem <counters>` (this rank's), and
//! every mode prints `devmem-after-destroy <counters>` (the process's, once the communicator
//! is gone: `tokens_outstanding=0` means nothing leaked).

use std::sync::Arc;
use std::time::Duration;

use devccl::check::{Case, CaseBuffers};
use devccl::{CollKind, Communicator, DType, ReduceOp};
use devccl_core::device::Device;
use devccl_core::memory::DeviceId;

fn env(k: &str) -> Option<String> {
    std::env::var(k).ok().filter(|v| !v.is_empty())
}

fn fail(msg: impl std::fmt::Display) -> ! {
    println!("error: {msg}");
    std::process::exit(1);
}

fn main() {
    let device: DeviceId = env("DEVCHECK_DEVICE").unwrap_or("vulkan".into()).parse().unwrap_or_else(|e| fail(e));
    let dev = devccl_device::open(device).unwrap_or_else(|e| fail(e));
    let comm = Communicator::init().unwrap_or_else(|e| fail(e));
    match env("DEVCHECK_MODE").as_deref().unwrap_or("matrix") {
        "matrix" => {
            matrix(&comm, &dev);
            drop(comm);
        }
        "fault" => fault(comm, &dev),
        "pool" => pool(comm),
        m => fail(format!("unknown DEVCHECK_MODE {m}")),
    }
    after_destroy();
}

/// The process's devmem counters once every communicator is gone (the progress thread lets
/// go of the connections as it exits: wait for the gauges to settle, briefly).
fn after_destroy() {
    let counters = devccl_transport_devmem::transport::process_counters;
    let used = counters().iter().any(|(k, v)| *k == "steered_sockets" && *v > 0);
    if !used {
        return;
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let outstanding = || counters().iter().find(|(k, _)| *k == "tokens_outstanding").map_or(0, |(_, v)| *v);
    while outstanding() != 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let sim = devccl_transport_devmem::sim::SimKernel::global().stats();
    println!(
        "devmem-after-destroy {} sim_tokens_outstanding={} sim_bindings_rx={} sim_bindings_tx={}",
        fmt_counters(&counters()),
        sim.tokens_outstanding,
        sim.bindings_rx,
        sim.bindings_tx
    );
}

fn fmt_counters(c: &[(impl AsRef<str>, u64)]) -> String {
    c.iter().map(|(k, v)| format!("{}={v}", k.as_ref())).collect::<Vec<_>>().join(" ")
}

/// One all-reduce meant to overflow a small devmem RX pool: prints the error.
fn pool(comm: Communicator) {
    let count: usize = env("DEVCHECK_COUNT").and_then(|v| v.parse().ok()).unwrap_or(4 << 20);
    let mut v = vec![1.0f32; count];
    let t = std::time::Instant::now();
    match comm.all_reduce(&mut v, ReduceOp::Sum) {
        Ok(()) => println!("ok (no error) in {:?}", t.elapsed()),
        Err(e) => println!("failed after {:?}: {e}", t.elapsed()),
    }
    drop(comm);
}

fn list<T: std::str::FromStr>(k: &str) -> Option<Vec<T>> {
    env(k).map(|v| v.split(',').map(|s| s.trim().parse().unwrap_or_else(|_| fail(format!("{k}: bad {s}")))).collect())
}

fn coll_by_name(s: &str) -> CollKind {
    CollKind::ALL.into_iter().find(|c| c.name() == s).unwrap_or_else(|| fail(format!("unknown collective {s}")))
}

/// Every case: device result == host result == expected, out of place and in place.
fn matrix(comm: &Communicator, dev: &Arc<dyn Device>) {
    let exportable = env("DEVCHECK_EXPORTABLE").as_deref() == Some("1");
    let host = devccl_core::device::host();
    let counts: Vec<usize> = list("DEVCHECK_COUNTS").unwrap_or(vec![0, 1, 7919, 65537]);
    let large = counts.iter().copied().max().unwrap_or(0);
    let large_dtypes: Vec<DType> = list("DEVCHECK_LARGE_DTYPES").unwrap_or(DType::ALL.to_vec());
    let colls: Vec<CollKind> =
        env("DEVCHECK_COLLS").map(|v| v.split(',').map(coll_by_name).collect()).unwrap_or(CollKind::ALL.to_vec());
    let (rank, n) = (comm.rank(), comm.world_size());
    let mut cases = 0usize;
    for &coll in &colls {
        for dtype in DType::ALL {
            let ops: &[ReduceOp] = if devccl::check::reduces(coll) { &ReduceOp::ALL } else { &[ReduceOp::Sum] };
            for &op in ops {
                for &count in &counts {
                    if count == large && count > 0 && !large_dtypes.contains(&dtype) {
                        continue;
                    }
                    // Splitting collectives: `count` elements per rank block.
                    let total = if devccl::check::splits(coll) { count * n } else { count };
                    let root = cases % n;
                    let case = Case { coll, dtype, op, root, rank, n, total };
                    let what = format!("{} {dtype} {op} count {count} root {root} on {}", coll.name(), dev.describe());
                    check_case(comm, dev, &host, &case, &what, exportable);
                    cases += 1;
                }
            }
        }
    }
    if comm.peer_transports().contains(&Some(devccl_core::transport::TransportKind::Devmem)) {
        let c: Vec<(String, u64)> =
            comm.transport_counters().into_iter().filter(|(k, _)| k.starts_with("devmem.")).collect();
        println!("devmem {}", fmt_counters(&c));
    }
    println!("ok {cases}");
}

fn check_case(
    comm: &Communicator,
    dev: &Arc<dyn Device>,
    host: &Arc<dyn Device>,
    case: &Case,
    what: &str,
    exportable: bool,
) {
    let run = |d: &Arc<dyn Device>| -> devccl::Result<(Vec<u8>, Vec<u8>)> {
        let bufs = if exportable { CaseBuffers::new_exportable(d, case)? } else { CaseBuffers::new(d, case)? };
        bufs.outputs(comm, case)
    };
    let (h_oop, h_ip) = run(host).unwrap_or_else(|e| fail(format!("{what} (host): {e}")));
    let (d_oop, d_ip) = run(dev).unwrap_or_else(|e| fail(format!("{what}: {e}")));
    let want = case.expected().unwrap_or_else(|e| fail(e));
    let defined = want.is_some();
    for (form, d, h) in [("out of place", &d_oop, &h_oop), ("in place", &d_ip, &h_ip)] {
        if defined && d != h {
            let i = d.iter().zip(h.iter()).position(|(a, b)| a != b).unwrap_or(0);
            fail(format!("{what} {form}: device result differs from the host's at byte {i} of {}", d.len()));
        }
        if let Some(w) = &want {
            let wrong = devccl::check::count_wrong(case.dtype, d, w);
            if wrong > 0 {
                fail(format!("{what} {form}: {wrong} wrong elements"));
            }
        }
    }
}

/// A rank dies in the middle of staged device all-reduces: survivors fail clearly, and once
/// the communicator is gone no device memory is left behind.
fn fault(comm: Communicator, dev: &Arc<dyn Device>) {
    let count: usize = env("DEVCHECK_COUNT").and_then(|v| v.parse().ok()).unwrap_or(4 << 20);
    let kill_rank: Option<usize> = env("DEVCHECK_KILL_RANK").and_then(|v| v.parse().ok());
    let kill_ms: u64 = env("DEVCHECK_KILL_MS").and_then(|v| v.parse().ok()).unwrap_or(300);
    let case = Case {
        coll: CollKind::AllReduce,
        dtype: DType::F32,
        op: ReduceOp::Sum,
        root: 0,
        rank: comm.rank(),
        n: comm.world_size(),
        total: count,
    };
    let bufs = CaseBuffers::new(dev, &case).unwrap_or_else(|e| fail(e));
    let baseline = dev.stats();
    if kill_rank == Some(comm.rank()) {
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(kill_ms));
            let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
        });
    }
    let mut result = Ok(());
    for _ in 0..10_000 {
        result = case.run(&comm, bufs.input.clone(), bufs.out.clone());
        if result.is_err() {
            break;
        }
    }
    match result {
        Ok(()) => fail("no collective failed"),
        Err(e) => println!("failed: {e}"),
    }
    drop(comm);
    // The progress thread lets go of the executor (and its buffer cache) as it exits.
    let live = || {
        let s = dev.stats();
        (s.live_device_bytes + s.live_staging_bytes)
            .saturating_sub(baseline.live_device_bytes + baseline.live_staging_bytes)
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while live() > 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    println!("live {}", live());
    drop(bufs);
}
