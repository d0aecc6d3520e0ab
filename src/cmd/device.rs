//! `--device`, shared by the commands that compute.

use anyhow::{Context, Result};
use switchyard_engine::cuda::Device;

#[derive(clap::Args, Clone, Debug)]
pub struct DeviceArgs {
    /// Where this process computes: cpu, cuda (GPU 0), cuda:N, or auto (GPU 0 when
    /// usable, else the CPU). On a GPU the weights are bf16 (f32 accumulation): the dense
    /// layers (embedding, attention, router, LM head) of `generate`, `verify` and a
    /// coordinator, and the experts of an expert node or an in-process coordinator. `up`
    /// gives it to the coordinator and every expert node it starts (they share the GPU).
    #[arg(long, default_value = "cpu", value_name = "cpu|cuda|cuda:N|auto")]
    pub device: Device,
}

impl DeviceArgs {
    /// The concrete device (`auto` settled), or the reason an explicit CUDA device cannot
    /// be used: checked at start-up, not at the first request.
    pub fn resolve(&self) -> Result<Device> {
        self.device
            .resolve()
            .with_context(|| format!("--device {}: cannot use this device", self.device))
    }
}
