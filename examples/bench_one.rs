//! One engine, one measurement, one JSON line: what bench/run.sh runs inside a memory cgroup.
//!
//! cargo run --release --example bench_one -- sage MODEL_DIR [--arena BYTES] [--policy P] [--route-trace FILE] [--no-prefetch] [--read-ahead N] [--load-threads N] [--layer-graphs] [--arena-repack yes|no] [OPTS]
//! cargo run --release --example bench_one -- llama MODEL.gguf [--no-mmap] [--no-repack] [OPTS]
//! cargo run --release --example bench_one -- sizes MODEL_DIR
//! OPTS: --prompt N (512) --gen N (128) --threads N (all cores) --flash-attn (both engines)
//!       --ctk T / --ctv T (K and V cache types, f16; llama.cpp takes --ctk for both)
//!       --ctx N (default: depth + prompt + gen + 8)
//! sage only: --memory BYTES (a total, as sage run --memory), --memory-experts PCT (the total
//!       that gives the arena PCT% of the experts after every other part of the budget at this
//!       context; --fit-only prints that total and exits), --depth N (decode after N positions assumed evaluated, not computed:
//!       Engine::assume_evaluated, the cost of a long context without its prompt)
//!
//! Prompt: N deterministic pseudo-random token ids, evaluated in one batch; decode: greedy, one
//! token at a time. Both engines: f16 KV cache, graphs of at most 512 tokens, flash attention
//! off unless --flash-attn. Prints
//! {"engine", "prompt_tok_s", "decode_tok_s", "peak_rss_bytes", ...}.

use std::time::Instant;

use sage::engine::sampler::argmax;
use sage::engine::{ArenaSize, Engine, EngineOptions, KvType};

fn peak_rss() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .unwrap_or(0)
        * 1024
}

/// A progress line on stderr (a run cut short by a time limit still shows how far it got):
/// after the prompt, then after every 8th decoded token.
fn progress(phase: &str, tokens: usize, secs: f64) {
    if phase == "prompt" || tokens.is_multiple_of(8) {
        eprintln!(
            "{{\"phase\": \"{phase}\", \"tokens\": {tokens}, \"s\": {secs:.2}, \"tok_s\": {:.3}}}",
            tokens as f64 / secs
        );
    }
}

fn prompt_ids(n: usize, n_vocab: u32) -> Vec<u32> {
    (0..n as u32).map(|i| (i.wrapping_mul(2654435761) >> 7) % n_vocab.min(100_000)).collect()
}

fn main() -> anyhow::Result<()> {
    let a: Vec<String> = std::env::args().collect();
    anyhow::ensure!(a.len() >= 3, "usage: bench_one sage|llama PATH [--arena BYTES] [--policy P] [--no-prefetch] [--read-ahead N] [--load-threads N] [--layer-graphs] [--arena-repack yes|no] [--no-mmap] [--no-repack] [--prompt N] [--gen N] [--threads N]");
    let opt = |name: &str| a.iter().position(|x| x == name).and_then(|i| a.get(i + 1)).cloned();
    let flag = |name: &str| a.iter().any(|x| x == name);
    let n_prompt: usize = opt("--prompt").map(|s| s.parse()).transpose()?.unwrap_or(512);
    let n_gen: usize = opt("--gen").map(|s| s.parse()).transpose()?.unwrap_or(128);
    let threads: usize =
        opt("--threads").map(|s| s.parse()).transpose()?.unwrap_or(std::thread::available_parallelism()?.get());
    let depth: usize = opt("--depth").map(|s| s.parse()).transpose()?.unwrap_or(0);
    let n_ctx: usize = opt("--ctx").map(|s| s.parse()).transpose()?.unwrap_or(depth + n_prompt + n_gen + 8);
    let kv = |name: &str| -> anyhow::Result<KvType> {
        let t = opt(name).unwrap_or_else(|| "f16".into());
        KvType::parse(&t).ok_or_else(|| anyhow::anyhow!("{name} {t}: f32, f16, bf16, q8_0 or q4_0"))
    };
    let (k_type, v_type) = (kv("--ctk")?, kv("--ctv")?);
    sage::ggml::route_logs();

    let t_load = Instant::now();
    let out = match a[1].as_str() {
        "sizes" => {
            // For scripts: bytes of the base and of all experts, and one arena slot.
            let md = sage::model_dir::ModelDir::open(a[2].as_ref())?;
            let slot = sage::engine::arena::slot_stride(&md.manifest.layers);
            serde_json::json!({"base_bytes": md.base_bytes(), "expert_bytes": md.expert_bytes(), "slot_bytes": slot})
        }
        "sage" => {
            let arena = match (opt("--arena"), opt("--memory")) {
                (Some(b), _) => ArenaSize::Bytes(b.parse()?),
                (None, Some(b)) => ArenaSize::Memory(b.parse()?),
                (None, None) => ArenaSize::All,
            };
            let policy = opt("--policy").unwrap_or_else(|| sage::engine::scheduler::POLICIES[0].into());
            let prefetch = !flag("--no-prefetch");
            let read_ahead: usize =
                opt("--read-ahead").map(|s| s.parse()).transpose()?.unwrap_or(EngineOptions::default().read_ahead);
            let load_threads: usize =
                opt("--load-threads").map(|s| s.parse()).transpose()?.unwrap_or(EngineOptions::default().load_threads);
            // The streaming path's two graphs per layer even when every expert fits.
            let fused = !flag("--layer-graphs");
            // The arena's layout (default: repacked only when every expert is resident).
            let arena_repack = match opt("--arena-repack").as_deref() {
                None => None,
                Some("yes") => Some(true),
                Some("no") => Some(false),
                Some(x) => anyhow::bail!("--arena-repack takes yes or no, not {x}"),
            };
            // Benchmarks with realistic reuse on random weights: experts from a routing trace
            // (`sage trace`), not the router (EngineOptions::route_trace).
            let route_trace =
                opt("--route-trace").map(|p| sage::engine::trace::RouteTrace::open(p.as_ref())).transpose()?;
            let trace_name = opt("--route-trace");
            // Cold copies (sage run --cold-quant): loaded on misses, upgraded on reuse.
            let cold = match (flag("--cold-quant"), flag("--cold-never-upgrade")) {
                (_, true) => sage::engine::ColdUse::NeverUpgrade,
                (true, _) => sage::engine::ColdUse::Upgrade,
                _ => sage::engine::ColdUse::Off,
            };
            let mut o = EngineOptions {
                threads,
                n_ctx,
                arena,
                k_type,
                v_type,
                flash_attn: if flag("--flash-attn") {
                    sage::engine::FlashAttn::On
                } else {
                    sage::engine::FlashAttn::Off
                },
                policy: policy.clone(),
                prefetch,
                read_ahead,
                load_threads,
                fused,
                arena_repack,
                route_trace: route_trace.map(std::sync::Arc::new),
                cold,
                ..Default::default()
            };
            if let Some(pct) = opt("--memory-experts") {
                let pct: f64 = pct.parse()?;
                // The parts at this context, then the arena of PCT% of the experts on top.
                let fit = Engine::fit_memory(a[2].as_ref(), &o, u64::MAX / 4, 0)?;
                let slots = ((fit.n_experts as f64 * pct / 100.0).round() as u64).max(fit.n_expert_used);
                let total = fit.budget.fixed() + sage::engine::arena::arena_bytes(slots, fit.stride, fit.tail);
                eprintln!("{{\"memory\": {total}, \"slots\": {slots}}}");
                if flag("--fit-only") {
                    // For scripts that set a memory limit to this total before the run.
                    println!("{}", serde_json::json!({"memory": total, "slots": slots, "budget": fit.budget}));
                    return Ok(());
                }
                o.arena = ArenaSize::Memory(total);
            }
            let mut e = Engine::load(a[2].as_ref(), o)?;
            e.assume_evaluated(depth)?;
            let load_s = t_load.elapsed().as_secs_f64();
            let prompt = prompt_ids(n_prompt, e.config.n_vocab as u32);
            let t = Instant::now();
            let mut logits = e.eval(&prompt, false)?;
            let prompt_s = t.elapsed().as_secs_f64();
            progress("prompt", n_prompt, prompt_s);
            let after_prompt = e.stats().sched;
            let prompt_compute = e.stats().compute;
            let t = Instant::now();
            for i in 0..n_gen {
                let next = argmax(&logits);
                logits = e.eval(&[next], false)?;
                progress("decode", i + 1, t.elapsed().as_secs_f64());
            }
            let decode_s = t.elapsed().as_secs_f64();
            let st = e.stats().sched;
            let (hits, misses) = (st.hits - after_prompt.hits, st.misses - after_prompt.misses);
            serde_json::json!({
                "engine": "sage", "flash_attn": e.flash_attn(), "n_ctx": n_ctx, "depth": depth, "n_prompt": n_prompt, "k_type": format!("{k_type:?}"), "v_type": format!("{v_type:?}"), "budget": e.budget(), "route_trace": trace_name, "cold": cold, "cold_loads": st.cold_loads - after_prompt.cold_loads, "upgrades": st.upgrades - after_prompt.upgrades, "one_graph": e.all_resident(), "arena_repack": arena_repack, "policy": policy, "read_ahead": read_ahead, "load_threads": load_threads, "prefetch": e.stats().prefetch, "arena_bytes": e.arena_bytes(), "arena_slots": e.n_slots(),
                "load_s": load_s,
                "prompt_tok_s": n_prompt as f64 / prompt_s, "decode_tok_s": n_gen as f64 / decode_s,
                "decode_hit_rate": hits as f64 / (hits + misses).max(1) as f64,
                "decode_bytes_read_per_token": (st.bytes_read - after_prompt.bytes_read) / n_gen.max(1) as u64,
                "decode_stall_s": (st.stall - after_prompt.stall).as_secs_f64(),
                "prompt_stall_s": after_prompt.stall.as_secs_f64(), "prompt_compute_s": prompt_compute.as_secs_f64(),
                "prompt_bytes_read": after_prompt.bytes_read,
                "memory": e.memory(),
                "peak_rss_bytes": peak_rss(),
            })
        }
        "llama" => {
            anyhow::ensure!(depth == 0 && opt("--memory").is_none(), "--depth and --memory are sage's only");
            let mmap = !flag("--no-mmap");
            // On the CPU llama.cpp copies every repackable matrix (q4_K: all of them) into
            // its repacking buffer by default, so with mmap it holds the mapped file's pages
            // and an anonymous repacked copy. --no-repack turns that off (use_extra_bufts),
            // leaving the weights in the mapped file: the mmap baseline under a memory limit.
            let repack = !flag("--no-repack");
            let o = sage::ggml::LlamaRunOptions {
                mmap,
                repack,
                n_ctx: n_ctx as u32,
                n_batch: n_prompt as u32,
                threads: threads as i32,
                kv_type: k_type.ggml(),
                // Graphs of 512 tokens, as sage's --batch.
                n_ubatch: 512,
                flash_attn: flag("--flash-attn"),
            };
            let mut llama = sage::ggml::LlamaRunner::load(a[2].as_ref(), &o)?;
            let load_s = t_load.elapsed().as_secs_f64();
            let prompt: Vec<i32> = prompt_ids(n_prompt, llama.n_vocab() as u32).iter().map(|&t| t as i32).collect();
            let t = Instant::now();
            let mut logits = llama.decode(&prompt)?;
            let prompt_s = t.elapsed().as_secs_f64();
            progress("prompt", n_prompt, prompt_s);
            let t = Instant::now();
            for i in 0..n_gen {
                logits = llama.decode(&[argmax(&logits) as i32])?;
                progress("decode", i + 1, t.elapsed().as_secs_f64());
            }
            let decode_s = t.elapsed().as_secs_f64();
            serde_json::json!({
                "engine": "llama.cpp", "flash_attn": o.flash_attn, "n_ctx": n_ctx, "n_prompt": n_prompt, "kv_type": format!("{k_type:?}"), "mmap": mmap, "repack": repack, "load_s": load_s,
                "prompt_tok_s": n_prompt as f64 / prompt_s, "decode_tok_s": n_gen as f64 / decode_s,
                "peak_rss_bytes": peak_rss(),
            })
        }
        other => anyhow::bail!("unknown engine '{other}': sage or llama"),
    };
    println!("{out}");
    Ok(())
}
