//! Child processes of the agent (job steps on the shell, deploy hooks, ad-hoc commands):
//! signalling a whole process group, reading an exit status, the few variables a
//! process on this host inherits from the agent, and keeping the agent's ambient
//! capabilities from it.
//!
//! It must not decide when to stop a process or what else its environment holds: the
//! step runners, hooks and commands do.

use gantry_protocol::Labels;

/// `PATH` when the agent itself has none.
const DEFAULT_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// Sends `signal` to every process of the group `pgid`; a group that is gone is fine.
#[allow(unsafe_code)]
pub fn signal_group(pgid: i32, signal: i32) {
    if pgid > 1 {
        // SAFETY: kill(2) has no memory effects; a negative pid addresses the group, and
        // pgid > 1 rules out "every process" (-1) and our own group (0).
        unsafe {
            libc::kill(-pgid, signal);
        }
    }
}

/// The process group a child leads (it was spawned with `process_group(0)`), or 0 when
/// it has no id any more (0 is never signalled).
pub fn group_of(child: &tokio::process::Child) -> i32 {
    child
        .id()
        .and_then(|id| i32::try_from(id).ok())
        .unwrap_or(0)
}

/// The exit code, or 128 + the signal number for a process killed by a signal (as
/// shells report it).
pub fn exit_code(status: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
}

/// What a process on this host inherits from the agent: `PATH` (a default when the
/// agent has none) and `HOME`, so tools can be found. Nothing else: a job or a hook
/// declares what it needs.
pub fn inherited_env() -> Labels {
    let mut env = Labels::new();
    for key in ["PATH", "HOME"] {
        if let Ok(v) = std::env::var(key) {
            env.insert(key.to_owned(), v);
        }
    }
    env.entry("PATH".into())
        .or_insert_with(|| DEFAULT_PATH.into());
    env
}

/// Clears the ambient capabilities of `command`'s process before it runs: deploy hooks
/// and commands run as the agent's user without the capabilities the packaged unit
/// gives the agent for isolating jobs.
#[allow(unsafe_code)]
pub fn without_ambient_capabilities(command: &mut tokio::process::Command) {
    // SAFETY: the closure makes one system call (async-signal-safe) and allocates
    // nothing.
    unsafe {
        command.pre_exec(|| {
            libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_CLEAR_ALL,
                0,
                0,
                0,
            );
            Ok(())
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signal_death_reads_as_128_plus_the_signal() {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(exit_code(std::process::ExitStatus::from_raw(3 << 8)), 3);
        assert_eq!(
            exit_code(std::process::ExitStatus::from_raw(libc::SIGKILL)),
            128 + libc::SIGKILL
        );
    }

    #[test]
    fn the_inherited_environment_always_has_a_path() {
        let env = inherited_env();
        assert!(env.get("PATH").is_some_and(|p| !p.is_empty()));
        assert!(env.keys().all(|k| k == "PATH" || k == "HOME"), "{env:?}");
    }
}
