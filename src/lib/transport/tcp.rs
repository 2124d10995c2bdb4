//! The TCP transport: length-prefixed engine messages over authenticated connections.
//!
//! Each replica dials every peer and sends its messages on that connection;
//! it receives on the connections its peers dial. A connection starts with a
//! mutual challenge-response over the shared cluster key:
//!
//! ```text
//! dialer   → HELLO     "FALCONP1" cluster:u64 from:u32 to:u32 nonce_d:[16]
//! listener → CHALLENGE nonce_l:[16] HMAC-SHA256(key, "listener" ‖ cluster ‖ from ‖ to ‖ nonce_d ‖ nonce_l)
//! dialer   → AUTH      HMAC-SHA256(key, "dialer"   ‖ cluster ‖ from ‖ to ‖ nonce_d ‖ nonce_l)
//! dialer   → frames    len:u32 message (see consensus::message), …
//! ```
//!
//! A peer of another cluster, with another key, that sends garbage, an
//! oversized frame, a message that does not match its handshake, or that
//! does not finish the handshake in time is dropped and reported as
//! [`TransportEvent::Refused`]; nothing it sent reaches the engine. Every
//! queue is bounded; a dropped connection is dialled again with backoff.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};
use sha2::Sha256;

use super::tls::{PeerStream, TlsContext};
use super::{SendError, Transport, TransportEvent};
use crate::consensus::message::{self, MESSAGE_BYTES_MAX};
use crate::consensus::{Envelope, NodeId};

const MAGIC: &[u8; 8] = b"FALCONP1";
const HELLO_LEN: usize = 8 + 8 + 4 + 4 + 16;
const CHALLENGE_LEN: usize = 16 + 32;
const AUTH_LEN: usize = 32;
const LISTENER: Token = Token(0);
const INCOMING_MAX: usize = 64;
/// A peer's queue this large is written at once, without waiting for `flush`.
const EARLY_WRITE: usize = 256 << 10;

/// How a TCP endpoint behaves.
#[derive(Clone, Debug)]
pub struct TcpOptions {
    /// The cluster.
    pub cluster_id: u64,
    /// This replica (index into `peers`).
    pub id: NodeId,
    /// Every replica's peer address, by replica number (this one's is where it listens).
    pub peers: Vec<SocketAddr>,
    /// The shared cluster key.
    pub key: Vec<u8>,
    /// Bytes queued for one peer at most.
    pub queue_bytes_max: usize,
    /// A connection that has not authenticated by then is dropped.
    pub handshake_timeout: Duration,
    /// First reconnect delay; doubles up to `reconnect_max`.
    pub reconnect_min: Duration,
    /// Longest reconnect delay.
    pub reconnect_max: Duration,
    /// Messages for a peer not reached yet wait this long after start for
    /// its first connection; after a dial fails past it, they are dropped
    /// until the peer connects (the engine retransmits what matters).
    pub connect_grace: Duration,
    /// Mutual TLS on every peer link (None: plain TCP). The cluster-key
    /// challenge runs inside it.
    pub tls: Option<std::sync::Arc<TlsContext>>,
    /// The largest message a peer may send (at most [`MESSAGE_BYTES_MAX`]);
    /// a larger frame closes its connection.
    pub message_bytes_max: usize,
}

impl TcpOptions {
    /// Defaults for replica `id`.
    pub fn new(cluster_id: u64, id: NodeId, peers: Vec<SocketAddr>, key: Vec<u8>) -> TcpOptions {
        TcpOptions {
            cluster_id,
            id,
            peers,
            key,
            queue_bytes_max: 64 << 20,
            handshake_timeout: Duration::from_secs(5),
            reconnect_min: Duration::from_millis(20),
            reconnect_max: Duration::from_secs(2),
            connect_grace: Duration::from_secs(1),
            tls: None,
            message_bytes_max: MESSAGE_BYTES_MAX,
        }
    }
}

enum OutState {
    Idle {
        retry_at: Instant,
    },
    Connecting {
        stream: PeerStream,
        nonce_d: [u8; 16],
        since: Instant,
    },
    AwaitChallenge {
        stream: PeerStream,
        nonce_d: [u8; 16],
        since: Instant,
        rbuf: Vec<u8>,
    },
    Ready {
        stream: PeerStream,
    },
}

struct Outgoing {
    addr: SocketAddr,
    state: OutState,
    queue: VecDeque<Vec<u8>>,
    queued_bytes: usize,
    wbuf: Vec<u8>,
    wpos: usize,
    backoff: Duration,
    /// The connection broke, or a dial failed past the start's grace: until
    /// it is up again, messages for this peer are dropped, not queued (a
    /// restarted peer must not receive a backlog it no longer needs; the
    /// engine retransmits what matters).
    down: bool,
}

enum InState {
    AwaitHello,
    AwaitAuth {
        from: NodeId,
        nonce_d: [u8; 16],
        nonce_l: [u8; 16],
    },
    Ready {
        from: NodeId,
    },
}

struct Incoming {
    stream: PeerStream,
    addr: SocketAddr,
    state: InState,
    rbuf: Vec<u8>,
    since: Instant,
}

/// A replica's TCP endpoint.
pub struct TcpTransport {
    opts: TcpOptions,
    poll: Poll,
    events: Events,
    listener: TcpListener,
    out: Vec<Option<Outgoing>>,
    incoming: HashMap<Token, Incoming>,
    next_token: usize,
    notices: Vec<TransportEvent>,
    /// Incoming connections whose reads stopped at their per-event limit
    /// with bytes left: the edge-triggered poll will not report them again
    /// until more arrive, so the next `recv` reads them first.
    unfinished: Vec<Token>,
    /// When it was bound (see [`TcpOptions::connect_grace`]).
    started: Instant,
    urandom: std::fs::File,
}

fn mac(
    key: &[u8],
    label: &[u8],
    cluster: u64,
    from: NodeId,
    to: NodeId,
    nd: &[u8; 16],
    nl: &[u8; 16],
) -> Hmac<Sha256> {
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes any key length");
    m.update(label);
    m.update(&cluster.to_le_bytes());
    m.update(&from.to_le_bytes());
    m.update(&to.to_le_bytes());
    m.update(nd);
    m.update(nl);
    m
}

impl TcpTransport {
    /// Listens on this replica's peer address and starts dialling the others.
    pub fn bind(opts: TcpOptions) -> io::Result<TcpTransport> {
        let me = opts.id as usize;
        let addr = *opts.peers.get(me).ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidInput, "replica id out of range")
        })?;
        if opts.key.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the TCP transport needs a cluster key",
            ));
        }
        let mut opts = opts;
        opts.message_bytes_max = opts.message_bytes_max.clamp(4 << 10, MESSAGE_BYTES_MAX);
        let poll = Poll::new()?;
        let mut listener = TcpListener::bind(addr)
            .map_err(|e| io::Error::new(e.kind(), format!("listening for peers on {addr}: {e}")))?;
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)?;
        let now = Instant::now();
        let out = opts
            .peers
            .iter()
            .enumerate()
            .map(|(i, &a)| {
                (i != me).then(|| Outgoing {
                    addr: a,
                    state: OutState::Idle { retry_at: now },
                    queue: VecDeque::new(),
                    queued_bytes: 0,
                    wbuf: Vec::new(),
                    wpos: 0,
                    backoff: opts.reconnect_min,
                    down: false,
                })
            })
            .collect();
        let n = opts.peers.len();
        let mut t = TcpTransport {
            opts,
            poll,
            events: Events::with_capacity(256),
            listener,
            out,
            incoming: HashMap::new(),
            next_token: 1 + n,
            notices: Vec::new(),
            unfinished: Vec::new(),
            started: now,
            urandom: std::fs::File::open("/dev/urandom")?,
        };
        t.dial_due(now);
        Ok(t)
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Peers with an authenticated outgoing connection.
    pub fn connected(&self) -> Vec<NodeId> {
        self.out
            .iter()
            .enumerate()
            .filter(|(_, o)| {
                matches!(
                    o,
                    Some(Outgoing {
                        state: OutState::Ready { .. },
                        ..
                    })
                )
            })
            .map(|(i, _)| i as NodeId)
            .collect()
    }

    fn nonce(&mut self) -> [u8; 16] {
        let mut n = [0u8; 16];
        if self.urandom.read_exact(&mut n).is_err() {
            // /dev/urandom does not fail on Linux; fall back to the clock anyway.
            n[..16].copy_from_slice(&Instant::now().elapsed().as_nanos().to_le_bytes());
        }
        n
    }

    fn dial_due(&mut self, now: Instant) {
        for i in 0..self.out.len() {
            let due = matches!(&self.out[i], Some(Outgoing { state: OutState::Idle { retry_at }, .. }) if *retry_at <= now);
            if !due {
                continue;
            }
            let addr = self.out[i].as_ref().expect("checked").addr;
            let nonce_d = self.nonce();
            match TcpStream::connect(addr) {
                Ok(stream) => {
                    let token = Token(1 + i);
                    let mut stream =
                        match PeerStream::dialled(stream, addr, self.opts.tls.as_deref()) {
                            Ok(s) => s,
                            Err(e) => {
                                self.out_failed(i, now, Some(e.to_string()));
                                continue;
                            }
                        };
                    if self
                        .poll
                        .registry()
                        .register(stream.tcp(), token, Interest::WRITABLE | Interest::READABLE)
                        .is_ok()
                    {
                        let o = self.out[i].as_mut().expect("checked");
                        o.state = OutState::Connecting {
                            stream,
                            nonce_d,
                            since: now,
                        };
                    }
                }
                Err(_) => self.out_failed(i, now, None),
            }
        }
    }

    /// The outgoing connection to peer `i` failed: back off and dial again.
    fn out_failed(&mut self, i: usize, now: Instant, reason: Option<String>) {
        let o = self.out[i].as_mut().expect("a peer");
        let (stream, was_ready) =
            match std::mem::replace(&mut o.state, OutState::Idle { retry_at: now }) {
                OutState::Connecting { stream, .. } | OutState::AwaitChallenge { stream, .. } => {
                    (Some(stream), false)
                }
                OutState::Ready { stream } => (Some(stream), true),
                OutState::Idle { .. } => (None, false),
            };
        self.close_out(i, now, stream, was_ready, reason);
    }

    /// Drops the outgoing connection to peer `i` (its state is already taken)
    /// and schedules the next dial.
    fn close_out(
        &mut self,
        i: usize,
        now: Instant,
        stream: Option<PeerStream>,
        was_ready: bool,
        reason: Option<String>,
    ) {
        if let Some(mut stream) = stream {
            let _ = self.poll.registry().deregister(stream.tcp());
        }
        let o = self.out[i].as_mut().expect("a peer");
        o.state = OutState::Idle {
            retry_at: now + o.backoff,
        };
        o.backoff = (o.backoff * 2).min(self.opts.reconnect_max);
        // A partly written frame cannot be resumed on a new connection.
        o.wbuf.clear();
        o.wpos = 0;
        // A peer that does not answer (past the start's grace) is down: it
        // gets what is sent after it is back, not a backlog. (One that died
        // before its link first came up would otherwise receive every
        // message of its absence, up to `queue_bytes_max`, on its return.)
        if was_ready || now.saturating_duration_since(self.started) >= self.opts.connect_grace {
            o.down = true;
            o.queue.clear();
            o.queued_bytes = 0;
        }
        if was_ready {
            self.notices.push(TransportEvent::Lost {
                peer: i as NodeId,
                reason: reason.unwrap_or_else(|| "connection closed".into()),
            });
        } else if let Some(r) = reason {
            let addr = o.addr.to_string();
            self.notices
                .push(TransportEvent::Refused { addr, reason: r });
        }
    }

    fn on_outgoing(&mut self, i: usize, readable: bool, writable: bool, now: Instant) {
        let Some(o) = self.out[i].as_mut() else {
            return;
        };
        let state = std::mem::replace(&mut o.state, OutState::Idle { retry_at: now });
        match self.advance_out(i, state, readable, writable) {
            Ok(next) => {
                self.out[i].as_mut().expect("a peer").state = next;
                self.flush_peer(i, now);
            }
            Err((stream, was_ready, reason)) => {
                self.close_out(i, now, Some(stream), was_ready, reason)
            }
        }
    }

    /// One step of the dialer's side of the handshake, or of a ready
    /// connection. Err: close the stream (was it ready? why?).
    #[allow(clippy::type_complexity)]
    fn advance_out(
        &mut self,
        i: usize,
        state: OutState,
        readable: bool,
        writable: bool,
    ) -> Result<OutState, (PeerStream, bool, Option<String>)> {
        let me = self.opts.id;
        let peer = i as NodeId;
        match state {
            OutState::Connecting {
                mut stream,
                nonce_d,
                since,
            } => {
                if !writable {
                    return Ok(OutState::Connecting {
                        stream,
                        nonce_d,
                        since,
                    });
                }
                let tcp = stream.tcp();
                if tcp.take_error().ok().flatten().is_some() || tcp.peer_addr().is_err() {
                    return Err((stream, false, None));
                }
                let _ = tcp.set_nodelay(true);
                let mut hello = Vec::with_capacity(HELLO_LEN);
                hello.extend_from_slice(MAGIC);
                hello.extend_from_slice(&self.opts.cluster_id.to_le_bytes());
                hello.extend_from_slice(&me.to_le_bytes());
                hello.extend_from_slice(&peer.to_le_bytes());
                hello.extend_from_slice(&nonce_d);
                if stream.write_all(&hello).is_err() {
                    return Err((stream, false, None));
                }
                Ok(OutState::AwaitChallenge {
                    stream,
                    nonce_d,
                    since,
                    rbuf: Vec::new(),
                })
            }
            OutState::AwaitChallenge {
                mut stream,
                nonce_d,
                since,
                mut rbuf,
            } => {
                if readable {
                    let why = match read_some(&mut stream, &mut rbuf, CHALLENGE_LEN, false) {
                        Ok(true) => None,
                        Ok(false) => {
                            Some("the peer closed the connection during the handshake".into())
                        }
                        Err(e) => Some(format!("handshake: {e}")),
                    };
                    if why.is_some() {
                        return Err((stream, false, why));
                    }
                }
                if rbuf.len() < CHALLENGE_LEN {
                    return Ok(OutState::AwaitChallenge {
                        stream,
                        nonce_d,
                        since,
                        rbuf,
                    });
                }
                let mut nonce_l = [0u8; 16];
                nonce_l.copy_from_slice(&rbuf[..16]);
                let (key, cluster) = (&self.opts.key, self.opts.cluster_id);
                let ok = mac(key, b"listener", cluster, me, peer, &nonce_d, &nonce_l)
                    .verify_slice(&rbuf[16..48])
                    .is_ok();
                if !ok || rbuf.len() > CHALLENGE_LEN {
                    return Err((
                        stream,
                        false,
                        Some("the peer failed the challenge (wrong cluster key?)".into()),
                    ));
                }
                let auth = mac(key, b"dialer", cluster, me, peer, &nonce_d, &nonce_l)
                    .finalize()
                    .into_bytes();
                if stream.write_all(&auth).is_err() {
                    return Err((stream, true, None));
                }
                let o = self.out[i].as_mut().expect("a peer");
                o.backoff = self.opts.reconnect_min;
                o.down = false;
                self.notices.push(TransportEvent::Connected {
                    peer,
                    incoming: false,
                });
                Ok(OutState::Ready { stream })
            }
            OutState::Ready { mut stream } => {
                if readable {
                    // The listener never sends after the handshake: data or EOF means trouble.
                    let mut b = [0u8; 64];
                    match stream.read(&mut b) {
                        Ok(0) => {
                            return Err((
                                stream,
                                true,
                                Some("the peer closed the connection".into()),
                            ));
                        }
                        Ok(_) => {
                            return Err((
                                stream,
                                true,
                                Some("the peer sent data on a one-way connection".into()),
                            ));
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(e) => return Err((stream, true, Some(e.to_string()))),
                    }
                }
                Ok(OutState::Ready { stream })
            }
            idle @ OutState::Idle { .. } => Ok(idle),
        }
    }

    /// Writes everything queued for peer `i` (in one write when the socket takes it).
    fn flush_peer(&mut self, i: usize, now: Instant) {
        let Some(o) = self.out[i].as_mut() else {
            return;
        };
        let OutState::Ready { stream } = &mut o.state else {
            if let OutState::Connecting { stream, .. } | OutState::AwaitChallenge { stream, .. } =
                &mut o.state
            {
                // TLS handshake records that did not fit the socket at once.
                let _ = stream.flush_tls();
            }
            return;
        };
        if let Err(e) = stream.flush_tls() {
            return self.out_failed(i, now, Some(e.to_string()));
        }
        loop {
            if o.wpos >= o.wbuf.len() {
                o.wbuf.clear();
                o.wpos = 0;
                while let Some(f) = o.queue.pop_front() {
                    o.queued_bytes -= f.len();
                    o.wbuf.extend_from_slice(&f);
                    if o.wbuf.len() >= 1 << 20 {
                        break;
                    }
                }
                if o.wbuf.is_empty() {
                    return;
                }
            }
            match stream.write(&o.wbuf[o.wpos..]) {
                Ok(0) => return self.out_failed(i, now, Some("write returned 0".into())),
                Ok(n) => o.wpos += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return self.out_failed(i, now, Some(e.to_string())),
            }
        }
    }

    fn accept(&mut self, now: Instant) {
        loop {
            match self.listener.accept() {
                Ok((stream, addr)) => {
                    if self.incoming.len() >= INCOMING_MAX {
                        // The oldest connection still in its handshake makes
                        // room: a real peer's handshake takes milliseconds,
                        // so strangers that connect and say nothing cannot
                        // hold every place for the whole handshake timeout.
                        let oldest = self
                            .incoming
                            .iter()
                            .filter(|(_, c)| !matches!(c.state, InState::Ready { .. }))
                            .min_by_key(|(_, c)| c.since)
                            .map(|(t, _)| *t);
                        match oldest {
                            Some(t) => self.refuse(
                                t,
                                "too many connections: the oldest handshake not finished made room for a new one".into(),
                            ),
                            None => {
                                self.notices.push(TransportEvent::Refused {
                                    addr: addr.to_string(),
                                    reason: "too many connections".into(),
                                });
                                continue;
                            }
                        }
                    }
                    let token = Token(self.next_token);
                    self.next_token += 1;
                    let _ = stream.set_nodelay(true);
                    let tls = self.opts.tls.as_deref();
                    let interest = if tls.is_some() {
                        // Handshake records may wait for a writable socket.
                        Interest::READABLE | Interest::WRITABLE
                    } else {
                        Interest::READABLE
                    };
                    let Ok(mut stream) = PeerStream::accepted(stream, tls) else {
                        continue;
                    };
                    if self
                        .poll
                        .registry()
                        .register(stream.tcp(), token, interest)
                        .is_ok()
                    {
                        self.incoming.insert(
                            token,
                            Incoming {
                                stream,
                                addr,
                                state: InState::AwaitHello,
                                rbuf: Vec::new(),
                                since: now,
                            },
                        );
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(_) => return,
            }
        }
    }

    fn refuse(&mut self, token: Token, reason: String) {
        if let Some(mut c) = self.incoming.remove(&token) {
            let _ = self.poll.registry().deregister(c.stream.tcp());
            match c.state {
                InState::Ready { from } => self
                    .notices
                    .push(TransportEvent::Lost { peer: from, reason }),
                _ => self.notices.push(TransportEvent::Refused {
                    addr: c.addr.to_string(),
                    reason,
                }),
            }
        }
    }

    /// `closed`: the event says the peer closed or failed the connection
    /// (or nothing is known): read on to the end, whatever a short read
    /// says, since the read that returns its last bytes may also take the
    /// close, and no later event would tell of it.
    fn on_incoming(&mut self, token: Token, out: &mut Vec<Envelope>, closed: bool) {
        // Until the peer has authenticated, a read takes no more than the
        // handshake needs (garbage is refused before much is buffered); a
        // read that stopped at its cap may have left bytes behind (in the
        // socket, or decrypted in TLS), so it reads again.
        // At most three reads per event (the handshake's, then messages):
        // a peer that keeps its socket full cannot hold the loop.
        for _ in 0..3 {
            if !self.incoming_once(token, out, !closed) {
                return;
            }
        }
        if !self.unfinished.contains(&token) {
            self.unfinished.push(token);
        }
    }

    /// One read and what it completes. True: read again. `short_drains`:
    /// a short read may end it (see [`read_some`]; plain TCP only).
    fn incoming_once(&mut self, token: Token, out: &mut Vec<Envelope>, short_drains: bool) -> bool {
        let cluster = self.opts.cluster_id;
        let me = self.opts.id;
        let n = self.opts.peers.len() as NodeId;
        let max = self.opts.message_bytes_max;
        let Some(c) = self.incoming.get_mut(&token) else {
            return false;
        };
        if let Err(e) = c.stream.flush_tls() {
            self.refuse(token, e.to_string());
            return false;
        }
        let cap = match c.state {
            InState::Ready { .. } => max + 4,
            _ => HELLO_LEN + AUTH_LEN,
        };
        let short_drains = short_drains && c.stream.is_plain();
        let open = match read_some(&mut c.stream, &mut c.rbuf, cap, short_drains) {
            Ok(open) => open,
            Err(e) => {
                self.refuse(token, e.to_string());
                return false;
            }
        };
        let again = open && c.rbuf.len() >= cap;
        // Bytes of whole messages taken so far: removed from the buffer once,
        // at the end (a buffer of many messages drained one by one would be
        // moved once per message).
        let mut at = 0usize;
        loop {
            let Some(c) = self.incoming.get_mut(&token) else {
                return false;
            };
            match c.state {
                InState::AwaitHello => {
                    if c.rbuf.len() < HELLO_LEN {
                        if c.rbuf.len() >= 8 && &c.rbuf[..8] != MAGIC
                            || c.rbuf.len() < 8 && !MAGIC.starts_with(&c.rbuf)
                        {
                            return self.refused(token, "not a falcon peer (bad greeting)".into());
                        }
                        break;
                    }
                    let b = &c.rbuf;
                    if &b[..8] != MAGIC {
                        return self.refused(token, "not a falcon peer (bad greeting)".into());
                    }
                    let their_cluster = u64::from_le_bytes(b[8..16].try_into().expect("8 bytes"));
                    let from = u32::from_le_bytes(b[16..20].try_into().expect("4 bytes"));
                    let to = u32::from_le_bytes(b[20..24].try_into().expect("4 bytes"));
                    if their_cluster != cluster {
                        return self.refused(
                            token,
                            match crate::config::other_mode(cluster, their_cluster) {
                                Some(why) => format!("a peer of {why}"),
                                None => format!("a peer of another cluster ({their_cluster:#x})"),
                            },
                        );
                    }
                    if to != me || from >= n || from == me {
                        return self.refused(
                            token,
                            format!("impossible replica ids in the greeting (from {from} to {to})"),
                        );
                    }
                    // With TLS, the certificate must be the claimed replica's:
                    // it names that replica's peer address.
                    let ip = self.opts.peers[from as usize].ip();
                    if !c.stream.peer_names(ip) {
                        return self.refused(
                            token,
                            format!("a peer claiming to be replica {from} has a certificate that does not name {ip}, that replica's peer address"),
                        );
                    }
                    let b = &c.rbuf;
                    let mut nonce_d = [0u8; 16];
                    nonce_d.copy_from_slice(&b[24..40]);
                    c.rbuf.drain(..HELLO_LEN);
                    let nonce_l = {
                        let mut x = [0u8; 16];
                        let _ = self.urandom.read_exact(&mut x);
                        x
                    };
                    let c = self.incoming.get_mut(&token).expect("present");
                    let m = mac(
                        &self.opts.key,
                        b"listener",
                        cluster,
                        from,
                        me,
                        &nonce_d,
                        &nonce_l,
                    )
                    .finalize()
                    .into_bytes();
                    let mut challenge = nonce_l.to_vec();
                    challenge.extend_from_slice(&m);
                    if c.stream.write_all(&challenge).is_err() {
                        return self
                            .refused(token, "the peer went away during the handshake".into());
                    }
                    c.state = InState::AwaitAuth {
                        from,
                        nonce_d,
                        nonce_l,
                    };
                }
                InState::AwaitAuth {
                    from,
                    nonce_d,
                    nonce_l,
                } => {
                    if c.rbuf.len() < AUTH_LEN {
                        break;
                    }
                    let ok = mac(
                        &self.opts.key,
                        b"dialer",
                        cluster,
                        from,
                        me,
                        &nonce_d,
                        &nonce_l,
                    )
                    .verify_slice(&c.rbuf[..AUTH_LEN])
                    .is_ok();
                    if !ok {
                        return self.refused(
                            token,
                            format!("replica {from} failed authentication (wrong cluster key, or a replayed handshake?)"),
                        );
                    }
                    c.rbuf.drain(..AUTH_LEN);
                    c.state = InState::Ready { from };
                    // A newer connection from the same peer replaces an older one (it restarted).
                    let old: Vec<Token> = self
                        .incoming
                        .iter()
                        .filter(|(t, o)| {
                            **t != token
                                && matches!(o.state, InState::Ready { from: f } if f == from)
                        })
                        .map(|(t, _)| *t)
                        .collect();
                    for t in old {
                        if let Some(mut o) = self.incoming.remove(&t) {
                            let _ = self.poll.registry().deregister(o.stream.tcp());
                            self.notices.push(TransportEvent::Lost {
                                peer: from,
                                reason: "replaced by a newer connection".into(),
                            });
                        }
                    }
                    // The peer is up (it may have just restarted): dial it now
                    // instead of at the end of a long backoff, so what we send
                    // reaches it before its election timer runs out.
                    let min = self.opts.reconnect_min;
                    if let Some(Some(o)) = self.out.get_mut(from as usize) {
                        if let OutState::Idle { retry_at } = &mut o.state {
                            // (In the past: this turn's dial_due takes it.)
                            let now = Instant::now();
                            *retry_at = now.checked_sub(Duration::from_secs(1)).unwrap_or(now);
                            o.backoff = min;
                        }
                    }
                    self.notices.push(TransportEvent::Connected {
                        peer: from,
                        incoming: true,
                    });
                }
                InState::Ready { from } => {
                    let avail = c.rbuf.len() - at;
                    if avail < 4 {
                        break;
                    }
                    let len = u32::from_le_bytes(c.rbuf[at..at + 4].try_into().expect("4 bytes"))
                        as usize;
                    if len > max {
                        return self.refused(
                            token,
                            format!("replica {from} sent a frame of {len} bytes (limit {max})"),
                        );
                    }
                    if avail < 4 + len {
                        break;
                    }
                    let env = match message::decode(&c.rbuf[at + 4..at + 4 + len]) {
                        Ok(env) => env,
                        Err(e) => {
                            return self.refused(
                                token,
                                format!("replica {from} sent a malformed message: {e}"),
                            );
                        }
                    };
                    if env.cluster != cluster || env.from != from || env.to != me {
                        return self.refused(
                            token,
                            format!(
                                "replica {from} sent a message addressed as {} → {}",
                                env.from, env.to
                            ),
                        );
                    }
                    at += 4 + len;
                    out.push(env);
                }
            }
        }
        if let Some(c) = self.incoming.get_mut(&token) {
            c.rbuf.drain(..at);
        }
        if !open {
            self.refuse(token, "connection closed".into());
        }
        again
    }

    /// [`refuse`](Self::refuse), and read no more.
    fn refused(&mut self, token: Token, reason: String) -> bool {
        self.refuse(token, reason);
        false
    }

    fn expire(&mut self, now: Instant) {
        let limit = self.opts.handshake_timeout;
        let slow: Vec<Token> = self
            .incoming
            .iter()
            .filter(|(_, c)| {
                !matches!(c.state, InState::Ready { .. }) && now.duration_since(c.since) > limit
            })
            .map(|(t, _)| *t)
            .collect();
        for t in slow {
            self.refuse(t, "did not finish the handshake in time".into());
        }
        for i in 0..self.out.len() {
            let stuck = matches!(&self.out[i], Some(Outgoing { state: OutState::Connecting { since, .. } | OutState::AwaitChallenge { since, .. }, .. }) if now.duration_since(*since) > limit);
            if stuck {
                self.out_failed(i, now, Some("the handshake timed out".into()));
            }
        }
    }

    fn next_deadline(&self, now: Instant) -> Option<Instant> {
        let retry = self.out.iter().flatten().filter_map(|o| match o.state {
            OutState::Idle { retry_at } => Some(retry_at),
            _ => None,
        });
        let hs = self
            .incoming
            .values()
            .filter(|c| !matches!(c.state, InState::Ready { .. }))
            .map(|c| c.since + self.opts.handshake_timeout);
        retry.chain(hs).min().map(|t| t.max(now))
    }
}

/// Reads what is there into `buf` (up to `cap` bytes held). Ok(false) at EOF.
///
/// `short_drains`: a read that returns less than asked for has emptied the
/// socket, so the read that would only say "would block" is skipped. True
/// for a plain TCP socket: the edge-triggered poll reports any byte (or EOF)
/// that arrives after it. Not for TLS, whose reads return one record at a
/// time while more wait in the socket.
fn read_some(
    stream: &mut impl Read,
    buf: &mut Vec<u8>,
    cap: usize,
    short_drains: bool,
) -> io::Result<bool> {
    thread_local! {
        // Zeroed once per thread, not on every read.
        static CHUNK: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0u8; 64 << 10]);
    }
    CHUNK.with_borrow_mut(|chunk| {
        loop {
            if buf.len() >= cap {
                return Ok(true);
            }
            let want = chunk.len().min(cap - buf.len());
            match stream.read(&mut chunk[..want]) {
                Ok(0) => return Ok(false),
                Ok(n) => {
                    buf.extend_from_slice(&chunk[..n]);
                    if short_drains && n < want {
                        return Ok(true);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(true),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    })
}

impl Transport for TcpTransport {
    fn send(&mut self, env: &Envelope) -> Result<(), SendError> {
        let i = env.to as usize;
        let max = self.opts.queue_bytes_max;
        let Some(Some(o)) = self.out.get_mut(i) else {
            return Err(SendError::UnknownPeer(env.to));
        };
        if o.down {
            return Err(SendError::Down(env.to));
        }
        let mut frame = vec![0u8; 4];
        message::encode(env, &mut frame);
        let len = (frame.len() - 4) as u32;
        frame[..4].copy_from_slice(&len.to_le_bytes());
        if frame.len() > max {
            return Err(SendError::TooLarge {
                to: env.to,
                bytes: frame.len(),
                max,
            });
        }
        if o.queued_bytes + frame.len() > max {
            return Err(SendError::Full(env.to));
        }
        o.queued_bytes += frame.len();
        o.queue.push_back(frame);
        if o.queued_bytes >= EARLY_WRITE {
            self.flush_peer(i, Instant::now());
        }
        Ok(())
    }

    fn flush(&mut self) {
        let now = Instant::now();
        for i in 0..self.out.len() {
            self.flush_peer(i, now);
        }
    }

    fn recv(&mut self, timeout: Duration, out: &mut Vec<Envelope>) -> io::Result<()> {
        self.flush();
        let now = Instant::now();
        let deadline = now + timeout;
        for token in std::mem::take(&mut self.unfinished) {
            self.on_incoming(token, out, true);
        }
        let wait = if out.is_empty() {
            self.next_deadline(now)
                .map_or(deadline, |d| d.min(deadline))
                .saturating_duration_since(now)
        } else {
            Duration::ZERO
        };
        let mut events = std::mem::replace(&mut self.events, Events::with_capacity(0));
        let polled = self.poll.poll(&mut events, Some(wait));
        let now = Instant::now();
        if let Err(e) = polled {
            self.events = events;
            return if e.kind() == io::ErrorKind::Interrupted {
                Ok(())
            } else {
                Err(e)
            };
        }
        let n = self.opts.peers.len();
        for ev in events.iter() {
            let t = ev.token();
            if t == LISTENER {
                self.accept(now);
            } else if t.0 <= n {
                self.on_outgoing(
                    t.0 - 1,
                    ev.is_readable() || ev.is_read_closed(),
                    ev.is_writable() || ev.is_error(),
                    now,
                );
            } else {
                self.on_incoming(t, out, ev.is_read_closed() || ev.is_error());
            }
        }
        self.events = events;
        self.expire(now);
        self.dial_due(now);
        Ok(())
    }

    fn events(&mut self) -> Vec<TransportEvent> {
        std::mem::take(&mut self.notices)
    }

    fn id(&self) -> NodeId {
        self.opts.id
    }

    /// A connection left with bytes to read (see `unfinished`): no sleep.
    fn before_sleep(&mut self) -> bool {
        self.unfinished.is_empty()
    }
}

impl AsRawFd for TcpTransport {
    /// The epoll descriptor: readable when `recv` has something to do, so a
    /// node's own event loop can wait on it.
    fn as_raw_fd(&self) -> RawFd {
        self.poll.as_raw_fd()
    }
}
