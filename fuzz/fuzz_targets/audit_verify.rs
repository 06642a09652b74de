//! `enforcer audit verify` over a log's bytes (a corrupted, truncated or
//! forged log): every outcome is a report or an error naming a line.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = enforcer::audit::verify_reader(data, std::path::Path::new("fuzz-audit.jsonl"));
});
