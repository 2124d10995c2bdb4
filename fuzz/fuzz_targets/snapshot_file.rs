//! A snapshot file with arbitrary bytes (as a hostile peer could send in
//! chunks): reading and unpacking it give an error or a result, never a
//! panic, and never write outside the directory it is unpacked into.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let dir = std::env::temp_dir().join(format!("falcon-fuzz-snap-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let file = dir.join("snapshot");
    std::fs::write(&file, data).unwrap();
    let _ = falcon::snapshot::read_meta(&file);
    let out = dir.join("out");
    let _ = falcon::snapshot::unpack(&file, &out);
    // Nothing appeared beside the file and the output directory.
    for e in std::fs::read_dir(&dir).unwrap() {
        let name = e.unwrap().file_name();
        assert!(
            name == "snapshot" || name == "out",
            "{name:?} written outside"
        );
    }
    let _ = std::fs::remove_dir_all(&out);
});
