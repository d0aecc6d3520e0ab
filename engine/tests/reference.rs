//! The engine against Hugging Face transformers' own outputs (tests/fixtures).

use std::path::{Path, PathBuf};

use switchyard_engine::verify::verify;
use switchyard_engine::{ExpertSelection, ExpertStore, Mixtral};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(name)
}

fn verify_dir(dir: &Path) -> switchyard_engine::verify::VerifyReport {
    let (model, ckpt) = Mixtral::load(dir).unwrap();
    let experts = ExpertStore::load(&ckpt, model.config(), &ExpertSelection::All).unwrap();
    verify(&model, &experts, dir).unwrap()
}

#[test]
fn f32_fixture_meets_every_tolerance_whole_and_incremental() {
    let r = verify_dir(&fixture("mixtral-tiny"));
    eprintln!("{}", serde_json::to_string_pretty(&r).unwrap());
    assert_eq!(r.prompts.len(), 6);
    assert!(r.passed, "{r:#?}");
}

#[test]
fn sharded_bf16_fixture_meets_every_tolerance_whole_and_incremental() {
    let r = verify_dir(&fixture("mixtral-tiny-bf16"));
    assert_eq!(r.prompts.len(), 6);
    assert!(r.passed, "{r:#?}");
}
