//! The engine against Hugging Face transformers' own outputs (tests/fixtures).

use std::path::{Path, PathBuf};

use switchyard_engine::ops::{CpuWeights, WeightFormat, Weights};
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

/// An FP8 checkpoint's matrices stay 8-bit by default (codes and block scales kept), and
/// the model still meets every tolerance: keeping the codes changes no weight's value.
#[test]
fn fp8_checkpoint_keeps_its_codes_and_meets_every_tolerance() {
    let dir = fixture("deepseek-v3-tiny-fp8");
    let (model, ckpt) = Model::load(&dir).unwrap();
    let experts = ExpertStore::load(&ckpt, model.config(), &ExpertSelection::All).unwrap();
    let (l, e) = experts.held()[0];
    let ffn = experts.get(l, e).unwrap();
    for w in [&ffn.gate_up.weight, &ffn.down.weight] {
        assert_eq!(w.format(), WeightFormat::Fp8);
        // One byte per weight and one f32 scale per 32 of them.
        assert_eq!(w.bytes(), w.len() + w.len() / 32 * 4);
    }
    let r = verify(&model.into(), &experts, &dir).unwrap();
    assert!(r.passed, "{r:#?}");
}

/// `--cpu-weights int8` against the f32 reference on every family's fixture: the experts
/// alone (what `expert-node --cpu-weights int8` holds), then every matrix but the
/// router's and MLA's `kv_b` (`bench_forward ... int8`). An FP8 checkpoint keeps its own
/// codes, so its experts stay exact.
///
/// int8's error per weight (half a step of `max|w| / 127` per 32 weights: ~5x bf16's on
/// Gaussian weights) moves these 64-wide random models' logits by 1-3% of their largest
/// magnitude, as much as the 1% margin that makes a position "decided", so decided
/// positions may flip where bf16 flips none. Products of up to 160 rows also quantize
/// their activations to int8 (the VNNI path, `ops::int8_dot`), which adds an error of the
/// same size. Measured (experts / everything): top-1 98.27% / 96.63% and decided 826 /
/// 824 of 826 on mixtral-tiny; over every fixture, experts >= 97.7% top-1 and 99.7% of
/// decided, everything >= 94.3% and 97.4% (deepseek-v3-tiny, whose every matrix
/// includes MLA's low-rank projections). The bars below sit under those, with room for
/// another thread count's rounding; an indexing or scale bug lands far lower (chance is
/// ~0.2%).
#[test]
fn int8_weights_against_the_reference_on_every_family() {
    use switchyard_engine::Checkpoint;
    use switchyard_engine::verify::{Check, TOP1_MIN_AGREEMENT, verify_with};
    for name in [
        "mixtral-tiny",
        "mixtral-tiny-bf16",
        "qwen3-moe-tiny",
        "qwen2-moe-tiny",
        "deepseek-v3-tiny",
        "deepseek-v3-tiny-fp8",
    ] {
        let dir = fixture(name);
        let expected = if name.ends_with("fp8") {
            WeightFormat::Fp8
        } else {
            WeightFormat::Int8
        };
        for (scope, dense, top1, decided) in [
            ("experts", CpuWeights::Auto, TOP1_MIN_AGREEMENT, 0.995),
            ("everything", CpuWeights::Int8, 0.93, 0.96),
        ] {
            let (model, _) = Model::load_as(&dir, dense).unwrap();
            let ckpt = Checkpoint::open_quantized(&dir, model.config().quantization)
                .unwrap()
                .with_cpu_weights(CpuWeights::Int8);
            let experts = ExpertStore::load(&ckpt, model.config(), &ExpertSelection::All).unwrap();
            let (l, e) = experts.held()[0];
            let format = experts.get(l, e).unwrap().down.weight.format();
            assert_eq!(format, expected, "{name}");
            let check = Check::Top1 {
                min_agreement: top1,
            };
            let r = verify_with(&model.into(), &experts, &dir, check).unwrap();
            eprintln!(
                "{name}, {scope} int8: top-1 {:.4}, decided {}/{}, max logit err {:.3e}, router {:.4}",
                r.top1_agreement,
                r.decided_matched,
                r.decided_positions,
                r.max_logit_rel_err,
                r.min_router_agreement
            );
            assert!(r.decided_positions > 0, "{name}");
            let agreed = r.decided_matched as f64 / r.decided_positions as f64;
            assert!(agreed >= decided, "{name}, {scope}: {r:#?}");
            assert!(r.top1_agreement >= top1, "{name}, {scope}: {r:#?}");
            if name.ends_with("fp8") && scope == "experts" {
                // Kept FP8 codes: the reference's own weights.
                assert!(r.max_logit_rel_err < 1e-4, "{name}: {r:#?}");
            }
        }
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
            for lin in [&mut ffn.gate_up, &mut ffn.down] {
                if lin.weight.format() == WeightFormat::F32 {
                    let mut v = lin.weight.to_f32().into_owned();
                    bf16_round(&mut v);
                    lin.weight = Weights::compact(v, lin.in_dim);
                    assert_eq!(lin.weight.format(), WeightFormat::Bf16);
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
