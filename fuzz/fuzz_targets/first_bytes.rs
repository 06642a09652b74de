//! The first-bytes judge (TLS ClientHello SNI / HTTP/1.x Host), the code the
//! kernel's `enforcer_inspect` program runs, here over plain loops. Property:
//! it only asks for copies the eBPF side can make (`Bytes` panics on any
//! other: 1..=BUF bytes into the first half of its buffer), and a name it
//! returns lies inside the buffer.
#![no_main]
use enforcer_common::first_bytes::{judge, name_key, Bytes, Outcome, Plain, BUF, KEY_BUF};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut buf = vec![0u8; 2 * BUF].into_boxed_slice();
    let buf: &mut [u8; 2 * BUF] = (&mut *buf).try_into().expect("2 * BUF bytes");
    // Every prefix the kernel may see as segments arrive, and the whole.
    for n in [data.len() / 3, data.len() / 2, data.len()] {
        match judge::<_, Plain>(&Bytes(&data[..n]), buf) {
            Outcome::NeedMore => {}
            Outcome::Name { off, len, .. } | Outcome::Refuse { off, len, .. } => {
                assert!(off + len <= 2 * BUF, "name at {off}+{len}");
                if len > 0 {
                    let mut key = [0u8; KEY_BUF];
                    if let Ok(k) = name_key::<Plain>(buf, off, len, &mut key) {
                        assert!((1..=KEY_BUF).contains(&k) && key[k - 1] == 0);
                    }
                }
            }
        }
    }
});
