//! Two-process micro-benchmark of the shared-memory transport (with loopback TCP alongside
//! for comparison, under the same conditions).
//!
//! The program re-executes itself as the peer: the parent is rank 1 (it listens, and does
//! the timing), the child is rank 0 (it connects, choosing the ring size). Every
//! configuration gets its own connection; all of them run `--reps` times, interleaved rep by
//! rep so that background noise hits every column alike, and the tables show medians.
//!
//! - latency: median 8-byte round trip, busy-polling (`--spin-us`, like the executor when
//!   ranks ≤ cores) and sleeping in `poll(2)` at once (spin 0: the doorbell path, what the
//!   executor does when ranks outnumber cores);
//! - uni: rank 0 streams `--bytes` to rank 1 in messages of each size, `--window` in flight;
//! - bi: both stream to each other at once (what a 2-rank ring all-reduce does).
//!
//! A run starts with a `go` message from rank 1 and ends when rank 1 has all its data and
//! rank 0's `done` message (rank 0 sends it once its own transfers are complete).
//!
//! ```text
//! cargo run --release -p devccl-transport-shm --example shm_pingpong -- \
//!     [--configs shm:256K,shm:1M,shm:4M,tcp] [--reps 5] [--sizes 64K,256K,1M,4M,16M,64M] \
//!     [--bytes 512M] [--window 8] [--iters 20000] [--spin-us 50] [--only lat|uni|bi]
//! ```
//!
//! Measured on the 2-core development VM (AMD EPYC under KVM, shared with other work, so the
//! ranges span the two quietest of several runs, each a median of 5 reps; `--bytes 256M`;
//! GB/s = 1e9 B/s):
//!
//! | | shm, 4 MiB rings | tcp, 2 lanes |
//! |---|---|---|
//! | 8 B round trip, busy-poll | 0.9 µs | 10.3–11.3 µs |
//! | 8 B round trip, sleeping (spin 0) | 52–56 µs | 72–83 µs |
//! | one way, 64 KiB | 18–29 | 3.5–4.5 |
//! | one way, 1 MiB | 9.8–10.2 | 3.5–3.8 |
//! | one way, 64 MiB | 3.8–7.5 | 2.4–3.2 |
//! | both ways, 64 KiB, per direction | 12.7–15.0 | 1.6–1.7 |
//! | both ways, 1 MiB | 3.1–5.2 | 1.6–1.9 |
//! | both ways, 64 MiB | 4.3–4.7 | 1.6–2.0 |
//! | both ways, two pairs on the 2 cores, spin 0, 1 MiB | 2.4–2.7 | 0.9–1.0 |
//! | both ways, two pairs on the 2 cores, spin 0, 64 MiB | 3.0–3.2 | 1.1–1.2 |
//!
//! Sleeping round trips are two wake-ups of an idle vCPU (about 25 µs each on this VM,
//! for either transport; 4–5 µs each when the machine is busy and the vCPUs never idle).
//! Large messages are bound by memory bandwidth: source and destination buffers of that
//! size live in DRAM, while the ring stays in the cache. 1 MiB rings measured within noise
//! of 4 MiB ones; 256 KiB rings lost up to 3x on this VM.

use std::collections::VecDeque;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use devccl_core::config::parse_size;
use devccl_core::memory::Region;
use devccl_core::testing::conformance::header;
use devccl_core::transport::{
    CommContext, Connection, Endpoint, RecvRequest, ReqId, SendRequest, Transport, TransportKind, wait_ready,
};
use devccl_core::{CommId, Rank};
use devccl_transport_shm::{ShmOptions, ShmTransport};
use devccl_transport_tcp::{TcpOptions, TcpTransport};

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    /// Shared memory with rings of this many bytes.
    Shm(usize),
    /// Loopback TCP with the default lane count.
    Tcp,
}

impl Kind {
    fn parse(s: &str) -> Kind {
        match s.split_once(':') {
            Some(("shm", r)) => Kind::Shm(parse_size(r).expect("ring size") as usize),
            None if s == "tcp" => Kind::Tcp,
            _ => panic!("unknown configuration {s} (shm:SIZE or tcp)"),
        }
    }

    fn label(self) -> String {
        match self {
            Kind::Shm(r) => format!("shm ring {}", fmt_size(r)),
            Kind::Tcp => format!("tcp {} lanes", lanes()),
        }
    }

    fn transport(self, rank: u32) -> Box<dyn Transport> {
        match self {
            Kind::Shm(ring) => {
                let mut o = ShmOptions::new(Rank(rank));
                o.ring_bytes = ring;
                Box::new(ShmTransport::new(o).expect("shm transport"))
            }
            Kind::Tcp => {
                let o = TcpOptions::new("127.0.0.1".parse().unwrap(), Rank(rank));
                Box::new(TcpTransport::new(o).expect("tcp transport"))
            }
        }
    }
}

fn lanes() -> usize {
    TcpOptions::new("127.0.0.1".parse().unwrap(), Rank(0)).lanes
}

#[derive(Debug, Clone)]
struct Args {
    configs: Vec<Kind>,
    reps: usize,
    sizes: Vec<usize>,
    bytes: usize,
    window: usize,
    iters: usize,
    spin: Duration,
    only: Option<String>,
    /// Child only: the parent's addresses, one per configuration.
    peers: Option<Vec<String>>,
    comm: CommId,
}

fn parse_args() -> (Args, Vec<String>) {
    let raw: Vec<String> = std::env::args().skip(1).collect();
    let mut a = Args {
        configs: ["shm:256K", "shm:1M", "shm:4M", "tcp"].map(Kind::parse).to_vec(),
        reps: 5,
        sizes: [64 << 10, 256 << 10, 1 << 20, 4 << 20, 16 << 20, 64 << 20].to_vec(),
        bytes: 512 << 20,
        window: 8,
        iters: 20_000,
        spin: Duration::from_micros(50),
        only: None,
        peers: None,
        comm: CommId([0; 16]),
    };
    let mut forward = Vec::new();
    let mut it = raw.into_iter();
    let size = |s: String| parse_size(&s).unwrap_or_else(|| panic!("not a size: {s}")) as usize;
    while let Some(flag) = it.next() {
        let mut val = || it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--peers" => a.peers = Some(val().split(' ').map(String::from).collect()),
            "--comm" => {
                let v = val();
                let bytes: Vec<u8> = (0..16).map(|i| u8::from_str_radix(&v[2 * i..2 * i + 2], 16).unwrap()).collect();
                a.comm = CommId::from_slice(&bytes).unwrap();
            }
            _ => {
                let v = val();
                match flag.as_str() {
                    "--configs" => a.configs = v.split(',').map(Kind::parse).collect(),
                    "--reps" => a.reps = v.parse().expect("reps"),
                    "--sizes" => a.sizes = v.split(',').map(|s| size(s.to_string())).collect(),
                    "--bytes" => a.bytes = size(v.clone()),
                    "--window" => a.window = v.parse().expect("window"),
                    "--iters" => a.iters = v.parse().expect("iters"),
                    "--spin-us" => a.spin = Duration::from_micros(v.parse().expect("spin-us")),
                    "--only" => a.only = Some(v.clone()),
                    other => panic!("unknown flag {other} (see the example's docs)"),
                }
                forward.push(flag);
                forward.push(v);
            }
        }
    }
    (a, forward)
}

/// One side of one configuration's connection, with the message counters both sides keep
/// in step (every frame's header is checked, so a benchmark bug shows as an error).
struct Side {
    c: Box<dyn Connection>,
    tx: u64,
    rx: u64,
    small_src: Region,
    small_dst: Region,
}

impl Side {
    fn new(c: Box<dyn Connection>) -> Side {
        Side { c, tx: 0, rx: 0, small_src: Region::alloc(8), small_dst: Region::alloc(8) }
    }

    fn post_send(&mut self, src: &Region) -> Option<ReqId> {
        let h = header(self.tx, 0, src.len());
        let id = self.c.isend(SendRequest { header: h, src: src.full() }).expect("isend")?;
        self.tx += 1;
        Some(id)
    }

    fn post_recv(&mut self, dst: &Region) -> Option<ReqId> {
        let h = header(self.rx, 0, dst.len());
        let id = self.c.irecv(RecvRequest { expect: h, dst: dst.full() }).expect("irecv")?;
        self.rx += 1;
        Some(id)
    }

    /// Complete `ids` in order: busy-poll for `spin` without progress, then sleep in poll.
    fn wait(&mut self, ids: &mut VecDeque<ReqId>, spin: Duration) {
        let mut idle_since: Option<Instant> = None;
        while let Some(&id) = ids.front() {
            if self.c.test(id).expect("test").is_some() {
                ids.pop_front();
                idle_since = None;
                continue;
            }
            if idle_since.get_or_insert_with(Instant::now).elapsed() >= spin {
                let mut fds = Vec::new();
                self.c.wait_fds(&mut fds);
                wait_ready(&fds, Duration::from_millis(100)).expect("poll");
            }
        }
    }

    fn send_small(&mut self, spin: Duration) {
        let src = self.small_src.clone();
        let id = self.post_send(&src).expect("room for a small send");
        self.wait(&mut VecDeque::from([id]), spin);
    }

    fn recv_small(&mut self, spin: Duration) {
        let dst = self.small_dst.clone();
        let id = self.post_recv(&dst).expect("room for a small receive");
        self.wait(&mut VecDeque::from([id]), spin);
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// Median 8-byte round trip in µs, seen from the pinging side (rank 1).
fn latency(s: &mut Side, ping: bool, iters: usize, spin: Duration) -> f64 {
    let mut rtts = Vec::with_capacity(iters);
    for _ in 0..iters {
        if ping {
            let t = Instant::now();
            let (dst, src) = (s.small_dst.clone(), s.small_src.clone());
            let r = s.post_recv(&dst).unwrap();
            let w = s.post_send(&src).unwrap();
            s.wait(&mut VecDeque::from([w, r]), spin);
            rtts.push(t.elapsed().as_secs_f64() * 1e6);
        } else {
            s.recv_small(spin);
            s.send_small(spin);
        }
    }
    if !ping {
        return 0.0;
    }
    let n = rtts.len();
    median(&mut rtts[n / 10..])
}

/// Stream `count` messages of `size` each way requested, `window` in flight.
fn stream(s: &mut Side, bufs: &(Vec<Region>, Vec<Region>), send: bool, recv: bool, count: usize, spin: Duration) {
    let window = bufs.0.len();
    let (mut sq, mut rq) = (VecDeque::new(), VecDeque::new());
    let (mut ns, mut nr) = (if send { 0 } else { count }, if recv { 0 } else { count });
    let mut idle_since: Option<Instant> = None;
    while ns < count || nr < count || !sq.is_empty() || !rq.is_empty() {
        let mut moved = false;
        while nr < count && rq.len() < window {
            let Some(id) = s.post_recv(&bufs.1[nr % window]) else {
                break;
            };
            rq.push_back(id);
            nr += 1;
        }
        while ns < count && sq.len() < window {
            let Some(id) = s.post_send(&bufs.0[ns % window]) else {
                break;
            };
            sq.push_back(id);
            ns += 1;
        }
        while let Some(&id) = rq.front() {
            if s.c.test(id).expect("test").is_none() {
                break;
            }
            rq.pop_front();
            moved = true;
        }
        while let Some(&id) = sq.front() {
            if s.c.test(id).expect("test").is_none() {
                break;
            }
            sq.pop_front();
            moved = true;
        }
        if moved {
            idle_since = None;
        } else if idle_since.get_or_insert_with(Instant::now).elapsed() >= spin {
            let mut fds = Vec::new();
            s.c.wait_fds(&mut fds);
            wait_ready(&fds, Duration::from_millis(100)).expect("poll");
        }
    }
}

/// One bandwidth run; on rank 1 returns GB/s per direction.
fn bandwidth(s: &mut Side, parent: bool, size: usize, bidir: bool, args: &Args) -> f64 {
    let count = (args.bytes / size).max(4);
    // At most ~256 MiB of buffers per side and direction.
    let window = args.window.min(((256 << 20) / size).max(2)).min(count);
    let srcs: Vec<Region> = (0..window).map(|i| Region::from_vec(vec![i as u8 + 1; size])).collect();
    let dsts: Vec<Region> = (0..window).map(|_| Region::from_vec(vec![0xffu8; size])).collect();
    let bufs = (srcs, dsts);
    // Rank 0 sends one way; both send when bidirectional.
    let (send, recv) = if parent { (bidir, true) } else { (true, bidir) };
    if parent {
        let t = Instant::now();
        s.send_small(args.spin);
        stream(s, &bufs, send, recv, count, args.spin);
        s.recv_small(args.spin);
        (count * size) as f64 / t.elapsed().as_secs_f64() / 1e9
    } else {
        s.recv_small(args.spin);
        stream(s, &bufs, send, recv, count, args.spin);
        s.send_small(args.spin);
        0.0
    }
}

fn fmt_size(n: usize) -> String {
    if n >= 1 << 20 { format!("{} MiB", n >> 20) } else { format!("{} KiB", n >> 10) }
}

fn ctx(comm: CommId, rank: u32) -> CommContext {
    CommContext { comm, rank: Rank(rank), world: 2, key: None }
}

fn main() {
    let (mut args, forward) = parse_args();
    let parent = args.peers.is_none();
    let want = |m: &str| args.only.as_deref().is_none_or(|o| o == m);
    // Connections, one per configuration.
    let mut sides: Vec<Side> = Vec::new();
    let mut child = None;
    let mut _transports = Vec::new();
    if parent {
        args.comm = CommId::random();
        let ts: Vec<Box<dyn Transport>> = args.configs.iter().map(|k| k.transport(1)).collect();
        for t in &ts {
            t.activate(ctx(args.comm, 1)).unwrap();
        }
        let peers: Vec<String> = ts.iter().map(|t| t.endpoint().address).collect();
        let comm: String = args.comm.0.iter().map(|b| format!("{b:02x}")).collect();
        child = Some(
            Command::new(std::env::current_exe().unwrap())
                .args(&forward)
                .args(["--peers", &peers.join(" "), "--comm", &comm])
                .stdin(Stdio::null())
                .spawn()
                .expect("spawn the peer process"),
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        for t in &ts {
            sides.push(Side::new(t.accept(Rank(0), deadline).expect("accept")));
        }
        _transports = ts;
    } else {
        let peers = args.peers.clone().unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        for (k, addr) in args.configs.iter().zip(peers) {
            let t = k.transport(0);
            t.activate(ctx(args.comm, 0)).unwrap();
            let kind = match k {
                Kind::Shm(_) => TransportKind::Shm,
                Kind::Tcp => TransportKind::Tcp,
            };
            let ep = Endpoint { kind, address: addr, caps: vec![] };
            sides.push(Side::new(t.connect(Rank(1), &ep, deadline).expect("connect")));
            _transports.push(t);
        }
    }
    let n = args.configs.len();
    let say = |s: String| {
        if parent {
            println!("{s}");
        }
    };
    say(format!(
        "# shm transport, two processes: median of {} interleaved reps, window {}, spin {:?}\n",
        args.reps, args.window, args.spin
    ));
    let head = || {
        let mut s = String::from("| size |");
        for k in &args.configs {
            s += &format!(" {} |", k.label());
        }
        s + "\n|---|" + &"---|".repeat(n)
    };
    if want("lat") {
        let mut busy = vec![Vec::new(); n];
        let mut sleep = vec![Vec::new(); n];
        for _ in 0..args.reps {
            for (i, s) in sides.iter_mut().enumerate() {
                busy[i].push(latency(s, parent, args.iters, args.spin));
                sleep[i].push(latency(s, parent, args.iters / 4, Duration::ZERO));
            }
        }
        say("## 8-byte round trip, median (µs); one-way = half\n".into());
        say(head());
        let row = |v: &mut Vec<Vec<f64>>| v.iter_mut().map(|x| format!(" {:.2} |", median(x))).collect::<String>();
        say(format!("| busy-poll |{}", row(&mut busy)));
        say(format!("| sleeping (spin 0) |{}\n", row(&mut sleep)));
    }
    for (mode, bidir) in [("uni", false), ("bi", true)] {
        if !want(mode) {
            continue;
        }
        let what = if bidir { "bidirectional, GB/s per direction" } else { "unidirectional, GB/s" };
        say(format!("## {what}\n"));
        say(head());
        for &size in &args.sizes {
            let mut v = vec![Vec::new(); n];
            for _ in 0..args.reps {
                for (i, s) in sides.iter_mut().enumerate() {
                    v[i].push(bandwidth(s, parent, size, bidir, &args));
                }
            }
            say(format!(
                "| {} |{}",
                fmt_size(size),
                v.iter_mut().map(|x| format!(" {:.2} |", median(x))).collect::<String>()
            ));
        }
        say(String::new());
    }
    drop(sides);
    if let Some(mut c) = child {
        let st = c.wait().expect("wait for the peer process");
        assert!(st.success(), "peer process failed: {st}");
    }
}
