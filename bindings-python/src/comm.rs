//! `devccl._native.Communicator`: a devccl communicator driven from Python.
//!
//! Every collective goes through one method, [`PyCommunicator::collective`], which names the
//! collective by string and takes buffer-protocol objects (numpy arrays, `bytearray`,
//! `memoryview`, `array.array`) or CUDA memory (objects with `__cuda_array_interface__` and a
//! `device`). The `devccl` package wraps it with one typed method per collective that also
//! accepts torch tensors. Blocking calls on host memory release the GIL for the whole
//! collective; asynchronous calls return a [`PyWork`]. Calls on CUDA memory are always
//! stream-ordered, like NCCL's: ordered after the work queued on a CUDA stream, never
//! blocking the host (see [`PyCommunicator::collective`]).

use std::str::FromStr;
use std::sync::RwLock;
use std::time::Duration;

use devccl::{Collective, Communicator, DType, InitOptions, ReduceOp};
use devccl_core::config::Config;
use pyo3::prelude::*;
use pyo3::types::PyString;

use crate::buffer::{self, Lifetime, Operands, Place};
use crate::errors::{Kind, err, to_py};
use crate::work::{Pending, PyWork};

/// A devccl communicator: a group of ranks that run collectives together.
///
/// Build it with `Communicator.from_env()` under a launcher (torchrun, `devccl launch`, srun,
/// mpirun), or `Communicator(rank, world_size, rendezvous, ...)` explicitly. Initialisation
/// blocks (without the GIL) until every rank joined, bounded by DEVCCL_INIT_TIMEOUT.
#[derive(Debug)]
#[pyclass(frozen, name = "Communicator", module = "devccl._native")]
pub struct PyCommunicator {
    comm: RwLock<Option<Communicator>>,
}

fn seconds(py: Python<'_>, what: &str, v: Option<f64>) -> PyResult<Option<Duration>> {
    match v {
        None => Ok(None),
        Some(s) if s > 0.0 && s.is_finite() => Ok(Some(Duration::from_secs_f64(s))),
        Some(s) => Err(err(py, Kind::Usage, format!("{what} must be a positive number of seconds, got {s}"))),
    }
}

/// Parse a dtype name (`f32`, `float32`, `bf16`, ...).
pub(crate) fn parse_dtype(py: Python<'_>, s: &str) -> PyResult<DType> {
    DType::from_str(s).map_err(|e| match e {
        devccl::Error::InvalidUsage(m) => err(py, Kind::DType, m),
        e => to_py(py, e),
    })
}

fn parse_op(py: Python<'_>, s: &str) -> PyResult<ReduceOp> {
    ReduceOp::from_str(s).map_err(|e| to_py(py, e))
}

fn counts(py: Python<'_>, name: &str, v: Option<Vec<usize>>) -> PyResult<Vec<usize>> {
    v.ok_or_else(|| err(py, Kind::Usage, format!("all_to_all_v needs {name}")))
}

/// Which collective a kind string names, with its parameters.
#[allow(clippy::too_many_arguments)]
fn describe(
    py: Python<'_>,
    kind: &str,
    op: &str,
    root: usize,
    peer: usize,
    tag: u32,
    send_counts: Option<Vec<usize>>,
    send_displs: Option<Vec<usize>>,
    recv_counts: Option<Vec<usize>>,
    recv_displs: Option<Vec<usize>>,
) -> PyResult<Collective> {
    Ok(match kind {
        "all_reduce" => Collective::AllReduce { op: parse_op(py, op)? },
        "broadcast" => Collective::Broadcast { root },
        "reduce" => Collective::Reduce { op: parse_op(py, op)?, root },
        "all_gather" => Collective::AllGather,
        "reduce_scatter" => Collective::ReduceScatter { op: parse_op(py, op)? },
        "all_to_all" => Collective::AllToAll,
        "all_to_all_v" => Collective::AllToAllV {
            send_counts: counts(py, "send_counts", send_counts)?,
            send_displs: counts(py, "send_displs", send_displs)?,
            recv_counts: counts(py, "recv_counts", recv_counts)?,
            recv_displs: counts(py, "recv_displs", recv_displs)?,
        },
        "gather" => Collective::Gather { root },
        "scatter" => Collective::Scatter { root },
        "send" => Collective::Send { peer, tag },
        "recv" => Collective::Recv { peer, tag },
        "barrier" => Collective::Barrier,
        other => {
            return Err(err(
                py,
                Kind::Usage,
                format!(
                    "unknown collective '{other}' (all_reduce broadcast reduce all_gather reduce_scatter all_to_all \
                     all_to_all_v gather scatter send recv barrier)"
                ),
            ));
        }
    })
}

/// One operation of `p2p_batch` as Python passes it: (is_send, peer, tag, buffer, dtype).
type P2pSpec<'py> = (bool, usize, u32, Bound<'py, PyAny>, Option<String>);

/// How a call on CUDA memory was started.
enum Started {
    /// Stream-ordered (the result of `collective_on_stream` / `p2p_batch_on_stream`).
    Stream(devccl::Result<devccl::StreamWork>),
    /// Queued on the host: the device buffers hold no bytes, so nothing on a device needs
    /// ordering.
    Host(Pending),
}

/// Finish starting a call on CUDA memory ordered after `stream`: raise errors found before
/// anything was queued; then either hold `stream` at once and return `result` (blocking
/// semantics: the host does not wait, the stream does) or return a Work.
fn stream_call(
    py: Python<'_>,
    started: Started,
    stream: u64,
    result: Py<PyAny>,
    async_op: bool,
) -> PyResult<Py<PyAny>> {
    let pending = match started {
        Started::Stream(r) => Pending::Stream(r.map_err(|e| to_py(py, e))?),
        Started::Host(p) => p,
    };
    let work = Bound::new(py, PyWork::new(pending, result.clone_ref(py), Some(stream)))?;
    if work.get().is_completed() {
        // Argument errors of the host form arrive as an already-failed work: raise them now.
        work.get().outcome(py)?;
    }
    if async_op {
        return Ok(work.into_any().unbind());
    }
    work.get().hold_stream(py, None)?;
    Ok(result)
}

fn no_stream(py: Python<'_>) -> PyErr {
    err(py, Kind::Usage, "stream= orders calls on CUDA memory after a CUDA stream; these buffers are in host memory")
}

impl PyCommunicator {
    fn handle(&self, py: Python<'_>) -> PyResult<Communicator> {
        self.comm
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or_else(|| err(py, Kind::Usage, "the communicator was destroyed"))
    }

    fn wrap(py: Python<'_>, o: InitOptions) -> PyResult<PyCommunicator> {
        let c = py.detach(move || Communicator::init_with(o)).map_err(|e| to_py(py, e))?;
        Ok(PyCommunicator { comm: RwLock::new(Some(c)) })
    }
}

impl Drop for PyCommunicator {
    fn drop(&mut self) {
        if let Some(c) = self.comm.get_mut().unwrap_or_else(|e| e.into_inner()).take() {
            // Dropping the last handle drains queued work and closes connections; finishing
            // work may need the GIL (to release buffer exports), so never hold it meanwhile.
            // If the interpreter cannot be attached (it is shutting down), the closure is
            // dropped unrun and the handle with it.
            let _ = Python::try_attach(move |py| py.detach(move || drop(c)));
        }
    }
}

#[pymethods]
impl PyCommunicator {
    /// Join a communicator of `world_size` ranks through the rendezvous at `rendezvous`
    /// (`host:port`). With `host_rendezvous=True` this process also runs the rendezvous server
    /// there (rank 0 usually does). `group` names the communicator on the rendezvous (several
    /// may share one server). `timeout` / `init_timeout` (seconds) override DEVCCL_TIMEOUT /
    /// DEVCCL_INIT_TIMEOUT; everything else comes from the DEVCCL_* environment.
    #[new]
    #[pyo3(signature = (rank, world_size, rendezvous, *, host_rendezvous=false, group="world".to_string(), local_world_size=None, timeout=None, init_timeout=None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        rank: usize,
        world_size: usize,
        rendezvous: String,
        host_rendezvous: bool,
        group: String,
        local_world_size: Option<usize>,
        timeout: Option<f64>,
        init_timeout: Option<f64>,
    ) -> PyResult<PyCommunicator> {
        let mut config = Config::from_env().map_err(|e| to_py(py, e))?;
        if let Some(t) = seconds(py, "timeout", timeout)? {
            config.timeout = t;
        }
        if let Some(t) = seconds(py, "init_timeout", init_timeout)? {
            config.init_timeout = t;
        }
        let o = InitOptions {
            rank,
            world: world_size,
            local_world: local_world_size,
            rendezvous,
            host_rendezvous,
            group,
            config,
        };
        PyCommunicator::wrap(py, o)
    }

    /// Join the communicator the launcher describes (RANK, WORLD_SIZE, MASTER_ADDR,
    /// MASTER_PORT under torchrun and `devccl launch`; SLURM_* under srun; OMPI_* under
    /// mpirun). Rank 0 hosts the rendezvous unless DEVCCL_RENDEZVOUS_EXTERNAL=1.
    #[staticmethod]
    fn from_env(py: Python<'_>) -> PyResult<PyCommunicator> {
        let o = InitOptions::from_env().map_err(|e| to_py(py, e))?;
        PyCommunicator::wrap(py, o)
    }

    /// This process's rank.
    #[getter]
    fn rank(&self, py: Python<'_>) -> PyResult<usize> {
        Ok(self.handle(py)?.rank())
    }

    /// Number of ranks.
    #[getter]
    fn world_size(&self, py: Python<'_>) -> PyResult<usize> {
        Ok(self.handle(py)?.world_size())
    }

    /// The rendezvous group name.
    #[getter]
    fn group(&self, py: Python<'_>) -> PyResult<String> {
        Ok(self.handle(py)?.group().to_string())
    }

    /// The communicator's id (the same on every rank), as hex.
    #[getter]
    fn comm_id(&self, py: Python<'_>) -> PyResult<String> {
        Ok(self.handle(py)?.comm_id().0.iter().map(|b| format!("{b:02x}")).collect())
    }

    /// Why the communicator is unusable (aborted, or poisoned by a failure), or None.
    #[getter]
    fn poisoned(&self, py: Python<'_>) -> PyResult<Option<String>> {
        Ok(self.handle(py)?.poisoned())
    }

    /// True once `destroy()` was called.
    #[getter]
    fn destroyed(&self) -> bool {
        self.comm.read().unwrap_or_else(|e| e.into_inner()).is_none()
    }

    /// Run one collective. `kind` is one of all_reduce, broadcast, reduce, all_gather,
    /// reduce_scatter, all_to_all, all_to_all_v, gather, scatter, send, recv, barrier;
    /// `input` / `output` are C-contiguous buffers (see the `devccl` package for the size
    /// rules of each). A missing `output` means in place for all_reduce, broadcast,
    /// all_to_all and (on the root) reduce, and "no output" otherwise. `dtype` names the
    /// element type when the buffers' format does not (e.g. 'bf16' for a 2-byte view).
    ///
    /// Host memory, blocking (default): returns the output object (or the in-place buffer,
    /// or None) once the collective finished on this rank, with the GIL released meanwhile.
    /// With `async_op=True`: returns a `Work` at once.
    ///
    /// CUDA memory (objects with `__cuda_array_interface__` and a `device`; input and output
    /// on one device): stream-ordered, like an NCCL call. The collective's device work waits
    /// for everything queued on `stream` (a raw `CUstream`; default: the stream the array
    /// interface names, else 0, the legacy default stream) before the call, and the call
    /// never blocks the host. Blocking form: `stream` is held at once (work queued on it
    /// afterwards waits for the collective) and the output object is returned. With
    /// `async_op=True`: a `Work` whose `hold(stream)` does that later and whose `wait()`
    /// blocks the host. Errors found before anything was queued raise at once; later errors
    /// release held streams (the output is then undefined), poison the communicator (every
    /// later call raises) and are raised by the Work's `wait()`.
    #[pyo3(signature = (kind, input=None, output=None, *, op="sum", root=0, peer=0, tag=0, send_counts=None, send_displs=None, recv_counts=None, recv_displs=None, dtype=None, async_op=false, stream=None))]
    #[allow(clippy::too_many_arguments)]
    fn collective<'py>(
        &self,
        py: Python<'py>,
        kind: &str,
        input: Option<Bound<'py, PyAny>>,
        output: Option<Bound<'py, PyAny>>,
        op: &str,
        root: usize,
        peer: usize,
        tag: u32,
        send_counts: Option<Vec<usize>>,
        send_displs: Option<Vec<usize>>,
        recv_counts: Option<Vec<usize>>,
        recv_displs: Option<Vec<usize>>,
        dtype: Option<&str>,
        async_op: bool,
        stream: Option<u64>,
    ) -> PyResult<Py<PyAny>> {
        let comm = self.handle(py)?;
        let c = describe(py, kind, op, root, peer, tag, send_counts, send_displs, recv_counts, recv_displs)?;
        let want = dtype.map(|d| parse_dtype(py, d)).transpose()?;
        let in_place_default = match &c {
            Collective::AllReduce { .. } | Collective::Broadcast { .. } | Collective::AllToAll => true,
            Collective::Reduce { root, .. } => *root == comm.rank(),
            _ => false,
        };
        let (ops, result, dt) = match (input, output) {
            (Some(i), None) if in_place_default => {
                let e = buffer::export(&i, "buffer", true)?;
                let dt = e.dtype(py, "buffer", want)?;
                (Operands::InPlace(e), i.unbind(), dt)
            }
            (i, o) => {
                let ei = i.as_ref().map(|i| buffer::export(i, "input", false)).transpose()?;
                let eo = o.as_ref().map(|o| buffer::export(o, "output", true)).transpose()?;
                let di = ei.as_ref().map(|e| e.dtype(py, "input", want)).transpose()?;
                let d_o = eo.as_ref().map(|e| e.dtype(py, "output", want)).transpose()?;
                let dt = match (di, d_o) {
                    (Some(a), Some(b)) if a != b => {
                        return Err(err(
                            py,
                            Kind::DType,
                            format!("input holds {} elements but output holds {}", a.nccl_name(), b.nccl_name()),
                        ));
                    }
                    (Some(a), _) | (None, Some(a)) => a,
                    (None, None) => want.unwrap_or(DType::U8),
                };
                let result = match (o, i) {
                    (Some(o), _) => o.unbind(),
                    (None, Some(i)) if matches!(c, Collective::Reduce { .. }) => i.unbind(),
                    _ => py.None(),
                };
                (Operands::Separate(ei, eo), result, dt)
            }
        };
        if let Place::Cuda { bytes, stream: named } = buffer::placement(py, &ops.exports())? {
            let s = stream.or(named).unwrap_or(0);
            let b = buffer::bind(py, ops, Lifetime::Work)?;
            let (i, o) = (b.input, b.output);
            let started = if bytes {
                // Detached: the first call on a device opens it (driver, kernels).
                Started::Stream(py.detach(|| comm.collective_on_stream(&c, dt, i, o, s)))
            } else {
                Started::Host(Pending::Host(comm.collective_async(&c, dt, i, o)))
            };
            return stream_call(py, started, s, result, async_op);
        }
        if stream.is_some() {
            return Err(no_stream(py));
        }
        if async_op {
            let b = buffer::bind(py, ops, Lifetime::Work)?;
            let w = comm.collective_async(&c, dt, b.input, b.output);
            let work = Bound::new(py, PyWork::new(Pending::Host(w), result, None))?;
            Ok(work.into_any().unbind())
        } else {
            let b = buffer::bind(py, ops, Lifetime::Call)?;
            let (i, o, guard) = (b.input, b.output, b.guard);
            let r = py.detach(move || comm.collective(&c, dt, i, o));
            drop(guard);
            r.map_err(|e| to_py(py, e))?;
            Ok(result)
        }
    }

    /// Run several sends and receives as one operation (like NCCL group calls around
    /// send/recv): they progress together, so two ranks that exchange large buffers cannot
    /// deadlock. `ops` is a list of `(is_send, peer, tag, buffer, dtype)` (`dtype` None unless
    /// the buffer's format does not name it, as for bf16); between a pair of ranks, messages
    /// match in list order. Blocking by default; `async_op=True` returns a `Work`. Buffers
    /// all in host memory, or all CUDA memory of one device: then the batch is
    /// stream-ordered after `stream` as [`collective`](Self::collective) describes.
    #[pyo3(signature = (ops, *, async_op=false, stream=None))]
    fn p2p_batch<'py>(
        &self,
        py: Python<'py>,
        ops: Vec<P2pSpec<'py>>,
        async_op: bool,
        stream: Option<u64>,
    ) -> PyResult<Py<PyAny>> {
        let comm = self.handle(py)?;
        let mut exported = Vec::with_capacity(ops.len());
        for (send, peer, tag, obj, dtype) in &ops {
            let want = dtype.as_deref().map(|d| parse_dtype(py, d)).transpose()?;
            let what = if *send { "send buffer" } else { "recv buffer" };
            let e = buffer::export(obj, what, !*send)?;
            let dt = e.dtype(py, what, want)?;
            exported.push((*send, *peer, *tag, dt, e));
        }
        let place = buffer::placement(py, &exported.iter().map(|x| &x.4).collect::<Vec<_>>())?;
        let mut batch = Vec::with_capacity(exported.len());
        for (send, peer, tag, dtype, e) in exported {
            // Each buffer keeps its own export alive for as long as the work runs.
            let operands = if send { Operands::Separate(Some(e), None) } else { Operands::Separate(None, Some(e)) };
            let b = buffer::bind(py, operands, Lifetime::Work)?;
            let buf = if send { b.input } else { b.output };
            batch.push(devccl::P2pOp { send, peer, tag, dtype, buf });
        }
        if let Place::Cuda { bytes, stream: named } = place {
            let s = stream.or(named).unwrap_or(0);
            let started = if bytes {
                Started::Stream(py.detach(|| comm.p2p_batch_on_stream(batch, s)))
            } else {
                Started::Host(Pending::Host(comm.p2p_batch_async(batch)))
            };
            return stream_call(py, started, s, py.None(), async_op);
        }
        if stream.is_some() {
            return Err(no_stream(py));
        }
        let w = comm.p2p_batch_async(batch);
        let work = Bound::new(py, PyWork::new(Pending::Host(w), py.None(), None))?;
        if async_op {
            return Ok(work.into_any().unbind());
        }
        work.borrow().wait(py, None)?;
        Ok(py.None())
    }

    /// Receive into `buf` from whichever rank sends first (MPI_ANY_SOURCE; torch's `recv`
    /// without `src`). The message taken is the first found whose sender's next
    /// point-to-point message to this rank (in that pair's usual order) has `tag`; a rank
    /// whose next message is something else does not match, and is not skipped over. The
    /// receive then works as `collective("recv", ...)` from that rank: the sender's size
    /// and dtype must match `buf`. Runs in issue order with the other calls; waiting is
    /// bounded by the communicator's timeout (DevcclTimeoutError naming the tag and ranks).
    /// `buf` must be writable, C-contiguous and not empty; `dtype` as for `collective`.
    ///
    /// Host memory, blocking (default): returns the source rank (an int), with the GIL
    /// released meanwhile. `async_op=True`: returns a `Work` at once; its `wait()` returns
    /// `buf`, and its `source` property is the source rank once it finished (None before).
    ///
    /// CUDA memory: ordered after `stream` like `collective`. Blocking form: holds `stream`,
    /// then waits on the host (GIL released) until the message arrived, since the source is
    /// only known then, and returns the source rank. `async_op=True`: a `Work` as above
    /// (`hold(stream)` orders a stream after it without blocking).
    #[pyo3(signature = (buf, tag=0, *, dtype=None, async_op=false, stream=None))]
    fn recv_any<'py>(
        &self,
        py: Python<'py>,
        buf: Bound<'py, PyAny>,
        tag: u32,
        dtype: Option<&str>,
        async_op: bool,
        stream: Option<u64>,
    ) -> PyResult<Py<PyAny>> {
        let comm = self.handle(py)?;
        let want = dtype.map(|d| parse_dtype(py, d)).transpose()?;
        let e = buffer::export(&buf, "buffer", true)?;
        let dt = e.dtype(py, "buffer", want)?;
        let place = buffer::placement(py, &[&e])?;
        let ops = Operands::Separate(None, Some(e));
        if let Place::Cuda { bytes, stream: named } = place {
            let s = stream.or(named).unwrap_or(0);
            let o = buffer::bind(py, ops, Lifetime::Work)?.output;
            let started = if bytes {
                Started::Stream(py.detach(|| comm.recv_any_on_stream(dt, o, tag, s)))
            } else {
                Started::Host(Pending::HostAny(comm.recv_any_async(dt, o, tag)))
            };
            let work = stream_call(py, started, s, buf.unbind(), true)?;
            if async_op {
                return Ok(work);
            }
            let w = work.bind(py).cast::<PyWork>()?.get();
            w.hold_stream(py, None)?;
            w.wait(py, None)?;
            return Ok(w.source_rank(py).into_pyobject(py)?.into_any().unbind());
        }
        if stream.is_some() {
            return Err(no_stream(py));
        }
        if async_op {
            let o = buffer::bind(py, ops, Lifetime::Work)?.output;
            let w = comm.recv_any_async(dt, o, tag);
            let work = Bound::new(py, PyWork::new(Pending::HostAny(w), buf.unbind(), None))?;
            return Ok(work.into_any().unbind());
        }
        let b = buffer::bind(py, ops, Lifetime::Call)?;
        let (o, guard) = (b.output, b.guard);
        let r = py.detach(move || comm.recv_any(dt, o, tag));
        drop(guard);
        let src = r.map_err(|e| to_py(py, e))?;
        Ok(src.into_pyobject(py)?.into_any().unbind())
    }

    /// Abort: fail the collective in progress on every rank (through the rendezvous and the
    /// data connections) and make every later call raise AbortedError. Never blocks on the
    /// collective in progress. Does nothing after `destroy()`.
    #[pyo3(signature = (reason="aborted from Python"))]
    fn abort(&self, py: Python<'_>, reason: &str) {
        let comm = self.comm.read().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some(comm) = comm {
            let reason = reason.to_string();
            py.detach(move || comm.abort(&reason));
        }
    }

    /// Wait for queued collectives, then leave the rendezvous and close connections. Later
    /// calls raise InvalidUsageError. Idempotent.
    fn destroy(&self, py: Python<'_>) -> PyResult<()> {
        let comm = self.comm.write().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(c) = comm {
            py.detach(move || c.destroy()).map_err(|e| to_py(py, e))?;
        }
        Ok(())
    }

    fn __repr__<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyString>> {
        let s = match self.comm.read().unwrap_or_else(|e| e.into_inner()).as_ref() {
            Some(c) => {
                format!("<devccl Communicator group={:?} rank={} world_size={}>", c.group(), c.rank(), c.world_size())
            }
            None => "<devccl Communicator (destroyed)>".to_string(),
        };
        Ok(PyString::new(py, &s))
    }
}
