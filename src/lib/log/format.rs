//! The on-disk format of a falcon log: segment headers and records.
//!
//! Everything here is pure: bytes in, values out. The decoder is the first
//! thing that touches bytes from disk, so it must never panic, whatever the
//! input; every failure is a [`DecodeError`] that says what was wrong.
//!
//! ## Segment header (64 bytes, little-endian)
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `FALCNLOG` |
//! | 8 | 2 | format version (currently 1) |
//! | 10 | 2 | header length (64) |
//! | 12 | 4 | flags (0) |
//! | 16 | 8 | cluster id |
//! | 24 | 4 | node id |
//! | 28 | 4 | reserved (0) |
//! | 32 | 8 | first op of the segment |
//! | 40 | 4 | chain value before the first op (CRC of the record before it) |
//! | 44 | 4 | reserved (0) |
//! | 48 | 8 | creation time, ns since the Unix epoch |
//! | 56 | 4 | reserved (0) |
//! | 60 | 4 | CRC32C of bytes 0..60 |
//!
//! ## Record (48-byte header + payload, padded with zeros to 8 bytes)
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 4 | length: header + payload, without padding |
//! | 4 | 4 | CRC32C of the length field and of every byte after this field, padding included |
//! | 8 | 1 | kind (1 open, 2 data, 3 close, 4 frame, 5 noop) |
//! | 9 | 1 | flags (0) |
//! | 10 | 2 | reserved (0) |
//! | 12 | 4 | prev: the CRC of the record before this one (the hash chain) |
//! | 16 | 8 | view |
//! | 24 | 8 | op |
//! | 32 | 8 | connection id |
//! | 40 | 8 | timestamp, ns since the Unix epoch |
//! | 48 | n | payload |
//!
//! The CRC covers `prev`, so each record seals the whole history before it: a
//! record copied from another log, or left over from before a truncation,
//! does not fit the chain and is detected.

use std::fmt;

/// The 8 bytes every segment file starts with.
pub const MAGIC: [u8; 8] = *b"FALCNLOG";
/// The format version this build writes and the newest it reads.
pub const FORMAT_VERSION: u16 = 1;
/// Size of a segment header in bytes.
pub const SEGMENT_HEADER_LEN: usize = 64;
/// Size of a record header in bytes.
pub const RECORD_HEADER_LEN: usize = 48;
/// Records start at multiples of this many bytes.
pub const RECORD_ALIGN: usize = 8;
/// The largest payload one record may carry (16 MiB). Larger inputs are split
/// by the front end; a length field above this is corruption.
pub const PAYLOAD_MAX: usize = 16 << 20;

/// What an entry holds. The numbers are the on-disk encoding.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// A client opened a connection (`conn` is its id).
    Open,
    /// Bytes a client sent on connection `conn`.
    Data,
    /// Connection `conn` was closed.
    Close,
    /// One inbound Ethernet frame of a virtual machine.
    Frame,
    /// No operation: the first entry of a leader's view.
    Noop,
    /// The leader's hash of a chunk of what its copy of the program wrote on
    /// connection `conn` (divergence detection; see `node::divergence`).
    Digest,
    /// The client's next input followed this much of the program's output
    /// on `conn` (u64 little-endian): a replica writes that input only once
    /// its own copy has written as much, as the leader's had.
    Await,
}

impl Kind {
    /// All kinds, in encoding order.
    pub const ALL: [Kind; 7] = [
        Kind::Open,
        Kind::Data,
        Kind::Close,
        Kind::Frame,
        Kind::Noop,
        Kind::Digest,
        Kind::Await,
    ];

    /// The on-disk byte.
    pub fn to_byte(self) -> u8 {
        match self {
            Kind::Open => 1,
            Kind::Data => 2,
            Kind::Close => 3,
            Kind::Frame => 4,
            Kind::Noop => 5,
            Kind::Digest => 6,
            Kind::Await => 7,
        }
    }

    /// Decodes the on-disk byte.
    pub fn from_byte(b: u8) -> Option<Kind> {
        match b {
            1 => Some(Kind::Open),
            2 => Some(Kind::Data),
            3 => Some(Kind::Close),
            4 => Some(Kind::Frame),
            5 => Some(Kind::Noop),
            6 => Some(Kind::Digest),
            7 => Some(Kind::Await),
            _ => None,
        }
    }

    /// The stable lower-case name used in output and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Open => "open",
            Kind::Data => "data",
            Kind::Close => "close",
            Kind::Frame => "frame",
            Kind::Noop => "noop",
            Kind::Digest => "digest",
            Kind::Await => "await",
        }
    }

    /// Parses a name as printed by [`Kind::name`].
    pub fn from_name(s: &str) -> Option<Kind> {
        Kind::ALL
            .into_iter()
            .find(|k| k.name().eq_ignore_ascii_case(s))
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One replicated input, as the consensus engine hands it to the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// The view in which the leader proposed this entry.
    pub view: u64,
    /// The position of the entry in the total order; consecutive from 1.
    pub op: u64,
    /// What the entry holds.
    pub kind: Kind,
    /// The connection the entry belongs to (0 when none).
    pub conn: u64,
    /// The leader's clock when it proposed the entry, ns since the Unix epoch.
    pub time_ns: u64,
    /// The bytes (shared, cheap to clone).
    pub payload: bytes::Bytes,
}

impl Entry {
    /// Follows the set of open connections through this entry: an `Open`
    /// adds its connection, a `Close` removes it.
    pub fn track_open(&self, open: &mut std::collections::BTreeSet<u64>) {
        match self.kind {
            Kind::Open => {
                open.insert(self.conn);
            }
            Kind::Close => {
                open.remove(&self.conn);
            }
            _ => {}
        }
    }

    /// Bytes this entry takes on disk, padding included.
    pub fn encoded_len(&self) -> usize {
        padded_len(RECORD_HEADER_LEN + self.payload.len())
    }
}

/// A decoded segment header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentHeader {
    /// Format version the segment was written with.
    pub version: u16,
    /// The cluster this log belongs to.
    pub cluster_id: u64,
    /// The replica that wrote it.
    pub node_id: u32,
    /// The op of the first record in the segment.
    pub first_op: u64,
    /// The chain value before the first record (CRC of the record before it, 0 for a new log).
    pub prev_crc: u32,
    /// When the segment was created, ns since the Unix epoch.
    pub created_ns: u64,
}

/// A record header, decoded and checked, plus where its payload is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordHeader {
    /// The stored checksum (the chain value of this record).
    pub crc: u32,
    /// The chain value of the record before.
    pub prev: u32,
    /// What it holds.
    pub kind: Kind,
    /// View.
    pub view: u64,
    /// Op.
    pub op: u64,
    /// Connection id.
    pub conn: u64,
    /// Timestamp, ns since the Unix epoch.
    pub time_ns: u64,
    /// Payload length in bytes.
    pub payload_len: usize,
}

impl RecordHeader {
    /// Bytes the record takes on disk, padding included.
    pub fn encoded_len(&self) -> usize {
        padded_len(RECORD_HEADER_LEN + self.payload_len)
    }
}

/// Why bytes are not a valid header or record.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The buffer ends before the record (or header) does; `needed` bytes in total are required.
    #[error("incomplete: {needed} bytes needed, {available} available")]
    Incomplete {
        /// Bytes the record needs in total.
        needed: usize,
        /// Bytes that were available.
        available: usize,
    },
    /// The length field is impossible.
    #[error("impossible record length {0}")]
    BadLength(u32),
    /// The checksum does not match the bytes.
    #[error("checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    BadChecksum {
        /// CRC stored in the record.
        stored: u32,
        /// CRC of the bytes as read.
        computed: u32,
    },
    /// The checksum matches but the kind byte is unknown.
    #[error("unknown record kind {0}")]
    UnknownKind(u8),
    /// Reserved bytes are not zero although the checksum matches.
    #[error("reserved bytes are not zero")]
    Reserved,
    /// The segment header does not start with the magic bytes.
    #[error("not a falcon log segment (bad magic)")]
    BadMagic,
    /// The segment was written by a newer version of falcon.
    #[error(
        "log format version {0} is newer than this falcon understands (version {FORMAT_VERSION})"
    )]
    NewerVersion(u16),
    /// The segment header's own checksum does not match.
    #[error("segment header checksum mismatch")]
    BadHeaderChecksum,
    /// A record starts with zeros but more than zeros follow: a write whose
    /// first bytes never reached the disk.
    #[error("zeros where a record starts, followed by other bytes")]
    Zeroed,
}

/// Rounds a record length up to [`RECORD_ALIGN`].
pub fn padded_len(len: usize) -> usize {
    (len + RECORD_ALIGN - 1) & !(RECORD_ALIGN - 1)
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// Encodes a segment header.
pub fn encode_segment_header(h: &SegmentHeader) -> [u8; SEGMENT_HEADER_LEN] {
    let mut b = [0u8; SEGMENT_HEADER_LEN];
    b[0..8].copy_from_slice(&MAGIC);
    b[8..10].copy_from_slice(&h.version.to_le_bytes());
    b[10..12].copy_from_slice(&(SEGMENT_HEADER_LEN as u16).to_le_bytes());
    b[16..24].copy_from_slice(&h.cluster_id.to_le_bytes());
    b[24..28].copy_from_slice(&h.node_id.to_le_bytes());
    b[32..40].copy_from_slice(&h.first_op.to_le_bytes());
    b[40..44].copy_from_slice(&h.prev_crc.to_le_bytes());
    b[48..56].copy_from_slice(&h.created_ns.to_le_bytes());
    let crc = crc32c::crc32c(&b[0..60]);
    b[60..64].copy_from_slice(&crc.to_le_bytes());
    b
}

/// Decodes and checks a segment header.
pub fn decode_segment_header(b: &[u8]) -> Result<SegmentHeader, DecodeError> {
    if b.len() < 8 || b[0..8] != MAGIC {
        if b.len() < 8 && MAGIC.starts_with(b) {
            return Err(DecodeError::Incomplete {
                needed: SEGMENT_HEADER_LEN,
                available: b.len(),
            });
        }
        return Err(DecodeError::BadMagic);
    }
    if b.len() < 10 {
        return Err(DecodeError::Incomplete {
            needed: SEGMENT_HEADER_LEN,
            available: b.len(),
        });
    }
    // The version is checked before the length so a newer format with a
    // longer header still gets the right message.
    let version = u16_at(b, 8);
    if version > FORMAT_VERSION {
        return Err(DecodeError::NewerVersion(version));
    }
    if b.len() < SEGMENT_HEADER_LEN {
        return Err(DecodeError::Incomplete {
            needed: SEGMENT_HEADER_LEN,
            available: b.len(),
        });
    }
    if crc32c::crc32c(&b[0..60]) != u32_at(b, 60) {
        return Err(DecodeError::BadHeaderChecksum);
    }
    if version == 0 || u16_at(b, 10) as usize != SEGMENT_HEADER_LEN {
        return Err(DecodeError::BadHeaderChecksum);
    }
    Ok(SegmentHeader {
        version,
        cluster_id: u64_at(b, 16),
        node_id: u32_at(b, 24),
        first_op: u64_at(b, 32),
        prev_crc: u32_at(b, 40),
        created_ns: u64_at(b, 48),
    })
}

/// Appends the encoding of `e`, chained to `prev`, to `out`; returns the record's CRC.
pub fn encode_record(e: &Entry, prev: u32, out: &mut Vec<u8>) -> u32 {
    assert!(
        e.payload.len() <= PAYLOAD_MAX,
        "payload of {} bytes exceeds the {PAYLOAD_MAX}-byte record limit",
        e.payload.len()
    );
    let start = out.len();
    let len = RECORD_HEADER_LEN + e.payload.len();
    let total = padded_len(len);
    out.reserve(total);
    out.extend_from_slice(&(len as u32).to_le_bytes());
    out.extend_from_slice(&[0u8; 4]);
    out.push(e.kind.to_byte());
    out.extend_from_slice(&[0u8; 3]);
    out.extend_from_slice(&prev.to_le_bytes());
    out.extend_from_slice(&e.view.to_le_bytes());
    out.extend_from_slice(&e.op.to_le_bytes());
    out.extend_from_slice(&e.conn.to_le_bytes());
    out.extend_from_slice(&e.time_ns.to_le_bytes());
    out.extend_from_slice(&e.payload);
    out.resize(start + total, 0);
    let crc = record_crc(&out[start..start + total]);
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    crc
}

fn record_crc(rec: &[u8]) -> u32 {
    let c = crc32c::crc32c(&rec[0..4]);
    crc32c::crc32c_append(c, &rec[8..])
}

/// Decodes and checks the record at the start of `b`.
///
/// Returns the header; the payload is `b[RECORD_HEADER_LEN..RECORD_HEADER_LEN + payload_len]`
/// and the next record starts at `header.encoded_len()`.
pub fn decode_record(b: &[u8]) -> Result<RecordHeader, DecodeError> {
    if b.len() < 8 {
        return Err(DecodeError::Incomplete {
            needed: RECORD_HEADER_LEN,
            available: b.len(),
        });
    }
    let len32 = u32_at(b, 0);
    let len = len32 as usize;
    if !(RECORD_HEADER_LEN..=RECORD_HEADER_LEN + PAYLOAD_MAX).contains(&len) {
        return Err(DecodeError::BadLength(len32));
    }
    let total = padded_len(len);
    if b.len() < total {
        return Err(DecodeError::Incomplete {
            needed: total,
            available: b.len(),
        });
    }
    let rec = &b[..total];
    let stored = u32_at(rec, 4);
    let computed = record_crc(rec);
    if stored != computed {
        return Err(DecodeError::BadChecksum { stored, computed });
    }
    let kind = Kind::from_byte(rec[8]).ok_or(DecodeError::UnknownKind(rec[8]))?;
    if rec[9] != 0 || rec[10] != 0 || rec[11] != 0 || rec[len..total].iter().any(|&x| x != 0) {
        return Err(DecodeError::Reserved);
    }
    Ok(RecordHeader {
        crc: stored,
        prev: u32_at(rec, 12),
        kind,
        view: u64_at(rec, 16),
        op: u64_at(rec, 24),
        conn: u64_at(rec, 32),
        time_ns: u64_at(rec, 40),
        payload_len: len - RECORD_HEADER_LEN,
    })
}

/// Decodes the record at the start of `b` into an owned [`Entry`].
pub fn decode_entry(b: &[u8]) -> Result<(RecordHeader, Entry), DecodeError> {
    let h = decode_record(b)?;
    let payload =
        bytes::Bytes::copy_from_slice(&b[RECORD_HEADER_LEN..RECORD_HEADER_LEN + h.payload_len]);
    Ok((
        h,
        Entry {
            view: h.view,
            op: h.op,
            kind: h.kind,
            conn: h.conn,
            time_ns: h.time_ns,
            payload,
        },
    ))
}

/// The chain value a new log starts from (before op 1).
pub const CHAIN_START: u32 = 0;

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(op: u64, payload: &[u8]) -> Entry {
        Entry {
            view: 3,
            op,
            kind: Kind::Data,
            conn: 7,
            time_ns: 1_700_000_000_000_000_000,
            payload: payload.to_vec().into(),
        }
    }

    #[test]
    fn record_roundtrip_every_kind_and_length() {
        for kind in Kind::ALL {
            for n in [0usize, 1, 7, 8, 9, 100, 4096] {
                let mut e = entry(42, &vec![0xab; n]);
                e.kind = kind;
                let mut buf = Vec::new();
                let crc = encode_record(&e, 0x1234_5678, &mut buf);
                assert_eq!(buf.len(), e.encoded_len());
                assert_eq!(buf.len() % RECORD_ALIGN, 0);
                let (h, back) = decode_entry(&buf).unwrap();
                assert_eq!(back, e);
                assert_eq!(h.crc, crc);
                assert_eq!(h.prev, 0x1234_5678);
            }
        }
    }

    #[test]
    fn every_single_bit_flip_is_detected() {
        let mut buf = Vec::new();
        encode_record(&entry(1, b"SET k v"), 9, &mut buf);
        for i in 0..buf.len() * 8 {
            let mut b = buf.clone();
            b[i / 8] ^= 1 << (i % 8);
            assert!(decode_record(&b).is_err(), "flip of bit {i} went unnoticed");
        }
    }

    #[test]
    fn short_buffers_are_incomplete_not_panics() {
        let mut buf = Vec::new();
        encode_record(&entry(1, b"hello world"), 0, &mut buf);
        for cut in 0..buf.len() {
            match decode_record(&buf[..cut]) {
                Err(DecodeError::Incomplete { .. }) => {}
                other => panic!("cut at {cut}: {other:?}"),
            }
        }
    }

    #[test]
    fn impossible_lengths_are_rejected() {
        let mut buf = vec![0u8; 64];
        assert_eq!(decode_record(&buf), Err(DecodeError::BadLength(0)));
        buf[0..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(decode_record(&buf), Err(DecodeError::BadLength(u32::MAX)));
    }

    #[test]
    fn segment_header_roundtrip_and_errors() {
        let h = SegmentHeader {
            version: FORMAT_VERSION,
            cluster_id: 0xfa1c,
            node_id: 2,
            first_op: 1001,
            prev_crc: 77,
            created_ns: 5,
        };
        let b = encode_segment_header(&h);
        assert_eq!(decode_segment_header(&b), Ok(h));
        let mut bad = b;
        bad[0] = b'X';
        assert_eq!(decode_segment_header(&bad), Err(DecodeError::BadMagic));
        let mut newer = b;
        newer[8..10].copy_from_slice(&(FORMAT_VERSION + 1).to_le_bytes());
        assert_eq!(
            decode_segment_header(&newer),
            Err(DecodeError::NewerVersion(FORMAT_VERSION + 1))
        );
        let mut flipped = b;
        flipped[20] ^= 1;
        assert_eq!(
            decode_segment_header(&flipped),
            Err(DecodeError::BadHeaderChecksum)
        );
        assert!(matches!(
            decode_segment_header(&b[..30]),
            Err(DecodeError::Incomplete { .. })
        ));
    }
}
