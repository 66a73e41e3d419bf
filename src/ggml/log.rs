//! ggml's and llama.cpp's log output, routed into the `log` crate through one hook; the
//! error lines of this thread since the last take are kept, so a failed call can say why.

use std::cell::RefCell;
use std::ffi::{c_char, c_void, CStr};
use std::sync::Once;

use llama_cpp_sys_2 as sys;

thread_local! {
    static LAST_GGML_ERROR: RefCell<String> = const { RefCell::new(String::new()) };
}

unsafe extern "C" fn log_hook(level: sys::ggml_log_level, text: *const c_char, _user: *mut c_void) {
    if text.is_null() {
        return;
    }
    // SAFETY: ggml passes a valid NUL-terminated string that lives for the duration of the call.
    let msg = unsafe { CStr::from_ptr(text) }.to_string_lossy();
    let msg = msg.trim_end();
    match level {
        sys::GGML_LOG_LEVEL_ERROR => {
            // Keep every error line of the failing call, the first (the cause) first, without
            // ggml's function-name prefix.
            let line = match msg.split_once(": ") {
                Some((f, rest)) if f.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') => rest,
                _ => msg,
            };
            LAST_GGML_ERROR.with(|e| {
                let mut e = e.borrow_mut();
                if e.len() > 4096 {
                    return; // nobody took them: keep the first ones
                }
                if !e.is_empty() {
                    e.push_str("; ");
                }
                e.push_str(line);
            });
            log::debug!(target: "ggml", "{msg}");
        }
        sys::GGML_LOG_LEVEL_WARN => log::warn!(target: "ggml", "{msg}"),
        sys::GGML_LOG_LEVEL_INFO => log::debug!(target: "ggml", "{msg}"),
        _ => log::trace!(target: "ggml", "{msg}"),
    }
}

/// Send ggml's and llama.cpp's log output to the `log` crate (once per process).
pub fn route_logs() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: log_hook is a plain function valid for the whole program and ignores
        // user_data, so a null user_data is fine; both setters only store the pointers.
        unsafe {
            sys::ggml_log_set(Some(log_hook), std::ptr::null_mut());
            sys::llama_log_set(Some(log_hook), std::ptr::null_mut());
        }
    });
}

pub(crate) fn take_last_error() -> String {
    LAST_GGML_ERROR.with(|e| std::mem::take(&mut *e.borrow_mut()))
}
