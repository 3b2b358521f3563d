//! Guest logging through the host's `switchyard.log` import.
//!
//! Use the [`log!`](macro@crate::log) macro: `switchyard_sdk::log!(info, "kept {}", n)`. On wasm32
//! the line goes to the host, which writes it to the router's `tracing` logs under the
//! plugin's name; on other targets (unit tests) it is printed to stderr.

/// A log level, with its ABI number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[repr(i32)]
pub enum Level {
    /// 1
    Error = 1,
    /// 2
    Warn = 2,
    /// 3
    Info = 3,
    /// 4
    Debug = 4,
    /// 5
    Trace = 5,
}

impl Level {
    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Error => "error",
            Level::Warn => "warn",
            Level::Info => "info",
            Level::Debug => "debug",
            Level::Trace => "trace",
        }
    }
}

#[cfg(target_arch = "wasm32")]
#[link(wasm_import_module = "switchyard")]
unsafe extern "C" {
    #[link_name = "log"]
    fn host_log(level: i32, ptr: i32, len: i32);
}

/// Writes one log line (to the host on wasm32, to stderr elsewhere).
pub fn write(level: Level, message: &str) {
    #[cfg(target_arch = "wasm32")]
    // SAFETY: the host reads `len` bytes at `ptr`, which are a live &str.
    unsafe {
        host_log(level as i32, message.as_ptr() as usize as i32, message.len() as i32)
    }
    #[cfg(not(target_arch = "wasm32"))]
    eprintln!("[plugin {}] {}", level.as_str(), message);
}

/// Logs a formatted line: `log!(LEVEL, "format", args...)`, where `LEVEL` is one of
/// `error`, `warn`, `info`, `debug`, `trace`.
///
/// ```
/// switchyard_sdk::log!(info, "kept {} of {}", 3, 10);
/// ```
#[macro_export]
macro_rules! log {
    (error, $($arg:tt)+) => { $crate::log::write($crate::log::Level::Error, &::std::format!($($arg)+)) };
    (warn, $($arg:tt)+) => { $crate::log::write($crate::log::Level::Warn, &::std::format!($($arg)+)) };
    (info, $($arg:tt)+) => { $crate::log::write($crate::log::Level::Info, &::std::format!($($arg)+)) };
    (debug, $($arg:tt)+) => { $crate::log::write($crate::log::Level::Debug, &::std::format!($($arg)+)) };
    (trace, $($arg:tt)+) => { $crate::log::write($crate::log::Level::Trace, &::std::format!($($arg)+)) };
}
