//! The frame decoder over a byte stream cut at fuzzed points, with and
//! without compression agreed: it returns frames or an error, never panics,
//! never allocates past its limit; each frame it returns decodes to a
//! message or an error.
#![no_main]

use libfuzzer_sys::fuzz_target;
use quiver_core::frame::Decoder;
use quiver_core::wire::Message;

fuzz_target!(|data: &[u8]| {
    let Some((&cut, rest)) = data.split_first() else {
        return;
    };
    for compression in [false, true] {
        let mut d = Decoder::new(1 << 16, compression);
        let step = (cut as usize % 17) + 1;
        for chunk in rest.chunks(step) {
            match d.push(chunk) {
                Ok(frames) => {
                    for f in frames {
                        assert!(f.body.len() <= 1 << 16);
                        let _ = Message::decode(&f);
                    }
                }
                Err(_) => break,
            }
        }
    }
});
