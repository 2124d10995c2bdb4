//! The durable log: the on-disk record of the entries a replica has accepted.
//!
//! A log is a directory of segment files, each named after its first op
//! (`00000000000000000001.seg`). Records are appended in op order, each sealed
//! by a CRC32C that also covers the CRC of the record before it, so the log is
//! a hash chain. See [`format`] for the exact bytes.
//!
//! The promises the consensus engine relies on:
//!
//! * [`SegmentLog::sync`] returns only when every appended record is on disk
//!   (policy `batch`/`always`); nothing may be acknowledged before that.
//! * After a crash, [`SegmentLog::open`] restores exactly a prefix of what was
//!   appended that contains everything synced. A record cut short by the crash
//!   is cut off and reported ([`Recovery::torn`]); damage anywhere else is a
//!   hard error naming the file and offset, and nothing is deleted.
//! * [`SegmentLog::truncate_after`] and [`SegmentLog::remove_segments_below`]
//!   are durable when they return.
//! * A failed `fdatasync` poisons the log: every later call fails until the
//!   log is reopened (the page cache can no longer be trusted).

pub mod commit_point;
pub mod conformance;
pub mod fixtures;
pub mod format;
pub mod group_commit;
pub mod scan;
pub mod seal;
mod segment_log;
pub mod storage;
pub mod view;

pub use format::{Entry, Kind};
pub use group_commit::{GroupCommit, GroupCommitOptions};
pub use scan::TornTail;
pub use segment_log::{
    Clock, LogOptions, PREALLOCATE_BYTES, Recovery, SegmentInfo, SegmentLog, SyncPolicy,
    SyncRequest,
};
pub use storage::{FsStorage, MemStorage, Storage, StorageFile};
pub use view::{Follow, FollowEvent, LogView};

use std::io;

/// Everything that can go wrong with a log.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// The storage failed (fatal for this replica: it must stop accepting input).
    #[error("{context}: {source}")]
    Io {
        /// What was being done, and to which file.
        context: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The directory is not a falcon log.
    #[error("{path} is not a falcon log: {reason}")]
    NotALog {
        /// The directory or file.
        path: String,
        /// Why.
        reason: String,
    },
    /// A segment was written by a newer falcon.
    #[error(
        "{file} uses log format version {version}; this falcon reads up to version {}: upgrade falcon",
        format::FORMAT_VERSION
    )]
    NewerVersion {
        /// The segment file.
        file: String,
        /// Its version.
        version: u16,
    },
    /// Damaged data that is not a torn tail. Nothing has been changed.
    #[error("corrupt log: {file} at byte offset {offset}: {reason}")]
    Corrupt {
        /// The segment file.
        file: String,
        /// Byte offset of the first bad record.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
    /// The log belongs to another cluster or replica.
    #[error("{file} belongs to {found}, not to {expected}: was the data directory swapped?")]
    WrongOwner {
        /// The segment file.
        file: String,
        /// Who the caller is.
        expected: String,
        /// Who wrote the log.
        found: String,
    },
    /// Entries were not handed over in consecutive op order (a caller bug).
    #[error("entry op {got} appended where op {expected} is next")]
    Sequence {
        /// The op the log expected next.
        expected: u64,
        /// The op it was given.
        got: u64,
    },
    /// A payload over [`format::PAYLOAD_MAX`].
    #[error("payload of {0} bytes exceeds the record limit of {max} bytes", max = format::PAYLOAD_MAX)]
    TooLarge(usize),
    /// An op outside the log (compacted away, or not written yet).
    #[error("op {op} is not in the log (it holds ops {first}..={last})")]
    OutOfRange {
        /// The op asked for.
        op: u64,
        /// First op held.
        first: u64,
        /// Last op held.
        last: u64,
    },
    /// An earlier `fdatasync` failed; the log must be reopened.
    #[error("the log is unusable after an earlier storage failure; restart the replica")]
    Poisoned,
    /// Another process writes this log.
    #[error("{0}")]
    Locked(String),
    /// The log does not end where the replica's seal says it ended when it
    /// stopped (see [`seal`]).
    #[error(
        "{dir}: {reason}. `falcon log-inspect --verify {dir}` shows it; put the log back, or empty the data directory and the replica is rebuilt from the others"
    )]
    Sealed {
        /// The replica's data directory.
        dir: String,
        /// What differs.
        reason: String,
    },
}

impl LogError {
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> LogError {
        LogError::Io {
            context: context.into(),
            source,
        }
    }

    /// True when the storage is out of space: the caller may retry later.
    pub fn is_no_space(&self) -> bool {
        matches!(self, LogError::Io { source, .. } if source.kind() == io::ErrorKind::StorageFull
            || source.raw_os_error() == Some(libc::ENOSPC))
    }
}

/// Current wall-clock time in ns since the Unix epoch (for headers and tools;
/// the engine gets its time passed in).
pub fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}
