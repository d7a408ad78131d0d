//! Linux's `SCHED_BATCH` for htex_rs's own threads and pools. On a host where the user's
//! Python process shares the CPUs with htex_rs (the interchange's threads in it, pools of
//! a LocalProvider beside it), every wake-up of ours (a task to route, a result to send)
//! preempts whatever runs on that CPU, often the thread holding the GIL, and every Python
//! thread then waits. A `SCHED_BATCH` thread gets the same CPU share but does not preempt
//! on wake-up: it runs at once on an idle CPU, else at the end of the running slice.
//! `HTEX_RS_SCHED_BATCH=0` keeps the normal policy. Elsewhere (not Linux) this does nothing.

/// The environment variable that turns this off (`0`, `false`, `no`, `off`).
pub const ENV: &str = "HTEX_RS_SCHED_BATCH";

/// Whether htex_rs should use `SCHED_BATCH` here: on unless [`ENV`] says off.
#[must_use]
pub fn wanted() -> bool {
    wanted_from(std::env::var(ENV).ok().as_deref())
}

fn wanted_from(value: Option<&str>) -> bool {
    !matches!(
        value.map(|v| v.trim().to_ascii_lowercase()).as_deref(),
        Some("0" | "false" | "no" | "off")
    )
}

/// The calling thread's scheduling policy (`None` where unknown).
#[must_use]
pub fn current_policy() -> Option<i32> {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: 0 names the calling thread; no memory is passed.
        let p = unsafe { libc::sched_getscheduler(0) };
        (p >= 0).then_some(p)
    }
    #[cfg(not(target_os = "linux"))]
    None
}

/// Put the calling thread (on Linux `sched_setscheduler(0)` is per thread) under
/// `policy` at static priority 0; threads and processes it starts later inherit it.
fn set_policy(policy: i32) -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        let param = libc::sched_param { sched_priority: 0 };
        // SAFETY: 0 names the calling thread; `param` outlives the call.
        if unsafe { libc::sched_setscheduler(0, policy, &raw const param) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = policy;
    Ok(())
}

/// `SCHED_BATCH` for the calling thread when [`wanted`] and the thread is under the
/// normal policy (a real-time or idle policy someone chose is left alone). Returns
/// whether the thread is now under `SCHED_BATCH`.
#[must_use]
pub fn batch_this_thread() -> bool {
    batch_this_thread_if(wanted())
}

/// [`batch_this_thread`] with [`wanted`] read before, on another thread: a thread of ours
/// running beside the user's code should not read the environment while a user thread
/// may be setting it (`setenv` in another thread races with `getenv`).
#[must_use]
pub fn batch_this_thread_if(wanted: bool) -> bool {
    #[cfg(target_os = "linux")]
    {
        if !wanted {
            return false;
        }
        match current_policy() {
            Some(libc::SCHED_BATCH) => true,
            Some(libc::SCHED_OTHER) => match set_policy(libc::SCHED_BATCH) {
                Ok(()) => true,
                Err(e) => {
                    log::debug!("SCHED_BATCH refused: {e}");
                    false
                }
            },
            _ => false,
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = wanted;
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_variable_turns_it_off_only_when_it_says_so() {
        for off in ["0", "false", "No", " off "] {
            assert!(!wanted_from(Some(off)), "{off:?}");
        }
        for on in [None, Some(""), Some("1"), Some("yes")] {
            assert!(wanted_from(on), "{on:?}");
        }
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_batched_thread_s_new_threads_inherit_it_and_off_leaves_a_thread_alone() {
        std::thread::spawn(|| {
            if current_policy() != Some(libc::SCHED_OTHER) {
                return; // started under another policy (chrt): nothing to show here
            }
            assert!(!batch_this_thread_if(false));
            assert_eq!(
                current_policy(),
                Some(libc::SCHED_OTHER),
                "not wanted: untouched"
            );
            assert!(batch_this_thread_if(true));
            assert_eq!(current_policy(), Some(libc::SCHED_BATCH));
            let child = std::thread::spawn(current_policy).join().unwrap();
            assert_eq!(
                child,
                Some(libc::SCHED_BATCH),
                "threads started after inherit it"
            );
        })
        .join()
        .unwrap();
    }
}
