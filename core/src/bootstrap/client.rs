//! The rendezvous client: join, abort, watch, leave.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use devccl_proto::bootstrap::v1 as pb;
use pb::rendezvous_client::RendezvousClient as RpcClient;
use prost::Message;
use tonic::transport::{Channel, Endpoint as TonicEndpoint};
use tonic::{Code, Request, Status};

use super::codec::{
    CallContext, DOMAIN_ABORT, DOMAIN_ABORT_EVENT, DOMAIN_JOIN, DOMAIN_JOIN_REPLY, DOMAIN_LEAVE, DOMAIN_WATCH,
    endpoint_to_pb, host_to_pb, remaining, table_from_pb,
};
use super::server::error_chain;
use super::{AbortEvent, CONTROL_TIMEOUT, JoinRequest, PeerTable, block_on, runtime, tokio_deadline};
use crate::auth::{self, AuthKey, tag_opt, verify_opt};
use crate::error::{Error, Result};
use crate::types::{CommId, Rank};

/// Largest reply a client accepts (a peer table of many thousand ranks fits easily).
const MAX_MESSAGE: usize = 64 << 20;

/// A connection to a rendezvous server. Cheap to clone; clones share the connection.
#[derive(Clone)]
pub struct RendezvousClient {
    inner: Arc<Inner>,
}

struct Inner {
    addr: String,
    key: Option<AuthKey>,
    channel: Channel,
}

impl fmt::Debug for RendezvousClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RendezvousClient")
            .field("addr", &self.inner.addr)
            .field("secret", &self.inner.key.is_some())
            .finish()
    }
}

/// A background subscription to a communicator's abort event (see
/// [`RendezvousClient::watch`]). Dropping it cancels the subscription.
#[derive(Debug)]
pub struct WatchHandle {
    task: tokio::task::AbortHandle,
    comm: CommId,
    rank: Rank,
}

impl WatchHandle {
    /// The watched communicator.
    pub fn comm(&self) -> CommId {
        self.comm
    }

    /// The rank that watches.
    pub fn rank(&self) -> Rank {
        self.rank
    }

    /// False once the subscription ended: the abort event was delivered, the server forgot
    /// the communicator (every rank left), or the server went away.
    pub fn is_active(&self) -> bool {
        !self.task.is_finished()
    }
}

impl Drop for WatchHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl RendezvousClient {
    /// Connect to the rendezvous server at `addr` (`host:port`, IPv6 as `[::1]:port`), with the
    /// shared-secret key when `DEVCCL_SECRET` is set. The server may start later: connecting
    /// is retried (with backoff up to 0.5 s) until `deadline`, then fails with
    /// [`Error::Timeout`] naming `addr` and the last connection error. Succeeds only when a
    /// devccl rendezvous answers there (a challenge round trip).
    pub fn connect(addr: &str, key: Option<AuthKey>, deadline: Instant) -> Result<RendezvousClient> {
        let started = Instant::now();
        let endpoint = TonicEndpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| Error::usage(format!("rendezvous address {addr:?} is not host:port ({})", error_chain(&e))))?
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(20))
            .keep_alive_while_idle(true);
        let addr = addr.to_string();
        let what = addr.clone();
        block_on(
            async move {
                let mut backoff = Duration::from_millis(20);
                let mut last = "no connection attempt finished".to_string();
                loop {
                    let left = remaining(deadline);
                    if left.is_zero() {
                        break;
                    }
                    let ep = endpoint.clone().connect_timeout(left.min(Duration::from_secs(5)));
                    match tokio::time::timeout_at(tokio_deadline(deadline), ep.connect()).await {
                        Err(_) => break,
                        Ok(Err(e)) => last = error_chain(&e),
                        Ok(Ok(channel)) => {
                            let client = RendezvousClient {
                                inner: Arc::new(Inner { addr: addr.clone(), key: key.clone(), channel }),
                            };
                            match tokio::time::timeout_at(tokio_deadline(deadline), client.challenge(deadline)).await {
                                Err(_) => break,
                                Ok(Ok(_)) => {
                                    tracing::debug!(%addr, "connected to the rendezvous server");
                                    return Ok(client);
                                }
                                Ok(Err(s)) if matches!(s.code(), Code::Unavailable | Code::ResourceExhausted) => {
                                    last = s.message().to_string();
                                }
                                Ok(Err(s)) => {
                                    let cx = CallContext { addr: &addr, group: None, started, deadline };
                                    return Err(cx.error(&s));
                                }
                            }
                        }
                    }
                    tracing::trace!(%addr, %last, "rendezvous server not reachable yet; retrying");
                    tokio::time::sleep(backoff.min(remaining(deadline))).await;
                    backoff = (backoff * 2).min(Duration::from_millis(500));
                }
                Err(Error::Timeout {
                    what: format!(
                        "connecting to the rendezvous server at {addr}: no server answered (last error: {last})"
                    ),
                    after: started.elapsed(),
                })
            },
            deadline,
            move || format!("connecting to the rendezvous server at {what}"),
        )
    }

    /// The server address this client talks to.
    pub fn addr(&self) -> &str {
        &self.inner.addr
    }

    /// Join `req.group` and wait until every rank of it has joined, then return the peer
    /// table (the same for every member, with a fresh [`CommId`]).
    ///
    /// The deadline travels to the server (as the gRPC timeout and in the request), which
    /// answers shortly before it with [`Error::Timeout`] naming the missing ranks; it is also
    /// enforced here. Other errors, each naming the group, the ranks and their hosts:
    /// [`Error::InvalidUsage`] when this rank is not below its world size; [`Error::Remote`]
    /// for a duplicate rank, a world-size disagreement, a secret mismatch (this process's or
    /// another's), a server that cannot prove it knows the secret, or an unreachable server.
    pub fn join(&self, req: JoinRequest, deadline: Instant) -> Result<PeerTable> {
        let world = u32::try_from(req.world).map_err(|_| {
            Error::usage(format!("rendezvous group '{}': world size {} is too large", req.group, req.world))
        })?;
        let this = self.clone();
        let what = format!("joining rendezvous group '{}' at {}", req.group, self.inner.addr);
        block_on(async move { this.join_async(req, world, deadline).await }, deadline, move || what)
    }

    async fn join_async(&self, req: JoinRequest, world: u32, deadline: Instant) -> Result<PeerTable> {
        let cx = CallContext { addr: &self.inner.addr, group: Some(&req.group), started: Instant::now(), deadline };
        let rank = req.rank;
        let call = async {
            let server_nonce = self.challenge(deadline).await.map_err(|s| cx.error(&s))?;
            let left = remaining(deadline);
            if left.is_zero() {
                return Err(cx.no_answer(&format!("the join of rank {rank}")));
            }
            let body = pb::JoinBody {
                group: req.group.clone(),
                rank: rank.0,
                world,
                host: Some(host_to_pb(&req.host)),
                endpoints: req.endpoints.iter().map(endpoint_to_pb).collect(),
                timeout_ms: u64::try_from(left.as_millis()).unwrap_or(u64::MAX).max(1),
            }
            .encode_to_vec();
            let auth = self.sign(DOMAIN_JOIN, server_nonce, &body);
            let client_nonce = auth.client_nonce.clone();
            let mut r = Request::new(pb::JoinRequest { body, auth: Some(auth) });
            r.set_timeout(left);
            let resp = self.rpc().join(r).await.map_err(|s| cx.error(&s))?.into_inner();
            if !verify_opt(self.inner.key.as_ref(), DOMAIN_JOIN_REPLY, &[&client_nonce, &resp.table], &resp.tag) {
                return Err(Error::Remote {
                    peer: None,
                    message: format!(
                        "rendezvous group '{}' at {}: the server's reply is not signed with {}; refusing its peer table \
                         (a rogue or misconfigured rendezvous server?)",
                        req.group,
                        self.inner.addr,
                        if self.inner.key.is_some() { "this process's DEVCCL_SECRET" } else { "an empty secret" }
                    ),
                });
            }
            let inconsistent = |why: String| Error::Remote {
                peer: None,
                message: format!(
                    "rendezvous group '{}' at {} sent an inconsistent peer table: {why}",
                    req.group, self.inner.addr
                ),
            };
            let table = pb::PeerTable::decode(resp.table.as_slice()).map_err(|e| inconsistent(e.to_string()))?;
            let table = table_from_pb(&table, &req.group, req.world).map_err(inconsistent)?;
            match table.peer(rank) {
                Some(me) if me.host == req.host => {}
                Some(me) => {
                    return Err(inconsistent(format!(
                        "it lists rank {rank} as {}, not this process ({})",
                        me.host, req.host
                    )));
                }
                None => return Err(inconsistent(format!("rank {rank} is missing"))),
            }
            tracing::debug!(group = %req.group, %rank, world, comm = %table.comm, "rendezvous: joined");
            Ok(table)
        };
        match tokio::time::timeout_at(tokio_deadline(deadline), call).await {
            Ok(r) => r,
            Err(_) => Err(cx.no_answer(&format!("the join of rank {rank} of {world}"))),
        }
    }

    /// Abort communicator `comm` on behalf of `rank`: every [`watch`](Self::watch)er of it
    /// (on every rank) gets an [`AbortEvent`]; only the first abort of a communicator counts.
    /// Returns within [`CONTROL_TIMEOUT`], whatever the state of the collectives.
    pub fn abort(&self, comm: CommId, rank: Rank, reason: &str) -> Result<()> {
        let body = pb::AbortBody { comm_id: comm.0.to_vec(), rank: rank.0, reason: reason.to_string() }.encode_to_vec();
        let this = self.clone();
        let deadline = Instant::now() + CONTROL_TIMEOUT;
        let what = format!("aborting communicator {comm} at {}", self.inner.addr);
        block_on(
            async move {
                this.control(deadline, "the abort", |c, nonce| {
                    let auth = c.sign(DOMAIN_ABORT, nonce, &body);
                    let mut rpc = c.rpc();
                    async move {
                        rpc.abort(timed(
                            pb::AbortRequest {
                                body,
                                auth: Some(auth),
                            },
                            deadline,
                        ))
                        .await
                        .map(drop)
                    }
                })
                .await
            },
            deadline,
            move || what,
        )
    }

    /// Subscribe to the abort event of `comm` (as `rank`). `on_abort` runs at most once, on a
    /// `devccl-rt` runtime thread, and must be quick (set a flag, ring an eventfd): it gets the
    /// event at once if the communicator was already aborted. The subscription ends silently
    /// when the server forgets the communicator or goes away (the data path detects dead peers
    /// by itself), and is cancelled when the returned handle is dropped.
    ///
    /// Blocks until the server accepted the subscription, at most [`CONTROL_TIMEOUT`].
    pub fn watch(
        &self,
        comm: CommId,
        rank: Rank,
        on_abort: Box<dyn Fn(AbortEvent) + Send + Sync>,
    ) -> Result<WatchHandle> {
        let body = pb::WatchBody { comm_id: comm.0.to_vec(), rank: rank.0 }.encode_to_vec();
        let this = self.clone();
        let deadline = Instant::now() + CONTROL_TIMEOUT;
        let what = format!("watching communicator {comm} at {}", self.inner.addr);
        let (mut stream, client_nonce) = block_on(
            async move {
                this.control(deadline, "the watch request", |c, nonce| {
                    let auth = c.sign(DOMAIN_WATCH, nonce, &body);
                    let client_nonce = auth.client_nonce.clone();
                    let mut rpc = c.rpc();
                    async move {
                        let s = rpc.watch(timed(pb::WatchRequest { body, auth: Some(auth) }, deadline)).await?;
                        Ok((s.into_inner(), client_nonce))
                    }
                })
                .await
            },
            deadline,
            move || what,
        )?;
        let key = self.inner.key.clone();
        let addr = self.inner.addr.clone();
        let task = runtime().spawn(async move {
            loop {
                match stream.message().await {
                    Ok(Some(ev)) => {
                        if !verify_opt(key.as_ref(), DOMAIN_ABORT_EVENT, &[&client_nonce, &ev.event], &ev.tag) {
                            tracing::warn!(%addr, %comm, "rendezvous: ignoring an abort event not signed with this process's secret");
                            continue;
                        }
                        match pb::AbortEvent::decode(ev.event.as_slice()) {
                            Ok(e) if e.comm_id == comm.0 => {
                                on_abort(AbortEvent { comm, from: Rank(e.from_rank), reason: e.reason });
                                return;
                            }
                            Ok(_) => tracing::warn!(%addr, %comm, "rendezvous: ignoring an abort event for another communicator"),
                            Err(e) => tracing::warn!(%addr, %comm, "rendezvous: ignoring a malformed abort event: {e}"),
                        }
                    }
                    Ok(None) => {
                        tracing::debug!(%addr, %comm, "rendezvous: watch ended (communicator forgotten)");
                        return;
                    }
                    Err(s) => {
                        tracing::debug!(%addr, %comm, "rendezvous: watch ended: {}", s.message());
                        return;
                    }
                }
            }
        });
        Ok(WatchHandle { task: task.abort_handle(), comm, rank })
    }

    /// `rank` destroyed its communicator cleanly; once every rank left, the server forgets the
    /// communicator and its watch streams end. Leaving twice is fine. Returns within
    /// [`CONTROL_TIMEOUT`].
    pub fn leave(&self, comm: CommId, rank: Rank) -> Result<()> {
        let body = pb::LeaveBody { comm_id: comm.0.to_vec(), rank: rank.0 }.encode_to_vec();
        let this = self.clone();
        let deadline = Instant::now() + CONTROL_TIMEOUT;
        let what = format!("leaving communicator {comm} at {}", self.inner.addr);
        block_on(
            async move {
                this.control(deadline, "the leave request", |c, nonce| {
                    let auth = c.sign(DOMAIN_LEAVE, nonce, &body);
                    let mut rpc = c.rpc();
                    async move {
                        rpc.leave(timed(
                            pb::LeaveRequest {
                                body,
                                auth: Some(auth),
                            },
                            deadline,
                        ))
                        .await
                        .map(drop)
                    }
                })
                .await
            },
            deadline,
            move || what,
        )
    }

    /// Challenge, then the signed call `f` builds, all within `deadline`.
    async fn control<T, F, Fut>(&self, deadline: Instant, doing: &str, f: F) -> Result<T>
    where
        F: FnOnce(&Self, Vec<u8>) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<T, Status>>,
    {
        let cx = CallContext { addr: &self.inner.addr, group: None, started: Instant::now(), deadline };
        let call = async {
            let nonce = self.challenge(deadline).await.map_err(|s| cx.error(&s))?;
            f(self, nonce).await.map_err(|s| cx.error(&s))
        };
        match tokio::time::timeout_at(tokio_deadline(deadline), call).await {
            Ok(r) => r,
            Err(_) => Err(cx.no_answer(doing)),
        }
    }

    fn rpc(&self) -> RpcClient<Channel> {
        RpcClient::new(self.inner.channel.clone()).max_decoding_message_size(MAX_MESSAGE)
    }

    /// A fresh server nonce.
    async fn challenge(&self, deadline: Instant) -> std::result::Result<Vec<u8>, Status> {
        let nonce = self.rpc().challenge(timed(pb::ChallengeRequest {}, deadline)).await?.into_inner().nonce;
        if nonce.len() != 16 {
            return Err(Status::internal(format!("the server's challenge nonce has {} bytes, not 16", nonce.len())));
        }
        Ok(nonce)
    }

    /// The signature of a request body.
    fn sign(&self, domain: &str, server_nonce: Vec<u8>, body: &[u8]) -> pb::Auth {
        let client_nonce = auth::nonce();
        let tag = tag_opt(self.inner.key.as_ref(), domain, &[&server_nonce, &client_nonce, body]);
        pb::Auth { server_nonce, client_nonce: client_nonce.to_vec(), tag: tag.to_vec() }
    }
}

/// A request carrying the time left until `deadline` as its gRPC timeout.
fn timed<T>(msg: T, deadline: Instant) -> Request<T> {
    let mut r = Request::new(msg);
    r.set_timeout(remaining(deadline).max(Duration::from_millis(1)));
    r
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use pb::rendezvous_server::{Rendezvous, RendezvousServer as RendezvousService};
    use tokio_stream::wrappers::ReceiverStream;
    use tonic::Response;
    use tonic::transport::server::TcpIncoming;

    use super::*;
    use crate::bootstrap::HostIdentity;

    /// A server that does not know the secret: accepts everything, signs nothing.
    struct Rogue;

    #[tonic::async_trait]
    impl Rendezvous for Rogue {
        async fn challenge(
            &self,
            _req: Request<pb::ChallengeRequest>,
        ) -> std::result::Result<Response<pb::ChallengeResponse>, Status> {
            Ok(Response::new(pb::ChallengeResponse { nonce: vec![1; 16] }))
        }

        async fn join(&self, req: Request<pb::JoinRequest>) -> std::result::Result<Response<pb::JoinResponse>, Status> {
            let body = pb::JoinBody::decode(req.get_ref().body.as_slice())
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
            let peer = pb::Peer { rank: body.rank, host: body.host, endpoints: body.endpoints };
            let table = pb::PeerTable { comm_id: vec![9; 16], group: body.group, peers: vec![peer] };
            Ok(Response::new(pb::JoinResponse { table: table.encode_to_vec(), tag: vec![0; 32] }))
        }

        async fn abort(
            &self,
            _req: Request<pb::AbortRequest>,
        ) -> std::result::Result<Response<pb::AbortResponse>, Status> {
            Ok(Response::new(pb::AbortResponse { first: true }))
        }

        type WatchStream = ReceiverStream<std::result::Result<pb::WatchEvent, Status>>;

        async fn watch(
            &self,
            req: Request<pb::WatchRequest>,
        ) -> std::result::Result<Response<Self::WatchStream>, Status> {
            let body = pb::WatchBody::decode(req.get_ref().body.as_slice())
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
            let event = pb::AbortEvent { comm_id: body.comm_id, from_rank: 0, reason: "forged".into() };
            let (tx, rx) = tokio::sync::mpsc::channel(1);
            let _ = tx.send(Ok(pb::WatchEvent { event: event.encode_to_vec(), tag: vec![7; 32] })).await;
            Ok(Response::new(ReceiverStream::new(rx)))
        }

        async fn leave(
            &self,
            _req: Request<pb::LeaveRequest>,
        ) -> std::result::Result<Response<pb::LeaveResponse>, Status> {
            Ok(Response::new(pb::LeaveResponse {}))
        }
    }

    #[test]
    fn a_server_that_does_not_know_the_secret_is_detected() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let listener = {
            let _rt = runtime().enter();
            tokio::net::TcpListener::from_std(listener).unwrap()
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        runtime().spawn(
            tonic::transport::Server::builder()
                .add_service(RendezvousService::new(Rogue))
                .serve_with_incoming_shutdown(TcpIncoming::from(listener), async move {
                    let _ = stopped.await;
                }),
        );
        let deadline = Instant::now() + Duration::from_secs(5);
        let req = JoinRequest {
            group: "world".into(),
            rank: Rank(0),
            world: 1,
            host: HostIdentity::local(),
            endpoints: vec![],
        };

        let key = Some(AuthKey::from_secret("s"));
        let c = RendezvousClient::connect(&addr, key, deadline).unwrap();
        let err = c.join(req.clone(), deadline).unwrap_err().to_string();
        assert!(err.contains("not signed with this process's DEVCCL_SECRET"), "{err}");

        // A forged abort event is ignored; the stream then ends.
        let fired = Arc::new(AtomicBool::new(false));
        let f = Arc::clone(&fired);
        let w = c.watch(CommId([9; 16]), Rank(0), Box::new(move |_| f.store(true, Ordering::SeqCst))).unwrap();
        let t0 = Instant::now();
        while w.is_active() && t0.elapsed() < Duration::from_secs(2) {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(!w.is_active());
        assert!(!fired.load(Ordering::SeqCst), "forged abort event delivered");

        // Without a secret on either side the zero tags verify (the check above is real).
        let c = RendezvousClient::connect(&addr, None, deadline).unwrap();
        assert_eq!(c.join(req, deadline).unwrap().comm, CommId([9; 16]));
        let _ = stop.send(());
    }
}
