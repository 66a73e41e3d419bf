//! `sage eval`, `sage profile`, calibrated pools and usage.json, on the bundled trained model
//! (models/sage-moe-16m, made by scripts/train_model.py).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use sage::ggml::GgmlType;
use sage::merge::merge;
use sage::model_dir::ModelDir;
use sage::usage::Usage;

use crate::util::*;

/// `sage eval` against the perplexity of llama.cpp's logits: relative tolerance from the issue.
const PPL_REL_TOL: f64 = 0.005;
/// Window for these tests: within util::llama_context's 256 tokens.
const WINDOW: usize = 128;

fn sage(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sage")).args(args).output().unwrap()
}

fn sage_convert(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sage-convert")).args(args).output().unwrap()
}

fn ok(o: Output) -> String {
    assert!(o.status.success(), "failed: {}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout).unwrap()
}

fn err(o: Output) -> String {
    assert!(!o.status.success(), "should have failed: {}", String::from_utf8_lossy(&o.stdout));
    String::from_utf8(o.stderr).unwrap()
}

/// The first `chars` characters of the bundled model's held-out text, in `dir`.
fn heldout(dir: &Path, chars: usize) -> PathBuf {
    heldout_of(&bundled(), dir, chars)
}

fn heldout_of(model: &Path, dir: &Path, chars: usize) -> PathBuf {
    let text = std::fs::read_to_string(model.join("heldout.txt")).unwrap();
    let p = dir.join("heldout-short.txt");
    std::fs::write(&p, text.chars().take(chars).collect::<String>()).unwrap();
    p
}

fn convert_bundled(dir: &Path, ty: GgmlType) -> PathBuf {
    convert_model(&bundled(), dir, ty)
}

fn convert_model(model: &Path, dir: &Path, ty: GgmlType) -> PathBuf {
    let out = dir.join(format!("{}-{ty}", model.file_name().unwrap().to_string_lossy()));
    sage::convert::convert(model, &out, &opts(Some(ty))).unwrap();
    out
}

/// `sage eval` on a bundled model's held-out text equals llama-perplexity's computation on the
/// merged GGUF within PPL_REL_TOL, with every expert resident and with a small arena.
fn eval_matches_llama_cpp(model: &Path, small_arena: &str) {
    let dir = tmp();
    let text = heldout_of(model, dir.path(), 3000);
    let model_dir = convert_model(model, dir.path(), GgmlType::Q8_0);
    let gguf = dir.path().join("bundled.gguf");
    merge(&model_dir, &gguf, false).unwrap();
    let ids = llama_tokenize(&load_llama(&gguf), &std::fs::read_to_string(&text).unwrap());
    assert!(ids.len() >= 4 * WINDOW, "the test text is too short: {} tokens", ids.len());
    let want = llama_cpp_ppl(&gguf, &ids, WINDOW, None);

    let w = WINDOW.to_string();
    for arena in [None, Some(small_arena)] {
        let mut args =
            vec!["eval", model_dir.to_str().unwrap(), "--text", text.to_str().unwrap(), "--ctx", &w, "--json"];
        if let Some(a) = arena {
            args.extend(["--arena-experts", a]);
        }
        let out: serde_json::Value = serde_json::from_str(ok(sage(&args)).trim()).unwrap();
        let got = out["perplexity"]["ppl"].as_f64().unwrap();
        let rel = (got - want).abs() / want;
        eprintln!("arena {arena:?}: sage eval {got:.4}, llama.cpp {want:.4}, relative difference {rel:e}");
        assert!(rel < PPL_REL_TOL, "sage {got} vs llama.cpp {want}");
        assert_eq!(out["perplexity"]["windows"].as_u64().unwrap() as usize, ids.len() / WINDOW);
        assert_eq!(
            out["perplexity"]["tokens_scored"].as_u64().unwrap() as usize,
            ids.len() / WINDOW * (WINDOW / 2 - 1)
        );
    }
    // A trained model on its own held-out text: far better than chance (ppl = vocabulary size).
    assert!(want < 200.0, "held-out perplexity {want}");
}

#[test]
fn eval_matches_llama_cpp_perplexity() {
    eval_matches_llama_cpp(&bundled(), "4");
}

/// The 128-expert top-8 model (Qwen3-30B-A3B's routing shape); the small arena is one
/// token's experts in every layer.
#[test]
fn eval_of_the_128_expert_model_matches_llama_cpp_perplexity() {
    eval_matches_llama_cpp(&bundled128(), "32");
}

#[test]
fn profile_counts_and_calibrated_pool() {
    let dir = tmp();
    let text = heldout(dir.path(), 4000);
    let model_dir = convert_bundled(dir.path(), GgmlType::Q8_0);
    let usage_path = dir.path().join("usage.json");
    let w = WINDOW.to_string();
    let (md, t, u) = (model_dir.to_str().unwrap(), text.to_str().unwrap(), usage_path.to_str().unwrap());
    let printed = ok(sage(&["profile", md, "--text", t, "-o", u, "--ctx", &w]));
    assert!(printed.contains("simulated arena (decode order)") && printed.contains("25% of experts"), "{printed}");

    let usage = Usage::load(&usage_path).unwrap();
    let cfg = ModelDir::open(&model_dir).unwrap().config;
    let n_tokens = tokenizers_ids(&bundled().join("tokenizer.json"), &std::fs::read_to_string(&text).unwrap()).len();
    assert_eq!(usage.tokens as usize, n_tokens / WINDOW * WINDOW);
    let total: u64 = usage.layers.iter().flat_map(|l| l.counts.iter()).sum();
    assert_eq!(total, usage.tokens * cfg.n_layer as u64 * cfg.n_expert_used as u64);
    for l in &usage.layers {
        assert_eq!(l.counts.iter().sum::<u64>(), usage.tokens * cfg.n_expert_used as u64);
        // Each token's experts are distinct: an expert co-activates with k-1 others per use.
        let co: u64 = l.coactivation[3].iter().sum();
        assert_eq!(co, l.counts[3] * (cfg.n_expert_used as u64 - 1));
    }

    // --pool usage.json --keep 6: exactly each layer's 6 most used.
    let keep = 6;
    let pooled = dir.path().join("pooled");
    ok(sage_convert(&[
        bundled().to_str().unwrap(),
        "-o",
        pooled.to_str().unwrap(),
        "--quant",
        "q8_0",
        "--pool",
        u,
        "--keep",
        "6",
    ]));
    let m = ModelDir::open(&pooled).unwrap();
    for (l, layer) in usage.layers.iter().zip(&m.manifest.layers) {
        assert_eq!(layer.ids.len(), keep);
        let min_kept = layer.ids.iter().map(|&e| l.counts[e as usize]).min().unwrap();
        let max_dropped =
            (0..cfg.n_expert).filter(|e| !layer.ids.contains(e)).map(|e| l.counts[e as usize]).max().unwrap();
        assert!(min_kept >= max_dropped, "layer {}: kept {:?} of counts {:?}", l.il, layer.ids, l.counts);
    }
    // The pooled model runs, and routes only within its pool.
    let pooled_usage = dir.path().join("pooled.json");
    ok(sage(&["profile", pooled.to_str().unwrap(), "--text", t, "-o", pooled_usage.to_str().unwrap(), "--ctx", &w]));
    let pu = Usage::load(&pooled_usage).unwrap();
    for (l, layer) in pu.layers.iter().zip(&m.manifest.layers) {
        for (e, &c) in l.counts.iter().enumerate() {
            assert!(c == 0 || layer.ids.contains(&(e as u32)), "layer {}: expert {e} outside the pool used", l.il);
        }
    }

    // Warm start from the profile: same output, fewer misses.
    let run = |warm: bool| {
        let mut args =
            vec!["run", md, "-p", "And God said", "--temp", "0", "-n", "16", "--arena-experts", "16", "--json"];
        if warm {
            args.extend(["--warm", u]);
        }
        let out = ok(sage(&args));
        let stats: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
        let text: String = out.lines().filter(|l| l.starts_with("{\"id\"")).collect();
        (text, stats["stats"]["expert_misses"].as_u64().unwrap())
    };
    let (cold_text, cold_misses) = run(false);
    let (warm_text, warm_misses) = run(true);
    assert_eq!(cold_text, warm_text);
    assert!(warm_misses < cold_misses, "warm {warm_misses} vs cold {cold_misses} misses");
}

#[test]
fn damaged_usage_json_is_a_clear_error() {
    let dir = tmp();
    let model_dir = convert_bundled(dir.path(), GgmlType::Q8_0);
    let cfg = ModelDir::open(&model_dir).unwrap().config;
    let mut trace =
        sage::engine::trace::RouteTrace::new(cfg.n_layer as usize, cfg.n_expert as usize, cfg.n_expert_used as usize);
    for c in trace.choices.iter_mut() {
        c.extend([0, 1, 2, 3, 4, 5, 6, 7]);
    }
    let good = serde_json::to_value(trace.usage("test")).unwrap();
    let cases: Vec<(&str, String, &str)> = vec![
        ("not json", "{\"format\": \"sage-usage\", ".into(), "not a sage usage file"),
        ("empty", String::new(), "not a sage usage file"),
        ("other format", good.to_string().replace("sage-usage", "other"), "format is 'other'"),
        ("negative count", good.to_string().replacen("\"counts\":[1,", "\"counts\":[-1,", 1), "not a sage usage file"),
        ("wrong sum", good.to_string().replacen("\"counts\":[1,", "\"counts\":[2,", 1), "counts sum to 9"),
        (
            "missing layer",
            {
                let mut v = good.clone();
                v["layers"].as_array_mut().unwrap().pop();
                v.to_string()
            },
            "layers listed",
        ),
        (
            "short counts",
            {
                let mut v = good.clone();
                v["layers"][0]["counts"].as_array_mut().unwrap().pop();
                v.to_string()
            },
            "counts, expected one per expert",
        ),
        (
            "other model",
            {
                let mut v = good.clone();
                v["n_expert"] = 32.into();
                for l in v["layers"].as_array_mut().unwrap() {
                    l["counts"].as_array_mut().unwrap().extend(vec![serde_json::Value::from(0); 16]);
                    l["coactivation"] = serde_json::json!([]);
                }
                v.to_string()
            },
            "measured on a model of 4 layers x 32 experts; this one has 4 x 16",
        ),
    ];
    for (name, body, want) in cases {
        let u = dir.path().join(format!("{}.json", name.replace(' ', "-")));
        std::fs::write(&u, body).unwrap();
        let out = dir.path().join(format!("out-{}", name.replace(' ', "-")));
        let e = err(sage_convert(&[
            bundled().to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            "--pool",
            u.to_str().unwrap(),
            "--keep",
            "4",
        ]));
        assert!(e.contains(want) && e.contains(u.file_name().unwrap().to_str().unwrap()), "{name}: {e}");
        assert!(!out.exists(), "{name}: a failed conversion wrote {}", out.display());
        let e = err(sage(&["run", model_dir.to_str().unwrap(), "-p", "x", "--warm", u.to_str().unwrap()]));
        assert!(e.contains(want), "{name} (run --warm): {e}");
        assert!(!e.contains("panicked"), "{name}: {e}");
    }
}
