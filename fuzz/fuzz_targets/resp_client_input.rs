//! `program_protocol = "resp"`: a client's bytes as every replica's
//! multiplexer reads them from the log (outside input: whatever a client
//! sends, committed before it is read, so a panic here would stop every
//! replica, and again at each replay). Never a panic; the commands that
//! reach the program, falcon's own answers and the state a snapshot keeps
//! do not depend on how the input was split into log entries (the first
//! byte of the input picks the split); a snapshot of the state reads back
//! the same; the program's output and a snapshot's state as arbitrary
//! bytes give an error or answers, never a panic.
#![no_main]

use falcon::app::resp::{Delivery, Mux};
use libfuzzer_sys::fuzz_target;

/// Limits far above libFuzzer's inputs: no command is cut for its size.
const ROOMY: usize = 1 << 20;
/// Another client's command after the fuzzed one's input.
const PING: &[u8] = b"*1\r\n$4\r\nPING\r\n";

fn run(input: &[u8], step: usize, limit: usize) -> (Vec<u8>, Vec<Delivery>, Vec<u8>) {
    let mut m = Mux::new(limit, limit);
    m.open(1);
    m.open(2);
    let (mut prog, mut out) = (Vec::new(), Vec::new());
    for piece in input.chunks(step.max(1)) {
        m.data(1, piece, &mut prog, &mut out);
    }
    m.data(2, PING, &mut prog, &mut out);
    let state = m.export();
    reads_back(m, &state, input, limit);
    (prog, out, state)
}

/// A state falcon exported (empty: nothing to keep, and not imported)
/// reads back as the same state, into a multiplexer that then hands the
/// program what the original does with more input (the first client's
/// input again, then another client's command), and ends in the same
/// state. (Its own answers may come sooner: a snapshot owes none.)
fn reads_back(mut original: Mux, state: &[u8], more: &[u8], limit: usize) {
    if state.is_empty() {
        return;
    }
    let mut back = Mux::new(limit, limit);
    back.open(1);
    back.open(2);
    back.import(state)
        .expect("a state falcon exported reads back");
    assert_eq!(back.export(), state);
    let (mut p1, mut p2, mut out) = (Vec::new(), Vec::new(), Vec::new());
    for (m, p) in [(&mut original, &mut p1), (&mut back, &mut p2)] {
        m.data(1, more, p, &mut out);
        m.data(2, PING, p, &mut out);
    }
    assert_eq!(p1, p2);
    assert_eq!(original.export(), back.export());
}

fuzz_target!(|data: &[u8]| {
    let Some((&head, input)) = data.split_first() else {
        return;
    };
    let whole = run(input, input.len(), ROOMY);
    assert_eq!(whole, run(input, usize::from(head % 32) + 1, ROOMY));
    assert_eq!(whole, run(input, 1, ROOMY));
    // The other client's command reaches the program whatever the first
    // sent (within the limits).
    if input.len() < ROOMY / 2 {
        assert!(whole.0.ends_with(PING));
    }
    // Tight limits: refusals, never a panic, and a state that reads back.
    run(input, usize::from(head % 7) + 1, 64 + usize::from(head));

    // The program's output and a snapshot's state, as arbitrary bytes.
    let mut m = Mux::new(ROOMY, ROOMY);
    m.open(1);
    let (mut prog, mut out) = (Vec::new(), Vec::new());
    m.data(1, b"*1\r\n$4\r\nPING\r\nPING\r\n", &mut prog, &mut out);
    let _ = m.program_output(input, &mut out);
    let mut m = Mux::new(ROOMY, ROOMY);
    m.open(1);
    let _ = m.import(input);
});
