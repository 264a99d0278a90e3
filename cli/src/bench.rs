//! `devccl bench <collective>`: the nccl-tests table (size, count, type, redop, root,
//! out-of-place and in-place time / algbw / busbw / #wrong), plus optional per-iteration
//! latency statistics and JSON.
//!
//! Without launcher variables it spawns `-n` local ranks of itself with an embedded
//! rendezvous (rank 0 hosts it); under torchrun, srun or mpirun it runs as one rank.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use devccl::check::{Case, CaseBuffers};
use devccl::{CollKind, Communicator, DType, ReduceOp};
use devccl_core::config::{LaunchEnv, parse_size};
use devccl_core::device::Device;
use devccl_core::memory::DeviceId;
use serde::Serialize;

use crate::launch::{LaunchSpec, launch};

/// Arguments of `devccl bench`.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Collective: all_reduce, broadcast, reduce, all_gather, reduce_scatter, all_to_all,
    /// all_to_all_v, gather, scatter, sendrecv, barrier (nccl-tests names like
    /// `all_reduce_perf` work too).
    pub collective: String,
    /// Ranks to start locally (ignored when launched by torchrun/srun/mpirun).
    #[arg(short = 'n', long = "nranks", default_value_t = 2)]
    pub nranks: usize,
    /// Smallest size in bytes (K/M/G suffixes).
    #[arg(short = 'b', long = "minbytes", default_value = "32M", value_parser = parse_bytes)]
    pub minbytes: u64,
    /// Largest size in bytes.
    #[arg(short = 'e', long = "maxbytes", default_value = "32M", value_parser = parse_bytes)]
    pub maxbytes: u64,
    /// Multiply the size by this between rows.
    #[arg(short = 'f', long = "stepfactor", default_value_t = 2)]
    pub stepfactor: u64,
    /// Warm-up iterations per size.
    #[arg(short = 'w', long = "warmup", default_value_t = 5)]
    pub warmup: usize,
    /// Timed iterations per size.
    #[arg(short = 'i', long = "iters", default_value_t = 20)]
    pub iters: usize,
    /// Correctness checks per size (0 disables #wrong).
    #[arg(short = 'c', long = "check", default_value_t = 1)]
    pub check: usize,
    /// Data type (float, double, half, bfloat16, int8, uint8, int32, int64 or f32, ...).
    #[arg(short = 'd', long = "datatype", default_value = "float")]
    pub datatype: String,
    /// Reduction op (sum, prod, min, max, avg).
    #[arg(short = 'o', long = "op", default_value = "sum")]
    pub op: String,
    /// Root rank of rooted collectives (broadcast, reduce, gather, scatter).
    #[arg(short = 'r', long = "root", default_value_t = 0)]
    pub root: usize,
    /// Also time every iteration separately (barrier before each; max over ranks) and print
    /// median and minimum latency, like the peers' scripts do.
    #[arg(short = 'I', long = "per-iter")]
    pub per_iter: bool,
    /// Exact list of sizes instead of -b/-e/-f (e.g. `8,4K,64K,1M,16M,64M`).
    #[arg(long, value_delimiter = ',', value_parser = parse_bytes)]
    pub sizes: Vec<u64>,
    /// Print, per row, the algorithm/chunk/channels the tuner chose and the model's estimate
    /// for every candidate.
    #[arg(long)]
    pub explain: bool,
    /// Write the results as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Where the buffers live: host, cuda[:N] or vulkan[:N] (results are checked there too).
    #[arg(long, default_value = "host")]
    pub device: String,
    /// Rendezvous port for local runs (default: a free one).
    #[arg(long)]
    pub master_port: Option<u16>,
}

fn parse_bytes(s: &str) -> Result<u64, String> {
    parse_size(s).ok_or_else(|| format!("'{s}' is not a size (e.g. 8, 64K, 256M)"))
}

/// Entry point.
pub fn run(args: BenchArgs) -> Result<i32> {
    if args.stepfactor < 2 && args.minbytes != args.maxbytes {
        bail!("-f must be at least 2");
    }
    if args.minbytes > args.maxbytes {
        bail!("-b {} is larger than -e {}", args.minbytes, args.maxbytes);
    }
    if args.iters == 0 {
        bail!("-i must be at least 1");
    }
    // A missing driver is said once, at once, before any rank starts.
    let device: DeviceId = args.device.parse()?;
    devccl_device::open(device).with_context(|| format!("--device {}", args.device))?;
    match LaunchEnv::from_env()? {
        Some(_) => run_rank(&args),
        None => {
            let me = std::env::current_exe().context("locating the devccl binary")?;
            let mut cmd = vec![me.into_os_string()];
            cmd.extend(std::env::args_os().skip(1));
            launch(&LaunchSpec {
                nranks: args.nranks,
                cmd,
                master_addr: "127.0.0.1".into(),
                master_port: args.master_port.unwrap_or(0),
                prefix_rank0_stdout: false,
                env: vec![],
            })
        }
    }
}

/// One timing result.
#[derive(Debug, Clone, Copy, Serialize, Default)]
struct Timing {
    time_us: f64,
    algbw: f64,
    busbw: f64,
    wrong: u64,
}

/// Per-iteration statistics.
#[derive(Debug, Clone, Copy, Serialize)]
struct PerIter {
    median_us: f64,
    min_us: f64,
    p90_us: f64,
}

#[derive(Debug, Clone, Serialize)]
struct Row {
    size: u64,
    count: usize,
    oop: Timing,
    ip: Timing,
    per_iter: Option<PerIter>,
}

#[derive(Debug, Serialize)]
struct Report {
    collective: String,
    nranks: usize,
    datatype: String,
    op: String,
    warmup: usize,
    iters: usize,
    rows: Vec<Row>,
    avg_busbw: f64,
    wrong_total: u64,
}

/// The collective a name means (nccl-tests names like `all_reduce_perf` work too).
fn parse_coll(s: &str) -> Option<CollKind> {
    let n = s.trim().to_ascii_lowercase().replace(['-', '_'], "");
    let n = n.strip_suffix("perf").unwrap_or(&n);
    Some(match n {
        "allreduce" => CollKind::AllReduce,
        "broadcast" | "bcast" => CollKind::Broadcast,
        "reduce" => CollKind::Reduce,
        "allgather" => CollKind::AllGather,
        "reducescatter" => CollKind::ReduceScatter,
        "alltoall" => CollKind::AllToAll,
        "alltoallv" => CollKind::AllToAllV,
        "gather" => CollKind::Gather,
        "scatter" => CollKind::Scatter,
        "sendrecv" => CollKind::SendRecv,
        "barrier" => CollKind::Barrier,
        _ => return None,
    })
}

/// busbw / algbw (nccl-tests' factors).
fn bus_factor(c: CollKind, n: usize) -> f64 {
    let nf = n as f64;
    match c {
        CollKind::AllReduce => 2.0 * (nf - 1.0) / nf,
        CollKind::AllGather
        | CollKind::ReduceScatter
        | CollKind::AllToAll
        | CollKind::AllToAllV
        | CollKind::Gather
        | CollKind::Scatter => (nf - 1.0) / nf,
        CollKind::Broadcast | CollKind::Reduce | CollKind::SendRecv => 1.0,
        CollKind::Barrier => 0.0,
    }
}

fn barrier(c: &Communicator) -> devccl::Result<()> {
    c.barrier()
}

fn max_over_ranks(c: &Communicator, v: &mut [f64]) -> devccl::Result<()> {
    if v.is_empty() {
        return Ok(());
    }
    c.all_reduce(v, ReduceOp::Max)
}

fn time_loop(c: &Communicator, iters: usize, mut f: impl FnMut() -> devccl::Result<()>) -> devccl::Result<f64> {
    barrier(c)?;
    let t0 = Instant::now();
    for _ in 0..iters {
        f()?;
    }
    let mut t = [t0.elapsed().as_secs_f64() * 1e6 / iters as f64];
    max_over_ranks(c, &mut t)?;
    Ok(t[0])
}

fn run_rank(args: &BenchArgs) -> Result<i32> {
    let dtype: DType = args.datatype.parse()?;
    let op: ReduceOp = args.op.parse()?;
    let kind = parse_coll(&args.collective).with_context(|| {
        format!(
            "unknown collective '{}' (all_reduce, broadcast, reduce, all_gather, reduce_scatter, all_to_all, all_to_all_v, gather, scatter, sendrecv, barrier)",
            args.collective
        )
    })?;
    let device_id: DeviceId = args.device.parse()?;
    let dev = devccl_device::open(device_id)?;
    let comm = Communicator::init().context("initialising the communicator")?;
    let (rank, n) = (comm.rank(), comm.world_size());
    if args.root >= n && devccl::check::rooted(kind) {
        bail!("-r {} is not a rank of this {n}-rank job", args.root);
    }
    let mut rows = Vec::new();
    if rank == 0 {
        print_header(args, n, dtype, &*dev);
    }
    let sizes: Vec<u64> = if args.sizes.is_empty() {
        let mut v = vec![args.minbytes];
        while *v.last().expect("non-empty") < args.maxbytes {
            let next = (v.last().expect("non-empty") * args.stepfactor.max(2)).min(args.maxbytes);
            v.push(next);
        }
        v
    } else {
        args.sizes.clone()
    };
    for &size in &sizes {
        let case = Case::sized(kind, dtype, op, args.root, rank, n, size as usize);
        let (total, bytes) = (case.total, case.total * dtype.size());
        let bufs = CaseBuffers::new(&dev, &case)?;
        let mut wrong = [0u64; 2];
        if args.check > 0 {
            let want = case.expected()?;
            for _ in 0..args.check {
                let w = bufs.check(&comm, &case, want.as_deref())?;
                wrong[0] += w[0];
                wrong[1] += w[1];
            }
            let mut w = [wrong[0] as i64, wrong[1] as i64];
            comm.all_reduce(&mut w, ReduceOp::Sum)?;
            wrong = [w[0] as u64, w[1] as u64];
        }
        let oop = || case.run(&comm, bufs.input.clone(), bufs.out.clone());
        let ip = || case.run_in_place(&comm, bufs.ip.clone(), bufs.input.clone(), bufs.out.clone());
        for _ in 0..args.warmup {
            oop()?;
        }
        let t_oop = time_loop(&comm, args.iters, oop)?;
        dev.upload(&bufs.ip, &case.in_place_bytes())?;
        let t_ip = time_loop(&comm, args.iters, ip)?;
        let per_iter = if args.per_iter {
            let mut ts = Vec::with_capacity(args.iters);
            for _ in 0..args.iters {
                barrier(&comm)?;
                let t0 = Instant::now();
                oop()?;
                ts.push(t0.elapsed().as_secs_f64() * 1e6);
            }
            max_over_ranks(&comm, &mut ts)?;
            ts.sort_by(|a, b| a.total_cmp(b));
            Some(PerIter { median_us: median(&ts), min_us: ts[0], p90_us: ts[(ts.len() * 9 / 10).min(ts.len() - 1)] })
        } else {
            None
        };
        let f = bus_factor(kind, n);
        let mk = |t: f64, w: u64| {
            let alg = if t > 0.0 { bytes as f64 / t / 1e3 } else { 0.0 };
            Timing { time_us: t, algbw: alg, busbw: alg * f, wrong: if args.check > 0 { w } else { u64::MAX } }
        };
        let row = Row { size: bytes as u64, count: total, oop: mk(t_oop, wrong[0]), ip: mk(t_ip, wrong[1]), per_iter };
        if rank == 0 {
            let opname = if devccl::check::reduces(kind) { op.name() } else { "none" };
            let root = if devccl::check::rooted(kind) { args.root as i64 } else { -1 };
            print_row(&row, dtype, opname, root);
            if args.explain && !matches!(kind, CollKind::SendRecv | CollKind::AllToAllV) {
                println!("#   plan: {}", comm.explain(kind, bytes));
            }
        }
        rows.push(row);
    }
    let devmem = devmem_counters(&comm)?;
    let wrong_total: u64 = if args.check > 0 { rows.iter().map(|r| r.oop.wrong + r.ip.wrong).sum() } else { 0 };
    let avg_busbw = rows.iter().map(|r| r.oop.busbw + r.ip.busbw).sum::<f64>() / (2 * rows.len()).max(1) as f64;
    if rank == 0 {
        println!("# Out of bounds values : {} {}", wrong_total, if wrong_total == 0 { "OK" } else { "FAILED" });
        println!("# Avg bus bandwidth    : {avg_busbw:.4}");
        println!("#");
        println!("# Collective test concluded: {}", args.collective);
        if let Some(c) = &devmem {
            print_devmem(c, n);
        }
        if let Some(p) = &args.json {
            let rep = Report {
                collective: args.collective.clone(),
                nranks: n,
                datatype: dtype.nccl_name().into(),
                op: op.name().into(),
                warmup: args.warmup,
                iters: args.iters,
                rows: rows.clone(),
                avg_busbw,
                wrong_total,
            };
            std::fs::write(p, serde_json::to_vec_pretty(&rep)?).with_context(|| format!("writing {}", p.display()))?;
        }
    }
    Ok(if wrong_total == 0 { 0 } else { 3 })
}

/// The devmem transport's counters summed over every rank, when any pair of ranks used
/// devmem (`None` otherwise). Every rank takes part (one all-reduce).
fn devmem_counters(comm: &Communicator) -> Result<Option<Vec<(&'static str, u64)>>> {
    let names: Vec<&'static str> =
        devccl_transport_devmem::transport::Counters::default().snapshot().into_iter().map(|(k, _)| k).collect();
    let mine = comm.transport_counters();
    let used = comm.peer_transports().contains(&Some(devccl_core::transport::TransportKind::Devmem));
    let mut v: Vec<i64> = names
        .iter()
        .map(|n| mine.iter().find(|(k, _)| k.strip_prefix("devmem.") == Some(n)).map_or(0, |(_, v)| *v as i64))
        .collect();
    v.push(i64::from(used));
    comm.all_reduce(&mut v, ReduceOp::Sum)?;
    let used = v.pop().unwrap_or(0) > 0;
    Ok(used.then(|| names.into_iter().zip(v.into_iter().map(|x| x as u64)).collect()))
}

/// The devmem counters after the table, two to a line.
fn print_devmem(c: &[(&str, u64)], n: usize) {
    println!("#");
    println!("# devmem counters (summed over {n} ranks, after the last call):");
    for pair in c.chunks(2) {
        let cells: Vec<String> = pair.iter().map(|(k, v)| format!("{k:<26} {v:>14}")).collect();
        println!("#   {}", cells.join("    "));
    }
}

fn median(sorted: &[f64]) -> f64 {
    let n = sorted.len();
    if n % 2 == 1 { sorted[n / 2] } else { (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0 }
}

fn print_header(args: &BenchArgs, n: usize, dtype: DType, dev: &dyn Device) {
    println!(
        "# devccl bench {}: nranks {n}, minbytes {}, maxbytes {}, step x{}, warmup {}, iters {}, check {}, dtype {}, op {}",
        args.collective,
        args.minbytes,
        args.maxbytes,
        args.stepfactor,
        args.warmup,
        args.iters,
        args.check,
        dtype,
        args.op
    );
    println!("# buffers on {}", dev.describe());
    println!("#");
    let extra = if args.per_iter { "   per-iteration (out-of-place)" } else { "" };
    println!("# {:>58} {:>33} {:>33}{extra}", "", "out-of-place", "in-place");
    let extra = if args.per_iter { "   med(us)   min(us)   p90(us)" } else { "" };
    println!(
        "# {:>10} {:>12} {:>8} {:>6} {:>6} {:>9} {:>7} {:>7} {:>6} {:>9} {:>7} {:>7} {:>6}{extra}",
        "size",
        "count",
        "type",
        "redop",
        "root",
        "time",
        "algbw",
        "busbw",
        "#wrong",
        "time",
        "algbw",
        "busbw",
        "#wrong"
    );
    println!(
        "# {:>10} {:>12} {:>8} {:>6} {:>6} {:>9} {:>7} {:>7} {:>6} {:>9} {:>7} {:>7} {:>6}",
        "(B)", "(elements)", "", "", "", "(us)", "(GB/s)", "(GB/s)", "", "(us)", "(GB/s)", "(GB/s)", ""
    );
}

fn wrong_str(w: u64) -> String {
    if w == u64::MAX { "N/A".into() } else { w.to_string() }
}

fn print_row(r: &Row, dtype: DType, op: &str, root: i64) {
    let mut line = format!(
        "  {:>10} {:>12} {:>8} {:>6} {:>6} {:>9.2} {:>7.3} {:>7.3} {:>6} {:>9.2} {:>7.3} {:>7.3} {:>6}",
        r.size,
        r.count,
        dtype.nccl_name(),
        op,
        root,
        r.oop.time_us,
        r.oop.algbw,
        r.oop.busbw,
        wrong_str(r.oop.wrong),
        r.ip.time_us,
        r.ip.algbw,
        r.ip.busbw,
        wrong_str(r.ip.wrong)
    );
    if let Some(p) = r.per_iter {
        line += &format!("   {:>7.1}   {:>7.1}   {:>7.1}", p.median_us, p.min_us, p.p90_us);
    }
    println!("{line}");
}
