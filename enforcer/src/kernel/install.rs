//! Policy generations in the tables: install (or atomically replace) an
//! identity's compiled tables under fresh table ids, flip `POLICIES[slot]`
//! to them, delete the old generation; remove a policy; the `FILE_BLOOM`
//! mirror.
use std::{collections::HashSet, os::unix::ffi::OsStrExt, path::Path};

use anyhow::{anyhow, bail, Context, Result};
use aya::maps::{lpm_trie::Key, HashMap, LpmTrie, MapData};
use enforcer_common::{
    bloom_bit, policy_flags, FileKey, NameKey, PolicyState, RuleSet, UnixRule, V4Key, V6Key,
    BLOOM_WORDS, MAX_SLOTS,
};
use ipnet::{Ipv4Net, Ipv6Net};

use super::{files, Installed, Kernel};
use crate::policy::{compile::NameEntry, CompiledPolicy};

impl Kernel {
    /// Install (or atomically replace) the compiled tables of identity
    /// `slot`: its CIDR entries, its onTaint CIDR entries (own table id) and
    /// its file rules (under the main table id), then one `POLICIES` update.
    pub fn install_policy(
        &mut self,
        slot: u32,
        compiled: &CompiledPolicy,
        files: &files::ResolvedFiles,
    ) -> Result<()> {
        if slot == 0 || slot >= MAX_SLOTS {
            bail!("identity slot {slot} out of range 1..{MAX_SLOTS}");
        }
        let table_id = self.fresh_table_id();
        let taint_table_id = if compiled.taint.is_some() {
            self.fresh_table_id()
        } else {
            0
        };
        let ingress_table_id = if compiled.ingress.v4.is_empty() && compiled.ingress.v6.is_empty() {
            0
        } else {
            self.fresh_table_id()
        };
        let mut new = Installed::default();
        let written = self.write_generation(
            [table_id, taint_table_id, ingress_table_id],
            compiled,
            files,
            &mut new,
        );
        if let Err(e) = written {
            self.delete_generation(&new);
            return Err(
                e.context("policy tables not installed; the previous policy stays in force")
            );
        }
        let flags = flags_of(compiled, files);
        let state = PolicyState {
            table_id,
            flags,
            dns_port: self.dns_ports.get(&slot).copied().unwrap_or(0),
            _pad: [0; 2],
            taint_table_id,
            ingress_table_id,
            _unused: 0,
        };
        if let Err(e) = self.policies.set(slot, state, 0) {
            self.delete_generation(&new);
            bail!("switching slot {slot} to its new tables: {e}");
        }
        // The slot's new tables are in force: no cached verdict of the
        // old ones answers from now on. (Should the bump fail, the install
        // goes on: the old generation is still deleted, and a way stamped
        // with the old generation dies with its epoch, within ~1 s.)
        if let Err(e) = self.bump_gen() {
            tracing::error!(slot, "{e:#}");
        }
        let files_changed = if compiled.files.is_empty() {
            self.file_slots.remove(&slot)
        } else {
            self.file_slots.insert(slot)
        };
        if files_changed {
            self.write_config()?;
        }
        let old = self.installed.insert(slot, new);
        match old {
            Some(old) => self.delete_generation(&old),
            None => self.delete_table_by_scan(table_id, taint_table_id, ingress_table_id),
        }
        self.bloom_rebuild();
        Ok(())
    }

    /// Write a new generation of `compiled`'s tables under fresh table ids
    /// (`[main, onTaint, ingress]`; 0: none), recording every key in `new`
    /// (deleted again by the caller should a write fail), and set the
    /// bloom bits of its file inodes. Stops at the first failure.
    fn write_generation(
        &mut self,
        [table_id, taint_table_id, ingress_table_id]: [u32; 3],
        compiled: &CompiledPolicy,
        files: &files::ResolvedFiles,
        new: &mut Installed,
    ) -> Result<()> {
        self.insert_cidrs(table_id, &compiled.v4, &compiled.v6, new)?;
        if ingress_table_id != 0 {
            self.insert_cidrs(
                ingress_table_id,
                &compiled.ingress.v4,
                &compiled.ingress.v6,
                new,
            )?;
        }
        if let Some(t) = &compiled.taint {
            self.insert_cidrs(taint_table_id, &t.v4, &t.v6, new)?;
        }
        self.insert_names(table_id, &compiled.names, new)?;
        if compiled.taint.is_some() {
            self.insert_names(taint_table_id, &compiled.taint_names, new)?;
        }
        for (inode, value) in &files.entries {
            let key = FileKey {
                ino: inode.ino,
                dev: inode.dev,
                table_id,
            };
            self.file_rules
                .insert(key, value, 0)
                .map_err(|e| anyhow!("inserting a file rule into FILE_RULES: {e}"))?;
            new.files.push(key);
        }
        let value_of = |rule_id| UnixRule { rule_id, _pad: 0 };
        for l in &compiled.local {
            let key = l.key(table_id);
            self.unix_rules
                .insert(key, value_of(l.rule_id), 0)
                .map_err(|e| anyhow!("inserting {} into UNIX_RULES: {e}", l.description))?;
            new.unix.push(key);
        }
        if self.unix_lsm {
            self.insert_unix_inodes(table_id, compiled, new)?;
            // Resolver sockets may have been (re)created since.
            self.write_resolver_inodes()?;
        }
        // The new inodes' bits before the flip: the hooks must see them.
        self.bloom_add(&new.files)
    }

    /// The BPF LSM hooks match paths by socket inode: a path that does not
    /// exist (yet) allows nothing there (said in the log).
    fn insert_unix_inodes(
        &mut self,
        table_id: u32,
        compiled: &CompiledPolicy,
        new: &mut Installed,
    ) -> Result<()> {
        for l in compiled
            .local
            .iter()
            .filter(|l| l.kind == enforcer_common::unix_kind::PATH)
        {
            let path = Path::new(std::ffi::OsStr::from_bytes(&l.name));
            let keys = self.socket_inodes(path, table_id);
            if keys.is_empty() {
                tracing::warn!(
                    "{}: not a socket now: nothing is allowed there until the policy is \
                     installed again",
                    l.description
                );
            }
            let value = UnixRule {
                rule_id: l.rule_id,
                _pad: 0,
            };
            for key in keys {
                self.unix_inodes
                    .insert(key, value, 0)
                    .map_err(|e| anyhow!("inserting {} into UNIX_INODES: {e}", l.description))?;
                new.unix_inodes.push(key);
            }
        }
        Ok(())
    }

    /// Set the `FILE_BLOOM` bits of `keys` (only words that change are written).
    fn bloom_add(&mut self, keys: &[FileKey]) -> Result<()> {
        let mut changed = HashSet::new();
        for k in keys {
            let bit = bloom_bit(k.ino, k.dev);
            let (w, m) = ((bit >> 6) as usize, 1u64 << (bit & 63));
            if self.bloom_words[w] & m == 0 {
                self.bloom_words[w] |= m;
                changed.insert(w);
            }
        }
        for w in changed {
            self.file_bloom
                .set(w as u32, self.bloom_words[w], 0)
                .context("writing FILE_BLOOM")?;
        }
        Ok(())
    }

    /// Recompute `FILE_BLOOM` from the installed file rules, clearing bits
    /// nothing needs any more. Skipped while some slot's rules were installed
    /// by a previous daemon and are not known here yet (their bits stay).
    fn bloom_rebuild(&mut self) {
        let unknown = (0..MAX_SLOTS).any(|s| {
            !self.installed.contains_key(&s)
                && self
                    .policies
                    .get(&s, 0)
                    .is_ok_and(|p| p.flags & policy_flags::FILES != 0)
        });
        if unknown {
            return;
        }
        let mut fresh = vec![0u64; BLOOM_WORDS as usize];
        for k in self.installed.values().flat_map(|g| g.files.iter()) {
            let bit = bloom_bit(k.ino, k.dev);
            fresh[(bit >> 6) as usize] |= 1u64 << (bit & 63);
        }
        for (w, v) in fresh.iter().enumerate() {
            if self.bloom_words[w] != *v {
                if let Err(e) = self.file_bloom.set(w as u32, *v, 0) {
                    tracing::warn!("clearing FILE_BLOOM: {e}");
                    return;
                }
                self.bloom_words[w] = *v;
            }
        }
    }

    fn fresh_table_id(&mut self) -> u32 {
        let id = self.next_table_id;
        self.next_table_id = self.next_table_id.wrapping_add(1).max(1);
        id
    }

    fn insert_cidrs(
        &mut self,
        table_id: u32,
        v4: &[(Ipv4Net, RuleSet)],
        v6: &[(Ipv6Net, RuleSet)],
        new: &mut Installed,
    ) -> Result<()> {
        let tid = table_id.to_be_bytes();
        insert_all(
            &mut self.v4,
            "EGRESS_V4",
            v4.iter().map(|(net, set)| {
                let data = V4Key {
                    table_id_be: tid,
                    addr: net.network().octets(),
                };
                (net.to_string(), net.prefix_len(), data, set)
            }),
            &mut new.v4,
        )?;
        insert_all(
            &mut self.v6,
            "EGRESS_V6",
            v6.iter().map(|(net, set)| {
                let data = V6Key {
                    table_id_be: tid,
                    addr: net.network().octets(),
                };
                (net.to_string(), net.prefix_len(), data, set)
            }),
            &mut new.v6,
        )
    }

    /// The host patterns of one generation into `NAMES` (first-bytes checks).
    fn insert_names(
        &mut self,
        table_id: u32,
        entries: &[NameEntry],
        new: &mut Installed,
    ) -> Result<()> {
        for e in entries {
            let mut data = NameKey {
                table_id_be: table_id.to_be_bytes(),
                ..NameKey::default()
            };
            data.name[..e.len].copy_from_slice(&e.key[..e.len]);
            let key = Key::new(32 + 8 * e.len as u32, data);
            self.names
                .insert(&key, e.set, 0)
                .with_context(|| format!("inserting host {} into NAMES", e.pattern))?;
            new.names.push(key);
        }
        Ok(())
    }

    /// Remove identity `slot`'s policy: its cgroups (if still bound) fail closed.
    pub fn remove_policy(&mut self, slot: u32) -> Result<()> {
        self.policies.set(slot, PolicyState::default(), 0)?;
        // The workload of this identity is over: a later one starts clean.
        let _ = self
            .taint
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear(slot);
        if let Err(e) = self.bump_gen() {
            tracing::error!(slot, "{e:#}");
        }
        self.dns_ports.remove(&slot);
        if self.file_slots.remove(&slot) {
            self.write_config()?;
        }
        if let Some(old) = self.installed.remove(&slot) {
            self.delete_generation(&old);
        }
        self.bloom_rebuild();
        Ok(())
    }

    fn delete_generation(&mut self, g: &Installed) {
        for k in &g.v4 {
            let _ = self.v4.remove(k);
        }
        for k in &g.v6 {
            let _ = self.v6.remove(k);
        }
        for k in &g.files {
            let _ = self.file_rules.remove(k);
        }
        for k in &g.names {
            let _ = self.names.remove(k);
        }
        for k in &g.unix {
            let _ = self.unix_rules.remove(k);
        }
        for k in &g.unix_inodes {
            let _ = self.unix_inodes.remove(k);
        }
    }

    /// After a restart with pinned maps we do not know the keys of a slot's
    /// previous generations: remove every entry of a table id that no slot
    /// uses any more.
    fn delete_table_by_scan(&mut self, keep: u32, keep_taint: u32, keep_ingress: u32) {
        let live: HashSet<u32> = (0..MAX_SLOTS)
            .filter_map(|s| self.policies.get(&s, 0).ok())
            .filter(|p| p.flags & policy_flags::PRESENT != 0)
            .flat_map(|p| [p.table_id, p.taint_table_id, p.ingress_table_id])
            .chain([keep, keep_taint, keep_ingress])
            .collect();
        let stale = |id: u32| !live.contains(&id);
        let stale_be = |id: [u8; 4]| stale(u32::from_be_bytes(id));
        remove_from_map(&mut self.file_rules, |k| stale(k.table_id));
        remove_from_trie(&mut self.v4, |k| stale_be(k.table_id_be));
        remove_from_trie(&mut self.v6, |k| stale_be(k.table_id_be));
        remove_from_trie(&mut self.names, |k| stale_be(k.table_id_be));
        // Table id 0 holds the resolver sockets, which no policy owns.
        remove_from_map(&mut self.unix_rules, |k| {
            k.table_id != 0 && stale(k.table_id)
        });
        remove_from_map(&mut self.unix_inodes, |k| {
            k.table_id != 0 && stale(k.table_id)
        });
    }
}

/// Remove every key of `map` that `stale` picks (keys collected first: a
/// hash map's iteration restarts when the key it stands on goes away).
fn remove_from_map<K: aya::Pod, V: aya::Pod>(
    map: &mut HashMap<MapData, K, V>,
    stale: impl Fn(&K) -> bool,
) {
    let keys: Vec<K> = map
        .keys()
        .filter_map(|k| k.ok())
        .filter(|k| stale(k))
        .collect();
    for k in keys {
        let _ = map.remove(&k);
    }
}

/// [`remove_from_map`] for a trie, judging each key by its data.
fn remove_from_trie<K: aya::Pod, V: aya::Pod>(
    trie: &mut LpmTrie<MapData, K, V>,
    stale: impl Fn(&K) -> bool,
) {
    let keys: Vec<Key<K>> = trie
        .keys()
        .filter_map(|k| k.ok())
        .filter(|k| stale(&k.data()))
        .collect();
    for k in keys {
        let _ = trie.remove(&k);
    }
}

/// Insert one generation's entries into a trie (key prefix = 32 bits of
/// table id + the CIDR length), recording each key for later deletion.
/// Stops at the first failure.
fn insert_all<'a, K: aya::Pod>(
    trie: &mut LpmTrie<MapData, K, RuleSet>,
    map_name: &str,
    entries: impl Iterator<Item = (String, u8, K, &'a RuleSet)>,
    keys: &mut Vec<Key<K>>,
) -> Result<()> {
    for (net, prefix_len, data, set) in entries {
        let key = Key::new(32 + u32::from(prefix_len), data);
        trie.insert(&key, set, 0)
            .map_err(|e| anyhow!("inserting {net} into {map_name}: {e}"))?;
        keys.push(key);
    }
    Ok(())
}

/// `POLICIES[slot].flags` for `compiled` installed with `files`.
fn flags_of(compiled: &CompiledPolicy, files: &files::ResolvedFiles) -> u32 {
    let mut flags = policy_flags::PRESENT;
    if compiled.audit {
        flags |= policy_flags::AUDIT;
    }
    if !compiled.files.is_empty() {
        flags |= policy_flags::FILES;
    }
    if files.dirs {
        flags |= policy_flags::FILE_DIRS;
    }
    if files.per_root {
        flags |= policy_flags::FILES_PER_ROOT;
    }
    if compiled.taint.is_some() {
        flags |= policy_flags::TAINT_CLAMP;
    }
    flags
}
