//! `--device`: an explicit CUDA device on a machine without one stops every command at
//! start-up with the reason, and `--device auto` falls back to the CPU and serves.

mod common;

use std::process::Command;

use common::{
    Cluster, Proc, describe_node, engine_greedy, exe, greedy, text_of, tiny_model, tokenizer,
};
use serde_json::json;

fn gpu_present() -> bool {
    switchyard_engine::cuda::device_count().is_ok()
}

#[test]
fn device_cuda_without_a_gpu_fails_at_start_with_the_reason() {
    if gpu_present() {
        eprintln!("skipped: this machine has a CUDA device");
        return;
    }
    let model = tiny_model();
    let model = model.to_str().unwrap();
    let commands: [&[&str]; 6] = [
        &["expert-node", "--listen", "127.0.0.1:0", "--model", model],
        &["generate", "--prompt", "hi", "--model", model],
        &["verify", "--model", model],
        &[
            "coordinator",
            "--in-process",
            "--port",
            "0",
            "--model",
            model,
        ],
        // The dense layers go to the GPU too: no longer only with --in-process.
        &[
            "coordinator",
            "--nodes",
            "127.0.0.1:9",
            "--port",
            "0",
            "--model",
            model,
        ],
        &["up", "--nodes", "1", "--port", "0", "--model", model],
    ];
    for args in commands {
        for device in ["cuda", "cuda:1"] {
            let out = Command::new(exe())
                .args(args)
                .args(["--device", device])
                .output()
                .unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            let what = format!("{args:?} --device {device}");
            assert!(!out.status.success(), "{what} succeeded: {stderr}");
            assert!(
                out.stdout.is_empty(),
                "{what} printed {:?}",
                String::from_utf8_lossy(&out.stdout)
            );
            let want = if device == "cuda" { "cuda:0" } else { "cuda:1" };
            assert!(
                stderr.contains(&format!("--device {want}: cannot use this device")),
                "{what}: {stderr}"
            );
            assert!(
                stderr.contains("no CUDA driver")
                    || stderr.contains("no CUDA device")
                    || stderr.contains("NVRTC not found"),
                "{what}: {stderr}"
            );
        }
    }
    // verify's experts alone on the GPU (the check of GPU experts under a CPU dense path).
    let out = Command::new(exe())
        .args(["verify", "--model", model, "--experts-device", "cuda"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "verify --experts-device cuda: {stderr}"
    );
    assert!(
        stderr.contains("--experts-device cuda:0: cannot use this device"),
        "{stderr}"
    );
    let out = Command::new(exe())
        .args(["expert-node", "--model", model, "--device", "tpu"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("expected cpu, cuda, cuda:N or auto"),
        "{stderr}"
    );
}

#[test]
fn device_auto_serves_on_the_cpu_without_a_gpu() {
    let mut cmd = Command::new(exe());
    cmd.args(["expert-node", "--listen", "127.0.0.1:0", "--device", "auto"])
        .arg("--model")
        .arg(tiny_model());
    let (_node, addr) = Proc::start("expert-node-auto", cmd, "listening on ");
    let info = describe_node(&addr);
    if gpu_present() {
        assert!(info.device.starts_with("cuda:0 ("), "{}", info.device);
        return;
    }
    assert_eq!(info.device, "cpu");
    assert_eq!(info.bytes_per_expert, 3 * 64 * 128 * 4);

    // The coordinator loads every expert onto the node (LoadExperts) and serves through it.
    let c = Cluster::coordinator(&[addr], &["--device", "auto", "--wire-dtype", "f32"]);
    let prompt = [1u32, 308, 72, 101, 108];
    let want = tokenizer()
        .decode(&engine_greedy(&prompt, 16), true)
        .unwrap();
    let resp = c
        .client()
        .post_json("/v1/completions", &greedy(&c.model, json!(prompt), 16))
        .unwrap();
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(text_of(&resp.json()), want);
}

/// `--cpu-weights` (a neighbour of `--device`): what the node holds, and a clear refusal
/// of a format it does not know.
#[test]
fn cpu_weights_sets_what_a_node_holds() {
    let mut cmd = Command::new(exe());
    cmd.args([
        "expert-node",
        "--listen",
        "127.0.0.1:0",
        "--cpu-weights",
        "bf16",
    ])
    .arg("--model")
    .arg(tiny_model());
    let (_node, addr) = Proc::start("expert-node-bf16", cmd, "listening on ");
    let info = describe_node(&addr);
    assert_eq!(info.weights, "bf16");
    assert_eq!(info.bytes_per_expert, 3 * 64 * 128 * 2);

    let out = Command::new(exe())
        .args([
            "expert-node",
            "--listen",
            "127.0.0.1:0",
            "--cpu-weights",
            "int4",
        ])
        .arg("--model")
        .arg(tiny_model())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("expected auto, f32, bf16 or int8"),
        "{stderr}"
    );
}

#[test]
fn generate_with_device_auto_equals_the_cpu() {
    if gpu_present() {
        return;
    }
    let run = |device: &str| {
        let out = Command::new(exe())
            .args([
                "generate",
                "--prompt",
                "Mixture of Experts",
                "--max-tokens",
                "8",
            ])
            .args(["--device", device, "--model"])
            .arg(tiny_model())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    };
    assert_eq!(run("auto"), run("cpu"));
}
