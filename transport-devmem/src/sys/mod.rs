//! Kernel interfaces: netlink, socket options, cmsgs, interface lookups.
//!
//! The codecs ([`netlink`], [`cmsg`], the request builders) are pure and golden-tested; the
//! modules that make system calls ([`socket`], [`sock`], [`iface`], [`ntuple`]) hold this
//! crate's unsafe code outside the dma-buf sources and the simulator's memory mappings.

pub mod cmsg;
pub mod ethtool;
pub mod genl;
pub mod iface;
pub mod netdev;
pub mod netlink;
pub mod ntuple;
pub mod sock;
pub mod socket;

#[cfg(test)]
pub(crate) mod recorded;

/// Linux errno values this crate names, including the kernel-internal ones that leak to user
/// space (`ENOTSUPP` 524 from dma-buf exporters, `ETOOSMALL` 525 from devmem recvmsg).
pub mod errno {
    pub const EPERM: i32 = 1;
    pub const ENOENT: i32 = 2;
    pub const EINTR: i32 = 4;
    pub const EBADF: i32 = 9;
    pub const EAGAIN: i32 = 11;
    pub const ENOMEM: i32 = 12;
    pub const EFAULT: i32 = 14;
    pub const EBUSY: i32 = 16;
    pub const EEXIST: i32 = 17;
    pub const ENODEV: i32 = 19;
    pub const EINVAL: i32 = 22;
    pub const ERANGE: i32 = 34;
    pub const EOPNOTSUPP: i32 = 95;
    pub const ENOBUFS: i32 = 105;
    pub const ETIMEDOUT: i32 = 110;
    pub const EHOSTUNREACH: i32 = 113;
    pub const ENOTSUPP: i32 = 524;
    pub const ETOOSMALL: i32 = 525;
}

/// Symbolic name of a (positive) errno, `"E?"` when unknown.
pub fn errno_name(errno: i32) -> &'static str {
    match errno {
        0 => "OK",
        1 => "EPERM",
        2 => "ENOENT",
        3 => "ESRCH",
        4 => "EINTR",
        5 => "EIO",
        6 => "ENXIO",
        7 => "E2BIG",
        9 => "EBADF",
        11 => "EAGAIN",
        12 => "ENOMEM",
        13 => "EACCES",
        14 => "EFAULT",
        16 => "EBUSY",
        17 => "EEXIST",
        19 => "ENODEV",
        22 => "EINVAL",
        24 => "EMFILE",
        28 => "ENOSPC",
        34 => "ERANGE",
        38 => "ENOSYS",
        61 => "ENODATA",
        71 => "EPROTO",
        74 => "EBADMSG",
        75 => "EOVERFLOW",
        90 => "EMSGSIZE",
        93 => "EPROTONOSUPPORT",
        95 => "EOPNOTSUPP",
        97 => "EAFNOSUPPORT",
        100 => "ENETDOWN",
        101 => "ENETUNREACH",
        105 => "ENOBUFS",
        110 => "ETIMEDOUT",
        111 => "ECONNREFUSED",
        113 => "EHOSTUNREACH",
        524 => "ENOTSUPP",
        525 => "ETOOSMALL",
        _ => "E?",
    }
}

/// A sealed-size-free anonymous memory fd: a valid fd that is *not* a dma-buf. The probe
/// binds it when no real dma-buf is wanted: every driver check the kernel makes before
/// `dma_buf_get` still runs, and nothing can actually be bound.
pub fn placeholder_fd() -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    let name = c"devccl-probe-not-a-dmabuf";
    // SAFETY: `name` is a valid C string; flags are plain bits.
    let raw = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if raw < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh fd we own exclusively.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(raw) })
}
