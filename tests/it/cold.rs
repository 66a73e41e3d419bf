//! Cold copies of the experts (`sage-convert --cold-quant`, `sage run --cold-quant`): the
//! records a conversion writes, the checks a model directory gets when it opens, the extra
//! disk `inspect` and `footprint` report, and the engine that loads them.

use std::path::{Path, PathBuf};
use std::process::Command;

use sage::convert::{convert, ConvertOptions, ConvertReport};
use sage::engine::{ArenaSize, ColdUse, Engine, EngineOptions};
use sage::footprint::{footprint, FootprintOptions};
use sage::ggml::GgmlType;
use sage::merge::merge;
use sage::model_dir::ModelDir;

use crate::util::*;

/// The fixture with experts at `hot` (base q8_0), and cold copies at `cold` if asked.
fn convert_cold(dir: &Path, name: &str, hot: GgmlType, cold: Option<GgmlType>) -> (PathBuf, ConvertReport) {
    let out = dir.join(name);
    let o = ConvertOptions {
        quant_base: Some(GgmlType::Q8_0),
        quant_experts: Some(hot),
        cold_quant: cold,
        ..Default::default()
    };
    let r = convert(&plain(), &out, &o).unwrap();
    (out, r)
}

#[test]
fn cold_copies_are_the_records_of_a_conversion_at_the_cold_type() {
    let dir = tmp();
    for cold in [GgmlType::Q4_0, GgmlType::Q2_K] {
        let (with, r) = convert_cold(dir.path(), &format!("with-{cold}"), GgmlType::Q8_0, Some(cold));
        let (hot_only, _) = convert_cold(dir.path(), &format!("hot-{cold}"), GgmlType::Q8_0, None);
        let (at_cold, _) = convert_cold(dir.path(), &format!("at-{cold}"), cold, None);
        let (m, h, c) =
            (ModelDir::open(&with).unwrap(), ModelDir::open(&hot_only).unwrap(), ModelDir::open(&at_cold).unwrap());
        assert!(m.has_cold() && !h.has_cold() && !c.has_cold());
        assert_eq!(m.manifest.cold.len(), 2);
        for (il, l) in m.manifest.cold.iter().enumerate() {
            assert!(with.join(format!("experts/blk.{il:03}.cold.bin")).is_file());
            assert_eq!(l.types, [cold; 3]);
            assert_eq!(l.ids, m.manifest.layers[il].ids);
            assert_eq!(l.shapes, m.manifest.layers[il].shapes);
            // The cold copy is smaller than the full record: it fits the full record's slot.
            assert!(l.record_size() < m.manifest.layers[il].record_size());
        }
        assert_eq!(r.cold_bytes, m.cold_bytes());
        assert!(r.cold_bytes > 0 && r.cold_bytes < r.expert_bytes, "{} vs {}", r.cold_bytes, r.expert_bytes);
        for l in &m.manifest.layers {
            for &e in &l.ids {
                // Full records as without cold copies; cold ones as a conversion at the cold type.
                assert_eq!(
                    m.read_expert(l.il, e).unwrap(),
                    h.read_expert(l.il, e).unwrap(),
                    "layer {} expert {e}",
                    l.il
                );
                let cold_rec = m.read_cold_expert(l.il, e).unwrap();
                assert_eq!(cold_rec, c.read_expert(l.il, e).unwrap(), "{cold}: cold layer {} expert {e}", l.il);
                assert_ne!(cold_rec, m.read_expert(l.il, e).unwrap());
            }
        }
        let e = h.read_cold_expert(0, 0).unwrap_err().to_string();
        assert!(e.contains("no cold copies") && e.contains("--cold-quant"), "{e}");
    }
}

/// A damaged cold shard: the directory is refused, naming the cold shard and what is wrong.
#[test]
fn a_damaged_cold_shard_is_a_clear_error() {
    let dir = tmp();
    let (good, _) = convert_cold(dir.path(), "good", GgmlType::Q8_0, Some(GgmlType::Q4_0));
    let (same_type, _) = convert_cold(dir.path(), "same", GgmlType::Q4_0, Some(GgmlType::Q4_0));
    let fresh = |name: &str, from: &Path| {
        let out = dir.path().join(name);
        std::fs::create_dir_all(&out).unwrap();
        for f in ["base.gguf", "tokenizer.json"] {
            std::fs::copy(from.join(f), out.join(f)).unwrap();
        }
        copy_dir(&from.join("experts"), &out.join("experts"));
        out
    };
    let err = |m: &Path| ModelDir::open(m).err().expect("a damaged cold shard is refused").to_string();
    let cold0 = |m: &Path| m.join("experts/blk.000.cold.bin");

    // Truncated.
    let m = fresh("truncated", &good);
    let f = std::fs::OpenOptions::new().write(true).open(cold0(&m)).unwrap();
    let len = f.metadata().unwrap().len();
    f.set_len(len - 100).unwrap();
    let e = err(&m);
    assert!(e.contains("blk.000.cold.bin") && e.contains("truncated") && e.contains(&format!("{len}")), "{e}");

    // Missing.
    let m = fresh("missing", &good);
    std::fs::remove_file(cold0(&m)).unwrap();
    let e = err(&m);
    assert!(e.contains("blk.000.cold.bin") && e.contains("No such file"), "{e}");

    // Wrong magic.
    let m = fresh("magic", &good);
    let mut bytes = std::fs::read(cold0(&m)).unwrap();
    bytes[..8].copy_from_slice(b"NOTSAGE!");
    std::fs::write(cold0(&m), &bytes).unwrap();
    let e = err(&m);
    assert!(e.contains("blk.000.cold.bin") && e.contains("no SAGEXPRT magic"), "{e}");

    // Another layer's cold shard under this name.
    let m = fresh("layer", &good);
    std::fs::copy(m.join("experts/blk.001.cold.bin"), cold0(&m)).unwrap();
    let e = err(&m);
    assert!(e.contains("blk.000.cold.bin") && e.contains("layer 1, base.gguf says 0"), "{e}");

    // The full records' shard under the cold name (same size: the cold type is the full one).
    let m = fresh("kind", &same_type);
    std::fs::copy(m.join("experts/blk.000.bin"), cold0(&m)).unwrap();
    let e = err(&m);
    assert!(e.contains("blk.000.cold.bin") && e.contains("kind full records, base.gguf says cold records"), "{e}");

    // A cold shard of another conversion (the same cold type, so the same size).
    let m = fresh("foreign", &good);
    std::fs::copy(cold0(&same_type), cold0(&m)).unwrap();
    let e = err(&m);
    assert!(e.contains("blk.000.cold.bin") && e.contains("different conversions"), "{e}");

    // The undamaged ones open.
    ModelDir::open(&good).unwrap();
    ModelDir::open(&same_type).unwrap();
}

/// A directory without cold keys (every conversion before cold copies existed) opens as
/// before; merge writes the full-precision model whether or not there are cold copies.
#[test]
fn without_cold_keys_a_directory_opens_and_merge_ignores_cold_copies() {
    let dir = tmp();
    let (plain_dir, _) = convert_cold(dir.path(), "plain", GgmlType::Q8_0, None);
    let m = ModelDir::open(&plain_dir).unwrap();
    assert!(!m.has_cold() && m.manifest.cold.is_empty() && m.cold_bytes() == 0);
    let names: Vec<String> = std::fs::read_dir(plain_dir.join("experts"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.iter().all(|n| !n.contains("cold")), "{names:?}");

    let (cold_dir, _) = convert_cold(dir.path(), "cold", GgmlType::Q8_0, Some(GgmlType::Q2_K));
    let (a, b) = (dir.path().join("plain.gguf"), dir.path().join("cold.gguf"));
    merge(&plain_dir, &a, false).unwrap();
    merge(&cold_dir, &b, false).unwrap();
    // The same tensors, the same bytes (the metadata differs only in the conversion id).
    let (ga, gb) = (std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
    assert_eq!(ga.len(), gb.len());
    let differing = ga.iter().zip(&gb).filter(|(x, y)| x != y).count();
    assert!(differing <= 32, "{differing} bytes differ between the merges");
}

#[test]
fn inspect_and_footprint_report_the_cold_copies() {
    let dir = tmp();
    let (out, r) = convert_cold(dir.path(), "m", GgmlType::Q8_0, Some(GgmlType::Q2_K));
    let i = sage::inspect::inspect(&out).unwrap();
    assert_eq!(i.cold_bytes, r.cold_bytes);
    assert_eq!(i.cold_types["q2_K"].count, 2 * 8 * 3);
    let text = i.to_string();
    assert!(text.contains("cold copies") && text.contains("q2_K: 48 projections"), "{text}");

    let f = footprint(&out, &FootprintOptions::default()).unwrap();
    let m = f.measured.as_ref().unwrap();
    assert!(m.agree, "{f}");
    let files: u64 =
        (0..2).map(|il| std::fs::metadata(out.join(format!("experts/blk.{il:03}.cold.bin"))).unwrap().len()).sum();
    assert_eq!(m.cold_shard_file_bytes, Some(files));
    assert_eq!(m.cold_shard_computed_bytes, Some(files));
    let c = f.cold.as_ref().expect("a directory with cold copies reports them");
    assert_eq!((c.quant.as_str(), c.shard_bytes), ("q2_k", files));
    assert!(f.to_string().contains("cold copies at q2_k"), "{f}");
    // From config.json alone, with --cold-quant: the same bytes.
    let o = FootprintOptions { cold: Some(GgmlType::Q2_K), ..Default::default() };
    let fc = footprint(&plain().join("config.json"), &o).unwrap();
    assert_eq!(fc.cold.as_ref().unwrap(), c);
    assert!(footprint(&plain().join("config.json"), &FootprintOptions::default()).unwrap().cold.is_none());

    // The CLIs.
    let run = |bin: &str, args: &[&str]| {
        let o = Command::new(bin).args(args).output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let cli_out = dir.path().join("cli");
    let src = plain();
    let args = [src.to_str().unwrap(), "-o", cli_out.to_str().unwrap(), "--quant", "q8_0", "--cold-quant", "q4_0"];
    let stdout = run(env!("CARGO_BIN_EXE_sage-convert"), &args);
    assert!(stdout.contains("cold copies:"), "{stdout}");
    assert_eq!(ModelDir::open(&cli_out).unwrap().manifest.cold[1].types, [GgmlType::Q4_0; 3]);
    let stdout = run(
        env!("CARGO_BIN_EXE_sage"),
        &["footprint", plain().join("config.json").to_str().unwrap(), "--cold-quant", "q4_0"],
    );
    assert!(stdout.contains("cold copies at q4_0"), "{stdout}");
}

// ---------------------------------------------------------------------------------------------
// The engine

/// A small streaming arena (3 slots of 16 experts: prompts need several groups per layer).
fn streaming(cold: ColdUse) -> EngineOptions {
    EngineOptions { cold, ..exact(ArenaSize::Experts(3)) }
}

/// Every reference prompt's logits at every position, in one batch and in batches of 3, then
/// `steps` greedy decode steps after the first prompt; and the engine's figures.
fn run(model: &Path, o: EngineOptions, steps: usize) -> (Vec<Vec<f32>>, sage::engine::EngineStats) {
    let mut e = Engine::load(model, o).unwrap();
    let mut out = Vec::new();
    for p in reference() {
        let ids: Vec<u32> = p.ids.iter().map(|&i| i as u32).collect();
        e.reset();
        out.extend(rows(e.eval(&ids, true).unwrap(), 512));
        out.extend(sage_logits_split(&mut e, &ids, 3));
    }
    let first: Vec<u32> = reference()[0].ids.iter().map(|&i| i as u32).collect();
    e.reset();
    let mut logits = e.eval(&first, false).unwrap();
    for _ in 0..steps {
        let next = sage::engine::sampler::argmax(&logits);
        logits = e.eval(&[next], false).unwrap();
        out.push(logits.clone());
    }
    (out, e.stats())
}

fn bits(rows: &[Vec<f32>]) -> Vec<u32> {
    rows.iter().flatten().map(|x| x.to_bits()).collect()
}

/// With every load cold, the model is the one converted at the cold type: the same logits to
/// the bit (the same bytes in the slots, read through views of the same type, and each
/// token's experts summed in the same order; padding entries of weight 0 add exact zeros).
#[test]
fn every_expert_cold_gives_the_logits_of_a_model_converted_at_the_cold_type() {
    let dir = tmp();
    for cold in [GgmlType::Q4_0, GgmlType::Q2_K] {
        let (with, _) = convert_cold(dir.path(), &format!("with-{cold}"), GgmlType::Q8_0, Some(cold));
        let (at_cold, _) = convert_cold(dir.path(), &format!("at-{cold}"), cold, None);
        let (a, sa) = run(&with, streaming(ColdUse::NeverUpgrade), 8);
        let (b, sb) = run(&at_cold, streaming(ColdUse::Off), 8);
        assert_eq!(a.len(), b.len());
        let d = max_abs_diff(&a, &b);
        assert!(bits(&a) == bits(&b), "{cold}: all-cold logits differ from the {cold} model's by up to {d}");
        // The same loads, of records of the same size; every one cold, none upgraded.
        let (x, y) = (&sa.sched, &sb.sched);
        assert_eq!((x.hits, x.misses, x.bytes_read), (y.hits, y.misses, y.bytes_read), "{cold}");
        assert!(x.misses > 48, "{cold}: the arena streamed ({} misses)", x.misses);
        assert_eq!((x.cold_loads, x.upgrades), (x.misses, 0), "{cold}");
        assert_eq!((y.cold_loads, y.upgrades), (0, 0), "{cold}");
        // And they differ from the full records' logits: the cold copies were used.
        let (full, _) = run(&with, streaming(ColdUse::Off), 8);
        assert!(max_abs_diff(&a, &full) > 1e-3, "{cold}: cold logits equal the full ones");
    }
}

/// Off (the default) on a directory with cold copies: exactly the model without them. With
/// every expert resident, cold copies change nothing either.
#[test]
fn cold_off_or_every_expert_resident_is_exact() {
    let dir = tmp();
    let (with, _) = convert_cold(dir.path(), "with", GgmlType::Q8_0, Some(GgmlType::Q4_0));
    let (without, _) = convert_cold(dir.path(), "without", GgmlType::Q8_0, None);
    assert_eq!(EngineOptions::default().cold, ColdUse::Off);
    let (a, sa) = run(&with, streaming(ColdUse::Off), 8);
    let (b, sb) = run(&without, streaming(ColdUse::Off), 8);
    assert!(bits(&a) == bits(&b), "cold off differs by {}", max_abs_diff(&a, &b));
    let (x, y) = (&sa.sched, &sb.sched);
    assert_eq!((x.hits, x.misses, x.bytes_read, x.cold_loads), (y.hits, y.misses, y.bytes_read, 0));
    for o in [exact(ArenaSize::All), EngineOptions { fused: false, ..exact(ArenaSize::All) }] {
        let (x, _) = run(&without, o.clone(), 4);
        let (y, sy) = run(&with, EngineOptions { cold: ColdUse::NeverUpgrade, ..o }, 4);
        assert!(bits(&x) == bits(&y), "all resident: cold copies changed the logits by {}", max_abs_diff(&x, &y));
        assert_eq!(sy.sched.cold_loads, 0);
    }
}

/// With upgrades: a miss loads the cold record, a hit on a cold expert its full record; the
/// bytes read are exactly those loads. Fewer bytes than without cold copies on the same run.
#[test]
fn upgrades_load_full_records_of_experts_chosen_again_and_cold_copies_read_less() {
    let dir = tmp();
    let (with, _) = convert_cold(dir.path(), "with", GgmlType::Q8_0, Some(GgmlType::Q2_K));
    let md = ModelDir::open(&with).unwrap();
    let (full, cold) = (md.manifest.layers[0].record_size(), md.manifest.cold[0].record_size());
    let (off, s_off) = run(&with, streaming(ColdUse::Off), 16);
    let (up, s_up) = run(&with, streaming(ColdUse::Upgrade), 16);
    let (never, s_never) = run(&with, streaming(ColdUse::NeverUpgrade), 16);
    let (o, u, n) = (&s_off.sched, &s_up.sched, &s_never.sched);
    assert!(u.upgrades > 0, "hits on cold experts upgrade them: {u:?}");
    assert_eq!(u.cold_loads, u.misses, "every miss loads a cold record");
    assert_eq!(u.bytes_read, u.cold_loads * cold + u.upgrades * full, "{u:?}");
    assert!(u.upgrades <= u.hits);
    assert_eq!(n.bytes_read, n.misses * cold);
    assert_eq!(o.bytes_read, o.misses * full);
    // Same prompts, same arena: the cold runs read less per token.
    let per_token = |s: &sage::engine::EngineStats| s.sched.bytes_read as f64 / s.tokens_evaluated as f64;
    eprintln!(
        "bytes per token: off {:.0}, upgrade {:.0}, never-upgrade {:.0}; upgrades {} of {} hits",
        per_token(&s_off),
        per_token(&s_up),
        per_token(&s_never),
        u.upgrades,
        u.hits
    );
    assert!(per_token(&s_up) < per_token(&s_off) && per_token(&s_never) < per_token(&s_up));
    // Upgraded experts run at full precision: closer to the exact logits than all-cold.
    let (d_up, d_never) = (max_abs_diff(&up, &off), max_abs_diff(&never, &off));
    let mean = |a: &[Vec<f32>]| {
        let n: usize = a.iter().map(Vec::len).sum();
        a.iter().zip(&off).flat_map(|(x, y)| x.iter().zip(y).map(|(p, q)| (p - q).abs() as f64)).sum::<f64>() / n as f64
    };
    eprintln!("|upgrade - exact| max {d_up}, mean {}; |never - exact| max {d_never}, mean {}", mean(&up), mean(&never));
    assert!(up.iter().flatten().all(|x| x.is_finite()));
    assert!(mean(&up) < mean(&never), "upgrades do not bring the logits closer to the exact ones");
}

#[test]
fn cold_copies_are_refused_for_a_directory_without_them() {
    let dir = tmp();
    let (without, _) = convert_cold(dir.path(), "without", GgmlType::Q8_0, None);
    let e = Engine::load(&without, streaming(ColdUse::Upgrade)).err().unwrap().to_string();
    assert!(e.contains("without") && e.contains("no cold copies") && e.contains("--cold-quant"), "{e}");
    // The command line: --cold-quant, --cold-quant=never-upgrade; stats report cold loads.
    let (with, _) = convert_cold(dir.path(), "with", GgmlType::Q8_0, Some(GgmlType::Q4_0));
    let sage = |m: &Path, extra: &[&str]| {
        let mut args = vec!["run", m.to_str().unwrap(), "-p", "hello world", "-n", "4", "--arena-experts", "3"];
        args.extend_from_slice(extra);
        let o = Command::new(env!("CARGO_BIN_EXE_sage")).args(&args).output().unwrap();
        (o.status.success(), String::from_utf8_lossy(&o.stderr).into_owned())
    };
    let (ok, err) = sage(&without, &["--cold-quant"]);
    assert!(!ok && err.contains("no cold copies"), "{err}");
    let (ok, err) = sage(&with, &["--cold-quant", "--stats"]);
    assert!(ok && err.contains("cold copies:") && err.contains("misses loaded a cold record"), "{err}");
    let (ok, err) = sage(&with, &["--cold-quant=never-upgrade", "--stats"]);
    assert!(ok && err.contains("0 hits upgraded"), "{err}");
    let (ok, err) = sage(&with, &["--cold-quant=sometimes"]);
    assert!(!ok && err.contains("never-upgrade"), "{err}");
}

/// `sage eval --batch 1 --cold-quant`: a token at a time, experts chosen again are hits, and
/// hits on cold experts upgrade them; in one batch per window every load is a miss.
#[test]
fn eval_reports_cold_loads_and_upgrades() {
    let dir = tmp();
    let (with, _) = convert_cold(dir.path(), "with", GgmlType::Q8_0, Some(GgmlType::Q4_0));
    let text = dir.path().join("text.txt");
    let words: Vec<String> = reference().iter().map(|p| p.text.clone()).collect();
    std::fs::write(&text, words.join(" ").repeat(4)).unwrap();
    let eval = |batch: &str| -> serde_json::Value {
        let args = ["eval", with.to_str().unwrap(), "--text", text.to_str().unwrap(), "--ctx", "32", "--batch", batch];
        let more = ["--arena-experts", "4", "--cold-quant", "--json", "--threads", "2"];
        let o = Command::new(env!("CARGO_BIN_EXE_sage")).args(args).args(more).output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_slice(&o.stdout).unwrap()
    };
    let (one, all) = (eval("1"), eval("32"));
    assert!(one["upgrades"].as_u64().unwrap() > 0 && one["expert_hit_rate"].as_f64().unwrap() > 0.0, "{one}");
    assert!(one["cold_loads"].as_u64().unwrap() > 0, "{one}");
    assert!(all["cold_loads"].as_u64().unwrap() > 0, "{all}");
    assert!(one["perplexity"]["ppl"].as_f64().unwrap().is_finite());
}

/// Rows that do not fit the cold type's blocks fall back as the full records do, and are
/// reported: the 128-expert model's down projections have rows of 64.
#[test]
fn cold_copies_fall_back_like_the_experts_and_say_so() {
    let dir = tmp();
    let conv = |name: &str, o: ConvertOptions| convert(&bundled128(), &dir.path().join(name), &o).unwrap();
    let with = conv("with", ConvertOptions { cold_quant: Some(GgmlType::Q2_K), ..Default::default() });
    let at = conv("at", ConvertOptions { quant_experts: Some(GgmlType::Q2_K), ..Default::default() });
    let cold_falls: Vec<&String> = with.fallbacks.iter().filter(|f| f.contains("(cold copy)")).collect();
    assert_eq!(cold_falls.len(), 4, "{:?}", with.fallbacks);
    assert!(
        cold_falls[0]
            .contains("blk.0.ffn_down_exps.weight (cold copy): rows of 64 do not fit q2_K blocks of 256; using q4_0"),
        "{cold_falls:?}"
    );
    let (m, c) = (ModelDir::open(&with.out).unwrap(), ModelDir::open(&at.out).unwrap());
    assert_eq!(m.manifest.cold[0].types, [GgmlType::Q2_K, GgmlType::Q2_K, GgmlType::Q4_0]);
    assert_eq!(m.manifest.cold[3].types, c.manifest.layers[3].types);
    for (il, e) in [(0, 0), (1, 77), (3, 127)] {
        assert_eq!(m.read_cold_expert(il, e).unwrap(), c.read_expert(il, e).unwrap(), "layer {il} expert {e}");
    }
}
