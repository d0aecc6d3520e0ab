//! Memory-mapped safetensors checkpoints: one `model.safetensors` or shards listed in
//! `model.safetensors.index.json`.
//!
//! Opening a checkpoint reads only the shard headers. Tensor bytes are read when a tensor
//! (or one expert's slice of a fused tensor) is loaded, so an expert node that loads a
//! few experts never reads the others' bytes. The maps are advised `MADV_RANDOM` so that
//! kernel read-ahead does not pull neighbouring experts in behind our back.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::{Advice, Mmap};
use safetensors::{SafeTensorError, SafeTensors};
use serde::Deserialize;

use crate::dtype::DType;

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
        "tensor `{name}` in {path}: dtype {dtype} is not supported (float32, bfloat16, float16)"
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
}

impl Checkpoint {
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

    /// The file that holds `name`, for error messages.
    pub fn file_of(&self, name: &str) -> Option<&Path> {
        self.tensors
            .get(name)
            .map(|t| self.shards[t.shard].path.as_path())
    }

    /// Loads a whole tensor as f32, checking its shape.
    pub fn load(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>, WeightError> {
        let t = self.lookup(name, shape)?;
        Ok(self.read(t, t.start, t.end))
    }

    /// Loads `tensor[index]` (a slice along the first dimension) of a tensor of shape
    /// `shape`, reading only that slice's bytes: one expert of a fused expert tensor.
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
        let slice_bytes = (t.end - t.start) / outer;
        let start = t.start + index * slice_bytes;
        Ok(self.read(t, start, start + slice_bytes))
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

    fn read(&self, t: &TensorRef, start: usize, end: usize) -> Vec<f32> {
        let map = &self.shards[t.shard].map;
        let _ = map.advise_range(Advice::WillNeed, start, end - start);
        // read_metadata checked every range against the file length.
        let bytes = &map[start..end];
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
