//! A thin checked layer over cudarc's raw driver calls: is the library there, driver errors as
//! devccl errors, the context made current on the calling thread, and driver handles that may
//! cross threads.
//!
//! cudarc panics when a library or a symbol is missing, so every entry point first checks
//! that the library loads ([`driver`]) and runs first calls under [`guard`].

use std::ffi::{CStr, CString, c_char, c_int, c_void};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::OnceLock;

use cudarc::driver::{DriverError, result, sys};
use devccl_core::{Error, Result};

/// The exact reason given when no CUDA driver library can be loaded.
pub(crate) const NO_DRIVER: &str = "no CUDA driver (libcuda.so.1 not found)";

/// Facts about the driver, gathered once per process.
#[derive(Debug, Clone, Copy)]
pub(crate) struct DriverInfo {
    /// `cuDriverGetVersion` (13000 for CUDA 13.0).
    pub version: i32,
    /// Visible CUDA devices.
    pub devices: i32,
}

/// The loaded and initialised driver, or why not (cached: the answer never changes).
pub(crate) fn driver() -> std::result::Result<DriverInfo, String> {
    static DRIVER: OnceLock<std::result::Result<DriverInfo, String>> = OnceLock::new();
    DRIVER.get_or_init(init_driver).clone()
}

fn init_driver() -> std::result::Result<DriverInfo, String> {
    // SAFETY: only tries to dlopen the driver library under its usual names; no driver call.
    if !unsafe { sys::is_culib_present() } {
        return Err(NO_DRIVER.to_string());
    }
    guard(|| {
        result::init().map_err(|e| format!("cuInit failed: {}", describe(e)))?;
        let mut version = 0;
        // SAFETY: an out-pointer to a local.
        unsafe { sys::cuDriverGetVersion(&mut version) }
            .result()
            .map_err(|e| format!("cuDriverGetVersion failed: {}", describe(e)))?;
        let devices = result::device::get_count().map_err(|e| format!("cuDeviceGetCount failed: {}", describe(e)))?;
        Ok(DriverInfo { version, devices })
    })
}

/// Run code that calls into a dynamically loaded CUDA library, turning cudarc's panic on a
/// missing symbol (an older library than the bindings) into an error.
pub(crate) fn guard<T>(f: impl FnOnce() -> std::result::Result<T, String>) -> std::result::Result<T, String> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| p.downcast_ref::<&str>().copied())
                .unwrap_or("unknown panic");
            Err(format!("a CUDA library call failed: {msg}"))
        }
    }
}

/// `CUDA_ERROR_X (what it means)`.
pub(crate) fn describe(e: DriverError) -> String {
    let name =
        e.error_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|_| format!("CUresult {:?}", e.0));
    match e.error_string() {
        Ok(s) => format!("{name} ({})", s.to_string_lossy()),
        Err(_) => name,
    }
}

/// The driver version as `13.0`.
pub(crate) fn version_text(v: i32) -> String {
    format!("{}.{}", v / 1000, (v % 1000) / 10)
}

/// A CUDA stream handle (the driver's handles may be used from any thread).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Stream(pub sys::CUstream);

// SAFETY: a CUstream is an opaque driver handle; the driver API is thread-safe.
unsafe impl Send for Stream {}
// SAFETY: as above.
unsafe impl Sync for Stream {}

impl Stream {
    /// The caller's raw stream handle (`0` is the legacy default stream).
    pub fn from_raw(raw: u64) -> Stream {
        Stream(raw as usize as sys::CUstream)
    }
}

/// A CUDA event handle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Event(pub sys::CUevent);

// SAFETY: an opaque driver handle; the driver API is thread-safe.
unsafe impl Send for Event {}
// SAFETY: as above.
unsafe impl Sync for Event {}

/// The primary context of one device plus the label used in error messages.
#[derive(Debug)]
pub(crate) struct Ctx {
    /// cudarc's handle (retains the primary context for the process).
    pub cu: std::sync::Arc<cudarc::driver::CudaContext>,
    /// `cuda:0 NVIDIA H200`.
    pub label: String,
}

impl Ctx {
    /// Make the context current on this thread (cheap when it already is).
    pub fn bind(&self) -> Result<()> {
        let want = self.cu.cu_ctx();
        let current = result::ctx::get_current().map_err(|e| self.err("cuCtxGetCurrent", e))?;
        if current != Some(want) {
            // SAFETY: `want` is the primary context retained by `self.cu` for the process.
            unsafe { result::ctx::set_current(want) }.map_err(|e| self.err("cuCtxSetCurrent", e))?;
        }
        Ok(())
    }

    /// A driver failure of `call` on this device.
    pub fn err(&self, call: &str, e: DriverError) -> Error {
        Error::Device { device: self.label.clone(), message: format!("{call} failed: {}", describe(e)) }
    }

    /// Check a raw driver result.
    pub fn check(&self, call: &str, r: sys::CUresult) -> Result<()> {
        r.result().map_err(|e| self.err(call, e))
    }

    /// A new event without timing (the cheap kind).
    pub fn new_event(&self) -> Result<Event> {
        let mut ev: sys::CUevent = std::ptr::null_mut();
        let flags = sys::CUevent_flags::CU_EVENT_DISABLE_TIMING as u32;
        // SAFETY: an out-pointer to a local; the context is current (callers bind first).
        self.check("cuEventCreate", unsafe { sys::cuEventCreate(&mut ev, flags) })?;
        Ok(Event(ev))
    }

    /// Record `ev` at the current end of `stream`.
    pub fn record(&self, ev: Event, stream: Stream) -> Result<()> {
        // SAFETY: both handles are live (events are never destroyed; streams are ours or the
        // caller's, which the caller keeps alive while it uses devccl on it).
        self.check("cuEventRecord", unsafe { sys::cuEventRecord(ev.0, stream.0) })
    }

    /// Make `stream` wait for the work recorded in `ev` (never blocks the host).
    pub fn wait_event(&self, stream: Stream, ev: Event) -> Result<()> {
        // SAFETY: live handles, as in `record`.
        self.check("cuStreamWaitEvent", unsafe { sys::cuStreamWaitEvent(stream.0, ev.0, 0) })
    }

    /// Non-blocking: has the work recorded in `ev` finished?
    pub fn query(&self, ev: Event) -> Result<bool> {
        // SAFETY: a live event handle.
        match unsafe { sys::cuEventQuery(ev.0) } {
            sys::CUresult::CUDA_SUCCESS => Ok(true),
            sys::CUresult::CUDA_ERROR_NOT_READY => Ok(false),
            other => Err(self.err("cuEventQuery", DriverError(other))),
        }
    }

    /// Block until the work recorded in `ev` finished.
    pub fn sync_event(&self, ev: Event) -> Result<()> {
        // SAFETY: a live event handle.
        self.check("cuEventSynchronize", unsafe { sys::cuEventSynchronize(ev.0) })
    }

    /// Block until everything queued on `stream` finished.
    pub fn sync_stream(&self, stream: Stream) -> Result<()> {
        // SAFETY: a live stream handle.
        self.check("cuStreamSynchronize", unsafe { sys::cuStreamSynchronize(stream.0) })
    }

    /// A new non-blocking stream (it does not synchronise with the legacy default stream).
    pub fn new_stream(&self) -> Result<Stream> {
        let mut s: sys::CUstream = std::ptr::null_mut();
        let flags = sys::CUstream_flags::CU_STREAM_NON_BLOCKING as u32;
        // SAFETY: an out-pointer to a local; the context is current (callers bind first).
        self.check("cuStreamCreate", unsafe { sys::cuStreamCreate(&mut s, flags) })?;
        Ok(Stream(s))
    }

    /// A device attribute.
    pub fn attribute(&self, attr: sys::CUdevice_attribute_enum) -> Result<i32> {
        // SAFETY: a valid device handle and attribute enum value.
        unsafe { result::device::get_attribute(self.cu.cu_device(), attr) }
            .map_err(|e| self.err("cuDeviceGetAttribute", e))
    }
}

unsafe extern "C" {
    fn dlopen(filename: *const c_char, flags: c_int) -> *mut c_void;
    fn dlerror() -> *mut c_char;
}

const RTLD_NOW: c_int = 2;
const RTLD_GLOBAL: c_int = 0x100;

/// Load the shared library at `path` for the rest of the process, so that a later `dlopen`
/// by its soname (cudarc's) finds it.
pub(crate) fn dlopen_path(path: &Path) -> std::result::Result<(), String> {
    let c = CString::new(path.as_os_str().as_bytes()).map_err(|_| format!("{}: NUL in path", path.display()))?;
    // SAFETY: `c` is a NUL-terminated path. Loading runs the library's initialisers (NVRTC's
    // are benign); the handle is deliberately never closed, so the library stays loaded.
    let handle = unsafe { dlopen(c.as_ptr(), RTLD_NOW | RTLD_GLOBAL) };
    if !handle.is_null() {
        return Ok(());
    }
    // SAFETY: dlerror returns NULL or a NUL-terminated message owned by libc, read at once.
    let why = unsafe {
        let e = dlerror();
        if e.is_null() { "unknown error".to_string() } else { CStr::from_ptr(e).to_string_lossy().into_owned() }
    };
    Err(format!("cannot load {}: {why}", path.display()))
}
