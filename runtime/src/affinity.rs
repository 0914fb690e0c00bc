//! The worker threads of CPU devices, spread one to a core.
//!
//! A CPU device (Mesa's lavapipe, and llvmpipe behind OpenGL) runs each dispatch's workgroups on
//! a pool of its own threads, which sleep between dispatches. A decode step hands the pool a
//! couple of hundred short dispatches, each of which wakes the workers again, and Linux's
//! scheduler then often leaves them on one core: a woken thread goes back where it last ran,
//! and one that ran in the last half millisecond counts as cache-hot and is not moved to an idle
//! core. Measured on lavapipe with two vCPUs (SmolLM2-135M Q4_1, `tessera bench -p 0 -n 64`):
//! decoding ran at ~12-14 tokens/s in some runs, one core idle throughout, and at ~25-28 in
//! others; pinning the two workers to different cores by hand in the middle of a slow run took it
//! to 27-29 at once.
//!
//! The driver does not say which threads are its workers. They are among the threads that appear
//! while the device is opened and keep the name of the thread that opened it: Mesa names its
//! other threads (`llvmpipe-N` for rasterizing, `<name>:disk$0` for the shader cache). `Gpu::new`
//! takes a [`Snapshot`] first and afterwards pins those new threads, in the order they were
//! created, to the CPUs the process may run on, one CPU each in turn: a pool of consecutive
//! workers lands on as many different cores as there are. `TESSERA_PIN_THREADS=0` leaves the
//! threads where the scheduler puts them. Only on Linux; elsewhere nothing is pinned.

use std::collections::HashSet;

/// The threads of this process, and the name of the calling thread, before a device is opened.
pub(crate) struct Snapshot {
    threads: HashSet<i32>,
    name: String,
}

impl Snapshot {
    /// `None` where the process's threads cannot be listed (off Linux, or no `/proc`).
    pub(crate) fn take() -> Option<Snapshot> {
        let name = sys::current_name()?;
        let threads = sys::threads()?.into_iter().map(|(tid, _)| tid).collect();
        Some(Snapshot { threads, name })
    }

    /// Pins the threads that appeared since the snapshot and carry its thread's name to the
    /// process's CPUs in turn; returns each pinned thread with its CPU. Nothing is pinned where
    /// fewer than two such threads or CPUs exist; a thread that cannot be pinned is skipped.
    pub(crate) fn spread_new_threads(&self) -> Vec<(i32, usize)> {
        let (Some(now), Some(cpus)) = (sys::threads(), sys::allowed_cpus()) else {
            return Vec::new();
        };
        let workers = new_unnamed(self, &now);
        if workers.len() < 2 || cpus.len() < 2 {
            return Vec::new();
        }
        round_robin(&workers, &cpus)
            .into_iter()
            .filter(|&(tid, cpu)| match sys::pin(tid, cpu) {
                Ok(()) => true,
                Err(e) => {
                    log::debug!("could not pin thread {tid} to CPU {cpu}: {e}");
                    false
                }
            })
            .collect()
    }
}

/// The threads of `now` that the snapshot did not have and that carry its thread's name, in the
/// order they were created (ascending thread ids).
fn new_unnamed(before: &Snapshot, now: &[(i32, String)]) -> Vec<i32> {
    let mut tids: Vec<i32> = now
        .iter()
        .filter(|(tid, name)| !before.threads.contains(tid) && *name == before.name)
        .map(|&(tid, _)| tid)
        .collect();
    tids.sort_unstable();
    tids
}

/// Thread i goes to CPU i mod the CPU count.
fn round_robin(tids: &[i32], cpus: &[usize]) -> Vec<(i32, usize)> {
    tids.iter()
        .zip(cpus.iter().cycle())
        .map(|(&tid, &cpu)| (tid, cpu))
        .collect()
}

/// Whether a `TESSERA_PIN_THREADS` value leaves pinning on (the default): `0`, `off`, `false`
/// or `no` turn it off; any other value keeps it.
pub(crate) fn pinning_setting(value: Option<&str>) -> bool {
    !matches!(
        value.map(|v| v.trim().to_ascii_lowercase()).as_deref(),
        Some("0" | "off" | "false" | "no")
    )
}

#[cfg(target_os = "linux")]
mod sys {
    use std::io;

    /// The calling thread's name, as `/proc` shows it (at most 15 bytes).
    pub fn current_name() -> Option<String> {
        let name = std::fs::read_to_string("/proc/thread-self/comm").ok()?;
        Some(name.trim_end_matches('\n').to_string())
    }

    /// Every thread of the process with its name. Threads that end while the folder is read are
    /// left out.
    pub fn threads() -> Option<Vec<(i32, String)>> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir("/proc/self/task").ok()? {
            let Ok(entry) = entry else { continue };
            let Some(tid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
                continue;
            };
            if let Ok(name) = std::fs::read_to_string(entry.path().join("comm")) {
                out.push((tid, name.trim_end_matches('\n').to_string()));
            }
        }
        Some(out)
    }

    /// The CPUs the calling thread may run on, ascending.
    pub fn allowed_cpus() -> Option<Vec<usize>> {
        // SAFETY: cpu_set_t is plain data; sched_getaffinity writes at most its size into it.
        let set = unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
                return None;
            }
            set
        };
        let cpus = (0..libc::CPU_SETSIZE as usize)
            // SAFETY: `cpu` is below CPU_SETSIZE, the set's capacity.
            .filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) })
            .collect();
        Some(cpus)
    }

    /// Lets thread `tid` of this process run on `cpu` only.
    pub fn pin(tid: i32, cpu: usize) -> io::Result<()> {
        // SAFETY: as in `allowed_cpus`; `cpu` comes from that set, so it is below CPU_SETSIZE.
        let status = unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu, &mut set);
            libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set)
        };
        if status == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// The CPUs thread `tid` may run on (tests).
    #[cfg(test)]
    pub fn cpus_of(tid: i32) -> Option<Vec<usize>> {
        // SAFETY: as in `allowed_cpus`.
        let set = unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            if libc::sched_getaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
                return None;
            }
            set
        };
        // SAFETY: `cpu` is below CPU_SETSIZE.
        Some(
            (0..libc::CPU_SETSIZE as usize)
                .filter(|&c| unsafe { libc::CPU_ISSET(c, &set) })
                .collect(),
        )
    }
}

#[cfg(not(target_os = "linux"))]
mod sys {
    pub fn current_name() -> Option<String> {
        None
    }

    pub fn threads() -> Option<Vec<(i32, String)>> {
        None
    }

    pub fn allowed_cpus() -> Option<Vec<usize>> {
        None
    }

    pub fn pin(_tid: i32, _cpu: usize) -> std::io::Result<()> {
        Err(std::io::ErrorKind::Unsupported.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(threads: &[i32], name: &str) -> Snapshot {
        Snapshot {
            threads: threads.iter().copied().collect(),
            name: name.to_string(),
        }
    }

    #[test]
    fn only_new_threads_with_the_openers_name_count_in_creation_order() {
        let before = snapshot(&[100, 101], "tessera");
        let now: Vec<(i32, String)> = [
            (100, "tessera"),
            (101, "tessera"),
            (107, "tessera"),
            (103, "llvmpipe-0"),
            (105, "tessera"),
            (104, "tessera:disk$0"),
            (102, "tessera"),
        ]
        .iter()
        .map(|&(t, n)| (t, n.to_string()))
        .collect();
        assert_eq!(new_unnamed(&before, &now), vec![102, 105, 107]);
    }

    #[test]
    fn consecutive_workers_land_on_different_cpus() {
        // A queue thread, then two workers, on two CPUs: the workers do not share one.
        let pinned = round_robin(&[10, 11, 12], &[0, 1]);
        assert_eq!(pinned, vec![(10, 0), (11, 1), (12, 0)]);
        // CPUs need not start at 0 or be contiguous.
        assert_eq!(round_robin(&[5, 6], &[2, 7, 9]), vec![(5, 2), (6, 7)]);
    }

    #[test]
    fn the_pinning_setting_turns_it_off_only_when_asked() {
        assert!(pinning_setting(None));
        for off in ["0", "off", "FALSE", " no "] {
            assert!(!pinning_setting(Some(off)), "{off:?}");
        }
        for on in ["1", "on", "yes", "anything"] {
            assert!(pinning_setting(Some(on)), "{on:?}");
        }
    }

    /// Threads this test starts under its own name after a snapshot are pinned one CPU each in
    /// turn, and their affinity says so; threads it names otherwise are left alone.
    #[cfg(target_os = "linux")]
    #[test]
    fn new_threads_are_pinned_where_the_process_has_two_cpus() {
        use std::sync::mpsc;
        let Some(cpus) = sys::allowed_cpus() else {
            panic!("sched_getaffinity failed");
        };
        if cpus.len() < 2 {
            eprintln!("one CPU: nothing to spread");
            return;
        }
        let name = std::thread::current().name().unwrap_or("").to_string();
        // A name of its own, so that threads other tests start meanwhile do not match.
        let own = format!("pin-{}", std::process::id() % 100_000);
        let set_name = |n: &str| std::fs::write("/proc/thread-self/comm", n).unwrap();
        set_name(&own);
        let before = Snapshot::take().expect("a snapshot on Linux");
        let (done_tx, done_rx) = mpsc::channel::<()>();
        let done_rx = std::sync::Arc::new(std::sync::Mutex::new(done_rx));
        let (tid_tx, tid_rx) = mpsc::channel();
        let spawn = |rename: bool| {
            let done = done_rx.clone();
            let tid_tx = tid_tx.clone();
            // Threads inherit the name of the thread that starts them.
            std::thread::spawn(move || {
                if rename {
                    std::fs::write("/proc/thread-self/comm", "other").unwrap();
                }
                let tid = std::fs::read_link("/proc/thread-self").unwrap();
                let tid: i32 = tid.file_name().unwrap().to_str().unwrap().parse().unwrap();
                tid_tx.send((tid, rename)).unwrap();
                let _ = done.lock().unwrap().recv();
            })
        };
        let handles = [spawn(false), spawn(true), spawn(false), spawn(false)];
        let started: Vec<(i32, bool)> =
            (0..handles.len()).map(|_| tid_rx.recv().unwrap()).collect();
        let pinned = before.spread_new_threads();
        set_name(&name.chars().take(15).collect::<String>());

        let mut ours: Vec<i32> = started.iter().filter(|s| !s.1).map(|s| s.0).collect();
        ours.sort_unstable();
        let expected = round_robin(&ours, &cpus);
        assert_eq!(pinned, expected);
        for (tid, cpu) in &pinned {
            assert_eq!(sys::cpus_of(*tid), Some(vec![*cpu]), "thread {tid}");
        }
        let other = started.iter().find(|s| s.1).unwrap().0;
        assert_eq!(
            sys::cpus_of(other),
            Some(cpus.clone()),
            "the renamed thread"
        );
        drop(done_tx);
        for h in handles {
            h.join().unwrap();
        }
    }
}
