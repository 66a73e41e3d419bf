//! `sage chat`: an interactive conversation in the terminal. Line editing and history are
//! rustyline's; answers stream as they are made; each turn keeps the conversation's prefix in
//! the KV cache, so only the new tokens are evaluated. `/reset` starts over, `/stats` shows the
//! figures, Ctrl-C stops the current answer (a SIGINT flag the generation checks after each
//! token), Ctrl-D exits.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Context;
use rustyline::error::ReadlineError;

use super::{load_engine, print_run_stats};
use crate::chat::{ChatTemplate, Message};
use crate::engine::sampler::{Sampler, SamplerParams};
use crate::engine::{EngineOptions, Finish, GenOptions, Generation};

/// What `sage chat` is asked for.
pub struct ChatJob {
    pub system: Option<String>,
    pub chat_template: Option<PathBuf>,
    /// Most tokens per answer (default: what the context has left).
    pub max_tokens: Option<usize>,
    pub sampler: SamplerParams,
}

const HELP: &str = "/reset starts over, /stats shows the figures, /exit leaves; Ctrl-C stops an answer, Ctrl-D exits";

pub fn chat(dir: &Path, job: ChatJob, opts: EngineOptions, warm: Option<&Path>) -> anyhow::Result<()> {
    let tokenizer = super::load_tokenizer(dir)?;
    let mut engine = load_engine(dir, opts, warm)?;
    let md = engine.model_dir();
    let template = ChatTemplate::for_model(&md.base, md.config.arch(), &tokenizer, job.chat_template.as_deref())?;
    let n_ctx = engine.n_ctx();
    let mut editor = rustyline::DefaultEditor::new().context("starting the line editor")?;
    // After the editor, which catches SIGINT for itself on a terminal: this handler runs first
    // and passes the signal on (rustyline then reports it once at the next prompt, ignored).
    let stop = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGINT, stop.clone()).context("catching Ctrl-C")?;
    eprintln!("sage chat: {} with {}, {n_ctx} tokens of context. {HELP}.", dir.display(), template.origin);
    let start: Vec<Message> = job.system.iter().map(|s| Message::new("system", s)).collect();
    let mut messages = start.clone();
    let mut sampler = Sampler::new(job.sampler.clone());
    let mut last: Option<Generation> = None;
    loop {
        let line = match editor.readline("> ") {
            Ok(l) => l,
            // Ctrl-C at the prompt clears the line, as in a shell.
            Err(ReadlineError::Interrupted) => {
                eprintln!("(Ctrl-D exits)");
                continue;
            }
            // A Ctrl-C that stopped the last answer, as rustyline's handler saw it.
            Err(ReadlineError::Signal(_)) => continue,
            Err(ReadlineError::Eof) => break,
            Err(e) => return Err(e).context("reading the terminal"),
        };
        let input = line.trim();
        if input.is_empty() {
            continue;
        }
        let _ = editor.add_history_entry(input);
        match input {
            "/reset" => {
                messages = start.clone();
                engine.reset();
                last = None;
                eprintln!("(conversation cleared)");
                continue;
            }
            "/stats" => {
                match &last {
                    Some(g) => {
                        eprintln!(
                            "conversation: {} tokens in the KV cache of {n_ctx}; last prompt {} tokens, {} of them cached",
                            engine.n_past(),
                            g.prompt_tokens,
                            g.cached_tokens
                        );
                        print_run_stats(g, &engine);
                    }
                    None => eprintln!("(no answer yet)"),
                }
                continue;
            }
            "/exit" | "/quit" => break,
            "/help" => {
                eprintln!("{HELP}");
                continue;
            }
            _ => {}
        }
        messages.push(Message::new("user", &line));
        let ids = match template
            .render(&messages, true)
            .map_err(anyhow::Error::from)
            .and_then(|text| tokenizer.encode_with(&text, false).context("tokenizing the conversation"))
        {
            Ok(ids) => ids,
            Err(e) => {
                eprintln!("error: {e:#}");
                messages.pop();
                continue;
            }
        };
        if ids.len() >= n_ctx {
            eprintln!(
                "the conversation is {} tokens and the context holds {n_ctx} (--ctx): /reset to start over",
                ids.len()
            );
            messages.pop();
            continue;
        }
        let room = n_ctx - ids.len();
        let gen = GenOptions {
            max_tokens: job.max_tokens.unwrap_or(room).min(room),
            stop_ids: tokenizer.eog.clone(),
            stop: vec![],
            reuse_prefix: true,
        };
        stop.store(false, Ordering::SeqCst);
        let mut out = std::io::stdout().lock();
        let result = engine.generate(&tokenizer, &ids, &gen, &mut sampler, |_, piece| {
            let _ = out.write_all(piece.as_bytes());
            let _ = out.flush();
            !stop.load(Ordering::SeqCst)
        });
        let _ = writeln!(out);
        drop(out);
        match result {
            Ok(g) => {
                match g.stop {
                    Finish::Cancelled => eprintln!("(stopped)"),
                    Finish::MaxTokens | Finish::ContextFull => eprintln!("(length limit: {})", g.stop.as_str()),
                    _ => {}
                }
                messages.push(Message::new("assistant", &g.text));
                last = Some(g);
            }
            Err(e) => {
                eprintln!("error: {e:#}");
                messages.pop();
                engine.reset();
            }
        }
    }
    Ok(())
}
