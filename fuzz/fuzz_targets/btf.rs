//! The BTF reader (`/sys/kernel/btf/vmlinux` in production): parse, then
//! every offset lookup the daemon and `enforcer run` make at start, and
//! lookups through anonymous members, typedefs and bitfields of the seed's
//! own structs.
#![no_main]
use enforcer::kernel::btf::{self, Btf};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(b) = Btf::parse(data) else {
        return;
    };
    let _ = btf::file_offsets(&b);
    let _ = btf::mnt_ns_offsets(&b);
    if let Ok(t) = btf::task_offsets(&b) {
        let _ = btf::task_walk_loads(&t);
    }
    let _ = btf::sock_offsets(&b);
    let _ = btf::sock_addr_offsets(&b);
    let _ = btf::unix_lsm_offsets(&b);
    for (s, path) in [
        ("outer", "x"),
        ("outer", "target"),
        ("outer", "bf"),
        ("holder", "o.target"),
        ("holder", "o.x"),
        ("holder", "p.x"),
        ("holder", "o."),
    ] {
        let _ = b.member_offset(s, path);
    }
});
