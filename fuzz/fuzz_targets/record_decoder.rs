//! The record and segment-header decoders on arbitrary bytes: errors, never panics,
//! and whatever decodes re-encodes to the same bytes.
#![no_main]

use falcon::log::format;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = format::decode_segment_header(data);
    if let Ok((h, entry)) = format::decode_entry(data) {
        let mut again = Vec::new();
        let crc = format::encode_record(&entry, h.prev, &mut again);
        assert_eq!(crc, h.crc);
        assert_eq!(&again[..], &data[..h.encoded_len()]);
    }
});
