//! The dense part of the model on the device that runs it: [`Model`] (f32, CPU) or
//! [`CudaModel`] (bf16 weights, one GPU), with the KV cache that lives beside it. Callers
//! (the scheduler, `generate`, `verify`) hold one [`DenseModel`] and one [`KvCache`] and
//! never ask which; a cache only works with the model that made it.

use std::path::Path;

use crate::checkpoint::Checkpoint;
use crate::config::ModelConfig;
use crate::cuda::{CudaBackend, CudaError, CudaKvCache, CudaModel, Device};
use crate::experts::Experts;
use crate::kv_cache::{KvCacheError, PagedKvCache, SeqCache};
use crate::model::{ForwardOutput, LogitsFor, Model, ModelError, SeqChunk};
use crate::ops::CpuWeights;

// One per process, behind an Arc: the variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
pub enum DenseModel {
    Cpu(Model),
    Cuda(CudaModel),
}

/// The KV cache of a [`DenseModel`], on the same device.
pub enum KvCache {
    Cpu(PagedKvCache),
    Cuda(CudaKvCache),
}

impl From<Model> for DenseModel {
    fn from(m: Model) -> Self {
        DenseModel::Cpu(m)
    }
}

impl DenseModel {
    /// Loads the dense weights of the checkpoint in `dir` onto `device` (`Auto` resolved
    /// here); the experts are loaded separately from the returned checkpoint.
    pub fn load(device: Device, dir: &Path) -> Result<(Self, Checkpoint), ModelError> {
        Self::load_as(device, dir, CpuWeights::Auto)
    }

    /// [`DenseModel::load`], the CPU holding what it reads (the dense layers here, and
    /// whatever is later loaded through the returned checkpoint) as `policy` says.
    pub fn load_as(
        device: Device,
        dir: &Path,
        policy: CpuWeights,
    ) -> Result<(Self, Checkpoint), ModelError> {
        let config = ModelConfig::from_dir(dir)?;
        let ckpt = Checkpoint::open_quantized(dir, config.quantization)?.with_cpu_weights(policy);
        let model = Self::from_checkpoint(device, config, &ckpt)?;
        Ok((model, ckpt))
    }

    pub fn from_checkpoint(
        device: Device,
        config: ModelConfig,
        ckpt: &Checkpoint,
    ) -> Result<Self, ModelError> {
        // Asked for by name, a device that cannot run the family is an error before any
        // GPU is touched; `auto` falls back to the CPU for it.
        if let Device::Cuda(_) = device {
            CudaModel::supports(&config)?;
        }
        let device = match device.resolve()? {
            Device::Cuda(_) if CudaModel::supports(&config).is_err() => {
                tracing::info!(
                    model_type = %config.model_type,
                    "--device auto: the CUDA dense path runs mixtral only; dense layers on the CPU"
                );
                Device::Cpu
            }
            resolved => resolved,
        };
        Ok(match device {
            Device::Cuda(n) => DenseModel::Cuda(CudaModel::from_checkpoint(
                CudaBackend::new(n)?,
                config,
                ckpt,
            )?),
            Device::Cpu | Device::Auto => DenseModel::Cpu(Model::from_checkpoint(config, ckpt)?),
        })
    }

    pub fn config(&self) -> &ModelConfig {
        match self {
            DenseModel::Cpu(m) => m.config(),
            DenseModel::Cuda(m) => m.config(),
        }
    }

    /// `cpu`, or `cuda:N (GPU NAME)`.
    pub fn device(&self) -> String {
        match self {
            DenseModel::Cpu(_) => "cpu".into(),
            DenseModel::Cuda(m) => m.backend().label(),
        }
    }

    /// A KV cache holding `bytes` of f32 keys and values over all layers, on the model's
    /// device. Fails only on a GPU (out of memory, or a bad block size).
    pub fn new_kv_cache(&self, block_size: usize, bytes: usize) -> Result<KvCache, ModelError> {
        if block_size == 0 {
            return Err(ModelError::Device(CudaError::Shape(
                "KV cache block size must be positive".into(),
            )));
        }
        Ok(match self {
            DenseModel::Cpu(m) => KvCache::Cpu(m.new_kv_cache(block_size, bytes)),
            DenseModel::Cuda(m) => KvCache::Cuda(m.new_kv_cache(block_size, bytes)?),
        })
    }

    /// [`Model::forward`] on this model's device.
    pub fn forward(
        &self,
        kv: &mut KvCache,
        experts: &dyn Experts,
        batch: &mut [SeqChunk<'_>],
        logits_for: LogitsFor,
        trace_routing: bool,
    ) -> Result<ForwardOutput, ModelError> {
        self.forward_split(kv, experts, batch, logits_for, trace_routing, 1)
    }

    /// The most micro-batches [`DenseModel::forward_split`] splits a step of `tokens`
    /// tokens in `chunks` chunks into.
    pub fn max_micro_batches(&self, tokens: usize, chunks: usize) -> usize {
        match self {
            DenseModel::Cpu(_) => crate::model::max_micro_batches(tokens, chunks),
            DenseModel::Cuda(_) => 1,
        }
    }

    /// [`DenseModel::forward`] in up to `micro_batches` micro-batches taking turns
    /// (`Model::forward_split`; the CUDA path runs one batch for now).
    pub fn forward_split(
        &self,
        kv: &mut KvCache,
        experts: &dyn Experts,
        batch: &mut [SeqChunk<'_>],
        logits_for: LogitsFor,
        trace_routing: bool,
        micro_batches: usize,
    ) -> Result<ForwardOutput, ModelError> {
        match (self, kv) {
            (DenseModel::Cpu(m), KvCache::Cpu(kv)) => {
                m.forward_split(kv, experts, batch, logits_for, trace_routing, micro_batches)
            }
            (DenseModel::Cuda(m), KvCache::Cuda(kv)) => {
                Ok(m.forward(kv, experts, batch, logits_for, trace_routing)?)
            }
            _ => Err(ModelError::Device(CudaError::Shape(
                "the KV cache is on a different device than the model".into(),
            ))),
        }
    }
}

impl KvCache {
    pub fn block_size(&self) -> usize {
        match self {
            KvCache::Cpu(c) => c.block_size(),
            KvCache::Cuda(c) => c.block_size(),
        }
    }

    pub fn num_blocks(&self) -> usize {
        match self {
            KvCache::Cpu(c) => c.num_blocks(),
            KvCache::Cuda(c) => c.num_blocks(),
        }
    }

    pub fn free_blocks(&self) -> usize {
        match self {
            KvCache::Cpu(c) => c.free_blocks(),
            KvCache::Cuda(c) => c.free_blocks(),
        }
    }

    /// Blocks a sequence of `len` positions occupies.
    pub fn blocks_for(&self, len: usize) -> usize {
        match self {
            KvCache::Cpu(c) => c.blocks_for(len),
            KvCache::Cuda(c) => c.blocks_for(len),
        }
    }

    /// Makes room for `extra` more positions in `seq`, all or nothing.
    pub fn reserve(&mut self, seq: &mut SeqCache, extra: usize) -> Result<(), KvCacheError> {
        match self {
            KvCache::Cpu(c) => c.reserve(seq, extra),
            KvCache::Cuda(c) => c.reserve(seq, extra),
        }
    }

    /// Returns every block of `seq` to the pool.
    pub fn release(&mut self, seq: &mut SeqCache) {
        match self {
            KvCache::Cpu(c) => c.release(seq),
            KvCache::Cuda(c) => c.release(seq),
        }
    }

    /// Blocks of the pool's bookkeeping: [`PagedKvCache`] on the CPU, its block book on
    /// a GPU (the blocks live in device memory; which holds what is the same).
    fn book(&mut self) -> &mut PagedKvCache {
        match self {
            KvCache::Cpu(c) => c,
            KvCache::Cuda(c) => c.book_mut(),
        }
    }

    /// See [`PagedKvCache::reuse_prefix`].
    pub fn reuse_prefix(&mut self, seq: &mut SeqCache, tokens: &[u32]) -> usize {
        self.book().reuse_prefix(seq, tokens)
    }

    /// See [`PagedKvCache::remember_prefix`].
    pub fn remember_prefix(&mut self, seq: &SeqCache, tokens: &[u32]) {
        self.book().remember_prefix(seq, tokens)
    }

    /// See [`PagedKvCache::set_prefix_caching`].
    pub fn set_prefix_caching(&mut self, on: bool) {
        self.book().set_prefix_caching(on)
    }

    pub fn cached_blocks(&self) -> usize {
        match self {
            KvCache::Cpu(c) => c.cached_blocks(),
            KvCache::Cuda(c) => c.cached_blocks(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::experts::{ExpertSelection, ExpertStore};

    fn fixture() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/mixtral-tiny")
    }

    /// Through the enum the CPU path is `Model::forward` itself: the same logits, bit
    /// for bit, and the same block accounting.
    #[test]
    fn cpu_dense_model_is_the_mixtral_forward() {
        let dir = fixture();
        let (dense, ckpt) = DenseModel::load(Device::Cpu, &dir).unwrap();
        let (direct, _) = Model::load(&dir).unwrap();
        let experts = ExpertStore::load(&ckpt, dense.config(), &ExpertSelection::All).unwrap();
        let mut kv = dense.new_kv_cache(4, 1 << 20).unwrap();
        let mut kv_direct = direct.new_kv_cache(4, 1 << 20);
        assert_eq!(kv.num_blocks(), kv_direct.num_blocks());
        let tokens = [1u32, 17, 42, 7, 99];
        let (mut a, mut b) = (SeqCache::new(), SeqCache::new());
        let ours = dense
            .forward(
                &mut kv,
                &experts,
                &mut [SeqChunk {
                    tokens: &tokens,
                    cache: &mut a,
                }],
                LogitsFor::EveryToken,
                false,
            )
            .unwrap();
        let theirs = direct
            .forward(
                &mut kv_direct,
                &experts,
                &mut [SeqChunk {
                    tokens: &tokens,
                    cache: &mut b,
                }],
                LogitsFor::EveryToken,
                false,
            )
            .unwrap();
        assert_eq!(ours.logits, theirs.logits);
        assert_eq!(kv.free_blocks(), kv_direct.free_blocks());
        assert_eq!(kv.blocks_for(5), 2);
        kv.release(&mut a);
        assert_eq!(kv.free_blocks(), kv.num_blocks());
    }

    /// `--cpu-weights` reaches the dense layers (the CPU path is `Model::load_as`'s
    /// forward, bit for bit, and not the checkpoint format's) and the experts loaded
    /// through the checkpoint it returns.
    #[test]
    fn load_as_holds_the_dense_layers_and_experts_as_asked() {
        let dir = fixture();
        let logits = |model: &DenseModel, ckpt: &Checkpoint| {
            let experts = ExpertStore::load(ckpt, model.config(), &ExpertSelection::All).unwrap();
            let (l, e) = experts.held()[0];
            let format = experts.get(l, e).unwrap().down.weight.format();
            let mut kv = model.new_kv_cache(4, 1 << 20).unwrap();
            let mut cache = SeqCache::new();
            let out = model
                .forward(
                    &mut kv,
                    &experts,
                    &mut [SeqChunk {
                        tokens: &[1, 17, 42, 7, 99],
                        cache: &mut cache,
                    }],
                    LogitsFor::EveryToken,
                    false,
                )
                .unwrap();
            (out.logits, format)
        };
        let (int8, ckpt) = DenseModel::load_as(Device::Cpu, &dir, CpuWeights::Int8).unwrap();
        let (direct, _) = Model::load_as(&dir, CpuWeights::Int8).unwrap();
        let (auto, auto_ckpt) = DenseModel::load(Device::Cpu, &dir).unwrap();
        let (ours, format) = logits(&int8, &ckpt);
        assert_eq!(format, crate::ops::WeightFormat::Int8);
        assert_eq!(ours, logits(&DenseModel::Cpu(direct), &ckpt).0);
        assert_ne!(
            ours,
            logits(&auto, &ckpt).0,
            "the dense layers were not int8"
        );
        assert_eq!(logits(&auto, &auto_ckpt).1, crate::ops::WeightFormat::F32);
    }

    #[test]
    fn a_zero_block_size_is_an_error_not_a_panic() {
        let (dense, _) = DenseModel::load(Device::Cpu, &fixture()).unwrap();
        assert!(matches!(
            dense.new_kv_cache(0, 1 << 20),
            Err(ModelError::Device(CudaError::Shape(_)))
        ));
    }

    #[test]
    fn an_unusable_gpu_is_a_typed_error() {
        if crate::cuda::device_count().is_ok() {
            return; // a GPU machine: the ignored GPU tests cover this path
        }
        let err = DenseModel::load(Device::Cuda(0), &fixture()).err();
        assert!(
            matches!(err, Some(ModelError::Device(_))),
            "{:?}",
            err.map(|e| e.to_string())
        );
    }

    /// A family the CUDA dense path does not run is refused by name before any GPU is
    /// looked for (this machine has none: the error must not be "no device").
    #[test]
    fn cuda_dense_refuses_other_families_by_name() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/deepseek-v3-tiny");
        let err = match DenseModel::load(Device::Cuda(0), &dir) {
            Ok(_) => panic!("loaded deepseek_v3 onto the CUDA dense path"),
            Err(e) => e.to_string(),
        };
        assert!(
            err.contains("mixtral only") && err.contains("deepseek_v3"),
            "{err}"
        );
    }
}
