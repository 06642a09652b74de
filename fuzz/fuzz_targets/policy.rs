//! A policy file: YAML -> validation (with positions) -> compile, as
//! `enforcer policy check` and the daemon's reload do.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(policies) = enforcer::policy::parse_str(text, std::path::Path::new("fuzz.yaml")) {
        for p in &policies {
            if let Ok(c) = enforcer::policy::compile::compile(p) {
                let _ = enforcer::dns::compile_dns(p, &c);
            }
        }
    }
});
