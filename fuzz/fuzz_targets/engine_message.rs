//! The engine message decoder on arbitrary bytes: an error, never a panic;
//! whatever decodes re-encodes to the same bytes, and a replica fed the
//! decoded message does not panic either.
#![no_main]

use falcon::consensus::{Config, Input, Replica, message};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(env) = message::decode(data) {
        assert_eq!(message::to_bytes(&env), data);
        let id = env.to % 3;
        let mut env = env;
        env.to = id;
        let mut r = Replica::new(Config::new(env.cluster, id, 3), 1, 0);
        let mut out = Vec::new();
        r.step(1, Input::Receive(env), &mut out);
        r.step(1_000_000_000, Input::Tick, &mut out);
    }
});
