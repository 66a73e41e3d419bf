//! Parity on another device: the engine on `DEVICE` against llama.cpp (llama-cpp-2, CPU) on
//! the merged GGUF of the same model directory, every position of a few prompts, full and
//! smallest arena. Then where the device departs from the CPU: the same engine on both, layer
//! by layer, each layer's router logits (a linear function of its normed residual stream)
//! and chosen experts compared. For the lent GPU machine (build with `--features
//! dynamic-backends` and drop the GPU backend module next to the binary).
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
    let tk = sage::tokenizer::Tokenizer::load(a[1].as_ref())?;
    // The smallest arena the model allows: one token's experts.
    let k = sage::model_dir::ModelDir::open(a[1].as_ref())?.config.n_expert_used as usize;
    let prompts = ["The quick brown fox jumps over the lazy dog.", "def main():\n    return 42  # the answer\n"];
    let backend = LlamaBackend::init()?;
    let gpu_layers: u32 = std::env::var("LLAMA_GPU_LAYERS").ok().and_then(|v| v.parse().ok()).unwrap_or(0);
    println!("llama.cpp reference with n_gpu_layers = {gpu_layers}");
    let model =
        LlamaModel::load_from_file(&backend, &a[2], &LlamaModelParams::default().with_n_gpu_layers(gpu_layers))?;
    let mut worst = 0f32;
    for arena in [ArenaSize::All, ArenaSize::Experts(k)] {
        let opts = EngineOptions {
            device: a[3].clone(),
            arena,
            k_type: KvType::F32,
            v_type: KvType::F32,
            n_ctx: 256,
            ..Default::default()
        };
        let mut e = Engine::load(a[1].as_ref(), opts)?;
        println!("sage on {} with {} slots", e.device_name(), e.n_slots());
        for p in prompts {
            let ids = tk.encode(p)?;
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
    divergence(a[1].as_ref(), &a[3], &tk, &prompts)?;
    println!("worst {worst:e} (tolerance 1e-3): {}", if worst <= 1e-3 { "PASS" } else { "FAIL" });
    anyhow::ensure!(worst <= 1e-3, "device parity failed");
    Ok(())
}

/// The engine on the CPU and on `device`, layer by layer with every expert resident: per layer,
/// the largest difference in router logits and the tokens whose chosen experts differ. The
/// first layer whose logits differ beyond rounding points at that layer's attention or norms
/// (or the FFN of the layer before it); differing choices alone would point at near ties.
fn divergence(
    dir: &std::path::Path,
    device: &str,
    tk: &sage::tokenizer::Tokenizer,
    prompts: &[&str],
) -> anyhow::Result<()> {
    let opts = |device: &str| EngineOptions {
        device: device.into(),
        arena: ArenaSize::All,
        fused: false,
        k_type: KvType::F32,
        v_type: KvType::F32,
        n_ctx: 256,
        ..Default::default()
    };
    let mut cpu = Engine::load(dir, opts("cpu"))?;
    let mut dev = Engine::load(dir, opts(device))?;
    println!("layer by layer, {} against {}:", dev.device_name(), cpu.device_name());
    for p in prompts {
        let ids = tk.encode(p)?;
        let mut out = Vec::new();
        for e in [&mut cpu, &mut dev] {
            e.reset();
            e.start_trace(true)?;
            let logits = e.eval(&ids, true)?;
            out.push((logits, e.take_trace().expect("started above")));
        }
        let ((lc, tc), (ld, td)) = (&out[0], &out[1]);
        let (rc, rd) = (tc.router_logits.as_ref().expect("recorded"), td.router_logits.as_ref().expect("recorded"));
        let k = tc.n_expert_used;
        println!("  {:?}:", &p[..12]);
        for il in 0..tc.n_layer {
            let d = rc[il].iter().zip(&rd[il]).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
            let differ: Vec<usize> = (0..tc.n_tokens())
                .filter(|&t| {
                    let (mut x, mut y) = (tc.choices[il][t * k..][..k].to_vec(), td.choices[il][t * k..][..k].to_vec());
                    x.sort_unstable();
                    y.sort_unstable();
                    x != y
                })
                .collect();
            println!("    layer {il}: router logits max diff {d:e}; tokens choosing other experts {differ:?}");
        }
        let d = lc.iter().zip(ld).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        println!("    output logits max diff {d:e}");
    }
    Ok(())
}
