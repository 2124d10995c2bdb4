//! A backup's per-flow TCP translation.
//!
//! Every VM receives the same inbound frames, but each guest picks its own
//! initial sequence numbers (and timestamps), so a backup's guest sends
//! different sequence numbers than the leader's — the one the client talks
//! to. For each TCP flow a backup learns:
//!
//! * its own guest's ISN, from the SYN-ACK its guest sends (outbound, then
//!   dropped), and
//! * the leader guest's ISN, from the client's first acknowledgement (the
//!   client acknowledges the leader's SYN-ACK: `ack = leader ISN + 1`),
//!
//! and rewrites every later inbound frame of the flow: the acknowledgement
//! number and SACK blocks move by `own ISN − leader ISN`, the timestamp echo
//! by the matching timestamp offset, and the TCP checksum is recomputed.
//! Frames of a flow wait until the backup's own SYN-ACK went out; an
//! acknowledgement waits until the backup's guest has sent the bytes it
//! acknowledges. Everything that is not IPv4/TCP passes unchanged.
//!
//! The leader runs the same table (its offsets are 0: the client
//! acknowledges its own guest's ISN). After a failover the new leader keeps
//! translating flows it joined as a backup, both ways: inbound as before,
//! and its guest's outbound frames back into the numbering the client knows
//! ([`Translator::rewrite_out`]).

use std::collections::{HashMap, VecDeque};

use crate::capture::checksum;

/// The most frames held for one flow (beyond, the oldest is dropped).
const HELD_MAX: usize = 1024;
/// Flows tracked at most (beyond, the oldest is forgotten).
const FLOWS_MAX: usize = 65_536;
/// Bytes of frames held over all flows at most (beyond, a new frame to
/// hold is dropped: its sender sends it again).
const HELD_BYTES_MAX: usize = 64 << 20;

fn bytes_of(held: &VecDeque<Vec<u8>>) -> usize {
    held.iter().map(Vec::len).sum()
}

/// A TCP flow as the guest sees it: (guest addr, guest port, peer addr, peer port).
type Key = ([u8; 4], u16, [u8; 4], u16);

#[derive(Default, Debug)]
struct Flow {
    /// The backup guest's ISN (from its SYN-ACK).
    own_isn: Option<u32>,
    /// The backup guest's TSval in that SYN-ACK.
    own_ts: Option<u32>,
    /// `own ISN − leader ISN` (learned from the client's first ACK).
    seq_delta: Option<u32>,
    /// `own TSval − leader TSval` (from the first timestamp echo).
    ts_delta: Option<u32>,
    /// The highest sequence number the backup's guest has sent (snd_nxt).
    sent_up_to: Option<u32>,
    /// Inbound frames waiting.
    held: VecDeque<Vec<u8>>,
    last_use: u64,
}

/// Counters.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct TranslateStats {
    /// Inbound frames rewritten.
    pub rewritten: u64,
    /// Inbound frames held at least once.
    pub held: u64,
    /// Held frames dropped (too many waiting).
    pub dropped: u64,
    /// Outbound frames rewritten (as the leader, for flows opened under another).
    pub rewritten_out: u64,
}

/// A backup's flow table.
#[derive(Default)]
pub struct Translator {
    flows: HashMap<Key, Flow>,
    clock: u64,
    /// Bytes of the frames held in every flow.
    held_bytes: usize,
    /// Counters.
    pub stats: TranslateStats,
}

/// Where the parts of an IPv4/TCP frame are.
struct Tcp {
    ip: usize,
    tcp: usize,
    end: usize,
}

fn parse(frame: &[u8]) -> Option<Tcp> {
    if frame.len() < 14 + 20 + 20 || frame[12..14] != [0x08, 0x00] {
        return None;
    }
    let ip = 14;
    let ihl = usize::from(frame[ip] & 0x0f) * 4;
    if frame[ip] >> 4 != 4 || ihl < 20 || frame[ip + 9] != 6 {
        return None;
    }
    // Fragments are not translated (guests set DF on TCP).
    if u16::from_be_bytes([frame[ip + 6], frame[ip + 7]]) & 0x3fff != 0 {
        return None;
    }
    let total = usize::from(u16::from_be_bytes([frame[ip + 2], frame[ip + 3]]));
    let end = ip + total;
    let tcp = ip + ihl;
    if end > frame.len() || tcp + 20 > end {
        return None;
    }
    let off = usize::from(frame[tcp + 12] >> 4) * 4;
    if off < 20 || tcp + off > end {
        return None;
    }
    Some(Tcp { ip, tcp, end })
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

/// The TCP options: (kind, offset of its data) for SACK (5) and timestamps (8).
fn options(frame: &[u8], t: &Tcp) -> Vec<(u8, usize, usize)> {
    let off = usize::from(frame[t.tcp + 12] >> 4) * 4;
    let (mut at, end) = (t.tcp + 20, t.tcp + off);
    let mut out = Vec::new();
    while at < end {
        match frame[at] {
            0 => break,
            1 => at += 1,
            kind => {
                if at + 1 >= end {
                    break;
                }
                let len = usize::from(frame[at + 1]);
                if len < 2 || at + len > end {
                    break;
                }
                out.push((kind, at + 2, len - 2));
                at += len;
            }
        }
    }
    out
}

fn fix_checksum(frame: &mut [u8], t: &Tcp) {
    frame[t.tcp + 16] = 0;
    frame[t.tcp + 17] = 0;
    let len = (t.end - t.tcp) as u16;
    let mut pseudo = Vec::with_capacity(12);
    pseudo.extend_from_slice(&frame[t.ip + 12..t.ip + 20]);
    pseudo.extend_from_slice(&[0, 6]);
    pseudo.extend_from_slice(&len.to_be_bytes());
    let sum = checksum(&[&pseudo, &frame[t.tcp..t.end]]);
    frame[t.tcp + 16..t.tcp + 18].copy_from_slice(&sum.to_be_bytes());
}

const SYN: u8 = 0x02;
const ACK: u8 = 0x10;
const RST: u8 = 0x04;

impl Translator {
    /// A table with no flows.
    pub fn new() -> Translator {
        Translator::default()
    }

    fn flow(&mut self, key: Key) -> &mut Flow {
        self.clock += 1;
        if self.flows.len() >= FLOWS_MAX && !self.flows.contains_key(&key) {
            if let Some(oldest) = self
                .flows
                .iter()
                .min_by_key(|(_, f)| f.last_use)
                .map(|(k, _)| *k)
            {
                if let Some(gone) = self.flows.remove(&oldest) {
                    self.held_bytes -= bytes_of(&gone.held);
                    self.stats.dropped += gone.held.len() as u64;
                }
            }
        }
        let clock = self.clock;
        let f = self.flows.entry(key).or_default();
        f.last_use = clock;
        f
    }

    /// A frame the backup's own guest sent (it is dropped afterwards): learns
    /// the guest's ISN and how far it has sent. Returns frames that were
    /// waiting for it, translated, to hand to the guest now.
    pub fn outbound(&mut self, frame: &[u8]) -> Vec<Vec<u8>> {
        let Some(t) = parse(frame) else {
            return Vec::new();
        };
        let flags = frame[t.tcp + 13];
        let key: Key = (
            frame[t.ip + 12..t.ip + 16].try_into().expect("4"),
            u16::from_be_bytes([frame[t.tcp], frame[t.tcp + 1]]),
            frame[t.ip + 16..t.ip + 20].try_into().expect("4"),
            u16::from_be_bytes([frame[t.tcp + 2], frame[t.tcp + 3]]),
        );
        let seq = u32_at(frame, t.tcp + 4);
        let off = usize::from(frame[t.tcp + 12] >> 4) * 4;
        let payload = (t.end - t.tcp - off) as u32;
        let ts = options(frame, &t)
            .into_iter()
            .find(|o| o.0 == 8 && o.2 == 8)
            .map(|o| u32_at(frame, o.1));
        let f = self.flow(key);
        let mut stale = VecDeque::new();
        if flags & SYN != 0 && f.own_isn != Some(seq) {
            // Our guest's SYN-ACK (a connection to it), or its SYN (one it
            // opens: the far end's SYN-ACK then acknowledges the leader
            // guest's ISN, and is moved by the same difference). A new ISN
            // on the same addresses is a new connection: what was learnt of
            // the old one goes, and so do its frames still held.
            f.own_isn = Some(seq);
            f.own_ts = ts;
            f.seq_delta = None;
            f.ts_delta = None;
            f.sent_up_to = None;
            if flags & ACK == 0 {
                stale = std::mem::take(&mut f.held);
            }
        }
        let next = seq
            .wrapping_add(payload)
            .wrapping_add(u32::from(flags & (SYN | 0x01) != 0));
        f.sent_up_to = Some(match f.sent_up_to {
            Some(s) if (next.wrapping_sub(s) as i32) < 0 => s,
            _ => next,
        });
        self.held_bytes -= bytes_of(&stale);
        self.stats.dropped += stale.len() as u64;
        self.release(key)
    }

    /// As the leader, a frame its guest sends out: flows the guest joined as
    /// a backup (under another leader) are moved into the numbering the
    /// client knows — sequence number by `−(own ISN − leader ISN)`,
    /// timestamp by the timestamp offset — so connections opened before a
    /// failover go on. Call after [`Translator::outbound`].
    pub fn rewrite_out(&mut self, frame: &mut [u8]) {
        let Some(t) = parse(frame) else {
            return;
        };
        let key: Key = (
            frame[t.ip + 12..t.ip + 16].try_into().expect("4"),
            u16::from_be_bytes([frame[t.tcp], frame[t.tcp + 1]]),
            frame[t.ip + 16..t.ip + 20].try_into().expect("4"),
            u16::from_be_bytes([frame[t.tcp + 2], frame[t.tcp + 3]]),
        );
        let Some(f) = self.flows.get(&key) else {
            return;
        };
        let (delta, ts_delta) = (f.seq_delta.unwrap_or(0), f.ts_delta.unwrap_or(0));
        if delta == 0 && ts_delta == 0 {
            return;
        }
        let seq = u32_at(frame, t.tcp + 4);
        put_u32(frame, t.tcp + 4, seq.wrapping_sub(delta));
        for (kind, at, len) in options(frame, &t) {
            if kind == 8 && len == 8 {
                let val = u32_at(frame, at);
                put_u32(frame, at, val.wrapping_sub(ts_delta));
            }
        }
        fix_checksum(frame, &t);
        self.stats.rewritten_out += 1;
    }

    /// An ordered inbound frame for the backup's guest: what to hand to the
    /// guest now (this frame translated, perhaps with frames that waited),
    /// or nothing while the flow waits.
    pub fn inbound(&mut self, frame: Vec<u8>) -> Vec<Vec<u8>> {
        let Some(t) = parse(&frame) else {
            return vec![frame];
        };
        let flags = frame[t.tcp + 13];
        // As the guest sees it: the guest is the destination.
        let key: Key = (
            frame[t.ip + 16..t.ip + 20].try_into().expect("4"),
            u16::from_be_bytes([frame[t.tcp + 2], frame[t.tcp + 3]]),
            frame[t.ip + 12..t.ip + 16].try_into().expect("4"),
            u16::from_be_bytes([frame[t.tcp], frame[t.tcp + 1]]),
        );
        if flags & SYN != 0 && flags & ACK == 0 {
            // A new connection: it starts afresh on every guest.
            let f = self.flow(key);
            let old = std::mem::take(&mut f.held);
            *f = Flow {
                last_use: f.last_use,
                ..Flow::default()
            };
            self.held_bytes -= bytes_of(&old);
            self.stats.dropped += old.len() as u64;
            return vec![frame];
        }
        if !self.flows.contains_key(&key) {
            // A flow this backup never saw open (opened before it started,
            // forgotten, or one the leader's guest opened from a port this
            // guest did not pick): pass it as it is.
            return vec![frame];
        }
        let len = frame.len();
        let f = self.flow(key);
        f.held.push_back(frame);
        let freed = if f.held.len() > HELD_MAX {
            f.held.pop_front().map_or(0, |old| old.len())
        } else {
            0
        };
        if freed > 0 {
            self.stats.dropped += 1;
        }
        self.held_bytes = self.held_bytes + len - freed;
        let out = self.release(key);
        // Over the bound (counted after what could go went): the flow used
        // least recently gives up what it holds, until under it.
        while self.held_bytes > HELD_BYTES_MAX {
            let Some(k) = self
                .flows
                .iter()
                .filter(|(_, f)| !f.held.is_empty())
                .min_by_key(|(_, f)| f.last_use)
                .map(|(k, _)| *k)
            else {
                break;
            };
            let gone = std::mem::take(&mut self.flows.get_mut(&k).expect("found").held);
            self.held_bytes -= bytes_of(&gone);
            self.stats.dropped += gone.len() as u64;
        }
        out
    }

    /// Translates and returns the flow's waiting frames that may go now.
    fn release(&mut self, key: Key) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut held_now = 0;
        let Some(f) = self.flows.get_mut(&key) else {
            return out;
        };
        while let Some(frame) = f.held.front() {
            let Some(t) = parse(frame) else {
                out.push(f.held.pop_front().expect("front"));
                continue;
            };
            let flags = frame[t.tcp + 13];
            if flags & ACK == 0 || flags & RST != 0 && f.own_isn.is_none() {
                out.push(f.held.pop_front().expect("front"));
                continue;
            }
            let Some(own) = f.own_isn else {
                held_now += 1;
                break; // our SYN-ACK has not gone out yet
            };
            let ack = u32_at(frame, t.tcp + 8);
            let delta = *f
                .seq_delta
                .get_or_insert(own.wrapping_add(1).wrapping_sub(ack));
            let new_ack = ack.wrapping_add(delta);
            if let Some(sent) = f.sent_up_to {
                if (new_ack.wrapping_sub(sent) as i32) > 0 {
                    held_now += 1;
                    break; // acknowledges bytes our guest has not sent yet
                }
            }
            let mut frame = f.held.pop_front().expect("front");
            put_u32(&mut frame, t.tcp + 8, new_ack);
            for (kind, at, len) in options(&frame, &t) {
                if kind == 5 {
                    for edge in (0..len / 4).map(|k| at + 4 * k) {
                        let v = u32_at(&frame, edge).wrapping_add(delta);
                        put_u32(&mut frame, edge, v);
                    }
                } else if kind == 8 && len == 8 {
                    let ecr = u32_at(&frame, at + 4);
                    if let Some(own_ts) = f.own_ts {
                        let d = *f.ts_delta.get_or_insert(own_ts.wrapping_sub(ecr));
                        put_u32(&mut frame, at + 4, ecr.wrapping_add(d));
                    }
                }
            }
            fix_checksum(&mut frame, &t);
            self.stats.rewritten += 1;
            out.push(frame);
        }
        // Every frame that left the queue is in `out` (at its length).
        self.held_bytes -= out.iter().map(Vec::len).sum::<usize>();
        self.stats.held += held_now;
        if flags_closed(&out) {
            // A reset ends the flow on every side.
            if let Some(gone) = self.flows.remove(&key) {
                self.held_bytes -= bytes_of(&gone.held);
                self.stats.dropped += gone.held.len() as u64;
            }
        }
        out
    }
}

fn flags_closed(out: &[Vec<u8>]) -> bool {
    out.last()
        .and_then(|f| parse(f).map(|t| f[t.tcp + 13] & RST != 0))
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::{TcpFrame, tcp_frame};

    const CLIENT: [u8; 4] = [10, 0, 0, 1];
    const GUEST: [u8; 4] = [10, 0, 0, 2];

    fn frame(from_client: bool, seq: u32, ack: u32, flags: u8, payload: &[u8]) -> Vec<u8> {
        flow_frame(from_client, 40000, seq, ack, flags, payload)
    }

    /// A frame of the flow between the client's `port` and the guest's 80.
    fn flow_frame(
        from_client: bool,
        port: u16,
        seq: u32,
        ack: u32,
        flags: u8,
        payload: &[u8],
    ) -> Vec<u8> {
        let (src, dst, sport, dport) = if from_client {
            (CLIENT, GUEST, port, 80)
        } else {
            (GUEST, CLIENT, 80, port)
        };
        tcp_frame(&TcpFrame {
            src_mac: [2, 0, 0, 0, 0, 1],
            dst_mac: [2, 0, 0, 0, 0, 2],
            src_ip: src,
            dst_ip: dst,
            sport,
            dport,
            seq,
            ack,
            flags,
            ip_id: 1,
            data: payload,
        })
    }

    fn ack_of(f: &[u8]) -> u32 {
        let t = parse(f).unwrap();
        u32_at(f, t.tcp + 8)
    }

    fn checksum_ok(f: &[u8]) -> bool {
        let t = parse(f).unwrap();
        let mut copy = f.to_vec();
        fix_checksum(&mut copy, &t);
        copy == f
    }

    #[test]
    fn a_backup_rewrites_acks_by_its_own_isn_and_holds_what_it_cannot_pass_yet() {
        let mut tr = Translator::new();
        let (client_isn, leader_isn, own_isn) = (1000u32, 5_000_000u32, 0xffff_fff0u32);
        // The client's SYN reaches every guest unchanged.
        let syn = frame(true, client_isn, 0, SYN, b"");
        assert_eq!(tr.inbound(syn.clone()), vec![syn]);
        // The client's ACK of the leader's SYN-ACK comes before our guest's SYN-ACK: held.
        let ack1 = frame(true, client_isn + 1, leader_isn + 1, ACK, b"");
        assert!(tr.inbound(ack1).is_empty());
        // Our guest answers the SYN: the ACK goes, acknowledging our ISN.
        let released = tr.outbound(&frame(false, own_isn, client_isn + 1, SYN | ACK, b""));
        assert_eq!(released.len(), 1);
        assert_eq!(ack_of(&released[0]), own_isn.wrapping_add(1));
        assert!(checksum_ok(&released[0]));
        // A request: passes, rewritten.
        let req = frame(true, client_isn + 1, leader_isn + 1, ACK | 0x08, b"get k\n");
        let out = tr.inbound(req);
        assert_eq!(out.len(), 1);
        assert_eq!(ack_of(&out[0]), own_isn.wrapping_add(1));
        // The client acknowledges 3 answer bytes the leader's guest sent;
        // ours has not sent them: held until it does.
        let ack2 = frame(true, client_isn + 7, leader_isn + 4, ACK, b"");
        assert!(tr.inbound(ack2).is_empty());
        let released = tr.outbound(&frame(
            false,
            own_isn.wrapping_add(1),
            client_isn + 7,
            ACK,
            b"v1\n",
        ));
        assert_eq!(released.len(), 1);
        assert_eq!(ack_of(&released[0]), own_isn.wrapping_add(4));
        assert!(checksum_ok(&released[0]));
        assert_eq!(tr.stats.rewritten, 3);
    }

    /// A connection the guest opens: the far end's SYN-ACK acknowledges
    /// the leader guest's ISN; a backup moves it to its own guest's, whether
    /// it comes before or after that guest's SYN. On the leader it passes
    /// as it is.
    #[test]
    fn a_connection_the_guest_opens_is_answered_on_every_guest() {
        let (far_isn, leader_isn, own_isn) = (7000u32, 5_000_000u32, 0xffff_fff0u32);
        let syn_ack = frame(true, far_isn, leader_isn + 1, SYN | ACK, b"");
        // The guest's SYN first.
        let mut tr = Translator::new();
        assert!(tr.outbound(&frame(false, own_isn, 0, SYN, b"")).is_empty());
        let out = tr.inbound(syn_ack.clone());
        assert_eq!(out.len(), 1, "the SYN-ACK is held forever");
        assert_eq!(ack_of(&out[0]), own_isn.wrapping_add(1));
        assert!(checksum_ok(&out[0]));
        // The guest's ACK, then data from the far end: moved the same way.
        tr.outbound(&frame(
            false,
            own_isn.wrapping_add(1),
            far_isn + 1,
            ACK,
            b"",
        ));
        let data = frame(true, far_isn + 1, leader_isn + 1, ACK | 0x08, b"hello");
        let out = tr.inbound(data);
        assert_eq!(out.len(), 1);
        assert_eq!(ack_of(&out[0]), own_isn.wrapping_add(1));
        // A SYN-ACK for a flow this guest did not open (the leader's guest
        // dialled from another port) passes as it is: nothing waits for a
        // SYN that may never come.
        let mut tr = Translator::new();
        assert_eq!(tr.inbound(syn_ack.clone()), vec![syn_ack.clone()]);
        assert!(tr.flows.is_empty());
        // A new connection on the same addresses (a new ISN) does not get
        // the old one's frames still held.
        let mut tr = Translator::new();
        tr.outbound(&frame(false, own_isn, 0, SYN, b""));
        assert_eq!(tr.inbound(syn_ack.clone()).len(), 1);
        let far = frame(true, far_isn + 1, leader_isn + 100, ACK | 0x08, b"late");
        assert!(tr.inbound(far).is_empty(), "ahead of what our guest sent");
        assert!(tr.held_bytes > 0);
        assert!(
            tr.outbound(&frame(false, own_isn ^ 1, 0, SYN, b""))
                .is_empty()
        );
        assert_eq!(tr.held_bytes, 0);
        // The leader: its own guest's ISN is the one acknowledged.
        let mut tr = Translator::new();
        tr.outbound(&frame(false, leader_isn, 0, SYN, b""));
        assert_eq!(tr.inbound(syn_ack.clone()), vec![syn_ack]);
    }

    /// Frames held for flows whose guest never answers (a closed port, or
    /// strangers' ACKs) are bounded in bytes over the whole table, not only
    /// per flow; a reset flow's frames are given back.
    #[test]
    fn held_frames_are_bounded_in_bytes_over_all_flows() {
        let mut tr = Translator::new();
        let payload = vec![7u8; 1400];
        let at = |port: u16, seq: u32, flags: u8, data: &[u8]| {
            flow_frame(true, port, seq, 1, flags, data)
        };
        for port in 0..100u16 {
            tr.inbound(at(port, 0, SYN, b""));
            for k in 0..1000u32 {
                assert!(tr.inbound(at(port, 1 + k * 1400, ACK, &payload)).is_empty());
            }
        }
        assert!(tr.held_bytes <= HELD_BYTES_MAX, "{}", tr.held_bytes);
        assert_eq!(
            tr.held_bytes,
            tr.flows.values().map(|f| bytes_of(&f.held)).sum::<usize>()
        );
        assert!(tr.stats.dropped > 0);
        // At the bound, a frame that can go at once still goes.
        tr.inbound(at(5000, 0, SYN, b""));
        tr.outbound(&flow_frame(false, 5000, 9000, 1, SYN | ACK, b""));
        let ack = flow_frame(true, 5000, 1, 77, ACK, &payload);
        assert_eq!(tr.inbound(ack).len(), 1, "dropped at the bound");
        assert!(tr.held_bytes <= HELD_BYTES_MAX);
        // A new SYN on each flow starts it afresh: nothing is held any more.
        for port in 0..100u16 {
            tr.inbound(at(port, 0, SYN, b""));
        }
        assert_eq!(tr.held_bytes, 0);
    }

    #[test]
    fn other_frames_pass_unchanged_and_garbage_does_not_panic() {
        let mut tr = Translator::new();
        let arp = vec![0xffu8; 42];
        assert_eq!(tr.inbound(arp.clone()), vec![arp]);
        for len in 0..80 {
            let mut f = frame(true, 1, 2, ACK, b"x");
            f.truncate(len.min(f.len()));
            let _ = tr.inbound(f.clone());
            let _ = tr.outbound(&f);
        }
        // A flow never seen opening passes unchanged.
        let f = frame(true, 10, 20, ACK, b"");
        assert_eq!(tr.inbound(f.clone()), vec![f]);
    }
}
