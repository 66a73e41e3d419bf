//! A request body to `sage serve` (first byte even: `/v1/chat/completions`, odd:
//! `/v1/completions`): parsed, checked and, for a chat, rendered by chat templates the way the
//! server renders them (ChatML, Mixtral's release template with `raise_exception`, and the
//! test template that uses the Jinja of published ones: namespace, slices, tojson, keyword
//! arguments).
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use sage::chat::{ChatTemplate, Origin};
use sage::server::api::{parse, ChatRequest, CompletionRequest, Defaults};

fn templates() -> &'static [ChatTemplate] {
    static T: OnceLock<Vec<ChatTemplate>> = OnceLock::new();
    T.get_or_init(|| {
        let refs: serde_json::Value = serde_json::from_slice(sage_fuzz::CHAT_REFERENCES).expect("chat-templates.json");
        let mixtral: serde_json::Value = serde_json::from_slice(sage_fuzz::MIXTRAL_TOKENIZER_CONFIG).expect("tokenizer_config.json");
        let chatml: serde_json::Value = serde_json::from_slice(sage_fuzz::TOKENIZER_CONFIG_JSON).expect("tokenizer_config.json");
        [
            (chatml["chat_template"].as_str(), "", "<|im_end|>"),
            (mixtral["chat_template"].as_str(), "<s>", "</s>"),
            (refs["features"]["template"].as_str(), "", "<|im_end|>"),
        ]
        .into_iter()
        .map(|(src, bos, eos)| {
            ChatTemplate::new(src.expect("a template").into(), Origin::Family("fuzz"), bos.into(), eos.into())
                .expect("the templates compile")
        })
        .collect()
    })
}

fuzz_target!(init: sage_fuzz::init(), |data: &[u8]| {
    let Some((&kind, body)) = data.split_first() else { return };
    if kind % 2 == 0 {
        let Ok(req) = parse::<ChatRequest>(body) else { return };
        let _ = req.common.check(&Defaults::default());
        let Ok(messages) = req.conversation() else { return };
        let kwargs = req.chat_template_kwargs.clone().unwrap_or_default();
        for t in templates() {
            let _ = t.render_with(&messages, true, &kwargs);
        }
    } else {
        let Ok(req) = parse::<CompletionRequest>(body) else { return };
        let _ = req.common.check(&Defaults::default());
        let _ = req.check_extras();
    }
});
