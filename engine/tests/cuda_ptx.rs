//! Every kernel of `engine/kernels/` compiles to PTX with NVRTC for sm_80 and sm_90. Needs
//! no GPU, only libnvrtc: on machines without CUDA, from the `nvidia-cuda-nvrtc` wheel:
//!
//!     LD_LIBRARY_PATH=$(scripts/install-nvrtc) cargo test --release -p switchyard-engine --test cuda_ptx
//!
//! Without NVRTC the test fails with that command, unless SWITCHYARD_SKIP_NVRTC=1.

use std::path::Path;
use std::process::Command;

use switchyard_engine::cuda::ptx;

const ARCHS: &[&str] = &["sm_80", "sm_90"];
const MMA: &str = "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32";

/// The wheel's library directory, when the wheel is installed (does not install it).
fn wheel_lib_dir() -> Option<String> {
    let script = "import importlib.metadata as m, os\n\
                  d = str(m.distribution('nvidia-cuda-nvrtc').locate_file('nvidia/cu13/lib'))\n\
                  print(os.path.realpath(d) if os.path.exists(os.path.join(d, 'libnvrtc.so.13')) else '')";
    let out = Command::new("python3").args(["-c", script]).output().ok()?;
    let dir = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (!dir.is_empty()).then_some(dir)
}

/// True when the test should run; panics with instructions when it cannot.
fn nvrtc_or_explain() -> bool {
    if ptx::nvrtc_available() {
        return true;
    }
    let cmd = "cargo test --release -p switchyard-engine --test cuda_ptx";
    let how = match wheel_lib_dir() {
        Some(dir) => format!(
            "the nvidia-cuda-nvrtc wheel is installed in {dir}, but the loader reads \
             LD_LIBRARY_PATH only at process start. Run:\n\n    LD_LIBRARY_PATH={dir} {cmd}\n\n\
             or equivalently\n\n    LD_LIBRARY_PATH=$(scripts/install-nvrtc) {cmd}\n"
        ),
        None => format!(
            "install it (no GPU or CUDA toolkit needed) and run:\n\n    \
             LD_LIBRARY_PATH=$(scripts/install-nvrtc) {cmd}\n"
        ),
    };
    if std::env::var("SWITCHYARD_SKIP_NVRTC").is_ok_and(|v| v == "1") {
        eprintln!("SKIPPED: libnvrtc not loadable and SWITCHYARD_SKIP_NVRTC=1 ({how})");
        return false;
    }
    panic!(
        "libnvrtc (CUDA's run-time compiler) could not be loaded, so the kernels cannot be \
         checked; {how}\nSet SWITCHYARD_SKIP_NVRTC=1 to skip this test."
    );
}

#[test]
fn every_kernel_file_is_listed() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels");
    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".cu"))
        .collect();
    files.sort();
    let mut listed: Vec<String> = ptx::ALL.iter().map(|k| format!("{}.cu", k.name)).collect();
    listed.sort();
    assert_eq!(
        files, listed,
        "engine/kernels/*.cu and cuda::ptx::ALL disagree"
    );
    for k in ptx::ALL {
        let on_disk = std::fs::read_to_string(dir.join(format!("{}.cu", k.name))).unwrap();
        assert_eq!(on_disk, k.src, "{}.cu embedded source is stale", k.name);
        assert!(
            !k.src.contains("#include"),
            "{}.cu: NVRTC has no toolkit headers here",
            k.name
        );
    }
}

/// Static shared memory of one entry point, from `.shared ... name[bytes]` lines.
fn shared_bytes(ptx_text: &str, entry: &str) -> usize {
    let start = ptx_text.find(&format!(".entry {entry}(")).unwrap();
    let body = &ptx_text[start..];
    let end = body[1..].find(".entry ").map_or(body.len(), |i| i + 1);
    body[..end]
        .lines()
        .filter(|l| l.trim_start().starts_with(".shared"))
        .filter_map(|l| {
            let open = l.rfind('[')?;
            let close = l.rfind(']')?;
            l[open + 1..close].parse::<usize>().ok()
        })
        .sum()
}

#[test]
fn kernels_compile_to_ptx_for_sm80_and_sm90() {
    if !nvrtc_or_explain() {
        return;
    }
    let version = ptx::nvrtc_version().unwrap();
    for k in ptx::ALL {
        for arch in ARCHS {
            let text =
                ptx::compile(k, arch).unwrap_or_else(|e| panic!("{}.cu for {arch}: {e}", k.name));
            for f in k.functions {
                assert!(
                    text.contains(&format!(".entry {f}(")),
                    "{f} missing for {arch}"
                );
            }
            assert!(
                text.contains(&format!(".target {arch}")),
                "{arch} target line"
            );
            // No register array was demoted to local memory (a stack frame would show as a depot).
            assert!(
                !text.contains("__local_depot"),
                "{}.cu for {arch} uses local memory",
                k.name
            );
            if k.name == "moe" {
                let mmas = text.matches(MMA).count();
                assert!(mmas >= 32, "{arch}: {mmas} bf16 mma.sync instructions");
                assert!(text.contains("ldmatrix.sync.aligned.m8n8.x4.shared.b16"));
                assert!(text.contains("cp.async.cg.shared.global"));
                for entry in ["moe_gate_up", "moe_down"] {
                    let smem = shared_bytes(&text, entry);
                    assert_eq!(smem, 46_080, "{entry}: 3 stages x (64 + 128) rows x 80 B");
                    assert!(smem <= 48 * 1024, "static shared memory limit");
                }
            }
            println!(
                "{}.cu {arch}: {} bytes of PTX, NVRTC {}.{}, key {}",
                k.name,
                text.len(),
                version.0,
                version.1,
                ptx::cache_key(k, arch, version)
            );
        }
    }
}

#[test]
fn ptx_cache_round_trip() {
    if !nvrtc_or_explain() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let first = ptx::load_or_compile(&ptx::MOE, "sm_90", Some(dir.path())).unwrap();
    let entries: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(entries.len(), 1, "one cache file, no temporaries left");
    let path = entries[0].as_ref().unwrap().path();
    let version = ptx::nvrtc_version().unwrap();
    assert_eq!(
        path.file_name().unwrap().to_string_lossy(),
        ptx::cache_key(&ptx::MOE, "sm_90", version)
    );
    // A hit returns the stored text; a damaged entry is recompiled and replaced.
    assert_eq!(
        ptx::load_or_compile(&ptx::MOE, "sm_90", Some(dir.path())).unwrap(),
        first
    );
    std::fs::write(&path, "garbage").unwrap();
    assert_eq!(
        ptx::load_or_compile(&ptx::MOE, "sm_90", Some(dir.path())).unwrap(),
        first
    );
    assert_eq!(std::fs::read_to_string(&path).unwrap(), first);
}

/// `$PTXAS`, else `ptxas` on PATH (e.g. from the `nvidia-cuda-nvcc` wheel's
/// `nvidia/cu13/bin`); `None` when neither runs.
fn ptxas() -> Option<String> {
    let cand = std::env::var("PTXAS").unwrap_or_else(|_| "ptxas".into());
    Command::new(&cand)
        .arg("--version")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|_| cand)
}

/// Where ptxas is available, the PTX assembles (inline asm included) with no stack frame,
/// no spills, and few enough registers for 3 GEMM blocks per SM.
#[test]
fn ptxas_accepts_kernels_without_spills() {
    let Some(ptxas) = ptxas() else {
        eprintln!("SKIPPED: no ptxas (set PTXAS or put the nvidia-cuda-nvcc wheel's bin on PATH)");
        return;
    };
    if !nvrtc_or_explain() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for k in ptx::ALL {
        for arch in ARCHS {
            let text = ptx::compile(k, arch).unwrap();
            let path = dir.path().join(format!("{}-{arch}.ptx", k.name));
            std::fs::write(&path, text).unwrap();
            let out = Command::new(&ptxas)
                .args([&format!("-arch={arch}"), "-v", "-o", "/dev/null"])
                .arg(&path)
                .output()
                .unwrap();
            let report = String::from_utf8_lossy(&out.stderr).into_owned();
            assert!(out.status.success(), "ptxas {arch}: {report}");
            println!("{report}");
            for line in report.lines().filter(|l| l.contains("stack frame")) {
                assert!(
                    line.contains("0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads"),
                    "{arch}: {line}"
                );
            }
            // "Used N registers" follows each entry's "Compiling entry function 'f'".
            let mut entry = String::new();
            for line in report.lines() {
                if let Some(rest) = line.split("Compiling entry function '").nth(1) {
                    entry = rest.split('\'').next().unwrap_or("").to_string();
                }
                if let Some(rest) = line.split("Used ").nth(1)
                    && let Some(n) = rest
                        .split(" registers")
                        .next()
                        .and_then(|n| n.parse::<u32>().ok())
                    && entry.starts_with("moe_")
                    && entry != "moe_combine"
                {
                    assert!(
                        n <= 168,
                        "{arch} {entry}: {n} registers (> 168: fewer than 3 blocks/SM)"
                    );
                }
            }
        }
    }
}
