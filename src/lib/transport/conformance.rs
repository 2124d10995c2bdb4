//! The conformance suite every transport must pass. Each check gets a
//! function that makes `n` joined endpoints of a fresh network.

use std::time::{Duration, Instant};

use super::{SendError, Transport};
use crate::consensus::{Envelope, Message};
use crate::log::{Entry, Kind};

/// The cluster id the suite uses.
pub const CLUSTER: u64 = 0x7e57;

/// A small message of the suite's cluster, numbered `op`, from `from` to
/// `to` (`Missing { view: 1, from: op }`: a kind every transport carries
/// one by one, unlike the cumulative `PrepareOk`).
pub fn env(from: u32, to: u32, op: u64) -> Envelope {
    Envelope {
        cluster: CLUSTER,
        from,
        to,
        msg: Message::Missing { view: 1, from: op },
    }
}

/// A Prepare of `view` carrying the one entry `op` (100 bytes), from `from` to `to`.
pub fn prepare(from: u32, to: u32, view: u64, op: u64) -> Envelope {
    Envelope {
        cluster: CLUSTER,
        from,
        to,
        msg: Message::Prepare {
            view,
            op_start: op,
            entries: vec![Entry {
                view,
                op,
                kind: Kind::Data,
                conn: 1,
                time_ns: op,
                payload: vec![op as u8; 100].into(),
            }],
            commit: 0,
        },
    }
}

/// The number of a message made by [`env`] (`u64::MAX` for anything else).
pub fn number(e: &Envelope) -> u64 {
    match e.msg {
        Message::Missing { from, .. } => from,
        _ => u64::MAX,
    }
}

/// Receives on `t` until `want` messages arrived or `within` passed, while
/// pumping `others` so their connections progress.
pub fn collect<T: Transport>(
    t: &mut T,
    others: &mut [&mut T],
    want: usize,
    within: Duration,
) -> Vec<Envelope> {
    let deadline = Instant::now() + within;
    let mut got = Vec::new();
    while got.len() < want && Instant::now() < deadline {
        t.recv(Duration::from_millis(5), &mut got).expect("recv");
        for o in others.iter_mut() {
            let mut sink = Vec::new();
            o.recv(Duration::ZERO, &mut sink).expect("recv");
            assert!(
                sink.is_empty(),
                "unexpected message at replica {}: {sink:?}",
                o.id()
            );
        }
    }
    got
}

/// Messages from one sender arrive whole and in order.
pub fn delivers_in_order<T: Transport>(mut make: impl FnMut(u32) -> Vec<T>) {
    let mut ts = make(3);
    let (a, rest) = ts.split_at_mut(1);
    let (b, c) = rest.split_at_mut(1);
    for op in 1..=500 {
        a[0].send(&env(0, 1, op)).expect("queue");
    }
    let got = collect(
        &mut b[0],
        &mut [&mut a[0], &mut c[0]],
        500,
        Duration::from_secs(10),
    );
    let ops: Vec<u64> = got.iter().map(number).collect();
    assert_eq!(ops, (1..=500).collect::<Vec<_>>());
    assert!(
        got.iter()
            .all(|e| e.from == 0 && e.to == 1 && e.cluster == CLUSTER)
    );
}

/// Acknowledgements may be merged, but the latest always arrives, and
/// what arrives never goes backwards.
pub fn the_latest_ack_arrives<T: Transport>(mut make: impl FnMut(u32) -> Vec<T>) {
    let mut ts = make(3);
    let (a, rest) = ts.split_at_mut(1);
    let (b, c) = rest.split_at_mut(1);
    let ack = |op| Envelope {
        cluster: CLUSTER,
        from: 1,
        to: 0,
        msg: Message::PrepareOk { view: 1, op },
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut got = Vec::new();
    for op in 1..=500 {
        b[0].send(&ack(op)).expect("queue");
        if op % 50 == 0 {
            b[0].flush();
            a[0].recv(Duration::ZERO, &mut got).expect("recv");
        }
    }
    let last = |got: &[Envelope]| match got.last().map(|e| &e.msg) {
        Some(Message::PrepareOk { op, .. }) => *op,
        _ => 0,
    };
    while last(&got) < 500 && Instant::now() < deadline {
        a[0].recv(Duration::from_millis(5), &mut got).expect("recv");
        let mut sink = Vec::new();
        b[0].recv(Duration::ZERO, &mut sink).expect("recv");
        c[0].recv(Duration::ZERO, &mut sink).expect("recv");
    }
    let ops: Vec<u64> = got
        .iter()
        .map(|e| match e.msg {
            Message::PrepareOk { view: 1, op } if e.from == 1 && e.to == 0 => op,
            _ => panic!("unexpected {e:?}"),
        })
        .collect();
    assert_eq!(ops.last(), Some(&500), "the last ack did not arrive");
    assert!(
        ops.windows(2).all(|w| w[0] < w[1]),
        "acks went backwards: {ops:?}"
    );
}

/// A large message (many entries, about 8 MiB) arrives intact.
pub fn carries_large_messages<T: Transport>(mut make: impl FnMut(u32) -> Vec<T>) {
    let mut ts = make(3);
    let entries: Vec<Entry> = (1..=2048)
        .map(|op| Entry {
            view: 1,
            op,
            kind: Kind::Data,
            conn: 3,
            time_ns: op,
            payload: vec![op as u8; 4096].into(),
        })
        .collect();
    let big = Envelope {
        cluster: CLUSTER,
        from: 2,
        to: 0,
        msg: Message::Prepare {
            view: 1,
            op_start: 1,
            entries,
            commit: 0,
        },
    };
    let (head, tail) = ts.split_at_mut(2);
    tail[0].send(&big).expect("queue");
    let (a, b) = head.split_at_mut(1);
    let got = collect(
        &mut a[0],
        &mut [&mut b[0], &mut tail[0]],
        1,
        Duration::from_secs(10),
    );
    assert_eq!(got, vec![big]);
}

/// Every replica reaches every other.
pub fn all_pairs_connect<T: Transport>(mut make: impl FnMut(u32) -> Vec<T>) {
    let n = 5;
    let mut ts = make(n);
    for from in 0..n {
        for to in 0..n {
            if from != to {
                ts[from as usize]
                    .send(&env(from, to, u64::from(from * 10 + to)))
                    .expect("queue");
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut got: Vec<Vec<Envelope>> = vec![Vec::new(); n as usize];
    while got.iter().any(|g| g.len() < (n - 1) as usize) && Instant::now() < deadline {
        for (i, t) in ts.iter_mut().enumerate() {
            t.recv(Duration::from_millis(2), &mut got[i]).expect("recv");
        }
    }
    for (i, g) in got.iter().enumerate() {
        let mut from: Vec<u32> = g.iter().map(|e| e.from).collect();
        from.sort();
        let want: Vec<u32> = (0..n).filter(|&x| x != i as u32).collect();
        assert_eq!(from, want, "replica {i}");
    }
}

/// Queues are bounded: a flood to a peer that does not read ends in `Full`, not in growth.
pub fn queues_are_bounded<T: Transport>(mut make: impl FnMut(u32) -> Vec<T>) {
    let mut ts = make(3);
    let payload = vec![7u8; 64 << 10];
    let big = Envelope {
        cluster: CLUSTER,
        from: 0,
        to: 1,
        msg: Message::Prepare {
            view: 1,
            op_start: 1,
            entries: vec![Entry {
                view: 1,
                op: 1,
                kind: Kind::Data,
                conn: 1,
                time_ns: 1,
                payload: payload.into(),
            }],
            commit: 0,
        },
    };
    let mut refused = false;
    for _ in 0..20_000 {
        match ts[0].send(&big) {
            Ok(()) => {}
            Err(SendError::Full(1)) => {
                refused = true;
                break;
            }
            Err(e) => panic!("unexpected {e}"),
        }
    }
    assert!(
        refused,
        "20,000 messages of 64 KiB to a peer that never reads were all queued"
    );
    assert_eq!(ts[0].send(&env(0, 9, 1)), Err(SendError::UnknownPeer(9)));
}

/// Expands to one `#[test]` per check, for endpoints made by `$make` (a
/// `fn(u32) -> Vec<T>`); attributes after it and a semicolon (such as
/// `make; #[ignore = "…"]`) go on every test.
#[macro_export]
macro_rules! transport_conformance_tests {
    (@one [$($attr:tt)*] $make:expr; $name:ident) => {
        #[test]
        $($attr)*
        fn $name() {
            $crate::transport::conformance::$name($make);
        }
    };
    (@each $attrs:tt $make:expr; $($name:ident),*) => {
        $( $crate::transport_conformance_tests!(@one $attrs $make; $name); )*
    };
    ($make:expr $(; $(#[$attr:meta])*)?) => {
        $crate::transport_conformance_tests!(@each [$($(#[$attr])*)?] $make; delivers_in_order, the_latest_ack_arrives, carries_large_messages, all_pairs_connect, queues_are_bounded);
    };
}
