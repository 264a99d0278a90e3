//! Typed buffers in device memory (a CUDA GPU, a Vulkan device, or the host) and the
//! collectives over them.
//!
//! A [`DeviceBuffer`] owns memory on one device through a [`Region`]; collectives take
//! `&DeviceBuffer`s, and asynchronous ones keep the memory alive (the region is reference
//! counted) until they finished. Device memory is never dereferenced by the CPU, so sharing a
//! buffer between a running collective and the caller is memory-safe; what the caller reads
//! meanwhile is unspecified, as with NCCL.
//!
//! ```no_run
//! # fn main() -> devccl::Result<()> {
//! use devccl::{DeviceBuffer, DeviceId, ReduceOp};
//! let comm = devccl::Communicator::init()?;
//! let grad = DeviceBuffer::from_slice("vulkan".parse::<DeviceId>()?, &vec![1.0f32; 1 << 20])?;
//! comm.all_reduce_device(&grad, ReduceOp::Avg)?; // reduced on the Vulkan device
//! let host: Vec<f32> = grad.to_vec()?;
//! # Ok(()) }
//! ```

use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;

use devccl_core::device::Device;
use devccl_core::memory::{DeviceId, Region, RegionSlice};
use devccl_core::{Element, Error, ReduceOp, Result};

use crate::api::Collective;
use crate::comm::Communicator;
use crate::work::Work;

/// `len` elements of `T` in one device's memory.
pub struct DeviceBuffer<T> {
    region: Region,
    device: Arc<dyn Device>,
    _t: PhantomData<fn() -> T>,
}

impl<T> fmt::Debug for DeviceBuffer<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeviceBuffer").field("device", &self.device.id()).field("bytes", &self.region.len()).finish()
    }
}

impl<T: Element> DeviceBuffer<T> {
    /// `len` elements on `device` (contents undefined). Fails with `Unsupported` when the
    /// device cannot be opened (no driver, no such device), saying why.
    pub fn alloc(device: DeviceId, len: usize) -> Result<DeviceBuffer<T>> {
        let dev = devccl_device::open(device)?;
        let bytes = len
            .checked_mul(std::mem::size_of::<T>())
            .ok_or_else(|| Error::usage(format!("{len} elements of {} overflow the address space", T::DTYPE)))?;
        let region = dev.alloc(bytes)?;
        Ok(DeviceBuffer { region, device: dev, _t: PhantomData })
    }

    /// A buffer on `device` holding a copy of `data`.
    pub fn from_slice(device: DeviceId, data: &[T]) -> Result<DeviceBuffer<T>> {
        let b = DeviceBuffer::alloc(device, data.len())?;
        b.upload(data)?;
        Ok(b)
    }

    /// Wrap a region of device (or host) memory, e.g. one made from a CUDA allocation with
    /// `devccl_device::cuda`. Its length must be a whole number of `T`.
    pub fn from_region(region: Region) -> Result<DeviceBuffer<T>> {
        if !region.len().is_multiple_of(std::mem::size_of::<T>()) {
            return Err(Error::usage(format!(
                "a {}-byte region is not a whole number of {} elements",
                region.len(),
                T::DTYPE
            )));
        }
        let device = crate::comm::device_of(&[&region.full()])?;
        Ok(DeviceBuffer { region, device, _t: PhantomData })
    }

    /// Overwrite the buffer with `data` (blocking; lengths must match).
    pub fn upload(&self, data: &[T]) -> Result<()> {
        self.device.upload(&self.region.full(), bytemuck::cast_slice(data))
    }

    /// Copy the buffer to the host (blocking).
    pub fn to_vec(&self) -> Result<Vec<T>> {
        let mut v = vec![T::zeroed(); self.len()];
        self.device.download(&self.region.full(), bytemuck::cast_slice_mut(&mut v))?;
        Ok(v)
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.region.len() / std::mem::size_of::<T>()
    }

    /// True when the buffer holds no elements.
    pub fn is_empty(&self) -> bool {
        self.region.is_empty()
    }

    /// The device holding it.
    pub fn device(&self) -> DeviceId {
        self.device.id()
    }

    /// The whole buffer as a region slice (for [`Communicator::collective`] and friends).
    pub fn region_slice(&self) -> RegionSlice {
        self.region.full()
    }

    /// The underlying region (to take back an owner given to [`DeviceBuffer::from_region`]
    /// with [`Region::into_keeper`]).
    pub fn into_region(self) -> Region {
        self.region
    }
}

impl Communicator {
    /// A collective on device buffers (blocking): reductions run on the buffers' device;
    /// transports that cannot reach device memory are served through pinned host staging,
    /// pipelined. Pass the same buffer as input and output for in-place forms.
    pub fn collective_device<T: Element>(
        &self,
        c: &Collective,
        input: &DeviceBuffer<T>,
        output: &DeviceBuffer<T>,
    ) -> Result<()> {
        self.collective(c, T::DTYPE, input.region_slice(), output.region_slice())
    }

    /// Asynchronous [`Communicator::collective_device`]: returns at once; the buffers'
    /// memory stays alive until the work finished.
    pub fn collective_device_async<T: Element>(
        &self,
        c: &Collective,
        input: &DeviceBuffer<T>,
        output: &DeviceBuffer<T>,
    ) -> Work<()> {
        self.collective_async(c, T::DTYPE, input.region_slice(), output.region_slice())
    }

    /// All-reduce a device buffer in place.
    pub fn all_reduce_device<T: Element>(&self, buf: &DeviceBuffer<T>, op: ReduceOp) -> Result<()> {
        self.collective_device(&Collective::AllReduce { op }, buf, buf)
    }

    /// Asynchronous in-place all-reduce of a device buffer.
    pub fn all_reduce_device_async<T: Element>(&self, buf: &DeviceBuffer<T>, op: ReduceOp) -> Work<()> {
        self.collective_device_async(&Collective::AllReduce { op }, buf, buf)
    }

    /// Broadcast a device buffer from `root` (in place).
    pub fn broadcast_device<T: Element>(&self, buf: &DeviceBuffer<T>, root: usize) -> Result<()> {
        self.collective_device(&Collective::Broadcast { root }, buf, buf)
    }

    /// Gather every rank's `send` into `recv` (n × len), in rank order.
    pub fn all_gather_device<T: Element>(&self, send: &DeviceBuffer<T>, recv: &DeviceBuffer<T>) -> Result<()> {
        self.collective_device(&Collective::AllGather, send, recv)
    }

    /// Reduce `send` (n × len) and scatter: rank r gets block r in `recv`.
    pub fn reduce_scatter_device<T: Element>(
        &self,
        send: &DeviceBuffer<T>,
        recv: &DeviceBuffer<T>,
        op: ReduceOp,
    ) -> Result<()> {
        self.collective_device(&Collective::ReduceScatter { op }, send, recv)
    }

    /// Send a device buffer to `peer` (matched in order with its receive of the same tag).
    pub fn send_device<T: Element>(&self, buf: &DeviceBuffer<T>, peer: usize, tag: u32) -> Result<()> {
        let empty = Region::alloc(0).full();
        self.collective(&Collective::Send { peer, tag }, T::DTYPE, buf.region_slice(), empty)
    }

    /// Receive from `peer` into a device buffer.
    pub fn recv_device<T: Element>(&self, buf: &DeviceBuffer<T>, peer: usize, tag: u32) -> Result<()> {
        let empty = Region::alloc(0).full();
        self.collective(&Collective::Recv { peer, tag }, T::DTYPE, empty, buf.region_slice())
    }

    /// Receive into a device buffer from whichever rank sends first (see
    /// [`Communicator::recv_any`]); returns the source rank.
    pub fn recv_any_device<T: Element>(&self, buf: &DeviceBuffer<T>, tag: u32) -> Result<usize> {
        self.recv_any(T::DTYPE, buf.region_slice(), tag)
    }
}

/// cudarc interop: a `CudaSlice` as a [`DeviceBuffer`] (owned, for asynchronous and
/// stream-ordered calls) or borrowed for the duration of a blocking call.
#[cfg(feature = "cuda")]
mod cuda {
    use devccl_device::cuda::cudarc::driver::{CudaSlice, CudaStream, DeviceRepr};
    use devccl_device::cuda::{into_slice, raw_stream_of, region_owning, with_slice, with_slice_mut};

    use super::*;
    use crate::api::StreamWork;

    impl<T: Element + DeviceRepr + 'static> DeviceBuffer<T> {
        /// Take ownership of a cudarc slice (in a device's primary context, e.g. from
        /// `CudaContext::new`): the host waits once for its stream's queued work.
        pub fn from_cuda(s: CudaSlice<T>) -> Result<DeviceBuffer<T>> {
            DeviceBuffer::from_region(region_owning(s)?)
        }

        /// The slice back, once no collective still uses the buffer (else the buffer back).
        pub fn into_cuda(self) -> std::result::Result<CudaSlice<T>, DeviceBuffer<T>> {
            let device = self.device.clone();
            into_slice(self.region).map_err(|region| DeviceBuffer { region, device, _t: PhantomData })
        }
    }

    impl Communicator {
        /// A blocking collective on cudarc slices (not the same slice twice; see
        /// [`Communicator::collective_cuda_in_place`]).
        pub fn collective_cuda<T: Element + DeviceRepr>(
            &self,
            c: &Collective,
            input: &CudaSlice<T>,
            output: &mut CudaSlice<T>,
        ) -> Result<()> {
            with_slice(input, |i| with_slice_mut(output, |o| self.collective(c, T::DTYPE, i.full(), o.full())))??
        }

        /// A blocking in-place collective on a cudarc slice.
        pub fn collective_cuda_in_place<T: Element + DeviceRepr>(
            &self,
            c: &Collective,
            buf: &mut CudaSlice<T>,
        ) -> Result<()> {
            with_slice_mut(buf, |r| self.collective(c, T::DTYPE, r.full(), r.full()))?
        }

        /// All-reduce a cudarc slice in place (blocking).
        pub fn all_reduce_cuda<T: Element + DeviceRepr>(&self, buf: &mut CudaSlice<T>, op: ReduceOp) -> Result<()> {
            self.collective_cuda_in_place(&Collective::AllReduce { op }, buf)
        }

        /// A stream-ordered collective on device buffers (see
        /// [`Communicator::collective_on_stream`]): ordered after `stream`'s queued work;
        /// `stream` is held until it finished, like an NCCL call on that stream.
        pub fn collective_on_cuda_stream<T: Element>(
            &self,
            c: &Collective,
            input: &DeviceBuffer<T>,
            output: &DeviceBuffer<T>,
            stream: &CudaStream,
        ) -> Result<StreamWork> {
            let raw = raw_stream_of(stream);
            let w = self.collective_on_stream(c, T::DTYPE, input.region_slice(), output.region_slice(), raw)?;
            w.hold(raw)?;
            Ok(w)
        }
    }
}
