//! gpt-oss end to end, against the references scripts/make_gptoss_fixtures.py made with
//! transformers (f32, eager attention and experts) and against llama.cpp (through
//! llama-cpp-2) on the merged GGUF of the same conversion: attention sinks, sliding-window
//! layers (window 4, shorter than every prompt), YaRN, q/k/v/o biases, the router's bias,
//! experts with biases and the clamped SwiGLU; the experts unquantized (tiny-gptoss) and in
//! MXFP4 (tiny-gptoss-mxfp4, kept bit for bit).

use std::path::{Path, PathBuf};

use safetensors::SafeTensors;
use sage::convert::{convert, ConvertOptions};
use sage::engine::{ArenaSize, Engine};
use sage::ggml::GgmlType;
use sage::merge::merge;

use crate::util::*;

/// Max abs logit difference between llama.cpp (or sage) in f32 and transformers in f32 with
/// YaRN's correction range rounded (`truncate: true`), which is what ggml computes: the same
/// math in another order (as `archs::TRANSFORMERS_TOL`).
const TRANSFORMERS_TOL: f32 = 1e-3;

/// How far the published configuration (`truncate: false`: YaRN's correction range not
/// rounded) moves this fixture's logits from what ggml computes (always rounded): measured by
/// the fixture script and here (up to 0.56, on the 29-token mixed prompt), checked so that the
/// departure stays named and bounded.
const YARN_ROUNDING_MAX: f32 = 1.0;

/// sage against llama.cpp on the same file, at every arena size and expert type. Not 0 as
/// for the families without sliding layers (`util::engine_tol`): llama.cpp keeps the sliding
/// layers' K and V in a cache of its own (`llama_kv_cache_iswa`), whose padded cell count and
/// order differ from sage's one cache, so KQ·V sums in another order; measured up to 1.1e-5
/// (MXFP4, 83-token chat prompt), every other case under 7e-6.
const LLAMA_TOL: f32 = 3e-5;

/// (fixture, its references, expert type: None keeps MXFP4) the engine tests run.
const ENGINE_CASES: [(&str, &str, Option<GgmlType>); 3] = [
    ("tiny-gptoss", "reference-gptoss", Some(GgmlType::F32)),
    ("tiny-gptoss", "reference-gptoss", Some(GgmlType::Q8_0)),
    ("tiny-gptoss-mxfp4", "reference-gptoss-mxfp4", None),
];

struct Prompt {
    name: String,
    ids: Vec<i32>,
    /// transformers as configured (`truncate: false`).
    logits: Vec<Vec<f32>>,
    /// transformers with `truncate: true`: ggml's YaRN.
    rounded: Vec<Vec<f32>>,
    pool_rounded: Vec<Vec<f32>>,
    greedy: Vec<i32>,
}

fn refs(name: &str) -> (Vec<Prompt>, Vec<u32>, serde_json::Value) {
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join(format!("{name}.json"))).unwrap()).unwrap();
    let bytes = std::fs::read(fixtures().join(format!("{name}.safetensors"))).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let rows = |n: &str| -> Vec<Vec<f32>> {
        let Ok(t) = st.tensor(n) else { return Vec::new() };
        let v: Vec<f32> = t.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
        v.chunks(t.shape()[1]).map(|r| r.to_vec()).collect()
    };
    let ints = |n: &str| -> Vec<i32> {
        let Ok(t) = st.tensor(n) else { return Vec::new() };
        t.data().chunks_exact(4).map(|c| i32::from_le_bytes(c.try_into().unwrap())).collect()
    };
    let prompts = meta["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let name = p["name"].as_str().unwrap().to_string();
            Prompt {
                ids: ints(&format!("{name}.ids")),
                logits: rows(&format!("{name}.logits")),
                rounded: rows(&format!("{name}.logits_rounded")),
                pool_rounded: rows(&format!("{name}.pool_logits_rounded")),
                greedy: ints(&format!("{name}.greedy")),
                name,
            }
        })
        .collect();
    let pool = meta["pool"].as_array().map_or(Vec::new(), |a| a.iter().map(|v| v.as_u64().unwrap() as u32).collect());
    (prompts, pool, meta)
}

fn fixture(name: &str) -> PathBuf {
    fixtures().join(name)
}

fn ids_u32(p: &Prompt) -> Vec<u32> {
    p.ids.iter().map(|&i| i as u32).collect()
}

/// `src` converted with experts at `ty` (None: as stored) into `dir`, and its merged GGUF.
fn converted(dir: &Path, src: &str, ty: Option<GgmlType>, pool: Option<Vec<u32>>) -> (PathBuf, PathBuf) {
    let o = ConvertOptions { quant_experts: ty, quant_base: Some(GgmlType::F32), experts: pool, ..Default::default() };
    let tag = ty.map_or("stored".to_string(), |t| t.to_string());
    let out = dir.join(format!("{src}-{tag}"));
    convert(&fixture(src), &out, &o).unwrap_or_else(|e| panic!("converting {src}: {e}"));
    let gguf = dir.join(format!("{src}-{tag}.gguf"));
    merge(&out, &gguf, false).unwrap();
    (out, gguf)
}

/// llama.cpp (and sage) with MXFP4 experts against transformers' f32 forward pass over the
/// same MXFP4 weights dequantized: ggml's MXFP4 dot product quantizes the activations to q8_0
/// first (`vec_dot_mxfp4_q8_0`), which moves this fixture's logits by up to 0.6 (measured: its
/// clamp-testing experts have gate and up weights three times the others');
/// the weights themselves are exact (the f32 case below: sage's MXFP4 bytes dequantized by
/// ggml give transformers' logits within `TRANSFORMERS_TOL`).
const MXFP4_ACTIVATION_TOL: f32 = 1.0;

#[test]
fn merged_gguf_matches_transformers() {
    let dir = tmp();
    let cases: [(&str, &str, Option<GgmlType>, f32); 3] = [
        ("tiny-gptoss", "reference-gptoss", Some(GgmlType::F32), TRANSFORMERS_TOL),
        // MXFP4 experts converted bit for bit, then dequantized to f32 by ggml.
        ("tiny-gptoss-mxfp4", "reference-gptoss-mxfp4", Some(GgmlType::F32), TRANSFORMERS_TOL),
        ("tiny-gptoss-mxfp4", "reference-gptoss-mxfp4", None, MXFP4_ACTIVATION_TOL),
    ];
    for (src, refname, ty, tol) in cases {
        let (_, gguf) = converted(dir.path(), src, ty, None);
        let model = load_llama(&gguf);
        let (prompts, _, _) = refs(refname);
        for p in &prompts {
            let got = llama_logits(&model, &p.ids);
            let d = max_abs_diff(&got, &p.rounded);
            let yarn = max_abs_diff(&got, &p.logits);
            eprintln!(
                "{src} {ty:?} {}: {} positions, |llama.cpp - transformers(rounded YaRN)| {d:e}, |llama.cpp - transformers(as configured)| {yarn:e}",
                p.name,
                p.ids.len()
            );
            assert!(d <= tol, "{src} {ty:?} {}: {d}", p.name);
            assert!(yarn <= YARN_ROUNDING_MAX + tol, "{src} {ty:?} {}: {yarn}", p.name);
            if ty.is_none() {
                assert!(d > TRANSFORMERS_TOL, "{src}: MXFP4 experts stayed MXFP4 (q8_0 activations)");
            }
        }
    }
}

#[test]
fn engine_matches_llama_cpp_at_full_and_smallest_arena() {
    let dir = tmp();
    for (src, refname, ty) in ENGINE_CASES {
        let (prompts, _, _) = refs(refname);
        let (model_dir, gguf) = converted(dir.path(), src, ty, None);
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
                "{src} {ty:?} {}: |sage(all) - llama.cpp| {da:e}, |sage({k} slots) - llama.cpp| {db:e}, |all - {k} slots| {dab:e}, |sage - transformers| {:e}",
                p.name,
                max_abs_diff(&a, &p.rounded)
            );
            let t = ty.unwrap_or(GgmlType::MXFP4);
            for (what, d) in [("all experts", da), ("smallest arena", db), ("all vs smallest", dab)] {
                assert!(d <= LLAMA_TOL, "{src} {t} {} {what}: {d}", p.name);
            }
        }
        assert!(small.stats().sched.misses > 0, "the small arena streamed experts");
    }
}

#[test]
fn greedy_32_ids_match_llama_cpp_and_transformers() {
    let dir = tmp();
    for (src, refname, ty) in ENGINE_CASES {
        let (prompts, _, meta) = refs(refname);
        let window = meta["config"]["sliding_window"].as_u64().unwrap() as usize;
        let (model_dir, gguf) = converted(dir.path(), src, ty, None);
        let llama = load_llama(&gguf);
        let tk = sage::tokenizer::Tokenizer::load(&model_dir).unwrap();
        let k = sage::model_dir::ModelDir::open(&model_dir).unwrap().config.n_expert_used as usize;
        for arena in [ArenaSize::All, ArenaSize::Experts(k)] {
            let mut e = Engine::load(&model_dir, exact(arena)).unwrap();
            // No stop tokens: the references run all 32 steps.
            let opts = sage::engine::GenOptions { max_tokens: 32, ..Default::default() };
            for p in &prompts {
                assert!(p.ids.len() > window, "{}: {} tokens, window {window}", p.name, p.ids.len());
                let want = llama_greedy(&llama, &p.ids, 32);
                let mut s = sage::engine::sampler::Sampler::new(sage::engine::sampler::SamplerParams {
                    temp: 0.0,
                    ..Default::default()
                });
                let g = e.generate(&tk, &ids_u32(p), &opts, &mut s, |_, _| true).unwrap();
                let got: Vec<i32> = g.tokens.iter().map(|&t| t as i32).collect();
                assert_eq!(got, want, "{src} {ty:?} {arena:?} {}: sage vs llama.cpp", p.name);
                // transformers' own greedy ids (YaRN rounded, as ggml computes it), in f32.
                if ty == Some(GgmlType::F32) && !p.greedy.is_empty() {
                    assert_eq!(got, p.greedy, "{src} {arena:?} {}: sage vs transformers", p.name);
                }
            }
        }
    }
}

#[test]
fn pool_matches_transformers_with_masked_router() {
    let dir = tmp();
    let (prompts, pool, _) = refs("reference-gptoss");
    let (model_dir, gguf) = converted(dir.path(), "tiny-gptoss", Some(GgmlType::F32), Some(pool.clone()));
    // Merged, the pool is a smaller standard model: the router's rows and its bias cut alike.
    let llama = load_llama(&gguf);
    let k = sage::model_dir::ModelDir::open(&model_dir).unwrap().config.n_expert_used as usize;
    for arena in [ArenaSize::All, ArenaSize::Experts(k)] {
        let mut e = Engine::load(&model_dir, exact(arena)).unwrap();
        let n_vocab = e.config.n_vocab as usize;
        assert!(e.pool().iter().all(|l| *l == pool));
        for p in &prompts {
            e.reset();
            let got = rows(e.eval(&ids_u32(p), true).unwrap(), n_vocab);
            let d = max_abs_diff(&got, &p.pool_rounded);
            eprintln!("pool {pool:?} {arena:?} {}: |sage - transformers(masked router)| {d:e}", p.name);
            assert!(d <= TRANSFORMERS_TOL, "{arena:?} {}: {d}", p.name);
            assert!(max_abs_diff(&got, &p.rounded) > 10.0 * TRANSFORMERS_TOL, "{}: the pool changed nothing", p.name);
            let dl = max_abs_diff(&llama_logits(&llama, &p.ids), &p.pool_rounded);
            assert!(dl <= TRANSFORMERS_TOL, "{}: merged pool in llama.cpp {dl}", p.name);
        }
    }
}

/// The o200k-style tokenizer (llama.cpp's `gpt-4o` pre-tokenizer) both ways, and the harmony
/// chat prompt rendered by the model's own template.
#[test]
fn tokenizer_and_harmony_template_agree_with_transformers_and_llama_cpp() {
    let dir = tmp();
    let (model_dir, gguf) = converted(dir.path(), "tiny-gptoss", Some(GgmlType::Q8_0), None);
    let again = dir.path().join("from-gguf");
    convert(&gguf, &again, &ConvertOptions::default()).unwrap();
    let md = sage::model_dir::ModelDir::open(&model_dir).unwrap();
    assert_eq!(md.base.get("tokenizer.ggml.pre"), Some(sage::ggml::GgufValue::Str("gpt-4o".into())));
    let model = load_llama(&gguf);
    let (prompts, _, meta) = refs("reference-gptoss");
    let from_hf = sage::tokenizer::Tokenizer::load(&model_dir).unwrap();
    let from_gguf = sage::tokenizer::Tokenizer::load(&again).unwrap();
    let strings = meta["tokenize"].as_array().unwrap();
    assert!(strings.len() >= 10);
    for t in strings {
        let text = t["text"].as_str().unwrap();
        let want: Vec<i32> = t["ids"].as_array().unwrap().iter().map(|i| i.as_i64().unwrap() as i32).collect();
        let ids = |tk: &sage::tokenizer::Tokenizer| -> Vec<i32> {
            tk.inner().encode(text, false).unwrap().get_ids().iter().map(|&i| i as i32).collect()
        };
        assert_eq!(llama_tokenize(&model, text), want, "llama.cpp vs transformers on {text:?}");
        assert_eq!(ids(&from_hf), want, "tokenizer.json vs transformers on {text:?}");
        assert_eq!(ids(&from_gguf), want, "tokenizer.json from GGUF vs transformers on {text:?}");
    }
    // The harmony prompt: the model's template, stored in base.gguf, with the date it renders.
    let template = sage::chat::ChatTemplate::for_model(&md.base, md.config.arch(), &from_hf, None).unwrap();
    assert_eq!(template.origin, sage::chat::Origin::Model);
    let messages: Vec<sage::chat::Message> = serde_json::from_value(meta["chat_messages"].clone()).unwrap();
    let text = template.render(&messages, true).unwrap();
    let undated = |s: &str| {
        s.lines()
            .map(|l| if l.starts_with("Current date: ") { "Current date: (today)" } else { l })
            .collect::<Vec<_>>()
            .join("\n")
    };
    let want = meta["chat_prompt"].as_str().unwrap();
    assert_eq!(undated(&text), undated(want), "rendered harmony prompt");
    let chat = prompts.iter().find(|p| p.name == "chat").unwrap();
    let got: Vec<i32> = from_hf.encode_with(want, false).unwrap().iter().map(|&i| i as i32).collect();
    assert_eq!(got, chat.ids, "sage's ids of the chat prompt");
    assert_eq!(llama_tokenize(&model, want), chat.ids, "llama.cpp's ids of the chat prompt");
    // Generation stops where llama.cpp's does (its end-of-generation set for this vocabulary):
    // <|return|>, <|call|> and <|endoftext|>, not <|end|>, which closes the analysis channel
    // mid-answer.
    let special = |t: &str| meta["special_token_ids"][t].as_u64().unwrap() as u32;
    let mut eog = from_hf.eog.clone();
    eog.sort_unstable();
    let mut want: Vec<u32> = ["<|return|>", "<|call|>", "<|endoftext|>"].map(special).to_vec();
    want.sort_unstable();
    assert_eq!(eog, want);
    assert!(!from_gguf.eog.contains(&special("<|end|>")));
    let vocab = model.vocab();
    for t in ["<|return|>", "<|call|>", "<|endoftext|>", "<|end|>"] {
        let is_eog = vocab.is_eog(llama_cpp_2::token::LlamaToken(special(t) as i32));
        assert_eq!(is_eog, t != "<|end|>", "llama.cpp's end-of-generation flag of {t}");
    }
}

/// Convert a damaged copy of `src`: the error text, and nothing written at all (every check
/// runs before the output directory is made).
fn convert_damaged(src: &str, damage: impl FnOnce(&Path)) -> String {
    let dir = tmp();
    let c = dir.path().join("ckpt");
    copy_dir(&fixture(src), &c);
    damage(&c);
    let out = dir.path().join("out");
    let e = convert(&c, &out, &ConvertOptions::default()).expect_err("conversion should fail").to_string();
    assert!(!out.exists(), "a refused conversion wrote {}: {e}", out.display());
    e
}

#[test]
fn bad_input_is_a_clear_error_and_writes_nothing() {
    // MXFP4 scales of the wrong shape (one block fewer per row).
    let e = convert_damaged("tiny-gptoss-mxfp4", |c| {
        rewrite_safetensors(&c.join("model.safetensors"), |m| {
            let (d, shape, bytes) = m.remove("model.layers.1.mlp.experts.down_proj_scales").unwrap();
            let (e, rows, nb) = (shape[0], shape[1], shape[2]);
            let cut: Vec<u8> = bytes.chunks(nb).flat_map(|r| r[..nb - 1].to_vec()).collect();
            assert_eq!(cut.len(), e * rows * (nb - 1));
            m.insert("model.layers.1.mlp.experts.down_proj_scales".into(), (d, vec![e, rows, nb - 1], cut));
        })
    });
    assert!(e.contains("model.layers.1.mlp.experts.down_proj_scales") && e.contains("MXFP4 scales"), "{e}");
    assert!(e.contains("wrong shape"), "{e}");
    // A missing expert bias.
    let e = convert_damaged("tiny-gptoss", |c| {
        rewrite_safetensors(&c.join("model.safetensors"), |m| {
            m.remove("model.layers.2.mlp.experts.gate_up_proj_bias").unwrap();
        })
    });
    assert!(e.contains("missing tensor 'model.layers.2.mlp.experts.gate_up_proj_bias'"), "{e}");
    // A missing router bias (a base tensor).
    let e = convert_damaged("tiny-gptoss", |c| {
        rewrite_safetensors(&c.join("model.safetensors"), |m| {
            m.remove("model.layers.0.mlp.router.bias").unwrap();
        })
    });
    assert!(e.contains("missing tensor 'model.layers.0.mlp.router.bias'"), "{e}");
    // An unknown layer type, and a pattern llama.cpp does not run.
    let edit_config = |from: &'static str, to: &'static str| {
        move |c: &Path| {
            let p = c.join("config.json");
            let t = std::fs::read_to_string(&p).unwrap();
            assert!(t.contains(from));
            std::fs::write(&p, t.replacen(from, to, 1)).unwrap();
        }
    };
    let e = convert_damaged("tiny-gptoss", edit_config("\"full_attention\"", "\"chunked_attention\""));
    assert!(e.contains("'layer_types'") && e.contains("entry 1") && e.contains("chunked_attention"), "{e}");
    let e = convert_damaged("tiny-gptoss", edit_config("\"full_attention\"", "\"sliding_attention\""));
    assert!(e.contains("'layer_types'") && e.contains("even layers"), "{e}");
    // A clamp llama.cpp's graph does not compute.
    let e = convert_damaged("tiny-gptoss", edit_config("\"swiglu_limit\": 7.0", "\"swiglu_limit\": 9.0"));
    assert!(e.contains("'swiglu_limit'") && e.contains("7.0"), "{e}");
}

/// A directory of format 1 (before records could hold biases) opens and runs as it did: such
/// a directory differs from one of format 2 without biases only in its version number (in
/// base.gguf and each shard's header).
#[test]
fn format_1_directories_still_open() {
    let dir = tmp();
    let (model, _) = convert_into(&plain(), dir.path(), &opts(Some(GgmlType::Q8_0)));
    let mut e = Engine::load(&model, exact(ArenaSize::Experts(2))).unwrap();
    let ids: Vec<u32> = reference()[0].ids.iter().map(|&i| i as u32).collect();
    let want = e.eval(&ids, true).unwrap();
    drop(e);
    let m = sage::model_dir::ModelDir::open(&model).unwrap();
    assert_eq!(m.manifest.version, sage::model_dir::FORMAT_VERSION);
    assert!(m.manifest.layers.iter().all(|l| !l.bias));
    // Version 2 → 1: the u32 after the key `sage.format_version` (its GGUF type, then the value).
    let base = model.join("base.gguf");
    let mut b = std::fs::read(&base).unwrap();
    let key = b"sage.format_version";
    let at = b.windows(key.len()).position(|w| w == key).unwrap() + key.len();
    assert_eq!(b[at..at + 8], [4, 0, 0, 0, 2, 0, 0, 0], "GGUF u32 type then 2");
    b[at + 4] = 1;
    std::fs::write(&base, b).unwrap();
    for l in &m.manifest.layers {
        let p = model.join(&l.file);
        let mut s = std::fs::read(&p).unwrap();
        assert_eq!(s[8..12], 2u32.to_le_bytes());
        s[8..12].copy_from_slice(&1u32.to_le_bytes());
        std::fs::write(&p, s).unwrap();
    }
    let old = sage::model_dir::ModelDir::open(&model).unwrap();
    assert_eq!(old.manifest.version, 1);
    let mut e = Engine::load(&model, exact(ArenaSize::Experts(2))).unwrap();
    assert_eq!(e.eval(&ids, true).unwrap(), want);
    // A version this sage does not know is refused by name.
    let mut b = std::fs::read(&base).unwrap();
    b[at + 4] = 9;
    std::fs::write(&base, b).unwrap();
    let err = sage::model_dir::ModelDir::open(&model).err().unwrap().to_string();
    assert!(err.contains("sage.format_version") && err.contains("expected 1 to 2, got"), "{err}");
}

/// `synth --like gpt-oss-20b` at MXFP4: the real shapes (records with biases), llama.cpp loads
/// the merged file, and sage computes what it does at the full and the smallest arena.
#[test]
fn synth_gpt_oss_20b_has_real_shapes_and_runs_as_llama_cpp() {
    let _big = big_test();
    use sage::synth::{synth, SynthOptions};
    let dir = tmp();
    let (out, gguf) = (dir.path().join("m"), dir.path().join("m.gguf"));
    let o = SynthOptions {
        like: "gpt-oss-20b".into(),
        quant: GgmlType::MXFP4,
        layers: Some(2),
        seed: 0,
        exact: false,
        merged: Some(gguf.clone()),
        force: false,
        cold_quant: None,
    };
    synth(&out, &o, &mut |_, _, _| {}).unwrap();
    let m = sage::model_dir::ModelDir::open(&out).unwrap();
    let c = &m.config;
    assert_eq!((c.n_layer, c.n_embd, c.n_expert, c.n_expert_used, c.n_ff_exp), (2, 2880, 32, 4, 2880));
    assert_eq!((c.n_head, c.n_head_kv, c.head_dim, c.n_swa, c.n_vocab), (64, 8, 64, 128, 201088));
    assert_eq!(c.swa_layers, vec![true, false]);
    let y = c.yarn.unwrap();
    assert_eq!((y.factor, y.n_ctx_orig), (32.0, 4096));
    let l = &m.manifest.layers[0];
    assert!(l.bias && l.types == [GgmlType::MXFP4; 3]);
    // gate + up + down at 17 bytes per 32 weights, then 3 × 2880 f32 biases.
    assert_eq!(l.record_size(), 3 * 2880 * 2880 / 32 * 17 + 3 * 2880 * 4);
    let n_vocab = c.n_vocab as usize;
    let ids: Vec<i32> = (0..8).map(|i| 1 + i * 7919).collect();
    let llama = load_llama(&gguf);
    let want = llama_logits(&llama, &ids);
    drop(llama);
    let ids: Vec<u32> = ids.iter().map(|&i| i as u32).collect();
    for arena in [ArenaSize::All, ArenaSize::Experts(4)] {
        let mut e = Engine::load(&out, exact(arena)).unwrap();
        let got = rows(e.eval(&ids, true).unwrap(), n_vocab);
        let d = max_abs_diff(&got, &want);
        eprintln!("synth gpt-oss-20b mxfp4 {arena:?}: |sage - llama.cpp| {d:e}");
        assert!(d <= LLAMA_TOL, "{arena:?}: {d}");
    }
}

/// MXFP4 experts are stored bit for bit: each record's gate, up and down are the bytes
/// llama.cpp's converter writes for the checkpoint's blocks and scales (computed by the
/// fixture script the way `GptOssModel` repacks them), and so is the merged GGUF's stacked
/// tensor; with no `--quant-experts`, nothing is re-quantized.
#[test]
fn mxfp4_experts_convert_bit_exactly() {
    let dir = tmp();
    let (model_dir, gguf) = converted(dir.path(), "tiny-gptoss-mxfp4", None, None);
    let bytes = std::fs::read(fixtures().join("reference-gptoss-mxfp4.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let m = sage::model_dir::ModelDir::open(&model_dir).unwrap();
    let merged = sage::ggml::Gguf::open(&gguf).unwrap();
    let merged_bytes = std::fs::read(&gguf).unwrap();
    let mut checked = 0;
    for l in &m.manifest.layers {
        assert_eq!(l.types, [GgmlType::MXFP4; 3]);
        let sizes = l.sizes();
        for p in sage::names::Proj::ALL {
            let want = st.tensor(&format!("blk.{}.{}.mxfp4", l.il, p.exps())).unwrap();
            let per_expert = want.data().len() / want.shape()[0];
            assert_eq!(per_expert as u64, sizes[p.index()]);
            let start: u64 = sizes[..p.index()].iter().sum();
            let mut got = Vec::new();
            for (i, &e) in l.ids.iter().enumerate() {
                m.read_expert_part(l.il, e, start..start + sizes[p.index()], &mut got).unwrap();
                assert!(
                    got == want.data()[i * per_expert..(i + 1) * per_expert],
                    "blk.{} {} expert {e}",
                    l.il,
                    p.exps()
                );
                checked += 1;
            }
            // The merged file's stacked tensor: the same bytes, expert after expert.
            let t = merged.find_tensor(&p.stacked(l.il)).map(|i| merged.tensor(i)).unwrap();
            assert_eq!(t.ty, Some(GgmlType::MXFP4));
            let at = (merged.data_offset() + t.offset) as usize;
            assert!(merged_bytes[at..at + want.data().len()] == *want.data(), "merged {}", p.stacked(l.il));
        }
    }
    assert_eq!(checked, 4 * 8 * 3);
}

/// A llama.cpp GGUF of gpt-oss (the merged file: MXFP4 experts, stacked expert biases) as
/// input gives the same shards, records with biases included, and merges back byte for byte.
#[test]
fn gguf_input_gives_the_same_shards() {
    let dir = tmp();
    let (first, a) = converted(dir.path(), "tiny-gptoss-mxfp4", None, None);
    let second = dir.path().join("second");
    convert(&a, &second, &ConvertOptions::default()).unwrap();
    let m = sage::model_dir::ModelDir::open(&second).unwrap();
    assert_eq!(m.config, sage::model_dir::ModelDir::open(&first).unwrap().config, "hyperparameters");
    for l in &m.manifest.layers {
        assert!(l.bias);
        let read = |d: &Path| {
            let mut b = std::fs::read(d.join(&l.file)).unwrap();
            b[32..64].fill(0); // the conversion id
            b
        };
        assert!(read(&first) == read(&second), "{} differs", l.file);
    }
    let b = dir.path().join("b.gguf");
    merge(&second, &b, false).unwrap();
    assert!(std::fs::read(&a).unwrap() == std::fs::read(&b).unwrap(), "merged again, byte for byte");
}
