//! The engine's subcommands as a user runs them: verify, generate, synth.

use std::path::{Path, PathBuf};
use std::process::Command;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_switchyard"))
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn copy_dir(from: &Path, to: &Path) {
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

#[test]
fn verify_passes_both_fixtures_and_reports_json() {
    for name in ["mixtral-tiny", "mixtral-tiny-bf16"] {
        let out = bin()
            .args(["verify", "--json", "--model"])
            .arg(fixture(name))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(report["passed"], true);
        assert_eq!(report["prompts"].as_array().unwrap().len(), 6);
        assert!(report["max_logit_rel_err"].as_f64().unwrap() < 1e-4);
    }
}

#[test]
fn verify_fails_with_nonzero_exit_when_the_model_is_wrong() {
    // Same weights, a different RMSNorm epsilon: logits move far past the tolerance.
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&fixture("mixtral-tiny-bf16"), dir.path());
    let cfg = std::fs::read_to_string(dir.path().join("config.json")).unwrap();
    std::fs::write(
        dir.path().join("config.json"),
        cfg.replace("\"rms_norm_eps\": 1e-05", "\"rms_norm_eps\": 0.5"),
    )
    .unwrap();
    let out = bin()
        .args(["verify", "--model"])
        .arg(dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{stdout}");
    assert!(stdout.contains("FAIL"), "{stdout}");
}

#[test]
fn generate_streams_the_reference_greedy_text() {
    let golden: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("mixtral-tiny").join("golden.json")).unwrap(),
    )
    .unwrap();
    let p = &golden["prompts"][0];
    let out = bin()
        .args(["generate", "--max-tokens", "24", "--ignore-eos", "--prompt"])
        .arg(p["text"].as_str().unwrap())
        .arg("--model")
        .arg(fixture("mixtral-tiny"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim_end_matches('\n'),
        p["greedy_text"].as_str().unwrap()
    );
}

#[test]
fn synth_writes_a_checkpoint_the_engine_loads_and_runs() {
    let dir = tempfile::tempdir().unwrap();
    let out = bin()
        .args([
            "synth",
            "--hidden",
            "32",
            "--ffn",
            "48",
            "--layers",
            "2",
            "--heads",
            "4",
            "--kv-heads",
            "2",
            "--experts",
            "16",
            "--top-k",
            "2",
            "--vocab",
            "300",
            "--dtype",
            "bf16",
            "--shard-bytes",
            "20000",
            "--out",
        ])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(dir.path().join("model.safetensors.index.json").exists());
    let out = bin()
        .args([
            "generate",
            "--max-tokens",
            "5",
            "--ignore-eos",
            "--prompt",
            "hello",
            "--model",
        ])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Invalid shapes are refused with the field named.
    let out = bin()
        .args([
            "synth",
            "--hidden",
            "30",
            "--ffn",
            "48",
            "--layers",
            "1",
            "--heads",
            "4",
            "--kv-heads",
            "2",
            "--experts",
            "4",
            "--top-k",
            "2",
            "--vocab",
            "300",
            "--out",
        ])
        .arg(dir.path().join("bad"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("heads"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
