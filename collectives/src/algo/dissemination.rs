//! Dissemination barrier (Hensgen, Finkel & Manber): in round `k` rank `r` sends an empty
//! message to `r + 2^k` and waits for one from `r - 2^k`. After ceil(log2 n) rounds every
//! rank has heard, directly or through a chain, from every other, so nobody leaves before
//! everybody arrived. Works for any `n` (no power-of-two folding needed).

use super::dag::{Dag, Io};
use super::{Shape, sub_mod};
use crate::schedule::{Buf, Builder};

/// One rank's barrier. The messages are zero bytes long; Input and Output are not touched.
pub fn barrier(b: &mut Builder, sh: Shape) {
    let (r, n) = (sh.rank, sh.n);
    let mut d = Dag::new(b, 1, Io::Separate, 0, 0);
    let mut heard = None;
    let mut dist = 1;
    while dist < n {
        // Round k's message says "I have heard round k-1": that ordering is the algorithm,
        // so it is an explicit dependency (no memory is involved).
        d.send_after((r + dist) % n, (Buf::Input, 0), 0, &[heard]);
        heard = Some(d.recv_after(sub_mod(r, dist, n), (Buf::Output, 0), 0, &[heard]));
        dist *= 2;
    }
}
