//! A backup's frame path on arbitrary bytes: the stream framing QEMU speaks
//! (4-byte length + frame) and the per-flow TCP translation of inbound and
//! outbound Ethernet/IPv4/TCP frames. Errors and drops, never a panic.
#![no_main]

use falcon::vm::FrameReader;
use falcon::vm::translate::Translator;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut reader = FrameReader::new();
    reader.feed(data);
    let mut frames = Vec::new();
    while let Ok(Some(f)) = reader.next_frame() {
        frames.push(f.to_vec());
    }
    // Also the raw bytes cut into frames by a selector byte (reaches the
    // translator without the framing layer's checks).
    let mut rest = data;
    while let Some((&len, tail)) = rest.split_first() {
        let n = (len as usize * 4).min(tail.len());
        frames.push(tail[..n].to_vec());
        rest = &tail[n..];
    }
    let mut t = Translator::new();
    for (i, f) in frames.into_iter().enumerate() {
        if i % 3 == 0 {
            let mut out = f.clone();
            t.outbound(&f);
            t.rewrite_out(&mut out);
        } else {
            t.inbound(f);
        }
    }
});
