//! `enforcer audit tail`: print an audit log's records, converted to OCSF
//! events (`ocsf.rs`) or as written, and with `--follow` keep printing the
//! records a writer (the daemon, `enforcer run`) appends: a live OCSF stream
//! for a log shipper, from a log written in either format.
//!
//! Only complete lines are printed (a record being written is held until its
//! newline arrives). Following polls the file: growth is read, a file that
//! shrank or was replaced (rotated) at the path is read again from its start.
//! The chain is not checked here: that is `enforcer audit verify`.
use std::{
    fs::File,
    io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write},
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    time::Duration,
};

use crate::{
    audit::{record_format, AuditFormat, MAX_LINE},
    ocsf,
};

/// What to print.
#[derive(Clone, Debug)]
pub struct TailOptions {
    /// Convert to this format; `None`: as written.
    pub format: Option<AuditFormat>,
    /// Keep reading as the file grows.
    pub follow: bool,
    /// Start with the last N records instead of the first.
    pub last: Option<u64>,
    /// How often a followed file is checked for growth.
    pub poll: Duration,
}

impl Default for TailOptions {
    fn default() -> Self {
        Self {
            format: None,
            follow: false,
            last: None,
            poll: Duration::from_millis(200),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TailError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// `at`: "line N", or "byte N" when printing started mid-file (`--lines`).
    #[error("{path}: {at}: {reason}")]
    Record {
        path: PathBuf,
        at: String,
        reason: String,
    },
}

/// Print the records of `path` to `out` (one per line) as `opts` says; with
/// `opts.follow`, return only when `stop()` is true (checked between polls)
/// or `out` is closed. Returns how many records were printed.
pub fn tail(
    path: &Path,
    opts: &TailOptions,
    out: &mut dyn Write,
    stop: &dyn Fn() -> bool,
) -> Result<u64, TailError> {
    let io_err = |source| TailError::Io {
        path: path.to_path_buf(),
        source,
    };
    let ctx = ocsf::Context::local();
    let mut file = File::open(path).map_err(io_err)?;
    let mut ino = file.metadata().map_err(io_err)?.ino();
    let mut pos = match opts.last {
        Some(n) => start_of_last_lines(&mut file, n).map_err(io_err)?,
        None => 0,
    };
    // Line numbers are only known when reading from the start.
    let mut line_no = if pos == 0 { Some(0) } else { None };
    let mut reader = BufReader::with_capacity(64 * 1024, file);
    reader.seek(SeekFrom::Start(pos)).map_err(io_err)?;
    let mut pending = Vec::with_capacity(1024);
    let mut printed = 0u64;
    let mut converted = Vec::with_capacity(2048);
    // The file at the path was replaced: the old one is read to its end
    // first, then the new one from its start.
    let mut rotated = false;
    loop {
        // Everything complete that is there now.
        loop {
            let n = reader.read_until(b'\n', &mut pending).map_err(io_err)?;
            if pending.len() as u64 > MAX_LINE {
                return Err(TailError::Record {
                    path: path.to_path_buf(),
                    at: format!("byte {pos}"),
                    reason: format!("a line longer than {MAX_LINE} bytes is not an audit record"),
                });
            }
            if n == 0 || pending.last() != Some(&b'\n') {
                break; // EOF; an incomplete line stays pending
            }
            let start = pos;
            pos += pending.len() as u64;
            line_no = line_no.map(|l| l + 1);
            let line = &pending[..pending.len() - 1];
            let bad = |reason: String| TailError::Record {
                path: path.to_path_buf(),
                at: match line_no {
                    Some(l) => format!("line {l}"),
                    None => format!("byte {start}"),
                },
                reason,
            };
            let found =
                record_format(line).map_err(|e| bad(format!("not an audit record: {e}")))?;
            let bytes: &[u8] = match (found, opts.format.unwrap_or(found)) {
                (AuditFormat::Json, AuditFormat::Ocsf) => {
                    converted.clear();
                    let record: ocsf::Record<'_> = serde_json::from_slice(line)
                        .map_err(|e| bad(format!("not a JSON audit record: {e}")))?;
                    ocsf::write_event(&mut converted, &record, &ctx)
                        .map_err(|e| bad(e.to_string()))?;
                    &converted
                }
                (AuditFormat::Ocsf, AuditFormat::Json) => {
                    return Err(bad(
                        "an OCSF event: OCSF events are not converted back to JSON records \
                         (use --format ocsf)"
                            .into(),
                    ))
                }
                _ => line,
            };
            let written = out.write_all(bytes).and_then(|()| out.write_all(b"\n"));
            if let Err(e) = written {
                return closed(e, printed).map_err(io_err);
            }
            printed += 1;
            pending.clear();
        }
        if let Err(e) = out.flush() {
            return closed(e, printed).map_err(io_err);
        }
        if rotated {
            // The old file is read to its end: on to the new one.
            rotated = false;
            if let Ok(file) = File::open(path) {
                ino = file.metadata().map_err(io_err)?.ino();
                reader = BufReader::with_capacity(64 * 1024, file);
                pos = 0;
                line_no = Some(0);
                pending.clear();
                continue;
            }
        }
        if !opts.follow || stop() {
            return Ok(printed);
        }
        std::thread::sleep(opts.poll);
        if stop() {
            return Ok(printed);
        }
        // Replaced at the path (rotation): finish the old file, then the
        // new one from its start.
        let now = std::fs::metadata(path).ok();
        if now.as_ref().is_some_and(|m| m.ino() != ino) {
            rotated = true;
            continue;
        }
        // Shorter than what was read, the unfinished line included: a torn
        // tail was cut by the writer's repair (it truncates to the last
        // complete record, where `pos` is: read on from there, the
        // `chain_resume` record next), or the file was truncated (from its
        // start). A truncation that grew back past `pos` between two polls
        // is not seen (copytruncate rotation: use rename rotation).
        let len = reader.get_ref().metadata().map_err(io_err)?.len();
        if len < pos + pending.len() as u64 {
            pending.clear();
            if len < pos {
                pos = 0;
                line_no = Some(0);
            }
            reader.seek(SeekFrom::Start(pos)).map_err(io_err)?;
        }
    }
}

/// A closed output (`| head`) ends the stream normally.
fn closed(e: io::Error, printed: u64) -> io::Result<u64> {
    if e.kind() == io::ErrorKind::BrokenPipe {
        Ok(printed)
    } else {
        Err(e)
    }
}

/// Offset of the first of the last `n` complete lines of `file` (`n` = 0:
/// the end of the last complete line: only what is appended from now on).
fn start_of_last_lines(file: &mut File, n: u64) -> io::Result<u64> {
    let len = file.metadata()?.len();
    if n == 0 {
        let mut end = len;
        let mut chunk = vec![0u8; 64 * 1024];
        while end > 0 {
            let size = end.min(chunk.len() as u64) as usize;
            let from = end - size as u64;
            file.seek(SeekFrom::Start(from))?;
            file.read_exact(&mut chunk[..size])?;
            if let Some(i) = chunk[..size].iter().rposition(|&b| b == b'\n') {
                return Ok(from + i as u64 + 1);
            }
            end = from;
        }
        return Ok(0);
    }
    let mut end = len;
    // An unterminated last line is not a record (yet): count from before it.
    let mut chunk = vec![0u8; 64 * 1024];
    let mut newlines = 0u64;
    let mut seen_complete = false;
    while end > 0 {
        let size = end.min(chunk.len() as u64) as usize;
        let from = end - size as u64;
        file.seek(SeekFrom::Start(from))?;
        file.read_exact(&mut chunk[..size])?;
        for i in (0..size).rev() {
            if chunk[i] != b'\n' {
                continue;
            }
            if !seen_complete {
                seen_complete = true;
                continue;
            }
            newlines += 1;
            if newlines == n {
                return Ok(from + i as u64 + 1);
            }
        }
        end = from;
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        audit::{AuditLog, AuditOptions, LifecycleAction, LifecycleEvent},
        events::{Action, Decision, IdentityRef, Verdict},
    };
    use std::sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    };

    fn decision(i: u32) -> Decision {
        Decision {
            ts: chrono::DateTime::from_timestamp(1_800_000_000 + i64::from(i), 0).unwrap(),
            identity: IdentityRef {
                name: "research-agent".into(),
                spiffe_id: Some("spiffe://example.org/ns/agents/sa/research".into()),
            },
            cgroup_id: 4242,
            pid: 300 + i,
            comm: "curl".into(),
            action: Action::Connect,
            ip: Some("203.0.113.9".parse().unwrap()),
            port: Some(443),
            protocol: Some("tcp".into()),
            host: None,
            path: None,
            workload: None,
            verdict: Verdict::Deny,
            rule: "default-deny".into(),
            policy_hash: "ab".repeat(32),
            detail: None,
            first_bytes: None,
            unix: None,
            flow: None,
        }
    }

    fn open(path: &Path, format: AuditFormat) -> AuditLog {
        AuditLog::open_with(
            path,
            AuditOptions {
                format,
                ..AuditOptions::default()
            },
        )
        .unwrap()
    }

    fn run(path: &Path, opts: &TailOptions) -> Result<Vec<serde_json::Value>, TailError> {
        let mut out = Vec::new();
        tail(path, opts, &mut out, &|| false)?;
        Ok(String::from_utf8(out)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect())
    }

    #[test]
    fn tail_converts_json_to_ocsf_and_passes_through() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.jsonl");
        let mut log = open(&path, AuditFormat::Json);
        log.append_lifecycle(&LifecycleEvent::new(LifecycleAction::Start, "v"))
            .unwrap();
        log.append_decision(&decision(1)).unwrap();
        log.flush().unwrap();
        drop(log);
        // As written.
        let v = run(&path, &TailOptions::default()).unwrap();
        assert_eq!(v.len(), 2);
        assert_eq!(v[1]["action"], "connect");
        // Converted: what the OCSF writer would have written.
        let opts = TailOptions {
            format: Some(AuditFormat::Ocsf),
            ..TailOptions::default()
        };
        let v = run(&path, &opts).unwrap();
        assert_eq!(v[0]["class_uid"], 6002);
        assert_eq!(v[1]["class_uid"], 4001);
        assert_eq!(v[1]["metadata"]["sequence"], 1);
        assert_eq!(v[1]["actor"]["process"]["pid"], 301);
        // --lines 1: the last record only.
        let opts = TailOptions {
            last: Some(1),
            ..opts
        };
        let v = run(&path, &opts).unwrap();
        assert_eq!(v.len(), 1);
        assert_eq!(v[0]["metadata"]["sequence"], 1);

        // An OCSF log is not converted back to JSON records.
        let ocsf_path = dir.path().join("o.jsonl");
        let mut log = open(&ocsf_path, AuditFormat::Ocsf);
        log.append_decision(&decision(1)).unwrap();
        log.flush().unwrap();
        let v = run(
            &ocsf_path,
            &TailOptions {
                format: Some(AuditFormat::Ocsf),
                ..TailOptions::default()
            },
        )
        .unwrap();
        assert_eq!(v[0]["class_uid"], 4001);
        let e = run(
            &ocsf_path,
            &TailOptions {
                format: Some(AuditFormat::Json),
                ..TailOptions::default()
            },
        )
        .unwrap_err();
        assert!(e.to_string().contains("line 1: an OCSF event"), "{e}");

        // A line that is no record is named.
        std::fs::write(&path, "{\"seq\":0}\nnot json\n").unwrap();
        let e = run(&path, &TailOptions::default()).unwrap_err();
        assert!(e.to_string().contains("line 1"), "{e}");
    }

    /// A shared buffer the tail thread writes to.
    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    impl Shared {
        fn lines(&self) -> Vec<serde_json::Value> {
            String::from_utf8(self.0.lock().unwrap().clone())
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect()
        }
        fn wait_for(&self, n: usize) -> Vec<serde_json::Value> {
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            loop {
                let v = self.lines();
                if v.len() >= n || std::time::Instant::now() > deadline {
                    return v;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }

    /// `tail --follow` of `path` on a thread, polling every 10 ms: what it
    /// printed, the flag that stops it, and its result.
    #[allow(clippy::type_complexity)]
    fn follow(
        path: &Path,
        format: Option<AuditFormat>,
    ) -> (
        Shared,
        Arc<AtomicBool>,
        std::thread::JoinHandle<Result<u64, TailError>>,
    ) {
        let out = Shared::default();
        let stop = Arc::new(AtomicBool::new(false));
        let handle = {
            let (path, mut out, stop) = (path.to_path_buf(), out.clone(), stop.clone());
            std::thread::spawn(move || {
                let opts = TailOptions {
                    format,
                    follow: true,
                    poll: Duration::from_millis(10),
                    ..TailOptions::default()
                };
                tail(&path, &opts, &mut out, &|| stop.load(Ordering::Relaxed))
            })
        };
        (out, stop, handle)
    }

    #[test]
    fn tail_follow_sees_appended_records_and_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.jsonl");
        let mut log = open(&path, AuditFormat::Json);
        log.append_decision(&decision(0)).unwrap();
        log.flush().unwrap();

        let (out, stop, handle) = follow(&path, Some(AuditFormat::Ocsf));
        assert_eq!(out.wait_for(1).len(), 1);
        // The writer appends while tail follows: half a line first.
        log.append_decision(&decision(1)).unwrap();
        log.flush().unwrap();
        let v = out.wait_for(2);
        assert_eq!(v.len(), 2, "{v:?}");
        assert_eq!(v[1]["metadata"]["sequence"], 1);
        assert_eq!(v[1]["actor"]["process"]["pid"], 301);
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"{\"seq\":2,")
            .unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(out.lines().len(), 2, "an incomplete line is held back");
        drop(log);

        // Rotation: a new file at the path is read from its start.
        let rotated = dir.path().join("a.jsonl.1");
        std::fs::rename(&path, &rotated).unwrap();
        let mut log = open(&path, AuditFormat::Json);
        log.append_decision(&decision(7)).unwrap();
        log.flush().unwrap();
        let v = out.wait_for(3);
        assert_eq!(v.len(), 3, "{v:?}");
        assert_eq!(v[2]["metadata"]["sequence"], 0);
        assert_eq!(v[2]["actor"]["process"]["pid"], 307);

        stop.store(true, Ordering::Relaxed);
        assert_eq!(handle.join().unwrap().unwrap(), 3);
    }

    /// Follow a tail across the writer's torn-tail repair (a crash mid-line,
    /// then a restart that truncates the torn bytes and writes
    /// `chain_resume`), and across a rotation whose old file still gets
    /// records after the new one appeared: nothing forged, nothing lost.
    #[test]
    fn tail_follow_survives_a_torn_tail_repair_and_drains_a_rotated_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.jsonl");
        let mut log = open(&path, AuditFormat::Json);
        log.append_decision(&decision(0)).unwrap();
        log.append_decision(&decision(1)).unwrap();
        log.flush().unwrap();
        let (out, stop, handle) = follow(&path, None);
        assert_eq!(out.wait_for(2).len(), 2);
        drop(log);
        // The writer dies mid-record...
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"{\"seq\":2,\"ts\":\"2026-")
            .unwrap();
        std::thread::sleep(Duration::from_millis(50));
        // ...and the next one repairs the tail and goes on.
        let mut log = open(&path, AuditFormat::Json);
        log.append_decision(&decision(3)).unwrap();
        log.flush().unwrap();
        let v = out.wait_for(4);
        assert_eq!(v.len(), 4, "{v:?}");
        assert_eq!(v[2]["action"], "chain_resume", "{v:?}");
        assert_eq!(v[2]["seq"], 2);
        assert_eq!(
            (v[3]["seq"].as_u64(), v[3]["pid"].as_u64()),
            (Some(3), Some(303))
        );

        // Rotation by rename: the writer appends to the old file after the
        // rename, then the new file appears; the old file's end comes
        // first, then the new file from its start.
        let old = dir.path().join("a.jsonl.1");
        std::fs::rename(&path, &old).unwrap();
        log.append_decision(&decision(4)).unwrap();
        log.flush().unwrap();
        let mut new = open(&path, AuditFormat::Json);
        new.append_decision(&decision(9)).unwrap();
        new.flush().unwrap();
        let v = out.wait_for(6);
        assert_eq!(v.len(), 6, "{v:?}");
        assert_eq!(v[4]["pid"], 304, "{v:?}");
        assert_eq!(
            (v[5]["pid"].as_u64(), v[5]["seq"].as_u64()),
            (Some(309), Some(0))
        );
        stop.store(true, Ordering::Relaxed);
        assert_eq!(handle.join().unwrap().unwrap(), 6);
    }

    #[test]
    fn lines_zero_prints_only_what_comes_next() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.jsonl");
        let mut log = open(&path, AuditFormat::Json);
        for i in 0..3 {
            log.append_decision(&decision(i)).unwrap();
        }
        log.flush().unwrap();
        let opts = TailOptions {
            last: Some(0),
            ..TailOptions::default()
        };
        assert!(run(&path, &opts).unwrap().is_empty());
        let opts = TailOptions {
            last: Some(2),
            ..TailOptions::default()
        };
        assert_eq!(run(&path, &opts).unwrap().len(), 2);
    }
}
