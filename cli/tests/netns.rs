//! Two simulated nodes on one machine: two network namespaces joined by a veth pair, two
//! ranks in each. Ranks in one namespace share memory; ranks in different namespaces must
//! fall back to TCP over the veth link (abstract Unix socket names are per namespace), over
//! IPv4 and over IPv6, with `DEVCCL_SOCKET_IFNAME` choosing the link. This is the multi-node
//! path (rendezvous across hosts, per-pair transport choice, interface selection) short of
//! a second machine.
//!
//! Needs root and iproute2 (`ip netns`); skips with a message otherwise. CI runs as root.
//! The addresses (198.18.0.0/15, the benchmarking range, and fd77::/64) exist only inside
//! the two namespaces, so no traffic can leave the machine.

use std::io::Read;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

const WORKER: &str = env!("CARGO_BIN_EXE_devccl-testworker");

/// Two namespaces, `a` and `b`, linked by veth `a_if` (in `a`) and `b_if` (in `b`); removed
/// on drop (deleting a namespace deletes its veth end, and with it the pair).
struct TwoNodes {
    a: String,
    b: String,
    a_if: String,
    b_if: String,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip").args(args).output().map_err(|e| format!("ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

impl TwoNodes {
    fn create() -> Result<TwoNodes, String> {
        // Unique per process and per test (tests run in parallel threads).
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let id = format!("{}x{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
        let nodes = TwoNodes {
            a: format!("dvcns{id}a"),
            b: format!("dvcns{id}b"),
            a_if: format!("dvc{id}a"),
            b_if: format!("dvc{id}b"),
        };
        ip(&["netns", "add", &nodes.a])?;
        ip(&["netns", "add", &nodes.b])?;
        let (a, b, a_if, b_if) = (&nodes.a, &nodes.b, &nodes.a_if, &nodes.b_if);
        ip(&["link", "add", a_if, "netns", a, "type", "veth", "peer", "name", b_if, "netns", b])?;
        for (ns, dev, v4, v6) in [(a, a_if, "198.18.77.1/24", "fd77::1/64"), (b, b_if, "198.18.77.2/24", "fd77::2/64")]
        {
            ip(&["-n", ns, "addr", "add", v4, "dev", dev])?;
            // nodad: usable at once, no duplicate-address detection wait.
            ip(&["-n", ns, "addr", "add", v6, "dev", dev, "nodad"])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
        }
        Ok(nodes)
    }
}

impl Drop for TwoNodes {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.a]);
        let _ = ip(&["netns", "del", &self.b]);
    }
}

fn two_nodes_or_skip() -> Option<TwoNodes> {
    // Not root, no iproute2, no namespace support: `ip netns add` fails and says why.
    match TwoNodes::create() {
        Ok(n) => Some(n),
        Err(e) => {
            eprintln!("skipped: simulated nodes need network namespaces (root and iproute2): {e}");
            None
        }
    }
}

/// Run a 4-rank job (ranks 0, 1 in namespace `a`, ranks 2, 3 in `b`) with rank 0 hosting the
/// rendezvous at `master`; with `ifname`, each rank names its veth in `DEVCCL_SOCKET_IFNAME`,
/// else the address comes from the route toward the rendezvous. Per rank: (success, output).
fn run_job(nodes: &TwoNodes, master: &str, ifname: bool, extra: &[(&str, &str)]) -> Vec<(bool, String)> {
    let port = "29655";
    let mut children: Vec<_> = (0..4)
        .map(|rank| {
            let (ns, dev) = if rank < 2 { (&nodes.a, &nodes.a_if) } else { (&nodes.b, &nodes.b_if) };
            let mut c = Command::new("ip");
            if ifname {
                c.env("DEVCCL_SOCKET_IFNAME", dev);
            }
            c.args(["netns", "exec", ns, WORKER])
                .env("RANK", rank.to_string())
                .env("WORLD_SIZE", "4")
                .env("LOCAL_RANK", (rank % 2).to_string())
                .env("LOCAL_WORLD_SIZE", "2")
                .env("MASTER_ADDR", master)
                .env("MASTER_PORT", port)
                .env("DEVCCL_INIT_TIMEOUT", "20")
                .env("DEVCCL_TIMEOUT", "10")
                .env("DEVCCL_DEBUG", "info")
                .env("WORKER_ITERS", "5")
                .env("WORKER_COUNT", "300007")
                .envs(extra.iter().copied())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn ip netns exec")
        })
        .collect();
    let start = Instant::now();
    let mut done = vec![None; 4];
    while done.iter().any(Option::is_none) {
        for (i, c) in children.iter_mut().enumerate() {
            if done[i].is_none() {
                if let Some(st) = c.try_wait().unwrap() {
                    done[i] = Some(st.success());
                } else if start.elapsed() > Duration::from_secs(60) {
                    let _ = c.kill();
                    let _ = c.wait();
                    done[i] = Some(false);
                }
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    children
        .iter_mut()
        .zip(done)
        .map(|(c, ok)| {
            let mut s = String::new();
            c.stdout.take().unwrap().read_to_string(&mut s).unwrap();
            c.stderr.take().unwrap().read_to_string(&mut s).unwrap();
            (ok.expect("finished"), s)
        })
        .collect()
}

/// The transport rank `me` logged for its connection to `peer` (`DEVCCL_DEBUG=info`).
fn transport_to(out: &str, peer: usize) -> Option<&'static str> {
    let line = out.lines().find(|l| l.contains("connected") && l.contains(&format!("peer={peer} ")))?;
    ["shm", "tcp"].into_iter().find(|k| line.contains(&format!("transport={k}")))
}

fn check_job(res: &[(bool, String)], family: &str) {
    for (r, (ok, out)) in res.iter().enumerate() {
        assert!(*ok && out.contains("ok 5"), "{family}: rank {r} failed:\n{out}");
        let node = r / 2;
        for p in (0..4).filter(|&p| p != r) {
            let want = if p / 2 == node { "shm" } else { "tcp" };
            assert_eq!(transport_to(out, p), Some(want), "{family}: rank {r} to rank {p}:\n{out}");
        }
        // The TCP endpoint each rank published is on its veth link, in the right family.
        let tcp = out.lines().find(|l| l.starts_with("endpoint tcp ")).unwrap_or_else(|| panic!("{out}"));
        let prefix = if family == "ipv4" { "198.18.77." } else { "[fd77::" };
        assert!(tcp.contains(prefix), "{family}: rank {r} published {tcp}");
    }
}

#[test]
fn two_namespaces_as_two_nodes_over_ipv4_and_ipv6() {
    let Some(nodes) = two_nodes_or_skip() else { return };
    // The data address from the route toward the rendezvous, in its family.
    check_job(&run_job(&nodes, "198.18.77.1", false, &[]), "ipv4");
    check_job(&run_job(&nodes, "fd77::1", false, &[]), "ipv6");
    // Named interface; its address family chosen explicitly.
    check_job(&run_job(&nodes, "198.18.77.1", true, &[("DEVCCL_SOCKET_FAMILY", "ipv6")]), "ipv6");
    check_job(&run_job(&nodes, "fd77::1", true, &[("DEVCCL_SOCKET_FAMILY", "ipv4")]), "ipv4");
}

#[test]
fn a_node_that_cannot_reach_the_rendezvous_fails_within_the_init_timeout() {
    let Some(nodes) = two_nodes_or_skip() else { return };
    // The link is down: ranks in `b` cannot reach rank 0's rendezvous in `a`.
    ip(&["-n", &nodes.b, "link", "set", &nodes.b_if, "down"]).unwrap();
    let t = Instant::now();
    let res = run_job(&nodes, "198.18.77.1", true, &[("DEVCCL_INIT_TIMEOUT", "4")]);
    assert!(t.elapsed() < Duration::from_secs(30), "bounded by the init timeout");
    for (r, (ok, out)) in res.iter().enumerate() {
        assert!(!ok && out.contains("error:"), "rank {r} should fail with a message:\n{out}");
    }
}
