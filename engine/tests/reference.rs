//! The engine against Hugging Face transformers' own outputs (tests/fixtures).

use std::path::{Path, PathBuf};

use switchyard_engine::ops::Weights;
use switchyard_engine::verify::verify;
use switchyard_engine::{ExpertSelection, ExpertStore, Model};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(name)
}

fn verify_dir(dir: &Path) -> switchyard_engine::verify::VerifyReport {
    let (model, ckpt) = Model::load(dir).unwrap();
    let experts = ExpertStore::load(&ckpt, model.config(), &ExpertSelection::All).unwrap();
    verify(&model.into(), &experts, dir).unwrap()
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

/// Every family's fixtures, both config styles, f32, bf16 shards and FP8 blocks: logits
/// within 1e-4, identical router choices, identical greedy text, whole and incremental.
#[test]
fn every_family_fixture_meets_every_tolerance() {
    for name in [
        "qwen3-moe-tiny",
        "qwen3-moe-tiny-bf16",
        "qwen2-moe-tiny",
        "deepseek-v3-tiny",
        "deepseek-v3-tiny-bf16",
        "deepseek-v3-tiny-fp8",
    ] {
        let r = verify_dir(&fixture(name));
        eprintln!(
            "{name}: {}; max logit error {:.2e}, router agreement {}",
            r.model, r.max_logit_rel_err, r.min_router_agreement
        );
        assert_eq!(r.prompts.len(), 6, "{name}");
        assert!(r.passed, "{name}: {r:#?}");
    }
}

/// The latent cache is what the absorbed path reads; the expanded path re-expands it per
/// cached token. Both meet the reference, and the cache holds 40 values per token and
/// layer where expanded K and V would hold 4 x (24 + 16) = 160.
#[test]
fn deepseek_v3_absorbed_expanded_and_auto_attention_all_meet_the_reference() {
    let dir = fixture("deepseek-v3-tiny");
    for mode in [
        switchyard_engine::layers::MlaMode::Absorbed,
        switchyard_engine::layers::MlaMode::Expanded,
        switchyard_engine::layers::MlaMode::Auto,
    ] {
        let (mut model, ckpt) = Model::load(&dir).unwrap();
        model.set_mla_mode(mode);
        let cfg = model.config().clone();
        assert_eq!(cfg.kv_cache_dims(), (32 + 8, 0));
        assert_eq!(cfg.expanded_kv_values_per_token_per_layer(), 4 * (24 + 16));
        let experts = ExpertStore::load(&ckpt, &cfg, &ExpertSelection::All).unwrap();
        let r = verify(&model.into(), &experts, &dir).unwrap();
        assert!(r.passed, "{mode:?}: {r:#?}");
    }
}

/// What the GPU experts compute, emulated on the CPU: bf16 weights, bf16 activations in,
/// bf16 SiLU(gate)*up, f32 accumulation. `verify --device cuda` cannot run here; this says
/// whether its top-1 bar is reachable on these fixtures at bf16 precision at all.
struct Bf16Experts {
    store: switchyard_engine::ExpertStore,
}

fn bf16_round(v: &mut [f32]) {
    for x in v {
        *x = half::bf16::from_f32(*x).to_f32();
    }
}

impl switchyard_engine::Experts for Bf16Experts {
    fn forward(
        &self,
        layer: usize,
        x: &[f32],
        routing: &switchyard_engine::Routing,
    ) -> Result<Vec<f32>, switchyard_engine::ExpertError> {
        let h = self.store.hidden();
        let mut out = vec![0f32; x.len()];
        for t in 0..routing.tokens() {
            let mut xt = x[t * h..(t + 1) * h].to_vec();
            bf16_round(&mut xt);
            let (experts, weights) = routing.token(t);
            for (e, w) in experts.iter().zip(weights) {
                let ffn = self.store.get(layer, *e as usize).unwrap();
                let f = ffn.ffn_dim();
                let gu = ffn.gate_up.forward(&xt, 1);
                let mut act: Vec<f32> = (0..f)
                    .map(|i| switchyard_engine::ops::silu(gu[i]) * gu[f + i])
                    .collect();
                bf16_round(&mut act);
                let y = ffn.down.forward(&act, 1);
                for (o, v) in out[t * h..(t + 1) * h].iter_mut().zip(&y) {
                    *o += w * v;
                }
            }
        }
        Ok(out)
    }
}

#[test]
fn bf16_experts_meet_the_top1_bar_on_both_fixtures() {
    use switchyard_engine::verify::{Check, TOP1_MIN_AGREEMENT, verify_with};
    for name in ["mixtral-tiny", "mixtral-tiny-bf16"] {
        let dir = fixture(name);
        let (model, ckpt) = Model::load(&dir).unwrap();
        let mut store = ExpertStore::load(&ckpt, model.config(), &ExpertSelection::All).unwrap();
        for (l, e) in store.held() {
            let mut ffn = store.remove(l, e).unwrap();
            // The bf16 fixture's experts are held as bf16 already (nothing to round).
            for w in [&mut ffn.gate_up.weight, &mut ffn.down.weight] {
                if let Weights::F32(v) = w {
                    bf16_round(v);
                }
            }
            store.insert(l, e, ffn);
        }
        let experts = Bf16Experts { store };
        let check = Check::Top1 {
            min_agreement: TOP1_MIN_AGREEMENT,
        };
        let r = verify_with(&model.into(), &experts, &dir, check).unwrap();
        eprintln!(
            "{name}: top-1 {:.4}, decided {}/{}, max logit err {:.3e}, router {:.4}",
            r.top1_agreement,
            r.decided_matched,
            r.decided_positions,
            r.max_logit_rel_err,
            r.min_router_agreement
        );
        // Measured with this emulation: mixtral-tiny 99.65%, mixtral-tiny-bf16 98.62%: the
        // second misses the 99% at bf16 precision whatever the kernels do, as the
        // H200 later did on both fixtures (98.62%, 98.79%), hence the bar of 97% beside
        // complete agreement at decided positions.
        assert!(r.passed, "{name}: {r:#?}");
        assert!(r.top1_agreement >= 0.98, "{name}: {r:#?}");
        // Every flip is at a near-tie of the f32 reference (its top two within 1% of the
        // largest |logit|: 8-9% of these fixtures' prompt positions): where the reference is
        // decided, bf16 agrees everywhere (826/826 and 824/824 measured).
        assert!(r.decided_positions > 0, "{name}");
        assert_eq!(r.decided_matched, r.decided_positions, "{name}: {r:#?}");
    }
}

#[test]
fn top1_check_reports_full_agreement_for_the_f32_engine() {
    use switchyard_engine::verify::{Check, verify_with};
    let dir = fixture("mixtral-tiny");
    let (model, ckpt) = Model::load(&dir).unwrap();
    let experts = ExpertStore::load(&ckpt, model.config(), &ExpertSelection::All).unwrap();
    let r = verify_with(
        &model.into(),
        &experts,
        &dir,
        Check::Top1 { min_agreement: 1.0 },
    )
    .unwrap();
    assert_eq!(r.top1_agreement, 1.0, "{r:#?}");
    assert!(r.passed);
}
