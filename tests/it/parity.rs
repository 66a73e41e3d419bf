//! Numbers against references: llama.cpp on `sage-convert merge` output vs the transformers
//! logits stored by scripts/make_fixtures.py, and tokenization by llama.cpp, the tokenizers
//! crate and transformers.

use sage::convert::ConvertOptions;
use sage::ggml::GgmlType;
use sage::merge::merge;

use crate::util::*;

/// Max abs logit difference allowed between llama.cpp (f32 weights, f32 KV, no flash
/// attention) and transformers in f32 (eager attention and experts). Both compute the same
/// math in f32 with different summation orders; measured here: 9e-6 to 2.3e-5.
const LOGIT_TOL: f32 = 1e-3;

#[test]
fn merged_f32_matches_transformers_logits_and_tokens() {
    let dir = tmp();
    let (model_dir, _) = convert_into(&plain(), dir.path(), &opts(Some(GgmlType::F32)));
    let gguf = dir.path().join("merged.gguf");
    merge(&model_dir, &gguf, false).unwrap();
    let model = load_llama(&gguf);
    assert_eq!(model.n_vocab(), 512);
    for p in reference() {
        let llama_ids = llama_tokenize(&model, &p.text);
        let crate_ids = tokenizers_ids(&model_dir.join("tokenizer.json"), &p.text);
        assert_eq!(llama_ids, p.ids, "{}: llama.cpp vs transformers token ids", p.name);
        assert_eq!(crate_ids, p.ids, "{}: tokenizers crate vs transformers token ids", p.name);
        let logits = llama_logits(&model, &p.ids);
        let d = max_abs_diff(&logits, &p.logits);
        eprintln!("{}: {} positions, max |llama.cpp - transformers| = {d:e}", p.name, p.ids.len());
        assert!(d <= LOGIT_TOL, "{}: max abs diff {d} > {LOGIT_TOL}", p.name);
    }
}

#[test]
fn pool_merged_matches_transformers_with_masked_router() {
    // A pool keeps experts 0-3; merged, llama.cpp sees a 4-expert model whose router has only
    // those rows, which is the reference's routing with the other experts' logits at -inf.
    let dir = tmp();
    let pool = reference_pool();
    let o = ConvertOptions { experts: Some(pool.clone()), ..opts(Some(GgmlType::F32)) };
    let (model_dir, r) = convert_into(&plain(), dir.path(), &o);
    assert_eq!(r.n_experts_per_layer, pool.len());
    let gguf = dir.path().join("pool.gguf");
    let m = merge(&model_dir, &gguf, false).unwrap();
    assert_eq!(m.n_expert, pool.len() as u32);
    let model = load_llama(&gguf);
    for p in reference() {
        let logits = llama_logits(&model, &p.ids);
        let d = max_abs_diff(&logits, &p.pool_logits);
        eprintln!("{} (pool {pool:?}): max |llama.cpp - transformers| = {d:e}", p.name);
        assert!(d <= LOGIT_TOL, "{}: max abs diff {d} > {LOGIT_TOL}", p.name);
        // The pool changes the model: the full reference must not match.
        assert!(max_abs_diff(&logits, &p.logits) > 10.0 * LOGIT_TOL, "{}: pool made no difference", p.name);
    }
}

#[test]
fn tokenizer_built_from_gguf_tokenizes_like_llama_cpp() {
    // GGUF in (tokenizer only as tokenizer.ggml.* metadata) -> tokenizer.json out.
    let dir = tmp();
    let (hf_dir, _) = convert_into(&plain(), dir.path(), &opts(Some(GgmlType::Q8_0)));
    let gguf = dir.path().join("q8.gguf");
    merge(&hf_dir, &gguf, false).unwrap();
    let out = dir.path().join("from-gguf");
    sage::convert::convert(&gguf, &out, &ConvertOptions::default()).unwrap();
    let built = out.join("tokenizer.json");
    let model = load_llama(&gguf);
    let mut texts: Vec<String> = reference().into_iter().map(|p| p.text).collect();
    texts.extend(
        [
            "",
            "   leading and trailing   ",
            "tabs\tand\nnew\r\nlines\n\n\n",
            "numbers 1234567890 and 3.14159",
            "emoji \u{1F980} and CJK \u{6F22}\u{5B57} and e\u{301} (NFC)",
            "It's they're we've I'm you'll he'd IT'S",
            "<|im_start|>system\nYou are sage.<|im_end|>\n<|endoftext|>",
            "def f(x):\n\treturn x**2  # square\n",
        ]
        .map(String::from),
    );
    for t in &texts {
        let want = llama_tokenize(&model, t);
        assert_eq!(tokenizers_ids(&built, t), want, "built tokenizer.json vs llama.cpp on {t:?}");
        // Qwen's tokenizer.json normalizes to NFC; llama.cpp does not, so the two agree on
        // text that is already NFC (everything here but the decomposed "e\u{301}").
        if !t.contains('\u{301}') {
            assert_eq!(
                tokenizers_ids(&plain().join("tokenizer.json"), t),
                want,
                "original tokenizer.json vs llama.cpp on {t:?}"
            );
        }
    }
    // Decoding gives the text back.
    let tk = tokenizers::Tokenizer::from_file(&built).unwrap();
    let ids = tk.encode("caf\u{e9} \u{1F980} ok", false).unwrap();
    assert_eq!(tk.decode(ids.get_ids(), false).unwrap(), "caf\u{e9} \u{1F980} ok");
}

/// The merged q8_0, q4_K (and f16) files in llama.cpp against transformers' f32 logits, all
/// positions of the four reference prompts: the RMS and the largest logit difference, and
/// how often the top token agrees. Quantization here is not rounding noise: this tiny random
/// model turns a relative error of its weights into a relative error of its logits (RMS about
/// 1.0) 4 to 8 times larger: f16 activations (relative error 2^-12) move them by 0.001 RMS,
/// q8_0 weights (0.4-0.7% per row, `quant.rs`) by 0.03-0.08, q4_K (5-9%) by 0.36-0.45
/// (measured, 2026-11-30: RMS 0.001, 0.059, 0.41 over all positions; largest 0.0096, 1.05,
/// 2.78; top token 83, 80, 44 of 83). The bounds are about 1.5 times those; a type that falls
/// apart fails them (q2_K: 1.09 RMS, the top token right at 3 of 83 positions).
#[test]
fn merged_quantized_files_stay_near_transformers() {
    // (type, bound on the RMS difference, bound on the largest, least share of top tokens)
    let cases =
        [(GgmlType::F16, 0.0017, 0.015, 1.0), (GgmlType::Q8_0, 0.12, 1.6, 0.9), (GgmlType::Q4_K, 0.7, 4.2, 0.2)];
    let dir = tmp();
    for (ty, rms_bound, max_bound, agree_bound) in cases {
        let (model_dir, _) = convert_into(&plain(), &dir.path().join(ty.name()), &opts(Some(ty)));
        let gguf = dir.path().join(format!("{}.gguf", ty.name()));
        merge(&model_dir, &gguf, false).unwrap();
        let model = load_llama(&gguf);
        let (mut sq, mut n, mut max, mut agree, mut positions) = (0f64, 0usize, 0f32, 0usize, 0usize);
        for p in reference() {
            let logits = llama_logits(&model, &p.ids);
            max = max.max(max_abs_diff(&logits, &p.logits));
            for (a, b) in logits.iter().zip(&p.logits) {
                sq += a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum::<f64>();
                n += a.len();
                agree += usize::from(sage::engine::sampler::argmax(a) == sage::engine::sampler::argmax(b));
                positions += 1;
            }
        }
        let rms = (sq / n as f64).sqrt();
        let share = agree as f64 / positions as f64;
        eprintln!("{}: RMS {rms:.4}, max {max:.4}, top token {agree}/{positions}", ty.name());
        assert!(rms <= rms_bound, "{}: RMS difference {rms} > {rms_bound}", ty.name());
        assert!(max <= max_bound, "{}: largest difference {max} > {max_bound}", ty.name());
        assert!(share >= agree_bound, "{}: top token agrees at {agree} of {positions} positions", ty.name());
    }
}

/// Token ids against transformers' `AutoTokenizer` (recorded by
/// scripts/make_tokenizer_references.py: an independent implementation around the same
/// tokenizer.json), for the Qwen3 fixture and the bundled model, 21 strings each: sage's
/// tokenizer from the model directory, the one sage-convert rebuilds from a GGUF's metadata,
/// and llama.cpp on the merged file give the same ids, and they decode to the recorded text.
/// The Qwen3 reference prompts' stored ids are AutoTokenizer's too.
#[test]
fn token_ids_equal_transformers_auto_tokenizer() {
    let dir = tmp();
    for (name, src) in [("tiny-qwen3moe", plain()), ("sage-moe-16m", bundled())] {
        let refs: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(fixtures().join(format!("tokenize-{name}.json"))).unwrap())
                .unwrap();
        let model_dir = dir.path().join(name);
        sage::convert::convert(&src, &model_dir, &opts(Some(GgmlType::Q8_0))).unwrap();
        let gguf = dir.path().join(format!("{name}.gguf"));
        merge(&model_dir, &gguf, false).unwrap();
        let again = dir.path().join(format!("{name}-from-gguf"));
        sage::convert::convert(&gguf, &again, &ConvertOptions::default()).unwrap();
        let llama = load_llama(&gguf);
        let tks =
            [sage::tokenizer::Tokenizer::load(&model_dir).unwrap(), sage::tokenizer::Tokenizer::load(&again).unwrap()];
        let strings = refs["tokenize"].as_array().unwrap();
        assert_eq!(strings.len(), 21);
        for t in strings {
            let text = t["text"].as_str().unwrap();
            let want: Vec<u32> = t["ids"].as_array().unwrap().iter().map(|i| i.as_u64().unwrap() as u32).collect();
            for (tk, which) in tks.iter().zip(["tokenizer.json", "rebuilt from GGUF"]) {
                assert_eq!(tk.encode_with(text, false).unwrap(), want, "{name} ({which}) on {text:?}");
                assert_eq!(
                    tk.decode(&want).unwrap(),
                    t["decode"].as_str().unwrap(),
                    "{name} ({which}) decoding {text:?}"
                );
            }
            let ll: Vec<u32> = llama_tokenize(&llama, text).iter().map(|&i| i as u32).collect();
            assert_eq!(ll, want, "{name}: llama.cpp on {text:?}");
        }
        if let Some(prompts) = refs.get("prompts") {
            for (p, r) in reference().iter().zip(prompts.as_array().unwrap()) {
                let want: Vec<i32> = r["ids"].as_array().unwrap().iter().map(|i| i.as_i64().unwrap() as i32).collect();
                assert_eq!((p.name.as_str(), &p.ids), (r["name"].as_str().unwrap(), &want), "stored prompt ids");
            }
        }
    }
}
