//! `devccl bench <collective>`: the nccl-tests table (size, count, type, redop, root,
//! out-of-place and in-place time / algbw / busbw / #wrong), plus optional per-iteration
//! latency statistics and JSON.
//!
//! Without launcher variables it spawns `-n` local ranks of itself with an embedded
//! rendezvous (rank 0 hosts it); under torchrun, srun or mpirun it runs as one rank.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use devccl::{Collective, Communicator, DType, ReduceOp};
use devccl_core::config::{LaunchEnv, parse_size};
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

/// The collectives `devccl bench` knows (nccl-tests names and ours).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    AllReduce,
    Broadcast,
    Reduce,
    AllGather,
    ReduceScatter,
    AllToAll,
    AllToAllV,
    Gather,
    Scatter,
    SendRecv,
    Barrier,
}

impl Kind {
    fn parse(s: &str) -> Option<Kind> {
        let n = s.trim().to_ascii_lowercase().replace(['-', '_'], "");
        let n = n.strip_suffix("perf").unwrap_or(&n);
        Some(match n {
            "allreduce" => Kind::AllReduce,
            "broadcast" | "bcast" => Kind::Broadcast,
            "reduce" => Kind::Reduce,
            "allgather" => Kind::AllGather,
            "reducescatter" => Kind::ReduceScatter,
            "alltoall" => Kind::AllToAll,
            "alltoallv" => Kind::AllToAllV,
            "gather" => Kind::Gather,
            "scatter" => Kind::Scatter,
            "sendrecv" => Kind::SendRecv,
            "barrier" => Kind::Barrier,
            _ => return None,
        })
    }

    fn coll_kind(self) -> devccl::CollKind {
        use devccl::CollKind as C;
        match self {
            Kind::AllReduce => C::AllReduce,
            Kind::Broadcast => C::Broadcast,
            Kind::Reduce => C::Reduce,
            Kind::AllGather => C::AllGather,
            Kind::ReduceScatter => C::ReduceScatter,
            Kind::AllToAll => C::AllToAll,
            Kind::AllToAllV => C::AllToAllV,
            Kind::Gather => C::Gather,
            Kind::Scatter => C::Scatter,
            Kind::SendRecv => C::SendRecv,
            Kind::Barrier => C::Barrier,
        }
    }

    /// busbw / algbw (nccl-tests' factors).
    fn bus_factor(self, n: usize) -> f64 {
        let nf = n as f64;
        match self {
            Kind::AllReduce => 2.0 * (nf - 1.0) / nf,
            Kind::AllGather | Kind::ReduceScatter | Kind::AllToAll | Kind::AllToAllV | Kind::Gather | Kind::Scatter => {
                (nf - 1.0) / nf
            }
            Kind::Broadcast | Kind::Reduce | Kind::SendRecv => 1.0,
            Kind::Barrier => 0.0,
        }
    }

    fn reduces(self) -> bool {
        matches!(self, Kind::AllReduce | Kind::Reduce | Kind::ReduceScatter)
    }

    fn rooted(self) -> bool {
        matches!(self, Kind::Broadcast | Kind::Reduce | Kind::Gather | Kind::Scatter)
    }
}

/// One row's call: buffer sizes (elements), where the input sits for the in-place form, and
/// how to check results.
struct Bench {
    kind: Kind,
    dtype: DType,
    op: ReduceOp,
    root: usize,
    rank: usize,
    n: usize,
    /// Logical elements of the row (size / element size, rounded to a multiple of n where
    /// the collective splits by rank).
    total: usize,
}

/// all_to_all_v element count from rank i to rank j (uneven on purpose).
fn v_count(total: usize, n: usize, i: usize, j: usize) -> usize {
    let unit = (total / (2 * n * n)).max(1);
    unit * (1 + (i + 2 * j) % 3)
}

impl Bench {
    fn block(&self) -> usize {
        self.total / self.n
    }

    fn desc(&self) -> Collective {
        let (op, root) = (self.op, self.root);
        match self.kind {
            Kind::AllReduce => Collective::AllReduce { op },
            Kind::Broadcast => Collective::Broadcast { root },
            Kind::Reduce => Collective::Reduce { op, root },
            Kind::AllGather => Collective::AllGather,
            Kind::ReduceScatter => Collective::ReduceScatter { op },
            Kind::AllToAll => Collective::AllToAll,
            Kind::AllToAllV => {
                let n = self.n;
                let sc: Vec<usize> = (0..n).map(|j| v_count(self.total, n, self.rank, j)).collect();
                let rc: Vec<usize> = (0..n).map(|i| v_count(self.total, n, i, self.rank)).collect();
                Collective::AllToAllV {
                    send_displs: prefix(&sc),
                    send_counts: sc,
                    recv_displs: prefix(&rc),
                    recv_counts: rc,
                }
            }
            Kind::Gather => Collective::Gather { root },
            Kind::Scatter => Collective::Scatter { root },
            Kind::SendRecv | Kind::Barrier => Collective::Barrier,
        }
    }

    /// (input elements, output elements).
    fn lens(&self) -> (usize, usize) {
        let (t, b) = (self.total, self.block());
        match self.kind {
            Kind::AllReduce | Kind::Broadcast | Kind::Reduce | Kind::AllToAll | Kind::SendRecv => (t, t),
            Kind::AllGather | Kind::Gather => (b, t),
            Kind::ReduceScatter | Kind::Scatter => (t, b),
            Kind::AllToAllV => {
                let n = self.n;
                ((0..n).map(|j| v_count(t, n, self.rank, j)).sum(), (0..n).map(|i| v_count(t, n, i, self.rank)).sum())
            }
            Kind::Barrier => (0, 0),
        }
    }

    /// Where the input sits inside the output (or the output inside the input: negative
    /// sense) for the in-place form; `None` when the input is the output itself.
    fn in_place_offset(&self) -> Option<(bool, usize)> {
        let b = self.block();
        match self.kind {
            Kind::AllGather | Kind::Gather => Some((true, self.rank * b)),
            Kind::ReduceScatter | Kind::Scatter => Some((false, self.rank * b)),
            _ => None,
        }
    }

    /// This rank's input (logical element numbering as described in `expected`).
    fn input(&self) -> Vec<u8> {
        let (ni, _) = self.lens();
        let first = match self.kind {
            Kind::AllGather | Kind::Gather => self.rank * self.block(),
            _ => 0,
        };
        devccl::check::input(self.dtype, self.op, self.rank, first, ni)
    }

    /// Expected output, or `None` where the output is not defined (reduce, gather off the
    /// root).
    fn expected(&self) -> devccl::Result<Option<Vec<u8>>> {
        let (d, op, n, r, b, t) = (self.dtype, self.op, self.n, self.rank, self.block(), self.total);
        let inp = |rank: usize, first: usize, count: usize| devccl::check::input(d, op, rank, first, count);
        Ok(Some(match self.kind {
            Kind::AllReduce => devccl::check::reduced(d, op, n, 0, t)?,
            Kind::Broadcast => inp(self.root, 0, t),
            Kind::Reduce if r == self.root => devccl::check::reduced(d, op, n, 0, t)?,
            Kind::Reduce | Kind::Barrier => return Ok(None),
            Kind::AllGather => (0..n).flat_map(|i| inp(i, i * b, b)).collect(),
            Kind::Gather if r == self.root => (0..n).flat_map(|i| inp(i, i * b, b)).collect(),
            Kind::Gather => return Ok(None),
            Kind::ReduceScatter => devccl::check::reduced(d, op, n, r * b, b)?,
            Kind::AllToAll => (0..n).flat_map(|i| inp(i, r * b, b)).collect(),
            Kind::AllToAllV => (0..n)
                .flat_map(|i| {
                    let displ: usize = (0..r).map(|j| v_count(t, n, i, j)).sum();
                    inp(i, displ, v_count(t, n, i, r))
                })
                .collect(),
            Kind::Scatter => inp(self.root, r * b, b),
            Kind::SendRecv => inp((r + n - 1) % n, 0, t),
        }))
    }

    /// Run once out of place (send/recv: `send` holds the input, prepared once per row).
    fn run(
        &self,
        c: &Communicator,
        input: &[u8],
        out: &mut [u8],
        send: &devccl_core::memory::Region,
    ) -> devccl::Result<()> {
        use devccl_core::memory::Region;
        let d = self.dtype;
        match self.kind {
            Kind::SendRecv => {
                let (next, prev) = ((self.rank + 1) % self.n, (self.rank + self.n - 1) % self.n);
                if self.n == 1 {
                    out.copy_from_slice(input);
                    return Ok(());
                }
                let w = c.collective_async(&Collective::Send { peer: next, tag: 0 }, d, send.full(), send.full());
                Region::scoped(out, |o| c.collective(&Collective::Recv { peer: prev, tag: 0 }, d, o.full(), o.full()))?;
                w.wait()
            }
            Kind::Barrier => c.barrier(),
            _ => Region::scoped_ref(input, |i| {
                Region::scoped(out, |o| c.collective(&self.desc(), d, i.full(), o.full()))
            }),
        }
    }

    /// The buffer of the nccl-tests in-place form with this rank's input in place: the input
    /// is the output (all-reduce, broadcast, ...), inside it (all-gather, gather), or contains
    /// it (reduce-scatter, scatter).
    fn in_place_buffer(&self, input: &[u8]) -> Vec<u8> {
        let (_, out_len) = self.lens();
        match self.in_place_offset() {
            Some((true, at)) => {
                let e = self.dtype.size();
                let mut buf = vec![0u8; out_len * e];
                buf[at * e..at * e + input.len()].copy_from_slice(input);
                buf
            }
            _ => input.to_vec(),
        }
    }

    /// Where the output is inside the in-place buffer.
    fn in_place_output_range(&self) -> std::ops::Range<usize> {
        let (_, out_len) = self.lens();
        let e = self.dtype.size();
        match self.in_place_offset() {
            Some((false, at)) => at * e..(at + out_len) * e,
            _ => 0..out_len * e,
        }
    }

    /// Run once in place on `buf` (prepared by [`Bench::in_place_buffer`]; successive runs
    /// reuse it as nccl-tests does). Collectives without an in-place form (all_to_all_v,
    /// sendrecv, barrier) repeat the out-of-place run.
    fn run_in_place(
        &self,
        c: &Communicator,
        buf: &mut [u8],
        input: &[u8],
        out: &mut [u8],
        send: &devccl_core::memory::Region,
    ) -> devccl::Result<()> {
        use devccl_core::memory::Region;
        let d = self.dtype;
        if matches!(self.kind, Kind::SendRecv | Kind::Barrier | Kind::AllToAllV) {
            return self.run(c, input, out, send);
        }
        let e = d.size();
        let (in_len, _) = self.lens();
        let outr = self.in_place_output_range();
        Region::scoped(buf, |b| match self.in_place_offset() {
            None => c.collective(&self.desc(), d, b.full(), b.full()),
            Some((true, at)) => c.collective(&self.desc(), d, b.slice(at * e..(at + in_len) * e), b.full()),
            Some((false, _)) => c.collective(&self.desc(), d, b.full(), b.slice(outr.clone())),
        })
    }
}

fn prefix(v: &[usize]) -> Vec<usize> {
    let mut acc = 0;
    v.iter()
        .map(|x| {
            let s = acc;
            acc += x;
            s
        })
        .collect()
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
    let kind = Kind::parse(&args.collective).with_context(|| {
        format!(
            "unknown collective '{}' (all_reduce, broadcast, reduce, all_gather, reduce_scatter, all_to_all, all_to_all_v, gather, scatter, sendrecv, barrier)",
            args.collective
        )
    })?;
    let comm = Communicator::init().context("initialising the communicator")?;
    let (rank, n) = (comm.rank(), comm.world_size());
    if args.root >= n && kind.rooted() {
        bail!("-r {} is not a rank of this {n}-rank job", args.root);
    }
    let esize = dtype.size();
    let mut rows = Vec::new();
    if rank == 0 {
        print_header(args, n, dtype);
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
    let split = !matches!(kind, Kind::AllReduce | Kind::Broadcast | Kind::Reduce | Kind::SendRecv | Kind::Barrier);
    for &size in &sizes {
        let mut total = size as usize / esize;
        if split {
            total -= total % n;
        }
        let b = Bench { kind, dtype, op, root: args.root, rank, n, total };
        let bytes = total * esize;
        let input = b.input();
        let send = devccl_core::memory::Region::from_vec(input.clone());
        let (_, out_len) = b.lens();
        let mut out = vec![0u8; out_len * esize];
        let mut wrong = [0u64; 2];
        if args.check > 0 {
            let want = b.expected()?;
            for _ in 0..args.check {
                out.fill(0);
                b.run(&comm, &input, &mut out, &send)?;
                let mut buf = b.in_place_buffer(&input);
                let mut out2 = vec![0u8; out_len * esize];
                b.run_in_place(&comm, &mut buf, &input, &mut out2, &send)?;
                let ip_out = if matches!(kind, Kind::SendRecv | Kind::Barrier | Kind::AllToAllV) {
                    &out2[..]
                } else {
                    &buf[b.in_place_output_range()]
                };
                if let Some(w) = &want {
                    wrong[0] += devccl::check::count_wrong(dtype, &out, w);
                    wrong[1] += devccl::check::count_wrong(dtype, ip_out, w);
                }
            }
            let mut w = [wrong[0] as i64, wrong[1] as i64];
            comm.all_reduce(&mut w, ReduceOp::Sum)?;
            wrong = [w[0] as u64, w[1] as u64];
        }
        for _ in 0..args.warmup {
            b.run(&comm, &input, &mut out, &send)?;
        }
        let t_oop = time_loop(&comm, args.iters, || b.run(&comm, &input, &mut out, &send))?;
        let mut ipbuf = b.in_place_buffer(&input);
        let t_ip = time_loop(&comm, args.iters, || b.run_in_place(&comm, &mut ipbuf, &input, &mut out, &send))?;
        let per_iter = if args.per_iter {
            let mut ts = Vec::with_capacity(args.iters);
            for _ in 0..args.iters {
                barrier(&comm)?;
                let t0 = Instant::now();
                b.run(&comm, &input, &mut out, &send)?;
                ts.push(t0.elapsed().as_secs_f64() * 1e6);
            }
            max_over_ranks(&comm, &mut ts)?;
            ts.sort_by(|a, b| a.total_cmp(b));
            Some(PerIter { median_us: median(&ts), min_us: ts[0], p90_us: ts[(ts.len() * 9 / 10).min(ts.len() - 1)] })
        } else {
            None
        };
        let f = kind.bus_factor(n);
        let mk = |t: f64, w: u64| {
            let alg = if t > 0.0 { bytes as f64 / t / 1e3 } else { 0.0 };
            Timing { time_us: t, algbw: alg, busbw: alg * f, wrong: if args.check > 0 { w } else { u64::MAX } }
        };
        let row = Row { size: bytes as u64, count: total, oop: mk(t_oop, wrong[0]), ip: mk(t_ip, wrong[1]), per_iter };
        if rank == 0 {
            let opname = if kind.reduces() { op.name() } else { "none" };
            let root = if kind.rooted() { args.root as i64 } else { -1 };
            print_row(&row, dtype, opname, root);
            if args.explain && !matches!(kind, Kind::SendRecv | Kind::AllToAllV) {
                println!("#   plan: {}", comm.explain(kind.coll_kind(), bytes));
            }
        }
        rows.push(row);
    }
    let wrong_total: u64 = if args.check > 0 { rows.iter().map(|r| r.oop.wrong + r.ip.wrong).sum() } else { 0 };
    let avg_busbw = rows.iter().map(|r| r.oop.busbw + r.ip.busbw).sum::<f64>() / (2 * rows.len()).max(1) as f64;
    if rank == 0 {
        println!("# Out of bounds values : {} {}", wrong_total, if wrong_total == 0 { "OK" } else { "FAILED" });
        println!("# Avg bus bandwidth    : {avg_busbw:.4}");
        println!("#");
        println!("# Collective test concluded: {}", args.collective);
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

fn median(sorted: &[f64]) -> f64 {
    let n = sorted.len();
    if n % 2 == 1 { sorted[n / 2] } else { (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0 }
}

fn print_header(args: &BenchArgs, n: usize, dtype: DType) {
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
