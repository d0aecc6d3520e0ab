//! A paged KV cache: keys and values of every sequence live in fixed-size blocks drawn
//! from one preallocated pool, so memory is bounded and accounted per block (as in
//! vLLM's PagedAttention), and a finished sequence returns its blocks at once. Full
//! blocks of prompts stay cached for later prompts with the same prefix
//! ([`crate::block_pool`]).

use crate::block_pool::BlockPool;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KvCacheError {
    #[error("KV cache full: {needed} more blocks needed, {free} free")]
    OutOfBlocks { needed: usize, free: usize },
}

/// One sequence's view of the pool: its block table and how many positions are filled.
#[derive(Debug, Default)]
pub struct SeqCache {
    blocks: Vec<u32>,
    len: usize,
}

impl SeqCache {
    pub fn new() -> Self {
        Self::default()
    }

    /// Positions already written (the next token's position).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn num_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// The cache blocks holding this sequence's positions, in order (its block table).
    pub fn blocks(&self) -> &[u32] {
        &self.blocks
    }
}

pub struct PagedKvCache {
    num_layers: usize,
    /// Values per position and layer: keys (GQA), or MLA's latent row.
    kv_dim: usize,
    /// Values per position and layer: values (GQA, as wide as keys), or 0 for MLA.
    value_dim: usize,
    block_size: usize,
    num_blocks: usize,
    /// Per layer, `num_blocks * block_size * kv_dim` values.
    keys: Vec<Vec<f32>>,
    values: Vec<Vec<f32>>,
    pool: BlockPool,
}

impl PagedKvCache {
    /// Keys and values of `kv_dim` values each per position and layer (GQA).
    pub fn new(num_layers: usize, kv_dim: usize, block_size: usize, num_blocks: usize) -> Self {
        Self::with_dims(num_layers, (kv_dim, kv_dim), block_size, num_blocks)
    }

    /// `dims`: (key, value) widths; MLA caches one latent row and no values.
    pub fn with_dims(
        num_layers: usize,
        dims: (usize, usize),
        block_size: usize,
        num_blocks: usize,
    ) -> Self {
        assert!(block_size > 0, "block_size must be positive");
        let (kv_dim, value_dim) = dims;
        let slots = num_blocks * block_size;
        PagedKvCache {
            num_layers,
            kv_dim,
            value_dim,
            block_size,
            num_blocks,
            keys: (0..num_layers).map(|_| vec![0.0; slots * kv_dim]).collect(),
            values: (0..num_layers)
                .map(|_| vec![0.0; slots * value_dim])
                .collect(),
            pool: BlockPool::new(num_blocks, true),
        }
    }

    /// A pool big enough for `bytes` of the model's cache across all layers.
    pub fn for_model(config: &crate::config::ModelConfig, block_size: usize, bytes: usize) -> Self {
        let per_block = Self::model_block_bytes(config, block_size);
        Self::with_dims(
            config.num_layers,
            config.kv_cache_dims(),
            block_size,
            (bytes / per_block.max(1)).max(1),
        )
    }

    /// Bytes of one block of a GQA cache with K and V of `kv_dim` each.
    pub fn block_bytes(num_layers: usize, kv_dim: usize, block_size: usize) -> usize {
        2 * num_layers * kv_dim * block_size * std::mem::size_of::<f32>()
    }

    /// Bytes of one block of `config`'s cache, all layers.
    pub fn model_block_bytes(config: &crate::config::ModelConfig, block_size: usize) -> usize {
        config.num_layers * config.kv_bytes_per_token_per_layer() * block_size
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    /// Blocks a sequence can take: free ones and cached ones no sequence uses.
    pub fn free_blocks(&self) -> usize {
        self.pool.available()
    }

    /// Blocks holding a cached prompt prefix (used by a sequence or not).
    pub fn cached_blocks(&self) -> usize {
        self.pool.cached_blocks()
    }

    /// Prefix caching on (the default) or off (cached blocks are dropped).
    pub fn set_prefix_caching(&mut self, on: bool) {
        self.pool.set_caching(on);
    }

    /// Gives `seq` (empty) the cached blocks of the longest cached prefix of `tokens`, in
    /// whole blocks and leaving at least one token to compute (its logits are needed);
    /// returns the positions they hold, which `seq` now has.
    pub fn reuse_prefix(&mut self, seq: &mut SeqCache, tokens: &[u32]) -> usize {
        debug_assert!(seq.blocks.is_empty() && seq.len == 0);
        let bs = self.block_size;
        let mut parent = 0;
        for block in tokens[..tokens.len().saturating_sub(1)].chunks_exact(bs) {
            match self.pool.reuse(parent, block) {
                Some((b, key)) => {
                    seq.blocks.push(b);
                    parent = key;
                }
                None => break,
            }
        }
        seq.len = seq.blocks.len() * bs;
        seq.len
    }

    /// Caches the full blocks `seq` has written, which hold `tokens` from position 0.
    pub fn remember_prefix(&mut self, seq: &SeqCache, tokens: &[u32]) {
        let bs = self.block_size;
        let written = seq.len.min(tokens.len());
        let mut parent = 0;
        for (block, &b) in tokens[..written].chunks_exact(bs).zip(&seq.blocks) {
            parent = self.pool.remember(b, parent, block);
        }
    }

    /// Blocks a sequence of `len` positions occupies.
    pub fn blocks_for(&self, len: usize) -> usize {
        len.div_ceil(self.block_size)
    }

    /// Makes room for `extra` more positions in `seq`, all or nothing.
    pub fn reserve(&mut self, seq: &mut SeqCache, extra: usize) -> Result<(), KvCacheError> {
        let needed = self
            .blocks_for(seq.len + extra)
            .saturating_sub(seq.blocks.len());
        if needed > self.pool.available() {
            return Err(KvCacheError::OutOfBlocks {
                needed,
                free: self.pool.available(),
            });
        }
        for _ in 0..needed {
            if let Some(b) = self.pool.take() {
                seq.blocks.push(b);
            }
        }
        Ok(())
    }

    /// Returns every block of `seq` to the pool.
    pub fn release(&mut self, seq: &mut SeqCache) {
        for b in seq.blocks.drain(..) {
            self.pool.put(b);
        }
        seq.len = 0;
    }

    /// Marks `n` more positions of `seq` as written (after every layer has written them).
    pub fn advance(&self, seq: &mut SeqCache, n: usize) {
        debug_assert!(seq.len + n <= seq.blocks.len() * self.block_size);
        seq.len += n;
    }

    /// The slot index (in positions) of `pos` of `seq`.
    fn slot(&self, seq: &SeqCache, pos: usize) -> usize {
        let block = seq.blocks[pos / self.block_size] as usize;
        block * self.block_size + pos % self.block_size
    }

    /// Writes one position's key and value rows for `layer` (`v` empty for MLA).
    pub fn write(&mut self, layer: usize, seq: &SeqCache, pos: usize, k: &[f32], v: &[f32]) {
        let at = self.slot(seq, pos);
        let (d, dv) = (self.kv_dim, self.value_dim);
        self.keys[layer][at * d..(at + 1) * d].copy_from_slice(k);
        self.values[layer][at * dv..(at + 1) * dv].copy_from_slice(v);
    }

    /// Copies positions `0..len` of `seq` for `layer` into contiguous `[len, kv_dim]` and
    /// `[len, value_dim]` buffers, block by block.
    pub fn gather(&self, layer: usize, seq: &SeqCache, len: usize, k: &mut [f32], v: &mut [f32]) {
        let (d, dv) = (self.kv_dim, self.value_dim);
        let mut pos = 0;
        while pos < len {
            let run = (self.block_size - pos % self.block_size).min(len - pos);
            let at = self.slot(seq, pos);
            k[pos * d..(pos + run) * d].copy_from_slice(&self.keys[layer][at * d..(at + run) * d]);
            v[pos * dv..(pos + run) * dv]
                .copy_from_slice(&self.values[layer][at * dv..(at + run) * dv]);
            pos += run;
        }
    }

    pub fn num_layers(&self) -> usize {
        self.num_layers
    }

    /// One layer's keys and values, `[blocks, block_size, kv_dim]` each: the layout the GPU
    /// attention kernel reads.
    pub fn layer(&self, layer: usize) -> (&[f32], &[f32]) {
        (&self.keys[layer], &self.values[layer])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_are_bounded_reused_and_all_or_nothing() {
        let mut kv = PagedKvCache::new(1, 2, 4, 3);
        let mut a = SeqCache::new();
        let mut b = SeqCache::new();
        kv.reserve(&mut a, 5).unwrap(); // 2 blocks
        assert_eq!(kv.free_blocks(), 1);
        // b needs 2 blocks, only 1 free: nothing is taken.
        assert_eq!(
            kv.reserve(&mut b, 8),
            Err(KvCacheError::OutOfBlocks { needed: 2, free: 1 })
        );
        assert_eq!(kv.free_blocks(), 1);
        assert_eq!(b.num_blocks(), 0);
        kv.release(&mut a);
        assert_eq!(kv.free_blocks(), 3);
        kv.reserve(&mut b, 8).unwrap();
        assert_eq!(kv.free_blocks(), 1);
    }

    #[test]
    fn a_prompt_reuses_the_cached_blocks_of_its_prefix_and_computes_the_rest() {
        let mut kv = PagedKvCache::new(1, 1, 2, 8);
        let prompt = [5, 6, 7, 8, 9];
        let mut a = SeqCache::new();
        assert_eq!(kv.reuse_prefix(&mut a, &prompt), 0, "nothing cached yet");
        kv.reserve(&mut a, prompt.len()).unwrap();
        for (p, &t) in prompt.iter().enumerate() {
            kv.write(0, &a, p, &[t as f32], &[0.0]);
        }
        kv.advance(&mut a, prompt.len());
        kv.remember_prefix(&a, &prompt);
        assert_eq!(
            kv.cached_blocks(),
            2,
            "two full blocks; the fifth token's is not"
        );
        // The same prompt: both full blocks, the fifth token left to compute.
        let mut b = SeqCache::new();
        assert_eq!(kv.reuse_prefix(&mut b, &prompt), 4);
        assert_eq!(b.blocks(), &a.blocks()[..2]);
        let mut k = [0.0; 4];
        kv.gather(0, &b, 4, &mut k, &mut [0.0; 4]);
        assert_eq!(k, [5.0, 6.0, 7.0, 8.0]);
        // A prompt of exactly two blocks keeps its last block to compute.
        let mut c = SeqCache::new();
        assert_eq!(kv.reuse_prefix(&mut c, &prompt[..4]), 2);
        // Another second block: only the first is shared.
        let mut d = SeqCache::new();
        assert_eq!(kv.reuse_prefix(&mut d, &[5, 6, 1, 1, 1]), 2);
        // Shared blocks are freed only by their last user; cached ones stay available.
        for s in [&mut a, &mut b, &mut c, &mut d] {
            kv.release(s);
        }
        assert_eq!(kv.free_blocks(), 8);
        assert_eq!(kv.cached_blocks(), 2);
        kv.set_prefix_caching(false);
        assert_eq!(kv.cached_blocks(), 0);
        assert_eq!(kv.reuse_prefix(&mut SeqCache::new(), &prompt), 0);
    }

    #[test]
    fn gather_reads_back_what_was_written_across_blocks() {
        let mut kv = PagedKvCache::new(2, 3, 2, 8);
        let mut other = SeqCache::new();
        let mut seq = SeqCache::new();
        // Interleave two sequences so seq's blocks are not contiguous.
        for step in 0..5 {
            for (s, tag) in [(&mut other, 100.0), (&mut seq, 0.0)] {
                kv.reserve(s, 1).unwrap();
                let p = s.len();
                let k = [tag + p as f32, 1.0, 2.0];
                let v = [-(tag + p as f32), 0.5, step as f32];
                kv.write(1, s, p, &k, &v);
                kv.advance(s, 1);
            }
        }
        let mut k = vec![0.0; 15];
        let mut v = vec![0.0; 15];
        kv.gather(1, &seq, 5, &mut k, &mut v);
        for p in 0..5 {
            assert_eq!(k[p * 3], p as f32);
            assert_eq!(v[p * 3], -(p as f32));
            assert_eq!(v[p * 3 + 2], p as f32);
        }
    }
}
