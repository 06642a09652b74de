//! Unix socket fixtures of the unix socket tests (`unix_sockets.rs` on the
//! host, `unix_lsm.rs` in the VM): listeners outside the agent's identity
//! that count what reaches them, and a fake systemd-resolved.
use std::{
    io::{Read, Write},
    os::linux::net::SocketAddrExt,
    os::unix::{
        fs::PermissionsExt,
        net::{SocketAddr as UnixAddr, UnixDatagram, UnixListener},
    },
    path::Path,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use serde_json::{json, Value};

/// What one listener received.
#[derive(Default)]
pub struct Seen {
    conns: AtomicU64,
    bytes: AtomicU64,
    text: Mutex<String>,
}

impl Seen {
    pub fn conns(&self) -> u64 {
        self.conns.load(Ordering::SeqCst)
    }
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::SeqCst)
    }
    pub fn text(&self) -> String {
        self.text.lock().unwrap().clone()
    }
}

pub fn open_to_all(path: &Path) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o777)).unwrap();
}

/// A stream listener that counts connections and bytes and answers `reply`.
pub fn stream_sink(l: UnixListener, reply: &'static [u8]) -> Arc<Seen> {
    let seen = Arc::new(Seen::default());
    let s = seen.clone();
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(mut c) = c else { continue };
            s.conns.fetch_add(1, Ordering::SeqCst);
            let _ = c.set_read_timeout(Some(Duration::from_secs(2)));
            let mut buf = [0u8; 4096];
            if let Ok(n) = c.read(&mut buf) {
                s.bytes.fetch_add(n as u64, Ordering::SeqCst);
                s.text
                    .lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
                let _ = c.write_all(reply);
            }
        }
    });
    seen
}

pub fn path_sink(path: &Path, reply: &'static [u8]) -> Arc<Seen> {
    let l = UnixListener::bind(path).unwrap();
    open_to_all(path);
    stream_sink(l, reply)
}

pub fn abstract_sink(name: &str) -> Arc<Seen> {
    let addr = UnixAddr::from_abstract_name(name.as_bytes()).unwrap();
    stream_sink(UnixListener::bind_addr(&addr).unwrap(), b"ok")
}

pub fn dgram_sink(path: &Path) -> Arc<Seen> {
    let d = UnixDatagram::bind(path).unwrap();
    open_to_all(path);
    let seen = Arc::new(Seen::default());
    let s = seen.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = d.recv(&mut buf) {
            s.conns.fetch_add(1, Ordering::SeqCst);
            s.bytes.fetch_add(n as u64, Ordering::SeqCst);
            s.text
                .lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    seen
}

/// A fake systemd-resolved varlink server: records the name of every
/// `io.systemd.Resolve.ResolveHostname` call and answers 127.0.0.9.
pub fn fake_resolved(path: &Path) -> Arc<Mutex<Vec<String>>> {
    let names = Arc::new(Mutex::new(Vec::new()));
    let l = UnixListener::bind(path).unwrap();
    open_to_all(path);
    let n = names.clone();
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(mut c) = c else { continue };
            let _ = c.set_read_timeout(Some(Duration::from_secs(2)));
            let mut msg = Vec::new();
            let mut b = [0u8; 1];
            while let Ok(1) = c.read(&mut b) {
                if b[0] == 0 {
                    break;
                }
                msg.push(b[0]);
            }
            let Ok(v) = serde_json::from_slice::<Value>(&msg) else {
                continue;
            };
            if v["method"] == "io.systemd.Resolve.ResolveHostname" {
                let name = v["parameters"]["name"].as_str().unwrap_or("").to_string();
                n.lock().unwrap().push(name.clone());
                let reply = json!({"parameters": {"name": name, "flags": 0, "addresses": [
                    {"ifindex": 1, "family": 2, "address": [127, 0, 0, 9]}]}});
                let mut out = serde_json::to_vec(&reply).unwrap();
                out.push(0);
                let _ = c.write_all(&out);
            }
        }
    });
    names
}
