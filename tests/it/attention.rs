//! Flash attention and the KV cache types against llama.cpp (through llama-cpp-2) on the
//! merged GGUF of the same conversion, with flash attention on and the same K and V types on
//! both sides: every family's fixture, all experts resident and the smallest arena, a prompt
//! in one batch, in batches of 3, and token by token. Then gpt-oss's sliding layers in a ring
//! of their window against llama.cpp (which caches them apart) and against the full-length
//! cache.

use std::path::{Path, PathBuf};

use llama_cpp_2::context::params::KvCacheType;
use safetensors::SafeTensors;
use sage::convert::convert;
use sage::engine::{ArenaSize, Engine, EngineOptions, FlashAttn, KvType};
use sage::ggml::GgmlType;
use sage::merge::merge;

use crate::util::*;

/// The families' fixtures and their references (prompt ids only are used here).
pub(crate) const FAMILIES: [(&str, &str); 10] = [
    ("tiny-qwen3moe", "reference"),
    ("tiny-mixtral", "reference-mixtral"),
    ("tiny-olmoe", "reference-olmoe"),
    ("tiny-qwen2moe", "reference-qwen2moe"),
    ("tiny-gptoss", "reference-gptoss"),
    ("tiny-qwen35moe", "reference-qwen35moe"),
    ("tiny-qwen3next", "reference-qwen3next"),
    ("tiny-glm4moe", "reference-glm4moe"),
    ("tiny-deepseek3", "reference-deepseek3"),
    ("tiny-deepseek2", "reference-deepseek2"),
];

/// The prompts of a reference file: (name, ids).
pub(crate) fn prompts(reference: &str) -> Vec<(String, Vec<i32>)> {
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join(format!("{reference}.json"))).unwrap()).unwrap();
    let bytes = std::fs::read(fixtures().join(format!("{reference}.safetensors"))).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    meta["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let name = p["name"].as_str().unwrap().to_string();
            let t = st.tensor(&format!("{name}.ids")).unwrap();
            let ids = t.data().chunks_exact(4).map(|c| i32::from_le_bytes(c.try_into().unwrap())).collect();
            (name, ids)
        })
        .collect()
}

pub(crate) fn converted(dir: &Path, fixture: &str, ty: GgmlType) -> (PathBuf, PathBuf) {
    let out = dir.join(format!("{fixture}-{ty}"));
    convert(&fixtures().join(fixture), &out, &opts(Some(ty))).unwrap();
    let gguf = dir.join(format!("{fixture}-{ty}.gguf"));
    merge(&out, &gguf, false).unwrap();
    (out, gguf)
}

pub(crate) fn llama_kv(t: KvType) -> KvCacheType {
    match t {
        KvType::F32 => KvCacheType::F32,
        KvType::F16 => KvCacheType::F16,
        KvType::BF16 => KvCacheType::BF16,
        KvType::Q8_0 => KvCacheType::Q8_0,
        KvType::Q4_0 => KvCacheType::Q4_0,
    }
}

/// The KV types a model's heads can be cached in (q8_0 and q4_0 store a head in blocks of 32).
pub(crate) fn kv_types(head_dim: u64) -> Vec<KvType> {
    [KvType::F16, KvType::Q8_0, KvType::Q4_0]
        .into_iter()
        .filter(|t| head_dim.is_multiple_of(t.ggml().block_size()))
        .collect()
}

/// sage with flash attention on and K and V of type `kv` against llama.cpp the same way.
/// All experts resident, the graph is llama.cpp's: 0 at every split. At the smallest arena
/// the experts' sums are grouped otherwise (`util::within_engine_tol`), and a last-bit
/// difference there can move a cached K or V value across a rounding step of its type
/// (`kv_step_tol`).
fn flash_attention_matches_llama_cpp(fixture: &str, reference: &str) {
    let dir = tmp();
    let ty = GgmlType::Q8_0;
    let (model_dir, gguf) = converted(dir.path(), fixture, ty);
    let llama = load_llama(&gguf);
    let cfg = sage::model_dir::ModelDir::open(&model_dir).unwrap().config;
    let (k, n_vocab) = (cfg.n_expert_used as usize, cfg.n_vocab as usize);
    // A latent cache is kept unquantized (engine::memory::check).
    let types = if cfg.mla.is_some() { vec![KvType::F16] } else { kv_types(cfg.head_dim) };
    let mut fa_matters = 0f32;
    for &kv in &types {
        for arena in [ArenaSize::All, ArenaSize::Experts(k)] {
            let streaming = arena != ArenaSize::All;
            for batch in [512usize, 3, 1] {
                let o = EngineOptions {
                    arena,
                    threads: 2,
                    n_ctx: 256,
                    n_batch: batch,
                    k_type: kv,
                    v_type: kv,
                    flash_attn: FlashAttn::On,
                    ..Default::default()
                };
                let mut e = Engine::load(&model_dir, o).unwrap();
                assert!(e.flash_attn());
                let c =
                    LlamaCtx { kv: llama_kv(kv), flash: true, n_ubatch: batch.min(256) as u32, ..LlamaCtx::default() };
                for (name, ids) in prompts(reference) {
                    let u: Vec<u32> = ids.iter().map(|&i| i as u32).collect();
                    e.reset();
                    let (got, want) = if batch == 1 {
                        (sage_logits_split(&mut e, &u, 0), llama_logits_split(&llama, &ids, 0, c))
                    } else {
                        (rows(e.eval(&u, true).unwrap(), n_vocab), llama_logits_with(&llama, &ids, c))
                    };
                    let d = per_position(&got, &want);
                    eprintln!("{fixture} {kv} {arena:?} batch {batch} {name}: |sage - llama.cpp| {:e}", worst(&d));
                    let reordered = cfg.n_swa > 0 && batch > 1 && ids.len() > batch;
                    let ok = if reordered {
                        d.iter().all(|&x| x <= WINDOW_CELL_ORDER_TOL)
                    } else if streaming && (cfg.recurrent_layers.contains(&true) || cfg.mla.is_some()) {
                        // A latent cache gives every later position's keys and values, all
                        // heads, from one f16 row: a crossed f16 step there reaches them all,
                        // and at q8_0 moves their activations across q8 rounding steps
                        // (measured 5.1e-2, deepseek2 chat in batches of 3; with f32 weights
                        // 5.0e-4, one f16 step carried).
                        carried_rounding_step(&d, kv_step_tol(kv))
                    } else if streaming {
                        close_but_one_rounding_step(&d, kv_step_tol(kv))
                    } else {
                        d.iter().all(|&x| x == 0.0)
                    };
                    assert!(ok, "{fixture} {kv} {arena:?} batch {batch} {name}: {d:?}");
                    if batch == 512 && !streaming && kv == KvType::F16 {
                        let off = LlamaCtx { flash: false, ..c };
                        fa_matters = fa_matters.max(max_abs_diff(&got, &llama_logits_with(&llama, &ids, off)));
                    }
                }
            }
        }
    }
    // llama.cpp without flash attention gives other logits: the comparison above would fail
    // if either side did not run it.
    eprintln!("{fixture}: |sage(fa) - llama.cpp(no fa)| {fa_matters:e}");
    assert!(fa_matters > 0.0, "{fixture}: flash attention made no difference");
}

/// gpt-oss in batches of several tokens: llama.cpp's sliding-window cache reuses the cells
/// of positions that left every window (`llama_kv_cache::find_slot` starts again from cell 0
/// once most cells are free), so its cells hold positions out of order and flash attention's
/// running sums over them go in another order than sage's (cells in position order). On the
/// CPU the kernel accumulates KQ·V in f16 for an f16 V, so the order shows: measured up to
/// 6.0e-2 (chat prompt, batches of 3, from position 62 on), 0 for a single batch and token by
/// token. The window itself is held exactly by `window_kv_equals_full_length_kv`.
pub(crate) const WINDOW_CELL_ORDER_TOL: f32 = 0.1;

/// Where a streaming arena's last-bit differences in a layer's output move a cached value
/// across a rounding step of the cache's type, the logits after it move by about that step:
/// f16's as `util::F16_KV_STEP_TOL`; q8_0 and q4_0 a step of their 8-bit and 4-bit scales
/// (measured: olmoe q8_0 3.9e-3). As elsewhere, one position of a prompt may move by a q8
/// activation rounding step (`util::close_but_one_rounding_step`: measured 3.1e-2, mixtral
/// f16 KV token by token; 3.2e-2 qwen3moe q4_0 KV).
pub(crate) fn kv_step_tol(t: KvType) -> f32 {
    match t {
        KvType::F32 => 1e-4,
        KvType::F16 | KvType::BF16 => F16_KV_STEP_TOL,
        KvType::Q8_0 => 2e-2,
        KvType::Q4_0 => 1e-1,
    }
}

macro_rules! family {
    ($m:ident, $i:expr) => {
        #[test]
        fn $m() {
            let (f, r) = FAMILIES[$i];
            flash_attention_matches_llama_cpp(f, r);
        }
    };
}

family!(flash_attention_matches_llama_cpp_qwen3moe, 0);
family!(flash_attention_matches_llama_cpp_mixtral, 1);
family!(flash_attention_matches_llama_cpp_olmoe, 2);
family!(flash_attention_matches_llama_cpp_qwen2moe, 3);
family!(flash_attention_matches_llama_cpp_gptoss, 4);
family!(flash_attention_matches_llama_cpp_qwen35moe, 5);
family!(flash_attention_matches_llama_cpp_qwen3next, 6);
family!(flash_attention_matches_llama_cpp_glm4moe, 7);
family!(flash_attention_matches_llama_cpp_deepseek3, 8);
family!(flash_attention_matches_llama_cpp_deepseek2, 9);

/// gpt-oss's sliding layers (window 4) in a ring of 256 cells (the window plus a batch of 32,
/// padded as llama.cpp pads it) over a 1024-token context, on 600 tokens, so that the ring
/// wraps twice: the same logits as sliding layers with a full-length cache (`swa_full`), and
/// as llama.cpp with its window-sized cache (`swa_full` off) and its full-length one; KV
/// bytes down by the sliding layers' share. Then the prefix cache over a ring: a prefix whose window is still in the
/// ring is kept and continues as the whole run did; one whose window was written over is not.
#[test]
fn window_kv_equals_full_length_kv() {
    let dir = tmp();
    let (model_dir, gguf) = converted(dir.path(), "tiny-gptoss", GgmlType::Q8_0);
    let llama = load_llama(&gguf);
    let all: Vec<i32> = prompts("reference-gptoss").into_iter().flat_map(|(_, i)| i).collect();
    let ids: Vec<i32> = all.iter().copied().cycle().take(600).collect();
    let u: Vec<u32> = ids.iter().map(|&i| i as u32).collect();
    for (kv, fa) in [(KvType::F32, FlashAttn::Off), (KvType::F16, FlashAttn::On)] {
        let o = |swa_full| EngineOptions {
            threads: 2,
            n_ctx: 1024,
            n_batch: 32,
            k_type: kv,
            v_type: kv,
            flash_attn: fa,
            swa_full,
            ..Default::default()
        };
        let mut window = Engine::load(&model_dir, o(false)).unwrap();
        let mut full = Engine::load(&model_dir, o(true)).unwrap();
        let cfg = window.config.clone();
        let sliding = (0..cfg.n_layer).filter(|&il| cfg.is_swa(il)).count();
        assert!(sliding > 0 && sliding < cfg.n_layer as usize);
        for l in &window.state().plan().layers {
            assert_eq!(l.cells, if cfg.is_swa(l.il) { 256 } else { 1024 }, "blk.{}", l.il);
        }
        let (wb, fb) = (window.memory().kv as f64, full.memory().kv as f64);
        let want = (cfg.n_layer as usize - sliding) as f64 + sliding as f64 * 256.0 / 1024.0;
        eprintln!(
            "{kv} {fa:?}: KV {wb} bytes windowed, {fb} full length ({:.3}, expected {:.3})",
            wb / fb,
            want / cfg.n_layer as f64
        );
        assert!((wb / fb - want / cfg.n_layer as f64).abs() < 0.01, "{wb} / {fb}");

        let n_vocab = cfg.n_vocab as usize;
        let a = rows(window.eval(&u, true).unwrap(), n_vocab);
        let b = rows(full.eval(&u, true).unwrap(), n_vocab);
        let c = LlamaCtx { kv: llama_kv(kv), flash: fa == FlashAttn::On, n_ctx: 1024, n_ubatch: 32, swa_full: false };
        let l = llama_logits_with(&llama, &ids, c);
        let lf = llama_logits_with(&llama, &ids, LlamaCtx { swa_full: true, ..c });
        let (dab, dal, dbl) = (per_position(&a, &b), per_position(&a, &l), per_position(&b, &lf));
        eprintln!(
            "{kv} {fa:?}: |window - full| {:e}; against llama.cpp: window {:e}, full length {:e}; llama.cpp's |window - full| {:e}",
            worst(&dab),
            worst(&dal),
            worst(&dbl),
            max_abs_diff(&l, &lf)
        );
        if fa == FlashAttn::Off {
            // The window's cells hold the same values in another order; without flash
            // attention the sums come out the same.
            assert!(dab.iter().all(|&x| x == 0.0), "{kv}: window against full length {dab:?}");
            // llama.cpp in batches of 32 at this length: its sliding cache places cells by its
            // own search (see WINDOW_CELL_ORDER_TOL); measured 2.5e-2 at 3 of 600 positions,
            // all in the last batch, the same for its full-length cache.
            assert!(dal.iter().all(|&x| x <= ROUNDING_STEP_TOL), "{kv}: against llama.cpp {dal:?}");
        } else {
            // Flash attention sums in cell order, in f16 for an f16 V: a ring's order is not a
            // full cache's, and llama.cpp's two caches differ by as much (1.2 here). sage
            // equals llama.cpp with each, bit for bit, so the window is the same window.
            assert!(dal.iter().all(|&x| x == 0.0), "{kv}: window against llama.cpp's {dal:?}");
            assert!(dbl.iter().all(|&x| x == 0.0), "{kv}: full length against llama.cpp's {dbl:?}");
        }

        // The prefix cache: 500 of 600 kept (their window, positions 496..499, is still in
        // the ring), the rest evaluated again.
        assert_eq!(window.keep(500), 500);
        let again = rows(window.eval(&u[500..], true).unwrap(), n_vocab);
        let dk = max_abs_diff(&again, &a[500..]);
        eprintln!("{kv} {fa:?}: kept 500, evaluated again: {dk:e}");
        assert_eq!(dk, 0.0, "{kv}: the kept prefix continued otherwise");
        // 100 of 600: positions 96..99 were written over (by 352..355): nothing is kept.
        assert_eq!(window.keep(100), 0);
        assert_eq!(window.n_past(), 0);
    }
}

/// What cannot be cached is refused before anything large is allocated, with the reason: a
/// quantized V without flash attention (as llama.cpp), heads that are not whole blocks of the
/// type (gpt-oss's tiny fixture has heads of 16; q8_0 stores 32 values a block).
#[test]
fn impossible_cache_types_are_refused_clearly() {
    let dir = tmp();
    let (qwen, _) = converted(dir.path(), "tiny-qwen3moe", GgmlType::Q8_0);
    let (gptoss, _) = converted(dir.path(), "tiny-gptoss", GgmlType::Q8_0);
    let o = |k, v, flash_attn| EngineOptions {
        threads: 2,
        n_ctx: 256,
        k_type: k,
        v_type: v,
        flash_attn,
        ..Default::default()
    };
    let err = |dir: &Path, o| Engine::load(dir, o).err().map(|e| e.to_string()).unwrap_or_default();
    let e = err(&qwen, o(KvType::F16, KvType::Q8_0, FlashAttn::Off));
    assert!(e.contains("quantized V cache") && e.contains("--flash-attn on"), "{e}");
    // Auto turns it on where the CPU runs it, so the same cache loads.
    assert!(Engine::load(&qwen, o(KvType::Q8_0, KvType::Q8_0, FlashAttn::Auto)).unwrap().flash_attn());
    // A quantized K alone works without flash attention (llama.cpp allows it too).
    assert!(!Engine::load(&qwen, o(KvType::Q4_0, KvType::F16, FlashAttn::Off)).unwrap().flash_attn());
    let e = err(&gptoss, o(KvType::Q8_0, KvType::F16, FlashAttn::On));
    assert!(e.contains("q8_0 K cache") && e.contains("heads have 16"), "{e}");
}
