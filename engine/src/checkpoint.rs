//! Memory-mapped safetensors checkpoints: one `model.safetensors` or shards listed in
//! `model.safetensors.index.json`.
//!
//! Opening a checkpoint reads only the shard headers. Tensor bytes are read when a tensor
//! (or one expert's slice of a fused tensor) is loaded, so an expert node that loads a
//! few experts never reads the others' bytes. The maps are advised `MADV_RANDOM` so that
//! kernel read-ahead does not pull neighbouring experts in behind our back.
//!
//! A checkpoint opened with a [`Quantization`] also loads block-scaled FP8 weights: a
//! `float8_e4m3fn` tensor is dequantised with its `_scale_inv` sibling as it is read, so
//! callers see f32 either way (see [`crate::quant`]).

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::{Advice, Mmap};
use safetensors::{SafeTensorError, SafeTensors};
use serde::Deserialize;

use crate::dtype::DType;
use crate::ops::{CpuWeights, Linear, QuantizedRows, Weights};
use crate::quant::{self, Quantization};

pub const SINGLE_FILE: &str = "model.safetensors";
pub const INDEX_FILE: &str = "model.safetensors.index.json";

#[derive(Debug, thiserror::Error)]
pub enum WeightError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: no {SINGLE_FILE} or {INDEX_FILE} in this directory")]
    NoWeights { path: PathBuf },
    #[error("{path}: invalid shard index: {reason}")]
    Index { path: PathBuf, reason: String },
    #[error("{path}: truncated or padded safetensors file: {reason}")]
    Truncated { path: PathBuf, reason: String },
    #[error("{path}: not a valid safetensors file: {reason}")]
    Header { path: PathBuf, reason: String },
    #[error("tensor `{name}` not found in {location}")]
    Missing { name: String, location: String },
    #[error("tensor `{name}` in {path}: expected shape {expected:?}, found {found:?}")]
    Shape {
        name: String,
        path: PathBuf,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error(
        "tensor `{name}` in {path}: dtype {dtype} is not supported (float32, bfloat16, float16, float8_e4m3fn)"
    )]
    DType {
        name: String,
        path: PathBuf,
        dtype: String,
    },
    #[error(
        "tensor `{name}` in {path}: index says it lives in this shard but the shard does not hold it"
    )]
    IndexMismatch { name: String, path: PathBuf },
    #[error(
        "tensor `{name}` in {path} is float8_e4m3fn, but the checkpoint was opened without fp8 quantization (config.json needs a quantization_config with quant_method fp8 and weight_block_size)"
    )]
    Fp8Unconfigured { name: String, path: PathBuf },
    #[error(
        "tensor `{name}` in {path}: float8_e4m3fn tensor of shape {shape:?} has no [rows, cols] matrix for block scales"
    )]
    Fp8Rank {
        name: String,
        path: PathBuf,
        shape: Vec<usize>,
    },
    #[error(
        "tensor `{name}` in {path} is float8_e4m3fn, but its scale tensor `{scale}` is not in {location}"
    )]
    ScaleMissing {
        name: String,
        path: PathBuf,
        scale: String,
        location: String,
    },
    // The scale's name is derived, not stored, to keep `WeightError` small.
    #[error(
        "scale tensor `{}` in {path}: expected shape {expected:?} for `{name}` in {}x{} blocks, found {found:?}",
        quant::scale_name(name),
        block[0],
        block[1]
    )]
    ScaleShape {
        name: String,
        path: PathBuf,
        block: [usize; 2],
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error(
        "scale tensor `{scale}` in {path}: dtype {dtype} is not supported (float32, bfloat16, float16)"
    )]
    ScaleDType {
        scale: String,
        path: PathBuf,
        dtype: DType,
    },
    #[error("scale tensor `{scale}` in {path}: element {at:?} is {value}, not a finite number")]
    ScaleValue {
        scale: String,
        path: PathBuf,
        at: Vec<usize>,
        value: f32,
    },
}

#[derive(Deserialize)]
struct IndexJson {
    weight_map: HashMap<String, String>,
}

struct Shard {
    path: PathBuf,
    map: Mmap,
}

#[derive(Debug, Clone)]
struct TensorRef {
    shard: usize,
    dtype: DType,
    shape: Vec<usize>,
    /// Absolute byte range of the tensor's data within its shard.
    start: usize,
    end: usize,
}

/// A Hub checkpoint's weights, opened but not read.
pub struct Checkpoint {
    dir: PathBuf,
    shards: Vec<Shard>,
    tensors: HashMap<String, TensorRef>,
    quantization: Quantization,
    /// How the matrices read through [`Checkpoint::linear`] are held.
    cpu_weights: CpuWeights,
}

impl Checkpoint {
    /// Opens an unquantised checkpoint: a `float8_e4m3fn` tensor fails to load with
    /// [`WeightError::Fp8Unconfigured`]. See [`Checkpoint::open_quantized`].
    pub fn open(dir: &Path) -> Result<Self, WeightError> {
        let single = dir.join(SINGLE_FILE);
        let index = dir.join(INDEX_FILE);
        let shard_files: Vec<PathBuf> = if index.is_file() {
            let text = std::fs::read_to_string(&index).map_err(|source| WeightError::Io {
                path: index.clone(),
                source,
            })?;
            let parsed: IndexJson =
                serde_json::from_str(&text).map_err(|e| WeightError::Index {
                    path: index.clone(),
                    reason: e.to_string(),
                })?;
            let mut files: Vec<String> = parsed.weight_map.values().cloned().collect();
            files.sort();
            files.dedup();
            for f in &files {
                // The index is input: a shard name must stay inside the checkpoint directory.
                if f.contains('/') || f.contains('\\') || f == ".." {
                    return Err(WeightError::Index {
                        path: index.clone(),
                        reason: format!("shard name `{f}` is not a plain file name"),
                    });
                }
            }
            let mut ckpt_files: Vec<PathBuf> = files.iter().map(|f| dir.join(f)).collect();
            ckpt_files.dedup();
            let mut ckpt = Self::open_files(dir, &ckpt_files)?;
            // Every tensor must be where the index says.
            for (name, file) in &parsed.weight_map {
                let found = ckpt.tensors.get(name).map(|t| &ckpt.shards[t.shard].path);
                if found != Some(&dir.join(file)) {
                    return Err(WeightError::IndexMismatch {
                        name: name.clone(),
                        path: dir.join(file),
                    });
                }
            }
            ckpt.dir = dir.to_owned();
            return Ok(ckpt);
        } else if single.is_file() {
            vec![single]
        } else {
            return Err(WeightError::NoWeights {
                path: dir.to_owned(),
            });
        };
        Self::open_files(dir, &shard_files)
    }

    /// Opens a checkpoint whose `config.json` declares `quantization` (as parsed by
    /// [`Quantization::from_config_json`]).
    pub fn open_quantized(dir: &Path, quantization: Quantization) -> Result<Self, WeightError> {
        Ok(Self::open(dir)?.with_quantization(quantization))
    }

    /// Sets how quantised tensors are turned back into weights.
    ///
    /// # Panics
    /// If an FP8 block dimension is zero, which [`Quantization::from_config_json`] never
    /// returns.
    pub fn with_quantization(mut self, quantization: Quantization) -> Self {
        if let Some(block) = quantization.fp8_block() {
            assert!(
                block[0] > 0 && block[1] > 0,
                "fp8 block size {block:?} has a zero dimension"
            );
        }
        self.quantization = quantization;
        self
    }

    pub fn quantization(&self) -> Quantization {
        self.quantization
    }

    /// Sets how the matrices built by [`Checkpoint::linear`] are held (`--cpu-weights`).
    pub fn with_cpu_weights(mut self, policy: CpuWeights) -> Self {
        self.cpu_weights = policy;
        self
    }

    /// Projection `name` `[out, inp]`, held as the policy says; an FP8 tensor keeps its
    /// codes and scales under [`CpuWeights::Auto`] ([`Checkpoint::load_weights`]).
    pub fn load_linear(&self, name: &str, out: usize, inp: usize) -> Result<Linear, WeightError> {
        Ok(Linear::from_weights(
            self.load_weights(name, &[out, inp])?,
            out,
            inp,
        ))
    }

    /// A weight matrix (or a stack of them, `shape`'s last dimension its columns), held as
    /// the policy says. Under [`CpuWeights::Auto`] and [`CpuWeights::Int8`] an FP8 tensor
    /// stays 8-bit: its E4M3 codes and block scales are kept as they are, which gives the
    /// products the same values as dequantizing at load (where its block width allows: a
    /// multiple of 32).
    pub fn load_weights(&self, name: &str, shape: &[usize]) -> Result<Weights, WeightError> {
        self.weights_of(name, shape, None)
    }

    /// [`Checkpoint::load_weights`] of `tensor[index]` along the first dimension: one
    /// expert of a fused expert tensor.
    pub fn load_slice_weights(
        &self,
        name: &str,
        shape: &[usize],
        index: usize,
    ) -> Result<Weights, WeightError> {
        self.weights_of(name, shape, Some(index))
    }

    fn weights_of(
        &self,
        name: &str,
        shape: &[usize],
        index: Option<usize>,
    ) -> Result<Weights, WeightError> {
        let cols = shape.last().copied().unwrap_or(1);
        let t = self.lookup(name, shape)?;
        if t.dtype != DType::F8E4M3 {
            let values = match index {
                None => self.load(name, shape)?,
                Some(i) => self.load_slice(name, shape, i)?,
            };
            return Ok(Weights::with_policy(values, cols, self.cpu_weights));
        }
        let p = self.fp8_parts(name, t, index)?;
        // Under `int8` too: the codes are 8-bit already, and re-quantizing would add error.
        let keep = matches!(self.cpu_weights, CpuWeights::Auto | CpuWeights::Int8);
        // Stacked matrices share one row index only where blocks do not straddle them.
        let one_grid = p.codes.len() == p.rows * p.cols || p.rows.is_multiple_of(p.block[0]);
        if keep
            && one_grid
            && let Some(kept) = QuantizedRows::from_blocks(p.codes, &p.scale, p.cols, p.block)
        {
            return Ok(Weights::Fp8(Box::new(kept)));
        }
        Ok(Weights::with_policy(p.dequantize(), cols, self.cpu_weights))
    }

    fn open_files(dir: &Path, files: &[PathBuf]) -> Result<Self, WeightError> {
        let mut shards = Vec::with_capacity(files.len());
        let mut tensors = HashMap::new();
        for (shard_idx, path) in files.iter().enumerate() {
            let io = |source| WeightError::Io {
                path: path.clone(),
                source,
            };
            let file = File::open(path).map_err(io)?;
            // SAFETY: the map is read-only; a checkpoint rewritten under a running server is
            // outside what we defend against (as in every mmap-based loader).
            let map = unsafe { Mmap::map(&file) }.map_err(io)?;
            // Read-ahead would fetch bytes of tensors we were not asked for.
            let _ = map.advise(Advice::Random);
            let (header_len, metadata) =
                SafeTensors::read_metadata(&map).map_err(|e| header_error(path, &map, e))?;
            let data_start = 8 + header_len;
            for (name, info) in metadata.tensors() {
                let dtype =
                    DType::from_safetensors(info.dtype).ok_or_else(|| WeightError::DType {
                        name: name.clone(),
                        path: path.clone(),
                        dtype: format!("{:?}", info.dtype),
                    })?;
                let t = TensorRef {
                    shard: shard_idx,
                    dtype,
                    shape: info.shape.clone(),
                    start: data_start + info.data_offsets.0,
                    end: data_start + info.data_offsets.1,
                };
                tensors.insert(name, t);
            }
            shards.push(Shard {
                path: path.clone(),
                map,
            });
        }
        Ok(Checkpoint {
            dir: dir.to_owned(),
            shards,
            tensors,
            quantization: Quantization::None,
            cpu_weights: CpuWeights::Auto,
        })
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.tensors.get(name).map(|t| t.shape.as_slice())
    }

    pub fn dtype(&self, name: &str) -> Option<DType> {
        self.tensors.get(name).map(|t| t.dtype)
    }

    pub fn tensor_names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// The bytes `name`'s data occupies on disk, for reporting. An FP8 weight's scale
    /// tensor is a tensor of its own and is not counted here.
    pub fn stored_bytes(&self, name: &str) -> Option<usize> {
        self.tensors.get(name).map(|t| t.end - t.start)
    }

    /// The file that holds `name`, for error messages.
    pub fn file_of(&self, name: &str) -> Option<&Path> {
        self.tensors
            .get(name)
            .map(|t| self.shards[t.shard].path.as_path())
    }

    /// Loads a whole tensor as f32, checking its shape. An FP8 tensor is dequantised with
    /// its block scales.
    pub fn load(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>, WeightError> {
        let t = self.lookup(name, shape)?;
        if t.dtype == DType::F8E4M3 {
            return self.load_fp8(name, t, None);
        }
        Ok(self.read(t, t.start, t.end))
    }

    /// Loads `tensor[index]` (a slice along the first dimension) of a tensor of shape
    /// `shape`, reading only that slice's bytes: one expert of a fused expert tensor.
    /// For an FP8 tensor only the scales that cover the slice are read too.
    pub fn load_slice(
        &self,
        name: &str,
        shape: &[usize],
        index: usize,
    ) -> Result<Vec<f32>, WeightError> {
        let t = self.lookup(name, shape)?;
        let outer = shape.first().copied().unwrap_or(1);
        if index >= outer {
            return Err(WeightError::Shape {
                name: name.to_owned(),
                path: self.shards[t.shard].path.clone(),
                expected: vec![index + 1],
                found: t.shape.clone(),
            });
        }
        if t.dtype == DType::F8E4M3 {
            return self.load_fp8(name, t, Some(index));
        }
        let slice_bytes = (t.end - t.start) / outer;
        let start = t.start + index * slice_bytes;
        Ok(self.read(t, start, start + slice_bytes))
    }

    /// Dequantises FP8 tensor `name` (`t`), whole or its `[index]` along the first
    /// dimension, with the scale tensor beside it.
    fn load_fp8(
        &self,
        name: &str,
        t: &TensorRef,
        index: Option<usize>,
    ) -> Result<Vec<f32>, WeightError> {
        Ok(self.fp8_parts(name, t, index)?.dequantize())
    }

    /// The codes of FP8 tensor `name` (`t`), whole or its `[index]` along the first
    /// dimension, and the scales that cover them, checked.
    fn fp8_parts(
        &self,
        name: &str,
        t: &TensorRef,
        index: Option<usize>,
    ) -> Result<Fp8Parts<'_>, WeightError> {
        let path = &self.shards[t.shard].path;
        let block = self
            .quantization
            .fp8_block()
            .ok_or_else(|| WeightError::Fp8Unconfigured {
                name: name.to_owned(),
                path: path.clone(),
            })?;
        let expected = quant::scale_shape(&t.shape, block).ok_or_else(|| WeightError::Fp8Rank {
            name: name.to_owned(),
            path: path.clone(),
            shape: t.shape.clone(),
        })?;
        let scale_name = quant::scale_name(name);
        let s = self
            .tensors
            .get(&scale_name)
            .ok_or_else(|| WeightError::ScaleMissing {
                name: name.to_owned(),
                path: path.clone(),
                scale: scale_name.clone(),
                location: self.location(),
            })?;
        let scale_path = &self.shards[s.shard].path;
        if s.dtype == DType::F8E4M3 {
            return Err(WeightError::ScaleDType {
                scale: scale_name,
                path: scale_path.clone(),
                dtype: s.dtype,
            });
        }
        if s.shape != expected {
            return Err(WeightError::ScaleShape {
                name: name.to_owned(),
                path: scale_path.clone(),
                block,
                expected,
                found: s.shape.clone(),
            });
        }

        let rank = t.shape.len();
        let (rows, cols) = (t.shape[rank - 2], t.shape[rank - 1]);
        // Byte ranges of the codes and scales to read, and how many rows the codes hold
        // per matrix. Both ranges are within the tensors: their shapes were checked.
        let (codes, scales, rows) = match index {
            None => ((t.start, t.end), (s.start, s.end), rows),
            Some(i) if rank == 2 => {
                // One row of a matrix, and the one row of scales that covers it.
                let scale_row = expected[1] * s.dtype.size();
                let code = t.start + i * cols;
                let scale = s.start + (i / block[0]) * scale_row;
                ((code, code + cols), (scale, scale + scale_row), 1)
            }
            Some(i) => {
                // Leading dimensions are shared: slice i of the codes has slice i of the
                // scales.
                let outer = t.shape[0];
                let (code_len, scale_len) = ((t.end - t.start) / outer, (s.end - s.start) / outer);
                let (code, scale) = (t.start + i * code_len, s.start + i * scale_len);
                ((code, code + code_len), (scale, scale + scale_len), rows)
            }
        };
        let scale = self.read(s, scales.0, scales.1);
        // A NaN or infinite scale would silently poison every weight of its block.
        if let Some(k) = scale.iter().position(|v| !v.is_finite()) {
            let flat = (scales.0 - s.start) / s.dtype.size() + k;
            return Err(WeightError::ScaleValue {
                scale: scale_name,
                path: scale_path.clone(),
                at: unflatten(flat, &s.shape),
                value: scale[k],
            });
        }
        Ok(Fp8Parts {
            codes: self.bytes(t, codes.0, codes.1),
            scale,
            rows,
            cols,
            block,
        })
    }

    fn lookup(&self, name: &str, shape: &[usize]) -> Result<&TensorRef, WeightError> {
        let t = self.tensors.get(name).ok_or_else(|| WeightError::Missing {
            name: name.to_owned(),
            location: self.location(),
        })?;
        if t.shape != shape {
            return Err(WeightError::Shape {
                name: name.to_owned(),
                path: self.shards[t.shard].path.clone(),
                expected: shape.to_vec(),
                found: t.shape.clone(),
            });
        }
        Ok(t)
    }

    /// The raw bytes `start..end` of `t`'s shard.
    fn bytes(&self, t: &TensorRef, start: usize, end: usize) -> &[u8] {
        let map = &self.shards[t.shard].map;
        let _ = map.advise_range(Advice::WillNeed, start, end - start);
        // read_metadata checked every range against the file length.
        &map[start..end]
    }

    fn read(&self, t: &TensorRef, start: usize, end: usize) -> Vec<f32> {
        let bytes = self.bytes(t, start, end);
        let mut out = vec![0.0f32; bytes.len() / t.dtype.size()];
        t.dtype.decode_into(bytes, &mut out);
        out
    }

    fn location(&self) -> String {
        match self.shards.as_slice() {
            [one] => one.path.display().to_string(),
            _ => format!("{} ({} shards)", self.dir.display(), self.shards.len()),
        }
    }
}

/// An FP8 tensor's codes (matrices of `rows x cols`) and the scales of their blocks.
struct Fp8Parts<'a> {
    codes: &'a [u8],
    scale: Vec<f32>,
    rows: usize,
    cols: usize,
    block: [usize; 2],
}

impl Fp8Parts<'_> {
    fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0.0f32; self.codes.len()];
        quant::dequantize_fp8_blocks(
            self.codes,
            &self.scale,
            self.rows,
            self.cols,
            self.block,
            &mut out,
        );
        out
    }
}

/// The multi-dimensional position of row-major element `flat` of a tensor of `shape`.
fn unflatten(mut flat: usize, shape: &[usize]) -> Vec<usize> {
    let mut at = vec![0; shape.len()];
    for (a, &d) in at.iter_mut().zip(shape).rev() {
        if d > 0 {
            *a = flat % d;
            flat /= d;
        }
    }
    at
}

fn header_error(path: &Path, map: &[u8], e: SafeTensorError) -> WeightError {
    match e {
        SafeTensorError::MetadataIncompleteBuffer | SafeTensorError::InvalidHeaderLength => {
            WeightError::Truncated {
                path: path.to_owned(),
                reason: format!("{e:?}; the file holds {} bytes", map.len()),
            }
        }
        other => WeightError::Header {
            path: path.to_owned(),
            reason: format!("{other:?}"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;
    use safetensors::{Dtype, tensor::TensorView};

    type Tensor = (String, Dtype, Vec<usize>, Vec<u8>);

    fn write(file: &Path, tensors: &[Tensor]) {
        let views: Vec<(String, TensorView)> = tensors
            .iter()
            .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
            .collect();
        safetensors::serialize_to_file(views, None, file).unwrap();
    }

    fn single(tensors: &[Tensor]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        write(&dir.path().join(SINGLE_FILE), tensors);
        dir
    }

    /// The E4M3FN value of `code` by the textbook formula; independent of dtype.rs.
    fn fp8_value(code: u8) -> f64 {
        let sign = if code & 0x80 != 0 { -1.0 } else { 1.0 };
        let (e, m) = (i32::from((code >> 3) & 0xF), f64::from(code & 0x7));
        assert!(!(e == 15 && m == 7.0), "test data holds no NaN codes");
        if e == 0 {
            sign * m / 8.0 * 2f64.powi(-6)
        } else {
            sign * (1.0 + m / 8.0) * 2f64.powi(e - 7)
        }
    }

    /// `w[i][j] = q[i][j] * scale[i / b0][j / b1]` for each `[rows, cols]` matrix, the
    /// product taken exactly in f64 and rounded once, as the f32 product is.
    fn reference(q: &[u8], scale: &[f32], rows: usize, cols: usize, b: [usize; 2]) -> Vec<f32> {
        let scale_cols = cols.div_ceil(b[1]);
        let scale_rows = rows.div_ceil(b[0]);
        let mut out = Vec::with_capacity(q.len());
        for m in 0..q.len() / (rows * cols) {
            let scale = &scale[m * scale_rows * scale_cols..];
            for i in 0..rows {
                for j in 0..cols {
                    let s = f64::from(scale[(i / b[0]) * scale_cols + j / b[1]]);
                    out.push((fp8_value(q[m * rows * cols + i * cols + j]) * s) as f32);
                }
            }
        }
        out
    }

    /// Random codes (no NaN) and distinct positive scales, so a scale applied to the
    /// wrong block changes the result.
    fn fp8_data(rng: &mut ChaCha8Rng, codes: usize, scales: usize) -> (Vec<u8>, Vec<f32>) {
        let q = (0..codes)
            .map(|_| match rng.random::<u8>() {
                0x7F | 0xFF => 0x00,
                c => c,
            })
            .collect();
        let mut s: Vec<f32> = (0..scales).map(|_| rng.random_range(1e-4..1e-1)).collect();
        // Products below f32's normal range round once as well.
        s[0] = 2f32.powi(-120);
        (q, s)
    }

    fn f32_bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    fn t(name: &str, dtype: Dtype, shape: &[usize], bytes: Vec<u8>) -> Tensor {
        (name.to_owned(), dtype, shape.to_vec(), bytes)
    }

    fn assert_same(got: &[f32], want: &[f32], what: &str) {
        assert_eq!(got.len(), want.len(), "{what}");
        for (k, (g, w)) in got.iter().zip(want).enumerate() {
            assert_eq!(g.to_bits(), w.to_bits(), "{what}: element {k}: {g} vs {w}");
        }
    }

    const W: &str = "model.layers.0.self_attn.q_proj.weight";
    const S: &str = "model.layers.0.self_attn.q_proj.weight_scale_inv";

    fn fp8(block: [usize; 2]) -> Quantization {
        Quantization::Fp8Block { block }
    }

    #[test]
    fn dequantises_fp8_blocks_including_partial_edge_blocks() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        // Partial blocks in both dimensions, a non-square block, whole blocks only, and a
        // matrix smaller than one block.
        for (rows, cols, block) in [
            (40usize, 70usize, [32, 32]),
            (40, 70, [16, 32]),
            (70, 40, [32, 16]),
            (64, 64, [32, 32]),
            (5, 3, [128, 128]),
        ] {
            let (sr, sc) = (rows.div_ceil(block[0]), cols.div_ceil(block[1]));
            let (q, scale) = fp8_data(&mut rng, rows * cols, sr * sc);
            let norm = [1.5f32, -0.25, 3.0];
            let norm_bf16: Vec<u8> = norm
                .iter()
                .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
                .collect();
            let dir = single(&[
                t(W, Dtype::F8_E4M3, &[rows, cols], q.clone()),
                t(S, Dtype::F32, &[sr, sc], f32_bytes(&scale)),
                t("model.norm.weight", Dtype::BF16, &[3], norm_bf16),
            ]);
            let ckpt = Checkpoint::open_quantized(dir.path(), fp8(block)).unwrap();
            let what = format!("[{rows}, {cols}] in {block:?}");
            assert_eq!(ckpt.quantization(), fp8(block));
            assert_eq!(ckpt.dtype(W), Some(DType::F8E4M3));
            assert_eq!(ckpt.stored_bytes(W), Some(rows * cols));
            assert_eq!(ckpt.stored_bytes(S), Some(4 * sr * sc));
            assert_eq!(ckpt.stored_bytes("model.norm.weight"), Some(6));
            let got = ckpt.load(W, &[rows, cols]).unwrap();
            assert_same(&got, &reference(&q, &scale, rows, cols, block), &what);
            // Unquantised tensors beside it load as before.
            assert_eq!(ckpt.load("model.norm.weight", &[3]).unwrap(), norm);
            // So does the scale itself, by its own name.
            assert_eq!(ckpt.load(S, &[sr, sc]).unwrap(), scale);
            // One row at a time: the row's codes and its row of scales.
            for i in 0..rows {
                let row = ckpt.load_slice(W, &[rows, cols], i).unwrap();
                assert_same(&row, &got[i * cols..][..cols], &format!("{what} row {i}"));
            }
        }
    }

    #[test]
    fn bf16_scales_are_read_as_bf16() {
        let mut rng = ChaCha8Rng::seed_from_u64(8);
        let (q, scale) = fp8_data(&mut rng, 40 * 70, 2 * 3);
        let scale: Vec<f32> = scale
            .iter()
            .map(|s| half::bf16::from_f32(*s).to_f32())
            .collect();
        let bytes = scale
            .iter()
            .flat_map(|s| half::bf16::from_f32(*s).to_le_bytes())
            .collect();
        let dir = single(&[
            t(W, Dtype::F8_E4M3, &[40, 70], q.clone()),
            t(S, Dtype::BF16, &[2, 3], bytes),
        ]);
        let ckpt = Checkpoint::open(dir.path())
            .unwrap()
            .with_quantization(fp8([32, 32]));
        let got = ckpt.load(W, &[40, 70]).unwrap();
        assert_same(&got, &reference(&q, &scale, 40, 70, [32, 32]), "bf16 scale");
    }

    #[test]
    fn fused_fp8_experts_load_one_expert_at_a_time() {
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let (e, rows, cols, block) = (3, 40, 70, [16, 32]);
        let (sr, sc) = (3, 3);
        let (q, scale) = fp8_data(&mut rng, e * rows * cols, e * sr * sc);
        let name = "model.layers.0.mlp.experts.gate_up_proj";
        let dir = single(&[
            t(name, Dtype::F8_E4M3, &[e, rows, cols], q.clone()),
            t(
                &quant::scale_name(name),
                Dtype::F32,
                &[e, sr, sc],
                f32_bytes(&scale),
            ),
        ]);
        let ckpt = Checkpoint::open_quantized(dir.path(), fp8(block)).unwrap();
        let want = reference(&q, &scale, rows, cols, block);
        let all = ckpt.load(name, &[e, rows, cols]).unwrap();
        assert_same(&all, &want, "whole fused tensor");
        for x in 0..e {
            let one = ckpt.load_slice(name, &[e, rows, cols], x).unwrap();
            assert_same(&one, &want[x * rows * cols..][..rows * cols], "expert");
        }
        assert!(matches!(
            ckpt.load_slice(name, &[e, rows, cols], e),
            Err(WeightError::Shape { .. })
        ));
    }

    #[test]
    fn a_scale_in_another_shard_is_found() {
        let mut rng = ChaCha8Rng::seed_from_u64(10);
        let (q, scale) = fp8_data(&mut rng, 40 * 70, 6);
        let dir = tempfile::tempdir().unwrap();
        write(
            &dir.path().join("model-00001-of-00002.safetensors"),
            &[t(W, Dtype::F8_E4M3, &[40, 70], q.clone())],
        );
        write(
            &dir.path().join("model-00002-of-00002.safetensors"),
            &[t(S, Dtype::F32, &[2, 3], f32_bytes(&scale))],
        );
        let index = serde_json::json!({ "weight_map": {
            W: "model-00001-of-00002.safetensors",
            S: "model-00002-of-00002.safetensors",
        }});
        std::fs::write(dir.path().join(INDEX_FILE), index.to_string()).unwrap();
        let ckpt = Checkpoint::open_quantized(dir.path(), fp8([32, 32])).unwrap();
        let got = ckpt.load(W, &[40, 70]).unwrap();
        assert_same(&got, &reference(&q, &scale, 40, 70, [32, 32]), "sharded");
    }

    #[test]
    fn fp8_without_quantization_config_is_refused() {
        let dir = single(&[
            t(W, Dtype::F8_E4M3, &[4, 4], vec![0x38; 16]),
            t(S, Dtype::F32, &[1, 1], f32_bytes(&[1.0])),
        ]);
        let ckpt = Checkpoint::open(dir.path()).unwrap();
        assert_eq!(ckpt.quantization(), Quantization::None);
        for err in [
            ckpt.load(W, &[4, 4]).unwrap_err(),
            ckpt.load_slice(W, &[4, 4], 0).unwrap_err(),
        ] {
            assert!(matches!(err, WeightError::Fp8Unconfigured { .. }), "{err}");
            let msg = err.to_string();
            assert!(msg.contains(W) && msg.contains(SINGLE_FILE), "{msg}");
            assert!(msg.contains("quantization_config"), "{msg}");
        }
        // Once configured, the same file loads: 1.0 times a scale of 1.0.
        let ckpt = ckpt.with_quantization(fp8([128, 128]));
        assert_eq!(ckpt.load(W, &[4, 4]).unwrap(), vec![1.0; 16]);
    }

    #[test]
    fn missing_or_misshapen_scales_are_refused() {
        let q = vec![0x38; 40 * 70];
        let missing = single(&[t(W, Dtype::F8_E4M3, &[40, 70], q.clone())]);
        let err = Checkpoint::open_quantized(missing.path(), fp8([32, 32]))
            .unwrap()
            .load(W, &[40, 70])
            .unwrap_err();
        assert!(matches!(err, WeightError::ScaleMissing { ref scale, .. } if scale == S));
        let msg = err.to_string();
        assert!(
            msg.contains(W) && msg.contains(S) && msg.contains(SINGLE_FILE),
            "{msg}"
        );

        // Rounded down instead of up: the edge blocks have no scale.
        let floor = single(&[
            t(W, Dtype::F8_E4M3, &[40, 70], q.clone()),
            t(S, Dtype::F32, &[1, 2], f32_bytes(&[1.0; 2])),
        ]);
        let ckpt = Checkpoint::open_quantized(floor.path(), fp8([32, 32])).unwrap();
        for err in [
            ckpt.load(W, &[40, 70]).unwrap_err(),
            ckpt.load_slice(W, &[40, 70], 0).unwrap_err(),
        ] {
            match &err {
                WeightError::ScaleShape {
                    expected, found, ..
                } => assert_eq!(
                    (expected.as_slice(), found.as_slice()),
                    (&[2, 3][..], &[1, 2][..])
                ),
                other => panic!("{other}"),
            }
            let msg = err.to_string();
            assert!(msg.contains(S) && msg.contains("32x32"), "{msg}");
        }
        // The same scale is the right shape for 64x64 blocks.
        let ckpt = Checkpoint::open_quantized(floor.path(), fp8([64, 64])).unwrap();
        assert!(ckpt.load(W, &[40, 70]).is_ok());

        // A fused tensor whose scale lost its expert dimension.
        let fused = single(&[
            t(
                W,
                Dtype::F8_E4M3,
                &[2, 40, 70],
                [q.clone(), q.clone()].concat(),
            ),
            t(S, Dtype::F32, &[2, 3], f32_bytes(&[1.0; 6])),
        ]);
        let err = Checkpoint::open_quantized(fused.path(), fp8([32, 32]))
            .unwrap()
            .load_slice(W, &[2, 40, 70], 1)
            .unwrap_err();
        assert!(matches!(err, WeightError::ScaleShape { .. }), "{err}");

        // An FP8 scale, and an FP8 vector with no matrix to scale.
        let odd = single(&[
            t(W, Dtype::F8_E4M3, &[40, 70], q),
            t(S, Dtype::F8_E4M3, &[2, 3], vec![0x38; 6]),
            t("v", Dtype::F8_E4M3, &[8], vec![0x38; 8]),
            t("v_scale_inv", Dtype::F32, &[1], f32_bytes(&[1.0])),
        ]);
        let ckpt = Checkpoint::open_quantized(odd.path(), fp8([32, 32])).unwrap();
        let err = ckpt.load(W, &[40, 70]).unwrap_err();
        assert!(matches!(err, WeightError::ScaleDType { .. }), "{err}");
        assert!(err.to_string().contains("float8_e4m3fn"), "{err}");
        let err = ckpt.load("v", &[8]).unwrap_err();
        assert!(matches!(err, WeightError::Fp8Rank { .. }), "{err}");
    }

    #[test]
    fn non_finite_scales_are_refused_where_they_are_read() {
        let (e, rows, cols) = (2, 40, 70);
        let mut scale = vec![0.5f32; e * 2 * 3];
        // Expert 1, scale block [1, 2].
        scale[6 + 3 + 2] = f32::NAN;
        let dir = single(&[
            t(
                W,
                Dtype::F8_E4M3,
                &[e, rows, cols],
                vec![0x38; e * rows * cols],
            ),
            t(S, Dtype::F32, &[e, 2, 3], f32_bytes(&scale)),
        ]);
        let ckpt = Checkpoint::open_quantized(dir.path(), fp8([32, 32])).unwrap();
        for err in [
            ckpt.load(W, &[e, rows, cols]).unwrap_err(),
            ckpt.load_slice(W, &[e, rows, cols], 1).unwrap_err(),
        ] {
            match &err {
                WeightError::ScaleValue { at, value, .. } => {
                    assert_eq!(at, &[1, 1, 2]);
                    assert!(value.is_nan());
                }
                other => panic!("{other}"),
            }
            let msg = err.to_string();
            assert!(msg.contains(S) && msg.contains("[1, 1, 2]"), "{msg}");
        }
        // Expert 0's scales are all finite, and expert 1's are not read for it.
        assert_eq!(
            ckpt.load_slice(W, &[e, rows, cols], 0).unwrap(),
            vec![0.5; rows * cols]
        );

        let inf = single(&[
            t(W, Dtype::F8_E4M3, &[40, 70], vec![0x38; 40 * 70]),
            t(
                S,
                Dtype::F32,
                &[2, 3],
                f32_bytes(&[1.0, 1.0, 1.0, 1.0, f32::INFINITY, 1.0]),
            ),
        ]);
        let ckpt = Checkpoint::open_quantized(inf.path(), fp8([32, 32])).unwrap();
        let err = ckpt.load(W, &[40, 70]).unwrap_err();
        assert!(
            matches!(err, WeightError::ScaleValue { ref at, .. } if at == &[1, 1]),
            "{err}"
        );
        // Row 33 is in block row 1: it reads the bad scale; row 0 does not.
        assert!(ckpt.load_slice(W, &[40, 70], 33).is_err());
        assert!(ckpt.load_slice(W, &[40, 70], 0).is_ok());
    }

    #[test]
    fn other_fp8_formats_are_refused_at_open() {
        let dir = single(&[t(W, Dtype::F8_E5M2, &[2, 2], vec![0x3C; 4])]);
        let err = Checkpoint::open_quantized(dir.path(), fp8([128, 128]))
            .err()
            .unwrap();
        assert!(
            matches!(err, WeightError::DType { ref dtype, .. } if dtype == "F8_E5M2"),
            "{err}"
        );
    }
}
