//! Random Mixtral checkpoints in the exact Hugging Face Hub layout (config.json,
//! safetensors shards with the Hub's tensor names, tokenizer files), so benchmarks can run
//! at realistic shapes without downloading anything.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use safetensors::{Dtype, View};

/// Elements per independently seeded chunk: small enough to spread one tensor over all
/// cores, large enough that seeding a ChaCha stream per chunk costs nothing. Part of the
/// output format: changing it changes every generated value.
const CHUNK_ELEMS: usize = 1 << 16;

/// Router weights are scaled up so that top-k choices are decided by clear margins.
const ROUTER_SCALE: f32 = 4.0;

/// Half-width of the uniform noise added to the 1.0 of norm weights.
const NORM_NOISE: f32 = 0.05;

/// Ids 0..3 are the special tokens, then the 256 byte-level symbols.
const SPECIAL_TOKENS: [&str; 3] = ["<unk>", "<s>", "</s>"];
pub const MIN_VOCAB: usize = SPECIAL_TOKENS.len() + 256;

/// The chat template of Mixtral-8x7B-Instruct as the fixtures carry it.
const MIXTRAL_CHAT_TEMPLATE: &str = "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}{% elif message['role'] == 'system' %}{{ message['content'] + '\n\n' }}{% endif %}{% endfor %}";

/// Text the first BPE merges are learnt from, so that common words become single tokens
/// and encoded prompts have realistic lengths.
const MERGE_CORPUS: &str = "\
Mixture of Experts models route every token to a few experts out of many. \
The router of each layer scores all experts and the top two experts process the token. \
Mixtral has eight experts in every layer and uses two of them for each token, so it runs \
at the speed of a much smaller model while it keeps the knowledge of a larger one. \
The attention layers are shared by all tokens and the experts are feed forward networks. \
So, mixture models are what you do when you're out of ideas, and they work very well. \
El modelo Mixtral se puede ejecutar a la velocidad de un modelo cuatro veces más pequeño. \
Los modelos fundacionales se entrenan con cantidades ingentes de datos y de texto. \
The quick brown fox jumps over the lazy dog. In the beginning there was the word, \
and the word was with the model, and the model was trained on the words of the world. \
Serving a large language model means loading the weights, reading the prompt, \
computing the attention and the experts for every token, and sampling the next token.";

/// Letters that grow tokens once the corpus has no frequent pair left, most common first.
const GROW_LETTERS: &str = "etaoinshrdlcumwfgypbvkjxqz";

#[derive(Debug, thiserror::Error)]
pub enum SynthError {
    #[error("invalid synthetic spec: `{field}` {reason}")]
    InvalidSpec { field: &'static str, reason: String },
    #[error("unknown dtype {name:?} (expected f32/float32, bf16/bfloat16 or f16/float16)")]
    UnknownDType { name: String },
    #[error("cannot write {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write safetensors file {}: {source}", path.display())]
    Safetensors {
        path: PathBuf,
        #[source]
        source: safetensors::SafeTensorError,
    },
    #[error("cannot serialize {}: {source}", path.display())]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("generated tokenizer for {} does not load: {message}", path.display())]
    Tokenizer { path: PathBuf, message: String },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SynthDType {
    F32,
    Bf16,
    F16,
}

impl SynthDType {
    pub fn size_bytes(self) -> usize {
        match self {
            SynthDType::F32 => 4,
            SynthDType::Bf16 | SynthDType::F16 => 2,
        }
    }

    /// The name config.json's `torch_dtype` uses.
    pub fn torch_name(self) -> &'static str {
        match self {
            SynthDType::F32 => "float32",
            SynthDType::Bf16 => "bfloat16",
            SynthDType::F16 => "float16",
        }
    }

    fn safetensors_dtype(self) -> Dtype {
        match self {
            SynthDType::F32 => Dtype::F32,
            SynthDType::Bf16 => Dtype::BF16,
            SynthDType::F16 => Dtype::F16,
        }
    }
}

impl FromStr for SynthDType {
    type Err = SynthError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" => Ok(SynthDType::F32),
            "bf16" | "bfloat16" => Ok(SynthDType::Bf16),
            "f16" | "float16" => Ok(SynthDType::F16),
            _ => Err(SynthError::UnknownDType { name: s.to_owned() }),
        }
    }
}

impl std::fmt::Display for SynthDType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.torch_name())
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SynthSpec {
    pub hidden: usize,
    pub ffn: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: Option<usize>,
    pub experts: usize,
    pub top_k: usize,
    pub vocab: usize,
    pub dtype: SynthDType,
    pub seed: u64,
    pub max_position: usize,
    pub shard_bytes: u64,
}

impl SynthSpec {
    /// Mixtral-8x7B's shapes with `layers` layers (the real model has 32), bf16, and the
    /// Hub's ~5 GB shards.
    pub fn mixtral_8x7b(layers: usize) -> Self {
        Self {
            hidden: 4096,
            ffn: 14336,
            layers,
            heads: 32,
            kv_heads: 8,
            head_dim: None,
            experts: 8,
            top_k: 2,
            vocab: 32000,
            dtype: SynthDType::Bf16,
            seed: 0,
            max_position: 32768,
            shard_bytes: 5_000_000_000,
        }
    }

    pub fn validate(&self) -> Result<(), SynthError> {
        let invalid =
            |field: &'static str, reason: String| Err(SynthError::InvalidSpec { field, reason });
        for (field, value) in [
            ("hidden", self.hidden),
            ("ffn", self.ffn),
            ("layers", self.layers),
            ("heads", self.heads),
            ("kv_heads", self.kv_heads),
            ("experts", self.experts),
            ("top_k", self.top_k),
            ("max_position", self.max_position),
        ] {
            if value == 0 {
                return invalid(field, "must be positive".into());
            }
        }
        if self.head_dim == Some(0) {
            return invalid("head_dim", "must be positive".into());
        }
        if self.head_dim.is_none() && !self.hidden.is_multiple_of(self.heads) {
            return invalid(
                "heads",
                format!(
                    "({}) must divide hidden ({}) when head_dim is not given",
                    self.heads, self.hidden
                ),
            );
        }
        if !self.heads.is_multiple_of(self.kv_heads) {
            return invalid(
                "kv_heads",
                format!("({}) must divide heads ({})", self.kv_heads, self.heads),
            );
        }
        if self.top_k > self.experts {
            return invalid(
                "top_k",
                format!(
                    "({}) must not exceed experts ({})",
                    self.top_k, self.experts
                ),
            );
        }
        if self.vocab < MIN_VOCAB {
            return invalid(
                "vocab",
                format!(
                    "({}) must be at least {MIN_VOCAB} (3 special tokens + 256 bytes)",
                    self.vocab
                ),
            );
        }
        if u32::try_from(self.vocab).is_err() {
            return invalid("vocab", format!("({}) does not fit token ids", self.vocab));
        }
        if self.shard_bytes == 0 {
            return invalid("shard_bytes", "must be positive".into());
        }
        self.tensors()?;
        Ok(())
    }

    pub fn effective_head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.hidden / self.heads.max(1))
    }

    /// Bytes of tensor data the checkpoint holds (the index's `total_size`).
    pub fn total_bytes(&self) -> Result<u64, SynthError> {
        self.validate()?;
        Ok(self.tensors()?.iter().map(|t| t.bytes).sum())
    }

    /// Every tensor in checkpoint order, which decides shard placement and each tensor's
    /// random stream.
    fn tensors(&self) -> Result<Vec<TensorSpec>, SynthError> {
        let hd = self.effective_head_dim();
        let (h, f) = (self.hidden, self.ffn);
        let too_large = || SynthError::InvalidSpec {
            field: "shape",
            reason: "tensor sizes overflow".into(),
        };
        let q_out = self.heads.checked_mul(hd).ok_or_else(too_large)?;
        let kv_out = self.kv_heads.checked_mul(hd).ok_or_else(too_large)?;
        let proj = |fan_in: usize| Init::Uniform {
            bound: uniform_bound(1.0 / (fan_in as f32).sqrt()),
        };

        let mut out = Vec::new();
        let mut add = |name: String, shape: Vec<usize>, init: Init| -> Result<(), SynthError> {
            let bytes = shape
                .iter()
                .try_fold(self.dtype.size_bytes() as u64, |acc, &d| {
                    acc.checked_mul(d as u64)
                })
                .ok_or_else(too_large)?;
            out.push(TensorSpec {
                name,
                shape,
                init,
                bytes,
            });
            Ok(())
        };

        // Unit-variance embeddings keep the residual stream at the scale the
        // projections produce.
        add(
            "model.embed_tokens.weight".into(),
            vec![self.vocab, h],
            Init::Uniform {
                bound: uniform_bound(1.0),
            },
        )?;
        for l in 0..self.layers {
            let p = format!("model.layers.{l}");
            add(format!("{p}.input_layernorm.weight"), vec![h], Init::Norm)?;
            add(
                format!("{p}.self_attn.q_proj.weight"),
                vec![q_out, h],
                proj(h),
            )?;
            add(
                format!("{p}.self_attn.k_proj.weight"),
                vec![kv_out, h],
                proj(h),
            )?;
            add(
                format!("{p}.self_attn.v_proj.weight"),
                vec![kv_out, h],
                proj(h),
            )?;
            add(
                format!("{p}.self_attn.o_proj.weight"),
                vec![h, q_out],
                proj(q_out),
            )?;
            add(
                format!("{p}.post_attention_layernorm.weight"),
                vec![h],
                Init::Norm,
            )?;
            add(
                format!("{p}.block_sparse_moe.gate.weight"),
                vec![self.experts, h],
                Init::Uniform {
                    bound: uniform_bound(ROUTER_SCALE / (h as f32).sqrt()),
                },
            )?;
            for e in 0..self.experts {
                let ep = format!("{p}.block_sparse_moe.experts.{e}");
                add(format!("{ep}.w1.weight"), vec![f, h], proj(h))?;
                add(format!("{ep}.w2.weight"), vec![h, f], proj(f))?;
                add(format!("{ep}.w3.weight"), vec![f, h], proj(h))?;
            }
        }
        add("model.norm.weight".into(), vec![h], Init::Norm)?;
        add("lm_head.weight".into(), vec![self.vocab, h], proj(h))?;
        Ok(out)
    }
}

/// Half-width of the uniform distribution with standard deviation `std`.
fn uniform_bound(std: f32) -> f32 {
    std * 3f32.sqrt()
}

#[derive(Clone, Copy, Debug)]
enum Init {
    /// Uniform in [-bound, bound).
    Uniform { bound: f32 },
    /// 1.0 plus uniform noise of half-width NORM_NOISE.
    Norm,
}

#[derive(Debug)]
struct TensorSpec {
    name: String,
    shape: Vec<usize>,
    init: Init,
    bytes: u64,
}

/// A tensor whose values are generated only when the safetensors writer asks for its
/// bytes: the writer requests one tensor at a time, so at most one tensor is in memory.
struct LazyTensor<'a> {
    spec: &'a TensorSpec,
    index: u64,
    seed: u64,
    dtype: SynthDType,
}

impl View for LazyTensor<'_> {
    fn dtype(&self) -> Dtype {
        self.dtype.safetensors_dtype()
    }

    fn shape(&self) -> &[usize] {
        &self.spec.shape
    }

    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Owned(generate(self.spec, self.index, self.seed, self.dtype))
    }

    fn data_len(&self) -> usize {
        // Fits: validate() checked the product, and the buffer is allocated at this size.
        self.spec.bytes as usize
    }
}

/// Each chunk has its own ChaCha key derived from (seed, tensor, chunk), so values do not
/// depend on thread count, shard layout or generation order.
fn chunk_rng(seed: u64, tensor: u64, chunk: u64) -> ChaCha8Rng {
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    key[8..16].copy_from_slice(&tensor.to_le_bytes());
    key[16..24].copy_from_slice(&chunk.to_le_bytes());
    key[24..].copy_from_slice(b"swsynth1");
    ChaCha8Rng::from_seed(key)
}

/// Fills each chunk with raw ChaCha output in one bulk call, then maps every element's own
/// random bits to its value in place: 24 bits for f32 (exact in its mantissa), 16 bits
/// for the 16-bit types (more than their 8 or 11 mantissa bits).
fn generate(spec: &TensorSpec, index: u64, seed: u64, dtype: SynthDType) -> Vec<u8> {
    const UNIT24: f32 = 1.0 / (1u32 << 23) as f32;
    const UNIT16: f32 = 1.0 / (1u32 << 15) as f32;
    let es = dtype.size_bytes();
    let mut buf = vec![0u8; spec.bytes as usize];
    let (scale, offset) = match spec.init {
        Init::Uniform { bound } => (bound, 0.0),
        Init::Norm => (NORM_NOISE, 1.0),
    };
    buf.par_chunks_mut(CHUNK_ELEMS * es)
        .enumerate()
        .for_each(|(ci, chunk)| {
            chunk_rng(seed, index, ci as u64).fill_bytes(chunk);
            // u in [-1, 1) -> offset + scale * u
            let value = |u: f32| offset + scale * u;
            match dtype {
                SynthDType::F32 => {
                    for out in chunk.chunks_exact_mut(4) {
                        let bits = u32::from_le_bytes([out[0], out[1], out[2], out[3]]) >> 8;
                        let v = value(bits as f32 * UNIT24 - 1.0);
                        out.copy_from_slice(&v.to_le_bytes());
                    }
                }
                SynthDType::Bf16 => {
                    for out in chunk.chunks_exact_mut(2) {
                        let bits = u16::from_le_bytes([out[0], out[1]]);
                        let v = value(f32::from(bits) * UNIT16 - 1.0);
                        out.copy_from_slice(&bf16_bits(v).to_le_bytes());
                    }
                }
                SynthDType::F16 => {
                    for out in chunk.chunks_exact_mut(2) {
                        let bits = u16::from_le_bytes([out[0], out[1]]);
                        let v = value(f32::from(bits) * UNIT16 - 1.0);
                        out.copy_from_slice(&half::f16::from_f32(v).to_le_bytes());
                    }
                }
            }
        });
    buf
}

/// f32 -> bf16 bits, rounding to nearest even; values here are always finite, and this
/// stays cheap even where `half`'s conversion is not inlined (unoptimised test builds).
#[inline]
fn bf16_bits(v: f32) -> u16 {
    let bits = v.to_bits();
    let rounded = bits.wrapping_add(0x7FFF + ((bits >> 16) & 1));
    (rounded >> 16) as u16
}

/// Consecutive whole tensors per shard, a new shard whenever the next tensor would push
/// the current one past `shard_bytes` (a tensor larger than that gets a shard alone).
fn plan_shards(tensors: &[TensorSpec], shard_bytes: u64) -> Vec<std::ops::Range<usize>> {
    let mut shards = Vec::new();
    let mut start = 0;
    let mut size = 0u64;
    for (i, t) in tensors.iter().enumerate() {
        if i > start && size + t.bytes > shard_bytes {
            shards.push(start..i);
            start = i;
            size = 0;
        }
        size += t.bytes;
    }
    if start < tensors.len() {
        shards.push(start..tensors.len());
    }
    shards
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> SynthError + '_ {
    move |source| SynthError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn write_json(path: &Path, value: &serde_json::Value) -> Result<(), SynthError> {
    let mut text = serde_json::to_string_pretty(value).map_err(|source| SynthError::Json {
        path: path.to_path_buf(),
        source,
    })?;
    text.push('\n');
    std::fs::write(path, text).map_err(io_err(path))
}

/// Weight files of an earlier run with other sharding would be picked up by loaders
/// next to the new ones, so they go first.
fn remove_stale_weights(out: &Path) -> Result<(), SynthError> {
    for entry in std::fs::read_dir(out).map_err(io_err(out))? {
        let entry = entry.map_err(io_err(out))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let is_weights = name == "model.safetensors"
            || name == "model.safetensors.index.json"
            || (name.starts_with("model-")
                && name.contains("-of-")
                && name.ends_with(".safetensors"));
        if is_weights {
            let path = entry.path();
            std::fs::remove_file(&path).map_err(io_err(&path))?;
        }
    }
    Ok(())
}

fn config_json(spec: &SynthSpec) -> serde_json::Value {
    let mut config = serde_json::json!({
        "architectures": ["MixtralForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "hidden_size": spec.hidden,
        "initializer_range": 0.02,
        "intermediate_size": spec.ffn,
        "max_position_embeddings": spec.max_position,
        "model_type": "mixtral",
        "num_attention_heads": spec.heads,
        "num_experts_per_tok": spec.top_k,
        "num_hidden_layers": spec.layers,
        "num_key_value_heads": spec.kv_heads,
        "num_local_experts": spec.experts,
        "output_router_logits": false,
        "rms_norm_eps": 1e-5,
        "rope_theta": 1e6,
        "router_aux_loss_coef": 0.02,
        "sliding_window": null,
        "tie_word_embeddings": false,
        "torch_dtype": spec.dtype.torch_name(),
        "use_cache": true,
        "vocab_size": spec.vocab,
    });
    if let (Some(hd), Some(obj)) = (spec.head_dim, config.as_object_mut()) {
        obj.insert("head_dim".into(), hd.into());
    }
    config
}

/// Writes a random checkpoint into `out` (created if missing): config.json,
/// generation_config.json, tokenizer.json, tokenizer_config.json and the weights, as one
/// model.safetensors or as shards plus model.safetensors.index.json. Weight files left by
/// an earlier run in `out` are removed first.
pub fn write_checkpoint(spec: &SynthSpec, out: &Path) -> Result<(), SynthError> {
    spec.validate()?;
    let tensors = spec.tensors()?;
    std::fs::create_dir_all(out).map_err(io_err(out))?;

    write_json(&out.join("config.json"), &config_json(spec))?;
    write_json(
        &out.join("generation_config.json"),
        &serde_json::json!({ "bos_token_id": 1, "eos_token_id": 2 }),
    )?;
    write_json(
        &out.join("tokenizer_config.json"),
        &serde_json::json!({
            "add_bos_token": true,
            "add_eos_token": false,
            "bos_token": SPECIAL_TOKENS[1],
            "eos_token": SPECIAL_TOKENS[2],
            "unk_token": SPECIAL_TOKENS[0],
            "chat_template": MIXTRAL_CHAT_TEMPLATE,
            "model_max_length": spec.max_position,
            "tokenizer_class": "PreTrainedTokenizerFast",
        }),
    )?;
    write_tokenizer(spec.vocab, &out.join("tokenizer.json"))?;

    remove_stale_weights(out)?;
    let total: u64 = tensors.iter().map(|t| t.bytes).sum();
    let metadata = HashMap::from([("format".to_owned(), "pt".to_owned())]);
    let views = |range: std::ops::Range<usize>| {
        let tensors = &tensors;
        range.map(move |i| {
            let t = &tensors[i];
            (
                t.name.clone(),
                LazyTensor {
                    spec: t,
                    index: i as u64,
                    seed: spec.seed,
                    dtype: spec.dtype,
                },
            )
        })
    };
    let write_shard = |range: std::ops::Range<usize>, path: &Path| {
        safetensors::serialize_to_file(views(range), Some(metadata.clone()), path).map_err(
            |source| SynthError::Safetensors {
                path: path.to_path_buf(),
                source,
            },
        )
    };

    if total <= spec.shard_bytes {
        return write_shard(0..tensors.len(), &out.join("model.safetensors"));
    }
    let shards = plan_shards(&tensors, spec.shard_bytes);
    let n = shards.len();
    let mut weight_map = BTreeMap::new();
    for (s, range) in shards.into_iter().enumerate() {
        let file = format!("model-{:05}-of-{n:05}.safetensors", s + 1);
        for t in &tensors[range.clone()] {
            weight_map.insert(t.name.clone(), file.clone());
        }
        write_shard(range, &out.join(&file))?;
    }
    write_json(
        &out.join("model.safetensors.index.json"),
        &serde_json::json!({
            "metadata": { "total_size": total },
            "weight_map": weight_map,
        }),
    )
}

/// GPT-2's reversible byte -> printable char map that tokenizers' ByteLevel uses.
fn byte_to_char() -> [char; 256] {
    let mut map = ['\0'; 256];
    let mut next_extra = 256u32;
    for b in 0..=255u8 {
        let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        let code = if printable {
            u32::from(b)
        } else {
            let c = next_extra;
            next_extra += 1;
            c
        };
        // All codes are below 0x144, far from the surrogate range.
        map[usize::from(b)] = char::from_u32(code).unwrap_or('\u{FFFD}');
    }
    map
}

/// Vocabulary (in id order) and merges of a byte-level BPE with exactly `vocab` tokens:
/// merges first learnt greedily from MERGE_CORPUS, then, when no pair there occurs twice,
/// grown by appending letters to letter-only tokens in id order, which never runs out.
fn build_bpe(vocab: usize) -> (Vec<String>, Vec<(String, String)>) {
    let bytes = byte_to_char();
    let mut tokens: Vec<String> = SPECIAL_TOKENS.iter().map(|s| s.to_string()).collect();
    tokens.extend(bytes.iter().map(|c| c.to_string()));
    let mut known: HashSet<String> = tokens.iter().cloned().collect();
    let mut merges = Vec::new();

    // Words as the ByteLevel pre-tokenizer sees them: a leading space belongs to the word.
    let mut words: BTreeMap<Vec<String>, usize> = BTreeMap::new();
    for (i, word) in MERGE_CORPUS.split(' ').enumerate() {
        if word.is_empty() {
            continue;
        }
        let text = if i == 0 {
            word.to_owned()
        } else {
            format!(" {word}")
        };
        let symbols = text
            .bytes()
            .map(|b| bytes[usize::from(b)].to_string())
            .collect();
        *words.entry(symbols).or_default() += 1;
    }
    let mut banned: HashSet<(String, String)> = HashSet::new();
    while tokens.len() < vocab {
        let mut counts: BTreeMap<(&str, &str), usize> = BTreeMap::new();
        for (symbols, &n) in &words {
            for pair in symbols.windows(2) {
                *counts.entry((&pair[0], &pair[1])).or_default() += n;
            }
        }
        // Highest count wins; the BTreeMap order breaks ties deterministically.
        let best = counts
            .into_iter()
            .filter(|(pair, _)| !banned.contains(&(pair.0.to_owned(), pair.1.to_owned())))
            .fold(
                None,
                |best: Option<((&str, &str), usize)>, (pair, n)| match best {
                    Some((_, m)) if m >= n => best,
                    _ => Some((pair, n)),
                },
            );
        let Some(((a, b), count)) = best else { break };
        if count < 2 {
            break;
        }
        let (a, b) = (a.to_owned(), b.to_owned());
        let merged = format!("{a}{b}");
        if known.contains(&merged) {
            banned.insert((a, b));
            continue;
        }
        words = words
            .into_iter()
            .map(|(symbols, n)| (merge_pair(symbols, &a, &b, &merged), n))
            .fold(BTreeMap::new(), |mut acc, (symbols, n)| {
                *acc.entry(symbols).or_default() += n;
                acc
            });
        known.insert(merged.clone());
        tokens.push(merged);
        merges.push((a, b));
    }

    let space = bytes[usize::from(b' ')];
    let mut base = SPECIAL_TOKENS.len();
    while tokens.len() < vocab {
        // Letter-only tokens always extend to new ones, so this runs out only on a bug,
        // which the vocab size check in write_tokenizer then reports.
        let Some(stem) = tokens.get(base).cloned() else {
            break;
        };
        base += 1;
        if !stem.chars().all(|c| c.is_ascii_alphabetic() || c == space) {
            continue;
        }
        for letter in GROW_LETTERS.chars() {
            if tokens.len() >= vocab {
                break;
            }
            let merged = format!("{stem}{letter}");
            if known.insert(merged.clone()) {
                tokens.push(merged);
                merges.push((stem.clone(), letter.to_string()));
            }
        }
    }
    (tokens, merges)
}

fn merge_pair(symbols: Vec<String>, a: &str, b: &str, merged: &str) -> Vec<String> {
    let mut out = Vec::with_capacity(symbols.len());
    let mut iter = symbols.into_iter().peekable();
    while let Some(s) = iter.next() {
        if s == a && iter.peek().is_some_and(|next| next == b) {
            iter.next();
            out.push(merged.to_owned());
        } else {
            out.push(s);
        }
    }
    out
}

fn tokenizer_json(vocab: usize) -> serde_json::Value {
    let (tokens, merges) = build_bpe(vocab);
    let vocab_map: serde_json::Map<String, serde_json::Value> = tokens
        .iter()
        .enumerate()
        .map(|(id, t)| (t.clone(), id.into()))
        .collect();
    let added: Vec<serde_json::Value> = SPECIAL_TOKENS
        .iter()
        .enumerate()
        .map(|(id, t)| {
            serde_json::json!({
                "id": id, "content": t, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": true,
            })
        })
        .collect();
    let bos = SPECIAL_TOKENS[1];
    let byte_level = serde_json::json!({
        "type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true,
    });
    serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": byte_level,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [
                {"SpecialToken": {"id": bos, "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
            ],
            "pair": [
                {"SpecialToken": {"id": bos, "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
                {"SpecialToken": {"id": bos, "type_id": 0}},
                {"Sequence": {"id": "B", "type_id": 0}},
            ],
            "special_tokens": {bos: {"id": bos, "ids": [1], "tokens": [bos]}},
        },
        "decoder": byte_level,
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": null,
            "continuing_subword_prefix": null,
            "end_of_word_suffix": null,
            "fuse_unk": false,
            "byte_fallback": false,
            "ignore_merges": false,
            "vocab": vocab_map,
            "merges": merges.iter().map(|(a, b)| [a, b]).collect::<Vec<_>>(),
        },
    })
}

/// Loads the generated JSON with the tokenizers crate before writing it, so a file that
/// reaches disk is known to load with exactly `vocab` ids; the crate's own serializer then
/// writes the vocabulary in id order, as Hub files have it.
fn write_tokenizer(vocab: usize, path: &Path) -> Result<(), SynthError> {
    let fail = |message: String| SynthError::Tokenizer {
        path: path.to_path_buf(),
        message,
    };
    let json = tokenizer_json(vocab).to_string();
    let tok = tokenizers::Tokenizer::from_str(&json).map_err(|e| fail(e.to_string()))?;
    let got = tok.get_vocab_size(true);
    if got != vocab {
        return Err(fail(format!("has {got} ids instead of {vocab}")));
    }
    let text = tok.to_string(true).map_err(|e| fail(e.to_string()))?;
    std::fs::write(path, text).map_err(io_err(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny(seed: u64) -> SynthSpec {
        SynthSpec {
            hidden: 32,
            ffn: 48,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            head_dim: None,
            experts: 4,
            top_k: 2,
            vocab: 300,
            dtype: SynthDType::Bf16,
            seed,
            max_position: 512,
            shard_bytes: 1 << 30,
        }
    }

    fn expected_tensors(spec: &SynthSpec) -> BTreeMap<String, Vec<usize>> {
        let (h, f, v) = (spec.hidden, spec.ffn, spec.vocab);
        let hd = spec.effective_head_dim();
        let mut m = BTreeMap::new();
        m.insert("model.embed_tokens.weight".to_owned(), vec![v, h]);
        m.insert("model.norm.weight".to_owned(), vec![h]);
        m.insert("lm_head.weight".to_owned(), vec![v, h]);
        for l in 0..spec.layers {
            let p = format!("model.layers.{l}");
            let attn = format!("{p}.self_attn");
            m.insert(format!("{attn}.q_proj.weight"), vec![spec.heads * hd, h]);
            m.insert(format!("{attn}.k_proj.weight"), vec![spec.kv_heads * hd, h]);
            m.insert(format!("{attn}.v_proj.weight"), vec![spec.kv_heads * hd, h]);
            m.insert(format!("{attn}.o_proj.weight"), vec![h, spec.heads * hd]);
            m.insert(format!("{p}.input_layernorm.weight"), vec![h]);
            m.insert(format!("{p}.post_attention_layernorm.weight"), vec![h]);
            m.insert(
                format!("{p}.block_sparse_moe.gate.weight"),
                vec![spec.experts, h],
            );
            for e in 0..spec.experts {
                let ep = format!("{p}.block_sparse_moe.experts.{e}");
                m.insert(format!("{ep}.w1.weight"), vec![f, h]);
                m.insert(format!("{ep}.w3.weight"), vec![f, h]);
                m.insert(format!("{ep}.w2.weight"), vec![h, f]);
            }
        }
        m
    }

    /// Tensor name -> (dtype, shape, bytes) over every weight file in `dir`, and the
    /// safetensors metadata of each file.
    type ReadBack = BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)>;

    fn read_weights(dir: &Path, files: &[String]) -> ReadBack {
        let mut all = BTreeMap::new();
        for file in files {
            let bytes = std::fs::read(dir.join(file)).unwrap();
            let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
            let format = meta.metadata().as_ref().and_then(|m| m.get("format"));
            assert_eq!(format.map(String::as_str), Some("pt"), "{file}");
            let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
            for (name, view) in st.tensors() {
                let prev = all.insert(
                    name.clone(),
                    (view.dtype(), view.shape().to_vec(), view.data().to_vec()),
                );
                assert!(prev.is_none(), "{name} appears twice");
            }
        }
        all
    }

    fn dir_files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (
                    e.file_name().to_string_lossy().into_owned(),
                    std::fs::read(e.path()).unwrap(),
                )
            })
            .collect()
    }

    #[test]
    fn config_has_mixtral_fields() {
        let tmp = tempfile::tempdir().unwrap();
        let spec = tiny(1);
        write_checkpoint(&spec, tmp.path()).unwrap();
        let text = std::fs::read_to_string(tmp.path().join("config.json")).unwrap();
        let c: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(c["model_type"], "mixtral");
        assert_eq!(
            c["architectures"],
            serde_json::json!(["MixtralForCausalLM"])
        );
        assert_eq!(c["hidden_size"], 32);
        assert_eq!(c["intermediate_size"], 48);
        assert_eq!(c["num_hidden_layers"], 2);
        assert_eq!(c["num_attention_heads"], 4);
        assert_eq!(c["num_key_value_heads"], 2);
        assert!(c.get("head_dim").is_none());
        assert_eq!(c["num_local_experts"], 4);
        assert_eq!(c["num_experts_per_tok"], 2);
        assert_eq!(c["vocab_size"], 300);
        assert_eq!(c["max_position_embeddings"], 512);
        assert_eq!(c["rms_norm_eps"].as_f64(), Some(1e-5));
        assert_eq!(c["rope_theta"].as_f64(), Some(1e6));
        assert_eq!(c["torch_dtype"], "bfloat16");
        assert_eq!(c["bos_token_id"], 1);
        assert_eq!(c["eos_token_id"], 2);
        assert_eq!(c["tie_word_embeddings"], false);
        assert!(c["sliding_window"].is_null());
        assert_eq!(c["hidden_act"], "silu");

        let gen_text = std::fs::read_to_string(tmp.path().join("generation_config.json")).unwrap();
        let g: serde_json::Value = serde_json::from_str(&gen_text).unwrap();
        assert_eq!(
            (g["bos_token_id"].as_u64(), g["eos_token_id"].as_u64()),
            (Some(1), Some(2))
        );

        let with_hd = SynthSpec {
            head_dim: Some(16),
            ..tiny(1)
        };
        let c = config_json(&with_hd);
        assert_eq!(c["head_dim"], 16);
    }

    #[test]
    fn single_file_has_every_tensor_with_shape_and_dtype() {
        for dtype in [SynthDType::F32, SynthDType::Bf16, SynthDType::F16] {
            let tmp = tempfile::tempdir().unwrap();
            let spec = SynthSpec {
                dtype,
                head_dim: Some(12),
                ..tiny(3)
            };
            write_checkpoint(&spec, tmp.path()).unwrap();
            assert!(!tmp.path().join("model.safetensors.index.json").exists());
            let got = read_weights(tmp.path(), &["model.safetensors".to_owned()]);
            let expected = expected_tensors(&spec);
            assert_eq!(
                got.keys().collect::<Vec<_>>(),
                expected.keys().collect::<Vec<_>>()
            );
            for (name, shape) in &expected {
                let (dt, got_shape, data) = &got[name];
                assert_eq!(*dt, spec.dtype.safetensors_dtype(), "{name}");
                assert_eq!(got_shape, shape, "{name}");
                let numel: usize = shape.iter().product();
                assert_eq!(data.len(), numel * dtype.size_bytes(), "{name}");
            }
        }
    }

    fn as_f32(data: &[u8]) -> Vec<f32> {
        data.chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect()
    }

    #[test]
    fn values_have_the_intended_scale() {
        let tmp = tempfile::tempdir().unwrap();
        let spec = SynthSpec {
            dtype: SynthDType::F32,
            ..tiny(5)
        };
        write_checkpoint(&spec, tmp.path()).unwrap();
        let got = read_weights(tmp.path(), &["model.safetensors".to_owned()]);
        let std = |name: &str| {
            let v = as_f32(&got[name].2);
            let mean = v.iter().sum::<f32>() / v.len() as f32;
            (v.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / v.len() as f32).sqrt()
        };
        let expected = 1.0 / (spec.hidden as f32).sqrt();
        let q = std("model.layers.0.self_attn.q_proj.weight");
        assert!((q / expected - 1.0).abs() < 0.1, "q std {q}");
        let w2 = std("model.layers.1.block_sparse_moe.experts.3.w2.weight");
        let expected_w2 = 1.0 / (spec.ffn as f32).sqrt();
        assert!((w2 / expected_w2 - 1.0).abs() < 0.1, "w2 std {w2}");
        let gate = std("model.layers.0.block_sparse_moe.gate.weight");
        assert!(gate > 3.0 * expected, "router std {gate}");
        for x in as_f32(&got["model.norm.weight"].2) {
            assert!((x - 1.0).abs() <= NORM_NOISE, "norm {x}");
        }
    }

    #[test]
    fn small_shard_bytes_gives_shards_and_index() {
        let tmp = tempfile::tempdir().unwrap();
        let spec = SynthSpec {
            shard_bytes: 20_000,
            ..tiny(7)
        };
        // A stale single-file checkpoint must not survive next to the shards.
        std::fs::write(tmp.path().join("model.safetensors"), b"stale").unwrap();
        write_checkpoint(&spec, tmp.path()).unwrap();
        assert!(!tmp.path().join("model.safetensors").exists());

        let text =
            std::fs::read_to_string(tmp.path().join("model.safetensors.index.json")).unwrap();
        let index: serde_json::Value = serde_json::from_str(&text).unwrap();
        let weight_map = index["weight_map"].as_object().unwrap();
        let mut files: Vec<String> = weight_map
            .values()
            .map(|v| v.as_str().unwrap().to_owned())
            .collect();
        files.sort();
        files.dedup();
        assert!(files.len() > 2, "{files:?}");
        let n = files.len();
        for (i, f) in files.iter().enumerate() {
            assert_eq!(f, &format!("model-{:05}-of-{n:05}.safetensors", i + 1));
        }

        let expected = expected_tensors(&spec);
        assert_eq!(
            weight_map.keys().collect::<Vec<_>>(),
            expected.keys().collect::<Vec<_>>()
        );
        let got = read_weights(tmp.path(), &files);
        assert_eq!(
            got.keys().collect::<Vec<_>>(),
            expected.keys().collect::<Vec<_>>()
        );
        let total: usize = got.values().map(|(_, _, d)| d.len()).sum();
        assert_eq!(index["metadata"]["total_size"].as_u64(), Some(total as u64));
        for file in &files {
            let bytes = std::fs::read(tmp.path().join(file)).unwrap();
            let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
            for name in st.names() {
                assert_eq!(weight_map[name], file.as_str());
            }
        }

        // Sharding changes where tensors live, not their values.
        let single = tempfile::tempdir().unwrap();
        write_checkpoint(&tiny(7), single.path()).unwrap();
        let single_got = read_weights(single.path(), &["model.safetensors".to_owned()]);
        assert_eq!(got, single_got);
    }

    #[test]
    fn same_seed_same_bytes_other_seed_differs() {
        let spec = SynthSpec {
            shard_bytes: 50_000,
            ..tiny(11)
        };
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        let c = tempfile::tempdir().unwrap();
        write_checkpoint(&spec, a.path()).unwrap();
        write_checkpoint(&spec, b.path()).unwrap();
        write_checkpoint(&SynthSpec { seed: 12, ..spec }, c.path()).unwrap();
        let (fa, fb, fc) = (
            dir_files(a.path()),
            dir_files(b.path()),
            dir_files(c.path()),
        );
        assert_eq!(fa, fb);
        assert_eq!(fa.keys().collect::<Vec<_>>(), fc.keys().collect::<Vec<_>>());
        for (name, bytes) in &fa {
            if name.ends_with(".safetensors") {
                assert_ne!(bytes, &fc[name], "{name}");
            }
        }
    }

    #[test]
    fn tokenizer_loads_and_round_trips() {
        for vocab in [MIN_VOCAB, 300, 2000] {
            let tmp = tempfile::tempdir().unwrap();
            let spec = SynthSpec { vocab, ..tiny(1) };
            write_checkpoint(&spec, tmp.path()).unwrap();
            let tok = tokenizers::Tokenizer::from_file(tmp.path().join("tokenizer.json")).unwrap();
            assert_eq!(tok.get_vocab_size(true), vocab);
            for (id, t) in SPECIAL_TOKENS.iter().enumerate() {
                assert_eq!(tok.token_to_id(t), Some(id as u32));
            }
            let text = "Hello, wörld! 123";
            let enc = tok.encode(text, true).unwrap();
            assert_eq!(enc.get_ids()[0], 1);
            assert_eq!(tok.decode(enc.get_ids(), true).unwrap(), text);
            if vocab == 2000 {
                // Learnt merges make common words shorter than their bytes.
                let ids = tok.encode(" the experts", false).unwrap();
                assert!(ids.get_ids().len() < 6, "{:?}", ids.get_tokens());
            }

            let config: serde_json::Value = serde_json::from_str(
                &std::fs::read_to_string(tmp.path().join("tokenizer_config.json")).unwrap(),
            )
            .unwrap();
            assert_eq!(config["chat_template"], MIXTRAL_CHAT_TEMPLATE);
            assert_eq!(config["bos_token"], "<s>");
            assert_eq!(config["eos_token"], "</s>");
        }
    }

    #[test]
    fn byte_alphabet_matches_tokenizers() {
        let ours: HashSet<char> = byte_to_char().into_iter().collect();
        let theirs: HashSet<char> = tokenizers::pre_tokenizers::byte_level::ByteLevel::alphabet()
            .into_iter()
            .collect();
        assert_eq!(ours.len(), 256);
        assert_eq!(ours, theirs);
    }

    #[test]
    fn chat_template_matches_fixture() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/mixtral-tiny/tokenizer_config.json");
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        assert_eq!(config["chat_template"], MIXTRAL_CHAT_TEMPLATE);
    }

    #[test]
    fn invalid_specs_name_the_field() {
        let field_of = |spec: SynthSpec| match spec.validate() {
            Err(SynthError::InvalidSpec { field, .. }) => field,
            other => panic!("expected InvalidSpec, got {other:?}"),
        };
        assert_eq!(
            field_of(SynthSpec {
                heads: 5,
                ..tiny(0)
            }),
            "heads"
        );
        assert_eq!(
            field_of(SynthSpec {
                kv_heads: 3,
                ..tiny(0)
            }),
            "kv_heads"
        );
        assert_eq!(
            field_of(SynthSpec {
                top_k: 5,
                ..tiny(0)
            }),
            "top_k"
        );
        assert_eq!(
            field_of(SynthSpec {
                vocab: 258,
                ..tiny(0)
            }),
            "vocab"
        );
        assert_eq!(
            field_of(SynthSpec {
                layers: 0,
                ..tiny(0)
            }),
            "layers"
        );
        assert_eq!(
            field_of(SynthSpec {
                head_dim: Some(0),
                ..tiny(0)
            }),
            "head_dim"
        );
        assert_eq!(
            field_of(SynthSpec {
                shard_bytes: 0,
                ..tiny(0)
            }),
            "shard_bytes"
        );
        // An explicit head_dim lifts the divisibility requirement.
        assert!(
            SynthSpec {
                heads: 5,
                kv_heads: 5,
                head_dim: Some(8),
                ..tiny(0)
            }
            .validate()
            .is_ok()
        );

        let tmp = tempfile::tempdir().unwrap();
        let err = write_checkpoint(
            &SynthSpec {
                top_k: 9,
                ..tiny(0)
            },
            tmp.path(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("top_k"), "{err}");
    }

    #[test]
    fn bf16_rounding_matches_half() {
        let mut rng = chunk_rng(0, 0, 0);
        let specials = [
            0.0f32,
            -0.0,
            1.0,
            -1.0,
            3.0e-39,
            1e30,
            // Exact ties between two bf16 values, one rounding down to even, one up.
            f32::from_bits(0x3F80_8000),
            f32::from_bits(0x3F81_8000),
        ];
        let randoms = (0..100_000).map(|_| f32::from_bits(rng.next_u32() & 0x7F7F_FFFF));
        for v in specials.into_iter().chain(randoms) {
            for v in [v, -v] {
                assert_eq!(bf16_bits(v), half::bf16::from_f32(v).to_bits(), "{v:e}");
            }
        }
    }

    #[test]
    fn dtype_parses_names() {
        for (s, d) in [
            ("f32", SynthDType::F32),
            ("float32", SynthDType::F32),
            ("bf16", SynthDType::Bf16),
            ("bfloat16", SynthDType::Bf16),
            ("f16", SynthDType::F16),
            ("float16", SynthDType::F16),
        ] {
            assert_eq!(s.parse::<SynthDType>().unwrap(), d);
        }
        assert!(matches!(
            "int8".parse::<SynthDType>(),
            Err(SynthError::UnknownDType { .. })
        ));
    }

    #[test]
    fn mixtral_8x7b_layer_size() {
        let spec = SynthSpec::mixtral_8x7b(1);
        spec.validate().unwrap();
        let per_layer: u64 = spec
            .tensors()
            .unwrap()
            .iter()
            .filter(|t| t.name.starts_with("model.layers.0."))
            .map(|t| t.bytes)
            .sum();
        let (h, f) = (4096u64, 14336u64);
        let attn = 2 * (h * h + 2 * 1024 * h + h * h);
        let experts = 2 * 8 * 3 * h * f;
        let norms_and_router = 2 * (2 * h + 8 * h);
        // ~2.9 GB (2.7 GiB) per layer in bf16.
        assert_eq!(per_layer, attn + experts + norms_and_router);
    }
}
