//! Blocking uploads and downloads: through a pooled host-visible buffer and vkCmdCopyBuffer
//! for device memory (ordered after all work queued before), directly for staging memory
//! (after waiting for the queue to drain).

use std::sync::{Arc, Mutex, MutexGuard};

use ash::vk;
use devccl_core::memory::RegionSlice;
use devccl_core::{Error, Result};

use super::exec::Exec;
use super::instance::Gpu;
use super::memory::{self, Buffer, Kind, Operand};
use super::plan;

/// The largest transfer buffer (larger transfers go through it in pieces).
const XFER_MAX: u64 = 16 << 20;

/// The transfer buffer, locked for one transfer at a time.
type Staged<'a> = (MutexGuard<'a, Option<Arc<Buffer>>>, Arc<Buffer>);

/// The device's transfer buffer, grown on demand up to [`XFER_MAX`].
#[derive(Debug, Default)]
pub(super) struct Transfers(Mutex<Option<Arc<Buffer>>>);

impl Transfers {
    fn buffer(&self, gpu: &Arc<Gpu>, len: u64) -> Result<Staged<'_>> {
        let mut g = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let want = len.min(XFER_MAX);
        let buf = match g.as_ref().filter(|b| b.size >= want) {
            Some(b) => b.clone(),
            None => {
                let b = Buffer::new(gpu, want.next_power_of_two().clamp(64 << 10, XFER_MAX), Kind::Internal)?;
                *g = Some(b.clone());
                b
            }
        };
        Ok((g, buf))
    }

    /// Write `src` into `dst` (this device's memory or staging).
    pub(super) fn upload(&self, exec: &Arc<Exec>, dst: &RegionSlice, src: &[u8]) -> Result<()> {
        if dst.len() != src.len() {
            return Err(Error::usage(format!("upload of {} bytes into {}", src.len(), dst.len())));
        }
        let d = memory::operand(&exec.gpu, dst, "upload destination")?;
        if !dst.region.writable() {
            return Err(Error::usage("upload into a read-only region"));
        }
        if src.is_empty() {
            return Ok(());
        }
        if d.is_mapped() {
            exec.wait_idle()?;
            return dst.with_bytes_mut(|b| b.copy_from_slice(src));
        }
        let (_guard, stage) = self.buffer(&exec.gpu, d.len)?;
        for (c, n) in plan::chunks(d.len, stage.size) {
            let piece = &src[c as usize..(c + n) as usize];
            // SAFETY: `stage` is mapped for `stage.size >= n` bytes; the guard makes us its only
            // user, and the previous copy through it finished (waited for below).
            unsafe { std::ptr::copy_nonoverlapping(piece.as_ptr(), stage.mapped(), piece.len()) };
            copy_wait(exec, dst, &stage, &d, vk::BufferCopy { src_offset: 0, dst_offset: d.off + c, size: n }, true)?;
        }
        Ok(())
    }

    /// Read `src` (this device's memory or staging) into `dst`.
    pub(super) fn download(&self, exec: &Arc<Exec>, src: &RegionSlice, dst: &mut [u8]) -> Result<()> {
        if dst.len() != src.len() {
            return Err(Error::usage(format!("download of {} bytes into {}", src.len(), dst.len())));
        }
        let s = memory::operand(&exec.gpu, src, "download source")?;
        if dst.is_empty() {
            return Ok(());
        }
        if s.is_mapped() {
            exec.wait_idle()?;
            return src.with_bytes(|b| dst.copy_from_slice(b));
        }
        let (_guard, stage) = self.buffer(&exec.gpu, s.len)?;
        for (c, n) in plan::chunks(s.len, stage.size) {
            copy_wait(exec, src, &stage, &s, vk::BufferCopy { src_offset: s.off + c, dst_offset: 0, size: n }, false)?;
            let piece = &mut dst[c as usize..(c + n) as usize];
            // SAFETY: `stage` is mapped for at least `n` bytes; the copy into it finished and
            // ended with a device-to-host barrier; the guard makes us its only user.
            unsafe { std::ptr::copy_nonoverlapping(stage.mapped(), piece.as_mut_ptr(), piece.len()) };
        }
        Ok(())
    }
}

/// One copy between the transfer buffer and `o` (`up`: into `o`), waited for.
fn copy_wait(
    exec: &Arc<Exec>,
    s: &RegionSlice,
    stage: &Buffer,
    o: &Operand,
    r: vk::BufferCopy,
    up: bool,
) -> Result<()> {
    let mut rec = exec.begin()?;
    rec.keep(&s.region);
    if up {
        rec.copy(stage, &o.buf, &[r]);
    } else {
        rec.copy(&o.buf, stage, &[r]);
    }
    let sub = rec.submit()?;
    sub.wait()
}
