//! Data-parallel SGD over devccl, with the gradient all-reduce overlapping the next step's
//! computation.
//!
//! Run: `devccl launch -n 4 -- target/release/examples/train_loop [--steps 60]`
//!
//! Every rank trains the same two-layer MLP (tanh hidden layer) on its own shard of a
//! synthetic regression task. Step t computes gradients with the current weights, then
//! applies the *previous* step's averaged gradients (waiting for that all-reduce only now),
//! and finally queues its own gradients for an asynchronous all-reduce (`avg`). So each
//! all-reduce runs while the next step computes — one-step-delayed SGD, deterministic and the
//! same on every rank. At the end the ranks compare a hash of their weights (all must be
//! bit-identical) and rank 0 prints how much of the communication time was hidden behind
//! computation: 1 − (time spent blocked in `wait`) / (time the all-reduces executed).

use std::time::{Duration, Instant};

use devccl::{Communicator, ReduceOp, Work};

const IN: usize = 256;
const HID: usize = 384;
const BATCH: usize = 48;

/// Small deterministic generator (xorshift), so every run and rank is reproducible.
struct Rng(u64);

impl Rng {
    fn next_f32(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
}

/// Parameters, flattened: w1 [HID × IN], b1 [HID], w2 [HID], b2 [1].
struct Model {
    p: Vec<f32>,
}

const W1: usize = 0;
const B1: usize = HID * IN;
const W2: usize = B1 + HID;
const B2: usize = W2 + HID;
const NPARAM: usize = B2 + 1;

impl Model {
    fn new() -> Model {
        let mut r = Rng(0x5eed);
        let mut p: Vec<f32> = (0..NPARAM).map(|_| r.next_f32() * 0.05).collect();
        p[B1..W2].fill(0.0);
        p[B2] = 0.0;
        Model { p }
    }

    /// Mean squared error and its gradient over one batch.
    fn grad(&self, xs: &[f32], ys: &[f32]) -> (f32, Vec<f32>) {
        let p = &self.p;
        let mut g = vec![0f32; NPARAM];
        let mut loss = 0f32;
        let mut h = vec![0f32; HID];
        for (x, &y) in xs.chunks_exact(IN).zip(ys) {
            for j in 0..HID {
                let row = &p[W1 + j * IN..W1 + (j + 1) * IN];
                let z: f32 = row.iter().zip(x).map(|(a, b)| a * b).sum::<f32>() + p[B1 + j];
                h[j] = z.tanh();
            }
            let out: f32 = h.iter().zip(&p[W2..B2]).map(|(a, b)| a * b).sum::<f32>() + p[B2];
            let e = out - y;
            loss += e * e;
            let d = 2.0 * e / BATCH as f32;
            g[B2] += d;
            for j in 0..HID {
                g[W2 + j] += d * h[j];
                let dz = d * p[W2 + j] * (1.0 - h[j] * h[j]);
                g[B1 + j] += dz;
                for (gw, &xi) in g[W1 + j * IN..W1 + (j + 1) * IN].iter_mut().zip(x) {
                    *gw += dz * xi;
                }
            }
        }
        (loss / BATCH as f32, g)
    }

    fn apply(&mut self, avg_grad: &[f32], lr: f32) {
        for (w, g) in self.p.iter_mut().zip(avg_grad) {
            *w -= lr * g;
        }
    }
}

/// This rank's batch for `step`: inputs and targets of a fixed random linear teacher.
fn batch(rank: usize, step: usize) -> (Vec<f32>, Vec<f32>) {
    let mut teacher = Rng(0x7eac4e5);
    let t: Vec<f32> = (0..IN).map(|_| teacher.next_f32()).collect();
    let mut r = Rng(0x1234_5678 ^ ((rank as u64) << 32) ^ (step as u64 + 1).wrapping_mul(0x9e37_79b9));
    let xs: Vec<f32> = (0..BATCH * IN).map(|_| r.next_f32()).collect();
    let ys = xs.chunks_exact(IN).map(|x| (x.iter().zip(&t).map(|(a, b)| a * b).sum::<f32>() * 0.3).tanh()).collect();
    (xs, ys)
}

fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3))
}

fn main() -> anyhow::Result<()> {
    let steps: usize =
        std::env::args().skip_while(|a| a != "--steps").nth(1).map(|s| s.parse()).transpose()?.unwrap_or(60);
    let comm = Communicator::init()?;
    let (rank, n) = (comm.rank(), comm.world_size());
    let mut model = Model::new();
    let lr = 0.05f32;
    let mut pending: Option<Work<Vec<f32>>> = None;
    let (mut blocked, mut executed, mut compute) = (Duration::ZERO, Duration::ZERO, Duration::ZERO);
    let mut first_loss = None;
    let mut last_loss = 0.0;
    let t0 = Instant::now();
    let finish =
        |w: Work<Vec<f32>>, model: &mut Model, blocked: &mut Duration, executed: &mut Duration| -> anyhow::Result<()> {
            let tw = Instant::now();
            let done = w.wait_timeout(Duration::from_secs(600));
            *blocked += tw.elapsed();
            anyhow::ensure!(done, "gradient all-reduce did not finish");
            *executed += w.execution_time().unwrap_or_default();
            let avg = w.wait()?;
            model.apply(&avg, lr);
            Ok(())
        };
    for step in 0..steps {
        let tc = Instant::now();
        let (xs, ys) = batch(rank, step);
        let (loss, grad) = model.grad(&xs, &ys);
        compute += tc.elapsed();
        first_loss.get_or_insert(loss);
        last_loss = loss;
        if let Some(w) = pending.take() {
            finish(w, &mut model, &mut blocked, &mut executed)?;
        }
        pending = Some(comm.all_reduce_async(grad, ReduceOp::Avg));
    }
    if let Some(w) = pending.take() {
        finish(w, &mut model, &mut blocked, &mut executed)?;
    }
    let wall = t0.elapsed();
    // Every rank must hold bit-identical weights.
    let h = fnv(bytemuck::cast_slice(&model.p)) as i64;
    let mut hashes = vec![0i64; n];
    comm.all_gather_into(&[h], &mut hashes)?;
    let identical = hashes.iter().all(|&x| x == h);
    let mut losses = [first_loss.unwrap_or(0.0), last_loss];
    comm.all_reduce(&mut losses, ReduceOp::Avg)?;
    let mut t = [blocked.as_secs_f64(), executed.as_secs_f64(), compute.as_secs_f64(), wall.as_secs_f64()];
    comm.all_reduce(&mut t, ReduceOp::Avg)?;
    if rank == 0 {
        let hidden = if t[1] > 0.0 { (1.0 - t[0] / t[1]).clamp(0.0, 1.0) } else { 0.0 };
        println!(
            "train_loop: {n} ranks, {steps} steps, {NPARAM} parameters ({} KiB of gradients per step)",
            NPARAM * 4 / 1024
        );
        println!("loss: {:.5} -> {:.5}", losses[0], losses[1]);
        println!(
            "per rank (mean): compute {:.1} ms, all-reduce executing {:.1} ms, blocked waiting {:.1} ms, wall {:.1} ms",
            t[2] * 1e3,
            t[1] * 1e3,
            t[0] * 1e3,
            t[3] * 1e3
        );
        println!("communication hidden behind compute: {:.1}%", hidden * 100.0);
        println!("weights identical on all {n} ranks: {} (fnv {h:016x})", if identical { "yes" } else { "NO" });
    }
    anyhow::ensure!(identical, "rank {rank}: weights differ across ranks: {hashes:x?}");
    anyhow::ensure!(last_loss.is_finite(), "loss diverged");
    Ok(())
}
