//! The CUDA backend's tests.
//!
//! Without a GPU (CI): the answers without a driver; the NVRTC compile of every kernel for
//! sm_90 (when NVRTC is found); and the kernel source itself run on the CPU — compiled with
//! the host's C++ compiler behind a small shim, driven by the very launch plans the CUDA device
//! uses — through devccl's conformance suite and an edge-value exactness check against the
//! host device.
//!
//! With a GPU: conformance, exactness, a large f32 reduction, stream ordering with a caller's
//! stream, gates (stream memory ops and the host-function fallback), stats, foreign pointers.
//!
//! Environment: `DEVCCL_REQUIRE_CUDA=1`, `DEVCCL_REQUIRE_NVRTC=1`, `DEVCCL_REQUIRE_KERNEL_EMU=1`
//! turn the corresponding skip into a failure. NVRTC is looked for in `DEVCCL_NVRTC_PATH`, the
//! project venv (`$DEVCCL_VENV`, else `<repo>/.venv`: nvidia/cu13/lib), then the system.

#![cfg(feature = "cuda")]

use std::io::{BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use devccl_core::device::{
    Device, HostDevice, Pending, ReduceArgs, Scattered, check_fragments, check_gather_reduce, check_reduce, conformance,
};
use devccl_core::dtype::DType;
use devccl_core::memory::{DeviceId, Region, RegionSlice};
use devccl_core::op::ReduceOp;
use devccl_core::transport::Fragment;
use devccl_core::{Error, Result};
use devccl_device::cuda::{self, plan};

const NO_DRIVER: &str = "no CUDA driver (libcuda.so.1 not found)";

fn required(var: &str) -> bool {
    std::env::var(var).is_ok_and(|v| v == "1")
}

fn skip(var: &str, why: &str) {
    assert!(!required(var), "{var}=1 but: {why}");
    eprintln!("skipped: {why} (set {var}=1 to make this a failure)");
}

// ---------------------------------------------------------------------------------------------
// No driver
// ---------------------------------------------------------------------------------------------

fn driver_absent() -> bool {
    matches!(cuda::driver_status(), Err(e) if e == NO_DRIVER)
}

fn assert_no_driver(r: Result<Arc<dyn Device>>) {
    match r {
        Err(Error::Unsupported { reason }) => assert_eq!(reason, NO_DRIVER),
        other => panic!("expected Unsupported without a driver, got {other:?}"),
    }
}

#[test]
fn without_a_driver_every_entry_point_is_unsupported() {
    if !driver_absent() {
        eprintln!("skipped: a CUDA driver is present ({:?})", cuda::driver_status());
        return;
    }
    for _ in 0..2 {
        assert_no_driver(cuda::open(0));
        assert_no_driver(devccl_device::open(DeviceId::Cuda(0)));
        assert_no_driver(cuda::open(7));
        assert!(matches!(cuda::open_cuda(0), Err(Error::Unsupported { reason }) if reason == NO_DRIVER));
    }
    let from_thread = std::thread::spawn(|| cuda::open(0).map(|_| ())).join().expect("no panic");
    assert!(matches!(from_thread, Err(Error::Unsupported { reason }) if reason == NO_DRIVER));
    assert_eq!(cuda::driver_status(), Err(NO_DRIVER.to_string()));
}

// ---------------------------------------------------------------------------------------------
// NVRTC compile of every kernel
// ---------------------------------------------------------------------------------------------

/// The NVRTC directory of the project venv, if there is one.
fn venv_nvrtc() -> Option<PathBuf> {
    let venv = std::env::var_os("DEVCCL_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv"));
    let lib = std::fs::read_dir(venv.join("lib")).ok()?;
    lib.filter_map(|e| e.ok())
        .map(|e| e.path().join("site-packages/nvidia/cu13/lib"))
        .find(|d| d.join("libnvrtc.so.13").exists())
}

fn expected_kernel_names() -> Vec<String> {
    let mut names: Vec<String> = DType::ALL
        .iter()
        .flat_map(|d| {
            let t = d.short_name();
            [format!("devccl_reduce_{t}"), format!("devccl_finish_{t}"), format!("devccl_gather_reduce_{t}")]
        })
        .collect();
    names.push("devccl_gather".into());
    names.sort();
    names
}

/// The names of the function symbols in an ELF64 little-endian file (a CUBIN).
fn elf_functions(elf: &[u8]) -> std::result::Result<Vec<String>, String> {
    let u16_at = |o: usize| u16::from_le_bytes(elf[o..o + 2].try_into().unwrap()) as usize;
    let u32_at = |o: usize| u32::from_le_bytes(elf[o..o + 4].try_into().unwrap()) as usize;
    let u64_at = |o: usize| u64::from_le_bytes(elf[o..o + 8].try_into().unwrap()) as usize;
    if elf.len() < 64 || &elf[..4] != b"\x7fELF" || elf[4] != 2 || elf[5] != 1 {
        return Err("not a 64-bit little-endian ELF".into());
    }
    let (shoff, shentsize, shnum) = (u64_at(0x28), u16_at(0x3a), u16_at(0x3c));
    let section = |i: usize| shoff + i * shentsize;
    let mut names = Vec::new();
    for i in 0..shnum {
        let s = section(i);
        if u32_at(s + 4) != 2 {
            continue; // not SHT_SYMTAB
        }
        let (off, size, link, entsize) = (u64_at(s + 0x18), u64_at(s + 0x20), u32_at(s + 0x28), u64_at(s + 0x38));
        let strtab = u64_at(section(link) + 0x18);
        for k in 0..size / entsize.max(1) {
            let sym = off + k * entsize;
            if elf[sym + 4] & 0xf != 2 {
                continue; // not STT_FUNC
            }
            let name = &elf[strtab + u32_at(sym)..];
            let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
            names.push(String::from_utf8_lossy(&name[..end]).into_owned());
        }
    }
    Ok(names)
}

/// The PTX parameter types of entry `name`.
fn ptx_params(ptx: &str, name: &str) -> Vec<String> {
    let start = ptx.find(&format!(".entry {name}(")).unwrap_or_else(|| panic!("{name} missing"));
    let body = &ptx[start..];
    let body = &body[..body.find(')').unwrap()];
    body.lines()
        .filter_map(|l| l.trim().strip_prefix(".param "))
        .map(|l| l.split(' ').next().unwrap().to_string())
        .collect()
}

/// Every kernel's declared parameters agree with what the launch plans pass (the driver
/// copies each parameter's declared size from the launcher's 8-byte slots).
fn check_parameters_match_plans(ptx: &str) {
    let frags = [Fragment { src_off: 0, len: 8, dst_off: 0 }];
    for dtype in DType::ALL {
        let launches = [
            plan::reduce(dtype, ReduceOp::Avg, Some(2), 256, 512, 768, 64, 1),
            plan::finish_avg(dtype, 256, 64, 3, 1).unwrap(),
            plan::gather(256, 512, &frags, 1),
            plan::gather_reduce(dtype, ReduceOp::Min, None, 256, 512, 768, &frags, 1),
        ];
        for l in launches {
            let want: Vec<&str> = l
                .args
                .iter()
                .map(|a| match a {
                    plan::Arg::Ptr(_) | plan::Arg::Table | plan::Arg::U64(_) => ".u64",
                    plan::Arg::I32(_) => ".u32",
                    plan::Arg::F32(_) => ".f32",
                    plan::Arg::F64(_) => ".f64",
                })
                .collect();
            assert_eq!(ptx_params(ptx, &l.kernel.name()), want, "{}", l.kernel.name());
        }
    }
}

#[test]
fn nvrtc_compiles_every_kernel_for_sm_90() {
    if std::env::var_os("DEVCCL_NVRTC_PATH").is_none()
        && let Some(dir) = venv_nvrtc()
    {
        cuda::preload_nvrtc(&dir).expect("preload the venv's NVRTC");
    }
    let image = match cuda::nvrtc::compile(9, 0) {
        Ok(i) => i,
        Err(Error::Unsupported { reason }) => return skip("DEVCCL_REQUIRE_NVRTC", &reason),
        Err(e) => panic!("{e}"),
    };
    eprintln!(
        "NVRTC {}.{} compiled {} in {:.1?}: CUBIN {} bytes, PTX {} bytes",
        image.nvrtc_version.0,
        image.nvrtc_version.1,
        image.target,
        image.compile_time,
        image.cubin.as_ref().map_or(0, Vec::len),
        image.ptx.as_ref().map_or(0, String::len)
    );
    assert_eq!(image.target, "sm_90");
    assert!(image.log.trim().is_empty() || !image.log.contains("error"), "{}", image.log);
    let want = expected_kernel_names();
    let mut loaded = cuda::nvrtc::kernel_names();
    loaded.sort();
    assert_eq!(loaded, want, "the device loads exactly the expected entry points");
    let cubin = image.cubin.as_ref().expect("a CUBIN for a real architecture");
    let mut in_cubin = elf_functions(cubin).expect("CUBIN is an ELF");
    in_cubin.retain(|n| n.starts_with("devccl_"));
    in_cubin.sort();
    assert_eq!(in_cubin, want, "every kernel is in the CUBIN");
    if let Some(ptx) = &image.ptx {
        for name in &want {
            assert!(ptx.contains(&format!(".entry {name}(")), "{name} missing from the PTX");
        }
        for bad in ["fma.rn.f32", ".ftz.", "div.approx", "div.full"] {
            assert!(!ptx.contains(bad), "the PTX uses {bad}: results would differ from the host");
        }
        check_parameters_match_plans(ptx);
    }
    // The second call answers the cached image.
    assert!(Arc::ptr_eq(&image, &cuda::nvrtc::compile(9, 0).unwrap()));
}

// ---------------------------------------------------------------------------------------------
// The kernels on the CPU
// ---------------------------------------------------------------------------------------------

/// Runs launches of the kernel source compiled for the host: a child process reads jobs
/// (buffers, arguments) on stdin, runs every block and thread of the grid one after another,
/// checks guard bytes around each buffer, and answers the buffers.
const HARNESS: &str = r#"
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

struct DevcclDim { unsigned x, y, z; };
static DevcclDim threadIdx, blockIdx, blockDim, gridDim;
#define __global__
#define __device__
#define __forceinline__ inline
static inline float __fadd_rn(float a, float b) { return a + b; }
static inline float __fmul_rn(float a, float b) { return a * b; }
static inline float __fdiv_rn(float a, float b) { return a / b; }
static inline double __dadd_rn(double a, double b) { return a + b; }
static inline double __dmul_rn(double a, double b) { return a * b; }
static inline double __ddiv_rn(double a, double b) { return a / b; }
static inline unsigned __float_as_uint(float f) { unsigned u; memcpy(&u, &f, 4); return u; }
static inline float __uint_as_float(unsigned u) { float f; memcpy(&f, &u, 4); return f; }
static inline long long __double_as_longlong(double d) { long long u; memcpy(&u, &d, 8); return u; }
static inline double __longlong_as_double(long long u) { double d; memcpy(&d, &u, 8); return d; }
static inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz((unsigned)x); }

#include "kernels.cu"

typedef unsigned long long U;
static bool rd(void* p, size_t n) { return n == 0 || fread(p, 1, n, stdin) == n; }
template <class T> static bool rdv(T& v) { return rd(&v, sizeof v); }
static float as_f32(U v) { return __uint_as_float((unsigned)v); }
static double as_f64(U v) { return __longlong_as_double((long long)v); }

template <class F> static void grid(unsigned g, unsigned b, F f) {
    gridDim = {g, 1, 1};
    blockDim = {b, 1, 1};
    for (unsigned i = 0; i < g; i++)
        for (unsigned t = 0; t < b; t++) {
            blockIdx = {i, 0, 0};
            threadIdx = {t, 0, 0};
            f();
        }
}

static bool dispatch(const std::string& name, const U* a, unsigned g, unsigned b) {
#define DEVCCL_EMU(n, T)                                                                                       \
    if (name == "devccl_reduce_" #n) {                                                                         \
        grid(g, b, [&] { devccl_reduce_##n((u8*)a[0], (const u8*)a[1], (const u8*)a[2], a[3], (int)a[4],       \
                                           (int)a[5], a[6], as_f32(a[7]), as_f64(a[8])); });                   \
        return true;                                                                                           \
    }                                                                                                          \
    if (name == "devccl_finish_" #n) {                                                                         \
        grid(g, b, [&] { devccl_finish_##n((u8*)a[0], a[1], a[2], as_f32(a[3]), as_f64(a[4])); });            \
        return true;                                                                                           \
    }                                                                                                          \
    if (name == "devccl_gather_reduce_" #n) {                                                                  \
        grid(g, b, [&] { devccl_gather_reduce_##n((u8*)a[0], (const u8*)a[1], (const u8*)a[2], (const Frag*)a[3], \
                                                  a[4], (int)a[5], (int)a[6], a[7], as_f32(a[8]), as_f64(a[9])); }); \
        return true;                                                                                           \
    }
    DEVCCL_FOR_EACH_DTYPE(DEVCCL_EMU)
    if (name == "devccl_gather") {
        grid(g, b, [&] { devccl_gather((u8*)a[0], (const u8*)a[1], (const Frag*)a[2], a[3]); });
        return true;
    }
    return false;
}

struct Buf { U vbase, len, total; unsigned char* mem; unsigned char* data; };
static const size_t GUARD = 256;

int main() {
    for (;;) {
        uint32_t nlen, g, b, nb, na;
        if (!rdv(nlen)) return 0;
        std::string name(nlen, '\0');
        if (!rd(&name[0], nlen) || !rdv(g) || !rdv(b) || !rdv(nb)) return 1;
        std::vector<Buf> bufs(nb);
        for (auto& x : bufs) {
            if (!rdv(x.vbase) || !rdv(x.len)) return 1;
            x.total = 2 * GUARD + (x.len + 255) / 256 * 256;
            x.mem = (unsigned char*)aligned_alloc(256, x.total);
            memset(x.mem, 0xcd, x.total);
            x.data = x.mem + GUARD;
            if (!rd(x.data, x.len)) return 1;
        }
        if (!rdv(na)) return 1;
        std::vector<U> args(na);
        std::string err;
        for (auto& v : args) {
            uint8_t is_ptr;
            if (!rdv(is_ptr) || !rdv(v)) return 1;
            if (!is_ptr) continue;
            bool found = false;
            for (auto& x : bufs)
                if (v >= x.vbase && v <= x.vbase + x.len) { v = (U)(x.data + (v - x.vbase)); found = true; break; }
            if (!found) err = "a pointer argument outside every buffer";
        }
        if (err.empty() && !dispatch(name, args.data(), g, b)) err = "unknown kernel " + name;
        for (auto& x : bufs)
            for (U k = 0; k < x.total && err.empty(); k++)
                if ((k < GUARD || k >= GUARD + x.len) && x.mem[k] != 0xcd) err = name + " wrote outside a buffer";
        uint8_t ok = err.empty();
        fwrite(&ok, 1, 1, stdout);
        if (ok) {
            for (auto& x : bufs) fwrite(x.data, 1, x.len, stdout);
        } else {
            uint32_t n = err.size();
            fwrite(&n, 4, 1, stdout);
            fwrite(err.data(), 1, n, stdout);
        }
        fflush(stdout);
        for (auto& x : bufs) free(x.mem);
    }
}
"#;

struct EmuProc {
    _child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

/// The harness process (one per test process, shared).
struct Emu(Mutex<EmuProc>);

impl std::fmt::Debug for Emu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Emu")
    }
}

fn build_emu() -> std::result::Result<Emu, String> {
    let dir = std::env::temp_dir().join(format!("devccl-cuda-emu-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    std::fs::write(dir.join("kernels.cu"), cuda::SOURCE).map_err(|e| e.to_string())?;
    std::fs::write(dir.join("harness.cpp"), HARNESS).map_err(|e| e.to_string())?;
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    let nan = format!("-DDEVCCL_NEG_DEFAULT_NAN={}", cuda::nvrtc::host_default_nan_is_negative() as u8);
    let exe = dir.join("harness");
    let out = Command::new(&cxx)
        .args(["-std=c++17", "-O2", "-ffp-contract=off", "-fno-fast-math", "-fno-strict-aliasing", "-w", &nan])
        .arg("-o")
        .arg(&exe)
        .arg(dir.join("harness.cpp"))
        .output()
        .map_err(|e| format!("no C++ compiler ({cxx}: {e})"))?;
    if !out.status.success() {
        return Err(format!("{cxx} failed on the kernel source:\n{}", String::from_utf8_lossy(&out.stderr)));
    }
    let mut child =
        Command::new(&exe).stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().map_err(|e| e.to_string())?;
    // The running harness needs its files no more.
    let _ = std::fs::remove_dir_all(&dir);
    let stdin = child.stdin.take().unwrap();
    let stdout = BufReader::new(child.stdout.take().unwrap());
    Ok(Emu(Mutex::new(EmuProc { _child: child, stdin, stdout })))
}

/// The harness, or `None` (with the skip printed) without a C++ compiler.
fn emu() -> Option<&'static Emu> {
    static EMU: OnceLock<std::result::Result<Emu, String>> = OnceLock::new();
    match EMU.get_or_init(build_emu) {
        Ok(e) => Some(e),
        Err(why) if why.starts_with("no C++ compiler") => {
            skip("DEVCCL_REQUIRE_KERNEL_EMU", why);
            None
        }
        Err(why) => panic!("{why}"),
    }
}

impl Emu {
    /// Run `l` over `regions` (host regions standing for device memory; their addresses are
    /// the plan's pointers), writing the results back into the writable ones.
    fn run(&self, l: &plan::Launch, regions: &[&Region]) -> Result<()> {
        let mut bufs: Vec<&Region> = Vec::new();
        for r in regions {
            if !bufs.iter().any(|b| b.same(r)) {
                bufs.push(r);
            }
        }
        let table_base = l.table.as_ptr() as u64;
        let mut msg = Vec::new();
        let name = l.kernel.name();
        msg.extend((name.len() as u32).to_le_bytes());
        msg.extend(name.as_bytes());
        msg.extend(l.grid.to_le_bytes());
        msg.extend(l.block.to_le_bytes());
        msg.extend((bufs.len() as u32 + 1).to_le_bytes());
        for b in &bufs {
            msg.extend((b.addr() as u64).to_le_bytes());
            msg.extend((b.len() as u64).to_le_bytes());
            msg.extend(b.full().to_vec()?);
        }
        msg.extend(table_base.to_le_bytes());
        msg.extend((l.table.len() as u64).to_le_bytes());
        msg.extend(&l.table);
        msg.extend((l.args.len() as u32).to_le_bytes());
        for a in &l.args {
            let (is_ptr, v) = match *a {
                plan::Arg::Ptr(p) => (1u8, p),
                plan::Arg::Table => (1, table_base),
                plan::Arg::U64(v) => (0, v),
                plan::Arg::I32(v) => (0, v as u32 as u64),
                plan::Arg::F32(v) => (0, v.to_bits() as u64),
                plan::Arg::F64(v) => (0, v.to_bits()),
            };
            msg.push(is_ptr);
            msg.extend(v.to_le_bytes());
        }
        let mut p = self.0.lock().unwrap_or_else(|e| e.into_inner());
        p.stdin.write_all(&msg).and_then(|()| p.stdin.flush()).map_err(|e| Error::system("emu write", e))?;
        let mut ok = [0u8];
        p.stdout.read_exact(&mut ok).map_err(|e| Error::system("emu read", e))?;
        if ok[0] == 0 {
            let mut n = [0u8; 4];
            p.stdout.read_exact(&mut n).map_err(|e| Error::system("emu read", e))?;
            let mut text = vec![0u8; u32::from_le_bytes(n) as usize];
            p.stdout.read_exact(&mut text).map_err(|e| Error::system("emu read", e))?;
            return Err(Error::Internal(String::from_utf8_lossy(&text).into_owned()));
        }
        for b in &bufs {
            let mut out = vec![0u8; b.len()];
            p.stdout.read_exact(&mut out).map_err(|e| Error::system("emu read", e))?;
            if b.writable() {
                b.with_bytes_mut(0..b.len(), |d| d.copy_from_slice(&out))?;
            }
        }
        let mut table = vec![0u8; l.table.len()];
        p.stdout.read_exact(&mut table).map_err(|e| Error::system("emu read", e))?;
        Ok(())
    }
}

/// The CUDA kernels as a [`Device`], run on the CPU: device memory is host memory, and every
/// operation goes through the CUDA device's own launch plans.
#[derive(Debug)]
struct EmuDevice {
    emu: &'static Emu,
    sm_count: u32,
}

fn addr(s: &RegionSlice) -> u64 {
    s.region.addr() as u64 + s.range.start as u64
}

impl Device for EmuDevice {
    fn id(&self) -> DeviceId {
        DeviceId::Cuda(0)
    }

    fn describe(&self) -> String {
        "CUDA kernels on the CPU".into()
    }

    fn alloc(&self, len: usize) -> Result<Region> {
        Ok(Region::alloc(len))
    }

    fn alloc_staging(&self, len: usize) -> Result<Region> {
        Ok(Region::alloc(len))
    }

    fn copy(&self, dst: &RegionSlice, src: &RegionSlice) -> Result<Pending> {
        HostDevice.copy(dst, src)
    }

    fn reduce(&self, r: ReduceArgs<'_>) -> Result<Pending> {
        check_reduce(&r)?;
        if !r.dst.is_empty() {
            let l =
                plan::reduce(r.dtype, r.op, r.finish, addr(r.dst), addr(r.a), addr(r.b), r.dst.len(), self.sm_count);
            self.emu.run(&l, &[&r.dst.region, &r.a.region, &r.b.region])?;
        }
        Ok(Pending::Done)
    }

    fn finish_avg(&self, dtype: DType, dst: &RegionSlice, n: usize) -> Result<Pending> {
        if let Some(l) = plan::finish_avg(dtype, addr(dst), dst.len(), n, self.sm_count) {
            self.emu.run(&l, &[&dst.region])?;
        }
        Ok(Pending::Done)
    }

    fn gather(&self, dst: &RegionSlice, src: Scattered<'_>) -> Result<Pending> {
        let frags = check_fragments(dst.len(), &src)?;
        if !dst.is_empty() {
            let l = plan::gather(addr(dst), src.pool.addr() as u64, &frags, self.sm_count);
            self.emu.run(&l, &[&dst.region, src.pool])?;
        }
        Ok(Pending::Done)
    }

    fn gather_reduce(
        &self,
        dtype: DType,
        op: ReduceOp,
        dst: &RegionSlice,
        base: &RegionSlice,
        src: Scattered<'_>,
        finish: Option<usize>,
    ) -> Result<Pending> {
        let frags = check_gather_reduce(dtype, dst, base, &src)?;
        if !dst.is_empty() {
            let pool = src.pool.addr() as u64;
            let l = plan::gather_reduce(dtype, op, finish, addr(dst), addr(base), pool, &frags, self.sm_count);
            self.emu.run(&l, &[&dst.region, &base.region, src.pool])?;
        }
        Ok(Pending::Done)
    }

    fn upload(&self, dst: &RegionSlice, src: &[u8]) -> Result<()> {
        HostDevice.upload(dst, src)
    }

    fn download(&self, src: &RegionSlice, dst: &mut [u8]) -> Result<()> {
        HostDevice.download(src, dst)
    }
}

fn emu_device() -> Option<EmuDevice> {
    // Two "SMs": small grids, so every grid-stride loop takes several turns.
    emu().map(|emu| EmuDevice { emu, sm_count: 2 })
}

#[test]
fn kernels_on_the_cpu_pass_conformance() {
    let Some(dev) = emu_device() else { return };
    conformance::reductions(&dev, &[0, 1, 7, 1031]).unwrap();
    conformance::gathers(&dev, true).unwrap();
}

#[test]
fn kernels_on_the_cpu_are_exact_on_edge_values() {
    let Some(dev) = emu_device() else { return };
    edge_values(&dev).unwrap();
}

#[test]
fn kernels_on_the_cpu_handle_unaligned_operands_and_long_fragments() {
    let Some(dev) = emu_device() else { return };
    unaligned_and_long(&dev).unwrap();
}

// ---------------------------------------------------------------------------------------------
// Shared checks (the CPU emulation and the GPU run the same ones)
// ---------------------------------------------------------------------------------------------

struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        self.0 ^ (self.0 >> 29)
    }
}

/// Interesting encodings of `dtype` (little-endian bytes of one element each).
fn specials(dtype: DType) -> Vec<u64> {
    match dtype {
        DType::F32 => vec![
            0,
            0x8000_0000,
            1,
            0x8000_0001,
            0x007f_ffff,
            0x0080_0000,
            0x8080_0000,
            0x3f80_0000,
            0xbf80_0000,
            0x3f80_0001,
            0x7f7f_ffff,
            0xff7f_ffff,
            0x7f80_0000,
            0xff80_0000,
            0x7fc0_0000,
            0xffc0_0000,
            0x7f80_0001,
            0xff80_1234,
            0x7fc1_2345,
            0x3400_0000,
            0x0040_0000,
            0x0000_0003,
            0x4b80_0000,
            0x3eaa_aaab,
            0x0100_0000,
            0x7f00_0000,
            0x4040_0000,
        ],
        DType::F64 => vec![
            0,
            0x8000_0000_0000_0000,
            1,
            0x000f_ffff_ffff_ffff,
            0x0010_0000_0000_0000,
            0x3ff0_0000_0000_0000,
            0xbff0_0000_0000_0000,
            0x3ff0_0000_0000_0001,
            0x7fef_ffff_ffff_ffff,
            0x7ff0_0000_0000_0000,
            0xfff0_0000_0000_0000,
            0x7ff8_0000_0000_0000,
            0xfff8_0000_0000_0000,
            0x7ff0_0000_0000_0001,
            0x7ff8_1234_5678_9abc,
            0x3cb0_0000_0000_0000,
            0x0008_0000_0000_0000,
            0x4008_0000_0000_0000,
            0x7fe0_0000_0000_0000,
        ],
        DType::I32 | DType::U32 => vec![0, 1, 2, 3, 0x7fff_ffff, 0x8000_0000, 0xffff_ffff, 0xffff_fffe, 0x1234_5678],
        DType::I64 | DType::U64 => {
            vec![0, 1, 3, i64::MAX as u64, i64::MIN as u64, u64::MAX, u64::MAX - 1, 0x0123_4567_89ab_cdef]
        }
        DType::F16 => vec![
            0, 0x8000, 1, 0x8001, 0x03ff, 0x0400, 0x3c00, 0xbc00, 0x3c01, 0x7bff, 0xfbff, 0x7c00, 0xfc00, 0x7e00,
            0xfe00, 0x7c01, 0xfd23, 0x3555, 0x0200, 0x1400, 0x4200, 0x7800,
        ],
        DType::BF16 => vec![
            0, 0x8000, 1, 0x8001, 0x007f, 0x0080, 0x3f80, 0xbf80, 0x3f81, 0x7f7f, 0xff7f, 0x7f80, 0xff80, 0x7fc0,
            0xffc0, 0x7f81, 0xffa3, 0x3eab, 0x0040, 0x4040, 0x7f00,
        ],
        // One-byte types are tested exhaustively.
        _ => (0..256).collect(),
    }
}

/// Operand pairs: every pair of specials, every encoding of narrow types against a few
/// partners, and random pairs (random bit patterns, and pairs of close magnitudes whose sums
/// and products land near subnormals and rounding boundaries).
fn edge_inputs(dtype: DType) -> (Vec<u8>, Vec<u8>) {
    let e = dtype.size();
    let mut a = Vec::new();
    let mut b = Vec::new();
    let mut push = |x: u64, y: u64| {
        a.extend(&x.to_le_bytes()[..e]);
        b.extend(&y.to_le_bytes()[..e]);
    };
    let s = specials(dtype);
    for &x in &s {
        for &y in &s {
            push(x, y);
        }
    }
    let mask = if e == 8 { u64::MAX } else { (1u64 << (8 * e)) - 1 };
    if e == 2 {
        for x in 0..=mask {
            for &y in &[0x3c00u64, 0x3f80, 0x0001, 0x8400, 0x7bff, 0x0200] {
                push(x, y);
            }
        }
    }
    let mut rng = Lcg(dtype.code() as u64 + 17);
    for _ in 0..20_000 {
        let (x, y) = (rng.next() & mask, rng.next() & mask);
        push(x, y);
        // Close magnitudes of opposite signs (cancellation) and tiny values.
        let sign = 1u64 << (8 * e - 1);
        push(x, (x ^ sign) ^ (rng.next() & 0xf));
        push(x & (mask >> 6), y & (mask >> 6));
    }
    (a, b)
}

fn device_bytes(dev: &dyn Device, bytes: &[u8]) -> Result<Region> {
    let r = dev.alloc(bytes.len())?;
    dev.upload(&r.full(), bytes)?;
    Ok(r)
}

fn device_read(dev: &dyn Device, s: &RegionSlice) -> Result<Vec<u8>> {
    let mut v = vec![0u8; s.len()];
    dev.download(s, &mut v)?;
    Ok(v)
}

fn wait(p: Pending, what: &str) -> Result<()> {
    p.wait(Instant::now() + Duration::from_secs(120), what)
}

/// True when `bits` (one element's little-endian bytes) encode a NaN of `dtype`.
fn is_nan(dtype: DType, bits: &[u8]) -> bool {
    let mut v = [0u8; 8];
    v[..bits.len()].copy_from_slice(bits);
    let x = u64::from_le_bytes(v);
    match dtype {
        DType::F32 => f32::from_bits(x as u32).is_nan(),
        DType::F64 => f64::from_bits(x).is_nan(),
        DType::F16 => x & 0x7fff > 0x7c00,
        DType::BF16 => x & 0x7fff > 0x7f80,
        DType::F8E4M3 => x & 0x7f == 0x7f,
        DType::F8E5M2 => x & 0x7f > 0x7c,
        _ => false,
    }
}

/// The first element where `got` and `want` differ. When both operands are NaN, any NaN
/// result is accepted: which operand's payload the host returns then depends on how the
/// compiler ordered the operands of one x86 instruction (it differs between dtypes of one
/// build), so no device can promise it.
fn first_difference(dtype: DType, a: &[u8], b: &[u8], got: &[u8], want: &[u8]) -> Option<String> {
    let e = dtype.size();
    let nan = |v: &[u8], i: usize| is_nan(dtype, &v[i * e..(i + 1) * e]);
    let i = (0..got.len() / e).find(|&i| {
        got[i * e..(i + 1) * e] != want[i * e..(i + 1) * e] && !(nan(a, i) && nan(b, i) && nan(got, i) && nan(want, i))
    })?;
    let hex = |v: &[u8]| v.iter().rev().map(|x| format!("{x:02x}")).collect::<String>();
    let at = i * e..(i + 1) * e;
    Some(format!(
        "element {i}: a={} b={} got={} want={}",
        hex(&a[at.clone()]),
        hex(&b[at.clone()]),
        hex(&got[at.clone()]),
        hex(&want[at])
    ))
}

/// Every dtype × op × epilogue on the edge inputs, in place and out of place, then the
/// epilogue alone: the device's bytes must equal the host device's.
fn edge_values(dev: &dyn Device) -> std::result::Result<(), String> {
    let host = HostDevice;
    for dtype in DType::ALL {
        let (a, b) = edge_inputs(dtype);
        for op in ReduceOp::ALL {
            for finish in [None, Some(3), Some(300)] {
                let what = format!("{} {dtype} {op} finish={finish:?}", dev.describe());
                let want = {
                    let (ra, rb) = (Region::from_vec(a.clone()), Region::from_vec(b.clone()));
                    let args = ReduceArgs { dtype, op, dst: &ra.full(), a: &ra.full(), b: &rb.full(), finish };
                    wait(host.reduce(args).map_err(|e| e.to_string())?, &what).map_err(|e| e.to_string())?;
                    ra.full().to_vec().map_err(|e| e.to_string())?
                };
                let run = || -> Result<(Vec<u8>, Vec<u8>)> {
                    let (da, db, out) = (device_bytes(dev, &a)?, device_bytes(dev, &b)?, dev.alloc(a.len())?);
                    let args = ReduceArgs { dtype, op, dst: &out.full(), a: &da.full(), b: &db.full(), finish };
                    wait(dev.reduce(args)?, &what)?;
                    let args = ReduceArgs { dtype, op, dst: &da.full(), a: &da.full(), b: &db.full(), finish };
                    wait(dev.reduce(args)?, &what)?;
                    Ok((device_read(dev, &out.full())?, device_read(dev, &da.full())?))
                };
                let (out_of_place, in_place) = run().map_err(|e| format!("{what}: {e}"))?;
                for (how, got) in [("out of place", &out_of_place), ("in place", &in_place)] {
                    if let Some(d) = first_difference(dtype, &a, &b, got, &want) {
                        return Err(format!("{what} {how}: {d}"));
                    }
                }
            }
        }
        for n in [2usize, 3, 7, 300, 1 << 33] {
            let mut want = a.clone();
            devccl_core::op::finish_avg(dtype, &mut want, n).map_err(|e| e.to_string())?;
            let run = || -> Result<Vec<u8>> {
                let da = device_bytes(dev, &a)?;
                wait(dev.finish_avg(dtype, &da.full(), n)?, "finish_avg")?;
                device_read(dev, &da.full())
            };
            let got = run().map_err(|e| e.to_string())?;
            if let Some(d) = first_difference(dtype, &a, &a, &got, &want) {
                return Err(format!("{} finish_avg {dtype} n={n}: {d}", dev.describe()));
            }
        }
    }
    Ok(())
}

/// Operands at byte offsets that break element alignment (the kernels' unaligned paths),
/// 16-byte-aligned operands with awkward tails (the vector paths), and fragments longer than
/// one table piece, against the host device.
fn unaligned_and_long(dev: &dyn Device) -> Result<()> {
    let host = HostDevice;
    for dtype in [DType::F32, DType::F64, DType::BF16, DType::I32, DType::U64, DType::F8E4M3] {
        let e = dtype.size();
        for (off_a, off_b, off_d) in [(1usize, 0usize, 3usize), (0, 0, 0), (16, 32, 48), (2, 6, 10)] {
            let count = 4099;
            let len = count * e;
            let a = conformance::values(dtype, count, 3);
            let b = conformance::values(dtype, count, 4);
            let want = {
                let (ra, rb) = (Region::from_vec(a.clone()), Region::from_vec(b.clone()));
                let args = ReduceArgs {
                    dtype,
                    op: ReduceOp::Avg,
                    dst: &ra.full(),
                    a: &ra.full(),
                    b: &rb.full(),
                    finish: Some(5),
                };
                host.reduce(args)?;
                ra.full().to_vec()?
            };
            let pad = |off: usize, v: &[u8]| [vec![0x5a; off], v.to_vec(), vec![0x5a; 7]].concat();
            let (da, db) = (device_bytes(dev, &pad(off_a, &a))?, device_bytes(dev, &pad(off_b, &b))?);
            let out = device_bytes(dev, &pad(off_d, &vec![0; len]))?;
            let dst = out.slice(off_d..off_d + len);
            let args = ReduceArgs {
                dtype,
                op: ReduceOp::Avg,
                dst: &dst,
                a: &da.slice(off_a..off_a + len),
                b: &db.slice(off_b..off_b + len),
                finish: Some(5),
            };
            wait(dev.reduce(args)?, "unaligned reduce")?;
            let got = device_read(dev, &out.full())?;
            if got[off_d..off_d + len] != want[..] || got[..off_d].iter().chain(&got[off_d + len..]).any(|&x| x != 0x5a)
            {
                return Err(Error::Internal(format!("{dtype} reduce at offsets {off_a}/{off_b}/{off_d} differs")));
            }
        }
    }
    // One fragment of 100 000 bytes (several table pieces), then a 1-byte fragment, in a
    // pool at an odd offset: gather and gather_reduce against the host.
    let dtype = DType::F64;
    let len = 100_000 + 8;
    let payload = conformance::values(dtype, len / 8, 21);
    let mut pool_bytes = vec![0u8; len + 64];
    pool_bytes[5..5 + 100_000].copy_from_slice(&payload[..100_000]);
    pool_bytes[40 + 100_000..40 + 100_008].copy_from_slice(&payload[100_000..]);
    let frags = [
        Fragment { src_off: 40 + 100_000, len: 1, dst_off: 100_000 },
        Fragment { src_off: 5, len: 100_000, dst_off: 0 },
        Fragment { src_off: 40 + 100_001, len: 7, dst_off: 100_001 },
    ];
    let pool = device_bytes(dev, &pool_bytes)?;
    let src = Scattered { pool: &pool, frags: &frags };
    let dst = dev.alloc(len)?;
    wait(dev.gather(&dst.full(), src)?, "gather")?;
    if device_read(dev, &dst.full())? != payload {
        return Err(Error::Internal("long-fragment gather differs".into()));
    }
    let base = conformance::values(dtype, len / 8, 22);
    let want = {
        let (d, p) = (Region::from_vec(base.clone()), Region::from_vec(payload.clone()));
        let args = ReduceArgs { dtype, op: ReduceOp::Sum, dst: &d.full(), a: &d.full(), b: &p.full(), finish: None };
        host.reduce(args)?;
        d.full().to_vec()?
    };
    let db = device_bytes(dev, &base)?;
    wait(dev.gather_reduce(dtype, ReduceOp::Sum, &db.full(), &db.full(), src, None)?, "gather_reduce")?;
    if device_read(dev, &db.full())? != want {
        return Err(Error::Internal("long-fragment gather_reduce differs".into()));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// On a GPU
// ---------------------------------------------------------------------------------------------

/// GPU tests run one at a time (they check device-wide stats and hold streams).
fn gpu() -> Option<(MutexGuard<'static, ()>, Arc<cuda::CudaDevice>)> {
    static LOCK: Mutex<()> = Mutex::new(());
    let guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    match cuda::open_cuda(0) {
        Ok(d) => Some((guard, d)),
        Err(e) => {
            skip("DEVCCL_REQUIRE_CUDA", &format!("no CUDA device: {e}"));
            None
        }
    }
}

#[test]
fn gpu_conformance() {
    let Some((_g, dev)) = gpu() else { return };
    eprintln!("{} (kernels from {})", dev.describe(), dev.load_kernels().unwrap());
    conformance::reductions(&*dev, &[0, 1, 7, 1031]).unwrap();
    conformance::copies(&*dev).unwrap();
    conformance::gathers(&*dev, false).unwrap();
    conformance::gathers(&*dev, true).unwrap();
}

#[test]
fn gpu_edge_values_are_exact() {
    let Some((_g, dev)) = gpu() else { return };
    edge_values(&*dev).unwrap();
    unaligned_and_long(&*dev).unwrap();
}

#[test]
fn gpu_large_f32_reductions_match_the_host() {
    let Some((_g, dev)) = gpu() else { return };
    let count = 3_000_017;
    let a = conformance::values(DType::F32, count, 1);
    let b = conformance::values(DType::F32, count, 2);
    for (op, finish) in [(ReduceOp::Sum, None), (ReduceOp::Avg, Some(4)), (ReduceOp::Prod, None), (ReduceOp::Max, None)]
    {
        let (ra, rb) = (Region::from_vec(a.clone()), Region::from_vec(b.clone()));
        let args = ReduceArgs { dtype: DType::F32, op, dst: &ra.full(), a: &ra.full(), b: &rb.full(), finish };
        HostDevice.reduce(args).unwrap();
        let want = ra.full().to_vec().unwrap();
        let (da, db) = (device_bytes(&*dev, &a).unwrap(), device_bytes(&*dev, &b).unwrap());
        let args = ReduceArgs { dtype: DType::F32, op, dst: &da.full(), a: &da.full(), b: &db.full(), finish };
        wait(dev.reduce(args).unwrap(), "large reduce").unwrap();
        assert!(device_read(&*dev, &da.full()).unwrap() == want, "{op} over {count} f32 differs");
    }
}

#[test]
fn gpu_queue_point_orders_after_the_callers_stream() {
    let Some((_g, dev)) = gpu() else { return };
    let n = 1 << 20;
    let pattern: Vec<u8> = (0..n).map(|i| (i * 7 + 3) as u8).collect();
    let stream = dev.context().new_stream().unwrap();
    let raw = cuda::raw_stream_of(&stream);
    let src = stream.clone_htod(&pattern).unwrap();
    let mut x = stream.alloc_zeros::<u8>(n).unwrap();
    stream.synchronize().unwrap();
    // The caller's stream: held by a gate, then a copy into x.
    let gate = dev.queue_gate().unwrap();
    gate.hold(raw).unwrap();
    stream.memcpy_dtod(&src, &mut x).unwrap();
    let mut point = dev.queue_point(raw).unwrap();
    let ptr = {
        use cuda::cudarc::driver::DevicePtr;
        let (p, _record) = x.device_ptr(&stream);
        p
    };
    // SAFETY: `x` outlives the region (dropped at the end of this test, after the stream
    // synchronised), and only the copy below reads it.
    let rx = unsafe { cuda::region_from_device_ptr(0, ptr, n, false, None) };
    let y = dev.alloc(n).unwrap();
    point.order_internal().unwrap();
    let mut p = dev.copy(&y.full(), &rx.full()).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert!(!p.test().unwrap(), "the copy ran before the caller's queued work");
    gate.open();
    wait(p, "ordered copy").unwrap();
    assert!(device_read(&*dev, &y.full()).unwrap() == pattern, "the copy did not see the caller's write");
    stream.synchronize().unwrap();
}

fn check_gate_holds(dev: &cuda::CudaDevice, gate: Arc<dyn devccl_device::QueueGate>) {
    let stream = dev.context().new_stream().unwrap();
    let mut x = stream.alloc_zeros::<u8>(4096).unwrap();
    stream.synchronize().unwrap();
    gate.hold(cuda::raw_stream_of(&stream)).unwrap();
    stream.memset_zeros(&mut x).unwrap();
    let done = stream.record_event(None).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert!(!done.is_complete(), "the stream passed a closed gate");
    assert!(!gate.is_open());
    gate.open();
    gate.open();
    assert!(gate.is_open());
    done.synchronize().unwrap();
    assert!(done.is_complete());
    // A closed gate dropped while holding a stream releases it.
    let gate = dev.queue_gate().unwrap();
    gate.hold(cuda::raw_stream_of(&stream)).unwrap();
    let done = stream.record_event(None).unwrap();
    drop(gate);
    done.synchronize().unwrap();
}

#[test]
fn gpu_gates_hold_a_stream_until_opened() {
    let Some((_g, dev)) = gpu() else { return };
    eprintln!("stream memory ops: {}", dev.gates_use_stream_memory_ops());
    check_gate_holds(&dev, dev.queue_gate().unwrap());
    check_gate_holds(&dev, dev.queue_gate_host_fallback().unwrap());
    // Many gates reuse words once their holds passed.
    for _ in 0..3000 {
        let g = dev.queue_gate().unwrap();
        g.open();
    }
}

#[test]
fn gpu_stats_return_to_zero_and_early_drops_wait() {
    let Some((_g, dev)) = gpu() else { return };
    let before = dev.stats();
    {
        let a = dev.alloc(1 << 20).unwrap();
        let s = dev.alloc_staging(1 << 20).unwrap();
        let stats = dev.stats();
        assert_eq!(stats.live_device_bytes, before.live_device_bytes + (1 << 20));
        assert_eq!(stats.live_staging_bytes, before.live_staging_bytes + (1 << 20));
        // Abandon fences: their Drop waits for the work before the memory goes.
        let args = ReduceArgs {
            dtype: DType::F32,
            op: ReduceOp::Sum,
            dst: &a.full(),
            a: &a.full(),
            b: &s.full(),
            finish: None,
        };
        drop(dev.reduce(args).unwrap());
        drop(dev.copy(&s.full(), &a.full()).unwrap());
        // Unpinned host memory is refused, unless the driver says the device reaches it (HMM).
        let host = Region::alloc(16);
        match dev.copy(&host.full(), &a.slice(0..16)) {
            Err(e) => assert!(matches!(e, Error::InvalidUsage(_)), "{e}"),
            Ok(p) => wait(p, "copy into HMM memory").unwrap(),
        }
        let other = foreign_region_of(1, 64);
        assert!(dev.copy(&other.full(), &a.slice(0..64)).is_err(), "another GPU's memory is refused");
    }
    let after = dev.stats();
    assert_eq!(after.live_device_bytes, before.live_device_bytes);
    assert_eq!(after.live_staging_bytes, before.live_staging_bytes);
    assert!(after.ops >= before.ops + 2);
}

/// A region claiming to be memory of `cuda:ordinal` (never dereferenced: refused first).
fn foreign_region_of(ordinal: u32, len: usize) -> Region {
    // SAFETY: the region is only handed to an operation that refuses it before any use.
    unsafe { cuda::region_from_device_ptr(ordinal, 0x1000, len, true, None) }
}

#[test]
fn gpu_foreign_allocations_work() {
    let Some((_g, dev)) = gpu() else { return };
    let stream = dev.context().new_stream().unwrap();
    let a: Vec<f32> = (0..10_001).map(|i| i as f32 * 0.5).collect();
    let b: Vec<f32> = (0..10_001).map(|i| 3.0 - i as f32).collect();
    let sa = stream.clone_htod(&a).unwrap();
    let mut sb = stream.clone_htod(&b).unwrap();
    let want: Vec<f32> = a.iter().zip(&b).map(|(x, y)| x + y).collect();
    cuda::with_slice(&sa, |ra| {
        cuda::with_slice_mut(&mut sb, |rb| {
            let args = ReduceArgs {
                dtype: DType::F32,
                op: ReduceOp::Sum,
                dst: &rb.full(),
                a: &rb.full(),
                b: &ra.full(),
                finish: None,
            };
            wait(dev.reduce(args).unwrap(), "reduce on cudarc slices").unwrap();
        })
        .unwrap();
    })
    .unwrap();
    assert_eq!(stream.clone_dtoh(&sb).unwrap(), want);
    // A raw device pointer with its owner as keeper, used at an unaligned offset.
    let keep = stream.clone_htod(&[0u8; 4099]).unwrap();
    stream.synchronize().unwrap();
    let ptr = {
        use cuda::cudarc::driver::DevicePtr;
        let (p, _sync) = keep.device_ptr(&stream);
        p
    };
    // SAFETY: `keep` (the allocation) becomes the region's keeper, so it lives as long as the
    // region; nothing else uses it.
    let r = unsafe { cuda::region_from_device_ptr(0, ptr, 4099, true, Some(Box::new(keep))) };
    let bytes: Vec<u8> = (0..4096u32).map(|i| i as u8).collect();
    dev.upload(&r.slice(3..4099), &bytes).unwrap();
    assert_eq!(device_read(&*dev, &r.slice(3..4099)).unwrap(), bytes);
}

/// Device memory as dma-bufs: devccl's exportable allocations (whole pages, offset 0), its
/// ordinary ones and foreign ones (the page-aligned cover, the region `offset` bytes in), and
/// the refusals. Without DMA_BUF_SUPPORTED (proprietary kernel modules) everything says so.
#[test]
fn gpu_exports_dma_bufs() {
    use devccl_core::device::ExportKind;
    use std::io::Seek;
    use std::os::fd::AsRawFd;
    let Some((_g, dev)) = gpu() else { return };
    if let Err(e) = dev.dma_buf_supported() {
        let reason = format!("{e}");
        assert!(reason.contains("DMA_BUF_SUPPORTED"), "{reason}");
        assert!(matches!(dev.alloc_exportable(4096), Err(Error::Unsupported { .. })));
        eprintln!("skipped dma-buf checks: {reason}");
        return;
    }
    let before = dev.stats().live_device_bytes;
    for len in [0usize, 1, 4095, 4096, (1 << 20) + 3] {
        let (r, e) = dev.alloc_exportable(len).unwrap();
        assert_eq!((r.len(), r.kind()), (len, &devccl_core::memory::MemKind::Cuda { device: 0 }));
        assert_eq!((e.offset, e.kind), (0, ExportKind::DmaBuf), "{len}");
        assert_eq!(e.fd_len, cuda::dmabuf::alloc_size(len), "{len}");
        assert_eq!(r.addr() % 4096, 0);
        let mut f = std::fs::File::from(e.fd.try_clone().unwrap());
        assert_eq!(f.seek(std::io::SeekFrom::End(0)).unwrap(), e.fd_len, "{len}: the dma-buf's size");
        let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", e.fd.as_raw_fd())).unwrap();
        assert!(info.contains("exp_name"), "{len}: not a dma-buf: {info}");
        eprintln!("{len} bytes: {e:?}, {}", info.lines().find(|l| l.starts_with("exp_name")).unwrap_or(""));
        // The memory still computes.
        let bytes = conformance::values(DType::U8, len, 3);
        dev.upload(&r.full(), &bytes).unwrap();
        assert_eq!(device_read(&*dev, &r.full()).unwrap(), bytes);
        let e2 = dev.export(&r).unwrap();
        assert_ne!(e2.fd.as_raw_fd(), e.fd.as_raw_fd());
        assert_eq!((e2.offset, e2.fd_len), (e.offset, e.fd_len));
    }
    assert_eq!(dev.stats().live_device_bytes, before, "exportable memory freed with its region");
    // devccl's ordinary allocation (large: 2 MiB aligned) and a foreign one at odd offsets.
    let big = dev.alloc(4 << 20).unwrap();
    match dev.export(&big) {
        Ok(e) => assert_eq!((e.offset, e.fd_len), (0, 4 << 20), "{:#x}", big.addr()),
        Err(e) => panic!("a 4 MiB cuMemAlloc block at {:#x} could not be exported: {e}", big.addr()),
    }
    let stream = dev.context().new_stream().unwrap();
    let keep = stream.alloc_zeros::<u8>(8 << 20).unwrap();
    stream.synchronize().unwrap();
    let ptr = {
        use cuda::cudarc::driver::DevicePtr;
        let (p, _sync) = keep.device_ptr(&stream);
        p
    };
    // SAFETY: `keep` owns the allocation and outlives the region (dropped after it).
    let r = unsafe { cuda::region_from_device_ptr(0, ptr + 4099, 5000, true, None) };
    let want = cuda::dmabuf::cover(ptr, 8 << 20, ptr + 4099, 5000).unwrap();
    let e = dev.export(&r).unwrap();
    assert_eq!((e.offset, e.fd_len, e.kind), (want.offset, want.len, ExportKind::DmaBuf));
    drop(r);
    // A tiny allocation: its pages may leave it (Unsupported saying so), or the driver padded it.
    let tiny = stream.alloc_zeros::<u8>(100).unwrap();
    let tptr = {
        use cuda::cudarc::driver::DevicePtr;
        let (p, _sync) = tiny.device_ptr(&stream);
        p
    };
    // SAFETY: `tiny` outlives the region.
    let r = unsafe { cuda::region_from_device_ptr(0, tptr, 100, true, None) };
    match dev.export(&r) {
        Ok(e) => eprintln!("a 100-byte cudarc allocation exported: {e:?}"),
        Err(Error::Unsupported { reason }) => assert!(reason.contains("alloc_exportable"), "{reason}"),
        Err(other) => panic!("{other}"),
    }
    drop((r, tiny, keep));
    // Not this device's memory.
    let host = dev.alloc_staging(4096).unwrap();
    assert!(matches!(dev.export(&host), Err(Error::Unsupported { .. })));
    assert!(matches!(dev.export(&foreign_region_of(1, 4096)), Err(Error::Unsupported { .. })));
    // SAFETY: never dereferenced: the export looks the address up and refuses it.
    let wild = unsafe { cuda::region_from_device_ptr(0, 0x1000, 4096, true, None) };
    let e = dev.export(&wild).unwrap_err();
    assert!(e.to_string().contains("not in a CUDA allocation"), "{e}");
}
