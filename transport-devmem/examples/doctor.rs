//! Print the devmem doctor report (what `devccl doctor` shows).
//!
//! ```text
//! cargo run -p devccl-transport-devmem --example doctor [-- --json] [--real-dmabuf]
//! ```
//!
//! `--real-dmabuf` binds a real dma-buf (CUDA device 0, else udmabuf) for the TX check
//! instead of the placeholder memfd; RX always uses the placeholder here (no queue restart).

use devccl_transport_devmem::doctor;
use devccl_transport_devmem::probe::{DmabufUse, ProbeOptions};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "-h" || a == "--help") {
        println!("usage: doctor [--json] [--real-dmabuf]");
        return;
    }
    let json = args.iter().any(|a| a == "--json");
    let opts = ProbeOptions {
        dmabuf: if args.iter().any(|a| a == "--real-dmabuf") { DmabufUse::RealForTx } else { DmabufUse::Placeholder },
        ..ProbeOptions::default()
    };
    let report = doctor::report_with(&opts);
    if json {
        println!("{}", report.to_json());
    } else {
        println!("{report}");
    }
}
