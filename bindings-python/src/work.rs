//! `devccl._native.Work`: the handle of an asynchronous or stream-ordered collective.

use std::sync::{OnceLock, RwLock, TryLockError};
use std::time::{Duration, Instant};

use pyo3::exceptions::PyTimeoutError;
use pyo3::prelude::*;

use crate::errors::{Kind, err, to_py};

/// How long one detached wait lasts before the waiter re-attaches to let Python deliver
/// signals (Ctrl-C) to the main thread.
const SLICE: Duration = Duration::from_millis(200);

/// A call in flight.
#[derive(Debug)]
pub(crate) enum Pending {
    /// Queued on devccl's progress thread (host memory, or device buffers without bytes).
    Host(devccl::Work<()>),
    /// A receive from any rank queued on the progress thread: finishes with the source.
    HostAny(devccl::Work<usize>),
    /// Ordered after a CUDA stream ([`devccl::Communicator::collective_on_stream`]).
    Stream(devccl::StreamWork),
}

impl Pending {
    fn wait_timeout(&self, d: Duration) -> bool {
        match self {
            Pending::Host(w) => w.wait_timeout(d),
            Pending::HostAny(w) => w.wait_timeout(d),
            Pending::Stream(w) => w.wait_timeout(d),
        }
    }

    fn test(&self) -> bool {
        match self {
            Pending::Host(w) => w.test(),
            Pending::HostAny(w) => w.test(),
            Pending::Stream(w) => w.test(),
        }
    }

    /// Wait for the outcome: for a receive from any rank, the source.
    fn wait(self) -> devccl::Result<Option<usize>> {
        match self {
            Pending::Host(w) => w.wait().map(|()| None),
            Pending::HostAny(w) => w.wait().map(Some),
            Pending::Stream(w) => {
                while !w.wait_timeout(SLICE) {}
                let source = w.source();
                w.wait().map(|()| source)
            }
        }
    }
}

#[derive(Debug)]
enum State {
    Pending(Pending),
    Finished(Option<PyErr>),
}

/// A collective in flight. `wait()` blocks (without the GIL) until it finished and returns
/// its output buffer, or raises the collective's error; `is_completed()` never blocks;
/// `hold(stream)` makes later work on a CUDA stream wait for a stream-ordered call without
/// blocking the host. Dropping a Work does not cancel the collective: it still runs, in
/// order, as every rank expects, and its buffers stay alive until it finished.
#[derive(Debug)]
#[pyclass(frozen, name = "Work", module = "devccl._native")]
pub struct PyWork {
    // Waiters, `hold` and `is_completed` share the read side (a waiter holds it, detached,
    // for at most one SLICE at a time and wakes as soon as the work finishes); only the
    // Pending -> Finished transition, after the work finished, takes the write side. So
    // `hold` never waits for a waiter, and `is_completed` (which only tries the lock) is
    // False only during that transition, microseconds after completion.
    state: RwLock<State>,
    result: Py<PyAny>,
    /// The CUDA stream a stream-ordered call was ordered after (None for host calls).
    stream: Option<u64>,
    /// The source rank of a receive from any rank, once it finished successfully.
    source: OnceLock<usize>,
}

impl PyWork {
    pub(crate) fn new(work: Pending, result: Py<PyAny>, stream: Option<u64>) -> PyWork {
        PyWork { state: RwLock::new(State::Pending(work)), result, stream, source: OnceLock::new() }
    }

    /// The source rank of a finished receive from any rank (None while running, after a
    /// failure, and for every other call).
    pub(crate) fn source_rank(&self, py: Python<'_>) -> Option<usize> {
        if self.is_completed() {
            // Records the outcome (and with it the source); a failure leaves None.
            let _ = self.outcome(py);
        }
        self.source.get().copied()
    }

    /// Wait until finished or `deadline`; true when finished.
    fn wait_until(&self, py: Python<'_>, deadline: Option<Instant>) -> PyResult<bool> {
        loop {
            let step = match deadline {
                Some(d) => d.saturating_duration_since(Instant::now()).min(SLICE),
                None => SLICE,
            };
            let done = py.detach(|| {
                let g = self.state.read().unwrap_or_else(|e| e.into_inner());
                match &*g {
                    State::Pending(w) => w.wait_timeout(step),
                    State::Finished(_) => true,
                }
            });
            if done {
                return Ok(true);
            }
            py.check_signals()?;
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Ok(false);
            }
        }
    }

    /// Record the outcome of a finished work (idempotent) and return it.
    pub(crate) fn outcome(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        // Readers (waiters, hold) release the lock without needing the interpreter, so taking
        // it attached cannot deadlock; once the work finished they hold it only briefly.
        let mut g = self.state.write().unwrap_or_else(|e| e.into_inner());
        if let State::Pending(_) = &*g {
            let State::Pending(w) = std::mem::replace(&mut *g, State::Finished(None)) else {
                unreachable!("checked just above")
            };
            // Finished already (the caller waited), so this returns at once.
            let r = py.detach(move || w.wait());
            if let Ok(Some(src)) = r {
                let _ = self.source.set(src);
            }
            *g = State::Finished(r.err().map(|e| to_py(py, e)));
        }
        match &*g {
            State::Finished(Some(e)) => Err(e.clone_ref(py)),
            _ => Ok(self.result.clone_ref(py)),
        }
    }

    /// Make `stream` (default: the call's) wait for a stream-ordered call.
    pub(crate) fn hold_stream(&self, py: Python<'_>, stream: Option<u64>) -> PyResult<()> {
        let Some(own) = self.stream else {
            return Err(err(
                py,
                Kind::Usage,
                "hold() orders a CUDA stream after a call on CUDA memory; this call ran on host memory (use wait())",
            ));
        };
        let s = stream.unwrap_or(own);
        let r = py.detach(|| {
            let g = self.state.read().unwrap_or_else(|e| e.into_inner());
            match &*g {
                State::Pending(Pending::Stream(w)) => w.hold(s),
                // Finished (device work included), or a call without device bytes: nothing
                // on the device to wait for.
                _ => Ok(()),
            }
        });
        r.map_err(|e| to_py(py, e))
    }
}

#[pymethods]
impl PyWork {
    /// Wait for the collective and return its output buffer (the object passed as output, or
    /// the in-place buffer; None for calls without output). Raises the collective's error.
    /// With `timeout` (seconds), raises the built-in TimeoutError if it has not finished by
    /// then; the work keeps running and can be waited on again.
    #[pyo3(signature = (timeout=None))]
    pub(crate) fn wait(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<Py<PyAny>> {
        let deadline = match timeout {
            Some(t) if t.is_finite() && t >= 0.0 => Some(Instant::now() + Duration::from_secs_f64(t.min(1e9))),
            Some(t) if t.is_nan() || t < 0.0 => {
                return Err(pyo3::exceptions::PyValueError::new_err(format!("timeout must be >= 0, got {t}")));
            }
            _ => None,
        };
        if !self.wait_until(py, deadline)? {
            return Err(PyTimeoutError::new_err(format!(
                "the collective did not finish within {} s",
                timeout.unwrap_or(0.0)
            )));
        }
        self.outcome(py)
    }

    /// Make work queued on the CUDA stream `stream` (a raw `CUstream` handle; default: the
    /// stream the call was ordered after) from now on wait for this stream-ordered call,
    /// without blocking the host. Idempotent, and fine before or after completion. Raises
    /// InvalidUsageError for calls on host memory.
    #[pyo3(signature = (stream=None))]
    fn hold(&self, py: Python<'_>, stream: Option<u64>) -> PyResult<()> {
        self.hold_stream(py, stream)
    }

    /// The CUDA stream a stream-ordered call was ordered after, or None for host calls.
    #[getter]
    fn stream(&self) -> Option<u64> {
        self.stream
    }

    /// For a receive from any rank (`Communicator.recv_any(..., async_op=True)`): the rank
    /// the message came from, once the receive finished successfully. None while it runs,
    /// after it failed (`wait()` raises the error), and for every other call. Never blocks.
    #[getter]
    fn source(&self, py: Python<'_>) -> Option<usize> {
        self.source_rank(py)
    }

    /// True once the collective finished (successfully or not). Never blocks.
    pub(crate) fn is_completed(&self) -> bool {
        match self.state.try_read() {
            Ok(g) => match &*g {
                State::Pending(w) => w.test(),
                State::Finished(_) => true,
            },
            Err(TryLockError::WouldBlock) => false,
            Err(TryLockError::Poisoned(g)) => match &*g.into_inner() {
                State::Pending(w) => w.test(),
                State::Finished(_) => true,
            },
        }
    }

    /// True when the collective finished without error. Never blocks; False while running.
    fn is_success(&self, py: Python<'_>) -> PyResult<bool> {
        if !self.is_completed() {
            return Ok(false);
        }
        Ok(self.outcome(py).is_ok())
    }

    fn __repr__(&self) -> String {
        format!("<devccl Work {}>", if self.is_completed() { "completed" } else { "pending" })
    }
}
