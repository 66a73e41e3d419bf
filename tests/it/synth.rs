//! `sage-convert synth`: synthetic models with real shapes and random weights.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use sage::arch::{base_tensors, Role};
use sage::config::read_hf_config;
use sage::engine::{ArenaSize, Engine};
use sage::ggml::{dequantize, GgmlType};
use sage::model_dir::{shard_name, ModelDir, BASE, RECORD_ALIGN, TOKENIZER};
use sage::names::*;
use sage::synth::{synth, synth_config, SynthOptions, SynthReport, WEIGHT_STD, WRITE_STD};
use sage::usage::Usage;

use crate::util::*;

fn opts(like: &str, quant: GgmlType, seed: u64) -> SynthOptions {
    SynthOptions {
        like: like.into(),
        quant,
        layers: None,
        seed,
        exact: false,
        merged: None,
        force: false,
        cold_quant: None,
    }
}

fn write(out: &Path, o: &SynthOptions) -> SynthReport {
    synth(out, o, &mut |_, _, _| {}).unwrap_or_else(|e| panic!("synth {}: {e}", o.like))
}

fn sage_convert(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sage-convert")).args(args).output().unwrap()
}

fn sage_run(dir: &Path) -> Output {
    let d = dir.to_str().unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_sage"))
        .args(["run", d, "--prompt", "hi", "-n", "4", "--arena-experts", "64", "--stats"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "sage run {d}: {err}");
    assert!(err.contains("hit rate"), "no stats line: {err}");
    o
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// Every file of a model directory, by relative path.
fn files(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let m = ModelDir::open(dir).unwrap();
    let mut names: Vec<PathBuf> = vec![BASE.into(), TOKENIZER.into()];
    names.extend(m.manifest.layers.iter().map(|l| PathBuf::from(&l.file)));
    names.into_iter().map(|n| (n.clone(), std::fs::read(dir.join(&n)).unwrap())).collect()
}

/// The vocabulary the family-shape tests give their models: the published config with every
/// layer's shape as published and `vocab_size` cut to this (the synthetic tokenizer has 503
/// tokens). The embeddings and output of a 129k- or 248k-token vocabulary are no part of a
/// layer, and quantizing them (ggml's q4_K reference quantizer) was most of these tests'
/// time; `synth_one_layer_of_qwen3_30b_a3b_has_real_shapes_and_sizes` and the budget test keep
/// a published vocabulary.
const CUT_VOCAB: u64 = 4096;

/// `configs/<like>.config.json` with `vocab_size` (at the top or in `text_config`) set to
/// `CUT_VOCAB`, written into `dir`: the path to give `synth` as `like`.
fn cut_vocab(like: &str, dir: &Path) -> String {
    let text = std::fs::read_to_string(configs().join(format!("{like}.config.json"))).unwrap();
    let mut cfg: serde_json::Value = serde_json::from_str(&text).unwrap();
    let cut = |v: Option<&mut serde_json::Value>| {
        let o = v.and_then(|v| v.as_object_mut()).filter(|o| o.contains_key("vocab_size"));
        o.map(|o| o.insert("vocab_size".into(), CUT_VOCAB.into())).is_some()
    };
    let top = cut(Some(&mut cfg));
    let text = cut(cfg.get_mut("text_config"));
    assert!(top || text, "{like}: no vocab_size");
    let d = dir.join(format!("{like}-config"));
    std::fs::create_dir_all(&d).unwrap();
    let p = d.join("config.json");
    std::fs::write(&p, serde_json::to_string(&cfg).unwrap()).unwrap();
    p.to_str().unwrap().to_owned()
}

/// llama.cpp runs the merged file: finite logits over the whole vocabulary.
fn llama_runs(gguf: &Path, n_vocab: i32, n_embd: i32, n_layer: u32) {
    let model = load_llama(gguf);
    assert_eq!((model.n_vocab(), model.n_embd(), model.n_layer()), (n_vocab, n_embd, n_layer));
    let logits = llama_logits(&model, &[1, 2, 3]);
    assert_eq!(logits.len(), 3);
    for row in &logits {
        assert_eq!(row.len(), n_vocab as usize);
        assert!(row.iter().all(|x| x.is_finite()), "llama.cpp logits are not finite");
        let spread =
            row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) - row.iter().fold(f32::INFINITY, |a, &b| a.min(b));
        assert!(spread > 0.0, "all logits equal");
    }
}

#[test]
fn synth_tiny_has_the_shapes_types_and_counts_of_its_config() {
    let dir = tmp();
    let (out, gguf) = (dir.path().join("tiny"), dir.path().join("tiny.gguf"));
    let r = write(&out, &SynthOptions { merged: Some(gguf.clone()), ..opts("tiny", GgmlType::Q4_K, 0) });
    let (_, want) = read_hf_config(&plain().join("config.json")).unwrap();
    let m = ModelDir::open(&out).unwrap();
    assert_eq!(m.config, sage::config::ModelConfig { name: "synth-tiny".into(), ..want.clone() });
    assert_eq!(r.config, m.config);

    // Base: every tensor the config implies, norms and routers f32, matrices q4_K.
    let base = base_tensors(&want);
    assert_eq!(m.base_tensors.len(), base.len());
    for sage::arch::TensorSpec { name, ne, role, .. } in &base {
        let t = m.base_tensors.iter().find(|t| &t.name == name).unwrap_or_else(|| panic!("{name} missing"));
        let ty = if *role == Role::Weight { GgmlType::Q4_K } else { GgmlType::F32 };
        assert_eq!((&t.ne, t.ty), (ne, Some(ty)), "{name}");
        assert_eq!(t.size, ty.tensor_size(ne).unwrap(), "{name}");
    }
    // Experts: all 8 in both layers, gate/up [n_embd, n_ff_exp], down [n_ff_exp, n_embd].
    assert_eq!(m.manifest.layers.len(), want.n_layer as usize);
    for (il, l) in m.manifest.layers.iter().enumerate() {
        assert_eq!(l.file, shard_name(il as u32));
        assert_eq!(l.ids, (0..want.n_expert).collect::<Vec<_>>());
        assert_eq!(l.types, [GgmlType::Q4_K; 3]);
        assert_eq!(l.shapes, [[256, 256]; 3]);
        let len = std::fs::metadata(out.join(&l.file)).unwrap().len();
        assert_eq!(len, RECORD_ALIGN + 8 * l.stride());
    }
    assert_eq!((r.convert.base_bytes, r.convert.expert_bytes), (m.base_bytes(), m.expert_bytes()));
    assert_eq!(r.merged.as_ref().unwrap().bytes, m.base_bytes() + m.expert_bytes());

    // The tokenizer: the tiny fixture's, and it tokenizes.
    assert!(!tokenizers_ids(&out.join(TOKENIZER), "hello world").is_empty());
    // inspect accepts it and names the source.
    let o = sage_convert(&["inspect", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("synthetic tiny (random weights, seed 0"), "{}", text(&o));

    llama_runs(&gguf, 512, 256, 2);
    sage_run(&out);
}

#[test]
fn synth_records_are_finite_distinct_and_scaled() {
    let dir = tmp();
    for exact in [false, true] {
        let out = dir.path().join(format!("exact-{exact}"));
        write(&out, &SynthOptions { exact, ..opts("tiny", GgmlType::Q4_K, 3) });
        let m = ModelDir::open(&out).unwrap();
        for l in &m.manifest.layers {
            let records: Vec<Vec<u8>> = l.ids.iter().map(|&e| m.read_expert(l.il, e).unwrap()).collect();
            for (i, a) in records.iter().enumerate() {
                assert!(records[i + 1..].iter().all(|b| a != b), "layer {} record {i} repeats (exact {exact})", l.il);
                let mut at = 0;
                for (p, size) in l.sizes().iter().enumerate() {
                    let w = dequantize(l.types[p], &a[at..at + *size as usize], l.shapes[p][0]).unwrap();
                    at += *size as usize;
                    assert!(w.iter().all(|x| x.is_finite()));
                    let std = (w.iter().map(|x| x * x).sum::<f32>() / w.len() as f32).sqrt() as f64;
                    let want = if p == 2 { WRITE_STD } else { WEIGHT_STD };
                    assert!((0.75 * want..1.25 * want).contains(&std), "std {std} of {want} (exact {exact})");
                }
            }
        }
        // Norms near 1, router spread out.
        let mut buf = Vec::new();
        for (name, lo, hi) in [(blk(0, ATTN_NORM), 0.9, 1.1), (blk(1, FFN_GATE_INP), -3.0, 3.0)] {
            let t = m.base_tensors.iter().find(|t| t.name == name).unwrap();
            m.read_base_range(t, 0..t.size, &mut buf).unwrap();
            let v = dequantize(GgmlType::F32, &buf, t.ne[0]).unwrap();
            assert!(v.iter().all(|&x| (lo..=hi).contains(&x)), "{name}");
        }
    }
}

/// The routing notice holds: on 12 layers of 32 experts (top-4), consecutive tokens share about
/// the 4/32 of experts that independent uniform choices share, and an LRU arena of a quarter of
/// the experts hits about a quarter of the time. (With 0.02 for every matrix the deep layers
/// reused 60-90% and that arena hit 96%.)
#[test]
fn synth_routing_is_near_uniform() {
    let dir = tmp();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(plain().join("config.json")).unwrap()).unwrap();
    cfg["num_hidden_layers"] = 12.into();
    cfg["num_local_experts"] = 32.into();
    cfg["num_experts_per_tok"] = 4.into();
    let config = dir.path().join("config.json");
    std::fs::write(&config, cfg.to_string()).unwrap();
    let out = dir.path().join("m");
    write(&out, &opts(config.to_str().unwrap(), GgmlType::Q4_K, 0));

    // Made-up words of seeded letters: what routes them is the model, not the text's repeats.
    let mut st = 12345u64;
    let mut next = |n: u64| {
        st = st.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (st >> 33) % n
    };
    let prose: Vec<String> =
        (0..300).map(|_| (0..2 + next(5)).map(|_| (b'a' + next(26) as u8) as char).collect()).collect();
    let text_path = dir.path().join("text.txt");
    std::fs::write(&text_path, prose.join(" ")).unwrap();
    let usage = dir.path().join("usage.json");
    let o = Command::new(env!("CARGO_BIN_EXE_sage"))
        .args(["profile", out.to_str().unwrap(), "--text", text_path.to_str().unwrap()])
        .args(["-o", usage.to_str().unwrap(), "--ctx", "256"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let u = Usage::load(&usage).unwrap();
    let st = u.stats.as_ref().unwrap();
    eprintln!("entropy {:?}\nnext-token reuse {:?}", st.entropy_bits, st.next_token_reuse);
    for il in 0..12 {
        assert!(st.entropy_bits[il] > 0.9 * st.max_entropy_bits, "layer {il}: {:?}", st.entropy_bits);
        assert!(st.next_token_reuse[il] < 0.25, "layer {il}: {:?} (uniform: 0.125)", st.next_token_reuse);
    }
    let quarter = st.simulated_arena.iter().find(|a| a.percent_of_experts == 25).unwrap();
    assert!(quarter.lru_hit_rate < 0.4, "LRU arena of 25% of the experts hits {}", quarter.lru_hit_rate);
}

#[test]
fn synth_same_seed_same_bytes_other_seed_other_bytes() {
    let dir = tmp();
    let p = |n: &str| dir.path().join(n);
    write(&p("a"), &opts("tiny", GgmlType::Q4_K, 7));
    write(&p("b"), &opts("tiny", GgmlType::Q4_K, 7));
    write(&p("c"), &opts("tiny", GgmlType::Q4_K, 8));
    let (a, b, c) = (files(&p("a")), files(&p("b")), files(&p("c")));
    assert_eq!(a.len(), 4);
    for ((name, x), (_, y)) in a.iter().zip(&b) {
        assert!(x == y, "{} differs between two runs with the same seed", name.display());
    }
    for ((name, x), (_, z)) in a.iter().zip(&c) {
        if name.starts_with("experts") {
            // Every record differs, not only the header's conversion id.
            let r = RECORD_ALIGN as usize;
            assert_eq!(x.len(), z.len());
            assert!(x[r..].chunks(r).zip(z[r..].chunks(r)).all(|(u, v)| u != v), "{}", name.display());
        }
    }
    assert_ne!(a[0].1, c[0].1, "base.gguf of another seed");
}

/// One layer of the real Qwen3-30B-A3B shape through the CLI: sizes from the config numbers
/// and ggml's q4_K block (144 bytes per 256 weights).
#[test]
fn synth_one_layer_of_qwen3_30b_a3b_has_real_shapes_and_sizes() {
    let _big = big_test();
    let dir = tmp();
    let (out, gguf) = (dir.path().join("m"), dir.path().join("m.gguf"));
    let o = sage_convert(&[
        "synth",
        "--like",
        "qwen3-30b-a3b",
        "--quant",
        "q4_k",
        "--layers",
        "1",
        "-o",
        out.to_str().unwrap(),
        "--merged",
        gguf.to_str().unwrap(),
    ]);
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(t.contains("near uniform") && t.contains("worst case"), "no routing notice: {t}");

    let (n_embd, n_vocab, n_expert, n_ff_exp) = (2048u64, 151936u64, 128u64, 768u64);
    let (n_head, n_head_kv, head_dim) = (32u64, 4u64, 128u64);
    let q4k = |ne0: u64, rows: u64| ne0 / 256 * 144 * rows;
    let f32b = |n: u64| 4 * n;
    let base = 2 * q4k(n_embd, n_vocab) // token_embd, output
        + f32b(n_embd) // output_norm
        + q4k(n_embd, n_head * head_dim) // attn_q
        + 2 * q4k(n_embd, n_head_kv * head_dim) // attn_k, attn_v
        + q4k(n_head * head_dim, n_embd) // attn_output
        + 2 * f32b(n_embd) // attn_norm, ffn_norm
        + 2 * f32b(head_dim) // attn_q_norm, attn_k_norm
        + f32b(n_embd * n_expert); // ffn_gate_inp
    let record = 2 * q4k(n_embd, n_ff_exp) + q4k(n_ff_exp, n_embd);
    assert_eq!(record, 2_654_208);

    let m = ModelDir::open(&out).unwrap();
    let c = &m.config;
    assert_eq!((c.n_layer, c.n_embd, c.n_vocab, c.n_expert, c.n_expert_used), (1, n_embd, n_vocab, 128, 8));
    assert_eq!((c.n_ff_exp, c.n_head as u64, c.n_head_kv as u64, c.head_dim), (n_ff_exp, n_head, n_head_kv, head_dim));
    let l = &m.manifest.layers[0];
    assert_eq!(l.shapes, [[n_embd, n_ff_exp], [n_embd, n_ff_exp], [n_ff_exp, n_embd]]);
    assert_eq!(l.types, [GgmlType::Q4_K; 3]);
    assert_eq!((l.ids.len() as u64, l.record_size(), l.stride()), (n_expert, record, record.next_multiple_of(4096)));
    assert_eq!(m.base_bytes(), base);
    assert_eq!(m.expert_bytes(), n_expert * record);
    let shard = std::fs::metadata(out.join(shard_name(0))).unwrap().len();
    assert_eq!(shard, 4096 + n_expert * record.next_multiple_of(4096));
    let embd = m.base_tensors.iter().find(|t| t.name == TOKEN_EMBD).unwrap();
    assert_eq!((embd.ne.clone(), embd.size), (vec![n_embd, n_vocab], q4k(n_embd, n_vocab)));
    assert!(text(&o).contains(&format!("({base} bytes)")), "{t}");

    llama_runs(&gguf, n_vocab as i32, n_embd as i32, 1);
    sage_matches_llama_cpp(&out, &gguf, "qwen3-30b-a3b", 24);
    sage_run(&out);
}

/// `within_engine_tol_of` at a real shape: a streaming arena at a k-quant crosses q8 rounding
/// steps at more positions than on the tiny fixtures (an activation of 4096 to 7168 values
/// holds more values near a step than one of 64), so there `util::half_rounding_steps`
/// (measured, 8 positions, vocabularies cut to `CUT_VOCAB`: Mixtral-8x7B's shape in decode
/// steps 2 positions, 3.9e-3 and 4.6e-3; DeepSeek-V3's in one batch 3, up to 5.8e-3; every
/// other position ≤ 5e-6).
fn within_real_shape_tol(d: &[f32], ty: GgmlType, streaming: bool, recurrent: bool) -> bool {
    if streaming && !recurrent && may_cross_rounding_step(ty) {
        return half_rounding_steps(d, engine_tol(ty, streaming));
    }
    within_engine_tol_of(d, ty, streaming, false, recurrent)
}

/// sage's logits against llama.cpp's on the merged file of a synthetic model: a prompt of
/// `n` tokens in one batch, and its first half in a batch and the rest as decode steps, with
/// every expert resident and with the smallest arena (`n_expert_used` slots), held to
/// `within_real_shape_tol` by the type of the expert matrices at every position.
fn sage_matches_llama_cpp(out: &Path, gguf: &Path, like: &str, n: usize) {
    let m = ModelDir::open(out).unwrap();
    let (n_vocab, k, ty) = (m.config.n_vocab as usize, m.config.n_expert_used as usize, m.manifest.layers[0].types[0]);
    let ids: Vec<i32> = (0..n as i32).map(|i| 1 + i * 7919 % (n_vocab as i32 - 1)).collect();
    let llama = load_llama(gguf);
    let (want, split) = (llama_logits(&llama, &ids), n / 2);
    let want_steps = llama_logits_split(&llama, &ids, split, LlamaCtx::default());
    drop(llama);
    let ids: Vec<u32> = ids.iter().map(|&i| i as u32).collect();
    for arena in [ArenaSize::All, ArenaSize::Experts(k)] {
        let mut e = Engine::load(out, exact(arena)).unwrap();
        let streaming = arena != ArenaSize::All;
        assert_eq!(e.all_resident(), !streaming);
        let got = rows(e.eval(&ids, true).unwrap(), n_vocab);
        let d = per_position(&got, &want);
        eprintln!("{like}, {ty}, {arena:?}: |sage - llama.cpp| per position {d:?}");
        let recurrent = m.config.recurrent_layers.contains(&true);
        assert!(within_real_shape_tol(&d, ty, streaming, recurrent), "{like} {arena:?}: {d:?}");
        let d = per_position(&sage_logits_split(&mut e, &ids, split), &want_steps);
        eprintln!("{like}, {ty}, {arena:?}, decode steps: |sage - llama.cpp| per position {d:?}");
        assert!(within_real_shape_tol(&d, ty, streaming, recurrent), "{like} {arena:?} decode steps: {d:?}");
        if streaming {
            assert!(e.stats().sched.misses > k as u64, "{like}: the smallest arena streamed experts");
        }
    }
}

#[test]
fn synth_omni_config_is_the_thinker() {
    let c = synth_config("qwen3-omni-30b-a3b", Some(2)).unwrap();
    assert_eq!((c.n_layer, c.n_embd, c.n_vocab, c.n_expert, c.n_ff_exp), (2, 2048, 152064, 128, 768));
    assert_eq!(c.name, "synth-qwen3-omni-30b-a3b");
    let c = synth_config(plain().join("config.json").to_str().unwrap(), None).unwrap();
    assert_eq!((c.n_layer, c.n_vocab), (2, 512));
}

#[test]
fn synth_errors_are_clear() {
    let dir = tmp();
    let out = dir.path().join("m");
    let o_ = out.to_str().unwrap();
    let o = sage_convert(&["synth", "--like", "qwen3-31b", "--quant", "q4_k", "-o", o_]);
    assert!(!o.status.success());
    assert!(
        text(&o).contains(
            "--like 'qwen3-31b': unknown model; expected one of qwen3-30b-a3b, qwen3-omni-30b-a3b, tiny, mixtral-8x7b, olmoe-1b-7b, qwen1.5-moe-a2.7b"
        ),
        "{}",
        text(&o)
    );
    assert!(!out.exists(), "nothing is written for a bad name");
    for n in ["0", "3"] {
        let o = sage_convert(&["synth", "--like", "tiny", "--quant", "q4_k", "--layers", n, "-o", o_]);
        assert!(!o.status.success() && text(&o).contains(&format!("--layers {n}: the model has layers 1 to 2")));
    }
    let o = sage_convert(&["synth", "--like", "tiny", "--quant", "q4_k_m", "-o", o_]);
    assert!(!o.status.success() && text(&o).contains("unknown quant type 'q4_k_m'"), "{}", text(&o));

    // An existing model is kept without --force, replaced with it.
    let gguf = dir.path().join("m.gguf");
    let g_ = gguf.to_str().unwrap();
    let o = sage_convert(&["synth", "--like", "tiny", "--quant", "q8_0", "-o", o_, "--merged", g_]);
    assert!(o.status.success(), "{}", text(&o));
    let o = sage_convert(&["synth", "--like", "tiny", "--quant", "q4_k", "-o", o_]);
    assert!(!o.status.success());
    assert!(text(&o).contains("already holds a model; pass --force to replace it"), "{}", text(&o));
    // The merged file is checked before anything is written.
    let o = sage_convert(&[
        "synth",
        "--like",
        "tiny",
        "--quant",
        "q4_k",
        "-o",
        dir.path().join("n").to_str().unwrap(),
        "--merged",
        g_,
    ]);
    assert!(!o.status.success());
    assert!(text(&o).contains("m.gguf: already exists; pass --force to replace it"), "{}", text(&o));
    assert!(!dir.path().join("n").exists());
    assert_eq!(ModelDir::open(&out).unwrap().manifest.layers[0].types[0], GgmlType::Q8_0);
    let o = sage_convert(&["synth", "--like", "tiny", "--quant", "q4_k", "-o", o_, "--merged", g_, "--force"]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(ModelDir::open(&out).unwrap().manifest.layers[0].types[0], GgmlType::Q4_K);
}

/// One layer of each other family's real shape (Mixtral-8x7B, OLMoE-1B-7B and
/// Qwen1.5-MoE-A2.7B, whose down projection of 1408 falls back from q4_K to q5_0): llama.cpp
/// loads the merged file and runs it, and sage gives llama.cpp's logits with every expert
/// resident and within the type's tolerance through the smallest arena (`within_real_shape_tol`).
#[test]
fn synth_one_layer_of_each_family_runs_in_llama_cpp_and_sage() {
    let _big = big_test();
    for like in ["mixtral-8x7b", "olmoe-1b-7b", "qwen1.5-moe-a2.7b"] {
        let dir = tmp();
        let (out, gguf) = (dir.path().join(like), dir.path().join(format!("{like}.gguf")));
        let cfg = cut_vocab(like, dir.path());
        let r =
            write(&out, &SynthOptions { layers: Some(1), merged: Some(gguf.clone()), ..opts(&cfg, GgmlType::Q4_K, 0) });
        let c = &r.config;
        let published = sage::config::read_hf_config(&configs().join(format!("{like}.config.json"))).unwrap().1;
        assert_eq!(
            (c.arch, c.n_embd, c.n_ff_exp, c.n_expert, c.n_vocab),
            (published.arch, published.n_embd, published.n_ff_exp, published.n_expert, CUT_VOCAB)
        );
        llama_runs(&gguf, c.n_vocab as i32, c.n_embd as i32, 1);
        sage_matches_llama_cpp(&out, &gguf, like, 8);
    }
}

/// The hybrid families at their real shapes, the first 4 layers of Qwen3.5-35B-A3B and of
/// Qwen3-Next-80B-A3B (3 linear-attention layers and 1 full: llama.cpp cannot run a cut with
/// no attention layer, its KV cache would have no buffer): llama.cpp loads and runs the merged
/// file, and sage gives its logits in one batch and in decode steps, every expert resident
/// and through the smallest arena.
#[test]
fn synth_hybrid_layers_run_in_llama_cpp_and_sage() {
    let _big = big_test();
    for (like, layers) in [("qwen3.5-35b-a3b", 4), ("qwen3-next-80b-a3b", 4)] {
        let dir = tmp();
        let (out, gguf) = (dir.path().join(like), dir.path().join(format!("{like}.gguf")));
        let cfg = cut_vocab(like, dir.path());
        let r = write(
            &out,
            &SynthOptions { layers: Some(layers), merged: Some(gguf.clone()), ..opts(&cfg, GgmlType::Q4_K, 0) },
        );
        let c = &r.config;
        assert_eq!(c.recurrent_layers.iter().filter(|&&x| !x).count(), layers as usize / 4, "{like}");
        llama_runs(&gguf, c.n_vocab as i32, c.n_embd as i32, layers);
        sage_matches_llama_cpp(&out, &gguf, like, 8);
    }
}

/// GLM-4.5 at its real shape, cut to 2 layers: its first (dense) layer and one with 160
/// experts, a sigmoid router with its correction bias and `routed_scaling_factor` 2.5, q/k
/// norms: llama.cpp loads and runs the merged file, and sage gives its logits every expert
/// resident and through the smallest arena.
#[test]
fn synth_glm_layers_run_in_llama_cpp_and_sage() {
    let _big = big_test();
    let like = "glm-4.5";
    let dir = tmp();
    let (out, gguf) = (dir.path().join(like), dir.path().join(format!("{like}.gguf")));
    let cfg = cut_vocab(like, dir.path());
    let r = write(&out, &SynthOptions { layers: Some(2), merged: Some(gguf.clone()), ..opts(&cfg, GgmlType::Q4_K, 0) });
    let c = &r.config;
    assert_eq!((c.n_layer_dense_lead, c.n_expert, c.gating.scale, c.n_embd), (1, 160, 2.5, 5120));
    llama_runs(&gguf, c.n_vocab as i32, c.n_embd as i32, 2);
    sage_matches_llama_cpp(&out, &gguf, like, 8);
}

/// A hybrid's layers have different tensor counts (a linear-attention layer 16, a full one
/// 13): a file of 8 tiny layers (the tiny Qwen3.5 fixture's shapes, `full_attention_interval`
/// 4) holds fewer tensors than 8 × its first layer's and must still open.
#[test]
fn a_hybrid_with_fewer_tensors_in_its_full_layers_opens() {
    let dir = tmp();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("tiny-qwen35moe/config.json")).unwrap()).unwrap();
    let t = cfg["text_config"].as_object_mut().unwrap();
    t.insert("num_hidden_layers".into(), 8.into());
    t.remove("layer_types");
    let path = dir.path().join("config.json");
    std::fs::write(&path, serde_json::to_string(&cfg).unwrap()).unwrap();
    let out = dir.path().join("m");
    write(&out, &opts(path.to_str().unwrap(), GgmlType::Q8_0, 0));
    let m = ModelDir::open(&out).unwrap();
    assert_eq!(m.config.n_layer, 8);
    assert_eq!(m.config.recurrent_layers, vec![true, true, true, false, true, true, true, false]);
    let g = sage::ggml::Gguf::open(&out.join("base.gguf")).unwrap();
    assert!(g.n_tensors() < 8 * 16, "{} tensors", g.n_tensors());
}

/// DeepSeek-V2-Lite and DeepSeek-V3 at their real shapes, cut to 2 layers: the first (dense)
/// layer and one MoE layer (64 experts with a softmax router; 256 with the grouped sigmoid
/// router, its correction bias and `routed_scaling_factor` 2.5), latent attention with YaRN
/// (V2-Lite a plain q, V3 a q LoRA): llama.cpp loads and runs the merged file, and sage gives
/// its logits every expert resident and through the smallest arena.
#[test]
fn synth_deepseek_layers_run_in_llama_cpp_and_sage() {
    let _big = big_test();
    for (like, n_expert, q_lora) in [("deepseek-v2-lite", 64, 0), ("deepseek-v3", 256, 1536)] {
        let dir = tmp();
        let (out, gguf) = (dir.path().join(like), dir.path().join(format!("{like}.gguf")));
        let cfg = cut_vocab(like, dir.path());
        let r =
            write(&out, &SynthOptions { layers: Some(2), merged: Some(gguf.clone()), ..opts(&cfg, GgmlType::Q4_K, 0) });
        let c = &r.config;
        assert_eq!((c.n_layer_dense_lead, c.n_expert, c.mla.map(|m| m.q_lora_rank)), (1, n_expert, Some(q_lora)));
        llama_runs(&gguf, c.n_vocab as i32, c.n_embd as i32, 2);
        sage_matches_llama_cpp(&out, &gguf, like, 8);
    }
}
