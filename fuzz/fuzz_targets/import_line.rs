//! The JSONL import line parser and the store's strict JSON text check:
//! a line is a record or an error, and the check accepts exactly the texts
//! serde_json reads back (numbers in range, depth, escapes) minus those
//! with duplicate keys.
#![no_main]

use libfuzzer_sys::fuzz_target;
use quiver_store::{check_json_text, Record};

fuzz_target!(|data: &[u8]| {
    let Ok(line) = std::str::from_utf8(data) else {
        return;
    };
    let _ = Record::from_json(line);
    if check_json_text(line).is_ok() {
        serde_json::from_str::<serde_json::Value>(line).expect("text the store accepts reads back");
    }
});
