//! Parity on another device: the engine on `DEVICE` against llama.cpp (llama-cpp-2, CPU) on
//! the merged GGUF of the same model directory, every position of a few prompts, full and
//! smallest arena. For the lent GPU machine (build with `--features dynamic-backends` and
//! drop the GPU backend module next to the binary).
//!
//! device_check MODEL_DIR MODEL.gguf DEVICE

use std::num::NonZeroU32;

use llama_cpp_2::context::params::{KvCacheType, LlamaContextParams};
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::LlamaModel;
use sage::engine::{ArenaSize, Engine, EngineOptions, KvType};

fn main() -> anyhow::Result<()> {
    let a: Vec<String> = std::env::args().collect();
    anyhow::ensure!(a.len() == 4, "usage: device_check MODEL_DIR MODEL.gguf DEVICE");
    let _ = env_logger::builder().filter_level(log::LevelFilter::Info).try_init();
    for d in sage::ggml::devices() {
        println!("device: {} ({}){}", d.name, d.description, if d.is_gpu { " [gpu]" } else { "" });
    }
    let tk = sage::engine::generate::load_tokenizer(a[1].as_ref())?;
    let prompts = ["The quick brown fox jumps over the lazy dog.", "def main():\n    return 42  # the answer\n"];
    let backend = LlamaBackend::init()?;
    let gpu_layers: u32 = std::env::var("LLAMA_GPU_LAYERS").ok().and_then(|v| v.parse().ok()).unwrap_or(0);
    println!("llama.cpp reference with n_gpu_layers = {gpu_layers}");
    let model =
        LlamaModel::load_from_file(&backend, &a[2], &LlamaModelParams::default().with_n_gpu_layers(gpu_layers))?;
    let mut worst = 0f32;
    for arena in [ArenaSize::All, ArenaSize::Experts(2)] {
        let opts =
            EngineOptions { device: a[3].clone(), arena, kv_type: KvType::F32, n_ctx: 256, ..Default::default() };
        let mut e = Engine::load(a[1].as_ref(), opts)?;
        println!("sage on {} with {} slots", e.device_name(), e.n_slots());
        for p in prompts {
            let ids: Vec<u32> = tk.encode(p, false).map_err(|e| anyhow::anyhow!("{e}"))?.get_ids().to_vec();
            e.reset();
            let got = e.eval(&ids, true)?;
            let params = LlamaContextParams::default()
                .with_n_ctx(NonZeroU32::new(256))
                .with_type_k(KvCacheType::F32)
                .with_type_v(KvCacheType::F32)
                .with_flash_attention_policy(llama_cpp_sys_2::LLAMA_FLASH_ATTN_TYPE_DISABLED);
            let mut ctx = model.new_context(&backend, params)?;
            let mut batch = LlamaBatch::new(ids.len(), 1);
            for (i, &id) in ids.iter().enumerate() {
                batch.add(llama_cpp_2::token::LlamaToken(id as i32), i as i32, &[0], true)?;
            }
            ctx.decode(&mut batch)?;
            let n_vocab = got.len() / ids.len();
            let mut d = 0f32;
            for i in 0..ids.len() {
                let want = ctx.get_logits_ith(i as i32);
                for (x, y) in got[i * n_vocab..(i + 1) * n_vocab].iter().zip(want) {
                    d = d.max((x - y).abs());
                }
            }
            println!("  {:?}: {} positions, max |sage - llama.cpp| = {d:e}", &p[..12], ids.len());
            worst = worst.max(d);
        }
    }
    println!("worst {worst:e} (tolerance 1e-3): {}", if worst <= 1e-3 { "PASS" } else { "FAIL" });
    anyhow::ensure!(worst <= 1e-3, "device parity failed");
    Ok(())
}
