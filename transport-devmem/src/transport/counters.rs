//! What the devmem data path counts: per transport (for `Communicator::transport_counters`,
//! the `info` log at destroy and `devccl bench`), and summed over the process
//! ([`process_counters`]: a gauge such as outstanding tokens must read 0 once every
//! communicator is gone).

use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! counters {
    ($($(#[$doc:meta])* $name:ident),* $(,)?) => {
        /// The data path's counters (monotonic, except the gauges `tokens_outstanding` and
        /// `tx_bindings`).
        #[derive(Debug, Default)]
        pub struct Counters {
            $($(#[$doc])* pub $name: AtomicU64,)*
        }

        impl Counters {
            /// `(name, value)` pairs in a fixed order.
            pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
                vec![$((stringify!($name), self.$name.load(Ordering::Relaxed)),)*]
            }
        }
    };
}

counters! {
    /// RX fragments (`SCM_DEVMEM_DMABUF` cmsgs) received.
    rx_fragments,
    /// Payload bytes that arrived as fragments in the RX pool.
    rx_fragment_bytes,
    /// `SCM_DEVMEM_LINEAR` spills (cmsgs) received.
    rx_linear_spills,
    /// Payload bytes that arrived as linear spills (copied into place).
    rx_linear_bytes,
    /// Payload bytes that arrived as ordinary data, without any devmem cmsg (a flow not
    /// steered to a bound queue).
    rx_unsteered_bytes,
    /// Fragments placed outside the pool region (a descriptor larger than the region, as
    /// lavapipe's opaque fds are), copied out through a host mapping like spills.
    rx_outside_fragments,
    /// Tokens held (fragments not yet returned with `SO_DEVMEM_DONTNEED`).
    tokens_outstanding,
    /// Tokens returned with `SO_DEVMEM_DONTNEED`.
    tokens_returned,
    /// Tokens released by closing a socket (after an error or a peer's death).
    tokens_released_on_close,
    /// `SO_DEVMEM_DONTNEED` calls.
    dontneed_calls,
    /// `SO_DEVMEM_DONTNEED` calls that freed fewer fragments than asked.
    dontneed_short,
    /// Times a receive waited because the RX pool was full.
    rx_pool_stalls,
    /// Zero-copy devmem sends (`sendmsg` with `SCM_DEVMEM_DMABUF`).
    tx_devmem_sends,
    /// Bytes sent zero-copy from TX-bound memory.
    tx_devmem_bytes,
    /// Zero-copy completions read from the error queue (sends covered).
    tx_completions,
    /// Completions whose data the kernel copied instead (`SO_EE_CODE_ZEROCOPY_COPIED`).
    tx_completions_copied,
    /// Sends that went as ordinary bytes (host memory not behind a descriptor, or TX binding
    /// refused).
    tx_fallback_sends,
    /// Bytes of those sends.
    tx_fallback_bytes,
    /// Bytes of device memory that could not be sent from directly, copied to host staging
    /// first and sent as ordinary bytes.
    tx_staged_bytes,
    /// TX bindings alive (one per exported allocation sent from).
    tx_bindings,
    /// TX binds the kernel refused.
    tx_bind_refusals,
    /// Data sockets steered to a bound RX queue.
    steered_sockets,
    /// Data sockets whose steering was refused (their data arrives as ordinary bytes).
    steering_refusals,
}

/// The sum over every devmem transport this process created, alive or gone.
pub fn process() -> &'static Counters {
    static TOTAL: Counters = Counters {
        rx_fragments: AtomicU64::new(0),
        rx_fragment_bytes: AtomicU64::new(0),
        rx_linear_spills: AtomicU64::new(0),
        rx_linear_bytes: AtomicU64::new(0),
        rx_unsteered_bytes: AtomicU64::new(0),
        rx_outside_fragments: AtomicU64::new(0),
        tokens_outstanding: AtomicU64::new(0),
        tokens_returned: AtomicU64::new(0),
        tokens_released_on_close: AtomicU64::new(0),
        dontneed_calls: AtomicU64::new(0),
        dontneed_short: AtomicU64::new(0),
        rx_pool_stalls: AtomicU64::new(0),
        tx_devmem_sends: AtomicU64::new(0),
        tx_devmem_bytes: AtomicU64::new(0),
        tx_completions: AtomicU64::new(0),
        tx_completions_copied: AtomicU64::new(0),
        tx_fallback_sends: AtomicU64::new(0),
        tx_fallback_bytes: AtomicU64::new(0),
        tx_staged_bytes: AtomicU64::new(0),
        tx_bindings: AtomicU64::new(0),
        tx_bind_refusals: AtomicU64::new(0),
        steered_sockets: AtomicU64::new(0),
        steering_refusals: AtomicU64::new(0),
    };
    &TOTAL
}

/// [`process`] as `(name, value)` pairs.
pub fn process_counters() -> Vec<(&'static str, u64)> {
    process().snapshot()
}

/// Add `n` to a counter of one transport and to the process's sum.
pub(crate) fn add(c: &Counters, pick: impl Fn(&Counters) -> &AtomicU64, n: u64) {
    if n != 0 {
        pick(c).fetch_add(n, Ordering::Relaxed);
        pick(process()).fetch_add(n, Ordering::Relaxed);
    }
}

/// Subtract `n` from a gauge of one transport and from the process's sum.
pub(crate) fn sub(c: &Counters, pick: impl Fn(&Counters) -> &AtomicU64, n: u64) {
    if n != 0 {
        pick(c).fetch_sub(n, Ordering::Relaxed);
        pick(process()).fetch_sub(n, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transport_and_process_sums() {
        let c = Counters::default();
        let before = process().rx_fragments.load(Ordering::Relaxed);
        add(&c, |c| &c.rx_fragments, 3);
        add(&c, |c| &c.tokens_outstanding, 5);
        sub(&c, |c| &c.tokens_outstanding, 5);
        let snap = c.snapshot();
        assert_eq!(snap[0], ("rx_fragments", 3));
        assert!(snap.contains(&("tokens_outstanding", 0)));
        assert!(process().rx_fragments.load(Ordering::Relaxed) >= before + 3);
        assert_eq!(process_counters().len(), snap.len());
    }
}
