//! The TOML of one `[[stream]]`'s `source = { kind = ... }` table, parsed as
//! `ferry_adapters::SourceConfig` (the agent's config parser deserializes that
//! table with the same type) and validated; never panics.
//!
//! Input: arbitrary bytes; up to the first NUL they are the TOML text (must be
//! UTF-8), after it the bytes of a stored source position, described as `status`
//! and the metrics would (`describe_position`, `position_gauges`).
//!
//! Only `ferry-adapters` is reachable from here: `ferry-agent` and
//! `ferry-exchange` are binary-only crates (no `lib.rs`), so their own config
//! parsers (`agent/src/config.rs`, `exchange/src/config.rs`) cannot be linked
//! into a fuzz target without a library target of their own.
//!
//! `validate` may look at the file system (is the tail path a directory, the
//! canonical outbox path) but never writes; `check_environment` (which reads
//! password files and environment variables) and `build` are left alone.
#![no_main]

use ferry_adapters::{parse_duration, parse_size, SourceConfig, GAUGES};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (text, position) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let Ok(text) = std::str::from_utf8(text) else {
        return;
    };
    // The units every size and duration key goes through.
    let _ = parse_size(text);
    let _ = parse_duration(text);
    let Ok(config) = toml::from_str::<SourceConfig>(text) else {
        return;
    };
    assert!(["directory", "tail", "postgres"].contains(&config.kind()));
    assert_eq!(config.clone(), config);
    let _ = config.validate();
    let _ = config.describe_position(position);
    for (name, _) in config.position_gauges(position) {
        assert!(
            GAUGES.iter().any(|(g, _)| *g == name),
            "gauge {name} is not listed in GAUGES"
        );
    }
});
