//! The metadata filter parser (`search --filter`): any JSON is a filter or
//! a clear error, and a filter matches any metadata without panicking.
#![no_main]

use libfuzzer_sys::fuzz_target;
use quiver_store::Filter;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // The filter, then the metadata it is tried on, split at a NUL.
    let (f, m) = text
        .split_once('\0')
        .unwrap_or((text, r#"{"a":1,"b":"x","c":[1,2],"d":{"e":true}}"#));
    let Ok(v) = serde_json::from_str::<serde_json::Value>(f) else {
        return;
    };
    if let Ok(filter) = Filter::from_json(&v) {
        if let Ok(meta) = serde_json::from_str::<serde_json::Value>(m) {
            let _ = filter.matches(&meta);
        }
    }
});
