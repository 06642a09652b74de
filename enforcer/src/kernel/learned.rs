//! Addresses that DNS answers allowed, per identity slot.
//!
//! The proxy calls `learn` before it releases an answer: the kernel entry
//! exists before the agent can connect. Several names can resolve to one
//! address: the kernel entry holds the union of their rules' ports and
//! protocols and the latest expiry; `gc` drops names whose TTL ended and
//! rewrites or deletes the kernel entry. The kernel checks the expiry
//! itself on every lookup, so `gc` only reclaims space and keeps the gauges
//! and the attribution (`host_of`) true.
//!
//! Writes are skipped when they would change nothing that matters: the
//! kernel entry is written with [`EXPIRY_SLACK`] added to its expiry, and a
//! name answered again with the same rules while the kernel's expiry still
//! covers the new one (within that slack) costs no `bpf()` call. An address
//! therefore stays allowed up to [`EXPIRY_SLACK`] past the TTL its answer
//! gave (the TTL the agent saw is at least `dns.minTTL`, 5 s by default).
//! Only this table writes the maps; it remembers what it wrote.
//!
//! Addresses learned for an identity's onTaint host rules are kept under
//! `slot | TAINT_SLOT_BIT`; `forget_slot`, `host_of` and `count` take the
//! plain slot and cover both keys.
use std::{
    collections::HashMap as StdHashMap,
    net::IpAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use anyhow::{Context, Result};
use aya::maps::{HashMap, MapData};
use enforcer_common::{
    Learned, LearnedKey4, LearnedKey6, PortRule, RuleSet, MAX_PORT_RULES, MAX_SLOTS, TAINT_SLOT_BIT,
};

/// CLOCK_MONOTONIC in ns: the clock of `bpf_ktime_get_ns()`.
pub fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
}

/// An IPv4-mapped IPv6 address is the IPv4 address.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

/// Is `key_slot` (a learned key's slot) one of identity `slot`'s: the plain
/// slot or its onTaint key?
fn of_identity(key_slot: u32, slot: u32) -> bool {
    key_slot & !TAINT_SLOT_BIT == slot & !TAINT_SLOT_BIT
}

/// How far past the latest TTL of its names a kernel entry is written to
/// expire (module docs).
pub const EXPIRY_SLACK: Duration = Duration::from_secs(1);

/// Does the kernel entry as `written` stand for `merged` already: the same
/// rules, and an expiry from `merged`'s to [`EXPIRY_SLACK`] past it (a
/// later one, e.g. of a name that has since expired, must be lowered).
fn covers(written: Option<Learned>, merged: &Learned) -> bool {
    let slack = EXPIRY_SLACK.as_nanos() as u64;
    written.is_some_and(|w| {
        w.set == merged.set
            && w.expires_ns >= merged.expires_ns
            && w.expires_ns - merged.expires_ns <= slack
    })
}

struct ByName {
    set: RuleSet,
    expires_ns: u64,
}

/// One (slot, address): the names that resolved to it, and the kernel
/// entry as last written (`None`: not written, or deleted).
#[derive(Default)]
struct Entry {
    names: StdHashMap<String, ByName>,
    written: Option<Learned>,
}

pub struct LearnedTable {
    v4: HashMap<MapData, LearnedKey4, Learned>,
    v6: HashMap<MapData, LearnedKey6, Learned>,
    entries: StdHashMap<(u32, IpAddr), Entry>,
    /// `bpf()` writes made and skipped (they would have changed nothing).
    writes: u64,
    skipped: u64,
    /// Learning epoch per identity (plain slot), advanced by `forget_slot`
    /// under the table's lock; read without it by the DNS proxy
    /// ([`Self::epochs`]) once per query.
    epochs: Arc<Epochs>,
}

/// Learning epochs by plain slot (see [`LearnedTable::epoch`]).
pub struct Epochs(Vec<AtomicU64>);

impl Epochs {
    fn new() -> Self {
        Self((0..MAX_SLOTS).map(|_| AtomicU64::new(0)).collect())
    }

    /// Identity `slot`'s epoch (its plain slot's: the onTaint key shares it).
    pub fn get(&self, slot: u32) -> u64 {
        self.0
            .get(((slot & !TAINT_SLOT_BIT) as usize) % self.0.len())
            .map_or(0, |e| e.load(Ordering::SeqCst))
    }

    fn advance(&self, slot: u32) {
        if let Some(e) = self
            .0
            .get(((slot & !TAINT_SLOT_BIT) as usize) % self.0.len())
        {
            e.fetch_add(1, Ordering::SeqCst);
        }
    }
}

impl LearnedTable {
    /// Wrap the kernel maps. Entries already there (pinned maps of a daemon
    /// that restarted) are adopted under a placeholder name so that they
    /// expire and are reclaimed like the others; expired ones are deleted.
    pub fn new(
        v4: HashMap<MapData, LearnedKey4, Learned>,
        v6: HashMap<MapData, LearnedKey6, Learned>,
    ) -> Self {
        let mut me = Self {
            v4,
            v6,
            entries: StdHashMap::new(),
            writes: 0,
            skipped: 0,
            epochs: Arc::new(Epochs::new()),
        };
        let found: Vec<(u32, IpAddr, Learned)> = me
            .v4
            .iter()
            .filter_map(|r| r.ok())
            .map(|(k, v)| (k.slot, IpAddr::from(k.addr), v))
            .chain(
                me.v6
                    .iter()
                    .filter_map(|r| r.ok())
                    .map(|(k, v)| (k.slot, IpAddr::from(k.addr), v)),
            )
            .collect();
        let now = monotonic_ns();
        for (slot, ip, v) in found {
            if v.expires_ns <= now {
                let _ = me.delete(slot, ip);
                continue;
            }
            let e = me.entries.entry((slot, ip)).or_default();
            e.names.insert(
                "(learned before a restart)".to_string(),
                ByName {
                    set: v.set,
                    expires_ns: v.expires_ns,
                },
            );
            e.written = Some(v);
        }
        me
    }

    /// Identity `slot`'s learning epoch (its plain slot's: the onTaint key
    /// shares it).
    pub fn epoch(&self, slot: u32) -> u64 {
        self.epochs.get(slot)
    }

    /// The epochs, to read without this table's lock.
    pub fn epochs(&self) -> Arc<Epochs> {
        self.epochs.clone()
    }

    /// Learn `ip` for `slot` from `host`, unless `epoch` is stale
    /// ([`crate::dns::StaleEpoch`]).
    pub fn learn(
        &mut self,
        slot: u32,
        ip: IpAddr,
        set: &RuleSet,
        ttl: Duration,
        host: &str,
        epoch: u64,
    ) -> Result<()> {
        if epoch != self.epoch(slot) {
            return Err(crate::dns::StaleEpoch.into());
        }
        let ip = canonical(ip);
        let expires_ns = monotonic_ns().saturating_add(ttl.as_nanos() as u64);
        let by_name = ByName {
            set: *set,
            expires_ns,
        };
        let names = &mut self.entries.entry((slot, ip)).or_default().names;
        match names.get_mut(host) {
            Some(n) => *n = by_name,
            None => {
                names.insert(host.to_string(), by_name);
            }
        }
        self.write(slot, ip)
    }

    /// (`bpf()` writes made, writes skipped as unneeded) so far.
    pub fn write_counts(&self) -> (u64, u64) {
        (self.writes, self.skipped)
    }

    /// Merge the names of (slot, ip) into one kernel entry (or delete it).
    /// Skipped when the entry as last written has the same rules and an
    /// expiry from the merged one to [`EXPIRY_SLACK`] past it.
    fn write(&mut self, slot: u32, ip: IpAddr) -> Result<()> {
        let Some(entry) = self.entries.get(&(slot, ip)) else {
            return self.delete(slot, ip);
        };
        let mut merged = Learned::default();
        let mut rules: Vec<PortRule> = Vec::new();
        for n in entry.names.values() {
            merged.expires_ns = merged.expires_ns.max(n.expires_ns);
            for r in &n.set.rules[..(n.set.count as usize).min(MAX_PORT_RULES)] {
                if !rules.contains(r) {
                    rules.push(*r);
                }
            }
        }
        if rules.len() > MAX_PORT_RULES {
            tracing::warn!(%ip, slot, "more than {MAX_PORT_RULES} port rules learned for one address; keeping the first");
            rules.truncate(MAX_PORT_RULES);
        }
        merged.set.count = rules.len() as u32;
        merged.set.rules[..rules.len()].copy_from_slice(&rules);
        if covers(entry.written, &merged) {
            self.skipped += 1;
            return Ok(());
        }
        merged.expires_ns = merged
            .expires_ns
            .saturating_add(EXPIRY_SLACK.as_nanos() as u64);
        let r = match ip {
            IpAddr::V4(a) => self
                .v4
                .insert(
                    LearnedKey4 {
                        slot,
                        addr: a.octets(),
                    },
                    merged,
                    0,
                )
                .context("writing LEARNED_V4"),
            IpAddr::V6(a) => self
                .v6
                .insert(
                    LearnedKey6 {
                        slot,
                        addr: a.octets(),
                    },
                    merged,
                    0,
                )
                .context("writing LEARNED_V6"),
        };
        if r.is_ok() {
            self.writes += 1;
        }
        // A failed write may have left the old entry or none: not known.
        let written = r.is_ok().then_some(merged);
        if let Some(e) = self.entries.get_mut(&(slot, ip)) {
            e.written = written;
        }
        r
    }

    fn delete(&mut self, slot: u32, ip: IpAddr) -> Result<()> {
        let r = match ip {
            IpAddr::V4(a) => self.v4.remove(&LearnedKey4 {
                slot,
                addr: a.octets(),
            }),
            IpAddr::V6(a) => self.v6.remove(&LearnedKey6 {
                slot,
                addr: a.octets(),
            }),
        };
        match r {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Drop expired names; returns how many (slot, ip) entries changed.
    pub fn gc(&mut self) -> usize {
        let now = monotonic_ns();
        let mut changed = Vec::new();
        for (key, e) in self.entries.iter_mut() {
            let before = e.names.len();
            e.names.retain(|_, n| n.expires_ns > now);
            if e.names.len() != before {
                changed.push(*key);
            }
        }
        self.entries.retain(|_, e| !e.names.is_empty());
        for (slot, ip) in &changed {
            if let Err(e) = self.write(*slot, *ip) {
                tracing::warn!("learned-address gc: {e:#}");
            }
        }
        changed.len()
    }

    /// Forget everything identity `slot` learned, for its own and for its
    /// onTaint rules (policy removed or replaced by one whose names differ:
    /// the agent resolves again).
    pub fn forget_slot(&mut self, slot: u32) {
        self.epochs.advance(slot);
        let keys: Vec<(u32, IpAddr)> = self
            .entries
            .keys()
            .filter(|(s, _)| of_identity(*s, slot))
            .copied()
            .collect();
        for (s, ip) in keys {
            self.entries.remove(&(s, ip));
            let _ = self.delete(s, ip);
        }
    }

    /// The name an address was learned from by identity `slot`, for its own
    /// or its onTaint rules (the latest to expire).
    pub fn host_of(&self, slot: u32, ip: IpAddr) -> Option<String> {
        let now = monotonic_ns();
        let ip = canonical(ip);
        let base = slot & !TAINT_SLOT_BIT;
        [base, base | TAINT_SLOT_BIT]
            .iter()
            .filter_map(|s| self.entries.get(&(*s, ip)))
            .flat_map(|e| &e.names)
            .filter(|(_, n)| n.expires_ns > now)
            .max_by_key(|(_, n)| n.expires_ns)
            .map(|(h, _)| h.clone())
    }

    /// Live learned addresses of identity `slot` (own and onTaint keys).
    pub fn count(&self, slot: u32) -> usize {
        self.entries
            .keys()
            .filter(|(s, _)| of_identity(*s, slot))
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_is_skipped_only_when_the_kernel_entry_stands_for_it() {
        let slack = EXPIRY_SLACK.as_nanos() as u64;
        let mut set = RuleSet {
            count: 1,
            ..Default::default()
        };
        set.rules[0].port_lo = 443;
        set.rules[0].port_hi = 443;
        let merged = Learned {
            expires_ns: 10_000_000_000,
            set,
        };
        let at = |expires_ns| {
            Some(Learned {
                expires_ns,
                ..merged
            })
        };
        // Never written (or deleted, or a failed write): write.
        assert!(!covers(None, &merged));
        // Written with the slack a moment ago: the same answer again is
        // covered, up to the slack.
        assert!(covers(at(merged.expires_ns + slack), &merged));
        assert!(covers(at(merged.expires_ns), &merged));
        // The answer extends the expiry past what the kernel has: write.
        assert!(!covers(at(merged.expires_ns - 1), &merged));
        // The kernel holds a later expiry than the names now give (the
        // latest name expired, gc rewrites): lowered.
        assert!(!covers(at(merged.expires_ns + slack + 1), &merged));
        // Other rules: write.
        let mut other = merged;
        other.set.rules[0].port_hi = 444;
        assert!(!covers(at(merged.expires_ns), &other));
    }

    #[test]
    fn taint_keys_belong_to_their_identity() {
        assert!(of_identity(7, 7));
        assert!(of_identity(7 | TAINT_SLOT_BIT, 7));
        assert!(of_identity(7, 7 | TAINT_SLOT_BIT));
        assert!(!of_identity(8, 7));
        assert!(!of_identity(8 | TAINT_SLOT_BIT, 7));
        assert!(!of_identity(0, 7 | TAINT_SLOT_BIT));
    }
}
