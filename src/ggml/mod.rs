//! The only module with FFI and `unsafe`, in files by job: ggml's type traits and quantizer
//! (`types`), its log hook (`log`), GGUF files (`gguf`), backends and devices (`backend`),
//! backend memory (`buffer`), tensor contexts, graph ops and the graph allocator (`graph`),
//! llama.cpp's own runner and quantizer (`llama`), and read-only file mappings (`map`). All
//! come from the llama-cpp-sys-2 build.
//!
//! Every handle is an owning type freed in `Drop`. ggml aborts the process on some misuse
//! (asking for a key with the wrong type, a duplicate tensor name, a row length that does not
//! fit the block size, an ill-shaped op), so every call checks those preconditions in Rust
//! first; shapes of graph ops come from the engine's own graph code over a model directory
//! whose shapes were checked when it was opened, so an abort there is a bug in sage, not bad
//! input.

use std::ffi::CString;

mod backend;
mod buffer;
mod gguf;
mod graph;
mod llama;
mod log;
mod map;
mod types;

pub use backend::{devices, Backend, BufType, DeviceInfo};
pub use buffer::{Buffer, HostWriter, SharedBuffer};
pub use gguf::{Gguf, GgufArray, GgufTensorInfo, GgufValue};
pub use graph::{Allocator, Context, Graph, RopeParams, Tensor, TensorSet, ROPE_TYPE_IMROPE, ROPE_TYPE_NEOX};
pub use llama::{llama_quantize_pure_q4_k, LlamaRunOptions, LlamaRunner};
pub use log::route_logs;
pub(crate) use log::take_last_error;
pub use map::Mapped;
pub use types::{dequantize, dequantize_into, quantize, quantize_into, GgmlType};

/// Errors of this module; callers attach file and tensor names.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum FfiError {
    #[error("{0} cannot be converted to f32 by this ggml build")]
    NoDequantize(GgmlType),
    #[error("ggml cannot quantize to {0} without an importance matrix")]
    NoQuantize(GgmlType),
    #[error("{what}: {got} bytes do not hold a whole number of {ty} rows of {n_per_row}")]
    BadLength { what: &'static str, ty: GgmlType, n_per_row: u64, got: usize },
    #[error("name '{0}' is longer than ggml's limit of {1} bytes or contains NUL")]
    BadName(String, usize),
    #[error("tensor '{name}': a row of {ne0} does not fit {ty} blocks of {blck}")]
    RowNotBlock { name: String, ty: GgmlType, ne0: u64, blck: u64 },
    #[error("{0}")]
    Gguf(String),
    #[error("{0}")]
    Llama(String),
}

/// A C string of `s`, for ggml's names and paths.
pub(crate) fn cstring(s: &str) -> Result<CString, FfiError> {
    CString::new(s).map_err(|_| FfiError::BadName(s.to_string(), usize::MAX))
}
