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
