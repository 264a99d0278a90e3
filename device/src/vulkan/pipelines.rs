//! The compute pipelines: one SPIR-V module per dtype (compiled from WGSL by build.rs), three
//! entry points each, created lazily on first use (a driver such as lavapipe compiles every
//! pipeline with LLVM, so opening a device stays cheap), through one VkPipelineCache.

use std::ffi::CStr;
use std::sync::{Arc, OnceLock};

use ash::vk;
use devccl_core::{DType, Error, Result};

use super::instance::Gpu;

/// A shader entry point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Entry {
    /// `dst = a op b`, optional avg epilogue.
    Reduce = 0,
    /// `dst /= n`.
    FinishAvg = 1,
    /// `dst = base op gathered`, optional avg epilogue.
    GatherReduce = 2,
}

impl Entry {
    fn name(self) -> &'static CStr {
        match self {
            Entry::Reduce => c"reduce",
            Entry::FinishAvg => c"finish_avg",
            Entry::GatherReduce => c"gather_reduce",
        }
    }
}

/// Bytes of push constants (the shaders' `Params`).
pub(super) const PUSH_BYTES: u32 = 40;

/// Storage buffers per descriptor set: dst, a, b (or the pool), fragment table.
pub(super) const BINDINGS: u32 = 4;

macro_rules! spv {
    ($name:literal) => {
        include_bytes!(concat!(env!("OUT_DIR"), "/", $name, ".spv"))
    };
}

fn spirv(dtype: DType) -> &'static [u8] {
    match dtype {
        DType::F32 => spv!("f32"),
        DType::F64 => spv!("f64"),
        DType::F16 => spv!("f16"),
        DType::BF16 => spv!("bf16"),
        DType::I8 => spv!("i8"),
        DType::U8 => spv!("u8"),
        DType::I32 => spv!("i32"),
        DType::I64 => spv!("i64"),
        DType::U32 => spv!("u32"),
        DType::U64 => spv!("u64"),
        DType::F8E4M3 => spv!("f8e4m3"),
        DType::F8E5M2 => spv!("f8e5m2"),
    }
}

type Lazy<T> = OnceLock<std::result::Result<T, String>>;

/// Layouts, the cache and the lazily created modules and pipelines of one device.
pub(super) struct Pipelines {
    gpu: Arc<Gpu>,
    pub(super) set_layout: vk::DescriptorSetLayout,
    pub(super) layout: vk::PipelineLayout,
    cache: vk::PipelineCache,
    modules: [Lazy<vk::ShaderModule>; 12],
    pipes: [[Lazy<vk::Pipeline>; 3]; 12],
}

impl std::fmt::Debug for Pipelines {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipelines").field("device", &self.gpu.name).finish()
    }
}

impl Pipelines {
    /// The layouts and an empty cache; no pipeline is compiled yet.
    pub(super) fn new(gpu: &Arc<Gpu>) -> Result<Pipelines> {
        let mut p = Pipelines {
            gpu: gpu.clone(),
            set_layout: vk::DescriptorSetLayout::null(),
            layout: vk::PipelineLayout::null(),
            cache: vk::PipelineCache::null(),
            modules: [const { OnceLock::new() }; 12],
            pipes: [const { [const { OnceLock::new() }; 3] }; 12],
        };
        // On error `p` drops and destroys what was made so far.
        let bindings: Vec<_> = (0..BINDINGS)
            .map(|i| {
                vk::DescriptorSetLayoutBinding::default()
                    .binding(i)
                    .descriptor_type(vk::DescriptorType::STORAGE_BUFFER)
                    .descriptor_count(1)
                    .stage_flags(vk::ShaderStageFlags::COMPUTE)
            })
            .collect();
        let info = vk::DescriptorSetLayoutCreateInfo::default().bindings(&bindings);
        // SAFETY: valid device and create info.
        p.set_layout = unsafe { gpu.dev.create_descriptor_set_layout(&info, None) }
            .map_err(|e| gpu.err("vkCreateDescriptorSetLayout", e))?;
        let ranges = [vk::PushConstantRange::default().stage_flags(vk::ShaderStageFlags::COMPUTE).size(PUSH_BYTES)];
        let sets = [p.set_layout];
        let info = vk::PipelineLayoutCreateInfo::default().set_layouts(&sets).push_constant_ranges(&ranges);
        // SAFETY: valid device and create info; the set layout is alive.
        p.layout =
            unsafe { gpu.dev.create_pipeline_layout(&info, None) }.map_err(|e| gpu.err("vkCreatePipelineLayout", e))?;
        // SAFETY: valid device and create info (an empty cache).
        p.cache = unsafe { gpu.dev.create_pipeline_cache(&vk::PipelineCacheCreateInfo::default(), None) }
            .map_err(|e| gpu.err("vkCreatePipelineCache", e))?;
        Ok(p)
    }

    /// The pipeline of `dtype`'s `entry`, compiled on first use (concurrent first uses wait
    /// for one compilation). A failure is remembered.
    pub(super) fn get(&self, dtype: DType, entry: Entry) -> Result<vk::Pipeline> {
        let slot = &self.pipes[dtype.code() as usize][entry as usize];
        slot.get_or_init(|| self.create(dtype, entry)).clone().map_err(|message| Error::Device {
            device: self.gpu.name.clone(),
            message: format!("{dtype} {} pipeline: {message}", entry.name().to_string_lossy()),
        })
    }

    fn module(&self, dtype: DType) -> std::result::Result<vk::ShaderModule, String> {
        let slot = &self.modules[dtype.code() as usize];
        slot.get_or_init(|| {
            let words = ash::util::read_spv(&mut std::io::Cursor::new(spirv(dtype))).map_err(|e| e.to_string())?;
            let info = vk::ShaderModuleCreateInfo::default().code(&words);
            // SAFETY: valid device; `words` is SPIR-V that naga validated at build time.
            unsafe { self.gpu.dev.create_shader_module(&info, None) }.map_err(|e| format!("vkCreateShaderModule: {e}"))
        })
        .clone()
    }

    fn create(&self, dtype: DType, entry: Entry) -> std::result::Result<vk::Pipeline, String> {
        let module = self.module(dtype)?;
        let stage = vk::PipelineShaderStageCreateInfo::default()
            .stage(vk::ShaderStageFlags::COMPUTE)
            .module(module)
            .name(entry.name());
        let info = [vk::ComputePipelineCreateInfo::default().stage(stage).layout(self.layout)];
        let t = std::time::Instant::now();
        // SAFETY: valid device, cache, layout and module; `info` outlives the call.
        let made = unsafe { self.gpu.dev.create_compute_pipelines(self.cache, &info, None) };
        let pipe = made.map_err(|(_, e)| format!("vkCreateComputePipelines: {e}"))?[0];
        tracing::debug!(device = %self.gpu.name, %dtype, entry = ?entry, took = ?t.elapsed(), "pipeline compiled");
        Ok(pipe)
    }
}

impl Drop for Pipelines {
    fn drop(&mut self) {
        // SAFETY: the owner (the executor) waited for the queue to go idle before dropping us, so
        // no pipeline is in use; every handle was made from this device (null ones are ignored).
        unsafe {
            for row in &self.pipes {
                for p in row.iter().filter_map(|s| s.get()).filter_map(|r| r.as_ref().ok()) {
                    self.gpu.dev.destroy_pipeline(*p, None);
                }
            }
            for m in self.modules.iter().filter_map(|s| s.get()).filter_map(|r| r.as_ref().ok()) {
                self.gpu.dev.destroy_shader_module(*m, None);
            }
            self.gpu.dev.destroy_pipeline_cache(self.cache, None);
            self.gpu.dev.destroy_pipeline_layout(self.layout, None);
            self.gpu.dev.destroy_descriptor_set_layout(self.set_layout, None);
        }
    }
}
