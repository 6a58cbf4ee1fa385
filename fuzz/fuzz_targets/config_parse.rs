//! The daemon's configuration: any TOML text, and any environment values,
//! give a layer or an error naming the key, and resolving the layers gives
//! a configuration or an error — never a panic.
#![no_main]

#[allow(dead_code)]
#[path = "../../crates/quiver-cli/src/config.rs"]
mod config;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = std::path::Path::new("fuzz.toml");
    let none = config::Layer::default();
    if let Ok(file) = config::text_layer(path, text) {
        let _ = config::resolve(Some(&file), &none, &none);
    }
    // The same text as every environment variable's value.
    if let Ok(env) = config::Layer::from_env(|_| Some(text.to_string())) {
        let _ = config::resolve(None, &env, &none);
    }
});
