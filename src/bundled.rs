//! The tiny Mixtral that `switchyard up` serves when no `--model` is given, compiled into
//! the binary so a fresh clone (or a container) needs nothing else.

use std::path::PathBuf;

const FILES: &[(&str, &[u8])] = &[
    (
        "config.json",
        include_bytes!("../tests/fixtures/mixtral-tiny/config.json"),
    ),
    (
        "generation_config.json",
        include_bytes!("../tests/fixtures/mixtral-tiny/generation_config.json"),
    ),
    (
        "tokenizer.json",
        include_bytes!("../tests/fixtures/mixtral-tiny/tokenizer.json"),
    ),
    (
        "tokenizer_config.json",
        include_bytes!("../tests/fixtures/mixtral-tiny/tokenizer_config.json"),
    ),
    (
        "model.safetensors",
        include_bytes!("../tests/fixtures/mixtral-tiny/model.safetensors"),
    ),
];

pub const NAME: &str = "mixtral-tiny";

/// Writes the bundled checkpoint under the temp dir once (per binary version) and returns
/// its directory. Written to a scratch name and renamed, so concurrent starts are safe.
pub fn materialize() -> std::io::Result<PathBuf> {
    let root = std::env::temp_dir().join(format!("switchyard-{}", env!("CARGO_PKG_VERSION")));
    let dir = root.join(NAME);
    if FILES.iter().all(|(name, bytes)| {
        std::fs::metadata(dir.join(name)).is_ok_and(|m| m.len() == bytes.len() as u64)
    }) {
        return Ok(dir);
    }
    std::fs::create_dir_all(&root)?;
    let scratch = root.join(format!("{NAME}.{}.tmp", std::process::id()));
    std::fs::create_dir_all(&scratch)?;
    for (name, bytes) in FILES {
        std::fs::write(scratch.join(name), bytes)?;
    }
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    match std::fs::rename(&scratch, &dir) {
        Ok(()) => Ok(dir),
        // Another process won the race: its copy is as good as ours.
        Err(_) if dir.join("model.safetensors").exists() => {
            let _ = std::fs::remove_dir_all(&scratch);
            Ok(dir)
        }
        Err(e) => Err(e),
    }
}
