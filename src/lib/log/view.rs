//! Reading a log without owning it: for `log-inspect`, for a replica that
//! streams entries to a peer, and for following a log another process appends to.

use std::collections::VecDeque;
use std::path::Path;

use super::LogError;
use super::format::{RECORD_HEADER_LEN, RecordHeader, SEGMENT_HEADER_LEN, SegmentHeader};
use super::scan::{self, HeaderState, ScanOutcome, Seen, Window};
use super::storage::{FsStorage, Storage, StorageFile};

/// A read-only view of a log directory. Takes no lock: a replica may be
/// appending at the same time.
pub struct LogView<S: Storage> {
    storage: S,
}

impl LogView<FsStorage> {
    /// Opens the log in directory `path` (or in `path/log` when `path` is a
    /// replica's data directory).
    pub fn open_dir(path: &Path) -> Result<LogView<FsStorage>, LogError> {
        let meta =
            std::fs::metadata(path).map_err(|e| LogError::io(format!("{}", path.display()), e))?;
        if !meta.is_dir() {
            return Err(LogError::NotALog {
                path: path.display().to_string(),
                reason: "not a directory (give the log directory, not a file)".into(),
            });
        }
        // A replica's data directory holds the log in `log/`.
        let has_segments = |dir: &Path| {
            std::fs::read_dir(dir).is_ok_and(|mut it| {
                it.any(|e| {
                    e.is_ok_and(|e| {
                        e.file_name()
                            .to_str()
                            .and_then(scan::parse_segment_name)
                            .is_some()
                    })
                })
            })
        };
        let nested = path.join("log");
        let dir = if nested.is_dir() && !has_segments(path) {
            nested
        } else {
            path.to_path_buf()
        };
        let storage =
            FsStorage::new(&dir, false).map_err(|e| LogError::io(dir.display().to_string(), e))?;
        LogView::new(storage)
    }
}

impl<S: Storage> LogView<S> {
    /// A view of the log in `storage`; fails when it holds no log.
    pub fn new(storage: S) -> Result<LogView<S>, LogError> {
        let segs = scan::list_segments(&storage)?;
        if segs.is_empty() {
            return Err(LogError::NotALog {
                path: storage.describe(""),
                reason: "the directory holds no segment files (*.seg)".into(),
            });
        }
        let view = LogView { storage };
        view.first_header()?;
        Ok(view)
    }

    /// The storage.
    pub fn storage(&self) -> &S {
        &self.storage
    }

    /// The header of the oldest segment with a complete header.
    pub fn first_header(&self) -> Result<SegmentHeader, LogError> {
        let segs = scan::list_segments(&self.storage)?;
        let mut last_err = None;
        for (name, op) in &segs {
            let describe = self.storage.describe(name);
            let file = self
                .storage
                .open_ro(name)
                .map_err(|e| LogError::io(format!("opening {describe}"), e))?;
            match scan::read_header(&file, &describe, *op, false)? {
                (HeaderState::Valid(h), _) => return Ok(h),
                (HeaderState::Torn { reason }, _) => last_err = Some((describe, reason)),
            }
        }
        let (path, reason) =
            last_err.unwrap_or_else(|| (self.storage.describe(""), "no segments".into()));
        Err(LogError::NotALog {
            path,
            reason: format!("no complete segment header ({reason})"),
        })
    }

    /// Total bytes of all segment files (for progress bars).
    pub fn total_bytes(&self) -> Result<u64, LogError> {
        let mut total = 0;
        for (name, _) in scan::list_segments(&self.storage)? {
            let describe = self.storage.describe(&name);
            let f = self
                .storage
                .open_ro(&name)
                .map_err(|e| LogError::io(format!("opening {describe}"), e))?;
            total += f
                .len()
                .map_err(|e| LogError::io(format!("reading {describe}"), e))?;
        }
        Ok(total)
    }

    /// Scans the whole log with every check; see [`scan::scan_log`].
    pub fn scan(
        &self,
        from_op: u64,
        on_record: impl FnMut(&Seen<'_>) -> Result<bool, LogError>,
        on_bytes: impl FnMut(u64),
    ) -> Result<ScanOutcome, LogError> {
        scan::scan_log(&self.storage, from_op, on_record, on_bytes)
    }

    /// Starts following the log at op `from` (`None`: after its current end).
    pub fn follow(&self, from: Option<u64>) -> Result<Follow<'_, S>, LogError>
    where
        S: Clone,
    {
        let mut f = Follow {
            storage: &self.storage,
            seg_name: None,
            file: None,
            file_len: 0,
            offset: 0,
            expect_op: 0,
            prev: 0,
            skip_below: from.unwrap_or(0),
            history: VecDeque::new(),
            window: Window::default(),
            last: None,
        };
        if from.is_none() {
            let outcome = self.scan(u64::MAX, |_| Ok(true), |_| {})?;
            f.skip_below = outcome.segments.last().map(|s| s.last_op + 1).unwrap_or(1);
        }
        Ok(f)
    }
}

/// What a follower sees.
#[derive(Debug)]
pub enum FollowEvent {
    /// A record appended.
    Record {
        /// Segment file name.
        segment: String,
        /// Offset in it.
        offset: u64,
        /// The header.
        header: RecordHeader,
        /// The payload.
        payload: Vec<u8>,
    },
    /// The log was cut back (a view change dropped entries): records after
    /// `after_op` that were printed before are gone; new ones follow.
    Truncated {
        /// The last op that is still in the log.
        after_op: u64,
    },
}

const HISTORY_MAX: usize = 4096;

/// Follows a log that another process appends to. Call [`Follow::poll`]
/// repeatedly; it never blocks.
pub struct Follow<'a, S: Storage> {
    storage: &'a S,
    seg_name: Option<String>,
    file: Option<S::File>,
    file_len: u64,
    offset: u64,
    expect_op: u64,
    prev: u32,
    skip_below: u64,
    history: VecDeque<(u64, u32)>,
    window: Window,
    /// The last record read in the current segment: (offset, length, op,
    /// chain value before it, its own), to notice a cut that the file's
    /// length does not show.
    last: Option<(u64, u64, u64, u32, u32)>,
}

impl<S: Storage> Follow<'_, S> {
    fn io(&self, e: std::io::Error) -> LogError {
        LogError::io(
            format!(
                "reading {}",
                self.storage
                    .describe(self.seg_name.as_deref().unwrap_or(""))
            ),
            e,
        )
    }

    /// Opens the segment that should hold op `target` (or the oldest one
    /// after it, when it was compacted away). False when nothing is there yet.
    fn open_segment_for(&mut self, target: u64) -> Result<bool, LogError> {
        let segs = scan::list_segments(self.storage)?;
        let Some((name, first)) = segs
            .iter()
            .rev()
            .find(|(_, first)| *first <= target)
            .or(segs.first())
            .cloned()
        else {
            return Ok(false);
        };
        let describe = self.storage.describe(&name);
        let file = match self.storage.open_ro(&name) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(LogError::io(format!("opening {describe}"), e)),
        };
        let h = match scan::read_header(&file, &describe, first, false)? {
            (HeaderState::Valid(h), _) => h,
            (HeaderState::Torn { .. }, _) => return Ok(false),
        };
        self.seg_name = Some(name);
        self.file = Some(file);
        self.last = None;
        self.offset = SEGMENT_HEADER_LEN as u64;
        self.expect_op = h.first_op;
        self.prev = h.prev_crc;
        self.window.invalidate();
        Ok(true)
    }

    /// The next new record or event, or `None` when nothing new is there yet.
    pub fn poll(&mut self) -> Result<Option<FollowEvent>, LogError> {
        loop {
            if self.file.is_none() {
                let target = self.expect_op.max(self.skip_below).max(1);
                if !self.open_segment_for(target)? {
                    return Ok(None);
                }
            }
            let file = self.file.as_ref().expect("opened above");
            self.file_len = file.len().map_err(|e| self.io(e))?;
            if self.file_len < self.offset {
                match self.resync()? {
                    Some(ev) => return Ok(Some(ev)),
                    None => continue,
                }
            }
            self.window.invalidate();
            let step = scan::next_record(
                file,
                &mut self.window,
                self.offset,
                self.file_len,
                self.expect_op,
                self.prev,
            )
            .map_err(|e| self.io(e))?;
            match step {
                Ok(Some(h)) => {
                    let len = h.encoded_len();
                    let payload = match self.window.get(file, self.offset, len, self.file_len) {
                        Ok(raw) => {
                            raw[RECORD_HEADER_LEN..RECORD_HEADER_LEN + h.payload_len].to_vec()
                        }
                        Err(e) => return Err(self.io(e)),
                    };
                    let offset = self.offset;
                    self.last = Some((offset, len as u64, h.op, self.prev, h.crc));
                    self.offset += len as u64;
                    self.expect_op = h.op + 1;
                    self.prev = h.crc;
                    self.history.push_back((h.op, h.crc));
                    if self.history.len() > HISTORY_MAX {
                        self.history.pop_front();
                    }
                    if h.op < self.skip_below {
                        continue;
                    }
                    return Ok(Some(FollowEvent::Record {
                        segment: self.seg_name.clone().unwrap_or_default(),
                        offset,
                        header: h,
                        payload,
                    }));
                }
                Ok(None) | Err(scan::Bad::Decode(_)) => {
                    // At the end, or a record still being written. Has the
                    // writer moved on to a new segment, or cut this one back?
                    let segs = scan::list_segments(self.storage)?;
                    let cur = self.seg_name.clone().unwrap_or_default();
                    if !segs.iter().any(|(n, _)| *n == cur) {
                        match self.resync()? {
                            Some(ev) => return Ok(Some(ev)),
                            None => return Ok(None),
                        }
                    }
                    let next_exists = segs.iter().any(|(_, first)| *first == self.expect_op)
                        && scan::segment_name(self.expect_op) != cur;
                    if next_exists {
                        if let Err(scan::Bad::Decode(e)) = step {
                            return Err(LogError::Corrupt {
                                file: self.storage.describe(&cur),
                                offset: self.offset,
                                reason: e.to_string(),
                            });
                        }
                        self.file = None;
                        continue;
                    }
                    // The writer may have cut the log back and written past
                    // where we read before we looked again, so the file never
                    // got shorter than our offset: is the last record we
                    // read still there?
                    if self.last_moved()? {
                        return self.resync();
                    }
                    return Ok(None);
                }
                Err(scan::Bad::Chain(_)) => match self.resync()? {
                    Some(ev) => return Ok(Some(ev)),
                    None => return Ok(None),
                },
            }
        }
    }

    /// Whether the last record read is no longer where it was.
    fn last_moved(&self) -> Result<bool, LogError> {
        let (Some((at, len, op, prev, crc)), Some(file)) = (self.last, self.file.as_ref()) else {
            return Ok(false);
        };
        let mut window = Window::default();
        let step =
            scan::next_record(file, &mut window, at, at + len, op, prev).map_err(|e| self.io(e))?;
        Ok(!matches!(step, Ok(Some(h)) if h.crc == crc))
    }

    /// The log changed under us (truncated, maybe rewritten): find the first
    /// op that differs from what we saw and continue from there.
    fn resync(&mut self) -> Result<Option<FollowEvent>, LogError> {
        let oldest_seen = self.history.front().map(|h| h.0).unwrap_or(self.expect_op);
        let segs = scan::list_segments(self.storage)?;
        // Walk from the segment holding the oldest op we remember.
        let start = segs
            .iter()
            .rposition(|(_, first)| *first <= oldest_seen)
            .unwrap_or(0);
        let mut diverged_at: Option<(String, u64, u64, u32)> = None; // (segment, offset, op, prev)
        let mut last_good: Option<(String, u64, u64, u32)> = None;
        'segments: for (name, first) in segs.iter().skip(start) {
            let describe = self.storage.describe(name);
            let file = match self.storage.open_ro(name) {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                Err(e) => return Err(LogError::io(format!("opening {describe}"), e)),
            };
            let h = match scan::read_header(&file, &describe, *first, false)? {
                (HeaderState::Valid(h), _) => h,
                (HeaderState::Torn { .. }, _) => break,
            };
            let len = file.len().map_err(|e| LogError::io(describe.clone(), e))?;
            let mut window = Window::default();
            let (mut offset, mut op, mut prev) =
                (SEGMENT_HEADER_LEN as u64, h.first_op, h.prev_crc);
            loop {
                let step = scan::next_record(&file, &mut window, offset, len, op, prev)
                    .map_err(|e| LogError::io(describe.clone(), e))?;
                let Ok(Some(rh)) = step else {
                    last_good = Some((name.clone(), offset, op, prev));
                    if step.is_err() {
                        break 'segments;
                    }
                    break;
                };
                let seen = self.history.iter().find(|(o, _)| *o == rh.op).map(|x| x.1);
                let differs = match seen {
                    Some(crc) => crc != rh.crc,
                    None => rh.op >= oldest_seen,
                };
                if differs || rh.op >= self.expect_op {
                    diverged_at = Some((name.clone(), offset, rh.op, prev));
                    break 'segments;
                }
                offset += rh.encoded_len() as u64;
                op += 1;
                prev = rh.crc;
            }
        }
        let (name, offset, op, prev) =
            diverged_at.or(last_good).ok_or_else(|| LogError::NotALog {
                path: self.storage.describe(""),
                reason: "the log vanished while it was being followed".into(),
            })?;
        let describe = self.storage.describe(&name);
        self.file = Some(
            self.storage
                .open_ro(&name)
                .map_err(|e| LogError::io(format!("opening {describe}"), e))?,
        );
        self.seg_name = Some(name);
        self.last = None;
        self.offset = offset;
        self.prev = prev;
        self.skip_below = self.skip_below.min(op);
        self.history.retain(|(o, _)| *o < op);
        self.window.invalidate();
        let truncated = op < self.expect_op;
        self.expect_op = op;
        Ok(truncated.then_some(FollowEvent::Truncated { after_op: op - 1 }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::conformance::{CLUSTER, entry};
    use crate::log::{LogOptions, MemStorage, SegmentLog};

    /// The writer cuts the log back and appends past where the follower
    /// read before it looks again: the file never got shorter than the
    /// follower's offset, and it still sees the cut and the new records.
    #[test]
    fn a_follower_sees_a_cut_the_files_length_does_not_show() {
        let s = MemStorage::new();
        let o = LogOptions::new(CLUSTER, 1);
        let (mut log, _) = SegmentLog::open(s.clone(), o).unwrap();
        log.append(&(1..=10).map(|op| entry(1, op)).collect::<Vec<_>>())
            .unwrap();
        let view = LogView::new(s.clone()).unwrap();
        let mut f = view.follow(Some(1)).unwrap();
        let mut seen = Vec::new();
        while let Some(ev) = f.poll().unwrap() {
            match ev {
                FollowEvent::Record { header, .. } => seen.push(header.op),
                FollowEvent::Truncated { .. } => panic!("no cut yet"),
            }
        }
        assert_eq!(seen, (1..=10).collect::<Vec<_>>());
        log.truncate_after(4).unwrap();
        // New records, with longer payloads than the old ones, run past
        // the follower's offset without landing on it at a record boundary.
        let long = |op| crate::log::Entry {
            payload: vec![b'x'; 301].into(),
            ..entry(2, op)
        };
        log.append(&(5..=40).map(long).collect::<Vec<_>>()).unwrap();
        let mut events = Vec::new();
        for _ in 0..200 {
            match f.poll().unwrap() {
                Some(FollowEvent::Truncated { after_op }) => events.push(format!("cut {after_op}")),
                Some(FollowEvent::Record { header, .. }) => {
                    assert_eq!(header.view, 2, "op {} from before the cut", header.op);
                    events.push(header.op.to_string());
                }
                None => break,
            }
        }
        let want: Vec<String> = std::iter::once("cut 4".to_string())
            .chain((5..=40).map(|op| op.to_string()))
            .collect();
        assert_eq!(events, want);
    }
}
