//! What the programs counted: per-slot decisions by (action, verdict)
//! (`COUNTERS`, `ALLOW_HITS`), refused first bytes by reason (`REASONS`),
//! and the global `STATS`.
use enforcer_common::{action, counter_index, first_bytes, reason_index, stat, verdict};

use super::{Kernel, SlotCounters};

impl Kernel {
    /// A slot's decisions by (action, verdict): `COUNTERS`, and for allows
    /// also `ALLOW_HITS` (the flow cache's answers, up to one drain interval
    /// late).
    pub fn slot_counters(&self, slot: u32) -> SlotCounters {
        let mut out = [[0u64; verdict::COUNT as usize]; action::COUNT as usize];
        for (a, row) in out.iter_mut().enumerate() {
            for (v, cell) in row.iter_mut().enumerate() {
                let idx = counter_index(slot, a as u8, v as u8);
                if let Ok(vals) = self.counters.get(&idx, 0) {
                    *cell = vals.iter().sum();
                }
                if v as u8 == verdict::ALLOW {
                    let hits = self.allow_hits.lock().unwrap_or_else(|e| e.into_inner());
                    *cell += hits.get(&idx, 0).unwrap_or(0);
                }
            }
        }
        out
    }

    /// Refused first bytes of `slot` by reason: (reason, audit, total), non-zero only.
    pub fn slot_reasons(&self, slot: u32) -> Vec<(u8, bool, u64)> {
        let mut out = Vec::new();
        for r in 1..first_bytes::reason::COUNT as u8 {
            for audit in [false, true] {
                let idx = reason_index(slot, r, audit);
                if let Ok(vals) = self.reasons.get(&idx, 0) {
                    let total: u64 = vals.iter().sum();
                    if total > 0 {
                        out.push((r, audit, total));
                    }
                }
            }
        }
        out
    }

    /// Reset a slot's counters (when a slot is reused for another identity).
    pub fn reset_slot_counters(&mut self, slot: u32) {
        let ncpu = aya::util::nr_cpus().unwrap_or(1);
        for r in 0..first_bytes::reason::COUNT as u8 {
            for audit in [false, true] {
                if let Ok(zero) = aya::maps::PerCpuValues::try_from(vec![0u64; ncpu]) {
                    let _ = self.reasons.set(reason_index(slot, r, audit), zero, 0);
                }
            }
        }
        for a in 0..action::COUNT as u8 {
            for v in 0..verdict::COUNT as u8 {
                let idx = counter_index(slot, a, v);
                if let Ok(zero) = aya::maps::PerCpuValues::try_from(vec![0u64; ncpu]) {
                    let _ = self.counters.set(idx, zero, 0);
                }
                let _ = self
                    .allow_hits
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .set(idx, 0, 0);
            }
        }
    }

    pub fn stat(&self, index: u32) -> u64 {
        debug_assert!(index < stat::COUNT);
        self.stats
            .get(&index, 0)
            .map(|v| v.iter().sum())
            .unwrap_or(0)
    }
}
