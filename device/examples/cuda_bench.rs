//! CUDA device bandwidth, printed as one JSON line (for the GPU check script):
//!
//! - `reduce_f32_sum_gbps`: the reduction kernel, `dst = a + b` over device memory, counting
//!   two reads and one write;
//! - `d2d_copy_gbps`: a device-to-device copy of the same size, counting a read and a write;
//! - `reduce_from_staging_gbps`: the kernel with `b` in pinned staging memory (read over the
//!   bus), counting three transfers;
//! - `h2d_gbps` / `d2h_gbps`: pinned staging ↔ device copies;
//! - `gather_4k_gbps` / `gather_reduce_4k_gbps`: the devmem unpack of 4 KiB fragments in
//!   reverse order (2 and 3 transfers).
//!
//! Usage: `cargo run --release -p devccl-device --example cuda_bench [MiB]` (default 256).
//! Without a GPU it prints `{"error": ...}` and exits with status 2. GB/s are 1e9 bytes/s.

#![cfg_attr(not(feature = "cuda"), allow(unused_imports))]

use std::sync::Arc;
use std::time::Instant;

use devccl_core::device::{Device, Pending, ReduceArgs, Scattered};
use devccl_core::dtype::DType;
use devccl_core::memory::Region;
use devccl_core::op::ReduceOp;
use devccl_core::transport::Fragment;
use devccl_device::cuda;

#[cfg(feature = "cuda")]
type Res<T> = std::result::Result<T, String>;

#[cfg(not(feature = "cuda"))]
fn main() {
    println!("{{\"error\":\"devccl-device was built without its cuda feature\"}}");
    std::process::exit(2);
}

#[cfg(feature = "cuda")]
fn main() {
    match run() {
        Ok(json) => println!("{json}"),
        Err(e) => {
            println!("{{\"error\":{e:?}}}");
            std::process::exit(2);
        }
    }
}

#[cfg(feature = "cuda")]
fn s<E: std::fmt::Display>(e: E) -> String {
    e.to_string()
}

/// Run `op` `iters` times (queued back to back), wait for all; seconds per iteration.
#[cfg(feature = "cuda")]
fn time(iters: usize, mut op: impl FnMut() -> Res<Pending>) -> Res<f64> {
    let deadline = || Instant::now() + std::time::Duration::from_secs(120);
    for _ in 0..2 {
        op()?.wait(deadline(), "warm-up").map_err(s)?;
    }
    let start = Instant::now();
    let pending = (0..iters).map(|_| op()).collect::<Res<Vec<_>>>()?;
    for p in pending {
        p.wait(deadline(), "bench").map_err(s)?;
    }
    Ok(start.elapsed().as_secs_f64() / iters as f64)
}

#[cfg(feature = "cuda")]
fn gbps(bytes: usize, transfers: usize, secs: f64) -> f64 {
    (bytes * transfers) as f64 / secs / 1e9
}

#[cfg(feature = "cuda")]
fn filled(dev: &dyn Device, bytes: usize, v: f32) -> Res<Region> {
    let r = dev.alloc(bytes).map_err(s)?;
    let data: Vec<u8> = std::iter::repeat_n(v.to_le_bytes(), bytes / 4).flatten().collect();
    dev.upload(&r.full(), &data).map_err(s)?;
    Ok(r)
}

#[cfg(feature = "cuda")]
fn run() -> Res<String> {
    let mib: usize = std::env::args().nth(1).map(|a| a.parse().map_err(s)).transpose()?.unwrap_or(256);
    let bytes = mib << 20;
    let dev = cuda::open_cuda(0).map_err(s)?;
    let t = Instant::now();
    let from = dev.load_kernels().map_err(s)?;
    let kernel_load_s = t.elapsed().as_secs_f64();
    let d: Arc<dyn Device> = dev.clone();
    let (a, b, out) = (filled(&*d, bytes, 1.5)?, filled(&*d, bytes, 2.25)?, filled(&*d, bytes, 0.0)?);
    let staging = d.alloc_staging(bytes).map_err(s)?;
    let iters = 20;
    let reduce = |b: &Region| {
        let args = ReduceArgs {
            dtype: DType::F32,
            op: ReduceOp::Sum,
            dst: &out.full(),
            a: &a.full(),
            b: &b.full(),
            finish: None,
        };
        d.reduce(args).map_err(s)
    };
    let reduce_s = time(iters, || reduce(&b))?;
    let copy_s = time(iters, || d.copy(&out.full(), &a.full()).map_err(s))?;
    let staged_s = time(iters, || reduce(&staging))?;
    let h2d_s = time(iters, || d.copy(&out.full(), &staging.full()).map_err(s))?;
    let d2h_s = time(iters, || d.copy(&staging.full(), &a.full()).map_err(s))?;
    // 4 KiB fragments of `a` in reverse order, gathered into `out`.
    let frags: Vec<Fragment> = (0..bytes / 4096)
        .map(|i| Fragment { src_off: (bytes - 4096 * (i + 1)) as u64, len: 4096, dst_off: (4096 * i) as u64 })
        .collect();
    let src = Scattered { pool: &a, frags: &frags };
    let gather_s = time(iters, || d.gather(&out.full(), src).map_err(s))?;
    let gather_reduce_s =
        time(iters, || d.gather_reduce(DType::F32, ReduceOp::Sum, &out.full(), &b.full(), src, None).map_err(s))?;
    Ok(format!(
        concat!(
            "{{\"device\":{:?},\"kernels_from\":{:?},\"kernel_load_s\":{:.3},\"bytes\":{},",
            "\"reduce_f32_sum_gbps\":{:.1},\"d2d_copy_gbps\":{:.1},\"reduce_from_staging_gbps\":{:.1},",
            "\"h2d_gbps\":{:.1},\"d2h_gbps\":{:.1},\"gather_4k_gbps\":{:.1},\"gather_reduce_4k_gbps\":{:.1}}}"
        ),
        d.describe(),
        from,
        kernel_load_s,
        bytes,
        gbps(bytes, 3, reduce_s),
        gbps(bytes, 2, copy_s),
        gbps(bytes, 3, staged_s),
        gbps(bytes, 1, h2d_s),
        gbps(bytes, 1, d2h_s),
        gbps(bytes, 2, gather_s),
        gbps(bytes, 3, gather_reduce_s),
    ))
}
