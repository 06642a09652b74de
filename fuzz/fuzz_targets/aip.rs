//! An AIP manifest, as `enforcer policy import-aip` converts it. Property:
//! a manifest that converts yields a policy the policy validator and the
//! compiler accept (`convert_str` promises it).
#![no_main]
use std::path::{Path, PathBuf};

use enforcer::policy::{self, aip};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let opts = aip::ImportOptions {
        home: Some(PathBuf::from("/home/agent")),
        workdir: Some(PathBuf::from("/work")),
    };
    let Ok(c) = aip::convert_str(text, Path::new("fuzz-aip.yaml"), &opts) else {
        return;
    };
    let back = policy::parse_str(&c.yaml, Path::new("converted.yaml"))
        .unwrap_or_else(|e| panic!("the converted policy does not validate: {e}\n{}", c.yaml));
    for p in &back {
        policy::compile::compile(p)
            .unwrap_or_else(|e| panic!("the converted policy does not compile: {e}\n{}", c.yaml));
    }
});
