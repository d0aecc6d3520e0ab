//! Host side of the dense-path kernels (`kernels/dense.cu`): embedding gather, RMSNorm,
//! RoPE, Mixtral routing, paged-attention decode, argmax and top-p sampling.
//!
//! These wrappers take and return host memory (upload, one launch, download): they are
//! what the tests compare with the CPU engine's own functions. [`super::CudaModel`] calls
//! the same kernels on device buffers.

use std::sync::Arc;

use cudarc::driver::{CudaFunction, CudaModule, LaunchConfig, PushKernelArg};

use super::{CudaBackend, CudaError, ptx};
use crate::ops::Rope;
use crate::router::Routing;

pub(super) fn to_i32(n: usize, what: &str) -> Result<i32, CudaError> {
    i32::try_from(n).map_err(|_| CudaError::Shape(format!("{what} {n} does not fit in i32")))
}

pub(super) fn grid(x: usize, y: usize, threads: u32) -> Result<LaunchConfig, CudaError> {
    let dim = |n: usize, what: &str| {
        u32::try_from(n.max(1)).map_err(|_| CudaError::Shape(format!("{what} {n} too large")))
    };
    Ok(LaunchConfig {
        grid_dim: (dim(x, "grid x")?, dim(y, "grid y")?, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// The compiled dense kernels of one device.
pub struct DenseKernels {
    backend: Arc<CudaBackend>,
    _module: Arc<CudaModule>,
    pub(super) embed: CudaFunction,
    pub(super) rms_norm: CudaFunction,
    pub(super) rope: CudaFunction,
    pub(super) router: CudaFunction,
    pub(super) attention: CudaFunction,
    argmax: CudaFunction,
    top_p: CudaFunction,
    // Glue for the device-resident forward (model.rs); no host wrappers.
    pub(super) to_bf16: CudaFunction,
    pub(super) add: CudaFunction,
    pub(super) kv_write: CudaFunction,
    pub(super) gather_rows: CudaFunction,
}

/// One decode step's view of the paged KV cache of one layer, on the host: `keys` and
/// `values` are `[blocks, block_size, kv_heads * head_dim]` (the engine's layout),
/// `block_tables[s]` the blocks of sequence `s` in order, `lens[s]` its length (the query
/// is at position `lens[s] - 1`).
pub struct PagedDecode<'a> {
    pub q: &'a [f32],
    pub keys: &'a [f32],
    pub values: &'a [f32],
    pub block_tables: &'a [Vec<u32>],
    pub lens: &'a [usize],
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub block_size: usize,
}

impl DenseKernels {
    pub fn new(backend: Arc<CudaBackend>) -> Result<Self, CudaError> {
        let text = ptx::load_or_compile(&ptx::DENSE, &backend.arch, ptx::cache_dir().as_deref())?;
        let module = backend
            .ctx
            .load_module(cudarc::nvrtc::Ptx::from_src(text))?;
        Ok(DenseKernels {
            embed: module.load_function("embed_gather")?,
            rms_norm: module.load_function("rms_norm")?,
            rope: module.load_function("rope")?,
            router: module.load_function("router_softmax_topk")?,
            attention: module.load_function("paged_attention_decode")?,
            argmax: module.load_function("argmax_rows")?,
            top_p: module.load_function("top_p_sample")?,
            to_bf16: module.load_function("f32_to_bf16")?,
            add: module.load_function("add_f32")?,
            kv_write: module.load_function("kv_write")?,
            gather_rows: module.load_function("gather_rows_f32")?,
            _module: module,
            backend,
        })
    }

    /// Rows `ids` of a bf16 `[vocab, hidden]` table, as f32 `[ids, hidden]`.
    pub fn embed(&self, table: &[u16], hidden: usize, ids: &[u32]) -> Result<Vec<f32>, CudaError> {
        if hidden == 0 || !table.len().is_multiple_of(hidden) {
            return Err(CudaError::Shape(format!(
                "embedding table of {} values is not [vocab, {hidden}]",
                table.len()
            )));
        }
        let vocab = table.len() / hidden;
        if let Some(bad) = ids.iter().find(|i| **i as usize >= vocab) {
            return Err(CudaError::Shape(format!(
                "token id {bad} >= vocabulary {vocab}"
            )));
        }
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let s = &self.backend.stream;
        let d_table = s.clone_htod(table)?;
        let d_ids = s.clone_htod(ids)?;
        let mut out = s.alloc_zeros::<f32>(ids.len() * hidden)?;
        let (h, v) = (to_i32(hidden, "hidden")?, to_i32(vocab, "vocab")?);
        let mut b = s.launch_builder(&self.embed);
        b.arg(&d_table).arg(&d_ids).arg(&h).arg(&v).arg(&mut out);
        // SAFETY: embed_gather(table [vocab][hidden] u16, ids [n] u32, int, int, out [n][hidden]).
        unsafe { b.launch(grid(ids.len(), 1, 128)?) }?;
        Ok(s.clone_dtoh(&out)?)
    }

    /// `ops::rms_norm` with a bf16 weight: `x` is `[rows, hidden]`.
    pub fn rms_norm(&self, x: &[f32], weight: &[u16], eps: f32) -> Result<Vec<f32>, CudaError> {
        let hidden = weight.len();
        if hidden == 0 || !x.len().is_multiple_of(hidden) {
            return Err(CudaError::Shape(format!(
                "{} values are not rows of {hidden}",
                x.len()
            )));
        }
        let rows = x.len() / hidden;
        if rows == 0 {
            return Ok(Vec::new());
        }
        let s = &self.backend.stream;
        let (d_x, d_w) = (s.clone_htod(x)?, s.clone_htod(weight)?);
        let mut out = s.alloc_zeros::<f32>(x.len())?;
        let h = to_i32(hidden, "hidden")?;
        let mut b = s.launch_builder(&self.rms_norm);
        b.arg(&d_x).arg(&d_w).arg(&eps).arg(&h).arg(&mut out);
        // SAFETY: rms_norm(x [rows][hidden], weight [hidden] u16, float, int, out [rows][hidden]).
        unsafe { b.launch(grid(rows, 1, 256)?) }?;
        Ok(s.clone_dtoh(&out)?)
    }

    /// `Rope::apply` on every token of `x` (`[positions.len(), heads * head_dim]`), token
    /// `t` at `positions[t]`.
    pub fn rope(&self, rope: &Rope, x: &[f32], positions: &[usize]) -> Result<Vec<f32>, CudaError> {
        let d = rope.head_dim();
        let n = positions.len();
        if n == 0 {
            return Ok(Vec::new());
        }
        if d == 0 || x.is_empty() || !d.is_multiple_of(2) || !x.len().is_multiple_of(n * d) {
            return Err(CudaError::Shape(format!(
                "{} values are not {n} tokens of heads x {d}",
                x.len()
            )));
        }
        let max_pos = rope.max_positions();
        if let Some(p) = positions.iter().find(|p| **p >= max_pos) {
            return Err(CudaError::Shape(format!("position {p} >= {max_pos}")));
        }
        let heads = x.len() / (n * d);
        let pos: Vec<i32> = positions
            .iter()
            .map(|p| to_i32(*p, "position"))
            .collect::<Result<_, _>>()?;
        let (cos, sin) = rope.tables();
        let s = &self.backend.stream;
        let mut d_x = s.clone_htod(x)?;
        let (d_pos, d_cos, d_sin) = (s.clone_htod(&pos)?, s.clone_htod(cos)?, s.clone_htod(sin)?);
        let (h, hd, mp) = (
            to_i32(heads, "heads")?,
            to_i32(d, "head_dim")?,
            to_i32(max_pos, "positions")?,
        );
        let mut b = s.launch_builder(&self.rope);
        b.arg(&mut d_x)
            .arg(&d_pos)
            .arg(&d_cos)
            .arg(&d_sin)
            .arg(&h)
            .arg(&hd)
            .arg(&mp);
        // SAFETY: rope(x [n][heads][d], pos [n], cos/sin [max_pos][d/2], int, int, int).
        unsafe { b.launch(grid(n, heads, 64)?) }?;
        Ok(s.clone_dtoh(&d_x)?)
    }

    /// `router::route_softmax_topk` over router logits `[tokens, experts]`.
    pub fn route(&self, logits: &[f32], experts: usize, k: usize) -> Result<Routing, CudaError> {
        if experts == 0 || k == 0 || k > experts || !logits.len().is_multiple_of(experts) {
            return Err(CudaError::Shape(format!(
                "{} logits, {experts} experts, top-{k}",
                logits.len()
            )));
        }
        let tokens = logits.len() / experts;
        if tokens == 0 {
            return Ok(Routing {
                k,
                ..Routing::default()
            });
        }
        let s = &self.backend.stream;
        let d_l = s.clone_htod(logits)?;
        let mut probs = s.alloc_zeros::<f32>(logits.len())?;
        let mut top = s.alloc_zeros::<i32>(tokens * k)?;
        let mut w = s.alloc_zeros::<f32>(tokens * k)?;
        let (t, e, kk) = (
            to_i32(tokens, "tokens")?,
            to_i32(experts, "experts")?,
            to_i32(k, "k")?,
        );
        let mut b = s.launch_builder(&self.router);
        b.arg(&d_l)
            .arg(&t)
            .arg(&e)
            .arg(&kk)
            .arg(&mut probs)
            .arg(&mut top)
            .arg(&mut w);
        // SAFETY: router_softmax_topk(logits [t][e], int, int, int, probs [t][e], top [t][k],
        // weights [t][k]); one thread per token.
        unsafe { b.launch(grid(tokens.div_ceil(128), 1, 128)?) }?;
        let experts_out = s.clone_dtoh(&top)?;
        Ok(Routing {
            k,
            experts: experts_out.into_iter().map(|x| x.max(0) as u32).collect(),
            weights: s.clone_dtoh(&w)?,
        })
    }

    /// One decode step of attention for each sequence: `[seqs, heads * head_dim]`.
    pub fn paged_attention_decode(&self, a: &PagedDecode) -> Result<Vec<f32>, CudaError> {
        let seqs = a.lens.len();
        let (hd, kvd) = (a.heads * a.head_dim, a.kv_heads * a.head_dim);
        if a.kv_heads == 0
            || a.heads == 0
            || a.head_dim == 0
            || a.block_size == 0
            || !a.heads.is_multiple_of(a.kv_heads)
            || a.q.len() != seqs * hd
            || a.block_tables.len() != seqs
            || a.keys.len() != a.values.len()
            || !a.keys.len().is_multiple_of(a.block_size * kvd)
        {
            return Err(CudaError::Shape(
                "inconsistent paged attention shapes".into(),
            ));
        }
        if seqs == 0 {
            return Ok(Vec::new());
        }
        let blocks = a.keys.len() / (a.block_size * kvd);
        let max_blocks = a
            .block_tables
            .iter()
            .map(Vec::len)
            .max()
            .unwrap_or(0)
            .max(1);
        let max_len = a.lens.iter().copied().max().unwrap_or(0).max(1);
        let mut tables = vec![0i32; seqs * max_blocks];
        for (s, (t, len)) in a.block_tables.iter().zip(a.lens).enumerate() {
            if *len == 0 || len.div_ceil(a.block_size) > t.len() {
                return Err(CudaError::Shape(format!(
                    "sequence {s}: length {len} with {} blocks",
                    t.len()
                )));
            }
            for (i, b) in t.iter().enumerate() {
                if *b as usize >= blocks {
                    return Err(CudaError::Shape(format!("block {b} >= {blocks}")));
                }
                tables[s * max_blocks + i] = *b as i32;
            }
        }
        let lens: Vec<i32> = a
            .lens
            .iter()
            .map(|l| to_i32(*l, "length"))
            .collect::<Result<_, _>>()?;
        let st = &self.backend.stream;
        let (d_q, d_k, d_v) = (
            st.clone_htod(a.q)?,
            st.clone_htod(a.keys)?,
            st.clone_htod(a.values)?,
        );
        let (d_t, d_l) = (st.clone_htod(&tables)?, st.clone_htod(&lens)?);
        let mut scores = st.alloc_zeros::<f32>(seqs * a.heads * max_len)?;
        let mut out = st.alloc_zeros::<f32>(seqs * hd)?;
        let scale = 1.0 / (a.head_dim as f32).sqrt();
        let ints = [
            to_i32(max_blocks, "blocks")?,
            to_i32(a.heads, "heads")?,
            to_i32(a.kv_heads, "kv heads")?,
            to_i32(a.head_dim, "head_dim")?,
            to_i32(a.block_size, "block size")?,
        ];
        let ml = to_i32(max_len, "length")?;
        let mut b = st.launch_builder(&self.attention);
        b.arg(&d_q).arg(&d_k).arg(&d_v).arg(&d_t).arg(&d_l);
        for i in &ints {
            b.arg(i);
        }
        b.arg(&scale).arg(&ml).arg(&mut scores).arg(&mut out);
        // SAFETY: paged_attention_decode's contract in dense.cu: q [seqs][heads][d], caches
        // [blocks][bs][kvd], tables [seqs][max_blocks] (< blocks), lens [seqs] (<= max_len and
        // covered by the table), scores [seqs][heads][max_len], out [seqs][heads][d].
        unsafe { b.launch(grid(seqs, a.heads, 128)?) }?;
        Ok(st.clone_dtoh(&out)?)
    }

    /// `sampling::argmax` of every row of `logits` (`[rows, vocab]`).
    pub fn argmax(&self, logits: &[f32], vocab: usize) -> Result<Vec<u32>, CudaError> {
        let rows = self.rows(logits, vocab)?;
        if rows == 0 {
            return Ok(Vec::new());
        }
        let s = &self.backend.stream;
        let d_l = s.clone_htod(logits)?;
        let mut out = s.alloc_zeros::<i32>(rows)?;
        let v = to_i32(vocab, "vocab")?;
        let mut b = s.launch_builder(&self.argmax);
        b.arg(&d_l).arg(&v).arg(&mut out);
        // SAFETY: argmax_rows(logits [rows][vocab], int, out [rows]).
        unsafe { b.launch(grid(rows, 1, 256)?) }?;
        Ok(s.clone_dtoh(&out)?
            .into_iter()
            .map(|i| i.max(0) as u32)
            .collect())
    }

    /// Nucleus sampling of every row at `temperature` > 0 with `top_p` in (0, 1], row `r`
    /// drawing with the uniform `u[r]` in [0, 1).
    pub fn top_p_sample(
        &self,
        logits: &[f32],
        vocab: usize,
        temperature: f32,
        top_p: f32,
        u: &[f32],
    ) -> Result<Vec<u32>, CudaError> {
        let rows = self.rows(logits, vocab)?;
        if !(temperature > 0.0 && top_p > 0.0 && top_p <= 1.0) || u.len() != rows {
            return Err(CudaError::Shape(format!(
                "temperature {temperature}, top_p {top_p}, {} draws for {rows} rows",
                u.len()
            )));
        }
        if rows == 0 {
            return Ok(Vec::new());
        }
        let s = &self.backend.stream;
        let (d_l, d_u) = (s.clone_htod(logits)?, s.clone_htod(u)?);
        let mut probs = s.alloc_zeros::<f32>(logits.len())?;
        let mut out = s.alloc_zeros::<i32>(rows)?;
        let v = to_i32(vocab, "vocab")?;
        let mut b = s.launch_builder(&self.top_p);
        b.arg(&d_l)
            .arg(&v)
            .arg(&temperature)
            .arg(&top_p)
            .arg(&d_u)
            .arg(&mut probs)
            .arg(&mut out);
        // SAFETY: top_p_sample(logits [rows][vocab], int, float, float, u [rows],
        // probs [rows][vocab], out [rows]).
        unsafe { b.launch(grid(rows, 1, 256)?) }?;
        Ok(s.clone_dtoh(&out)?
            .into_iter()
            .map(|i| i.max(0) as u32)
            .collect())
    }

    fn rows(&self, logits: &[f32], vocab: usize) -> Result<usize, CudaError> {
        if vocab == 0 || !logits.len().is_multiple_of(vocab) {
            return Err(CudaError::Shape(format!(
                "{} logits are not rows of {vocab}",
                logits.len()
            )));
        }
        Ok(logits.len() / vocab)
    }
}
