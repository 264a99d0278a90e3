//! The rendezvous server: groups, communicators and their abort flags, behind one mutex.
//!
//! Handlers never hold the mutex across an `.await`. A joiner waits on a oneshot channel that
//! the completing (or failing) join fills for every member at once.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use devccl_proto::bootstrap::v1 as pb;
use pb::rendezvous_server::{Rendezvous, RendezvousServer as RendezvousService};
use prost::Message;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::MetadataMap;
use tonic::transport::server::TcpIncoming;
use tonic::{Code, Request, Response, Status};

use super::codec::{
    DOMAIN_ABORT, DOMAIN_ABORT_EVENT, DOMAIN_JOIN, DOMAIN_JOIN_REPLY, DOMAIN_LEAVE, DOMAIN_WATCH, FAULT_RANK_KEY,
    MAX_WORLD, TIMEOUT_MS_KEY, fmt_ranks, host_from_pb, host_to_pb,
};
use super::{CHALLENGE_TTL, HostIdentity, ServerOptions, WORLD_GROUP, block_on, runtime, tokio_deadline};
use crate::auth::{self, tag_opt, verify_opt};
use crate::error::{Error, Result};
use crate::types::CommId;

/// Outstanding challenge nonces a server keeps at most.
const MAX_NONCES: usize = 1 << 16;
/// Groups (forming or failed) a server keeps at most.
const MAX_GROUPS: usize = 1 << 14;
/// Longest abort reason kept, in bytes.
const MAX_REASON: usize = 4096;
/// How long shutting down waits for connections to close before it stops serving them.
const SHUTDOWN_GRACE: Duration = Duration::from_millis(250);

/// The rendezvous server. It runs on the shared [`runtime`](super::runtime); dropping it (or
/// [`shutdown`](RendezvousServer::shutdown)) fails every group still forming with "the server is
/// shutting down", ends every watch stream, and closes the listening socket.
#[derive(Debug)]
pub struct RendezvousServer {
    local: SocketAddr,
    shared: Arc<Shared>,
    stop_tx: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<std::result::Result<(), tonic::transport::Error>>>,
}

impl RendezvousServer {
    /// Listen on `listen` (`host:port`; port 0 picks a free port; IPv6 as `[::1]:0`) and serve.
    ///
    /// Errors: [`Error::InvalidUsage`] for an address that is not `host:port` or bad options,
    /// [`Error::System`] when the address cannot be resolved or bound (e.g. the port is in use).
    pub fn start(listen: &str, opts: ServerOptions) -> Result<RendezvousServer> {
        if opts.group_timeout.is_zero() {
            return Err(Error::usage("rendezvous server: group_timeout must be positive"));
        }
        if let Some(w) = opts.world
            && !(1..=MAX_WORLD as usize).contains(&w)
        {
            return Err(Error::usage(format!("rendezvous server: world size {w} is not in 1..={MAX_WORLD}")));
        }
        let addrs: Vec<SocketAddr> = listen
            .to_socket_addrs()
            .map_err(|e| {
                if e.kind() == std::io::ErrorKind::InvalidInput {
                    Error::usage(format!("rendezvous listen address {listen:?} is not host:port ({e})"))
                } else {
                    Error::system(format!("resolving the rendezvous listen address {listen:?}"), e)
                }
            })?
            .collect();
        let mut last_err = None;
        let mut bound = None;
        for a in &addrs {
            match std::net::TcpListener::bind(a) {
                Ok(l) => {
                    bound = Some(l);
                    break;
                }
                Err(e) => last_err = Some(e),
            }
        }
        let Some(std_listener) = bound else {
            return Err(match last_err {
                Some(e) => Error::system(format!("binding the rendezvous server to {listen}"), e),
                None => Error::usage(format!("rendezvous listen address {listen:?} resolves to no address")),
            });
        };
        let ctx = || format!("setting up the rendezvous listener on {listen}");
        std_listener.set_nonblocking(true).map_err(|e| Error::system(ctx(), e))?;
        let local = std_listener.local_addr().map_err(|e| Error::system(ctx(), e))?;
        let listener = {
            let _rt = runtime().enter();
            tokio::net::TcpListener::from_std(std_listener).map_err(|e| Error::system(ctx(), e))?
        };
        let incoming =
            TcpIncoming::from(listener).with_nodelay(Some(true)).with_keepalive(Some(Duration::from_secs(30)));
        let shared = Arc::new(Shared { opts, local, next_id: AtomicU64::new(1), state: Mutex::new(State::default()) });
        let service = RendezvousService::new(Service { shared: Arc::clone(&shared) });
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let router = tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(Duration::from_secs(10)))
            .http2_keepalive_timeout(Some(Duration::from_secs(20)))
            .add_service(service);
        let task = runtime().spawn(router.serve_with_incoming_shutdown(incoming, async move {
            let _ = stop_rx.await;
        }));
        tracing::info!(addr = %local, world = ?shared.opts.world, secret = shared.opts.key.is_some(), "rendezvous server listening");
        Ok(RendezvousServer { local, shared, stop_tx: Some(stop_tx), task: Some(task) })
    }

    /// The address the server listens on (with the port chosen when 0 was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Before shutting down an embedded server: wait (at most `max`) until no group is still
    /// forming and every rank has left every communicator formed here, so ranks that are
    /// still using it (joining a split, watching for aborts) are not cut off because the
    /// hosting rank finished first. Returns early when the server is idle.
    pub fn linger(&self, max: Duration) {
        let deadline = Instant::now() + max;
        loop {
            let busy = {
                let st = self.shared.state.lock().unwrap_or_else(|e| e.into_inner());
                !st.comms.is_empty() || st.groups.values().any(|g| matches!(g, Group::Forming(_)))
            };
            if !busy || Instant::now() >= deadline {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Rank `rank` of this process failed before it could join `group` of `world` ranks (its
    /// own set-up: no usable transport, ...): fail the group, so the ranks waiting in it, and
    /// those still to come, hear why at once rather than at their init deadline. Follow with
    /// [`settle`](Self::settle) before the process exits.
    pub fn fail_group(&self, group: &str, world: usize, rank: u32, reason: &str) {
        let failure = Failure::new(
            Code::Aborted,
            format!("rank {rank} failed before joining group '{group}': {reason}"),
            Some(rank),
        );
        let mut st = self.shared.state.lock().unwrap_or_else(|e| e.into_inner());
        st.fail_group(group, &failure, world as u32, Some(rank), self.shared.opts.group_timeout);
    }

    /// After `group` failed: wait (at most until `deadline`) until every rank has been told
    /// why, so the process hosting the server can exit without leaving the others to find a
    /// closed port instead of the reason. Returns at once when the group is not failed.
    pub fn settle(&self, group: &str, deadline: Instant) {
        loop {
            let pending = {
                let st = self.shared.state.lock().unwrap_or_else(|e| e.into_inner());
                matches!(st.groups.get(group), Some(Group::Failed(f)) if f.expires > Instant::now())
            };
            if !pending || Instant::now() >= deadline {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stop serving: groups still forming fail with "the server is shutting down", watch
    /// streams end, the listening socket closes. Waits at most a quarter second for open
    /// connections to close.
    pub fn shutdown(mut self) {
        self.stop();
    }

    /// Serve until SIGINT (ctrl-c) or SIGTERM, then shut down (for the standalone
    /// `devccl rendezvous`). Must be called from a plain thread, not from async code.
    ///
    /// Errors: [`Error::InvalidUsage`] from async code; [`Error::System`] when the signal
    /// handlers cannot be installed; [`Error::Internal`] when the server stopped by itself.
    pub fn serve_forever(mut self) -> Result<()> {
        if tokio::runtime::Handle::try_current().is_ok() {
            return Err(Error::usage(
                "RendezvousServer::serve_forever blocks until a signal; call it from a plain thread, not from async code",
            ));
        }
        let Some(mut task) = self.task.take() else {
            return Err(Error::Internal("rendezvous server: serve_forever on a stopped server".into()));
        };
        let local = self.local;
        let outcome = runtime().block_on(async move {
            use tokio::signal::unix::{SignalKind, signal};
            let mut term = match signal(SignalKind::terminate()) {
                Ok(t) => t,
                Err(e) => {
                    return (Some(task), Err(Error::system("installing the SIGTERM handler", e)));
                }
            };
            tokio::select! {
                r = tokio::signal::ctrl_c() => match r {
                    Ok(()) => {
                        tracing::info!(addr = %local, "rendezvous server: SIGINT, shutting down");
                        (Some(task), Ok(()))
                    }
                    Err(e) => (Some(task), Err(Error::system("installing the SIGINT handler", e))),
                },
                _ = term.recv() => {
                    tracing::info!(addr = %local, "rendezvous server: SIGTERM, shutting down");
                    (Some(task), Ok(()))
                }
                r = &mut task => {
                    let why = match r {
                        Ok(Ok(())) => "stopped serving".to_string(),
                        Ok(Err(e)) => format!("failed: {}", error_chain(&e)),
                        Err(e) => format!("task ended: {e}"),
                    };
                    (None, Err(Error::Internal(format!("rendezvous server on {local} {why}"))))
                }
            }
        });
        let (task, result) = outcome;
        self.task = task;
        self.stop();
        result
    }

    fn stop(&mut self) {
        self.shared.close();
        if let Some(tx) = self.stop_tx.take() {
            let _ = tx.send(());
        }
        let Some(task) = self.task.take() else { return };
        let abort = task.abort_handle();
        let until = Instant::now() + SHUTDOWN_GRACE;
        let closed = block_on(
            async move { Ok(tokio::time::timeout_at(tokio_deadline(until), task).await.is_ok()) },
            until,
            || "stopping the rendezvous server".to_string(),
        );
        if !matches!(closed, Ok(true)) {
            abort.abort();
            tracing::debug!(addr = %self.local, "rendezvous server: connections still open after the grace period; stopped anyway");
        }
        tracing::info!(addr = %self.local, "rendezvous server stopped");
    }
}

impl Drop for RendezvousServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `outer: inner: innermost` for an error and its sources.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.ends_with(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}

/// A process that joined (or tried to).
#[derive(Debug, Clone)]
struct Who {
    rank: u32,
    host: HostIdentity,
    peer: Option<SocketAddr>,
}

impl Who {
    /// `rank 3 (host h pid 123)`.
    fn describe(&self) -> String {
        format!("rank {} ({})", self.rank, self.host)
    }

    /// `host h pid 123 from 10.0.0.2:41234`.
    fn origin(&self) -> String {
        format!("{} from {}", self.host, peer_str(self.peer))
    }
}

fn peer_str(p: Option<SocketAddr>) -> String {
    p.map_or_else(|| "an unknown address".to_string(), |a| a.to_string())
}

/// Why a group or a request failed, as sent to clients.
#[derive(Debug, Clone)]
struct Failure {
    code: Code,
    message: String,
    fault: Option<u32>,
    /// For timeouts: the limit that passed.
    after: Option<Duration>,
}

impl Failure {
    fn new(code: Code, message: impl Into<String>, fault: Option<u32>) -> Failure {
        Failure { code, message: message.into(), fault, after: None }
    }

    fn timeout(message: impl Into<String>, after: Duration) -> Failure {
        Failure { code: Code::DeadlineExceeded, message: message.into(), fault: None, after: Some(after) }
    }

    fn status(&self) -> Status {
        let mut md = MetadataMap::new();
        if let Some(r) = self.fault
            && let Ok(v) = r.to_string().parse()
        {
            md.insert(FAULT_RANK_KEY, v);
        }
        if let Some(after) = self.after
            && let Ok(v) = after.as_millis().to_string().parse()
        {
            md.insert(TIMEOUT_MS_KEY, v);
        }
        Status::with_metadata(self.code, self.message.clone(), md)
    }
}

/// What a waiting joiner receives: the encoded table, or the group's failure.
type Outcome = std::result::Result<Arc<Vec<u8>>, Failure>;

#[derive(Debug)]
struct Member {
    who: Who,
    token: u64,
    endpoints: Vec<pb::Endpoint>,
    tx: oneshot::Sender<Outcome>,
}

#[derive(Debug)]
struct Forming {
    generation: u64,
    world: u32,
    opener: Who,
    members: BTreeMap<u32, Member>,
    /// Ranks that joined, then stopped waiting (deadline or closed connection).
    departed: BTreeMap<u32, Who>,
    timer: tokio::task::AbortHandle,
}

impl Forming {
    /// `3 of 4 ranks joined; missing ranks [2]`.
    fn summary(&self) -> String {
        let joined: BTreeSet<u32> = self.members.keys().chain(self.departed.keys()).copied().collect();
        let missing = (0..self.world).filter(|r| !joined.contains(r));
        let mut s = format!("{} of {} ranks joined; missing ranks {}", joined.len(), self.world, fmt_ranks(missing));
        if !self.departed.is_empty() {
            s.push_str(&format!("; ranks {} joined but stopped waiting", fmt_ranks(self.departed.keys().copied())));
        }
        s
    }
}

#[derive(Debug)]
struct Failed {
    failure: Failure,
    /// The group's world size; 0 when unknown (only the expiry resets the group).
    world: u32,
    told: BTreeSet<u32>,
    expires: Instant,
}

#[derive(Debug)]
enum Group {
    Forming(Forming),
    Failed(Failed),
}

#[derive(Debug, Clone)]
struct AbortRecord {
    from: u32,
    reason: String,
}

#[derive(Debug)]
struct CommRecord {
    group: String,
    world: u32,
    /// Ranks that have not left yet.
    remaining: BTreeSet<u32>,
    abort: watch::Sender<Option<AbortRecord>>,
}

#[derive(Debug, Default)]
struct State {
    closed: bool,
    nonces: HashMap<[u8; 16], Instant>,
    groups: HashMap<String, Group>,
    comms: HashMap<CommId, CommRecord>,
}

impl State {
    fn purge(&mut self, now: Instant) {
        self.groups.retain(|_, g| !matches!(g, Group::Failed(f) if f.expires <= now));
        if self.nonces.len() > 1024 {
            self.nonces.retain(|_, exp| *exp > now);
        }
    }

    /// Fail `name` for everyone waiting in it and remember the failure (see the module docs
    /// for when it is forgotten). A group that already failed keeps its first failure.
    fn fail_group(
        &mut self,
        name: &str,
        failure: &Failure,
        world_if_new: u32,
        offender: Option<u32>,
        linger: Duration,
    ) {
        let (world, mut told) = match self.groups.remove(name) {
            Some(Group::Forming(g)) => {
                g.timer.abort();
                let mut told: BTreeSet<u32> = g.departed.keys().copied().collect();
                for (r, m) in g.members {
                    let _ = m.tx.send(Err(failure.clone()));
                    told.insert(r);
                }
                (g.world, told)
            }
            Some(failed @ Group::Failed(_)) => {
                self.groups.insert(name.to_string(), failed);
                return;
            }
            None => (world_if_new, BTreeSet::new()),
        };
        tracing::warn!("{}", failure.message);
        if let Some(r) = offender.filter(|&r| r < world) {
            told.insert(r);
        }
        if world > 0 && told.len() == world as usize {
            return;
        }
        if self.groups.len() >= MAX_GROUPS {
            return;
        }
        let failed = Failed { failure: failure.clone(), world, told, expires: Instant::now() + linger };
        self.groups.insert(name.to_string(), Group::Failed(failed));
    }

    /// A joiner of a failed group: its error, and forget the group once everyone was told.
    fn tell_failed(&mut self, name: &str, rank: u32) -> Option<Failure> {
        let Some(Group::Failed(f)) = self.groups.get_mut(name) else {
            return None;
        };
        if rank < f.world {
            f.told.insert(rank);
        }
        let failure = f.failure.clone();
        if f.world > 0 && f.told.len() == f.world as usize {
            self.groups.remove(name);
            tracing::debug!(
                group = name,
                "rendezvous: every rank was told of the failure; the group name is free again"
            );
        }
        Some(failure)
    }

    /// Remove a waiting member (its deadline passed or its connection closed).
    fn depart(&mut self, name: &str, rank: u32, token: u64) -> bool {
        let Some(Group::Forming(g)) = self.groups.get_mut(name) else {
            return false;
        };
        if g.members.get(&rank).map(|m| m.token) != Some(token) {
            return false;
        }
        if let Some(m) = g.members.remove(&rank) {
            g.departed.insert(rank, m.who);
        }
        if g.members.is_empty() {
            g.timer.abort();
            self.groups.remove(name);
        }
        true
    }
}

/// Why a signed request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AuthProblem {
    /// The server nonce is unknown, used or expired.
    BadNonce,
    /// Both sides have a secret, and they differ.
    Wrong,
    /// The server has a secret; the client has none.
    ClientHasNone,
    /// The client has a secret; the server has none.
    ServerHasNone,
}

impl AuthProblem {
    /// For the refused process.
    fn for_offender(self) -> &'static str {
        match self {
            AuthProblem::BadNonce => {
                "its challenge nonce is unknown, used or expired (the request must follow its challenge within 30 s)"
            }
            AuthProblem::Wrong => "its DEVCCL_SECRET does not match the rendezvous server's",
            AuthProblem::ClientHasNone => {
                "the rendezvous server requires DEVCCL_SECRET but this process has none set (secret mismatch)"
            }
            AuthProblem::ServerHasNone => {
                "this process has DEVCCL_SECRET set but the rendezvous server has none (secret mismatch)"
            }
        }
    }

    /// For the others, after "with a wrong DEVCCL_SECRET".
    fn detail_for_others(self) -> &'static str {
        match self {
            AuthProblem::BadNonce | AuthProblem::Wrong => "",
            AuthProblem::ClientHasNone => " (it has none; the server requires one)",
            AuthProblem::ServerHasNone => " (it has one; the server has none)",
        }
    }

    fn status(self, what: &str) -> Status {
        let msg = format!("{what} was refused: {}", self.for_offender());
        match self {
            AuthProblem::BadNonce => Status::unauthenticated(msg),
            _ => Status::permission_denied(msg),
        }
    }
}

#[derive(Debug)]
struct Shared {
    opts: ServerOptions,
    local: SocketAddr,
    next_id: AtomicU64,
    state: Mutex<State>,
}

/// What to do with a join, decided under the lock before changing anything.
enum Verdict {
    /// Open a new group and add the joiner.
    Open,
    /// Add the joiner to the forming group.
    Add,
    /// Fail the group (`others`, world) and answer the joiner with `offender`.
    Fail { others: Failure, world: u32, offender: Failure, offender_told: bool },
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    fn shutting_down(&self, name: &str) -> Failure {
        Failure::new(
            Code::Unavailable,
            format!("rendezvous group '{name}': the rendezvous server at {} is shutting down", self.local),
            None,
        )
    }

    /// Issue a challenge nonce.
    fn challenge(&self) -> std::result::Result<[u8; 16], Status> {
        let mut st = self.lock();
        if st.closed {
            return Err(Status::unavailable(format!("the rendezvous server at {} is shutting down", self.local)));
        }
        let now = Instant::now();
        if st.nonces.len() >= MAX_NONCES {
            st.nonces.retain(|_, exp| *exp > now);
            if st.nonces.len() >= MAX_NONCES {
                return Err(Status::resource_exhausted("rendezvous: too many outstanding challenges; retry shortly"));
            }
        }
        let n = auth::nonce();
        st.nonces.insert(n, now + CHALLENGE_TTL);
        Ok(n)
    }

    /// Check a signed request (consumes its nonce).
    fn check_auth(&self, domain: &str, auth: &pb::Auth, body: &[u8]) -> std::result::Result<(), AuthProblem> {
        let Ok(nonce) = <[u8; 16]>::try_from(auth.server_nonce.as_slice()) else {
            return Err(AuthProblem::BadNonce);
        };
        match self.lock().nonces.remove(&nonce) {
            Some(exp) if exp > Instant::now() => {}
            _ => return Err(AuthProblem::BadNonce),
        }
        let key = self.opts.key.as_ref();
        if verify_opt(key, domain, &[&auth.server_nonce, &auth.client_nonce, body], &auth.tag) {
            return Ok(());
        }
        Err(match key {
            None => AuthProblem::ServerHasNone,
            Some(_) if auth.tag.iter().all(|&b| b == 0) => AuthProblem::ClientHasNone,
            Some(_) => AuthProblem::Wrong,
        })
    }

    /// A join with a bad secret: fail the group for its waiters (or remember the failure for
    /// those still to come) and return the offender's answer.
    fn secret_mismatch(&self, name: &str, who: &Who, claimed_world: u32, problem: AuthProblem) -> Status {
        let offender = problem.status(&format!("rendezvous group '{name}': rank {}", who.rank));
        let others = Failure::new(
            Code::PermissionDenied,
            format!(
                "rendezvous group '{name}': a process at {} tried to join group '{name}' as rank {} with a wrong DEVCCL_SECRET{}",
                peer_str(who.peer),
                who.rank,
                problem.detail_for_others()
            ),
            None,
        );
        let mut st = self.lock();
        if !st.closed && !name.is_empty() {
            let world = if (1..=MAX_WORLD).contains(&claimed_world) { claimed_world } else { 0 };
            st.fail_group(name, &others, world, None, self.opts.group_timeout);
        }
        offender
    }

    /// Register a joiner; the receiver yields the table or the group's failure.
    fn join(
        self: &Arc<Self>,
        name: &str,
        who: Who,
        world: u32,
        endpoints: Vec<pb::Endpoint>,
        token: u64,
    ) -> std::result::Result<oneshot::Receiver<Outcome>, Failure> {
        let g = format!("rendezvous group '{name}'");
        let rank = who.rank;
        if name.is_empty() {
            return Err(Failure::new(Code::InvalidArgument, "rendezvous group '': the group name is empty", None));
        }
        if world == 0 || world > MAX_WORLD {
            return Err(Failure::new(
                Code::InvalidArgument,
                format!("{g}: {} says world size {world}, which is not in 1..={MAX_WORLD}", who.describe()),
                Some(rank),
            ));
        }
        let linger = self.opts.group_timeout;
        let mut st = self.lock();
        if st.closed {
            return Err(self.shutting_down(name));
        }
        st.purge(Instant::now());
        if let Some(f) = st.tell_failed(name, rank) {
            return Err(f);
        }
        let verdict = match st.groups.get(name) {
            _ if rank >= world => {
                let msg = format!(
                    "{g}: {} tried to join with world size {world}; ranks must be below the world size",
                    who.describe()
                );
                let group_world = match st.groups.get(name) {
                    Some(Group::Forming(f)) => f.world,
                    _ => world,
                };
                Verdict::Fail {
                    others: Failure::new(Code::FailedPrecondition, msg.clone(), Some(rank)),
                    world: group_world,
                    offender: Failure::new(Code::InvalidArgument, msg, Some(rank)),
                    offender_told: false,
                }
            }
            None => match self.opts.world.filter(|_| name == WORLD_GROUP) {
                Some(w) if w != world as usize => {
                    let f = Failure::new(
                        Code::FailedPrecondition,
                        format!(
                            "{g}: {} says world size {world} but the rendezvous server was started for world size {w}",
                            who.describe()
                        ),
                        Some(rank),
                    );
                    Verdict::Fail { others: f.clone(), world: w as u32, offender: f, offender_told: true }
                }
                _ => Verdict::Open,
            },
            Some(Group::Forming(f)) if f.world != world => {
                let fail = Failure::new(
                    Code::FailedPrecondition,
                    format!(
                        "{g}: {} says world size {world} but the group was opened with world size {} by {}",
                        who.describe(),
                        f.world,
                        f.opener.describe()
                    ),
                    Some(rank),
                );
                Verdict::Fail { others: fail.clone(), world: f.world, offender: fail, offender_told: true }
            }
            Some(Group::Forming(f)) => match f.members.get(&rank) {
                Some(m) => {
                    let fail = Failure::new(
                        Code::AlreadyExists,
                        format!("{g}: rank {rank} joined twice: by {} and by {}", m.who.origin(), who.origin()),
                        Some(rank),
                    );
                    Verdict::Fail { others: fail.clone(), world: f.world, offender: fail, offender_told: true }
                }
                None => Verdict::Add,
            },
            Some(Group::Failed(_)) => {
                return Err(Failure::new(Code::Internal, format!("{g}: inconsistent server state"), None));
            }
        };
        match verdict {
            Verdict::Fail { others, world, offender, offender_told } => {
                st.fail_group(name, &others, world, offender_told.then_some(rank), linger);
                return Err(offender);
            }
            Verdict::Open => {
                if st.groups.len() >= MAX_GROUPS {
                    return Err(Failure::new(
                        Code::ResourceExhausted,
                        format!("{g}: the rendezvous server already tracks {MAX_GROUPS} groups"),
                        None,
                    ));
                }
                let generation = self.next_id();
                let shared = Arc::clone(self);
                let n = name.to_string();
                let timer = tokio::spawn(async move {
                    tokio::time::sleep(linger).await;
                    shared.group_timed_out(&n, generation);
                })
                .abort_handle();
                tracing::debug!(group = name, world, opener = %who.describe(), "rendezvous group opened");
                let forming = Forming {
                    generation,
                    world,
                    opener: who.clone(),
                    members: BTreeMap::new(),
                    departed: BTreeMap::new(),
                    timer,
                };
                st.groups.insert(name.to_string(), Group::Forming(forming));
            }
            Verdict::Add => {}
        }
        let Some(Group::Forming(f)) = st.groups.get_mut(name) else {
            return Err(Failure::new(Code::Internal, format!("{g}: inconsistent server state"), None));
        };
        let (tx, rx) = oneshot::channel();
        f.departed.remove(&rank);
        tracing::debug!(group = name, rank, host = %who.host, "rendezvous: rank joined");
        f.members.insert(rank, Member { who, token, endpoints, tx });
        if f.members.len() == f.world as usize {
            Self::complete(&mut st, name);
        }
        Ok(rx)
    }

    /// Every rank is there: mint the communicator and answer everyone.
    fn complete(st: &mut State, name: &str) {
        let Some(Group::Forming(g)) = st.groups.remove(name) else {
            return;
        };
        g.timer.abort();
        let comm = loop {
            let c = CommId::random();
            if !st.comms.contains_key(&c) {
                break c;
            }
        };
        let mut peers = Vec::with_capacity(g.members.len());
        let mut txs = Vec::with_capacity(g.members.len());
        for (rank, m) in g.members {
            peers.push(pb::Peer { rank, host: Some(host_to_pb(&m.who.host)), endpoints: m.endpoints });
            txs.push(m.tx);
        }
        let table = pb::PeerTable { comm_id: comm.0.to_vec(), group: name.to_string(), peers };
        let bytes = Arc::new(table.encode_to_vec());
        let (abort, _) = watch::channel(None);
        st.comms.insert(
            comm,
            CommRecord { group: name.to_string(), world: g.world, remaining: (0..g.world).collect(), abort },
        );
        tracing::info!(group = name, world = g.world, comm = %comm, "rendezvous group complete");
        for tx in txs {
            let _ = tx.send(Ok(Arc::clone(&bytes)));
        }
    }

    fn group_timed_out(&self, name: &str, generation: u64) {
        let mut st = self.lock();
        let failure = match st.groups.get(name) {
            Some(Group::Forming(g)) if g.generation == generation => Failure::timeout(
                format!(
                    "rendezvous group '{name}': {} within the server's group timeout of {:?}",
                    g.summary(),
                    self.opts.group_timeout
                ),
                self.opts.group_timeout,
            ),
            _ => return,
        };
        st.fail_group(name, &failure, 0, None, self.opts.group_timeout);
    }

    /// A member's own deadline is near: its timeout error, and it leaves the group. `None` when
    /// the group already answered it.
    fn member_deadline(&self, name: &str, rank: u32, token: u64, limit: Duration) -> Option<Failure> {
        let mut st = self.lock();
        let msg = match st.groups.get(name) {
            Some(Group::Forming(g)) if g.members.get(&rank).map(|m| m.token) == Some(token) => {
                format!("rendezvous group '{name}': {}", g.summary())
            }
            _ => return None,
        };
        st.depart(name, rank, token);
        Some(Failure::timeout(msg, limit))
    }

    fn depart(&self, name: &str, rank: u32, token: u64) {
        if self.lock().depart(name, rank, token) {
            tracing::debug!(group = name, rank, "rendezvous: a waiting rank went away");
        }
    }

    fn close(&self) {
        let mut st = self.lock();
        if st.closed {
            return;
        }
        st.closed = true;
        for (name, g) in std::mem::take(&mut st.groups) {
            if let Group::Forming(g) = g {
                g.timer.abort();
                let f = self.shutting_down(&name);
                for m in g.members.into_values() {
                    let _ = m.tx.send(Err(f.clone()));
                }
            }
        }
        st.comms.clear();
        st.nonces.clear();
    }

    /// Look up a communicator for abort/watch and check the rank.
    fn comm_check(&self, st: &State, comm_id: &[u8], rank: u32, doing: &str) -> std::result::Result<CommId, Status> {
        if st.closed {
            return Err(Status::unavailable(format!("the rendezvous server at {} is shutting down", self.local)));
        }
        let comm = CommId::from_slice(comm_id).ok_or_else(|| {
            Status::invalid_argument(format!(
                "rendezvous: {doing}: a communicator id has 16 bytes, not {}",
                comm_id.len()
            ))
        })?;
        let rec = st.comms.get(&comm).ok_or_else(|| {
            Status::not_found(format!(
                "rendezvous: {doing}: communicator {comm} is unknown here (never formed on this server, or every rank left it)"
            ))
        })?;
        if rank >= rec.world {
            return Err(Status::invalid_argument(format!(
                "rendezvous: {doing}: rank {rank} is not a member of communicator {comm} (group '{}', world size {})",
                rec.group, rec.world
            )));
        }
        Ok(comm)
    }
}

/// Leaves the group when a join handler is dropped before it answered (closed connection,
/// tonic's own deadline).
struct DepartGuard {
    shared: Arc<Shared>,
    name: String,
    rank: u32,
    token: u64,
    armed: bool,
}

impl Drop for DepartGuard {
    fn drop(&mut self) {
        if self.armed {
            self.shared.depart(&self.name, self.rank, self.token);
        }
    }
}

fn decode<M: Message + Default>(bytes: &[u8], what: &str, peer: Option<SocketAddr>) -> std::result::Result<M, Status> {
    M::decode(bytes)
        .map_err(|e| Status::invalid_argument(format!("rendezvous: malformed {what} from {}: {e}", peer_str(peer))))
}

fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push_str("...");
    }
    s
}

#[derive(Debug)]
struct Service {
    shared: Arc<Shared>,
}

#[tonic::async_trait]
impl Rendezvous for Service {
    async fn challenge(
        &self,
        _req: Request<pb::ChallengeRequest>,
    ) -> std::result::Result<Response<pb::ChallengeResponse>, Status> {
        let nonce = self.shared.challenge()?;
        Ok(Response::new(pb::ChallengeResponse { nonce: nonce.to_vec() }))
    }

    async fn join(&self, req: Request<pb::JoinRequest>) -> std::result::Result<Response<pb::JoinResponse>, Status> {
        let received = Instant::now();
        let peer = req.remote_addr();
        let req = req.into_inner();
        let body: pb::JoinBody = decode(&req.body, "join request", peer)?;
        let auth = req.auth.unwrap_or_default();
        let who = Who { rank: body.rank, host: host_from_pb(body.host.as_ref()), peer };
        let name = body.group;
        let rank = body.rank;
        if let Err(p) = self.shared.check_auth(DOMAIN_JOIN, &auth, &req.body) {
            return Err(match p {
                AuthProblem::BadNonce => p.status(&format!("rendezvous group '{name}': rank {rank}")),
                p => self.shared.secret_mismatch(&name, &who, body.world, p),
            });
        }
        if auth.client_nonce.is_empty() || auth.client_nonce.len() > 64 {
            return Err(Status::invalid_argument(format!(
                "rendezvous group '{name}': rank {rank}: the client nonce must have 1 to 64 bytes"
            )));
        }
        let token = self.shared.next_id();
        let mut rx = self.shared.join(&name, who, body.world, body.endpoints, token).map_err(|f| f.status())?;
        let mut guard = DepartGuard { shared: Arc::clone(&self.shared), name: name.clone(), rank, token, armed: true };
        // Answer with the missing ranks shortly before the caller's deadline, so the answer
        // arrives while the caller still listens.
        let limit = Duration::from_millis(body.timeout_ms);
        let answer_by = (body.timeout_ms > 0).then_some(limit).and_then(|t| {
            received
                .checked_add(t.saturating_sub((t / 10).clamp(Duration::from_millis(10), Duration::from_millis(250))))
        });
        let outcome = match answer_by {
            None => (&mut rx).await,
            Some(at) => tokio::select! {
                r = &mut rx => r,
                _ = tokio::time::sleep_until(tokio_deadline(at)) => match self.shared.member_deadline(&name, rank, token, limit) {
                    Some(f) => Ok(Err(f)),
                    None => rx.await,
                },
            },
        };
        guard.armed = false;
        match outcome {
            Ok(Ok(table)) => {
                let tag = tag_opt(self.shared.opts.key.as_ref(), DOMAIN_JOIN_REPLY, &[&auth.client_nonce, &table]);
                Ok(Response::new(pb::JoinResponse { table: table.as_ref().clone(), tag: tag.to_vec() }))
            }
            Ok(Err(f)) => Err(f.status()),
            Err(_) => Err(self.shared.shutting_down(&name).status()),
        }
    }

    async fn abort(&self, req: Request<pb::AbortRequest>) -> std::result::Result<Response<pb::AbortResponse>, Status> {
        let peer = req.remote_addr();
        let req = req.into_inner();
        let body: pb::AbortBody = decode(&req.body, "abort request", peer)?;
        let doing = format!("abort by rank {}", body.rank);
        self.shared
            .check_auth(DOMAIN_ABORT, &req.auth.unwrap_or_default(), &req.body)
            .map_err(|p| p.status(&format!("rendezvous: the {doing} from {}", peer_str(peer))))?;
        let st = self.shared.lock();
        let comm = self.shared.comm_check(&st, &body.comm_id, body.rank, &doing)?;
        let rec = &st.comms[&comm];
        let first = rec.abort.borrow().is_none();
        if first {
            let reason = truncate(body.reason, MAX_REASON);
            tracing::warn!(group = %rec.group, comm = %comm, rank = body.rank, %reason, "rendezvous: communicator aborted");
            rec.abort.send_replace(Some(AbortRecord { from: body.rank, reason }));
        }
        Ok(Response::new(pb::AbortResponse { first }))
    }

    type WatchStream = ReceiverStream<std::result::Result<pb::WatchEvent, Status>>;

    async fn watch(&self, req: Request<pb::WatchRequest>) -> std::result::Result<Response<Self::WatchStream>, Status> {
        let peer = req.remote_addr();
        let req = req.into_inner();
        let body: pb::WatchBody = decode(&req.body, "watch request", peer)?;
        let auth = req.auth.unwrap_or_default();
        let doing = format!("watch by rank {}", body.rank);
        self.shared
            .check_auth(DOMAIN_WATCH, &auth, &req.body)
            .map_err(|p| p.status(&format!("rendezvous: the {doing} from {}", peer_str(peer))))?;
        let mut sub = {
            let st = self.shared.lock();
            let comm = self.shared.comm_check(&st, &body.comm_id, body.rank, &doing)?;
            st.comms[&comm].abort.subscribe()
        };
        let (tx, rx) = mpsc::channel(1);
        let key = self.shared.opts.key.clone();
        let comm_id = body.comm_id;
        tokio::spawn(async move {
            let rec = loop {
                if let Some(r) = sub.borrow_and_update().clone() {
                    break r;
                }
                tokio::select! {
                    changed = sub.changed() => if changed.is_err() { return },
                    _ = tx.closed() => return,
                }
            };
            let event = pb::AbortEvent { comm_id, from_rank: rec.from, reason: rec.reason }.encode_to_vec();
            let tag = tag_opt(key.as_ref(), DOMAIN_ABORT_EVENT, &[&auth.client_nonce, &event]);
            let _ = tx.send(Ok(pb::WatchEvent { event, tag: tag.to_vec() })).await;
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn leave(&self, req: Request<pb::LeaveRequest>) -> std::result::Result<Response<pb::LeaveResponse>, Status> {
        let peer = req.remote_addr();
        let req = req.into_inner();
        let body: pb::LeaveBody = decode(&req.body, "leave request", peer)?;
        let doing = format!("leave by rank {}", body.rank);
        self.shared
            .check_auth(DOMAIN_LEAVE, &req.auth.unwrap_or_default(), &req.body)
            .map_err(|p| p.status(&format!("rendezvous: the {doing} from {}", peer_str(peer))))?;
        let mut st = self.shared.lock();
        let comm = match self.shared.comm_check(&st, &body.comm_id, body.rank, &doing) {
            Ok(c) => c,
            // Leaving twice, or after the server forgot the communicator, is fine.
            Err(s) if s.code() == Code::NotFound => return Ok(Response::new(pb::LeaveResponse {})),
            Err(s) => return Err(s),
        };
        let rec = st.comms.get_mut(&comm).expect("checked above");
        rec.remaining.remove(&body.rank);
        if rec.remaining.is_empty() {
            let rec = st.comms.remove(&comm).expect("present");
            tracing::debug!(group = %rec.group, comm = %comm, "rendezvous: every rank left; communicator forgotten");
        }
        Ok(Response::new(pb::LeaveResponse {}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn who(rank: u32) -> Who {
        Who { rank, host: HostIdentity { hostname: "h".into(), boot_id: "b".into(), pid: 100 + rank }, peer: None }
    }

    #[test]
    fn failed_group_resets_once_everyone_was_told() {
        let mut st = State::default();
        let f = Failure::new(Code::AlreadyExists, "boom", Some(0));
        st.fail_group("g", &f, 3, Some(0), Duration::from_secs(60));
        assert!(matches!(st.groups.get("g"), Some(Group::Failed(_))));
        assert_eq!(st.tell_failed("g", 1).map(|f| f.message), Some("boom".into()));
        assert!(st.groups.contains_key("g"), "rank 2 not told yet");
        assert!(st.tell_failed("g", 7).is_some(), "out-of-range ranks are told but not counted");
        assert!(st.groups.contains_key("g"));
        assert!(st.tell_failed("g", 2).is_some());
        assert!(!st.groups.contains_key("g"), "everyone told: the name is free");
    }

    #[test]
    fn failed_group_expires() {
        let mut st = State::default();
        st.fail_group("g", &Failure::new(Code::PermissionDenied, "x", None), 0, None, Duration::ZERO);
        st.purge(Instant::now() + Duration::from_millis(1));
        assert!(st.groups.is_empty());
    }

    #[test]
    fn summary_names_missing_and_departed_ranks() {
        let rt = runtime();
        let timer = rt.spawn(async {}).abort_handle();
        let (tx, _rx) = oneshot::channel();
        let mut g = Forming {
            generation: 1,
            world: 4,
            opener: who(0),
            members: BTreeMap::new(),
            departed: BTreeMap::new(),
            timer,
        };
        g.members.insert(0, Member { who: who(0), token: 1, endpoints: vec![], tx });
        g.departed.insert(3, who(3));
        assert_eq!(g.summary(), "2 of 4 ranks joined; missing ranks [1, 2]; ranks [3] joined but stopped waiting");
    }

    #[test]
    fn auth_problems_are_named() {
        assert!(AuthProblem::Wrong.status("x").message().contains("does not match"));
        assert!(AuthProblem::ClientHasNone.status("x").message().contains("has none set (secret mismatch)"));
        assert!(
            AuthProblem::ServerHasNone
                .status("x")
                .message()
                .contains("the rendezvous server has none (secret mismatch)")
        );
        assert_eq!(AuthProblem::BadNonce.status("x").code(), Code::Unauthenticated);
        assert_eq!(truncate("héllo".into(), 2), "h...");
    }
}
