//! The transport conformance suite on every transport, and hostile peers on
//! the TCP transport's port.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use falcon::consensus::{Envelope, Message, message};
use falcon::transport::conformance::{CLUSTER, collect, env, number, prepare};
use falcon::transport::tcp::{TcpOptions, TcpTransport};
use falcon::transport::tls::{TlsContext, TlsFiles};
use falcon::transport::{Transport, TransportEvent};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::sync::Arc;

const KEY: &[u8] = b"0123456789abcdef0123456789abcdef";

fn free_addrs(n: u32) -> Vec<SocketAddr> {
    let ls: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    ls.iter().map(|l| l.local_addr().unwrap()).collect()
}

/// Replica `id` of the cluster at `addrs`, its options as `tweak` sets them.
fn tcp_node(
    addrs: &[SocketAddr],
    id: u32,
    key: &[u8],
    tweak: impl FnOnce(&mut TcpOptions),
) -> TcpTransport {
    let mut o = TcpOptions::new(CLUSTER, id, addrs.to_vec(), key.to_vec());
    tweak(&mut o);
    TcpTransport::bind(o).unwrap()
}

fn tcp_cluster_with(n: u32, key_of: impl Fn(u32) -> Vec<u8>) -> Vec<TcpTransport> {
    let addrs = free_addrs(n);
    (0..n)
        .map(|id| {
            tcp_node(&addrs, id, &key_of(id), |o| {
                o.queue_bytes_max = 16 << 20;
                o.handshake_timeout = Duration::from_millis(300);
            })
        })
        .collect()
}

/// `real` endpoints of a cluster of `total` replicas (the others never run:
/// hostile tests pose as them).
fn tcp_cluster_part(real: u32, total: u32) -> Vec<TcpTransport> {
    let addrs = free_addrs(total);
    (0..real)
        .map(|id| {
            tcp_node(&addrs, id, KEY, |o| {
                o.handshake_timeout = Duration::from_millis(300)
            })
        })
        .collect()
}

fn tcp_cluster(n: u32) -> Vec<TcpTransport> {
    tcp_cluster_with(n, |_| KEY.to_vec())
}

mod mem {
    fn make(n: u32) -> Vec<falcon::transport::mem::MemTransport> {
        falcon::transport::mem::network(n, 1024)
    }
    falcon::transport_conformance_tests!(make);
}

mod tcp {
    falcon::transport_conformance_tests!(super::tcp_cluster);
}

/// A CA and certificates for replicas 1..=3 on 127.0.0.1, made by
/// scripts/tls-certs.sh (the operator's tool) in a fresh directory.
fn make_certs() -> std::path::PathBuf {
    make_certs_for(&["127.0.0.1"; 3])
}

/// A CA and a certificate for replica `i + 1` naming `ips[i]`.
fn make_certs_for(ips: &[&str]) -> std::path::PathBuf {
    let dir = tempfile::tempdir().unwrap().keep();
    let mut toml = String::from("cluster = \"tls-test\"\n");
    for (i, ip) in ips.iter().enumerate() {
        let id = i + 1;
        toml += &format!(
            "[[replica]]\nid = {id}\npeer = \"{ip}:{}\"\nclient = \"127.0.0.1:{}\"\napp = \"127.0.0.1:{}\"\ndata_dir = \"d{id}\"\n",
            7100 + id,
            7200 + id,
            7000 + id
        );
    }
    std::fs::write(dir.join("cluster.toml"), toml).unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/tls-certs.sh");
    let out = std::process::Command::new("bash")
        .arg(script)
        .arg("--config")
        .arg(dir.join("cluster.toml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "tls-certs.sh: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    dir.join("tls")
}

/// Certificates shared by this test binary (one CA).
fn certs() -> &'static std::path::Path {
    static DIR: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(make_certs)
}

fn tls_context(dir: &std::path::Path, replica: u32) -> Arc<TlsContext> {
    tls_context_at(dir, replica, [127, 0, 0, 1].into())
}

fn tls_context_at(dir: &std::path::Path, replica: u32, ip: std::net::IpAddr) -> Arc<TlsContext> {
    Arc::new(
        TlsContext::load(
            &TlsFiles {
                cert: dir.join(format!("replica-{replica}.pem")),
                key: dir.join(format!("replica-{replica}.key")),
                ca: dir.join("ca.pem"),
            },
            ip,
        )
        .unwrap(),
    )
}

/// A TLS cluster; `tls_of(id)` gives each endpoint's TLS (None: plain TCP).
fn tls_cluster_with(n: u32, tls_of: impl Fn(u32) -> Option<Arc<TlsContext>>) -> Vec<TcpTransport> {
    let addrs = free_addrs(n);
    (0..n)
        .map(|id| {
            let mut o = TcpOptions::new(CLUSTER, id, addrs.clone(), KEY.to_vec());
            o.queue_bytes_max = 16 << 20;
            o.handshake_timeout = Duration::from_millis(300);
            o.tls = tls_of(id);
            TcpTransport::bind(o).unwrap()
        })
        .collect()
}

fn tls_cluster(n: u32) -> Vec<TcpTransport> {
    tls_cluster_with(n, |id| Some(tls_context(certs(), id % 3 + 1)))
}

/// The whole suite again with mutual TLS on every link.
mod tcp_tls {
    falcon::transport_conformance_tests!(super::tls_cluster);
}

/// `n` shm endpoints in a fresh directory (each removes its files when dropped).
fn shm_cluster(n: u32) -> Vec<falcon::transport::shm::ShmTransport> {
    use falcon::transport::shm::{ShmOptions, ShmTransport};
    // A directory bind makes itself (mode 0700), inside a fresh temporary one.
    let dir = tempfile::tempdir().unwrap().keep().join("rings");
    (0..n)
        .map(|id| {
            let mut o = ShmOptions::new(CLUSTER, id, n, dir.clone());
            o.ring_bytes = 16 << 20;
            ShmTransport::bind(o).unwrap()
        })
        .collect()
}

mod shm {
    falcon::transport_conformance_tests!(super::shm_cluster);
}

/// Runs both endpoints for `d`, returning what each received and the events.
fn pump(ts: &mut [TcpTransport], d: Duration) -> (Vec<Vec<Envelope>>, Vec<TransportEvent>) {
    let mut got = vec![Vec::new(); ts.len()];
    let mut evs = Vec::new();
    let end = Instant::now() + d;
    while Instant::now() < end {
        for (i, t) in ts.iter_mut().enumerate() {
            t.recv(Duration::from_millis(2), &mut got[i]).unwrap();
            evs.extend(t.events());
        }
    }
    (got, evs)
}

#[test]
fn a_peer_with_the_wrong_key_is_refused_and_nothing_it_sends_arrives() {
    let mut ts = tcp_cluster_with(3, |id| {
        if id == 2 {
            b"another key, also 32 bytes long!".to_vec()
        } else {
            KEY.to_vec()
        }
    });
    ts[2].send(&env(2, 0, 1)).unwrap();
    ts[0].send(&env(0, 1, 2)).unwrap();
    let (got, evs) = pump(&mut ts, Duration::from_millis(600));
    assert!(
        got[0].is_empty(),
        "a message from a peer with another key arrived: {:?}",
        got[0]
    );
    assert_eq!(got[1].len(), 1, "good peers still talk");
    let refusals: Vec<&String> = evs
        .iter()
        .filter_map(|e| match e {
            TransportEvent::Refused { reason, .. } => Some(reason),
            _ => None,
        })
        .collect();
    assert!(refusals.iter().any(|r| r.contains("key")), "{evs:?}");
}

fn hello(cluster: u64, from: u32, to: u32) -> Vec<u8> {
    let mut h = b"FALCONP1".to_vec();
    h.extend_from_slice(&cluster.to_le_bytes());
    h.extend_from_slice(&from.to_le_bytes());
    h.extend_from_slice(&to.to_le_bytes());
    h.extend_from_slice(&[9u8; 16]);
    h
}

/// Dials `addr` as replica `from` with `key` and completes the handshake.
fn handshake(addr: SocketAddr, from: u32, to: u32, key: &[u8]) -> TcpStream {
    handshake_recorded(addr, from, to, key).0
}

/// As [`handshake`], and every byte the dialer sent (a recording of it).
fn handshake_recorded(addr: SocketAddr, from: u32, to: u32, key: &[u8]) -> (TcpStream, Vec<u8>) {
    let mut s = TcpStream::connect(addr).unwrap();
    let mut sent = hello(CLUSTER, from, to);
    s.write_all(&sent).unwrap();
    let mut ch = [0u8; 48];
    s.read_exact(&mut ch).unwrap();
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(key).unwrap();
    m.update(b"dialer");
    m.update(&CLUSTER.to_le_bytes());
    m.update(&from.to_le_bytes());
    m.update(&to.to_le_bytes());
    m.update(&[9u8; 16]);
    m.update(&ch[..16]);
    let auth = m.finalize().into_bytes();
    s.write_all(&auth).unwrap();
    sent.extend_from_slice(&auth);
    (s, sent)
}

/// A handshake recorded off the wire and replayed on a new connection is
/// refused: the listener's challenge is new every time, so the recorded
/// answer does not match it, and the message behind it never arrives.
#[test]
fn a_recorded_handshake_replayed_later_is_refused() {
    let mut ts = tcp_cluster_part(1, 3);
    let addr = ts[0].local_addr().unwrap();
    let msg = message::to_bytes(&env(1, 0, 7));
    let mut frame = (msg.len() as u32).to_le_bytes().to_vec();
    frame.extend_from_slice(&msg);
    // The genuine exchange; the recording is every byte the dialer sent.
    let genuine = {
        let frame = frame.clone();
        std::thread::spawn(move || {
            let (mut s, mut sent) = handshake_recorded(addr, 1, 0, KEY);
            s.write_all(&frame).unwrap();
            sent.extend_from_slice(&frame);
            std::thread::sleep(Duration::from_millis(300));
            (s, sent)
        })
    };
    let (got, _) = pump(&mut ts, Duration::from_millis(400));
    let (_open, recording) = genuine.join().unwrap();
    assert_eq!(got[0].iter().map(number).collect::<Vec<_>>(), vec![7]);
    // The replay: the recording, byte for byte, on a new connection.
    let replay = std::thread::spawn(move || {
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(&recording).unwrap();
        std::thread::sleep(Duration::from_millis(300));
        s
    });
    let (got, evs) = pump(&mut ts, Duration::from_millis(400));
    let _s = replay.join().unwrap();
    assert!(
        got[0].is_empty(),
        "the replayed connection delivered {:?}",
        got[0]
    );
    assert!(
        evs.iter().any(
            |e| matches!(e, TransportEvent::Refused { reason, .. } if reason.contains("failed authentication"))
        ),
        "{evs:?}"
    );
}

#[test]
fn hostile_bytes_on_the_peer_port_are_refused_and_the_cluster_keeps_talking() {
    // Replicas 3, 4 and 5 exist in the cluster but do not run: the hostile
    // peers below hold the key and pose as them.
    let mut ts = tcp_cluster_part(3, 6);
    let addr = ts[0].local_addr().unwrap();
    // Garbage.
    let mut g = TcpStream::connect(addr).unwrap();
    g.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    // Another cluster.
    let mut other = TcpStream::connect(addr).unwrap();
    other.write_all(&hello(CLUSTER + 1, 1, 0)).unwrap();
    // Impossible ids.
    let mut ids = TcpStream::connect(addr).unwrap();
    ids.write_all(&hello(CLUSTER, 9, 0)).unwrap();
    // Slow loris: connects and says nothing.
    let _quiet = TcpStream::connect(addr).unwrap();
    let (early, early_evs) = pump(&mut ts, Duration::from_millis(100));
    assert!(early[0].is_empty());
    // Authenticated peers that then misbehave; they run on another thread
    // because the handshake needs the endpoint to be polled.
    let hostile = std::thread::spawn(move || {
        // A huge length prefix.
        let mut huge = handshake(addr, 3, 0, KEY);
        huge.write_all(&u32::MAX.to_le_bytes()).unwrap();
        // A message claiming to come from someone else.
        let mut liar = handshake(addr, 4, 0, KEY);
        let forged = message::to_bytes(&env(1, 0, 99));
        liar.write_all(&(forged.len() as u32).to_le_bytes())
            .unwrap();
        liar.write_all(&forged).unwrap();
        // Garbage in a frame.
        let mut bad = handshake(addr, 5, 0, KEY);
        bad.write_all(&5u32.to_le_bytes()).unwrap();
        bad.write_all(b"\xff\xff\xff\xff\xff").unwrap();
        std::thread::sleep(Duration::from_millis(600));
        (huge, liar, bad)
    });
    let (got, mut evs) = pump(&mut ts, Duration::from_millis(800));
    evs.extend(early_evs);
    let _keep_open = hostile.join().unwrap();
    assert!(
        got[0].is_empty(),
        "hostile bytes reached the engine: {:?}",
        got[0]
    );
    let reasons: Vec<String> = evs
        .iter()
        .filter_map(|e| match e {
            TransportEvent::Refused { reason, .. } | TransportEvent::Lost { reason, .. } => {
                Some(reason.clone())
            }
            _ => None,
        })
        .collect();
    for want in [
        "bad greeting",
        "another cluster",
        "impossible replica ids",
        "did not finish the handshake",
        "frame of 4294967295 bytes",
        "addressed as 1 → 0",
        "malformed message",
    ] {
        assert!(
            reasons.iter().any(|r| r.contains(want)),
            "no refusal saying {want:?}: {reasons:?}"
        );
    }
    // The real peers still talk both ways.
    ts[1].send(&env(1, 0, 5)).unwrap();
    ts[0].send(&env(0, 2, 6)).unwrap();
    // Sends only queue: the sender writes when it flushes.
    ts[1].flush();
    let got = collect(&mut ts[0], &mut [], 1, Duration::from_secs(5));
    assert_eq!(got, vec![env(1, 0, 5)]);
}

#[test]
fn a_restarted_peer_is_dialled_again() {
    let addrs = free_addrs(3);
    let mk = |id| {
        tcp_node(&addrs, id, KEY, |o| {
            o.reconnect_max = Duration::from_millis(100)
        })
    };
    let mut a = mk(0);
    let mut b = mk(1);
    a.send(&env(0, 1, 1)).unwrap();
    assert_eq!(
        collect(&mut b, &mut [&mut a], 1, Duration::from_secs(5)).len(),
        1
    );
    drop(b);
    // Messages sent while it is down may be lost; once it is back, new ones arrive.
    let mut b = mk(1);
    let got = send_until_received(&mut a, &mut b, 2);
    assert!(!got.is_empty(), "no message after the peer restarted");
}

/// Strangers that connect to the peer port and say nothing hold a place
/// each (64 at most) only until the places run out: then the oldest
/// handshake not finished makes room, so they cannot keep a real peer out
/// for the whole handshake timeout (a minute here).
#[test]
fn strangers_holding_every_place_do_not_keep_a_peer_out() {
    let addrs = free_addrs(2);
    let mk = |id| {
        tcp_node(&addrs, id, KEY, |o| {
            o.handshake_timeout = Duration::from_secs(60);
            o.reconnect_max = Duration::from_millis(100);
        })
    };
    let strangers = |addr: SocketAddr| -> Vec<TcpStream> {
        (0..80).map(|_| TcpStream::connect(addr).unwrap()).collect()
    };
    // Each listener has its strangers waiting before the other replica
    // first dials it.
    let mut b = mk(1);
    let at_b = strangers(addrs[1]);
    let mut a = mk(0);
    let at_a = strangers(addrs[0]);
    let got = send_until_received(&mut a, &mut b, 1);
    assert!(
        !got.is_empty(),
        "no message within 10 s while strangers held the peer ports"
    );
    drop((at_a, at_b));
}

/// `a` sends numbered messages to `b` from `op` on, one per 10 ms, until `b`
/// has received something (or 10 s passed): what `b` received.
fn send_until_received(a: &mut TcpTransport, b: &mut TcpTransport, mut op: u64) -> Vec<Envelope> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut got = Vec::new();
    while got.is_empty() && Instant::now() < deadline {
        let _ = a.send(&env(0, 1, op));
        op += 1;
        let mut sink = Vec::new();
        a.recv(Duration::from_millis(10), &mut sink).unwrap();
        b.recv(Duration::from_millis(10), &mut got).unwrap();
    }
    got
}

/// A peer that died before its link first came up gets no backlog when it
/// returns: what was sent while the dial kept failing is dropped, not queued
/// (the engine retransmits what matters; a stale backlog would replay
/// everything since it left, even entries a snapshot replaced).
#[test]
fn a_peer_that_never_came_up_gets_no_backlog_when_it_starts() {
    let addrs = free_addrs(2);
    let mk = |id| {
        tcp_node(&addrs, id, KEY, |o| {
            o.reconnect_min = Duration::from_millis(10);
            o.reconnect_max = Duration::from_millis(50);
            o.connect_grace = Duration::from_millis(100);
        })
    };
    let mut a = mk(0);
    // Nobody listens on 1's address: the dials fail while a sends (past the grace).
    for op in 1..=200 {
        let _ = a.send(&env(0, 1, op));
        let mut sink = Vec::new();
        a.recv(Duration::from_millis(2), &mut sink).unwrap();
    }
    let mut b = mk(1);
    let got = send_until_received(&mut a, &mut b, 1000);
    assert!(!got.is_empty(), "no message after the peer started");
    let stale: Vec<u64> = got.iter().map(number).filter(|&n| n < 1000).collect();
    assert!(
        stale.is_empty(),
        "the peer received messages sent while it was unreachable: {stale:?}"
    );
}

// ---- shm between real processes: this test binary runs again as the peer ----

/// The peer side, run in a child process by the tests below (ignored when run
/// directly). FALCON_SHM_DIR: the ring directory; FALCON_SHM_ROLE: `echo`
/// (node 1: answers every message to node 0, sleeping FALCON_SHM_SLOW_MS
/// before it starts reading) or `send` (node 1: sends FALCON_SHM_COUNT
/// messages to node 0, numbered from FALCON_SHM_FROM, then waits to be killed)
/// or `lead` (node FALCON_SHM_ID of FALCON_SHM_N: a leader of view
/// FALCON_SHM_VIEW that sends one Prepare after another to node 0 until it
/// is killed, and writes how many node 0 refused to FALCON_SHM_DIR/revoked).
#[test]
#[ignore = "a helper: runs as the peer process of the shm process tests"]
fn shm_peer_process() {
    use falcon::transport::shm::{ShmOptions, ShmTransport};
    let Some(dir) = std::env::var_os("FALCON_SHM_DIR") else {
        return;
    };
    let num = |k: &str| -> u64 {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let dir = std::path::PathBuf::from(dir);
    let (id, n) = (num("FALCON_SHM_ID").max(1), num("FALCON_SHM_N").max(2));
    let mut o = ShmOptions::new(CLUSTER, id as u32, n as u32, dir.join("rings"));
    o.ring_bytes = 64 << 10;
    let mut t = ShmTransport::bind(o).unwrap();
    let role = std::env::var("FALCON_SHM_ROLE").unwrap_or_default();
    std::fs::write(std::env::var("FALCON_SHM_READY").unwrap(), b"up").unwrap();
    if role == "lead" {
        let view = num("FALCON_SHM_VIEW");
        let (mut op, mut revoked) = (1, 0u64);
        loop {
            match t.send(&prepare(id as u32, 0, view, op)) {
                Ok(()) => op += 1,
                Err(falcon::transport::SendError::Revoked(0)) => {
                    revoked += 1;
                    // Whole or not at all: the test may read it any time.
                    std::fs::write(dir.join("revoked.tmp"), revoked.to_string()).unwrap();
                    std::fs::rename(dir.join("revoked.tmp"), dir.join("revoked")).unwrap();
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(_) => {}
            }
            let mut sink = Vec::new();
            t.recv(Duration::ZERO, &mut sink).unwrap();
        }
    }
    if role == "send" {
        let from = num("FALCON_SHM_FROM");
        let mut op = from;
        while op < from + num("FALCON_SHM_COUNT") {
            if t.send(&env(1, 0, op)).is_ok() {
                op += 1;
            }
            let mut sink = Vec::new();
            t.recv(Duration::from_millis(1), &mut sink).unwrap();
        }
        t.flush();
        loop {
            std::thread::sleep(Duration::from_secs(1));
        }
    }
    std::thread::sleep(Duration::from_millis(num("FALCON_SHM_SLOW_MS")));
    let mut inbox = Vec::new();
    let mut pending = std::collections::VecDeque::new();
    loop {
        let wait = if pending.is_empty() { 50 } else { 1 };
        t.recv(Duration::from_millis(wait), &mut inbox).unwrap();
        pending.extend(inbox.drain(..).map(|e| number(&e)));
        // Echo in order; what does not fit waits for node 0 to read.
        while let Some(&op) = pending.front() {
            if t.send(&env(1, 0, op)).is_err() {
                break;
            }
            pending.pop_front();
        }
        t.flush();
    }
}

struct Peer(std::process::Child);

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn shm_peer(dir: &std::path::Path, vars: &[(&str, String)]) -> Peer {
    let _ = std::fs::remove_file(dir.join("ready"));
    let mut c = std::process::Command::new(std::env::current_exe().unwrap());
    c.args(["--exact", "shm_peer_process", "--ignored", "--nocapture"])
        .env("FALCON_SHM_DIR", dir)
        .env("FALCON_SHM_READY", dir.join("ready"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    for (k, v) in vars {
        c.env(k, v);
    }
    let p = Peer(c.spawn().unwrap());
    let start = Instant::now();
    while !dir.join("ready").exists() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the peer process did not start"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    p
}

fn shm_node0(dir: &std::path::Path) -> falcon::transport::shm::ShmTransport {
    shm_node(dir, 0, 2)
}

fn shm_node(dir: &std::path::Path, id: u32, n: u32) -> falcon::transport::shm::ShmTransport {
    use falcon::transport::shm::{ShmOptions, ShmTransport};
    let mut o = ShmOptions::new(CLUSTER, id, n, dir.join("rings"));
    o.ring_bytes = 64 << 10;
    ShmTransport::bind(o).unwrap()
}

/// (view, op_start) of the Prepares in `got`, which must hold nothing else.
fn prepares(got: &[Envelope]) -> Vec<(u64, u64)> {
    got.iter()
        .map(|e| match &e.msg {
            Message::Prepare { view, op_start, .. } => (*view, *op_start),
            m => panic!("unexpected {m:?}"),
        })
        .collect()
}

#[test]
fn shm_a_revoked_writer_cannot_write_a_followers_log() {
    use falcon::transport::SendError;
    let dir = tempfile::tempdir().unwrap();
    let mut ts: Vec<_> = (0..3).map(|i| shm_node(dir.path(), i, 3)).collect();
    let mut got = Vec::new();
    // Replica 1 follows view 1, led by replica 0.
    ts[1].grant(1, Some(0));
    ts[0].send(&prepare(0, 1, 1, 1)).unwrap();
    // A write of view 1 that is in the ring when replica 1 moves on…
    ts[0].send(&prepare(0, 1, 1, 2)).unwrap();
    ts[0].flush();
    ts[1].recv(Duration::from_millis(50), &mut got).unwrap();
    assert_eq!(prepares(&got), vec![(1, 1), (1, 2)]);
    ts[0].send(&prepare(0, 1, 1, 3)).unwrap();
    ts[0].flush();
    // …is dropped by the reader: replica 1 now follows view 2, led by 2.
    ts[1].grant(2, Some(2));
    got.clear();
    ts[1].recv(Duration::from_millis(50), &mut got).unwrap();
    assert!(got.is_empty(), "a revoked write arrived: {got:?}");
    assert_eq!(ts[1].revoked(), 1);
    // The deposed leader's next writes are refused before they touch the ring,
    // and so are a stranger's in the new view; the new leader's arrive.
    assert_eq!(ts[0].send(&prepare(0, 1, 1, 3)), Err(SendError::Revoked(1)));
    assert_eq!(ts[0].send(&prepare(0, 1, 2, 3)), Err(SendError::Revoked(1)));
    assert_eq!(ts[0].revoked(), 2);
    ts[2].send(&prepare(2, 1, 2, 3)).unwrap();
    // Messages that are not log writes still pass (a view change needs them).
    ts[0].send(&env(0, 1, 77)).unwrap();
    ts[0].flush();
    ts[2].flush();
    let deadline = Instant::now() + Duration::from_secs(5);
    while got.len() < 2 && Instant::now() < deadline {
        ts[1].recv(Duration::from_millis(10), &mut got).unwrap();
    }
    let mut seen: Vec<String> = got
        .iter()
        .map(|e| format!("{} {}", e.from, e.msg.name()))
        .collect();
    seen.sort();
    assert_eq!(seen, vec!["0 missing", "2 prepare"]);
    let evs = ts[0].events();
    assert!(
        evs.iter().any(
            |e| matches!(e, TransportEvent::Lost { peer: 1, reason } if reason.contains("view 2"))
        ),
        "{evs:?}"
    );
}

#[test]
fn shm_a_crashed_leader_is_fenced_off_when_it_comes_back() {
    let dir = tempfile::tempdir().unwrap();
    let mut follower = shm_node(dir.path(), 0, 3);
    let mut new_leader = shm_node(dir.path(), 2, 3);
    follower.grant(1, Some(1));
    let lead = |view: u64| {
        vec![
            ("FALCON_SHM_ROLE", "lead".to_string()),
            ("FALCON_SHM_ID", "1".to_string()),
            ("FALCON_SHM_N", "3".to_string()),
            ("FALCON_SHM_VIEW", view.to_string()),
        ]
    };
    let old = shm_peer(dir.path(), &lead(1));
    let mut got = Vec::new();
    let start = Instant::now();
    while got.len() < 2000 && start.elapsed() < Duration::from_secs(20) {
        follower.recv(Duration::from_millis(5), &mut got).unwrap();
    }
    drop(old); // SIGKILL in the middle of its stream
    follower.recv(Duration::from_millis(20), &mut got).unwrap();
    let before = prepares(&got);
    assert!(
        before.len() >= 2000,
        "only {} Prepares before the crash",
        before.len()
    );
    assert!(
        before
            .iter()
            .enumerate()
            .all(|(i, &(v, op))| v == 1 && op == i as u64 + 1),
        "the crashed leader's stream has a gap or a damaged record"
    );
    // View 2, led by replica 2; the old leader comes back still believing in view 1.
    follower.grant(2, Some(2));
    let _old = shm_peer(dir.path(), &lead(1));
    let start = Instant::now();
    while !dir.path().join("revoked").exists() && start.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(10));
    }
    new_leader.send(&prepare(2, 0, 2, 1)).unwrap();
    new_leader.flush();
    got.clear();
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(300) {
        follower.recv(Duration::from_millis(5), &mut got).unwrap();
    }
    assert_eq!(
        prepares(&got),
        vec![(2, 1)],
        "a write of view 1 got through"
    );
    let refused: u64 = std::fs::read_to_string(dir.path().join("revoked"))
        .expect("the restarted old leader was never refused")
        .parse()
        .unwrap();
    assert!(refused > 0);
}

fn ops(got: &[Envelope]) -> Vec<u64> {
    got.iter().map(number).collect()
}

#[test]
fn shm_a_slow_receiver_pushes_back_and_loses_nothing_it_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = shm_node0(dir.path());
    let _peer = shm_peer(dir.path(), &[("FALCON_SHM_SLOW_MS", "500".into())]);
    // 64 KiB of ring: a few thousand small messages fill it while the peer sleeps.
    let mut accepted = Vec::new();
    let mut full = false;
    let mut op = 1;
    let mut got = Vec::new();
    let start = Instant::now();
    while accepted.len() < 20_000 && start.elapsed() < Duration::from_secs(30) {
        match a.send(&env(0, 1, op)) {
            Ok(()) => {
                accepted.push(op);
                op += 1;
            }
            Err(falcon::transport::SendError::Full(1)) => full = true,
            Err(e) => panic!("{e}"),
        }
        a.recv(Duration::ZERO, &mut got).unwrap();
    }
    assert!(full, "the ring never filled while the receiver slept");
    let start = Instant::now();
    while got.len() < accepted.len() && start.elapsed() < Duration::from_secs(30) {
        a.recv(Duration::from_millis(10), &mut got).unwrap();
    }
    let echoed = ops(&got);
    let first_bad = echoed.iter().zip(&accepted).position(|(a, b)| a != b);
    assert!(
        first_bad.is_none() && echoed.len() == accepted.len(),
        "{} accepted, {} echoed, first difference at {first_bad:?}",
        accepted.len(),
        echoed.len()
    );
}

/// A ring takes its whole size when it is made: a full shared-memory file
/// system is a clear error at bind, not a SIGBUS that kills the process
/// later at the first write into a page it could not have. (Needs root for
/// a small tmpfs, as the test command runs.)
#[test]
fn shm_a_ring_that_does_not_fit_is_an_error_at_bind_not_a_sigbus_later() {
    use falcon::transport::shm::{ShmOptions, ShmTransport};
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "needs root to mount a small tmpfs (bash scripts/test.sh runs the tests as root)"
    );
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("shm");
    std::fs::create_dir(&mnt).unwrap();
    let ok = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs"])
        .arg(&mnt)
        .status()
        .unwrap();
    assert!(ok.success(), "mount tmpfs");
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(mnt.clone());
    let mut o = ShmOptions::new(CLUSTER, 0, 3, mnt.join("rings"));
    o.ring_bytes = 4 << 20;
    let err = match ShmTransport::bind(o) {
        Ok(_) => panic!("two 4 MiB rings fit a 1 MiB tmpfs"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("reserving"), "{err}");
}

/// A file where a peer's ring should be that is not one is said once (with
/// why), not dropped in silence at every look (every 100 ms).
#[test]
fn shm_a_ring_file_that_is_not_a_ring_is_said_once() {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = tempfile::tempdir().unwrap();
    let mut a = shm_node0(dir.path());
    let path = dir.path().join("rings").join("ring-0-1");
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .unwrap()
        .write_all(&[0u8; 8192])
        .unwrap();
    let mut evs = Vec::new();
    let start = Instant::now();
    let mut got = Vec::new();
    while start.elapsed() < Duration::from_millis(500) {
        let _ = a.send(&env(0, 1, 1));
        a.recv(Duration::from_millis(20), &mut got).unwrap();
        evs.extend(a.events());
    }
    let said: Vec<String> = refusals(&evs);
    assert_eq!(said.len(), 1, "{evs:?}");
    assert!(said[0].contains("not a falcon ring"), "{said:?}");
}

/// A follower killed between the two stores of its ack slot leaves the
/// slot's sequence odd. The leader must still sleep when nothing else is
/// there, not spin until that follower writes again.
#[test]
fn shm_an_ack_slot_left_half_written_does_not_keep_the_leader_awake() {
    use std::os::unix::fs::FileExt;
    let dir = tempfile::tempdir().unwrap();
    let mut a = shm_node0(dir.path());
    let bell = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.path().join("rings").join("bell-0"))
        .unwrap();
    // Replica 1's slot (256 + 64 * 1): seq 7, a write begun and never ended.
    bell.write_all_at(&7u64.to_le_bytes(), 256 + 64).unwrap();
    let mut got = Vec::new();
    a.recv(Duration::from_millis(10), &mut got).unwrap();
    assert!(got.is_empty(), "{got:?}");
    assert!(
        a.before_sleep(),
        "a half-written ack slot keeps the loop from sleeping"
    );
    a.after_sleep();
}

#[test]
fn shm_a_crashed_receiver_is_found_again_after_its_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = shm_node0(dir.path());
    let peer = shm_peer(dir.path(), &[]);
    let mut got = Vec::new();
    a.send(&env(0, 1, 1)).unwrap();
    let start = Instant::now();
    while got.is_empty() && start.elapsed() < Duration::from_secs(10) {
        a.recv(Duration::from_millis(10), &mut got).unwrap();
    }
    assert_eq!(ops(&got), vec![1]);
    drop(peer); // SIGKILL: its ring file stays, nobody reads it
    let _peer = shm_peer(dir.path(), &[]);
    // The restarted peer made a new ring; the sender maps it and talks again.
    let mut op = 2;
    got.clear();
    let start = Instant::now();
    while got.is_empty() && start.elapsed() < Duration::from_secs(10) {
        let _ = a.send(&env(0, 1, op));
        op += 1;
        a.recv(Duration::from_millis(20), &mut got).unwrap();
    }
    assert!(!got.is_empty(), "no echo from the restarted receiver");
    let evs = a.events();
    assert!(
        evs.iter()
            .any(|e| matches!(e, TransportEvent::Lost { peer: 1, .. })),
        "{evs:?}"
    );
}

#[test]
fn shm_a_crashed_sender_restarts_where_it_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = shm_node0(dir.path());
    let vars = |from: u64| {
        vec![
            ("FALCON_SHM_ROLE", "send".to_string()),
            ("FALCON_SHM_FROM", from.to_string()),
            ("FALCON_SHM_COUNT", "500".to_string()),
        ]
    };
    let mut got = Vec::new();
    let peer = shm_peer(dir.path(), &vars(1));
    let start = Instant::now();
    while got.len() < 500 && start.elapsed() < Duration::from_secs(10) {
        a.recv(Duration::from_millis(10), &mut got).unwrap();
    }
    drop(peer); // killed after sending: the next sender opens the same ring
    let _peer = shm_peer(dir.path(), &vars(501));
    let start = Instant::now();
    while got.len() < 1000 && start.elapsed() < Duration::from_secs(10) {
        a.recv(Duration::from_millis(10), &mut got).unwrap();
    }
    let got = ops(&got);
    assert!(
        got == (1..=1000).collect::<Vec<_>>(),
        "{} received; first {:?}, last {:?}",
        got.len(),
        got.first(),
        got.last()
    );
    assert!(
        !a.events()
            .iter()
            .any(|e| matches!(e, TransportEvent::Refused { .. })),
        "the second sender's records were refused"
    );
}

#[test]
fn shm_refuses_a_ring_directory_others_could_write() {
    use falcon::transport::shm::{ShmOptions, ShmTransport};
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let err = ShmTransport::bind(ShmOptions::new(CLUSTER, 0, 3, dir.path().to_path_buf()))
        .err()
        .expect("a world-writable ring directory was accepted");
    assert_eq!(err.kind(), std::io::ErrorKind::PermissionDenied, "{err}");
    assert!(err.to_string().contains("mode 0700"), "{err}");
}

/// Refusal reasons among `evs`.
fn refusals(evs: &[TransportEvent]) -> Vec<String> {
    evs.iter()
        .filter_map(|e| match e {
            TransportEvent::Refused { reason, .. } => Some(reason.clone()),
            _ => None,
        })
        .collect()
}

/// With mutual TLS, a replica whose certificate another CA signed (it has
/// the cluster key) cannot join: the others refuse it as dialer and as
/// listener, and nothing it sends arrives.
#[test]
fn tls_a_replica_with_a_certificate_of_another_ca_cannot_join() {
    let other_ca = make_certs();
    let mut ts = tls_cluster_with(3, |id| {
        Some(if id == 2 {
            tls_context(&other_ca, 3)
        } else {
            tls_context(certs(), id + 1)
        })
    });
    ts[2].send(&env(2, 0, 1)).unwrap();
    ts[0].send(&env(0, 1, 2)).unwrap();
    let _ = ts[0].send(&env(0, 2, 3));
    let (got, evs) = pump(&mut ts, Duration::from_millis(800));
    assert!(
        got[0].is_empty(),
        "the outsider's message arrived: {:?}",
        got[0]
    );
    assert!(got[2].is_empty(), "the outsider received: {:?}", got[2]);
    assert_eq!(
        got[1].iter().map(number).collect::<Vec<_>>(),
        vec![2],
        "good peers still talk"
    );
    let r = refusals(&evs);
    assert!(
        r.iter().any(|r| r.contains("certificate")),
        "no refusal names the certificate: {r:?}"
    );
}

/// With mutual TLS, a replica that speaks plain TCP (with the right
/// cluster key) is refused, and nothing it sends arrives.
#[test]
fn tls_a_replica_without_tls_cannot_join() {
    let mut ts = tls_cluster_with(3, |id| (id != 2).then(|| tls_context(certs(), id + 1)));
    ts[2].send(&env(2, 0, 1)).unwrap();
    ts[0].send(&env(0, 1, 2)).unwrap();
    let (got, evs) = pump(&mut ts, Duration::from_millis(800));
    assert!(
        got[0].is_empty(),
        "the plain peer's message arrived: {:?}",
        got[0]
    );
    assert_eq!(got[1].iter().map(number).collect::<Vec<_>>(), vec![2]);
    let r = refusals(&evs);
    assert!(r.iter().any(|r| r.contains("TLS")), "no TLS refusal: {r:?}");
}

/// A TCP relay from `listen` to `to` that records every byte the dialer sent.
fn recording_relay(listen: TcpListener, to: SocketAddr) -> Arc<std::sync::Mutex<Vec<u8>>> {
    let rec = Arc::new(std::sync::Mutex::new(Vec::new()));
    let r = rec.clone();
    std::thread::spawn(move || {
        let (mut a, _) = listen.accept().unwrap();
        let mut b = TcpStream::connect(to).unwrap();
        let (mut a2, mut b2) = (a.try_clone().unwrap(), b.try_clone().unwrap());
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut b2, &mut a2);
        });
        let mut buf = [0u8; 16 << 10];
        loop {
            match a.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    r.lock().unwrap().extend_from_slice(&buf[..n]);
                    if b.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
    });
    rec
}

/// With mutual TLS, a whole recorded session (TLS handshake, cluster-key
/// answer, messages) replayed later on a new connection is refused: the
/// listener's handshake is fresh, so nothing recorded decrypts, and the
/// message inside never arrives a second time.
#[test]
fn tls_a_recorded_session_replayed_later_is_refused() {
    let addrs = free_addrs(2);
    let relay = TcpListener::bind("127.0.0.1:0").unwrap();
    let relay_addr = relay.local_addr().unwrap();
    let rec = recording_relay(relay, addrs[0]);
    let mk = |id: u32, peers: Vec<SocketAddr>| {
        let mut o = TcpOptions::new(CLUSTER, id, peers, KEY.to_vec());
        o.handshake_timeout = Duration::from_millis(300);
        o.tls = Some(tls_context(certs(), id + 1));
        TcpTransport::bind(o).unwrap()
    };
    let mut ts = vec![mk(0, addrs.clone()), mk(1, vec![relay_addr, addrs[1]])];
    ts[1].send(&env(1, 0, 7)).unwrap();
    let (got, _) = pump(&mut ts, Duration::from_millis(500));
    assert_eq!(got[0].iter().map(number).collect::<Vec<_>>(), vec![7]);
    let recording = rec.lock().unwrap().clone();
    assert!(recording.len() > 200, "recorded {} bytes", recording.len());
    // Not a byte of the message is readable on the wire.
    let msg = message::to_bytes(&env(1, 0, 7));
    assert!(
        !recording.windows(msg.len()).any(|w| w == msg.as_slice()),
        "the message crossed the wire in the clear"
    );
    drop(ts.pop());
    let replay = std::thread::spawn(move || {
        let mut s = TcpStream::connect(addrs[0]).unwrap();
        s.write_all(&recording).unwrap();
        std::thread::sleep(Duration::from_millis(400));
        s
    });
    let mut one = vec![ts.pop().unwrap()];
    let (got, evs) = pump(&mut one, Duration::from_millis(500));
    let _s = replay.join().unwrap();
    assert!(got[0].is_empty(), "the replay delivered {:?}", got[0]);
    let r = refusals(&evs);
    assert!(r.iter().any(|r| r.contains("TLS")), "no TLS refusal: {r:?}");
}

/// With mutual TLS, a replica's certificate names its peer address: a
/// replica with a valid certificate of its own (and the cluster key) that
/// claims to be another replica, on another address, is refused, and
/// nothing it sends arrives.
#[test]
fn tls_a_replica_cannot_claim_another_replicas_id() {
    let dir = make_certs_for(&["127.0.0.1", "127.0.0.2", "127.0.0.1"]);
    let a0 = free_addrs(1)[0];
    let a1: SocketAddr = {
        let l = TcpListener::bind("127.0.0.2:0").unwrap();
        l.local_addr().unwrap()
    };
    let a2 = free_addrs(1)[0];
    let mk = |id: u32, peers: Vec<SocketAddr>, tls: Arc<TlsContext>| {
        let mut o = TcpOptions::new(CLUSTER, id, peers, KEY.to_vec());
        o.handshake_timeout = Duration::from_millis(300);
        o.tls = Some(tls);
        TcpTransport::bind(o).unwrap()
    };
    // The impostor: replica 3's certificate (127.0.0.1), posing as replica
    // 2 (whose peer address is on 127.0.0.2), listening on 127.0.0.1.
    let imp_addr = free_addrs(1)[0];
    let mut ts = vec![
        mk(0, vec![a0, a1, a2], tls_context(&dir, 1)),
        mk(1, vec![a0, imp_addr, a2], tls_context(&dir, 3)),
    ];
    ts[1].send(&env(1, 0, 1)).unwrap();
    let (got, evs) = pump(&mut ts, Duration::from_millis(800));
    assert!(
        got[0].is_empty(),
        "the impostor's message arrived: {:?}",
        got[0]
    );
    let r = refusals(&evs);
    assert!(
        r.iter().any(|r| r.contains("does not name 127.0.0.2")),
        "no refusal names the address: {r:?}"
    );
    // A certificate that does not name the replica's own address is refused at start.
    let wrong = TlsContext::load(
        &TlsFiles {
            cert: dir.join("replica-2.pem"),
            key: dir.join("replica-2.key"),
            ca: dir.join("ca.pem"),
        },
        [127, 0, 0, 1].into(),
    )
    .unwrap_err();
    assert!(
        wrong.contains("does not name this replica's peer address 127.0.0.1"),
        "{wrong}"
    );
}

/// A message larger than a peer's whole queue (TCP) or ring (shared
/// memory) can never be sent: `TooLarge`, with its size and the limit, not
/// the `Full` that tells the sender to retry. The node logs it; the engine
/// keeps its messages under the limit by moving logs in chunks.
#[test]
fn a_message_larger_than_the_whole_queue_is_too_large_not_full() {
    use falcon::log::{Entry, Kind};
    use falcon::transport::SendError;
    let big = |to: u32| {
        let entries = (1..=2)
            .map(|op| Entry {
                view: 1,
                op,
                kind: Kind::Data,
                conn: 1,
                time_ns: op,
                payload: vec![7u8; 9 << 20].into(),
            })
            .collect();
        Envelope {
            cluster: CLUSTER,
            from: 0,
            to,
            msg: Message::Prepare {
                view: 1,
                op_start: 1,
                entries,
                commit: 0,
            },
        }
    };
    let mut tcp = tcp_cluster(2);
    match tcp[0].send(&big(1)) {
        Err(SendError::TooLarge { to: 1, bytes, max }) => {
            assert!(bytes > 18 << 20 && max == 16 << 20, "{bytes} {max}")
        }
        other => panic!("tcp: {other:?}"),
    }
    // A message that fits still goes.
    tcp[0].send(&prepare(0, 1, 1, 1)).unwrap();
    let mut shm = shm_cluster(2);
    match shm[0].send(&big(1)) {
        Err(SendError::TooLarge { to: 1, bytes, max }) => {
            assert!(bytes > 18 << 20 && max < (16 << 20) + 64, "{bytes} {max}")
        }
        other => panic!("shm: {other:?}"),
    }
    shm[0].send(&prepare(0, 1, 1, 1)).unwrap();
}

/// A peer that sends far more than one event's reads take (three reads of
/// at most one message's limit each) in one burst, then falls silent: the
/// bytes left in the socket still arrive, though no new byte comes to make
/// the edge-triggered poll report the connection again.
#[test]
fn a_burst_larger_than_one_events_reads_arrives_whole_without_more_traffic() {
    let addrs = free_addrs(2);
    let mut o = TcpOptions::new(CLUSTER, 0, addrs, KEY.to_vec());
    o.message_bytes_max = 4096;
    o.handshake_timeout = Duration::from_millis(300);
    let mut t = TcpTransport::bind(o).unwrap();
    let addr = t.local_addr().unwrap();
    // 400 messages of about 200 bytes: about 80 KB, over five times the 3 x
    // 4 KiB one event reads.
    let mut burst = Vec::new();
    for op in 1..=400 {
        let mut frame = vec![0u8; 4];
        message::encode(&prepare(1, 0, 1, op), &mut frame);
        let len = (frame.len() - 4) as u32;
        frame[..4].copy_from_slice(&len.to_le_bytes());
        burst.extend_from_slice(&frame);
    }
    assert!(burst.len() > 5 * 3 * 4100, "{} bytes", burst.len());
    // The peer runs on another thread: its handshake needs `t` polled.
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let peer = std::thread::spawn(move || {
        let mut s = handshake(addr, 1, 0, KEY);
        s.write_all(&burst).unwrap();
        // Silent, and open, until the test ends.
        let _ = done_rx.recv();
    });
    let mut got = Vec::new();
    let end = Instant::now() + Duration::from_secs(5);
    while got.len() < 400 && Instant::now() < end {
        t.recv(Duration::from_millis(20), &mut got).unwrap();
    }
    let ops: Vec<u64> = got
        .iter()
        .map(|e| match &e.msg {
            Message::Prepare { op_start, .. } => *op_start,
            m => panic!("not a prepare: {m:?}"),
        })
        .collect();
    done_tx.send(()).unwrap();
    peer.join().unwrap();
    assert_eq!(ops, (1..=400).collect::<Vec<u64>>());
}

/// A peer that sends its last message and closes at once, both in the
/// socket before the endpoint looks: the message arrives and the close is
/// seen (the read that returns the last bytes takes the close with them,
/// so the endpoint must read on rather than trust a short read).
#[test]
fn a_peer_that_sends_and_closes_at_once_is_seen_to_go() {
    let addrs = free_addrs(2);
    let mut o = TcpOptions::new(CLUSTER, 0, addrs, KEY.to_vec());
    o.handshake_timeout = Duration::from_millis(300);
    let mut t = TcpTransport::bind(o).unwrap();
    let addr = t.local_addr().unwrap();
    let (authed_tx, authed_rx) = std::sync::mpsc::channel::<()>();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let peer = std::thread::spawn(move || {
        let mut s = handshake(addr, 1, 0, KEY);
        authed_tx.send(()).unwrap();
        go_rx.recv().unwrap();
        let mut frame = vec![0u8; 4];
        message::encode(&prepare(1, 0, 1, 7), &mut frame);
        let len = (frame.len() - 4) as u32;
        frame[..4].copy_from_slice(&len.to_le_bytes());
        s.write_all(&frame).unwrap();
        // Gone: the message and the close are in the socket together.
    });
    let mut got = Vec::new();
    let mut evs = Vec::new();
    // Polled until the peer is through its handshake and announced.
    let end = Instant::now() + Duration::from_secs(5);
    let mut authed = false;
    while Instant::now() < end {
        t.recv(Duration::from_millis(2), &mut got).unwrap();
        evs.extend(t.events());
        authed = authed || authed_rx.try_recv().is_ok();
        if authed
            && evs
                .iter()
                .any(|e| matches!(e, TransportEvent::Connected { peer: 1, .. }))
        {
            break;
        }
    }
    assert!(authed, "the handshake did not finish: {evs:?}");
    // Not polled while the peer writes and closes.
    go_tx.send(()).unwrap();
    peer.join().unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let end = Instant::now() + Duration::from_secs(2);
    while Instant::now() < end
        && !evs
            .iter()
            .any(|e| matches!(e, TransportEvent::Lost { peer: 1, .. }))
    {
        t.recv(Duration::from_millis(20), &mut got).unwrap();
        evs.extend(t.events());
    }
    assert_eq!(got.len(), 1, "the last message arrives: {got:?}");
    assert!(
        evs.iter()
            .any(|e| matches!(e, TransportEvent::Lost { peer: 1, .. })),
        "the close is seen: {evs:?}"
    );
}
