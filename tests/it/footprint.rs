//! `sage footprint`: figures of the published Qwen3-30B-A3B and Qwen3-Omni-30B-A3B configs
//! against arithmetic written out here, computed bytes against the bytes of real conversions,
//! and the command line.

use std::path::Path;
use std::process::Command;

use sage::convert::ConvertOptions;
use sage::footprint::{footprint, Footprint, FootprintOptions, QuantFootprint};
use sage::ggml::GgmlType;
use sage::merge::merge;

use crate::util::{configs, convert_into, opts, plain, tmp};

/// How far a figure quoted in round numbers (3.08 GB, 2.65 MB) may lie from the exact one.
const TARGET_TOLERANCE: f64 = 0.01;
/// The quoted base sizes assume the router quantized like the matrices; sage-convert keeps it
/// f32 (as llama.cpp does). With that one difference undone they must be this close.
const ROUTER_QUANTIZED_TOLERANCE: f64 = 0.005;

const GB: f64 = 1e9;
const MB: f64 = 1e6;

/// Bytes of `n` weights in bf16 and q4_K (144 bytes per block of 256), as llama.cpp defines them.
fn bf16(n: u64) -> u64 {
    2 * n
}
fn q4_k(n: u64) -> u64 {
    assert_eq!(n % 256, 0, "{n} weights are not whole q4_K blocks");
    n / 256 * 144
}
fn f32(n: u64) -> u64 {
    4 * n
}

fn near(what: &str, got: u64, target: f64, tol: f64) {
    let rel = (got as f64 - target).abs() / target;
    assert!(
        rel <= tol,
        "{what}: {got} bytes is {:.2}% from the target {target}, more than {:.2}%",
        100.0 * rel,
        100.0 * tol
    );
}

fn quant<'a>(f: &'a Footprint, name: &str) -> &'a QuantFootprint {
    f.quants.iter().find(|q| q.quant == name).unwrap_or_else(|| panic!("no {name} row"))
}

/// The hyperparameters straight from the JSON (not through sage's reader).
struct Hf {
    n_embd: u64,
    n_layer: u64,
    n_head: u64,
    n_head_kv: u64,
    head_dim: u64,
    n_expert: u64,
    n_expert_used: u64,
    n_ff_exp: u64,
    n_vocab: u64,
}

fn hf(text_config: &serde_json::Value) -> Hf {
    let n = |k: &str| text_config[k].as_u64().unwrap_or_else(|| panic!("{k}"));
    assert!(!text_config["tie_word_embeddings"].as_bool().unwrap_or(false), "these models do not tie embeddings");
    Hf {
        n_embd: n("hidden_size"),
        n_layer: n("num_hidden_layers"),
        n_head: n("num_attention_heads"),
        n_head_kv: n("num_key_value_heads"),
        head_dim: n("head_dim"),
        n_expert: n("num_experts"),
        n_expert_used: n("num_experts_per_tok"),
        n_ff_exp: n("moe_intermediate_size"),
        n_vocab: n("vocab_size"),
    }
}

/// Expected bytes, by hand: matrices at `w` bytes per weight, norms and the router f32.
struct Expected {
    base: u64,
    router: u64,
    expert: u64,
    experts: u64,
    active: u64,
}

fn expected(c: &Hf, w: fn(u64) -> u64) -> Expected {
    let (e, q, kv) = (c.n_embd, c.n_head * c.head_dim, c.n_head_kv * c.head_dim);
    let embeddings = 2 * w(c.n_vocab * e); // token_embd and output (not tied)
    let attention = w(e * q) + 2 * w(e * kv) + w(q * e); // attn_q, attn_k, attn_v, attn_output
    let norms = f32(e + c.head_dim + c.head_dim + e); // attn_norm, q_norm, k_norm, ffn_norm
    let router = f32(e * c.n_expert); // ffn_gate_inp
    let base = embeddings + c.n_layer * (attention + norms + router) + f32(e); // + output_norm
                                                                               // gate and up are n_embd x n_ff_exp, down n_ff_exp x n_embd.
    let expert = 3 * w(e * c.n_ff_exp);
    Expected {
        base,
        router: c.n_layer * router,
        expert,
        experts: c.n_layer * c.n_expert * expert,
        active: c.n_layer * c.n_expert_used * expert,
    }
}

fn check_exact(f: &Footprint, c: &Hf, name: &str, w: fn(u64) -> u64) -> Expected {
    let x = expected(c, w);
    let q = quant(f, name);
    assert_eq!(q.base_bytes, x.base, "{name} base");
    assert_eq!(q.expert_bytes, x.expert, "{name} one expert");
    assert_eq!(q.expert_slot_bytes, x.expert.next_multiple_of(4096), "{name} slot");
    assert_eq!(q.experts_bytes, x.experts, "{name} experts");
    assert_eq!(q.active_bytes, x.active, "{name} active experts");
    assert_eq!(q.shard_bytes, c.n_layer * (4096 + c.n_expert * q.expert_slot_bytes), "{name} shards");
    assert!(q.fallbacks.is_empty(), "{name}: {:?}", q.fallbacks);
    // Resident at 25..100%: base plus whole slots, and up to a page before them so that they
    // start 4 KiB-aligned (the arena as `Engine::load` allocates it on the CPU).
    let total = c.n_layer * c.n_expert;
    for (r, share) in q.resident.iter().zip([0.25, 0.5, 0.75, 1.0]) {
        let slots = (total as f64 * share) as u64;
        let want = x.base + 4096 + slots * q.expert_slot_bytes;
        assert_eq!((r.slots, r.total_bytes), (slots, want), "{name} {}", r.arena);
    }
    x
}

#[test]
fn footprint_qwen3_30b_a3b_matches_published_figures() {
    let path = configs().join("qwen3-30b-a3b.config.json");
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let c = hf(&json);
    let f = footprint(&path, &FootprintOptions::default()).unwrap();
    assert_eq!((f.n_experts, f.n_experts_active), (48 * 128, 48 * 8));
    assert_eq!(f.quants.len(), 10);

    let b = check_exact(&f, &c, "bf16", bf16);
    let q = check_exact(&f, &c, "q4_k", q4_k);
    assert_eq!(b.base, 3_107_774_464);
    assert_eq!(q.base, 910_843_904);
    assert_eq!(q.expert, 2_654_208);

    // The quoted figures.
    near("experts bf16", b.experts, 58.0 * GB, TARGET_TOLERANCE);
    near("experts q4_k", q.experts, 16.3 * GB, TARGET_TOLERANCE);
    near("one expert q4_k", q.expert, 2.65 * MB, TARGET_TOLERANCE);
    near("base bf16", b.base, 3.08 * GB, TARGET_TOLERANCE);
    // Base q4_k is 0.911 GB, 4.7% over the quoted 0.87 GB: the router (48 x 2048 x 128) stays
    // f32 in sage-convert. Quantized like the matrices, it would give the quoted figures.
    let router_weights = 48 * 2048 * 128;
    assert_eq!(q.router, f32(router_weights));
    assert!((q.base as f64 - 0.87 * GB).abs() / (0.87 * GB) > TARGET_TOLERANCE);
    near("base q4_k, router in q4_k", q.base - q.router + q4_k(router_weights), 0.87 * GB, ROUTER_QUANTIZED_TOLERANCE);
    near("base bf16, router in bf16", b.base - b.router + bf16(router_weights), 3.08 * GB, ROUTER_QUANTIZED_TOLERANCE);

    // Every type's expert fits its blocks here (2048 and 768 are multiples of 256).
    for q in &f.quants {
        assert!(q.fallbacks.is_empty(), "{}: {:?}", q.quant, q.fallbacks);
        assert_eq!(q.expert_types[0], q.expert_types[2], "{}", q.quant);
    }
}

#[test]
fn footprint_qwen3_omni_thinker() {
    let path = configs().join("qwen3-omni-30b-a3b-instruct.config.json");
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let text = &json["thinker_config"]["text_config"];
    let c = hf(text);
    let f = footprint(&path, &FootprintOptions::default()).unwrap();
    assert_eq!(f.config.n_vocab, 152064);
    let b = check_exact(&f, &c, "bf16", bf16);
    let q = check_exact(&f, &c, "q4_k", q4_k);
    // Written out: n_layer * n_expert * 3 * n_embd * n_ff_exp * bytes per weight.
    let expert_weights = c.n_layer * c.n_expert * 3 * c.n_embd * c.n_ff_exp;
    assert_eq!(b.experts, expert_weights * 2);
    assert_eq!(q.experts, expert_weights / 256 * 144);
    // The same experts as Qwen3-30B-A3B; the base differs by 128 more vocabulary rows, twice.
    let extra_rows = 2 * (152064 - 151936) * 2048;
    assert_eq!(b.base, 3_107_774_464 + bf16(extra_rows));
    assert_eq!(q.base, 910_843_904 + q4_k(extra_rows));
    near("omni experts bf16", b.experts, 58.0 * GB, TARGET_TOLERANCE);
    near("omni experts q4_k", q.experts, 16.3 * GB, TARGET_TOLERANCE);
}

/// Computed against measured bytes of a model directory converted at `ty`.
fn check_converted(ty: GgmlType, name: &str) {
    let dir = tmp();
    let (out, report) = convert_into(&plain(), dir.path(), &opts(Some(ty)));
    let f = footprint(&out, &FootprintOptions::default()).unwrap();
    assert_eq!(f.kind, "model directory");
    let m = f.measured.as_ref().expect("a model directory is measured");
    assert!(m.agree, "{name}: {f}");
    assert!(m.notes.is_empty(), "{name}: {:?}", m.notes);
    assert_eq!((m.base_quant.as_deref(), m.expert_quant.as_deref()), (Some(name), Some(name)));
    // Measured is what the converter wrote and what the files hold.
    assert_eq!(m.base_bytes, report.base_bytes);
    assert_eq!(m.experts_bytes, report.expert_bytes);
    let shards: u64 =
        (0..2).map(|il| std::fs::metadata(out.join(format!("experts/blk.{il:03}.bin"))).unwrap().len()).sum();
    assert_eq!(m.shard_file_bytes, Some(shards));
    // And the row for that type, computed from the hyperparameters alone, is exactly it.
    let q = quant(&f, name);
    assert_eq!(q.base_bytes, m.base_bytes, "{name} base");
    assert_eq!(q.experts_bytes, m.experts_bytes, "{name} experts");
    assert_eq!(q.shard_bytes, shards, "{name} shards");
    assert_eq!(q.expert_bytes, m.expert_bytes, "{name} one expert");
    // The checkpoint's own config.json gives the same row.
    let from_config = footprint(&plain().join("config.json"), &FootprintOptions::default()).unwrap();
    assert_eq!(quant(&from_config, name), q);
    // The GGUF llama.cpp loads (experts stacked, unpadded) agrees too.
    let gguf = dir.path().join("merged.gguf");
    merge(&out, &gguf, false).unwrap();
    let g = footprint(&gguf, &FootprintOptions::default()).unwrap();
    let gm = g.measured.as_ref().unwrap();
    assert_eq!(g.kind, "gguf");
    assert!(gm.agree, "{name}: {g}");
    assert_eq!((gm.base_bytes, gm.experts_bytes, gm.n_experts), (m.base_bytes, m.experts_bytes, 16));
    assert_eq!(quant(&g, name), q);
}

#[test]
fn footprint_of_tiny_q8_0_model_equals_its_files() {
    check_converted(GgmlType::Q8_0, "q8_0");
}

#[test]
fn footprint_of_tiny_q4_k_model_equals_its_files() {
    check_converted(GgmlType::Q4_K, "q4_k");
}

#[test]
fn footprint_of_mixed_types_and_a_pool() {
    let dir = tmp();
    let o = ConvertOptions {
        quant_base: Some(GgmlType::Q6_K),
        quant_experts: Some(GgmlType::Q4_K),
        experts: Some(vec![1, 3, 5, 6]),
        ..Default::default()
    };
    let (out, report) = convert_into(&plain(), dir.path(), &o);
    let f = footprint(&out, &FootprintOptions::default()).unwrap();
    let m = f.measured.as_ref().unwrap();
    assert!(m.agree, "{f}");
    assert_eq!((m.base_quant.as_deref(), m.expert_quant.as_deref()), (Some("q6_k"), Some("q4_k")));
    assert_eq!((m.base_bytes, m.experts_bytes, m.n_experts), (report.base_bytes, report.expert_bytes, 8));
    // The directory holds 4 experts a layer: that is what its arena can hold.
    assert_eq!(f.n_experts, 8);
    assert_eq!(quant(&f, "q4_k").experts_bytes, m.experts_bytes);
    assert_eq!(quant(&f, "q6_k").base_bytes, m.base_bytes);
}

fn sage(args: &[&str]) -> (bool, String, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_sage")).args(args).output().unwrap();
    let (out, err) = (String::from_utf8_lossy(&o.stdout).into_owned(), String::from_utf8_lossy(&o.stderr).into_owned());
    assert!(!err.contains("panicked"), "sage {args:?} panicked: {err}");
    (o.status.success(), out, err)
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

#[test]
fn footprint_cli_prints_the_table_and_plots() {
    let cfg = configs().join("qwen3-30b-a3b.config.json");
    let dir = tmp();
    let svg = dir.path().join("fp.svg");
    let (ok, out, err) = sage(&["footprint", p(&cfg), "--arena", "2GiB", "--arena-experts", "1000", "--plot", p(&svg)]);
    assert!(ok, "{err}");
    for want in [
        "quant",
        "bf16",
        "q4_k",
        "q2_k",
        "2.53 MiB",
        "16.31 GB",
        "3.11 GB",
        "910.84 MB",
        "25% (1536 slots)",
        "2.00 GiB",
    ] {
        assert!(out.contains(want), "no '{want}' in:\n{out}");
    }
    let text = std::fs::read_to_string(&svg).unwrap();
    assert!(text.len() > 1000 && text.contains("<svg") && text.contains("q4_k"), "{}", &text[..text.len().min(500)]);

    let (ok, out, err) = sage(&["footprint", p(&cfg), "--quant", "q4_k,bf16", "--arena", "50%", "--json"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["quants"].as_array().unwrap().len(), 2);
    assert_eq!(v["quants"][0]["quant"], "q4_k");
    assert_eq!(v["quants"][0]["expert_bytes"], 2_654_208);
    assert_eq!(v["quants"][1]["base_bytes"], 3_107_774_464u64);
    assert_eq!(v["quants"][0]["resident"].as_array().unwrap().len(), 5);

    // A model directory shows its measured bytes.
    let (m, _) = convert_into(&plain(), dir.path(), &opts(Some(GgmlType::Q8_0)));
    let (ok, out, err) = sage(&["footprint", p(&m), "--quant", "q8_0"]);
    assert!(ok, "{err}");
    assert!(out.contains("computed and measured agree exactly"), "{out}");
}

#[test]
fn footprint_cli_refuses_what_is_not_a_model() {
    let dir = tmp();
    let missing = dir.path().join("nothing-here.json");
    let (ok, _, err) = sage(&["footprint", p(&missing)]);
    assert!(!ok && err.contains("nothing-here.json") && err.contains("does not exist"), "{err}");

    let text = dir.path().join("notes.txt");
    std::fs::write(&text, "just some text\n").unwrap();
    let (ok, _, err) = sage(&["footprint", p(&text)]);
    assert!(!ok && err.contains("expected a Hugging Face config.json, a sage model directory"), "{err}");

    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let (ok, _, err) = sage(&["footprint", p(&empty)]);
    assert!(!ok && err.contains("a directory with neither base.gguf nor config.json"), "{err}");

    let llama = dir.path().join("config.json");
    std::fs::write(&llama, r#"{"architectures": ["LlamaForCausalLM"], "hidden_size": 4096}"#).unwrap();
    let (ok, _, err) = sage(&["footprint", p(&llama)]);
    assert!(!ok && err.contains("unsupported architecture 'LlamaForCausalLM'"), "{err}");

    let broken = dir.path().join("broken.json");
    std::fs::write(&broken, "{\"architectures\": [").unwrap();
    let (ok, _, err) = sage(&["footprint", p(&broken)]);
    assert!(!ok && err.contains("broken.json"), "{err}");

    let mut g = sage::ggml::Gguf::new_empty();
    g.set("general.architecture", &sage::ggml::GgufValue::Str("llama".into())).unwrap();
    let gguf = dir.path().join("llama.gguf");
    std::fs::write(&gguf, g.meta_bytes()).unwrap();
    let (ok, _, err) = sage(&["footprint", p(&gguf)]);
    assert!(!ok && err.contains("unsupported architecture 'llama'"), "{err}");

    let cfg = configs().join("qwen3-30b-a3b.config.json");
    let (ok, _, err) = sage(&["footprint", p(&cfg), "--quant", "q4_k_m"]);
    assert!(!ok && err.contains("unknown quant type 'q4_k_m'"), "{err}");
    let (ok, _, err) = sage(&["footprint", p(&cfg), "--arena", "2 parsecs"]);
    assert!(!ok && err.contains("unknown size unit"), "{err}");
}

/// Bytes of `n` weights in q5_0 (22 bytes per block of 32), the type q4_K falls back to for
/// rows that are not whole blocks of 256.
fn q5_0(n: u64) -> u64 {
    assert_eq!(n % 32, 0);
    n / 32 * 22
}

/// Mixtral-8x7B, OLMoE-1B-7B and Qwen1.5-MoE-A2.7B (configs/): base, one expert and all experts
/// at bf16 and q4_k against sizes written out here from each family's tensors, and the
/// published parameter counts.
#[test]
fn footprint_of_the_other_families_matches_their_tensors() {
    struct Family {
        file: &'static str,
        /// Base bytes at `w` per matrix weight: written out per family below.
        base: fn(fn(u64) -> u64) -> u64,
        /// One expert's bytes at bf16 and at q4_k.
        expert: [u64; 2],
        n_experts: u64,
        /// Published parameter counts: total and active per token.
        params: (f64, f64),
    }
    let families = [
        Family {
            // 32 layers, n_embd 4096, 32 query / 8 KV heads of 128, 8 experts of 14336, vocab 32000.
            file: "mixtral-8x7b.config.json",
            base: |w| {
                let layer = w(4096 * 4096) + 2 * w(4096 * 1024) + w(4096 * 4096) // q, k, v, o
                    + f32(2 * 4096) // attn_norm, ffn_norm
                    + f32(4096 * 8); // router
                2 * w(32000 * 4096) + 32 * layer + f32(4096)
            },
            expert: [bf16(3 * 4096 * 14336), q4_k(3 * 4096 * 14336)],
            n_experts: 32 * 8,
            params: (46.7e9, 12.9e9),
        },
        Family {
            // 16 layers, n_embd 2048, 16 heads of 128 (MHA) with q/k norms over 2048, 64 experts
            // of 1024, vocab 50304.
            file: "olmoe-1b-7b.config.json",
            base: |w| {
                let layer = 4 * w(2048 * 2048) + f32(4 * 2048) + f32(2048 * 64);
                2 * w(50304 * 2048) + 16 * layer + f32(2048)
            },
            expert: [bf16(3 * 2048 * 1024), q4_k(3 * 2048 * 1024)],
            n_experts: 16 * 64,
            params: (6.9e9, 1.3e9),
        },
        Family {
            // 24 layers, n_embd 2048, 16 heads of 128 (MHA) with q/k/v biases, 60 experts of 1408
            // (not whole q4_K blocks: down falls back to q5_0), a shared expert of 5632 with a
            // 1-row gate, vocab 151936.
            file: "qwen1.5-moe-a2.7b.config.json",
            base: |w| {
                let layer = 4 * w(2048 * 2048) + f32(3 * 2048) // q, k, v, o; q/k/v biases
                    + f32(2 * 2048) + f32(2048 * 60) // norms, router
                    + f32(2048) + 3 * w(2048 * 5632); // shared expert's gate and FFN
                2 * w(151936 * 2048) + 24 * layer + f32(2048)
            },
            expert: [bf16(3 * 2048 * 1408), q4_k(2 * 2048 * 1408) + q5_0(1408 * 2048)],
            n_experts: 24 * 60,
            params: (14.3e9, 2.7e9),
        },
    ];
    for fam in families {
        let f = footprint(&configs().join(fam.file), &FootprintOptions::default()).unwrap();
        let (b, q) = (quant(&f, "bf16"), quant(&f, "q4_k"));
        assert_eq!(f.n_experts, fam.n_experts, "{}", fam.file);
        assert_eq!((b.base_bytes, q.base_bytes), ((fam.base)(bf16), (fam.base)(q4_k)), "{} base", fam.file);
        assert_eq!([b.expert_bytes, q.expert_bytes], fam.expert, "{} one expert", fam.file);
        assert_eq!(b.experts_bytes, fam.n_experts * fam.expert[0], "{} experts", fam.file);
        // Parameters: bf16 bytes / 2, with the f32 vectors and routers counted once each.
        let params = (b.base_bytes + b.experts_bytes) as f64 / 2.0;
        let active = (b.base_bytes + b.active_bytes) as f64 / 2.0;
        // Published counts are rounded to 2-3 digits; the f32 routers and norms count double here.
        near(&format!("{} parameters", fam.file), params as u64, fam.params.0, 0.02);
        near(&format!("{} active parameters", fam.file), active as u64, fam.params.1, 0.04);
    }
}

/// The hybrid families' published configs (Qwen3.5-35B-A3B, -122B-A10B, -397B-A17B,
/// Qwen3-Next-80B-A3B): base, one expert and all experts at bf16 and q4_k against sizes written
/// out here from each layer kind's tensors, and the published parameter counts (within 3%:
/// they include Qwen3.5's vision tower and next-token-prediction layer, which sage skips;
/// measured 34.68e9, 122.15e9, 396.48e9, 79.73e9).
#[test]
fn footprint_of_the_hybrid_families_matches_their_tensors() {
    // (file, n_layer, n_embd, query heads, experts, used, FFN, key heads, value heads, vocab,
    //  fused ba (Qwen3-Next), published total and active parameters)
    let models = [
        ("qwen3.5-35b-a3b", 40u64, 2048u64, 16u64, 256u64, 8u64, 512u64, 16u64, 32u64, 248320u64, false, 35e9, 3e9),
        ("qwen3.5-122b-a10b", 48, 3072, 32, 256, 8, 1024, 16, 64, 248320, false, 122e9, 10e9),
        ("qwen3.5-397b-a17b", 60, 4096, 32, 512, 10, 1024, 16, 64, 248320, false, 397e9, 17e9),
        ("qwen3-next-80b-a3b", 48, 2048, 16, 512, 10, 512, 16, 32, 151936, true, 80e9, 3e9),
    ];
    for (name, n_layer, e, nh, n_expert, used, ff, nk, nv, vocab, fused_ba, total, active) in models {
        let (hd, nkv, d) = (256, 2, 128); // attention heads of 256, 2 KV heads; linear heads of 128
        let (kd, vd) = (nk * d, nv * d);
        let base = |w: fn(u64) -> u64| {
            let full = w(e * 2 * hd * nh) + 2 * w(e * hd * nkv) + w(hd * nh * e) // q (+ gate), k, v, o
                + f32(2 * hd); // q_norm, k_norm
            let ba = if fused_ba { w(e * 2 * nv) } else { 2 * w(e * nv) };
            let linear = w(e * (2 * kd + vd)) + w(e * vd) + ba + w(vd * e) // qkv, z, beta/alpha, out
                + f32(4 * (2 * kd + vd)) // the convolution's kernels, 4 taps
                + f32(2 * nv + d); // dt bias, a, the gated norm
            let every = f32(2 * e) + f32(e * n_expert) // attn_norm, post_attention_norm, router
                + f32(e) + 3 * w(e * ff); // the shared expert's gate and FFN (as wide as an expert)
            2 * w(vocab * e) + n_layer / 4 * full + (n_layer - n_layer / 4) * linear + n_layer * every + f32(e)
        };
        let f = footprint(&configs().join(format!("{name}.config.json")), &FootprintOptions::default()).unwrap();
        let (b, q) = (quant(&f, "bf16"), quant(&f, "q4_k"));
        assert_eq!(f.n_experts, n_layer * n_expert, "{name}");
        assert_eq!((b.base_bytes, q.base_bytes), (base(bf16), base(q4_k)), "{name} base");
        assert_eq!([b.expert_bytes, q.expert_bytes], [bf16(3 * e * ff), q4_k(3 * e * ff)], "{name} one expert");
        assert_eq!(b.experts_bytes, n_layer * n_expert * b.expert_bytes, "{name} experts");
        assert_eq!(b.active_bytes, n_layer * used * b.expert_bytes, "{name} active experts");
        assert!(q.fallbacks.is_empty(), "{name}: {:?}", q.fallbacks);
        let params = (b.base_bytes + b.experts_bytes) as f64 / 2.0;
        let act = (b.base_bytes + b.active_bytes) as f64 / 2.0;
        eprintln!("{name}: {:.2}e9 parameters, {:.2}e9 active", params / 1e9, act / 1e9);
        near(&format!("{name} parameters"), params as u64, total, 0.03);
        // The names round the active count to a whole billion (A3B, A10B, A17B), with or
        // without the embeddings: measured 3.48e9, 9.81e9, 17.48e9, 3.93e9; only a loose check.
        assert!((act - active).abs() / active < 0.35, "{name}: {act} active parameters");
    }
}

/// GLM-4.5 and GLM-4.5-Air's configs: base, one expert and all experts at bf16 against sizes
/// written out here from their tensors (dense first layers in the base, no experts there), and
/// the published parameter counts (within 3%: they include the next-token-prediction layer,
/// which sage skips).
#[test]
fn footprint_of_glm_counts_dense_layers_in_the_base() {
    // (file, n_layer, dense layers, n_embd, dense FFN, expert FFN, experts, used, q/k norms,
    //  published total and active parameters; measured 106.88e9 / 12.83e9, 352.87e9 / 32.93e9)
    let models = [
        ("glm-4.5-air", 46u64, 1u64, 4096u64, 10944u64, 1408u64, 128u64, 8u64, false, 106e9, 12e9),
        ("glm-4.5", 92, 3, 5120, 12288, 1536, 160, 8, true, 355e9, 32e9),
    ];
    for (name, n_layer, dense, e, ff, ffe, n_expert, used, qk_norm, total, active) in models {
        let (hd, nh, nkv, vocab) = (128u64, 96u64, 8u64, 151552u64);
        let w = bf16;
        let attn = w(e * hd * nh) + 2 * w(e * hd * nkv) + f32(hd * nh + 2 * hd * nkv) // q, k, v + biases
            + w(hd * nh * e) + if qk_norm { f32(2 * hd) } else { 0 } + f32(2 * e); // o, q/k norms, 2 norms
        let dense_ffn = 3 * w(e * ff);
        let moe = f32(e * n_expert) + f32(n_expert) + 3 * w(e * ffe); // router, correction bias, shared expert
        let base = 2 * w(vocab * e) + n_layer * attn + dense * dense_ffn + (n_layer - dense) * moe + f32(e);
        let f = footprint(&configs().join(format!("{name}.config.json")), &FootprintOptions::default()).unwrap();
        let b = quant(&f, "bf16");
        assert_eq!(f.n_experts, (n_layer - dense) * n_expert, "{name}");
        assert_eq!(b.base_bytes, base, "{name} base");
        assert_eq!(b.expert_bytes, bf16(3 * e * ffe), "{name} one expert");
        assert_eq!(b.experts_bytes, (n_layer - dense) * n_expert * b.expert_bytes, "{name} experts");
        assert_eq!(b.active_bytes, (n_layer - dense) * used * b.expert_bytes, "{name} active experts");
        let params = (b.base_bytes + b.experts_bytes) as f64 / 2.0;
        let act = (b.base_bytes + b.active_bytes) as f64 / 2.0;
        eprintln!("{name}: {:.2}e9 parameters, {:.2}e9 active", params / 1e9, act / 1e9);
        near(&format!("{name} parameters"), params as u64, total, 0.03);
        // Active: without the token embedding (a lookup; the names count about that way).
        let act = act - (vocab * e) as f64;
        near(&format!("{name} active parameters"), act as u64, active, 0.08);
    }
}

#[test]
fn footprint_of_deepseek_counts_latent_attention_and_its_cache() {
    // (file, n_layer, dense layers, n_embd, dense FFN, expert FFN, experts, used, shared
    //  experts, q_lora_rank (0: plain q), heads, vocab, a correction bias, published total and
    //  active parameters: DeepSeek-V3 671B / 37B without its MTP layer, V2-Lite 15.7B / 2.4B)
    let models = [
        (
            "deepseek-v3",
            61u64,
            3u64,
            7168u64,
            18432u64,
            2048u64,
            256u64,
            8u64,
            1u64,
            1536u64,
            128u64,
            129280u64,
            true,
            671e9,
            37e9,
        ),
        ("deepseek-v2-lite", 27, 1, 2048, 10944, 1408, 64, 6, 2, 0, 16, 102400, false, 15.7e9, 2.4e9),
    ];
    for (name, n_layer, dense, e, ff, ffe, n_expert, used, shared, q_lora, nh, vocab, bias, total, active) in models {
        let (kvr, rope, nope, vd) = (512u64, 64u64, 128u64, 128u64);
        let w = bf16;
        let q = if q_lora > 0 {
            w(e * q_lora) + f32(q_lora) + w(q_lora * nh * (nope + rope))
        } else {
            w(e * nh * (nope + rope))
        };
        // kv_a_mqa, its norm, kv_b_proj split in attn_k_b and attn_v_b, o, 2 norms
        let attn =
            q + w(e * (kvr + rope)) + f32(kvr) + w(nope * kvr * nh) + w(kvr * vd * nh) + w(nh * vd * e) + f32(2 * e);
        let moe = f32(e * n_expert) + if bias { f32(n_expert) } else { 0 } + 3 * w(e * shared * ffe);
        let base = 2 * w(vocab * e) + n_layer * attn + dense * 3 * w(e * ff) + (n_layer - dense) * moe + f32(e);
        let f = footprint(&configs().join(format!("{name}.config.json")), &FootprintOptions::default()).unwrap();
        let b = quant(&f, "bf16");
        assert_eq!(f.n_experts, (n_layer - dense) * n_expert, "{name}");
        assert_eq!(b.base_bytes, base, "{name} base");
        assert_eq!(b.expert_bytes, bf16(3 * e * ffe), "{name} one expert");
        assert_eq!(b.active_bytes, (n_layer - dense) * used * b.expert_bytes, "{name} active experts");
        // llama.cpp's MLA cache: K only, one row of kv_lora_rank + rope values per layer and
        // token (f16), no V (llama_kv_cache: has_v = !is_mla).
        assert_eq!(f.state.kv_bytes_per_token, n_layer * (kvr + rope) * 2, "{name} latent cache per token");
        let params = (b.base_bytes + b.experts_bytes) as f64 / 2.0;
        let act = (b.base_bytes + b.active_bytes) as f64 / 2.0 - (vocab * e) as f64;
        eprintln!(
            "{name}: {:.2}e9 parameters, {:.2}e9 active, {} B latent cache per token",
            params / 1e9,
            act / 1e9,
            f.state.kv_bytes_per_token
        );
        near(&format!("{name} parameters"), params as u64, total, 0.03);
        near(&format!("{name} active parameters"), act as u64, active, 0.08);
    }
}
