//! The one place that reads `DEVCCL_*` variables and the launchers' conventions.
//!
//! Every variable is listed in [`VARIABLES`] (name, default, meaning); docs/configuration.md
//! is that table, and a test keeps the two in step. Values are parsed once, in
//! [`Config::from_env`] / [`LaunchEnv::from_env`]; an unparsable value is an
//! [`Error::InvalidUsage`] naming the variable, never a silent default.

use std::collections::HashMap;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::transport::TransportKind;

/// One documented variable.
#[derive(Debug, Clone, Copy)]
pub struct Variable {
    /// Name.
    pub name: &'static str,
    /// Default, as shown to users.
    pub default: &'static str,
    /// Meaning.
    pub doc: &'static str,
}

/// Every environment variable devccl reads.
pub const VARIABLES: &[Variable] = &[
    Variable {
        name: "DEVCCL_DEBUG",
        default: "warn",
        doc: "Log level: off, error, warn, info (choices made: transport per peer and why, algorithm, channels), debug, trace. Also accepts a tracing filter such as `devccl=debug`.",
    },
    Variable {
        name: "DEVCCL_RENDEZVOUS",
        default: "MASTER_ADDR:MASTER_PORT",
        doc: "host:port of the gRPC rendezvous. Rank 0 hosts it there unless DEVCCL_RENDEZVOUS_EXTERNAL=1.",
    },
    Variable {
        name: "DEVCCL_RENDEZVOUS_EXTERNAL",
        default: "0",
        doc: "1: the rendezvous is a standalone `devccl rendezvous` server; rank 0 does not host one.",
    },
    Variable {
        name: "DEVCCL_SECRET",
        default: "(none)",
        doc: "Shared secret. When set, joining the rendezvous and every data connection must prove knowledge of it (HMAC-SHA256 over fresh nonces); it never travels.",
    },
    Variable {
        name: "DEVCCL_INIT_TIMEOUT",
        default: "120",
        doc: "Seconds init may take (rendezvous + connections) before every rank gets a timeout error.",
    },
    Variable {
        name: "DEVCCL_TIMEOUT",
        default: "600",
        doc: "Seconds a collective may wait without any progress before it fails naming the peer it waits for (and the communicator is poisoned).",
    },
    Variable {
        name: "DEVCCL_SOCKET_IFNAME",
        default: "(route to rendezvous)",
        doc: "Interface for data sockets. NCCL syntax: comma list of prefixes, `^` to exclude, `=` for exact names. Default: the interface of the route to the rendezvous host.",
    },
    Variable { name: "DEVCCL_SOCKET_FAMILY", default: "(any)", doc: "Force `ipv4` or `ipv6` for data sockets." },
    Variable {
        name: "DEVCCL_NSOCKS",
        default: "2",
        doc: "TCP sockets (lanes) per peer connection, 1..=16. Messages go round-robin over lanes.",
    },
    Variable {
        name: "DEVCCL_TRANSPORTS",
        default: "devmem,shm,tcp",
        doc: "Transports allowed, in order of preference. A transport that cannot serve a peer declines with a reason (logged at info, shown by `devccl doctor`).",
    },
    Variable {
        name: "DEVCCL_ALGO",
        default: "(tuned)",
        doc: "Force an algorithm: ring, recursive_doubling (rd), halving_doubling (rabenseifner), tree (double binary tree), direct. Per collective: `allreduce:ring,broadcast:tree`.",
    },
    Variable {
        name: "DEVCCL_NCHANNELS",
        default: "(tuned)",
        doc: "Force the number of channels (parallel rings / lanes in use).",
    },
    Variable {
        name: "DEVCCL_CHUNK",
        default: "(tuned)",
        doc: "Force the pipeline chunk size in bytes (K/M suffixes allowed).",
    },
    Variable {
        name: "DEVCCL_SPIN_US",
        default: "(auto)",
        doc: "Microseconds to busy-poll sockets before sleeping in poll(2). Auto: 50 when the host has a core per local rank, else 0.",
    },
    Variable {
        name: "DEVCCL_REDUCE_THREADS",
        default: "(auto)",
        doc: "Reduce large buffers on this many threads (rayon). Auto: only when the host has cores to spare beyond one per local rank.",
    },
    Variable {
        name: "DEVCCL_STAGING_SLOTS",
        default: "8",
        doc: "Device buffers over a transport that cannot reach device memory (TCP, shm) are staged through pinned host slots: this many slots per peer and direction (2..=64), each one chunk, so copies of the next chunks overlap the transfer of this one.",
    },
    Variable {
        name: "DEVCCL_VULKAN_DISABLE",
        default: "(none)",
        doc: "Comma list of Vulkan features to treat as missing (shaderInt64, shaderFloat64): the dtypes whose shaders need them are reduced on the host, staged. For testing the fallback; a real device's missing features are detected.",
    },
    Variable {
        name: "DEVCCL_NVRTC_PATH",
        default: "(search)",
        doc: "NVRTC for devccl's CUDA kernels: libnvrtc.so.13 or its directory. Default: the dynamic loader's search (a process that imported torch already has it loaded).",
    },
    Variable {
        name: "DEVCCL_CUDA_GATE_FALLBACK",
        default: "0",
        doc: "1: stream-ordered collectives hold the caller's CUDA stream with a host function instead of cuStreamWaitValue32 (for drivers without stream memory operations; chosen automatically when the device lacks them).",
    },
    Variable {
        name: "DEVCCL_DEVMEM",
        default: "real",
        doc: "Which kernel the devmem transport talks to: `real` (Linux devmem TCP through netlink and socket options; refused with the kernel's classified reason where the NIC cannot do it) or `sim` (the simulated kernel: payload over real loopback TCP, placed in the RX pool as the kernel would, with tokens and TX completions; for CI, tests and `devccl bench`).",
    },
    Variable {
        name: "DEVCCL_DEVMEM_POOL",
        default: "(cuda:0, else host)",
        doc: "Device of the devmem RX pool: host, cuda[:N] or vulkan[:N]. Default: cuda:0 when a CUDA device opens, else host. Calls on that device (and on the host) receive without staging; calls on other devices are staged.",
    },
    Variable {
        name: "DEVCCL_DEVMEM_POOL_BYTES",
        default: "(windows x sockets)",
        doc: "Size of the devmem RX pool (one per process and NIC; K/M/G suffixes). Default: the TCP receive window maximum (net.ipv4.tcp_rmem) times the data sockets of all peers, plus 4 MiB per bound queue, at least 16 MiB and at most 1 GiB, in whole 2 MiB.",
    },
    Variable {
        name: "DEVCCL_DEVMEM_IFNAME",
        default: "(the data interface)",
        doc: "Interface whose RX queues the devmem pool is bound to. Default: the interface of the address the data sockets use (DEVCCL_SOCKET_IFNAME or the route to the rendezvous).",
    },
    Variable {
        name: "DEVCCL_DEVMEM_QUEUES",
        default: "(last RX queue)",
        doc: "RX queues to bind the pool to and steer devmem flows to: a comma list or range (`8-15`). Default: the interface's last RX queue (keep it out of RSS: `ethtool -X <if> equal N`).",
    },
    Variable {
        name: "DEVCCL_DEVMEM_SIM_LINEAR_SPILL",
        default: "0.02",
        doc: "Simulated kernel: fraction (0 to 1) of packets the simulated NIC does not header-split; their payload is delivered as SCM_DEVMEM_LINEAR bytes instead of pool fragments (1: the whole stream spills).",
    },
    Variable {
        name: "DEVCCL_DEVMEM_SIM_SEED",
        default: "0x5eed",
        doc: "Simulated kernel: seed of its choices (where fragments land in the pool, their sizes, which packets spill), for reproducible runs. Decimal or 0x hex.",
    },
    Variable {
        name: "DEVCCL_DEVMEM_SIM_FRAG_SIZING",
        default: "mixed",
        doc: "Simulated kernel: how payload is cut into fragments: `mss` (one per 1448-byte packet, packed into 4 KiB niovs at sub-page offsets), `page` (whole niovs), `mixed` (a seeded mix of both and random sizes).",
    },
    Variable {
        name: "DEVCCL_DEVMEM_SIM_NIOV_SIZE",
        default: "4096",
        doc: "Simulated kernel: RX pool page (niov) size, a power of two of at least 4096 (larger ones model the post-6.18 rx-page-size).",
    },
    Variable {
        name: "DEVCCL_DEVMEM_SIM_MSS",
        default: "1448",
        doc: "Simulated kernel: packet payload size, 1 to the niov size.",
    },
    Variable {
        name: "DEVCCL_DEVMEM_SIM_ON_EXHAUSTION",
        default: "backpressure",
        doc: "Simulated kernel: what the NIC does when the RX pool has no free niov: `backpressure` (the flow waits, as hardware makes it) or `linear` (the packet spills into host memory instead).",
    },
    Variable {
        name: "DEVCCL_DEVMEM_SIM_RX_QUEUES",
        default: "16",
        doc: "Simulated kernel: RX queues of every simulated NIC.",
    },
    Variable {
        name: "DEVCCL_DEVMEM_SIM_MAX_FRAGS_PER_SKB",
        default: "17",
        doc: "Simulated kernel: most fragments per simulated skb (the kernel's MAX_SKB_FRAGS), 1 to 64.",
    },
    Variable {
        name: "DEVCCL_DEVMEM_SIM_COMPLETE_ON_ACK",
        default: "1",
        doc: "Simulated kernel: 1 reports a zero-copy send complete once the peer acknowledged its bytes (as the kernel does), 0 at the next error-queue read.",
    },
    Variable {
        name: "DEVCCL_DEVMEM_SIM_REQUIRE_CAP_NET_ADMIN",
        default: "0",
        doc: "Simulated kernel: 1 refuses bind-rx without CAP_NET_ADMIN (EPERM), as Linux 6.18 does.",
    },
    Variable { name: "MASTER_ADDR", default: "127.0.0.1", doc: "torchrun convention: rendezvous host." },
    Variable {
        name: "MASTER_PORT",
        default: "29500",
        doc: "torchrun convention: rendezvous port. Under torchrun (TORCHELASTIC_USE_AGENT_STORE=True) torchrun's own store holds it, so devccl uses MASTER_PORT+1.",
    },
    Variable {
        name: "RANK",
        default: "-",
        doc: "torchrun convention: global rank. Also read: SLURM_PROCID, OMPI_COMM_WORLD_RANK, PMI_RANK.",
    },
    Variable {
        name: "WORLD_SIZE",
        default: "-",
        doc: "torchrun convention: number of ranks. Also read: SLURM_NTASKS, OMPI_COMM_WORLD_SIZE, PMI_SIZE.",
    },
    Variable {
        name: "LOCAL_RANK",
        default: "0",
        doc: "torchrun convention: rank on this host. Also read: SLURM_LOCALID, OMPI_COMM_WORLD_LOCAL_RANK.",
    },
    Variable {
        name: "LOCAL_WORLD_SIZE",
        default: "(ranks on this host)",
        doc: "torchrun convention: ranks on this host. Also read: SLURM_NTASKS_PER_NODE, OMPI_COMM_WORLD_LOCAL_SIZE.",
    },
];

/// Source of variables: the process environment or a map (tests, spawned ranks).
#[derive(Debug, Clone, Default)]
pub struct Env {
    map: Option<HashMap<String, String>>,
}

impl Env {
    /// The process environment.
    pub fn process() -> Env {
        Env { map: None }
    }

    /// A fixed map (for tests and embedded use).
    pub fn from_map(map: HashMap<String, String>) -> Env {
        Env { map: Some(map) }
    }

    /// Look a variable up; empty values count as unset.
    pub fn get(&self, name: &str) -> Option<String> {
        let v = match &self.map {
            Some(m) => m.get(name).cloned(),
            None => std::env::var(name).ok(),
        };
        v.filter(|s| !s.trim().is_empty())
    }

    fn parse<T: std::str::FromStr>(&self, name: &str, what: &str) -> Result<Option<T>> {
        match self.get(name) {
            None => Ok(None),
            Some(v) => v.trim().parse::<T>().map(Some).map_err(|_| Error::usage(format!("{name}={v:?} is not {what}"))),
        }
    }

    fn seconds(&self, name: &str, default: f64) -> Result<Duration> {
        let s: f64 = self.parse(name, "a number of seconds")?.unwrap_or(default);
        if !(s > 0.0 && s.is_finite()) {
            return Err(Error::usage(format!("{name} must be a positive number of seconds")));
        }
        Ok(Duration::from_secs_f64(s))
    }
}

/// Parse sizes like `512K`, `4M`, `1G`, `4096`.
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, mul) = match s.char_indices().last()? {
        (i, 'k' | 'K') => (&s[..i], 1u64 << 10),
        (i, 'm' | 'M') => (&s[..i], 1 << 20),
        (i, 'g' | 'G') => (&s[..i], 1 << 30),
        _ => (s, 1),
    };
    num.trim().parse::<u64>().ok()?.checked_mul(mul)
}

/// Communicator configuration from `DEVCCL_*`.
#[derive(Debug, Clone)]
pub struct Config {
    /// Log filter.
    pub debug: String,
    /// Shared secret.
    pub secret: Option<String>,
    /// Init deadline.
    pub init_timeout: Duration,
    /// No-progress deadline for collectives.
    pub timeout: Duration,
    /// Interface filter for data sockets.
    pub socket_ifname: Option<String>,
    /// Forced address family: Some(4) or Some(6).
    pub socket_family: Option<u8>,
    /// Sockets per peer.
    pub nsocks: usize,
    /// Allowed transports in preference order.
    pub transports: Vec<TransportKind>,
    /// Forced algorithm spec (raw; parsed by the selector).
    pub algo: Option<String>,
    /// Forced channel count.
    pub nchannels: Option<usize>,
    /// Forced chunk size in bytes.
    pub chunk: Option<usize>,
    /// Busy-poll budget; None = auto.
    pub spin: Option<Duration>,
    /// Reduction threads; None = auto.
    pub reduce_threads: Option<usize>,
    /// Staging slots per peer and direction for device buffers.
    pub staging_slots: usize,
    /// The devmem transport's settings.
    pub devmem: DevmemConfig,
}

/// Which kernel the devmem transport talks to (`DEVCCL_DEVMEM`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DevmemKernelKind {
    /// Linux, through netlink and socket options.
    #[default]
    Real,
    /// The simulated kernel (CI, tests, benchmarks without a devmem NIC).
    Sim,
}

impl DevmemKernelKind {
    /// `real` or `sim`.
    pub fn name(self) -> &'static str {
        match self {
            DevmemKernelKind::Real => "real",
            DevmemKernelKind::Sim => "sim",
        }
    }
}

/// The devmem transport's settings (`DEVCCL_DEVMEM*`).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct DevmemConfig {
    /// Real or simulated kernel.
    pub kernel: DevmemKernelKind,
    /// The RX pool's device; `None`: cuda:0 when one opens, else the host.
    pub pool: Option<crate::memory::DeviceId>,
    /// The RX pool's size; `None`: from the socket windows (see `DEVCCL_DEVMEM_POOL_BYTES`).
    pub pool_bytes: Option<usize>,
    /// Interface to bind; `None`: the data interface.
    pub ifname: Option<String>,
    /// RX queues to bind; `None`: the interface's last RX queue.
    pub queues: Option<Vec<u32>>,
    /// The simulated kernel's knobs.
    pub sim: SimConfig,
}

/// The simulated kernel's knobs (`DEVCCL_DEVMEM_SIM_*`); `None`: the simulator's default.
/// They map one to one onto `devccl_transport_devmem::sim::SimOptions`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SimConfig {
    /// Fraction of packets delivered as linear spills.
    pub linear_spill: Option<f64>,
    /// Seed of its choices.
    pub seed: Option<u64>,
    /// `mss`, `page` or `mixed`.
    pub frag_sizing: Option<String>,
    /// niov size.
    pub niov_size: Option<u32>,
    /// Packet payload size.
    pub mss: Option<u32>,
    /// `backpressure` or `linear`.
    pub on_exhaustion: Option<String>,
    /// RX queues per simulated NIC.
    pub rx_queues: Option<u32>,
    /// Fragments per simulated skb.
    pub max_frags_per_skb: Option<u32>,
    /// Completions after the peer's acknowledgement.
    pub complete_on_ack: Option<bool>,
    /// Refuse bind-rx without CAP_NET_ADMIN.
    pub require_cap_net_admin: Option<bool>,
}

impl SimConfig {
    fn from(env: &Env) -> Result<SimConfig> {
        let flag = |name: &str| -> Result<Option<bool>> {
            match env.get(name).as_deref().map(str::trim) {
                None => Ok(None),
                Some("1" | "true" | "yes") => Ok(Some(true)),
                Some("0" | "false" | "no") => Ok(Some(false)),
                Some(v) => Err(Error::usage(format!("{name}={v:?}: expected 0 or 1"))),
            }
        };
        let word = |name: &str, allowed: &[&str]| -> Result<Option<String>> {
            match env.get(name).map(|v| v.trim().to_ascii_lowercase()) {
                None => Ok(None),
                Some(v) if allowed.contains(&v.as_str()) => Ok(Some(v)),
                Some(v) => Err(Error::usage(format!("{name}={v:?}: expected one of {}", allowed.join(", ")))),
            }
        };
        let linear_spill: Option<f64> = env.parse("DEVCCL_DEVMEM_SIM_LINEAR_SPILL", "a fraction")?;
        if let Some(f) = linear_spill
            && !(0.0..=1.0).contains(&f)
        {
            return Err(Error::usage(format!("DEVCCL_DEVMEM_SIM_LINEAR_SPILL={f} must be between 0 and 1")));
        }
        let seed = match env.get("DEVCCL_DEVMEM_SIM_SEED") {
            None => None,
            Some(v) => {
                let t = v.trim();
                let n = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
                    Some(h) => u64::from_str_radix(h, 16).ok(),
                    None => t.parse().ok(),
                };
                Some(n.ok_or_else(|| Error::usage(format!("DEVCCL_DEVMEM_SIM_SEED={v:?} is not an integer")))?)
            }
        };
        Ok(SimConfig {
            linear_spill,
            seed,
            frag_sizing: word("DEVCCL_DEVMEM_SIM_FRAG_SIZING", &["mss", "page", "mixed"])?,
            niov_size: env.parse("DEVCCL_DEVMEM_SIM_NIOV_SIZE", "a size in bytes")?,
            mss: env.parse("DEVCCL_DEVMEM_SIM_MSS", "a size in bytes")?,
            on_exhaustion: word("DEVCCL_DEVMEM_SIM_ON_EXHAUSTION", &["backpressure", "linear"])?,
            rx_queues: env.parse("DEVCCL_DEVMEM_SIM_RX_QUEUES", "a number of queues")?,
            max_frags_per_skb: env.parse("DEVCCL_DEVMEM_SIM_MAX_FRAGS_PER_SKB", "a number")?,
            complete_on_ack: flag("DEVCCL_DEVMEM_SIM_COMPLETE_ON_ACK")?,
            require_cap_net_admin: flag("DEVCCL_DEVMEM_SIM_REQUIRE_CAP_NET_ADMIN")?,
        })
    }
}

impl DevmemConfig {
    /// Read from an [`Env`].
    pub fn from(env: &Env) -> Result<DevmemConfig> {
        let kernel = match env.get("DEVCCL_DEVMEM").map(|s| s.trim().to_ascii_lowercase()).as_deref() {
            None | Some("real") => DevmemKernelKind::Real,
            Some("sim" | "simulated") => DevmemKernelKind::Sim,
            Some(v) => return Err(Error::usage(format!("DEVCCL_DEVMEM={v:?}: expected real or sim"))),
        };
        let pool = match env.get("DEVCCL_DEVMEM_POOL") {
            None => None,
            Some(v) => Some(
                v.parse::<crate::memory::DeviceId>()
                    .map_err(|e| Error::usage(format!("DEVCCL_DEVMEM_POOL={v:?}: {e}")))?,
            ),
        };
        let pool_bytes = match env.get("DEVCCL_DEVMEM_POOL_BYTES") {
            None => None,
            Some(v) => {
                let n = parse_size(&v)
                    .ok_or_else(|| Error::usage(format!("DEVCCL_DEVMEM_POOL_BYTES={v:?} is not a size")))?;
                if !(4096..=(64u64 << 30)).contains(&n) {
                    return Err(Error::usage(format!("DEVCCL_DEVMEM_POOL_BYTES={v} must be between 4K and 64G")));
                }
                Some(n as usize)
            }
        };
        let queues = match env.get("DEVCCL_DEVMEM_QUEUES") {
            None => None,
            Some(v) => Some(parse_queues(&v).ok_or_else(|| {
                Error::usage(format!("DEVCCL_DEVMEM_QUEUES={v:?}: expected a list like 0 or 8-15,20"))
            })?),
        };
        Ok(DevmemConfig {
            kernel,
            pool,
            pool_bytes,
            ifname: env.get("DEVCCL_DEVMEM_IFNAME"),
            queues,
            sim: SimConfig::from(env)?,
        })
    }
}

/// Parse a queue list: `3`, `0,2`, `8-15,20`. `None` when malformed or empty.
pub fn parse_queues(s: &str) -> Option<Vec<u32>> {
    let mut v = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (u32, u32) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
                if a > b || b - a > 4096 {
                    return None;
                }
                v.extend(a..=b);
            }
            None => v.push(part.parse().ok()?),
        }
    }
    v.dedup();
    (!v.is_empty()).then_some(v)
}

/// Process-wide device settings (devices are shared by every communicator of a process).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceConfig {
    /// Treat the Vulkan device as lacking shaderInt64 (`DEVCCL_VULKAN_DISABLE`).
    pub vulkan_disable_int64: bool,
    /// Treat the Vulkan device as lacking shaderFloat64 (`DEVCCL_VULKAN_DISABLE`).
    pub vulkan_disable_float64: bool,
    /// NVRTC to load (`DEVCCL_NVRTC_PATH`): the library or the directory holding it.
    pub nvrtc_path: Option<std::path::PathBuf>,
    /// Hold CUDA streams with host functions instead of stream memory operations
    /// (`DEVCCL_CUDA_GATE_FALLBACK=1`).
    pub cuda_gate_fallback: bool,
}

impl DeviceConfig {
    /// Read the process environment.
    pub fn from_env() -> Result<DeviceConfig> {
        DeviceConfig::from(&Env::process())
    }

    /// Read from an [`Env`].
    pub fn from(env: &Env) -> Result<DeviceConfig> {
        let mut c = DeviceConfig::default();
        for f in env.get("DEVCCL_VULKAN_DISABLE").unwrap_or_default().split(',').map(str::trim) {
            match f.to_ascii_lowercase().as_str() {
                "" => {}
                "int64" | "shaderint64" => c.vulkan_disable_int64 = true,
                "float64" | "shaderfloat64" => c.vulkan_disable_float64 = true,
                _ => {
                    return Err(Error::usage(format!(
                        "DEVCCL_VULKAN_DISABLE: unknown feature '{f}' (known: shaderInt64, shaderFloat64; or int64, \
                         float64)"
                    )));
                }
            }
        }
        c.nvrtc_path = env.get("DEVCCL_NVRTC_PATH").filter(|p| !p.trim().is_empty()).map(Into::into);
        c.cuda_gate_fallback = match env.get("DEVCCL_CUDA_GATE_FALLBACK").as_deref().map(str::trim) {
            None | Some("" | "0") => false,
            Some("1") => true,
            Some(v) => return Err(Error::usage(format!("DEVCCL_CUDA_GATE_FALLBACK={v:?}: expected 0 or 1"))),
        };
        Ok(c)
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            debug: "warn".into(),
            secret: None,
            init_timeout: Duration::from_secs(120),
            timeout: Duration::from_secs(600),
            socket_ifname: None,
            socket_family: None,
            nsocks: 2,
            transports: vec![TransportKind::Devmem, TransportKind::Shm, TransportKind::Tcp],
            algo: None,
            nchannels: None,
            chunk: None,
            spin: None,
            reduce_threads: None,
            staging_slots: 8,
            devmem: DevmemConfig::default(),
        }
    }
}

impl Config {
    /// Read the process environment.
    pub fn from_env() -> Result<Config> {
        Config::from(&Env::process())
    }

    /// Read from an [`Env`].
    pub fn from(env: &Env) -> Result<Config> {
        let d = Config::default();
        let nsocks: usize = env.parse("DEVCCL_NSOCKS", "an integer")?.unwrap_or(d.nsocks);
        if !(1..=16).contains(&nsocks) {
            return Err(Error::usage(format!("DEVCCL_NSOCKS={nsocks} is out of range 1..=16")));
        }
        let socket_family = match env.get("DEVCCL_SOCKET_FAMILY").map(|s| s.to_ascii_lowercase()) {
            None => None,
            Some(s) if s == "ipv4" || s == "af_inet" || s == "4" => Some(4),
            Some(s) if s == "ipv6" || s == "af_inet6" || s == "6" => Some(6),
            Some(s) => return Err(Error::usage(format!("DEVCCL_SOCKET_FAMILY={s:?}: expected ipv4 or ipv6"))),
        };
        let transports = match env.get("DEVCCL_TRANSPORTS") {
            None => d.transports,
            Some(list) => {
                let mut v = Vec::new();
                for name in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                    let k = TransportKind::from_name(&name.to_ascii_lowercase()).ok_or_else(|| {
                        Error::usage(format!("DEVCCL_TRANSPORTS: unknown transport '{name}' (devmem, shm, tcp)"))
                    })?;
                    if !v.contains(&k) {
                        v.push(k);
                    }
                }
                if v.is_empty() {
                    return Err(Error::usage("DEVCCL_TRANSPORTS is empty"));
                }
                v
            }
        };
        let chunk = match env.get("DEVCCL_CHUNK") {
            None => None,
            Some(s) => {
                let c = parse_size(&s).ok_or_else(|| Error::usage(format!("DEVCCL_CHUNK={s:?} is not a size")))?;
                if !(64..=(1 << 30)).contains(&c) {
                    return Err(Error::usage(format!("DEVCCL_CHUNK={s} must be between 64 bytes and 1 GiB")));
                }
                Some(c as usize)
            }
        };
        let nchannels: Option<usize> = env.parse("DEVCCL_NCHANNELS", "an integer")?;
        if let Some(n) = nchannels
            && !(1..=16).contains(&n)
        {
            return Err(Error::usage(format!("DEVCCL_NCHANNELS={n} is out of range 1..=16")));
        }
        let spin = env.parse::<u64>("DEVCCL_SPIN_US", "a number of microseconds")?.map(Duration::from_micros);
        let staging_slots: usize = env.parse("DEVCCL_STAGING_SLOTS", "an integer")?.unwrap_or(d.staging_slots);
        if !(2..=64).contains(&staging_slots) {
            return Err(Error::usage(format!("DEVCCL_STAGING_SLOTS={staging_slots} is out of range 2..=64")));
        }
        Ok(Config {
            debug: env.get("DEVCCL_DEBUG").unwrap_or(d.debug),
            secret: env.get("DEVCCL_SECRET"),
            init_timeout: env.seconds("DEVCCL_INIT_TIMEOUT", 120.0)?,
            timeout: env.seconds("DEVCCL_TIMEOUT", 600.0)?,
            socket_ifname: env.get("DEVCCL_SOCKET_IFNAME"),
            socket_family,
            nsocks,
            transports,
            algo: env.get("DEVCCL_ALGO"),
            nchannels,
            chunk,
            spin,
            reduce_threads: env.parse("DEVCCL_REDUCE_THREADS", "an integer")?,
            staging_slots,
            devmem: DevmemConfig::from(env)?,
        })
    }
}

/// Which launcher convention the rank/world came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Launcher {
    /// torchrun / `devccl launch` (RANK, WORLD_SIZE, ...).
    Torchrun,
    /// Slurm srun (SLURM_PROCID, ...).
    Slurm,
    /// Open MPI mpirun (OMPI_COMM_WORLD_*).
    OpenMpi,
    /// MPICH / Hydra (PMI_RANK, PMI_SIZE).
    Pmi,
}

/// Where this process sits in the job, from the launcher's variables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchEnv {
    /// Launcher detected.
    pub launcher: Launcher,
    /// Global rank.
    pub rank: usize,
    /// World size.
    pub world: usize,
    /// Rank on this host.
    pub local_rank: usize,
    /// Ranks on this host, where the launcher says.
    pub local_world: Option<usize>,
    /// Rendezvous host:port.
    pub rendezvous: String,
    /// True when a standalone rendezvous server is used (rank 0 must not host one).
    pub external_rendezvous: bool,
}

impl LaunchEnv {
    /// Read the process environment. `Ok(None)` when no launcher variables are present.
    pub fn from_env() -> Result<Option<LaunchEnv>> {
        LaunchEnv::from(&Env::process())
    }

    /// Read from an [`Env`].
    pub fn from(env: &Env) -> Result<Option<LaunchEnv>> {
        let candidates: [(Launcher, &str, &str, &str, &str); 4] = [
            (Launcher::Torchrun, "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"),
            (Launcher::Slurm, "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_NTASKS_PER_NODE"),
            (
                Launcher::OpenMpi,
                "OMPI_COMM_WORLD_RANK",
                "OMPI_COMM_WORLD_SIZE",
                "OMPI_COMM_WORLD_LOCAL_RANK",
                "OMPI_COMM_WORLD_LOCAL_SIZE",
            ),
            (Launcher::Pmi, "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
        ];
        let Some((launcher, rk, wk, lk, lwk)) = candidates.into_iter().find(|c| env.get(c.1).is_some()) else {
            return Ok(None);
        };
        let rank: usize = env.parse(rk, "a rank")?.expect("checked above");
        let world: usize =
            env.parse(wk, "a world size")?.ok_or_else(|| Error::usage(format!("{rk} is set but {wk} is not")))?;
        if world == 0 || rank >= world {
            return Err(Error::usage(format!("{rk}={rank} is not below {wk}={world}")));
        }
        let local_rank: usize = env.parse(lk, "a local rank")?.unwrap_or(0);
        // Slurm's SLURM_NTASKS_PER_NODE may be like "2(x3)"; take the leading number.
        let local_world =
            env.get(lwk).and_then(|s| s.split(|c: char| !c.is_ascii_digit()).next().and_then(|n| n.parse().ok()));
        let rendezvous = match env.get("DEVCCL_RENDEZVOUS") {
            Some(r) => r,
            None => {
                let host = env.get("MASTER_ADDR").unwrap_or_else(|| "127.0.0.1".into());
                let port: u16 = env.parse("MASTER_PORT", "a port")?.unwrap_or(29500);
                // Under torchrun the agent's TCPStore already listens on MASTER_PORT; use the
                // next port for ours (documented; DEVCCL_RENDEZVOUS overrides).
                let agent_store =
                    matches!(env.get("TORCHELASTIC_USE_AGENT_STORE").as_deref(), Some("True" | "true" | "1"));
                let port = if agent_store {
                    port.checked_add(1).ok_or_else(|| {
                        Error::usage("MASTER_PORT=65535 leaves no port for the devccl rendezvous under torchrun")
                    })?
                } else {
                    port
                };
                join_host_port(&host, port)
            }
        };
        let external_rendezvous =
            matches!(env.get("DEVCCL_RENDEZVOUS_EXTERNAL").as_deref(), Some("1" | "true" | "yes"));
        Ok(Some(LaunchEnv { launcher, rank, world, local_rank, local_world, rendezvous, external_rendezvous }))
    }
}

/// `host:port`, bracketing IPv6 literals.
pub fn join_host_port(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') { format!("[{host}]:{port}") } else { format!("{host}:{port}") }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Env {
        Env::from_map(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect())
    }

    #[test]
    fn defaults_and_overrides() {
        let c = Config::from(&env(&[])).unwrap();
        assert_eq!(c.nsocks, 2);
        assert_eq!(c.timeout, Duration::from_secs(600));
        let c = Config::from(&env(&[
            ("DEVCCL_NSOCKS", "4"),
            ("DEVCCL_CHUNK", "512K"),
            ("DEVCCL_TIMEOUT", "2.5"),
            ("DEVCCL_TRANSPORTS", "tcp"),
        ]))
        .unwrap();
        assert_eq!((c.nsocks, c.chunk, c.timeout), (4, Some(512 << 10), Duration::from_millis(2500)));
        assert_eq!(c.transports, vec![TransportKind::Tcp]);
    }

    #[test]
    fn bad_values_name_the_variable() {
        for (k, v) in [
            ("DEVCCL_NSOCKS", "many"),
            ("DEVCCL_NSOCKS", "0"),
            ("DEVCCL_TIMEOUT", "-1"),
            ("DEVCCL_TRANSPORTS", "rdma"),
            ("DEVCCL_CHUNK", "12X"),
            ("DEVCCL_SOCKET_FAMILY", "ipx"),
            ("DEVCCL_DEVMEM", "fake"),
            ("DEVCCL_DEVMEM_POOL", "tpu"),
            ("DEVCCL_DEVMEM_POOL_BYTES", "1"),
            ("DEVCCL_DEVMEM_QUEUES", "3-1"),
            ("DEVCCL_DEVMEM_SIM_LINEAR_SPILL", "1.5"),
            ("DEVCCL_DEVMEM_SIM_FRAG_SIZING", "huge"),
            ("DEVCCL_DEVMEM_SIM_COMPLETE_ON_ACK", "maybe"),
        ] {
            let e = Config::from(&env(&[(k, v)])).unwrap_err().to_string();
            assert!(e.contains(k), "{e}");
        }
    }

    #[test]
    fn launchers() {
        assert_eq!(LaunchEnv::from(&env(&[])).unwrap(), None);
        let l = LaunchEnv::from(&env(&[
            ("RANK", "1"),
            ("WORLD_SIZE", "4"),
            ("MASTER_ADDR", "::1"),
            ("MASTER_PORT", "1234"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!((l.launcher, l.rank, l.world, l.rendezvous.as_str()), (Launcher::Torchrun, 1, 4, "[::1]:1234"));
        let s = LaunchEnv::from(&env(&[
            ("SLURM_PROCID", "3"),
            ("SLURM_NTASKS", "8"),
            ("SLURM_NTASKS_PER_NODE", "4(x2)"),
            ("DEVCCL_RENDEZVOUS", "h:9"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!((s.launcher, s.local_world, s.rendezvous.as_str()), (Launcher::Slurm, Some(4), "h:9"));
        assert!(LaunchEnv::from(&env(&[("RANK", "4"), ("WORLD_SIZE", "4")])).is_err());
        assert!(LaunchEnv::from(&env(&[("OMPI_COMM_WORLD_RANK", "0")])).is_err());
    }

    #[test]
    fn devmem_settings() {
        let d = Config::from(&env(&[])).unwrap().devmem;
        assert_eq!((d.kernel, d.pool, d.pool_bytes, d.queues), (DevmemKernelKind::Real, None, None, None));
        assert_eq!(d.sim, SimConfig::default());
        let d = Config::from(&env(&[
            ("DEVCCL_DEVMEM", "sim"),
            ("DEVCCL_DEVMEM_POOL", "vulkan"),
            ("DEVCCL_DEVMEM_POOL_BYTES", "64M"),
            ("DEVCCL_DEVMEM_QUEUES", "8-10,3"),
            ("DEVCCL_DEVMEM_SIM_LINEAR_SPILL", "1"),
            ("DEVCCL_DEVMEM_SIM_SEED", "0x10"),
            ("DEVCCL_DEVMEM_SIM_FRAG_SIZING", "Page"),
            ("DEVCCL_DEVMEM_SIM_COMPLETE_ON_ACK", "0"),
        ]))
        .unwrap()
        .devmem;
        assert_eq!(d.kernel, DevmemKernelKind::Sim);
        assert_eq!(d.pool, Some(crate::memory::DeviceId::Vulkan(0)));
        assert_eq!((d.pool_bytes, d.queues.as_deref()), (Some(64 << 20), Some(&[8, 9, 10, 3][..])));
        assert_eq!((d.sim.linear_spill, d.sim.seed, d.sim.frag_sizing.as_deref()), (Some(1.0), Some(16), Some("page")));
        assert_eq!(d.sim.complete_on_ack, Some(false));
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4M"), Some(4 << 20));
        assert_eq!(parse_size("17"), Some(17));
        assert_eq!(parse_size("x"), None);
    }

    #[test]
    fn docs_table_lists_every_variable() {
        let doc = include_str!("../../docs/configuration.md");
        for v in VARIABLES {
            assert!(doc.contains(&format!("`{}`", v.name)), "docs/configuration.md lacks {}", v.name);
        }
    }
}
