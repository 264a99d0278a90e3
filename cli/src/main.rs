//! The `devccl` command: `bench` (nccl-tests style), `launch`, `rendezvous`, `doctor`.

mod bench;
mod launch;

use std::ffi::OsString;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use devccl_core::auth::AuthKey;
use devccl_core::bootstrap::{RendezvousServer, ServerOptions};
use devccl_core::config::Config;

/// devccl: collective communication over TCP and devmem TCP.
#[derive(Debug, Parser)]
#[command(name = "devccl", version, about)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Benchmark a collective (nccl-tests table). Starts -n local ranks unless launched by
    /// torchrun/srun/mpirun.
    Bench(bench::BenchArgs),
    /// Start N ranks of a program with torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK,
    /// MASTER_ADDR, MASTER_PORT); output is prefixed with the rank; one failure stops all.
    Launch {
        /// Number of ranks.
        #[arg(short = 'n', long = "nranks")]
        nranks: usize,
        /// MASTER_ADDR given to the ranks.
        #[arg(long, default_value = "127.0.0.1")]
        master_addr: String,
        /// MASTER_PORT given to the ranks (default: a free port).
        #[arg(long, default_value_t = 0)]
        master_port: u16,
        /// The program and its arguments.
        #[arg(last = true, required = true)]
        cmd: Vec<OsString>,
    },
    /// What devmem TCP needs on this host and what is missing, per interface, plus the
    /// dma-buf sources found (CUDA devices with DMA_BUF_SUPPORTED, udmabuf).
    Doctor {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Run a standalone rendezvous server for multi-node jobs (ranks then set
    /// DEVCCL_RENDEZVOUS=host:port and DEVCCL_RENDEZVOUS_EXTERNAL=1).
    Rendezvous {
        /// Address to listen on (host:port).
        #[arg(long, default_value = "0.0.0.0:29400")]
        listen: String,
        /// Expected world size of the job.
        #[arg(long)]
        world: usize,
    },
}

/// What the registry decides about devmem for this process (a rank 0 of two, data toward
/// this host), with the operator's steps for the interface and queues it binds.
fn transport_check() -> Result<devccl_transport_devmem::doctor::TransportCheck> {
    use devccl_core::transport::TransportKind;
    let cfg = Config::from_env()?;
    let mut one = cfg.clone();
    one.transports = vec![TransportKind::Devmem, TransportKind::Tcp];
    let toward = cfg.socket_ifname.is_none().then(|| "127.0.0.1:1".parse().expect("address"));
    let offer = devccl::registry::offer(&one, devccl::Rank(0), 2, toward)?;
    let (ready, detail) =
        match (offer.transports.iter().find(|t| t.kind() == TransportKind::Devmem), offer.declined.first()) {
            (Some(t), _) => (true, format!("ready: {}", t.properties().name)),
            (None, Some(d)) => (false, format!("declined: {}", d.reason)),
            (None, None) => (false, "declined: nothing created".into()),
        };
    let data_if = devccl_transport_tcp::select_address(cfg.socket_ifname.as_deref(), cfg.socket_family, toward)
        .map(|(_, i)| i)
        .unwrap_or_else(|_| "lo".into());
    let interface = cfg.devmem.ifname.clone().unwrap_or(data_if);
    let queues =
        cfg.devmem.queues.clone().unwrap_or_else(|| devccl_transport_devmem::transport::default_queues(&interface));
    Ok(devccl_transport_devmem::doctor::TransportCheck {
        kernel: cfg.devmem.kernel.name().into(),
        transports: cfg.transports.iter().map(|k| k.name()).collect::<Vec<_>>().join(","),
        ready,
        detail,
        operator_steps: devccl_transport_devmem::doctor::operator_steps(&interface, &queues),
        interface,
        queues,
    })
}

fn main() {
    let cli = Cli::parse();
    let code = match run(cli) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("devccl: error: {e:#}");
            1
        }
    };
    std::process::exit(code);
}

fn run(cli: Cli) -> Result<i32> {
    match cli.cmd {
        Cmd::Bench(a) => bench::run(a),
        Cmd::Launch { nranks, master_addr, master_port, cmd } => launch::launch(&launch::LaunchSpec {
            nranks,
            cmd,
            master_addr,
            master_port,
            prefix_rank0_stdout: true,
            env: vec![],
        }),
        Cmd::Doctor { json } => {
            use std::io::Write;
            let mut report = devccl_transport_devmem::doctor::report();
            report.transport = Some(transport_check()?);
            let text = if json { report.to_json() + "\n" } else { report.to_string() };
            // A closed stdout (`devccl doctor | head`) is not an error worth a panic. (SIGPIPE
            // stays ignored, as the Rust runtime sets it: the gRPC stack relies on that.)
            let _ = std::io::stdout().lock().write_all(text.as_bytes());
            Ok(0)
        }
        Cmd::Rendezvous { listen, world } => {
            let cfg = Config::from_env()?;
            let key = cfg.secret.as_deref().map(AuthKey::from_secret);
            let server = RendezvousServer::start(
                &listen,
                ServerOptions { world: Some(world), key, group_timeout: cfg.init_timeout.max(Duration::from_secs(1)) },
            )
            .with_context(|| format!("starting the rendezvous on {listen}"))?;
            eprintln!("devccl rendezvous: listening on {} for {world} ranks", server.local_addr());
            server.serve_forever()?;
            Ok(0)
        }
    }
}
