//! The KV cache's blocks: which are free, which sequences share which, and which hold a
//! prompt prefix worth keeping (prefix caching, as vLLM's automatic prefix caching).
//!
//! A full block of a prompt is keyed by a hash of its parent block's key and its own
//! token ids, so a prompt finds its longest cached prefix in one walk from the start.
//! Blocks are reference counted: sequences sharing a prefix share its blocks (they only
//! ever write past it). A cached block that no sequence uses stays cached, evicted least
//! recently used first, and only when a block is needed and none is free.

use std::collections::{BTreeMap, HashMap};
use std::hash::{DefaultHasher, Hash, Hasher};

/// The key of a full block: its parent's key (0 for the first block) and its tokens.
pub fn block_key(parent: u64, tokens: &[u32]) -> u64 {
    let mut h = DefaultHasher::new();
    parent.hash(&mut h);
    tokens.hash(&mut h);
    h.finish()
}

#[derive(Debug)]
pub struct BlockPool {
    /// Unused and holding nothing worth keeping.
    free: Vec<u32>,
    /// Sequences using each block.
    refs: Vec<u32>,
    /// A cached block's key and tokens (checked on a hit, so a hash collision can
    /// never hand out another prompt's keys and values).
    cached: Vec<Option<(u64, Box<[u32]>)>>,
    by_key: HashMap<u64, u32>,
    /// Cached blocks no sequence uses, by when they were last used: evicted first-in.
    idle: BTreeMap<u64, u32>,
    idle_since: Vec<u64>,
    clock: u64,
    /// Off: no block is ever cached (`--no-prefix-caching`).
    caching: bool,
}

impl BlockPool {
    pub fn new(num_blocks: usize, caching: bool) -> Self {
        BlockPool {
            // Popped from the back: low block ids first.
            free: (0..num_blocks as u32).rev().collect(),
            refs: vec![0; num_blocks],
            cached: vec![None; num_blocks],
            by_key: HashMap::new(),
            idle: BTreeMap::new(),
            idle_since: vec![0; num_blocks],
            clock: 0,
            caching,
        }
    }

    pub fn set_caching(&mut self, on: bool) {
        self.caching = on;
        if !on {
            let idle: Vec<u32> = self.idle.values().copied().collect();
            self.idle.clear();
            for b in idle {
                self.forget(b);
                self.free.push(b);
            }
        }
    }

    /// Blocks a sequence can take now: free ones and cached ones nobody uses.
    pub fn available(&self) -> usize {
        self.free.len() + self.idle.len()
    }

    /// Cached blocks (in use or idle).
    pub fn cached_blocks(&self) -> usize {
        self.by_key.len()
    }

    /// A block for a new sequence position, evicting the least recently used idle
    /// cached block when none is free.
    pub fn take(&mut self) -> Option<u32> {
        let b = match self.free.pop() {
            Some(b) => b,
            None => {
                let (&since, &b) = self.idle.iter().next()?;
                self.idle.remove(&since);
                self.forget(b);
                b
            }
        };
        self.refs[b as usize] = 1;
        Some(b)
    }

    /// A sequence stops using `b`.
    pub fn put(&mut self, b: u32) {
        let r = &mut self.refs[b as usize];
        *r = r.saturating_sub(1);
        if *r > 0 {
            return;
        }
        if self.cached[b as usize].is_some() {
            self.clock += 1;
            self.idle_since[b as usize] = self.clock;
            self.idle.insert(self.clock, b);
        } else {
            self.free.push(b);
        }
    }

    /// The cached block holding `tokens` after the block keyed `parent`, taken for one
    /// more sequence.
    pub fn reuse(&mut self, parent: u64, tokens: &[u32]) -> Option<(u32, u64)> {
        let key = block_key(parent, tokens);
        let b = *self.by_key.get(&key)?;
        if self.cached[b as usize].as_ref().map(|(_, t)| &t[..]) != Some(tokens) {
            return None;
        }
        if self.refs[b as usize] == 0 {
            self.idle.remove(&self.idle_since[b as usize]);
        }
        self.refs[b as usize] += 1;
        Some((b, key))
    }

    /// Records that `b`, in use, holds `tokens` after the block keyed `parent`; returns
    /// its key. A block already cached, or content another block holds, is left alone.
    pub fn remember(&mut self, b: u32, parent: u64, tokens: &[u32]) -> u64 {
        let key = block_key(parent, tokens);
        if self.caching && self.cached[b as usize].is_none() && !self.by_key.contains_key(&key) {
            self.cached[b as usize] = Some((key, tokens.into()));
            self.by_key.insert(key, b);
        }
        key
    }

    fn forget(&mut self, b: u32) {
        if let Some((key, _)) = self.cached[b as usize].take() {
            self.by_key.remove(&key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cached_blocks_are_kept_shared_and_evicted_oldest_first() {
        let mut p = BlockPool::new(3, true);
        let a = p.take().unwrap();
        let b = p.take().unwrap();
        let ka = p.remember(a, 0, &[1, 2]);
        p.remember(b, ka, &[3, 4]);
        assert_eq!(p.cached_blocks(), 2);
        p.put(a);
        p.put(b);
        // Both idle and cached, still available to take.
        assert_eq!(p.available(), 3);
        // A prompt with the same prefix finds both, in order.
        let (a2, ka2) = p.reuse(0, &[1, 2]).unwrap();
        assert_eq!((a2, ka2), (a, ka));
        assert!(p.reuse(ka, &[3, 5]).is_none(), "other tokens, no hit");
        assert_eq!(p.available(), 2);
        p.put(a2);
        // Free blocks go first, then the idle cached one used longest ago (b).
        let c = p.take().unwrap();
        assert!(c != a && c != b);
        let d = p.take().unwrap();
        assert_eq!(d, b);
        assert!(p.reuse(ka, &[3, 4]).is_none(), "b was evicted");
        assert!(p.reuse(0, &[1, 2]).is_some(), "a still cached");
        assert_eq!(p.take(), None);
    }

    #[test]
    fn without_caching_nothing_is_kept() {
        let mut p = BlockPool::new(2, false);
        let a = p.take().unwrap();
        p.remember(a, 0, &[1]);
        p.put(a);
        assert!(p.reuse(0, &[1]).is_none());
        assert_eq!(p.available(), 2);
    }
}
