//! A shared-memory ring whose bytes another process wrote arbitrarily:
//! opening it and taking records give an error or records, never a panic,
//! and never a read outside the ring.
#![no_main]

use falcon::transport::ring::{HEADER, Ring};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // A valid header with a 4 KiB data area, then the fuzzer's bytes over
    // the positions and the data.
    let len = HEADER + 4096;
    let mut mem = vec![0u64; len / 8];
    let base = mem.as_mut_ptr() as *mut u8;
    // SAFETY: `mem` outlives both rings and nobody else uses it.
    let _writer = unsafe { Ring::init(base, len, 1) };
    let bytes = unsafe { std::slice::from_raw_parts_mut(base, len) };
    // The fuzzer controls write_pos/read_pos (offsets 64..136) and the data.
    let (pos, rest) = data.split_at(data.len().min(72));
    bytes[64..64 + pos.len()].copy_from_slice(pos);
    let n = rest.len().min(4096);
    bytes[HEADER..HEADER + n].copy_from_slice(&rest[..n]);
    if let Ok(mut r) = unsafe { Ring::open(base, len) } {
        let mut out = Vec::new();
        for _ in 0..64 {
            match r.pop(&mut out) {
                Ok(true) => assert!(out.len() <= 4096),
                Ok(false) | Err(_) => break,
            }
        }
    }
});
