//! The kernels loaded into one device's context (lazily, on first use) and their launch.

use std::ffi::c_void;
use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaFunction, result};
use cudarc::nvrtc::Ptx;
use devccl_core::{Error, Result};

use super::driver::{Ctx, Stream, describe};
use super::nvrtc::KernelImage;
use super::plan::{self, Arg, KernelId, Launch};

/// Every entry point, indexed by [`KernelId::index`].
#[derive(Debug)]
pub(crate) struct Kernels {
    functions: Vec<CudaFunction>,
    /// `cubin` or `ptx`: what the module was loaded from.
    pub from: &'static str,
}

impl Kernels {
    /// Load `image` into `ctx`: the CUBIN, else the PTX (JIT by the driver).
    pub fn load(ctx: &Arc<CudaContext>, image: &KernelImage) -> std::result::Result<Kernels, String> {
        let mut why = Vec::new();
        if let Some(cubin) = &image.cubin {
            match ctx.load_module(Ptx::from_binary(cubin.clone())) {
                Ok(m) => return Kernels::functions(&m, "cubin"),
                Err(e) => why.push(format!("CUBIN for {}: {}", image.target, describe(e))),
            }
        }
        if let Some(ptx) = &image.ptx {
            match ctx.load_module(Ptx::from_src(ptx.clone())) {
                Ok(m) => return Kernels::functions(&m, "ptx"),
                Err(e) => why.push(format!("PTX for {}: {}", image.target, describe(e))),
            }
        }
        Err(format!("the driver cannot load devccl's kernels: {}", why.join("; ")))
    }

    fn functions(m: &Arc<cudarc::driver::CudaModule>, from: &'static str) -> std::result::Result<Kernels, String> {
        let functions = plan::all_kernels()
            .iter()
            .map(|k| m.load_function(&k.name()).map_err(|e| format!("kernel {}: {}", k.name(), describe(e))))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        Ok(Kernels { functions, from })
    }

    /// Queue `launch` on `stream`; `table` is the device address of its fragment table.
    pub fn launch(&self, ctx: &Ctx, stream: Stream, launch: &Launch, table: u64) -> Result<()> {
        let f = self.function(launch.kernel)?;
        // Every parameter in an 8-byte slot; 4-byte ones in its low half (little-endian).
        let mut slots: Vec<u64> = launch.args.iter().map(|a| slot(*a, table)).collect();
        let mut params: Vec<*mut c_void> = slots.iter_mut().map(|s| (s as *mut u64).cast::<c_void>()).collect();
        // SAFETY: `f` is a live kernel of this context whose parameter list matches the plan
        // (one slot per parameter, of the declared size); the driver copies the parameters
        // before returning; every pointer parameter is memory the fence keeps alive.
        let r = unsafe {
            result::launch_kernel(f.cu_function(), (launch.grid, 1, 1), (launch.block, 1, 1), 0, stream.0, &mut params)
        };
        r.map_err(|e| ctx.err(&format!("cuLaunchKernel({})", launch.kernel.name()), e))
    }

    fn function(&self, k: KernelId) -> Result<&CudaFunction> {
        self.functions.get(k.index()).ok_or_else(|| Error::Internal(format!("no kernel {}", k.name())))
    }
}

fn slot(a: Arg, table: u64) -> u64 {
    match a {
        Arg::Ptr(p) | Arg::U64(p) => p,
        Arg::Table => table,
        Arg::I32(v) => v as u32 as u64,
        Arg::F32(v) => v.to_bits() as u64,
        Arg::F64(v) => v.to_bits(),
    }
}
