//! Chat templates: the model's own, stored in base.gguf at conversion (from a checkpoint's
//! tokenizer_config.json or a GGUF input's `tokenizer.chat_template`), rendered by minijinja as
//! transformers' `apply_chat_template` renders it (tests/fixtures/chat-templates.json, made by
//! scripts/make_chat_references.py).

use std::path::{Path, PathBuf};

use sage::chat::{ChatTemplate, Message, Origin};
use sage::merge::merge;
use sage::model_dir::ModelDir;
use sage::tokenizer::Tokenizer;
use serde_json::{json, Value};

use crate::util::*;

fn references() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join("chat-templates.json")).unwrap()).unwrap()
}

fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn template_of(model_dir: &Path, file: Option<&Path>) -> ChatTemplate {
    let md = ModelDir::open(model_dir).unwrap();
    let tk = Tokenizer::load(model_dir).unwrap();
    ChatTemplate::for_model(&md.base, md.config.arch(), &tk, file).unwrap()
}

fn messages(v: &Value) -> Vec<Message> {
    serde_json::from_value(v.clone()).unwrap()
}

/// Every conversation of the references rendered by `t` as transformers rendered it for `model`:
/// the same text, or an error carrying the template's own message where it refused.
fn renders_like_transformers(t: &ChatTemplate, refs: &Value, model: &str) {
    let want = &refs["models"][model];
    let mut checked = 0;
    for c in refs["conversations"].as_array().unwrap() {
        let name = c["name"].as_str().unwrap();
        let got = t.render(&messages(&c["messages"]), c["add_generation_prompt"].as_bool().unwrap());
        match (&want[name]["text"], got) {
            (Value::String(w), Ok(g)) => assert_eq!(&g, w, "{model} {name}"),
            (Value::Null, Err(e)) => {
                let w = want[name]["error"].as_str().unwrap();
                assert!(e.to_string().contains(w), "{model} {name}: {e} should say {w:?}");
            }
            (w, g) => panic!("{model} {name}: transformers gave {:?}, sage {g:?}", want[name].get("text").or(Some(w))),
        }
        checked += 1;
    }
    assert!(checked >= 5);
}

#[test]
fn every_models_template_renders_as_transformers_renders_it() {
    let refs = references();
    let models = refs["models"].as_object().unwrap();
    assert_eq!(models.len(), 6);
    for model in models.keys() {
        let dir = tmp();
        let (out, _) = convert_into(&repo(model), dir.path(), &opts(None));
        let t = template_of(&out, None);
        assert_eq!(t.origin, Origin::Model, "{model}");
        renders_like_transformers(&t, &refs, model);
    }
}

#[test]
fn a_gguf_inputs_template_survives_merge_and_conversion() {
    let refs = references();
    let model = "tests/fixtures/tiny-mixtral";
    let dir = tmp();
    let (first, _) = convert_into(&repo(model), &dir.path().join("a"), &opts(None));
    let gguf = dir.path().join("merged.gguf");
    merge(&first, &gguf, false).unwrap();
    let (second, _) = convert_into(&gguf, &dir.path().join("b"), &opts(None));
    let t = template_of(&second, None);
    assert_eq!(t.origin, Origin::Model);
    renders_like_transformers(&t, &refs, model);
}

/// The constructs published templates use (Qwen3's: namespace, reversed slices, tests, tojson,
/// string methods with arguments, keyword arguments such as enable_thinking).
#[test]
fn jinja_features_of_published_templates_render_as_in_transformers() {
    let f = &references()["features"];
    let t = ChatTemplate::new(
        f["template"].as_str().unwrap().into(),
        Origin::Family("test"),
        f["bos_token"].as_str().unwrap().into(),
        f["eos_token"].as_str().unwrap().into(),
    )
    .unwrap();
    for c in f["conversations"].as_array().unwrap() {
        let name = c["name"].as_str().unwrap();
        let got = t.render_with(
            &messages(&c["messages"]),
            c["add_generation_prompt"].as_bool().unwrap(),
            c["kwargs"].as_object().unwrap(),
        );
        match (&c["text"], got) {
            (Value::String(w), Ok(g)) => assert_eq!(&g, w, "{name}"),
            (Value::Null, Err(e)) => assert!(e.to_string().contains(c["error"].as_str().unwrap()), "{name}: {e}"),
            (w, g) => panic!("{name}: transformers gave {w:?} / {:?}, sage {g:?}", c["error"]),
        }
    }
}

#[test]
fn a_template_file_overrides_and_a_model_without_one_gets_its_familys() {
    let dir = tmp();
    // The Qwen3 fixture without its template.
    let src = dir.path().join("src");
    copy_dir(&plain(), &src);
    let tc = src.join("tokenizer_config.json");
    let mut cfg: Value = serde_json::from_str(&std::fs::read_to_string(&tc).unwrap()).unwrap();
    cfg.as_object_mut().unwrap().remove("chat_template");
    std::fs::write(&tc, serde_json::to_string(&cfg).unwrap()).unwrap();
    let (out, _) = convert_into(&src, dir.path(), &opts(None));
    let m = [Message::new("system", "S"), Message::new("user", "U")];
    let t = template_of(&out, None);
    assert_eq!(t.origin, Origin::Family("Qwen3-MoE"));
    assert_eq!(
        t.render(&m, true).unwrap(),
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n"
    );
    let file = dir.path().join("mine.jinja");
    std::fs::write(&file, "{% for m in messages %}[{{ m.role }}|{{ m.content }}]{% endfor %}{{ eos_token }}").unwrap();
    let t = template_of(&out, Some(&file));
    assert_eq!(t.origin, Origin::File(file.clone()));
    assert_eq!(t.render(&m, true).unwrap(), "[system|S][user|U]<|im_end|>");
    // A template that does not compile is an error naming the file.
    std::fs::write(&file, "{% for m in messages %}").unwrap();
    let md = ModelDir::open(&out).unwrap();
    let e = ChatTemplate::for_model(&md.base, md.config.arch(), &Tokenizer::load(&out).unwrap(), Some(&file))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("mine.jinja"), "{e}");
}

/// `sage chat` in a pseudo-terminal, as a person types: two turns (the second finds the first
/// in the KV cache), /stats, /reset, Ctrl-C stopping a long answer, Ctrl-D leaving.
#[test]
fn sage_chat_in_a_terminal_two_turns_reset_ctrl_c_and_ctrl_d() {
    use expectrl::{ControlCode, Eof, Regex, Session, WaitStatus};
    use std::time::Duration;

    let dir = tmp();
    let (model, _) = convert_into(&bundled(), dir.path(), &opts(None));
    let sage = env!("CARGO_BIN_EXE_sage");
    let question = "And God said unto Moses,";
    // The first answer as `sage run --chat` gives it.
    let out = std::process::Command::new(sage)
        .args(["run", model.to_str().unwrap(), "--chat", "--prompt", question, "--temp", "0", "-n", "12", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let lines: Vec<Value> =
        String::from_utf8(out.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let want: String = lines.iter().filter_map(|v| v["text"].as_str()).collect();
    let p1 = lines.last().unwrap()["stats"]["prompt_tokens"].as_u64().unwrap();
    assert!(want.trim().len() > 5, "{want:?}");

    let spawn = |n: &str| {
        let mut cmd = std::process::Command::new(sage);
        cmd.args(["chat", model.to_str().unwrap(), "--temp", "0", "--threads", "2", "-n", n]).env("TERM", "xterm");
        let mut s = Session::spawn(cmd).unwrap();
        s.set_expect_timeout(Some(Duration::from_secs(60)));
        s.expect("Ctrl-D exits").unwrap();
        s.expect("> ").unwrap();
        s
    };
    let text = |b: &[u8]| String::from_utf8_lossy(b).replace("\r\n", "\n");

    let mut s = spawn("12");
    s.send_line(question).unwrap();
    let turn = s.expect("> ").unwrap();
    assert!(text(turn.before()).contains(&want), "{:?} should hold {want:?}", text(turn.before()));
    s.send_line("And Moses answered,").unwrap();
    s.expect("> ").unwrap();
    s.send_line("/stats").unwrap();
    let stats = s.expect(Regex(r"last prompt (\d+) tokens, (\d+) of them cached")).unwrap();
    let num = |i| String::from_utf8_lossy(stats.get(i).unwrap()).parse::<u64>().unwrap();
    // The first turn's prompt and its answer but the last token were in the cache.
    assert_eq!(num(2), p1 + 11);
    assert!(num(1) > num(2));
    s.expect("> ").unwrap();
    s.send_line("/reset").unwrap();
    s.expect("(conversation cleared)").unwrap();
    s.expect("> ").unwrap();
    s.send_line("/stats").unwrap();
    s.expect("(no answer yet)").unwrap();
    s.expect("> ").unwrap();
    // After /reset the first turn is answered as from a fresh start.
    s.send_line(question).unwrap();
    let turn = s.expect("> ").unwrap();
    assert!(text(turn.before()).contains(&want), "{:?} should hold {want:?}", text(turn.before()));
    s.send(ControlCode::EndOfTransmission).unwrap();
    s.expect(Eof).unwrap();
    assert!(matches!(s.get_process().wait().unwrap(), WaitStatus::Exited(_, 0)));

    // Ctrl-C stops a long answer; the chat goes on.
    let mut s = spawn("3000");
    s.send_line(question).unwrap();
    s.expect(question).unwrap(); // the echo
    s.expect(want.trim().lines().last().unwrap()).unwrap(); // the answer has begun
    s.send(ControlCode::EndOfText).unwrap();
    s.expect("(stopped)").unwrap();
    s.expect("> ").unwrap();
    s.send_line("/stats").unwrap();
    let stats = s.expect(Regex(r"generated: (\d+) tokens")).unwrap();
    let generated: u64 = String::from_utf8_lossy(stats.get(1).unwrap()).parse().unwrap();
    assert!(generated < 3000, "{generated} tokens after Ctrl-C");
    s.expect("> ").unwrap();
    s.send(ControlCode::EndOfTransmission).unwrap();
    s.expect(Eof).unwrap();
    assert!(matches!(s.get_process().wait().unwrap(), WaitStatus::Exited(_, 0)));
}

/// Text streamed a token at a time never splits a UTF-8 character (a piece holds no U+FFFD
/// where the whole text has none) and adds up to the whole decode, for each tokenizer kind:
/// Qwen2 byte-level BPE, GPT-NeoX byte-level BPE (OLMoE), SentencePiece with byte fallback
/// (Mixtral).
#[test]
fn streamed_text_never_splits_a_character_and_adds_up_to_the_whole() {
    let texts = [
        "caf\u{e9} na\u{ef}ve \u{fc}ber d\u{e9}j\u{e0} vu",
        "\u{65e5}\u{672c}\u{8a9e} \u{4e2d}\u{6587} \u{1F600}\u{1F389}\u{1F468}\u{200D}\u{1F469}\u{200D}\u{1F467}",
        "\u{43f}\u{440}\u{438}\u{432}\u{435}\u{442} \u{43c}\u{438}\u{440} \u{395}\u{3bb}\u{3bb}\u{3ac}\u{3b4}\u{3b1} \u{2014} \u{201c}q\u{201d}",
        "The quick brown fox\n\n  jumps\tover \u{2603} the lazy dog.",
    ];
    for family in ["tiny-qwen3moe", "tiny-olmoe", "tiny-mixtral"] {
        let dir = tmp();
        let (model, _) = convert_into(&fixtures().join(family), dir.path(), &opts(None));
        let tk = Tokenizer::load(&model).unwrap();
        for text in texts {
            // A first token that is a whole word, as a prompt's last token is the context of
            // the first piece.
            let text = format!("Say: {text}");
            let ids = tk.encode_with(&text, false).unwrap();
            assert!(ids.len() > 4, "{family} {text:?}");
            let whole = tk.decode(&ids).unwrap();
            assert!(!whole.contains('\u{FFFD}'), "{family}: {whole:?}");
            let mut d = sage::tokenizer::Detokenizer::new(&tk, &ids[..1]);
            let mut streamed = String::new();
            for &id in &ids[1..] {
                let piece = d.push(id).unwrap();
                assert!(!piece.contains('\u{FFFD}'), "{family} {text:?}: piece {piece:?}");
                streamed.push_str(&piece);
            }
            streamed.push_str(&d.flush().unwrap());
            assert_eq!(tk.decode(&ids[..1]).unwrap() + &streamed, whole, "{family} {text:?}");
        }
    }
}

/// generation_config.json's `eos_token_id` list ends a generation: every id of it, not only the
/// tokenizer's EOS. The fixture's list gets a token greedy decoding makes at step k (its first
/// time); generation then stops before it (`Finish::Eos`), with the k tokens before.
#[test]
fn every_eos_id_of_generation_config_ends_a_generation() {
    use sage::engine::sampler::{Sampler, SamplerParams};
    use sage::engine::{ArenaSize, Engine, EngineOptions, Finish, GenOptions};
    let dir = tmp();
    let (model, _) = convert_into(&plain(), &dir.path().join("a"), &opts(None));
    let tk = Tokenizer::load(&model).unwrap();
    let prompt = tk.encode("The quick brown fox").unwrap();
    let o = || EngineOptions { arena: ArenaSize::All, threads: 2, n_ctx: 64, ..Default::default() };
    let greedy = || Sampler::new(SamplerParams { temp: 0.0, ..Default::default() });
    let free = GenOptions { max_tokens: 8, ..Default::default() };
    let g = Engine::load(&model, o()).unwrap().generate(&tk, &prompt, &free, &mut greedy(), |_, _| true).unwrap();
    // The first token after the first that greedy decoding had not made before.
    let k = (1..8).find(|&k| !g.tokens[..k].contains(&g.tokens[k]) && !tk.eog.contains(&g.tokens[k])).unwrap();
    let end = g.tokens[k];

    let src = dir.path().join("src");
    copy_dir(&plain(), &src);
    let eos = tk.eos.unwrap();
    std::fs::write(src.join("generation_config.json"), json!({"eos_token_id": [eos, end]}).to_string()).unwrap();
    let (model, _) = convert_into(&src, &dir.path().join("b"), &opts(None));
    let tk = Tokenizer::load(&model).unwrap();
    assert!(tk.eog.contains(&end) && tk.eog.contains(&eos), "{:?}", tk.eog);
    let stop = GenOptions { max_tokens: 8, stop_ids: tk.eog.clone(), ..Default::default() };
    let g2 = Engine::load(&model, o()).unwrap().generate(&tk, &prompt, &stop, &mut greedy(), |_, _| true).unwrap();
    assert_eq!((g2.stop, &g2.tokens[..]), (Finish::Eos, &g.tokens[..k]));
    // An id outside the vocabulary is refused at conversion, naming the file.
    std::fs::write(src.join("generation_config.json"), json!({"eos_token_id": [eos, 1 << 30]}).to_string()).unwrap();
    let e = sage::convert::convert(&src, &dir.path().join("c"), &opts(None)).unwrap_err().to_string();
    assert!(e.contains("generation_config.json") && e.contains("outside the vocabulary"), "{e}");
}
