//! Process harness shared by the multi-process tests: start N ranks of a program with the
//! launcher's variables and a fresh rendezvous port, and collect them under a deadline.
#![allow(dead_code)] // each test binary uses its own part

use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A port nobody listens on right now (for the embedded rendezvous).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// One started rank.
pub struct Rank {
    pub child: Child,
}

/// Start `n` ranks of `program` (RANK, WORLD_SIZE, LOCAL_*, MASTER_*; DEVCCL_INIT_TIMEOUT=20,
/// DEVCCL_TIMEOUT=10 unless `common` overrides them) with `common` and each rank's own extra
/// variables.
pub fn spawn(
    program: &str,
    n: usize,
    common: &[(&str, &str)],
    per_rank: impl Fn(usize) -> Vec<(String, String)>,
) -> Vec<Rank> {
    let port = free_port().to_string();
    (0..n)
        .map(|r| {
            let mut c = Command::new(program);
            c.env("RANK", r.to_string())
                .env("WORLD_SIZE", n.to_string())
                .env("LOCAL_RANK", r.to_string())
                .env("LOCAL_WORLD_SIZE", n.to_string())
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", &port)
                .env("DEVCCL_INIT_TIMEOUT", "20")
                .env("DEVCCL_TIMEOUT", "10")
                .envs(common.iter().copied())
                .envs(per_rank(r))
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            Rank { child: c.spawn().expect("spawn rank") }
        })
        .collect()
}

/// Wait for every rank (killing stragglers after `limit`); per rank: (exited successfully,
/// stdout+stderr, time until it exited or was killed).
pub fn finish(mut ranks: Vec<Rank>, limit: Duration) -> Vec<(bool, String, Duration)> {
    let start = Instant::now();
    let mut status: Vec<Option<(bool, Duration)>> = vec![None; ranks.len()];
    while status.iter().any(Option::is_none) {
        for (i, r) in ranks.iter_mut().enumerate() {
            if status[i].is_some() {
                continue;
            }
            if let Some(st) = r.child.try_wait().unwrap() {
                status[i] = Some((st.success(), start.elapsed()));
            } else if start.elapsed() > limit {
                let _ = r.child.kill();
                let _ = r.child.wait();
                status[i] = Some((false, start.elapsed()));
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    ranks
        .into_iter()
        .zip(status)
        .map(|(mut r, st)| {
            let (ok, took) = st.expect("every rank finished");
            let mut s = String::new();
            r.child.stdout.take().unwrap().read_to_string(&mut s).unwrap();
            let mut e = String::new();
            r.child.stderr.take().unwrap().read_to_string(&mut e).unwrap();
            (ok, format!("{s}{e}"), took)
        })
        .collect()
}

/// Check a `devccl bench` table: `rows` result rows, `#wrong` 0 out of place and in place on
/// each, and the out-of-bounds summary OK. Returns the rows.
pub fn bench_rows_ok(text: &str, rows: usize) -> Vec<String> {
    let got: Vec<String> =
        text.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()).map(str::to_owned).collect();
    assert_eq!(got.len(), rows, "{text}");
    for r in &got {
        let cols: Vec<&str> = r.split_whitespace().collect();
        assert_eq!((cols[8], cols[12]), ("0", "0"), "#wrong: {r}");
    }
    assert!(text.contains("# Out of bounds values : 0 OK"), "{text}");
    got
}

/// Is there a Vulkan device? Without one a test says why (`what` names the test) and runs on
/// host memory or skips, unless CI requires Vulkan (`DEVCCL_REQUIRE_VULKAN=1`): then it fails.
pub fn vulkan_or_skip(what: &str) -> bool {
    match devccl_device::open("vulkan".parse().unwrap()) {
        Ok(_) => true,
        Err(e) => {
            assert!(
                std::env::var("DEVCCL_REQUIRE_VULKAN").as_deref() != Ok("1"),
                "{what}: DEVCCL_REQUIRE_VULKAN=1 but no Vulkan device: {e}"
            );
            println!("no Vulkan device for {what} ({e})");
            false
        }
    }
}

/// The survivors of a run in which rank `killed` was SIGKILLed: the killed rank failed; every
/// other rank reported a failure naming it, exited cleanly, freed its device and staging
/// memory (`live 0`) and was done within `limit`. Returns (rank, output) of the survivors.
pub fn survivors_of_kill(res: &[(bool, String, Duration)], killed: usize, limit: Duration) -> Vec<(usize, &str)> {
    let mut out = Vec::new();
    for (r, (ok, text, took)) in res.iter().enumerate() {
        if r == killed {
            assert!(!ok, "the killed rank cannot succeed: {text}");
            continue;
        }
        assert!(*ok, "rank {r} must report and exit cleanly: {text}");
        let named = format!("rank {killed}");
        assert!(text.contains("failed: ") && text.contains(&named), "rank {r} must name {named}: {text}");
        assert!(text.contains("live 0"), "rank {r} leaked device or staging memory: {text}");
        assert!(*took < limit, "rank {r} took {took:?}");
        out.push((r, text.as_str()));
    }
    out
}
