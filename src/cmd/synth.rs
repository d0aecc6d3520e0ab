use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use switchyard_engine::Family;
use switchyard_engine::synth::{SynthDType, SynthSpec, parse_family, write_checkpoint};

/// Writes a random MoE checkpoint (Hub layout, with a tokenizer) of any supported family
/// and shape, for benchmarks and big-shape tests.
#[derive(clap::Args)]
pub struct Args {
    #[arg(long)]
    out: PathBuf,
    /// Model family: mixtral, qwen2_moe, qwen3_moe or deepseek_v3 (config.json style and
    /// tensor names of its published checkpoints).
    #[arg(long, default_value = "mixtral", value_parser = family_arg)]
    family: Family,
    #[arg(long)]
    hidden: usize,
    /// Mixtral: every expert's FFN width. Other families: the width of the dense-MLP layers
    /// (`intermediate_size`), and of the routed experts too unless --moe-ffn is given.
    #[arg(long)]
    ffn: usize,
    #[arg(long)]
    layers: usize,
    #[arg(long)]
    heads: usize,
    /// Key/value heads; defaults to --heads. DeepSeek-V3 (latent attention) takes none
    /// other than --heads.
    #[arg(long)]
    kv_heads: Option<usize>,
    /// Defaults to hidden / heads. Not for DeepSeek-V3 (see --qk-nope-head-dim).
    #[arg(long)]
    head_dim: Option<usize>,
    /// Routed experts per MoE layer.
    #[arg(long)]
    experts: usize,
    #[arg(long)]
    top_k: usize,
    #[arg(long)]
    vocab: usize,
    /// f32, bf16 or f16.
    #[arg(long, default_value = "bf16")]
    dtype: String,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, default_value_t = 4096)]
    max_position: usize,
    /// Split the weights into shards of about this many bytes (the Hub uses ~5 GB).
    #[arg(long, default_value_t = 5_000_000_000)]
    shard_bytes: u64,
    /// Qwen, DeepSeek-V3: each routed expert's FFN width (`moe_intermediate_size`);
    /// defaults to --ffn.
    #[arg(long)]
    moe_ffn: Option<usize>,
    /// Qwen: layers with a dense MLP (--ffn wide) instead of experts (`mlp_only_layers`),
    /// comma-separated, e.g. 0,5.
    #[arg(long, value_delimiter = ',')]
    dense_layers: Vec<usize>,
    /// Qwen2-MoE: the gated shared expert's width (`shared_expert_intermediate_size`);
    /// defaults to 4 x --moe-ffn; 0 for none.
    #[arg(long)]
    shared_ffn: Option<usize>,
    /// Qwen, DeepSeek-V3: renormalise the top-k routing weights (true or false); defaults
    /// to the published models' value (qwen2_moe false, qwen3_moe and deepseek_v3 true).
    #[arg(long, action = clap::ArgAction::Set)]
    norm_topk_prob: Option<bool>,
    /// DeepSeek-V3: the queries' low rank (`q_a_proj`/`q_b_proj`), or `none` for a plain
    /// `q_proj`; defaults to 3/4 of --hidden.
    #[arg(long, value_parser = q_lora_arg)]
    q_lora_rank: Option<QLoraRank>,
    /// DeepSeek-V3: the cached latent's width; defaults to hidden / 2.
    #[arg(long)]
    kv_lora_rank: Option<usize>,
    /// DeepSeek-V3: per-head query/key dims without RoPE; defaults to hidden / heads.
    #[arg(long)]
    qk_nope_head_dim: Option<usize>,
    /// DeepSeek-V3: per-head RoPE dims (even); defaults to half of hidden / heads, at
    /// least 2.
    #[arg(long)]
    qk_rope_head_dim: Option<usize>,
    /// DeepSeek-V3: per-head value dims; defaults to hidden / heads.
    #[arg(long)]
    v_head_dim: Option<usize>,
    /// DeepSeek-V3: the first layers, with dense MLPs (--ffn wide) instead of experts
    /// (`first_k_dense_replace`); defaults to 1 (0 for a one-layer model).
    #[arg(long)]
    first_dense: Option<usize>,
    /// DeepSeek-V3: expert groups of the router (`n_group`); defaults to the largest of
    /// 8, 4, 2, 1 that divides --experts.
    #[arg(long)]
    groups: Option<usize>,
    /// DeepSeek-V3: groups each token's experts come from (`topk_group`); defaults to
    /// half of --groups, raised until --top-k experts fit.
    #[arg(long)]
    topk_groups: Option<usize>,
    /// DeepSeek-V3: shared experts, each --moe-ffn wide (`n_shared_experts`); defaults
    /// to 1.
    #[arg(long)]
    shared_experts: Option<usize>,
    /// DeepSeek-V3: the factor on the routed experts' weights (`routed_scaling_factor`);
    /// defaults to 2.5.
    #[arg(long)]
    routed_scaling: Option<f64>,
    /// YaRN context extension by this factor (any family): `rope_scaling` of type yarn,
    /// from an original context of max-position / factor.
    #[arg(long)]
    yarn_factor: Option<f64>,
    /// Zipf exponent S of expert popularity (any family): in every MoE layer the expert
    /// of popularity rank r gets a share of the routed tokens roughly proportional to
    /// r^-S, with a different hottest expert per layer (drawn from --seed). 0 (the
    /// default) gives uniform routers, the same bytes as without the flag.
    #[arg(long, default_value_t = 0.0, value_parser = skew_arg)]
    router_skew: f64,
}

fn skew_arg(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("expected a Zipf exponent (a number >= 0), got {s:?}"))?;
    if !(v.is_finite() && v >= 0.0) {
        return Err(format!(
            "the Zipf exponent must be a finite number >= 0 (0: uniform routers), got {s:?}"
        ));
    }
    Ok(v)
}

/// `--q-lora-rank`: a rank, or `none` (also `0`) for DeepSeek-V2-Lite's plain `q_proj`.
#[derive(Clone, Copy, Debug, PartialEq)]
struct QLoraRank(Option<usize>);

fn q_lora_arg(s: &str) -> Result<QLoraRank, String> {
    if s.eq_ignore_ascii_case("none") {
        return Ok(QLoraRank(None));
    }
    let n: usize = s
        .parse()
        .map_err(|_| format!("expected a rank or `none`, got {s:?}"))?;
    Ok(QLoraRank((n > 0).then_some(n)))
}

fn family_arg(s: &str) -> Result<Family, String> {
    parse_family(s).map_err(|e| e.to_string())
}

fn spec(a: &Args) -> Result<SynthSpec> {
    let deepseek = a.family == Family::DeepseekV3;
    let q_lora_rank = match a.q_lora_rank {
        Some(QLoraRank(r)) => r,
        None if deepseek => Some(SynthSpec::default_q_lora_rank(a.hidden)),
        None => None,
    };
    Ok(SynthSpec {
        family: a.family,
        hidden: a.hidden,
        ffn: a.ffn,
        layers: a.layers,
        heads: a.heads,
        kv_heads: a.kv_heads.unwrap_or(a.heads),
        head_dim: a.head_dim,
        experts: a.experts,
        top_k: a.top_k,
        vocab: a.vocab,
        dtype: a.dtype.parse::<SynthDType>()?,
        seed: a.seed,
        max_position: a.max_position,
        shard_bytes: a.shard_bytes,
        moe_ffn: a.moe_ffn,
        dense_layers: a.dense_layers.clone(),
        shared_ffn: a.shared_ffn,
        norm_topk_prob: a.norm_topk_prob,
        q_lora_rank,
        kv_lora_rank: a.kv_lora_rank,
        qk_nope_head_dim: a.qk_nope_head_dim,
        qk_rope_head_dim: a.qk_rope_head_dim,
        v_head_dim: a.v_head_dim,
        first_k_dense_replace: a.first_dense,
        n_group: a.groups,
        topk_group: a.topk_groups,
        n_shared_experts: a.shared_experts,
        routed_scaling_factor: a.routed_scaling,
        yarn_factor: a.yarn_factor,
        router_skew: a.router_skew,
    })
}

pub fn run(a: Args) -> Result<ExitCode> {
    let spec = spec(&a)?;
    spec.validate()?;
    let started = std::time::Instant::now();
    write_checkpoint(&spec, &a.out).with_context(|| format!("writing {}", a.out.display()))?;
    let moe_layers = spec.moe_layers()?.len();
    eprintln!(
        "wrote {} ({}: {} layers, {moe_layers} routing to {} experts each; {:.2} GB) in {:.1}s",
        a.out.display(),
        spec.family,
        spec.layers,
        spec.experts,
        spec.total_bytes()? as f64 / 1e9,
        started.elapsed().as_secs_f64()
    );
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        args: Args,
    }

    fn parse(extra: &[&str]) -> Result<SynthSpec> {
        let base = [
            "synth",
            "--out",
            "x",
            "--hidden",
            "16",
            "--ffn",
            "24",
            "--layers",
            "3",
            "--heads",
            "2",
            "--experts",
            "8",
            "--top-k",
            "2",
            "--vocab",
            "300",
        ];
        let cli = Cli::try_parse_from(base.iter().chain(extra))?;
        spec(&cli.args)
    }

    #[test]
    fn existing_flags_keep_their_meaning() {
        let s = parse(&["--kv-heads", "1"]).unwrap();
        assert_eq!(s.family, Family::Mixtral);
        assert_eq!(
            (s.hidden, s.ffn, s.kv_heads, s.q_lora_rank),
            (16, 24, 1, None)
        );
        s.validate().unwrap();
        // --kv-heads defaults to --heads.
        assert_eq!(parse(&[]).unwrap().kv_heads, 2);
    }

    #[test]
    fn family_flags_reach_the_spec() {
        let s = parse(&[
            "--family",
            "deepseek-v3",
            "--moe-ffn",
            "8",
            "--kv-lora-rank",
            "6",
            "--qk-nope-head-dim",
            "4",
            "--qk-rope-head-dim",
            "2",
            "--v-head-dim",
            "6",
            "--first-dense",
            "2",
            "--groups",
            "4",
            "--topk-groups",
            "2",
            "--shared-experts",
            "2",
            "--routed-scaling",
            "1.5",
            "--yarn-factor",
            "4",
            "--norm-topk-prob",
            "false",
        ])
        .unwrap();
        assert_eq!(s.family, Family::DeepseekV3);
        assert_eq!(s.q_lora_rank, Some(SynthSpec::default_q_lora_rank(16)));
        assert_eq!(
            (
                s.moe_ffn,
                s.kv_lora_rank,
                s.qk_nope_head_dim,
                s.qk_rope_head_dim,
                s.v_head_dim
            ),
            (Some(8), Some(6), Some(4), Some(2), Some(6))
        );
        assert_eq!(
            (
                s.first_k_dense_replace,
                s.n_group,
                s.topk_group,
                s.n_shared_experts
            ),
            (Some(2), Some(4), Some(2), Some(2))
        );
        assert_eq!(s.routed_scaling_factor, Some(1.5));
        assert_eq!(s.yarn_factor, Some(4.0));
        assert_eq!(s.norm_topk_prob, Some(false));
        s.validate().unwrap();

        let none = parse(&["--family", "deepseek_v3", "--q-lora-rank", "none"]).unwrap();
        assert_eq!(none.q_lora_rank, None);
        let five = parse(&["--family", "deepseek_v3", "--q-lora-rank", "5"]).unwrap();
        assert_eq!(five.q_lora_rank, Some(5));
        assert!(parse(&["--q-lora-rank", "lots"]).is_err());

        let q = parse(&[
            "--family",
            "qwen2_moe",
            "--dense-layers",
            "0,2",
            "--shared-ffn",
            "0",
        ])
        .unwrap();
        assert_eq!(q.family, Family::Qwen2Moe);
        assert_eq!(
            (q.dense_layers.clone(), q.shared_ffn),
            (vec![0, 2], Some(0))
        );
        q.validate().unwrap();
    }

    #[test]
    fn router_skew_reaches_the_spec_and_bad_values_are_refused() {
        assert_eq!(parse(&[]).unwrap().router_skew, 0.0);
        let s = parse(&["--router-skew", "1.2"]).unwrap();
        assert_eq!(s.router_skew, 1.2);
        s.validate().unwrap();
        let s = parse(&["--family", "deepseek_v3", "--router-skew", "0.8"]).unwrap();
        assert_eq!((s.family, s.router_skew), (Family::DeepseekV3, 0.8));
        s.validate().unwrap();
        // `=` keeps a leading minus from reading as a flag.
        for bad in ["-1", "-0.5", "nan", "inf", "-inf", "lots"] {
            let err = parse(&[&format!("--router-skew={bad}")])
                .err()
                .unwrap_or_else(|| panic!("{bad} accepted"))
                .to_string();
            assert!(
                err.contains("router-skew") && err.contains(bad),
                "{bad}: {err}"
            );
        }
        let err = parse(&["--router-skew=-1"]).unwrap_err().to_string();
        assert!(
            err.contains("Zipf exponent must be a finite number >= 0"),
            "{err}"
        );
        // The spec refuses them too, whoever builds it.
        let err = SynthSpec {
            router_skew: f64::NAN,
            ..parse(&[]).unwrap()
        }
        .validate()
        .unwrap_err()
        .to_string();
        assert!(err.contains("router_skew"), "{err}");
    }

    #[test]
    fn unknown_family_and_misplaced_flags_are_refused() {
        let err = parse(&["--family", "llama"]).unwrap_err().to_string();
        assert!(err.contains("llama") && err.contains("qwen3_moe"), "{err}");
        let err = parse(&["--family", "qwen3_moe", "--kv-lora-rank", "4"])
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        assert!(err.contains("kv_lora_rank"), "{err}");
    }
}
