//! Data-parallel training with the weights, the data and the arithmetic on a device: a CUDA
//! GPU when one is present, else a Vulkan device (lavapipe runs it on any machine), else the
//! host. The gradient all-reduce runs on device memory too.
//!
//! Run: `devccl launch -n 2 -- target/release/examples/device_train [--device cuda|vulkan|host]
//! [--steps 200]`
//!
//! The model is deliberately one that the device layer's own kernels can train, so no other
//! GPU code is needed: `P` independent linear models `y_j = a_j · x_j`, one per parameter,
//! fitted by SGD on mean squared error. Each rank holds its own batch of samples. A step
//! computes the per-parameter gradient `g_j = Σ_i x_ij (w_j x_ij − y_ij)` with element-wise
//! device reductions (prod, sum), averages it across ranks with `all_reduce_device(avg)`,
//! and applies `w += (−lr / B) · g`, all on the device. At the end every rank checks that its
//! weights are bit-identical to everyone's and close to the true slopes.

use std::time::{Duration, Instant};

use devccl::{Collective, Communicator, DType, DeviceBuffer, DeviceId, ReduceOp};
use devccl_core::device::{Device, ReduceArgs};
use devccl_core::memory::RegionSlice;

const PARAMS: usize = 1 << 16;
const BATCH: usize = 4;

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1).cloned())
}

/// The device asked for, or the first of cuda, vulkan, host that opens (saying why the
/// others did not).
fn pick_device() -> devccl::Result<DeviceId> {
    if let Some(d) = arg("--device") {
        return d.parse();
    }
    for id in [DeviceId::Cuda(0), DeviceId::Vulkan(0)] {
        match devccl_device::open(id) {
            Ok(_) => return Ok(id),
            Err(e) => eprintln!("{id}: {e}"),
        }
    }
    Ok(DeviceId::Host)
}

/// `dst = a op b` on the device, waited for.
fn apply(dev: &dyn Device, op: ReduceOp, dst: &RegionSlice, a: &RegionSlice, b: &RegionSlice) -> devccl::Result<()> {
    let args = ReduceArgs { dtype: DType::F32, op, dst, a, b, finish: None };
    dev.reduce(args)?.wait(Instant::now() + Duration::from_secs(60), "training step")
}

/// The true slope of parameter `j`.
fn slope(j: usize) -> f32 {
    ((j % 7) as f32 - 3.0) / 2.0
}

/// Rank `rank`'s samples: `BATCH` inputs per parameter and their negated targets.
fn samples(rank: usize) -> (Vec<Vec<f32>>, Vec<Vec<f32>>) {
    let x: Vec<Vec<f32>> =
        (0..BATCH).map(|i| (0..PARAMS).map(|j| 0.5 + ((j + 3 * i + 5 * rank) % 4) as f32 * 0.25).collect()).collect();
    let neg_y = x.iter().map(|xi| xi.iter().enumerate().map(|(j, &v)| -slope(j) * v).collect()).collect();
    (x, neg_y)
}

fn main() -> devccl::Result<()> {
    let steps: usize = arg("--steps").and_then(|s| s.parse().ok()).unwrap_or(200);
    let id = pick_device()?;
    let dev = devccl_device::open(id)?;
    let comm = Communicator::init()?;
    let (rank, n) = (comm.rank(), comm.world_size());
    if rank == 0 {
        println!("training {PARAMS} parameters on {} with {n} ranks, {steps} steps", dev.describe());
    }
    let (x, neg_y) = samples(rank);
    let upload = |v: &[f32]| DeviceBuffer::from_slice(id, v);
    let xs = x.iter().map(|v| upload(v)).collect::<devccl::Result<Vec<_>>>()?;
    let ys = neg_y.iter().map(|v| upload(v)).collect::<devccl::Result<Vec<_>>>()?;
    let w = upload(&vec![0.0f32; PARAMS])?;
    let g = upload(&vec![0.0f32; PARAMS])?;
    let t = upload(&vec![0.0f32; PARAMS])?;
    let zero = upload(&vec![0.0f32; PARAMS])?;
    let scale = upload(&vec![-0.2 / BATCH as f32; PARAMS])?;
    let (ws, gs, ts) = (w.region_slice(), g.region_slice(), t.region_slice());
    let started = Instant::now();
    let mut comm_time = Duration::ZERO;
    for _ in 0..steps {
        dev.copy(&gs, &zero.region_slice())?.wait(Instant::now() + Duration::from_secs(60), "zero")?;
        for (xi, yi) in xs.iter().zip(&ys) {
            let (xi, yi) = (xi.region_slice(), yi.region_slice());
            apply(&*dev, ReduceOp::Prod, &ts, &ws, &xi)?; // t = w·x
            apply(&*dev, ReduceOp::Sum, &ts, &ts, &yi)?; // t = w·x − y
            apply(&*dev, ReduceOp::Prod, &ts, &ts, &xi)?; // t = x (w·x − y)
            apply(&*dev, ReduceOp::Sum, &gs, &gs, &ts)?; // g += t
        }
        let c0 = Instant::now();
        comm.all_reduce_device(&g, ReduceOp::Avg)?;
        comm_time += c0.elapsed();
        apply(&*dev, ReduceOp::Prod, &gs, &gs, &scale.region_slice())?; // g = −lr/B · g
        apply(&*dev, ReduceOp::Sum, &ws, &ws, &gs)?; // w += g
    }
    let total = started.elapsed();
    let weights = w.to_vec()?;
    let err = weights.iter().enumerate().map(|(j, &v)| (v - slope(j)).abs()).fold(0.0f32, f32::max);
    // Bit-identical everywhere: every rank contributes its hash to a min and a max.
    let hash = weights.iter().fold(0xcbf29ce484222325u64, |h, v| (h ^ v.to_bits() as u64).wrapping_mul(0x100000001b3));
    let (mut lo, mut hi) = ([hash], [hash]);
    comm.collective_in_place(&Collective::AllReduce { op: ReduceOp::Min }, &mut lo)?;
    comm.collective_in_place(&Collective::AllReduce { op: ReduceOp::Max }, &mut hi)?;
    if lo != hi {
        eprintln!("rank {rank}: weights differ between ranks");
        std::process::exit(1);
    }
    if rank == 0 {
        println!(
            "done in {:.2?} ({:.2?} in all-reduce): max |w − a| = {err:.2e}, weights identical on all ranks (hash {hash:016x})",
            total, comm_time
        );
    }
    if err > 1e-3 {
        eprintln!("rank {rank}: did not converge (max error {err})");
        std::process::exit(1);
    }
    Ok(())
}
