//! NVRTC: find the library and compile devccl's kernel source once per process and GPU
//! architecture.
//!
//! The kernels are compiled to CUBIN for the device's own architecture (`-arch=sm_XY`): PTX
//! from an NVRTC newer than the driver can use a PTX ISA the driver cannot JIT. When the
//! NVRTC at hand does not know the architecture, the highest virtual architecture it knows
//! below it is compiled to PTX instead, for the driver to JIT.
//!
//! The library is found the way cudarc loads it (by soname, `libnvrtc.so.13` among others:
//! `LD_LIBRARY_PATH`, the system's library paths, or a copy a process already loaded, such as
//! torch's). `DEVCCL_NVRTC_PATH` (the library, or the directory holding it and its
//! `libnvrtc-builtins`) or [`preload_nvrtc`] load a specific copy first.

use std::collections::HashMap;
use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use cudarc::nvrtc::{result, sys};
use devccl_core::{Error, Result};

use super::driver::{dlopen_path, guard};
use super::{SOURCE, plan};

/// Why there is no NVRTC, and how to get one.
pub(crate) const NO_NVRTC: &str = "NVRTC not found: libnvrtc.so.13 could not be loaded (devccl compiles its CUDA \
                                   kernels with it at run time). Install it, e.g. `pip install nvidia-cuda-nvrtc` \
                                   (then put its nvidia/cu13/lib directory on LD_LIBRARY_PATH) or the CUDA toolkit; \
                                   or set DEVCCL_NVRTC_PATH to libnvrtc.so.13 or its directory; importing torch \
                                   before devccl also loads it";

/// The compiled kernels for one GPU architecture.
#[derive(Debug)]
pub struct KernelImage {
    /// What NVRTC compiled for (`sm_90`, or `compute_90` when only PTX was possible).
    pub target: String,
    /// The CUBIN (ELF) for a real architecture, when one was compiled.
    pub cubin: Option<Vec<u8>>,
    /// The PTX text, when NVRTC provides it.
    pub ptx: Option<String>,
    /// NVRTC's version.
    pub nvrtc_version: (i32, i32),
    /// NVRTC's log (warnings), usually empty.
    pub log: String,
    /// How long the compilation took.
    pub compile_time: Duration,
}

/// Load the NVRTC library at `path` (the file, or a directory holding `libnvrtc.so.13`), with
/// the `libnvrtc-builtins` next to it, for the rest of the process.
pub fn preload_nvrtc(path: &Path) -> Result<()> {
    preload(path).map_err(|reason| Error::Unsupported { reason })
}

fn preload(path: &Path) -> std::result::Result<(), String> {
    let lib = if path.is_dir() { path.join("libnvrtc.so.13") } else { path.to_path_buf() };
    let dir = lib.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."));
    // NVRTC dlopens its builtins library by soname when it compiles; load it by path first.
    for b in builtins_in(&dir) {
        dlopen_path(&b)?;
    }
    dlopen_path(&lib)?;
    NVRTC_PRESENT.store(true, Ordering::Release);
    Ok(())
}

fn builtins_in(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut found: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            name.starts_with("libnvrtc-builtins.so.") && !name.contains(".alt.")
        })
        .collect();
    found.sort();
    found
}

static NVRTC_PRESENT: AtomicBool = AtomicBool::new(false);

/// `Ok` once NVRTC can be loaded (after `DEVCCL_NVRTC_PATH`, if set, was loaded).
pub(crate) fn nvrtc_ready() -> std::result::Result<(), String> {
    static FROM_ENV: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    FROM_ENV
        .get_or_init(|| match devccl_core::config::DeviceConfig::from_env().map(|c| c.nvrtc_path) {
            Ok(Some(p)) => preload(&p).map_err(|e| format!("DEVCCL_NVRTC_PATH: {e}")),
            Ok(None) => Ok(()),
            Err(e) => Err(e.to_string()),
        })
        .clone()?;
    if NVRTC_PRESENT.load(Ordering::Acquire) {
        return Ok(());
    }
    // SAFETY: only tries to dlopen the library under its usual names; no NVRTC call.
    if unsafe { sys::is_culib_present() } {
        NVRTC_PRESENT.store(true, Ordering::Release);
        Ok(())
    } else {
        Err(NO_NVRTC.to_string())
    }
}

/// NVRTC's version, or why it cannot be used.
pub fn nvrtc_status() -> std::result::Result<String, String> {
    nvrtc_ready()?;
    guard(nvrtc_version).map(|(a, b)| format!("NVRTC {a}.{b}"))
}

fn nvrtc_version() -> std::result::Result<(i32, i32), String> {
    let (mut major, mut minor) = (0, 0);
    // SAFETY: out-pointers to locals.
    unsafe { sys::nvrtcVersion(&mut major, &mut minor) }.result().map_err(|e| format!("nvrtcVersion: {e}"))?;
    Ok((major, minor))
}

/// The real architectures this NVRTC compiles for (`90` for sm_90).
fn supported_archs() -> std::result::Result<Vec<i32>, String> {
    let mut n = 0;
    // SAFETY: an out-pointer to a local.
    unsafe { sys::nvrtcGetNumSupportedArchs(&mut n) }
        .result()
        .map_err(|e| format!("nvrtcGetNumSupportedArchs: {e}"))?;
    let mut archs = vec![0i32; n.max(0) as usize];
    // SAFETY: `archs` holds the `n` entries NVRTC writes.
    unsafe { sys::nvrtcGetSupportedArchs(archs.as_mut_ptr()) }
        .result()
        .map_err(|e| format!("nvrtcGetSupportedArchs: {e}"))?;
    Ok(archs)
}

/// True where the host's default NaN (the result of an invalid operation) is negative: the
/// kernels reproduce it (x86-64 SSE produces 0xffc00000).
pub const fn host_default_nan_is_negative() -> bool {
    cfg!(any(target_arch = "x86_64", target_arch = "x86"))
}

/// The NVRTC options for `target` (`sm_90` / `compute_90`): exact IEEE arithmetic.
pub fn compile_options(target: &str) -> Vec<String> {
    vec![
        format!("--gpu-architecture={target}"),
        "--fmad=false".into(),
        "--ftz=false".into(),
        "--prec-div=true".into(),
        "--prec-sqrt=true".into(),
        "-std=c++17".into(),
        format!("-DDEVCCL_NEG_DEFAULT_NAN={}", host_default_nan_is_negative() as u8),
    ]
}

type Cached = std::result::Result<Arc<KernelImage>, (bool, String)>;

/// Compile every kernel for compute capability `major.minor`, once per process (later calls
/// answer the same image, or the same error).
pub fn compile(major: u32, minor: u32) -> Result<Arc<KernelImage>> {
    static CACHE: OnceLock<Mutex<HashMap<(u32, u32), Cached>>> = OnceLock::new();
    let mut cache = CACHE.get_or_init(Default::default).lock().unwrap_or_else(|e| e.into_inner());
    let entry = cache.entry((major, minor)).or_insert_with(|| compile_uncached(major, minor));
    entry.clone().map_err(
        |(unsupported, reason)| {
            if unsupported { Error::Unsupported { reason } } else { Error::Internal(reason) }
        },
    )
}

fn compile_uncached(major: u32, minor: u32) -> Cached {
    nvrtc_ready().map_err(|e| (true, e))?;
    let start = Instant::now();
    let (target, real) = guard(|| pick_target(major * 10 + minor)).map_err(|e| (true, e))?;
    let mut image = guard(|| compile_for(&target, real)).map_err(|e| (false, e))?;
    image.compile_time = start.elapsed();
    tracing::debug!(target = %image.target, secs = image.compile_time.as_secs_f64(), "devccl CUDA kernels compiled");
    Ok(Arc::new(image))
}

/// `sm_XY` when NVRTC knows it, else the highest `compute_ZZ` below it (PTX only).
fn pick_target(cc: u32) -> std::result::Result<(String, bool), String> {
    let archs = supported_archs()?;
    if archs.contains(&(cc as i32)) {
        return Ok((format!("sm_{cc}"), true));
    }
    match archs.iter().copied().filter(|&a| a <= cc as i32).max() {
        Some(a) => Ok((format!("compute_{a}"), false)),
        None => Err(format!("this NVRTC compiles for {archs:?}, nothing at or below sm_{cc}")),
    }
}

/// An NVRTC program, destroyed on drop.
struct Program(sys::nvrtcProgram);

impl Drop for Program {
    fn drop(&mut self) {
        // SAFETY: created by `create_program`, destroyed exactly once here.
        let _ = unsafe { result::destroy_program(self.0) };
    }
}

fn compile_for(target: &str, real: bool) -> std::result::Result<KernelImage, String> {
    let nvrtc_version = nvrtc_version()?;
    let src = CString::new(SOURCE).map_err(|_| "kernel source holds a NUL".to_string())?;
    let prog = Program(result::create_program(&src, Some(c"devccl_kernels.cu")).map_err(|e| format!("{e}"))?);
    // SAFETY: a live program.
    let compiled = unsafe { result::compile_program(prog.0, &compile_options(target)) };
    // SAFETY: a live program.
    let log = unsafe { result::get_program_log(prog.0) }.map(|l| c_text(&l)).unwrap_or_default();
    if let Err(e) = compiled {
        return Err(format!(
            "NVRTC {}.{} could not compile devccl's kernels for {target} ({e}):\n{log}",
            nvrtc_version.0, nvrtc_version.1
        ));
    }
    let cubin = if real { Some(get_cubin(&prog)?) } else { None };
    // SAFETY: a live, compiled program.
    let ptx = unsafe { result::get_ptx(prog.0) }.ok().map(|p| c_text(&p)).filter(|p| !p.is_empty());
    if cubin.is_none() && ptx.is_none() {
        return Err(format!("NVRTC produced neither CUBIN nor PTX for {target}"));
    }
    Ok(KernelImage { target: target.into(), cubin, ptx, nvrtc_version, log, compile_time: Duration::ZERO })
}

fn get_cubin(prog: &Program) -> std::result::Result<Vec<u8>, String> {
    let mut size = 0usize;
    // SAFETY: a live, compiled program; an out-pointer to a local.
    unsafe { sys::nvrtcGetCUBINSize(prog.0, &mut size) }.result().map_err(|e| format!("nvrtcGetCUBINSize: {e}"))?;
    let mut buf = vec![0u8; size];
    // SAFETY: `buf` holds the `size` bytes NVRTC writes.
    unsafe { sys::nvrtcGetCUBIN(prog.0, buf.as_mut_ptr().cast()) }
        .result()
        .map_err(|e| format!("nvrtcGetCUBIN: {e}"))?;
    Ok(buf)
}

/// NVRTC's NUL-terminated text as a String.
fn c_text(chars: &[std::ffi::c_char]) -> String {
    let bytes: Vec<u8> = chars.iter().map(|&c| c as u8).take_while(|&b| b != 0).collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// The name of every kernel entry point the device loads.
pub fn kernel_names() -> Vec<String> {
    plan::all_kernels().iter().map(|k| k.name()).collect()
}
