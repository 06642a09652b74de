//! The daemon's config file (`enforcer daemon --config`), as the daemon
//! parses and checks it at start and on SIGHUP.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = enforcer::daemon::config::Config::parse(text);
});
