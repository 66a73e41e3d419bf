//! Each family besides Qwen3-MoE (Mixtral, OLMoE, Qwen2-MoE) end to end, against the
//! references scripts/make_arch_fixtures.py made with transformers (f32, eager attention and
//! experts) and against llama.cpp (through llama-cpp-2) on the merged GGUF of the same
//! conversion: the converter, merge, the tokenizer in both directions, the engine at every
//! arena size, greedy generation, pools, and a GGUF as input.

use std::path::{Path, PathBuf};

use sage::convert::{convert, ConvertOptions};
use sage::engine::{ArenaSize, Engine};
use sage::ggml::GgmlType;
use sage::merge::merge;
use sage::tokenizer::Tokenizer;

use crate::util::*;

/// Max abs logit difference between llama.cpp on the merged f32 GGUF and transformers in f32,
/// and between sage and transformers: the same math in f32 in different orders (the Qwen3
/// fixture measures 9e-6 to 2.3e-5).
const TRANSFORMERS_TOL: f32 = 1e-3;
// sage against llama.cpp on the same file, and sage at the full arena against sage at the
// smallest: per type, as the Qwen3 engine tests hold it (`util::engine_tol`).
fn fixture(family: &str) -> PathBuf {
    fixtures().join(format!("tiny-{family}"))
}

fn refs(family: &str) -> (Vec<RefPrompt>, Vec<u32>, serde_json::Value) {
    reference_from(&format!("reference-{family}"))
}

fn ids_u32(p: &RefPrompt) -> Vec<u32> {
    p.ids.iter().map(|&i| i as u32).collect()
}

/// `family`'s fixture converted at `ty` (with a pool) into `dir`, and its merged GGUF.
fn converted(dir: &Path, family: &str, ty: GgmlType, pool: Option<Vec<u32>>) -> (PathBuf, PathBuf) {
    let o = ConvertOptions { experts: pool, ..opts(Some(ty)) };
    let out = dir.join(format!("{family}-{ty}"));
    convert(&fixture(family), &out, &o).unwrap_or_else(|e| panic!("converting {family}: {e}"));
    let gguf = dir.join(format!("{family}-{ty}.gguf"));
    merge(&out, &gguf, false).unwrap();
    (out, gguf)
}

fn merged_matches_transformers(family: &str) {
    let dir = tmp();
    let (_, gguf) = converted(dir.path(), family, GgmlType::F32, None);
    let model = load_llama(&gguf);
    let (prompts, _, meta) = refs(family);
    assert_eq!(model.n_vocab() as u64, meta["n_vocab"].as_u64().unwrap());
    for p in &prompts {
        let d = max_abs_diff(&llama_logits(&model, &p.ids), &p.logits);
        eprintln!("{family} {}: {} positions, |llama.cpp - transformers| {d:e}", p.name, p.ids.len());
        assert!(d <= TRANSFORMERS_TOL, "{family} {}: {d}", p.name);
    }
}

fn tokenizers_agree(family: &str) {
    let dir = tmp();
    let (model_dir, gguf) = converted(dir.path(), family, GgmlType::Q8_0, None);
    // The same tokenizer rebuilt from the merged file's GGUF metadata.
    let again = dir.path().join("from-gguf");
    convert(&gguf, &again, &ConvertOptions::default()).unwrap();
    let model = load_llama(&gguf);
    let (prompts, _, meta) = refs(family);
    let from_hf = Tokenizer::load(&model_dir).unwrap();
    let from_gguf = Tokenizer::load(&again).unwrap();
    let strings = meta["tokenize"].as_array().unwrap();
    assert!(strings.len() >= 10);
    for t in strings {
        let text = t["text"].as_str().unwrap();
        let want: Vec<i32> = t["ids"].as_array().unwrap().iter().map(|i| i.as_i64().unwrap() as i32).collect();
        let ids = |tk: &Tokenizer| -> Vec<i32> {
            tk.inner().encode(text, false).unwrap().get_ids().iter().map(|&i| i as i32).collect()
        };
        assert_eq!(llama_tokenize(&model, text), want, "{family}: llama.cpp vs transformers on {text:?}");
        assert_eq!(ids(&from_hf), want, "{family}: tokenizer.json vs transformers on {text:?}");
        assert_eq!(ids(&from_gguf), want, "{family}: tokenizer.json from GGUF vs transformers on {text:?}");
        if !text.contains('<') {
            // Special tokens decode to their text only where they are not skipped.
            let back = from_gguf.decode(&want.iter().map(|&i| i as u32).collect::<Vec<_>>()).unwrap();
            assert_eq!(back, t["decode"].as_str().unwrap(), "{family}: decoding {text:?}");
        }
    }
    // What `sage run` feeds the model: the prompts' ids (BOS first where the model wants one),
    // and for `--chat` the conversation rendered by the model's own template (stored in
    // base.gguf), which writes its own special tokens.
    let md = sage::model_dir::ModelDir::open(&model_dir).unwrap();
    let template = sage::chat::ChatTemplate::for_model(&md.base, md.config.arch(), &from_hf, None).unwrap();
    assert_eq!(template.origin, sage::chat::Origin::Model);
    for p in &prompts {
        let chat = p.name == "chat";
        let text = if chat {
            let messages: Vec<sage::chat::Message> = serde_json::from_value(meta["chat_messages"].clone()).unwrap();
            let text = template.render(&messages, true).unwrap();
            assert_eq!(text, meta["chat_prompt"].as_str().unwrap(), "{family}: rendered chat prompt");
            text
        } else {
            p.text.clone()
        };
        let got: Vec<i32> = from_hf.encode_with(&text, !chat).unwrap().iter().map(|&i| i as i32).collect();
        assert_eq!(got, p.ids, "{family} {}: sage's prompt ids", p.name);
        let llama_ids: Vec<i32> =
            model.vocab().tokenize(text.as_bytes(), !chat, true).into_iter().map(|t| t.0).collect();
        assert_eq!(llama_ids, p.ids, "{family} {}: llama.cpp's prompt ids", p.name);
    }
}

fn engine_matches_llama_cpp(family: &str) {
    let dir = tmp();
    let (prompts, _, _) = refs(family);
    for ty in [GgmlType::F32, GgmlType::Q8_0, GgmlType::Q4_K] {
        let (model_dir, gguf) = converted(dir.path(), family, ty, None);
        let llama = load_llama(&gguf);
        let mut full = Engine::load(&model_dir, exact(ArenaSize::All)).unwrap();
        let k = full.config.n_expert_used as usize;
        let n_vocab = full.config.n_vocab as usize;
        let mut small = Engine::load(&model_dir, exact(ArenaSize::Experts(k))).unwrap();
        assert!(full.all_resident() && small.n_slots() == k);
        for p in &prompts {
            let ids = ids_u32(p);
            let want = llama_logits(&llama, &p.ids);
            full.reset();
            small.reset();
            let a = rows(full.eval(&ids, true).unwrap(), n_vocab);
            let b = rows(small.eval(&ids, true).unwrap(), n_vocab);
            let (da, db, dab) = (max_abs_diff(&a, &want), max_abs_diff(&b, &want), max_abs_diff(&a, &b));
            eprintln!(
                "{family} {ty} {}: |sage(all) - llama.cpp| {da:e}, |sage({k} slots) - llama.cpp| {db:e}, |all - {k} slots| {dab:e}",
                p.name
            );
            // All experts resident: one graph, as llama.cpp's, bit-identical.
            assert!(da <= engine_tol(ty, false), "{family} {ty} {}: {da}", p.name);
            let (pb, pab) = (per_position(&b, &want), per_position(&a, &b));
            let rec = full.config.recurrent_layers.contains(&true);
            // A scaled sigmoid router at q8_0 or a k-quant: see `isolated_rounding_steps` and
            // `scaled_router_rounding_steps`.
            let steps = ty != GgmlType::F32 && full.config.gating != sage::config::Gating::default();
            let ok = |d: &[f32]| {
                within_engine_tol_of(d, ty, true, false, rec)
                    || steps && scaled_router_rounding_steps(d, engine_tol(ty, true))
            };
            assert!(ok(&pb), "{family} {ty} {}: {pb:?}", p.name);
            assert!(ok(&pab), "{family} {ty} {}: {pab:?}", p.name);
            if ty == GgmlType::F32 {
                let dt = max_abs_diff(&a, &p.logits);
                assert!(dt <= TRANSFORMERS_TOL, "{family} {}: sage vs transformers {dt}", p.name);
            }
        }
        assert!(small.stats().sched.misses > 0, "the small arena streamed experts");
    }
}

fn greedy_matches_llama_cpp(family: &str) {
    let dir = tmp();
    let (prompts, _, _) = refs(family);
    for ty in [GgmlType::F32, GgmlType::Q8_0, GgmlType::Q4_K] {
        let (model_dir, gguf) = converted(dir.path(), family, ty, None);
        let llama = load_llama(&gguf);
        let tk = Tokenizer::load(&model_dir).unwrap();
        let k = sage::model_dir::ModelDir::open(&model_dir).unwrap().config.n_expert_used as usize;
        for arena in [ArenaSize::All, ArenaSize::Experts(k)] {
            let mut e = Engine::load(&model_dir, exact(arena)).unwrap();
            // No stop tokens: the reference runs all 32 steps.
            let opts = sage::engine::GenOptions { max_tokens: 32, ..Default::default() };
            for p in &prompts {
                let want = llama_greedy(&llama, &p.ids, 32);
                let mut s = sage::engine::sampler::Sampler::new(sage::engine::sampler::SamplerParams {
                    temp: 0.0,
                    ..Default::default()
                });
                let g = e.generate(&tk, &ids_u32(p), &opts, &mut s, |_, _| true).unwrap();
                let got: Vec<i32> = g.tokens.iter().map(|&t| t as i32).collect();
                assert_eq!(got, want, "{family} {ty} {arena:?} {}", p.name);
            }
        }
    }
}

fn pool_matches_transformers(family: &str) {
    let dir = tmp();
    let (prompts, pool, _) = refs(family);
    let model_dir = dir.path().join("pool");
    let o = ConvertOptions { experts: Some(pool.clone()), ..opts(Some(GgmlType::F32)) };
    convert(&fixture(family), &model_dir, &o).unwrap();
    let gguf = dir.path().join("pool.gguf");
    let grouped = sage::model_dir::ModelDir::open(&model_dir).unwrap().config.gating.grouped();
    // Merged, the pool is a smaller standard model whose router has only the pool's rows; a
    // grouped router's pool only where its groups keep equal shares (the fixtures' do not).
    let merged = merge(&model_dir, &gguf, false);
    if grouped {
        let e = merged.unwrap_err().to_string();
        assert!(e.contains("groups") && !gguf.exists(), "{family}: {e}");
    } else {
        merged.unwrap();
    }
    let llama = (!grouped).then(|| load_llama(&gguf));
    let k = sage::model_dir::ModelDir::open(&model_dir).unwrap().config.n_expert_used as usize;
    for arena in [ArenaSize::All, ArenaSize::Experts(k)] {
        let mut e = Engine::load(&model_dir, exact(arena)).unwrap();
        let n_vocab = e.config.n_vocab as usize;
        // (A dense layer has no experts.)
        assert!(e.pool().iter().enumerate().all(|(il, l)| if e.config.is_dense(il as u32) {
            l.is_empty()
        } else {
            *l == pool
        }));
        for p in &prompts {
            e.reset();
            let got = rows(e.eval(&ids_u32(p), true).unwrap(), n_vocab);
            let d = max_abs_diff(&got, &p.pool_logits);
            eprintln!("{family} pool {pool:?} {arena:?} {}: |sage - transformers(masked router)| {d:e}", p.name);
            assert!(d <= TRANSFORMERS_TOL, "{family} {arena:?} {}: {d}", p.name);
            assert!(
                max_abs_diff(&got, &p.logits) > 10.0 * TRANSFORMERS_TOL,
                "{family} {}: the pool changed nothing",
                p.name
            );
            if let Some(llama) = &llama {
                let dl = max_abs_diff(&llama_logits(llama, &p.ids), &p.pool_logits);
                assert!(dl <= TRANSFORMERS_TOL, "{family} {}: merged pool in llama.cpp {dl}", p.name);
            }
        }
    }
}

/// A shard's records and its header without the conversion id (the last 32 bytes of the 64).
fn shard_without_id(path: &Path) -> Vec<u8> {
    let mut b = std::fs::read(path).unwrap();
    b[32..64].fill(0);
    b
}

fn gguf_input_gives_the_same_shards(family: &str) {
    let dir = tmp();
    // A mixed-type file, as downloaded GGUFs are: q6_K base matrices, q4_K experts.
    let o =
        ConvertOptions { quant_base: Some(GgmlType::Q6_K), quant_experts: Some(GgmlType::Q4_K), ..Default::default() };
    let first = dir.path().join("first");
    convert(&fixture(family), &first, &o).unwrap();
    let a = dir.path().join("a.gguf");
    merge(&first, &a, false).unwrap();
    let second = dir.path().join("second");
    convert(&a, &second, &ConvertOptions::default()).unwrap();
    let m = sage::model_dir::ModelDir::open(&second).unwrap();
    assert_eq!(m.config, sage::model_dir::ModelDir::open(&first).unwrap().config, "{family}: hyperparameters");
    for l in &m.manifest.layers {
        let (x, y) = (shard_without_id(&first.join(&l.file)), shard_without_id(&second.join(&l.file)));
        assert!(x.len() == y.len() && x == y, "{family}: {} differs", l.file);
    }
    // The base: every tensor's bytes.
    let b = dir.path().join("b.gguf");
    merge(&second, &b, false).unwrap();
    assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap(), "{family}: merged again, byte for byte");
}

fn sage(args: &[&str]) -> String {
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_sage")).args(args).output().unwrap();
    assert!(o.status.success(), "sage {args:?}: {}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout).unwrap()
}

/// `sage run --chat`, `sage eval` and `sage profile` on the family's model directory.
fn cli_runs_evaluates_and_profiles(family: &str) {
    let dir = tmp();
    let (model_dir, gguf) = converted(dir.path(), family, GgmlType::Q8_0, None);
    let m = model_dir.to_str().unwrap();
    let llama = load_llama(&gguf);
    let (prompts, _, meta) = refs(family);
    // --chat: the family's template, BOS where the model wants one; greedy ids as llama.cpp's.
    let chat = prompts.iter().find(|p| p.name == "chat").unwrap();
    let question = meta["chat_messages"][0]["content"].as_str().unwrap();
    let out = sage(&["run", m, "--chat", "--prompt", question, "--temp", "0", "-n", "8", "--json", "--exact"]);
    let lines: Vec<serde_json::Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let (last, tokens) = lines.split_last().unwrap();
    let got: Vec<i32> = tokens.iter().map(|t| t["id"].as_i64().unwrap() as i32).collect();
    let stats = &last["stats"];
    assert_eq!(stats["prompt_tokens"].as_u64().unwrap() as usize, chat.ids.len(), "{family}: the chat prompt's ids");
    let want = llama_greedy(&llama, &chat.ids, 8);
    assert_eq!(got, want[..got.len()], "{family}: greedy ids after the chat prompt");
    if stats["stop"] == "eos" {
        assert!(got.len() < 8);
    } else {
        assert_eq!(got.len(), 8, "{family}");
    }

    // eval and profile over text made of the fixture prompts.
    let text = dir.path().join("text.txt");
    let body: String =
        prompts.iter().filter(|p| p.name != "chat").map(|p| p.text.as_str()).collect::<Vec<_>>().join(" ");
    std::fs::write(&text, [body.as_str(); 6].join("\n")).unwrap();
    let t = text.to_str().unwrap();
    let tk = Tokenizer::load(&model_dir).unwrap();
    let ids: Vec<i32> =
        tk.encode(&std::fs::read_to_string(&text).unwrap()).unwrap().iter().map(|&i| i as i32).collect();
    let window = 32;
    assert!(ids.len() >= 4 * window, "{family}: {} tokens", ids.len());
    let want = llama_cpp_ppl(&gguf, &ids, window, tk.bos.map(|b| b as i32));
    let k = sage::model_dir::ModelDir::open(&model_dir).unwrap().config.n_expert_used.to_string();
    for arena in [None, Some(k.as_str())] {
        let mut args = vec!["eval", m, "--text", t, "--ctx", "32", "--json", "--exact"];
        args.extend(arena.iter().flat_map(|a| ["--arena-experts", a]));
        let out: serde_json::Value = serde_json::from_str(sage(&args).trim()).unwrap();
        let got = out["perplexity"]["ppl"].as_f64().unwrap();
        let rel = (got - want).abs() / want;
        eprintln!("{family} arena {arena:?}: sage eval {got:.4}, llama.cpp {want:.4}, relative difference {rel:e}");
        assert!(rel < 0.005, "{family}: sage {got} vs llama.cpp {want}");
    }
    let usage = dir.path().join("usage.json");
    sage(&["profile", m, "--text", t, "--ctx", "32", "-o", usage.to_str().unwrap()]);
    let u = sage::usage::Usage::load(&usage).unwrap();
    let cfg = sage::model_dir::ModelDir::open(&model_dir).unwrap().config;
    assert_eq!((u.n_layer, u.n_expert, u.n_expert_used), (cfg.n_layer, cfg.n_expert, cfg.n_expert_used));
    for (il, l) in u.layers.iter().enumerate() {
        // A dense layer routes nothing.
        let per_token = if cfg.is_dense(il as u32) { 0 } else { cfg.n_expert_used as u64 };
        assert_eq!(l.counts.iter().sum::<u64>(), u.tokens * per_token, "{family} layer {il}");
    }
}

macro_rules! family {
    ($m:ident) => {
        mod $m {
            #[test]
            fn merged_f32_matches_transformers() {
                super::merged_matches_transformers(stringify!($m));
            }
            #[test]
            fn tokenizers_agree_with_transformers_and_llama_cpp() {
                super::tokenizers_agree(stringify!($m));
            }
            #[test]
            fn engine_matches_llama_cpp_at_full_and_smallest_arena() {
                super::engine_matches_llama_cpp(stringify!($m));
            }
            #[test]
            fn greedy_32_ids_match_llama_cpp() {
                super::greedy_matches_llama_cpp(stringify!($m));
            }
            #[test]
            fn pool_matches_transformers_with_masked_router() {
                super::pool_matches_transformers(stringify!($m));
            }
            #[test]
            fn cli_runs_evaluates_and_profiles() {
                super::cli_runs_evaluates_and_profiles(stringify!($m));
            }
            #[test]
            fn gguf_input_gives_the_same_shards() {
                super::gguf_input_gives_the_same_shards(stringify!($m));
            }
        }
    };
}

family!(mixtral);
family!(olmoe);
family!(qwen2moe);
family!(qwen35moe);
family!(qwen3next);
family!(glm4moe);
family!(deepseek3);
family!(deepseek2);

/// The latent cache's bytes per token equal llama.cpp's for the same file: llama.cpp's state of
/// a sequence grows per token by its cache rows (K only for latent attention) and 12 bytes of
/// cell metadata (position, count of sequences, the sequence id: `llama_kv_cache::
/// state_write_meta`); sage's plan (what `Memory` allocates and `--memory` counts) is the rows.
#[test]
fn deepseek_latent_cache_bytes_per_token_equal_llama_cpp() {
    use llama_cpp_2::context::session::LlamaStateSeqFlags;
    use sage::engine::memory::{plan, KvType, MemoryOptions};
    for family in ["deepseek3", "deepseek2"] {
        let dir = tmp();
        let (model_dir, gguf) = converted(dir.path(), family, GgmlType::F32, None);
        let model = load_llama(&gguf);
        let c = LlamaCtx { kv: llama_cpp_2::context::params::KvCacheType::F16, ..LlamaCtx::default() };
        let mut ctx = llama_context_with(&model, c);
        let (prompts, _, _) = refs(family);
        let ids = &prompts.iter().find(|p| p.name == "chat").unwrap().ids;
        let mut sizes = Vec::new();
        for (i, &id) in ids.iter().take(16).enumerate() {
            let mut b = llama_cpp_2::llama_batch::LlamaBatch::new(1, 1);
            b.add(llama_cpp_2::token::LlamaToken(id), i as i32, &[0], true).unwrap();
            ctx.decode(&mut b).unwrap();
            sizes.push(ctx.state_seq_get_size_ext(0, LlamaStateSeqFlags::empty()) as u64);
        }
        let llama_per_token = (sizes[15] - sizes[7]) / 8 - 12;
        assert_eq!((sizes[15] - sizes[7]) % 8, 0, "{family}: {sizes:?}");
        let cfg = sage::model_dir::ModelDir::open(&model_dir).unwrap().config;
        let mla = cfg.mla.unwrap();
        let o = MemoryOptions {
            n_ctx: 1,
            n_seq: 1,
            n_batch: 1,
            k_type: KvType::F16,
            v_type: KvType::F16,
            flash_attn: false,
            swa_full: true,
            checkpoints: 0,
        };
        let sage_per_token = plan(&cfg, &o).total();
        eprintln!("{family}: latent cache {sage_per_token} B per token in sage, {llama_per_token} in llama.cpp");
        assert_eq!(sage_per_token, llama_per_token, "{family}");
        assert_eq!(sage_per_token, cfg.n_layer as u64 * (mla.kv_lora_rank + cfg.n_rot) * 2, "{family}");
    }
}

/// What DeepSeek's configs may say that llama.cpp's deepseek2 cannot compute is refused at
/// the config, each with the key and why; DeepSeek-V3.2's sparse attention is not a family.
#[test]
fn deepseek_configs_sage_cannot_run_are_refused_clearly() {
    let base: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("deepseek3").join("config.json")).unwrap()).unwrap();
    let v2: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("deepseek2").join("config.json")).unwrap()).unwrap();
    let dir = tmp();
    let refused =
        |cfg: &serde_json::Value, edit: &dyn Fn(&mut serde_json::Map<String, serde_json::Value>), want: &[&str]| {
            let mut c = cfg.clone();
            edit(c.as_object_mut().unwrap());
            let path = dir.path().join("config.json");
            std::fs::write(&path, serde_json::to_string(&c).unwrap()).unwrap();
            let err = sage::config::read_hf_config(&path).map(|_| ()).unwrap_err().to_string();
            for w in want {
                assert!(err.contains(w), "{err:?} does not say {w:?}");
            }
        };
    refused(
        &v2,
        &|c| {
            c.insert("topk_method".into(), "group_limited_greedy".into());
            c.insert("n_group".into(), 4.into());
            c.insert("topk_group".into(), 2.into());
        },
        &["topk_method", "best expert"],
    );
    refused(
        &base,
        &|c| {
            c.insert("rope_interleave".into(), false.into());
        },
        &["rope_interleave"],
    );
    refused(
        &base,
        &|c| {
            c["rope_parameters"]["mscale"] = 0.5.into();
        },
        &["mscale", "llama.cpp"],
    );
    refused(
        &base,
        &|c| {
            c.insert("attention_bias".into(), true.into());
        },
        &["attention_bias"],
    );
    refused(
        &base,
        &|c| {
            c.insert("scoring_func".into(), "softmax".into());
        },
        &["scoring_func", "sigmoid"],
    );
    refused(
        &base,
        &|c| {
            c.insert("architectures".into(), serde_json::json!(["DeepseekV32ForCausalLM"]));
            c.insert("model_type".into(), "deepseek_v32".into());
        },
        &["DeepseekV32ForCausalLM", "DeepseekV3ForCausalLM", "Glm4MoeForCausalLM"],
    );
}
