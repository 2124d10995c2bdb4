//! The conformance suite every log storage must pass.
//!
//! Each check takes a function that makes a fresh, empty storage; clones of
//! a storage must refer to the same directory, so a check can reopen the log.
//! [`log_conformance_tests!`](crate::log_conformance_tests) turns the suite
//! into one `#[test]` per check.

use super::format::{Entry, Kind, PAYLOAD_MAX};
use super::{LogError, LogOptions, SegmentLog, Storage, SyncPolicy};

/// Cluster id used by the suite.
pub const CLUSTER: u64 = 0xfa1c_0000_0000_0001;

fn opts(segment_bytes_max: u64) -> LogOptions {
    LogOptions {
        segment_bytes_max,
        ..LogOptions::new(CLUSTER, 1)
    }
}

/// A deterministic entry for op `op`.
pub fn entry(view: u64, op: u64) -> Entry {
    let kind = Kind::ALL[(op % 5) as usize];
    Entry {
        view,
        op,
        kind,
        conn: op % 7,
        time_ns: 1_780_000_000_000_000_000 + op * 1000,
        payload: format!("payload of op {op} in view {view}")
            .into_bytes()
            .repeat((op % 4) as usize)
            .into(),
    }
}

fn entries(view: u64, ops: std::ops::RangeInclusive<u64>) -> Vec<Entry> {
    ops.map(|op| entry(view, op)).collect()
}

fn open<S: Storage + Clone>(s: &S, o: LogOptions) -> SegmentLog<S> {
    SegmentLog::open(s.clone(), o).expect("open").0
}

fn read_all<S: Storage>(log: &SegmentLog<S>) -> Vec<Entry> {
    log.read(log.first_op(), usize::MAX, usize::MAX)
        .expect("read")
}

/// A new log is empty, starts at op 1, and says it was created.
pub fn new_log_is_empty<S: Storage + Clone>(fresh: impl Fn() -> S) {
    let s = fresh();
    let (log, rec) = SegmentLog::open(s.clone(), opts(1 << 20)).unwrap();
    assert!(rec.created);
    assert_eq!((log.first_op(), log.last_op(), log.next_op()), (1, 0, 1));
    assert!(read_all(&log).is_empty());
    drop(log);
    let (log, rec) = SegmentLog::open(s, opts(1 << 20)).unwrap();
    assert!(!rec.created);
    assert!(rec.torn.is_none());
    assert_eq!(log.last_op(), 0);
}

/// What is appended reads back, whole and in ranges, before and after reopening.
pub fn append_then_read<S: Storage + Clone>(fresh: impl Fn() -> S) {
    let s = fresh();
    let mut log = open(&s, opts(1 << 20));
    let want = entries(1, 1..=50);
    log.append(&want[..10]).unwrap();
    log.append(&want[10..]).unwrap();
    assert_eq!(log.sync().unwrap(), 50);
    assert_eq!(read_all(&log), want);
    assert_eq!(log.read(20, 5, usize::MAX).unwrap(), want[19..24].to_vec());
    assert_eq!(log.entry(33).unwrap(), want[32]);
    assert_eq!(log.read(51, 10, usize::MAX).unwrap(), vec![]);
    // A byte budget stops after the entry that crosses it, but always returns one.
    assert_eq!(log.read(1, 100, 0).unwrap().len(), 1);
    drop(log);
    let log = open(&s, opts(1 << 20));
    assert_eq!(read_all(&log), want);
    assert_eq!(log.durable_op(), 50);
}

/// Ops must be consecutive; a wrong op or an oversized payload changes nothing.
pub fn rejects_out_of_order_and_oversized<S: Storage + Clone>(fresh: impl Fn() -> S) {
    let s = fresh();
    let mut log = open(&s, opts(1 << 20));
    log.append(&entries(1, 1..=3)).unwrap();
    match log.append(&[entry(1, 5)]) {
        Err(LogError::Sequence {
            expected: 4,
            got: 5,
        }) => {}
        other => panic!("expected a sequence error, got {other:?}"),
    }
    let mut bad = entries(1, 4..=6);
    bad[2].op = 9;
    assert!(matches!(log.append(&bad), Err(LogError::Sequence { .. })));
    let mut big = entry(1, 4);
    big.payload = vec![0; PAYLOAD_MAX + 1].into();
    assert!(matches!(log.append(&[big]), Err(LogError::TooLarge(_))));
    assert_eq!(log.last_op(), 3);
    assert_eq!(read_all(&log), entries(1, 1..=3));
}

/// Entries spread over many segments read back across segment boundaries and survive reopening.
pub fn rollover_across_segments<S: Storage + Clone>(fresh: impl Fn() -> S) {
    let s = fresh();
    let mut log = open(&s, opts(600));
    let want = entries(2, 1..=200);
    for chunk in want.chunks(7) {
        log.append(chunk).unwrap();
        log.sync().unwrap();
    }
    let segs = log.segments();
    assert!(segs.len() > 10, "only {} segments", segs.len());
    for w in segs.windows(2) {
        assert_eq!(w[0].last_op + 1, w[1].first_op);
    }
    assert_eq!(read_all(&log), want);
    assert_eq!(
        log.read(97, 40, usize::MAX).unwrap(),
        want[96..136].to_vec()
    );
    drop(log);
    let mut log = open(&s, opts(600));
    assert_eq!(log.segments().len(), segs.len());
    assert_eq!(read_all(&log), want);
    log.append(&entries(3, 201..=210)).unwrap();
    log.sync().unwrap();
    drop(log);
    let log = open(&s, opts(600));
    assert_eq!(log.last_op(), 210);
    assert_eq!(log.entry(205).unwrap(), entry(3, 205));
}

/// Truncation drops the suffix durably (within a segment and across
/// segments), and new entries continue the chain.
pub fn truncate_suffix<S: Storage + Clone>(fresh: impl Fn() -> S) {
    let s = fresh();
    let mut log = open(&s, opts(700));
    log.append(&entries(1, 1..=120)).unwrap();
    log.sync().unwrap();
    let before = log.segments().len();
    log.truncate_after(100).unwrap();
    assert_eq!(log.last_op(), 100);
    log.truncate_after(40).unwrap();
    assert!(log.segments().len() < before);
    assert_eq!(log.last_op(), 40);
    assert!(log.durable_op() <= 40);
    // Truncating at or after the end does nothing.
    log.truncate_after(40).unwrap();
    log.truncate_after(1000).unwrap();
    let mut want = entries(1, 1..=40);
    want.extend(entries(5, 41..=60));
    log.append(&want[40..]).unwrap();
    log.sync().unwrap();
    assert_eq!(read_all(&log), want);
    drop(log);
    let mut log = open(&s, opts(700));
    assert_eq!(read_all(&log), want);
    // Truncate everything.
    log.truncate_after(0).unwrap();
    assert_eq!(log.last_op(), 0);
    log.append(&entries(9, 1..=3)).unwrap();
    log.sync().unwrap();
    drop(log);
    let log = open(&s, opts(700));
    assert_eq!(read_all(&log), entries(9, 1..=3));
}

/// Compaction removes whole segments below an op, never the active one, and
/// reading below the new first op is an error.
pub fn compaction_removes_old_segments<S: Storage + Clone>(fresh: impl Fn() -> S) {
    let s = fresh();
    let mut log = open(&s, opts(600));
    log.append(&entries(1, 1..=100)).unwrap();
    log.sync().unwrap();
    let removed = log.remove_segments_below(50).unwrap();
    assert!(removed > 0);
    let first = log.first_op();
    assert!(first > 1 && first <= 50, "first op {first}");
    assert!(matches!(
        log.read(1, 1, usize::MAX),
        Err(LogError::OutOfRange { .. })
    ));
    assert_eq!(read_all(&log), entries(1, first..=100));
    // Never removes the segment being written.
    log.remove_segments_below(u64::MAX).unwrap();
    assert_eq!(log.segments().len(), 1);
    assert_eq!(log.last_op(), 100);
    let first = log.first_op();
    drop(log);
    let mut log = open(&s, opts(600));
    assert_eq!(log.first_op(), first);
    assert_eq!(log.last_op(), 100);
    // Truncating below the first op is refused.
    if first > 1 {
        assert!(matches!(
            log.truncate_after(first - 2),
            Err(LogError::OutOfRange { .. })
        ));
    }
    log.append(&entries(1, 101..=102)).unwrap();
    assert_eq!(log.entry(102).unwrap(), entry(1, 102));
}

/// Reset starts the log over at any op (after a snapshot is installed).
pub fn reset_starts_over<S: Storage + Clone>(fresh: impl Fn() -> S) {
    let s = fresh();
    let mut log = open(&s, opts(600));
    log.append(&entries(1, 1..=30)).unwrap();
    log.sync().unwrap();
    log.reset(1001, 0xabcd).unwrap();
    assert_eq!((log.first_op(), log.last_op()), (1001, 1000));
    log.append(&entries(4, 1001..=1005)).unwrap();
    log.sync().unwrap();
    drop(log);
    let log = open(&s, opts(600));
    assert_eq!(log.first_op(), 1001);
    assert_eq!(read_all(&log), entries(4, 1001..=1005));
}

/// A log of another cluster or node is refused, and a second writer is locked out.
pub fn refuses_other_owner_and_second_writer<S: Storage + Clone>(fresh: impl Fn() -> S) {
    let s = fresh();
    let mut log = open(&s, opts(1 << 20));
    log.append(&entries(1, 1..=2)).unwrap();
    log.sync().unwrap();
    match SegmentLog::open(s.clone(), opts(1 << 20)) {
        Err(LogError::Locked(_)) => {}
        Err(e) => panic!("expected Locked, got {e}"),
        Ok(_) => panic!("a second writer opened a locked log"),
    }
    drop(log);
    let other_node = LogOptions::new(CLUSTER, 2);
    assert!(matches!(
        SegmentLog::open(s.clone(), other_node),
        Err(LogError::WrongOwner { .. })
    ));
    let other_cluster = LogOptions::new(CLUSTER + 1, 1);
    assert!(matches!(
        SegmentLog::open(s.clone(), other_cluster),
        Err(LogError::WrongOwner { .. })
    ));
    assert_eq!(read_all(&open(&s, opts(1 << 20))), entries(1, 1..=2));
}

/// Every sync policy reads back the same; `always` is durable at return.
pub fn sync_policies<S: Storage + Clone>(fresh: impl Fn() -> S) {
    for policy in [SyncPolicy::Always, SyncPolicy::Batch, SyncPolicy::Never] {
        let s = fresh();
        let o = LogOptions {
            sync: policy,
            ..opts(800)
        };
        let mut log = open(&s, o.clone());
        log.append(&entries(1, 1..=40)).unwrap();
        if policy == SyncPolicy::Always {
            assert_eq!(log.durable_op(), 40);
        }
        assert_eq!(log.sync().unwrap(), 40);
        drop(log);
        assert_eq!(
            read_all(&open(&s, o)),
            entries(1, 1..=40),
            "policy {policy}"
        );
    }
}

/// An fsync on a second handle (the node's fsync thread) counts, unless the
/// tail changed in between; a failed one poisons the log.
pub fn sync_through_a_second_handle<S: Storage + Clone>(fresh: impl Fn() -> S) {
    use super::StorageFile;
    let s = fresh();
    let mut log = open(&s, opts(1 << 20));
    log.append(&entries(1, 1..=10)).unwrap();
    let first = log.sync_handle(None).unwrap();
    assert_eq!(first.op, 10);
    let mut file = first.file.expect("a thread holding nothing gets a handle");
    file.sync_data().unwrap();
    assert_eq!(log.note_synced(Ok((first.op, first.epoch))).unwrap(), 10);
    log.append(&entries(1, 11..=12)).unwrap();
    let again = log.sync_handle(Some(first.handle_id)).unwrap();
    assert!(
        again.file.is_none() && again.handle_id == first.handle_id,
        "the same segment: the thread keeps its handle"
    );
    let (op, epoch) = (again.op, again.epoch);
    log.truncate_after(11).unwrap();
    let cut = log.sync_handle(Some(first.handle_id)).unwrap();
    assert!(
        cut.file.is_some() && cut.handle_id != first.handle_id,
        "a truncation hands the thread a new handle"
    );
    log.append(&entries(2, 12..=12)).unwrap();
    assert_eq!(
        log.note_synced(Ok((op, epoch))).unwrap(),
        10,
        "an fsync from before the truncation does not cover the new op 12"
    );
    assert!(log.note_synced(Err(std::io::Error::other("EIO"))).is_err());
    // Poisoned, a thread's later success makes nothing durable (the failed
    // fsync's data may be gone; another handle's fsync can still say 0).
    assert!(matches!(
        log.note_synced(Ok((12, cut.epoch))),
        Err(LogError::Poisoned)
    ));
    // A failed fsync is never "out of space, try again later", whatever
    // its errno: the data it was to write may be gone from memory.
    let full = log
        .note_synced(Err(std::io::Error::from_raw_os_error(libc::ENOSPC)))
        .unwrap_err();
    assert!(!full.is_no_space(), "{full}");
    assert!(matches!(
        log.append(&entries(2, 13..=13)),
        Err(LogError::Poisoned)
    ));
    // A new segment hands the thread a new handle, and a sync on it counts.
    let s = fresh();
    let mut log = open(&s, opts(2000));
    log.append(&entries(1, 1..=1)).unwrap();
    let held = log.sync_handle(None).unwrap().handle_id;
    let mut op = 1;
    while log.segments().len() < 2 {
        op += 1;
        log.append(&entries(1, op..=op)).unwrap();
    }
    let next = log.sync_handle(Some(held)).unwrap();
    assert_ne!(next.handle_id, held, "a new segment, a new handle");
    next.file
        .expect("the thread's handle is the old segment's")
        .sync_data()
        .unwrap();
    assert_eq!(log.note_synced(Ok((next.op, next.epoch))).unwrap(), op);
}

/// Segments are preallocated ahead of the writes: the zeros past the last
/// record are the log's clean end (not a torn tail), a full segment is cut to
/// its records, and zeros left behind a sealed segment by a crash before
/// that cut are its end too. Zeros followed by other bytes are still a torn
/// tail in the last segment and damage in a sealed one.
pub fn preallocated_segments<S: Storage + Clone>(fresh: impl Fn() -> S) {
    use super::storage::StorageFile;
    let o = LogOptions {
        preallocate_bytes: 4096,
        ..opts(6000)
    };
    let file_len = |s: &S, name: &str| s.open_ro(name).unwrap().len().unwrap();
    let s = fresh();
    let mut log = open(&s, o.clone());
    log.append(&entries(1, 1..=3)).unwrap();
    log.sync().unwrap();
    let seg = &log.segments()[0];
    assert!(seg.bytes < 4096, "three entries take {} bytes", seg.bytes);
    assert_eq!(
        file_len(&s, &seg.name),
        4096,
        "reserved ahead of the records"
    );
    drop(log);
    let (mut log, rec) = SegmentLog::open(s.clone(), o.clone()).unwrap();
    assert!(
        rec.torn.is_none(),
        "zeros read as a torn tail: {:?}",
        rec.torn
    );
    assert_eq!((rec.last_op, log.last_op()), (3, 3));
    assert_eq!(read_all(&log), entries(1, 1..=3));
    // Past the first step, the reservation grows; at the size limit, the
    // full segment is cut to its records.
    let want = entries(1, 1..=300);
    log.append(&want[3..]).unwrap();
    log.sync().unwrap();
    let segs = log.segments();
    assert!(segs.len() >= 3, "only {} segments", segs.len());
    for seg in &segs[..segs.len() - 1] {
        assert_eq!(
            file_len(&s, &seg.name),
            seg.bytes,
            "{} keeps zeros",
            seg.name
        );
    }
    let last = segs.last().unwrap().clone();
    assert!(file_len(&s, &last.name) > last.bytes);
    drop(log);
    // A crash before the cut of a full segment leaves zeros behind it.
    let sealed = segs[0].clone();
    s.open_rw(&sealed.name)
        .unwrap()
        .set_len(sealed.bytes + 3000)
        .unwrap();
    let (log, rec) = SegmentLog::open(s.clone(), o.clone()).unwrap();
    assert!(rec.torn.is_none());
    assert_eq!(read_all(&log), want);
    drop(log);
    // Zeros, then other bytes, where the next record would start: a torn
    // write in the last segment, cut off...
    let mut f = s.open_rw(&last.name).unwrap();
    f.write_all_at(b"not zero", last.bytes + 512).unwrap();
    f.sync_data().unwrap();
    drop(f);
    let (mut log, rec) = SegmentLog::open(s.clone(), o.clone()).unwrap();
    let torn = rec.torn.expect("a torn tail");
    assert_eq!(torn.offset, last.bytes);
    assert!(torn.reason.contains("zeros"), "{}", torn.reason);
    assert_eq!(read_all(&log), want);
    log.append(&entries(2, 301..=305)).unwrap();
    log.sync().unwrap();
    drop(log);
    let log = open(&s, o.clone());
    assert_eq!(log.last_op(), 305);
    drop(log);
    // ...and damage in a sealed segment: refused, nothing changed.
    let mut f = s.open_rw(&sealed.name).unwrap();
    f.write_all_at(b"not zero", sealed.bytes + 1000).unwrap();
    f.sync_data().unwrap();
    drop(f);
    match SegmentLog::open(s.clone(), o.clone()) {
        Err(LogError::Corrupt { offset, reason, .. }) => {
            assert_eq!(offset, sealed.bytes);
            assert!(reason.contains("zeros"), "{reason}");
        }
        Err(e) => panic!("expected Corrupt, got {e}"),
        Ok(_) => panic!("a sealed segment with bytes after zeros was accepted"),
    }
    assert_eq!(file_len(&s, &sealed.name), sealed.bytes + 3000);
}

/// A crash after a new segment's space was reserved but before its header
/// reached the disk leaves a file of zeros: a torn header (removed; no
/// record in it was ever synced), not damage that keeps the replica down.
/// Zeros with other bytes after them are still damage, and a header that
/// says op 0 is refused.
pub fn a_reserved_segment_without_its_header<S: Storage + Clone>(fresh: impl Fn() -> S) {
    use super::format::{FORMAT_VERSION, SegmentHeader, encode_segment_header};
    use super::scan::segment_name;
    use super::storage::StorageFile;
    let o = LogOptions {
        preallocate_bytes: 4096,
        ..opts(1 << 20)
    };
    let s = fresh();
    let mut log = open(&s, o.clone());
    log.append(&entries(1, 1..=3)).unwrap();
    log.sync().unwrap();
    drop(log);
    let next = segment_name(4);
    let mut f = s.create_new(&next).unwrap();
    f.write_all_at(&[0; 4096], 0).unwrap();
    f.sync_data().unwrap();
    drop(f);
    let (mut log, rec) = SegmentLog::open(s.clone(), o.clone()).unwrap();
    let torn = rec.torn.expect("a torn header");
    assert!(torn.whole_segment && torn.segment == next, "{torn:?}");
    assert!(
        !s.list().unwrap().contains(&next),
        "the empty segment is removed"
    );
    assert_eq!(read_all(&log), entries(1, 1..=3));
    log.append(&entries(1, 4..=5)).unwrap();
    log.sync().unwrap();
    drop(log);
    assert_eq!(open(&s, o.clone()).last_op(), 5);
    // Zeros where the header should be, then bytes: damage.
    let next = segment_name(6);
    let mut f = s.create_new(&next).unwrap();
    f.write_all_at(&[0; 4096], 0).unwrap();
    f.write_all_at(b"not zero", 3000).unwrap();
    drop(f);
    assert!(matches!(
        SegmentLog::open(s.clone(), o.clone()),
        Err(LogError::Corrupt { .. })
    ));
    // A valid header that starts the log at op 0 (its name agreeing).
    let s = fresh();
    let header = SegmentHeader {
        version: FORMAT_VERSION,
        cluster_id: CLUSTER,
        node_id: 1,
        first_op: 0,
        prev_crc: 0,
        created_ns: 0,
    };
    let mut f = s.create_new(&segment_name(0)).unwrap();
    f.write_all_at(&encode_segment_header(&header), 0).unwrap();
    drop(f);
    match SegmentLog::open(s.clone(), o) {
        Err(LogError::Corrupt { reason, .. }) => assert!(reason.contains("op 0"), "{reason}"),
        Err(e) => panic!("expected Corrupt, got {e}"),
        Ok(_) => panic!("a segment starting at op 0 was accepted"),
    }
}

/// Written over preallocated space, unsynced sectors reach the disk in any
/// order after a power loss, and one that did not reads as zeros: such a gap
/// in the last segment is a torn tail (cut; everything synced stays), while
/// a flipped bit with valid records after it is still damage.
pub fn power_loss_gaps_in_preallocated_space<S: Storage + Clone>(fresh: impl Fn() -> S) {
    use super::storage::StorageFile;
    let o = LogOptions {
        preallocate_bytes: 64 << 10,
        ..opts(1 << 20)
    };
    let s = fresh();
    let mut log = open(&s, o.clone());
    log.append(&entries(1, 1..=20)).unwrap();
    log.sync().unwrap();
    let synced = log.segments()[0].bytes;
    log.append(&entries(1, 21..=200)).unwrap();
    let name = log.segments()[0].name.clone();
    let end = log.segments()[0].bytes;
    assert!(end > synced + 4096, "{synced}..{end}");
    drop(log);
    let mut f = s.open_rw(&name).unwrap();
    // A flipped bit among the unsynced records, valid records after it.
    let at = synced + 100;
    let mut b = [0u8; 1];
    f.read_full_at(&mut b, at).unwrap();
    f.write_all_at(&[b[0] ^ 0x40], at).unwrap();
    match SegmentLog::open(s.clone(), o.clone()) {
        Err(LogError::Corrupt { offset, .. }) => assert!(offset > synced && offset <= at),
        Err(e) => panic!("expected Corrupt, got {e}"),
        Ok(_) => panic!("a flipped bit before valid records was accepted"),
    }
    f.write_all_at(&b, at).unwrap();
    // A sector that never reached the disk, records on both sides of it.
    let sector = (synced + 1000).div_ceil(512) * 512;
    f.write_all_at(&[0u8; 512], sector).unwrap();
    f.sync_data().unwrap();
    drop(f);
    let (log, rec) = SegmentLog::open(s.clone(), o.clone()).unwrap();
    let torn = rec.torn.expect("the gap is a torn tail");
    assert!(
        torn.offset > synced && torn.offset <= sector,
        "cut at {} (synced {synced}, gap at {sector})",
        torn.offset
    );
    assert!(
        log.last_op() >= 20 && log.last_op() < 200,
        "{}",
        log.last_op()
    );
    assert_eq!(read_all(&log), entries(1, 1..=log.last_op()));
}

/// Expands to one `#[test]` per conformance check, for a storage made by `$fresh`.
#[macro_export]
macro_rules! log_conformance_tests {
    ($fresh:expr) => {
        $crate::log_conformance_tests!(@each $fresh;
            new_log_is_empty, append_then_read, rejects_out_of_order_and_oversized,
            rollover_across_segments, truncate_suffix, compaction_removes_old_segments,
            reset_starts_over, refuses_other_owner_and_second_writer, sync_policies,
            sync_through_a_second_handle, preallocated_segments,
            power_loss_gaps_in_preallocated_space, a_reserved_segment_without_its_header);
    };
    (@each $fresh:expr; $($name:ident),*) => {
        $(
            #[test]
            fn $name() {
                $crate::log::conformance::$name($fresh);
            }
        )*
    };
}
