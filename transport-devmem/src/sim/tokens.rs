//! Per-socket fragment tokens, numbered as Linux 6.18 numbers them.
//!
//! The kernel keeps a socket's handed-out fragments in the xarray `sk->sk_user_frags`,
//! initialised in `tcp_init_sock()` (net/ipv4/tcp.c) with
//! `xa_init_flags(&sk->sk_user_frags, XA_FLAGS_ALLOC1);`, and `tcp_xa_pool_refill()` takes
//! tokens with `__xa_alloc(&sk->sk_user_frags, &p->tokens[k], XA_ZERO_ENTRY, xa_limit_31b,
//! GFP_KERNEL)`: the *lowest free* index in `1..=INT_MAX` (ALLOC1 keeps 0 out), so a number
//! returned with `SO_DEVMEM_DONTNEED` is handed out again before any higher one. Tokens
//! pre-allocated for the rest of an skb and not used (a full control buffer) are erased again
//! in `tcp_xa_pool_commit_locked()`, which leaves the same numbering as taking the lowest
//! free number one fragment at a time. A full xarray makes `__xa_alloc` fail with `-EBUSY`.
#![forbid(unsafe_code)]

use std::cmp::Reverse;
use std::collections::BinaryHeap;

/// Highest token (`xa_limit_31b`: `INT_MAX`).
pub(crate) const TOKEN_MAX: u32 = i32::MAX as u32;

/// What a token pins: niov `niov` of the pool with key `pool`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Pinned {
    pub(crate) pool: u64,
    pub(crate) niov: u32,
}

/// The socket's token xarray: a slot per number below the highest one handed out (tokens
/// are the lowest free numbers, so the table stays as dense as the tokens held), and a
/// min-heap of free numbers kept lazily (a number in it may since have been taken again, or
/// lie above the top; both are skipped when popped).
#[derive(Debug)]
pub(crate) struct TokenTable {
    /// `used[t]`: what token `t` pins; `used.len()` is the top (every number from it up is
    /// free); slot 0 stays empty (`XA_FLAGS_ALLOC1`).
    used: Vec<Option<Pinned>>,
    holes: BinaryHeap<Reverse<u32>>,
    held: usize,
    /// Highest number handed out (`TOKEN_MAX`; lower in tests).
    max: u32,
}

impl Default for TokenTable {
    fn default() -> Self {
        Self::new()
    }
}

impl TokenTable {
    pub(crate) fn new() -> Self {
        TokenTable { used: vec![None], holes: BinaryHeap::new(), held: 0, max: TOKEN_MAX }
    }

    /// Lowest free token, `None` when all of `1..=max` are taken (the kernel's `-EBUSY`).
    pub(crate) fn alloc(&mut self, pinned: Pinned) -> Option<u32> {
        while let Some(Reverse(h)) = self.holes.pop() {
            if let Some(slot @ None) = self.used.get_mut(h as usize) {
                *slot = Some(pinned);
                self.held += 1;
                return Some(h);
            }
        }
        let t = self.used.len() as u32;
        if t > self.max {
            return None;
        }
        self.used.push(Some(pinned));
        self.held += 1;
        Some(t)
    }

    /// Erase `t`; what it pinned, `None` for a token not handed out.
    pub(crate) fn erase(&mut self, t: u32) -> Option<Pinned> {
        let p = self.used.get_mut(t as usize)?.take()?;
        self.held -= 1;
        if t as usize + 1 == self.used.len() {
            // The top shrinks over trailing free numbers (their heap entries go stale).
            while self.used.len() > 1 && self.used.last() == Some(&None) {
                self.used.pop();
            }
        } else {
            self.holes.push(Reverse(t));
        }
        if self.holes.len() > 2 * self.used.len() + 64 {
            let used = &self.used;
            self.holes.retain(|&Reverse(h)| used.get(h as usize) == Some(&None));
        }
        Some(p)
    }

    /// Tokens handed out and not returned.
    pub(crate) fn len(&self) -> usize {
        self.held
    }

    /// Remove everything (socket close); what was pinned.
    pub(crate) fn drain(&mut self) -> Vec<Pinned> {
        self.holes.clear();
        self.held = 0;
        let v = self.used.drain(..).flatten().collect();
        self.used.push(None);
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: Pinned = Pinned { pool: 1, niov: 0 };

    #[test]
    fn lowest_free_from_one_with_reuse() {
        let mut t = TokenTable::new();
        let v: Vec<u32> = (0..5).map(|_| t.alloc(P).unwrap()).collect();
        assert_eq!(v, [1, 2, 3, 4, 5]);
        assert!(t.erase(2).is_some() && t.erase(4).is_some());
        assert!(t.erase(4).is_none(), "twice");
        assert!(t.erase(0).is_none() && t.erase(99).is_none());
        assert_eq!(t.alloc(P), Some(2));
        assert_eq!(t.alloc(P), Some(4));
        assert_eq!(t.alloc(P), Some(6));
        for x in [6, 5, 4, 3] {
            t.erase(x);
        }
        assert_eq!(t.used.len(), 3, "top shrinks over trailing holes");
        assert_eq!(t.alloc(P), Some(3));
        assert_eq!(t.len(), 3);
        assert_eq!(t.drain().len(), 3);
        assert_eq!(t.alloc(P), Some(1));
    }

    #[test]
    fn full_table_is_busy() {
        let mut t = TokenTable { max: 3, ..TokenTable::new() };
        assert_eq!((t.alloc(P), t.alloc(P), t.alloc(P)), (Some(1), Some(2), Some(3)));
        assert_eq!(t.alloc(P), None);
    }
}
