//! Allowed flows: the kernel counts each allowed connect, datagram and
//! inbound connection in the flow (identity slot, cgroup, process, rule,
//! destination, port, protocol) of a small per-CPU cache (`FLOWS`: per side
//! and context, `FLOW_WAYS` ways); a decision of another flow that hashes
//! to the same way moves the way's flow to the `FLOW_SPILL` ring (which
//! never wakes anyone). Every interval this drainer advances the epoch in
//! `CACHE_GEN` (its parity is the side the programs count in), waits out
//! the programs still running on the old side, reads the spill ring and
//! the old side's ways of the old epoch, merges what belongs to one flow,
//! and hands one `Flow` per flow to the sinks: one audit record that says
//! how many decisions it stands for, first and last seen.
//!
//! Userspace never writes a way (a program treats a way of an older epoch
//! as empty), so a drain cannot race a program's update. A program that
//! still counts on the old side after `SETTLE` (preempted for 10 ms inside
//! it) loses that increment from the records (the kernel's counters keep
//! it, unless the flow cache answered it: a hit is counted in the way
//! only, and reaches the metrics through `ALLOW_HITS` when it is drained). A full spill ring makes the program send the allow as its own
//! record in `ALLOW_EVENTS` (and the way keeps its flow).
use std::{sync::Arc, time::Duration};

use anyhow::{Context, Result};
use aya::maps::{Array, MapData, PerCpuArray, RingBuf};
use enforcer_common::{
    action, cache_gen, counter_index, verdict, Event, FlowEntry, FlowKey, FlowValue, FLOW_WAYS,
};
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
    pub ways: PerCpuArray<MapData, FlowEntry>,
    /// `CACHE_GEN`: the drainer writes its `EPOCH` entry, nothing else.
    pub side: Array<MapData, u64>,
    pub spill: RingBuf<MapData>,
    /// `ALLOW_HITS`: the drainer adds each drained part's `hits` (the
    /// decisions the flow cache answered, which the programs count in the
    /// way only) at the flow's `counter_index(slot, action, allow)`.
    /// Shared with the `Kernel` (which reads it with `COUNTERS` and
    /// resets a reused slot's entries) under this lock.
    pub hits: Arc<std::sync::Mutex<Array<MapData, u64>>>,
}

/// The key a part of a flow is merged under: the verdict generation the
/// way was filled in and whether it may answer are no part of the flow (a
/// flow counted across a policy or binding change is one flow, one record
/// per drain).
fn part_key(k: &FlowKey) -> FlowKey {
    FlowKey {
        gen: 0,
        cacheable: 0,
        ..*k
    }
}

/// Merge one flow's partial aggregates (per CPU way or spilled record;
/// those without a decision are skipped). They share the admitting rule
/// (`rule_id`, grouped by the caller).
pub fn merge(key: &FlowKey, rule_id: u32, values: &[FlowValue]) -> Option<Flow> {
    let seen = values.iter().filter(|v| v.decisions() > 0);
    let count: u64 = seen.clone().map(FlowValue::decisions).sum();
    if count == 0 {
        return None;
    }
    let first = seen.clone().min_by_key(|v| v.first_ns)?;
    let last_ns = seen.map(|v| v.last_ns).max().unwrap_or(first.last_ns);
    Some(Flow {
        ev: Event {
            ts_ns: last_ns,
            cgroup_id: key.cgroup_id,
            pid: key.pid,
            tid: key.pid,
            slot: key.slot,
            rule_id,
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

/// A way as drained at `ended_ns` (its epoch's end): the programs stamp
/// `last_ns` when they fill a way, not when they count in it, so a way
/// that counted more than one decision is known to have been last used
/// no later than `ended_ns`.
fn drained_way(mut value: FlowValue, ended_ns: u64) -> FlowValue {
    if value.decisions() > 1 {
        value.last_ns = value.last_ns.max(ended_ns);
    }
    value
}

/// At most this many spilled records per drain (the rest wait for the
/// next): a flood of distinct flows cannot hold the drainer.
const SPILL_PER_DRAIN: usize =
    4 * (enforcer_common::FLOW_SPILL_BYTES as usize) / std::mem::size_of::<FlowEntry>();

impl FlowTables {
    /// Read the spill ring (bounded), and the ways of `epoch`'s side that
    /// were filled in `epoch` (the programs count in the next epoch's side
    /// now; ways are never cleared: a program treats a way of an older
    /// epoch as empty).
    ///
    /// A way's `last_ns` is its fill time (the programs do not read a
    /// clock when they count): a way that counted more than one decision
    /// gets `ended_ns`, the time its epoch ended, as its last (an upper
    /// bound, at most `INTERVAL` + `SETTLE` late). A spilled flow's is the
    /// time it was evicted.
    fn drain_epoch(&mut self, epoch: u32, ended_ns: u64) -> Vec<Flow> {
        // (key, rule) -> partial aggregates (one per CPU way or spilled
        // record). The rule is not part of the kernel's key (a way's table
        // id names it), but a flow admitted by a learned address may be
        // admitted by another rule after the name's answer changed.
        let mut parts: std::collections::HashMap<(FlowKey, u32), Vec<FlowValue>> =
            Default::default();
        let mut spilled = 0;
        while spilled < SPILL_PER_DRAIN {
            let Some(item) = self.spill.next() else {
                break;
            };
            spilled += 1;
            if item.len() >= std::mem::size_of::<FlowEntry>() {
                // SAFETY: length checked; FlowEntry is plain old data.
                let l = unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<FlowEntry>()) };
                parts
                    .entry((part_key(&l.key), l.value.rule_id))
                    .or_default()
                    .push(l.value);
            }
        }
        // Both contexts' ways of the side.
        let side = epoch & 1;
        for i in side * 2 * FLOW_WAYS..(side + 1) * 2 * FLOW_WAYS {
            let Ok(cpus) = self.ways.get(&i, 0) else {
                continue;
            };
            for l in cpus
                .iter()
                .filter(|l| l.value.decisions() > 0 && l.value.epoch == epoch)
            {
                let value = drained_way(l.value, ended_ns);
                parts
                    .entry((part_key(&l.key), l.value.rule_id))
                    .or_default()
                    .push(value);
            }
        }
        self.add_hits(&parts);
        let mut out: Vec<Flow> = parts
            .iter()
            .filter_map(|((k, rule), v)| merge(k, *rule, v))
            .collect();
        out.sort_by_key(|f| f.last_ns);
        out
    }

    /// Add the drained parts' cache answers to `ALLOW_HITS` (the drainer
    /// adds, the `Kernel` only resets a reused slot; the lock keeps a
    /// reset out of a read and its write).
    fn add_hits(&mut self, parts: &std::collections::HashMap<(FlowKey, u32), Vec<FlowValue>>) {
        let mut sums: std::collections::HashMap<u32, u64> = Default::default();
        for ((k, _), values) in parts {
            let hits: u64 = values.iter().map(|v| v.hits).sum();
            if hits > 0
                && k.slot < enforcer_common::MAX_SLOTS
                && u32::from(k.action) < action::COUNT
            {
                *sums
                    .entry(counter_index(k.slot, k.action, verdict::ALLOW))
                    .or_default() += hits;
            }
        }
        if sums.is_empty() {
            return;
        }
        let mut map = self.hits.lock().unwrap_or_else(|e| e.into_inner());
        for (i, n) in sums {
            let old = map.get(&i, 0).unwrap_or(0);
            if let Err(e) = map.set(i, old.wrapping_add(n), 0) {
                tracing::warn!("adding {n} cached allows to ALLOW_HITS[{i}]: {e}");
            }
        }
    }

    /// Advance the epoch (the programs move to the other side), let the
    /// programs still on the old side finish, and drain it.
    pub async fn drain(&mut self) -> Result<Vec<Flow>> {
        // (The programs read the entry's low 32 bits.)
        let epoch = self.side.get(&cache_gen::EPOCH, 0).unwrap_or(0) as u32;
        self.side
            .set(cache_gen::EPOCH, u64::from(epoch.wrapping_add(1)), 0)
            .context("advancing the flow epoch")?;
        tokio::time::sleep(SETTLE).await;
        Ok(self.drain_epoch(epoch, crate::kernel::learned::monotonic_ns()))
    }

    /// Drain both sides (at exit, when no agent runs any more).
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

    fn v(count: u64, first: u64, last: u64, comm: &[u8; 16]) -> FlowValue {
        FlowValue {
            count,
            hits: 0,
            first_ns: first,
            last_ns: last,
            epoch: 3,
            rule_id: 3,
            comm: *comm,
            check: 0,
        }
    }

    #[test]
    fn a_flow_counts_the_cache_answers_too() {
        let a = b"agent-a\0\0\0\0\0\0\0\0\0";
        let mut cached = v(1, 20, 20, a);
        cached.hits = 4;
        let key = FlowKey::default();
        let f = merge(&key, 3, &[cached, v(2, 10, 30, a), v(0, 0, 0, a)]).unwrap();
        assert_eq!(f.count, 7, "1 + 4 answered by the cache + 2");
        assert_eq!((f.first_ns, f.last_ns), (10, 30));
        assert_eq!(
            drained_way(cached, 900).last_ns,
            900,
            "one lookup and four answers: the epoch's end"
        );
    }

    #[test]
    fn a_drained_way_ends_at_the_epoch_end_once_it_counted_twice() {
        let a = b"agent-a\0\0\0\0\0\0\0\0\0";
        assert_eq!(
            drained_way(v(1, 20, 20, a), 900).last_ns,
            20,
            "one decision: its time"
        );
        assert_eq!(
            drained_way(v(4, 20, 20, a), 900).last_ns,
            900,
            "more: the epoch's end"
        );
        assert_eq!(
            drained_way(v(4, 20, 950, a), 900).last_ns,
            950,
            "never earlier"
        );
    }

    #[test]
    fn per_cpu_entries_merge_into_one_flow() {
        let key = FlowKey {
            cgroup_id: 7,
            slot: 1,
            table_id: 9,
            port: 443,
            action: enforcer_common::action::CONNECT,
            protocol: 6,
            family: 2,
            sock_type: 1,
            pid: 12,
            ..Default::default()
        };
        let (a, b) = (b"agent-a\0\0\0\0\0\0\0\0\0", b"agent-b\0\0\0\0\0\0\0\0\0");
        let f = merge(&key, 3, &[v(0, 0, 0, a), v(3, 20, 50, a), v(2, 10, 40, b)]).unwrap();
        assert_eq!(f.count, 5);
        assert_eq!((f.first_ns, f.last_ns), (10, 50));
        assert_eq!(f.ev.pid, 12, "the flow's process");
        assert_eq!(&f.ev.comm, b, "its name at the first decision");
        assert_eq!(f.ev.ts_ns, 50);
        assert_eq!((f.ev.slot, f.ev.rule_id, f.ev.port), (1, 3, 443));
        assert_eq!(f.ev.verdict, verdict::ALLOW);
        assert!(merge(&key, 3, &[v(0, 0, 0, a), v(0, 0, 0, b)]).is_none());
    }
}
