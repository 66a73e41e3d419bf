//! sage-convert: every quant type, inspect's counts and bytes, the Omni layout, GGUF round
//! trips, pools, atomic output.

use std::path::Path;
use std::process::Command;

use sage::convert::{convert, convert_source, ConvertOptions};
use sage::ggml::{dequantize, GgmlType, Gguf};
use sage::inspect::inspect;
use sage::merge::merge;
use sage::model_dir::{ModelDir, RECORD_ALIGN};
use sage::names::Proj;
use sage::source::{self, Source, TensorMeta};

use crate::util::*;

/// (bytes, elements) per block, from ggml-common.h: an independent account of sizes.
fn block(t: &str) -> (u64, u64) {
    match t {
        "f32" => (4, 1),
        "f16" | "bf16" => (2, 1),
        "q8_0" => (34, 32),
        "q6_K" => (210, 256),
        "q5_K" => (176, 256),
        "q4_K" => (144, 256),
        "q4_0" => (18, 32),
        "q3_K" => (110, 256),
        "q2_K" => (84, 256),
        _ => panic!("{t}"),
    }
}

fn bytes_of(t: &str, elements: u64) -> u64 {
    let (b, n) = block(t);
    elements / n * b
}

// The fixture: 2 layers, n_embd 256, 4 heads x 64 (2 KV), 8 experts of FFN 256, vocab 512.
const N_LAYER: u64 = 2;
const NORM_ELEMS: u64 = N_LAYER * (256 + 64 + 64 + 256) + 256;
const ROUTER_ELEMS: u64 = N_LAYER * 256 * 8;
const MATRIX_ELEMS: u64 = 2 * 512 * 256 + N_LAYER * (256 * 256 * 2 + 256 * 128 * 2);
const EXPERT_ELEMS: u64 = 256 * 256;

#[test]
fn every_quant_type_converts_with_exact_counts_and_bytes() {
    let dir = tmp();
    for (name, ty) in sage::quant::QUANT_NAMES {
        let out = dir.path().join(name);
        let r = convert(&plain(), &out, &opts(Some(ty))).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(r.fallbacks.is_empty(), "{name}: every row of the fixture fits: {:?}", r.fallbacks);
        let i = inspect(&out).unwrap();
        let t = ty.name();
        assert_eq!(i.n_base_tensors, 3 + 9 * N_LAYER, "{name}");
        assert_eq!(i.n_expert_tensors, N_LAYER * 8 * 3, "{name}");
        assert_eq!(i.experts_per_layer, vec![(0..8).collect::<Vec<u32>>(); 2], "{name}");
        let f32_count = 1 + 5 * N_LAYER + if ty == GgmlType::F32 { 10 } else { 0 };
        assert_eq!(i.base_types["f32"].count, f32_count, "{name}");
        let want_base = (NORM_ELEMS + ROUTER_ELEMS) * 4 + bytes_of(t, MATRIX_ELEMS);
        assert_eq!(i.base_bytes, want_base, "{name} base bytes");
        let per_proj = bytes_of(t, EXPERT_ELEMS);
        assert_eq!(i.expert_bytes, N_LAYER * 8 * 3 * per_proj, "{name} expert bytes");
        assert_eq!(i.expert_types[t].count, N_LAYER * 8 * 3, "{name}");
        // Each shard: a 4 KiB header, then 8 records each padded to 4 KiB.
        let shard = std::fs::metadata(out.join("experts/blk.001.bin")).unwrap().len();
        assert_eq!(shard, RECORD_ALIGN + 8 * (3 * per_proj).next_multiple_of(RECORD_ALIGN), "{name} shard size");
        // The directory keeps no temporaries.
        assert!(!out.join(".sage-incomplete").exists());
    }
}

#[test]
fn q8_0_experts_hold_the_source_weights_in_gate_up_down_order() {
    let dir = tmp();
    let (out, _) = convert_into(&plain(), dir.path(), &opts(Some(GgmlType::Q8_0)));
    let m = ModelDir::open(&out).unwrap();
    let src = source::open(&plain()).unwrap();
    for (il, e) in [(0u32, 0u32), (1, 5), (1, 7)] {
        let rec = m.read_expert(il, e).unwrap();
        let sizes = m.manifest.layers[il as usize].sizes();
        let mut at = 0usize;
        for p in Proj::ALL {
            let got = dequantize(GgmlType::Q8_0, &rec[at..at + sizes[p.index()] as usize], 256).unwrap();
            at += sizes[p.index()] as usize;
            let mut raw = Vec::new();
            src.read_expert(il, e, p, &mut raw).unwrap();
            let want = dequantize(src.expert_meta(il, e, p).unwrap().ty, &raw, 256).unwrap();
            // q8_0: error per weight at most half a step of its block's scale d = max|x|/127,
            // plus the f16 rounding of d (< 0.07 d): 0.6 d (as in the ggml module's unit test).
            for (blk_got, blk_want) in got.chunks(32).zip(want.chunks(32)) {
                let tol = 0.6 * blk_want.iter().fold(0f32, |m, x| m.max(x.abs())) / 127.0;
                for (a, b) in blk_got.iter().zip(blk_want) {
                    assert!((a - b).abs() <= tol, "layer {il} expert {e} {p:?}: {a} vs {b}");
                }
            }
        }
    }
}

/// A tensor's name, type, shape and data.
type TensorContents = (String, Option<GgmlType>, Vec<u64>, Vec<u8>);

/// Tensor names, types, shapes and data of a GGUF, and its metadata minus sage's own keys.
fn gguf_contents(path: &Path) -> (Vec<TensorContents>, Vec<(String, sage::ggml::GgufValue)>) {
    let g = Gguf::open(path).unwrap();
    let bytes = std::fs::read(path).unwrap();
    let base = g.data_offset() as usize;
    let tensors = g
        .tensors()
        .into_iter()
        .map(|t| {
            let d = bytes[base + t.offset as usize..base + (t.offset + t.size) as usize].to_vec();
            (t.name, t.ty, t.ne, d)
        })
        .collect();
    let mut kv: Vec<_> = g
        .keys()
        .into_iter()
        .filter(|k| !k.starts_with("sage.") && k != "general.name")
        .map(|k| (k.clone(), g.get(&k).unwrap()))
        .collect();
    kv.sort_by(|a, b| a.0.cmp(&b.0));
    (tensors, kv)
}

#[test]
fn omni_checkpoint_converts_to_the_same_tensors_as_the_plain_one() {
    let dir = tmp();
    for ty in [None, Some(GgmlType::Q4_K)] {
        let a = convert(&plain(), &dir.path().join("a"), &ConvertOptions { force: true, ..opts(ty) }).unwrap();
        let b = convert(&omni(), &dir.path().join("b"), &ConvertOptions { force: true, ..opts(ty) }).unwrap();
        assert_eq!(gguf_contents(&a.out.join("base.gguf")), gguf_contents(&b.out.join("base.gguf")), "{ty:?}");
        let (ma, mb) = (ModelDir::open(&a.out).unwrap(), ModelDir::open(&b.out).unwrap());
        assert_eq!(ma.config.n_expert, mb.config.n_expert);
        for il in 0..2 {
            for e in 0..8 {
                assert_eq!(ma.read_expert(il, e).unwrap(), mb.read_expert(il, e).unwrap(), "layer {il} expert {e}");
            }
        }
    }
}

#[test]
fn gguf_to_shards_to_merge_is_byte_identical() {
    let dir = tmp();
    // A mixed-type file, as downloaded GGUFs are: q6_K base matrices, q4_K experts.
    let o =
        ConvertOptions { quant_base: Some(GgmlType::Q6_K), quant_experts: Some(GgmlType::Q4_K), ..Default::default() };
    let (first, _) = convert_into(&plain(), dir.path(), &o);
    let a = dir.path().join("a.gguf");
    merge(&first, &a, false).unwrap();
    let second = dir.path().join("second");
    convert(&a, &second, &ConvertOptions::default()).unwrap();
    let b = dir.path().join("b.gguf");
    merge(&second, &b, false).unwrap();
    let (ta, ka) = gguf_contents(&a);
    let (tb, kb) = gguf_contents(&b);
    assert_eq!(ta.len(), tb.len());
    for (x, y) in ta.iter().zip(&tb) {
        assert_eq!((&x.0, x.1, &x.2), (&y.0, y.1, &y.2), "tensor info");
        assert!(x.3 == y.3, "tensor '{}' data differs", x.0);
    }
    assert_eq!(ka, kb, "metadata");
    // And llama.cpp loads the merged file.
    let model = load_llama(&b);
    assert_eq!(model.n_layer(), 2);
}

#[test]
fn gguf_input_can_be_requantized() {
    let dir = tmp();
    let (first, _) = convert_into(&plain(), dir.path(), &opts(Some(GgmlType::F16)));
    let a = dir.path().join("f16.gguf");
    merge(&first, &a, false).unwrap();
    let out = dir.path().join("q4");
    convert(&a, &out, &opts(Some(GgmlType::Q4_K))).unwrap();
    let i = inspect(&out).unwrap();
    assert_eq!(i.expert_types.keys().collect::<Vec<_>>(), vec!["q4_K"]);
    assert_eq!(i.base_types["q4_K"].count, 10);
    // Inspecting the GGUF itself reports the same model.
    let g = inspect(&a).unwrap();
    assert_eq!((g.n_base_tensors, g.n_expert_tensors), (21, 48));
    assert_eq!(g.config, inspect(&first).unwrap().config);
}

#[test]
fn pools_keep_only_the_named_experts() {
    let dir = tmp();
    let ids = sage::convert::parse_expert_spec("1,3,5-6", 8).unwrap();
    assert_eq!(ids, vec![1, 3, 5, 6]);
    let o = ConvertOptions { experts: Some(ids.clone()), ..opts(Some(GgmlType::Q8_0)) };
    let (out, _) = convert_into(&plain(), dir.path(), &o);
    let i = inspect(&out).unwrap();
    assert_eq!(i.experts_per_layer, vec![ids.clone(); 2]);
    assert_eq!(i.n_expert_tensors, 2 * 4 * 3);
    assert_eq!(i.config.n_expert, 8, "the router keeps all experts; the manifest says which exist");
    let full =
        ModelDir::open(&convert_into(&plain(), &dir.path().join("full"), &opts(Some(GgmlType::Q8_0))).0).unwrap();
    let pool = ModelDir::open(&out).unwrap();
    assert_eq!(pool.read_expert(1, 5).unwrap(), full.read_expert(1, 5).unwrap());
    assert!(pool.read_expert(1, 4).unwrap_err().to_string().contains("layer 1 has no expert 4"));

    for (spec, msg) in
        [("9", "expert 9 does not exist"), ("3-1", "range 3-1 is empty"), ("a", "'a' is not an expert id")]
    {
        let e = sage::convert::parse_expert_spec(spec, 8).unwrap_err().to_string();
        assert!(e.contains(msg), "{spec}: {e}");
    }
    let o = ConvertOptions { experts: Some(vec![2]), ..Default::default() };
    let e = convert(&plain(), &dir.path().join("tiny-pool"), &o).unwrap_err().to_string();
    assert!(e.contains("a pool of 1 experts is smaller than the 2 experts each token uses"), "{e}");
}

#[test]
fn refuses_to_overwrite_without_force() {
    let dir = tmp();
    let (out, first) = convert_into(&plain(), dir.path(), &opts(Some(GgmlType::Q8_0)));
    let keep = out.join("notes.txt");
    std::fs::write(&keep, "mine").unwrap();
    let e = convert(&plain(), &out, &opts(Some(GgmlType::Q4_K))).unwrap_err().to_string();
    assert!(e.contains("already holds a model; pass --force to replace it"), "{e}");
    assert_eq!(ModelDir::open(&out).unwrap().manifest.conversion_id, first.conversion_id, "untouched");
    let second = convert(&plain(), &out, &ConvertOptions { force: true, ..opts(Some(GgmlType::Q4_K)) }).unwrap();
    assert_eq!(ModelDir::open(&out).unwrap().manifest.conversion_id, second.conversion_id);
    assert_eq!(std::fs::read_to_string(&keep).unwrap(), "mine", "files that are not sage's are left alone");
}

/// A source that fails part-way through the experts, as a dying disk or a kill would.
struct FailingSource(Box<dyn Source>);

impl Source for FailingSource {
    fn path(&self) -> &Path {
        self.0.path()
    }
    fn config(&self) -> &sage::config::ModelConfig {
        self.0.config()
    }
    fn tokenizer(&self) -> sage::Result<sage::tokenizer::TokenizerData> {
        self.0.tokenizer()
    }
    fn base_meta(&self, name: &str) -> sage::Result<Option<TensorMeta>> {
        self.0.base_meta(name)
    }
    fn read_base(&self, name: &str, rows: std::ops::Range<u64>, buf: &mut Vec<u8>) -> sage::Result<()> {
        self.0.read_base(name, rows, buf)
    }
    fn expert_meta(&self, il: u32, e: u32, proj: Proj) -> sage::Result<TensorMeta> {
        self.0.expert_meta(il, e, proj)
    }
    fn read_expert(&self, il: u32, e: u32, proj: Proj, buf: &mut Vec<u8>) -> sage::Result<()> {
        if (il, e, proj) == (1, 5, Proj::Down) {
            return Err(sage::Error::Usage("injected read failure".into()));
        }
        self.0.read_expert(il, e, proj, buf)
    }
    fn describe(&self) -> String {
        self.0.describe()
    }
}

#[test]
fn a_failed_conversion_never_leaves_a_directory_that_loads() {
    let dir = tmp();
    let out = dir.path().join("model");
    let src = FailingSource(source::open(&plain()).unwrap());
    let e = convert_source(&src, &out, &opts(Some(GgmlType::Q8_0)), &mut |_, _, _| {}).unwrap_err().to_string();
    assert!(e.contains("injected read failure"), "{e}");
    assert!(!out.join("base.gguf").exists());
    assert!(out.join("experts/blk.000.bin").exists(), "layer 0 was finished before the failure");
    assert!(!out.join("experts/blk.001.bin").exists() && !out.join("experts/blk.001.bin.partial").exists());
    let e = ModelDir::open(&out).err().unwrap().to_string();
    assert!(e.contains("unfinished conversion"), "{e}");
    // An unfinished conversion is sage's own debris: converting again replaces it, no --force.
    convert(&plain(), &out, &opts(Some(GgmlType::Q8_0))).unwrap();
    ModelDir::open(&out).unwrap();
    // A finished model is not replaced without --force.
    let e = convert(&plain(), &out, &opts(Some(GgmlType::Q8_0))).unwrap_err().to_string();
    assert!(e.contains("already holds a model; pass --force"), "{e}");
    convert(&plain(), &out, &ConvertOptions { force: true, ..opts(Some(GgmlType::Q8_0)) }).unwrap();
    ModelDir::open(&out).unwrap();
}

/// SIGKILL at many moments of a conversion: the directory either loads as the whole model
/// (the process had finished) or is refused; converting again always succeeds. Only kills
/// that landed mid-write (the unfinished-conversion marker present when the process died)
/// count towards the ones that must have happened.
#[test]
fn a_killed_conversion_never_leaves_a_directory_that_loads() {
    let dir = tmp();
    // Big enough to take a while: the Omni-shaped fixture, re-quantized to q4_k.
    let src = omni();
    let spawn = |out: &Path| {
        Command::new(env!("CARGO_BIN_EXE_sage-convert"))
            .args([src.to_str().unwrap(), "-o", out.to_str().unwrap(), "--quant", "q4_k"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap()
    };
    // How long a whole conversion takes here; the kills land from its start to past its end.
    let t0 = std::time::Instant::now();
    assert!(spawn(&dir.path().join("timed")).wait().unwrap().success());
    let whole = t0.elapsed();
    let whole_model = ModelDir::open(&dir.path().join("timed")).unwrap();
    let (mut refused, mut finished, mut mid_write) = (0, 0, 0);
    for i in 0..24u32 {
        let out = dir.path().join(format!("m{i}"));
        let mut child = spawn(&out);
        let delay = whole * i / 20;
        std::thread::sleep(delay);
        child.kill().unwrap(); // SIGKILL
        let status = child.wait().unwrap();
        // The marker is written before the first shard and removed only after base.gguf is
        // committed, so a kill that left it landed mid-write. Shards without the marker mean
        // the writes had finished and the kill landed while the process was exiting.
        let marker = out.join(sage::model_dir::INCOMPLETE_MARKER).exists();
        let landed_mid_write = !status.success() && marker;
        if landed_mid_write {
            mid_write += 1;
            assert!(ModelDir::open(&out).is_err(), "a directory killed mid-write ({delay:?}) loads");
        }
        match ModelDir::open(&out) {
            Ok(m) => {
                // It loads, so it must be the whole model (the kill may have landed after the
                // last write): every tensor and expert as in the uninterrupted conversion.
                assert_eq!(m.base_tensors.len(), whole_model.base_tensors.len());
                for (a, b) in m.base_tensors.iter().zip(&whole_model.base_tensors) {
                    let (mut x, mut y) = (Vec::new(), Vec::new());
                    m.read_base_range(a, 0..a.size, &mut x).unwrap();
                    whole_model.read_base_range(b, 0..b.size, &mut y).unwrap();
                    assert!(a.name == b.name && x == y, "{} differs after a kill at {delay:?}", a.name);
                }
                for l in &m.manifest.layers {
                    for &e in &l.ids {
                        assert_eq!(m.read_expert(l.il, e).unwrap(), whole_model.read_expert(l.il, e).unwrap());
                    }
                }
                finished += 1;
            }
            Err(_) => {
                assert!(!status.success(), "a conversion that finished ({delay:?}) does not load");
                refused += 1;
                if out.exists() {
                    convert(&src, &out, &opts(Some(GgmlType::Q4_K))).unwrap();
                    ModelDir::open(&out).unwrap();
                }
            }
        }
    }
    eprintln!(
        "a conversion takes {whole:?}; killed ones: {refused} refused ({mid_write} of them mid-write), {finished} had finished"
    );
    assert!(mid_write >= 4, "only {mid_write} kills landed mid-write");
}

#[test]
fn cli_converts_inspects_and_merges() {
    let dir = tmp();
    let out = dir.path().join("m");
    let run = |args: &[&str]| {
        let o = Command::new(env!("CARGO_BIN_EXE_sage-convert")).args(args).output().unwrap();
        (
            o.status.success(),
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    let (ok, stdout, stderr) =
        run(&[plain().to_str().unwrap(), "-o", out.to_str().unwrap(), "--quant", "q4_k", "--quant-base", "q8_0"]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("experts 8 per layer"), "{stdout}");
    let (ok, stdout, _) = run(&["inspect", out.to_str().unwrap()]);
    assert!(ok);
    assert!(
        stdout.contains("q8_0: 10 tensors,")
            && stdout.contains("q4_K: 48 projections,")
            && stdout.contains("blk.0-1: 8 (0-7)"),
        "{stdout}"
    );
    let (ok, stdout, _) = run(&["inspect", "--json", out.to_str().unwrap()]);
    assert!(ok);
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v["n_expert_tensors"], 48);
    let gguf = dir.path().join("m.gguf");
    let (ok, _, stderr) = run(&["merge", out.to_str().unwrap(), "-o", gguf.to_str().unwrap()]);
    assert!(ok, "{stderr}");
    let (ok, _, stderr) = run(&["merge", out.to_str().unwrap(), "-o", gguf.to_str().unwrap()]);
    assert!(!ok && stderr.contains("already exists; pass --force"), "{stderr}");
    // The binary prints the whole chain of an error.
    let (ok, _, stderr) = run(&["/nonexistent/ckpt", "-o", dir.path().join("x").to_str().unwrap()]);
    assert!(!ok && stderr.contains("converting /nonexistent/ckpt") && stderr.contains("No such file"), "{stderr}");
    let (ok, _, stderr) = run(&[plain().to_str().unwrap(), "-o", "x", "--quant", "q4_k_m"]);
    assert!(!ok && stderr.contains("unknown quant type 'q4_k_m'"), "{stderr}");
}

#[test]
fn f32_f16_and_bf16_sources_convert_alike() {
    // The bf16 fixture rewritten as f32 (exact) and as f16 (rounded once): converted to f16,
    // all three give the same bytes, since f16(bf16 value) is the same from any of them.
    let dir = tmp();
    let want = convert_into(&plain(), dir.path(), &opts(Some(GgmlType::F16))).0;
    for (ty, dtype) in [(GgmlType::F32, safetensors::Dtype::F32), (GgmlType::F16, safetensors::Dtype::F16)] {
        let c = dir.path().join(format!("src-{ty}"));
        copy_dir(&plain(), &c);
        rewrite_safetensors(&c.join("model.safetensors"), |m| {
            for t in m.values_mut() {
                let f = dequantize(GgmlType::BF16, &t.2, *t.1.last().unwrap() as u64).unwrap();
                t.2 = sage::ggml::quantize(ty, &f, *t.1.last().unwrap() as u64).unwrap();
                t.0 = dtype;
            }
        });
        let got = convert(&c, &dir.path().join(format!("out-{ty}")), &opts(Some(GgmlType::F16))).unwrap().out;
        assert_eq!(gguf_contents(&got.join("base.gguf")), gguf_contents(&want.join("base.gguf")), "{ty} source");
        let (a, b) = (ModelDir::open(&got).unwrap(), ModelDir::open(&want).unwrap());
        assert_eq!(a.read_expert(1, 6).unwrap(), b.read_expert(1, 6).unwrap(), "{ty} source");
    }
}

#[test]
fn fused_expert_tensors_convert_like_per_expert_ones() {
    // transformers 5 keeps experts as mlp.experts.gate_up_proj [E, 2F, D] (gate rows first)
    // and mlp.experts.down_proj [E, D, F]; published checkpoints store one tensor per expert.
    let dir = tmp();
    let want = convert_into(&plain(), dir.path(), &opts(Some(GgmlType::Q8_0))).0;
    let c = dir.path().join("fused");
    copy_dir(&plain(), &c);
    rewrite_safetensors(&c.join("model.safetensors"), |m| {
        for il in 0..2 {
            let p = format!("model.layers.{il}.mlp.experts.");
            let (mut gate_up, mut down) = (Vec::new(), Vec::new());
            for e in 0..8 {
                let mut take = |proj: &str| m.remove(&format!("{p}{e}.{proj}.weight")).unwrap().2;
                gate_up.extend(take("gate_proj"));
                gate_up.extend(take("up_proj"));
                down.extend(take("down_proj"));
            }
            m.insert(format!("{p}gate_up_proj"), (safetensors::Dtype::BF16, vec![8, 512, 256], gate_up));
            m.insert(format!("{p}down_proj"), (safetensors::Dtype::BF16, vec![8, 256, 256], down));
        }
    });
    let got = convert(&c, &dir.path().join("out"), &opts(Some(GgmlType::Q8_0))).unwrap().out;
    let (a, b) = (ModelDir::open(&got).unwrap(), ModelDir::open(&want).unwrap());
    for il in 0..2 {
        for e in 0..8 {
            assert_eq!(a.read_expert(il, e).unwrap(), b.read_expert(il, e).unwrap(), "layer {il} expert {e}");
        }
    }
    assert_eq!(gguf_contents(&got.join("base.gguf")), gguf_contents(&want.join("base.gguf")));
}

/// Write a Qwen3-MoE checkpoint of `n_layer` layers of `n_expert` experts (n_embd 1024, expert
/// FFN 512: each expert matrix 1 MiB of bf16) into `dir`, streaming it tensor by tensor, with
/// the tiny fixture's attention shapes and tokenizer. Returns its largest tensor's bytes.
fn write_wide_checkpoint(dir: &Path, n_layer: usize, n_expert: usize) -> u64 {
    use std::io::Write;
    std::fs::create_dir_all(dir).unwrap();
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(plain().join(f), dir.join(f)).unwrap();
    }
    let (n_embd, ff) = (1024usize, 512usize);
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(plain().join("config.json")).unwrap()).unwrap();
    cfg["hidden_size"] = n_embd.into();
    cfg["moe_intermediate_size"] = ff.into();
    cfg["num_local_experts"] = n_expert.into();
    cfg["num_hidden_layers"] = n_layer.into();
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    let mut tensors: Vec<(String, Vec<usize>)> =
        vec![("model.embed_tokens.weight".into(), vec![512, n_embd]), ("lm_head.weight".into(), vec![512, n_embd])];
    tensors.push(("model.norm.weight".into(), vec![n_embd]));
    for il in 0..n_layer {
        let l = |s: &str| format!("model.layers.{il}.{s}");
        for (n, shape) in [
            ("input_layernorm.weight", vec![n_embd]),
            ("post_attention_layernorm.weight", vec![n_embd]),
            ("self_attn.q_proj.weight", vec![256, n_embd]),
            ("self_attn.k_proj.weight", vec![128, n_embd]),
            ("self_attn.v_proj.weight", vec![128, n_embd]),
            ("self_attn.o_proj.weight", vec![n_embd, 256]),
            ("self_attn.q_norm.weight", vec![64]),
            ("self_attn.k_norm.weight", vec![64]),
            ("mlp.gate.weight", vec![n_expert, n_embd]),
        ] {
            tensors.push((l(n), shape));
        }
        for e in 0..n_expert {
            tensors.push((l(&format!("mlp.experts.{e}.gate_proj.weight")), vec![ff, n_embd]));
            tensors.push((l(&format!("mlp.experts.{e}.up_proj.weight")), vec![ff, n_embd]));
            tensors.push((l(&format!("mlp.experts.{e}.down_proj.weight")), vec![n_embd, ff]));
        }
    }
    let mut header = serde_json::Map::new();
    let mut at = 0usize;
    for (name, shape) in &tensors {
        let bytes = 2 * shape.iter().product::<usize>();
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": "BF16", "shape": shape, "data_offsets": [at, at + bytes]}),
        );
        at += bytes;
    }
    let mut h = serde_json::Value::Object(header).to_string().into_bytes();
    h.resize(h.len().next_multiple_of(8), b' ');
    let mut w = std::io::BufWriter::new(std::fs::File::create(dir.join("model.safetensors")).unwrap());
    w.write_all(&(h.len() as u64).to_le_bytes()).unwrap();
    w.write_all(&h).unwrap();
    let mut state = 0x9e3779b97f4a7c15u64;
    let mut largest = 0u64;
    for (name, shape) in &tensors {
        let n: usize = shape.iter().product();
        largest = largest.max(2 * n as u64);
        let norm = name.contains("norm");
        let data: Vec<u8> = (0..n)
            .flat_map(|_| {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                let x = if norm { 1.0 } else { ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.1 };
                ((x.to_bits() >> 16) as u16).to_le_bytes()
            })
            .collect();
        w.write_all(&data).unwrap();
    }
    w.flush().unwrap();
    largest
}

/// Conversion streams a tensor at a time, so its memory follows the largest tensor, not the
/// model: a 386 MiB checkpoint (2 layers of 64 experts, largest tensor 1 MiB) converts to
/// q8_0 with a peak RSS (as sage-convert reports it) within 24 MiB of the 4 MiB tiny fixture's,
/// where holding the model would take hundreds.
#[test]
fn conversion_memory_follows_the_largest_tensor_not_the_model() {
    let dir = tmp();
    let big = dir.path().join("wide");
    let largest = write_wide_checkpoint(&big, 2, 64);
    let total = std::fs::metadata(big.join("model.safetensors")).unwrap().len();
    assert!(total > 380 << 20 && largest == 1 << 20, "{total} {largest}");
    let peak = |input: &Path, out: &str| -> f64 {
        let o = Command::new(env!("CARGO_BIN_EXE_sage-convert"))
            .args([input.to_str().unwrap(), "-o", dir.path().join(out).to_str().unwrap(), "--quant", "q8_0"])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&o.stdout);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let line = text.lines().find_map(|l| l.strip_prefix("peak RSS ")).unwrap_or_else(|| panic!("{text}"));
        line.trim_end_matches(" MiB").parse().unwrap()
    };
    let (small, wide) = (peak(&plain(), "tiny"), peak(&big, "wide-q8"));
    eprintln!("peak RSS: tiny fixture {small} MiB, {} MiB checkpoint {wide} MiB", total >> 20);
    assert!(wide <= small + 24.0, "{wide} MiB converting {} MiB (tiny: {small} MiB)", total >> 20);
    // The conversion is whole: every expert of both layers.
    let m = ModelDir::open(&dir.path().join("wide-q8")).unwrap();
    assert_eq!((m.manifest.layers.len(), m.manifest.layers[1].ids.len()), (2, 64));
}
