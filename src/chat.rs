//! Chat: a conversation rendered into a prompt by the model's own chat template, a Jinja
//! template (`tokenizer.chat_template` in base.gguf, taken from the checkpoint's
//! tokenizer_config.json or chat_template.jinja, or from a GGUF input), rendered with minijinja
//! as transformers' `apply_chat_template` renders it: `messages`, `add_generation_prompt`,
//! `bos_token`, `eos_token`, `raise_exception`, blocks trimmed (`trim_blocks`, `lstrip_blocks`)
//! and Python's string methods. `--chat-template FILE` overrides the model's; a model without
//! one gets its family's default (`arch::Arch::chat_template`). A rendered prompt holds the
//! special tokens the template writes (BOS included), so it is tokenized without adding BOS.

use std::path::{Path, PathBuf};

use minijinja::{Environment, ErrorKind};
use serde::{Deserialize, Serialize};

use crate::arch::Arch;
use crate::error::{Error, IoContext, Result};
use crate::ggml::{Gguf, GgufValue};
use crate::names::TOK_CHAT_TEMPLATE;
use crate::tokenizer::Tokenizer;

/// One message of a conversation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Message {
        Message { role: role.into(), content: content.into() }
    }
}

/// Where a chat template comes from.
#[derive(Clone, Debug, PartialEq)]
pub enum Origin {
    /// The model's own (`tokenizer.chat_template`).
    Model,
    /// `--chat-template FILE`.
    File(PathBuf),
    /// The family's default, for a model that brings none.
    Family(&'static str),
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Origin::Model => write!(f, "the model's chat template"),
            Origin::File(p) => write!(f, "chat template {}", p.display()),
            Origin::Family(family) => write!(f, "the built-in {family} chat template"),
        }
    }
}

pub struct ChatTemplate {
    env: Environment<'static>,
    pub origin: Origin,
    bos: String,
    eos: String,
}

fn template_err(origin: &Origin, e: impl std::fmt::Display) -> Error {
    Error::Template { origin: origin.to_string(), reason: e.to_string() }
}

impl ChatTemplate {
    /// Compile `source` (from `origin`), with the texts of the model's BOS and EOS tokens.
    pub fn new(source: String, origin: Origin, bos: String, eos: String) -> Result<ChatTemplate> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_function("strftime_now", |fmt: String| -> String { strftime_now(&fmt) });
        env.add_filter("tojson", tojson);
        env.add_template_owned("chat", source).map_err(|e| template_err(&origin, e))?;
        Ok(ChatTemplate { env, origin, bos, eos })
    }

    /// The template for model directory `dir` (base.gguf `g`, the family `arch`): the file
    /// `file` when given, else the model's own, else the family's default.
    pub fn for_model(g: &Gguf, arch: &dyn Arch, tokenizer: &Tokenizer, file: Option<&Path>) -> Result<ChatTemplate> {
        let text = |id: Option<u32>| id.and_then(|i| tokenizer.token_text(i)).unwrap_or_default();
        let (bos, eos) = (text(tokenizer.bos_token), text(tokenizer.eos));
        let (source, origin) = match (file, g.get(TOK_CHAT_TEMPLATE)) {
            (Some(f), _) => (std::fs::read_to_string(f).at(f)?, Origin::File(f.to_path_buf())),
            (None, Some(GgufValue::Str(t))) => (t, Origin::Model),
            (None, _) => (arch.chat_template().to_string(), Origin::Family(arch.family())),
        };
        ChatTemplate::new(source, origin, bos, eos)
    }

    /// The prompt for `messages`; with `add_generation_prompt`, ready for the assistant's turn.
    /// An error names the template (a template may refuse a conversation: roles that do not
    /// alternate, a system message it has no place for).
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        self.render_with(messages, add_generation_prompt, &serde_json::Map::new())
    }

    /// `render` with more variables for the template (`chat_template_kwargs`, as transformers'
    /// `apply_chat_template(**kwargs)` takes them: `enable_thinking` and the like). They cannot
    /// replace the conversation, the generation prompt or the special tokens.
    pub fn render_with(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
        kwargs: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<String> {
        let t = self.env.get_template("chat").map_err(|e| template_err(&self.origin, e))?;
        let ctx = minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos,
            eos_token => self.eos,
            ..minijinja::Value::from_serialize(kwargs)
        };
        t.render(ctx).map_err(|e| {
            // raise_exception's message is the template's own words.
            let reason = match e.kind() {
                ErrorKind::InvalidOperation => {
                    e.detail().unwrap_or("the template refused the conversation").to_string()
                }
                _ => e.to_string(),
            };
            Error::Template { origin: self.origin.to_string(), reason }
        })
    }
}

/// `tojson` as transformers defines it for chat templates: Python's `json.dumps` with
/// `ensure_ascii=False`, keys in their order, `", "` and `": "` separators, no HTML escaping
/// (Jinja's own filter escapes `<`, `>`, `&` and `'`); `indent` as Python's.
fn tojson(value: minijinja::Value, kwargs: minijinja::value::Kwargs) -> std::result::Result<String, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let _: Option<bool> = kwargs.get("ensure_ascii")?;
    let _: Option<bool> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;
    let v =
        serde_json::to_value(&value).map_err(|e| minijinja::Error::new(ErrorKind::BadSerialization, e.to_string()))?;
    let mut out = String::new();
    python_json(&v, indent, 0, &mut out);
    Ok(out)
}

fn python_json(v: &serde_json::Value, indent: Option<usize>, depth: usize, out: &mut String) {
    use serde_json::Value as J;
    let newline = |out: &mut String, depth: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * depth));
        }
    };
    let (item_sep, key_sep) = (if indent.is_some() { "," } else { ", " }, ": ");
    match v {
        J::Array(a) if !a.is_empty() => {
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                python_json(x, indent, depth + 1, out);
            }
            newline(out, depth);
            out.push(']');
        }
        J::Object(o) if !o.is_empty() => {
            out.push('{');
            for (i, (k, x)) in o.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                out.push_str(&J::String(k.clone()).to_string());
                out.push_str(key_sep);
                python_json(x, indent, depth + 1, out);
            }
            newline(out, depth);
            out.push('}');
        }
        other => out.push_str(&other.to_string()),
    }
}

/// The UTC date and time in a strftime format, for templates that print today's date (the
/// common specifiers only; others are left as written).
fn strftime_now(fmt: &str) -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let (days, rem) = ((secs / 86400) as i64, secs % 86400);
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719468;
    let era = z.div_euclid(146097);
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    let mut out = String::new();
    let mut chars = fmt.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => out.push_str(&y.to_string()),
            Some('m') => out.push_str(&format!("{m:02}")),
            Some('d') => out.push_str(&format!("{d:02}")),
            Some('B') => out.push_str(MONTHS[(m - 1) as usize]),
            Some('b') => out.push_str(&MONTHS[(m - 1) as usize][..3]),
            Some('H') => out.push_str(&format!("{:02}", rem / 3600)),
            Some('M') => out.push_str(&format!("{:02}", rem % 3600 / 60)),
            Some('%') => out.push('%'),
            Some(o) => {
                out.push('%');
                out.push(o);
            }
            None => out.push('%'),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chatml() -> ChatTemplate {
        let src = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";
        ChatTemplate::new(src.into(), Origin::Family("test"), String::new(), "<|im_end|>".into()).unwrap()
    }

    #[test]
    fn renders_messages_and_the_generation_prompt() {
        let m = [Message::new("system", "Be brief."), Message::new("user", "Hi")];
        assert_eq!(
            chatml().render(&m, true).unwrap(),
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        assert!(!chatml().render(&m, false).unwrap().ends_with("assistant\n"));
    }

    #[test]
    fn raise_exception_is_an_error_with_the_templates_words() {
        let src = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('Only user first!') }}{% endif %}ok";
        let t = ChatTemplate::new(src.into(), Origin::Family("test"), String::new(), String::new()).unwrap();
        let e = t.render(&[Message::new("system", "x")], true).unwrap_err().to_string();
        assert!(e.contains("Only user first!") && e.contains("built-in test chat template"), "{e}");
        assert_eq!(t.render(&[Message::new("user", "x")], true).unwrap(), "ok");
        // A template that does not compile names its origin too.
        let e = ChatTemplate::new("{% for %}".into(), Origin::Model, String::new(), String::new()).err().unwrap();
        assert!(e.to_string().contains("the model's chat template"), "{e}");
    }

    #[test]
    fn python_string_methods_and_trimmed_blocks() {
        // As jinja2 renders it with trim_blocks and lstrip_blocks: 'HI|\n'.
        let src = "{% for m in messages %}\n  {% if true %}{{ m.content.strip().upper() }}{% endif %}|\n{% endfor %}";
        let t = ChatTemplate::new(src.into(), Origin::Family("test"), String::new(), String::new()).unwrap();
        assert_eq!(t.render(&[Message::new("user", "  hi  ")], false).unwrap(), "HI|\n");
    }

    #[test]
    fn dates_for_templates() {
        let s = strftime_now("%Y-%m-%d %B %%");
        assert_eq!(s.len(), "2026-11-30 ".len() + s.split(' ').nth(1).unwrap().len() + 2);
        assert!(s.starts_with("20"), "{s}");
    }
}
