//! The CUDA backend: cudarc with the driver and NVRTC opened at run time, so the build and
//! every CPU path work on machines without CUDA. Kernels are the `.cu` files of
//! `engine/kernels/`, compiled by NVRTC for the device's compute capability at start-up
//! and cached on disk ([`ptx`]).
//!
//! Entry points: [`Device`] (what `--device` parses to) and [`Device::resolve`];
//! [`CudaBackend::new`] (context, stream, compiled kernels); [`CudaExperts`] (a node's
//! experts on the GPU, implementing [`crate::Experts`]).

pub mod dense;
pub mod experts;
pub mod model;
pub mod plan;
pub mod ptx;

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream};

pub use dense::{DenseKernels, PagedDecode};
pub use experts::{CudaExperts, DeviceBatch, LoadError, SKINNY_MAX_ROWS};
pub use model::{CudaKvCache, CudaModel, CudaModelError, PlanChunk, StepPlan};
pub use plan::{Plan, PlanError, Tile};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CudaError {
    #[error("no CUDA driver: libcuda could not be loaded")]
    NoDriver,
    #[error("no CUDA device: {0}")]
    NoDevice(String),
    #[error(
        "NVRTC not found: libnvrtc could not be loaded (install the CUDA toolkit, or run \
         `scripts/install-nvrtc` and put the directory it prints on LD_LIBRARY_PATH)"
    )]
    NoNvrtc,
    #[error("NVRTC: {0}")]
    Nvrtc(String),
    #[error("CUDA driver: {0}")]
    Driver(String),
    #[error("unsupported: {0}")]
    Unsupported(String),
    #[error("bad device {0:?}: expected cpu, cuda, cuda:N or auto")]
    BadDevice(String),
    #[error("{0}")]
    Shape(String),
}

impl From<cudarc::driver::DriverError> for CudaError {
    fn from(e: cudarc::driver::DriverError) -> Self {
        CudaError::Driver(e.to_string())
    }
}

/// Where a model or an expert node computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Device {
    Cpu,
    /// A CUDA device ordinal.
    Cuda(usize),
    /// CUDA device 0 when one is usable, else the CPU.
    #[default]
    Auto,
}

impl FromStr for Device {
    type Err = CudaError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim().to_ascii_lowercase();
        match t.as_str() {
            "cpu" => Ok(Device::Cpu),
            "cuda" | "gpu" => Ok(Device::Cuda(0)),
            "auto" => Ok(Device::Auto),
            _ => t
                .strip_prefix("cuda:")
                .and_then(|n| n.parse::<usize>().ok())
                .map(Device::Cuda)
                .ok_or_else(|| CudaError::BadDevice(s.to_string())),
        }
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
            Device::Auto => write!(f, "auto"),
        }
    }
}

impl Device {
    /// A concrete device: `Cpu` or `Cuda(n)`. `Auto` becomes `Cuda(0)` when a device and
    /// NVRTC are usable, else `Cpu` with one info line saying why. An explicit `Cuda(n)`
    /// that is not usable is an error.
    pub fn resolve(self) -> Result<Device, CudaError> {
        match self {
            Device::Cpu => Ok(Device::Cpu),
            Device::Cuda(n) => {
                check_usable(n)?;
                Ok(Device::Cuda(n))
            }
            Device::Auto => match check_usable(0) {
                Ok(()) => Ok(Device::Cuda(0)),
                Err(e) => {
                    tracing::info!(reason = %e, "--device auto: no usable CUDA device, using the CPU");
                    Ok(Device::Cpu)
                }
            },
        }
    }
}

fn check_usable(ordinal: usize) -> Result<(), CudaError> {
    let count = device_count()?;
    if ordinal >= count {
        return Err(CudaError::NoDevice(format!(
            "device {ordinal} requested, {count} present"
        )));
    }
    if !ptx::nvrtc_available() {
        return Err(CudaError::NoNvrtc);
    }
    Ok(())
}

/// True when libcuda can be opened. Never panics.
pub fn driver_available() -> bool {
    // SAFETY: only tries to dlopen the library by its usual names.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// The number of CUDA devices; `Err(NoDriver)` without libcuda, `Err(NoDevice)` when the
/// driver reports none (or fails to initialise). Never panics.
pub fn device_count() -> Result<usize, CudaError> {
    if !driver_available() {
        return Err(CudaError::NoDriver);
    }
    match CudaContext::device_count() {
        Ok(n) if n > 0 => Ok(n as usize),
        Ok(_) => Err(CudaError::NoDevice("the driver reports no devices".into())),
        Err(e) => Err(CudaError::NoDevice(e.to_string())),
    }
}

/// The compiled MoE kernels.
pub struct MoeKernels {
    pub module: Arc<CudaModule>,
    pub gate_up: CudaFunction,
    pub down: CudaFunction,
    /// The decode-shaped pair: at most `SK_ROWS` rows per expert (`experts.rs`).
    pub gate_up_skinny: CudaFunction,
    pub down_skinny: CudaFunction,
    /// The same for at most 2 rows per expert (fewer registers, more warps per SM).
    pub gate_up_skinny2: CudaFunction,
    pub down_skinny2: CudaFunction,
    pub combine: CudaFunction,
    pub fill_u32: CudaFunction,
}

/// One CUDA device: its context, the stream all work goes on, and the compiled kernels.
pub struct CudaBackend {
    pub ctx: Arc<CudaContext>,
    pub ordinal: usize,
    pub stream: Arc<CudaStream>,
    pub arch: String,
    pub name: String,
    pub sm_count: usize,
    pub moe: MoeKernels,
}

impl CudaBackend {
    /// Opens device `ordinal` and compiles (or loads from the PTX cache) the kernels.
    /// Returns `Err(NoDriver)` / `Err(NoDevice)` / `Err(NoNvrtc)` on machines without them;
    /// never panics.
    pub fn new(ordinal: usize) -> Result<Arc<Self>, CudaError> {
        check_usable(ordinal)?;
        let ctx = CudaContext::new(ordinal)?;
        // One stream for everything: cudarc's per-buffer event tracking is not needed.
        // SAFETY: no other stream of this context touches our buffers.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.default_stream();
        let (major, minor) = ctx.compute_capability()?;
        let arch = ptx::arch_for(major, minor)?;
        let name = ctx.name().unwrap_or_else(|_| "unknown".into());
        let sm_count = ctx
            .attribute(
                cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
            )
            .map(|n| n.max(1) as usize)
            .unwrap_or(1);
        let text = ptx::load_or_compile(&ptx::MOE, &arch, ptx::cache_dir().as_deref())?;
        let module = ctx.load_module(cudarc::nvrtc::Ptx::from_src(text))?;
        let moe = MoeKernels {
            gate_up: module.load_function("moe_gate_up")?,
            down: module.load_function("moe_down")?,
            gate_up_skinny: module.load_function("moe_gate_up_skinny")?,
            down_skinny: module.load_function("moe_down_skinny")?,
            gate_up_skinny2: module.load_function("moe_gate_up_skinny2")?,
            down_skinny2: module.load_function("moe_down_skinny2")?,
            combine: module.load_function("moe_combine")?,
            fill_u32: module.load_function("fill_u32")?,
            module,
        };
        tracing::info!(ordinal, %name, %arch, sm_count, "CUDA backend ready");
        Ok(Arc::new(CudaBackend {
            ctx,
            ordinal,
            stream,
            arch,
            name,
            sm_count,
            moe,
        }))
    }

    /// How the device is reported to users and in cluster records: `cuda:N (NAME)`.
    pub fn label(&self) -> String {
        format!("{} ({})", Device::Cuda(self.ordinal), self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_devices() {
        assert_eq!("cpu".parse::<Device>().unwrap(), Device::Cpu);
        assert_eq!("CUDA".parse::<Device>().unwrap(), Device::Cuda(0));
        assert_eq!("cuda:3".parse::<Device>().unwrap(), Device::Cuda(3));
        assert_eq!("auto".parse::<Device>().unwrap(), Device::Auto);
        for bad in ["", "cuda:", "cuda:x", "cuda:-1", "tpu", "cuda:1:2"] {
            assert!(bad.parse::<Device>().is_err(), "{bad:?}");
        }
        for d in [Device::Cpu, Device::Cuda(2), Device::Auto] {
            assert_eq!(d.to_string().parse::<Device>().unwrap(), d);
        }
    }

    #[test]
    fn never_panics_without_cuda() {
        // On a machine without libcuda every entry point reports it as an error.
        if !driver_available() {
            assert_eq!(device_count(), Err(CudaError::NoDriver));
            assert!(matches!(CudaBackend::new(0), Err(CudaError::NoDriver)));
            assert_eq!(Device::Auto.resolve(), Ok(Device::Cpu));
            assert_eq!(Device::Cuda(0).resolve(), Err(CudaError::NoDriver));
        }
        assert_eq!(Device::Cpu.resolve(), Ok(Device::Cpu));
    }
}
