//! The Vulkan loader (loaded at run time), the process's instance, physical devices, and the
//! logical device ([`Gpu`]) each [`super::VulkanDevice`] runs on.

use std::ffi::CStr;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use ash::vk;
use devccl_core::device::DeviceStats;
use devccl_core::{Error, Result};

use super::VulkanOptions;
use super::export::{Export, Probe};

/// The process's Vulkan instance: created on first use and kept for the process's life (it is
/// never destroyed; devices opened from it are cached per process too).
pub(super) struct Instance {
    /// Keeps the loader library loaded.
    _entry: ash::Entry,
    pub(super) raw: ash::Instance,
}

impl Instance {
    fn create() -> std::result::Result<Instance, String> {
        // SAFETY: loads the system's Vulkan loader (libvulkan.so.1) with dlopen; the library
        // stays loaded while `Entry` lives, and `Entry` lives as long as the instance.
        let entry =
            unsafe { ash::Entry::load() }.map_err(|_| "no Vulkan loader (libvulkan.so.1 not found)".to_string())?;
        // SAFETY: a plain query through a loaded entry.
        let version = unsafe { entry.try_enumerate_instance_version() }.ok().flatten().unwrap_or(vk::API_VERSION_1_0);
        if version < vk::API_VERSION_1_1 {
            return Err(format!(
                "the Vulkan loader supports Vulkan {}.{} only; devccl needs 1.1",
                vk::api_version_major(version),
                vk::api_version_minor(version)
            ));
        }
        // SAFETY: a plain query through a loaded entry.
        let exts = unsafe { entry.enumerate_instance_extension_properties(None) }.unwrap_or_default();
        let portability = ash::khr::portability_enumeration::NAME;
        let has_portability = exts.iter().any(|e| e.extension_name_as_c_str() == Ok(portability));
        let names = if has_portability { vec![portability.as_ptr()] } else { vec![] };
        let flags = if has_portability {
            vk::InstanceCreateFlags::ENUMERATE_PORTABILITY_KHR
        } else {
            vk::InstanceCreateFlags::empty()
        };
        let app = vk::ApplicationInfo::default().application_name(c"devccl").api_version(vk::API_VERSION_1_1);
        let info =
            vk::InstanceCreateInfo::default().application_info(&app).enabled_extension_names(&names).flags(flags);
        // SAFETY: `info` and everything it points to (app, names) outlive the call.
        let raw = unsafe { entry.create_instance(&info, None) }
            .map_err(|e| format!("no usable Vulkan driver (vkCreateInstance: {e})"))?;
        Ok(Instance { _entry: entry, raw })
    }

    /// The physical devices, in the loader's order (devccl's device indices).
    pub(super) fn physical_devices(&self) -> Result<Vec<vk::PhysicalDevice>> {
        // SAFETY: the instance is valid for the process's life.
        unsafe { self.raw.enumerate_physical_devices() }.map_err(|e| Error::Unsupported {
            reason: format!("cannot list Vulkan devices (vkEnumeratePhysicalDevices: {e})"),
        })
    }

    /// `vulkan:<index> <device name>`.
    pub(super) fn describe(&self, pd: vk::PhysicalDevice, index: u32) -> String {
        // SAFETY: `pd` came from this instance.
        let props = unsafe { self.raw.get_physical_device_properties(pd) };
        let name = props.device_name_as_c_str().map(CStr::to_string_lossy).unwrap_or_else(|_| "unnamed".into());
        format!("vulkan:{index} {name}")
    }
}

/// The process's instance (a failure is remembered and answered every time).
pub(super) fn instance() -> Result<Arc<Instance>> {
    static INSTANCE: OnceLock<std::result::Result<Arc<Instance>, String>> = OnceLock::new();
    INSTANCE.get_or_init(|| Instance::create().map(Arc::new)).clone().map_err(|reason| Error::Unsupported { reason })
}

/// Device limits the backend plans with.
#[derive(Debug, Clone, Copy)]
pub(super) struct Limits {
    /// maxStorageBufferRange: the largest window one binding may cover.
    pub(super) max_range: u64,
    /// minStorageBufferOffsetAlignment (at least 16).
    pub(super) offset_align: u64,
    /// maxComputeWorkGroupCount.
    pub(super) max_groups: [u32; 3],
    /// maxMemoryAllocationSize (Vulkan 1.1).
    pub(super) max_alloc: u64,
}

/// Optional shader features the backend uses.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VulkanFeatures {
    /// shaderInt64 (i64/u64 reductions, and the integer paths of f64).
    pub int64: bool,
    /// shaderFloat64 (f64 reductions).
    pub float64: bool,
}

/// Memory types chosen for device buffers and staging.
#[derive(Debug, Clone)]
pub(super) struct MemoryTypes {
    pub(super) props: vk::PhysicalDeviceMemoryProperties,
}

impl MemoryTypes {
    /// The first type in `bits` with all of `required`, preferring one that also has
    /// `preferred`.
    pub(super) fn pick(
        &self,
        bits: u32,
        required: vk::MemoryPropertyFlags,
        preferred: vk::MemoryPropertyFlags,
    ) -> Option<u32> {
        let n = self.props.memory_type_count.min(vk::MAX_MEMORY_TYPES as u32);
        let ok = |i: u32, flags: vk::MemoryPropertyFlags| {
            bits & (1 << i) != 0 && self.props.memory_types[i as usize].property_flags.contains(flags)
        };
        (0..n).find(|&i| ok(i, required | preferred)).or_else(|| (0..n).find(|&i| ok(i, required)))
    }
}

/// Counters behind [`DeviceStats`].
#[derive(Debug, Default)]
pub(super) struct Counters {
    pub(super) device_bytes: AtomicU64,
    pub(super) staging_bytes: AtomicU64,
    pub(super) ops: AtomicU64,
    pub(super) fallbacks: AtomicU64,
}

impl Counters {
    pub(super) fn snapshot(&self) -> DeviceStats {
        DeviceStats {
            live_device_bytes: self.device_bytes.load(Ordering::Relaxed),
            live_staging_bytes: self.staging_bytes.load(Ordering::Relaxed),
            ops: self.ops.load(Ordering::Relaxed),
            host_fallbacks: self.fallbacks.load(Ordering::Relaxed),
        }
    }
}

/// One opened logical device with its compute queue family.
pub(super) struct Gpu {
    /// Keeps the instance alive as long as the device.
    _inst: Arc<Instance>,
    pub(super) dev: ash::Device,
    pub(super) name: String,
    pub(super) family: u32,
    pub(super) limits: Limits,
    pub(super) features: VulkanFeatures,
    pub(super) mem: MemoryTypes,
    pub(super) stats: Counters,
    /// Memory behind file descriptors: what the device exports, and how.
    pub(super) export: Export,
}

impl fmt::Debug for Gpu {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Gpu").field("name", &self.name).field("features", &self.features).finish()
    }
}

impl Gpu {
    /// An [`Error::Device`] naming this device and the failed call.
    pub(super) fn err(&self, what: &str, e: vk::Result) -> Error {
        Error::Device { device: self.name.clone(), message: format!("{what}: {e}") }
    }

    /// Open physical device `index` with the features `opts` leaves enabled.
    pub(super) fn open(index: u32, opts: &VulkanOptions) -> Result<Gpu> {
        let inst = instance()?;
        let pds = inst.physical_devices()?;
        let Some(&pd) = pds.get(index as usize) else {
            let names: Vec<String> = pds.iter().enumerate().map(|(i, &p)| inst.describe(p, i as u32)).collect();
            let reason = if pds.is_empty() {
                "no Vulkan device found (the loader has no driver that offers one; install e.g. mesa-vulkan-drivers)"
                    .to_string()
            } else {
                format!("vulkan:{index} does not exist; {} Vulkan device(s): {}", pds.len(), names.join(", "))
            };
            return Err(Error::Unsupported { reason });
        };
        let name = inst.describe(pd, index);
        let unsupported = |why: String| Error::Unsupported { reason: format!("{name}: {why}") };
        // SAFETY: `pd` came from this instance.
        let props = unsafe { inst.raw.get_physical_device_properties(pd) };
        if props.api_version < vk::API_VERSION_1_1 {
            return Err(unsupported("supports Vulkan 1.0 only; devccl needs 1.1".into()));
        }
        // SAFETY: `pd` came from this instance.
        let families = unsafe { inst.raw.get_physical_device_queue_family_properties(pd) };
        let family = families
            .iter()
            .position(|f| f.queue_flags.contains(vk::QueueFlags::COMPUTE) && f.queue_count > 0)
            .ok_or_else(|| unsupported("has no compute queue".into()))? as u32;
        // SAFETY: `pd` came from this instance.
        let supported = unsafe { inst.raw.get_physical_device_features(pd) };
        let features = VulkanFeatures {
            int64: supported.shader_int64 == vk::TRUE && !opts.disable_int64,
            float64: supported.shader_float64 == vk::TRUE && !opts.disable_float64,
        };
        let limits = limits(&inst, pd, &props);
        let enable = vk::PhysicalDeviceFeatures::default()
            .shader_int64(features.int64)
            .shader_float64(features.float64)
            .robust_buffer_access(false);
        let prio = [1.0f32];
        let queues = [vk::DeviceQueueCreateInfo::default().queue_family_index(family).queue_priorities(&prio)];
        let probe = Probe::new(&inst, pd, &name, opts);
        let extensions = probe.extension_names();
        let info = vk::DeviceCreateInfo::default()
            .queue_create_infos(&queues)
            .enabled_features(&enable)
            .enabled_extension_names(&extensions);
        // SAFETY: `info` and what it points to outlive the call; `pd` came from this instance.
        let dev = unsafe { inst.raw.create_device(pd, &info, None) }
            .map_err(|e| unsupported(format!("vkCreateDevice failed: {e}")))?;
        // SAFETY: `pd` came from this instance.
        let mem = MemoryTypes { props: unsafe { inst.raw.get_physical_device_memory_properties(pd) } };
        let export = Export::new(&inst, &dev, probe);
        Ok(Gpu { _inst: inst, dev, name, family, limits, features, mem, stats: Counters::default(), export })
    }
}

fn limits(inst: &Instance, pd: vk::PhysicalDevice, props: &vk::PhysicalDeviceProperties) -> Limits {
    let mut m3 = vk::PhysicalDeviceMaintenance3Properties::default();
    let mut p2 = vk::PhysicalDeviceProperties2::default().push_next(&mut m3);
    // SAFETY: `pd` came from this instance, which was created for Vulkan 1.1 (the device
    // supports 1.1, checked by the caller); `p2` chains only `m3`, both alive.
    unsafe { inst.raw.get_physical_device_properties2(pd, &mut p2) };
    let l = &props.limits;
    Limits {
        max_range: u64::from(l.max_storage_buffer_range),
        offset_align: l.min_storage_buffer_offset_alignment.max(16),
        max_groups: l.max_compute_work_group_count,
        max_alloc: m3.max_memory_allocation_size,
    }
}

impl Drop for Gpu {
    fn drop(&mut self) {
        // SAFETY: every object made from this device (buffers, pipelines, pools) holds an
        // `Arc<Gpu>` and was destroyed before the last one dropped; waiting first makes sure no
        // work is still running.
        unsafe {
            let _ = self.dev.device_wait_idle();
            self.dev.destroy_device(None);
        }
    }
}
