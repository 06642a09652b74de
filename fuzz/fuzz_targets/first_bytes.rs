//! The first-bytes judge (TLS ClientHello SNI / HTTP/1.x Host), the code the
//! kernel's `enforcer_inspect` program runs, here over plain loops. Property:
//! it only asks for copies the eBPF side can make (1..=BUF bytes into the
//! first half of its buffer), and a name it returns lies inside the buffer.
#![no_main]
use enforcer_common::first_bytes::{judge, name_key, Outcome, Plain, Stream, BUF, KEY_BUF};
use libfuzzer_sys::fuzz_target;

struct Bytes<'a>(&'a [u8]);

impl Stream for Bytes<'_> {
    fn len(&self) -> usize {
        self.0.len()
    }
    fn copy(&self, off: usize, buf: &mut [u8; 2 * BUF], at: usize, len: usize) -> bool {
        assert!(
            (1..=BUF).contains(&len) && at < BUF,
            "copy({off}, {at}, {len})"
        );
        match self.0.get(off..off.saturating_add(len)) {
            Some(src) => {
                buf[at..at + len].copy_from_slice(src);
                true
            }
            None => false,
        }
    }
    fn copy_small<const N: usize>(&self, off: usize, out: &mut [u8; N]) -> bool {
        match self.0.get(off..off.saturating_add(N)) {
            Some(src) => {
                out.copy_from_slice(src);
                true
            }
            None => false,
        }
    }
}

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
