//! Bookkeeping every frame-carrying connection keeps, whatever moves its bytes (TCP lanes,
//! shared-memory rings, the in-memory test mesh): request ids, where a receive's payload
//! goes, completed requests not yet reported, and the sticky failure that later calls
//! report again.

use std::collections::VecDeque;

use crate::error::{Error, Result};
use crate::memory::RegionSlice;
use crate::transport::{Completion, PayloadSink, ReqId};
use crate::types::Rank;
use crate::wire::FrameHeader;

/// `header.len` must match the buffer a send reads or a receive fills.
pub fn check_frame_len(what: &str, hdr: &FrameHeader, slice: &RegionSlice) -> Result<()> {
    if hdr.len as usize != slice.len() {
        return Err(Error::Internal(format!("{what}: header len {} != buffer {}", hdr.len, slice.len())));
    }
    Ok(())
}

/// Where a receive's payload goes.
pub enum RecvTarget {
    /// Copied into the caller's memory.
    Copy(RegionSlice),
    /// Handed to the caller's sink piece by piece, straight from the transport's buffer
    /// (the executor reduces each piece while it is in cache, instead of receiving into a
    /// staging slot and reducing afterwards).
    Sink {
        /// Payload bytes expected.
        len: usize,
        /// Where they go.
        sink: Box<dyn PayloadSink>,
    },
}

impl RecvTarget {
    /// Payload bytes expected.
    pub fn len(&self) -> usize {
        match self {
            RecvTarget::Copy(d) => d.len(),
            RecvTarget::Sink { len, .. } => *len,
        }
    }

    /// True for an empty payload.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl std::fmt::Debug for RecvTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RecvTarget::Copy(d) => write!(f, "Copy({d:?})"),
            RecvTarget::Sink { len, .. } => write!(f, "Sink({len} bytes)"),
        }
    }
}

/// Completed requests not yet reported, per direction (the low bit of a [`ReqId`]).
/// Requests of a direction complete in posting order and callers mostly test the oldest,
/// so a short queue searched from the front beats hashing on the latency path.
#[derive(Debug, Default)]
pub struct Done {
    q: [VecDeque<(ReqId, Completion)>; 2],
}

impl Done {
    /// Record a completion.
    pub fn insert(&mut self, id: ReqId, c: Completion) {
        self.q[(id.0 & 1) as usize].push_back((id, c));
    }

    fn position(&self, id: &ReqId) -> Option<usize> {
        self.q[(id.0 & 1) as usize].iter().position(|(i, _)| i == id)
    }

    /// Take the completion of `id`, if it completed.
    pub fn remove(&mut self, id: &ReqId) -> Option<Completion> {
        let at = self.position(id)?;
        self.q[(id.0 & 1) as usize].remove(at).map(|(_, c)| c)
    }

    /// True when `id` completed and was not yet taken.
    pub fn contains_key(&self, id: &ReqId) -> bool {
        self.position(id).is_some()
    }

    /// Forget every completion.
    pub fn clear(&mut self) {
        self.q.iter_mut().for_each(VecDeque::clear);
    }
}

/// The sticky failure of a connection: later calls report it again.
#[derive(Debug)]
struct Broken {
    /// The peer caused it (end of stream, garbage, abort, mismatch) rather than this process.
    remote: bool,
    message: String,
}

/// A connection's request ids, unreported completions and failure state.
#[derive(Debug, Default)]
pub struct ConnState {
    next_id: u64,
    /// Completed requests not yet reported by `test`.
    pub done: Done,
    broken: Option<Broken>,
    /// An error met while progressing on behalf of a request that itself completed; the
    /// next call returns it verbatim.
    deferred: Option<Error>,
}

impl ConnState {
    /// A fresh id for a request of direction `dir` (0 send, 1 receive): the direction is
    /// the id's low bit.
    pub fn new_id(&mut self, dir: u64) -> ReqId {
        let id = ReqId((self.next_id << 1) | dir);
        self.next_id += 1;
        id
    }

    /// The error to return before doing anything: a deferred error once, then the sticky
    /// failure on every call.
    pub fn check(&mut self, peer: Rank) -> Result<()> {
        if let Some(e) = self.deferred.take() {
            return Err(e);
        }
        match &self.broken {
            None => Ok(()),
            Some(b) if b.remote => Err(Error::remote(
                peer,
                format!("connection to rank {peer} is unusable after an earlier error: {}", b.message),
            )),
            Some(b) => Err(Error::Aborted { cause: b.message.clone() }),
        }
    }

    /// True once a failure was recorded.
    pub fn is_broken(&self) -> bool {
        self.broken.is_some()
    }

    /// Remember the first failure; every later call reports it.
    pub fn fail(&mut self, e: &Error) {
        if self.broken.is_none() {
            let remote = matches!(e, Error::Remote { .. } | Error::Mismatch { .. });
            self.broken = Some(Broken { remote, message: e.to_string() });
        }
    }

    /// Remember a failure this process caused (an abort, a cancel mid-frame), unless an
    /// earlier one is recorded.
    pub fn fail_locally(&mut self, message: String) {
        if self.broken.is_none() {
            self.broken = Some(Broken { remote: false, message });
        }
    }

    /// The end of `test(req)` after progressing with result `r`: an error is recorded; a
    /// request that completed before a later frame failed is reported now and the error
    /// on the next call.
    pub fn settle(&mut self, req: ReqId, r: Result<()>) -> Result<Option<Completion>> {
        if let Err(e) = r {
            self.fail(&e);
            if let Some(c) = self.done.remove(&req) {
                self.deferred = Some(e);
                return Ok(Some(c));
            }
            return Err(e);
        }
        Ok(self.done.remove(&req))
    }

    /// The caller abandons every request: completions and a deferred error are dropped
    /// (the sticky failure stays).
    pub fn abandon(&mut self) {
        self.done.clear();
        self.deferred = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settle_reports_a_completion_before_the_error_that_followed_it() {
        let mut s = ConnState::default();
        let (a, b) = (s.new_id(0), s.new_id(1));
        assert_eq!((a.0 & 1, b.0 & 1), (0, 1));
        s.done.insert(a, Completion::Sent { bytes: 4 });
        let e = Error::remote(Rank(1), "gone");
        assert!(matches!(s.settle(a, Err(e)), Ok(Some(Completion::Sent { bytes: 4 }))));
        assert!(matches!(s.check(Rank(1)), Err(Error::Remote { .. })), "the deferred error, once");
        let again = s.check(Rank(1)).unwrap_err().to_string();
        assert!(again.contains("unusable after an earlier error"), "{again}");
        s.fail_locally("ignored: the first failure stays".into());
        assert!(s.check(Rank(1)).unwrap_err().to_string().contains("gone"));
    }

    #[test]
    fn local_failures_read_as_aborts() {
        let mut s = ConnState::default();
        assert!(s.check(Rank(0)).is_ok() && !s.is_broken());
        s.fail_locally("this rank aborted: test".into());
        assert!(matches!(s.check(Rank(0)), Err(Error::Aborted { .. })));
    }
}
