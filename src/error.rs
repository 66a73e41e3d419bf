//! Typed errors of the library. Each names the file and, where there is one, the tensor or
//! key, with what was expected and what was found.

use std::path::PathBuf;

use crate::ggml::FfiError;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },

    #[error("{path}: not a valid GGUF file: {reason}")]
    BadGguf { path: PathBuf, reason: String },

    #[error("{path}: not a valid safetensors file: {reason}")]
    BadSafetensors { path: PathBuf, reason: String },

    #[error("{path}: truncated: {what} ends at byte {needed}, but the file has {got} bytes")]
    Truncated { path: PathBuf, what: String, needed: u64, got: u64 },

    #[error("{path}: unsupported architecture {got}; sage supports {expected}")]
    UnknownArchitecture { path: PathBuf, got: String, expected: String },

    #[error("{path}: missing tensor '{tensor}'")]
    MissingTensor { path: PathBuf, tensor: String },

    #[error("{path}: tensor '{tensor}' has wrong shape; expected {expected}, got {got}")]
    WrongShape { path: PathBuf, tensor: String, expected: String, got: String },

    #[error("{path}: tensor '{tensor}' has unsupported type {got}; expected {expected}")]
    UnsupportedDtype { path: PathBuf, tensor: String, got: String, expected: String },

    #[error("{path}: '{key}': {reason}")]
    Config { path: PathBuf, key: String, reason: String },

    #[error("{path}: {reason}")]
    Tokenizer { path: PathBuf, reason: String },

    #[error("{path}: not a usable sage model directory: {reason}")]
    BadModelDir { path: PathBuf, reason: String },

    #[error("{path}: {reason}")]
    Output { path: PathBuf, reason: String },

    #[error("{path}: tensor '{tensor}': {source}")]
    Tensor { path: PathBuf, tensor: String, source: FfiError },

    #[error("{path}: not a usable expert usage file: {reason}")]
    BadUsage { path: PathBuf, reason: String },

    #[error("{path}: not a usable routing trace: {reason}")]
    BadTrace { path: PathBuf, reason: String },

    #[error("{origin}: {reason}")]
    Template { origin: String, reason: String },

    #[error("{path}: changed while sage was running: {reason}")]
    Changed { path: PathBuf, reason: String },

    #[error("{0}")]
    Usage(String),

    #[error(
        "{path}: the model computed {bad} NaN or infinite logits of {of} on {device}: its output would be garbage"
    )]
    NotFinite { path: PathBuf, device: String, bad: usize, of: usize },
}

/// An error and its causes on one line, `outer: cause: cause`, for the binaries. Library
/// errors already show their cause in their own message (`path: No such file or
/// directory`), so a cause whose text ends the line so far is not repeated.
pub fn chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut line = err.to_string();
    let mut cause = err.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !line.ends_with(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        cause = c.source();
    }
    line
}

/// `256 x 512`: a shape in ggml order, as llama.cpp prints shapes in its errors.
pub fn dims(ne: &[u64]) -> String {
    ne.iter().map(|n| n.to_string()).collect::<Vec<_>>().join(" x ")
}

/// Attach a path to an `io::Error`.
pub(crate) trait IoContext<T> {
    fn at(self, path: impl Into<PathBuf>) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn at(self, path: impl Into<PathBuf>) -> Result<T> {
        self.map_err(|source| Error::Io { path: path.into(), source })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_names_each_cause_once() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "No such file or directory");
        let e = Error::Io { path: "m/tokenizer.json".into(), source: io };
        let outer = anyhow::Error::new(e).context("loading the tokenizer of m");
        assert_eq!(chain(outer.as_ref()), "loading the tokenizer of m: m/tokenizer.json: No such file or directory");
    }
}
