//! The daemon's heartbeat (`stateDir/heartbeat`): written at every resync
//! and at a clean stop, read at start, so a restarted daemon says how long
//! the node ran without one. Meanwhile the pinned programs kept enforcing
//! the last tables, but nobody answered DNS (it failed, closed), read the
//! ring buffer (events beyond its size were lost, counted by the kernel) or
//! served status and metrics. A crash, a `kill -9`, an OOM kill or an agent
//! that managed to stop the daemon all show up here.
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Beat {
    /// Unix time, seconds.
    pub ts: i64,
    /// Written by a daemon that stopped cleanly (SIGTERM/SIGINT).
    pub clean: bool,
}

fn path(state_dir: &Path) -> PathBuf {
    state_dir.join("heartbeat")
}

/// Write the heartbeat (atomically: a crash mid-write leaves the old one).
pub fn beat(state_dir: &Path, clean: bool) {
    let b = Beat {
        ts: chrono::Utc::now().timestamp(),
        clean,
    };
    let tmp = state_dir.join("heartbeat.tmp");
    let ok = serde_json::to_vec(&b)
        .ok()
        .and_then(|v| std::fs::write(&tmp, v).ok())
        .and_then(|_| std::fs::rename(&tmp, path(state_dir)).ok());
    if ok.is_none() {
        tracing::warn!(dir = %state_dir.display(), "could not write the heartbeat");
    }
}

/// What the previous daemon left, if anything.
pub fn previous(state_dir: &Path) -> Option<Beat> {
    serde_json::from_slice(&std::fs::read(path(state_dir)).ok()?).ok()
}

/// The sentence a restarted daemon logs and records, given the previous
/// beat, the time now and the kernel's lost-event count.
pub fn describe_gap(prev: Beat, now: i64, lost_events: u64) -> String {
    let secs = (now - prev.ts).max(0);
    let since = chrono::DateTime::from_timestamp(prev.ts, 0)
        .map(|t| t.to_rfc3339())
        .unwrap_or_else(|| prev.ts.to_string());
    let how = if prev.clean {
        "the previous daemon stopped cleanly"
    } else {
        "the previous daemon died without stopping (crash, kill -9, OOM)"
    };
    format!(
        "gap: {how}; last heartbeat {since}, {secs} s without a daemon (at most one resync \
         interval more for a crash): pinned programs kept enforcing the last tables, DNS was not \
         answered, events beyond the ring buffer were lost ({lost_events} lost events counted by \
         the kernel so far)"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn beat_roundtrip_and_gap_text() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(previous(dir.path()), None);
        beat(dir.path(), false);
        let b = previous(dir.path()).unwrap();
        assert!(!b.clean);
        let s = describe_gap(b, b.ts + 42, 7);
        assert!(s.contains("42 s without a daemon"), "{s}");
        assert!(s.contains("died without stopping"), "{s}");
        assert!(s.contains("7 lost events"), "{s}");
        beat(dir.path(), true);
        assert!(previous(dir.path()).unwrap().clean);
    }
}
