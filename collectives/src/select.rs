//! Algorithm, channel and chunk selection: an α-β-γ cost model (NCCL's tuning.cc shape)
//! evaluated per call, with `DEVCCL_ALGO`, `DEVCCL_NCHANNELS` and `DEVCCL_CHUNK` overrides.
//!
//! The model: sending one message costs α (latency, µs), moving one byte costs β (ns) on the
//! wire and γ (ns) to reduce. α and β come from the transports' properties and, after init,
//! from a short calibration run on the communicator itself (the max over ranks, so every rank
//! holds the same numbers and therefore picks the same algorithm — a rank choosing
//! differently would be a protocol desync). Each algorithm's cost is its number of
//! sequential message rounds times α plus the bytes each rank sends times β plus the bytes it
//! reduces times γ; pipelined algorithms pay α per chunk as well. The cheapest wins.

use std::collections::HashMap;
use std::fmt;

use devccl_core::config::Config;
use devccl_core::wire::CollKind;

use crate::algo::{Algo, supported};

/// Link and CPU costs the model uses.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinkModel {
    /// Per-message latency, µs.
    pub alpha_us: f64,
    /// Per-byte transfer cost, ns (1 / bandwidth).
    pub beta_ns: f64,
    /// Per-byte reduction cost, ns.
    pub gamma_ns: f64,
    /// Parallel lanes per connection.
    pub lanes: usize,
    /// True when one flow cannot fill the link (TCP on a NIC of 25 Gbit/s or more), so
    /// spreading a large call over the lanes as channels pays.
    pub multi_flow: bool,
}

impl Default for LinkModel {
    /// Loopback TCP on a small host: ~10 µs per message, ~0.5 ns/B (2 GB/s), reduce ~0.15 ns/B.
    fn default() -> Self {
        LinkModel { alpha_us: 10.0, beta_ns: 0.5, gamma_ns: 0.15, lanes: 2, multi_flow: false }
    }
}

impl LinkModel {
    /// The model the transports' own properties suggest (the slowest link wins).
    pub fn from_transports(ts: &[std::sync::Arc<dyn devccl_core::transport::Transport>]) -> LinkModel {
        let mut m = LinkModel::default();
        for t in ts {
            let p = t.properties();
            m.alpha_us = m.alpha_us.max(p.latency_us);
            if p.speed_mbps > 0 {
                // Mbit/s -> ns per byte; the CPU cost of TCP bounds loopback, so never assume
                // better than the default.
                m.beta_ns = m.beta_ns.max(8_000.0 / p.speed_mbps as f64);
            }
            m.lanes = m.lanes.max(p.lanes);
            // One TCP flow tops out well below a fast NIC (NVIDIA/nccl#209); loopback reports
            // no speed and gains nothing from more flows (measured: neutral within noise).
            m.multi_flow |= t.kind() == devccl_core::transport::TransportKind::Tcp && p.speed_mbps >= 25_000;
        }
        m
    }
}

/// What to run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Plan {
    /// Algorithm.
    pub algo: Algo,
    /// Pipeline chunk in bytes.
    pub chunk: usize,
    /// Parallel channels (independent sub-schedules) in use.
    pub nchannels: usize,
    /// Modelled time in µs (0 when forced).
    pub est_us: f64,
    /// True when an override decided it.
    pub forced: bool,
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} chunk={} channels={}", self.algo, human(self.chunk), self.nchannels)?;
        if self.forced {
            write!(f, " (forced by DEVCCL_ALGO/DEVCCL_CHUNK/DEVCCL_NCHANNELS)")
        } else {
            write!(f, " (model {:.1} us)", self.est_us)
        }
    }
}

fn human(b: usize) -> String {
    if b >= 1 << 20 && b.is_multiple_of(1 << 20) {
        format!("{}M", b >> 20)
    } else if b >= 1 << 10 && b.is_multiple_of(1 << 10) {
        format!("{}K", b >> 10)
    } else {
        b.to_string()
    }
}

/// Parsed `DEVCCL_ALGO`: one algorithm for every collective that has it, or per collective
/// (`allreduce:ring,broadcast:tree`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AlgoOverride {
    all: Option<Algo>,
    per: HashMap<CollKind, Algo>,
}

fn coll_from_name(s: &str) -> Option<CollKind> {
    let norm = s.trim().to_ascii_lowercase().replace(['-', '_'], "");
    CollKind::ALL.into_iter().find(|k| k.name().replace('_', "") == norm)
}

impl AlgoOverride {
    /// Parse; errors name the offending part.
    pub fn parse(spec: &str) -> Result<AlgoOverride, String> {
        let mut o = AlgoOverride::default();
        for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            match part.split_once(':') {
                None => {
                    o.all =
                        Some(Algo::from_name(part).ok_or_else(|| format!("DEVCCL_ALGO: unknown algorithm '{part}'"))?)
                }
                Some((c, a)) => {
                    let coll = coll_from_name(c).ok_or_else(|| format!("DEVCCL_ALGO: unknown collective '{c}'"))?;
                    let algo = Algo::from_name(a).ok_or_else(|| format!("DEVCCL_ALGO: unknown algorithm '{a}'"))?;
                    if !supported(coll).contains(&algo) {
                        return Err(format!(
                            "DEVCCL_ALGO: {} has no '{algo}' algorithm (it has: {})",
                            coll.name(),
                            names(supported(coll))
                        ));
                    }
                    o.per.insert(coll, algo);
                }
            }
        }
        Ok(o)
    }

    /// The forced algorithm for `coll`, if any applies.
    pub fn get(&self, coll: CollKind) -> Option<Algo> {
        self.per.get(&coll).copied().or(self.all.filter(|a| supported(coll).contains(a)))
    }
}

fn names(a: &[Algo]) -> String {
    a.iter().map(|x| x.name()).collect::<Vec<_>>().join(", ")
}

fn log2c(n: usize) -> f64 {
    (n.max(1) as f64).log2().ceil()
}

fn pow2_floor(n: usize) -> usize {
    if n == 0 { 0 } else { 1 << (usize::BITS - 1 - n.leading_zeros()) }
}

/// Calls at least this large get more than one channel by default.
const CHANNEL_MIN_BYTES: usize = 8 << 20;
/// Most channels the model picks by itself.
const MAX_DEFAULT_CHANNELS: usize = 2;

/// Default chunk for a pipelined algorithm moving `per_step` bytes per step: enough chunks
/// to overlap steps, large enough that per-message costs stay small.
fn default_chunk(per_step: usize) -> usize {
    (per_step / 4).clamp(32 << 10, 512 << 10)
}

/// Modelled µs of `algo` for `coll` with `bytes` (the call's full buffer for all_reduce,
/// broadcast, reduce; n × per-rank block for the gather/scatter family) on `n` ranks.
pub fn cost(m: &LinkModel, coll: CollKind, algo: Algo, n: usize, bytes: usize, chunk: usize) -> f64 {
    let (a, b, g) = (m.alpha_us, m.beta_ns * 1e-3, m.gamma_ns * 1e-3);
    let s = bytes as f64;
    let nf = n as f64;
    if n <= 1 {
        return 0.0;
    }
    let chunks = |per: f64| (per / chunk.max(1) as f64).ceil().max(1.0);
    let p = pow2_floor(n);
    let fold = if p == n { 0.0 } else { 2.0 * (a + s * b) };
    // Pipelined algorithms (ring, tree) overlap their chunks: each chunk after the first
    // costs a fraction of a message latency, and reductions hide behind the transfers.
    // Step-by-step algorithms (recursive doubling, halving-doubling, direct) pay latency per
    // round and their reductions on top. Measured on the 2-core VM with 4 ranks: the ring
    // overtakes halving-doubling from a few MiB on (e.g. 256 MiB: ~190-280 ms vs ~360-420 ms).
    let pipe = |per: f64| (chunks(per) - 1.0) * a / 8.0;
    let red = |x: f64| {
        if coll == CollKind::Reduce || coll == CollKind::ReduceScatter || coll == CollKind::AllReduce {
            x * g
        } else {
            0.0
        }
    };
    match (coll, algo) {
        (CollKind::AllReduce, Algo::Ring) => 2.0 * (nf - 1.0) * a + pipe(s / nf) + 2.0 * (nf - 1.0) / nf * s * b,
        (CollKind::AllReduce, Algo::RecursiveDoubling) => log2c(p) * (a + s * b + s * g) + fold,
        (CollKind::AllReduce, Algo::HalvingDoubling) => {
            let pf = p as f64;
            2.0 * log2c(p) * a + 2.0 * (pf - 1.0) / pf * s * b + (pf - 1.0) / pf * s * g + fold
        }
        (CollKind::AllReduce, Algo::Tree) => {
            // Two trees, each carrying half the data up and down.
            2.0 * log2c(n + 1) * a + pipe(s / 2.0) + 2.0 * s * b
        }
        (CollKind::ReduceScatter | CollKind::AllGather, Algo::Ring) => {
            (nf - 1.0) * a + pipe(s / nf) + (nf - 1.0) / nf * s * b
        }
        (CollKind::ReduceScatter, Algo::HalvingDoubling) | (CollKind::AllGather, Algo::RecursiveDoubling) => {
            let pf = p as f64;
            log2c(p) * a + (pf - 1.0) / pf * s * b + red((pf - 1.0) / pf * s) + fold / 2.0
        }
        (CollKind::ReduceScatter | CollKind::AllGather, Algo::Direct) => {
            // n-1 messages leave at once; the receiver handles them one after another.
            (nf - 1.0) * a * 0.5 + a + (nf - 1.0) / nf * s * b + red((nf - 1.0) / nf * s)
        }
        (CollKind::Broadcast | CollKind::Reduce, Algo::Ring) => (nf - 1.0) * a + pipe(s) + s * b,
        (CollKind::Broadcast | CollKind::Reduce, Algo::Tree) => {
            // Each rank forwards about S (1.5 S at an odd root).
            log2c(n + 1) * a + pipe(s / 2.0) + 1.5 * s * b
        }
        (CollKind::Broadcast | CollKind::Reduce, Algo::Direct) => {
            (nf - 1.0) * (a * 0.5 + s * b) + a + red((nf - 1.0) * s)
        }
        (CollKind::Gather | CollKind::Scatter, Algo::Tree) => log2c(n) * a + (nf - 1.0) / nf * s * b,
        (CollKind::Gather | CollKind::Scatter, Algo::Direct) => (nf - 1.0) * a * 0.5 + a + (nf - 1.0) / nf * s * b,
        (_, _) => (nf - 1.0) * a + s * b,
    }
}

/// Bytes a pipelined step carries, for the default chunk size.
fn per_step(coll: CollKind, n: usize, bytes: usize) -> usize {
    match coll {
        CollKind::AllReduce | CollKind::ReduceScatter | CollKind::AllGather => bytes.div_ceil(n.max(1)),
        _ => bytes,
    }
}

/// Choose the plan for `coll` with `bytes` (see [`cost`] for what `bytes` means) on `n`
/// ranks.
pub fn plan_with(cfg: &Config, forced: &AlgoOverride, m: &LinkModel, coll: CollKind, n: usize, bytes: usize) -> Plan {
    let chunk = cfg.chunk.unwrap_or_else(|| default_chunk(per_step(coll, n, bytes)));
    // Channels spread a large contiguous collective over the connection's lanes; below a
    // few MiB the extra messages cost more than parallel sockets bring.
    let splittable = matches!(coll, CollKind::AllReduce | CollKind::Broadcast | CollKind::Reduce);
    let nchannels = if splittable {
        cfg.nchannels.unwrap_or(if m.multi_flow && bytes >= CHANNEL_MIN_BYTES {
            m.lanes.clamp(1, MAX_DEFAULT_CHANNELS)
        } else {
            1
        })
    } else {
        1
    };
    let options = supported(coll);
    if let Some(algo) = forced.get(coll) {
        return Plan { algo, chunk, nchannels, est_us: cost(m, coll, algo, n, bytes, chunk), forced: true };
    }
    let mut best = Plan {
        algo: options[0],
        chunk,
        nchannels,
        est_us: f64::INFINITY,
        forced: cfg.chunk.is_some() || cfg.nchannels.is_some(),
    };
    for &algo in options {
        let c = cost(m, coll, algo, n, bytes, chunk);
        if c < best.est_us {
            best.algo = algo;
            best.est_us = c;
        }
    }
    best
}

/// Every algorithm's modelled time for a call, for `--explain` and info logs.
pub fn candidates(m: &LinkModel, coll: CollKind, n: usize, bytes: usize, chunk: usize) -> Vec<(Algo, f64)> {
    supported(coll).iter().map(|&a| (a, cost(m, coll, a, n, bytes, chunk))).collect()
}

/// The plan with the default model and no per-communicator calibration (tests, tools).
pub fn plan_default(cfg: &Config, coll: CollKind, n: usize, bytes: usize) -> Plan {
    let forced = cfg.algo.as_deref().map(AlgoOverride::parse).and_then(Result::ok).unwrap_or_default();
    plan_with(cfg, &forced, &LinkModel::default(), coll, n, bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_messages_avoid_the_ring_large_ones_use_it() {
        let cfg = Config::default();
        let m = LinkModel::default();
        let f = AlgoOverride::default();
        let small = plan_with(&cfg, &f, &m, CollKind::AllReduce, 4, 8);
        assert_ne!(small.algo, Algo::Ring, "{small}");
        let big = plan_with(&cfg, &f, &m, CollKind::AllReduce, 4, 64 << 20);
        assert!(matches!(big.algo, Algo::Ring | Algo::HalvingDoubling), "{big}");
        assert_eq!(plan_with(&cfg, &f, &m, CollKind::AllToAll, 4, 1 << 20).algo, Algo::Direct);
    }

    #[test]
    fn overrides() {
        let o = AlgoOverride::parse("allreduce:rd, broadcast:tree").unwrap();
        assert_eq!(o.get(CollKind::AllReduce), Some(Algo::RecursiveDoubling));
        assert_eq!(o.get(CollKind::Broadcast), Some(Algo::Tree));
        assert_eq!(o.get(CollKind::AllGather), None);
        let all = AlgoOverride::parse("ring").unwrap();
        assert_eq!(all.get(CollKind::ReduceScatter), Some(Algo::Ring));
        assert_eq!(all.get(CollKind::AllToAll), None, "ring does not apply to all_to_all");
        assert!(AlgoOverride::parse("allreduce:direct").unwrap_err().contains("has no 'direct'"));
        assert!(AlgoOverride::parse("bogus").is_err());
        assert!(AlgoOverride::parse("nonsense:ring").is_err());
        let cfg = Config { chunk: Some(4096), ..Config::default() };
        let p = plan_with(&cfg, &o, &LinkModel::default(), CollKind::AllReduce, 8, 1 << 20);
        assert_eq!((p.algo, p.chunk, p.forced), (Algo::RecursiveDoubling, 4096, true));
    }

    #[test]
    fn channels_only_where_one_flow_cannot_fill_the_link() {
        let cfg = Config::default();
        let f = AlgoOverride::default();
        let slow = LinkModel::default();
        assert_eq!(plan_with(&cfg, &f, &slow, CollKind::AllReduce, 4, 64 << 20).nchannels, 1);
        let fast = LinkModel { multi_flow: true, ..LinkModel::default() };
        assert_eq!(plan_with(&cfg, &f, &fast, CollKind::AllReduce, 4, 64 << 20).nchannels, 2);
        assert_eq!(plan_with(&cfg, &f, &fast, CollKind::AllReduce, 4, 1 << 20).nchannels, 1, "small calls");
        assert_eq!(plan_with(&cfg, &f, &fast, CollKind::AllGather, 4, 64 << 20).nchannels, 1, "block layouts");
        let forced = Config { nchannels: Some(3), ..Config::default() };
        assert_eq!(plan_with(&forced, &f, &slow, CollKind::Broadcast, 4, 4096).nchannels, 3);
    }

    #[test]
    fn costs_are_finite_and_grow_with_size() {
        let m = LinkModel::default();
        for coll in CollKind::ALL {
            for &a in supported(coll) {
                for n in [2, 3, 8, 13] {
                    let c1 = cost(&m, coll, a, n, 1 << 10, 64 << 10);
                    let c2 = cost(&m, coll, a, n, 1 << 24, 64 << 10);
                    assert!(c1.is_finite() && c2 >= c1, "{coll:?} {a} n={n}: {c1} {c2}");
                }
            }
        }
    }
}
