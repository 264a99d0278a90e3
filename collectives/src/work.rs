//! Asynchronous execution: a per-communicator queue of collectives, run in issue order by a
//! background progress thread, and the [`Work`] handles callers wait on.
//!
//! A blocking call does not pay a thread hand-off when nothing is queued: it runs on the
//! caller's thread ("inline") while the queue is idle, and otherwise queues behind the
//! outstanding work and waits, so calls always execute — and therefore match across ranks —
//! in the order they were issued on each rank.

use std::collections::VecDeque;
use std::fmt;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use devccl_core::wire::CollKind;
use devccl_core::{Error, Result};

use crate::exec::{Bindings, CallInfo, Executor};
use crate::schedule::Schedule;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Completion state shared between a queued job and its [`Work`] handle.
#[derive(Debug, Default)]
pub(crate) struct Completion {
    result: Mutex<Option<Result<()>>>,
    cv: Condvar,
    /// When the collective started and finished executing (for overlap accounting).
    span: Mutex<Option<(Instant, Instant)>>,
}

impl Completion {
    fn set(&self, r: Result<()>) {
        *lock(&self.result) = Some(r);
        self.cv.notify_all();
    }

    fn set_timed(&self, r: Result<()>, started: Instant) {
        *lock(&self.span) = Some((started, Instant::now()));
        self.set(r);
    }

    fn is_set(&self) -> bool {
        lock(&self.result).is_some()
    }

    /// Wait until set or `deadline`; true when set.
    fn wait_until(&self, deadline: Option<Instant>) -> bool {
        let mut g = lock(&self.result);
        while g.is_none() {
            match deadline {
                None => g = self.cv.wait(g).unwrap_or_else(|e| e.into_inner()),
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        return false;
                    }
                    g = self.cv.wait_timeout(g, d - now).unwrap_or_else(|e| e.into_inner()).0;
                }
            }
        }
        true
    }

    fn take(&self) -> Result<()> {
        lock(&self.result).take().unwrap_or_else(|| Err(Error::Internal("work result taken twice".into())))
    }
}

/// A collective in flight. `wait` returns its output (for typed async calls, the buffers
/// the caller handed over); dropping a `Work` does not cancel the collective — it still runs,
/// in order, as every rank expects.
pub struct Work<T = ()> {
    done: Arc<Completion>,
    finish: Option<Box<dyn FnOnce() -> Result<T> + Send + Sync>>,
}

impl<T> fmt::Debug for Work<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Work").field("completed", &self.done.is_set()).finish()
    }
}

impl<T> Work<T> {
    pub(crate) fn new(done: Arc<Completion>, finish: impl FnOnce() -> Result<T> + Send + Sync + 'static) -> Work<T> {
        Work { done, finish: Some(Box::new(finish)) }
    }

    /// A work item that already failed (argument errors found before queueing).
    pub(crate) fn failed(e: Error) -> Work<T> {
        let done = Arc::new(Completion::default());
        done.set(Err(e));
        Work { done, finish: None }
    }

    /// True once the collective finished (successfully or not). Never blocks.
    pub fn test(&self) -> bool {
        self.done.is_set()
    }

    /// Wait at most `timeout` for completion; true when finished. The collective itself is
    /// bounded by `DEVCCL_TIMEOUT` (no progress) whatever the caller waits.
    pub fn wait_timeout(&self, timeout: Duration) -> bool {
        self.done.wait_until(Some(Instant::now() + timeout))
    }

    /// How long the collective executed (from leaving the queue to completion), once
    /// finished. With [`Work::wait`]'s own blocking time this tells how much communication
    /// was hidden behind the caller's computation.
    pub fn execution_time(&self) -> Option<Duration> {
        lock(&self.done.span).map(|(a, b)| b - a)
    }

    /// Wait for completion and return the output.
    pub fn wait(mut self) -> Result<T> {
        self.done.wait_until(None);
        self.done.take()?;
        match self.finish.take() {
            Some(f) => f(),
            None => Err(Error::Internal("work has no output".into())),
        }
    }

    /// Map the output.
    pub fn map<U>(mut self, f: impl FnOnce(T) -> Result<U> + Send + Sync + 'static) -> Work<U>
    where
        T: 'static,
    {
        let inner = self.finish.take();
        Work {
            done: self.done.clone(),
            finish: inner.map(|g| -> Box<dyn FnOnce() -> Result<U> + Send + Sync> { Box::new(move || f(g()?)) }),
        }
    }
}

/// Runs when a job starts executing (e.g. make devccl's CUDA stream wait for the work the
/// caller's stream had queued at call time); an error fails the job.
pub(crate) type BeforeHook = Box<dyn FnOnce() -> Result<()> + Send>;
/// Runs once when a job ends, successfully or not (e.g. release a CUDA stream gate so the
/// caller's stream never waits forever).
pub(crate) type AfterHook = Box<dyn FnOnce(&Result<()>) + Send>;

/// The rest of a receive from any rank, settled when its job runs: the source is chosen
/// then (in issue order with everything else, holding the executor), and only then is the
/// schedule built.
pub(crate) struct AnySource {
    /// The schedule of the receive from a given peer.
    pub(crate) build: Box<dyn FnOnce(usize) -> Schedule + Send>,
    /// The chosen source, once chosen (read by the caller's work handle).
    pub(crate) source: Arc<OnceLock<usize>>,
}

/// One queued collective.
pub(crate) struct Job {
    pub(crate) sched: Schedule,
    /// The call(s): one, or several batched point-to-point operations.
    pub(crate) calls: Vec<CallInfo>,
    pub(crate) bindings: Bindings,
    pub(crate) done: Arc<Completion>,
    pub(crate) before: Option<BeforeHook>,
    pub(crate) after: Option<AfterHook>,
    /// A receive from any rank: `sched` is empty until the source is known.
    pub(crate) any: Option<AnySource>,
}

impl Job {
    pub(crate) fn new(sched: Schedule, calls: Vec<CallInfo>, bindings: Bindings) -> Job {
        Job { sched, calls, bindings, done: Arc::new(Completion::default()), before: None, after: None, any: None }
    }

    /// Fail without running (the after hook still runs).
    fn fail(self, e: Error) {
        let r = Err(e);
        if let Some(f) = self.after {
            f(&r);
        }
        self.done.set(r);
    }
}

#[derive(Default)]
struct Queue {
    jobs: VecDeque<Job>,
    busy: bool,
    shutdown: bool,
    worker: bool,
}

/// The communicator's execution engine: the executor, the queue and the poison state.
pub(crate) struct Engine {
    exec: Mutex<Executor>,
    queue: Mutex<Queue>,
    cv: Condvar,
    poison: Mutex<Option<String>>,
    /// Called once with the first fatal error (the communicator broadcasts it through the
    /// rendezvous, so ranks that are not connected to the failure hear of it too).
    on_fatal: Mutex<Option<Box<dyn FnOnce(&Error) + Send>>>,
}

impl fmt::Debug for Engine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Engine").field("poison", &*lock(&self.poison)).finish()
    }
}

impl Engine {
    pub(crate) fn new(exec: Executor) -> Arc<Engine> {
        Arc::new(Engine {
            exec: Mutex::new(exec),
            queue: Mutex::new(Queue::default()),
            cv: Condvar::new(),
            poison: Mutex::new(None),
            on_fatal: Mutex::new(None),
        })
    }

    /// Set the hook run once on the first fatal error.
    pub(crate) fn set_on_fatal(&self, f: Box<dyn FnOnce(&Error) + Send>) {
        *lock(&self.on_fatal) = Some(f);
    }

    pub(crate) fn poisoned(&self) -> Option<String> {
        lock(&self.poison).clone()
    }

    pub(crate) fn poison_with(&self, cause: &str) {
        let mut p = lock(&self.poison);
        if p.is_none() {
            *p = Some(cause.to_string());
        }
    }

    pub(crate) fn check_alive(&self) -> Result<()> {
        match lock(&self.poison).as_ref() {
            Some(cause) => Err(Error::Aborted { cause: cause.clone() }),
            None => Ok(()),
        }
    }

    fn run_job(&self, job: Job) {
        let started = Instant::now();
        let Job { sched, mut calls, bindings, done, before, after, any } = job;
        let r = self.check_alive().and_then(|()| before.map_or(Ok(()), |f| f())).and_then(|()| {
            let mut exec = lock(&self.exec);
            let r = Engine::execute(&mut exec, sched, &mut calls, &bindings, any);
            if let Err(e) = &r
                && e.is_fatal()
            {
                self.poison_with(&e.to_string());
                if let Some(f) = lock(&self.on_fatal).take() {
                    f(e);
                }
            }
            r
        });
        // Release the buffers before announcing completion: the waiter takes them back.
        drop(bindings);
        if let Some(f) = after {
            f(&r);
        }
        done.set_timed(r, started);
    }

    /// Run one job's calls on the executor; an any-source receive first chooses its source.
    fn execute(
        exec: &mut Executor,
        mut sched: Schedule,
        calls: &mut [CallInfo],
        bindings: &Bindings,
        any: Option<AnySource>,
    ) -> Result<()> {
        let mut chosen = None;
        if let Some(any) = any {
            let src = exec.match_any_source(&calls[0])?.idx();
            sched = (any.build)(src);
            chosen = Some((any.source, src));
        }
        for (k, info) in calls.iter_mut().enumerate() {
            info.seq = if info.coll == CollKind::SendRecv { exec.next_p2p_seq(&sched, k) } else { exec.next_seq() };
        }
        tracing::debug!(rank = exec.rank.0, call = %calls[0].describe(), calls = calls.len(), steps = sched.len(), "collective");
        exec.run(&sched, calls, bindings)?;
        if let Some((slot, src)) = chosen {
            let _ = slot.set(src);
        }
        Ok(())
    }

    /// Run `job` now on this thread if the queue is idle, else queue it and wait; in both
    /// cases return when it finished.
    pub(crate) fn run_blocking(self: &Arc<Self>, job: Job) -> Result<()> {
        let done = job.done.clone();
        {
            let mut q = lock(&self.queue);
            if q.jobs.is_empty() && !q.busy {
                q.busy = true;
                drop(q);
                self.run_job(job);
                let mut q = lock(&self.queue);
                q.busy = false;
                drop(q);
                self.cv.notify_all();
                return done.take();
            }
            q.jobs.push_back(job);
            self.ensure_worker(&mut q);
        }
        self.cv.notify_all();
        done.wait_until(None);
        done.take()
    }

    /// Queue `job` for the progress thread.
    pub(crate) fn submit(self: &Arc<Self>, job: Job) {
        let mut q = lock(&self.queue);
        if q.shutdown {
            drop(q);
            job.fail(Error::Aborted { cause: "communicator destroyed".into() });
            return;
        }
        q.jobs.push_back(job);
        self.ensure_worker(&mut q);
        drop(q);
        self.cv.notify_all();
    }

    fn ensure_worker(self: &Arc<Self>, q: &mut Queue) {
        if q.worker {
            return;
        }
        q.worker = true;
        let me = self.clone();
        let spawned = std::thread::Builder::new().name("devccl-progress".into()).spawn(move || me.worker_loop());
        if let Err(e) = spawned {
            q.worker = false;
            for j in q.jobs.drain(..) {
                j.fail(Error::system("spawning the progress thread", std::io::Error::other(e.to_string())));
            }
        }
    }

    fn worker_loop(self: Arc<Self>) {
        loop {
            let job = {
                let mut q = lock(&self.queue);
                loop {
                    if !q.busy {
                        if let Some(j) = q.jobs.pop_front() {
                            q.busy = true;
                            break j;
                        }
                        if q.shutdown {
                            q.worker = false;
                            return;
                        }
                    }
                    q = self.cv.wait(q).unwrap_or_else(|e| e.into_inner());
                }
            };
            self.run_job(job);
            lock(&self.queue).busy = false;
            self.cv.notify_all();
        }
    }

    /// Wait until every queued job finished (bounded by `deadline`).
    pub(crate) fn drain(&self, deadline: Instant) -> bool {
        let mut q = lock(&self.queue);
        while !q.jobs.is_empty() || q.busy {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            q = self.cv.wait_timeout(q, deadline - now).unwrap_or_else(|e| e.into_inner()).0;
        }
        true
    }

    /// Stop the progress thread after the queue drains; later submissions fail.
    pub(crate) fn shutdown(&self) {
        lock(&self.queue).shutdown = true;
        self.cv.notify_all();
    }
}
