//! Algorithm, channel and chunk selection.

use devccl_core::config::Config;

use crate::algo::Algo;

/// What to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    /// Algorithm.
    pub algo: Algo,
    /// Pipeline chunk in bytes.
    pub chunk: usize,
}

/// All-reduce plan for `bytes` over `n` ranks.
pub fn all_reduce(cfg: &Config, n: usize, bytes: usize) -> Plan {
    let block = bytes.div_ceil(n.max(1));
    let chunk = cfg.chunk.unwrap_or_else(|| (block / 4).clamp(32 << 10, 512 << 10));
    Plan { algo: Algo::Ring, chunk }
}
