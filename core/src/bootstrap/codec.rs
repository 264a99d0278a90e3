//! Conversions between the public bootstrap types and `devccl.bootstrap.v1` messages, the tag
//! domains, and the mapping from gRPC statuses to [`Error`]s.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use devccl_proto::bootstrap::v1 as pb;
use tonic::{Code, Status};

use super::{HostIdentity, PeerInfo, PeerTable};
use crate::error::Error;
use crate::transport::{Endpoint, TransportKind};
use crate::types::{CommId, Rank};

/// Tag domain of a `Join` request.
pub(crate) const DOMAIN_JOIN: &str = "devccl/rendezvous/join/v1";
/// Tag domain of a `Join` reply (the peer table).
pub(crate) const DOMAIN_JOIN_REPLY: &str = "devccl/rendezvous/join-reply/v1";
/// Tag domain of an `Abort` request.
pub(crate) const DOMAIN_ABORT: &str = "devccl/rendezvous/abort/v1";
/// Tag domain of a `Watch` request.
pub(crate) const DOMAIN_WATCH: &str = "devccl/rendezvous/watch/v1";
/// Tag domain of an abort event on a watch stream.
pub(crate) const DOMAIN_ABORT_EVENT: &str = "devccl/rendezvous/abort-event/v1";
/// Tag domain of a `Leave` request.
pub(crate) const DOMAIN_LEAVE: &str = "devccl/rendezvous/leave/v1";

/// Status metadata naming the rank at fault (decimal), where one is.
pub(crate) const FAULT_RANK_KEY: &str = "devccl-fault-rank";

/// Status metadata with the limit (milliseconds) whose passing a timeout status reports.
pub(crate) const TIMEOUT_MS_KEY: &str = "devccl-timeout-ms";

/// Largest world size a server accepts (sanity bound on untrusted input).
pub(crate) const MAX_WORLD: u32 = 1 << 20;

pub(crate) fn host_to_pb(h: &HostIdentity) -> pb::HostIdentity {
    pb::HostIdentity { hostname: h.hostname.clone(), boot_id: h.boot_id.clone(), pid: h.pid }
}

pub(crate) fn host_from_pb(h: Option<&pb::HostIdentity>) -> HostIdentity {
    match h {
        Some(h) => HostIdentity { hostname: h.hostname.clone(), boot_id: h.boot_id.clone(), pid: h.pid },
        None => HostIdentity { hostname: "unknown-host".into(), boot_id: String::new(), pid: 0 },
    }
}

pub(crate) fn endpoint_to_pb(e: &Endpoint) -> pb::Endpoint {
    pb::Endpoint {
        kind: e.kind.name().to_string(),
        address: e.address.clone(),
        caps: e.caps.iter().map(|(k, v)| pb::Capability { key: k.clone(), value: v.clone() }).collect(),
    }
}

/// `None` for a transport this build does not know (a newer peer's); the caller skips it.
pub(crate) fn endpoint_from_pb(e: &pb::Endpoint) -> Option<Endpoint> {
    let kind = TransportKind::from_name(&e.kind)?;
    Some(Endpoint {
        kind,
        address: e.address.clone(),
        caps: e.caps.iter().map(|c| (c.key.clone(), c.value.clone())).collect(),
    })
}

/// Decode and check a peer table: the right group and size, index == rank, 16-byte id.
pub(crate) fn table_from_pb(t: &pb::PeerTable, group: &str, world: usize) -> Result<PeerTable, String> {
    let comm = CommId::from_slice(&t.comm_id)
        .ok_or_else(|| format!("communicator id has {} bytes, not 16", t.comm_id.len()))?;
    if t.group != group {
        return Err(format!("the table is for group '{}', not '{group}'", t.group));
    }
    if t.peers.len() != world {
        return Err(format!("the table has {} ranks, not {world}", t.peers.len()));
    }
    let mut peers = Vec::with_capacity(t.peers.len());
    for (i, p) in t.peers.iter().enumerate() {
        if p.rank as usize != i {
            return Err(format!("entry {i} is for rank {}", p.rank));
        }
        let mut endpoints = Vec::with_capacity(p.endpoints.len());
        for e in &p.endpoints {
            match endpoint_from_pb(e) {
                Some(e) => endpoints.push(e),
                None => {
                    tracing::debug!(rank = p.rank, kind = %e.kind, "rendezvous: skipping an endpoint of an unknown transport")
                }
            }
        }
        peers.push(PeerInfo { rank: Rank(p.rank), host: host_from_pb(p.host.as_ref()), endpoints });
    }
    Ok(PeerTable { comm, group: t.group.clone(), peers })
}

/// `[0, 2, 5]`, shortened after 32 entries.
pub(crate) fn fmt_ranks(ranks: impl IntoIterator<Item = u32>) -> String {
    const SHOWN: usize = 32;
    let mut s = String::from("[");
    let mut n = 0usize;
    for r in ranks {
        if n < SHOWN {
            if n > 0 {
                s.push_str(", ");
            }
            let _ = write!(s, "{r}");
        }
        n += 1;
    }
    if n > SHOWN {
        let _ = write!(s, ", ... ({} more)", n - SHOWN);
    }
    s.push(']');
    s
}

/// What a client was doing when a status came back, to turn it into an [`Error`].
pub(crate) struct CallContext<'a> {
    /// The server address as the client knows it.
    pub addr: &'a str,
    /// The group, for joins.
    pub group: Option<&'a str>,
    /// When the call started.
    pub started: Instant,
    /// The caller's deadline.
    pub deadline: Instant,
}

impl CallContext<'_> {
    /// Put the server address into a server message: `rendezvous group 'g': ...` becomes
    /// `rendezvous group 'g' at ADDR: ...`; other messages get an `at ADDR` prefix.
    pub(crate) fn localize(&self, msg: &str) -> String {
        if let Some(g) = self.group {
            let prefix = format!("rendezvous group '{g}'");
            if let Some(rest) = msg.strip_prefix(&prefix) {
                return format!("{prefix} at {}{rest}", self.addr);
            }
        }
        if msg.starts_with("rendezvous") {
            format!("{msg} (server {})", self.addr)
        } else {
            format!("rendezvous server at {}: {msg}", self.addr)
        }
    }

    /// Map a status from the server to a devccl error.
    pub(crate) fn error(&self, s: &Status) -> Error {
        let msg = self.localize(s.message());
        let fault = s
            .metadata()
            .get(FAULT_RANK_KEY)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u32>().ok())
            .map(Rank);
        match s.code() {
            Code::InvalidArgument => Error::InvalidUsage(msg),
            Code::DeadlineExceeded => {
                let after = s
                    .metadata()
                    .get(TIMEOUT_MS_KEY)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<u64>().ok())
                    .map_or_else(|| self.budget(), Duration::from_millis);
                Error::Timeout { what: msg, after }
            }
            // tonic's server-side grpc-timeout layer answers "Timeout expired" as Cancelled.
            Code::Cancelled if s.message().contains("Timeout expired") => Error::Timeout {
                what: match self.group {
                    Some(g) => format!("rendezvous group '{g}' at {}: the server gave up at the deadline", self.addr),
                    None => format!("rendezvous server at {}: the call reached its deadline", self.addr),
                },
                after: self.budget(),
            },
            Code::Unimplemented => Error::Remote {
                peer: None,
                message: format!(
                    "the service at {} is not a devccl rendezvous server (v1): {}",
                    self.addr,
                    s.message()
                ),
            },
            Code::Unavailable => Error::Remote {
                peer: None,
                message: format!("rendezvous server at {} is unreachable or shutting down: {}", self.addr, s.message()),
            },
            Code::PermissionDenied | Code::Unauthenticated => Error::Remote { peer: None, message: msg },
            _ => Error::Remote { peer: fault, message: msg },
        }
    }

    /// The client-side deadline passed before the server answered.
    pub(crate) fn no_answer(&self, doing: &str) -> Error {
        let what = match self.group {
            Some(g) => format!(
                "rendezvous group '{g}' at {}: no answer from the server to {doing} before the deadline",
                self.addr
            ),
            None => format!("rendezvous server at {}: no answer to {doing} before the deadline", self.addr),
        };
        Error::Timeout { what, after: self.budget() }
    }

    /// The time the caller allowed.
    fn budget(&self) -> Duration {
        self.deadline.saturating_duration_since(self.started)
    }
}

/// Time left until `deadline` (zero when passed).
pub(crate) fn remaining(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_round_trip_and_unknown_kinds_are_skipped() {
        let e = Endpoint {
            kind: TransportKind::Tcp,
            address: "[::1]:4000".into(),
            caps: vec![("lanes".into(), "4".into())],
        };
        assert_eq!(endpoint_from_pb(&endpoint_to_pb(&e)), Some(e.clone()));
        let mut odd = endpoint_to_pb(&e);
        odd.kind = "rdma".into();
        assert_eq!(endpoint_from_pb(&odd), None);
        let t = pb::PeerTable {
            comm_id: vec![7; 16],
            group: "world".into(),
            peers: vec![pb::Peer {
                rank: 0,
                host: Some(host_to_pb(&HostIdentity::local())),
                endpoints: vec![endpoint_to_pb(&e), odd],
            }],
        };
        let table = table_from_pb(&t, "world", 1).unwrap();
        assert_eq!(table.comm, CommId([7; 16]));
        assert_eq!(table.peers[0].endpoints, vec![e]);
        assert_eq!(table.peers[0].host, HostIdentity::local());
    }

    #[test]
    fn inconsistent_tables_are_refused() {
        let peer = |rank| pb::Peer { rank, host: None, endpoints: vec![] };
        let good = pb::PeerTable { comm_id: vec![1; 16], group: "g".into(), peers: vec![peer(0), peer(1)] };
        assert!(table_from_pb(&good, "g", 2).is_ok());
        assert!(table_from_pb(&good, "h", 2).unwrap_err().contains("group 'g'"));
        assert!(table_from_pb(&good, "g", 3).unwrap_err().contains("2 ranks"));
        let swapped = pb::PeerTable { peers: vec![peer(1), peer(0)], ..good.clone() };
        assert!(table_from_pb(&swapped, "g", 2).unwrap_err().contains("entry 0 is for rank 1"));
        let short_id = pb::PeerTable { comm_id: vec![1; 8], ..good };
        assert!(table_from_pb(&short_id, "g", 2).unwrap_err().contains("8 bytes"));
    }

    #[test]
    fn rank_lists_are_bounded() {
        assert_eq!(fmt_ranks([]), "[]");
        assert_eq!(fmt_ranks([2]), "[2]");
        assert_eq!(fmt_ranks([0, 5]), "[0, 5]");
        let long = fmt_ranks(0..100);
        assert!(long.ends_with(", 31, ... (68 more)]"), "{long}");
    }

    #[test]
    fn statuses_map_to_errors_that_name_the_server() {
        let now = Instant::now();
        let cx = CallContext {
            addr: "10.0.0.1:29500",
            group: Some("world"),
            started: now,
            deadline: now + Duration::from_secs(9),
        };
        let mut s = Status::deadline_exceeded("rendezvous group 'world': 3 of 4 ranks joined; missing ranks [2]");
        s.metadata_mut().insert(TIMEOUT_MS_KEY, "1500".parse().unwrap());
        match &cx.error(&s) {
            Error::Timeout { what, after } => {
                assert_eq!(what, "rendezvous group 'world' at 10.0.0.1:29500: 3 of 4 ranks joined; missing ranks [2]");
                assert_eq!(*after, Duration::from_millis(1500));
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            cx.error(&Status::invalid_argument("rendezvous group 'world': rank 5")),
            Error::InvalidUsage(_)
        ));
        let mut s = Status::already_exists("rendezvous group 'world': rank 1 joined twice");
        s.metadata_mut().insert(FAULT_RANK_KEY, "1".parse().unwrap());
        assert!(matches!(cx.error(&s), Error::Remote { peer: Some(Rank(1)), .. }));
        let e = cx.error(&Status::unimplemented("nope")).to_string();
        assert!(e.contains("not a devccl rendezvous server"), "{e}");
        assert!(
            matches!(cx.error(&Status::deadline_exceeded("x")), Error::Timeout { after, .. } if after == Duration::from_secs(9))
        );
        let other = CallContext { addr: "h:1", group: None, started: now, deadline: now };
        assert_eq!(other.localize("boom"), "rendezvous server at h:1: boom");
    }
}
