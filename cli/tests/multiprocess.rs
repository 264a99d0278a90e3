//! Multi-process runs over loopback TCP: real processes, real sockets, real rendezvous.
//! Each test is bounded: ranks get short DEVCCL_TIMEOUT / DEVCCL_INIT_TIMEOUT values and the
//! harness kills anything still alive after its own deadline.

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const WORKER: &str = env!("CARGO_BIN_EXE_devccl-testworker");
const DEVCCL: &str = env!("CARGO_BIN_EXE_devccl");

mod common;
use common::{finish, free_port};

/// Start `n` test workers with the launcher's variables, short timeouts, `common` and each
/// rank's own extra variables.
fn spawn(n: usize, common: &[(&str, &str)], per_rank: impl Fn(usize) -> Vec<(String, String)>) -> Vec<common::Rank> {
    common::spawn(WORKER, n, common, per_rank)
}

#[test]
fn all_reduce_over_loopback_with_2_3_4_ranks() {
    for n in [2, 3, 4] {
        let res =
            finish(spawn(n, &[("WORKER_ITERS", "10"), ("WORKER_COUNT", "70001")], |_| vec![]), Duration::from_secs(60));
        for (r, (ok, out, _)) in res.iter().enumerate() {
            assert!(*ok && out.contains("ok 10"), "n={n} rank {r}: {out}");
        }
    }
}

#[test]
fn killed_rank_is_named_by_every_survivor() {
    let n = 4;
    let res = finish(
        spawn(
            n,
            &[("WORKER_ITERS", "200"), ("WORKER_DIE_RANK", "2"), ("WORKER_DIE_AT", "5"), ("DEVCCL_TIMEOUT", "8")],
            |_| vec![],
        ),
        Duration::from_secs(40),
    );
    for (r, (ok, out, took)) in res.iter().enumerate() {
        if r == 2 {
            assert!(!ok, "the killed rank cannot succeed");
            continue;
        }
        assert!(!ok, "rank {r} must fail: {out}");
        assert!(out.contains("error:") && out.contains("rank 2"), "rank {r} must name rank 2: {out}");
        assert!(out.contains("after: communicator aborted"), "rank {r}: a later call fails fast: {out}");
        assert!(*took < Duration::from_secs(20), "rank {r} took {took:?}");
    }
}

#[test]
fn stalled_rank_times_out_everywhere() {
    let n = 3;
    let res = finish(
        spawn(
            n,
            &[("WORKER_ITERS", "50"), ("WORKER_STALL_RANK", "1"), ("WORKER_STALL_AT", "3"), ("DEVCCL_TIMEOUT", "2")],
            |_| vec![],
        ),
        Duration::from_secs(14),
    );
    // A live but stalled rank cannot be told apart from a slow one: the ranks that wait for
    // it name it; the others name the rank they wait for, plus any reports that reached
    // them in time (usually the neighbour's, which names rank 1).
    let mut named = 0;
    for (r, (ok, out, took)) in res.iter().enumerate() {
        if r == 1 {
            continue; // killed by the harness
        }
        assert!(!ok && out.contains("timed out"), "rank {r} must time out: {out}");
        named += usize::from(out.contains("rank 1"));
        assert!(*took < Duration::from_secs(12), "rank {r} must give up on its own (took {took:?})");
    }
    assert!(named >= 1, "someone names the stalled rank: {res:?}");
}

#[test]
fn mismatched_count_and_dtype_fail_on_every_rank() {
    for kind in ["count", "dtype"] {
        let res = finish(
            spawn(3, &[("WORKER_ITERS", "3"), ("WORKER_MISMATCH_RANK", "1"), ("WORKER_MISMATCH", kind)], |_| vec![]),
            Duration::from_secs(30),
        );
        for (r, (ok, out, _)) in res.iter().enumerate() {
            assert!(!ok, "{kind}: rank {r} must fail: {out}");
            assert!(out.contains("mismatch") || out.contains("aborted"), "{kind}: rank {r}: {out}");
        }
        let detectors = res.iter().filter(|(_, o, _)| o.contains("collective mismatch: rank")).count();
        assert!(detectors >= 1, "{kind}: someone names both calls: {res:?}");
        assert!(
            res.iter().any(|(_, o, _)| o.contains("count=70001") || o.contains("int32") || o.contains("count=100001")),
            "{kind}: the differing call is shown: {res:?}"
        );
    }
}

#[test]
fn wrong_secret_is_refused_on_every_rank() {
    let res = finish(
        spawn(3, &[("WORKER_ITERS", "2"), ("DEVCCL_INIT_TIMEOUT", "10")], |r| {
            vec![("DEVCCL_SECRET".into(), if r == 2 { "wrong".into() } else { "right".into() })]
        }),
        Duration::from_secs(30),
    );
    for (r, (ok, out, took)) in res.iter().enumerate() {
        assert!(!ok, "rank {r} must fail: {out}");
        assert!(out.to_lowercase().contains("secret"), "rank {r} must say why: {out}");
        assert!(*took < Duration::from_secs(15), "rank {r} took {took:?}");
    }
}

#[test]
fn garbage_on_a_data_port_does_not_harm_the_communicator() {
    let mut ranks = spawn(
        2,
        &[("WORKER_ITERS", "30"), ("WORKER_SLEEP_MS", "50"), ("WORKER_COUNT", "1000"), ("DEVCCL_TRANSPORTS", "tcp")],
        |_| vec![],
    );
    // Rank 1 prints its data endpoint first; attack it while the ranks keep working.
    let mut stdout = BufReader::new(ranks[1].child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    let addr =
        line.trim().strip_prefix("endpoint tcp ").unwrap_or_else(|| panic!("endpoint line: {line:?}")).to_string();
    for payload in [&b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..], &[0xffu8; 200][..], b"DVCH\x01\x02short"] {
        let mut s = std::net::TcpStream::connect(&addr).unwrap();
        let _ = s.write_all(payload);
        let mut buf = [0u8; 64];
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = s.read(&mut buf); // the challenge; then the rank closes on us
    }
    let mut rest = String::new();
    stdout.read_to_string(&mut rest).unwrap();
    ranks[1].child.stdout = None;
    let st = ranks[1].child.wait().unwrap();
    assert!(st.success() && rest.contains("ok 30"), "rank 1: {rest}");
    assert!(rest.contains("tcp.rejected_handshakes=3"), "rank 1 counted the garbage: {rest}");
    let res = finish(vec![ranks.remove(0)], Duration::from_secs(30));
    assert!(res[0].0 && res[0].1.contains("ok 30"), "rank 0: {}", res[0].1);
}

#[test]
fn bench_prints_nccl_tests_table_with_no_wrong_results() {
    let out = Command::new(DEVCCL)
        .args([
            "bench",
            "all_reduce",
            "-n",
            "3",
            "-b",
            "8",
            "-e",
            "1M",
            "-f",
            "8",
            "-w",
            "1",
            "-i",
            "3",
            "-c",
            "1",
            "-I",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    let rows: Vec<&str> = text.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()).collect();
    assert_eq!(rows.len(), 7, "8, 64, 512, 4K, 32K, 256K, then capped at 1M: {text}");
    for r in rows {
        let cols: Vec<&str> = r.split_whitespace().collect();
        assert_eq!(cols[2], "float");
        assert_eq!(cols[8], "0", "#wrong out-of-place: {r}");
        assert_eq!(cols[12], "0", "#wrong in-place: {r}");
    }
    assert!(text.contains("# Out of bounds values : 0 OK"));
}

#[test]
fn launch_prefixes_ranks_and_stops_all_on_failure() {
    let ok = Command::new(DEVCCL)
        .args(["launch", "-n", "2", "--", "sh", "-c", "echo hello $RANK of $WORLD_SIZE"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&ok.stdout);
    assert!(ok.status.success());
    assert!(text.contains("[0] hello 0 of 2") && text.contains("[1] hello 1 of 2"), "{text}");
    let t0 = Instant::now();
    let bad = Command::new(DEVCCL)
        .args(["launch", "-n", "3", "--", "sh", "-c", "if [ $RANK = 1 ]; then exit 7; fi; sleep 60"])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(7));
    assert!(t0.elapsed() < Duration::from_secs(20), "others were stopped");
    assert!(String::from_utf8_lossy(&bad.stderr).contains("rank 1 failed"));
}

/// Run `devccl bench` and return its stdout; panics with the output on failure.
fn bench(args: &[&str], env: &[(&str, &str)]) -> String {
    let out = Command::new(DEVCCL).arg("bench").args(args).envs(env.iter().copied()).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "devccl bench {args:?} {env:?} failed:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for row in text.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()) {
        let c: Vec<&str> = row.split_whitespace().collect();
        assert!(c[8] == "0" && c[12] == "0", "#wrong in {args:?} {env:?}: {row}");
    }
    assert!(text.contains("# Out of bounds values : 0 OK"), "{text}");
    text
}

const COLLECTIVES: [&str; 11] = [
    "all_reduce",
    "broadcast",
    "reduce",
    "all_gather",
    "reduce_scatter",
    "all_to_all",
    "all_to_all_v",
    "gather",
    "scatter",
    "sendrecv",
    "barrier",
];

#[test]
fn every_collective_over_loopback_with_3_and_4_ranks() {
    for n in ["3", "4"] {
        for coll in COLLECTIVES {
            bench(&[coll, "-n", n, "--sizes", "8,4K,1M", "-w", "0", "-i", "2", "-c", "1", "-r", "1"], &[]);
        }
    }
}

#[test]
fn every_algorithm_forced_by_env() {
    // (collective, algorithms it has): from devccl::algo::supported.
    let table: &[(&str, &[&str])] = &[
        ("all_reduce", &["ring", "tree", "halving_doubling", "recursive_doubling"]),
        ("reduce_scatter", &["ring", "halving_doubling", "direct"]),
        ("all_gather", &["ring", "recursive_doubling", "direct"]),
        ("broadcast", &["ring", "tree", "direct"]),
        ("reduce", &["ring", "tree", "direct"]),
        ("gather", &["direct", "tree"]),
        ("scatter", &["direct", "tree"]),
        ("all_to_all", &["direct"]),
        ("barrier", &["dissemination"]),
    ];
    for (coll, algos) in table {
        for algo in *algos {
            let spec = format!("{}:{algo}", coll.replace('_', ""));
            let text = bench(
                &[coll, "-n", "3", "--sizes", "4K,1M", "-w", "0", "-i", "1", "-c", "1", "-r", "2", "--explain"],
                &[("DEVCCL_ALGO", &spec), ("DEVCCL_CHUNK", "64K")],
            );
            let plans: Vec<&str> = text.lines().filter(|l| l.starts_with("#   plan:")).collect();
            assert!(!plans.is_empty(), "{text}");
            for p in plans {
                assert!(p.contains(&format!("plan: {algo} ")) && p.contains("forced"), "{coll} with {spec}: {p}");
            }
        }
    }
}

#[test]
fn an_unknown_forced_algorithm_is_a_clear_error() {
    let out = Command::new(DEVCCL)
        .args(["bench", "all_reduce", "-n", "2", "-b", "8", "-e", "8", "-c", "0", "-i", "1", "-w", "0"])
        .env("DEVCCL_ALGO", "allreduce:direct")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("all_reduce has no 'direct' algorithm"), "{err}");
}

#[test]
fn standalone_rendezvous_serves_a_job() {
    let port = free_port().to_string();
    let addr = format!("127.0.0.1:{port}");
    let mut server = Command::new(DEVCCL)
        .args(["rendezvous", "--listen", &addr, "--world", "3"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let res = finish(
        spawn(
            3,
            &[("WORKER_ITERS", "3"), ("DEVCCL_RENDEZVOUS", &addr), ("DEVCCL_RENDEZVOUS_EXTERNAL", "1")],
            |_| vec![],
        ),
        Duration::from_secs(60),
    );
    let _ = server.kill();
    let _ = server.wait();
    for (r, (ok, out, _)) in res.iter().enumerate() {
        assert!(*ok && out.contains("ok 3"), "rank {r}: {out}");
    }
}
