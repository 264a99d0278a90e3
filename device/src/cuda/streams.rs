//! devccl's internal streams: a set of three non-blocking streams (device→host copies,
//! host→device copies, kernels with device-to-device copies, so staging copies overlap in
//! both directions) per calling thread.
//!
//! Why per thread: [`devccl_core::device::QueuePoint::order_internal`] makes internal streams
//! wait for a caller's stream, which may itself be held by another collective's gate. A
//! communicator runs its collectives one at a time, on one thread at a time, so the waits it
//! queues only ever sit in front of its own later work. With streams shared by every
//! communicator of the process, one communicator's wait could sit in front of another's
//! device work and deadlock both. A thread's set returns to a free list when the thread
//! ends; sets are never destroyed (they belong to the device, which lives as long as the
//! process).

use std::cell::RefCell;
use std::sync::{Arc, Mutex};

use devccl_core::Result;

use super::device::Shared;
use super::driver::{Ctx, Stream};

/// One thread's internal streams.
#[derive(Debug)]
pub(crate) struct StreamSet {
    pub d2h: Stream,
    pub h2d: Stream,
    pub compute: Stream,
}

impl StreamSet {
    pub fn new(ctx: &Ctx) -> Result<StreamSet> {
        ctx.bind()?;
        Ok(StreamSet { d2h: ctx.new_stream()?, h2d: ctx.new_stream()?, compute: ctx.new_stream()? })
    }

    pub fn all(&self) -> [Stream; 3] {
        [self.d2h, self.h2d, self.compute]
    }
}

/// Every set of one device, and the ones no thread holds.
#[derive(Debug, Default)]
pub(crate) struct StreamSets {
    all: Mutex<Vec<Arc<StreamSet>>>,
    free: Mutex<Vec<Arc<StreamSet>>>,
}

impl StreamSets {
    /// Start with `first` (the set used where a thread's own cannot be had).
    pub fn with(first: Arc<StreamSet>) -> StreamSets {
        StreamSets { all: Mutex::new(vec![first]), free: Mutex::default() }
    }

    /// Every set (to order a caller after all of devccl's work, or to wait for it).
    pub fn every(&self) -> Vec<Arc<StreamSet>> {
        self.all.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn fallback(&self) -> Arc<StreamSet> {
        self.all.lock().unwrap_or_else(|e| e.into_inner())[0].clone()
    }

    fn take(&self, ctx: &Ctx) -> Result<Arc<StreamSet>> {
        if let Some(s) = self.free.lock().unwrap_or_else(|e| e.into_inner()).pop() {
            return Ok(s);
        }
        let s = Arc::new(StreamSet::new(ctx)?);
        self.all.lock().unwrap_or_else(|e| e.into_inner()).push(s.clone());
        Ok(s)
    }
}

/// A thread's hold on a set; gives it back when the thread ends.
struct Lease {
    shared: Arc<Shared>,
    set: Arc<StreamSet>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.shared.stream_sets.free.lock().unwrap_or_else(|e| e.into_inner()).push(self.set.clone());
    }
}

thread_local! {
    static LEASES: RefCell<Vec<Lease>> = const { RefCell::new(Vec::new()) };
}

/// The calling thread's streams on `shared`'s device.
pub(crate) fn for_this_thread(shared: &Arc<Shared>) -> Result<Arc<StreamSet>> {
    let found = LEASES.try_with(|l| {
        let mut leases = l.borrow_mut();
        if let Some(x) = leases.iter().find(|x| Arc::ptr_eq(&x.shared, shared)) {
            return Ok(x.set.clone());
        }
        let set = shared.stream_sets.take(&shared.ctx)?;
        leases.push(Lease { shared: shared.clone(), set: set.clone() });
        Ok(set)
    });
    // During thread teardown the thread-local is gone: use the shared first set.
    found.unwrap_or_else(|_| Ok(shared.stream_sets.fallback()))
}
