//! A node's experts on one CUDA device.
//!
//! Per layer, the local experts' weights are bf16, padded and packed contiguously
//! (`wgu [E][2F'][H']`, `wd [E][H'][F']`, `'` = rounded up to a multiple of 8, zeros in the
//! padding) so one grouped kernel covers all of them. A layer is three launches
//! (`moe_gate_up`, `moe_down`, `moe_combine`, see `kernels/moe.cu`) whatever the number of
//! experts, with no host synchronisation between them and no allocation: workspaces are
//! sized at construction and grow only when a larger batch arrives.

use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use half::bf16;

use super::plan::{Plan, PlanLayout, max_tiles};
use super::{CudaBackend, CudaError};
use crate::checkpoint::{Checkpoint, WeightError};
use crate::config::ModelConfig;
use crate::experts::{
    Assignment, ExpertError, ExpertFfn, ExpertSelection, ExpertStore, Experts, WorkShape,
    assignments, load_expert,
};
use crate::ops::Weights;
use crate::router::Routing;

/// Columns per half-tile and K per stage of the GEMM kernels (`BN`, `BK` in moe.cu).
const TILE_N: usize = 64;
const TILE_K: usize = 32;
const THREADS: u32 = 128;
/// Batches whose busiest expert has at most this many rows run the skinny kernels
/// (`SK_ROWS` in moe.cu; one warp per output column, weights streamed once): decode.
pub const SKINNY_MAX_ROWS: usize = 8;
/// Batches with at most this many rows per expert take the 2-row instance of the skinny
/// kernels (decode at top-2: one row per expert and sequence).
const SKINNY_SMALL_ROWS: usize = 2;
/// Warps (output columns) per block of the skinny kernels (`SK_WARPS` in moe.cu).
const SKINNY_WARPS: usize = 8;
/// At most this many split-K slices for the down projection.
const MAX_SPLITS: usize = 8;
/// Each split-K slice gets at least this many K tiles.
const MIN_KT_PER_SPLIT: usize = 8;

fn pad8(n: usize) -> usize {
    n.div_ceil(8) * 8
}

fn to_i32(n: usize, what: &str) -> Result<i32, CudaError> {
    i32::try_from(n).map_err(|_| CudaError::Shape(format!("{what} {n} does not fit in i32")))
}

fn to_u32(n: usize, what: &str) -> Result<u32, CudaError> {
    u32::try_from(n).map_err(|_| CudaError::Shape(format!("{what} {n} does not fit in u32")))
}

fn unavailable(e: CudaError) -> ExpertError {
    ExpertError::Unavailable(format!("CUDA: {e}"))
}

/// Copies a row-major `[rows, cols]` bf16 matrix into `dst` (`[rows, cols_pad]`, zero padded
/// columns) starting at row `row0` of `dst`.
fn pack_rows(src: &[u16], rows: usize, cols: usize, dst: &mut [u16], row0: usize, cols_pad: usize) {
    for r in 0..rows {
        let d = &mut dst[(row0 + r) * cols_pad..(row0 + r + 1) * cols_pad];
        d[..cols].copy_from_slice(&src[r * cols..(r + 1) * cols]);
        d[cols..].fill(0);
    }
}

/// A CPU weight matrix as bf16 bits: as held when bf16, rounded ([`bf16_bits`]) otherwise.
fn weight_bits(w: &Weights) -> Vec<u16> {
    match w {
        Weights::F32(v) => bf16_bits(v),
        Weights::F32Panels(p) => bf16_bits(&p.unpack()),
        Weights::Bf16(p) => p.unpack().iter().map(|b| b.to_bits()).collect(),
        // The GPU kernels read bf16: 8-bit weights are widened and rounded once at upload.
        Weights::Int8(q) => bf16_bits(&q.dequantize()),
        Weights::Fp8(q) => bf16_bits(&q.dequantize()),
    }
}

/// Round-to-nearest-even f32 -> bf16 bits (the `half` crate's conversion).
pub fn bf16_bits(v: &[f32]) -> Vec<u16> {
    v.iter().map(|x| bf16::from_f32(*x).to_bits()).collect()
}

/// Why [`CudaExperts::load`] failed.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Weights(#[from] WeightError),
    #[error(transparent)]
    Cuda(#[from] CudaError),
}

struct LayerWeights {
    /// Model expert id of each local expert, in packing order.
    experts: Vec<u32>,
    /// Local index of each model expert id (`None`: not held).
    local: Vec<Option<u32>>,
    wgu: CudaSlice<u16>,
    wd: CudaSlice<u16>,
}

struct Workspace {
    max_tokens: usize,
    max_rows: usize,
    x: CudaSlice<u16>,
    plan: CudaSlice<i32>,
    act: CudaSlice<u16>,
    yp: CudaSlice<f32>,
    out: CudaSlice<f32>,
    host_x: Vec<u16>,
    host_plan: Vec<i32>,
}

/// What a launch sequence needs to know of a planned batch.
#[derive(Debug, Clone, Copy)]
struct BatchShape {
    tokens: usize,
    rows: usize,
    tiles: usize,
    max_expert_rows: usize,
    layout: PlanLayout,
}

impl BatchShape {
    fn of(plan: &Plan) -> Self {
        BatchShape {
            tokens: plan.tokens,
            rows: plan.rows(),
            tiles: plan.tiles.len(),
            max_expert_rows: plan.max_expert_rows(),
            layout: plan.layout(),
        }
    }
}

/// A batch already on the device (activations and plan), for timing the layer alone.
pub struct DeviceBatch {
    pub tokens: usize,
    pub rows: usize,
    pub tiles: usize,
    /// Rows of its busiest expert.
    pub max_expert_rows: usize,
    /// The model expert ids of the layer it was planned for, in packing order: its plan
    /// holds local indices into exactly that packing.
    packing: Vec<u32>,
    layout: PlanLayout,
    x: CudaSlice<u16>,
    plan: CudaSlice<i32>,
}

/// The experts of one node on a CUDA device; see the module docs.
pub struct CudaExperts {
    backend: Arc<CudaBackend>,
    num_layers: usize,
    num_experts: usize,
    hidden: usize,
    ffn: usize,
    h_pad: usize,
    f_pad: usize,
    layers: Vec<Option<LayerWeights>>,
    ws: Mutex<Workspace>,
    /// Batches with at most this many rows per expert take the skinny kernels (0: never).
    skinny_rows: usize,
}

impl CudaExperts {
    /// Empty store; workspaces for batches of up to `max_tokens` tokens with `top_k`
    /// assignments each (larger batches grow them).
    pub fn new(
        backend: Arc<CudaBackend>,
        num_layers: usize,
        num_experts: usize,
        hidden: usize,
        ffn: usize,
        max_tokens: usize,
        top_k: usize,
    ) -> Result<Self, CudaError> {
        if hidden == 0 || ffn == 0 {
            return Err(CudaError::Shape(
                "hidden and FFN sizes must be positive".into(),
            ));
        }
        let (h_pad, f_pad) = (pad8(hidden), pad8(ffn));
        to_i32(2 * f_pad * h_pad, "expert size")?;
        let max_tokens = max_tokens.max(1);
        let max_rows = max_tokens * top_k.max(1);
        let ws = Self::alloc_workspace(
            &backend,
            hidden,
            h_pad,
            f_pad,
            max_tokens,
            max_rows,
            num_experts,
        )?;
        Ok(CudaExperts {
            backend,
            num_layers,
            num_experts,
            hidden,
            ffn,
            h_pad,
            f_pad,
            layers: (0..num_layers).map(|_| None).collect(),
            ws: Mutex::new(ws),
            skinny_rows: SKINNY_MAX_ROWS,
        })
    }

    pub fn for_config(
        backend: Arc<CudaBackend>,
        cfg: &ModelConfig,
        max_tokens: usize,
    ) -> Result<Self, CudaError> {
        Self::new(
            backend,
            cfg.expert_layers(),
            cfg.num_experts,
            cfg.hidden_size,
            cfg.moe_intermediate_size,
            max_tokens,
            cfg.experts_per_token,
        )
    }

    /// Uploads every expert a CPU store holds.
    pub fn from_store(
        backend: Arc<CudaBackend>,
        store: &ExpertStore,
        ffn: usize,
        max_tokens: usize,
        top_k: usize,
    ) -> Result<Self, CudaError> {
        let mut me = Self::new(
            backend,
            store.num_layers(),
            store.num_experts(),
            store.hidden(),
            ffn,
            max_tokens,
            top_k,
        )?;
        let held = store.held();
        for layer in 0..store.num_layers() {
            let ids: Vec<u32> = held
                .iter()
                .filter(|(l, _)| *l == layer)
                .map(|(_, e)| *e as u32)
                .collect();
            if ids.is_empty() {
                continue;
            }
            me.add_layer(layer, &ids)?;
            for (local, e) in ids.iter().enumerate() {
                if let Some(ffn) = store.get(layer, *e as usize) {
                    me.set_expert(layer, local, ffn)?;
                }
            }
        }
        Ok(me)
    }

    /// Loads the selected experts from a checkpoint, one expert in f32 at a time.
    pub fn load(
        backend: Arc<CudaBackend>,
        ckpt: &Checkpoint,
        cfg: &ModelConfig,
        selection: &ExpertSelection,
        max_tokens: usize,
    ) -> Result<Self, LoadError> {
        let cuda = LoadError::Cuda;
        let mut me = Self::for_config(backend, cfg, max_tokens).map_err(cuda)?;
        for layer in 0..cfg.expert_layers() {
            let ids: Vec<u32> = (0..cfg.num_experts)
                .filter(|e| selection.contains(layer, *e))
                .map(|e| e as u32)
                .collect();
            if ids.is_empty() {
                continue;
            }
            me.add_layer(layer, &ids).map_err(cuda)?;
            for (local, e) in ids.iter().enumerate() {
                let ffn = load_expert(ckpt, cfg, layer, *e as usize)?;
                me.set_expert(layer, local, &ffn).map_err(cuda)?;
            }
        }
        Ok(me)
    }

    pub fn backend(&self) -> &Arc<CudaBackend> {
        &self.backend
    }

    pub fn hidden(&self) -> usize {
        self.hidden
    }

    pub fn ffn(&self) -> usize {
        self.ffn
    }

    /// Model expert ids held for `layer`, in local order.
    pub fn experts_of(&self, layer: usize) -> Option<&[u32]> {
        self.layers
            .get(layer)?
            .as_ref()
            .map(|l| l.experts.as_slice())
    }

    /// (layer, expert) pairs held, in order.
    pub fn held(&self) -> Vec<(usize, usize)> {
        let mut held: Vec<(usize, usize)> = self
            .layers
            .iter()
            .enumerate()
            .filter_map(|(l, lw)| lw.as_ref().map(|lw| (l, lw)))
            .flat_map(|(l, lw)| lw.experts.iter().map(move |e| (l, *e as usize)))
            .collect();
        held.sort_unstable();
        held
    }

    pub fn holds(&self, layer: usize, expert: usize) -> bool {
        self.layers
            .get(layer)
            .and_then(Option::as_ref)
            .and_then(|lw| lw.local.get(expert).copied().flatten())
            .is_some()
    }

    /// Device bytes one expert's packed bf16 weights occupy (gate, up and down, padded).
    pub fn bytes_per_expert(&self) -> u64 {
        3 * self.h_pad as u64 * self.f_pad as u64 * 2
    }

    /// Re-packs `layer` to hold the experts of `keep` that it holds now (copied on the
    /// device) followed by `add` (uploaded). A layer is one packed allocation so that one
    /// grouped launch covers all of its experts; changing its set therefore means a new
    /// allocation, and for the moment of the copy both the old and the new one exist. On
    /// error the layer is left as it was.
    pub fn replace_layer(
        &mut self,
        layer: usize,
        keep: &[u32],
        add: &[(u32, &ExpertFfn)],
    ) -> Result<(), CudaError> {
        let slot = self.layers.get_mut(layer).ok_or_else(|| {
            CudaError::Shape(format!(
                "layer {layer} out of range ({} layers)",
                self.num_layers
            ))
        })?;
        let old = slot.take();
        let kept: Vec<(u32, usize)> = keep
            .iter()
            .filter_map(|e| {
                let l = old.as_ref()?.local.get(*e as usize).copied().flatten()?;
                Some((*e, l as usize))
            })
            .collect();
        let ids: Vec<u32> = kept
            .iter()
            .map(|(e, _)| *e)
            .chain(add.iter().map(|(e, _)| *e))
            .collect();
        if ids.is_empty() {
            return Ok(());
        }
        let result = self.fill_layer(layer, &ids, old.as_ref(), &kept, add);
        if result.is_err() {
            self.layers[layer] = old;
        }
        result
    }

    fn fill_layer(
        &mut self,
        layer: usize,
        ids: &[u32],
        old: Option<&LayerWeights>,
        kept: &[(u32, usize)],
        add: &[(u32, &ExpertFfn)],
    ) -> Result<(), CudaError> {
        self.add_layer(layer, ids)?;
        if let (Some(old), Some(new)) = (old, self.layers[layer].as_mut()) {
            let stream = &self.backend.stream;
            let (gu, d) = (2 * self.f_pad * self.h_pad, self.h_pad * self.f_pad);
            for (to, (_, from)) in kept.iter().enumerate() {
                stream.memcpy_dtod(
                    &old.wgu.slice(from * gu..(from + 1) * gu),
                    &mut new.wgu.slice_mut(to * gu..(to + 1) * gu),
                )?;
                stream.memcpy_dtod(
                    &old.wd.slice(from * d..(from + 1) * d),
                    &mut new.wd.slice_mut(to * d..(to + 1) * d),
                )?;
            }
        }
        for (i, (_, ffn)) in add.iter().enumerate() {
            self.set_expert(layer, kept.len() + i, ffn)?;
        }
        Ok(())
    }

    /// Allocates (zeroed) weights for `experts` (model ids) of `layer`; fill them with
    /// [`Self::set_expert`] or [`Self::set_expert_bf16`].
    pub fn add_layer(&mut self, layer: usize, experts: &[u32]) -> Result<(), CudaError> {
        if layer >= self.num_layers {
            return Err(CudaError::Shape(format!(
                "layer {layer} out of range ({} layers)",
                self.num_layers
            )));
        }
        let mut local = vec![None; self.num_experts];
        for (i, e) in experts.iter().enumerate() {
            let slot = local.get_mut(*e as usize).ok_or_else(|| {
                CudaError::Shape(format!(
                    "expert {e} out of range ({} experts)",
                    self.num_experts
                ))
            })?;
            if slot.is_some() {
                return Err(CudaError::Shape(format!("expert {e} listed twice")));
            }
            *slot = Some(i as u32);
        }
        let n = experts.len().max(1);
        let stream = &self.backend.stream;
        let wgu = stream.alloc_zeros::<u16>(n * 2 * self.f_pad * self.h_pad)?;
        let wd = stream.alloc_zeros::<u16>(n * self.h_pad * self.f_pad)?;
        self.layers[layer] = Some(LayerWeights {
            experts: experts.to_vec(),
            local,
            wgu,
            wd,
        });
        Ok(())
    }

    /// Uploads one expert (f32, rounded to bf16) into local slot `local` of `layer`.
    pub fn set_expert(
        &mut self,
        layer: usize,
        local: usize,
        ffn: &ExpertFfn,
    ) -> Result<(), CudaError> {
        let (h, f) = (self.hidden, self.ffn);
        if ffn.gate_up.out_dim != 2 * f
            || ffn.gate_up.in_dim != h
            || ffn.down.out_dim != h
            || ffn.down.in_dim != f
        {
            return Err(CudaError::Shape(format!(
                "expert shapes gate_up [{}, {}], down [{}, {}]; expected [{}, {h}] and [{h}, {f}]",
                ffn.gate_up.out_dim,
                ffn.gate_up.in_dim,
                ffn.down.out_dim,
                ffn.down.in_dim,
                2 * f
            )));
        }
        self.set_expert_bf16(
            layer,
            local,
            &weight_bits(&ffn.gate_up.weight),
            &weight_bits(&ffn.down.weight),
        )
    }

    /// Uploads one expert given as raw bf16 bits: `gate_up` `[2F, H]` (gate rows first) and
    /// `down` `[H, F]`, both row-major and unpadded.
    pub fn set_expert_bf16(
        &mut self,
        layer: usize,
        local: usize,
        gate_up: &[u16],
        down: &[u16],
    ) -> Result<(), CudaError> {
        let (h, f, hp, fp) = (self.hidden, self.ffn, self.h_pad, self.f_pad);
        if gate_up.len() != 2 * f * h || down.len() != h * f {
            return Err(CudaError::Shape(format!(
                "expert weights have {} and {} values; expected {} and {}",
                gate_up.len(),
                down.len(),
                2 * f * h,
                h * f
            )));
        }
        let lw = self
            .layers
            .get_mut(layer)
            .and_then(Option::as_mut)
            .ok_or_else(|| CudaError::Shape(format!("layer {layer} has no experts added")))?;
        if local >= lw.experts.len() {
            return Err(CudaError::Shape(format!(
                "local expert {local} out of range ({} held)",
                lw.experts.len()
            )));
        }
        let stream = &self.backend.stream;
        let mut buf = vec![0u16; 2 * fp * hp];
        pack_rows(&gate_up[..f * h], f, h, &mut buf, 0, hp);
        pack_rows(&gate_up[f * h..], f, h, &mut buf, fp, hp);
        let per = 2 * fp * hp;
        stream.memcpy_htod(&buf, &mut lw.wgu.slice_mut(local * per..(local + 1) * per))?;
        let mut buf = vec![0u16; hp * fp];
        pack_rows(down, h, f, &mut buf, 0, fp);
        let per = hp * fp;
        stream.memcpy_htod(&buf, &mut lw.wd.slice_mut(local * per..(local + 1) * per))?;
        Ok(())
    }

    fn alloc_workspace(
        backend: &CudaBackend,
        hidden: usize,
        h_pad: usize,
        f_pad: usize,
        max_tokens: usize,
        max_rows: usize,
        experts: usize,
    ) -> Result<Workspace, CudaError> {
        let s = &backend.stream;
        let plan_len = PlanLayout::new(max_rows, max_tokens, max_tiles(max_rows, experts)).len;
        Ok(Workspace {
            max_tokens,
            max_rows,
            x: s.alloc_zeros(max_tokens * h_pad)?,
            plan: s.alloc_zeros(plan_len)?,
            act: s.alloc_zeros(max_rows * f_pad)?,
            yp: s.alloc_zeros(max_rows * h_pad)?,
            out: s.alloc_zeros(max_tokens * hidden)?,
            host_x: Vec::with_capacity(max_tokens * h_pad),
            host_plan: Vec::with_capacity(plan_len),
        })
    }

    /// Grows the workspaces (never shrinks) to fit `tokens` tokens and `rows` assignments
    /// in `tiles` row tiles, the down projection's split-K slices included.
    fn ensure(
        &self,
        ws: &mut Workspace,
        tokens: usize,
        rows: usize,
        tiles: usize,
    ) -> Result<(), CudaError> {
        if tokens > ws.max_tokens || rows > ws.max_rows {
            let max_tokens = tokens.max(ws.max_tokens);
            let max_rows = rows.max(ws.max_rows);
            tracing::info!(max_tokens, max_rows, "growing CUDA expert workspaces");
            *ws = Self::alloc_workspace(
                &self.backend,
                self.hidden,
                self.h_pad,
                self.f_pad,
                max_tokens,
                max_rows,
                self.num_experts,
            )?;
        }
        let (splits, _) = self.down_splits(tiles);
        let yp = splits * rows * self.h_pad;
        if ws.yp.len() < yp {
            ws.yp = self.backend.stream.alloc_zeros(yp)?;
        }
        Ok(())
    }

    /// Fills the intermediate and output workspaces with NaN (tests: every element the
    /// next call returns must have been written by it).
    pub fn poison(&self) -> Result<(), CudaError> {
        let mut guard = self
            .ws
            .lock()
            .map_err(|_| CudaError::Driver("workspace lock poisoned".into()))?;
        let ws = &mut *guard;
        let act_words = ws.act.len() / 2;
        self.fill_nan(&mut ws.act, act_words)?;
        let n = ws.yp.len();
        self.fill_nan(&mut ws.yp, n)?;
        let n = ws.out.len();
        self.fill_nan(&mut ws.out, n)?;
        Ok(())
    }

    fn fill_nan<T>(&self, buf: &mut CudaSlice<T>, words: usize) -> Result<(), CudaError> {
        if words == 0 {
            return Ok(());
        }
        let n = words as i64;
        let value: u32 = 0xffff_ffff;
        let blocks = to_u32(words.div_ceil(256).min(4096), "blocks")?;
        let mut b = self
            .backend
            .stream
            .launch_builder(&self.backend.moe.fill_u32);
        b.arg(buf).arg(&n).arg(&value);
        // SAFETY: fill_u32(u32*, long long, u32) writes `words` 32-bit words of `buf`.
        unsafe {
            b.launch(LaunchConfig {
                grid_dim: (blocks, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            })
        }?;
        Ok(())
    }

    fn work_shape(&self) -> WorkShape {
        WorkShape {
            layers: self.num_layers,
            experts: self.num_experts,
            hidden: self.hidden,
        }
    }

    /// Up to how many rows per expert a batch takes the skinny kernels: 0 turns them off
    /// (tests and the benchmark compare both paths); capped at [`SKINNY_MAX_ROWS`].
    pub fn set_skinny_rows(&mut self, rows: usize) {
        self.skinny_rows = rows.min(SKINNY_MAX_ROWS);
    }

    /// Whether a batch whose busiest expert has `rows` rows takes the skinny kernels.
    pub fn takes_skinny(&self, rows: usize) -> bool {
        rows > 0 && rows <= self.skinny_rows
    }

    /// The rows per expert of the skinny instance such a batch runs (2 or
    /// [`SKINNY_MAX_ROWS`]), `None` for the tiled kernels.
    pub fn skinny_instance(&self, rows: usize) -> Option<usize> {
        let instance = if rows <= SKINNY_SMALL_ROWS {
            SKINNY_SMALL_ROWS
        } else {
            SKINNY_MAX_ROWS
        };
        self.takes_skinny(rows).then_some(instance)
    }

    /// Checks a unit of work against the model and the experts held, computing nothing.
    pub fn validate(
        &self,
        layer: usize,
        x_len: usize,
        tokens: usize,
        work: &[Assignment],
    ) -> Result<(), ExpertError> {
        let shape = self.work_shape();
        shape.check(layer, x_len, tokens, work, |e| {
            self.holds(layer, e as usize)
        })
    }

    /// Checks a batch and turns model expert ids into local ones.
    fn plan_for(
        &self,
        layer: usize,
        x_len: usize,
        tokens: usize,
        work: &[Assignment],
    ) -> Result<Plan, ExpertError> {
        let shape = self.work_shape();
        let local = self
            .layers
            .get(layer)
            .and_then(Option::as_ref)
            .map_or(&[][..], |l| l.local.as_slice());
        let local_of = |e: u32| local.get(e as usize).copied().flatten();
        shape.check(layer, x_len, tokens, work, |e| local_of(e).is_some())?;
        let triples: Vec<(u32, u32, f32)> = work
            .iter()
            .filter_map(|a| local_of(a.expert).map(|l| (a.token, l, a.weight)))
            .collect();
        let n_local = self.layers[layer].as_ref().map_or(0, |l| l.experts.len());
        Plan::build(tokens, n_local, &triples).map_err(|e| ExpertError::Unavailable(e.to_string()))
    }

    fn stage_x(&self, x: &[f32], tokens: usize, dst: &mut Vec<u16>) {
        let (h, hp) = (self.hidden, self.h_pad);
        dst.clear();
        dst.resize(tokens * hp, 0);
        for (d, s) in dst.chunks_exact_mut(hp).zip(x.chunks_exact(h)) {
            for (d, s) in d.iter_mut().zip(s) {
                *d = bf16::from_f32(*s).to_bits();
            }
        }
    }

    /// One layer for a batch, host in and host out: `x` is `[tokens, hidden]` f32 (rounded
    /// to bf16 on upload), `work` holds model expert ids; returns `[tokens, hidden]` f32,
    /// `sum_k w_k * FFN_{e_k}(x_t)`. Two uploads (activations, plan), three launches, one
    /// download.
    pub fn forward_layer(
        &self,
        layer: usize,
        x: &[f32],
        tokens: usize,
        work: &[Assignment],
    ) -> Result<Vec<f32>, ExpertError> {
        let plan = self.plan_for(layer, x.len(), tokens, work)?;
        if tokens == 0 {
            return Ok(Vec::new());
        }
        if work.is_empty() {
            return Ok(vec![0.0; tokens * self.hidden]);
        }
        let lw = self.layers[layer]
            .as_ref()
            .ok_or(ExpertError::Unavailable(format!(
                "layer {layer} holds no experts"
            )))?;
        let mut guard = self
            .ws
            .lock()
            .map_err(|_| ExpertError::Unavailable("CUDA workspace lock poisoned".into()))?;
        self.ensure(&mut guard, tokens, plan.rows(), plan.tiles.len())
            .map_err(unavailable)?;
        let ws = &mut *guard;
        let mut host_x = std::mem::take(&mut ws.host_x);
        let mut host_plan = std::mem::take(&mut ws.host_plan);
        self.stage_x(x, tokens, &mut host_x);
        plan.pack_into(&mut host_plan);
        let result = (|| -> Result<Vec<f32>, CudaError> {
            let stream = &self.backend.stream;
            stream.memcpy_htod(&host_x, &mut ws.x)?;
            stream.memcpy_htod(&host_plan, &mut ws.plan)?;
            self.enqueue(
                lw,
                &ws.x,
                &ws.plan,
                BatchShape::of(&plan),
                &mut ws.act,
                &mut ws.yp,
                &mut ws.out,
            )?;
            let mut out = vec![0f32; tokens * self.hidden];
            stream.memcpy_dtoh(&ws.out.slice(..tokens * self.hidden), &mut out)?;
            stream.synchronize()?;
            Ok(out)
        })();
        ws.host_x = host_x;
        ws.host_plan = host_plan;
        result.map_err(unavailable)
    }

    /// Uploads a batch for [`Self::enqueue_batch`] (benchmarks: the layer timed alone).
    pub fn upload_batch(
        &self,
        layer: usize,
        x: &[f32],
        tokens: usize,
        work: &[Assignment],
    ) -> Result<DeviceBatch, ExpertError> {
        let plan = self.plan_for(layer, x.len(), tokens, work)?;
        let mut host_x = Vec::new();
        let mut host_plan = Vec::new();
        self.stage_x(x, tokens, &mut host_x);
        plan.pack_into(&mut host_plan);
        host_x.push(0); // never an empty allocation
        host_plan.push(0);
        let s = &self.backend.stream;
        let packing = self.layers[layer]
            .as_ref()
            .map_or_else(Vec::new, |l| l.experts.clone());
        Ok(DeviceBatch {
            tokens,
            rows: plan.rows(),
            tiles: plan.tiles.len(),
            max_expert_rows: plan.max_expert_rows(),
            packing,
            layout: plan.layout(),
            x: s.clone_htod(&host_x).map_err(|e| unavailable(e.into()))?,
            plan: s
                .clone_htod(&host_plan)
                .map_err(|e| unavailable(e.into()))?,
        })
    }

    /// Enqueues one layer over an uploaded batch into the output workspace; no host
    /// synchronisation. Read the result with [`Self::read_output`].
    pub fn enqueue_batch(&self, layer: usize, batch: &DeviceBatch) -> Result<(), CudaError> {
        let lw = self
            .layers
            .get(layer)
            .and_then(Option::as_ref)
            .ok_or_else(|| CudaError::Shape(format!("layer {layer} holds no experts")))?;
        if lw.experts != batch.packing {
            // Its local expert indices would address another layer's weights.
            return Err(CudaError::Shape(format!(
                "batch planned for experts {:?}, layer {layer} holds {:?}",
                batch.packing, lw.experts
            )));
        }
        let mut guard = self
            .ws
            .lock()
            .map_err(|_| CudaError::Driver("workspace lock poisoned".into()))?;
        self.ensure(&mut guard, batch.tokens, batch.rows, batch.tiles)?;
        let ws = &mut *guard;
        self.enqueue(
            lw,
            &batch.x,
            &batch.plan,
            BatchShape {
                tokens: batch.tokens,
                rows: batch.rows,
                tiles: batch.tiles,
                max_expert_rows: batch.max_expert_rows,
                layout: batch.layout,
            },
            &mut ws.act,
            &mut ws.yp,
            &mut ws.out,
        )
    }

    /// The first `tokens` rows of the output workspace (synchronises).
    pub fn read_output(&self, tokens: usize) -> Result<Vec<f32>, CudaError> {
        let guard = self
            .ws
            .lock()
            .map_err(|_| CudaError::Driver("workspace lock poisoned".into()))?;
        let n = tokens * self.hidden;
        if n > guard.out.len() {
            return Err(CudaError::Shape(format!(
                "{tokens} tokens exceed the workspace"
            )));
        }
        let mut out = vec![0f32; n];
        self.backend
            .stream
            .memcpy_dtoh(&guard.out.slice(..n), &mut out)?;
        self.backend.stream.synchronize()?;
        Ok(out)
    }

    /// The split-K slice count of the down projection for a batch of `tiles` row tiles
    /// (64 rows each, per expert): what [`Self::forward_layer`] will use.
    pub fn split_k(&self, tiles: usize) -> usize {
        self.down_splits(tiles).0
    }

    /// Split-K slices for the down projection: enough blocks to cover the device twice.
    /// A function of the batch's shape alone (not of the workspace's size), so the same
    /// batch always sums in the same order.
    fn down_splits(&self, tiles: usize) -> (usize, usize) {
        let nkt = self.f_pad.div_ceil(TILE_K);
        let blocks = tiles * self.h_pad.div_ceil(2 * TILE_N);
        let target = 2 * self.backend.sm_count;
        let mut splits = if blocks == 0 {
            1
        } else {
            target.div_ceil(blocks)
        };
        splits = splits
            .min(MAX_SPLITS)
            .min((nkt / MIN_KT_PER_SPLIT).max(1))
            .max(1);
        let per = nkt.div_ceil(splits);
        (nkt.div_ceil(per).max(1), per.max(1))
    }

    /// The fixed launch sequence of one layer: gate/up, down, combine, with the skinny
    /// pair for the first two when the batch fits them.
    #[allow(clippy::too_many_arguments)]
    fn enqueue(
        &self,
        lw: &LayerWeights,
        x: &CudaSlice<u16>,
        plan: &CudaSlice<i32>,
        shape: BatchShape,
        act: &mut CudaSlice<u16>,
        yp: &mut CudaSlice<f32>,
        out: &mut CudaSlice<f32>,
    ) -> Result<(), CudaError> {
        let BatchShape {
            tokens,
            rows,
            tiles,
            max_expert_rows,
            layout,
        } = shape;
        if tokens == 0 {
            return Ok(());
        }
        let k = &self.backend.moe;
        let stream = &self.backend.stream;
        let h_pad = to_i32(self.h_pad, "hidden")?;
        let f_pad = to_i32(self.f_pad, "ffn")?;
        let hidden = to_i32(self.hidden, "hidden")?;
        let skinny_rows = self.skinny_instance(max_expert_rows);
        let skinny = skinny_rows.is_some();
        let (splits, kt_per_split) = if skinny {
            (1, 0)
        } else {
            self.down_splits(tiles)
        };
        if splits * rows * self.h_pad > yp.len() {
            return Err(CudaError::Shape(format!(
                "split-K workspace holds {} values, {splits} x {rows} x {} needed",
                yp.len(),
                self.h_pad
            )));
        }
        let split_stride = (rows * self.h_pad) as i64;
        let splits_i = to_i32(splits, "splits")?;
        let kt_i = to_i32(kt_per_split, "kt_per_split")?;
        let view = |at: usize, len: usize| {
            plan.try_slice(at..at + len.max(1))
                .ok_or_else(|| CudaError::Shape(format!("plan buffer too short for {at}+{len}")))
        };
        let tok_off = view(layout.tok_off, tokens + 1)?;
        let tok_rows = view(layout.tok_rows, rows)?;
        if rows > 0 {
            let sorted_tok = view(layout.sorted_tok, rows)?;
            let sorted_w = view(layout.sorted_w, rows)?;
            let tile_view = view(layout.tiles, 4 * tiles)?;
            let tiles = to_u32(tiles, "tiles")?;
            // Both pairs take the same buffers; the skinny one has a warp per output column
            // and no split-K, the tiled one 128-wide column tiles and split-K over grid.z.
            let (gate_up, down, gu_grid, down_grid, threads) = if let Some(rows) = skinny_rows {
                let small = rows == SKINNY_SMALL_ROWS;
                (
                    if small {
                        &k.gate_up_skinny2
                    } else {
                        &k.gate_up_skinny
                    },
                    if small {
                        &k.down_skinny2
                    } else {
                        &k.down_skinny
                    },
                    (
                        tiles,
                        to_u32(self.f_pad.div_ceil(SKINNY_WARPS), "ffn columns")?,
                        1,
                    ),
                    (
                        tiles,
                        to_u32(self.h_pad.div_ceil(SKINNY_WARPS), "hidden columns")?,
                        1,
                    ),
                    to_u32(32 * SKINNY_WARPS, "threads")?,
                )
            } else {
                (
                    &k.gate_up,
                    &k.down,
                    (tiles, to_u32(self.f_pad.div_ceil(TILE_N), "ffn tiles")?, 1),
                    (
                        tiles,
                        to_u32(self.h_pad.div_ceil(2 * TILE_N), "hidden tiles")?,
                        to_u32(splits, "splits")?,
                    ),
                    THREADS,
                )
            };
            let cfg = |grid_dim| LaunchConfig {
                grid_dim,
                block_dim: (threads, 1, 1),
                shared_mem_bytes: 0,
            };
            let mut b = stream.launch_builder(gate_up);
            b.arg(x)
                .arg(&lw.wgu)
                .arg(&sorted_tok)
                .arg(&tile_view)
                .arg(&mut *act)
                .arg(&h_pad)
                .arg(&f_pad);
            // SAFETY: argument types and buffer sizes follow the contract of moe_gate_up and
            // moe_gate_up_skinny in kernels/moe.cu: x [tokens][H'], wgu [E][2F'][H'],
            // act [rows][F'] (rows <= act); the skinny kernel only with at most SK_ROWS
            // rows per tile (takes_skinny).
            unsafe { b.launch(cfg(gu_grid)) }?;

            let mut b = stream.launch_builder(down);
            b.arg(&*act)
                .arg(&lw.wd)
                .arg(&sorted_w)
                .arg(&tile_view)
                .arg(&mut *yp)
                .arg(&f_pad)
                .arg(&h_pad);
            if !skinny {
                b.arg(&kt_i).arg(&split_stride);
            }
            // SAFETY: moe_down's / moe_down_skinny's contract: act [rows][F'],
            // wd [E][H'][F'], yp [splits][rows][H'] with splits * rows * H' <= yp.len()
            // (down_splits; one slice for the skinny kernel).
            unsafe { b.launch(cfg(down_grid)) }?;
        }
        let cfg = LaunchConfig {
            grid_dim: (
                to_u32(tokens, "tokens")?,
                to_u32(self.hidden.div_ceil(256), "hidden blocks")?,
                1,
            ),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = stream.launch_builder(&k.combine);
        b.arg(&*yp)
            .arg(&tok_off)
            .arg(&tok_rows)
            .arg(&mut *out)
            .arg(&hidden)
            .arg(&h_pad)
            .arg(&splits_i)
            .arg(&split_stride);
        // SAFETY: moe_combine reads yp rows listed in tok_rows (all < rows) and writes
        // out [tokens][hidden] (tokens <= workspace).
        unsafe { b.launch(cfg) }?;
        Ok(())
    }
}

impl Experts for CudaExperts {
    fn forward(&self, layer: usize, x: &[f32], routing: &Routing) -> Result<Vec<f32>, ExpertError> {
        self.forward_layer(layer, x, routing.tokens(), &assignments(routing))
    }
}
