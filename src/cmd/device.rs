//! `--device`, shared by the commands that compute.

use anyhow::{Context, Result};
use switchyard_engine::cuda::Device;

#[derive(clap::Args, Clone, Debug)]
pub struct DeviceArgs {
    /// Where the experts computed by this process run: cpu, cuda (GPU 0), cuda:N, or auto
    /// (GPU 0 when usable, else the CPU). GPU experts are bf16. The dense layers
    /// (embedding, attention, router, LM head) run on the CPU whatever this says: there is
    /// no GPU dense path yet. `coordinator` uses it only with --in-process; `up` also
    /// gives it to every expert node it starts.
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

    /// [`Self::resolve`] for a command that also runs dense layers: says once, when the
    /// experts go to a GPU, that the dense layers stay on the CPU.
    pub fn resolve_with_dense_on_cpu(&self) -> Result<Device> {
        let device = self.resolve()?;
        if let Device::Cuda(_) = device {
            tracing::info!(
                %device,
                "experts run on {device}; the dense layers (attention, router, LM head) run on the CPU: no GPU dense path yet"
            );
        }
        Ok(device)
    }
}
