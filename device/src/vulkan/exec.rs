//! Recording and submitting work: one command buffer per operation, submitted with a VkFence
//! and answered as a [`Fence`] the executor tests with vkGetFenceStatus (never blocking).
//!
//! Command buffers, fences, descriptor sets and the small host-visible buffers that carry
//! fragment tables are pooled and recycled once an operation's fence signalled. One mutex
//! guards the queue and the pools: several ranks and threads share one device. Operations are
//! serialised on the queue: every command buffer begins with a full memory barrier
//! (ALL_COMMANDS -> ALL_COMMANDS, memory writes -> reads and writes), so an operation sees
//! every earlier operation's writes and operations that touch neighbouring bytes of one word
//! (each read-modify-writes the edge words of its destination) can never race.

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use ash::vk;
use devccl_core::device::Fence;
use devccl_core::memory::Region;
use devccl_core::{Error, Result};

use super::instance::Gpu;
use super::memory::{Buffer, Kind};
use super::pipelines::{BINDINGS, Pipelines};

/// Sets per descriptor pool (pools are added as needed; sets are reused, never freed).
const SETS_PER_POOL: u32 = 64;

/// Fragment-table buffers larger than this, or beyond this many, are freed rather than pooled.
const AUX_KEEP_BYTES: u64 = 4 << 20;
const AUX_KEEP_COUNT: usize = 16;

/// How long a blocking wait waits for one operation before it reports a timeout.
const WAIT_LIMIT: Duration = Duration::from_secs(600);

/// A binding window: `range` bytes of `buf` from `off` (aligned to
/// minStorageBufferOffsetAlignment, at most maxStorageBufferRange).
#[derive(Debug, Clone, Copy)]
pub(super) struct Window {
    pub(super) buf: vk::Buffer,
    pub(super) off: u64,
    pub(super) range: u64,
}

struct State {
    queue: vk::Queue,
    pool: vk::CommandPool,
    cmds: Vec<vk::CommandBuffer>,
    fences: Vec<vk::Fence>,
    desc_pools: Vec<vk::DescriptorPool>,
    sets: Vec<vk::DescriptorSet>,
    aux: Vec<Arc<Buffer>>,
}

/// The queue, the pools and the pipelines of one device.
pub(super) struct Exec {
    pub(super) gpu: Arc<Gpu>,
    pub(super) pipes: Pipelines,
    state: Mutex<State>,
}

impl fmt::Debug for Exec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Exec").field("device", &self.gpu.name).finish()
    }
}

impl Exec {
    /// The device's queue with empty pools.
    pub(super) fn new(gpu: &Arc<Gpu>) -> Result<Arc<Exec>> {
        let pipes = Pipelines::new(gpu)?;
        // SAFETY: the device was created with one queue in this family.
        let queue = unsafe { gpu.dev.get_device_queue(gpu.family, 0) };
        let info = vk::CommandPoolCreateInfo::default()
            .queue_family_index(gpu.family)
            .flags(vk::CommandPoolCreateFlags::RESET_COMMAND_BUFFER);
        // SAFETY: valid device and create info.
        let pool =
            unsafe { gpu.dev.create_command_pool(&info, None) }.map_err(|e| gpu.err("vkCreateCommandPool", e))?;
        let state = State {
            queue,
            pool,
            cmds: Vec::new(),
            fences: Vec::new(),
            desc_pools: Vec::new(),
            sets: Vec::new(),
            aux: Vec::new(),
        };
        Ok(Arc::new(Exec { gpu: gpu.clone(), pipes, state: Mutex::new(state) }))
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Start recording an operation (holds the queue lock until submitted or dropped).
    pub(super) fn begin(self: &Arc<Self>) -> Result<Rec<'_>> {
        let gpu = &self.gpu;
        let mut st = self.lock();
        let cmd = match st.cmds.pop() {
            Some(c) => c,
            None => {
                let info = vk::CommandBufferAllocateInfo::default()
                    .command_pool(st.pool)
                    .level(vk::CommandBufferLevel::PRIMARY)
                    .command_buffer_count(1);
                // SAFETY: valid pool, guarded by the state lock we hold.
                unsafe { gpu.dev.allocate_command_buffers(&info) }
                    .map_err(|e| gpu.err("vkAllocateCommandBuffers", e))?[0]
            }
        };
        let info = vk::CommandBufferBeginInfo::default().flags(vk::CommandBufferUsageFlags::ONE_TIME_SUBMIT);
        // SAFETY: the command buffer is ours and not pending (recycled only after its fence
        // signalled); its pool was created with RESET_COMMAND_BUFFER, so begin resets it.
        if let Err(e) = unsafe { gpu.dev.begin_command_buffer(cmd, &info) } {
            st.cmds.push(cmd);
            return Err(gpu.err("vkBeginCommandBuffer", e));
        }
        let mut rec = Rec { exec: self, st: Some(st), cmd, sets: Vec::new(), keep: Keep::default(), steps: 0 };
        rec.barrier(vk::PipelineStageFlags::ALL_COMMANDS, vk::AccessFlags::MEMORY_READ | vk::AccessFlags::MEMORY_WRITE);
        Ok(rec)
    }

    /// Block until everything queued so far finished.
    pub(super) fn wait_idle(&self) -> Result<()> {
        let st = self.lock();
        // SAFETY: the queue is guarded by the state lock we hold.
        unsafe { self.gpu.dev.queue_wait_idle(st.queue) }.map_err(|e| self.gpu.err("vkQueueWaitIdle", e))
    }

    /// Give a finished operation's objects back to the pools.
    fn recycle(&self, cmd: vk::CommandBuffer, fence: Option<vk::Fence>, sets: Vec<vk::DescriptorSet>, keep: Keep) {
        let fence = fence.filter(|&f| {
            // SAFETY: the fence is ours and signalled (or never submitted); a fence that cannot
            // be reset is destroyed instead of reused.
            unsafe {
                let ok = self.gpu.dev.reset_fences(&[f]).is_ok();
                if !ok {
                    self.gpu.dev.destroy_fence(f, None);
                }
                ok
            }
        });
        let Keep { regions, bufs, mut aux } = keep;
        let mut st = self.lock();
        st.cmds.push(cmd);
        st.fences.extend(fence);
        st.sets.extend(sets);
        let room = AUX_KEEP_COUNT.saturating_sub(st.aux.len());
        st.aux.extend(aux.extract_if(.., |b| b.size <= AUX_KEEP_BYTES).take(room));
        drop(st);
        drop((regions, bufs, aux));
    }
}

impl Drop for Exec {
    fn drop(&mut self) {
        let st = self.state.get_mut().unwrap_or_else(|e| e.into_inner());
        // SAFETY: no operation can be pending (each holds an `Arc<Exec>`), the wait makes sure;
        // every handle was made from this device.
        unsafe {
            let _ = self.gpu.dev.queue_wait_idle(st.queue);
            for f in st.fences.drain(..) {
                self.gpu.dev.destroy_fence(f, None);
            }
            self.gpu.dev.destroy_command_pool(st.pool, None);
            for p in st.desc_pools.drain(..) {
                self.gpu.dev.destroy_descriptor_pool(p, None);
            }
        }
    }
}

/// What a queued operation keeps alive until its fence signalled: the operands' regions
/// (clones), buffers (scratch), and pooled table buffers (returned to the pool afterwards).
#[derive(Default)]
pub(super) struct Keep {
    regions: Vec<Region>,
    bufs: Vec<Arc<Buffer>>,
    aux: Vec<Arc<Buffer>>,
}

/// An operation being recorded; [`Rec::submit`] queues it. Dropped unsubmitted (an error while
/// recording), it gives everything back.
pub(super) struct Rec<'a> {
    exec: &'a Arc<Exec>,
    st: Option<MutexGuard<'a, State>>,
    cmd: vk::CommandBuffer,
    sets: Vec<vk::DescriptorSet>,
    keep: Keep,
    steps: u32,
}

impl Rec<'_> {
    fn dev(&self) -> &ash::Device {
        &self.exec.gpu.dev
    }

    /// Keep `r` alive until the operation finished.
    pub(super) fn keep(&mut self, r: &Region) {
        if !self.keep.regions.iter().any(|k| k.same(r)) {
            self.keep.regions.push(r.clone());
        }
    }

    /// Keep `b` alive until the operation finished.
    pub(super) fn keep_buffer(&mut self, b: Arc<Buffer>) {
        self.keep.bufs.push(b);
    }

    fn barrier(&mut self, dst_stage: vk::PipelineStageFlags, dst_access: vk::AccessFlags) {
        let mb =
            [vk::MemoryBarrier::default().src_access_mask(vk::AccessFlags::MEMORY_WRITE).dst_access_mask(dst_access)];
        // SAFETY: the command buffer is recording and ours.
        unsafe {
            self.dev().cmd_pipeline_barrier(
                self.cmd,
                vk::PipelineStageFlags::ALL_COMMANDS,
                dst_stage,
                vk::DependencyFlags::empty(),
                &mb,
                &[],
                &[],
            )
        };
    }

    /// A full barrier between two steps of one operation (dispatches of one split operation
    /// may share edge words).
    fn step(&mut self) {
        if self.steps > 0 {
            self.barrier(
                vk::PipelineStageFlags::ALL_COMMANDS,
                vk::AccessFlags::MEMORY_READ | vk::AccessFlags::MEMORY_WRITE,
            );
        }
        self.steps += 1;
    }

    /// vkCmdCopyBuffer (regions must not overlap when both buffers are the same).
    pub(super) fn copy(&mut self, src: &Buffer, dst: &Buffer, regions: &[vk::BufferCopy]) {
        if regions.is_empty() {
            return;
        }
        self.step();
        // SAFETY: recording command buffer; both buffers are alive (kept by the caller) and
        // every region lies inside them (checked by the caller).
        unsafe { self.dev().cmd_copy_buffer(self.cmd, src.raw, dst.raw, regions) };
    }

    fn take_set(&mut self) -> Result<vk::DescriptorSet> {
        let gpu = self.exec.gpu.clone();
        let layout = self.exec.pipes.set_layout;
        let st = self.st.as_mut().expect("recording holds the lock");
        if let Some(s) = st.sets.pop() {
            return Ok(s);
        }
        if let Some(&pool) = st.desc_pools.last() {
            let layouts = [layout];
            let info = vk::DescriptorSetAllocateInfo::default().descriptor_pool(pool).set_layouts(&layouts);
            // SAFETY: valid pool (guarded by the lock) and layout.
            if let Ok(s) = unsafe { gpu.dev.allocate_descriptor_sets(&info) } {
                return Ok(s[0]);
            }
        }
        let sizes = [vk::DescriptorPoolSize::default()
            .ty(vk::DescriptorType::STORAGE_BUFFER)
            .descriptor_count(SETS_PER_POOL * BINDINGS)];
        let info = vk::DescriptorPoolCreateInfo::default().max_sets(SETS_PER_POOL).pool_sizes(&sizes);
        // SAFETY: valid device and create info.
        let pool =
            unsafe { gpu.dev.create_descriptor_pool(&info, None) }.map_err(|e| gpu.err("vkCreateDescriptorPool", e))?;
        st.desc_pools.push(pool);
        let layouts = [layout];
        let info = vk::DescriptorSetAllocateInfo::default().descriptor_pool(pool).set_layouts(&layouts);
        // SAFETY: a fresh pool with room, and a valid layout.
        let s =
            unsafe { gpu.dev.allocate_descriptor_sets(&info) }.map_err(|e| gpu.err("vkAllocateDescriptorSets", e))?;
        Ok(s[0])
    }

    /// One compute dispatch of `groups` (x, y) workgroups with the given bindings and push
    /// constants.
    pub(super) fn dispatch(
        &mut self,
        pipe: vk::Pipeline,
        win: &[Window; BINDINGS as usize],
        push: &[u8],
        groups: (u32, u32),
    ) -> Result<()> {
        self.step();
        let set = self.take_set()?;
        self.sets.push(set);
        let infos = win.map(|w| vk::DescriptorBufferInfo { buffer: w.buf, offset: w.off, range: w.range });
        let writes: Vec<_> = infos
            .iter()
            .enumerate()
            .map(|(i, info)| {
                vk::WriteDescriptorSet::default()
                    .dst_set(set)
                    .dst_binding(i as u32)
                    .descriptor_type(vk::DescriptorType::STORAGE_BUFFER)
                    .buffer_info(std::slice::from_ref(info))
            })
            .collect();
        let layout = self.exec.pipes.layout;
        // SAFETY: the set is ours and not in use by pending work (recycled after its fence);
        // the windows lie inside live buffers (kept until the fence signals); the command buffer
        // is recording; pipeline, layout and push constant size match the shaders.
        unsafe {
            self.dev().update_descriptor_sets(&writes, &[]);
            self.dev().cmd_bind_pipeline(self.cmd, vk::PipelineBindPoint::COMPUTE, pipe);
            self.dev().cmd_bind_descriptor_sets(self.cmd, vk::PipelineBindPoint::COMPUTE, layout, 0, &[set], &[]);
            self.dev().cmd_push_constants(self.cmd, layout, vk::ShaderStageFlags::COMPUTE, 0, push);
            self.dev().cmd_dispatch(self.cmd, groups.0, groups.1, 1);
        }
        Ok(())
    }

    /// A pooled host-visible buffer of at least `len` bytes, kept (and returned to the pool)
    /// with the operation.
    pub(super) fn aux(&mut self, len: u64) -> Result<Arc<Buffer>> {
        let st = self.st.as_mut().expect("recording holds the lock");
        let found = st.aux.iter().position(|b| b.size >= len);
        let buf = match found {
            Some(i) => st.aux.swap_remove(i),
            None => Buffer::new(&self.exec.gpu, len.next_power_of_two().max(64 << 10), Kind::Internal)?,
        };
        self.keep.aux.push(buf.clone());
        Ok(buf)
    }

    /// Queue the operation.
    pub(super) fn submit(mut self) -> Result<Submitted> {
        self.barrier(vk::PipelineStageFlags::HOST, vk::AccessFlags::HOST_READ | vk::AccessFlags::HOST_WRITE);
        let gpu = self.exec.gpu.clone();
        // SAFETY: the command buffer is recording and ours.
        unsafe { gpu.dev.end_command_buffer(self.cmd) }.map_err(|e| gpu.err("vkEndCommandBuffer", e))?;
        let st = self.st.as_mut().expect("recording holds the lock");
        let fence = match st.fences.pop() {
            Some(f) => f,
            // SAFETY: valid device and create info.
            None => unsafe { gpu.dev.create_fence(&vk::FenceCreateInfo::default(), None) }
                .map_err(|e| gpu.err("vkCreateFence", e))?,
        };
        let cmds = [self.cmd];
        let submit = [vk::SubmitInfo::default().command_buffers(&cmds)];
        // SAFETY: the queue is guarded by the lock we hold; the command buffer is executable;
        // the fence is unsignalled (fresh or reset when recycled).
        if let Err(e) = unsafe { gpu.dev.queue_submit(st.queue, &submit, fence) } {
            st.fences.push(fence);
            return Err(gpu.err("vkQueueSubmit", e));
        }
        let cmd = std::mem::replace(&mut self.cmd, vk::CommandBuffer::null());
        Ok(Submitted {
            exec: self.exec.clone(),
            fence,
            cmd,
            sets: std::mem::take(&mut self.sets),
            keep: std::mem::take(&mut self.keep),
            state: Status::Pending,
        })
    }
}

impl Drop for Rec<'_> {
    fn drop(&mut self) {
        drop(self.st.take());
        if self.cmd != vk::CommandBuffer::null() {
            // SAFETY: never submitted: reset it (allowed from the recording and executable
            // states; the pool has RESET_COMMAND_BUFFER) before it goes back to the pool.
            let reset = unsafe { self.dev().reset_command_buffer(self.cmd, vk::CommandBufferResetFlags::empty()) };
            if reset.is_ok() {
                self.exec.recycle(self.cmd, None, std::mem::take(&mut self.sets), std::mem::take(&mut self.keep));
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Pending,
    Done,
    /// The device failed; the objects are abandoned rather than reused.
    Failed,
}

/// A queued operation: its fence, and what it keeps alive until the fence signalled. Dropped
/// before completion, it waits for the work first, so no GPU work outlives its buffers.
pub(super) struct Submitted {
    exec: Arc<Exec>,
    fence: vk::Fence,
    cmd: vk::CommandBuffer,
    sets: Vec<vk::DescriptorSet>,
    keep: Keep,
    state: Status,
}

impl fmt::Debug for Submitted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VulkanFence").field("device", &self.exec.gpu.name).field("state", &self.state).finish()
    }
}

impl Submitted {
    fn finish(&mut self, r: std::result::Result<bool, vk::Result>, what: &str) -> Result<bool> {
        match r {
            Ok(false) => Ok(false),
            Ok(true) => {
                self.state = Status::Done;
                self.exec.recycle(
                    self.cmd,
                    Some(self.fence),
                    std::mem::take(&mut self.sets),
                    std::mem::take(&mut self.keep),
                );
                Ok(true)
            }
            Err(e) => {
                self.state = Status::Failed;
                Err(self.exec.gpu.err(what, e))
            }
        }
    }

    /// Block until the operation finished.
    pub(super) fn wait(mut self) -> Result<()> {
        let start = Instant::now();
        while self.state == Status::Pending {
            // SAFETY: the fence is ours and was submitted.
            let r = unsafe { self.exec.gpu.dev.wait_for_fences(&[self.fence], true, 1_000_000_000) };
            let r = match r {
                Ok(()) => Ok(true),
                Err(vk::Result::TIMEOUT) => Ok(false),
                Err(e) => Err(e),
            };
            self.finish(r, "vkWaitForFences")?;
            if self.state == Status::Pending && start.elapsed() > WAIT_LIMIT {
                return Err(Error::Timeout {
                    what: format!("{}: device work did not finish", self.exec.gpu.name),
                    after: start.elapsed(),
                });
            }
        }
        Ok(())
    }
}

impl Fence for Submitted {
    fn test(&mut self) -> Result<bool> {
        match self.state {
            Status::Done => Ok(true),
            Status::Failed => Err(Error::Device { device: self.exec.gpu.name.clone(), message: "device lost".into() }),
            Status::Pending => {
                // SAFETY: the fence is ours and was submitted; the query never blocks.
                let r = unsafe { self.exec.gpu.dev.get_fence_status(self.fence) };
                self.finish(r, "vkGetFenceStatus")
            }
        }
    }
}

impl Drop for Submitted {
    fn drop(&mut self) {
        if self.state == Status::Pending {
            // SAFETY: the fence is ours and was submitted; waiting keeps the operands (in
            // `keep`) alive until the GPU is done with them.
            let r = unsafe { self.exec.gpu.dev.wait_for_fences(&[self.fence], true, u64::MAX) };
            if let Err(e) = self.finish(r.map(|()| true), "vkWaitForFences") {
                tracing::error!("{e} (while dropping an unfinished operation)");
            }
        }
    }
}
