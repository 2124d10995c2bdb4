//! The rdma transport: the shm ring protocol over RDMA verbs.
//!
//! Each pair of replicas has one reliable-connected queue pair and two
//! rings per direction's worth of memory, both registered for remote
//! writes, laid out exactly as a shm [`Ring`]:
//!
//! * the receiver's *in-ring*, into which the sender writes records and then
//!   `write_pos` with one-sided RDMA WRITEs (the last one carries immediate
//!   data, so a sleeping receiver gets a completion that wakes it);
//! * the sender's *out-ring*, its own copy it builds records in (the source
//!   of the writes), into whose header the receiver writes back its
//!   `read_pos`: flow control, so the sender never overwrites what the
//!   receiver has not consumed.
//!
//! The queue pairs are set up over the authenticated TCP peer link
//! ([`TcpTransport`]): each side sends a [`Message::LinkSetup`] naming its
//! queue pair, GID and the addresses and keys of its two rings. A queue pair
//! error is a lost peer; the link is rebuilt (new queue pair, new rings) and
//! announced again. Records carry sequence numbers and CRC32C, as on shm, so
//! a damaged or stale record is never taken for a new one.

pub mod verbs;

use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use bytes::Bytes;

use self::verbs::{Device, Endpoint, QueuePair, Region, VerbsError, Write};
use super::ring::{HEADER, READ_POS, Ring, WRITE_POS};
use super::shm::PollMode;
use super::tcp::{TcpOptions, TcpTransport};
use super::{SendError, Transport, TransportEvent};
use crate::consensus::{Envelope, Message, NodeId, message};

/// Chains of writes in flight per link at most (each uses one staging slot).
const INFLIGHT_MAX: usize = 32;
/// Staging slots per link (more than `INFLIGHT_MAX`: a slot is reused only
/// after its write completed).
const STAGE_SLOTS: usize = 64;
/// Receives kept posted per link (each RDMA WRITE with immediate uses one).
const RECVS: usize = 128;
/// Announce an unanswered link again after this long.
const HELLO_EVERY: Duration = Duration::from_millis(200);
const MAGIC: &[u8; 8] = b"FRDMA\x00\x00\x01";
/// Where, in the header of a sender's out-ring, the receiver writes its
/// owner word (`view << 8 | leader + 1`): the fence the sender checks before
/// a log write. (The ring itself uses offsets 0–24, 64–80 and 128–136.)
const OWNER_WORD: usize = 192;

/// Settings of one rdma endpoint.
#[derive(Clone, Debug)]
pub struct RdmaOptions {
    /// The cluster.
    pub cluster_id: u64,
    /// This replica.
    pub id: NodeId,
    /// Every replica's TCP peer address (for setting up the links).
    pub peers: Vec<SocketAddr>,
    /// The shared cluster key (authenticates the TCP link).
    pub key: Vec<u8>,
    /// The RDMA device (None: the first one).
    pub device: Option<String>,
    /// Bytes of each ring's data area (a power of two).
    pub ring_bytes: usize,
    /// How a receiver waits.
    pub poll: PollMode,
    /// How long `adaptive` spins before it sleeps.
    pub spin: Duration,
}

impl RdmaOptions {
    /// Defaults: the first device, 16 MiB rings, adaptive polling with 50 µs of spinning.
    pub fn new(cluster_id: u64, id: NodeId, peers: Vec<SocketAddr>, key: Vec<u8>) -> RdmaOptions {
        RdmaOptions {
            cluster_id,
            id,
            peers,
            key,
            device: None,
            ring_bytes: 16 << 20,
            poll: PollMode::Adaptive,
            spin: Duration::from_micros(50),
        }
    }
}

/// What a peer announced: its queue pair and rings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Hello {
    /// Grows with every link the peer makes; an older one is stale.
    generation: u64,
    ep: Endpoint,
    /// The peer's in-ring (we write records there).
    in_addr: u64,
    in_rkey: u32,
    /// The peer's out-ring (we write our read position there).
    out_addr: u64,
    out_rkey: u32,
    /// Data bytes of its rings.
    capacity: u32,
    /// The generation of the receiver's link the sender is connected to (0:
    /// none). When it is not the receiver's current one, the sender has not
    /// heard of that link yet, and the receiver announces it again.
    connected_to: u64,
}

impl Hello {
    fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(96);
        v.extend_from_slice(MAGIC);
        v.extend_from_slice(&self.generation.to_le_bytes());
        v.extend_from_slice(&self.ep.qpn.to_le_bytes());
        v.extend_from_slice(&self.ep.psn.to_le_bytes());
        v.extend_from_slice(&self.ep.gid);
        v.extend_from_slice(&u32::from(self.ep.lid).to_le_bytes());
        v.extend_from_slice(&self.in_addr.to_le_bytes());
        v.extend_from_slice(&self.in_rkey.to_le_bytes());
        v.extend_from_slice(&self.out_addr.to_le_bytes());
        v.extend_from_slice(&self.out_rkey.to_le_bytes());
        v.extend_from_slice(&self.capacity.to_le_bytes());
        v.extend_from_slice(&0u32.to_le_bytes()); // reserved
        v.extend_from_slice(&self.connected_to.to_le_bytes());
        v
    }

    fn decode(b: &[u8]) -> Option<Hello> {
        if b.len() != 84 || &b[..8] != MAGIC {
            return None;
        }
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"));
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        let lid = u32_at(40);
        Some(Hello {
            generation: u64_at(8),
            ep: Endpoint {
                qpn: u32_at(16),
                psn: u32_at(20) & 0xff_ffff,
                gid: b[24..40].try_into().expect("16 bytes"),
                lid: u16::try_from(lid).ok()?,
            },
            in_addr: u64_at(44),
            in_rkey: u32_at(52),
            out_addr: u64_at(56),
            out_rkey: u32_at(64),
            capacity: u32_at(68),
            connected_to: u64_at(76),
        })
        .filter(|h| {
            // The peer's rings lie inside the address space: every remote
            // address computed from them (header + position) fits a u64.
            let span = HEADER as u64 + u64::from(h.capacity);
            u32_at(72) == 0
                && h.capacity.is_power_of_two()
                && h.in_addr.checked_add(span).is_some()
                && h.out_addr.checked_add(span).is_some()
        })
    }
}

/// One peer's queue pair and rings. Field order is drop order: the queue
/// pair goes before the memory it writes.
struct Link {
    qp: QueuePair,
    in_ring: Ring,
    in_mem: Region,
    out_ring: Ring,
    out_mem: Region,
    stage: Region,
    stage_next: usize,
    generation: u64,
    /// Names this link's work requests (`wr_id`), so completions of a dropped link are ignored.
    tag: u64,
    psn: u32,
    remote: Option<Hello>,
    /// Bytes of the out-ring already posted to the peer.
    sent: u64,
    /// The read position last written back to the peer.
    reported: u64,
    inflight: usize,
    hello_at: Option<Instant>,
    /// Names the link in notices.
    name: String,
}

/// One replica's rdma endpoint.
pub struct RdmaTransport {
    // Drop order: links (queue pairs, memory), then TCP, then the device.
    links: Vec<Option<Link>>,
    tcp: TcpTransport,
    dev: Device,
    opts: RdmaOptions,
    /// The newest generation each peer announced.
    seen: Vec<u64>,
    last_generation: u64,
    next_tag: u64,
    /// Per peer: no new link before this (after making one failed).
    retry_at: Vec<Option<Instant>>,
    notices: Vec<TransportEvent>,
    buf: Vec<u8>,
    /// Where `send` encodes (kept between calls).
    scratch: Vec<u8>,
    wc: Vec<ibverbs_sys::ibv_wc>,
    /// The view this replica follows; log writes of older views are refused.
    granted: u64,
    /// Our owner word, written into every connected peer's out-ring.
    owner: u64,
    /// Log writes refused by fencing, as writer and as reader.
    revoked: u64,
    /// Why polling the completion queue failed: the queue every link
    /// shares is unusable, so `recv` reports it and the replica stops (a
    /// restart opens the device again).
    cq_failed: Option<String>,
}

fn wr_id(generation: u64, recv: bool, peer: usize) -> u64 {
    (generation << 8) | (u64::from(recv) << 7) | peer as u64
}

impl RdmaTransport {
    /// Opens the device and starts the TCP link that sets up queue pairs.
    pub fn bind(opts: RdmaOptions) -> Result<RdmaTransport, VerbsError> {
        let n = opts.peers.len();
        let dev = Device::open(opts.device.as_deref(), 4096)?;
        // Fail now, not link by link later, when rings cannot be registered.
        let len = HEADER + opts.ring_bytes.next_power_of_two();
        drop(dev.register(len).map_err(|e| VerbsError::Call {
            verb: "registering ring memory (is `ulimit -l` below the ring size?)",
            source: match e {
                VerbsError::Call { source, .. } => source,
                VerbsError::NoDevice(m) => std::io::Error::other(m),
            },
        })?);
        let tcp = TcpTransport::bind(TcpOptions::new(
            opts.cluster_id,
            opts.id,
            opts.peers.clone(),
            opts.key.clone(),
        ))
        .map_err(|source| VerbsError::Call {
            verb: "listening on the peer address",
            source,
        })?;
        Ok(RdmaTransport {
            links: (0..n).map(|_| None).collect(),
            tcp,
            dev,
            seen: vec![0; n],
            last_generation: 0,
            next_tag: 0,
            retry_at: vec![None; n],
            notices: Vec::new(),
            cq_failed: None,
            buf: Vec::new(),
            scratch: Vec::new(),
            wc: vec![ibverbs_sys::ibv_wc::default(); 64],
            granted: 0,
            owner: 0,
            revoked: 0,
            opts,
        })
    }

    /// The device in use.
    pub fn device(&self) -> &str {
        &self.dev.name
    }

    /// The descriptors an event loop waits on: the TCP link's and the
    /// completion channel's (readable when a peer wrote to us).
    pub fn fds(&self) -> [RawFd; 2] {
        [self.tcp.as_raw_fd(), self.dev.event_fd()]
    }

    /// The peers whose queue pair is connected.
    pub fn connected(&self) -> Vec<NodeId> {
        (0..self.links.len())
            .filter(|&p| self.links[p].as_ref().is_some_and(|l| l.remote.is_some()))
            .map(|p| p as NodeId)
            .collect()
    }

    fn next_generation(&mut self) -> u64 {
        // Wall-clock nanoseconds, so a restarted replica's links are newer
        // (and `seen` is forgotten when a peer's TCP link comes back, for a
        // clock stepped back across a restart).
        let g = crate::log::now_ns().max(self.last_generation + 1);
        self.last_generation = g;
        g
    }

    /// A new queue pair and fresh rings for `peer`.
    fn make_link(&mut self, peer: usize) -> Result<Link, VerbsError> {
        let generation = self.next_generation();
        self.next_tag = (self.next_tag + 1) & ((1 << 56) - 1);
        let tag = self.next_tag;
        let qp = self.dev.queue_pair(256, RECVS as u32)?;
        let len = HEADER + self.opts.ring_bytes.next_power_of_two();
        let in_mem = self.dev.register(len)?;
        let out_mem = self.dev.register(len)?;
        let stage = self.dev.register(STAGE_SLOTS * 16)?;
        // SAFETY: fresh registered memory of `len` bytes, owned by the link.
        let (in_ring, out_ring) = unsafe {
            (
                Ring::init(in_mem.ptr, len, generation),
                Ring::init(out_mem.ptr, len, generation),
            )
        };
        qp.post_recvs(RECVS, wr_id(tag, true, peer))?;
        Ok(Link {
            qp,
            in_ring,
            in_mem,
            out_ring,
            out_mem,
            stage,
            stage_next: 0,
            generation,
            tag,
            psn: (generation as u32) & 0xff_ffff,
            remote: None,
            sent: 0,
            reported: 0,
            inflight: 0,
            hello_at: None,
            name: format!("rdma link from replica {peer}"),
        })
    }

    fn hello_of(&self, l: &Link) -> Hello {
        Hello {
            generation: l.generation,
            ep: Endpoint {
                qpn: l.qp.qpn(),
                psn: l.psn,
                gid: self.dev.gid,
                lid: self.dev.lid,
            },
            in_addr: l.in_mem.addr(),
            in_rkey: l.in_mem.rkey(),
            out_addr: l.out_mem.addr(),
            out_rkey: l.out_mem.rkey(),
            capacity: l.in_ring.capacity() as u32,
            connected_to: l.remote.map_or(0, |r| r.generation),
        }
    }

    /// Sends our link's announcement to `peer` over TCP (if the link is up to it).
    fn announce(&mut self, peer: usize) {
        let Some(l) = &self.links[peer] else {
            return;
        };
        let data = Bytes::from(self.hello_of(l).encode());
        let env = Envelope {
            cluster: self.opts.cluster_id,
            from: self.opts.id,
            to: peer as NodeId,
            msg: Message::LinkSetup { view: 0, data },
        };
        let _ = self.tcp.send(&env);
        self.tcp.flush();
        if let Some(l) = &mut self.links[peer] {
            l.hello_at = Some(Instant::now());
        }
    }

    /// Makes a link to `peer` if there is none (not announced); false if
    /// there is none and making one failed (it is tried again a second later).
    fn have_link(&mut self, peer: usize) -> bool {
        if self.links[peer].is_some() {
            return true;
        }
        if self.retry_at[peer].is_some_and(|t| Instant::now() < t) {
            return false;
        }
        match self.make_link(peer) {
            Ok(l) => {
                self.links[peer] = Some(l);
                self.retry_at[peer] = None;
                true
            }
            Err(e) => {
                if self.retry_at[peer].is_none() {
                    self.notices.push(TransportEvent::Lost {
                        peer: peer as NodeId,
                        reason: format!(
                            "cannot make a queue pair: {e} (trying again every second)"
                        ),
                    });
                }
                self.retry_at[peer] = Some(Instant::now() + Duration::from_secs(1));
                false
            }
        }
    }

    /// Makes a link to `peer` if there is none, and announces it.
    fn ensure_link(&mut self, peer: usize) {
        if self.have_link(peer) {
            self.announce(peer);
        }
    }

    /// The link to `peer` failed: drop it, make a new one and announce it.
    fn broken(&mut self, peer: usize, reason: String) {
        let was_up = self.links[peer].take().is_some_and(|l| l.remote.is_some());
        if was_up {
            self.notices.push(TransportEvent::Lost {
                peer: peer as NodeId,
                reason,
            });
        }
        self.ensure_link(peer);
    }

    fn on_hello(&mut self, peer: usize, data: &[u8]) {
        let Some(h) = Hello::decode(data) else {
            self.notices.push(TransportEvent::Refused {
                addr: format!("replica {peer}"),
                reason: "malformed rdma link setup".into(),
            });
            return;
        };
        if h.generation < self.seen[peer] {
            return; // an announcement older than one we already acted on
        }
        self.seen[peer] = h.generation;
        let cap = self.opts.ring_bytes.next_power_of_two() as u32;
        if h.capacity != cap {
            self.notices.push(TransportEvent::Refused {
                addr: format!("replica {peer}"),
                reason: format!(
                    "its rdma rings hold {} bytes, ours {cap}: every replica needs the same ring size",
                    h.capacity
                ),
            });
            return;
        }
        let state = self.links[peer].as_ref().map(|l| l.remote);
        let same_link = |r: &Hello| {
            Hello {
                connected_to: 0,
                ..*r
            } == Hello {
                connected_to: 0,
                ..h
            }
        };
        match state {
            Some(Some(r)) if same_link(&r) => {
                // The link we are connected to; if the peer has not heard of
                // ours yet (our announcement was lost), tell it again.
                if self.links[peer]
                    .as_ref()
                    .is_some_and(|l| l.generation != h.connected_to)
                {
                    self.announce(peer);
                }
                return;
            }
            Some(None) => {}
            // Connected to an older link of the peer (it restarted or rebuilt): start over.
            // A fresh link is not announced before it is connected: an
            // announcement of an unconnected link would make the peer rebuild
            // in turn, and two replicas could chase each other for ever.
            Some(Some(_)) => {
                self.links[peer] = None;
                self.notices.push(TransportEvent::Lost {
                    peer: peer as NodeId,
                    reason: "it made a new rdma link".into(),
                });
                if !self.have_link(peer) {
                    return;
                }
            }
            None => {
                if !self.have_link(peer) {
                    return;
                }
            }
        }
        let Some(l) = &mut self.links[peer] else {
            return;
        };
        if h.connected_to != 0 && h.connected_to != l.generation {
            // Its link is connected to an older one of ours: connecting to it
            // would fail. Announce ours; the peer makes a new link for it.
            self.announce(peer);
            return;
        }
        match l.qp.connect(&self.dev, &h.ep, l.psn) {
            Ok(()) => {
                let answer = l.generation != h.connected_to;
                l.remote = Some(h);
                self.notices.push(TransportEvent::Connected {
                    peer: peer as NodeId,
                    incoming: false,
                });
                if answer {
                    self.announce(peer);
                }
                self.tell_owner(peer);
            }
            Err(e) => {
                let reason = format!("connecting the queue pair: {e}");
                self.links[peer] = None;
                self.notices.push(TransportEvent::Lost {
                    peer: peer as NodeId,
                    reason,
                });
            }
        }
    }

    /// Takes completions: frees write slots, re-posts receives, notices failed links.
    fn reap(&mut self) {
        loop {
            let n = match self.dev.poll(&mut self.wc) {
                Ok(n) => n,
                Err(e) => {
                    self.cq_failed.get_or_insert_with(|| e.to_string());
                    return;
                }
            };
            for i in 0..n {
                let wc = self.wc[i];
                let id = wc.wr_id();
                let (generation, recv, peer) = (id >> 8, id & 0x80 != 0, (id & 0x7f) as usize);
                let Some(l) = self.links.get_mut(peer).and_then(|l| l.as_mut()) else {
                    continue;
                };
                if l.tag != generation {
                    continue; // a link already dropped
                }
                if let Some((status, vendor)) = wc.error() {
                    self.broken(
                        peer,
                        format!("rdma completion error {status} (vendor {vendor:#x})"),
                    );
                    continue;
                }
                if recv {
                    if let Err(e) = l.qp.post_recvs(1, id) {
                        self.broken(peer, format!("re-posting a receive: {e}"));
                    }
                } else {
                    l.inflight = l.inflight.saturating_sub(1);
                }
            }
            if n < self.wc.len() {
                return;
            }
        }
    }

    /// Stages `bytes` in the next slot of `l`'s staging region; its address.
    fn stage(l: &mut Link, bytes: &[u8]) -> u64 {
        let at = (l.stage_next % STAGE_SLOTS) * 16;
        l.stage_next += 1;
        // SAFETY: inside the 16-byte slot of the staging region, which no
        // write in flight reads (fewer chains in flight than slots).
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), l.stage.ptr.add(at), bytes.len());
        }
        l.stage.addr() + at as u64
    }

    /// Posts what `peer`'s out-ring has published and the peer has not got.
    fn post(&mut self, peer: usize) {
        let Some(l) = self.links[peer].as_mut() else {
            return;
        };
        let Some(r) = l.remote else {
            return;
        };
        l.out_ring.publish();
        let wp = l.out_ring.published();
        if wp == l.sent || l.inflight >= INFLIGHT_MAX {
            return;
        }
        let cap = l.out_ring.capacity() as u64;
        let at = l.sent & (cap - 1);
        let Some(len) = wp.checked_sub(l.sent).filter(|&n| n <= cap) else {
            // Only a peer writing where it must not can do this.
            self.broken(
                peer,
                format!("the out-ring's write position ({wp}) is not ours"),
            );
            return;
        };
        let first = len.min(cap - at);
        let data = l.out_mem.addr() + HEADER as u64;
        let rdata = r.in_addr + HEADER as u64;
        let mut writes = vec![Write {
            local: data + at,
            lkey: l.out_mem.lkey(),
            len: first as u32,
            remote: rdata + at,
            rkey: r.in_rkey,
        }];
        if len > first {
            writes.push(Write {
                local: data,
                lkey: l.out_mem.lkey(),
                len: (len - first) as u32,
                remote: rdata,
                rkey: r.in_rkey,
            });
        }
        // write_pos and write_seq as they are now: the live header may move on
        // before the device reads it.
        let mut head = [0u8; 16];
        // SAFETY: 16 header bytes of the out-ring at WRITE_POS.
        unsafe {
            std::ptr::copy_nonoverlapping(l.out_mem.ptr.add(WRITE_POS), head.as_mut_ptr(), 16)
        };
        let staged = Self::stage(l, &head);
        writes.push(Write {
            local: staged,
            lkey: l.stage.lkey(),
            len: 16,
            remote: r.in_addr + WRITE_POS as u64,
            rkey: r.in_rkey,
        });
        let id = wr_id(l.tag, false, peer);
        match l.qp.post_writes(&writes, id, Some(0)) {
            Ok(()) => {
                l.sent = wp;
                l.inflight += 1;
            }
            Err(e) => self.broken(peer, format!("posting writes: {e}")),
        }
    }

    /// Writes one 8-byte word into `peer`'s out-ring header at `offset`
    /// (one-sided, staged first); false when the link is not up or full.
    fn write_word(&mut self, peer: usize, offset: usize, word: u64, what: &str) -> bool {
        let Some(l) = self.links[peer].as_mut() else {
            return false;
        };
        let Some(r) = l.remote else {
            return false;
        };
        if l.inflight >= INFLIGHT_MAX {
            return false;
        }
        let staged = Self::stage(l, &word.to_le_bytes());
        let w = Write {
            local: staged,
            lkey: l.stage.lkey(),
            len: 8,
            remote: r.out_addr + offset as u64,
            rkey: r.out_rkey,
        };
        let id = wr_id(l.tag, false, peer);
        match l.qp.post_writes(&[w], id, None) {
            Ok(()) => {
                l.inflight += 1;
                true
            }
            Err(e) => {
                self.broken(peer, format!("posting {what}: {e}"));
                false
            }
        }
    }

    /// Writes our read position back into `peer`'s out-ring when it moved.
    fn report(&mut self, peer: usize) {
        let Some(l) = self.links[peer].as_ref() else {
            return;
        };
        let consumed = l.in_ring.consumed();
        if consumed != l.reported && self.write_word(peer, READ_POS, consumed, "the read position")
        {
            if let Some(l) = self.links[peer].as_mut() {
                l.reported = consumed;
            }
        }
    }

    /// Writes our owner word into `peer`'s out-ring: its fence for log writes
    /// to us (when the link is full, the next grant or link says it again).
    fn tell_owner(&mut self, peer: usize) {
        if self.owner != 0 {
            self.write_word(peer, OWNER_WORD, self.owner, "the owner word");
        }
    }

    /// Log writes refused so far because their view was fenced off.
    pub fn revoked(&self) -> u64 {
        self.revoked
    }

    /// Takes every record the peers wrote; true if any.
    fn drain(&mut self, out: &mut Vec<Envelope>) -> bool {
        let mut any = false;
        for peer in 0..self.links.len() {
            let Some(l) = self.links[peer].as_mut() else {
                continue;
            };
            if l.remote.is_none() {
                continue;
            }
            let check = super::RingCheck {
                cluster: self.opts.cluster_id,
                from: peer as NodeId,
                me: self.opts.id,
                granted: self.granted,
                addr: &l.name,
            };
            any |= super::drain_ring(
                &mut l.in_ring,
                &mut self.buf,
                &check,
                out,
                &mut self.notices,
                &mut self.revoked,
            );
            self.report(peer);
        }
        any
    }

    fn any_ready(&self) -> bool {
        self.links
            .iter()
            .flatten()
            .any(|l| l.remote.is_some() && l.in_ring.ready())
    }

    /// The TCP side: link announcements, events, and (from peers that run
    /// TCP only) engine messages.
    fn pump_tcp(&mut self, out: &mut Vec<Envelope>) -> std::io::Result<()> {
        let mut got = Vec::new();
        self.tcp.recv(Duration::ZERO, &mut got)?;
        for env in got {
            if let Message::LinkSetup { data, .. } = &env.msg {
                self.on_hello(env.from as usize, data);
            } else {
                out.push(env);
            }
        }
        for ev in self.tcp.events() {
            match ev {
                TransportEvent::Connected { peer, incoming } => {
                    // A (new) TCP link: tell the peer about our queue pair.
                    let p = peer as usize;
                    if incoming {
                        // Perhaps a restarted peer, whose clock may be behind.
                        self.seen[p] = 0;
                    }
                    if self.links[p].as_ref().is_none_or(|l| l.remote.is_none()) {
                        self.ensure_link(p);
                    }
                }
                TransportEvent::Refused { .. } => self.notices.push(ev),
                TransportEvent::Lost { .. } => {} // the rdma link says when it is lost
            }
        }
        let now = Instant::now();
        for p in 0..self.links.len() {
            if p == self.opts.id as usize {
                continue;
            }
            let due = match &self.links[p] {
                None => true,
                Some(l) => l.remote.is_none() && l.hello_at.is_none_or(|t| now - t >= HELLO_EVERY),
            };
            if due {
                self.ensure_link(p);
            }
        }
        Ok(())
    }

    fn wait(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        if super::spin(self.opts.poll, self.opts.spin, timeout, || self.any_ready()).is_some() {
            return;
        }
        if self.dev.arm().is_err() || self.any_ready() {
            return;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        let mut fds = [
            libc::pollfd {
                fd: self.tcp.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: self.dev.event_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        let ms = left.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32;
        // SAFETY: two valid pollfds.
        unsafe { libc::poll(fds.as_mut_ptr(), 2, ms) };
    }
}

impl Transport for RdmaTransport {
    fn send(&mut self, env: &Envelope) -> Result<(), SendError> {
        let to = env.to as usize;
        if to >= self.links.len() || to == self.opts.id as usize {
            return Err(SendError::UnknownPeer(env.to));
        }
        let Some(l) = self.links[to].as_mut().filter(|l| l.remote.is_some()) else {
            return Err(SendError::Down(env.to));
        };
        if super::is_log_write(&env.msg) {
            // The receiver's fence, written into our memory by the receiver.
            // SAFETY: 8-aligned word inside the out-ring's header.
            let owner = unsafe {
                (*(l.out_mem.ptr.add(OWNER_WORD) as *const std::sync::atomic::AtomicU64))
                    .load(std::sync::atomic::Ordering::Acquire)
            };
            if !super::owner_admits(owner, env.msg.view(), self.opts.id) {
                self.revoked += 1;
                return Err(SendError::Revoked(env.to));
            }
        }
        let mut bytes = std::mem::take(&mut self.scratch);
        bytes.clear();
        message::encode(env, &mut bytes);
        let sent = l.out_ring.send(env.to, &bytes);
        if bytes.capacity() <= 1 << 20 {
            self.scratch = bytes; // reused: no allocation per message
        }
        sent?;
        Ok(())
    }

    fn flush(&mut self) {
        for p in 0..self.links.len() {
            self.post(p);
        }
    }

    fn recv(&mut self, timeout: Duration, out: &mut Vec<Envelope>) -> std::io::Result<()> {
        self.dev.take_events();
        self.reap();
        if let Some(why) = &self.cq_failed {
            // Every link's completions go through this queue: without it no
            // write is known to have landed and no slot is ever freed.
            return Err(std::io::Error::other(format!(
                "the RDMA completion queue failed ({why}); restart the replica to open the device again"
            )));
        }
        self.flush();
        self.pump_tcp(out)?;
        let got = self.drain(out);
        // Bytes the TCP side left unread (its capped reads) are read at
        // once, without waiting for readiness that will not come again.
        if !got && out.is_empty() && !timeout.is_zero() && self.tcp.before_sleep() {
            self.wait(timeout);
            self.dev.take_events();
            self.reap();
            self.pump_tcp(out)?;
            self.drain(out);
        }
        self.flush();
        Ok(())
    }

    fn before_sleep(&mut self) -> bool {
        // The next completion (a peer's write with immediate) makes the
        // channel's descriptor readable. Completions that came before the
        // arming raise no event: take them now (they may free room for
        // writes still waiting to be posted).
        if self.dev.arm().is_err() {
            return false;
        }
        self.reap();
        self.flush();
        !self.any_ready() && self.tcp.before_sleep()
    }

    fn events(&mut self) -> Vec<TransportEvent> {
        std::mem::take(&mut self.notices)
    }

    fn id(&self) -> NodeId {
        self.opts.id
    }

    fn grant(&mut self, view: u64, leader: Option<NodeId>) {
        self.granted = self.granted.max(view);
        self.owner = view << 8 | leader.map_or(0, |l| u64::from(l) + 1);
        for p in 0..self.links.len() {
            self.tell_owner(p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hello_round_trips_and_garbage_is_refused() {
        let h = Hello {
            generation: 77,
            ep: Endpoint {
                qpn: 0x11,
                psn: 0x123456,
                gid: [9; 16],
                lid: 3,
            },
            in_addr: 0x7f00_0000_1000,
            in_rkey: 5,
            out_addr: 0x7f00_0000_9000,
            out_rkey: 6,
            capacity: 1 << 20,
            connected_to: 76,
        };
        let b = h.encode();
        assert_eq!(Hello::decode(&b), Some(h));
        assert_eq!(Hello::decode(&b[..83]), None);
        let mut bad = b.clone();
        bad[0] ^= 1;
        assert_eq!(Hello::decode(&bad), None);
        let mut odd = b;
        odd[68..72].copy_from_slice(&3u32.to_le_bytes());
        assert_eq!(
            Hello::decode(&odd),
            None,
            "a capacity that is not a power of two"
        );
    }
}
