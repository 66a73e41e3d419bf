//! Reference for conversion speed: llama.cpp's own `llama_model_quantize` (from the same
//! llama-cpp-sys-2 build sage uses) on a GGUF, every tensor to q4_K.
//!
//! cargo run --release --example llama_quantize -- IN.gguf OUT.gguf [THREADS]

use std::time::Instant;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    anyhow::ensure!(args.len() >= 3, "usage: llama_quantize IN.gguf OUT.gguf [THREADS]");
    let threads = args.get(3).map(|t| t.parse()).transpose()?.unwrap_or(0);
    let t = Instant::now();
    sage::ggml::llama_quantize_pure_q4_k(args[1].as_ref(), args[2].as_ref(), threads)?;
    println!("llama_model_quantize {} -> {} (pure q4_K): {:.2} s", args[1], args[2], t.elapsed().as_secs_f64());
    Ok(())
}
