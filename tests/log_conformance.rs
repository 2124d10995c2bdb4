//! The log conformance suite, run on every storage the log supports.

mod real_directory {
    fn fresh() -> falcon::log::FsStorage {
        // Leaked on purpose: the directory must outlive every clone of the storage.
        let dir = tempfile::tempdir().expect("tempdir").keep();
        falcon::log::FsStorage::new(dir, true).expect("storage")
    }
    falcon::log_conformance_tests!(fresh);
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
