//! Kernel sources and their run-time compilation to PTX with NVRTC, cached on disk.
//!
//! The cache key is a 64-bit FNV-1a hash of the source, the architecture, the compile
//! options and the NVRTC version: stable across runs and machines (no `RandomState`).

use std::path::{Path, PathBuf};

use cudarc::nvrtc::{CompileOptions, Ptx};

use super::CudaError;

/// One `.cu` file of `engine/kernels/` and the entry points it must define.
#[derive(Debug, Clone, Copy)]
pub struct KernelSource {
    pub name: &'static str,
    pub src: &'static str,
    pub functions: &'static [&'static str],
}

/// The MoE expert kernels.
pub const MOE: KernelSource = KernelSource {
    name: "moe",
    src: include_str!("../../kernels/moe.cu"),
    functions: &[
        "moe_gate_up",
        "moe_down",
        "moe_gate_up_skinny",
        "moe_down_skinny",
        "moe_gate_up_skinny2",
        "moe_down_skinny2",
        "moe_combine",
        "fill_u32",
    ],
};

/// The dense-path kernels (host side: `dense.rs`).
pub const DENSE: KernelSource = KernelSource {
    name: "dense",
    src: include_str!("../../kernels/dense.cu"),
    functions: &[
        "embed_gather",
        "rms_norm",
        "rope",
        "router_softmax_topk",
        "paged_attention_decode",
        "argmax_rows",
        "top_p_sample",
        "f32_to_bf16",
        "add_f32",
        "kv_write",
        "gather_rows_f32",
    ],
};

/// Every kernel source of the engine (the PTX-compile test checks this list against the
/// `.cu` files in `engine/kernels/`).
pub const ALL: &[KernelSource] = &[MOE, DENSE];

/// Options passed to NVRTC besides the architecture.
const OPTIONS: &[&str] = &["--std=c++17"];

/// True when `libnvrtc` can be opened. Never panics.
pub fn nvrtc_available() -> bool {
    // SAFETY: only tries to dlopen the library by its usual names.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// NVRTC's version, `(major, minor)`.
pub fn nvrtc_version() -> Result<(i32, i32), CudaError> {
    if !nvrtc_available() {
        return Err(CudaError::NoNvrtc);
    }
    let (mut major, mut minor) = (0, 0);
    // SAFETY: the library is present (checked above); the pointers are valid for writes.
    let rc = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
    if rc != cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(CudaError::Nvrtc(format!("nvrtcVersion failed: {rc:?}")));
    }
    Ok((major, minor))
}

/// `sm_XY` for a compute capability; the kernels need tensor-core bf16 (sm_80 or newer).
pub fn arch_for(major: i32, minor: i32) -> Result<String, CudaError> {
    if major < 8 {
        return Err(CudaError::Unsupported(format!(
            "compute capability {major}.{minor}: the bf16 kernels need 8.0 or newer"
        )));
    }
    Ok(format!("sm_{major}{minor}"))
}

/// Compiles one source to PTX for `arch` (e.g. `"sm_90"`), without the cache.
pub fn compile(kernel: &KernelSource, arch: &str) -> Result<String, CudaError> {
    if !nvrtc_available() {
        return Err(CudaError::NoNvrtc);
    }
    let mut options: Vec<String> = OPTIONS.iter().map(|s| s.to_string()).collect();
    options.push(format!("--gpu-architecture={arch}"));
    let opts = CompileOptions {
        options,
        name: Some(format!("{}.cu", kernel.name)),
        ..Default::default()
    };
    let ptx = cudarc::nvrtc::compile_ptx_with_opts(kernel.src, opts).map_err(|e| {
        CudaError::Nvrtc(match e {
            cudarc::nvrtc::CompileError::CompileError { log, .. } => {
                format!("{}.cu for {arch}: {}", kernel.name, log.to_string_lossy())
            }
            other => format!("{}.cu for {arch}: {other}", kernel.name),
        })
    })?;
    let text = ptx_text(&ptx)?;
    for f in kernel.functions {
        if !text.contains(&format!(".entry {f}(")) {
            return Err(CudaError::Nvrtc(format!(
                "{}.cu for {arch}: PTX lacks entry point {f}",
                kernel.name
            )));
        }
    }
    Ok(text)
}

fn ptx_text(ptx: &Ptx) -> Result<String, CudaError> {
    let bytes = ptx
        .as_bytes()
        .ok_or_else(|| CudaError::Nvrtc("NVRTC returned no PTX image".into()))?;
    let end = bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len());
    String::from_utf8(bytes[..end].to_vec())
        .map_err(|_| CudaError::Nvrtc("PTX is not UTF-8".into()))
}

/// 64-bit FNV-1a.
pub fn fnv1a64(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for b in *part {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        // Separator, so ("ab", "c") and ("a", "bc") differ.
        h ^= 0xff;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The cache file name of a kernel for an architecture and NVRTC version.
pub fn cache_key(kernel: &KernelSource, arch: &str, nvrtc: (i32, i32)) -> String {
    let version = format!("{}.{}", nvrtc.0, nvrtc.1);
    let options = OPTIONS.join(" ");
    let h = fnv1a64(&[
        kernel.src.as_bytes(),
        arch.as_bytes(),
        options.as_bytes(),
        version.as_bytes(),
    ]);
    format!("{}-{h:016x}-{arch}.ptx", kernel.name)
}

/// `$SWITCHYARD_PTX_CACHE`, else `$XDG_CACHE_HOME/switchyard/ptx`, else
/// `~/.cache/switchyard/ptx`; `None` when none is set.
pub fn cache_dir() -> Option<PathBuf> {
    let nonempty = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
    if let Some(d) = nonempty("SWITCHYARD_PTX_CACHE") {
        return Some(PathBuf::from(d));
    }
    if let Some(d) = nonempty("XDG_CACHE_HOME") {
        return Some(PathBuf::from(d).join("switchyard").join("ptx"));
    }
    nonempty("HOME").map(|h| {
        PathBuf::from(h)
            .join(".cache")
            .join("switchyard")
            .join("ptx")
    })
}

/// PTX for `kernel` on `arch`: from the cache in `dir` when present, else compiled and
/// stored there. Cache problems are logged and never fatal.
pub fn load_or_compile(
    kernel: &KernelSource,
    arch: &str,
    dir: Option<&Path>,
) -> Result<String, CudaError> {
    let version = nvrtc_version()?;
    let path = dir.map(|d| d.join(cache_key(kernel, arch, version)));
    if let Some(p) = &path
        && let Ok(text) = std::fs::read_to_string(p)
    {
        if kernel
            .functions
            .iter()
            .all(|f| text.contains(&format!(".entry {f}(")))
        {
            tracing::debug!(path = %p.display(), "PTX cache hit");
            return Ok(text);
        }
        tracing::warn!(path = %p.display(), "ignoring a damaged PTX cache entry");
    }
    let started = std::time::Instant::now();
    let text = compile(kernel, arch)?;
    tracing::info!(
        kernel = kernel.name,
        arch,
        ms = started.elapsed().as_millis() as u64,
        "compiled kernels with NVRTC"
    );
    if let Some(p) = &path
        && let Err(e) = store(p, &text)
    {
        tracing::warn!(path = %p.display(), error = %e, "could not write the PTX cache");
    }
    Ok(text)
}

/// Writes through a temporary file and a rename, so readers never see half a file.
fn store(path: &Path, text: &str) -> std::io::Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv_is_the_published_function() {
        // FNV-1a 64 of "a" is 0xaf63dc4c8601ec8c; ours appends a separator byte per part.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        h ^= u64::from(b'a');
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
        assert_eq!(h, 0xaf63_dc4c_8601_ec8c);
        assert_ne!(fnv1a64(&[b"ab", b"c"]), fnv1a64(&[b"a", b"bc"]));
    }

    #[test]
    fn cache_key_is_stable_and_depends_on_inputs() {
        let k = cache_key(&MOE, "sm_90", (13, 0));
        assert_eq!(k, cache_key(&MOE, "sm_90", (13, 0)));
        assert!(k.starts_with("moe-") && k.ends_with("-sm_90.ptx"));
        assert_ne!(k, cache_key(&MOE, "sm_80", (13, 0)));
        assert_ne!(k, cache_key(&MOE, "sm_90", (13, 1)));
        let other = KernelSource {
            src: "extern \"C\" __global__ void k() {}",
            ..MOE
        };
        assert_ne!(k, cache_key(&other, "sm_90", (13, 0)));
    }

    #[test]
    fn arch_names() {
        assert_eq!(arch_for(9, 0).unwrap(), "sm_90");
        assert_eq!(arch_for(8, 6).unwrap(), "sm_86");
        assert!(matches!(arch_for(7, 5), Err(CudaError::Unsupported(_))));
    }
}
