//! The writable log: append with group commit, recovery, rollover,
//! truncation and compaction.

use super::LogError;
use super::format::{self, CHAIN_START, Entry, SEGMENT_HEADER_LEN, SegmentHeader};
use super::scan::{self, ScannedSegment, TornTail, Window};
use super::storage::{Storage, StorageFile};

/// When appended records are made durable.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SyncPolicy {
    /// `fdatasync` after every append call.
    Always,
    /// `fdatasync` once per [`SegmentLog::sync`] call, covering every append
    /// since the last one (group commit). Nothing may be acknowledged to
    /// anyone before that call returns.
    #[default]
    Batch,
    /// Never `fdatasync`: records reach the disk when the OS writes them back.
    /// A power loss can lose acknowledged entries. Benchmarks and tests only.
    Never,
}

impl std::str::FromStr for SyncPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "always" => Ok(SyncPolicy::Always),
            "batch" => Ok(SyncPolicy::Batch),
            "never" => Ok(SyncPolicy::Never),
            _ => Err(format!(
                "unknown sync policy {s:?} (expected always, batch or never)"
            )),
        }
    }
}

impl std::fmt::Display for SyncPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SyncPolicy::Always => "always",
            SyncPolicy::Batch => "batch",
            SyncPolicy::Never => "never",
        })
    }
}

/// How to open a log.
#[derive(Clone, Debug)]
pub struct LogOptions {
    /// The cluster the log belongs to; a log of another cluster is refused.
    pub cluster_id: u64,
    /// The replica that writes it; a log of another replica is refused.
    pub node_id: u32,
    /// A segment is closed and a new one started once it holds this many bytes.
    pub segment_bytes_max: u64,
    /// When appends become durable.
    pub sync: SyncPolicy,
    /// The op of the first entry of a new log.
    pub first_op: u64,
    /// The wall clock for segment headers (ns since the Unix epoch); the
    /// simulator and the fixture generator pass their own.
    pub clock: Clock,
    /// Space reserved (`fallocate`) ahead of the writes in the segment being
    /// written, this many bytes at a time; 0 for none. Appends inside
    /// reserved space change no file size, so an `fdatasync` commits less
    /// (measured here: a third less time and CPU per fdatasync).
    pub preallocate_bytes: u64,
}

/// A source of wall-clock time in ns since the Unix epoch.
#[derive(Clone)]
pub struct Clock(pub std::sync::Arc<dyn Fn() -> u64 + Send + Sync>);

impl Clock {
    /// The system clock.
    pub fn system() -> Clock {
        Clock(std::sync::Arc::new(super::now_ns))
    }
    /// A clock that always reads `ns`.
    pub fn fixed(ns: u64) -> Clock {
        Clock(std::sync::Arc::new(move || ns))
    }
    /// The current time.
    pub fn now_ns(&self) -> u64 {
        (self.0)()
    }
}

impl std::fmt::Debug for Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Clock({})", self.now_ns())
    }
}

impl LogOptions {
    /// Defaults (64 MiB segments, `batch`, first op 1) for a cluster and node.
    pub fn new(cluster_id: u64, node_id: u32) -> LogOptions {
        LogOptions {
            cluster_id,
            node_id,
            segment_bytes_max: 64 << 20,
            sync: SyncPolicy::Batch,
            first_op: 1,
            clock: Clock::system(),
            preallocate_bytes: PREALLOCATE_BYTES,
        }
    }
}

/// The default [`LogOptions::preallocate_bytes`].
pub const PREALLOCATE_BYTES: u64 = 4 << 20;

/// What [`SegmentLog::open`] found and repaired.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Recovery {
    /// Whether the log was created by this open.
    pub created: bool,
    /// Segments in the log.
    pub segments: usize,
    /// First op held.
    pub first_op: u64,
    /// Last op held (`first_op - 1` when empty).
    pub last_op: u64,
    /// A torn tail that was cut off.
    pub torn: Option<TornTail>,
    /// A failed fsync had left its note: the log was read from the disk,
    /// not from the page cache.
    pub after_failed_fsync: bool,
}

/// Public facts about one segment.
#[derive(Clone, Debug, serde::Serialize)]
pub struct SegmentInfo {
    /// File name.
    pub name: String,
    /// First op.
    pub first_op: u64,
    /// Last op (`first_op - 1` when empty).
    pub last_op: u64,
    /// Bytes.
    pub bytes: u64,
}

/// What [`SegmentLog::sync_handle`] gives an fsync thread.
#[derive(Debug)]
pub struct SyncRequest<F> {
    /// A second handle to the segment being written, when the thread's is
    /// not that (else the thread uses the one it holds).
    pub file: Option<F>,
    /// The id of that handle: the thread holds this one afterwards.
    pub handle_id: u64,
    /// The last op written so far.
    pub op: u64,
    /// The log's epoch, for [`SegmentLog::note_synced`].
    pub epoch: u64,
}

/// A process-wide unique id for a segment handle.
fn next_handle_id() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

struct Segment<F> {
    meta: ScannedSegment,
    /// Open for writing: only the last segment.
    file: Option<F>,
    /// The file's length as far as the log made it: past `meta.len` when
    /// space is preallocated (zeros up to here).
    reserved: u64,
}

/// A replica's log on some [`Storage`].
pub struct SegmentLog<S: Storage> {
    storage: S,
    opts: LogOptions,
    segments: Vec<Segment<S::File>>,
    next_op: u64,
    last_crc: u32,
    durable_op: u64,
    poisoned: bool,
    /// Changes whenever the log's tail is replaced or a new segment starts,
    /// so an fsync started before does not count for what came after.
    epoch: u64,
    /// Names the open handle of the segment being written, unique in the
    /// process: a new segment, or a truncation, gives a new one. An fsync
    /// thread keeps a second handle while this stays the same.
    handle_id: u64,
    buf: Vec<u8>,
    /// Whether to keep preallocating the segment being written; off after
    /// a failure (no space, unsupported) or a truncation, until the next one.
    preallocate: bool,
    _lock: Box<dyn Send>,
}

impl<S: Storage> SegmentLog<S> {
    /// Opens the log in `storage`, creating it when the directory is empty,
    /// and recovers from a crash: a torn tail is cut off and reported in the
    /// returned [`Recovery`]; any other damage is an error and nothing is changed.
    pub fn open(storage: S, opts: LogOptions) -> Result<(SegmentLog<S>, Recovery), LogError> {
        assert!(opts.first_op >= 1, "ops start at 1");
        let lock = storage.lock().map_err(|e| {
            if e.kind() == std::io::ErrorKind::WouldBlock {
                LogError::Locked(e.to_string())
            } else {
                LogError::io(format!("locking {}", storage.describe("LOCK")), e)
            }
        })?;
        // After a failed fsync, this process's predecessor may have left
        // pages in the cache that never reached the disk: read the disk.
        let after_failure = storage.forget_cache_after_failed_fsync().map_err(|e| {
            LogError::io(
                format!(
                    "dropping the cached pages of {} after a failed fsync",
                    storage.describe("")
                ),
                e,
            )
        })?;
        let outcome = scan::scan_log(&storage, u64::MAX, |_| Ok(true), |_| {})?;
        let mut log = SegmentLog {
            storage,
            segments: Vec::new(),
            next_op: opts.first_op,
            last_crc: CHAIN_START,
            durable_op: opts.first_op - 1,
            poisoned: false,
            epoch: 0,
            handle_id: next_handle_id(),
            buf: Vec::with_capacity(1 << 20),
            preallocate: true,
            opts,
            _lock: lock,
        };
        let mut recovery = Recovery::default();
        for seg in &outcome.segments {
            log.check_owner(seg)?;
        }
        if let Some(torn) = &outcome.torn {
            if torn.whole_segment {
                log.storage
                    .remove(&torn.segment)
                    .map_err(|e| LogError::io(format!("removing torn segment {}", torn.file), e))?;
                log.sync_dir()?;
            } else {
                let last = outcome
                    .segments
                    .last()
                    .expect("a torn record lies in a segment");
                let mut f = log.open_rw(&last.name)?;
                f.set_len(torn.offset)
                    .and_then(|_| f.sync_data())
                    .map_err(|e| {
                        note_failed_fsync(&log.storage);
                        LogError::io(format!("cutting the torn tail of {}", torn.file), e)
                    })?;
            }
            recovery.torn = Some(torn.clone());
        }
        if outcome.segments.is_empty() {
            let first = log.opts.first_op;
            log.create_segment(first, CHAIN_START)?;
            recovery.created = outcome.torn.is_none();
        } else {
            let n = outcome.segments.len();
            for (i, meta) in outcome.segments.into_iter().enumerate() {
                let (file, reserved) = if i + 1 == n {
                    let f = log.open_rw(&meta.name)?;
                    let len = f.len().map_err(|e| {
                        LogError::io(format!("reading {}", log.storage.describe(&meta.name)), e)
                    })?;
                    (Some(f), len)
                } else {
                    (None, meta.len)
                };
                log.segments.push(Segment {
                    meta,
                    file,
                    reserved,
                });
            }
            let last = &log.segments[n - 1].meta;
            log.next_op = last.last_op + 1;
            log.last_crc = last.last_crc;
            log.durable_op = last.last_op;
            // (Space is reserved again at the first append, not here: a log
            // the node refuses after opening it stays as it was.)
            // What survived a process restart may still sit in the page cache
            // only: make it durable before anyone relies on it.
            if log.opts.sync != SyncPolicy::Never {
                log.sync_active()?;
                log.sync_dir()?;
            }
        }
        if after_failure {
            // Read from the disk (and synced again, unless the policy is
            // never): the log is what the disk holds.
            log.storage.clear_fsync_note();
        }
        recovery.after_failed_fsync = after_failure;
        recovery.segments = log.segments.len();
        recovery.first_op = log.first_op();
        recovery.last_op = log.last_op();
        Ok((log, recovery))
    }

    fn check_owner(&self, seg: &ScannedSegment) -> Result<(), LogError> {
        let h = &seg.header;
        if h.cluster_id != self.opts.cluster_id || h.node_id != self.opts.node_id {
            return Err(LogError::WrongOwner {
                file: self.storage.describe(&seg.name),
                expected: format!(
                    "cluster {:#x} node {}",
                    self.opts.cluster_id, self.opts.node_id
                ),
                found: match crate::config::other_mode(self.opts.cluster_id, h.cluster_id) {
                    Some(why) => format!("{why} (cluster {:#x} node {})", h.cluster_id, h.node_id),
                    None => format!("cluster {:#x} node {}", h.cluster_id, h.node_id),
                },
            });
        }
        Ok(())
    }

    fn open_rw(&self, name: &str) -> Result<S::File, LogError> {
        self.storage
            .open_rw(name)
            .map_err(|e| LogError::io(format!("opening {}", self.storage.describe(name)), e))
    }

    fn sync_dir(&mut self) -> Result<(), LogError> {
        if self.opts.sync == super::SyncPolicy::Never {
            return Ok(());
        }
        self.storage.sync_dir().map_err(|e| {
            self.poison();
            // Never "out of space, retry later" (see fsync_failed).
            LogError::io(
                format!("syncing directory {}", self.storage.describe("")),
                std::io::Error::other(e),
            )
        })
    }

    fn create_segment(&mut self, first_op: u64, prev_crc: u32) -> Result<(), LogError> {
        let name = scan::segment_name(first_op);
        let header = SegmentHeader {
            version: format::FORMAT_VERSION,
            cluster_id: self.opts.cluster_id,
            node_id: self.opts.node_id,
            first_op,
            prev_crc,
            created_ns: self.opts.clock.now_ns(),
        };
        let describe = self.storage.describe(&name);
        let mut file = self
            .storage
            .create_new(&name)
            .map_err(|e| LogError::io(format!("creating {describe}"), e))?;
        self.preallocate = true;
        let mut reserved = SEGMENT_HEADER_LEN as u64;
        // The header is synced before the space is reserved: a crash never
        // leaves a reserved segment whose header did not reach the disk.
        // (Recovery takes one of zeros only as a torn header too.)
        let written = file
            .write_all_at(&format::encode_segment_header(&header), 0)
            .and_then(|_| {
                if self.opts.sync == SyncPolicy::Never {
                    Ok(())
                } else {
                    file.sync_data()
                }
            })
            .map(|_| {
                let want = self.opts.preallocate_bytes.min(self.opts.segment_bytes_max);
                if want > reserved {
                    match file.preallocate(want) {
                        Ok(()) => reserved = want,
                        Err(_) => self.preallocate = false,
                    }
                }
            });
        if let Err(e) = written {
            // Leave no half-made segment behind (best effort; recovery would cut it anyway).
            let _ = self.storage.remove(&name);
            return Err(LogError::io(format!("writing the header of {describe}"), e));
        }
        self.sync_dir()?;
        if let Some(last) = self.segments.last_mut() {
            last.file = None;
        }
        self.segments.push(Segment {
            meta: ScannedSegment {
                name,
                header,
                last_op: first_op - 1,
                last_crc: prev_crc,
                len: SEGMENT_HEADER_LEN as u64,
                index: Vec::new(),
            },
            file: Some(file),
            reserved,
        });
        self.next_op = first_op;
        self.last_crc = prev_crc;
        self.epoch += 1;
        self.handle_id = next_handle_id();
        Ok(())
    }

    /// The first op the log holds (or would hold, when empty).
    pub fn first_op(&self) -> u64 {
        self.segments
            .first()
            .map(|s| s.meta.header.first_op)
            .unwrap_or(self.next_op)
    }

    /// The last op appended (`first_op() - 1` when empty).
    pub fn last_op(&self) -> u64 {
        self.next_op - 1
    }

    /// The op the next appended entry must carry.
    pub fn next_op(&self) -> u64 {
        self.next_op
    }

    /// The last op known to be on disk.
    pub fn durable_op(&self) -> u64 {
        self.durable_op
    }

    /// The chain value after the last record.
    pub fn last_crc(&self) -> u32 {
        self.last_crc
    }

    /// The options the log was opened with.
    pub fn options(&self) -> &LogOptions {
        &self.opts
    }

    /// Facts about every segment, oldest first.
    pub fn segments(&self) -> Vec<SegmentInfo> {
        self.segments
            .iter()
            .map(|s| SegmentInfo {
                name: s.meta.name.clone(),
                first_op: s.meta.header.first_op,
                last_op: s.meta.last_op,
                bytes: s.meta.len,
            })
            .collect()
    }

    /// Appends entries, which must carry consecutive ops starting at
    /// [`next_op`](Self::next_op). They are written to the OS at once and are
    /// durable after the next [`sync`](Self::sync) (policy `batch`), at
    /// return (policy `always`), or whenever the OS decides (policy `never`).
    ///
    /// On an I/O error, a prefix of the entries may have been appended
    /// (see [`last_op`](Self::last_op)); the rest can be retried.
    pub fn append(&mut self, entries: &[Entry]) -> Result<(), LogError> {
        if self.poisoned {
            return Err(LogError::Poisoned);
        }
        for (k, e) in entries.iter().enumerate() {
            let expected = self.next_op + k as u64;
            if e.op != expected {
                return Err(LogError::Sequence {
                    expected,
                    got: e.op,
                });
            }
            if e.payload.len() > format::PAYLOAD_MAX {
                return Err(LogError::TooLarge(e.payload.len()));
            }
        }
        let max = self.opts.segment_bytes_max;
        let mut i = 0;
        while i < entries.len() {
            let seg_len = self.active().meta.len;
            let seg_has_records = self.active().meta.last_op >= self.active().meta.header.first_op;
            if seg_has_records && seg_len + entries[i].encoded_len() as u64 > max {
                self.rollover()?;
            }
            let seg_len = self.active().meta.len;
            let mut buf = std::mem::take(&mut self.buf);
            buf.clear();
            let mut crc = self.last_crc;
            let start = i;
            let mut index_add = Vec::new();
            let mut last_indexed = self.active().meta.index.last().map(|x| x.1);
            while i < entries.len() {
                let e = &entries[i];
                let at = seg_len + buf.len() as u64;
                if i > start && at + e.encoded_len() as u64 > max {
                    break;
                }
                if last_indexed.is_none_or(|l| at - l >= scan::INDEX_STRIDE) {
                    index_add.push((e.op, at, crc));
                    last_indexed = Some(at);
                }
                crc = format::encode_record(e, crc, &mut buf);
                i += 1;
            }
            self.reserve(seg_len + buf.len() as u64);
            let result = self.write_active(&buf, seg_len);
            self.buf = buf;
            result?;
            let written = self.buf.len() as u64;
            let seg = self.active_mut();
            seg.meta.len += written;
            seg.meta.last_op = entries[i - 1].op;
            seg.meta.last_crc = crc;
            seg.meta.index.extend(index_add);
            self.next_op = entries[i - 1].op + 1;
            self.last_crc = crc;
        }
        if self.buf.capacity() > 8 << 20 {
            self.buf = Vec::with_capacity(1 << 20);
        }
        if self.opts.sync == SyncPolicy::Always {
            self.sync()?;
        }
        Ok(())
    }

    /// Keeps space preallocated in the segment being written up to at least
    /// `end` bytes, a [`LogOptions::preallocate_bytes`] step at a time, never
    /// past the segment's size limit. Best effort: a failure only stops it.
    fn reserve(&mut self, end: u64) {
        let step = self.opts.preallocate_bytes;
        if step == 0 || !self.preallocate {
            return;
        }
        let max = self.opts.segment_bytes_max;
        let seg = self
            .segments
            .last_mut()
            .expect("a log always has a segment");
        if end <= seg.reserved || seg.reserved >= max {
            return;
        }
        let want = (seg.reserved + step).min(max).max(end);
        let Some(file) = seg.file.as_mut() else {
            return;
        };
        match file.preallocate(want) {
            Ok(()) => seg.reserved = want,
            Err(_) => self.preallocate = false,
        }
    }

    fn write_active(&mut self, buf: &[u8], at: u64) -> Result<(), LogError> {
        let seg = self.active_mut();
        let file = seg.file.as_mut().expect("the last segment is open");
        if let Err(e) = file.write_all_at(buf, at) {
            // Cut whatever part of the write landed, so that a later append at
            // the same offset cannot leave stale records behind it.
            if file.set_len(at).is_err() {
                self.poison();
            } else {
                seg.reserved = at;
            }
            let describe = self.storage.describe(&self.active().meta.name);
            return Err(LogError::io(
                format!("appending to {describe} at offset {at}"),
                e,
            ));
        }
        Ok(())
    }

    fn active(&self) -> &Segment<S::File> {
        self.segments.last().expect("a log always has a segment")
    }

    fn active_mut(&mut self) -> &mut Segment<S::File> {
        self.segments
            .last_mut()
            .expect("a log always has a segment")
    }

    fn rollover(&mut self) -> Result<(), LogError> {
        if self.opts.sync != SyncPolicy::Never {
            self.sync_active()?;
        }
        // A full segment keeps no preallocated zeros (best effort: if the cut
        // does not happen or does not last, a scan takes zeros up to the end
        // of a file for its end).
        let seg = self.active_mut();
        if seg.reserved > seg.meta.len {
            let len = seg.meta.len;
            if let Some(f) = seg.file.as_mut() {
                if f.set_len(len).is_ok() {
                    seg.reserved = len;
                }
            }
        }
        let (next, crc) = (self.next_op, self.last_crc);
        self.create_segment(next, crc)
    }

    /// Every later call fails; and since the failure may have been a
    /// write-back, the next open reads the log from the disk (see
    /// [`Storage::leave_fsync_note`]).
    fn poison(&mut self) {
        self.poisoned = true;
        note_failed_fsync(&self.storage);
    }

    fn sync_active(&mut self) -> Result<(), LogError> {
        let file = self
            .active_mut()
            .file
            .as_mut()
            .expect("the last segment is open");
        if let Err(e) = file.sync_data() {
            self.poison();
            let describe = self.storage.describe(&self.active().meta.name);
            return Err(fsync_failed(&describe, e));
        }
        Ok(())
    }

    /// Makes every appended entry durable (one `fdatasync` for all of them)
    /// and returns the last durable op.
    pub fn sync(&mut self) -> Result<u64, LogError> {
        if self.poisoned {
            return Err(LogError::Poisoned);
        }
        if self.durable_op < self.last_op() && self.opts.sync != SyncPolicy::Never {
            self.sync_active()?;
        }
        self.durable_op = self.last_op();
        Ok(self.durable_op)
    }

    /// For an fsync thread: what to make durable. It carries a second
    /// handle to the segment being written only when `held` (the id of the
    /// handle the thread was given last) no longer names that segment's
    /// handle, so a thread that keeps its handle syncs without a `dup` and a
    /// `close` each time. `fdatasync` on the handle, then report with
    /// [`note_synced`](Self::note_synced).
    pub fn sync_handle(&self, held: Option<u64>) -> Result<SyncRequest<S::File>, LogError> {
        if self.poisoned {
            return Err(LogError::Poisoned);
        }
        let file = if held == Some(self.handle_id) {
            None
        } else {
            let seg = self.active();
            let file = seg.file.as_ref().expect("the last segment is open");
            Some(file.try_clone().map_err(|e| {
                LogError::io(
                    format!(
                        "opening {} for fsync",
                        self.storage.describe(&seg.meta.name)
                    ),
                    e,
                )
            })?)
        };
        Ok(SyncRequest {
            file,
            handle_id: self.handle_id,
            op: self.last_op(),
            epoch: self.epoch,
        })
    }

    /// The id of the segment handle [`sync_handle`](Self::sync_handle)
    /// gives now: an fsync thread holding another one holds a segment no
    /// longer written (perhaps removed, its space kept while it is open).
    pub fn handle_id(&self) -> u64 {
        self.handle_id
    }

    /// An fsync through [`sync_handle`](Self::sync_handle) finished: entries
    /// up to `op` are durable, unless the tail changed since (`epoch`).
    /// A failed fsync must be reported with `Err`: it poisons the log.
    pub fn note_synced(
        &mut self,
        result: Result<(u64, u64), std::io::Error>,
    ) -> Result<u64, LogError> {
        match result {
            // Poisoned since (a write or an fsync on the loop failed): what
            // the thread synced may be short of what it was asked for.
            Ok(_) if self.poisoned => Err(LogError::Poisoned),
            Ok((op, epoch)) => {
                if epoch == self.epoch {
                    self.durable_op = self.durable_op.max(op.min(self.last_op()));
                }
                Ok(self.durable_op)
            }
            Err(e) => {
                self.poison();
                // (A failed reset may have left no segment at all.)
                let describe = self.segments.last().map_or_else(
                    || "the log".to_string(),
                    |s| self.storage.describe(&s.meta.name),
                );
                Err(fsync_failed(&describe, e))
            }
        }
    }

    /// Finds the segment holding `op`.
    fn segment_of(&self, op: u64) -> Option<usize> {
        let i = self
            .segments
            .partition_point(|s| s.meta.header.first_op <= op);
        if i == 0 {
            return None;
        }
        let s = &self.segments[i - 1].meta;
        (op <= s.last_op).then_some(i - 1)
    }

    fn out_of_range(&self, op: u64) -> LogError {
        LogError::OutOfRange {
            op,
            first: self.first_op(),
            last: self.last_op(),
        }
    }

    /// Reads entries from `from` on: at most `max_entries` of them and, past
    /// the first, at most `max_bytes` of payload.
    pub fn read(
        &self,
        from: u64,
        max_entries: usize,
        max_bytes: usize,
    ) -> Result<Vec<Entry>, LogError> {
        let mut out = Vec::new();
        if from > self.last_op() || max_entries == 0 {
            return Ok(out);
        }
        let mut si = self
            .segment_of(from)
            .ok_or_else(|| self.out_of_range(from))?;
        let mut op = from;
        let mut bytes = 0usize;
        let mut window = Window::default();
        while si < self.segments.len() && out.len() < max_entries {
            let seg = &self.segments[si];
            let describe = self.storage.describe(&seg.meta.name);
            let opened;
            let file: &S::File = match &seg.file {
                Some(f) => f,
                None => {
                    opened = self
                        .storage
                        .open_ro(&seg.meta.name)
                        .map_err(|e| LogError::io(format!("opening {describe}"), e))?;
                    &opened
                }
            };
            let (mut at_op, mut offset, mut prev) = locate(seg, op);
            window.invalidate();
            while at_op <= seg.meta.last_op && out.len() < max_entries {
                let h = scan::next_record(file, &mut window, offset, seg.meta.len, at_op, prev)
                    .map_err(|e| LogError::io(format!("reading {describe}"), e))?
                    .map_err(|bad| LogError::Corrupt {
                        file: describe.clone(),
                        offset,
                        reason: bad.to_string(),
                    })?
                    .ok_or_else(|| LogError::Corrupt {
                        file: describe.clone(),
                        offset,
                        reason: format!("op {at_op} missing: the file is shorter than expected"),
                    })?;
                let len = h.encoded_len();
                if h.op >= op {
                    if !out.is_empty() && bytes + h.payload_len > max_bytes {
                        return Ok(out);
                    }
                    let raw = window
                        .get(file, offset, len, seg.meta.len)
                        .map_err(|e| LogError::io(format!("reading {describe}"), e))?;
                    let (_, entry) = format::decode_entry(raw).map_err(|e| LogError::Corrupt {
                        file: describe.clone(),
                        offset,
                        reason: e.to_string(),
                    })?;
                    bytes += h.payload_len;
                    out.push(entry);
                }
                prev = h.crc;
                offset += len as u64;
                at_op += 1;
            }
            op = at_op;
            si += 1;
        }
        Ok(out)
    }

    /// Reads one entry.
    pub fn entry(&self, op: u64) -> Result<Entry, LogError> {
        self.read(op, 1, usize::MAX)?
            .pop()
            .ok_or_else(|| self.out_of_range(op))
    }

    /// Removes every entry after `op`, durably. The view change uses this to
    /// drop entries the new view does not have.
    pub fn truncate_after(&mut self, op: u64) -> Result<(), LogError> {
        let segments = self.segments.len();
        let r = self.truncate_after_inner(op);
        if r.is_err() && self.segments.len() != segments {
            // Segments were removed and the cut did not finish: the log's
            // state no longer matches its files. Nothing more is trusted.
            self.poison();
        }
        r
    }

    fn truncate_after_inner(&mut self, op: u64) -> Result<(), LogError> {
        if self.poisoned {
            return Err(LogError::Poisoned);
        }
        if op >= self.last_op() {
            return Ok(());
        }
        if op + 1 < self.first_op() {
            return Err(self.out_of_range(op));
        }
        let si = self.segment_of(op + 1).expect("op + 1 lies within the log");
        // Where record op + 1 starts, and its prev (the chain value after op).
        let (offset, prev) = {
            let seg = &self.segments[si];
            let describe = self.storage.describe(&seg.meta.name);
            let file = match &seg.file {
                Some(_) => None,
                None => Some(
                    self.storage
                        .open_ro(&seg.meta.name)
                        .map_err(|e| LogError::io(format!("opening {describe}"), e))?,
                ),
            };
            let file = file.as_ref().or(seg.file.as_ref()).expect("a file");
            let (mut at_op, mut offset, mut prev) = locate(seg, op + 1);
            let mut window = Window::default();
            while at_op < op + 1 {
                let h = scan::next_record(file, &mut window, offset, seg.meta.len, at_op, prev)
                    .map_err(|e| LogError::io(format!("reading {describe}"), e))?
                    .map_err(|bad| LogError::Corrupt {
                        file: describe.clone(),
                        offset,
                        reason: bad.to_string(),
                    })?
                    .ok_or_else(|| LogError::Corrupt {
                        file: describe.clone(),
                        offset,
                        reason: "file shorter than expected".into(),
                    })?;
                prev = h.crc;
                offset += h.encoded_len() as u64;
                at_op += 1;
            }
            (offset, prev)
        };
        // Later segments go first: a crash in between leaves a prefix of the old log.
        while self.segments.len() > si + 1 {
            let seg = self.segments.pop().expect("checked");
            drop(seg.file);
            self.storage.remove(&seg.meta.name).map_err(|e| {
                LogError::io(
                    format!("removing {}", self.storage.describe(&seg.meta.name)),
                    e,
                )
            })?;
        }
        self.sync_dir()?;
        let name = self.segments[si].meta.name.clone();
        let describe = self.storage.describe(&name);
        let mut file = match self.segments[si].file.take() {
            Some(f) => f,
            None => self.open_rw(&name)?,
        };
        let cut = file.set_len(offset).and_then(|_| {
            if self.opts.sync == SyncPolicy::Never {
                Ok(())
            } else {
                file.sync_data()
            }
        });
        if let Err(e) = cut {
            self.poison();
            return Err(LogError::io(
                format!("truncating {describe} at offset {offset}"),
                e,
            ));
        }
        let seg = &mut self.segments[si];
        seg.file = Some(file);
        seg.reserved = offset;
        // No more preallocation in this segment: a reader following the log
        // notices the cut by the file getting shorter than where it reads.
        self.preallocate = false;
        seg.meta.len = offset;
        seg.meta.last_op = op;
        seg.meta.last_crc = prev;
        seg.meta.index.retain(|p| p.0 <= op);
        self.next_op = op + 1;
        self.last_crc = prev;
        self.durable_op = self.durable_op.min(op);
        self.epoch += 1;
        self.handle_id = next_handle_id();
        Ok(())
    }

    /// Removes every segment whose entries all lie below `op` (compaction
    /// after a snapshot). The segment being written is never removed. Returns
    /// how many segments were removed.
    pub fn remove_segments_below(&mut self, op: u64) -> Result<usize, LogError> {
        if self.poisoned {
            return Err(LogError::Poisoned);
        }
        let mut removed = 0;
        // Oldest first: a crash in between leaves a contiguous suffix.
        while self.segments.len() > 1 && self.segments[0].meta.last_op < op {
            let name = self.segments[0].meta.name.clone();
            self.storage.remove(&name).map_err(|e| {
                LogError::io(format!("removing {}", self.storage.describe(&name)), e)
            })?;
            self.segments.remove(0);
            removed += 1;
        }
        if removed > 0 {
            self.sync_dir()?;
        }
        Ok(removed)
    }

    /// Drops the whole log and starts it again at `next_op`, chained to
    /// `prev_crc` (after installing a snapshot that covers everything before).
    pub fn reset(&mut self, next_op: u64, prev_crc: u32) -> Result<(), LogError> {
        if self.poisoned {
            return Err(LogError::Poisoned);
        }
        let r = self.reset_inner(next_op, prev_crc);
        if r.is_err() {
            // Half reset: the log's state no longer matches its files.
            self.poison();
        }
        r
    }

    fn reset_inner(&mut self, next_op: u64, prev_crc: u32) -> Result<(), LogError> {
        assert!(next_op >= 1, "ops start at 1");
        while let Some(seg) = self.segments.pop() {
            drop(seg.file);
            self.storage.remove(&seg.meta.name).map_err(|e| {
                LogError::io(
                    format!("removing {}", self.storage.describe(&seg.meta.name)),
                    e,
                )
            })?;
        }
        self.sync_dir()?;
        self.create_segment(next_op, prev_crc)?;
        self.durable_op = next_op - 1;
        Ok(())
    }
}

/// The best starting point for reading `op` in a segment: (op, offset, chain value before it).
fn locate<F>(seg: &Segment<F>, op: u64) -> (u64, u64, u32) {
    let i = seg.meta.index.partition_point(|p| p.0 <= op);
    if i == 0 {
        return (
            seg.meta.header.first_op,
            SEGMENT_HEADER_LEN as u64,
            seg.meta.header.prev_crc,
        );
    }
    seg.meta.index[i - 1]
}

/// A failed fdatasync, worded for the operator: fatal, never retried.
/// Leaves the note that makes the next start read the log from the disk;
/// when even that fails (a disk going read-only), says what to do instead.
fn note_failed_fsync<S: Storage>(storage: &S) {
    if let Err(e) = storage.leave_fsync_note() {
        tracing::error!(
            "an fsync of the log in {} failed, and the note that makes the next start read the log from the disk could not be written ({e}): before this replica starts again, reboot the host or drop the page cache (sync; echo 3 > /proc/sys/vm/drop_caches), or it may read entries that never reached the disk",
            storage.describe("")
        );
    }
}

fn fsync_failed(describe: &str, e: std::io::Error) -> LogError {
    // The source is wrapped: a failed fsync is never "out of space, retry
    // later" (`is_no_space`), even when it says ENOSPC; the data it was to
    // write may be gone from memory.
    LogError::io(
        format!(
            "fdatasync of {describe} failed, so entries this replica wrote may not be on its disk; a failed fsync is never retried (the kernel may have dropped the data): this replica stops. Check the disk (dmesg), then restart it: it verifies its log and catches up from the others"
        ),
        std::io::Error::other(e),
    )
}
