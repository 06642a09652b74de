//! The judge of a connection's first bytes (TLS ClientHello SNI, HTTP/1.x
//! `Host`), shared by the cgroup_skb egress program (`enforcer-ebpf`,
//! `inspect.rs`) and the userspace tests, so that the code the kernel runs
//! is the code the unit and property tests check.
//!
//! The caller copies the stream's first bytes into a buffer of `2 * BUF`
//! bytes (through a [`Stream`]): TLS handshake fragments are gathered from
//! their records into one ClientHello message, HTTP bytes are copied as they
//! are. Every read of the buffer is masked to `BUF - 1` (plus a small
//! constant), so the verifier sees each access in bounds whatever the bytes
//! say; every loop has a constant bound.
//!
//! A host name is checked and written *reversed* with a 0 terminator into an
//! LPM-trie key ([`name_key`]): an exact rule `api.example.com` is the key
//! `moc.elpmaxe.ipa\0` (its whole length), a wildcard `*.example.com` the
//! prefix `moc.elpmaxe.` (one or more labels in front of `example.com`), so
//! one longest-prefix lookup finds the most specific rule of a name.

/// Bytes of a gathered ClientHello or HTTP request head (a power of two).
pub const BUF: usize = 8192;
pub const MASK: usize = BUF - 1;
/// Longest host name the kernel judges (a longer one is refused): the LPM
/// key holds 4 bytes of table id and 252 of reversed name + terminator.
pub const NAME_MAX: usize = 251;
pub const KEY_NAME: usize = 252;
/// The buffer [`name_key`] writes (a key's name plus slack, so that its
/// index can be masked to 8 bits).
pub const KEY_BUF: usize = 256;
/// Bytes of the presented name carried in an event (longer ones are cut).
pub const PRESENTED_MAX: usize = 128;
/// TLS records gathered for one ClientHello.
pub const MAX_RECORDS: u32 = 8;
/// Extensions walked in one ClientHello.
pub const MAX_EXTENSIONS: u32 = 64;
/// Method token length of an HTTP request line.
const MAX_METHOD: usize = 16;
/// TLS extension types that hide the real server name: encrypted_client_hello
/// and the draft ESNI extension.
const EXT_ECH: usize = 0xfe0d;
const EXT_ESNI: usize = 0xffce;

/// Why the first bytes were refused (`Event.reason`).
pub mod reason {
    pub const NONE: u8 = 0;
    /// The SNI (or Host) names no host rule of the identity for this port.
    pub const NAME_MISMATCH: u8 = 1;
    /// A ClientHello without a server_name extension.
    pub const NO_SNI: u8 = 2;
    /// An encrypted_client_hello (or ESNI) extension: the outer name is not the real one.
    pub const ECH: u8 = 3;
    /// Neither a TLS handshake nor an HTTP/1.x request.
    pub const NOT_TLS_OR_HTTP: u8 = 4;
    /// The name is no host name (IP literal, bad characters, empty label),
    /// or the server_name extension holds several names or is repeated.
    pub const BAD_NAME: u8 = 5;
    /// An HTTP request without exactly one Host header.
    pub const NO_HOST: u8 = 6;
    /// An absolute-form request target naming another host than `Host`.
    pub const HOST_CONFLICT: u8 = 7;
    /// The ClientHello or the request head is longer than the kernel gathers.
    pub const TOO_LONG: u8 = 8;
    /// A TLS record or ClientHello that does not parse.
    pub const MALFORMED: u8 = 9;
    /// UDP (QUIC) to a learned address: its first bytes cannot be judged.
    pub const UDP: u8 = 10;
    /// The socket state could not be kept (fail closed).
    pub const NO_STATE: u8 = 11;
    pub const COUNT: u32 = 12;

    pub fn as_str(r: u8) -> &'static str {
        match r {
            NAME_MISMATCH => "name-mismatch",
            NO_SNI => "no-sni",
            ECH => "ech",
            NOT_TLS_OR_HTTP => "not-tls-or-http",
            BAD_NAME => "bad-name",
            NO_HOST => "no-host",
            HOST_CONFLICT => "host-conflict",
            TOO_LONG => "too-long",
            MALFORMED => "malformed",
            UDP => "udp-not-inspectable",
            NO_STATE => "no-state",
            _ => "",
        }
    }
}

/// What the first bytes were (`InspectEvent.kind`).
pub mod kind {
    pub const UNKNOWN: u8 = 0;
    pub const TLS: u8 = 1;
    pub const HTTP: u8 = 2;
}

/// The connection's first bytes, as far as they were sent.
#[allow(clippy::len_without_is_empty)]
pub trait Stream {
    /// Bytes available (from stream offset 0).
    fn len(&self) -> usize;
    /// Copy `len` (1..=BUF) bytes at stream offset `off` to `buf[at..]`
    /// (`at < BUF`). False when the bytes cannot be read.
    fn copy(&self, off: usize, buf: &mut [u8; 2 * BUF], at: usize, len: usize) -> bool;
    /// Copy `N` bytes at stream offset `off` into `out`.
    fn copy_small<const N: usize>(&self, off: usize, out: &mut [u8; N]) -> bool;
}

/// One step of a long loop (see [`Loops`]), given the step's index
/// (0, 1, ...); false ends the loop. A step derives its position from the
/// index rather than from a counter it keeps: to the verifier the index is
/// an unknown number, so the step's states converge after a few passes
/// instead of differing by a counter in every iteration.
pub trait Body {
    fn step(&mut self, i: usize) -> bool;
}

/// How long loops run: a plain loop in userspace; `bpf_loop` in the
/// kernel, whose callback the verifier checks once instead of once per
/// iteration (a byte-by-byte scan of 8 KiB would exceed its budget).
pub trait Loops {
    fn repeat<B: Body>(n: u32, body: &mut B);
    /// `v`, as a value the verifier cannot know. Every field a step writes
    /// starts from one: Linux before 6.7 verifies a `bpf_loop` callback as
    /// if it ran exactly once, and would otherwise take the constants of
    /// that one run for facts and prune the code that reads them after the
    /// loop (seen on 6.1: a request line judged not HTTP).
    fn num(v: usize) -> usize {
        v
    }
    fn flag(v: bool) -> bool {
        v
    }
}

/// A plain bounded loop.
pub struct Plain;

impl Loops for Plain {
    fn repeat<B: Body>(n: u32, body: &mut B) {
        for i in 0..n as usize {
            if !body.step(i) {
                break;
            }
        }
    }
}

/// The first bytes as a slice, for the judge in userspace (tests, fuzzer).
/// It panics when the judge asks for a copy its eBPF side could not make
/// (`len` outside 1..=BUF, or `at` past the first half of the buffer).
#[cfg(not(target_arch = "bpf"))]
pub struct Bytes<'a>(pub &'a [u8]);

#[cfg(not(target_arch = "bpf"))]
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

/// The judge's answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The name is not complete yet: hold the bytes.
    NeedMore,
    /// A name to look up: `buf[off..off + len]` as presented (pass it to
    /// [`name_key`]).
    Name { kind: u8, off: usize, len: usize },
    /// Refused; `buf[off..off + len]` is the presented name, if any (`len` 0).
    Refuse {
        kind: u8,
        reason: u8,
        off: usize,
        len: usize,
    },
}

/// `i & mask`, computed on a value LLVM cannot reason about: otherwise it
/// drops a mask it proves redundant from an earlier comparison, and an
/// older verifier that did not carry that comparison's bound over to this
/// register refuses the access (seen on 6.1).
#[inline(always)]
fn masked(i: usize, mask: usize) -> usize {
    // SAFETY: a read of a local.
    unsafe { core::ptr::read_volatile(&i) & mask }
}

#[inline(always)]
fn b(buf: &[u8; 2 * BUF], i: usize) -> usize {
    buf[masked(i, MASK)] as usize
}

#[inline(always)]
fn be16(buf: &[u8; 2 * BUF], i: usize) -> usize {
    (b(buf, i) << 8) | b(buf, i + 1)
}

#[inline(always)]
fn refuse(kind: u8, reason: u8) -> Outcome {
    Outcome::Refuse {
        kind,
        reason,
        off: 0,
        len: 0,
    }
}

#[inline(always)]
fn lower(c: usize) -> usize {
    if c.wrapping_sub(b'A' as usize) < 26 {
        c + 32
    } else {
        c
    }
}

/// Judge the first bytes of `s`; `buf` is scratch space (a returned name lies in it).
#[inline(always)]
pub fn judge<S: Stream, L: Loops>(s: &S, buf: &mut [u8; 2 * BUF]) -> Outcome {
    let n = s.len();
    if n == 0 {
        return Outcome::NeedMore;
    }
    let mut first = [0u8; 1];
    if !s.copy_small(0, &mut first) {
        return refuse(kind::UNKNOWN, reason::MALFORMED);
    }
    if first[0] == 0x16 {
        tls::<S, L>(s, buf)
    } else if first[0].wrapping_sub(b'A') < 26 {
        let take = if n > BUF { BUF } else { n };
        if !s.copy(0, buf, 0, take) {
            return refuse(kind::HTTP, reason::MALFORMED);
        }
        http::<L>(buf, take)
    } else {
        refuse(kind::UNKNOWN, reason::NOT_TLS_OR_HTTP)
    }
}

/// Gather the ClientHello handshake message from its records into `buf`,
/// then judge it.
#[inline(always)]
fn tls<S: Stream, L: Loops>(s: &S, buf: &mut [u8; 2 * BUF]) -> Outcome {
    let n = s.len();
    let mut off = 0usize; // stream offset of the current record header
    let mut have = 0usize; // handshake bytes gathered in buf
    let mut need = 0usize; // handshake message length (with its 4-byte header), once known
    for _ in 0..MAX_RECORDS {
        if off + 5 > n {
            return Outcome::NeedMore;
        }
        let mut h = [0u8; 5];
        if !s.copy_small(off, &mut h) {
            return refuse(kind::TLS, reason::MALFORMED);
        }
        // Handshake record, legacy version 3.0 ..= 3.4.
        if h[0] != 0x16 || h[1] != 3 || h[2] > 4 {
            return refuse(kind::TLS, reason::MALFORMED);
        }
        let rec = ((h[3] as usize) << 8) | h[4] as usize;
        if rec == 0 || rec > 16384 + 256 {
            return refuse(kind::TLS, reason::MALFORMED);
        }
        let avail = n - off - 5;
        let take = if avail < rec { avail } else { rec };
        if take > 0 {
            if have + take > BUF {
                return refuse(kind::TLS, reason::TOO_LONG);
            }
            if !s.copy(off + 5, buf, have, take) {
                return refuse(kind::TLS, reason::MALFORMED);
            }
            have += take;
        }
        if need == 0 && have >= 4 {
            if b(buf, 0) != 1 {
                // Not a ClientHello.
                return refuse(kind::TLS, reason::MALFORMED);
            }
            need = 4 + ((b(buf, 1) << 16) | (b(buf, 2) << 8) | b(buf, 3));
            if need > BUF {
                return refuse(kind::TLS, reason::TOO_LONG);
            }
        }
        if need != 0 && have >= need {
            return client_hello::<L>(buf, need);
        }
        if take < rec {
            return Outcome::NeedMore;
        }
        off += 5 + rec;
    }
    refuse(kind::TLS, reason::MALFORMED)
}

/// The server name of a whole ClientHello message `buf[..n]` (`n <= BUF`).
#[inline(always)]
fn client_hello<L: Loops>(buf: &[u8; 2 * BUF], n: usize) -> Outcome {
    let bad = refuse(kind::TLS, reason::MALFORMED);
    // header (4), legacy_version (2), random (32)
    let mut p = 4 + 2 + 32;
    if p + 1 > n {
        return bad;
    }
    let sid = b(buf, p);
    if sid > 32 {
        return bad;
    }
    p += 1 + sid;
    if p + 2 > n {
        return bad;
    }
    p += 2 + be16(buf, p);
    if p + 1 > n {
        return bad;
    }
    p += 1 + b(buf, p);
    if p == n {
        return refuse(kind::TLS, reason::NO_SNI);
    }
    if p + 2 > n {
        return bad;
    }
    let end = p + 2 + be16(buf, p);
    if end != n {
        return bad;
    }
    p += 2;
    let mut walk = ExtWalk {
        buf,
        p: L::num(p),
        end,
        found: L::flag(false),
        name_off: L::num(0),
        name_len: L::num(0),
        verdict: L::num(0) as u8,
    };
    L::repeat(MAX_EXTENSIONS, &mut walk);
    let (name_off, name_len) = (walk.name_off, walk.name_len);
    match walk.verdict {
        0 if walk.p == end => {}
        0 | 1 => return bad,
        2 => return refuse(kind::TLS, reason::BAD_NAME),
        _ => {
            return Outcome::Refuse {
                kind: kind::TLS,
                reason: reason::ECH,
                off: name_off,
                len: name_len,
            }
        }
    }
    if !walk.found {
        return refuse(kind::TLS, reason::NO_SNI);
    }
    Outcome::Name {
        kind: kind::TLS,
        off: name_off,
        len: name_len,
    }
}

/// The walk over a ClientHello's extensions, one extension a step.
struct ExtWalk<'a> {
    buf: &'a [u8; 2 * BUF],
    p: usize,
    end: usize,
    found: bool,
    name_off: usize,
    name_len: usize,
    /// 0: fine so far; 1: malformed; 2: bad server_name; 3: ECH.
    verdict: u8,
}

impl Body for ExtWalk<'_> {
    #[inline(always)]
    fn step(&mut self, _i: usize) -> bool {
        let (buf, p, end) = (self.buf, self.p, self.end);
        if p >= end {
            return false;
        }
        if p + 4 > end {
            self.verdict = 1;
            return false;
        }
        let t = be16(buf, p);
        let l = be16(buf, p + 2);
        let d = p + 4;
        if d + l > end {
            self.verdict = 1;
            return false;
        }
        if t == 0 {
            // server_name: list length, then exactly one host_name entry.
            let list = be16(buf, d);
            let nl = be16(buf, d + 3);
            if self.found || l < 5 || list + 2 != l || b(buf, d + 2) != 0 || nl + 3 != list {
                self.verdict = 2;
                return false;
            }
            self.found = true;
            self.name_off = d + 5;
            self.name_len = nl;
        } else if t == EXT_ECH || t == EXT_ESNI {
            self.verdict = 3;
            return false;
        }
        self.p = d + l;
        true
    }
}

/// Index of the first byte of `buf[off..off + len]` (at most 255 looked
/// at) that ends a run of bytes in `set`, counted from the front (or, with
/// `back`, the number of such bytes at the end).
struct Run<'a> {
    buf: &'a [u8; 2 * BUF],
    off: usize,
    len: usize,
    back: bool,
    /// What ends the run: `stop` bytes (authority scan) or non-blanks (trim).
    stop: bool,
    count: usize,
    ended: bool,
}

impl Body for Run<'_> {
    #[inline(always)]
    fn step(&mut self, i: usize) -> bool {
        if i >= self.len {
            return false;
        }
        let at = if self.back {
            self.off + self.len - 1 - i
        } else {
            self.off + i
        };
        let c = b(self.buf, at);
        let hit = if self.stop {
            c == b'/' as usize || c == b' ' as usize || c == b'?' as usize || c == b'#' as usize
        } else {
            c != b' ' as usize && c != b'\t' as usize
        };
        if hit {
            self.ended = true;
            return false;
        }
        self.count = i + 1;
        true
    }
}

#[inline(always)]
fn run<L: Loops>(buf: &[u8; 2 * BUF], off: usize, len: usize, back: bool, stop: bool) -> Run<'_> {
    let mut r = Run {
        buf,
        off,
        len,
        back,
        stop,
        count: L::num(0),
        ended: L::flag(false),
    };
    L::repeat(256, &mut r);
    r
}

/// The method token of a request line.
struct Method<'a> {
    buf: &'a [u8; 2 * BUF],
    n: usize,
    letters: usize,
    /// 0: ran out of bytes; 1: a space; 2: another byte.
    stop: u8,
}

impl Body for Method<'_> {
    #[inline(always)]
    fn step(&mut self, i: usize) -> bool {
        if i >= self.n {
            return false;
        }
        let c = b(self.buf, i);
        if c == b' ' as usize {
            self.stop = 1;
            return false;
        }
        if c.wrapping_sub(b'A' as usize) >= 26 {
            self.stop = 2;
            return false;
        }
        self.letters = i + 1;
        true
    }
}

/// Case-insensitive comparison of two runs of `len` bytes.
struct Same<'a> {
    buf: &'a [u8; 2 * BUF],
    a: usize,
    b: usize,
    len: usize,
    equal: bool,
}

impl Body for Same<'_> {
    #[inline(always)]
    fn step(&mut self, i: usize) -> bool {
        if i >= self.len {
            return false;
        }
        if lower(b(self.buf, self.a + i)) != lower(b(self.buf, self.b + i)) {
            self.equal = false;
            return false;
        }
        true
    }
}

/// An HTTP/1.x request head in `buf[..n]`: its one Host header.
#[inline(always)]
fn http<L: Loops>(buf: &[u8; 2 * BUF], n: usize) -> Outcome {
    let not = refuse(kind::UNKNOWN, reason::NOT_TLS_OR_HTTP);
    // Method: 1..=16 upper-case letters, then a space.
    let mut m = Method {
        buf,
        n,
        letters: L::num(0),
        stop: L::num(0) as u8,
    };
    L::repeat(MAX_METHOD as u32 + 1, &mut m);
    match m.stop {
        0 if m.letters > MAX_METHOD => return not,
        0 => return Outcome::NeedMore,
        1 if m.letters > 0 && m.letters <= MAX_METHOD => {}
        _ => return not,
    }
    let p = m.letters + 1;
    // Request target: origin form, or absolute form `http://authority...`.
    if p + 7 > n {
        return Outcome::NeedMore;
    }
    let mut auth_off = 0usize;
    let mut auth_len = 0usize;
    let mut absolute = false;
    if b(buf, p) != b'/' as usize {
        let scheme = b"http://";
        let mut i = 0usize;
        while i < 7 {
            if lower(b(buf, p + i)) != scheme[i] as usize {
                return not;
            }
            i += 1;
        }
        absolute = true;
        auth_off = p + 7;
        let r = run::<L>(buf, auth_off, n - auth_off, false, true);
        if !r.ended {
            return if n - auth_off < 255 {
                Outcome::NeedMore
            } else {
                refuse(kind::HTTP, reason::BAD_NAME)
            };
        }
        auth_len = r.count;
    }
    // Headers: lines up to the empty one; exactly one `Host:`.
    let mut scan = HeaderScan {
        buf,
        n,
        target: p,
        line: L::num(0),
        first_line: L::flag(true),
        host_seen: L::flag(false),
        host_again: L::flag(false),
        host_off: L::num(0),
        host_end: L::num(0),
        ended: L::flag(false),
        bad: L::flag(false),
    };
    L::repeat(BUF as u32, &mut scan);
    if scan.bad {
        return not;
    }
    let (ended, mut host_off, mut host_end) = (scan.ended, scan.host_off, scan.host_end);
    if !ended {
        return if n >= BUF {
            refuse(kind::HTTP, reason::TOO_LONG)
        } else {
            Outcome::NeedMore
        };
    }
    if !scan.host_seen || scan.host_again {
        return refuse(kind::HTTP, reason::NO_HOST);
    }
    // Trim optional whitespace, then a `:port`.
    if host_end > host_off {
        host_off += run::<L>(buf, host_off, host_end - host_off, false, false).count;
    }
    if host_end > host_off {
        host_end -= run::<L>(buf, host_off, host_end - host_off, true, false).count;
    }
    let host_len = strip_port(buf, host_off, host_end - host_off);
    if absolute {
        let a = strip_port(buf, auth_off, auth_len);
        if a != host_len {
            return Outcome::Refuse {
                kind: kind::HTTP,
                reason: reason::HOST_CONFLICT,
                off: auth_off,
                len: a,
            };
        }
        let mut same = Same {
            buf,
            a: auth_off,
            b: host_off,
            len: a,
            equal: L::flag(true),
        };
        L::repeat(256, &mut same);
        if !same.equal || a > 256 {
            return Outcome::Refuse {
                kind: kind::HTTP,
                reason: reason::HOST_CONFLICT,
                off: auth_off,
                len: a,
            };
        }
    }
    Outcome::Name {
        kind: kind::HTTP,
        off: host_off,
        len: host_len,
    }
}

/// The scan of an HTTP request head, one byte a step.
struct HeaderScan<'a> {
    buf: &'a [u8; 2 * BUF],
    n: usize,
    /// Start of the request target (the request line ends after it); the
    /// scan starts there.
    target: usize,
    /// Start of the current line.
    line: usize,
    first_line: bool,
    /// A Host header was seen; and a second one.
    host_seen: bool,
    host_again: bool,
    host_off: usize,
    host_end: usize,
    /// The empty line was seen.
    ended: bool,
    /// The request line does not end in ` HTTP/1.x`.
    bad: bool,
}

impl Body for HeaderScan<'_> {
    #[inline(always)]
    fn step(&mut self, i: usize) -> bool {
        let (buf, q) = (self.buf, self.target + i);
        if q >= self.n {
            return false;
        }
        if b(buf, q) != b'\n' as usize {
            return true;
        }
        let line = self.line;
        self.line = q + 1;
        let mut e = q;
        if e > line && b(buf, e - 1) == b'\r' as usize {
            e -= 1;
        }
        if self.first_line {
            // `... HTTP/1.x`
            if e < self.target + 9
                || b(buf, e - 9) != b' ' as usize
                || b(buf, e - 8) != b'H' as usize
                || b(buf, e - 7) != b'T' as usize
                || b(buf, e - 6) != b'T' as usize
                || b(buf, e - 5) != b'P' as usize
                || b(buf, e - 4) != b'/' as usize
                || b(buf, e - 3) != b'1' as usize
                || b(buf, e - 2) != b'.' as usize
            {
                self.bad = true;
                return false;
            }
            self.first_line = false;
        } else if e == line {
            self.ended = true;
            return false;
        } else if e >= line + 5
            && lower(b(buf, line)) == b'h' as usize
            && lower(b(buf, line + 1)) == b'o' as usize
            && lower(b(buf, line + 2)) == b's' as usize
            && lower(b(buf, line + 3)) == b't' as usize
            && b(buf, line + 4) == b':' as usize
        {
            if self.host_seen {
                self.host_again = true;
            }
            self.host_seen = true;
            self.host_off = line + 5;
            self.host_end = e;
        }
        true
    }
}

/// Length of `buf[off..off + len]` without a trailing `:digits`.
#[inline(always)]
fn strip_port(buf: &[u8; 2 * BUF], off: usize, len: usize) -> usize {
    let mut i = len;
    for _ in 0..6 {
        if i == 0 {
            return len;
        }
        let c = b(buf, off + i - 1);
        if c == b':' as usize {
            return if i < len { i - 1 } else { len };
        }
        if c.wrapping_sub(b'0' as usize) >= 10 {
            return len;
        }
        i -= 1;
    }
    len
}

/// Check the presented name `buf[off..off + len]` and write it, lower-cased,
/// reversed and 0-terminated into `out`: returns the key's name bytes
/// (name + terminator), or the refusal reason. One trailing dot is dropped.
#[inline(always)]
pub fn name_key<L: Loops>(
    buf: &[u8; 2 * BUF],
    off: usize,
    len: usize,
    out: &mut [u8; KEY_BUF],
) -> Result<usize, u8> {
    let mut len = len;
    if len > 0 && b(buf, off + len - 1) == b'.' as usize {
        len -= 1;
    }
    if len == 0 {
        return Err(reason::BAD_NAME);
    }
    if len > NAME_MAX {
        return Err(reason::TOO_LONG);
    }
    let mut check = NameCheck {
        buf,
        off,
        len,
        out,
        done: L::num(0),
        after_dot: L::flag(true),
        digits_only: L::flag(true),
        bad: L::flag(false),
    };
    L::repeat(NAME_MAX as u32, &mut check);
    // An IP literal (last label all digits) is no host name.
    if check.bad || check.done != len || check.after_dot || check.digits_only {
        return Err(reason::BAD_NAME);
    }
    Ok(len + 1)
}

/// The check of a host name, one character a step, writing it reversed.
/// (No counter is compared with a constant: the verifier then sees the
/// step's states converge instead of one state per iteration.)
struct NameCheck<'a> {
    buf: &'a [u8; 2 * BUF],
    off: usize,
    len: usize,
    out: &'a mut [u8; KEY_BUF],
    /// Characters checked.
    done: usize,
    /// At the start of a label (an empty label is refused).
    after_dot: bool,
    digits_only: bool,
    bad: bool,
}

impl Body for NameCheck<'_> {
    #[inline(always)]
    fn step(&mut self, i: usize) -> bool {
        if i >= self.len {
            return false;
        }
        let c = lower(b(self.buf, self.off + i));
        if c == b'.' as usize {
            if self.after_dot {
                self.bad = true;
                return false;
            }
            self.after_dot = true;
            self.digits_only = true;
        } else {
            let ok = c.wrapping_sub(b'a' as usize) < 26
                || c.wrapping_sub(b'0' as usize) < 10
                || c == b'-' as usize
                || c == b'_' as usize;
            if !ok {
                self.bad = true;
                return false;
            }
            if c.wrapping_sub(b'0' as usize) >= 10 {
                self.digits_only = false;
            }
            self.after_dot = false;
        }
        self.out[masked(self.len - 1 - i, 0xff)] = c as u8;
        if i == 0 {
            // The terminator (written here, where the index is masked for
            // the verifier: after the loop LLVM knows `len < 256` and drops
            // the mask).
            self.out[masked(self.len, 0xff)] = 0;
        }
        self.done = i + 1;
        true
    }
}

/// The LPM key bytes of a policy's host pattern (lower-case, validated):
/// `api.example.com` -> `moc.elpmaxe.ipa\0`, `*.example.com` -> `moc.elpmaxe.`.
/// `None` when it does not fit a key.
pub fn pattern_key(pattern: &str) -> Option<([u8; KEY_NAME], usize)> {
    let mut out = [0u8; KEY_NAME];
    let (body, wild) = match pattern.strip_prefix("*.") {
        Some(rest) => (rest, true),
        None => (pattern, false),
    };
    let body = body.strip_suffix('.').unwrap_or(body).as_bytes();
    if body.is_empty() || body.len() > NAME_MAX {
        return None;
    }
    for (i, c) in body.iter().rev().enumerate() {
        out[i] = c.to_ascii_lowercase();
    }
    out[body.len()] = if wild { b'.' } else { 0 };
    Some((out, body.len() + 1))
}

#[cfg(test)]
mod tests;
