//! The communicator: init (rendezvous + connections), the collectives, abort and poisoning.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use devccl_core::auth::AuthKey;
use devccl_core::bootstrap::{
    HostIdentity, JoinRequest, PeerInfo, PeerTable, RendezvousClient, RendezvousServer, ServerOptions, WatchHandle,
};
use devccl_core::config::{Config, LaunchEnv};
use devccl_core::memory::{DeviceId, Region, RegionSlice};
use devccl_core::transport::{CommContext, Connection, Transport, TransportKind};
use devccl_core::wire::CollKind;
use devccl_core::{CommId, DType, Element, Error, Rank, ReduceOp, Result};

use crate::algo::{Algo, Shape};
use crate::api::Collective;
use crate::exec::{AbortSignal, Bindings, CallInfo, Executor, Spin};
use crate::registry;
use crate::schedule::Builder;
use crate::select;
use crate::select::{AlgoOverride, LinkModel, Plan};
use crate::work::{Engine, Job, Work};

/// How to start a communicator. [`InitOptions::from_env`] reads the launcher's variables
/// (torchrun, `devccl launch`, srun, mpirun) and `DEVCCL_*`.
#[derive(Debug, Clone)]
pub struct InitOptions {
    /// This process's rank.
    pub rank: usize,
    /// Number of ranks.
    pub world: usize,
    /// Ranks on this host (for spin/thread defaults), when known.
    pub local_world: Option<usize>,
    /// Rendezvous `host:port`.
    pub rendezvous: String,
    /// Rank 0 hosts the rendezvous server in-process.
    pub host_rendezvous: bool,
    /// Rendezvous group name (communicator key).
    pub group: String,
    /// Settings.
    pub config: Config,
}

impl InitOptions {
    /// From the environment; errors if no launcher variables are set.
    pub fn from_env() -> Result<InitOptions> {
        let launch = LaunchEnv::from_env()?.ok_or_else(|| {
            Error::usage(
                "no rank information: set RANK and WORLD_SIZE (torchrun, `devccl launch`), or run under srun/mpirun",
            )
        })?;
        Ok(InitOptions::from_launch(&launch, Config::from_env()?))
    }

    /// From an already-read launcher environment.
    pub fn from_launch(l: &LaunchEnv, config: Config) -> InitOptions {
        InitOptions {
            rank: l.rank,
            world: l.world,
            local_world: l.local_world,
            rendezvous: l.rendezvous.clone(),
            host_rendezvous: l.rank == 0 && !l.external_rendezvous,
            group: "world".into(),
            config,
        }
    }
}

/// What a call is, as every frame of it says (see [`Communicator::run_schedule`]).
#[derive(Debug, Clone, Copy)]
pub struct Call {
    /// Collective.
    pub coll: CollKind,
    /// Element type.
    pub dtype: DType,
    /// Reduction, for reducing collectives.
    pub op: Option<ReduceOp>,
    /// Root rank, for rooted collectives.
    pub root: Option<usize>,
    /// Element count as the caller gave it (compared across ranks).
    pub count: usize,
    /// Algorithm.
    pub algo: Algo,
    /// Point-to-point tag.
    pub tag: u32,
}

/// A group of ranks that run collectives together. Cheap to clone (shared handle); calls on
/// one communicator are serialised in issue order.
#[derive(Clone, Debug)]
pub struct Communicator {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    rank: Rank,
    world: usize,
    comm: CommId,
    group: String,
    config: Config,
    engine: Arc<Engine>,
    abort: Arc<AbortSignal>,
    transports: Vec<Arc<dyn Transport>>,
    peers: Vec<PeerInfo>,
    forced: AlgoOverride,
    model: std::sync::Mutex<LinkModel>,
    /// Per peer: the devices whose memory the connection moves itself (device buffers of
    /// other devices are staged through host slots).
    device_reach: Vec<Vec<DeviceId>>,
    /// Per peer: the transport its connection uses.
    peer_kinds: Vec<Option<TransportKind>>,
    logged: std::sync::Mutex<std::collections::HashSet<(CollKind, usize)>>,
    link: Option<RendezvousLink>,
    _watch: Option<WatchHandle>,
    splits: std::sync::atomic::AtomicU64,
}

/// How a communicator reaches its rendezvous (shared with the communicators split from it,
/// which join new groups there; rank 0's server lives as long as any of them).
#[derive(Debug, Clone)]
struct RendezvousLink {
    client: RendezvousClient,
    /// Held, never read: rank 0's in-process server must outlive every communicator using it.
    _server: Option<Arc<RendezvousServer>>,
    toward: Option<SocketAddr>,
    key: Option<AuthKey>,
}

impl Inner {
    /// Prefix for the groups of communicators split from this one: unique per communicator.
    fn group_base(&self) -> String {
        format!("{}/{:?}", self.group, self.comm)
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Queued work still runs (every rank expects it), then the progress thread exits.
        self.engine.shutdown();
        self.engine.drain(Instant::now() + self.config.timeout);
        for t in &self.transports {
            t.close();
        }
        for t in self.transports.iter().filter(|t| t.kind() == TransportKind::Devmem) {
            let c: Vec<String> = t.counters().into_iter().map(|(k, v)| format!("{k}={v}")).collect();
            tracing::info!(rank = self.rank.0, "devmem counters at destroy: {}", c.join(" "));
        }
        if let Some(l) = &self.link {
            let _ = l.client.leave(self.comm, self.rank);
            // The last communicator of the rank hosting the rendezvous: give the other ranks
            // time to finish with it (a split still joining, their own leave) before it goes.
            if let Some(server) = l._server.as_ref().filter(|s| Arc::strong_count(s) == 1) {
                server.linger(Duration::from_secs(10));
            }
        }
    }
}

/// Install a log subscriber when DEVCCL_DEBUG asks for one (and nobody installed one).
fn init_logging(filter: &str) {
    if std::env::var_os("DEVCCL_DEBUG").is_none() {
        return;
    }
    let f = match filter {
        "off" | "error" | "warn" | "info" | "debug" | "trace" => format!(
            "devccl={filter},devccl_core={filter},devccl_transport_tcp={filter},devccl_transport_devmem={filter}"
        ),
        other => other.to_string(),
    };
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(f))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .try_init();
}

/// Busy-poll and reduction-thread defaults from the host's cores and the ranks sharing them.
fn tune_host(cfg: &Config, local_world: Option<usize>) -> Spin {
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let local = local_world.unwrap_or(1).max(1);
    let threads = cfg.reduce_threads.unwrap_or(cpus / local);
    if threads >= 2 {
        let _ = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("devccl-reduce-{i}"))
            .build_global();
        devccl_core::op::set_parallel_threshold(Some(4 << 20));
    }
    // A core per rank: busy-poll briefly (a wake-up from poll costs tens of microseconds on
    // VMs). More ranks than cores: poll while yielding, so the rank being waited for gets
    // this core at once.
    // Measured on the 2-core VM with 4 ranks: yielding for up to 1 ms cuts an 8-byte
    // all-reduce from ~80-135 us to ~22 us, but costs large calls CPU time their copies need,
    // so large calls do not spin when oversubscribed.
    let oversubscribed = local > cpus;
    let (budget, budget_small) = match cfg.spin {
        Some(d) => (d, d),
        None if oversubscribed => (Duration::ZERO, Duration::from_micros(1000)),
        None => (Duration::from_micros(50), Duration::from_micros(100)),
    };
    Spin { budget, budget_small, yield_cpu: oversubscribed }
}

/// The device that holds a call's memory: every non-empty slice must live on the same one
/// (host memory, including a device's staging memory, is the host's).
pub(crate) fn device_of(slices: &[&RegionSlice]) -> Result<Arc<dyn devccl_core::device::Device>> {
    let mut found: Option<(DeviceId, &RegionSlice)> = None;
    for s in slices.iter().filter(|s| !s.is_empty()) {
        let id = s.region.kind().device().ok_or_else(|| {
            Error::usage(format!(
                "{:?} memory cannot take part in a collective (pass host, CUDA or Vulkan memory)",
                s.region.kind()
            ))
        })?;
        match found {
            None => found = Some((id, s)),
            Some((other, _)) if other != id => {
                return Err(Error::usage(format!(
                    "buffers on different devices ({other} and {id}): a collective's input and output must live on \
                     one device"
                )));
            }
            Some(_) => {}
        }
    }
    match found {
        None | Some((DeviceId::Host, _)) => Ok(devccl_core::device::host()),
        Some((id, _)) => devccl_device::open(id),
    }
}

/// Stage a schedule on device memory for the peers whose connections cannot reach it
/// (`reach`: per peer, the devices its connection reaches); host schedules are returned
/// unchanged.
fn lower_with(
    sched: crate::schedule::Schedule,
    device: DeviceId,
    reach: &[Vec<DeviceId>],
    slots: usize,
) -> crate::schedule::Schedule {
    if device.is_host() {
        return sched;
    }
    crate::lower::stage(sched, |p| !reach.get(p.idx()).is_some_and(|r| r.contains(&device)), slots)
}

/// The devices (besides the host) a connection reaches, among those a process may use: a
/// devmem connection reaches its RX pool's device; TCP and shared memory none.
fn reached_devices(c: &dyn Connection) -> Vec<DeviceId> {
    (0..16u32).flat_map(|i| [DeviceId::Cuda(i), DeviceId::Vulkan(i)]).filter(|&d| c.reaches(d)).collect()
}

/// The transport pair (a < b) uses: the first kind in `a`'s published preference order that
/// `b` also offers. Both ranks compute the same answer from the peer table.
fn pair_kind(table: &PeerTable, a: usize, b: usize) -> Option<TransportKind> {
    let (lo, hi) = (&table.peers[a.min(b)], &table.peers[a.max(b)]);
    let usable = |e: &&devccl_core::transport::Endpoint| e.cap(registry::DECLINED).is_none();
    lo.endpoints.iter().filter(usable).find_map(|mine| {
        let theirs = hi.endpoints.iter().filter(usable).find(|e| e.kind == mine.kind)?;
        // Shared memory needs one kernel and one network namespace (abstract Unix socket
        // names are per namespace): compare what both published.
        let local = ["host", "boot_id", "netns"].iter().all(|k| mine.cap(k).is_some() && mine.cap(k) == theirs.cap(k));
        (mine.kind != TransportKind::Shm || (local && lo.host.same_host(&hi.host))).then_some(mine.kind)
    })
}

/// Why the pair (`me`, `peer`) does not use devmem although this rank allows it (`None` when
/// it does, or when this rank does not allow devmem): this rank's or the peer's refusal (the
/// kernel's classified answer), or the peer not offering it.
fn devmem_not_used(table: &PeerTable, me: usize, peer: usize, used: TransportKind) -> Option<String> {
    if used == TransportKind::Devmem {
        return None;
    }
    let find = |r: usize| table.peers[r].endpoints.iter().find(|e| e.kind == TransportKind::Devmem);
    let mine = find(me)?;
    if let Some(why) = mine.cap(registry::DECLINED) {
        return Some(format!("this rank declined devmem: {why}"));
    }
    Some(match find(peer) {
        None => format!("rank {peer} does not offer devmem (not in its DEVCCL_TRANSPORTS)"),
        Some(t) => match t.cap(registry::DECLINED) {
            Some(why) => format!("rank {peer} declined devmem: {why}"),
            None => format!("rank {peer} prefers {used}"),
        },
    })
}

impl Communicator {
    /// Initialise from the environment (see [`InitOptions::from_env`]).
    pub fn init() -> Result<Communicator> {
        Communicator::init_with(InitOptions::from_env()?)
    }

    /// Initialise: rendezvous, connect to every peer, ready for collectives. Everything is
    /// bounded by `DEVCCL_INIT_TIMEOUT`.
    pub fn init_with(o: InitOptions) -> Result<Communicator> {
        init_logging(&o.config.debug);
        if o.world == 0 || o.rank >= o.world {
            return Err(Error::usage(format!("rank {} is not below world size {}", o.rank, o.world)));
        }
        let deadline = Instant::now() + o.config.init_timeout;
        let key = o.config.secret.as_deref().map(AuthKey::from_secret);
        let rank = Rank::from(o.rank);
        let toward: Option<SocketAddr> = registry::resolve(&o.rendezvous).ok();
        let server = if o.host_rendezvous {
            let addr =
                toward.ok_or_else(|| Error::usage(format!("cannot resolve rendezvous address '{}'", o.rendezvous)))?;
            let bind = if addr.ip().is_loopback() {
                addr.to_string()
            } else if addr.is_ipv6() {
                format!("[::]:{}", addr.port())
            } else {
                format!("0.0.0.0:{}", addr.port())
            };
            let s = RendezvousServer::start(
                &bind,
                ServerOptions { world: Some(o.world), key: key.clone(), group_timeout: o.config.init_timeout },
            )
            .map_err(|e| match e {
                Error::System { context, source } => Error::System {
                    context: format!("{context} (rank 0 hosts the rendezvous at {}; is the port in use? set MASTER_PORT or DEVCCL_RENDEZVOUS)", o.rendezvous),
                    source,
                },
                e => e,
            })?;
            tracing::info!(addr = %s.local_addr(), "rendezvous server started on rank 0");
            Some(s)
        } else {
            None
        };
        // This rank's transports first: a set-up that cannot work here (no usable transport)
        // fails at once, before the rendezvous; rank 0, which hosts it, fails the group too,
        // so the others hear why now rather than find its port closed at their deadline.
        let offer = match registry::offer(&o.config, rank, o.world, toward) {
            Ok(offer) => offer,
            Err(e) => {
                if let Some(s) = &server {
                    s.fail_group(&o.group, o.world, o.rank as u32, &e.to_string());
                    s.settle(&o.group, deadline.min(Instant::now() + Duration::from_secs(10)));
                }
                return Err(e);
            }
        };
        let client = RendezvousClient::connect(&o.rendezvous, key.clone(), deadline)?;
        let server = server.map(Arc::new);
        let link = RendezvousLink { client, _server: server.clone(), toward, key };
        let group = o.group.clone();
        let r = Communicator::join(link, offer, rank, o.world, o.local_world, o.group, o.config, deadline);
        if r.is_err() {
            // Rank 0 hosts the rendezvous: if the group failed (wrong secret, duplicate rank,
            // ...) stay until the other ranks have been told why, rather than vanishing and
            // leaving them a closed port.
            if let Some(s) = &server {
                s.settle(&group, deadline.min(Instant::now() + Duration::from_secs(10)));
            }
        }
        r
    }

    /// Join `group` at the rendezvous with this rank's transports (`offer`), connect, and
    /// assemble.
    #[allow(clippy::too_many_arguments)]
    fn join(
        link: RendezvousLink,
        offer: registry::Offer,
        rank: Rank,
        world: usize,
        local_world: Option<usize>,
        group: String,
        config: Config,
        deadline: Instant,
    ) -> Result<Communicator> {
        let req = JoinRequest {
            group: group.clone(),
            rank,
            world,
            host: HostIdentity::local(),
            endpoints: offer.endpoints(),
        };
        let table = link.client.join(req, deadline)?;
        let abort = AbortSignal::new()?;
        let watch = {
            let sig = abort.clone();
            link.client
                .watch(
                    table.comm,
                    rank,
                    Box::new(move |ev| {
                        // A rank's failure, broadcast by its fatal-error hook (reason "rank R
                        // failed: ..."), is that peer's error here; an explicit abort() is an
                        // abort everywhere.
                        let why = format!("rank {} aborted the communicator: {}", ev.from, ev.reason);
                        if ev.reason.starts_with(&format!("rank {} failed: ", ev.from)) {
                            sig.raise_remote(ev.from, why)
                        } else {
                            sig.raise(why)
                        }
                    }),
                )
                .ok()
        };
        // Ranks on this host, from the peer table (the launcher's LOCAL_WORLD_SIZE may be
        // missing or describe another grouping): it decides between spinning and yielding.
        let me = &table.peers[rank.idx()].host;
        let on_host = table.peers.iter().filter(|p| p.host.same_host(me)).count();
        let spin = tune_host(&config, Some(local_world.unwrap_or(0).max(on_host)));
        let key = link.key.clone();
        let mut comm =
            Communicator::assemble(rank, world, table, offer.transports, config, key, abort, spin, deadline)?;
        let inner = Arc::get_mut(&mut comm.inner).expect("fresh communicator is unshared");
        inner._watch = watch;
        let (client, comm_id) = (link.client.clone(), inner.comm);
        inner.link = Some(link);
        inner.group = group;
        // A fatal error on this rank aborts the communicator everywhere through the
        // rendezvous too (not every rank is connected to this one, and a rank whose part of
        // the call only sends may otherwise finish before hearing of a mismatch). Off the
        // caller's thread: the rendezvous may be gone with a dead rank 0.
        inner.engine.set_on_fatal(Box::new(move |e: &Error| {
            let reason = format!("rank {rank} failed: {e}");
            let _ = std::thread::Builder::new().name("devccl-abort".into()).spawn(move || {
                let _ = client.abort(comm_id, rank, &reason);
            });
        }));
        comm.calibrate()?;
        Ok(comm)
    }

    /// Measure the links and the reduction speed on this communicator and agree on the
    /// numbers (max over ranks), so the cost model reflects this machine and every rank
    /// derives the same plans. Takes a few milliseconds; fixed algorithms, so it cannot
    /// itself depend on the model.
    fn calibrate(&self) -> Result<()> {
        let n = self.world_size();
        if n < 2 || self.inner.config.algo.is_some() {
            return Ok(());
        }
        let rank = self.rank();
        let fixed = |coll: CollKind, algo: Algo, count: usize, chunk: usize| -> (Call, Shape) {
            let shape = Shape { rank, n, count, esize: 4, chunk_bytes: chunk, root: 0 };
            (
                Call {
                    coll,
                    dtype: DType::F32,
                    op: Some(ReduceOp::Sum).filter(|_| coll == CollKind::AllReduce),
                    root: None,
                    count,
                    algo,
                    tag: 0,
                },
                shape,
            )
        };
        let empty = Region::alloc(0);
        let barrier = |times: usize| -> Result<Duration> {
            let t = Instant::now();
            for _ in 0..times {
                let (call, shape) = fixed(CollKind::Barrier, Algo::Dissemination, 0, 64 << 10);
                self.run_schedule(
                    call,
                    |b| crate::algo::build(CollKind::Barrier, Algo::Dissemination, b, shape).expect("barrier"),
                    empty.full(),
                    empty.full(),
                )?;
            }
            Ok(t.elapsed())
        };
        barrier(2)?; // warm up connections
        let rounds = (n as f64).log2().ceil().max(1.0);
        let alpha = barrier(10)?.as_secs_f64() * 1e6 / 10.0 / rounds;
        let count = 256 << 10; // 1 MiB of f32
        let buf = Region::alloc(count * 4);
        let mut best = f64::INFINITY;
        for _ in 0..2 {
            let (call, shape) = fixed(CollKind::AllReduce, Algo::Ring, count, 256 << 10);
            let t = Instant::now();
            self.run_schedule(call, |b| crate::algo::ring::all_reduce(b, shape), buf.full(), buf.full())?;
            best = best.min(t.elapsed().as_secs_f64() * 1e6);
        }
        let gamma = {
            let mut a = vec![1f32; count];
            let b = vec![2f32; count];
            let t = Instant::now();
            devccl_core::op::reduce_in_place(
                DType::F32,
                ReduceOp::Sum,
                bytemuck::cast_slice_mut(&mut a),
                bytemuck::cast_slice(&b),
            )?;
            t.elapsed().as_secs_f64() * 1e9 / (count * 4) as f64
        };
        let (s, nf) = ((count * 4) as f64, n as f64);
        let wire = 2.0 * (nf - 1.0) / nf * s;
        let beta = ((best - 2.0 * (nf - 1.0) * alpha) * 1e3 - (nf - 1.0) / nf * s * gamma) / wire;
        let mut v = [alpha.clamp(0.5, 5000.0), beta.clamp(0.02, 100.0), gamma.clamp(0.01, 10.0)];
        self.all_reduce_fixed_max(&mut v)?;
        let mut m = self.inner.model.lock().unwrap_or_else(|e| e.into_inner());
        m.alpha_us = v[0];
        m.beta_ns = v[1];
        m.gamma_ns = v[2];
        tracing::info!(rank, alpha_us = v[0], beta_ns = v[1], gamma_ns = v[2], "calibrated cost model");
        Ok(())
    }

    /// Max over ranks of a few f64s with a fixed algorithm (recursive doubling).
    fn all_reduce_fixed_max(&self, v: &mut [f64]) -> Result<()> {
        let (rank, n) = (self.rank(), self.world_size());
        let shape = Shape { rank, n, count: v.len(), esize: 8, chunk_bytes: 64 << 10, root: 0 };
        let call = Call {
            coll: CollKind::AllReduce,
            dtype: DType::F64,
            op: Some(ReduceOp::Max),
            root: None,
            count: v.len(),
            algo: Algo::RecursiveDoubling,
            tag: 0,
        };
        Region::scoped(bytemuck::cast_slice_mut(v), |r| {
            self.run_schedule(call, |b| crate::algo::rd::all_reduce(b, shape), r.full(), r.full())
        })
    }

    /// Split into sub-communicators (like `ncclCommSplit` / `MPI_Comm_split`): every rank of
    /// this communicator must call it; ranks with the same `color` form a new communicator,
    /// ordered by `key` (ties by current rank). `color: None` takes part without joining a
    /// new one (returns `Ok(None)`).
    pub fn split(&self, color: Option<u32>, key: i64) -> Result<Option<Communicator>> {
        let link = self.inner.link.as_ref().ok_or_else(|| Error::Unsupported {
            reason: "split needs a rendezvous (this communicator was assembled without one)".into(),
        })?;
        let (rank, n) = (self.rank(), self.world_size());
        // All-gather (color, key) through an all-reduce of a vector that is zero outside
        // this rank's slot.
        let mut v = vec![0i64; 2 * n];
        v[2 * rank] = color.map_or(-1, i64::from);
        v[2 * rank + 1] = key;
        self.all_reduce(&mut v, ReduceOp::Sum)?;
        let seq = self.inner.splits.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let Some(color) = color else { return Ok(None) };
        let mut members: Vec<(i64, usize)> =
            (0..n).filter(|&r| v[2 * r] == i64::from(color)).map(|r| (v[2 * r + 1], r)).collect();
        members.sort_unstable();
        let new_rank = members.iter().position(|&(_, r)| r == rank).expect("this rank has its own color");
        let me = &self.inner.peers[rank].host;
        let local = members.iter().filter(|&&(_, r)| self.inner.peers[r].host.same_host(me)).count();
        let group = format!("{}/split{seq}/color{color}", self.inner.group_base());
        let deadline = Instant::now() + self.inner.config.init_timeout;
        tracing::info!(rank, new_rank, size = members.len(), %group, "split");
        let config = self.inner.config.clone();
        let offer = registry::offer(&config, Rank::from(new_rank), members.len(), link.toward)?;
        Communicator::join(
            link.clone(),
            offer,
            Rank::from(new_rank),
            members.len(),
            Some(local),
            group,
            config,
            deadline,
        )
        .map(Some)
    }

    /// New communicator of the given ranks (in that order), like `torch.distributed.new_group`.
    /// Every rank of this communicator must call it with the same list; ranks outside the
    /// list get `Ok(None)`.
    pub fn split_ranks(&self, ranks: &[usize]) -> Result<Option<Communicator>> {
        let n = self.world_size();
        let mut seen = vec![false; n];
        for &r in ranks {
            if r >= n || std::mem::replace(&mut seen[r], true) {
                return Err(Error::usage(format!("split_ranks: {ranks:?} must be distinct ranks below {n}")));
            }
        }
        match ranks.iter().position(|&r| r == self.rank()) {
            Some(pos) => self.split(Some(0), pos as i64),
            None => self.split(None, 0),
        }
    }

    /// Build a communicator from a finished rendezvous and activated-to-be transports
    /// (also used by the in-memory mesh in tests).
    #[allow(clippy::too_many_arguments)]
    pub fn assemble(
        rank: Rank,
        world: usize,
        table: PeerTable,
        transports: Vec<Arc<dyn Transport>>,
        config: Config,
        key: Option<AuthKey>,
        abort: Arc<AbortSignal>,
        spin: Spin,
        deadline: Instant,
    ) -> Result<Communicator> {
        if table.peers.len() != world {
            return Err(Error::Internal(format!("peer table has {} entries for world {world}", table.peers.len())));
        }
        for t in &transports {
            t.activate(CommContext { comm: table.comm, rank, world, key: key.clone() })?;
        }
        let mut conns: Vec<Option<Box<dyn Connection>>> = (0..world).map(|_| None).collect();
        let r = rank.idx();
        // Lower rank connects, higher accepts: connect to every higher rank first (the peers'
        // acceptors answer in the background), then collect the lower ranks' connections.
        let order: Vec<usize> = ((r + 1)..world).chain(0..r).collect();
        for p in order {
            let kind = pair_kind(&table, r, p).ok_or_else(|| {
                Error::usage(format!("rank {r} and rank {p} share no transport; check DEVCCL_TRANSPORTS on both"))
            })?;
            let t = transports
                .iter()
                .find(|t| t.kind() == kind)
                .ok_or_else(|| Error::Internal(format!("no local {kind} transport")))?;
            let conn = if p > r {
                let ep = table.peers[p].endpoints.iter().find(|e| e.kind == kind).expect("pair_kind checked");
                t.connect(Rank::from(p), ep, deadline)?
            } else {
                t.accept(Rank::from(p), deadline)?
            };
            match devmem_not_used(&table, r, p, kind) {
                None => tracing::info!(rank = r, peer = p, transport = %kind, "connected"),
                Some(why) => tracing::info!(rank = r, peer = p, transport = %kind, "connected; devmem not used: {why}"),
            }
            conns[p] = Some(conn);
        }
        let forced = match config.algo.as_deref() {
            Some(spec) => AlgoOverride::parse(spec).map_err(Error::usage)?,
            None => AlgoOverride::default(),
        };
        let model = LinkModel::from_transports(&transports);
        let device_reach = conns.iter().map(|c| c.as_deref().map(reached_devices).unwrap_or_default()).collect();
        let peer_kinds = conns.iter().map(|c| c.as_ref().map(|c| c.kind())).collect();
        let exec = Executor::new(rank, world, conns, config.timeout, spin, abort.clone());
        let engine = Engine::new(exec);
        Ok(Communicator {
            inner: Arc::new(Inner {
                rank,
                world,
                comm: table.comm,
                group: table.group.clone(),
                config,
                engine,
                abort,
                transports,
                peers: table.peers,
                forced,
                model: std::sync::Mutex::new(model),
                device_reach,
                peer_kinds,
                logged: Default::default(),
                link: None,
                _watch: None,
                splits: Default::default(),
            }),
        })
    }

    /// This rank.
    pub fn rank(&self) -> usize {
        self.inner.rank.idx()
    }

    /// Number of ranks.
    pub fn world_size(&self) -> usize {
        self.inner.world
    }

    /// The communicator's id (same on every rank).
    pub fn comm_id(&self) -> CommId {
        self.inner.comm
    }

    /// The rendezvous group name.
    pub fn group(&self) -> &str {
        &self.inner.group
    }

    /// The settings in force.
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// Host identity of every rank (index = rank).
    pub fn peers(&self) -> &[PeerInfo] {
        &self.inner.peers
    }

    pub(crate) fn engine(&self) -> &Arc<Engine> {
        &self.inner.engine
    }

    /// Diagnostic counters of this rank's transports, `kind.name` (e.g.
    /// `tcp.rejected_handshakes`, `devmem.rx_fragments`, `devmem.tokens_outstanding`): each
    /// transport sums over its connections; a name two transports share is summed.
    pub fn transport_counters(&self) -> Vec<(String, u64)> {
        let mut out: Vec<(String, u64)> = Vec::new();
        for t in &self.inner.transports {
            for (k, v) in t.counters() {
                let name = format!("{}.{k}", t.kind());
                match out.iter_mut().find(|(n, _)| *n == name) {
                    Some((_, x)) => *x += v,
                    None => out.push((name, v)),
                }
            }
        }
        out
    }

    /// The kinds of transport the connections to the other ranks use (index = rank; `None`
    /// for this rank).
    pub fn peer_transports(&self) -> &[Option<TransportKind>] {
        &self.inner.peer_kinds
    }

    /// Why the communicator is unusable, if it is.
    pub fn poisoned(&self) -> Option<String> {
        self.inner.engine.poisoned()
    }

    /// Abort: fail the collective in progress (on this rank promptly, on the others through
    /// the rendezvous and the data connections) and poison the communicator. Never blocks on
    /// the collective in progress.
    pub fn abort(&self, reason: &str) {
        let why = format!("rank {} called abort: {reason}", self.inner.rank);
        self.inner.engine.poison_with(&why);
        self.inner.abort.raise(why.clone());
        if let Some(l) = &self.inner.link {
            let _ = l.client.abort(self.inner.comm, self.inner.rank, reason);
        }
    }

    /// Run one collective described by `call` with the schedule `build` writes, on `input`
    /// and `output` (the same slice for in-place calls). Every collective of this crate goes
    /// through here; it is public so custom algorithms can be run (and tested) too. Fatal
    /// errors poison the communicator.
    pub fn run_schedule(
        &self,
        call: Call,
        build: impl FnOnce(&mut Builder),
        input: RegionSlice,
        output: RegionSlice,
    ) -> Result<()> {
        self.inner.engine.check_alive()?;
        self.inner.engine.run_blocking(self.job(call, build, input, output)?)
    }

    /// Like [`Communicator::run_schedule`], but queued for the progress thread: returns at
    /// once with a [`Work`] handle. The regions stay alive until the work finishes.
    pub fn submit_schedule(
        &self,
        call: Call,
        build: impl FnOnce(&mut Builder),
        input: RegionSlice,
        output: RegionSlice,
    ) -> Work<()> {
        if let Err(e) = self.inner.engine.check_alive() {
            return Work::failed(e);
        }
        let job = match self.job(call, build, input, output) {
            Ok(j) => j,
            Err(e) => return Work::failed(e),
        };
        let done = job.done.clone();
        self.inner.engine.submit(job);
        Work::new(done, || Ok(()))
    }

    /// Rewrite a schedule on device memory for the peers whose connections cannot reach it
    /// (see [`crate::lower`]); host schedules are returned unchanged.
    pub(crate) fn lower_for(&self, sched: crate::schedule::Schedule, device: DeviceId) -> crate::schedule::Schedule {
        lower_with(sched, device, &self.inner.device_reach, self.inner.config.staging_slots)
    }

    /// [`Communicator::lower_for`] as a function that outlives this handle, for schedules
    /// built later on the progress thread (a receive from any rank, once its source is known).
    pub(crate) fn lowering(
        &self,
    ) -> impl Fn(crate::schedule::Schedule, DeviceId) -> crate::schedule::Schedule + Send + 'static {
        let (reach, slots) = (self.inner.device_reach.clone(), self.inner.config.staging_slots);
        move |sched, device| lower_with(sched, device, &reach, slots)
    }

    pub(crate) fn job(
        &self,
        call: Call,
        build: impl FnOnce(&mut Builder),
        input: RegionSlice,
        output: RegionSlice,
    ) -> Result<Job> {
        let info = CallInfo {
            coll: call.coll,
            dtype: call.dtype,
            op: call.op,
            root: call.root.map(Rank::from),
            count: call.count as u64,
            seq: devccl_core::Seq(0), // assigned when it runs
            algo: call.algo as u8,
            tag: call.tag,
        };
        let device = device_of(&[&input, &output])?;
        let mut b = Builder::new();
        build(&mut b);
        let sched = self.lower_for(b.build(), device.id());
        let bindings = if device.id().is_host() {
            let scratch = sched.scratch.iter().map(|&n| Region::alloc(n).full()).collect();
            Bindings::host(input, output, scratch)
        } else {
            // Scratch and staging come from the executor's device buffer cache.
            Bindings { input, output, scratch: Vec::new(), staging: Vec::new(), device }
        };
        Ok(Job::new(sched, vec![info], bindings))
    }

    /// Wait for every queued collective, then destroy the communicator (leave the
    /// rendezvous, close connections). Dropping the last handle does the same.
    pub fn destroy(self) -> Result<()> {
        if !self.inner.engine.drain(Instant::now() + self.inner.config.timeout) {
            return Err(Error::Timeout {
                what: "destroy: queued collectives did not finish".into(),
                after: self.inner.config.timeout,
            });
        }
        Ok(())
    }

    /// In-place all-reduce: every rank ends with the reduction of every rank's `buf`.
    pub fn all_reduce<T: Element>(&self, buf: &mut [T], op: ReduceOp) -> Result<()> {
        self.collective_in_place(&Collective::AllReduce { op }, buf)
    }

    /// Out-of-place all-reduce: `recv` gets the reduction of every rank's `send`.
    pub fn all_reduce_into<T: Element>(&self, send: &[T], recv: &mut [T], op: ReduceOp) -> Result<()> {
        self.collective_into(&Collective::AllReduce { op }, send, recv)
    }

    /// Asynchronous in-place all-reduce: takes the buffer, returns it reduced from `wait`.
    pub fn all_reduce_async<T: Element>(&self, buf: Vec<T>, op: ReduceOp) -> Work<Vec<T>> {
        self.collective_vec_async(&Collective::AllReduce { op }, buf, None)
    }

    /// All-reduce over regions. `input` and `output` may be the same slice (in place).
    pub fn all_reduce_regions(
        &self,
        input: RegionSlice,
        output: RegionSlice,
        dtype: DType,
        op: ReduceOp,
    ) -> Result<()> {
        self.collective(&Collective::AllReduce { op }, dtype, input, output)
    }

    /// The plan for `coll` over `bytes` and the model's estimate for every candidate, as one
    /// line (for `devccl bench --explain`).
    pub fn explain(&self, coll: CollKind, bytes: usize) -> String {
        let plan = self.plan(coll, bytes);
        let model = *self.inner.model.lock().unwrap_or_else(|e| e.into_inner());
        let alts: Vec<String> = select::candidates(&model, coll, self.world_size(), bytes, plan.chunk)
            .into_iter()
            .map(|(a, t)| format!("{a}={t:.1}us"))
            .collect();
        format!(
            "{plan}; candidates: {}; model alpha={:.2}us beta={:.3}ns/B gamma={:.3}ns/B",
            alts.join(" "),
            model.alpha_us,
            model.beta_ns,
            model.gamma_ns
        )
    }

    /// The plan the cost model (or an override) picks for `coll` over `bytes` (see
    /// [`select::cost`] for what `bytes` means per collective). Logged at `info` the first
    /// time each (collective, size) is seen.
    pub fn plan(&self, coll: CollKind, bytes: usize) -> Plan {
        let n = self.world_size();
        let model = *self.inner.model.lock().unwrap_or_else(|e| e.into_inner());
        let plan = select::plan_with(&self.inner.config, &self.inner.forced, &model, coll, n, bytes);
        if tracing::enabled!(tracing::Level::INFO) {
            let mut seen = self.inner.logged.lock().unwrap_or_else(|e| e.into_inner());
            if seen.insert((coll, bytes)) {
                let alts: Vec<String> = select::candidates(&model, coll, n, bytes, plan.chunk)
                    .into_iter()
                    .map(|(a, t)| format!("{a} {t:.1}us"))
                    .collect();
                tracing::info!(
                    rank = self.rank(),
                    "{} {bytes} B on {n} ranks: {plan} [model: {}]",
                    coll.name(),
                    alts.join(", ")
                );
            }
        }
        plan
    }
}
