//! Process figures for the load generator: CPU seconds and resident memory of the server
//! (from `/proc/<pid>/stat` and `/proc/<pid>/status`) and of the generator itself
//! (`getrusage`), the wall clock in microseconds that goes into payloads, and raising the
//! open-file limit. It only reads; it must never signal, wait on or otherwise touch the
//! processes it observes.

use std::time::{SystemTime, UNIX_EPOCH};

/// Microseconds since the Unix epoch (the publish timestamp carried in each payload).
pub(crate) fn now_micros() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0)
}

/// utime+stime of a process in seconds (`/proc/PID/stat` fields 14 and 15).
pub(crate) fn proc_cpu_secs(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat_cpu_ticks(&stat).map(|ticks| ticks / clock_ticks())
}

/// utime+stime in clock ticks from the text of a `/proc/PID/stat` file.
fn parse_stat_cpu_ticks(stat: &str) -> Option<f64> {
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    Some(utime + stime)
}

#[allow(unsafe_code)]
fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    if hz > 0.0 {
        hz
    } else {
        100.0
    }
}

/// VmRSS of a process in KiB.
pub(crate) fn proc_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse().ok()
}

/// The generator's own VmRSS in KiB.
pub(crate) fn self_rss_kib() -> Option<u64> {
    proc_rss_kib(std::process::id())
}

/// CPU seconds (user + system) used by this process so far, from `getrusage`.
#[allow(unsafe_code)]
pub(crate) fn self_cpu_secs() -> f64 {
    // SAFETY: getrusage writes into a zeroed struct on our stack.
    unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        if libc::getrusage(libc::RUSAGE_SELF, &mut ru) != 0 {
            return 0.0;
        }
        let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
        tv(ru.ru_utime) + tv(ru.ru_stime)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_after_the_command_name() {
        // the command name may contain spaces and parentheses
        let stat = "42 (a (b) c) S 1 42 42 0 -1 4194560 100 0 0 0 250 75 0 0 20 0 1 0 5 1000 200";
        assert_eq!(parse_stat_cpu_ticks(stat), Some(325.0));
        assert_eq!(parse_stat_cpu_ticks("garbage"), None);
    }

    #[test]
    fn own_figures_are_readable() {
        assert!(self_rss_kib().unwrap_or(0) > 0);
        assert!(proc_cpu_secs(std::process::id()).is_some());
        assert!(self_cpu_secs() >= 0.0);
    }
}
