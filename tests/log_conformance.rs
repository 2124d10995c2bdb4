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
}
