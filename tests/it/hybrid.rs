//! The hybrid families (Qwen3.5-MoE, Qwen3-Next): a recurrent state per linear-attention layer beside the
//! KV cache of the full-attention layers, against llama.cpp (through llama-cpp-2) on the merged
//! GGUF of the same conversion. The state crosses graph and batch boundaries: a prompt in
//! batches of 3 and token by token, without flash attention (`attention.rs` does it with flash
//! attention and every KV type). Then the prefix cache: a recurrent state cannot be cut back,
//! so a follow-up evaluates only its new tokens when the context is its prefix, and a
//! conversation edited in the middle is evaluated again from the start, correctly.

use sage::engine::{ArenaSize, Engine, EngineOptions};
use sage::ggml::GgmlType;

use crate::attention::{converted, prompts};
use crate::util::*;

const HYBRID: [(&str, &str); 2] =
    [("tiny-qwen35moe", "reference-qwen35moe"), ("tiny-qwen3next", "reference-qwen3next")];

/// All experts resident the graph is llama.cpp's: 0 at every split; at the smallest arena as
/// every family's streaming tolerance (`util::within_engine_tol`).
#[test]
fn recurrent_state_crosses_batches_as_in_llama_cpp() {
    for (fixture, reference) in HYBRID {
        let dir = tmp();
        for ty in [GgmlType::F32, GgmlType::Q8_0, GgmlType::Q4_K] {
            let (model_dir, gguf) = converted(dir.path(), fixture, ty);
            let llama = load_llama(&gguf);
            let cfg = sage::model_dir::ModelDir::open(&model_dir).unwrap().config;
            assert!(cfg.recurrent_layers.iter().any(|&r| r) && cfg.recurrent_layers.iter().any(|&r| !r));
            let (k, n_vocab) = (cfg.n_expert_used as usize, cfg.n_vocab as usize);
            for arena in [ArenaSize::All, ArenaSize::Experts(k)] {
                let streaming = arena != ArenaSize::All;
                for batch in [3usize, 1] {
                    let mut e = Engine::load(&model_dir, EngineOptions { n_batch: batch, ..exact(arena) }).unwrap();
                    assert!(!e.flash_attn());
                    let c = LlamaCtx { n_ubatch: batch as u32, ..LlamaCtx::default() };
                    for (name, ids) in prompts(reference) {
                        let u: Vec<u32> = ids.iter().map(|&i| i as u32).collect();
                        e.reset();
                        let (got, want) = if batch == 1 {
                            (sage_logits_split(&mut e, &u, 0), llama_logits_split(&llama, &ids, 0, c))
                        } else {
                            (rows(e.eval(&u, true).unwrap(), n_vocab), llama_logits_with(&llama, &ids, c))
                        };
                        let d = per_position(&got, &want);
                        eprintln!("{fixture} {ty} {arena:?} batch {batch} {name}: |sage - llama.cpp| {:e}", worst(&d));
                        let ok = if streaming {
                            within_engine_tol_of(&d, ty, true, false, true)
                        } else {
                            d.iter().all(|&x| x == 0.0)
                        };
                        assert!(ok, "{fixture} {ty} {arena:?} batch {batch} {name}: {d:?}");
                    }
                }
            }
        }
    }
}

/// A follow-up whose context is its prefix evaluates only the new tokens and gives the logits
/// of a fresh evaluation of the whole (all experts resident, f32: the same per-token
/// recurrence and attention, in two graphs instead of one: measured 0); a prompt that shares
/// only part of the context cannot keep a recurrent state cut back, so it is evaluated from
/// the start, and gives a fresh evaluation's logits exactly.
#[test]
fn prefix_cache_keeps_a_recurrent_state_only_whole() {
    for (fixture, reference) in HYBRID {
        let dir = tmp();
        let (model_dir, _) = converted(dir.path(), fixture, GgmlType::F32);
        let mut e = Engine::load(&model_dir, exact(ArenaSize::All)).unwrap();
        let mut fresh = Engine::load(&model_dir, exact(ArenaSize::All)).unwrap();
        let n_vocab = e.config.n_vocab as usize;
        let all = prompts(reference);
        let first: Vec<u32> = all[0].1.iter().map(|&i| i as u32).collect();
        let more: Vec<u32> = all[1].1.iter().map(|&i| i as u32).collect();
        let whole: Vec<u32> = [&first[..], &more[..]].concat();
        let want = rows(fresh.eval(&whole, true).unwrap(), n_vocab);

        // Turn one, then turn two after it: only the new tokens.
        e.eval(&first, false).unwrap();
        let before = e.stats().tokens_evaluated;
        assert_eq!(e.keep_prefix_of(&whole), first.len(), "{fixture}: the whole context is kept");
        let got = rows(e.eval(&whole[first.len()..], true).unwrap(), n_vocab);
        assert_eq!(e.stats().tokens_evaluated - before, more.len() as u64, "{fixture}: only the new tokens");
        let d = max_abs_diff(&got, &want[first.len()..]);
        eprintln!("{fixture}: second turn vs a fresh evaluation {d:e}");
        assert!(d <= engine_tol(GgmlType::F32, true), "{fixture}: {d}");

        // Edited in the middle: nothing can be kept; evaluated again from the start.
        let mut edited = whole.clone();
        edited[3] = (edited[3] + 1) % 400;
        assert_eq!(e.keep_prefix_of(&edited), 0, "{fixture}: a recurrent state is not cut back");
        let got = rows(e.eval(&edited, true).unwrap(), n_vocab);
        fresh.reset();
        let again = rows(fresh.eval(&edited, true).unwrap(), n_vocab);
        assert_eq!(max_abs_diff(&got, &again), 0.0, "{fixture}: after the edit, as a fresh evaluation");
        assert!(max_abs_diff(&got, &want) > 1e-3, "{fixture}: the edit changed the logits");
    }
}

/// `Engine::generate` checkpoints a recurrent state before the prompt's last token and after
/// the answer. The same prompt again (a regenerated answer) continues from the first: one
/// prompt token evaluated, the same greedy answer; a follow-up that keeps the answer continues
/// from the context; one that renders the history otherwise (as templates that drop an
/// answer's reasoning do) continues from the prompt's checkpoint, with a fresh evaluation's
/// logits (all experts resident, f32: measured 0).
#[test]
fn prefix_cache_continues_from_recurrent_checkpoints() {
    for (fixture, reference) in HYBRID {
        let dir = tmp();
        let (model_dir, _) = converted(dir.path(), fixture, GgmlType::F32);
        let tk = sage::tokenizer::Tokenizer::load(&model_dir).unwrap();
        let mut e = Engine::load(&model_dir, exact(ArenaSize::All)).unwrap();
        let mut fresh = Engine::load(&model_dir, exact(ArenaSize::All)).unwrap();
        let n_vocab = e.config.n_vocab as usize;
        let prompt: Vec<u32> = prompts(reference)[2].1.iter().map(|&i| i as u32).collect();
        let opts = sage::engine::GenOptions { max_tokens: 6, reuse_prefix: true, ..Default::default() };
        let greedy = || {
            sage::engine::sampler::Sampler::new(sage::engine::sampler::SamplerParams {
                temp: 0.0,
                ..Default::default()
            })
        };
        let first = e.generate(&tk, &prompt, &opts, &mut greedy(), |_, _| true).unwrap();
        let n = first.tokens.len();
        assert_eq!(n, 6);
        assert_eq!(e.checkpoints(), vec![prompt.len() - 1, prompt.len() + n - 1], "{fixture}");

        // The same prompt again: from the checkpoint before its last token.
        let before = e.stats().tokens_evaluated;
        let again = e.generate(&tk, &prompt, &opts, &mut greedy(), |_, _| true).unwrap();
        assert_eq!(again.cached_tokens, prompt.len() - 1, "{fixture}");
        assert_eq!(again.tokens, first.tokens, "{fixture}: the same answer");
        // The prompt's last token, then each answer token but the last fed back.
        assert_eq!(e.stats().tokens_evaluated - before, n as u64, "{fixture}");

        // A follow-up that keeps the answer: the whole context is its prefix.
        let follow: Vec<u32> = [&prompt[..], &first.tokens[..], &[17, 23, 42]].concat();
        assert_eq!(e.keep_prefix_of(&follow), prompt.len() + n - 1, "{fixture}");

        // One whose history differs after the prompt: back to the prompt's checkpoint.
        let other: Vec<u32> = [&prompt[..], &[(first.tokens[0] + 1) % 400, 6, 7, 8]].concat();
        let kept = e.keep_prefix_of(&other);
        assert_eq!(kept, prompt.len() - 1, "{fixture}");
        let got = rows(e.eval(&other[kept..], true).unwrap(), n_vocab);
        fresh.reset();
        let want = rows(fresh.eval(&other, true).unwrap(), n_vocab);
        let d = max_abs_diff(&got, &want[kept..]);
        eprintln!("{fixture}: from the checkpoint vs a fresh evaluation {d:e}");
        assert_eq!(d, 0.0, "{fixture}");
    }
}

/// A Qwen3.5 checkpoint as published is vision-language: the conversion keeps the text model
/// and names what it leaves out (the fixture's vision tower).
#[test]
fn the_vision_tower_is_skipped_and_named() {
    let dir = tmp();
    let out = dir.path().join("m");
    let r = sage::convert::convert(&fixtures().join("tiny-qwen35moe"), &out, &opts(Some(GgmlType::Q8_0))).unwrap();
    assert_eq!(r.skipped, vec!["model.visual.* (21 tensors): not part of the text model".to_string()]);
    let q3n =
        sage::convert::convert(&fixtures().join("tiny-qwen3next"), &dir.path().join("n"), &opts(Some(GgmlType::Q8_0)));
    assert!(q3n.unwrap().skipped.is_empty());
}
