//! The log conformance suite, run on every storage the log supports.

mod real_directory {
    fn fresh() -> falcon::log::FsStorage {
        // Leaked on purpose: the directory must outlive every clone of the storage.
        let dir = tempfile::tempdir().expect("tempdir").keep();
        falcon::log::FsStorage::new(dir, true).expect("storage")
    }
    falcon::log_conformance_tests!(fresh);

    /// A failed fsync leaves its note; the next open reads the log from the
    /// disk (not the page cache), syncs it, says so, and clears the note.
    #[test]
    fn a_failed_fsync_makes_the_next_open_read_the_disk() {
        use falcon::log::conformance::{CLUSTER, entry};
        use falcon::log::{LogOptions, SegmentLog, Storage};
        let s = fresh();
        let (mut log, rec) = SegmentLog::open(s.clone(), LogOptions::new(CLUSTER, 1)).unwrap();
        assert!(!rec.after_failed_fsync);
        log.append(&(1..=5).map(|op| entry(1, op)).collect::<Vec<_>>())
            .unwrap();
        log.sync().unwrap();
        assert!(log.note_synced(Err(std::io::Error::other("EIO"))).is_err());
        drop(log);
        assert!(s.list().unwrap().iter().any(|n| n == "FSYNC-FAILED"));
        let (log, rec) = SegmentLog::open(s.clone(), LogOptions::new(CLUSTER, 1)).unwrap();
        assert!(rec.after_failed_fsync);
        assert_eq!(log.last_op(), 5);
        drop(log);
        assert!(!s.list().unwrap().iter().any(|n| n == "FSYNC-FAILED"));
        let (_, rec) = SegmentLog::open(s, LogOptions::new(CLUSTER, 1)).unwrap();
        assert!(!rec.after_failed_fsync);
    }
}

mod in_memory {
    fn fresh() -> falcon::log::MemStorage {
        falcon::log::MemStorage::new()
    }
    falcon::log_conformance_tests!(fresh);

    /// A reset that removed the old segments but could not start the new
    /// one (no space) leaves a log that refuses everything after, rather
    /// than one whose state no longer matches its files.
    #[test]
    fn a_reset_that_fails_half_way_poisons_the_log() {
        use falcon::log::conformance::{CLUSTER, entry};
        use falcon::log::{LogError, LogOptions, SegmentLog};
        let s = fresh();
        let mut log = SegmentLog::open(s.clone(), LogOptions::new(CLUSTER, 1))
            .expect("open")
            .0;
        log.append(&(1..=20).map(|op| entry(1, op)).collect::<Vec<_>>())
            .unwrap();
        log.sync().unwrap();
        s.set_space_limit(Some(0));
        assert!(log.reset(100, 7).is_err(), "no space for the new segment");
        s.set_space_limit(None);
        assert!(matches!(
            log.append(&[entry(1, 100)]),
            Err(LogError::Poisoned)
        ));
        assert!(matches!(log.sync(), Err(LogError::Poisoned)));
    }
}
