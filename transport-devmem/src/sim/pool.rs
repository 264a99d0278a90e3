//! The RX pool of a simulated binding: the dma-buf carved into niovs, as the kernel's
//! `net_devmem_bind_dmabuf()` carves it into `PAGE_SIZE` `net_iov`s (or `rx-page-size` ones
//! after 6.18), with per-niov reference counts and a free list.
//!
//! A niov is referenced by every queued fragment that lies in it (the skb's reference), by
//! every token handed out for it (`atomic_long_inc(&niov->desc.pp_ref_count)` in
//! `tcp_recvmsg_dmabuf()`), and by the simulated NIC while it is the buffer being filled. It
//! goes back to the free list when the last reference goes, as the page pool recycles it.
//! Free niovs are taken from the most recently freed ones, as the page pool recycles through
//! its LIFO allocation cache (the kernel's genpool hands out fresh ones lowest address first),
//! in a seeded random order among the last [`RECYCLE_WINDOW`], so fragments land at scattered,
//! out-of-order offsets while the pages in use stay few (a random pick from the whole pool
//! touched a new page, and a TLB miss, for nearly every fragment).
#![forbid(unsafe_code)]

use crate::sim::mmap::Mapping;
use crate::sim::rng::Rng;

/// How many of the most recently freed niovs the next one is drawn from.
pub(crate) const RECYCLE_WINDOW: usize = 64;

/// One RX binding's pool.
#[derive(Debug)]
pub(crate) struct Pool {
    /// Binding id (what RX cmsgs carry in `dmabuf_id`).
    pub(crate) id: u32,
    pub(crate) ifindex: u32,
    pub(crate) queues: Vec<u32>,
    pub(crate) map: Mapping,
    pub(crate) niov_size: usize,
    refs: Vec<u32>,
    /// Free niovs, most recently freed last (the lowest numbers last at first).
    free: Vec<u32>,
    rng: Rng,
    /// The niov being filled and how far.
    cur: Option<(u32, usize)>,
    /// Still bound (the binding handle is alive). An unbound pool only drains.
    pub(crate) bound: bool,
}

impl Pool {
    pub(crate) fn new(id: u32, ifindex: u32, queues: Vec<u32>, map: Mapping, niov_size: usize, seed: u64) -> Self {
        let n = (map.len() / niov_size) as u32;
        Pool {
            id,
            ifindex,
            queues,
            map,
            niov_size,
            refs: vec![0; n as usize],
            free: (0..n).rev().collect(),
            rng: Rng::new(seed),
            cur: None,
            bound: true,
        }
    }

    /// Number of niovs.
    pub(crate) fn niovs(&self) -> usize {
        self.refs.len()
    }

    /// Niovs nothing but the simulated NIC references: free, or the one it is filling and no
    /// fragment uses yet.
    pub(crate) fn free_niovs(&self) -> usize {
        self.free.len() + self.cur.is_some_and(|(n, _)| self.refs[n as usize] == 1) as usize
    }

    /// Bytes one fragment of at most `want` bytes can take right now (0: no buffer).
    pub(crate) fn room(&self, want: usize) -> usize {
        match self.cur {
            Some((_, fill)) => want.min(self.niov_size - fill),
            None if !self.free.is_empty() => want.min(self.niov_size),
            None => 0,
        }
    }

    /// Take `n` bytes (`0 < n <= room(..)`) for a fragment: `(niov, offset in the niov)`. The
    /// fragment holds one reference on the niov.
    pub(crate) fn take(&mut self, n: usize) -> (u32, usize) {
        let (niov, fill) = match self.cur {
            Some(c) => c,
            None => {
                let window = self.free.len().min(RECYCLE_WINDOW);
                let i = self.free.len() - 1 - self.rng.below(window);
                let niov = self.free.remove(i);
                self.refs[niov as usize] = 1; // the NIC's while it fills it
                (niov, 0)
            }
        };
        debug_assert!(n > 0 && fill + n <= self.niov_size);
        self.refs[niov as usize] += 1;
        if fill + n == self.niov_size {
            self.cur = None;
            self.put(niov);
        } else {
            self.cur = Some((niov, fill + n));
        }
        (niov, fill)
    }

    /// Byte offset of `off` in `niov` from the start of the dma-buf.
    pub(crate) fn offset(&self, niov: u32, off: usize) -> u64 {
        niov as u64 * self.niov_size as u64 + off as u64
    }

    /// One more reference (a token handed out).
    pub(crate) fn get(&mut self, niov: u32) {
        self.refs[niov as usize] += 1;
    }

    /// Drop a reference; the niov is free again when it was the last.
    pub(crate) fn put(&mut self, niov: u32) {
        let r = &mut self.refs[niov as usize];
        debug_assert!(*r > 0, "niov {niov} reference count underflow");
        *r -= 1;
        if *r == 0 {
            self.free.push(niov);
        }
    }

    /// Unbind: the simulated NIC lets go of the buffer it was filling.
    pub(crate) fn unbind(&mut self) {
        self.bound = false;
        if let Some((niov, _)) = self.cur.take() {
            self.put(niov);
        }
    }

    /// Unbound and nothing references any niov: the memory can go.
    pub(crate) fn drained(&self) -> bool {
        !self.bound && self.free.len() == self.refs.len()
    }
}
