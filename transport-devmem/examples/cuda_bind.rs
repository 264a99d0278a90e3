//! On a machine with an NVIDIA driver: allocate 4 MiB of GPU memory, export it as a dma-buf
//! (PCIe mapping flag first, then flags 0), show what the kernel sees (size by lseek, exporter
//! from fdinfo), then attempt BIND_RX (queue 0) and BIND_TX on an interface (default eth0)
//! with that real fd and print the classified answers. Skips cleanly without a driver.
//!
//! ```text
//! cargo build --release -p devccl-transport-devmem --examples
//! target/release/examples/cuda_bind [IFNAME] [--json]
//! ```

use std::os::fd::{AsFd, AsRawFd};

use devccl_transport_devmem::dmabuf::{self, DmabufSource, cuda};
use devccl_transport_devmem::probe::{self, DmabufUse, FdKind, ProbeOptions};
use devccl_transport_devmem::sys::{iface, netdev::Netdev};

const LEN: usize = 4 << 20;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let json = args.iter().any(|a| a == "--json");
    let ifname = args.iter().find(|a| !a.starts_with("--")).cloned().unwrap_or_else(|| "eth0".into());

    println!("kernel {}", iface::kernel_release());
    if !cuda::driver_present() {
        println!("skip: libcuda not found (no NVIDIA driver on this machine); nothing to export");
        return;
    }
    match cuda::devices() {
        Ok(devs) => {
            for d in &devs {
                println!(
                    "cuda:{} {}: DMA_BUF_SUPPORTED={} driver API {}",
                    d.ordinal, d.name, d.dma_buf_supported as u8, d.driver_version
                );
            }
        }
        Err(e) => {
            println!("skip: {e}");
            return;
        }
    }
    let src = match cuda::CudaSource::open(0) {
        Ok(s) => s,
        Err(e) => {
            println!("skip: {e}");
            return;
        }
    };

    // 1. cuMemAlloc 4 MiB + export.
    let buf = match src.allocate(LEN) {
        Ok(b) => b,
        Err(e) => {
            println!("export failed: {e}");
            std::process::exit(1);
        }
    };
    let db = buf.dmabuf();
    let fd = db.as_fd().as_raw_fd();
    println!("exported: {}", buf.how());
    println!(
        "dma-buf fd {fd}: link {}, lseek(SEEK_END) = {}, exp_name = {}, fdinfo size = {}",
        std::fs::read_link(format!("/proc/self/fd/{fd}"))
            .map(|p| p.display().to_string())
            .unwrap_or_else(|e| format!("? ({e})")),
        db.size_by_lseek().map(|s| s.to_string()).unwrap_or_else(|e| format!("error {e}")),
        db.exporter().unwrap_or_else(|| "?".into()),
        dmabuf::fdinfo_field(fd, "size").unwrap_or_else(|| "?".into()),
    );

    // 1b. For information: can memory from cudarc's own allocator (stream-ordered pool when
    // the device supports it) be exported too?
    {
        use cudarc::driver::DevicePtr;
        let stream = src.context().default_stream();
        match stream.alloc_zeros::<u8>(LEN) {
            Ok(slice) => {
                let (ptr, _sync) = slice.device_ptr(&stream);
                match src.export_range(ptr, LEN) {
                    Ok((d, flags)) => println!(
                        "cudarc alloc_zeros ({}) export: ok, flags {flags:?}, lseek {}",
                        if src.context().has_async_alloc() { "memory pool" } else { "cuMemAlloc" },
                        d.size_by_lseek().unwrap_or(0)
                    ),
                    Err(e) => println!("cudarc alloc_zeros export: {e}"),
                }
            }
            Err(e) => println!("cudarc alloc_zeros: {e:?}"),
        }
    }

    // 2. Binds with the real fd.
    let Some(ifindex) = iface::if_nametoindex(&ifname) else {
        println!("skip binds: no interface {ifname}");
        return;
    };
    let netdev = match Netdev::open() {
        Ok(n) => n,
        Err(e) => {
            println!("skip binds: {e}");
            return;
        }
    };
    let rx = probe::try_bind_rx(&netdev, ifindex, db.as_fd(), FdKind::Dmabuf, 0);
    let tx = probe::try_bind_tx(&netdev, ifindex, db.as_fd(), FdKind::Dmabuf);
    for c in [&rx, &tx] {
        println!("{ifname} {}: {} -> verdict {}", c.op, c.detail, c.verdict);
        println!("    reason: {}", c.verdict.reason().replace("<if>", &ifname));
        println!("    fix: {}", c.verdict.fix().replace("<if>", &ifname));
    }
    drop(buf);

    // 3. The whole probe with a real dma-buf for both binds.
    let report = probe::probe_interface_with(
        &ifname,
        &ProbeOptions { dmabuf: DmabufUse::RealForRxAndTx, real_len: LEN, ..ProbeOptions::default() },
    );
    if json {
        println!("{}", serde_json::to_string_pretty(&report).unwrap_or_default());
    } else {
        println!("\n{report}");
    }
}
