//! Test harness (feature `test-util`): N-rank communicators over the in-memory transport,
//! each rank a thread of this process.

use std::sync::Arc;
use std::time::{Duration, Instant};

use devccl_core::bootstrap::{HostIdentity, PeerInfo, PeerTable};
use devccl_core::config::Config;
use devccl_core::testing::mesh_with;
use devccl_core::transport::Transport;
use devccl_core::{CommId, Rank};

use crate::Communicator;
use crate::exec::AbortSignal;

/// Build `n` communicators connected by in-memory transports.
pub fn mesh_comms(n: usize, cfg: &Config) -> Vec<Communicator> {
    mesh_comms_with(n, cfg, false)
}

/// Like [`mesh_comms`]; with `sinks`, receive-reductions run on arrival through payload
/// sinks fed in irregular pieces (the path shared memory uses).
pub fn mesh_comms_with(n: usize, cfg: &Config, sinks: bool) -> Vec<Communicator> {
    let ts = mesh_with(n, sinks);
    let table = PeerTable {
        comm: CommId::random(),
        group: "mesh".into(),
        peers: ts
            .iter()
            .enumerate()
            .map(|(r, t)| PeerInfo { rank: Rank::from(r), host: HostIdentity::local(), endpoints: vec![t.endpoint()] })
            .collect(),
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    std::thread::scope(|s| {
        let hs: Vec<_> = ts
            .into_iter()
            .enumerate()
            .map(|(r, t)| {
                let table = table.clone();
                let cfg = cfg.clone();
                s.spawn(move || {
                    let t: Arc<dyn Transport> = Arc::new(t);
                    Communicator::assemble(
                        Rank::from(r),
                        n,
                        table,
                        vec![t],
                        cfg,
                        None,
                        AbortSignal::new().expect("eventfd"),
                        crate::exec::Spin::default(),
                        deadline,
                    )
                    .expect("mesh communicator")
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().expect("mesh thread")).collect()
    })
}

/// Run `f` on every communicator concurrently (one thread each); results in rank order.
pub fn on_all<R: Send>(comms: &[Communicator], f: impl Fn(&Communicator) -> R + Sync) -> Vec<R> {
    std::thread::scope(|s| {
        let hs: Vec<_> = comms.iter().map(|c| s.spawn(|| f(c))).collect();
        hs.into_iter().map(|h| h.join().expect("rank thread panicked")).collect()
    })
}
