//! Recovery and inspection of a log whose last segment holds arbitrary bytes
//! after a valid header: errors or a torn tail, never a panic.
#![no_main]

use falcon::log::format::{self, SegmentHeader};
use falcon::log::{LogOptions, LogView, MemStorage, SegmentLog};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let s = MemStorage::new();
    let header = format::encode_segment_header(&SegmentHeader {
        version: format::FORMAT_VERSION,
        cluster_id: 1,
        node_id: 1,
        first_op: 1,
        prev_crc: 0,
        created_ns: 0,
    });
    let mut file = header.to_vec();
    file.extend_from_slice(data);
    s.write_file("00000000000000000001.seg", &file);
    if let Ok(view) = LogView::new(s.clone()) {
        let _ = view.scan(0, |_| Ok(true), |_| {});
    }
    if let Ok((log, _)) = SegmentLog::open(s, LogOptions::new(1, 1)) {
        let _ = log.read(1, usize::MAX, usize::MAX);
    }
});
