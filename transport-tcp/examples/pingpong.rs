//! Loopback micro-benchmark of the TCP transport: two ranks as two threads of this process,
//! each with its own `TcpTransport` on 127.0.0.1 (the same sockets and syscalls as two
//! processes).
//!
//! - latency: median 8-byte round trip (and its half, the one-way latency);
//! - uni: rank 0 streams messages to rank 1 with `--window` in flight;
//! - bi: both ranks stream to each other at once (what a 2-rank ring all-reduce does).
//!
//! Every configuration (lanes × socket-buffer setting) runs `--reps` times, interleaved rep by
//! rep so that background noise hits every column alike; the tables show medians.
//! Waiting mimics the executor: busy-poll `test` for `--spin-us`, then sleep in `poll(2)` on
//! the connection's descriptors.
//!
//! ```text
//! cargo run --release -p devccl-transport-tcp --example pingpong -- \
//!     [--lanes 1,2,4] [--reps 5] [--sizes 64K,256K,1M,4M,16M,64M] [--bytes 512M] \
//!     [--window 8] [--iters 20000] [--spin-us 50] [--bufs auto,4M] [--only lat|uni|bi]
//! ```

use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use devccl_core::config::parse_size;
use devccl_core::memory::Region;
use devccl_core::testing::conformance::header;
use devccl_core::transport::{CommContext, Connection, RecvRequest, ReqId, SendRequest, Transport, wait_ready};
use devccl_core::{CommId, Rank};
use devccl_transport_tcp::{TcpOptions, TcpTransport};

#[derive(Debug, Clone)]
struct Args {
    lanes: Vec<usize>,
    reps: usize,
    sizes: Vec<usize>,
    bytes: usize,
    window: usize,
    iters: usize,
    spin: Duration,
    /// Socket buffer settings to compare (`None`: kernel autotuning).
    bufs: Vec<Option<usize>>,
    only: Option<String>,
}

fn parse_args() -> Args {
    let mut a = Args {
        lanes: vec![1, 2, 4],
        reps: 5,
        sizes: [64 << 10, 256 << 10, 1 << 20, 4 << 20, 16 << 20, 64 << 20].to_vec(),
        bytes: 512 << 20,
        window: 8,
        iters: 20_000,
        spin: Duration::from_micros(50),
        bufs: vec![None],
        only: None,
    };
    let mut it = std::env::args().skip(1);
    let size = |s: String| parse_size(&s).unwrap_or_else(|| panic!("not a size: {s}")) as usize;
    while let Some(flag) = it.next() {
        let mut val = || it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--lanes" => a.lanes = val().split(',').map(|s| s.parse().expect("lanes")).collect(),
            "--reps" => a.reps = val().parse().expect("reps"),
            "--sizes" => a.sizes = val().split(',').map(|s| size(s.to_string())).collect(),
            "--bytes" => a.bytes = size(val()),
            "--window" => a.window = val().parse().expect("window"),
            "--iters" => a.iters = val().parse().expect("iters"),
            "--spin-us" => a.spin = Duration::from_micros(val().parse().expect("spin-us")),
            "--bufs" => a.bufs = val().split(',').map(|s| (s != "auto").then(|| size(s.to_string()))).collect(),
            "--only" => a.only = Some(val()),
            other => panic!("unknown flag {other} (see the example's docs)"),
        }
    }
    a
}

/// A connected pair over loopback.
fn pair(lanes: usize, buf: Option<usize>) -> (Box<dyn Connection>, Box<dyn Connection>) {
    let mk = |rank| {
        let mut o = TcpOptions::new("127.0.0.1".parse().unwrap(), Rank(rank));
        o.lanes = lanes;
        o.socket_buffer = buf;
        let t = TcpTransport::new(o).expect("listen");
        t.activate(CommContext { comm: CommId([1; 16]), rank: Rank(rank), world: 2, key: None }).unwrap();
        t
    };
    let (t0, t1) = (mk(0), mk(1));
    let deadline = Instant::now() + Duration::from_secs(10);
    std::thread::scope(|s| {
        let b = s.spawn(|| t1.accept(Rank(0), deadline).expect("accept"));
        let a = t0.connect(Rank(1), &t1.endpoint(), deadline).expect("connect");
        (a, b.join().unwrap())
    })
}

/// Drive `ids` (in order) to completion: busy-poll for `spin`, then sleep in poll(2).
fn wait_all(c: &mut Box<dyn Connection>, ids: &mut std::collections::VecDeque<ReqId>, spin: Duration, until: usize) {
    let mut idle_since: Option<Instant> = None;
    while ids.len() > until {
        let id = *ids.front().unwrap();
        if c.test(id).expect("test").is_some() {
            ids.pop_front();
            idle_since = None;
            continue;
        }
        let t = *idle_since.get_or_insert_with(Instant::now);
        if t.elapsed() >= spin {
            let mut fds = Vec::new();
            c.wait_fds(&mut fds);
            wait_ready(&fds, Duration::from_millis(5)).expect("poll");
        }
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// Median round trip in microseconds over `iters` 8-byte ping-pongs.
fn latency(lanes: usize, buf: Option<usize>, args: &Args) -> f64 {
    let (mut a, mut b) = pair(lanes, buf);
    let iters = args.iters;
    let spin = args.spin;
    let pong = std::thread::spawn(move || {
        let src = Region::from_vec(vec![2u8; 8]);
        let dst = Region::alloc(8);
        let mut q = std::collections::VecDeque::new();
        for i in 0..iters as u64 {
            q.push_back(b.irecv(RecvRequest { expect: header(i, 0, 8), dst: dst.full() }).unwrap().unwrap());
            wait_all(&mut b, &mut q, spin, 0);
            q.push_back(b.isend(SendRequest { header: header(i, 0, 8), src: src.full() }).unwrap().unwrap());
            wait_all(&mut b, &mut q, spin, 0);
        }
    });
    let src = Region::from_vec(vec![1u8; 8]);
    let dst = Region::alloc(8);
    let mut rtts = Vec::with_capacity(iters);
    let mut q = std::collections::VecDeque::new();
    for i in 0..iters as u64 {
        let t = Instant::now();
        q.push_back(a.irecv(RecvRequest { expect: header(i, 0, 8), dst: dst.full() }).unwrap().unwrap());
        q.push_back(a.isend(SendRequest { header: header(i, 0, 8), src: src.full() }).unwrap().unwrap());
        wait_all(&mut a, &mut q, spin, 0);
        rtts.push(t.elapsed().as_secs_f64() * 1e6);
    }
    pong.join().unwrap();
    // Skip warm-up.
    let n = rtts.len();
    median(&mut rtts[n / 10..])
}

/// Buffers for `window` messages each way, allocated (and faulted in) before timing starts.
fn buffers(size: usize, window: usize) -> (Vec<Region>, Vec<Region>) {
    let srcs = (0..window).map(|i| Region::from_vec(vec![i as u8; size])).collect();
    let dsts = (0..window).map(|_| Region::from_vec(vec![0xffu8; size])).collect();
    (srcs, dsts)
}

/// Stream `count` messages of `size` bytes with `window` in flight: sends when `send`,
/// receives when `recv`.
#[allow(clippy::too_many_arguments)]
fn stream(
    c: &mut Box<dyn Connection>,
    (srcs, dsts): &(Vec<Region>, Vec<Region>),
    send: bool,
    recv: bool,
    size: usize,
    count: usize,
    window: usize,
    spin: Duration,
) {
    let (mut sq, mut rq) = (std::collections::VecDeque::new(), std::collections::VecDeque::new());
    let (mut ns, mut nr) = (if send { 0 } else { count }, if recv { 0 } else { count });
    let mut idle_since: Option<Instant> = None;
    while ns < count || nr < count || !sq.is_empty() || !rq.is_empty() {
        let mut moved = false;
        while nr < count && rq.len() < window {
            let h = header(nr as u64, 0, size);
            match c.irecv(RecvRequest { expect: h, dst: dsts[nr % window].full() }).unwrap() {
                Some(id) => rq.push_back(id),
                None => break,
            }
            nr += 1;
        }
        while ns < count && sq.len() < window {
            let h = header(ns as u64, 0, size);
            match c.isend(SendRequest { header: h, src: srcs[ns % window].full() }).unwrap() {
                Some(id) => sq.push_back(id),
                None => break,
            }
            ns += 1;
        }
        while let Some(&id) = rq.front() {
            if c.test(id).unwrap().is_none() {
                break;
            }
            rq.pop_front();
            moved = true;
        }
        while let Some(&id) = sq.front() {
            if c.test(id).unwrap().is_none() {
                break;
            }
            sq.pop_front();
            moved = true;
        }
        if moved {
            idle_since = None;
        } else if idle_since.get_or_insert_with(Instant::now).elapsed() >= spin {
            // Allocated only on the slow path (the descriptors borrow the connection).
            let mut fds = Vec::new();
            c.wait_fds(&mut fds);
            wait_ready(&fds, Duration::from_millis(5)).unwrap();
        }
    }
}

/// GB/s (1e9 B/s) per direction.
fn bandwidth(lanes: usize, buf: Option<usize>, size: usize, bidir: bool, args: &Args) -> f64 {
    let (mut a, mut b) = pair(lanes, buf);
    let count = (args.bytes / size).max(4);
    let (window, spin) = (args.window.min(count), args.spin);
    let go = Arc::new(Barrier::new(2));
    let go2 = go.clone();
    let other = std::thread::spawn(move || {
        let bufs = buffers(size, window);
        go2.wait();
        let t = Instant::now();
        stream(&mut b, &bufs, bidir, true, size, count, window, spin);
        t.elapsed()
    });
    let bufs = buffers(size, window);
    go.wait();
    let t = Instant::now();
    stream(&mut a, &bufs, true, bidir, size, count, window, spin);
    let mine = t.elapsed();
    let theirs = other.join().unwrap();
    (count * size) as f64 / mine.max(theirs).as_secs_f64() / 1e9
}

fn fmt_size(n: usize) -> String {
    if n >= 1 << 20 { format!("{} MiB", n >> 20) } else { format!("{} KiB", n >> 10) }
}

/// Run `f(config)` `reps` times for every config, interleaved, and return the medians.
fn medians(
    configs: &[(usize, Option<usize>)],
    reps: usize,
    mut f: impl FnMut(usize, Option<usize>) -> f64,
) -> Vec<f64> {
    let mut v: Vec<Vec<f64>> = vec![Vec::with_capacity(reps); configs.len()];
    for _ in 0..reps {
        for (i, &(l, b)) in configs.iter().enumerate() {
            v[i].push(f(l, b));
        }
    }
    v.iter_mut().map(|x| median(x)).collect()
}

fn main() {
    let args = parse_args();
    let want = |m: &str| args.only.as_deref().is_none_or(|o| o == m);
    let configs: Vec<(usize, Option<usize>)> =
        args.bufs.iter().flat_map(|&b| args.lanes.iter().map(move |&l| (l, b))).collect();
    println!(
        "# TCP transport over loopback: median of {} interleaved reps, window {}, spin {:?}\n",
        args.reps, args.window, args.spin
    );
    let head = || {
        let mut s = String::from("| size |");
        for (l, b) in &configs {
            s += &format!(" lanes={l} buf={} |", b.map_or("auto".to_string(), fmt_size));
        }
        s + "\n|---|" + &"---|".repeat(configs.len())
    };
    if want("lat") {
        println!("## 8-byte round trip, median (µs); one-way = half\n");
        println!("{}", head());
        let m = medians(&configs, args.reps, |l, b| latency(l, b, &args));
        println!("| 8 B |{}\n", m.iter().map(|x| format!(" {x:.1} |")).collect::<String>());
    }
    for (mode, bidir) in [("uni", false), ("bi", true)] {
        if !want(mode) {
            continue;
        }
        let what = if bidir { "bidirectional, GB/s per direction" } else { "unidirectional, GB/s" };
        println!("## {what}\n");
        println!("{}", head());
        for &size in &args.sizes {
            let m = medians(&configs, args.reps, |l, b| bandwidth(l, b, size, bidir, &args));
            println!("| {} |{}", fmt_size(size), m.iter().map(|x| format!(" {x:.2} |")).collect::<String>());
        }
        println!();
    }
}
