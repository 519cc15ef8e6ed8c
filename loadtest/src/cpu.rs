//! CPU time from `/proc`: of a process (the spawned server, the load tester itself), or of the
//! threads of this process that bear one name (the in-process floor server), so that a run can
//! report CPU microseconds per transaction on both sides.

use std::process::Command;

/// Whose CPU time is measured.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Subject {
    /// A process by pid, or `"self"`.
    Process(String),
    /// The threads of this process whose name (`/proc/self/task/TID/comm`) is this.
    Threads(&'static str),
}

/// CPU time of `subject` in clock ticks, `None` when `/proc` cannot tell.
pub fn ticks(subject: &Subject) -> Option<u64> {
    match subject {
        Subject::Process(pid) => cpu_ticks(pid),
        Subject::Threads(name) => thread_ticks(name),
    }
}

/// utime + stime of a process in clock ticks (`/proc/PID/stat` fields 14 and 15).
pub fn cpu_ticks(pid: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat_cpu(&text)
}

/// Fields after the command name, which is in parentheses and may itself contain spaces.
fn parse_stat_cpu(text: &str) -> Option<u64> {
    let after = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    // fields[0] is field 3 (state), so utime (14) is index 11 and stime (15) index 12.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// Clock ticks per second (`getconf CLK_TCK`, 100 if that fails).
pub fn clock_ticks_per_second() -> u64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .filter(|t| *t > 0)
        .unwrap_or(100)
}

/// Most threads of this process looked at (a bound on the directory walk).
const MAX_THREADS: usize = 4096;

/// utime + stime summed over this process's threads named `name` (threads that ended are not
/// counted: the floor server's runtime keeps its threads for the whole run).
fn thread_ticks(name: &str) -> Option<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir("/proc/self/task").ok()?.take(MAX_THREADS) {
        let Ok(entry) = entry else { continue };
        let Ok(text) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
        let comm = text.find('(').zip(text.rfind(')')).map(|(a, b)| &text[a + 1..b]);
        if comm == Some(name) {
            total += parse_stat_cpu(&text).unwrap_or(0);
        }
    }
    Some(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_cpu_fields() {
        let line =
            "1234 (citycard io) S 1 1234 1234 0 -1 4194560 1000 0 0 0 250 50 0 0 20 0 9 0 100 0 0";
        assert_eq!(parse_stat_cpu(line), Some(300));
        assert_eq!(parse_stat_cpu("garbage"), None);
        assert!(cpu_ticks("self").is_some());
    }

    #[test]
    fn named_threads_are_counted_apart() {
        let name = "cpu-test-spin";
        let handle = std::thread::Builder::new()
            .name(name.into())
            .spawn(|| {
                // Spin until this thread has been charged at least one tick (bounded).
                let started = std::time::Instant::now();
                let mut x = 0u64;
                while thread_ticks(name).unwrap_or(0) == 0
                    && started.elapsed() < std::time::Duration::from_secs(5)
                {
                    for i in 0..100_000u64 {
                        x = x.wrapping_mul(31).wrapping_add(i);
                    }
                }
                std::hint::black_box(x);
                thread_ticks(name)
            })
            .expect("spawn");
        let seen = handle.join().expect("join");
        assert!(seen.is_some_and(|t| t > 0), "{seen:?}");
        assert_eq!(thread_ticks("no-such-thread"), Some(0));
    }
}
