//! The listening side every stream transport shares (TCP, shared memory, devmem): the
//! communicator context that [`activate`](crate::transport::Transport::activate) supplies and
//! that incoming handshakes wait for, the table of arriving connections (each transport's
//! own type), the count of refused handshakes, the acceptor thread and its shutdown.
//!
//! A transport keeps one [`Listening`] behind an `Arc` shared with its acceptor thread and
//! the short-lived handshake threads, and implements `activate`, `accept`, `counters` and
//! `close` through it.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sys::eventfd::{EfdFlags, EventFd};

use crate::error::{Error, Result};
use crate::transport::{CommContext, TransportKind};
use crate::types::Rank;

/// Lock a mutex, ignoring poisoning (a panicked handshake thread leaves consistent state:
/// every update is a single assignment).
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// State shared by a transport, its acceptor thread and its handshake threads. `A` is the
/// transport's table of arriving connections.
#[derive(Debug)]
pub struct Listening<A> {
    kind: TransportKind,
    /// The listener as logs name it (`TCP 10.0.0.1:4000`, `shm unix:@devccl-...`).
    name: String,
    ctx: Mutex<Option<CommContext>>,
    ctx_cv: Condvar,
    arrivals: Mutex<A>,
    arrivals_cv: Condvar,
    rejected: AtomicU64,
    closed: AtomicBool,
    /// Handshakes in progress (bounded by [`crate::handshake::MAX_HANDSHAKES`]).
    pub handshakes: AtomicUsize,
    /// Written by `close` to wake the acceptor out of `poll`.
    wake: EventFd,
    /// Bound on each handshake's I/O.
    pub handshake_timeout: Duration,
    /// How long an incoming handshake may wait for `activate`.
    pub activation_timeout: Duration,
    acceptor: Mutex<Option<JoinHandle<()>>>,
}

impl<A: Default> Listening<A> {
    /// Fresh state for a listener of `kind` named `name` in logs.
    pub fn new(
        kind: TransportKind,
        name: String,
        handshake_timeout: Duration,
        activation_timeout: Duration,
    ) -> Result<Listening<A>> {
        let wake = EventFd::from_value_and_flags(0, EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC)
            .map_err(|e| Error::system("eventfd", e.into()))?;
        Ok(Listening {
            kind,
            name,
            ctx: Mutex::new(None),
            ctx_cv: Condvar::new(),
            arrivals: Mutex::new(A::default()),
            arrivals_cv: Condvar::new(),
            rejected: AtomicU64::new(0),
            closed: AtomicBool::new(false),
            handshakes: AtomicUsize::new(0),
            wake,
            handshake_timeout,
            activation_timeout,
            acceptor: Mutex::new(None),
        })
    }
}

impl<A> Listening<A> {
    /// The transport this listener serves.
    pub fn kind(&self) -> TransportKind {
        self.kind
    }

    /// The listener's name in logs.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Start the acceptor thread: `serve(self, wake_fd, closed)` runs until `closed` is set
    /// (typically [`crate::handshake::accept_until_closed`] with this state's wake-up
    /// descriptor).
    pub fn start(self: &Arc<Self>, thread: String, serve: impl FnOnce(&Arc<Self>) + Send + 'static) -> Result<()>
    where
        A: Send + 'static,
    {
        let me = self.clone();
        let h = std::thread::Builder::new()
            .name(thread)
            .spawn(move || serve(&me))
            .map_err(|e| Error::system(format!("spawn {} acceptor thread", self.kind), e))?;
        *lock(&self.acceptor) = Some(h);
        Ok(())
    }

    /// The eventfd `close` rings (the acceptor polls it next to the listener).
    pub fn wake_fd(&self) -> &EventFd {
        &self.wake
    }

    /// The flag the acceptor loop stops on.
    pub fn closed_flag(&self) -> &AtomicBool {
        &self.closed
    }

    /// True once closed.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Count and log a refused incoming connection.
    pub fn reject(&self, remote: &str, reason: &str) {
        self.rejected.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(remote, listener = %self.name, "rejected incoming {} connection: {reason}", self.kind);
    }

    /// Incoming connections refused so far.
    pub fn rejected(&self) -> u64 {
        self.rejected.load(Ordering::Relaxed)
    }

    /// `Transport::activate`: remember the communicator (once); waiting handshakes proceed.
    /// `rank` is the one the transport was created for (a difference is only logged).
    pub fn activate(&self, ctx: CommContext, rank: Rank) -> Result<()> {
        let mut g = lock(&self.ctx);
        if g.is_some() {
            return Err(Error::Internal(format!("{} transport activated twice", self.kind)));
        }
        if ctx.rank != rank {
            tracing::debug!(options = %rank, comm = %ctx.rank, "{} transport: rank from the communicator differs from the options", self.kind);
        }
        *g = Some(ctx);
        self.ctx_cv.notify_all();
        Ok(())
    }

    /// The communicator, once activated.
    pub fn ctx(&self) -> Result<CommContext> {
        lock(&self.ctx).clone().ok_or_else(|| {
            Error::usage(format!("{} transport used before activate() (the rendezvous must finish first)", self.kind))
        })
    }

    /// This rank as far as known (the communicator's, else `fallback`).
    pub fn rank_or(&self, fallback: Rank) -> Rank {
        lock(&self.ctx).as_ref().map_or(fallback, |c| c.rank)
    }

    /// Wait (bounded by the activation timeout) until activated; `None` on timeout or close.
    pub fn wait_ctx(&self) -> Option<CommContext> {
        let deadline = Instant::now() + self.activation_timeout;
        let mut g = lock(&self.ctx);
        loop {
            if let Some(c) = g.as_ref() {
                return Some(c.clone());
            }
            let now = Instant::now();
            if now >= deadline || self.is_closed() {
                return None;
            }
            g = self.ctx_cv.wait_timeout(g, deadline - now).unwrap_or_else(|e| e.into_inner()).0;
        }
    }

    /// The table of arriving connections.
    pub fn arrivals(&self) -> MutexGuard<'_, A> {
        lock(&self.arrivals)
    }

    /// Wake every `accept` waiting for an arrival.
    pub fn notify_arrivals(&self) {
        self.arrivals_cv.notify_all();
    }

    /// `Transport::accept`: wait until `take` finds `peer`'s connection in the table, or the
    /// deadline (then a timeout whose message ends with `pending(table)`, e.g. how many lanes
    /// arrived) or the transport's close.
    pub fn wait_for<T>(
        &self,
        me: Rank,
        peer: Rank,
        deadline: Instant,
        mut take: impl FnMut(&mut A) -> Option<T>,
        pending: impl Fn(&A) -> String,
    ) -> Result<T> {
        let start = Instant::now();
        let mut g = lock(&self.arrivals);
        loop {
            if self.is_closed() {
                return Err(Error::usage(format!("{} transport closed while waiting for a connection", self.kind)));
            }
            if let Some(t) = take(&mut g) {
                return Ok(t);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::Timeout {
                    what: format!(
                        "rank {me} waiting for rank {peer} to connect to {} ({}{} rejected handshakes)",
                        self.name,
                        pending(&g),
                        self.rejected()
                    ),
                    after: deadline.saturating_duration_since(start),
                });
            }
            g = self.arrivals_cv.wait_timeout(g, deadline - now).unwrap_or_else(|e| e.into_inner()).0;
        }
    }

    /// `Transport::close`: stop the acceptor (joined), wake every waiter, then `clear` the
    /// table (connections never accepted are closed there). Idempotent.
    pub fn close(&self, clear: impl FnOnce(&mut A)) {
        if self.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        let _ = self.wake.write(1);
        self.ctx_cv.notify_all();
        self.arrivals_cv.notify_all();
        if let Some(h) = lock(&self.acceptor).take() {
            let _ = h.join();
        }
        clear(&mut lock(&self.arrivals));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::CommId;

    #[test]
    fn activation_accept_and_close() {
        let l: Arc<Listening<Vec<u32>>> = Arc::new(
            Listening::new(TransportKind::Tcp, "test".into(), Duration::from_secs(1), Duration::from_millis(50))
                .unwrap(),
        );
        assert!(l.ctx().is_err());
        assert!(l.wait_ctx().is_none(), "times out before activation");
        let ctx = CommContext { comm: CommId([1; 16]), rank: Rank(0), world: 2, key: None };
        l.activate(ctx.clone(), Rank(0)).unwrap();
        assert!(l.activate(ctx, Rank(0)).is_err(), "twice");
        assert_eq!(l.wait_ctx().unwrap().rank, Rank(0));
        let l2 = l.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            l2.arrivals().push(7);
            l2.notify_arrivals();
        });
        let far = Instant::now() + Duration::from_secs(5);
        let got = l.wait_for(Rank(0), Rank(1), far, |a| a.pop(), |_| String::new()).unwrap();
        assert_eq!(got, 7);
        let soon = Instant::now() + Duration::from_millis(10);
        let e = l.wait_for(Rank(0), Rank(1), soon, |a| a.pop(), |a| format!("{} queued; ", a.len())).unwrap_err();
        assert!(e.to_string().contains("0 queued; 0 rejected handshakes"), "{e}");
        l.reject("x", "garbage");
        assert_eq!(l.rejected(), 1);
        l.close(|a| a.clear());
        assert!(l.is_closed());
        assert!(l.wait_for(Rank(0), Rank(1), far, |a| a.pop(), |_| String::new()).is_err());
    }
}
