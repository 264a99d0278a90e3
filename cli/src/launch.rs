//! `devccl launch -n N -- CMD ARGS`: start N ranks of a program on this host with torchrun's
//! variables, prefix their output with the rank, and if one fails stop the others.

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// What to launch.
#[derive(Debug, Clone)]
pub struct LaunchSpec {
    /// Ranks.
    pub nranks: usize,
    /// Program and arguments.
    pub cmd: Vec<OsString>,
    /// Rendezvous host given to the ranks.
    pub master_addr: String,
    /// Rendezvous port (0: pick a free one).
    pub master_port: u16,
    /// Prefix rank 0's stdout too (`launch`); `bench` leaves it bare so the table is clean.
    pub prefix_rank0_stdout: bool,
    /// Extra environment for every rank.
    pub env: Vec<(String, String)>,
}

/// A free TCP port on the loopback interface (the small race until rank 0 binds it is
/// acceptable for local runs; pass --master-port to pin one).
pub fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(l.local_addr()?.port())
}

fn pump(
    src: impl std::io::Read + Send + 'static,
    rank: usize,
    to_stderr: bool,
    prefix: bool,
    lock: Arc<Mutex<()>>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut r = BufReader::new(src);
        let mut line = Vec::new();
        loop {
            line.clear();
            match r.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let _g = lock.lock().unwrap_or_else(|e| e.into_inner());
                    let pre = if prefix { format!("[{rank}] ") } else { String::new() };
                    if to_stderr {
                        let mut e = std::io::stderr().lock();
                        let _ = e.write_all(pre.as_bytes()).and_then(|_| e.write_all(&line));
                    } else {
                        let mut o = std::io::stdout().lock();
                        let _ = o.write_all(pre.as_bytes()).and_then(|_| o.write_all(&line)).and_then(|_| o.flush());
                    }
                }
            }
        }
    })
}

/// Signal a rank's whole process group (each rank leads its own), so grandchildren such as
/// the programs a shell script started stop too and release the output pipes.
fn signal_group(c: &Child, sig: nix::sys::signal::Signal) {
    let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(c.id() as i32), sig);
}

fn stop(children: &mut [Option<Child>]) {
    for c in children.iter_mut().flatten() {
        signal_group(c, nix::sys::signal::Signal::SIGTERM);
    }
    let grace = Instant::now() + Duration::from_secs(3);
    for c in children.iter_mut().flatten() {
        while Instant::now() < grace {
            if let Ok(Some(_)) = c.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        signal_group(c, nix::sys::signal::Signal::SIGKILL);
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// Run the ranks; returns the exit code to use (0 when every rank succeeded, else the first
/// failure's code, 1 for a signal).
pub fn launch(spec: &LaunchSpec) -> Result<i32> {
    if spec.nranks == 0 {
        bail!("-n must be at least 1");
    }
    let Some((prog, args)) = spec.cmd.split_first() else { bail!("nothing to launch: give a command after --") };
    let port = if spec.master_port == 0 { free_port()? } else { spec.master_port };
    let lock = Arc::new(Mutex::new(()));
    let mut children: Vec<Option<Child>> = Vec::new();
    let mut pumps = Vec::new();
    for rank in 0..spec.nranks {
        let mut cmd = Command::new(prog);
        cmd.args(args)
            .env("RANK", rank.to_string())
            .env("WORLD_SIZE", spec.nranks.to_string())
            .env("LOCAL_RANK", rank.to_string())
            .env("LOCAL_WORLD_SIZE", spec.nranks.to_string())
            .env("GROUP_RANK", "0")
            .env("MASTER_ADDR", &spec.master_addr)
            .env("MASTER_PORT", port.to_string())
            .envs(spec.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        // SAFETY: prctl is async-signal-safe; between fork and exec we only ask the kernel to
        // kill the child if the launcher dies, so no rank outlives a killed launcher.
        unsafe {
            cmd.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL).map_err(std::io::Error::from)
            });
        }
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                stop(&mut children);
                return Err(e).with_context(|| format!("starting rank {rank}: {}", prog.to_string_lossy()));
            }
        };
        let out = child.stdout.take().expect("piped");
        let err = child.stderr.take().expect("piped");
        pumps.push(pump(out, rank, false, rank != 0 || spec.prefix_rank0_stdout, lock.clone()));
        pumps.push(pump(err, rank, true, true, lock.clone()));
        children.push(Some(child));
    }
    let mut code = 0;
    let mut running = spec.nranks;
    while running > 0 {
        for rank in 0..children.len() {
            let Some(c) = children[rank].as_mut() else {
                continue;
            };
            if let Some(st) = c.try_wait().context("waiting for a rank")? {
                children[rank] = None;
                running -= 1;
                if !st.success() {
                    code = exit_code(st);
                    eprintln!("devccl launch: rank {rank} failed ({st}); stopping the other ranks");
                    stop(&mut children);
                    running = 0;
                    break;
                }
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    for p in pumps {
        let _ = p.join();
    }
    Ok(code)
}

fn exit_code(st: ExitStatus) -> i32 {
    st.code().unwrap_or(1).max(1)
}
