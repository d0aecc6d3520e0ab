//! The experts this process computes itself, on the CPU or on one CUDA device, behind one
//! type: what an expert node serves and what `generate`, `verify` and an in-process
//! coordinator run. Loading and unloading at run time work the same on either device.

use crate::checkpoint::Checkpoint;
use crate::config::ModelConfig;
use crate::cuda::{CudaBackend, CudaError, CudaExperts, Device, LoadError};
use crate::experts::{
    Assignment, ExpertError, ExpertFfn, ExpertSelection, ExpertStore, Experts, load_expert,
};
use crate::ops::WeightFormat;
use crate::router::Routing;

/// Token rows the GPU workspaces are first sized for; they grow on a larger batch.
const CUDA_INITIAL_TOKENS: usize = 256;

pub enum LocalExperts {
    Cpu(ExpertStore),
    // Boxed: the GPU store carries its workspaces and stream, the CPU one is a few Vecs.
    Cuda(Box<CudaExperts>),
}

impl LocalExperts {
    /// Nothing loaded yet, on `device` (`Auto` is resolved here).
    pub fn empty(device: Device, cfg: &ModelConfig) -> Result<Self, CudaError> {
        Ok(match device.resolve()? {
            Device::Cuda(n) => LocalExperts::Cuda(Box::new(CudaExperts::for_config(
                CudaBackend::new(n)?,
                cfg,
                CUDA_INITIAL_TOKENS,
            )?)),
            Device::Cpu | Device::Auto => LocalExperts::Cpu(ExpertStore::empty(cfg)),
        })
    }

    /// Loads the selected experts onto `device`: f32 on the CPU, bf16 on a GPU (read in
    /// f32 one expert at a time, rounded on upload).
    pub fn load(
        device: Device,
        ckpt: &Checkpoint,
        cfg: &ModelConfig,
        selection: &ExpertSelection,
    ) -> Result<Self, LoadError> {
        Ok(match device.resolve()? {
            Device::Cuda(n) => LocalExperts::Cuda(Box::new(CudaExperts::load(
                CudaBackend::new(n)?,
                ckpt,
                cfg,
                selection,
                CUDA_INITIAL_TOKENS,
            )?)),
            Device::Cpu | Device::Auto => {
                LocalExperts::Cpu(ExpertStore::load(ckpt, cfg, selection)?)
            }
        })
    }

    /// `cpu`, or `cuda:N (GPU NAME)`: what Describe and the cluster record report.
    pub fn device(&self) -> String {
        match self {
            LocalExperts::Cpu(_) => "cpu".into(),
            LocalExperts::Cuda(c) => c.backend().label(),
        }
    }

    pub fn hidden(&self) -> usize {
        match self {
            LocalExperts::Cpu(s) => s.hidden(),
            LocalExperts::Cuda(c) => c.hidden(),
        }
    }

    /// (layer, expert) pairs held, in order.
    pub fn held(&self) -> Vec<(usize, usize)> {
        match self {
            LocalExperts::Cpu(s) => s.held(),
            LocalExperts::Cuda(c) => c.held(),
        }
    }

    /// Memory one expert's weights take on this device, and the format they are held in:
    /// on the CPU what a held expert takes (bf16 when the checkpoint is, else f32; with
    /// none held, one is read from the checkpoint to see), padded bf16 on a GPU.
    pub fn expert_footprint(&self, cfg: &ModelConfig, ckpt: &Checkpoint) -> (u64, WeightFormat) {
        match self {
            LocalExperts::Cpu(s) => {
                let of = |f: &ExpertFfn| (f.bytes(), f.down.weight.format());
                let held = s.held().first().and_then(|&(l, e)| s.get(l, e)).map(of);
                held.or_else(|| load_expert(ckpt, cfg, 0, 0).ok().map(|f| of(&f)))
                    .unwrap_or((
                        3 * cfg.hidden_size as u64 * cfg.moe_intermediate_size as u64 * 4,
                        WeightFormat::F32,
                    ))
            }
            LocalExperts::Cuda(c) => (c.bytes_per_expert(), WeightFormat::Bf16),
        }
    }

    /// Adds experts (replacing any already held under the same ids). On a GPU each
    /// touched layer is re-packed once, whatever the number of experts added to it.
    pub fn insert_many(
        &mut self,
        experts: Vec<(usize, usize, ExpertFfn)>,
    ) -> Result<(), CudaError> {
        match self {
            LocalExperts::Cpu(s) => {
                for (layer, expert, ffn) in experts {
                    s.insert(layer, expert, ffn);
                }
                Ok(())
            }
            LocalExperts::Cuda(c) => {
                let mut layers: Vec<usize> = experts.iter().map(|(l, _, _)| *l).collect();
                layers.sort_unstable();
                layers.dedup();
                for layer in layers {
                    let add: Vec<(u32, &ExpertFfn)> = experts
                        .iter()
                        .filter(|(l, _, _)| *l == layer)
                        .map(|(_, e, f)| (*e as u32, f))
                        .collect();
                    let keep: Vec<u32> = c
                        .experts_of(layer)
                        .unwrap_or(&[])
                        .iter()
                        .copied()
                        .filter(|e| add.iter().all(|(a, _)| a != e))
                        .collect();
                    c.replace_layer(layer, &keep, &add)?;
                }
                Ok(())
            }
        }
    }

    /// Drops experts; those not held are ignored.
    pub fn remove_many(&mut self, experts: &[(usize, usize)]) -> Result<(), CudaError> {
        match self {
            LocalExperts::Cpu(s) => {
                for &(layer, expert) in experts {
                    s.remove(layer, expert);
                }
                Ok(())
            }
            LocalExperts::Cuda(c) => {
                let mut layers: Vec<usize> = experts.iter().map(|(l, _)| *l).collect();
                layers.sort_unstable();
                layers.dedup();
                for layer in layers {
                    let Some(now) = c.experts_of(layer) else {
                        continue;
                    };
                    let keep: Vec<u32> = now
                        .iter()
                        .copied()
                        .filter(|e| !experts.contains(&(layer, *e as usize)))
                        .collect();
                    if keep.len() != now.len() {
                        c.replace_layer(layer, &keep, &[])?;
                    }
                }
                Ok(())
            }
        }
    }

    /// Checks a unit of work against the model and the experts held, computing nothing.
    pub fn validate(
        &self,
        layer: usize,
        x_len: usize,
        tokens: usize,
        work: &[Assignment],
    ) -> Result<(), ExpertError> {
        match self {
            LocalExperts::Cpu(s) => s.validate(layer, x_len, tokens, work),
            LocalExperts::Cuda(c) => c.validate(layer, x_len, tokens, work),
        }
    }

    /// For each token row of `x` (`[tokens, hidden]`), the weighted sum of its assigned
    /// experts' outputs.
    pub fn combine(
        &self,
        layer: usize,
        x: &[f32],
        tokens: usize,
        work: &[Assignment],
    ) -> Result<Vec<f32>, ExpertError> {
        match self {
            LocalExperts::Cpu(s) => s.combine(layer, x, tokens, work),
            LocalExperts::Cuda(c) => c.forward_layer(layer, x, tokens, work),
        }
    }
}

impl Experts for LocalExperts {
    fn forward(&self, layer: usize, x: &[f32], routing: &Routing) -> Result<Vec<f32>, ExpertError> {
        match self {
            LocalExperts::Cpu(s) => s.forward(layer, x, routing),
            LocalExperts::Cuda(c) => c.forward(layer, x, routing),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn fixture() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/mixtral-tiny")
    }

    #[test]
    fn cpu_insert_remove_held_and_device() {
        let cfg = ModelConfig::from_dir(&fixture()).unwrap();
        let ckpt = Checkpoint::open(&fixture()).unwrap();
        let mut x = LocalExperts::load(
            Device::Cpu,
            &ckpt,
            &cfg,
            &ExpertSelection::Only([(0, 1)].into_iter().collect()),
        )
        .unwrap();
        assert_eq!(x.device(), "cpu");
        let ffn = crate::experts::load_expert(&ckpt, &cfg, 2, 3).unwrap();
        x.insert_many(vec![(2, 3, ffn)]).unwrap();
        assert_eq!(x.held(), vec![(0, 1), (2, 3)]);
        x.remove_many(&[(0, 1), (1, 1)]).unwrap();
        assert_eq!(x.held(), vec![(2, 3)]);
        let work = [Assignment {
            token: 0,
            expert: 1,
            weight: 1.0,
        }];
        let h = cfg.hidden_size;
        assert!(matches!(
            x.combine(0, &vec![0.0; h], 1, &work),
            Err(ExpertError::NotHeld { .. })
        ));
        assert_eq!(
            x.expert_footprint(&cfg, &ckpt).0,
            3 * (h * cfg.moe_intermediate_size * 4) as u64
        );
    }

    #[test]
    fn auto_is_the_cpu_without_a_gpu_and_cuda_is_an_error() {
        if crate::cuda::device_count().is_ok() {
            return;
        }
        let cfg = ModelConfig::from_dir(&fixture()).unwrap();
        assert_eq!(
            LocalExperts::empty(Device::Auto, &cfg).unwrap().device(),
            "cpu"
        );
        assert!(matches!(
            LocalExperts::empty(Device::Cuda(0), &cfg),
            Err(CudaError::NoDriver | CudaError::NoDevice(_) | CudaError::NoNvrtc)
        ));
    }
}
