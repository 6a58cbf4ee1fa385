//! Message decoding from any frame kind and body: a message or an error,
//! and a message that decodes encodes again to something that decodes to
//! the same message.
#![no_main]

use libfuzzer_sys::fuzz_target;
use quiver_core::frame::{Decoder, Frame};
use quiver_core::wire::Message;

fuzz_target!(|data: &[u8]| {
    let Some((&kind, body)) = data.split_first() else {
        return;
    };
    let frame = Frame {
        kind,
        body: body.to_vec(),
    };
    if let Ok(m) = Message::decode(&frame) {
        let bytes = m.encode(false).expect("a decoded message encodes");
        let mut d = Decoder::new(usize::MAX >> 1, false);
        let frames = d.push(&bytes).expect("its own encoding decodes");
        assert_eq!(frames.len(), 1);
        let again = Message::decode(&frames[0]).expect("and decodes again");
        assert_eq!(format!("{m:?}"), format!("{again:?}"));
    }
});
