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
//! while the device is opened and take the name of the thread that opens it: Mesa names its
//! other threads (`llvmpipe-N` for rasterizing, `<name>:disk$0` for the shader cache). So
//! `Gpu::new` takes a [`Snapshot`] first, which names the opening thread uniquely for the time
//! the device takes to open (threads that others start meanwhile do not match), and afterwards
//! pins the new threads of that name (the workers, and lavapipe's queue thread, which mostly
//! waits) in the order they were created to the CPUs the opening thread may run on, one CPU each
//! in turn: a pool of consecutive workers lands on as many different cores as there are. Where
//! fewer threads appeared than there are CPUs (a driver told to use fewer threads, or a process
//! that shares a large machine), nothing is pinned, so that several processes do not all crowd
//! the first cores. Names are put back as they were. The cost: a pinned worker cannot move off a
//! core that something else keeps busy; `TESSERA_PIN_THREADS=0` (or
//! `GpuOptions::no_thread_pinning`) leaves the threads to the scheduler. Only on Linux;
//! elsewhere nothing is pinned.

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};

/// The threads of this process before a device is opened; the calling thread carries a name of
/// its own until the snapshot is dropped.
pub(crate) struct Snapshot {
    threads: HashSet<i32>,
    /// The calling thread's own name, put back on drop.
    name: String,
    /// The name it carries meanwhile, which the threads it starts inherit.
    marker: String,
    /// The threads it started, once listed (by `spread_new_threads`), for the drop to rename.
    started: Option<Vec<i32>>,
}

impl Snapshot {
    /// `None` where the process's threads cannot be listed or named (off Linux, or no `/proc`).
    pub(crate) fn take() -> Option<Snapshot> {
        static OPENED: AtomicUsize = AtomicUsize::new(0);
        let name = sys::current_name()?;
        // At most 15 bytes, as thread names go.
        let marker = format!(
            "tessera-open{}",
            OPENED.fetch_add(1, Ordering::Relaxed) % 100
        );
        let threads = sys::threads()?.into_iter().map(|(tid, _)| tid).collect();
        sys::set_current_name(&marker).ok()?;
        Some(Snapshot {
            threads,
            name,
            marker,
            started: None,
        })
    }

    /// The threads started since the snapshot by the calling thread (they carry its marker), in
    /// the order they were created; listed once, on the first call.
    fn started(&mut self) -> &[i32] {
        let (before, marker) = (&self.threads, &self.marker);
        self.started.get_or_insert_with(|| {
            sys::threads().map_or_else(Vec::new, |now| new_named(before, marker, &now))
        })
    }

    /// Pins the threads started since the snapshot to the calling thread's CPUs in turn, where
    /// at least two CPUs and as many such threads as CPUs exist; returns each pinned thread with
    /// its CPU. A thread that cannot be pinned is reported and skipped.
    pub(crate) fn spread_new_threads(&mut self) -> Vec<(i32, usize)> {
        let Some(cpus) = sys::allowed_cpus() else {
            return Vec::new();
        };
        let started = self.started();
        if cpus.len() < 2 || started.len() < cpus.len() {
            return Vec::new();
        }
        round_robin(started, &cpus)
            .into_iter()
            .filter(|&(tid, cpu)| match sys::pin(tid, cpu) {
                Ok(()) => true,
                Err(e) => {
                    log::warn!("could not pin the device's thread {tid} to CPU {cpu}: {e}");
                    false
                }
            })
            .collect()
    }
}

impl Drop for Snapshot {
    /// Gives the calling thread, and the threads it started meanwhile, its own name back.
    fn drop(&mut self) {
        let name = self.name.clone();
        for &tid in self.started() {
            let _ = sys::set_name(tid, &name);
        }
        let _ = sys::set_current_name(&self.name);
    }
}

/// The threads of `now` that the snapshot did not have and that carry its marker, in the order
/// they were created (ascending thread ids).
fn new_named(before: &HashSet<i32>, marker: &str, now: &[(i32, String)]) -> Vec<i32> {
    let mut tids: Vec<i32> = now
        .iter()
        .filter(|(tid, name)| !before.contains(tid) && name == marker)
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

/// Whether a `TESSERA_PIN_THREADS` value leaves pinning on (the default; see
/// `gpu::switch_setting` for the values).
pub(crate) fn pinning_setting(value: Option<&str>) -> bool {
    crate::gpu::switch_setting(
        "TESSERA_PIN_THREADS",
        value,
        "a CPU device's threads stay pinned",
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

    /// Names the calling thread (at most 15 bytes).
    pub fn set_current_name(name: &str) -> io::Result<()> {
        std::fs::write("/proc/thread-self/comm", name)
    }

    /// Names thread `tid` of this process.
    pub fn set_name(tid: i32, name: &str) -> io::Result<()> {
        std::fs::write(format!("/proc/self/task/{tid}/comm"), name)
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
        cpus_of(0)
    }

    /// Lets thread `tid` of this process run on `cpu` only.
    pub fn pin(tid: i32, cpu: usize) -> io::Result<()> {
        // SAFETY: as in `cpus_of`; `cpu` comes from such a set, so it is below CPU_SETSIZE.
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

    /// The CPUs thread `tid` of this process (0: the calling thread) may run on, ascending.
    pub fn cpus_of(tid: i32) -> Option<Vec<usize>> {
        // SAFETY: cpu_set_t is plain data; sched_getaffinity writes at most its size into it.
        let set = unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            if libc::sched_getaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
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
}

#[cfg(not(target_os = "linux"))]
mod sys {
    pub fn current_name() -> Option<String> {
        None
    }

    pub fn threads() -> Option<Vec<(i32, String)>> {
        None
    }

    pub fn set_current_name(_name: &str) -> std::io::Result<()> {
        Err(std::io::ErrorKind::Unsupported.into())
    }

    pub fn set_name(_tid: i32, _name: &str) -> std::io::Result<()> {
        Err(std::io::ErrorKind::Unsupported.into())
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

    #[test]
    fn only_new_threads_with_the_marker_count_in_creation_order() {
        let before: HashSet<i32> = [100, 101].into_iter().collect();
        let now: Vec<(i32, String)> = [
            (100, "tessera-open3"),
            (101, "main"),
            (107, "tessera-open3"),
            (103, "llvmpipe-0"),
            (105, "tessera-open3"),
            (104, "tessera-o:disk$"),
            (106, "tessera-open4"),
            (102, "tessera-open3"),
        ]
        .iter()
        .map(|&(t, n)| (t, n.to_string()))
        .collect();
        assert_eq!(
            new_named(&before, "tessera-open3", &now),
            vec![102, 105, 107]
        );
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

    /// Threads this test starts after a snapshot inherit its marker and are pinned one CPU each
    /// in turn, where there are as many as CPUs; a thread that renames itself is left alone.
    /// Dropping the snapshot gives the test's thread and the pinned ones its name back.
    #[cfg(target_os = "linux")]
    #[test]
    fn new_threads_are_pinned_and_named_back() {
        use std::sync::{mpsc, Arc, Mutex};
        let cpus = sys::allowed_cpus().expect("sched_getaffinity");
        let name = sys::current_name().expect("/proc/thread-self/comm");
        let mut before = Snapshot::take().expect("a snapshot on Linux");
        assert_eq!(sys::current_name().as_ref(), Some(&before.marker));
        let (done_tx, done_rx) = mpsc::channel::<()>();
        let done_rx = Arc::new(Mutex::new(done_rx));
        let (tid_tx, tid_rx) = mpsc::channel();
        let spawn = |rename: bool| {
            let done = done_rx.clone();
            let tid_tx = tid_tx.clone();
            std::thread::spawn(move || {
                let tid = std::fs::read_link("/proc/thread-self")
                    .ok()
                    .and_then(|p| p.file_name()?.to_str()?.parse::<i32>().ok());
                if rename {
                    let _ = sys::set_current_name("other");
                }
                let _ = tid_tx.send((tid, rename));
                let _ = done.lock().map(|rx| rx.recv());
            })
        };
        let mut handles = vec![spawn(true)];
        handles.extend((0..cpus.len().max(2)).map(|_| spawn(false)));
        let started: Vec<(i32, bool)> = (0..handles.len())
            .map(|_| {
                let (tid, rename) = tid_rx
                    .recv_timeout(std::time::Duration::from_secs(30))
                    .expect("every thread reports");
                (tid.expect("a thread id"), rename)
            })
            .collect();
        let pinned = before.spread_new_threads();
        drop(before);

        let mut ours: Vec<i32> = started.iter().filter(|s| !s.1).map(|s| s.0).collect();
        ours.sort_unstable();
        if cpus.len() >= 2 {
            assert_eq!(pinned, round_robin(&ours, &cpus));
        } else {
            assert!(pinned.is_empty());
        }
        for (tid, cpu) in &pinned {
            assert_eq!(sys::cpus_of(*tid), Some(vec![*cpu]), "thread {tid}");
        }
        let other = started.iter().find(|s| s.1).map(|s| s.0).unwrap();
        assert_eq!(
            sys::cpus_of(other),
            Some(cpus.clone()),
            "the renamed thread"
        );
        assert_eq!(sys::current_name(), Some(name.clone()));
        for tid in &ours {
            let comm = std::fs::read_to_string(format!("/proc/self/task/{tid}/comm")).unwrap();
            assert_eq!(comm.trim_end(), name, "thread {tid}");
        }
        drop(done_tx);
        for h in handles {
            h.join().unwrap();
        }
    }
}
