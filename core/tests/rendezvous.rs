//! The gRPC rendezvous end to end over loopback (IPv4 and IPv6), every wait bounded.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::{Arc, Mutex, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use devccl_core::Error;
use devccl_core::auth::AuthKey;
use devccl_core::bootstrap::{
    AbortEvent, HostIdentity, JoinRequest, PeerTable, RendezvousClient, RendezvousServer, ServerOptions, WORLD_GROUP,
};
use devccl_core::transport::{Endpoint, TransportKind};
use devccl_core::types::Rank;

fn secs(s: f64) -> Instant {
    Instant::now() + Duration::from_secs_f64(s)
}

fn server(listen: &str, opts: ServerOptions) -> (RendezvousServer, String) {
    let s = RendezvousServer::start(listen, opts).expect("start rendezvous server");
    let addr = s.local_addr().to_string();
    (s, addr)
}

fn opts(world: Option<usize>, key: Option<AuthKey>) -> ServerOptions {
    ServerOptions { world, key, group_timeout: Duration::from_secs(10) }
}

/// A distinct host identity per rank (same host, distinct fake pid) so messages can be checked.
fn host(rank: u32) -> HostIdentity {
    HostIdentity { pid: 10_000 + rank, ..HostIdentity::local() }
}

fn request(group: &str, rank: u32, world: usize) -> JoinRequest {
    JoinRequest {
        group: group.to_string(),
        rank: Rank(rank),
        world,
        host: host(rank),
        endpoints: vec![
            Endpoint {
                kind: TransportKind::Tcp,
                address: format!("127.0.0.1:{}", 40_000 + rank),
                caps: vec![("lanes".into(), "2".into())],
            },
            Endpoint { kind: TransportKind::Shm, address: format!("shm-{rank}"), caps: vec![] },
        ],
    }
}

/// Join on a new thread with its own client.
fn spawn_join(
    addr: &str,
    key: Option<AuthKey>,
    req: JoinRequest,
    deadline: Instant,
) -> thread::JoinHandle<Result<PeerTable, Error>> {
    let addr = addr.to_string();
    thread::spawn(move || RendezvousClient::connect(&addr, key, deadline)?.join(req, deadline))
}

fn ipv6_available() -> bool {
    std::net::TcpListener::bind("[::1]:0").is_ok()
}

fn check_tables(tables: &[PeerTable], group: &str, world: usize) {
    let first = &tables[0];
    assert_eq!(first.group, group);
    assert_eq!(first.world(), world);
    for t in tables {
        assert_eq!(t, first, "every member gets the same table");
    }
    for (i, p) in first.peers.iter().enumerate() {
        assert_eq!(p.rank, Rank(i as u32));
        assert_eq!(p.host, host(i as u32));
        assert_eq!(p.endpoints, request(group, i as u32, world).endpoints);
        assert_eq!(p.endpoints[0].cap("lanes"), Some("2"));
    }
}

fn four_ranks_on(listen: &str) {
    let (_server, addr) = server(listen, opts(Some(4), None));
    let deadline = secs(5.0);
    let joins: Vec<_> = (0..4).map(|r| spawn_join(&addr, None, request(WORLD_GROUP, r, 4), deadline)).collect();
    let tables: Vec<PeerTable> = joins.into_iter().map(|j| j.join().unwrap().expect("join")).collect();
    check_tables(&tables, WORLD_GROUP, 4);
}

#[test]
fn four_ranks_get_identical_tables_ipv4() {
    four_ranks_on("127.0.0.1:0");
}

#[test]
fn four_ranks_get_identical_tables_ipv6() {
    if !ipv6_available() {
        eprintln!("skipped: no IPv6 loopback here");
        return;
    }
    four_ranks_on("[::1]:0");
}

#[test]
fn a_shared_client_serves_several_ranks_and_comm_ids_differ_per_group_instance() {
    let (_server, addr) = server("127.0.0.1:0", opts(None, None));
    let client = RendezvousClient::connect(&addr, None, secs(3.0)).unwrap();
    let deadline = secs(5.0);
    let run = |group: &'static str| {
        let hs: Vec<_> = (0..3)
            .map(|r| {
                let c = client.clone();
                thread::spawn(move || c.join(request(group, r, 3), deadline))
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap().unwrap()).collect::<Vec<_>>()
    };
    let a = run("g");
    let b = run("g");
    check_tables(&a, "g", 3);
    check_tables(&b, "g", 3);
    assert_ne!(a[0].comm, b[0].comm, "a completed group frees its name; the next one gets a new id");
}

#[test]
fn client_started_before_the_server_still_joins() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let addr = format!("127.0.0.1:{port}");
    let deadline = secs(6.0);
    let joins: Vec<_> = (0..2).map(|r| spawn_join(&addr, None, request(WORLD_GROUP, r, 2), deadline)).collect();
    thread::sleep(Duration::from_millis(400));
    let _server = RendezvousServer::start(&addr, opts(Some(2), None)).expect("server on the chosen port");
    let tables: Vec<PeerTable> = joins.into_iter().map(|j| j.join().unwrap().expect("join after retry")).collect();
    check_tables(&tables, WORLD_GROUP, 2);
}

#[test]
fn connect_gives_up_at_the_deadline_naming_the_address() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let addr = format!("127.0.0.1:{port}");
    let t0 = Instant::now();
    let err = RendezvousClient::connect(&addr, None, secs(0.5)).unwrap_err();
    assert!(t0.elapsed() < Duration::from_secs(2));
    let msg = err.to_string();
    assert!(matches!(err, Error::Timeout { .. }), "{msg}");
    assert!(msg.contains(&addr), "{msg}");
}

#[test]
fn duplicate_rank_fails_both_duplicates_and_the_waiters() {
    let (_server, addr) = server("127.0.0.1:0", opts(None, None));
    let deadline = secs(5.0);
    let r0 = spawn_join(&addr, None, request("g", 0, 3), deadline);
    let r1 = spawn_join(&addr, None, request("g", 1, 3), deadline);
    thread::sleep(Duration::from_millis(300));
    let mut dup = request("g", 1, 3);
    dup.host.pid = 55_555;
    let d = spawn_join(&addr, None, dup, deadline);
    for (who, h) in [("rank 0", r0), ("rank 1", r1), ("duplicate", d)] {
        let err = h.join().unwrap().expect_err(who);
        let msg = err.to_string();
        assert!(matches!(err, Error::Remote { peer: Some(Rank(1)), .. }), "{who}: {msg}");
        assert!(msg.contains("rank 1 joined twice"), "{who}: {msg}");
        assert!(msg.contains("pid 10001") && msg.contains("pid 55555"), "{who} names both: {msg}");
        assert!(msg.contains("group 'g'") && msg.contains(&addr), "{who}: {msg}");
    }
    // Rank 2 arrives late: the group stays failed until it was told, then the name is free.
    let late = spawn_join(&addr, None, request("g", 2, 3), deadline).join().unwrap().unwrap_err();
    assert!(late.to_string().contains("rank 1 joined twice"), "{late}");
    let fresh: Vec<_> = (0..3).map(|r| spawn_join(&addr, None, request("g", r, 3), secs(5.0))).collect();
    let tables: Vec<_> = fresh.into_iter().map(|h| h.join().unwrap().expect("fresh group after reset")).collect();
    check_tables(&tables, "g", 3);
}

#[test]
fn world_size_disagreement_fails_everyone() {
    let (_server, addr) = server("127.0.0.1:0", opts(None, None));
    let deadline = secs(5.0);
    let r0 = spawn_join(&addr, None, request("g", 0, 2), deadline);
    thread::sleep(Duration::from_millis(300));
    let r3 = spawn_join(&addr, None, request("g", 3, 4), deadline);
    let want = format!(
        "rendezvous group 'g' at {addr}: rank 3 ({}) says world size 4 but the group was opened with world size 2 by rank 0 ({})",
        host(3),
        host(0)
    );
    for (who, h) in [("rank 0", r0), ("rank 3", r3)] {
        let err = h.join().unwrap().expect_err(who);
        assert!(matches!(err, Error::Remote { peer: Some(Rank(3)), .. }), "{who}: {err}");
        assert!(err.to_string().contains(&want), "{who}: {err}\nwant: {want}");
    }
}

#[test]
fn world_size_differing_from_the_servers_fails() {
    let (_server, addr) = server("127.0.0.1:0", opts(Some(2), None));
    let err = spawn_join(&addr, None, request(WORLD_GROUP, 0, 3), secs(5.0)).join().unwrap().unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("says world size 3 but the rendezvous server was started for world size 2"), "{msg}");
    // Other groups (splits) are not bound by --world.
    let t = spawn_join(&addr, None, request("split/x", 0, 1), secs(5.0)).join().unwrap().unwrap();
    assert_eq!(t.world(), 1);
}

#[test]
fn rank_out_of_range_fails_the_offender_as_usage_and_the_others() {
    let (_server, addr) = server("127.0.0.1:0", opts(None, None));
    let deadline = secs(5.0);
    let r0 = spawn_join(&addr, None, request("g", 0, 2), deadline);
    thread::sleep(Duration::from_millis(300));
    let bad = spawn_join(&addr, None, request("g", 2, 2), deadline).join().unwrap().unwrap_err();
    assert!(matches!(bad, Error::InvalidUsage(_)), "{bad}");
    assert!(bad.to_string().contains("rank 2"), "{bad}");
    let other = r0.join().unwrap().unwrap_err();
    assert!(matches!(other, Error::Remote { peer: Some(Rank(2)), .. }), "{other}");
    assert!(other.to_string().contains("ranks must be below the world size"), "{other}");
}

#[test]
fn wrong_secret_fails_the_offender_and_the_waiters() {
    let key = AuthKey::from_secret("right");
    let (_server, addr) = server("127.0.0.1:0", opts(None, Some(key.clone())));
    let deadline = secs(5.0);
    let r0 = spawn_join(&addr, Some(key.clone()), request(WORLD_GROUP, 0, 3), deadline);
    let r1 = spawn_join(&addr, Some(key.clone()), request(WORLD_GROUP, 1, 3), deadline);
    thread::sleep(Duration::from_millis(300));
    let bad = spawn_join(&addr, Some(AuthKey::from_secret("wrong")), request(WORLD_GROUP, 2, 3), deadline);
    let bad = bad.join().unwrap().unwrap_err();
    let msg = bad.to_string();
    assert!(msg.contains("DEVCCL_SECRET does not match"), "{msg}");
    assert!(msg.contains(&addr), "{msg}");
    for (who, h) in [("rank 0", r0), ("rank 1", r1)] {
        let msg = h.join().unwrap().unwrap_err().to_string();
        assert!(msg.contains("a process at 127.0.0.1:"), "{who}: {msg}");
        assert!(msg.contains("tried to join group 'world' as rank 2 with a wrong DEVCCL_SECRET"), "{who}: {msg}");
    }
}

#[test]
fn secret_on_one_side_only_is_a_mismatch() {
    // Server with a secret, client without.
    let (_s1, a1) = server("127.0.0.1:0", opts(None, Some(AuthKey::from_secret("s"))));
    let msg = spawn_join(&a1, None, request("g", 0, 1), secs(5.0)).join().unwrap().unwrap_err().to_string();
    assert!(msg.contains("requires DEVCCL_SECRET but this process has none set (secret mismatch)"), "{msg}");
    // Client with a secret, server without.
    let (_s2, a2) = server("127.0.0.1:0", opts(None, None));
    let msg = spawn_join(&a2, Some(AuthKey::from_secret("s")), request("g", 0, 1), secs(5.0))
        .join()
        .unwrap()
        .unwrap_err()
        .to_string();
    assert!(msg.contains("has DEVCCL_SECRET set but the rendezvous server has none (secret mismatch)"), "{msg}");
    // Matching secrets work.
    let key = AuthKey::from_secret("s");
    let (_s3, a3) = server("127.0.0.1:0", opts(None, Some(key.clone())));
    let t = spawn_join(&a3, Some(key), request("g", 0, 1), secs(5.0)).join().unwrap().unwrap();
    assert_eq!(t.world(), 1);
}

#[test]
fn timeout_names_the_missing_rank_within_the_deadline() {
    let (_server, addr) = server("127.0.0.1:0", opts(None, None));
    let t0 = Instant::now();
    let deadline = secs(1.0);
    let joins: Vec<_> = (0..2).map(|r| spawn_join(&addr, None, request(WORLD_GROUP, r, 3), deadline)).collect();
    for h in joins {
        let err = h.join().unwrap().unwrap_err();
        assert!(Instant::now() <= deadline + Duration::from_millis(100), "answered by the deadline");
        let msg = err.to_string();
        assert!(matches!(err, Error::Timeout { .. }), "{msg}");
        assert!(
            msg.contains(&format!("rendezvous group 'world' at {addr}: 2 of 3 ranks joined; missing ranks [2]")),
            "{msg}"
        );
    }
    assert!(t0.elapsed() >= Duration::from_millis(700), "not before the deadline");
}

#[test]
fn server_group_timeout_fails_everyone_waiting() {
    let (_server, addr) =
        server("127.0.0.1:0", ServerOptions { world: None, key: None, group_timeout: Duration::from_millis(600) });
    let t0 = Instant::now();
    let joins: Vec<_> = (0..2).map(|r| spawn_join(&addr, None, request("g", r * 2, 4), secs(10.0))).collect();
    for h in joins {
        let msg = h.join().unwrap().unwrap_err().to_string();
        assert!(msg.contains("2 of 4 ranks joined; missing ranks [1, 3]"), "{msg}");
        assert!(msg.contains("group timeout"), "{msg}");
    }
    assert!(t0.elapsed() < Duration::from_secs(3));
}

#[test]
fn a_rank_that_gave_up_may_join_again() {
    let (_server, addr) = server("127.0.0.1:0", opts(None, None));
    let err = spawn_join(&addr, None, request("g", 0, 2), secs(0.4)).join().unwrap().unwrap_err();
    assert!(matches!(err, Error::Timeout { .. }), "{err}");
    let deadline = secs(5.0);
    let joins: Vec<_> = (0..2).map(|r| spawn_join(&addr, None, request("g", r, 2), deadline)).collect();
    let tables: Vec<_> = joins.into_iter().map(|h| h.join().unwrap().expect("not a duplicate")).collect();
    check_tables(&tables, "g", 2);
}

fn form(addr: &str, group: &str, world: usize) -> Vec<(RendezvousClient, PeerTable)> {
    let deadline = secs(5.0);
    let hs: Vec<_> = (0..world as u32)
        .map(|r| {
            let addr = addr.to_string();
            let group = group.to_string();
            thread::spawn(move || {
                let c = RendezvousClient::connect(&addr, None, deadline).unwrap();
                let t = c.join(request(&group, r, world), deadline).unwrap();
                (c, t)
            })
        })
        .collect();
    hs.into_iter().map(|h| h.join().unwrap()).collect()
}

#[test]
fn abort_from_rank_1_reaches_every_watcher_within_a_second() {
    let (_server, addr) = server("127.0.0.1:0", opts(Some(3), None));
    let members = form(&addr, WORLD_GROUP, 3);
    let comm = members[0].1.comm;
    let (tx, rx) = mpsc::channel::<(u32, AbortEvent)>();
    let calls = Arc::new(Mutex::new(0u32));
    let watches: Vec<_> = members
        .iter()
        .enumerate()
        .map(|(r, (c, _))| {
            let tx = Mutex::new(tx.clone());
            let calls = Arc::clone(&calls);
            c.watch(
                comm,
                Rank(r as u32),
                Box::new(move |ev| {
                    *calls.lock().unwrap() += 1;
                    let _ = tx.lock().unwrap().send((r as u32, ev));
                }),
            )
            .unwrap()
        })
        .collect();
    let t0 = Instant::now();
    members[1].0.abort(comm, Rank(1), "rank 1 lost its GPU").unwrap();
    let mut seen = Vec::new();
    while seen.len() < 3 {
        let (r, ev) = rx.recv_timeout(Duration::from_secs(1).saturating_sub(t0.elapsed())).expect("abort within 1 s");
        assert_eq!(ev, AbortEvent { comm, from: Rank(1), reason: "rank 1 lost its GPU".into() });
        seen.push(r);
    }
    seen.sort();
    assert_eq!(seen, vec![0, 1, 2]);
    // A second abort does not call anyone again; a late watcher is told at once.
    members[2].0.abort(comm, Rank(2), "again").unwrap();
    let late = members[0]
        .0
        .watch(
            comm,
            Rank(0),
            Box::new(move |ev| {
                let _ = tx.send((9, ev));
            }),
        )
        .unwrap();
    let (r, ev) = rx.recv_timeout(Duration::from_secs(1)).expect("late watcher told");
    assert_eq!((r, ev.from, ev.reason.as_str()), (9, Rank(1), "rank 1 lost its GPU"));
    assert!(rx.recv_timeout(Duration::from_millis(200)).is_err(), "on_abort at most once");
    assert_eq!(*calls.lock().unwrap(), 3);
    drop((watches, late));
}

#[test]
fn leave_forgets_the_comm_and_ends_watches_silently() {
    let (_server, addr) = server("127.0.0.1:0", opts(None, None));
    let members = form(&addr, "g", 2);
    let comm = members[0].1.comm;
    let fired = Arc::new(Mutex::new(false));
    let f = Arc::clone(&fired);
    let w = members[0].0.watch(comm, Rank(0), Box::new(move |_| *f.lock().unwrap() = true)).unwrap();
    assert!(w.is_active());
    for (r, (c, _)) in members.iter().enumerate() {
        c.leave(comm, Rank(r as u32)).unwrap();
    }
    members[0].0.leave(comm, Rank(0)).expect("leaving twice is fine");
    let t0 = Instant::now();
    while w.is_active() && t0.elapsed() < Duration::from_secs(2) {
        thread::sleep(Duration::from_millis(10));
    }
    assert!(!w.is_active(), "watch ended when the communicator was forgotten");
    assert!(!*fired.lock().unwrap());
    let err = members[0].0.abort(comm, Rank(0), "late").unwrap_err();
    assert!(err.to_string().contains("unknown"), "{err}");
    assert!(members[0].0.watch(comm, Rank(0), Box::new(|_| {})).is_err());
}

#[test]
fn watch_ends_silently_when_the_server_goes_away_and_waiters_fail_promptly() {
    let (server, addr) = server("127.0.0.1:0", opts(None, None));
    let members = form(&addr, "g", 1);
    let comm = members[0].1.comm;
    let w = members[0].0.watch(comm, Rank(0), Box::new(|_| panic!("no abort happened"))).unwrap();
    let waiter = spawn_join(&addr, None, request("h", 0, 2), secs(10.0));
    thread::sleep(Duration::from_millis(300));
    let t0 = Instant::now();
    server.shutdown();
    let err = waiter.join().unwrap().unwrap_err();
    assert!(err.to_string().contains("shutting down"), "{err}");
    while w.is_active() && t0.elapsed() < Duration::from_secs(3) {
        thread::sleep(Duration::from_millis(10));
    }
    assert!(!w.is_active());
    assert!(t0.elapsed() < Duration::from_secs(3));
}

#[test]
fn two_groups_form_concurrently_on_one_server() {
    let (_server, addr) = server("127.0.0.1:0", opts(Some(4), None));
    let deadline = secs(5.0);
    let world: Vec<_> = (0..4).map(|r| spawn_join(&addr, None, request(WORLD_GROUP, r, 4), deadline)).collect();
    let split: Vec<_> = (0..2).map(|r| spawn_join(&addr, None, request("split/x", r, 2), deadline)).collect();
    let w: Vec<_> = world.into_iter().map(|h| h.join().unwrap().unwrap()).collect();
    let s: Vec<_> = split.into_iter().map(|h| h.join().unwrap().unwrap()).collect();
    check_tables(&w, WORLD_GROUP, 4);
    check_tables(&s, "split/x", 2);
    assert_ne!(w[0].comm, s[0].comm);
}

#[test]
fn garbage_on_the_port_leaves_the_server_working() {
    let (_server, addr) = server("127.0.0.1:0", opts(None, None));
    // Random bytes.
    let mut s = TcpStream::connect(&addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let _ = s.write_all(&[0xde, 0xad, 0xbe, 0xef, 0, 1, 2, 3, 0xff, 0xfe, 0x80, 0x7f].repeat(100));
    let mut buf = [0u8; 512];
    let _ = s.read(&mut buf);
    drop(s);
    // An HTTP/1.1 request.
    let mut s = TcpStream::connect(&addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let _ = s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    let _ = s.read(&mut buf);
    drop(s);
    // A connection that sends nothing and stays open.
    let idle = TcpStream::connect(&addr).unwrap();
    // A half-written HTTP/2 preface followed by a hang-up.
    let mut s = TcpStream::connect(&addr).unwrap();
    let _ = s.write_all(b"PRI * HTTP/2.0\r\n");
    drop(s);
    let tables: Vec<_> = (0..2)
        .map(|r| spawn_join(&addr, None, request("g", r, 2), secs(5.0)))
        .collect::<Vec<_>>()
        .into_iter()
        .map(|h| h.join().unwrap().expect("server still works"))
        .collect();
    check_tables(&tables, "g", 2);
    drop(idle);
}

#[test]
fn bad_listen_addresses_and_busy_ports_are_clear_errors() {
    let err = RendezvousServer::start("not-an-address", opts(None, None)).unwrap_err();
    assert!(matches!(err, Error::InvalidUsage(_)), "{err}");
    let (_s, addr) = server("127.0.0.1:0", opts(None, None));
    let err = RendezvousServer::start(&addr, opts(None, None)).unwrap_err();
    assert!(matches!(err, Error::System { .. }), "{err}");
    assert!(err.to_string().contains(&addr), "{err}");
}

#[test]
fn calls_from_async_code_do_not_panic() {
    let (_server, addr) = server("127.0.0.1:0", opts(None, None));
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let table = rt.block_on(async move {
        let c = RendezvousClient::connect(&addr, None, secs(3.0)).unwrap();
        c.join(request("g", 0, 1), secs(3.0)).unwrap()
    });
    assert_eq!(table.world(), 1);
}
