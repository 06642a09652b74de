//! Allowed flows: the kernel counts each allowed connect, datagram and
//! inbound connection in the flow (identity slot, cgroup, rule,
//! destination, port, protocol) of a small per-CPU cache (`FLOWS`,
//! `FLOW_WAYS` ways per side); a decision of another flow that maps to the
//! same way moves the way's flow to the `FLOW_SPILL` ring (which never wakes
//! anyone). Every interval this drainer flips the side the programs count
//! in, waits out the programs still running on the old side, reads the
//! spill ring and the old side's ways, merges what belongs to one flow, and
//! hands one `Flow` per flow to the sinks: one audit record that says how
//! many decisions it stands for, first and last seen, and the first
//! process.
//!
//! Nothing is lost: a program reads the side once per decision and runs
//! for well under a microsecond, and the drainer waits `SETTLE` before
//! reading; a full spill ring makes the program send the allow as its own
//! ring-buffer record (and the way keeps its flow).
use std::{sync::Arc, time::Duration};

use anyhow::{Context, Result};
use aya::maps::{Array, MapData, PerCpuArray, PerCpuValues, RingBuf};
use enforcer_common::{verdict, Event, FlowKey, FlowLast, FlowValue, FLOW_WAYS};
use tokio::sync::Notify;

/// How often allowed flows are written (the bound on an allow record's delay).
pub const INTERVAL: Duration = Duration::from_secs(1);
/// How long after a flip the old side is read.
const SETTLE: Duration = Duration::from_millis(10);

/// One drained flow: the decision (as a kernel event stamped with the last
/// decision's time) and the span it stands for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Flow {
    pub ev: Event,
    pub count: u64,
    /// CLOCK_MONOTONIC ns (jiffy resolution).
    pub first_ns: u64,
    pub last_ns: u64,
}

/// The flow cache, the spill ring and the side selector (taken from the
/// kernel object).
pub struct FlowTables {
    pub ways: PerCpuArray<MapData, FlowLast>,
    pub side: Array<MapData, u32>,
    pub spill: RingBuf<MapData>,
}

/// Merge one flow's per-CPU entries (CPUs without a decision are zero).
pub fn merge(key: &FlowKey, values: &[FlowValue]) -> Option<Flow> {
    let seen = values.iter().filter(|v| v.count > 0);
    let count: u64 = seen.clone().map(|v| v.count).sum();
    if count == 0 {
        return None;
    }
    let first = seen.clone().min_by_key(|v| v.first_ns)?;
    let last_ns = seen.map(|v| v.last_ns).max().unwrap_or(first.last_ns);
    Some(Flow {
        ev: Event {
            ts_ns: last_ns,
            cgroup_id: key.cgroup_id,
            pid: first.pid,
            tid: first.pid,
            slot: key.slot,
            rule_id: key.rule_id,
            addr: key.addr,
            port: key.port,
            action: key.action,
            verdict: verdict::ALLOW,
            protocol: key.protocol,
            family: key.family,
            sock_type: key.sock_type,
            reason: 0,
            comm: first.comm,
        },
        count,
        first_ns: first.first_ns,
        last_ns,
    })
}

impl FlowTables {
    fn current(&self) -> u32 {
        self.side.get(&0, 0).unwrap_or(0) & 1
    }

    /// Read the spill ring, then read and empty the ways of one side (the
    /// programs count in the other).
    fn drain_side(&mut self, b: bool) -> Vec<Flow> {
        // key -> partial aggregates (one per CPU way or spilled record).
        let mut parts: std::collections::HashMap<FlowKey, Vec<FlowValue>> = Default::default();
        while let Some(item) = self.spill.next() {
            if item.len() >= std::mem::size_of::<FlowLast>() {
                // SAFETY: length checked; FlowLast is plain old data.
                let l = unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<FlowLast>()) };
                parts.entry(l.key).or_default().push(l.value);
            }
        }
        let base = u32::from(b) * FLOW_WAYS;
        for i in base..base + FLOW_WAYS {
            let Ok(cpus) = self.ways.get(&i, 0) else {
                continue;
            };
            if cpus.iter().all(|l| l.value.count == 0) {
                continue;
            }
            for l in cpus.iter().filter(|l| l.value.count > 0) {
                parts.entry(l.key).or_default().push(l.value);
            }
            let empty = vec![FlowLast::default(); cpus.len()];
            if let Err(e) = PerCpuValues::try_from(empty)
                .map_err(anyhow::Error::from)
                .and_then(|v| Ok(self.ways.set(i, v, 0)?))
            {
                tracing::error!("clearing flow cache way {i}: {e:#}");
            }
        }
        let mut out: Vec<Flow> = parts.iter().filter_map(|(k, v)| merge(k, v)).collect();
        out.sort_by_key(|f| f.last_ns);
        out
    }

    /// Flip the side the programs write to, let the programs on the old
    /// side finish, and drain it.
    pub async fn drain(&mut self) -> Result<Vec<Flow>> {
        let old = self.current();
        self.side.set(0, old ^ 1, 0).context("flipping FLOW_SIDE")?;
        tokio::time::sleep(SETTLE).await;
        Ok(self.drain_side(old == 1))
    }

    /// Drain both sides (at exit, when no agent runs any more, or to pick
    /// up what accumulated while no daemon ran).
    pub async fn drain_all(&mut self) -> Result<Vec<Flow>> {
        let mut out = self.drain().await?;
        out.extend(self.drain().await?);
        Ok(out)
    }
}

/// Drain the flow tables every `INTERVAL` until `stop` is notified, then
/// once more (both sides), calling `handle` for each flow and `flush` after
/// each batch.
pub async fn run(
    mut tables: FlowTables,
    stop: Arc<Notify>,
    mut handle: impl FnMut(Flow) + Send,
    mut flush: impl FnMut() + Send,
) {
    let mut tick = tokio::time::interval(INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let last = tokio::select! {
            _ = tick.tick() => false,
            _ = stop.notified() => true,
        };
        let drained = if last {
            tables.drain_all().await
        } else {
            tables.drain().await
        };
        match drained {
            Ok(flows) => {
                let n = flows.len();
                for f in flows {
                    handle(f);
                }
                if n > 0 {
                    flush();
                }
            }
            Err(e) => tracing::error!("draining allowed flows: {e:#}"),
        }
        if last {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(count: u64, first: u64, last: u64, pid: u32) -> FlowValue {
        FlowValue {
            count,
            first_ns: first,
            last_ns: last,
            pid,
            _pad: 0,
            comm: *b"agent\0\0\0\0\0\0\0\0\0\0\0",
        }
    }

    #[test]
    fn per_cpu_entries_merge_into_one_flow() {
        let key = FlowKey {
            cgroup_id: 7,
            slot: 1,
            rule_id: 3,
            port: 443,
            action: enforcer_common::action::CONNECT,
            protocol: 6,
            family: 2,
            sock_type: 1,
            ..Default::default()
        };
        let f = merge(&key, &[v(0, 0, 0, 0), v(3, 20, 50, 11), v(2, 10, 40, 12)]).unwrap();
        assert_eq!(f.count, 5);
        assert_eq!((f.first_ns, f.last_ns), (10, 50));
        assert_eq!(f.ev.pid, 12, "the process of the first decision");
        assert_eq!(f.ev.ts_ns, 50);
        assert_eq!((f.ev.slot, f.ev.rule_id, f.ev.port), (1, 3, 443));
        assert_eq!(f.ev.verdict, verdict::ALLOW);
        assert!(merge(&key, &[v(0, 0, 0, 0), v(0, 0, 0, 0)]).is_none());
    }
}
