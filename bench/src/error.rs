//! What can stop a benchmark before or after its requests. A request that fails is not
//! one of these: it is counted in the results (see `client::ErrorKind`).

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Config(String),
    #[error("dataset {path}: {message}")]
    Dataset { path: PathBuf, message: String },
    #[error("listing the models at {url}: {message}")]
    Models { url: String, message: String },
    #[error("starting the HTTP client: {0}")]
    Client(String),
    #[error("writing {path}: {message}")]
    Write { path: PathBuf, message: String },
}
