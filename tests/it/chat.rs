//! Chat templates: the model's own, stored in base.gguf at conversion (from a checkpoint's
//! tokenizer_config.json or a GGUF input's `tokenizer.chat_template`), rendered by minijinja as
//! transformers' `apply_chat_template` renders it (tests/fixtures/chat-templates.json, made by
//! scripts/make_chat_references.py).

use std::path::{Path, PathBuf};

use sage::chat::{ChatTemplate, Message, Origin};
use sage::merge::merge;
use sage::model_dir::ModelDir;
use sage::tokenizer::Tokenizer;
use serde_json::Value;

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
