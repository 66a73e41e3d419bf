//! sage: run Mixture-of-Experts language models on devices whose memory is smaller than the
//! model. This crate holds the converter (`convert`, `merge`, `inspect`), the model directory
//! format (`model_dir`) and the runtime (`engine`) that streams experts from it into a
//! fixed-size arena, and the OpenAI-compatible server (`server`).
//!
//! All FFI and `unsafe` live in [`ggml`].

pub mod arch;
pub mod chat;
pub mod cli;
pub mod config;
pub mod convert;
pub mod engine;
pub mod error;
pub mod eval;
pub mod footprint;
pub mod ggml;
pub mod graph;
pub mod inspect;
pub mod io;
pub mod merge;
pub mod model_dir;
pub mod names;
pub mod plan;
pub mod quant;
pub mod server;
pub mod sim;
pub mod source;
pub mod synth;
pub mod tokenizer;
pub mod trace_gen;
pub mod tune;
pub mod usage;

pub use error::{Error, Result};
