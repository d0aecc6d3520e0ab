//! The dense part of a Mixtral model on the GPU: the same forward pass as
//! [`crate::Mixtral::forward`] over a batch of sequence chunks, with the dense weights in
//! bf16 on the device and the activations kept there between ops. The experts stay behind
//! [`Experts`]: once per layer the post-attention-normalised states and the routing come
//! back to the host for that call (what the remote expert path needs anyway) and the
//! result goes back up; that is the only host synchronisation inside a layer.
//!
//! Where bf16 rounding enters (everything else is f32, as on the CPU):
//! - the weights (exact for a bf16 checkpoint; rounded once at load for an f32 one),
//!   including the RMSNorm weights and the embedding table;
//! - the input of every matrix product: the normalised states before Q/K/V and before the
//!   router, the attention output before O, the final-normed rows before the LM head.
//!   cuBLAS multiplies bf16 by bf16 with f32 accumulation and writes f32.
//!
//! The experts receive the f32 normalised states, as from the CPU forward. The KV cache is
//! f32 in the engine's paged layout, so the attention kernel is the one `dense.cu` already
//! checks against the CPU.

use std::ops::Range;
use std::path::Path;
use std::sync::{Arc, Mutex};

use cudarc::cublas::CudaBlas;
use cudarc::cublas::sys::{
    cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType_t,
};
use cudarc::driver::{
    CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DeviceRepr, PushKernelArg, ValidAsZeroBits,
};

use super::dense::{grid, to_i32};
use super::experts::bf16_bits;
use super::{CudaBackend, CudaError, DenseKernels};
use crate::checkpoint::{Checkpoint, WeightError};
use crate::config::ModelConfig;
use crate::experts::{ExpertError, Experts, moe_prefix};
use crate::kv_cache::{KvCacheError, PagedKvCache, SeqCache};
use crate::model::{ForwardOutput, LogitsFor, ModelError, SeqChunk, admit, spans};
use crate::ops::Rope;
use crate::router::Routing;

#[derive(Debug, thiserror::Error)]
pub enum CudaModelError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Cuda(#[from] CudaError),
    #[error(transparent)]
    Weights(#[from] WeightError),
    #[error("KV cache shape {got} does not fit the model ({want})")]
    CacheMismatch { got: String, want: String },
}

impl From<cudarc::driver::DriverError> for CudaModelError {
    fn from(e: cudarc::driver::DriverError) -> Self {
        CudaModelError::Cuda(e.into())
    }
}

/// What callers that run either dense path see: the CUDA-only cases become
/// [`ModelError::Device`].
impl From<CudaModelError> for ModelError {
    fn from(e: CudaModelError) -> Self {
        match e {
            CudaModelError::Model(m) => m,
            CudaModelError::Cuda(c) => ModelError::Device(c),
            CudaModelError::Weights(w) => ModelError::Weights(w),
            mismatch @ CudaModelError::CacheMismatch { .. } => {
                ModelError::Device(CudaError::Shape(mismatch.to_string()))
            }
        }
    }
}

impl From<ExpertError> for CudaModelError {
    fn from(e: ExpertError) -> Self {
        CudaModelError::Model(e.into())
    }
}

/// One chunk of a step as the planner sees it: its tokens, its sequence's block table
/// (already reserved for `start + tokens.len()` positions) and its first position.
#[derive(Debug, Clone, Copy)]
pub struct PlanChunk<'a> {
    pub tokens: &'a [u32],
    pub blocks: &'a [u32],
    pub start: usize,
}

/// Where every token of a step goes, planned on the host from the block tables and
/// uploaded in one copy. Prefill chunks run through the decode attention kernel one query
/// per row: each token gets its own "sequence" whose length is its position + 1 and whose
/// block table is its sequence's, which is causal attention.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepPlan {
    /// Token ids in batch order.
    pub ids: Vec<i32>,
    /// Each token's position in its sequence.
    pub positions: Vec<i32>,
    /// Each token's row in a layer's cache (`block * block_size + position % block_size`).
    pub slots: Vec<i32>,
    /// Keys each token sees (position + 1).
    pub lens: Vec<i32>,
    /// Batch rows whose logits are returned.
    pub out_rows: Vec<i32>,
    /// `[tokens, max_blocks]`: each token's sequence's block table, zero padded.
    pub tables: Vec<i32>,
    pub max_blocks: usize,
    pub max_len: usize,
}

impl StepPlan {
    pub fn build(
        chunks: &[PlanChunk<'_>],
        block_size: usize,
        logits_for: &LogitsFor,
    ) -> Result<Self, CudaError> {
        if block_size == 0 {
            return Err(CudaError::Shape("block size 0".into()));
        }
        let tokens: usize = chunks.iter().map(|c| c.tokens.len()).sum();
        let max_blocks = chunks
            .iter()
            .map(|c| c.blocks.len())
            .max()
            .unwrap_or(0)
            .max(1);
        let mut p = StepPlan {
            ids: Vec::with_capacity(tokens),
            positions: Vec::with_capacity(tokens),
            slots: Vec::with_capacity(tokens),
            lens: Vec::with_capacity(tokens),
            out_rows: Vec::new(),
            tables: Vec::with_capacity(tokens * max_blocks),
            max_blocks,
            max_len: 1,
        };
        for (ci, c) in chunks.iter().enumerate() {
            let end = c.start + c.tokens.len();
            if end.div_ceil(block_size) > c.blocks.len() {
                return Err(CudaError::Shape(format!(
                    "chunk {ci}: {end} positions but {} blocks of {block_size}",
                    c.blocks.len()
                )));
            }
            let mut table: Vec<i32> = c
                .blocks
                .iter()
                .map(|b| to_i32(*b as usize, "block"))
                .collect::<Result<_, _>>()?;
            table.resize(max_blocks, 0);
            for (i, &t) in c.tokens.iter().enumerate() {
                let pos = c.start + i;
                let block = c.blocks[pos / block_size] as usize;
                p.ids.push(to_i32(t as usize, "token id")?);
                p.positions.push(to_i32(pos, "position")?);
                p.slots
                    .push(to_i32(block * block_size + pos % block_size, "cache slot")?);
                p.lens.push(to_i32(pos + 1, "length")?);
                p.tables.extend_from_slice(&table);
                p.max_len = p.max_len.max(pos + 1);
            }
        }
        let lens: Vec<usize> = chunks.iter().map(|c| c.tokens.len()).collect();
        for r in logits_for.rows(&lens) {
            p.out_rows.push(to_i32(r, "row")?);
        }
        Ok(p)
    }

    pub fn tokens(&self) -> usize {
        self.ids.len()
    }

    /// Ranges of ids, positions, slots, lens, out_rows and tables in [`Self::pack_into`].
    pub fn ranges(&self) -> [Range<usize>; 6] {
        let mut at = 0;
        [
            self.ids.len(),
            self.positions.len(),
            self.slots.len(),
            self.lens.len(),
            self.out_rows.len(),
            self.tables.len(),
        ]
        .map(|n| {
            at += n;
            at - n..at
        })
    }

    /// Everything in one buffer, for one host-to-device copy.
    pub fn pack_into(&self, out: &mut Vec<i32>) {
        out.clear();
        for part in [
            &self.ids,
            &self.positions,
            &self.slots,
            &self.lens,
            &self.out_rows,
            &self.tables,
        ] {
            out.extend_from_slice(part);
        }
    }
}

/// The KV cache of a [`CudaModel`]: f32 keys and values per layer on the device, in the
/// engine's paged layout `[blocks, block_size, kv_dim]`, and the block bookkeeping of a
/// [`PagedKvCache`] without layers (so the host holds no copy of the data). Sequences are
/// the engine's own [`SeqCache`]s.
pub struct CudaKvCache {
    book: PagedKvCache,
    layers: usize,
    kv_dim: usize,
    keys: Vec<CudaSlice<f32>>,
    values: Vec<CudaSlice<f32>>,
}

impl CudaKvCache {
    pub fn new(
        backend: &CudaBackend,
        layers: usize,
        kv_dim: usize,
        block_size: usize,
        num_blocks: usize,
    ) -> Result<Self, CudaError> {
        if block_size == 0 || num_blocks == 0 || kv_dim == 0 {
            return Err(CudaError::Shape(format!(
                "KV cache of {num_blocks} blocks of {block_size} x {kv_dim}"
            )));
        }
        let per_layer = num_blocks * block_size * kv_dim;
        let s = &backend.stream;
        let mut keys = Vec::with_capacity(layers);
        let mut values = Vec::with_capacity(layers);
        for _ in 0..layers {
            keys.push(s.alloc_zeros::<f32>(per_layer)?);
            values.push(s.alloc_zeros::<f32>(per_layer)?);
        }
        Ok(CudaKvCache {
            book: PagedKvCache::new(0, kv_dim, block_size, num_blocks),
            layers,
            kv_dim,
            keys,
            values,
        })
    }

    pub fn block_size(&self) -> usize {
        self.book.block_size()
    }

    pub fn num_blocks(&self) -> usize {
        self.book.num_blocks()
    }

    pub fn free_blocks(&self) -> usize {
        self.book.free_blocks()
    }

    /// Blocks a sequence of `len` positions occupies.
    pub fn blocks_for(&self, len: usize) -> usize {
        self.book.blocks_for(len)
    }

    /// Makes room for `extra` more positions in `seq`, all or nothing.
    pub fn reserve(&mut self, seq: &mut SeqCache, extra: usize) -> Result<(), KvCacheError> {
        self.book.reserve(seq, extra)
    }

    /// Returns every block of `seq` to the pool.
    pub fn release(&mut self, seq: &mut SeqCache) {
        self.book.release(seq);
    }

    /// Which block holds what, prefix caching included: the host-side bookkeeping of
    /// the device's blocks.
    pub fn book_mut(&mut self) -> &mut PagedKvCache {
        &mut self.book
    }

    pub fn cached_blocks(&self) -> usize {
        self.book.cached_blocks()
    }
}

struct LayerWeights {
    input_norm: CudaSlice<u16>,
    q: CudaSlice<u16>,
    k: CudaSlice<u16>,
    v: CudaSlice<u16>,
    o: CudaSlice<u16>,
    post_norm: CudaSlice<u16>,
    router: CudaSlice<u16>,
}

/// Device buffers grown to the largest step seen; never shrunk, so a steady decode loop
/// allocates nothing.
struct Workspace {
    plan: CudaSlice<i32>,
    x: CudaSlice<f32>,
    normed: CudaSlice<f32>,
    /// bf16 input of the next matrix product, `[tokens, max(hidden, q_dim)]`.
    xb: CudaSlice<u16>,
    q: CudaSlice<f32>,
    k: CudaSlice<f32>,
    v: CudaSlice<f32>,
    attn: CudaSlice<f32>,
    scores: CudaSlice<f32>,
    router_logits: CudaSlice<f32>,
    probs: CudaSlice<f32>,
    top: CudaSlice<i32>,
    weights: CudaSlice<f32>,
    moe: CudaSlice<f32>,
    picked: CudaSlice<f32>,
    final_normed: CudaSlice<f32>,
    logits: CudaSlice<f32>,
    host_plan: Vec<i32>,
    host_x: Vec<f32>,
    host_top: Vec<i32>,
    host_w: Vec<f32>,
}

fn grow<T: DeviceRepr + ValidAsZeroBits>(
    s: &Arc<CudaStream>,
    buf: &mut CudaSlice<T>,
    n: usize,
) -> Result<(), CudaError> {
    if buf.len() < n {
        *buf = s.alloc_zeros::<T>(n)?;
    }
    Ok(())
}

impl Workspace {
    fn new(s: &Arc<CudaStream>) -> Result<Self, CudaError> {
        Ok(Workspace {
            plan: s.alloc_zeros(1)?,
            x: s.alloc_zeros(1)?,
            normed: s.alloc_zeros(1)?,
            xb: s.alloc_zeros(1)?,
            q: s.alloc_zeros(1)?,
            k: s.alloc_zeros(1)?,
            v: s.alloc_zeros(1)?,
            attn: s.alloc_zeros(1)?,
            scores: s.alloc_zeros(1)?,
            router_logits: s.alloc_zeros(1)?,
            probs: s.alloc_zeros(1)?,
            top: s.alloc_zeros(1)?,
            weights: s.alloc_zeros(1)?,
            moe: s.alloc_zeros(1)?,
            picked: s.alloc_zeros(1)?,
            final_normed: s.alloc_zeros(1)?,
            logits: s.alloc_zeros(1)?,
            host_plan: Vec::new(),
            host_x: Vec::new(),
            host_top: Vec::new(),
            host_w: Vec::new(),
        })
    }

    fn ensure(
        &mut self,
        s: &Arc<CudaStream>,
        c: &ModelConfig,
        p: &StepPlan,
    ) -> Result<(), CudaError> {
        let (t, r) = (p.tokens(), p.out_rows.len());
        let (h, qd, kvd) = (c.hidden_size, c.q_dim(), c.kv_dim());
        let e = c.num_experts;
        let k = c.experts_per_token;
        grow(s, &mut self.plan, p.ranges()[5].end)?;
        grow(s, &mut self.x, t * h)?;
        grow(s, &mut self.normed, t * h)?;
        grow(s, &mut self.xb, t * h.max(qd))?;
        grow(s, &mut self.q, t * qd)?;
        grow(s, &mut self.k, t * kvd)?;
        grow(s, &mut self.v, t * kvd)?;
        grow(s, &mut self.attn, t * qd)?;
        grow(s, &mut self.scores, t * c.num_heads * p.max_len)?;
        grow(s, &mut self.router_logits, t * e)?;
        grow(s, &mut self.probs, t * e)?;
        grow(s, &mut self.top, t * k)?;
        grow(s, &mut self.weights, t * k)?;
        grow(s, &mut self.moe, t * h)?;
        grow(s, &mut self.picked, r * h)?;
        grow(s, &mut self.final_normed, r * h)?;
        grow(s, &mut self.logits, r * c.vocab_size)?;
        Ok(())
    }
}

/// Everything of a Mixtral model except the experts, on one CUDA device.
pub struct CudaModel {
    backend: Arc<CudaBackend>,
    kernels: DenseKernels,
    blas: CudaBlas,
    config: ModelConfig,
    rope: Rope,
    cos: CudaSlice<f32>,
    sin: CudaSlice<f32>,
    embed: CudaSlice<u16>,
    layers: Vec<LayerWeights>,
    norm: CudaSlice<u16>,
    /// `None` when the LM head is tied to the embeddings.
    lm_head: Option<CudaSlice<u16>>,
    ws: Mutex<Workspace>,
}

/// Elementwise launches: enough blocks to fill the device, grid-stride beyond that.
fn flat_grid(n: usize) -> Result<cudarc::driver::LaunchConfig, CudaError> {
    grid(n.div_ceil(256).clamp(1, 65_535), 1, 256)
}

impl CudaModel {
    /// Loads the dense weights of the checkpoint in `dir` onto the backend's device.
    pub fn load(backend: Arc<CudaBackend>, dir: &Path) -> Result<Self, CudaModelError> {
        let config = ModelConfig::from_dir(dir).map_err(ModelError::from)?;
        let ckpt = Checkpoint::open_quantized(dir, config.quantization)?;
        Self::from_checkpoint(backend, config, &ckpt)
    }

    /// Whether this device path runs `config`'s dense layers. Its layer sequence is
    /// Mixtral's; other families' dense parts (MLA, q/k norms, shared experts, dense
    /// layers, YaRN) run on the CPU for now, while their routed experts run on CUDA expert
    /// nodes unchanged (the expert FFN is the same SwiGLU in every family).
    pub fn supports(config: &ModelConfig) -> Result<(), CudaError> {
        if config.family != crate::family::Family::Mixtral
            || config.rope.scaling != crate::config::RopeScaling::None
        {
            return Err(CudaError::Unsupported(format!(
                "the CUDA dense path runs mixtral only, not {}: run this model's coordinator with --device cpu (its expert nodes may use --device cuda)",
                config.model_type
            )));
        }
        Ok(())
    }

    pub fn from_checkpoint(
        backend: Arc<CudaBackend>,
        config: ModelConfig,
        ckpt: &Checkpoint,
    ) -> Result<Self, CudaModelError> {
        Self::supports(&config)?;
        // SAFETY: only tries to dlopen the library by its usual names; CudaBlas::new would
        // panic without it.
        if !unsafe { cudarc::cublas::sys::is_culib_present() } {
            return Err(
                CudaError::Unsupported("cuBLAS (libcublas) could not be loaded".into()).into(),
            );
        }
        let kernels = DenseKernels::new(backend.clone())?;
        let blas = CudaBlas::new(backend.stream.clone())
            .map_err(|e| CudaError::Driver(format!("cuBLAS: {e:?}")))?;
        let s = backend.stream.clone();
        let c = &config;
        let (h, v) = (c.hidden_size, c.vocab_size);
        let up = |name: &str, shape: &[usize]| -> Result<CudaSlice<u16>, CudaModelError> {
            Ok(s.clone_htod(&bf16_bits(&ckpt.load(name, shape)?))?)
        };
        let embed = up("model.embed_tokens.weight", &[v, h])?;
        let mut layers = Vec::with_capacity(c.num_layers);
        for l in 0..c.num_layers {
            let p = format!("model.layers.{l}");
            let moe = moe_prefix(ckpt, l)?;
            layers.push(LayerWeights {
                input_norm: up(&format!("{p}.input_layernorm.weight"), &[h])?,
                q: up(&format!("{p}.self_attn.q_proj.weight"), &[c.q_dim(), h])?,
                k: up(&format!("{p}.self_attn.k_proj.weight"), &[c.kv_dim(), h])?,
                v: up(&format!("{p}.self_attn.v_proj.weight"), &[c.kv_dim(), h])?,
                o: up(&format!("{p}.self_attn.o_proj.weight"), &[h, c.q_dim()])?,
                post_norm: up(&format!("{p}.post_attention_layernorm.weight"), &[h])?,
                router: up(&format!("{moe}.gate.weight"), &[c.num_experts, h])?,
            });
        }
        let norm = up("model.norm.weight", &[h])?;
        let lm_head = if c.tie_word_embeddings && !ckpt.contains("lm_head.weight") {
            None
        } else {
            Some(up("lm_head.weight", &[v, h])?)
        };
        let rope = Rope::from_config(&c.rope, c.max_position_embeddings);
        let (cos, sin) = rope.tables();
        let (cos, sin) = (s.clone_htod(cos)?, s.clone_htod(sin)?);
        let ws = Workspace::new(&s)?;
        s.synchronize()?;
        Ok(CudaModel {
            backend,
            kernels,
            blas,
            config,
            rope,
            cos,
            sin,
            embed,
            layers,
            norm,
            lm_head,
            ws: Mutex::new(ws),
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    pub fn backend(&self) -> &Arc<CudaBackend> {
        &self.backend
    }

    /// A device KV cache for this model holding `bytes` of keys and values (the same
    /// accounting as [`crate::Mixtral::new_kv_cache`]: f32, all layers).
    pub fn new_kv_cache(&self, block_size: usize, bytes: usize) -> Result<CudaKvCache, CudaError> {
        let c = &self.config;
        let per_block = PagedKvCache::block_bytes(c.num_layers, c.kv_dim(), block_size.max(1));
        CudaKvCache::new(
            &self.backend,
            c.num_layers,
            c.kv_dim(),
            block_size,
            (bytes / per_block.max(1)).max(1),
        )
    }

    /// [`crate::Mixtral::forward`] on the device: runs every chunk of `batch` as one batch
    /// of tokens, writes their keys and values into `kv`, and returns logits (and, if
    /// `trace_routing`, each layer's routing).
    pub fn forward(
        &self,
        kv: &mut CudaKvCache,
        experts: &dyn Experts,
        batch: &mut [SeqChunk<'_>],
        logits_for: LogitsFor,
        trace_routing: bool,
    ) -> Result<ForwardOutput, CudaModelError> {
        let c = &self.config;
        if kv.layers != c.num_layers || kv.kv_dim != c.kv_dim() {
            return Err(CudaModelError::CacheMismatch {
                got: format!("{} layers x {}", kv.layers, kv.kv_dim),
                want: format!("{} layers x {}", c.num_layers, c.kv_dim()),
            });
        }
        admit(c, self.rope.max_positions(), &mut kv.book, batch)?;
        let spans = spans(batch);
        let chunks: Vec<PlanChunk> = batch
            .iter()
            .map(|b| PlanChunk {
                tokens: b.tokens,
                blocks: b.cache.blocks(),
                start: b.cache.len(),
            })
            .collect();
        let plan = StepPlan::build(&chunks, kv.block_size(), &logits_for)?;
        let mut guard = self
            .ws
            .lock()
            .map_err(|_| CudaError::Driver("CUDA model workspace lock poisoned".into()))?;
        let ws = &mut *guard;
        let (logits, routing) = self.run(kv, experts, &plan, ws, trace_routing)?;
        for (chunk, span) in batch.iter_mut().zip(&spans) {
            kv.book.advance(chunk.cache, span.len);
        }
        Ok(ForwardOutput {
            logits,
            rows: plan.out_rows.len(),
            routing,
        })
    }

    /// The launch sequence of one step; the caller has admitted the batch.
    fn run(
        &self,
        kv: &mut CudaKvCache,
        experts: &dyn Experts,
        plan: &StepPlan,
        ws: &mut Workspace,
        trace_routing: bool,
    ) -> Result<(Vec<f32>, Option<Vec<Routing>>), CudaModelError> {
        let c = &self.config;
        let (h, qd, kvd, vocab) = (c.hidden_size, c.q_dim(), c.kv_dim(), c.vocab_size);
        let (e, topk) = (c.num_experts, c.experts_per_token);
        let t = plan.tokens();
        let rows = plan.out_rows.len();
        let mut trace = trace_routing.then(|| Vec::with_capacity(self.layers.len()));
        if t == 0 {
            if let Some(tr) = trace.as_mut() {
                tr.resize(
                    self.layers.len(),
                    Routing {
                        k: topk,
                        ..Routing::default()
                    },
                );
            }
            return Ok((Vec::new(), trace));
        }
        let s = &self.backend.stream;
        let kn = &self.kernels;
        ws.ensure(s, c, plan)?;
        plan.pack_into(&mut ws.host_plan);
        s.memcpy_htod(&ws.host_plan, &mut ws.plan)?;
        let [r_ids, r_pos, r_slots, r_lens, r_rows, r_tables] = plan.ranges();
        let ids = ws.plan.slice(r_ids);
        let pos = ws.plan.slice(r_pos);
        let slots = ws.plan.slice(r_slots);
        let lens = ws.plan.slice(r_lens);
        let out_rows = ws.plan.slice(r_rows);
        let tables = ws.plan.slice(r_tables);
        let eps = c.rms_norm_eps as f32;
        let (hi, vi) = (to_i32(h, "hidden")?, to_i32(vocab, "vocab")?);

        let mut b = s.launch_builder(&kn.embed);
        b.arg(&self.embed)
            .arg(&ids)
            .arg(&hi)
            .arg(&vi)
            .arg(&mut ws.x);
        // SAFETY: embed_gather(table [vocab][hidden], ids [t] (< vocab, checked by admit),
        // int, int, out [t][hidden] (workspace holds t * hidden)).
        unsafe { b.launch(grid(t, 1, 128)?) }?;

        let heads = to_i32(c.num_heads, "heads")?;
        let kv_heads = to_i32(c.num_kv_heads, "kv heads")?;
        let head_dim = to_i32(c.head_dim, "head_dim")?;
        let max_pos = to_i32(self.rope.max_positions(), "positions")?;
        let kvd_i = to_i32(kvd, "kv dim")?;
        let attn_ints = [
            to_i32(plan.max_blocks, "blocks")?,
            heads,
            kv_heads,
            head_dim,
            to_i32(kv.block_size(), "block size")?,
        ];
        let scale = 1.0 / (c.head_dim as f32).sqrt();
        let max_len = to_i32(plan.max_len, "length")?;
        let (ti, ei, ki) = (
            to_i32(t, "tokens")?,
            to_i32(e, "experts")?,
            to_i32(topk, "k")?,
        );

        for (li, lw) in self.layers.iter().enumerate() {
            self.rms_norm(&ws.x, &lw.input_norm, eps, t, &mut ws.normed)?;
            self.to_bf16(&ws.normed, t * h, &mut ws.xb)?;
            self.linear(&lw.q, qd, h, &ws.xb, t, &mut ws.q, false)?;
            self.linear(&lw.k, kvd, h, &ws.xb, t, &mut ws.k, false)?;
            self.linear(&lw.v, kvd, h, &ws.xb, t, &mut ws.v, false)?;
            for (buf, n_heads) in [(&mut ws.q, heads), (&mut ws.k, kv_heads)] {
                let mut b = s.launch_builder(&kn.rope);
                b.arg(buf)
                    .arg(&pos)
                    .arg(&self.cos)
                    .arg(&self.sin)
                    .arg(&n_heads)
                    .arg(&head_dim)
                    .arg(&max_pos);
                // SAFETY: rope(x [t][heads][d], pos [t] (< max_pos, checked by admit),
                // cos/sin [max_pos][d/2], int, int, int).
                unsafe { b.launch(grid(t, n_heads as usize, 64)?) }?;
            }
            let mut b = s.launch_builder(&kn.kv_write);
            b.arg(&ws.k)
                .arg(&ws.v)
                .arg(&slots)
                .arg(&kvd_i)
                .arg(&mut kv.keys[li])
                .arg(&mut kv.values[li]);
            // SAFETY: kv_write(k/v [t][kvd], slots [t] (< blocks * block_size: planned from
            // reserved block tables), int, caches [blocks * block_size][kvd]).
            unsafe { b.launch(grid(t, 1, 128)?) }?;
            let mut b = s.launch_builder(&kn.attention);
            b.arg(&ws.q)
                .arg(&kv.keys[li])
                .arg(&kv.values[li])
                .arg(&tables)
                .arg(&lens);
            for i in &attn_ints {
                b.arg(i);
            }
            b.arg(&scale)
                .arg(&max_len)
                .arg(&mut ws.scores)
                .arg(&mut ws.attn);
            // SAFETY: paged_attention_decode with one "sequence" per token: q [t][heads][d],
            // tables [t][max_blocks] (blocks < the cache's), lens [t] (<= max_len, covered by
            // the table), scores [t][heads][max_len], out [t][heads][d] (workspace sizes).
            unsafe { b.launch(grid(t, c.num_heads, 128)?) }?;
            self.to_bf16(&ws.attn, t * qd, &mut ws.xb)?;
            // Accumulating into x is the CPU's `x += o` with o rounded first (beta = 1).
            self.linear(&lw.o, h, qd, &ws.xb, t, &mut ws.x, true)?;

            self.rms_norm(&ws.x, &lw.post_norm, eps, t, &mut ws.normed)?;
            self.to_bf16(&ws.normed, t * h, &mut ws.xb)?;
            self.linear(&lw.router, e, h, &ws.xb, t, &mut ws.router_logits, false)?;
            let mut b = s.launch_builder(&kn.router);
            b.arg(&ws.router_logits)
                .arg(&ti)
                .arg(&ei)
                .arg(&ki)
                .arg(&mut ws.probs)
                .arg(&mut ws.top)
                .arg(&mut ws.weights);
            // SAFETY: router_softmax_topk(logits [t][e], int, int, int, probs [t][e],
            // top [t][k], weights [t][k]); one thread per token.
            unsafe { b.launch(grid(t.div_ceil(128), 1, 128)?) }?;

            // The experts' host round trip: the one synchronisation of the layer.
            ws.host_x.resize(t * h, 0.0);
            ws.host_top.resize(t * topk, 0);
            ws.host_w.resize(t * topk, 0.0);
            s.memcpy_dtoh(&ws.normed.slice(..t * h), &mut ws.host_x)?;
            s.memcpy_dtoh(&ws.top.slice(..t * topk), &mut ws.host_top)?;
            s.memcpy_dtoh(&ws.weights.slice(..t * topk), &mut ws.host_w)?;
            s.synchronize()?;
            let routing = Routing {
                k: topk,
                experts: ws.host_top.iter().map(|x| (*x).max(0) as u32).collect(),
                weights: ws.host_w.clone(),
            };
            let moe = experts.forward(li, &ws.host_x, &routing)?;
            if moe.len() != t * h {
                return Err(ExpertError::BadShape {
                    len: moe.len(),
                    tokens: t,
                    hidden: h,
                }
                .into());
            }
            s.memcpy_htod(&moe, &mut ws.moe)?;
            self.add(&mut ws.x, &ws.moe, t * h)?;
            if let Some(tr) = trace.as_mut() {
                tr.push(routing);
            }
        }

        let mut b = s.launch_builder(&kn.gather_rows);
        b.arg(&ws.x).arg(&out_rows).arg(&hi).arg(&mut ws.picked);
        // SAFETY: gather_rows_f32(src [t][hidden], rows [r] (< t), int, dst [r][hidden]).
        unsafe { b.launch(grid(rows, 1, 128)?) }?;
        self.rms_norm(&ws.picked, &self.norm, eps, rows, &mut ws.final_normed)?;
        self.to_bf16(&ws.final_normed, rows * h, &mut ws.xb)?;
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        self.linear(head, vocab, h, &ws.xb, rows, &mut ws.logits, false)?;
        let mut logits = vec![0f32; rows * vocab];
        s.memcpy_dtoh(&ws.logits.slice(..rows * vocab), &mut logits)?;
        s.synchronize()?;
        Ok((logits, trace))
    }

    fn rms_norm(
        &self,
        x: &CudaSlice<f32>,
        w: &CudaSlice<u16>,
        eps: f32,
        rows: usize,
        out: &mut CudaSlice<f32>,
    ) -> Result<(), CudaError> {
        let h = to_i32(self.config.hidden_size, "hidden")?;
        let mut b = self.backend.stream.launch_builder(&self.kernels.rms_norm);
        b.arg(x).arg(w).arg(&eps).arg(&h).arg(out);
        // SAFETY: rms_norm(x [rows][hidden], weight [hidden], float, int, out [rows][hidden]);
        // callers pass workspace buffers of at least rows * hidden.
        unsafe { b.launch(grid(rows, 1, 256)?) }?;
        Ok(())
    }

    fn to_bf16(
        &self,
        x: &CudaSlice<f32>,
        n: usize,
        out: &mut CudaSlice<u16>,
    ) -> Result<(), CudaError> {
        if x.len() < n || out.len() < n {
            return Err(CudaError::Shape(format!("bf16 conversion of {n} values")));
        }
        let n64 = n as i64;
        let mut b = self.backend.stream.launch_builder(&self.kernels.to_bf16);
        b.arg(x).arg(&n64).arg(out);
        // SAFETY: f32_to_bf16(x [n], long long, out [n]); lengths checked above.
        unsafe { b.launch(flat_grid(n)?) }?;
        Ok(())
    }

    fn add(&self, x: &mut CudaSlice<f32>, y: &CudaSlice<f32>, n: usize) -> Result<(), CudaError> {
        if x.len() < n || y.len() < n {
            return Err(CudaError::Shape(format!("residual add of {n} values")));
        }
        let n64 = n as i64;
        let mut b = self.backend.stream.launch_builder(&self.kernels.add);
        b.arg(x).arg(y).arg(&n64);
        // SAFETY: add_f32(x [n], y [n], long long); lengths checked above.
        unsafe { b.launch(flat_grid(n)?) }?;
        Ok(())
    }

    /// `y[rows, out] = x[rows, in] · w[out, in]^T (+ y when accumulating)`, bf16 inputs,
    /// f32 accumulation and output. Column-major, cuBLAS sees `y^T = w · x^T`: `w` stored
    /// row-major `[out, in]` reads as the column-major `[in, out]` matrix `w^T`, hence
    /// `OP_T` on it; `x` row-major `[rows, in]` is already the column-major `x^T`.
    #[allow(clippy::too_many_arguments)]
    fn linear(
        &self,
        w: &CudaSlice<u16>,
        out_dim: usize,
        in_dim: usize,
        x: &CudaSlice<u16>,
        rows: usize,
        y: &mut CudaSlice<f32>,
        accumulate: bool,
    ) -> Result<(), CudaError> {
        if w.len() < out_dim * in_dim || x.len() < rows * in_dim || y.len() < rows * out_dim {
            return Err(CudaError::Shape(format!(
                "gemm [{rows}, {in_dim}] x [{out_dim}, {in_dim}]^T"
            )));
        }
        if rows == 0 || out_dim == 0 {
            return Ok(());
        }
        let m = to_i32(out_dim, "gemm m")?;
        let n = to_i32(rows, "gemm n")?;
        let k = to_i32(in_dim, "gemm k")?;
        let alpha = 1.0f32;
        let beta = if accumulate { 1.0f32 } else { 0.0 };
        let s = &self.backend.stream;
        let (wp, _w) = w.device_ptr(s);
        let (xp, _x) = x.device_ptr(s);
        let (yp, _y) = y.device_ptr_mut(s);
        // SAFETY: the buffers hold the sizes checked above; alpha/beta are host f32 (the
        // handle's default pointer mode) as COMPUTE_32F requires; everything is on the
        // handle's stream.
        unsafe {
            cudarc::cublas::result::gemm_ex(
                *self.blas.handle(),
                cublasOperation_t::CUBLAS_OP_T,
                cublasOperation_t::CUBLAS_OP_N,
                m,
                n,
                k,
                (&alpha) as *const f32 as *const _,
                wp as *const _,
                cudaDataType_t::CUDA_R_16BF,
                k,
                xp as *const _,
                cudaDataType_t::CUDA_R_16BF,
                k,
                (&beta) as *const f32 as *const _,
                yp as *mut _,
                cudaDataType_t::CUDA_R_32F,
                m,
                cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| CudaError::Driver(format!("cuBLAS gemm: {e:?}")))
    }
}
