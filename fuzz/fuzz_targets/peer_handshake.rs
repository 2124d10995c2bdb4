//! The TCP transport's peer port on arbitrary bytes, over a real loopback
//! socket: a greeting, a challenge answer and frames the fuzzer makes up,
//! optionally after a correct handshake (so the frame decoder behind the
//! authentication is reached too). The transport never panics, and nothing
//! reaches the engine from a connection that did not authenticate.
#![no_main]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Mutex;
use std::sync::OnceLock;
use std::time::Duration;

use falcon::transport::Transport;
use falcon::transport::tcp::{TcpOptions, TcpTransport};
use hmac::{Hmac, Mac};
use libfuzzer_sys::fuzz_target;
use sha2::Sha256;

const CLUSTER: u64 = 0xf022;
const KEY: &[u8] = b"fuzz-key-fuzz-key-fuzz-key-fuzz-key!";

struct Fixture {
    t: TcpTransport,
    addr: SocketAddr,
}

fn fixture() -> &'static Mutex<Fixture> {
    static F: OnceLock<Mutex<Fixture>> = OnceLock::new();
    F.get_or_init(|| {
        // Replica 0 listens; replica 1's address is one nobody serves.
        let a = TcpListener::bind("127.0.0.1:0").unwrap();
        let b = TcpListener::bind("127.0.0.1:0").unwrap();
        let peers = vec![a.local_addr().unwrap(), b.local_addr().unwrap()];
        drop(a);
        drop(b);
        let mut o = TcpOptions::new(CLUSTER, 0, peers.clone(), KEY.to_vec());
        o.handshake_timeout = Duration::from_millis(200);
        o.reconnect_min = Duration::from_secs(3600);
        o.reconnect_max = Duration::from_secs(3600);
        let t = TcpTransport::bind(o).unwrap();
        Mutex::new(Fixture { t, addr: peers[0] })
    })
}

fn mac(label: &[u8], nonce_d: &[u8; 16], nonce_l: &[u8]) -> Vec<u8> {
    let mut m = Hmac::<Sha256>::new_from_slice(KEY).unwrap();
    m.update(label);
    m.update(&CLUSTER.to_le_bytes());
    m.update(&1u32.to_le_bytes());
    m.update(&0u32.to_le_bytes());
    m.update(nonce_d);
    m.update(nonce_l);
    m.finalize().into_bytes().to_vec()
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let mut f = fixture().lock().unwrap();
    let addr = f.addr;
    let Ok(mut s) = TcpStream::connect(addr) else {
        return;
    };
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut got = Vec::new();
    let authenticated = mode & 1 == 1;
    if authenticated {
        let nonce_d = [7u8; 16];
        let mut hello = b"FALCONP1".to_vec();
        hello.extend_from_slice(&CLUSTER.to_le_bytes());
        hello.extend_from_slice(&1u32.to_le_bytes());
        hello.extend_from_slice(&0u32.to_le_bytes());
        hello.extend_from_slice(&nonce_d);
        s.write_all(&hello).unwrap();
        let mut challenge = [0u8; 48];
        let mut have = 0;
        for _ in 0..200 {
            f.t.recv(Duration::from_millis(1), &mut got).unwrap();
            s.set_nonblocking(true).unwrap();
            if let Ok(n) = s.read(&mut challenge[have..]) {
                have += n;
            }
            s.set_nonblocking(false).unwrap();
            if have == 48 {
                break;
            }
        }
        assert_eq!(have, 48, "no challenge from the listener");
        assert_eq!(
            &challenge[16..],
            &mac(b"listener", &nonce_d, &challenge[..16])[..]
        );
        s.write_all(&mac(b"dialer", &nonce_d, &challenge[..16]))
            .unwrap();
    }
    let _ = s.write_all(rest);
    for _ in 0..3 {
        f.t.recv(Duration::from_millis(1), &mut got).unwrap();
    }
    drop(s);
    for _ in 0..2 {
        f.t.recv(Duration::from_millis(1), &mut got).unwrap();
    }
    let _ = f.t.events();
    if !authenticated {
        assert!(
            got.is_empty(),
            "an unauthenticated connection delivered {got:?}"
        );
    }
    for env in &got {
        assert_eq!((env.cluster, env.from, env.to), (CLUSTER, 1, 0));
    }
});
