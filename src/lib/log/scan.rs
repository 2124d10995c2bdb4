//! Reading segments record by record: shared by recovery, `--verify`, the
//! reader and `log-inspect`, so every path applies the same checks.

use std::io;

use super::LogError;
use super::format::{
    self, DecodeError, RECORD_ALIGN, RECORD_HEADER_LEN, RecordHeader, SEGMENT_HEADER_LEN,
    SegmentHeader,
};
use super::storage::{Storage, StorageFile};

/// Bytes read from a segment at a time.
const CHUNK: usize = 1 << 20;

/// The file name of the segment whose first op is `first_op`.
pub fn segment_name(first_op: u64) -> String {
    format!("{first_op:020}.seg")
}

/// The first op encoded in a segment file name, if it is one.
pub fn parse_segment_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(".seg")?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Segment files in a directory, sorted by first op.
///
/// Errors with [`LogError::NotALog`] when the directory holds files but no
/// segments; an empty directory gives an empty list.
pub fn list_segments<S: Storage>(storage: &S) -> Result<Vec<(String, u64)>, LogError> {
    let names = storage
        .list()
        .map_err(|e| LogError::io(format!("listing {}", storage.describe("")), e))?;
    let mut segs: Vec<(String, u64)> = names
        .iter()
        .filter_map(|n| parse_segment_name(n).map(|op| (n.clone(), op)))
        .collect();
    segs.sort_by_key(|s| s.1);
    if segs.is_empty() {
        let others: Vec<&String> = names
            .iter()
            .filter(|n| !matches!(n.as_str(), "LOCK" | super::storage::FSYNC_NOTE))
            .collect();
        if !others.is_empty() {
            return Err(LogError::NotALog {
                path: storage.describe(""),
                reason: format!(
                    "no segment files (*.seg) among its {} entries, e.g. {:?}",
                    others.len(),
                    others[0]
                ),
            });
        }
    }
    Ok(segs)
}

/// The state of a segment's header.
pub enum HeaderState {
    /// A valid header.
    Valid(SegmentHeader),
    /// The header was never completely written (crash while creating the
    /// segment); only acceptable for the last segment.
    Torn {
        /// Why the header is not valid.
        reason: String,
    },
}

/// Reads and checks the header of segment `name`. `zeros_are_torn`: a
/// file of nothing but zeros is a torn header (the last segment at open:
/// its space was reserved, its header never reached the disk); otherwise
/// it is damage.
pub fn read_header<F: StorageFile>(
    file: &F,
    describe: &str,
    name_first_op: u64,
    zeros_are_torn: bool,
) -> Result<(HeaderState, u64), LogError> {
    let len = file
        .len()
        .map_err(|e| LogError::io(format!("reading {describe}"), e))?;
    let mut b = [0u8; SEGMENT_HEADER_LEN];
    let n = file
        .read_full_at(&mut b, 0)
        .map_err(|e| LogError::io(format!("reading {describe}"), e))?;
    match format::decode_segment_header(&b[..n]) {
        Ok(h) => {
            if h.first_op == 0 {
                return Err(LogError::Corrupt {
                    file: describe.to_string(),
                    offset: 32,
                    reason: "header says the segment starts at op 0 (ops start at 1)".into(),
                });
            }
            if h.first_op != name_first_op {
                return Err(LogError::Corrupt {
                    file: describe.to_string(),
                    offset: 32,
                    reason: format!(
                        "header says the segment starts at op {} but its name says op {}",
                        h.first_op, name_first_op
                    ),
                });
            }
            Ok((HeaderState::Valid(h), len))
        }
        Err(DecodeError::NewerVersion(v)) => Err(LogError::NewerVersion {
            file: describe.to_string(),
            version: v,
        }),
        Err(DecodeError::BadMagic) if n > 0 && b[..n].iter().any(|&x| x != 0) => {
            Err(LogError::NotALog {
                path: describe.to_string(),
                reason: "the file does not start with the falcon log magic".into(),
            })
        }
        Err(e) => {
            // Short, or nothing but zeros (the header lost by a crash after
            // the file's space was reserved, before its first fsync: no
            // record in it was ever synced).
            let zeros = || {
                zeros_to_end(file, 0, len)
                    .map_err(|e| LogError::io(format!("reading {describe}"), e))
            };
            if len <= SEGMENT_HEADER_LEN as u64 || (zeros_are_torn && zeros()?) {
                Ok((
                    HeaderState::Torn {
                        reason: e.to_string(),
                    },
                    len,
                ))
            } else {
                Err(LogError::Corrupt {
                    file: describe.to_string(),
                    offset: 0,
                    reason: format!("segment header: {e}"),
                })
            }
        }
    }
}

/// A buffered window over a file, for sequential record reads.
#[derive(Default)]
pub struct Window {
    buf: Vec<u8>,
    start: u64,
    len: usize,
}

impl Window {
    /// Drops buffered bytes (after the file changed under us).
    pub fn invalidate(&mut self) {
        self.len = 0;
    }

    /// Bytes at `offset`: at least `min` of them unless the file ends first.
    /// Reads ahead up to 1 MiB, but not past `end_hint` (the known file length).
    pub fn get<F: StorageFile>(
        &mut self,
        file: &F,
        offset: u64,
        min: usize,
        end_hint: u64,
    ) -> io::Result<&[u8]> {
        let end = self.start + self.len as u64;
        if offset < self.start || offset + min as u64 > end {
            let ahead = end_hint.saturating_sub(offset).min(CHUNK as u64) as usize;
            let want = min.max(ahead);
            if self.buf.len() < want {
                self.buf.resize(want, 0);
            }
            let n = file.read_full_at(&mut self.buf[..want], offset)?;
            self.start = offset;
            self.len = n;
        }
        let at = (offset - self.start) as usize;
        Ok(&self.buf[at..self.len])
    }
}

/// Why a record could not be read at some offset.
#[derive(Debug)]
pub enum Bad {
    /// The bytes are not a valid record.
    Decode(DecodeError),
    /// A valid record that does not continue the chain.
    Chain(String),
}

impl std::fmt::Display for Bad {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Bad::Decode(e) => write!(f, "{e}"),
            Bad::Chain(s) => f.write_str(s),
        }
    }
}

/// The next record of a segment at `offset`, checked against the expected op and chain value.
///
/// `Ok(None)` at the exact end of the file, and where a record header would
/// be all zeros: the end of what was written into a preallocated file (see
/// [`zeros_to_end`] for telling that from damage). On success the record
/// bytes are `window.get(file, offset, len)`.
pub fn next_record<F: StorageFile>(
    file: &F,
    window: &mut Window,
    offset: u64,
    file_len: u64,
    expect_op: u64,
    expect_prev: u32,
) -> io::Result<Result<Option<RecordHeader>, Bad>> {
    if offset >= file_len {
        return Ok(Ok(None));
    }
    let head = window.get(file, offset, RECORD_HEADER_LEN, file_len)?;
    // (Fewer bytes than a header are left only at the end of the file.)
    let n = head.len().min(RECORD_HEADER_LEN);
    if n > 0 && head[..n].iter().all(|&b| b == 0) {
        return Ok(Ok(None));
    }
    let need = if head.len() >= 4 {
        let l = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
        if (RECORD_HEADER_LEN..=RECORD_HEADER_LEN + format::PAYLOAD_MAX).contains(&l) {
            format::padded_len(l)
        } else {
            RECORD_HEADER_LEN
        }
    } else {
        RECORD_HEADER_LEN
    };
    let bytes = window.get(file, offset, need, file_len)?;
    let avail = bytes.len().min((file_len - offset) as usize);
    let h = match format::decode_record(&bytes[..avail]) {
        Ok(h) => h,
        Err(e) => return Ok(Err(Bad::Decode(e))),
    };
    if h.op != expect_op {
        return Ok(Err(Bad::Chain(format!(
            "record holds op {} where op {} belongs",
            h.op, expect_op
        ))));
    }
    if h.prev != expect_prev {
        return Ok(Err(Bad::Chain(format!(
            "op {} does not continue the hash chain (prev {:#010x}, expected {:#010x}): \
             a record from another log or from before a truncation",
            h.op, h.prev, expect_prev
        ))));
    }
    Ok(Ok(Some(h)))
}

/// Whether every byte of `file` from `offset` to `file_len` is zero: the
/// unwritten rest of a preallocated segment, as against a record cut short
/// or damaged.
pub fn zeros_to_end<F: StorageFile>(file: &F, offset: u64, file_len: u64) -> io::Result<bool> {
    let mut buf = vec![0u8; 1 << 20];
    let mut at = offset;
    while at < file_len {
        let want = buf.len().min((file_len - at) as usize);
        let n = file.read_full_at(&mut buf[..want], at)?;
        if n == 0 {
            break;
        }
        if buf[..n].iter().any(|&b| b != 0) {
            return Ok(false);
        }
        at += n as u64;
    }
    Ok(true)
}

/// Whether the bytes in `[from, to)` up to some multiple of 512 are all
/// zeros over a whole sector, or over the rest of the sector `from` lies in:
/// what a sector that never reached the disk reads as in preallocated space
/// (a record never starts with zeros, so neither can be a record's bytes).
pub fn zero_sector_in<F: StorageFile>(file: &F, from: u64, to: u64) -> io::Result<bool> {
    const SECTOR: u64 = 512;
    let mut buf = [0u8; SECTOR as usize];
    let mut at = from;
    loop {
        let end = (at / SECTOR + 1) * SECTOR;
        if end > to {
            return Ok(false);
        }
        let n = (end - at) as usize;
        if file.read_full_at(&mut buf[..n], at)? == n && buf[..n].iter().all(|&b| b == 0) {
            return Ok(true);
        }
        at = end;
    }
}

/// Where the first CRC-valid record at an aligned offset in `(after, file_len)` starts.
///
/// A bad record with nothing valid after it is a torn tail (a write cut short
/// by a crash); a bad record followed by valid ones is corruption, unless a
/// power loss explains the gap (see [`zero_sector_in`]).
pub fn next_valid_record<F: StorageFile>(
    file: &F,
    after: u64,
    file_len: u64,
) -> io::Result<Option<u64>> {
    let mut window = Window::default();
    let mut at = after + RECORD_ALIGN as u64;
    while at + RECORD_HEADER_LEN as u64 <= file_len {
        let b = window.get(file, at, RECORD_HEADER_LEN, file_len)?;
        let l = u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize;
        if (RECORD_HEADER_LEN..=RECORD_HEADER_LEN + format::PAYLOAD_MAX).contains(&l)
            && at + format::padded_len(l) as u64 <= file_len
            && format::Kind::from_byte(b[8]).is_some()
        {
            let b = window.get(file, at, format::padded_len(l), file_len)?;
            if format::decode_record(b).is_ok() {
                return Ok(Some(at));
            }
        }
        at += RECORD_ALIGN as u64;
    }
    Ok(None)
}

/// What is learnt about one segment while scanning it.
#[derive(Clone, Debug)]
pub struct ScannedSegment {
    /// File name.
    pub name: String,
    /// Its header.
    pub header: SegmentHeader,
    /// Last op in the segment (`first_op - 1` when empty).
    pub last_op: u64,
    /// Chain value after the last record.
    pub last_crc: u32,
    /// Bytes of valid data (header and records).
    pub len: u64,
    /// Sparse index: (op, offset, chain value before the record) every
    /// [`INDEX_STRIDE`] bytes or so, so a read need not scan a whole segment.
    pub index: Vec<(u64, u64, u32)>,
}

/// Bytes between entries of a segment's sparse index.
pub const INDEX_STRIDE: u64 = 64 << 10;

/// The end of a log found torn by a crash.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct TornTail {
    /// The segment's file name.
    pub segment: String,
    /// The file (path) holding the torn part.
    pub file: String,
    /// Offset at which valid data ends.
    pub offset: u64,
    /// Bytes after that offset.
    pub bytes: u64,
    /// Whether the whole segment is torn (its header never reached the disk).
    pub whole_segment: bool,
    /// What was wrong with the first bad bytes.
    pub reason: String,
}

/// The result of scanning a whole log.
#[derive(Debug, Default)]
pub struct ScanOutcome {
    /// Valid segments in op order.
    pub segments: Vec<ScannedSegment>,
    /// The torn tail, if the last write was cut short.
    pub torn: Option<TornTail>,
}

impl ScanOutcome {
    /// Bytes of the valid segments (headers and records), without space
    /// reserved past them or a torn tail.
    pub fn data_bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.len).sum()
    }
}

/// One record seen by a scan.
pub struct Seen<'a> {
    /// File name of its segment.
    pub segment: &'a str,
    /// Offset in the segment file.
    pub offset: u64,
    /// The decoded header.
    pub header: &'a RecordHeader,
    /// The whole encoded record (header, payload, padding).
    pub raw: &'a [u8],
}

impl Seen<'_> {
    /// The payload bytes.
    pub fn payload(&self) -> &[u8] {
        &self.raw[RECORD_HEADER_LEN..RECORD_HEADER_LEN + self.header.payload_len]
    }
}

/// Scans every segment of a log in order, checking headers, checksums, the
/// chain and op continuity, and calling `on_record` for each record with op
/// at least `from_op`. `on_record` returns `false` to stop early.
///
/// Corruption anywhere but the tail is an error naming the file and offset.
/// The tail of the last segment may be torn; that is reported, not an error.
/// Nothing is modified.
pub fn scan_log<S: Storage>(
    storage: &S,
    from_op: u64,
    mut on_record: impl FnMut(&Seen<'_>) -> Result<bool, LogError>,
    mut on_bytes: impl FnMut(u64),
) -> Result<ScanOutcome, LogError> {
    let segs = list_segments(storage)?;
    let mut out = ScanOutcome::default();
    let mut window = Window::default();
    let count = segs.len();
    for (i, (name, name_op)) in segs.iter().enumerate() {
        let is_last = i + 1 == count;
        let describe = storage.describe(name);
        let file = storage
            .open_ro(name)
            .map_err(|e| LogError::io(format!("opening {describe}"), e))?;
        let (state, mut file_len) = read_header(&file, &describe, *name_op, is_last)?;
        let header = match state {
            HeaderState::Valid(h) => h,
            HeaderState::Torn { reason } => {
                if !is_last {
                    return Err(LogError::Corrupt {
                        file: describe,
                        offset: 0,
                        reason: format!("segment header: {reason}"),
                    });
                }
                out.torn = Some(TornTail {
                    segment: name.clone(),
                    file: describe,
                    offset: 0,
                    bytes: file_len,
                    whole_segment: true,
                    reason: format!("segment header never completed: {reason}"),
                });
                on_bytes(file_len);
                break;
            }
        };
        if let Some(prev) = out.segments.last() {
            let p: &ScannedSegment = prev;
            if header.cluster_id != p.header.cluster_id || header.node_id != p.header.node_id {
                return Err(LogError::Corrupt {
                    file: describe,
                    offset: 16,
                    reason: format!(
                        "segment belongs to cluster {:#x} node {}, the log before it to cluster {:#x} node {}",
                        header.cluster_id, header.node_id, p.header.cluster_id, p.header.node_id
                    ),
                });
            }
            if header.first_op != p.last_op + 1 || header.prev_crc != p.last_crc {
                return Err(LogError::Corrupt {
                    file: describe,
                    offset: 32,
                    reason: format!(
                        "segment does not continue {} (expected op {} chained to {:#010x}, \
                         found op {} chained to {:#010x})",
                        p.name,
                        p.last_op + 1,
                        p.last_crc,
                        header.first_op,
                        header.prev_crc
                    ),
                });
            }
        }
        let mut seg = ScannedSegment {
            name: name.clone(),
            header,
            last_op: header.first_op - 1,
            last_crc: header.prev_crc,
            len: SEGMENT_HEADER_LEN as u64,
            index: Vec::new(),
        };
        window.invalidate();
        let mut offset = SEGMENT_HEADER_LEN as u64;
        let mut last_indexed: Option<u64> = None;
        let mut stop = false;
        let io_err = |e| LogError::io(format!("reading {describe}"), e);
        loop {
            // A reader without the writer's lock may hold bytes the writer
            // has written over since (zeros it read ahead): before judging
            // the last segment's end, it looks again once.
            let mut looked_again = false;
            let step = loop {
                let step = next_record(
                    &file,
                    &mut window,
                    offset,
                    file_len,
                    seg.last_op + 1,
                    seg.last_crc,
                )
                .map_err(io_err)?;
                let settled =
                    matches!(step, Ok(Some(_))) || matches!(step, Ok(None) if offset >= file_len);
                if settled || !is_last || looked_again {
                    break step;
                }
                looked_again = true;
                window.invalidate();
                file_len = file.len().map_err(io_err)?;
            };
            // Zeros where the next record would start: the clean end of a
            // preallocated segment when nothing but zeros follows; else a
            // record whose first bytes never reached the disk.
            let step = match step {
                Ok(None) if offset < file_len => {
                    if zeros_to_end(&file, offset, file_len).map_err(io_err)? {
                        on_bytes(file_len - offset);
                        Ok(None)
                    } else {
                        Err(Bad::Decode(DecodeError::Zeroed))
                    }
                }
                other => other,
            };
            match step {
                Ok(None) => break,
                Ok(Some(h)) => {
                    let len = h.encoded_len();
                    if last_indexed.is_none_or(|l| offset - l >= INDEX_STRIDE) {
                        seg.index.push((h.op, offset, h.prev));
                        last_indexed = Some(offset);
                    }
                    if h.op >= from_op {
                        let raw = window
                            .get(&file, offset, len, file_len)
                            .map_err(|e| LogError::io(format!("reading {describe}"), e))?;
                        let seen = Seen {
                            segment: name,
                            offset,
                            header: &h,
                            raw: &raw[..len],
                        };
                        if !on_record(&seen)? {
                            stop = true;
                        }
                    }
                    on_bytes(len as u64);
                    seg.last_op = h.op;
                    seg.last_crc = h.crc;
                    offset += len as u64;
                    seg.len = offset;
                    if stop {
                        break;
                    }
                }
                Err(bad) => {
                    // In the last segment, damage is a torn tail when nothing
                    // valid follows it, or when a power loss explains it:
                    // written over preallocated space, unsynced sectors reach
                    // the disk in any order and the missing ones read as
                    // zeros — a record starting with zeros, or a whole zero
                    // sector before the next valid record. Synced records
                    // are never after such a gap, so cutting loses nothing
                    // that was acknowledged.
                    let torn = is_last
                        && matches!(bad, Bad::Decode(_))
                        && match next_valid_record(&file, offset, file_len).map_err(io_err)? {
                            None => true,
                            Some(_) if matches!(bad, Bad::Decode(DecodeError::Zeroed)) => true,
                            Some(next) => zero_sector_in(&file, offset, next).map_err(io_err)?,
                        };
                    if !torn {
                        return Err(LogError::Corrupt {
                            file: describe,
                            offset,
                            reason: bad.to_string(),
                        });
                    }
                    on_bytes(file_len - offset);
                    out.torn = Some(TornTail {
                        segment: name.clone(),
                        file: describe.clone(),
                        offset,
                        bytes: file_len - offset,
                        whole_segment: false,
                        reason: bad.to_string(),
                    });
                    break;
                }
            }
        }
        out.segments.push(seg);
        if stop {
            break;
        }
    }
    Ok(out)
}
