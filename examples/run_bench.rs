//! sage against llama.cpp (through llama-cpp-2) on the same model, same threads, in one run:
//! prompt and decode tokens per second, all experts resident in sage's arena.
//!
//! cargo run --release --example run_bench -- MODEL_DIR MODEL.gguf [N_PROMPT] [N_GEN] [RUNS] [THREADS]
//!
//! MODEL.gguf is `sage-convert merge MODEL_DIR`. Both engines use an f16 KV cache, no flash
//! attention, greedy decoding of random prompt tokens; runs alternate and medians are quoted.

use std::num::NonZeroU32;
use std::time::Instant;

use llama_cpp_2::context::params::{KvCacheType, LlamaContextParams};
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::LlamaModel;
use sage::engine::sampler::argmax;
use sage::engine::{ArenaSize, Engine, EngineOptions, KvType};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let a: Vec<String> = std::env::args().collect();
    anyhow::ensure!(a.len() >= 3, "usage: run_bench MODEL_DIR MODEL.gguf [N_PROMPT] [N_GEN] [RUNS] [THREADS]");
    let n_prompt: usize = a.get(3).map(|s| s.parse()).transpose()?.unwrap_or(512);
    let n_gen: usize = a.get(4).map(|s| s.parse()).transpose()?.unwrap_or(64);
    let runs: usize = a.get(5).map(|s| s.parse()).transpose()?.unwrap_or(3);
    let threads: usize =
        a.get(6).map(|s| s.parse()).transpose()?.unwrap_or(std::thread::available_parallelism()?.get());
    let n_ctx = n_prompt + n_gen + 8;

    let mut engine = Engine::load(
        a[1].as_ref(),
        EngineOptions {
            threads,
            n_ctx,
            arena: ArenaSize::All,
            k_type: KvType::F16,
            v_type: KvType::F16,
            ..Default::default()
        },
    )?;
    let n_vocab = engine.config.n_vocab as u32;
    // Deterministic pseudo-random prompt ids below the tokenizer's range.
    let prompt: Vec<u32> =
        (0..n_prompt as u32).map(|i| (i.wrapping_mul(2654435761) >> 7) % n_vocab.min(100_000)).collect();

    sage::ggml::route_logs();
    let backend = LlamaBackend::init()?;
    let model = LlamaModel::load_from_file(&backend, &a[2], &LlamaModelParams::default())?;
    let params = LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(n_ctx as u32))
        .with_n_batch(n_prompt as u32)
        .with_n_ubatch(n_prompt as u32)
        .with_n_threads(threads as i32)
        .with_n_threads_batch(threads as i32)
        .with_type_k(KvCacheType::F16)
        .with_type_v(KvCacheType::F16)
        .with_flash_attention_policy(llama_cpp_sys_2::LLAMA_FLASH_ATTN_TYPE_DISABLED);

    let (mut sp, mut sd, mut lp, mut ld) = (vec![], vec![], vec![], vec![]);
    for run in 0..runs {
        // sage
        engine.reset();
        let t = Instant::now();
        let mut logits = engine.eval(&prompt, false)?;
        sp.push(n_prompt as f64 / t.elapsed().as_secs_f64());
        let t = Instant::now();
        for _ in 0..n_gen {
            let next = argmax(&logits);
            logits = engine.eval(&[next], false)?;
        }
        sd.push(n_gen as f64 / t.elapsed().as_secs_f64());

        // llama.cpp
        let mut ctx = model.new_context(&backend, params.clone())?;
        let mut batch = LlamaBatch::new(n_prompt, 1);
        for (i, &id) in prompt.iter().enumerate() {
            batch.add(llama_cpp_2::token::LlamaToken(id as i32), i as i32, &[0], i + 1 == n_prompt)?;
        }
        let t = Instant::now();
        ctx.decode(&mut batch)?;
        lp.push(n_prompt as f64 / t.elapsed().as_secs_f64());
        let mut last = (n_prompt - 1) as i32;
        let t = Instant::now();
        for step in 0..n_gen {
            let next = argmax(ctx.get_logits_ith(last));
            let mut b = LlamaBatch::new(1, 1);
            b.add(llama_cpp_2::token::LlamaToken(next as i32), (n_prompt + step) as i32, &[0], true)?;
            ctx.decode(&mut b)?;
            last = 0;
        }
        ld.push(n_gen as f64 / t.elapsed().as_secs_f64());
        println!(
            "run {run}: sage prompt {:.1} tok/s decode {:.2} tok/s | llama.cpp prompt {:.1} tok/s decode {:.2} tok/s",
            sp[run], sd[run], lp[run], ld[run]
        );
    }
    let (sp, sd, lp, ld) = (median(sp), median(sd), median(lp), median(ld));
    println!("threads {threads}, prompt {n_prompt} tokens, decode {n_gen} tokens, {runs} runs (medians)");
    println!("prompt: sage {sp:.1} tok/s, llama.cpp {lp:.1} tok/s, ratio {:.2}", sp / lp);
    println!("decode: sage {sd:.2} tok/s, llama.cpp {ld:.2} tok/s, ratio {:.2}", sd / ld);
    let st = engine.stats().sched;
    println!(
        "sage arena: {} slots, {} bytes; expert hit rate {:.3}",
        engine.n_slots(),
        engine.arena_bytes(),
        st.hit_rate()
    );
    Ok(())
}
