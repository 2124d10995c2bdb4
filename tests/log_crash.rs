//! Crash recovery: a crash at every byte offset of the last record, damage
//! before the tail, and a property test of random operations and crashes
//! against an in-memory model.

use falcon::log::conformance::{CLUSTER, entry};
use falcon::log::format::{Entry, Kind};
use falcon::log::storage::SplitMix;
use falcon::log::{FsStorage, LogError, LogOptions, MemStorage, SegmentLog, Storage, SyncPolicy};
use proptest::prelude::*;

fn opts() -> LogOptions {
    LogOptions {
        segment_bytes_max: 2048,
        ..LogOptions::new(CLUSTER, 1)
    }
}

fn read_all<S: Storage>(log: &SegmentLog<S>) -> Vec<Entry> {
    log.read(log.first_op(), usize::MAX, usize::MAX).unwrap()
}

fn last_segment(s: &MemStorage) -> String {
    let mut names: Vec<String> = s
        .list()
        .unwrap()
        .into_iter()
        .filter(|n| n.ends_with(".seg"))
        .collect();
    names.sort();
    names.pop().unwrap()
}

/// Builds a log of `n` synced entries plus one more, returns the storage, the
/// synced entries, the last segment's name and the offset where the last record starts.
fn log_with_last_record(
    n: u64,
    last_payload: usize,
) -> (MemStorage, Vec<Entry>, Entry, String, usize) {
    let s = MemStorage::new();
    let mut log = SegmentLog::open(s.clone(), opts()).unwrap().0;
    let want: Vec<Entry> = (1..=n).map(|op| entry(1, op)).collect();
    log.append(&want).unwrap();
    log.sync().unwrap();
    let name = last_segment(&s);
    let base = s.read_file(&name).unwrap().len();
    let last = Entry {
        view: 2,
        op: n + 1,
        kind: Kind::Data,
        conn: 3,
        time_ns: 42,
        payload: vec![b'x'; last_payload].into(),
    };
    log.append(std::slice::from_ref(&last)).unwrap();
    log.sync().unwrap();
    drop(log);
    (s, want, last, name, base)
}

#[derive(Clone, Copy, Debug)]
enum Fill {
    Cut,
    Zeros,
    Garbage,
}

#[test]
fn crash_at_every_byte_of_the_last_record() {
    let (s, want, last, name, base) = log_with_last_record(30, 77);
    let full = s.read_file(&name).unwrap();
    let rec_len = full.len() - base;
    let mut rng = SplitMix(7);
    for fill in [Fill::Cut, Fill::Zeros, Fill::Garbage] {
        for k in 0..=rec_len {
            let c = s.snapshot();
            let mut bytes = full[..base + k].to_vec();
            match fill {
                Fill::Cut => {}
                Fill::Zeros => bytes.resize(full.len(), 0),
                Fill::Garbage => bytes.extend((k..rec_len).map(|_| rng.next_u64() as u8)),
            }
            c.write_file(&name, &bytes);
            let (mut log, rec) = SegmentLog::open(c.clone(), opts())
                .unwrap_or_else(|e| panic!("{fill:?} at byte {k}: {e}"));
            let mut expect = want.clone();
            if bytes == full {
                expect.push(last.clone());
                assert!(rec.torn.is_none(), "{fill:?} at {k}: nothing was torn");
            } else if k > 0 || !matches!(fill, Fill::Cut) {
                let torn = rec
                    .torn
                    .as_ref()
                    .unwrap_or_else(|| panic!("{fill:?} at {k}: torn tail not reported"));
                assert_eq!(torn.offset as usize, base, "{fill:?} at {k}");
            }
            assert_eq!(read_all(&log), expect, "{fill:?} at byte {k}");
            // The log goes on after recovery, and the repair is durable.
            let next = entry(3, expect.len() as u64 + 1);
            log.append(std::slice::from_ref(&next)).unwrap();
            log.sync().unwrap();
            drop(log);
            let (log, rec) = SegmentLog::open(c, opts()).unwrap();
            assert!(rec.torn.is_none());
            expect.push(next);
            assert_eq!(read_all(&log), expect, "{fill:?} at byte {k}, after reopen");
        }
    }
}

#[test]
fn crash_at_every_byte_on_a_real_disk() {
    let (s, want, last, name, base) = log_with_last_record(12, 33);
    let full = s.read_file(&name).unwrap();
    for k in 0..=(full.len() - base) {
        let dir = tempfile::tempdir().unwrap();
        for n in s.list().unwrap() {
            std::fs::write(dir.path().join(&n), s.read_file(&n).unwrap()).unwrap();
        }
        std::fs::write(dir.path().join(&name), &full[..base + k]).unwrap();
        let fs = FsStorage::new(dir.path(), false).unwrap();
        let (log, rec) = SegmentLog::open(fs, opts()).unwrap();
        let mut expect = want.clone();
        if k == full.len() - base {
            expect.push(last.clone());
        } else if k > 0 {
            assert!(rec.torn.is_some());
            assert_eq!(
                std::fs::metadata(dir.path().join(&name)).unwrap().len() as usize,
                base
            );
        }
        assert_eq!(read_all(&log), expect, "cut at byte {k}");
    }
}

#[test]
fn damage_before_the_tail_is_a_hard_error_and_changes_nothing() {
    let (s, _, _, _, _) = log_with_last_record(60, 10);
    let mut names: Vec<String> = s
        .list()
        .unwrap()
        .into_iter()
        .filter(|n| n.ends_with(".seg"))
        .collect();
    names.sort();
    assert!(names.len() >= 3, "want several segments, got {names:?}");
    for (i, name) in names.iter().enumerate() {
        let orig = s.read_file(name).unwrap();
        // Every byte of the first record after the header, and one in the middle.
        let targets: Vec<usize> = (64..64 + 56).chain([orig.len() / 2]).collect();
        for at in targets {
            let c = s.snapshot();
            let mut bad = orig.clone();
            bad[at] ^= 0x20;
            c.write_file(name, &bad);
            let before: Vec<(String, Vec<u8>)> = c
                .list()
                .unwrap()
                .into_iter()
                .map(|n| {
                    let b = c.read_file(&n).unwrap();
                    (n, b)
                })
                .collect();
            match SegmentLog::open(c.clone(), opts()) {
                Err(LogError::Corrupt { file, offset, .. }) => {
                    assert!(file.ends_with(name.as_str()), "{file}");
                    assert!(
                        offset as usize <= at && at < offset as usize + 200,
                        "offset {offset}, damaged {at}"
                    );
                }
                Ok((log, rec)) => {
                    // Damage in the last record of the last segment is a torn tail by definition.
                    assert_eq!(
                        i,
                        names.len() - 1,
                        "damage at {name}:{at} accepted ({rec:?}), last op {}",
                        log.last_op()
                    );
                    assert!(rec.torn.is_some());
                    continue;
                }
                Err(e) => panic!("{name}:{at}: unexpected {e}"),
            }
            let after: Vec<(String, Vec<u8>)> = c
                .list()
                .unwrap()
                .into_iter()
                .map(|n| {
                    let b = c.read_file(&n).unwrap();
                    (n, b)
                })
                .collect();
            assert_eq!(before, after, "a failed open must not change anything");
        }
    }
}

#[test]
fn a_record_from_another_log_breaks_the_chain() {
    // Two logs with the same ops but different content: splice a record of one into the other.
    let a = MemStorage::new();
    let b = MemStorage::new();
    for (s, view) in [(&a, 1), (&b, 2)] {
        let mut log = SegmentLog::open(s.clone(), LogOptions::new(CLUSTER, 1))
            .unwrap()
            .0;
        log.append(&(1..=5).map(|op| entry(view, op)).collect::<Vec<_>>())
            .unwrap();
        log.sync().unwrap();
        let mut log2 = log;
        log2.append(&[entry(7, 6)]).unwrap();
        log2.sync().unwrap();
    }
    let name = last_segment(&a);
    let fa = a.read_file(&name).unwrap();
    let fb = b.read_file(&name).unwrap();
    // Replace record 3 of a by record 3 of b (same length: payload lengths depend on op only).
    let off = |f: &[u8], op: u64| -> usize {
        let mut at = 64;
        for _ in 1..op {
            let len = u32::from_le_bytes(f[at..at + 4].try_into().unwrap()) as usize;
            at += (len + 7) & !7;
        }
        at
    };
    let (s3, e3) = (off(&fa, 3), off(&fa, 4));
    assert_eq!((s3, e3), (off(&fb, 3), off(&fb, 4)));
    let mut spliced = fa.clone();
    spliced[s3..e3].copy_from_slice(&fb[s3..e3]);
    a.write_file(&name, &spliced);
    match SegmentLog::open(a, LogOptions::new(CLUSTER, 1)) {
        Err(LogError::Corrupt { offset, reason, .. }) => {
            assert_eq!(offset as usize, s3);
            assert!(reason.contains("chain"), "{reason}");
        }
        Err(e) => panic!("unexpected {e}"),
        Ok(_) => panic!("a record from another log was accepted"),
    }
}

#[derive(Clone, Debug)]
enum Op {
    Append { n: u64, size: usize },
    Sync,
    Truncate { back: u64 },
    Compact { fraction: u8 },
    Reopen,
    Crash { seed: u64 },
}

fn op_strategy() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (1u64..20, 0usize..300).prop_map(|(n, size)| Op::Append { n, size }),
        3 => Just(Op::Sync),
        1 => (0u64..30).prop_map(|back| Op::Truncate { back }),
        1 => (0u8..=100).prop_map(|fraction| Op::Compact { fraction }),
        1 => Just(Op::Reopen),
        2 => any::<u64>().prop_map(|seed| Op::Crash { seed }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, .. ProptestConfig::default() })]

    /// Random appends, syncs, truncations, compactions, reopens and crashes:
    /// the log always equals the model, and a crash keeps a prefix of what was
    /// appended that holds everything synced.
    #[test]
    fn log_matches_model_through_crashes(ops in proptest::collection::vec(op_strategy(), 1..60)) {
        let s = MemStorage::new();
        let o = LogOptions { segment_bytes_max: 1500, sync: SyncPolicy::Batch, ..LogOptions::new(CLUSTER, 1) };
        let mut log = Some(SegmentLog::open(s.clone(), o.clone()).unwrap().0);
        let mut model: Vec<Entry> = Vec::new(); // entries from first_op on
        let mut first = 1u64;
        let mut durable = 0u64;
        let mut view = 1;
        for op in ops {
            let l = log.as_mut().unwrap();
            match op {
                Op::Append { n, size } => {
                    let next = l.next_op();
                    let batch: Vec<Entry> = (next..next + n).map(|op| Entry { payload: vec![op as u8; size].into(), ..entry(view, op) }).collect();
                    l.append(&batch).unwrap();
                    model.extend(batch);
                }
                Op::Sync => { durable = l.sync().unwrap(); }
                Op::Truncate { back } => {
                    let to = l.last_op().saturating_sub(back).max(first - 1);
                    l.truncate_after(to).unwrap();
                    model.truncate((to + 1 - first) as usize);
                    durable = durable.min(to);
                    view += 1;
                }
                Op::Compact { fraction } => {
                    let below = first + (l.last_op() + 1 - first) * fraction as u64 / 100;
                    l.remove_segments_below(below).unwrap();
                    let new_first = l.first_op();
                    prop_assert!(new_first <= below.max(first));
                    model.drain(..(new_first - first) as usize);
                    first = new_first;
                }
                Op::Reopen => {
                    drop(log.take());
                    let (l, rec) = SegmentLog::open(s.clone(), o.clone()).unwrap();
                    prop_assert!(rec.torn.is_none());
                    log = Some(l);
                }
                Op::Crash { seed } => {
                    drop(log.take());
                    s.crash(seed);
                    let (l, _) = SegmentLog::open(s.clone(), o.clone()).unwrap();
                    let got = l.read(l.first_op(), usize::MAX, usize::MAX).unwrap();
                    prop_assert_eq!(l.first_op(), first);
                    prop_assert!(l.last_op() >= durable, "lost synced entries: last {} < durable {}", l.last_op(), durable);
                    prop_assert!(got.len() <= model.len());
                    prop_assert_eq!(&got[..], &model[..got.len()]);
                    model.truncate(got.len());
                    durable = l.last_op();
                    log = Some(l);
                }
            }
            let l = log.as_ref().unwrap();
            prop_assert_eq!(l.first_op(), first);
            prop_assert_eq!(l.last_op(), first + model.len() as u64 - 1);
            prop_assert_eq!(l.read(first, usize::MAX, usize::MAX).unwrap(), model.clone());
        }
    }
}
