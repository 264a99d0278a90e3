//! Stream ordering with the caller's streams (NCCL semantics): a [`CudaQueuePoint`] makes
//! devccl's internal streams wait for what the caller had queued when it called; a
//! [`CudaQueueGate`] holds the caller's stream until the collective ends. The host never
//! blocks.
//!
//! A gate is a `u32` in pinned, device-mapped host memory. `hold` queues
//! `cuStreamWaitValue32(addr >= 1)` on the stream (stream memory operations: always available
//! since CUDA 12; older drivers report them with an attribute), or, where the driver lacks
//! them, a host function that blocks the driver's callback thread until the gate opens
//! (bounded by [`FALLBACK_DEADLINE`]). `open` writes 1. A gate's word is reused only after
//! every stream that waited on it passed the wait (an event recorded after each hold).

use std::ffi::c_void;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use cudarc::driver::{DriverError, sys};
use devccl_core::Result;
use devccl_core::device::{QueueGate, QueuePoint};

use super::device::Shared;
use super::driver::{Event, Stream};
use super::memory::host_alloc;
use super::streams;

/// How long a fallback gate may hold a driver callback thread before it gives up (and logs).
pub const FALLBACK_DEADLINE: Duration = Duration::from_secs(600);

/// Everything the caller had queued on its stream when the collective was called.
pub(crate) struct CudaQueuePoint {
    shared: Arc<Shared>,
    event: Option<Event>,
}

impl CudaQueuePoint {
    /// Record an event at the current end of the caller's `stream`.
    pub fn capture(shared: &Arc<Shared>, stream: Stream) -> Result<CudaQueuePoint> {
        shared.ctx.bind()?;
        let ev = shared.event()?;
        if let Err(e) = shared.ctx.record(ev, stream) {
            shared.put_event(ev);
            return Err(e);
        }
        Ok(CudaQueuePoint { shared: shared.clone(), event: Some(ev) })
    }
}

impl fmt::Debug for CudaQueuePoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CudaQueuePoint").field("device", &self.shared.ctx.label).finish()
    }
}

impl QueuePoint for CudaQueuePoint {
    fn order_internal(&mut self) -> Result<()> {
        let Some(ev) = self.event else { return Ok(()) };
        self.shared.ctx.bind()?;
        // Nothing to wait for when the caller's work already finished.
        if !self.shared.ctx.query(ev)? {
            for s in streams::for_this_thread(&self.shared)?.all() {
                self.shared.ctx.wait_event(s, ev)?;
            }
        }
        // The waits captured the event's state: it may be recorded again.
        self.event = None;
        self.shared.put_event(ev);
        Ok(())
    }
}

impl Drop for CudaQueuePoint {
    fn drop(&mut self) {
        if let Some(ev) = self.event.take() {
            self.shared.put_event(ev);
        }
    }
}

/// One gate word: its host and device addresses.
#[derive(Debug)]
pub(crate) struct GateWord {
    host: *mut u32,
    dev: u64,
}

// SAFETY: the word is owned by one gate (or the free list) at a time; the host writes it with
// volatile stores, the device only reads it.
unsafe impl Send for GateWord {}
// SAFETY: as above; concurrent `open` calls store the same value.
unsafe impl Sync for GateWord {}

impl GateWord {
    fn set(&self, v: u32) {
        // SAFETY: the word lies in a pinned page that is never freed.
        unsafe { std::ptr::write_volatile(self.host, v) };
        std::sync::atomic::fence(Ordering::SeqCst);
    }
}

/// A gate retired while streams may still wait on its word.
#[derive(Debug)]
struct Retired {
    word: GateWord,
    holds: Vec<Event>,
}

/// Gate words (carved from pinned pages that live as long as the device) and retired gates.
#[derive(Debug, Default)]
pub(crate) struct GatePool {
    inner: Mutex<GatePoolInner>,
}

#[derive(Debug, Default)]
struct GatePoolInner {
    free: Vec<GateWord>,
    retired: Vec<Retired>,
}

const GATE_PAGE: usize = 4096;

impl GatePool {
    /// A word set to 0 (closed).
    fn take(&self, shared: &Shared) -> Result<GateWord> {
        shared.ctx.bind()?;
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.sweep(shared);
        if inner.free.is_empty() {
            let (host, dev) = host_alloc(shared, GATE_PAGE)?;
            for i in (0..GATE_PAGE / 4).rev() {
                // SAFETY: `i * 4` lies within the page just allocated.
                let host = unsafe { host.cast::<u32>().add(i) };
                inner.free.push(GateWord { host, dev: dev + 4 * i as u64 });
            }
        }
        let word = inner.free.pop().expect("a page was just added");
        word.set(0);
        Ok(word)
    }

    fn retire(&self, word: GateWord, holds: Vec<Event>) {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).retired.push(Retired { word, holds });
    }
}

impl GatePoolInner {
    /// Free the words of retired gates whose holds all passed.
    fn sweep(&mut self, shared: &Shared) {
        let mut i = 0;
        while i < self.retired.len() {
            // A failed query (a broken context) counts as passed: nothing runs any more.
            let passed = self.retired[i].holds.iter().all(|&ev| shared.ctx.query(ev).unwrap_or(true));
            if passed {
                let r = self.retired.swap_remove(i);
                r.holds.into_iter().for_each(|ev| shared.put_event(ev));
                self.free.push(r.word);
            } else {
                i += 1;
            }
        }
    }
}

/// What a fallback host function waits on.
#[derive(Debug, Default)]
struct GateSignal {
    open: Mutex<bool>,
    cv: Condvar,
}

/// A gate in callers' streams (see the module docs).
pub(crate) struct CudaQueueGate {
    shared: Arc<Shared>,
    word: Option<GateWord>,
    opened: AtomicBool,
    signal: Arc<GateSignal>,
    fallback: bool,
    holds: Mutex<Vec<Event>>,
    /// Counted in `Shared::holding` (held, not yet open).
    counted: AtomicBool,
}

impl CudaQueueGate {
    /// A closed gate; `fallback` forces the host-function path.
    pub fn new(shared: &Arc<Shared>, fallback: bool) -> Result<CudaQueueGate> {
        let word = shared.gates.take(shared)?;
        let fallback = fallback || !shared.stream_mem_ops.load(Ordering::Relaxed);
        Ok(CudaQueueGate {
            shared: shared.clone(),
            word: Some(word),
            opened: AtomicBool::new(false),
            signal: Arc::default(),
            fallback,
            holds: Mutex::default(),
            counted: AtomicBool::new(false),
        })
    }

    fn word(&self) -> &GateWord {
        self.word.as_ref().expect("a gate owns its word until dropped")
    }

    fn wait_value(&self, stream: Stream) -> std::result::Result<(), DriverError> {
        let geq = sys::CUstreamWaitValue_flags_enum::CU_STREAM_WAIT_VALUE_GEQ as u32;
        // SAFETY: the word lives in a pinned, device-mapped page that outlives every stream
        // waiting on it (it is reused only after the event recorded behind this wait passed).
        unsafe { sys::cuStreamWaitValue32_v2(stream.0, self.word().dev, 1, geq) }.result()
    }

    fn host_wait(&self, stream: Stream) -> Result<()> {
        let arg = Arc::into_raw(self.signal.clone()).cast_mut().cast::<c_void>();
        // SAFETY: `gate_host_wait` takes back the Arc leaked here exactly once, when it runs.
        let r = unsafe { sys::cuLaunchHostFunc(stream.0, Some(gate_host_wait), arg) };
        if let Err(e) = self.shared.ctx.check("cuLaunchHostFunc", r) {
            // SAFETY: the callback was not queued: reclaim the Arc leaked above.
            drop(unsafe { Arc::from_raw(arg.cast::<GateSignal>()) });
            return Err(e);
        }
        Ok(())
    }
}

impl fmt::Debug for CudaQueueGate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CudaQueueGate")
            .field("device", &self.shared.ctx.label)
            .field("open", &self.opened.load(Ordering::Relaxed))
            .field("fallback", &self.fallback)
            .finish()
    }
}

impl QueueGate for CudaQueueGate {
    fn hold(&self, queue: u64) -> Result<()> {
        let stream = Stream::from_raw(queue);
        self.shared.ctx.bind()?;
        if self.fallback {
            self.host_wait(stream)?;
        } else {
            match self.wait_value(stream) {
                Ok(()) => {}
                Err(e) if e.0 == sys::CUresult::CUDA_ERROR_NOT_SUPPORTED => {
                    tracing::info!("{}: no stream memory operations; gates use host functions", self.shared.ctx.label);
                    self.shared.stream_mem_ops.store(false, Ordering::Relaxed);
                    self.host_wait(stream)?;
                }
                Err(e) => return Err(self.shared.ctx.err("cuStreamWaitValue32", e)),
            }
        }
        let ev = self.shared.event()?;
        self.shared.ctx.record(ev, stream).inspect_err(|_| self.shared.put_event(ev))?;
        self.holds.lock().unwrap_or_else(|e| e.into_inner()).push(ev);
        if !self.counted.swap(true, Ordering::AcqRel) {
            self.shared.holding.fetch_add(1, Ordering::AcqRel);
            // Opened meanwhile: `open` may have missed the count.
            if self.opened.load(Ordering::Acquire) && self.counted.swap(false, Ordering::AcqRel) {
                self.shared.holding.fetch_sub(1, Ordering::AcqRel);
            }
        }
        Ok(())
    }

    fn open(&self) {
        if self.opened.swap(true, Ordering::AcqRel) {
            return;
        }
        self.word().set(1);
        *self.signal.open.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.signal.cv.notify_all();
        if self.counted.swap(false, Ordering::AcqRel) {
            self.shared.holding.fetch_sub(1, Ordering::AcqRel);
        }
    }

    fn is_open(&self) -> bool {
        self.opened.load(Ordering::Acquire)
    }
}

impl Drop for CudaQueueGate {
    fn drop(&mut self) {
        // A gate never keeps a stream waiting past its life.
        self.open();
        let holds = std::mem::take(&mut *self.holds.lock().unwrap_or_else(|e| e.into_inner()));
        if let Some(word) = self.word.take() {
            self.shared.gates.retire(word, holds);
        }
    }
}

/// The fallback gate's host function: block this driver thread until the gate opens.
unsafe extern "C" fn gate_host_wait(arg: *mut c_void) {
    // SAFETY: `arg` is the Arc leaked by `host_wait` for exactly this call.
    let signal = unsafe { Arc::from_raw(arg.cast_const().cast::<GateSignal>()) };
    let deadline = Instant::now() + FALLBACK_DEADLINE;
    let mut open = signal.open.lock().unwrap_or_else(|e| e.into_inner());
    while !*open {
        let now = Instant::now();
        if now >= deadline {
            tracing::error!("devccl CUDA gate still closed after {FALLBACK_DEADLINE:?}: releasing the stream");
            return;
        }
        open = signal.cv.wait_timeout(open, deadline - now).map(|(g, _)| g).unwrap_or_else(|e| e.into_inner().0);
    }
}
