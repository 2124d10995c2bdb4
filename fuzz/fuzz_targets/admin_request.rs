//! The admin socket's request line on arbitrary bytes: a request or an
//! error answer, never a panic; what parses serialises back to a request
//! that parses to the same thing.
#![no_main]

use falcon::admin::Request;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = serde_json::from_slice::<Request>(data) {
        let again = serde_json::to_vec(&r).unwrap();
        let back: Request = serde_json::from_slice(&again).unwrap();
        assert_eq!(r, back);
    } else {
        let _ = falcon::admin::refusal("not a request");
    }
});
