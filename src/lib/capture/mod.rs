//! Packets: turning logged byte streams into TCP/IP frames, and writing pcap files.
//!
//! The log holds what clients sent, per connection, not packets. To let an
//! operator open a log in Wireshark or tcpdump, [`TcpSynth`] rebuilds one TCP
//! flow per connection: a three-way handshake for `Open`, data segments with
//! consistent sequence numbers for `Data` (acknowledged by the server), and a
//! FIN exchange for `Close`. Checksums are real, so analysers show no errors.
//! `Frame` records are already Ethernet frames and are written as they are.

use std::collections::HashMap;
use std::path::Path;

use crate::log::Kind;

/// Largest TCP payload per synthesized segment (a 1500-byte MTU minus headers and options).
pub const MSS: usize = 1448;

/// The server's address in synthesized flows (TEST-NET-1).
pub const SERVER_IP: [u8; 4] = [192, 0, 2, 1];
const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const SERVER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
const CLIENT_ISN: u32 = 0x1000_0000;
const SERVER_ISN: u32 = 0x2000_0000;

const FIN: u8 = 0x01;
const SYN: u8 = 0x02;
const PSH: u8 = 0x08;
const ACK: u8 = 0x10;

/// The client address and port a connection id maps to.
pub fn client_endpoint(conn: u64) -> ([u8; 4], u16) {
    let c = conn & 0x00ff_ffff;
    let ip = [10, (c >> 16) as u8, (c >> 8) as u8, c as u8];
    let port = 32768 + ((conn >> 24) % 28232) as u16;
    (ip, port)
}

/// One synthesized frame and its time (ns since the Unix epoch).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    /// Capture time.
    pub time_ns: u64,
    /// The Ethernet frame.
    pub bytes: Vec<u8>,
}

#[derive(Clone, Copy)]
struct Flow {
    client_seq: u32,
    server_seq: u32,
}

/// Rebuilds TCP flows from Open/Data/Close records.
pub struct TcpSynth {
    server_port: u16,
    flows: HashMap<u64, Flow>,
    ip_id: u16,
}

impl TcpSynth {
    /// Flows towards `server_port` (the replicated program's port, so analysers decode it).
    pub fn new(server_port: u16) -> TcpSynth {
        TcpSynth {
            server_port,
            flows: HashMap::new(),
            ip_id: 1,
        }
    }

    /// Frames for one record. Records of other kinds give no frames, except
    /// `Frame`, which is returned as it is.
    pub fn record(&mut self, kind: Kind, conn: u64, time_ns: u64, payload: &[u8]) -> Vec<Frame> {
        let mut out = Vec::new();
        let mut t = time_ns;
        let mut push = |bytes: Vec<u8>, out: &mut Vec<Frame>| {
            out.push(Frame { time_ns: t, bytes });
            t += 1000;
        };
        match kind {
            Kind::Frame => push(payload.to_vec(), &mut out),
            Kind::Noop | Kind::Digest | Kind::Await => {}
            Kind::Open => {
                let f = Flow {
                    client_seq: CLIENT_ISN,
                    server_seq: SERVER_ISN,
                };
                push(
                    self.segment(conn, true, f.client_seq, 0, SYN, &[]),
                    &mut out,
                );
                push(
                    self.segment(conn, false, f.server_seq, f.client_seq + 1, SYN | ACK, &[]),
                    &mut out,
                );
                let f = Flow {
                    client_seq: f.client_seq + 1,
                    server_seq: f.server_seq + 1,
                };
                push(
                    self.segment(conn, true, f.client_seq, f.server_seq, ACK, &[]),
                    &mut out,
                );
                self.flows.insert(conn, f);
            }
            Kind::Data => {
                // A connection opened before the exported range starts mid-stream.
                let mut f = *self.flows.entry(conn).or_insert(Flow {
                    client_seq: CLIENT_ISN + 1,
                    server_seq: SERVER_ISN + 1,
                });
                for chunk in payload.chunks(MSS) {
                    push(
                        self.segment(conn, true, f.client_seq, f.server_seq, PSH | ACK, chunk),
                        &mut out,
                    );
                    f.client_seq = f.client_seq.wrapping_add(chunk.len() as u32);
                }
                if !payload.is_empty() {
                    push(
                        self.segment(conn, false, f.server_seq, f.client_seq, ACK, &[]),
                        &mut out,
                    );
                }
                self.flows.insert(conn, f);
            }
            Kind::Close => {
                let f = self.flows.remove(&conn).unwrap_or(Flow {
                    client_seq: CLIENT_ISN + 1,
                    server_seq: SERVER_ISN + 1,
                });
                push(
                    self.segment(conn, true, f.client_seq, f.server_seq, FIN | ACK, &[]),
                    &mut out,
                );
                push(
                    self.segment(
                        conn,
                        false,
                        f.server_seq,
                        f.client_seq.wrapping_add(1),
                        FIN | ACK,
                        &[],
                    ),
                    &mut out,
                );
                push(
                    self.segment(
                        conn,
                        true,
                        f.client_seq.wrapping_add(1),
                        f.server_seq.wrapping_add(1),
                        ACK,
                        &[],
                    ),
                    &mut out,
                );
            }
        }
        out
    }

    fn segment(
        &mut self,
        conn: u64,
        from_client: bool,
        seq: u32,
        ack: u32,
        flags: u8,
        data: &[u8],
    ) -> Vec<u8> {
        let (cip, cport) = client_endpoint(conn);
        let (src_mac, dst_mac, src_ip, dst_ip, sport, dport) = if from_client {
            (
                CLIENT_MAC,
                SERVER_MAC,
                cip,
                SERVER_IP,
                cport,
                self.server_port,
            )
        } else {
            (
                SERVER_MAC,
                CLIENT_MAC,
                SERVER_IP,
                cip,
                self.server_port,
                cport,
            )
        };
        self.ip_id = self.ip_id.wrapping_add(1);
        tcp_frame(&TcpFrame {
            src_mac,
            dst_mac,
            src_ip,
            dst_ip,
            sport,
            dport,
            seq,
            ack,
            flags,
            ip_id: self.ip_id,
            data,
        })
    }
}

/// The fields of one TCP/IPv4/Ethernet frame.
pub struct TcpFrame<'a> {
    /// Source MAC.
    pub src_mac: [u8; 6],
    /// Destination MAC.
    pub dst_mac: [u8; 6],
    /// Source IPv4 address.
    pub src_ip: [u8; 4],
    /// Destination IPv4 address.
    pub dst_ip: [u8; 4],
    /// Source port.
    pub sport: u16,
    /// Destination port.
    pub dport: u16,
    /// Sequence number.
    pub seq: u32,
    /// Acknowledgement number (sent only with the ACK flag).
    pub ack: u32,
    /// TCP flags (FIN 0x01, SYN 0x02, RST 0x04, PSH 0x08, ACK 0x10).
    pub flags: u8,
    /// IPv4 identification.
    pub ip_id: u16,
    /// Payload (at most 65,495 bytes).
    pub data: &'a [u8],
}

/// Builds an Ethernet II + IPv4 + TCP frame with correct checksums.
pub fn tcp_frame(f: &TcpFrame<'_>) -> Vec<u8> {
    assert!(
        f.data.len() <= 65_495,
        "TCP payload too large for one IPv4 packet"
    );
    let tcp_len = 20 + f.data.len();
    let ip_len = 20 + tcp_len;
    let mut b = Vec::with_capacity(14 + ip_len);
    b.extend_from_slice(&f.dst_mac);
    b.extend_from_slice(&f.src_mac);
    b.extend_from_slice(&0x0800u16.to_be_bytes());
    let ip_start = b.len();
    b.push(0x45);
    b.push(0);
    b.extend_from_slice(&(ip_len as u16).to_be_bytes());
    b.extend_from_slice(&f.ip_id.to_be_bytes());
    b.extend_from_slice(&0x4000u16.to_be_bytes()); // don't fragment
    b.push(64);
    b.push(6);
    b.extend_from_slice(&[0, 0]);
    b.extend_from_slice(&f.src_ip);
    b.extend_from_slice(&f.dst_ip);
    let ip_sum = checksum(&[&b[ip_start..ip_start + 20]]);
    b[ip_start + 10..ip_start + 12].copy_from_slice(&ip_sum.to_be_bytes());
    let tcp_start = b.len();
    b.extend_from_slice(&f.sport.to_be_bytes());
    b.extend_from_slice(&f.dport.to_be_bytes());
    b.extend_from_slice(&f.seq.to_be_bytes());
    let ack = if f.flags & ACK != 0 { f.ack } else { 0 };
    b.extend_from_slice(&ack.to_be_bytes());
    b.push(5 << 4);
    b.push(f.flags);
    b.extend_from_slice(&65535u16.to_be_bytes());
    b.extend_from_slice(&[0, 0, 0, 0]);
    b.extend_from_slice(f.data);
    let mut pseudo = Vec::with_capacity(12);
    pseudo.extend_from_slice(&f.src_ip);
    pseudo.extend_from_slice(&f.dst_ip);
    pseudo.push(0);
    pseudo.push(6);
    pseudo.extend_from_slice(&(tcp_len as u16).to_be_bytes());
    let sum = checksum(&[&pseudo, &b[tcp_start..]]);
    b[tcp_start + 16..tcp_start + 18].copy_from_slice(&sum.to_be_bytes());
    b
}

/// The Internet checksum (RFC 1071) over several slices taken as one.
pub fn checksum(parts: &[&[u8]]) -> u16 {
    let mut sum: u64 = 0;
    let mut odd: Option<u8> = None;
    for part in parts {
        for &byte in part.iter() {
            match odd.take() {
                None => odd = Some(byte),
                Some(hi) => sum += u64::from(u16::from_be_bytes([hi, byte])),
            }
        }
    }
    if let Some(hi) = odd {
        sum += u64::from(u16::from_be_bytes([hi, 0]));
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Errors writing a pcap file.
#[derive(Debug, thiserror::Error)]
pub enum PcapError {
    /// libpcap refused.
    #[error("{path}: {message}")]
    Pcap {
        /// The file.
        path: String,
        /// libpcap's message.
        message: String,
    },
}

/// A pcap file of Ethernet frames, written through libpcap.
pub struct PcapWriter {
    save: pcap::Savefile,
    path: String,
    /// Frames written so far.
    pub frames: u64,
}

/// The longest packet written whole into a pcap file (libpcap's limit).
const CAPLEN_MAX: usize = 262_144;

impl PcapWriter {
    /// Creates (or replaces) `path`.
    pub fn create(path: &Path) -> Result<PcapWriter, PcapError> {
        let err = |e: pcap::Error| PcapError::Pcap {
            path: path.display().to_string(),
            message: e.to_string(),
        };
        let dead = pcap::Capture::dead(pcap::Linktype::ETHERNET).map_err(err)?;
        let save = dead.savefile(path).map_err(err)?;
        Ok(PcapWriter {
            save,
            path: path.display().to_string(),
            frames: 0,
        })
    }

    /// Appends one frame.
    pub fn write(&mut self, frame: &Frame) {
        // libpcap's readers refuse a packet captured longer than 256 KiB (a
        // log record may hold more): past it, the packet is cut, as a
        // capture's snap length cuts it, and its length says how long it was.
        let caplen = frame.bytes.len().min(CAPLEN_MAX);
        let header = pcap::PacketHeader {
            ts: libc::timeval {
                tv_sec: (frame.time_ns / 1_000_000_000) as libc::time_t,
                tv_usec: ((frame.time_ns % 1_000_000_000) / 1000) as libc::suseconds_t,
            },
            caplen: caplen as u32,
            len: u32::try_from(frame.bytes.len()).unwrap_or(u32::MAX),
        };
        self.save
            .write(&pcap::Packet::new(&header, &frame.bytes[..caplen]));
        self.frames += 1;
    }

    /// Flushes everything to the file.
    pub fn finish(mut self) -> Result<u64, PcapError> {
        self.save.flush().map_err(|e| PcapError::Pcap {
            path: self.path.clone(),
            message: e.to_string(),
        })?;
        Ok(self.frames)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_of_a_known_ipv4_header() {
        // RFC 1071 style example: header from Wikipedia's IPv4 checksum article.
        let h = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert_eq!(checksum(&[&h]), 0xb861);
    }

    #[test]
    fn a_frame_verifies_its_own_checksums() {
        let f = tcp_frame(&TcpFrame {
            src_mac: CLIENT_MAC,
            dst_mac: SERVER_MAC,
            src_ip: [10, 0, 0, 1],
            dst_ip: SERVER_IP,
            sport: 40000,
            dport: 6379,
            seq: 5,
            ack: 9,
            flags: PSH | ACK,
            ip_id: 1,
            data: b"odd length!",
        });
        assert_eq!(checksum(&[&f[14..34]]), 0, "IP header sums to zero");
        let tcp = &f[34..];
        let mut pseudo = Vec::new();
        pseudo.extend_from_slice(&[10, 0, 0, 1]);
        pseudo.extend_from_slice(&SERVER_IP);
        pseudo.extend_from_slice(&[0, 6]);
        pseudo.extend_from_slice(&(tcp.len() as u16).to_be_bytes());
        assert_eq!(checksum(&[&pseudo, tcp]), 0, "TCP checksum verifies");
    }

    #[test]
    fn sequence_numbers_follow_the_bytes() {
        let mut s = TcpSynth::new(6379);
        let open = s.record(Kind::Open, 7, 0, &[]);
        assert_eq!(open.len(), 3);
        let data = s.record(Kind::Data, 7, 10, &vec![b'a'; 3000]);
        // 3 segments of at most MSS bytes and one ACK from the server.
        assert_eq!(data.len(), 4);
        let seq = |f: &Frame| u32::from_be_bytes(f.bytes[38..42].try_into().unwrap());
        assert_eq!(seq(&data[0]), CLIENT_ISN + 1);
        assert_eq!(seq(&data[1]), CLIENT_ISN + 1 + MSS as u32);
        assert_eq!(seq(&data[2]), CLIENT_ISN + 1 + 2 * MSS as u32);
        let close = s.record(Kind::Close, 7, 20, &[]);
        assert_eq!(seq(&close[0]), CLIENT_ISN + 1 + 3000);
        assert_eq!(close[0].bytes[47], FIN | ACK);
    }

    /// A frame longer than libpcap reads (a log record may hold 16 MiB) is
    /// cut to 256 KiB in the file, its length kept: the file stays readable
    /// past it.
    #[test]
    fn a_frame_longer_than_libpcap_reads_is_cut_and_the_file_stays_readable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big.pcap");
        let mut w = PcapWriter::create(&path).unwrap();
        let big = vec![0xabu8; 1 << 20];
        for bytes in [vec![1u8; 60], big, vec![2u8; 60]] {
            w.write(&Frame { time_ns: 1, bytes });
        }
        assert_eq!(w.finish().unwrap(), 3);
        let mut cap = pcap::Capture::from_file(&path).unwrap();
        let mut seen = Vec::new();
        while let Ok(p) = cap.next_packet() {
            seen.push((p.header.caplen, p.header.len));
        }
        // (libpcap cuts what it hands out to the file's snap length too.)
        assert_eq!(seen.len(), 3, "{seen:?}");
        assert_eq!((seen[0], seen[2]), ((60, 60), (60, 60)));
        assert!(
            seen[1].0 as usize <= CAPLEN_MAX && seen[1].1 == 1 << 20,
            "{seen:?}"
        );
    }
}
