//! The gRPC rendezvous (bootstrap): how the ranks of a communicator find each other.
//!
//! Rank 0 hosts a [`RendezvousServer`] by default (at `MASTER_ADDR:MASTER_PORT` or
//! `DEVCCL_RENDEZVOUS`); `devccl rendezvous --listen ADDR --world N` runs one standalone for
//! multi-node jobs. Every rank uses a [`RendezvousClient`] to [`join`](RendezvousClient::join) a
//! named group with its rank, its [`HostIdentity`] and one [`Endpoint`] per transport, and gets
//! back the full [`PeerTable`] once every rank of the group has joined. The same service carries
//! the communicator-wide [`abort`](RendezvousClient::abort) signal (delivered to every
//! [`watch`](RendezvousClient::watch)er) and the clean [`leave`](RendezvousClient::leave) at
//! destroy time. The wire protocol is `devccl.bootstrap.v1` in the `devccl-proto` crate.
//!
//! # Groups
//!
//! A group is created by its first join. Its world size is fixed by that joiner, except for the
//! group [`WORLD_GROUP`] when the server was started with [`ServerOptions::world`]. When every
//! rank `0..world` has joined, the server mints a random [`CommId`], answers every member with
//! the same table, and forgets the group *name* (so the name can be reused by a later
//! communicator, e.g. a restarted job on a standalone server); the communicator itself is kept
//! (for abort and watch) until every rank has [left](RendezvousClient::leave) it.
//!
//! A group fails, for every member waiting in it, when
//! - two live processes claim the same rank (the error names both hosts and pids),
//! - a joiner's world size differs from the group's (or from the server's `--world`),
//! - a joiner's rank is not below its world size (that joiner gets
//!   [`Error::InvalidUsage`], the others [`Error::Remote`]),
//! - a process proves the wrong `DEVCCL_SECRET` (or has one where the server has none, or the
//!   other way round): the offender is told its secret does not match, the waiters are told
//!   that "a process at ADDR tried to join group 'g' as rank R with a wrong DEVCCL_SECRET",
//! - the group is not complete within [`ServerOptions::group_timeout`] of its first join
//!   ([`Error::Timeout`] naming the missing ranks).
//!
//! **How a failed group is reset.** A failed group stays failed — later joiners of that name get
//! the same error at once instead of waiting for a group that cannot complete — until every
//! rank `0..world` has been told (members waiting at the time of the failure count as told), or
//! until `group_timeout` has passed since the failure. After that a join with the same name
//! starts a fresh group.
//!
//! A member whose own deadline passes gets a timeout naming the missing ranks (shortly before
//! its deadline, so the answer arrives in time) and leaves the group; so does a member whose
//! connection closes. Its rank may then join again without being a duplicate.
//!
//! # Secret
//!
//! The secret never travels: every request is signed with an HMAC tag ([`AuthKey::tag`]) over
//! a single-use server nonce (from a `Challenge` call, valid [`CHALLENGE_TTL`]), a client nonce
//! and the exact request bytes. The server signs the peer table and abort events over the
//! client's nonce, so a client detects a rogue server that does not know the secret.
//!
//! # Threads
//!
//! Everything runs on one shared multi-thread [`runtime`] (two workers named `devccl-rt`).
//! The blocking calls of this module may be made from any thread, including from inside an
//! async context: there they hand the work to the shared runtime and wait on a channel with a
//! bounded wait instead of nesting `block_on`.

mod client;
mod codec;
mod server;

use std::fmt;
use std::future::Future;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::auth::AuthKey;
use crate::error::{Error, Result};
use crate::transport::Endpoint;
use crate::types::{CommId, Rank};

pub use client::{RendezvousClient, WatchHandle};
pub use server::RendezvousServer;

/// The name of the group every rank of a job joins first.
pub const WORLD_GROUP: &str = "world";

/// How long a server nonce from `Challenge` stays valid.
pub const CHALLENGE_TTL: Duration = Duration::from_secs(30);

/// Default [`ServerOptions::group_timeout`] (the default `DEVCCL_INIT_TIMEOUT`).
pub const DEFAULT_GROUP_TIMEOUT: Duration = Duration::from_secs(120);

/// How long [`RendezvousClient::abort`], [`RendezvousClient::leave`] and opening a
/// [`RendezvousClient::watch`] may take before they give up with [`Error::Timeout`].
pub const CONTROL_TIMEOUT: Duration = Duration::from_secs(3);

/// Who a process is, and on which boot of which machine it runs.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HostIdentity {
    /// The host name (`gethostname`).
    pub hostname: String,
    /// `/proc/sys/kernel/random/boot_id` (empty where unavailable): two containers or VMs with
    /// the same host name but different kernels differ here.
    pub boot_id: String,
    /// Process id.
    pub pid: u32,
}

impl HostIdentity {
    /// This process.
    pub fn local() -> HostIdentity {
        let hostname = nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "unknown-host".to_string());
        let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .map(|s| s.trim().to_string())
            .unwrap_or_default();
        HostIdentity { hostname, boot_id, pid: std::process::id() }
    }

    /// True when both processes run on the same machine and boot (same host name and boot
    /// id), so host-local transports such as shared memory can connect them.
    pub fn same_host(&self, o: &HostIdentity) -> bool {
        self.hostname == o.hostname && self.boot_id == o.boot_id
    }
}

impl fmt::Display for HostIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "host {} pid {}", self.hostname, self.pid)
    }
}

/// What a rank sends to join a group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinRequest {
    /// Group name: [`WORLD_GROUP`] for the first communicator; splits use other names.
    pub group: String,
    /// This rank within the group.
    pub rank: Rank,
    /// The group's size as this rank believes it.
    pub world: usize,
    /// This process.
    pub host: HostIdentity,
    /// One listen address per transport, with its capabilities.
    pub endpoints: Vec<Endpoint>,
}

/// One member of a finished group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerInfo {
    /// Its rank.
    pub rank: Rank,
    /// Its process and host.
    pub host: HostIdentity,
    /// Its transports' listen addresses (endpoints of transports this build does not know are
    /// left out).
    pub endpoints: Vec<Endpoint>,
}

/// The answer to a join: every member of the group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerTable {
    /// Minted by the server, random, the same for every member.
    pub comm: CommId,
    /// The group's name.
    pub group: String,
    /// All members; index == rank.
    pub peers: Vec<PeerInfo>,
}

impl PeerTable {
    /// The group's size.
    pub fn world(&self) -> usize {
        self.peers.len()
    }

    /// The entry of `rank`.
    pub fn peer(&self, rank: Rank) -> Option<&PeerInfo> {
        self.peers.get(rank.idx())
    }
}

/// A communicator was aborted by one of its ranks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AbortEvent {
    /// The communicator.
    pub comm: CommId,
    /// The rank that called abort.
    pub from: Rank,
    /// The reason it gave.
    pub reason: String,
}

/// Settings of a [`RendezvousServer`].
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// Expected size of the group [`WORLD_GROUP`] (standalone server `--world N`, or rank 0's
    /// world size). `None`: fixed by the first joiner, like every other group.
    pub world: Option<usize>,
    /// Shared-secret key (`DEVCCL_SECRET`); `None`: only clients without a secret may join.
    pub key: Option<AuthKey>,
    /// A group not complete this long after its first join fails for everyone waiting, naming
    /// the missing ranks. Also how long a failed group keeps answering with its error.
    pub group_timeout: Duration,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions { world: None, key: None, group_timeout: DEFAULT_GROUP_TIMEOUT }
    }
}

/// The one shared runtime of devccl (multi-thread, two workers named `devccl-rt`), created on
/// first use. The rendezvous server, its clients and watch subscriptions run on it.
///
/// # Panics
///
/// When the runtime cannot be created (the OS refuses to start threads).
pub fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("devccl-rt")
            .enable_all()
            .build()
            .expect("devccl: cannot start the tokio runtime (thread creation failed)")
    })
}

/// Run `fut` to completion on the shared runtime and wait for it from a blocking caller.
///
/// Outside an async context this is `runtime().block_on`. Inside one (a tokio runtime of the
/// caller's, or an `on_abort` callback on a `devccl-rt` worker) `block_on` would panic, so the
/// future is spawned on the shared runtime and this thread waits on a channel, for at most
/// until `backstop` (the future must enforce its own, earlier deadline; the backstop only
/// guards against a runtime whose workers are all blocked).
pub(crate) fn block_on<T, F>(fut: F, backstop: Instant, what: impl FnOnce() -> String) -> Result<T>
where
    T: Send + 'static,
    F: Future<Output = Result<T>> + Send + 'static,
{
    if tokio::runtime::Handle::try_current().is_err() {
        return runtime().block_on(fut);
    }
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    let started = Instant::now();
    let task = runtime().spawn(async move {
        let _ = tx.send(fut.await);
    });
    let wait = backstop.saturating_duration_since(started) + Duration::from_millis(500);
    match rx.recv_timeout(wait) {
        Ok(r) => r,
        Err(_) => {
            task.abort();
            Err(Error::Timeout {
                what: format!("{} (the devccl runtime did not run it; is every devccl-rt worker blocked?)", what()),
                after: started.elapsed(),
            })
        }
    }
}

/// Convert a std deadline for tokio.
pub(crate) fn tokio_deadline(deadline: Instant) -> tokio::time::Instant {
    tokio::time::Instant::from_std(deadline)
}
