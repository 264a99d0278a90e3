//! `devccl._native.Work`: the handle of an asynchronous collective.

use std::sync::{Mutex, TryLockError};
use std::time::{Duration, Instant};

use pyo3::exceptions::PyTimeoutError;
use pyo3::prelude::*;

use crate::errors::to_py;

/// How long one detached wait lasts before the waiter re-attaches to let Python deliver
/// signals (Ctrl-C) to the main thread.
const SLICE: Duration = Duration::from_millis(200);

#[derive(Debug)]
enum State {
    Pending(devccl::Work<()>),
    Finished(Option<PyErr>),
}

/// A collective in flight. `wait()` blocks (without the GIL) until it finished and returns
/// its output buffer, or raises the collective's error; `is_completed()` never blocks.
/// Dropping a Work does not cancel the collective: it still runs, in order, as every rank
/// expects, and its buffers stay alive until it finished.
#[derive(Debug)]
#[pyclass(frozen, name = "Work", module = "devccl._native")]
pub struct PyWork {
    // A waiter holds the lock (detached) for at most one SLICE at a time, and wakes as soon as
    // the work finishes; `is_completed` only tries the lock, so it never blocks (it reports
    // False while another thread is inside a wait slice, i.e. until that thread has seen
    // the completion, microseconds after it happened).
    state: Mutex<State>,
    result: Py<PyAny>,
}

impl PyWork {
    pub(crate) fn new(work: devccl::Work<()>, result: Py<PyAny>) -> PyWork {
        PyWork { state: Mutex::new(State::Pending(work)), result }
    }

    /// Wait until finished or `deadline`; true when finished.
    fn wait_until(&self, py: Python<'_>, deadline: Option<Instant>) -> PyResult<bool> {
        loop {
            let step = match deadline {
                Some(d) => d.saturating_duration_since(Instant::now()).min(SLICE),
                None => SLICE,
            };
            let done = py.detach(|| {
                let g = self.state.lock().unwrap_or_else(|e| e.into_inner());
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
    fn outcome(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        let mut g = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if let State::Pending(_) = &*g {
            let State::Pending(w) = std::mem::replace(&mut *g, State::Finished(None)) else {
                unreachable!("checked just above")
            };
            // Finished already (the caller waited), so this returns at once.
            let r = py.detach(move || w.wait());
            *g = State::Finished(r.err().map(|e| to_py(py, e)));
        }
        match &*g {
            State::Finished(Some(e)) => Err(e.clone_ref(py)),
            _ => Ok(self.result.clone_ref(py)),
        }
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

    /// True once the collective finished (successfully or not). Never blocks.
    fn is_completed(&self) -> bool {
        match self.state.try_lock() {
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
