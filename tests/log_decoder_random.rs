//! A bounded run of the log decoders on random and mutated bytes: no panic,
//! ever (the cargo-fuzz targets under fuzz/ run the same code for longer).

use falcon::log::conformance::entry;
use falcon::log::format::{self, decode_record, decode_segment_header};
use falcon::log::storage::SplitMix;
use falcon::log::{LogOptions, LogView, MemStorage, SegmentLog, Storage};

#[test]
fn random_bytes_never_panic_the_record_decoder() {
    let mut rng = SplitMix(0xdecade);
    let mut valid = Vec::new();
    for op in 1..=20 {
        format::encode_record(&entry(1, op), 0, &mut valid);
    }
    for i in 0..200_000u64 {
        let len = (rng.next_u64() % 300) as usize;
        let mut buf: Vec<u8> = if i % 2 == 0 {
            (0..len).map(|_| rng.next_u64() as u8).collect()
        } else {
            // Mutate a valid stream: flips, truncation, plausible lengths.
            let start = (rng.next_u64() % valid.len() as u64) as usize & !7;
            let mut b = valid[start..(start + len).min(valid.len())].to_vec();
            for _ in 0..(rng.next_u64() % 4) {
                if !b.is_empty() {
                    let at = (rng.next_u64() % b.len() as u64) as usize;
                    b[at] = rng.next_u64() as u8;
                }
            }
            b
        };
        if i % 7 == 0 && buf.len() >= 4 {
            buf[..4].copy_from_slice(&((rng.next_u64() % 400) as u32).to_le_bytes());
        }
        let _ = decode_record(&buf);
        let _ = decode_segment_header(&buf);
    }
}

#[test]
fn random_segment_files_never_panic_recovery_or_inspection() {
    let mut rng = SplitMix(99);
    let base = MemStorage::new();
    let mut log = SegmentLog::open(
        base.clone(),
        LogOptions {
            segment_bytes_max: 1024,
            ..LogOptions::new(5, 1)
        },
    )
    .unwrap()
    .0;
    log.append(&(1..=40).map(|op| entry(1, op)).collect::<Vec<_>>())
        .unwrap();
    log.sync().unwrap();
    drop(log);
    let names: Vec<String> = base
        .list()
        .unwrap()
        .into_iter()
        .filter(|n| n.ends_with(".seg"))
        .collect();
    for _ in 0..3_000 {
        let s = base.snapshot();
        let name = &names[(rng.next_u64() % names.len() as u64) as usize];
        let mut bytes = s.read_file(name).unwrap();
        match rng.next_u64() % 3 {
            0 => bytes.truncate((rng.next_u64() % (bytes.len() as u64 + 1)) as usize),
            1 => {
                for _ in 0..1 + rng.next_u64() % 8 {
                    let at = (rng.next_u64() % bytes.len() as u64) as usize;
                    bytes[at] = rng.next_u64() as u8;
                }
            }
            _ => {
                bytes = (0..rng.next_u64() % 2048)
                    .map(|_| rng.next_u64() as u8)
                    .collect()
            }
        }
        s.write_file(name, &bytes);
        if let Ok(view) = LogView::new(s.clone()) {
            let _ = view.scan(1, |_| Ok(true), |_| {});
        }
        let _ = SegmentLog::open(s, LogOptions::new(5, 1));
    }
}
