//! The rdma transport. Without an RDMA device (this is most hosts, and CI)
//! only the first test runs; the others need a device and are ignored —
//! skipped, never passed. `scripts/rdma-guest.sh` runs them for real inside
//! a QEMU guest with Soft-RoCE (`scripts/test-rdma.sh` does it all).
#![cfg(feature = "rdma")]

use std::net::{SocketAddr, TcpListener};
use std::time::{Duration, Instant};

use falcon::transport::conformance::{CLUSTER, env, number, prepare};
use falcon::transport::rdma::verbs::{VerbsError, device_names};
use falcon::transport::rdma::{RdmaOptions, RdmaTransport};
use falcon::transport::{SendError, Transport, TransportEvent};

const KEY: &[u8] = b"0123456789abcdef0123456789abcdef";

fn free_addrs(n: u32) -> Vec<SocketAddr> {
    let ls: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    ls.iter().map(|l| l.local_addr().unwrap()).collect()
}

fn options(id: u32, addrs: &[SocketAddr], ring_bytes: usize) -> RdmaOptions {
    let mut o = RdmaOptions::new(CLUSTER, id, addrs.to_vec(), KEY.to_vec());
    o.ring_bytes = ring_bytes;
    o
}

/// Pumps every endpoint until each has a connected queue pair to every
/// other; the events each reported meanwhile.
fn join(ts: &mut [RdmaTransport]) -> Vec<Vec<TransportEvent>> {
    let n = ts.len();
    let mut evs = vec![Vec::new(); n];
    let deadline = Instant::now() + Duration::from_secs(20);
    while ts.iter().any(|t| t.connected().len() < n - 1) {
        assert!(
            Instant::now() < deadline,
            "queue pairs not connected after 20 s: {:?}",
            ts.iter().map(|t| t.connected()).collect::<Vec<_>>()
        );
        for (i, t) in ts.iter_mut().enumerate() {
            let mut sink = Vec::new();
            t.recv(Duration::from_millis(2), &mut sink).unwrap();
            assert!(sink.is_empty(), "a message before any was sent: {sink:?}");
            evs[i].extend(t.events());
        }
    }
    evs
}

fn cluster_with(n: u32, ring_bytes: usize) -> Vec<RdmaTransport> {
    let addrs = free_addrs(n);
    let mut ts: Vec<RdmaTransport> = (0..n)
        .map(|id| RdmaTransport::bind(options(id, &addrs, ring_bytes)).unwrap())
        .collect();
    join(&mut ts);
    ts
}

fn rdma_cluster(n: u32) -> Vec<RdmaTransport> {
    cluster_with(n, 16 << 20)
}

#[test]
fn without_a_device_the_error_says_so_and_what_to_do() {
    let addrs = free_addrs(1);
    match device_names() {
        Ok(names) if !names.is_empty() => {
            // A host with devices: a name that is not one of them.
            let mut o = options(0, &addrs, 1 << 20);
            o.device = Some("falcon-no-such-device".into());
            let err = RdmaTransport::bind(o)
                .err()
                .expect("an unknown device was opened");
            assert!(matches!(err, VerbsError::NoDevice(_)), "{err}");
            assert!(err.to_string().contains("falcon-no-such-device"), "{err}");
            assert!(err.to_string().contains(&names[0]), "{err}");
        }
        _ => {
            let err = RdmaTransport::bind(options(0, &addrs, 1 << 20))
                .err()
                .expect("an rdma transport started on a host without RDMA devices");
            assert!(matches!(err, VerbsError::NoDevice(_)), "{err}");
            let text = err.to_string();
            assert!(text.contains("no RDMA device"), "{text}");
            assert!(text.contains("transport = \"tcp\""), "{text}");
            assert!(text.contains("rdma_rxe"), "{text}");
        }
    }
}

mod conformance {
    falcon::transport_conformance_tests!(
        super::rdma_cluster;
        #[ignore = "needs an RDMA device: scripts/test-rdma.sh runs it inside a Soft-RoCE guest"]
    );
}

/// Receives on every endpoint for `d`; what each got.
fn pump(ts: &mut [RdmaTransport], d: Duration) -> Vec<Vec<u64>> {
    let mut got = vec![Vec::new(); ts.len()];
    let end = Instant::now() + d;
    while Instant::now() < end {
        for (i, t) in ts.iter_mut().enumerate() {
            let mut inbox = Vec::new();
            t.recv(Duration::from_millis(1), &mut inbox).unwrap();
            got[i].extend(inbox.iter().map(number));
        }
    }
    got
}

#[test]
#[ignore = "needs an RDMA device: scripts/test-rdma.sh runs it inside a Soft-RoCE guest"]
fn a_small_ring_wraps_many_times_and_a_slow_receiver_pushes_back() {
    // 4 KiB of ring, 20,000 messages of ~60 bytes: about 300 laps.
    let mut ts = cluster_with(2, 4096);
    let (mut sent, mut full, mut got) = (0u64, 0u64, Vec::new());
    let deadline = Instant::now() + Duration::from_secs(60);
    while (got.len() as u64) < 20_000 && Instant::now() < deadline {
        // The receiver reads only every few rounds: the sender meets a full ring.
        for _ in 0..200 {
            if sent == 20_000 {
                break;
            }
            match ts[0].send(&env(0, 1, sent + 1)) {
                Ok(()) => sent += 1,
                Err(SendError::Full(1)) => {
                    full += 1;
                    break;
                }
                Err(e) => panic!("{e}"),
            }
        }
        let mut sink = Vec::new();
        ts[0].recv(Duration::ZERO, &mut sink).unwrap();
        ts[1].recv(Duration::from_millis(1), &mut got).unwrap();
    }
    let ops: Vec<u64> = got.iter().map(number).collect();
    assert_eq!(ops.len(), 20_000, "{full} refusals; {} arrived", ops.len());
    assert!(
        ops.iter().enumerate().all(|(i, &op)| op == i as u64 + 1),
        "out of order or damaged"
    );
    assert!(full > 0, "the 4 KiB ring never filled");
    assert!(
        !ts[1]
            .events()
            .iter()
            .any(|e| matches!(e, TransportEvent::Refused { .. })),
        "a record was refused"
    );
}

#[test]
#[ignore = "needs an RDMA device: scripts/test-rdma.sh runs it inside a Soft-RoCE guest"]
fn a_restarted_peer_gets_a_new_link_and_messages_flow_again() {
    let addrs = free_addrs(2);
    let mut ts: Vec<RdmaTransport> = (0..2)
        .map(|id| RdmaTransport::bind(options(id, &addrs, 1 << 20)).unwrap())
        .collect();
    join(&mut ts);
    ts[1].send(&env(1, 0, 1)).unwrap();
    assert_eq!(
        pump(&mut ts, Duration::from_millis(200)),
        vec![vec![1], vec![]]
    );
    // Replica 1 crashes (its queue pair and memory go) and starts again.
    ts.pop();
    let mut sink = Vec::new();
    ts[0].recv(Duration::from_millis(50), &mut sink).unwrap();
    ts.push(RdmaTransport::bind(options(1, &addrs, 1 << 20)).unwrap());
    let evs = join(&mut ts).swap_remove(0);
    assert!(
        evs.iter()
            .any(|e| matches!(e, TransportEvent::Lost { peer: 1, .. })),
        "the old link was not reported lost: {evs:?}"
    );
    ts[1].send(&env(1, 0, 2)).unwrap();
    ts[0].send(&env(0, 1, 3)).unwrap();
    assert_eq!(
        pump(&mut ts, Duration::from_millis(200)),
        vec![vec![2], vec![3]]
    );
}

#[test]
#[ignore = "needs an RDMA device: scripts/test-rdma.sh runs it inside a Soft-RoCE guest"]
fn a_peer_with_another_ring_size_is_refused_with_a_reason() {
    let addrs = free_addrs(2);
    let mut a = RdmaTransport::bind(options(0, &addrs, 1 << 20)).unwrap();
    let mut b = RdmaTransport::bind(options(1, &addrs, 1 << 16)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut evs = Vec::new();
    while Instant::now() < deadline && evs.is_empty() {
        let mut sink = Vec::new();
        a.recv(Duration::from_millis(2), &mut sink).unwrap();
        b.recv(Duration::from_millis(2), &mut sink).unwrap();
        evs.extend(
            a.events()
                .into_iter()
                .filter(|e| matches!(e, TransportEvent::Refused { .. })),
        );
    }
    assert!(
        evs.iter().any(
            |e| matches!(e, TransportEvent::Refused { reason, .. } if reason.contains("ring size"))
        ),
        "{evs:?}"
    );
    assert!(a.connected().is_empty());
}

#[test]
#[ignore = "needs an RDMA device: scripts/test-rdma.sh runs it inside a Soft-RoCE guest"]
fn a_revoked_writer_cannot_write_a_followers_log() {
    let mut ts = cluster_with(3, 1 << 20);
    ts[1].grant(1, Some(0));
    // A write of view 1 in flight when replica 1 moves to view 2 (led by 2)…
    ts[0].send(&prepare(0, 1, 1, 1)).unwrap();
    ts[0].flush();
    std::thread::sleep(Duration::from_millis(50));
    ts[1].grant(2, Some(2));
    let mut got = Vec::new();
    ts[1].recv(Duration::from_millis(50), &mut got).unwrap();
    assert!(got.is_empty(), "a revoked write arrived: {got:?}");
    assert_eq!(ts[1].revoked(), 1, "the reader did not drop it");
    // …and once the fence has reached replica 0's memory, its writes stop there.
    let deadline = Instant::now() + Duration::from_secs(5);
    let refused = loop {
        let mut sink = Vec::new();
        for t in ts.iter_mut() {
            t.recv(Duration::from_millis(1), &mut sink).unwrap();
        }
        match ts[0].send(&prepare(0, 1, 1, 2)) {
            Err(SendError::Revoked(1)) => break true,
            _ if Instant::now() > deadline => break false,
            _ => {}
        }
    };
    assert!(refused, "replica 0 never saw replica 1's fence");
    // The new leader's writes and everyone's view-change messages pass.
    ts[2].send(&prepare(2, 1, 2, 2)).unwrap();
    ts[0].send(&env(0, 1, 77)).unwrap();
    let got = pump_envs(&mut ts, 1, Duration::from_millis(300));
    let mut seen: Vec<String> = got
        .iter()
        .map(|e| format!("{} {}", e.from, e.msg.name()))
        .collect();
    seen.sort();
    assert!(
        seen == vec!["0 missing", "2 prepare"],
        "replica 1 got {seen:?}"
    );
}

/// Receives on every endpoint for `d`; what `ts[i]` got.
fn pump_envs(ts: &mut [RdmaTransport], i: usize, d: Duration) -> Vec<falcon::consensus::Envelope> {
    let mut got = Vec::new();
    let end = Instant::now() + d;
    while Instant::now() < end {
        for (j, t) in ts.iter_mut().enumerate() {
            let mut inbox = Vec::new();
            t.recv(Duration::from_millis(1), &mut inbox).unwrap();
            if j == i {
                got.extend(inbox);
            }
        }
    }
    got
}
