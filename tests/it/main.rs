//! Integration tests against the committed fixtures (see scripts/make_fixtures.py).

mod archs;
mod attention;
mod bad_input;
mod budget;
mod chat;
mod cold;
mod convert;
#[cfg(feature = "vulkan")]
mod device;
mod engine;
mod footprint;
mod fuzz_regressions;
mod gguf_malformed;
mod gptoss;
mod hybrid;
mod levers;
mod parity;
mod quality;
mod quant;
mod reliability;
mod routing;
mod server;
mod synth;
mod util;
