//! Objects of one kind by UID, as a kube runtime watcher reports them
//! (`PodCache`, `PolicyCache`).
//!
//! Applied and deleted one by one while watching; replaced wholesale at the
//! end of each (re)list (`Init` .. `InitApply`* .. `InitDone`), so an object
//! deleted while the watch was down disappears too.
use std::collections::BTreeMap;

use kube::{runtime::watcher, Resource};

#[derive(Debug)]
pub struct UidCache<T> {
    items: BTreeMap<String, T>,
    /// Objects seen since the last `Init` of a relist.
    relist: Option<BTreeMap<String, T>>,
    /// A complete list arrived at least once.
    synced: bool,
}

impl<T> Default for UidCache<T> {
    fn default() -> Self {
        Self {
            items: BTreeMap::new(),
            relist: None,
            synced: false,
        }
    }
}

impl<T> UidCache<T> {
    /// Apply one watcher event. `entry`: the part of an object kept, with
    /// its UID (`None`: the object is skipped). `same`: whether two versions
    /// are the same to the cache's users. True when the content changed.
    pub fn apply<K: Resource>(
        &mut self,
        ev: watcher::Event<K>,
        entry: impl Fn(&K) -> Option<(String, T)>,
        same: impl Fn(&T, &T) -> bool,
    ) -> bool {
        match ev {
            watcher::Event::Apply(o) => match entry(&o) {
                Some((uid, e)) => {
                    let changed = self.items.get(&uid).is_none_or(|old| !same(old, &e));
                    self.items.insert(uid, e);
                    changed
                }
                None => false,
            },
            watcher::Event::Delete(o) => o
                .meta()
                .uid
                .as_ref()
                .is_some_and(|u| self.items.remove(u).is_some()),
            watcher::Event::Init => {
                self.relist = Some(BTreeMap::new());
                false
            }
            watcher::Event::InitApply(o) => {
                if let (Some(r), Some((uid, e))) = (self.relist.as_mut(), entry(&o)) {
                    r.insert(uid, e);
                }
                false
            }
            watcher::Event::InitDone => match self.relist.take() {
                Some(all) => {
                    self.synced = true;
                    let changed = all.len() != self.items.len()
                        || all
                            .iter()
                            .any(|(uid, e)| self.items.get(uid).is_none_or(|old| !same(old, e)));
                    self.items = all;
                    changed
                }
                None => false,
            },
        }
    }

    /// Whether a complete list arrived at least once.
    pub fn synced(&self) -> bool {
        self.synced
    }

    pub fn get(&self, uid: &str) -> Option<&T> {
        self.items.get(uid)
    }

    pub fn values(&self) -> impl Iterator<Item = &T> {
        self.items.values()
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }
}
