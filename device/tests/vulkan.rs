//! The Vulkan backend against the host reference, on Vulkan device 0 (lavapipe in CI).
//!
//! Without a Vulkan device every test prints `skipped: <reason>` and passes, unless
//! `DEVCCL_REQUIRE_VULKAN=1` (CI sets it), which turns the skip into a failure.
#![cfg(feature = "vulkan")]

use std::sync::Arc;
use std::time::{Duration, Instant};

use devccl_core::device::{Device, HostDevice, Pending, ReduceArgs, Scattered, conformance};
use devccl_core::dtype::{F8E4M3, F8E5M2};
use devccl_core::memory::Region;
use devccl_core::transport::Fragment;
use devccl_core::{DType, Error, ReduceOp};
use devccl_device::vulkan::{self, VulkanDevice, VulkanOptions};
use half::{bf16, f16};

/// The shared device 0, or `None` (after printing why) when there is none and
/// DEVCCL_REQUIRE_VULKAN is not 1.
fn device() -> Option<Arc<VulkanDevice>> {
    match vulkan::open_vulkan(0) {
        Ok(d) => Some(d),
        Err(e) => {
            if std::env::var("DEVCCL_REQUIRE_VULKAN").is_ok_and(|v| v == "1") {
                panic!("DEVCCL_REQUIRE_VULKAN=1 but no Vulkan device: {e}");
            }
            println!("skipped: {e}");
            None
        }
    }
}

/// A separate instance of device 0 with `opts` (not the shared one).
fn device_with(opts: VulkanOptions) -> Option<Arc<VulkanDevice>> {
    device()?;
    Some(vulkan::open_with(0, &opts).expect("open a second instance"))
}

fn wait(p: Pending) {
    p.wait(Instant::now() + Duration::from_secs(120), "vulkan test").unwrap();
}

fn upload(dev: &dyn Device, bytes: &[u8]) -> Region {
    let r = dev.alloc(bytes.len()).unwrap();
    dev.upload(&r.full(), bytes).unwrap();
    r
}

fn download(dev: &dyn Device, r: &Region) -> Vec<u8> {
    let mut v = vec![0u8; r.len()];
    dev.download(&r.full(), &mut v).unwrap();
    v
}

/// Host reference of `a op b` (then the epilogue).
fn host_reduce(dtype: DType, op: ReduceOp, a: &[u8], b: &[u8], finish: Option<usize>) -> Vec<u8> {
    let ra = Region::from_vec(a.to_vec());
    let rb = Region::from_vec(b.to_vec());
    let args = ReduceArgs { dtype, op, dst: &ra.full(), a: &ra.full(), b: &rb.full(), finish };
    assert!(matches!(HostDevice.reduce(args).unwrap(), Pending::Done));
    ra.full().to_vec().unwrap()
}

/// Describe the first differing element.
fn first_diff(dtype: DType, a: &[u8], b: &[u8], got: &[u8], want: &[u8]) -> Option<String> {
    let e = dtype.size();
    let i = (0..got.len() / e).find(|&i| got[i * e..(i + 1) * e] != want[i * e..(i + 1) * e])?;
    let s = |v: &[u8]| format!("{:02x?}", &v[i * e..(i + 1) * e]);
    Some(format!("element {i}: a {} b {} got {} want {}", s(a), s(b), s(got), s(want)))
}

/// `a op b` out of place on the device equals the host's, byte for byte.
fn check_reduce(dev: &dyn Device, dtype: DType, op: ReduceOp, a: &[u8], b: &[u8], finish: Option<usize>) {
    let want = host_reduce(dtype, op, a, b, finish);
    let (da, db) = (upload(dev, a), upload(dev, b));
    let out = dev.alloc(a.len()).unwrap();
    wait(dev.reduce(ReduceArgs { dtype, op, dst: &out.full(), a: &da.full(), b: &db.full(), finish }).unwrap());
    let got = download(dev, &out);
    if let Some(d) = first_diff(dtype, a, b, &got, &want) {
        panic!("{} {dtype} {op} finish={finish:?}: {d}", dev.describe());
    }
}

/// Deterministic pseudo-random numbers.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Bit patterns that hit every path of an IEEE format with `man` mantissa and `exp` exponent
/// bits: zeros, subnormals, the smallest normals, large values, infinities, NaNs (quiet and
/// signalling), ordinary values and plain random bits.
fn ieee_bits(rng: &mut Rng, man: u32, exp: u32) -> u64 {
    let r = rng.next();
    let emax = (1u64 << exp) - 1;
    let m = r & ((1u64 << man) - 1);
    let s = (r >> 63) << (man + exp);
    let e = match (r >> 56) % 10 {
        0 => 0,
        1 => 0,
        2 => 1 + (r >> 48) % 3,
        3 => emax - 1 - (r >> 48) % 3,
        4 => emax,
        5 => (emax >> 1) + (r >> 48) % 5 - 2,
        6 => (r >> 40) % (emax + 1),
        _ => ((emax >> 1) + (r >> 48) % 60).saturating_sub(30).min(emax - 1),
    };
    let m = match (r >> 52) % 7 {
        0 => 0,
        1 => m & 3,
        _ => m,
    };
    s | (e << man) | m
}

fn is_nan(dtype: DType, bits: u64) -> bool {
    match dtype {
        DType::F32 => f32::from_bits(bits as u32).is_nan(),
        DType::F64 => f64::from_bits(bits).is_nan(),
        DType::F16 => f16::from_bits(bits as u16).is_nan(),
        DType::BF16 => bf16::from_bits(bits as u16).is_nan(),
        DType::F8E4M3 => F8E4M3(bits as u8).to_f32().is_nan(),
        DType::F8E5M2 => F8E5M2(bits as u8).to_f32().is_nan(),
        _ => false,
    }
}

/// `count` pairs of random edge-heavy values; for sum and prod, pairs of two NaNs are replaced
/// (which NaN the host returns then depends on the compiler's operand order).
fn edge_pairs(dtype: DType, count: usize, seed: u64, nan_pairs: bool) -> (Vec<u8>, Vec<u8>) {
    let mut rng = Rng(seed | 1);
    let e = dtype.size();
    let (mut a, mut b) = (Vec::with_capacity(count * e), Vec::with_capacity(count * e));
    for _ in 0..count {
        let mut draw = || match dtype {
            DType::F32 => ieee_bits(&mut rng, 23, 8),
            DType::F64 => ieee_bits(&mut rng, 52, 11),
            DType::F16 => ieee_bits(&mut rng, 10, 5),
            DType::BF16 => ieee_bits(&mut rng, 7, 8),
            _ => rng.next(),
        };
        let x = draw();
        let mut y = draw();
        if !nan_pairs && is_nan(dtype, x) && is_nan(dtype, y) {
            y = 0;
        }
        a.extend_from_slice(&x.to_le_bytes()[..e]);
        b.extend_from_slice(&y.to_le_bytes()[..e]);
    }
    (a, b)
}

/// Divisors for the avg epilogue: small ones, ones whose float rounds, and (for integers) ones
/// that do not fit the type.
const DIVISORS: [usize; 8] = [2, 3, 7, 10, 255, 1000, (1 << 24) + 1, (1 << 31) + 3];

/// Every float dtype × op × divisor on edge-heavy random values, on `dev`.
fn exact_floats(dev: &dyn Device, count: usize) {
    for dtype in [DType::F32, DType::F64, DType::F16, DType::BF16, DType::F8E4M3, DType::F8E5M2] {
        for op in ReduceOp::ALL {
            let nan_pairs = matches!(op, ReduceOp::Min | ReduceOp::Max);
            let (a, b) = edge_pairs(dtype, count, 77 + dtype.code() as u64 * 31 + op.code() as u64, nan_pairs);
            check_reduce(dev, dtype, op, &a, &b, None);
            if op == ReduceOp::Avg {
                for n in DIVISORS {
                    check_reduce(dev, dtype, op, &a, &b, Some(n));
                }
            }
        }
    }
}

#[test]
fn conformance_reductions() {
    let Some(dev) = device() else { return };
    conformance::reductions(&*dev, &[0, 1, 7, 1031]).unwrap();
}

#[test]
fn conformance_copies_and_gathers() {
    let Some(dev) = device() else { return };
    conformance::copies(&*dev).unwrap();
    conformance::gathers(&*dev, true).unwrap();
    conformance::gathers(&*dev, false).unwrap();
}

/// Over 4 M elements (several workgroup rows, multi-piece transfers), f32 and bf16.
#[test]
fn large_counts() {
    let Some(dev) = device() else { return };
    let count = (4 << 20) + 13;
    for dtype in [DType::F32, DType::BF16] {
        let a = conformance::values(dtype, count, 1);
        let b = conformance::values(dtype, count, 2);
        for op in [ReduceOp::Sum, ReduceOp::Max, ReduceOp::Avg] {
            check_reduce(&*dev, dtype, op, &a, &b, Some(5));
        }
    }
}

/// Subnormals, signed zeros, infinities, NaNs, the largest values, ties: every float dtype and
/// op, byte for byte against the host, through the hardware fast path with the exact fallbacks.
#[test]
fn edge_values_match_the_host() {
    let Some(dev) = device() else { return };
    exact_floats(&*dev, 20_000);
}

/// The same with every element on the exact integer paths (they must be right on their own).
#[test]
fn edge_values_soft_float() {
    let Some(dev) = device_with(VulkanOptions { soft_float: true, ..Default::default() }) else { return };
    exact_floats(&*dev, 20_000);
}

/// The same on a device that flushes subnormal results (emulated): the exact paths must take
/// over wherever the hardware is wrong.
#[test]
fn edge_values_flushing_device() {
    let Some(dev) = device_with(VulkanOptions { flush_subnormals: true, ..Default::default() }) else { return };
    exact_floats(&*dev, 20_000);
}

/// fp8: every pair of codes, every op; f16 and bf16: hand-picked values.
#[test]
fn narrow_floats_exhaustive_and_hand_picked() {
    let Some(dev) = device() else { return };
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for x in 0..=255u8 {
        for y in 0..=255u8 {
            a.push(x);
            b.push(y);
        }
    }
    for dtype in [DType::F8E4M3, DType::F8E5M2] {
        for op in ReduceOp::ALL {
            // Two NaNs: which one the host returns depends on operand order; make b a number.
            let b: Vec<u8> = if matches!(op, ReduceOp::Min | ReduceOp::Max) {
                b.clone()
            } else {
                a.iter()
                    .zip(&b)
                    .map(|(&x, &y)| if is_nan(dtype, x.into()) && is_nan(dtype, y.into()) { 0 } else { y })
                    .collect()
            };
            check_reduce(&*dev, dtype, op, &a, &b, None);
            check_reduce(&*dev, dtype, op, &a, &b, Some(3));
        }
    }
    let specials = [
        0.0f32,
        -0.0,
        1.0,
        -1.0,
        0.5,
        1.5,
        3.0,
        65504.0,
        -65504.0,
        65520.0,
        6.1035156e-5,
        5.9604645e-8,
        2.9802322e-8,
        1e-40,
        3.4e38,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        1.0 + f32::EPSILON,
        0.1,
        1.0 / 3.0,
    ];
    for (dtype, enc) in [
        (DType::F16, (|x: f32| f16::from_f32(x).to_le_bytes().to_vec()) as fn(f32) -> Vec<u8>),
        (DType::BF16, |x: f32| bf16::from_f32(x).to_le_bytes().to_vec()),
    ] {
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for &x in &specials {
            for &y in &specials {
                if x.is_nan() && y.is_nan() {
                    continue;
                }
                a.extend(enc(x));
                b.extend(enc(y));
            }
        }
        for op in ReduceOp::ALL {
            for n in [None, Some(2), Some(3), Some(7)] {
                check_reduce(&*dev, dtype, op, &a, &b, n);
            }
        }
    }
}

/// Integer dtypes: random bits, every op, avg with divisors that fit and that do not.
#[test]
fn integers_match_the_host() {
    let Some(dev) = device() else { return };
    for dtype in [DType::I8, DType::U8, DType::I32, DType::U32, DType::I64, DType::U64] {
        for op in ReduceOp::ALL {
            let (a, b) = edge_pairs(dtype, 5000, 5 + dtype.code() as u64, true);
            check_reduce(&*dev, dtype, op, &a, &b, None);
            if op == ReduceOp::Avg {
                for n in DIVISORS.into_iter().chain([127, 128, 256, usize::MAX]) {
                    check_reduce(&*dev, dtype, op, &a, &b, Some(n));
                }
            }
        }
    }
}

/// finish_avg alone on random edge values, in place at an odd element offset.
#[test]
fn finish_avg_alone() {
    let Some(dev) = device() else { return };
    for dtype in DType::ALL {
        let (a, _) = edge_pairs(dtype, 3001, 99 + dtype.code() as u64, true);
        for n in [3usize, 6, 1 << 20, (1 << 24) + 1] {
            let mut want = a.clone();
            devccl_core::op::finish_avg(dtype, &mut want[dtype.size()..], n).unwrap();
            let r = upload(&*dev, &a);
            wait(dev.finish_avg(dtype, &r.slice(dtype.size()..a.len()), n).unwrap());
            let got = download(&*dev, &r);
            if let Some(d) = first_diff(dtype, &a, &a, &got, &want) {
                panic!("finish_avg {dtype} n={n}: {d}");
            }
        }
    }
}

/// Buffers beyond maxStorageBufferRange (128 MiB on lavapipe): windows and split dispatches,
/// for a reduction at an unaligned offset, finish_avg and a gather-and-reduce whose pool spans
/// more than one window (fused groups, and the scratch path for fragments too far apart).
#[test]
fn larger_than_one_binding_window() {
    let Some(dev) = device() else { return };
    let count = (136 << 20) / 4 + 7;
    let dtype = DType::F32;
    let a = conformance::values(dtype, count, 3);
    let b = conformance::values(dtype, count, 4);
    // Unaligned by two elements on both sides, in place.
    let skew = 2 * 4;
    let want = host_reduce(dtype, ReduceOp::Avg, &a[skew..], &b[skew..], Some(3));
    let (da, db) = (upload(&*dev, &a), upload(&*dev, &b));
    let span = skew..a.len();
    let args = ReduceArgs {
        dtype,
        op: ReduceOp::Avg,
        dst: &da.slice(span.clone()),
        a: &da.slice(span.clone()),
        b: &db.slice(span),
        finish: Some(3),
    };
    wait(dev.reduce(args).unwrap());
    let got = download(&*dev, &da);
    assert_eq!(&got[..skew], &a[..skew]);
    assert!(got[skew..] == want[..], "{:?}", first_diff(dtype, &a[skew..], &b[skew..], &got[skew..], &want));
    drop((da, got));

    // Gather-and-reduce: 1 MiB of destination, its first half from the start of a 200 MiB pool
    // and its second half from the end (two fused dispatches with their own pool windows).
    let pool_len = 200 << 20;
    let pool = dev.alloc(pool_len).unwrap();
    let len = 1 << 20;
    let payload = conformance::values(dtype, len / 4, 9);
    let mut frags = Vec::new();
    let mut at = 0usize;
    let mut k = 0u64;
    while at < len {
        // Fragment lengths are odd-sized, but the switch between the pool's ends is at len / 2.
        let end = if at < len / 2 { len / 2 } else { len };
        let flen = (((k * 7919 + 100) % 4093) as usize + 1).min(end - at);
        let src = if at < len / 2 { 64 + at } else { pool_len - len - 64 + at };
        frags.push(Fragment { src_off: src as u64, len: flen as u32, dst_off: at as u64 });
        dev.upload(&pool.slice(src..src + flen), &payload[at..at + flen]).unwrap();
        at += flen;
        k += 1;
    }
    let base_bytes = conformance::values(dtype, len / 4, 10);
    let want = host_reduce(dtype, ReduceOp::Sum, &base_bytes, &payload, None);
    for frags in [frags.clone(), split_elements_far_apart(&frags, &payload, &pool, &*dev, pool_len)] {
        let base = upload(&*dev, &base_bytes);
        let src = Scattered { pool: &pool, frags: &frags };
        wait(dev.gather_reduce(dtype, ReduceOp::Sum, &base.full(), &base.full(), src, None).unwrap());
        let got = download(&*dev, &base);
        assert!(got == want, "{:?}", first_diff(dtype, &base_bytes, &payload, &got, &want));
    }
}

/// The same fragments with the first element split over two places 150 MiB apart (no fused
/// plan exists: the backend gathers into scratch memory first).
fn split_elements_far_apart(
    frags: &[Fragment],
    payload: &[u8],
    pool: &Region,
    dev: &dyn Device,
    pool_len: usize,
) -> Vec<Fragment> {
    let mut out = frags.to_vec();
    let f = out[0];
    assert!(f.len > 4 && f.dst_off == 0);
    let far = pool_len - 64;
    dev.upload(&pool.slice(far..far + 2), &payload[0..2]).unwrap();
    out[0] = Fragment { src_off: far as u64, len: 2, dst_off: 0 };
    out.push(Fragment { src_off: f.src_off + 2, len: f.len - 2, dst_off: 2 });
    out
}

/// Forced host fallback (as DEVCCL_VULKAN_DISABLE=int64,float64 does): results, messages,
/// counters.
#[test]
fn host_fallback_when_features_are_missing() {
    let opts = VulkanOptions { disable_int64: true, disable_float64: true, ..Default::default() };
    let Some(dev) = device_with(opts) else { return };
    assert_eq!(
        dev.host_fallback(DType::F64).as_deref(),
        Some("vulkan:0 lacks shaderFloat64 (disabled by DEVCCL_VULKAN_DISABLE): f64 reductions run on the host")
    );
    assert!(dev.host_fallback(DType::I64).unwrap().contains("lacks shaderInt64"));
    assert!(dev.host_fallback(DType::U64).is_some());
    assert_eq!(dev.host_fallback(DType::F32), None);
    conformance::reductions(&*dev, &[0, 1, 7, 129]).unwrap();
    conformance::gathers(&*dev, true).unwrap();
    let s = dev.stats();
    assert!(s.host_fallbacks > 0 && s.host_fallbacks < s.ops, "{s:?}");
}

/// The environment variable reaches the shared instance (checked in a child process, since the
/// shared instance is opened once per process).
#[test]
fn host_fallback_from_the_environment() {
    if std::env::var("DEVCCL_VULKAN_TEST_CHILD").is_ok() {
        let dev = vulkan::open_vulkan(0).unwrap();
        println!("FALLBACK[{}]", dev.host_fallback(DType::I64).unwrap_or_default());
        return;
    }
    if device().is_none() {
        return;
    }
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "host_fallback_from_the_environment", "--nocapture", "--test-threads=1"])
        .env("DEVCCL_VULKAN_TEST_CHILD", "1")
        .env("DEVCCL_VULKAN_DISABLE", "int64")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains(
            "FALLBACK[vulkan:0 lacks shaderInt64 (disabled by DEVCCL_VULKAN_DISABLE): i64 reductions run on the host]"
        ),
        "{text}"
    );
    let bad = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "host_fallback_from_the_environment", "--nocapture", "--test-threads=1"])
        .env("DEVCCL_VULKAN_TEST_CHILD", "1")
        .env("DEVCCL_VULKAN_DISABLE", "float128")
        .output()
        .unwrap();
    assert!(!bad.status.success(), "an unknown feature name is an error");
}

/// Plain host memory, another device instance's memory and misaligned operands are refused
/// with an error, never a crash.
#[test]
fn foreign_memory_is_refused() {
    let Some(dev) = device() else { return };
    let other = vulkan::open_with(0, &VulkanOptions::default()).unwrap();
    let mine = dev.alloc(64).unwrap();
    let theirs = other.alloc(64).unwrap();
    let host = Region::alloc(64);
    let (f, m) = (DType::F32, ReduceOp::Sum);
    for bad in [&theirs, &host] {
        let e = dev.reduce(ReduceArgs {
            dtype: f,
            op: m,
            dst: &mine.full(),
            a: &mine.full(),
            b: &bad.full(),
            finish: None,
        });
        let e = e.unwrap_err();
        assert!(matches!(e, Error::InvalidUsage(_)), "{e}");
        assert!(e.to_string().contains("did not allocate"), "{e}");
        assert!(dev.copy(&mine.full(), &bad.full()).is_err());
        assert!(dev.copy(&bad.full(), &mine.full()).is_err());
        assert!(dev.upload(&bad.full(), &[0u8; 64]).is_err());
        let frags = [Fragment { src_off: 0, len: 64, dst_off: 0 }];
        assert!(dev.gather(&mine.full(), Scattered { pool: bad, frags: &frags }).is_err());
        assert!(dev.finish_avg(f, &bad.full(), 2).is_err());
    }
    // Misaligned for the element size.
    let e = dev.reduce(ReduceArgs {
        dtype: f,
        op: m,
        dst: &mine.slice(2..10),
        a: &mine.slice(2..10),
        b: &mine.slice(20..28),
        finish: None,
    });
    assert!(e.unwrap_err().to_string().contains("not a multiple"));
    // Overlap and length checks happen before any work.
    assert!(
        dev.reduce(ReduceArgs {
            dtype: f,
            op: m,
            dst: &mine.slice(0..16),
            a: &mine.slice(8..24),
            b: &mine.slice(32..48),
            finish: None
        })
        .is_err()
    );
    assert!(dev.copy(&mine.slice(0..16), &mine.slice(8..24)).is_err());
}

/// Live bytes return to zero once regions drop, also with operations still queued when their
/// fences are dropped (the drop waits for the GPU).
#[test]
fn stats_return_to_zero() {
    let Some(dev) = device_with(VulkanOptions::default()) else { return };
    let before = dev.stats();
    assert_eq!((before.live_device_bytes, before.live_staging_bytes), (0, 0));
    let a = dev.alloc(1000).unwrap();
    let s = dev.alloc_staging(333).unwrap();
    assert_eq!((dev.stats().live_device_bytes, dev.stats().live_staging_bytes), (1000, 333));
    s.with_bytes_mut(0..333, |b| b.fill(7)).unwrap();
    let pending = dev.copy(&a.slice(0..333), &s.full()).unwrap();
    drop((a, s));
    assert!(dev.stats().live_device_bytes > 0, "queued work keeps its buffers");
    drop(pending);
    let after = dev.stats();
    assert_eq!((after.live_device_bytes, after.live_staging_bytes), (0, 0), "{after:?}");
    assert_eq!(after.ops, before.ops + 1);
}

#[test]
fn describe_and_list() {
    let Some(dev) = device() else { return };
    let names = vulkan::list().unwrap();
    assert_eq!(names[0], dev.describe());
    assert!(dev.describe().starts_with("vulkan:0 "), "{}", dev.describe());
    assert!(Arc::ptr_eq(&(vulkan::open(0).unwrap()), &(dev.clone() as Arc<dyn Device>)));
    let e = vulkan::open(names.len() as u32 + 5).unwrap_err();
    assert!(matches!(e, Error::Unsupported { .. }), "{e}");
    println!("{names:?}; {:?}", dev.features());
}

/// Without a driver: `Unsupported` with the reason (no panic); the tests skip, or fail when
/// DEVCCL_REQUIRE_VULKAN=1. Checked in child processes whose loader finds no driver.
#[test]
fn no_driver_skips_or_fails() {
    if std::env::var("DEVCCL_VULKAN_TEST_CHILD").is_ok() {
        return;
    }
    if device().is_none() {
        return;
    }
    let child = |require: bool| {
        let mut c = std::process::Command::new(std::env::current_exe().unwrap());
        c.args(["--exact", "describe_and_list", "--nocapture", "--test-threads=1"])
            .env("VK_DRIVER_FILES", "/nonexistent/devccl-no-driver.json")
            .env("VK_ICD_FILENAMES", "/nonexistent/devccl-no-driver.json")
            .env_remove("DEVCCL_REQUIRE_VULKAN");
        if require {
            c.env("DEVCCL_REQUIRE_VULKAN", "1");
        }
        let out = c.output().unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let (ok, text) = child(false);
    assert!(ok && text.contains("skipped: unsupported: no usable Vulkan driver"), "{text}");
    let (ok, text) = child(true);
    assert!(!ok, "DEVCCL_REQUIRE_VULKAN=1 must fail without a device: {text}");
}

/// Several threads share the device: operations interleave on its queue, fences are tested
/// without blocking, results stay exact.
#[test]
fn threads_share_the_device() {
    let Some(dev) = device() else { return };
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let dev = dev.clone();
            s.spawn(move || {
                for i in 0..40u64 {
                    let dtype = DType::ALL[((t * 7 + i) % 12) as usize];
                    let op = ReduceOp::ALL[((t + i) % 5) as usize];
                    let count = 1 + ((t * 1000 + i * 37) % 3000) as usize;
                    let a = conformance::values(dtype, count, t * 100 + i);
                    let b = conformance::values(dtype, count, t * 100 + i + 50);
                    let want = host_reduce(dtype, op, &a, &b, Some(4));
                    let (da, db) = (upload(&*dev, &a), upload(&*dev, &b));
                    let args = ReduceArgs { dtype, op, dst: &da.full(), a: &da.full(), b: &db.full(), finish: Some(4) };
                    let mut p = dev.reduce(args).unwrap();
                    while !p.test().unwrap() {
                        std::thread::yield_now();
                    }
                    assert!(download(&*dev, &da) == want, "thread {t} op {i}: {dtype} {op}");
                }
            });
        }
    });
}

// ---------------------------------------------------------------------------------------------
// Memory behind file descriptors (the devmem RX pool / TX buffer)
// ---------------------------------------------------------------------------------------------

/// A separate mapping of an exported descriptor: what the simulated NIC writes and reads.
fn nic_view(e: &devccl_core::device::Exported, len: usize, writable: bool) -> Region {
    use std::os::fd::AsFd;
    devccl_core::memory::fd::map_fd(e.fd.as_fd(), e.offset, len, writable).expect("map the exported descriptor")
}

fn unsupported_reason(e: Error) -> String {
    match e {
        Error::Unsupported { reason } => reason,
        other => panic!("expected Unsupported, got {other:?}"),
    }
}

/// What the NIC writes through its mapping is what copies and shaders then read (gather,
/// fused gather-and-reduce, reduce with the pool as operand), round after round; what the
/// device wrote is what the mapping reads once the operation's fence completed.
#[test]
fn exported_memory_is_coherent_with_the_device() {
    let Some(dev) = device() else { return };
    let kind = dev.export_kind().unwrap();
    println!("{}: exports {kind:?}", dev.describe());
    if dev.describe().contains("llvmpipe") {
        assert_eq!(kind, devccl_core::device::ExportKind::Mappable, "lavapipe exports OPAQUE_FD memfds");
    }
    let pool_len = 200_000usize;
    let (pool, e) = dev.alloc_exportable(pool_len).unwrap();
    let nic = nic_view(&e, pool_len, true);
    for (round, dtype) in [DType::F32, DType::BF16, DType::I64, DType::U8, DType::F32].into_iter().enumerate() {
        let esz = dtype.size();
        let count = 10_007usize;
        let len = count * esz;
        let payload = conformance::values(dtype, count, 40 + round as u64);
        // The NIC scatters the payload over the pool in fragments at odd offsets, last first.
        let mut frags = Vec::new();
        let (mut at, mut off) = (0usize, 13 + round);
        while at < len {
            let n = (1 + (at * 7 + 331) % 4000).min(len - at);
            frags.push(Fragment { src_off: 0, len: n as u32, dst_off: at as u64 });
            at += n;
        }
        for f in frags.iter_mut().rev() {
            f.src_off = off as u64;
            let d = f.dst_off as usize;
            nic.slice(off..off + f.len as usize)
                .with_bytes_mut(|b| b.copy_from_slice(&payload[d..d + b.len()]))
                .unwrap();
            off += f.len as usize + 3;
        }
        assert!(off <= pool_len);
        let src = Scattered { pool: &pool, frags: &frags };
        let dst = dev.alloc(len).unwrap();
        wait(dev.gather(&dst.full(), src).unwrap());
        assert!(download(&*dev, &dst) == payload, "round {round}: gather of what the NIC wrote");
        for op in [ReduceOp::Sum, ReduceOp::Max] {
            let base = conformance::values(dtype, count, 90 + round as u64);
            let want = host_reduce(dtype, op, &base, &payload, Some(2));
            let db = upload(&*dev, &base);
            wait(dev.gather_reduce(dtype, op, &db.full(), &db.full(), src, Some(2)).unwrap());
            assert!(download(&*dev, &db) == want, "round {round}: gather_reduce {dtype} {op}");
        }
        // The pool itself as an operand (aligned for the element): the NIC's bytes, read by a shader.
        let at = 4096 * (round + 1);
        nic.slice(at..at + len).with_bytes_mut(|b| b.copy_from_slice(&payload)).unwrap();
        let base = conformance::values(dtype, count, 7);
        let want = host_reduce(dtype, ReduceOp::Sum, &base, &payload, None);
        let db = upload(&*dev, &base);
        let args = ReduceArgs {
            dtype,
            op: ReduceOp::Sum,
            dst: &db.full(),
            a: &db.full(),
            b: &pool.slice(at..at + len),
            finish: None,
        };
        wait(dev.reduce(args).unwrap());
        assert!(download(&*dev, &db) == want, "round {round}: reduce with the pool as operand");
    }
    // TX: the device writes (copy, reduce, gather) into an exportable buffer; the NIC reads.
    let len = 123_457usize;
    let (tx, te) = dev.alloc_exportable(len + 64).unwrap();
    let wire = nic_view(&te, len + 64, false);
    let data = conformance::values(DType::U8, len, 3);
    let src = upload(&*dev, &data);
    wait(dev.copy(&tx.slice(5..5 + len), &src.full()).unwrap());
    assert!(wire.slice(5..5 + len).to_vec().unwrap() == data, "copy into the TX buffer, read through the fd");
    let a = conformance::values(DType::F32, 4096, 1);
    let b = conformance::values(DType::F32, 4096, 2);
    let (da, db) = (upload(&*dev, &a), upload(&*dev, &b));
    let args = ReduceArgs {
        dtype: DType::F32,
        op: ReduceOp::Prod,
        dst: &tx.slice(64..64 + a.len()),
        a: &da.full(),
        b: &db.full(),
        finish: None,
    };
    wait(dev.reduce(args).unwrap());
    let want = host_reduce(DType::F32, ReduceOp::Prod, &a, &b, None);
    assert!(wire.slice(64..64 + a.len()).to_vec().unwrap() == want, "a shader's output, read through the fd");
    let frags = [Fragment { src_off: 100, len: 50, dst_off: 0 }, Fragment { src_off: 10, len: 30, dst_off: 50 }];
    wait(dev.gather(&tx.slice(len - 16..len + 64), Scattered { pool: &src, frags: &frags }).unwrap());
    let want: Vec<u8> = data[100..150].iter().chain(&data[10..40]).copied().collect();
    assert_eq!(wire.slice(len - 16..len + 64).to_vec().unwrap(), want, "a gather into the TX buffer");
    // Host writes through the mapping after device writes, then the device reads them back.
    nic.slice(0..4).with_bytes_mut(|b| b.copy_from_slice(&[9, 8, 7, 6])).unwrap();
    let mut four = [0u8; 4];
    dev.download(&pool.slice(0..4), &mut four).unwrap();
    assert_eq!(four, [9, 8, 7, 6]);
}

/// Exported descriptors: the buffer's bytes at `offset` inside `fd_len`, whatever the size; a
/// new descriptor per export; memory not allocated exportable is refused with the reason.
#[test]
fn exported_descriptors_and_offsets() {
    use std::io::Seek;
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::MetadataExt;
    let Some(dev) = device() else { return };
    for len in [0usize, 1, 4095, 4096, (1 << 20) + 3] {
        let (r, e) = dev.alloc_exportable(len).unwrap();
        assert_eq!((r.len(), r.kind()), (len, &devccl_core::memory::MemKind::Vulkan { device: 0 }));
        assert!(e.offset + len as u64 <= e.fd_len, "{len}: {e:?}");
        let file = std::fs::File::from(e.fd.try_clone().unwrap());
        assert_eq!(file.metadata().unwrap().len(), e.fd_len, "{len}: fd_len is the descriptor's size");
        let data = conformance::values(DType::U8, len, len as u64);
        dev.upload(&r.full(), &data).unwrap();
        assert!(nic_view(&e, len, false).full().to_vec().unwrap() == data, "{len}: bytes at the offset");
        // Windows at odd offsets inside the descriptor.
        for (at, n) in [(0usize, 1usize), (3, 4090), (4093, 10), (len / 2, len / 3)] {
            if at + n > len {
                continue;
            }
            let w = devccl_core::memory::fd::map_fd(std::os::fd::AsFd::as_fd(&e.fd), e.offset + at as u64, n, false);
            assert!(w.unwrap().full().to_vec().unwrap() == data[at..at + n], "{len}: window {at}+{n}");
        }
        // Another export: a new descriptor of the same file, same place.
        let e2 = dev.export(&r).unwrap();
        assert_ne!(e2.fd.as_raw_fd(), e.fd.as_raw_fd());
        assert_eq!((e2.offset, e2.fd_len, e2.kind), (e.offset, e.fd_len, e.kind));
        let mut f2 = std::fs::File::from(e2.fd.try_clone().unwrap());
        assert_eq!(f2.metadata().unwrap().ino(), file.metadata().unwrap().ino());
        assert_eq!(f2.seek(std::io::SeekFrom::End(0)).unwrap(), e.fd_len);
        if len > 0 {
            nic_view(&e2, len, true).slice(len - 1..len).with_bytes_mut(|b| b[0] ^= 0xff).unwrap();
            let mut last = [0u8];
            dev.download(&r.slice(len - 1..len), &mut last).unwrap();
            assert_eq!(last[0], data[len - 1] ^ 0xff, "{len}: written through the second descriptor");
        }
    }
    // Memory that was not allocated exportable.
    let plain = dev.alloc(4096).unwrap();
    let why = unsupported_reason(dev.export(&plain).unwrap_err());
    assert!(why.contains("not allocated exportable") && why.contains("alloc_exportable"), "{why}");
    let staging = dev.alloc_staging(4096).unwrap();
    assert!(unsupported_reason(dev.export(&staging).unwrap_err()).contains("not allocated exportable"));
    let other = vulkan::open_with(0, &VulkanOptions::default()).unwrap();
    let (theirs, _) = other.alloc_exportable(64).unwrap();
    assert!(unsupported_reason(dev.export(&theirs).unwrap_err()).contains("did not allocate"));
    assert!(unsupported_reason(dev.export(&Region::alloc(64)).unwrap_err()).contains("did not allocate"));
    // The exported descriptor keeps the bytes after the buffer is freed.
    let (r, e) = dev.alloc_exportable(5000).unwrap();
    dev.upload(&r.full(), &[0x5a; 5000]).unwrap();
    drop(r);
    assert!(nic_view(&e, 5000, false).full().to_vec().unwrap().iter().all(|&b| b == 0x5a));
}

/// Exportable buffers count as device memory until freed (the descriptor outliving them).
#[test]
fn stats_count_exportable_bytes() {
    let Some(dev) = device_with(VulkanOptions::default()) else { return };
    assert_eq!(dev.stats().live_device_bytes, 0);
    let (r, e) = dev.alloc_exportable(1000).unwrap();
    let plain = dev.alloc(24).unwrap();
    assert_eq!(dev.stats().live_device_bytes, 1024);
    let pending = dev.copy(&r.slice(0..24), &plain.full()).unwrap();
    drop((r, plain));
    assert!(dev.stats().live_device_bytes > 0, "queued work keeps its buffers");
    drop(pending);
    assert_eq!(dev.stats().live_device_bytes, 0);
    drop(e);
    let before = dev.stats().live_device_bytes;
    let many: Vec<_> = (0..20).map(|i| dev.alloc_exportable(4096 * i + 1).unwrap()).collect();
    assert_eq!(dev.stats().live_device_bytes, before + (0..20).map(|i| 4096 * i + 1).sum::<u64>());
    drop(many);
    assert_eq!(dev.stats().live_device_bytes, 0);
}

/// A device without VK_KHR_external_memory_fd (emulated) says so, and still computes.
#[test]
fn without_external_memory_fd_exports_are_unsupported() {
    let opts = VulkanOptions { disable_external_memory: true, ..Default::default() };
    let Some(dev) = device_with(opts) else { return };
    let why = unsupported_reason(dev.alloc_exportable(4096).unwrap_err());
    assert!(why.contains("VK_KHR_external_memory_fd") && why.starts_with("vulkan:0 "), "{why}");
    let r = dev.alloc(64).unwrap();
    assert!(unsupported_reason(dev.export(&r).unwrap_err()).contains("VK_KHR_external_memory_fd"));
    assert!(unsupported_reason(dev.export_kind().unwrap_err()).contains("VK_KHR_external_memory_fd"));
    check_reduce(
        &*dev,
        DType::F32,
        ReduceOp::Sum,
        &conformance::values(DType::F32, 64, 1),
        &conformance::values(DType::F32, 64, 2),
        None,
    );
}
