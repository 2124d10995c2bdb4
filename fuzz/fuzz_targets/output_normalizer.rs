//! A program's output as divergence detection sees it (bytes from outside:
//! whatever the replicated server writes), through the PostgreSQL
//! normalizer: never a panic, and the canonical stream does not depend on
//! how the output was split into reads (the first byte of the input picks
//! the split).
#![no_main]

use falcon::node::normalize::Protocol;
use libfuzzer_sys::fuzz_target;

fn canonical(data: &[u8], step: usize) -> Vec<u8> {
    let mut n = Protocol::Postgres.start();
    let (mut all, mut scratch) = (Vec::new(), Vec::new());
    for piece in data.chunks(step.max(1)) {
        all.extend_from_slice(n.feed(piece, &mut scratch));
    }
    all
}

fuzz_target!(|data: &[u8]| {
    let Some((&step, output)) = data.split_first() else {
        return;
    };
    let whole = canonical(output, output.len());
    assert_eq!(whole, canonical(output, usize::from(step)));
    assert_eq!(whole, canonical(output, 1));
});
