//! `sage serve`: load the model on the engine thread, then serve the OpenAI API until SIGINT or
//! SIGTERM (the work is the `server` module's).

use std::io::Write;
use std::path::{Path, PathBuf};

use super::load_engine;
use crate::engine::sampler::SamplerParams;
use crate::engine::EngineOptions;
use crate::server::{self, api::Defaults, ServeOptions};

/// What `sage serve` is asked for.
pub struct ServeJob {
    pub host: String,
    pub port: u16,
    pub api_key: Option<String>,
    /// The model's name for clients (default: the directory's).
    pub alias: Option<String>,
    pub chat_template: Option<PathBuf>,
    pub max_body: usize,
    pub max_queue: usize,
    /// Sampling for requests that do not say.
    pub sampler: SamplerParams,
    pub seed: Option<u64>,
}

pub fn serve(dir: &Path, job: ServeJob, opts: EngineOptions, warm: Option<&Path>) -> anyhow::Result<()> {
    let tokenizer = super::load_tokenizer(dir)?;
    let name = job.alias.clone().unwrap_or_else(|| {
        dir.canonicalize()
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_else(|| "sage".into())
    });
    let loopback = matches!(job.host.as_str(), "127.0.0.1" | "localhost" | "::1" | "[::1]");
    if !loopback && job.api_key.is_none() {
        log::warn!("serving on {} without --api-key: anyone who reaches this address can use the model", job.host);
    }
    let n_ctx = opts.n_ctx;
    let sopts = ServeOptions {
        host: job.host,
        port: job.port,
        api_key: job.api_key,
        model_name: name.clone(),
        chat_template: job.chat_template,
        max_body: job.max_body,
        max_queue: job.max_queue,
        defaults: Defaults { sampler: job.sampler, seed: job.seed },
    };
    let (dir, warm) = (dir.to_path_buf(), warm.map(Path::to_path_buf));
    server::serve(
        move || load_engine(&dir, opts, warm.as_deref()),
        tokenizer,
        sopts,
        |addr| {
            // The address on stdout (scripts read it, e.g. with --port 0); the rest on stderr.
            println!("sage serve: listening on http://{addr}/v1");
            let _ = std::io::stdout().flush();
            eprintln!(
                "sage serve: model {name:?}, {n_ctx} tokens of context, one sequence at a time (requests queue); \
             Ctrl-C stops"
            );
        },
    )
}
