//! Levers that trade output quality for fewer expert reads, and their quality gates:
//! cache-aware routing (`--cache-bias`), `sage eval`'s comparison with exact routing, `sage tune`.

use std::path::{Path, PathBuf};

use sage::convert::ConvertOptions;
use sage::engine::router::{route, CacheBias};
use sage::engine::{ArenaSize, Engine, EngineOptions};
use sage::ggml::GgmlType;

use crate::util::*;

fn converted(dir: &Path, pool: Option<Vec<u32>>) -> PathBuf {
    let out = dir.join("m");
    sage::convert::convert(&plain(), &out, &ConvertOptions { experts: pool, ..opts(Some(GgmlType::Q8_0)) }).unwrap();
    out
}

/// A prompt in one batch, then decode steps: every position's logits, and the scheduler's
/// misses.
fn run(model_dir: &Path, o: EngineOptions, ids: &[u32]) -> (Vec<Vec<f32>>, u64) {
    let mut e = Engine::load(model_dir, o).unwrap();
    assert!(!e.all_resident());
    let logits = sage_logits_split(&mut e, ids, 5);
    (logits, e.stats().sched.misses)
}

fn ids(n: usize) -> Vec<u32> {
    (0..n).map(|i| (i * 37 % 400) as u32 + 3).collect()
}

/// Bias 0 is exact routing, bit for bit, whatever the other settings of the lever: the same
/// logits at every position and the same misses as an engine that never heard of it.
#[test]
fn cache_bias_zero_is_bit_identical_to_exact_routing() {
    let dir = tmp();
    let m = converted(dir.path(), None);
    let ids = ids(40);
    let (want, want_misses) = run(&m, exact(ArenaSize::Experts(3)), &ids);
    let cb = CacheBias { bias: 0.0, keep: 0, floor: Some(0.0) };
    let (got, misses) = run(&m, EngineOptions { cache_bias: cb, ..exact(ArenaSize::Experts(3)) }, &ids);
    assert_eq!(got, want);
    assert_eq!(misses, want_misses);
}

/// With a bias, every chosen expert is in the pool, and one outside the router's exact top-k
/// has at least the floor's probability; the router's top expert is always kept; misses fall
/// and the output moves (the lever does something). Checked per token and layer from the
/// engine's own trace of its choices and router logits.
#[test]
fn cache_bias_stays_in_the_pool_above_the_floor_and_cuts_misses() {
    let dir = tmp();
    let pool = vec![0, 2, 3, 5, 6, 7];
    let m = converted(dir.path(), Some(pool.clone()));
    let ids = ids(64);
    let slots = ArenaSize::Experts(4);
    let (want, exact_misses) = run(&m, exact(slots), &ids);
    for floor in [None, Some(0.15)] {
        let cb = CacheBias { bias: 4.0, keep: 1, floor };
        let mut e = Engine::load(&m, EngineOptions { cache_bias: cb, ..exact(slots) }).unwrap();
        e.start_trace(true).unwrap();
        let got = sage_logits_split(&mut e, &ids, 5);
        let misses = e.stats().sched.misses;
        let t = e.take_trace().unwrap();
        let (n_exp, k) = (t.n_expert, t.n_expert_used);
        let present: Vec<bool> = (0..n_exp as u32).map(|x| pool.contains(&x)).collect();
        let floor = floor.unwrap_or(1.0 / pool.len() as f32);
        let logits = t.router_logits.as_ref().unwrap();
        let (mut substituted, mut checked) = (0, 0);
        for (il, layer_logits) in logits.iter().enumerate() {
            for tok in 0..t.n_tokens() {
                let l = &layer_logits[tok * n_exp..(tok + 1) * n_exp];
                let exact = route(l, &present, k, true);
                let p = route(l, &present, n_exp, false); // every pooled expert's probability
                let chosen = t.token(il, tok);
                assert!(chosen.contains(&exact.experts[0]), "blk.{il} token {tok}: the top expert was dropped");
                for e in chosen {
                    assert!(pool.contains(e), "blk.{il} token {tok}: expert {e} is outside the pool");
                    if !exact.experts.contains(e) {
                        substituted += 1;
                        let pe = p.weights[p.experts.iter().position(|x| x == e).unwrap()];
                        assert!(pe >= floor, "blk.{il} token {tok}: expert {e} has p {pe} below the floor {floor}");
                    }
                    checked += 1;
                }
            }
        }
        assert!(substituted > 0 && checked == t.n_layer * t.n_tokens() * k, "{substituted} of {checked}");
        assert!(misses < exact_misses, "floor {floor}: {misses} misses with the bias, {exact_misses} without");
        assert_ne!(got, want, "the bias changed no output");
    }
}

fn sage(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_sage")).args(args).output().unwrap()
}

fn text(dir: &Path) -> PathBuf {
    let p = dir.join("text.txt");
    let s: String = (0..24).map(|i| format!("The {i} cats sat on {} mats and ", i * 7 % 13)).collect();
    std::fs::write(&p, s).unwrap();
    p
}

/// `sage eval --cache-bias` compares with exact routing over the same windows: the exact
/// perplexity it reports is `sage eval`'s without the bias, the quality gates are in range
/// and the bias reads fewer bytes.
#[test]
fn eval_with_a_bias_reports_the_quality_gates_against_exact_routing() {
    let dir = tmp();
    let m = converted(dir.path(), None);
    let text = text(dir.path());
    let eval = |extra: &[&str]| {
        let mut args = vec!["eval", m.to_str().unwrap(), "--text", text.to_str().unwrap(), "--ctx", "32"];
        args.extend_from_slice(&["--arena-experts", "3", "--batch", "1", "--json", "-t", "1"]);
        args.extend_from_slice(extra);
        let out = sage(&args);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let plain = eval(&[]);
    assert!(plain["against_exact_routing"].is_null());
    let biased = eval(&["--cache-bias", "3"]);
    let a = &biased["against_exact_routing"];
    let ref_ppl = a["reference_ppl"].as_f64().unwrap();
    let exact_ppl = plain["perplexity"]["ppl"].as_f64().unwrap();
    assert!((ref_ppl - exact_ppl).abs() <= 1e-9 * exact_ppl, "{ref_ppl} vs {exact_ppl}");
    let (top1, kl) = (a["top1"].as_f64().unwrap(), a["mean_kl"].as_f64().unwrap());
    assert!((0.0..1.0).contains(&top1) && kl > 0.0, "top-1 {top1}, KL {kl}");
    assert_eq!(a["positions"], biased["perplexity"]["tokens_scored"]);
    let bpt = |v: &serde_json::Value| v["bytes_per_token"].as_f64().unwrap();
    assert!(bpt(&biased) < bpt(&plain), "{} vs {}", bpt(&biased), bpt(&plain));
}

/// `sage tune` measures exact routing and each bias, and picks the fewest bytes per token
/// among those within the budget: with no perplexity allowed above exact routing's, none of
/// the biases that cost perplexity; with 100%, the cheapest of all.
#[test]
fn tune_picks_the_fewest_bytes_within_the_budget() {
    let dir = tmp();
    let m = converted(dir.path(), None);
    let text = text(dir.path());
    let tune = |max_ppl: &str| {
        let out = sage(&[
            "tune",
            m.to_str().unwrap(),
            "--text",
            text.to_str().unwrap(),
            "--ctx",
            "32",
            "--arena-experts",
            "3",
            "--batch",
            "1",
            "--biases",
            "0.5,2,8",
            "--max-ppl",
            max_ppl,
            "--json",
            "-t",
            "1",
        ]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    for max_ppl in ["0%", "100%"] {
        let v = tune(max_ppl);
        let trials = v["tune"]["trials"].as_array().unwrap();
        assert_eq!(trials.len(), 4);
        let bpt = |t: &serde_json::Value| t["bytes_per_token"].as_f64().unwrap();
        let ppl = |t: &serde_json::Value| t["ppl"].as_f64().unwrap();
        let limit = ppl(&trials[0]) * (1.0 + if max_ppl == "0%" { 0.0 } else { 1.0 });
        for t in trials {
            assert_eq!(t["within"].as_bool().unwrap(), ppl(t) <= limit, "{t}");
        }
        let best = &trials[v["tune"]["best"].as_u64().unwrap() as usize];
        let cheapest = trials.iter().filter(|t| ppl(t) <= limit).map(bpt).fold(f64::INFINITY, f64::min);
        assert_eq!(bpt(best), cheapest);
        let flags = v["flags"].as_str().unwrap();
        match best["cache_bias"].as_f64().unwrap() {
            0.0 => assert!(flags.contains("exact: no lever"), "{flags}"),
            b => assert!(flags.contains(&format!("--cache-bias {b}")), "{flags}"),
        }
        if max_ppl == "100%" {
            assert!(bpt(best) < bpt(&trials[0]), "a bias of 8 reads fewer bytes than exact routing");
        }
    }
}

/// With cold copies in the directory, `sage tune` also tries them (upgraded on reuse, and never
/// upgraded), alone and with each bias, and names the flag of the one it picks.
#[test]
fn tune_tries_cold_copies_where_the_directory_has_them() {
    let dir = tmp();
    let m = dir.path().join("m");
    let o = ConvertOptions { cold_quant: Some(GgmlType::Q4_0), ..opts(Some(GgmlType::Q8_0)) };
    sage::convert::convert(&plain(), &m, &o).unwrap();
    let text = text(dir.path());
    let out = sage(&[
        "tune",
        m.to_str().unwrap(),
        "--text",
        text.to_str().unwrap(),
        "--ctx",
        "32",
        "--arena-experts",
        "3",
        "--batch",
        "1",
        "--biases",
        "2",
        "--max-ppl",
        "100%",
        "--json",
        "-t",
        "1",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let trials = v["tune"]["trials"].as_array().unwrap();
    let kinds: Vec<(f64, &str)> =
        trials.iter().map(|t| (t["cache_bias"].as_f64().unwrap(), t["cold"].as_str().unwrap())).collect();
    assert_eq!(
        kinds,
        vec![
            (0.0, "off"),
            (2.0, "off"),
            (0.0, "upgrade"),
            (2.0, "upgrade"),
            (0.0, "never-upgrade"),
            (2.0, "never-upgrade")
        ]
    );
    let bpt = |t: &serde_json::Value| t["bytes_per_token"].as_f64().unwrap();
    // Cold copies read fewer bytes than full records at the same bias.
    assert!(bpt(&trials[2]) < bpt(&trials[0]) && bpt(&trials[4]) < bpt(&trials[2]));
    let best = &trials[v["tune"]["best"].as_u64().unwrap() as usize];
    let flags = v["flags"].as_str().unwrap();
    match best["cold"].as_str().unwrap() {
        "never-upgrade" => assert!(flags.contains("--cold-quant=never-upgrade"), "{flags}"),
        "upgrade" => assert!(flags.contains("--cold-quant") && !flags.contains("never"), "{flags}"),
        _ => assert!(!flags.contains("--cold-quant"), "{flags}"),
    }
}

/// `sage tune --ram X`, `sage plan --ram X` and `sage run --memory X` split X the same way, to
/// the byte (one function, `Engine::fit_memory`): the same budget, the same arena slots; a RAM
/// that cannot hold one token's experts is a clear error naming the smallest that can.
#[test]
fn tune_plan_and_run_agree_on_a_ram_budget() {
    let dir = tmp();
    let m = converted(dir.path(), None);
    let ms = m.to_str().unwrap();
    let text = text(dir.path());
    let state = ["--ctx", "32", "--batch", "1", "-t", "1"];
    let tune = |ram: &str| {
        let args = ["tune", ms, "--text", text.to_str().unwrap(), "--ram", ram, "--biases", "2", "--json"];
        sage(&[&args[..], &state[..]].concat())
    };
    let plan = |ram: &str| -> serde_json::Value {
        let o = sage(&[&["plan", ms, "--ram", ram, "--disk", "1GB", "--json"][..], &state[..]].concat());
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_slice(&o.stdout).unwrap()
    };
    let out = tune("1MiB");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("does not hold this model") && err.contains("give --memory "), "{err}");
    // One token's experts and 3 more.
    let p = plan("1GiB");
    let ram = p["min_ram_bytes"].as_u64().unwrap() + 3 * p["slot_bytes"].as_u64().unwrap();
    let rs = ram.to_string();
    let p = plan(&rs);
    let k = p["n_expert_used"].as_u64().unwrap();
    assert_eq!(p["slots"].as_u64().unwrap(), k + 3, "{p}");
    let out = tune(&rs);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["tune"]["arena_slots"].as_u64().unwrap(), k + 3);
    assert!(v["flags"].as_str().unwrap().starts_with("--arena "), "{}", v["flags"]);
    let args = ["run", ms, "--memory", &rs, "--prompt", "hello", "-n", "2", "--json"];
    let out = sage(&[&args[..], &state[..]].concat());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let last: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&out.stdout).lines().last().unwrap()).unwrap();
    let st = &last["stats"];
    assert_eq!(st["arena_slots"].as_u64().unwrap(), k + 3, "{st}");
    assert_eq!(st["budget"], p["budget"], "run's budget is plan's");
}
