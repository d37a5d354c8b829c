//! Finding the ONNX Runtime shared library and initialising `ort` with it.
//!
//! densa builds `ort` with `load-dynamic`: nothing is linked at build time and the library
//! (`libonnxruntime.so.1.31.1`, shipped inside the PyPI wheel `onnxruntime==1.31.1`) is found at
//! run time. [`locate`] looks, in this order, at
//! 1. `ORT_DYLIB_PATH` (a file that must exist: a stale variable is an error, not a fallback),
//! 2. a project-local `.ort/` directory in the current directory or any parent,
//! 3. densa's per-user cache, `<cache>/onnxruntime/1.31.1/`, where `<cache>` is
//!    `$DENSA_CACHE_DIR`, `$XDG_CACHE_HOME/densa` or `$HOME/.cache/densa`,
//! 4. an installed `onnxruntime` Python package (interpreter `$DENSA_PYTHON`, default `python3`)
//!    of version 1.31 or newer, its `capi/` directory,
//! 5. when allowed (and `DENSA_ORT_NO_DOWNLOAD` is unset), the wheel fetched with the user's own
//!    `pip download`, from which only the library is extracted into the cache.
//!
//! [`init`] loads the library with `ort::init_from` and builds the process-wide `ort`
//! [`Environment`] once. ort's implicit loader (any `ort` call before `init_from`) panics when
//! the library is missing, so every densa use of `ort` goes through [`init`] or [`environment`].
//!
//! Discovery is a function of an explicit [`Probe`] (environment variables, current directory,
//! platform, Python and pip as closures) so the order is tested without touching the process.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fmt;
use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use ort::environment::Environment;

/// The ONNX Runtime release densa is built and tested against.
pub const ORT_VERSION: &str = "1.31.1";

/// `ort` is built with `api-31`: a library older than ONNX Runtime 1.31 lacks that API.
const MIN_MINOR_VERSION: u32 = 31;

/// Interpreter version pip is asked to pick a wheel for; the library inside does not depend on it.
const WHEEL_PYTHON_VERSION: &str = "3.11";

/// Prints the installed package's version and directory, one per line.
const PYTHON_QUERY: &str =
    "import onnxruntime, os; print(onnxruntime.__version__); print(os.path.dirname(onnxruntime.__file__))";

/// Where the ONNX Runtime library was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OrtSource {
    /// The `ORT_DYLIB_PATH` environment variable.
    EnvVar,
    /// A `.ort/` directory in the current directory or one of its parents.
    ProjectLocal,
    /// densa's per-user cache (`<cache>/onnxruntime/<version>/`).
    UserCache,
    /// The `capi/` directory of an installed `onnxruntime` Python package.
    PythonPackage,
    /// Fetched just now with pip into the per-user cache.
    Downloaded,
}

impl fmt::Display for OrtSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            OrtSource::EnvVar => "ORT_DYLIB_PATH",
            OrtSource::ProjectLocal => "project-local .ort/",
            OrtSource::UserCache => "densa cache",
            OrtSource::PythonPackage => "onnxruntime Python package",
            OrtSource::Downloaded => "fetched with pip",
        })
    }
}

/// The ONNX Runtime shared library densa uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrtLibrary {
    pub path: PathBuf,
    pub source: OrtSource,
}

/// What discovery looked at, one line per place, for error messages.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tried(pub Vec<String>);

impl fmt::Display for Tried {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Tried:")?;
        for line in &self.0 {
            write!(f, "\n  - {line}")?;
        }
        Ok(())
    }
}

fn how_to_install(lib_name: &str) -> String {
    format!(
        "Install it with `pip install onnxruntime=={ORT_VERSION}`, or set ORT_DYLIB_PATH to \
         {lib_name}, or put the library in ./.ort/"
    )
}

/// Why the ONNX Runtime library could not be found, fetched or loaded.
#[derive(Debug, Clone, thiserror::Error)]
pub enum OrtLibError {
    #[error(
        "ORT_DYLIB_PATH points at a missing file: {} (unset it to let densa search for \
         ONNX Runtime {ORT_VERSION})",
        .path.display()
    )]
    EnvVarMissingFile { path: PathBuf },

    #[error("ONNX Runtime {ORT_VERSION} was not found. {}\n{tried}", how_to_install(.lib_name))]
    NotFound { lib_name: String, tried: Tried },

    #[error(
        "ONNX Runtime {ORT_VERSION} was not found, and densa fetches the onnxruntime wheel only \
         on linux x86_64, linux aarch64 and macOS arm64, not on {os} {arch}. {}\n{tried}",
        how_to_install(.lib_name)
    )]
    DownloadUnsupported {
        os: String,
        arch: String,
        lib_name: String,
        tried: Tried,
    },

    #[error(
        "ONNX Runtime {ORT_VERSION} was not found, and fetching it with pip failed: {reason}\n{}\n{tried}",
        how_to_install(.lib_name)
    )]
    DownloadFailed {
        reason: String,
        lib_name: String,
        tried: Tried,
    },

    #[error("loading ONNX Runtime from {} (found via {found_via}) failed: {reason}", .path.display())]
    Load {
        path: PathBuf,
        found_via: OrtSource,
        reason: String,
    },

    #[error("creating the ONNX Runtime environment failed: {reason}")]
    Environment { reason: String },
}

/// The platform whose library names and wheel tag discovery uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Platform {
    os: &'static str,
    arch: &'static str,
}

impl Platform {
    const CURRENT: Platform = Platform {
        os: std::env::consts::OS,
        arch: std::env::consts::ARCH,
    };

    /// The name users know the library by (for messages).
    fn generic_lib_name(self) -> &'static str {
        match self.os {
            "macos" | "ios" => "libonnxruntime.dylib",
            "windows" => "onnxruntime.dll",
            _ => "libonnxruntime.so",
        }
    }

    /// `libonnxruntime.so`, `libonnxruntime.so.1.31.1`, `libonnxruntime.1.31.1.dylib`,
    /// `onnxruntime.dll`; not `libonnxruntime_providers_shared.so` nor our own `.tmp` files.
    fn is_library_name(self, name: &str) -> bool {
        match self.os {
            "macos" | "ios" => name.starts_with("libonnxruntime.") && name.ends_with(".dylib"),
            "windows" => name.eq_ignore_ascii_case("onnxruntime.dll"),
            _ => name
                .strip_prefix("libonnxruntime.so")
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('.')),
        }
    }

    /// The pip `--platform` tag of the onnxruntime wheel for this platform.
    fn wheel_tag(self) -> Option<&'static str> {
        match (self.os, self.arch) {
            ("linux", "x86_64") => Some("manylinux_2_28_x86_64"),
            ("linux", "aarch64") => Some("manylinux_2_28_aarch64"),
            ("macos", "aarch64") => Some("macosx_14_0_arm64"),
            _ => None,
        }
    }

    fn default_python(self) -> &'static str {
        if self.os == "windows" {
            "python"
        } else {
            "python3"
        }
    }
}

/// Orders candidate file names: the exact densa version first, then higher versions, then an
/// unversioned name (often a symlink to one of the others); the name breaks ties.
fn library_rank(name: &str) -> (bool, Vec<u32>, String) {
    let version: Vec<u32> = name
        .split(|c: char| !c.is_ascii_digit())
        .filter(|part| !part.is_empty())
        .filter_map(|part| part.parse().ok())
        .collect();
    let wanted: Vec<u32> = ORT_VERSION
        .split('.')
        .filter_map(|p| p.parse().ok())
        .collect();
    (version == wanted, version, name.to_owned())
}

/// The best ONNX Runtime library file directly inside `dir`, if any.
fn pick_library(dir: &Path, platform: Platform) -> Option<PathBuf> {
    fs::read_dir(dir)
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let name = entry.file_name().into_string().ok()?;
            let path = entry.path();
            // `is_file` follows symlinks: a dangling `libonnxruntime.so` link is not a library.
            (platform.is_library_name(&name) && path.is_file()).then_some((name, path))
        })
        .max_by_key(|(name, _)| library_rank(name))
        .map(|(_, path)| path)
}

/// `(major, minor)` of a Python package version such as `1.31.1` or `1.32.0.dev20260101`.
fn major_minor(version: &str) -> Option<(u32, u32)> {
    let mut parts = version.trim().split('.').map(|part| {
        let digits: String = part.chars().take_while(char::is_ascii_digit).collect();
        digits.parse::<u32>().ok()
    });
    Some((parts.next()??, parts.next()??))
}

/// An installed `onnxruntime` Python package.
#[derive(Debug, Clone, PartialEq, Eq)]
struct PythonOrt {
    version: String,
    /// The package directory (`.../site-packages/onnxruntime`).
    dir: PathBuf,
}

/// Asks `python` for its `onnxruntime` package; `Err` says why there is none (for messages).
type PythonQuery = Box<dyn Fn(&OsStr) -> Result<PythonOrt, String> + Send + Sync>;
/// Runs `python <args>` (pip); `Err` says why it failed.
type PipRunner = Box<dyn Fn(&OsStr, &[OsString]) -> Result<(), String> + Send + Sync>;

/// Everything discovery reads from the outside world.
struct Probe {
    /// Environment variables (only the ones discovery reads need be present).
    env: HashMap<String, OsString>,
    /// The current directory; `None` when it cannot be determined.
    cwd: Option<PathBuf>,
    platform: Platform,
    python: PythonQuery,
    pip: PipRunner,
}

/// The environment variables discovery reads.
const ENV_VARS: &[&str] = &[
    "ORT_DYLIB_PATH",
    "DENSA_CACHE_DIR",
    "XDG_CACHE_HOME",
    "HOME",
    "LOCALAPPDATA",
    "DENSA_PYTHON",
    "DENSA_ORT_NO_DOWNLOAD",
];

impl Probe {
    /// A probe over this process's environment, current directory, Python and pip.
    fn from_process() -> Probe {
        let env = ENV_VARS
            .iter()
            .filter_map(|&key| Some((key.to_owned(), std::env::var_os(key)?)))
            .collect();
        Probe {
            env,
            cwd: std::env::current_dir().ok(),
            platform: Platform::CURRENT,
            python: Box::new(query_python),
            pip: Box::new(run_pip),
        }
    }

    /// A set, non-empty variable.
    fn var(&self, key: &str) -> Option<&OsStr> {
        self.env
            .get(key)
            .map(OsString::as_os_str)
            .filter(|value| !value.is_empty())
    }

    fn absolute(&self, path: &Path) -> PathBuf {
        match &self.cwd {
            Some(cwd) if path.is_relative() => cwd.join(path),
            _ => path.to_path_buf(),
        }
    }

    /// densa's per-user cache directory.
    fn cache_dir(&self) -> Option<PathBuf> {
        if let Some(dir) = self.var("DENSA_CACHE_DIR") {
            return Some(self.absolute(Path::new(dir)));
        }
        // The XDG spec says to ignore a relative XDG_CACHE_HOME.
        if let Some(dir) = self.var("XDG_CACHE_HOME").map(Path::new) {
            if dir.is_absolute() {
                return Some(dir.join("densa"));
            }
        }
        if let Some(home) = self.var("HOME") {
            return Some(Path::new(home).join(".cache").join("densa"));
        }
        if self.platform.os == "windows" {
            return self
                .var("LOCALAPPDATA")
                .map(|dir| Path::new(dir).join("densa"));
        }
        None
    }

    fn python_interpreter(&self) -> OsString {
        self.var("DENSA_PYTHON")
            .map_or_else(|| self.platform.default_python().into(), OsStr::to_owned)
    }

    fn downloads_disabled_by_env(&self) -> bool {
        self.var("DENSA_ORT_NO_DOWNLOAD")
            .is_some_and(|value| value != "0")
    }

    fn not_found(&self, tried: Vec<String>) -> OrtLibError {
        OrtLibError::NotFound {
            lib_name: self.platform.generic_lib_name().to_owned(),
            tried: Tried(tried),
        }
    }

    /// Runs the discovery order described in the module documentation.
    fn locate(&self, allow_download: bool) -> Result<OrtLibrary, OrtLibError> {
        let found = |path: PathBuf, source| Ok(OrtLibrary { path, source });
        let lib_glob = format!("{}*", self.platform.generic_lib_name());
        let mut tried = Vec::new();

        // 1. An explicit path wins, and a wrong one is reported rather than silently skipped.
        match self.var("ORT_DYLIB_PATH") {
            Some(value) => {
                let path = self.absolute(Path::new(value));
                return if path.is_file() {
                    found(path, OrtSource::EnvVar)
                } else {
                    Err(OrtLibError::EnvVarMissingFile { path })
                };
            }
            None => tried.push("ORT_DYLIB_PATH: not set".to_owned()),
        }

        // 2. A project-local copy.
        match &self.cwd {
            Some(cwd) => {
                for dir in cwd.ancestors().map(|dir| dir.join(".ort")) {
                    if !dir.is_dir() {
                        continue;
                    }
                    match pick_library(&dir, self.platform) {
                        Some(path) => return found(path, OrtSource::ProjectLocal),
                        None => tried.push(format!("{}: no {lib_glob} in it", dir.display())),
                    }
                }
                tried.push(format!(
                    "project-local: no .ort/ directory holding {lib_glob} in {} or its parents",
                    cwd.display()
                ));
            }
            None => tried.push("project-local: the current directory is unknown".to_owned()),
        }

        // 3. densa's cache.
        let cache_version_dir = self
            .cache_dir()
            .map(|dir| dir.join("onnxruntime").join(ORT_VERSION));
        match &cache_version_dir {
            Some(dir) => match pick_library(dir, self.platform) {
                Some(path) => return found(path, OrtSource::UserCache),
                None => tried.push(format!("densa cache: no {lib_glob} in {}", dir.display())),
            },
            None => tried.push(
                "densa cache: none of DENSA_CACHE_DIR, XDG_CACHE_HOME, HOME is set".to_owned(),
            ),
        }

        // 4. An installed Python package, if recent enough for ort's API level.
        let python = self.python_interpreter();
        let python_shown = python.to_string_lossy().into_owned();
        match (self.python)(&python) {
            Ok(package) => {
                let recent = major_minor(&package.version)
                    .is_some_and(|(major, minor)| major > 1 || minor >= MIN_MINOR_VERSION);
                let capi = package.dir.join("capi");
                if !recent {
                    tried.push(format!(
                        "Python package: `{python_shown}` has onnxruntime {} at {}, older than the \
                         1.{MIN_MINOR_VERSION} densa needs",
                        package.version,
                        package.dir.display()
                    ));
                } else if let Some(path) = pick_library(&capi, self.platform) {
                    return found(path, OrtSource::PythonPackage);
                } else {
                    tried.push(format!(
                        "Python package: onnxruntime {} of `{python_shown}` has no {lib_glob} in {}",
                        package.version,
                        capi.display()
                    ));
                }
            }
            Err(why) => tried.push(format!("Python package: {why}")),
        }

        // 5. Fetch the wheel with the user's pip, if allowed.
        if !allow_download {
            tried.push("download: not allowed here".to_owned());
            return Err(self.not_found(tried));
        }
        if self.downloads_disabled_by_env() {
            tried.push("download: disabled by DENSA_ORT_NO_DOWNLOAD".to_owned());
            return Err(self.not_found(tried));
        }
        let Some(tag) = self.platform.wheel_tag() else {
            return Err(OrtLibError::DownloadUnsupported {
                os: self.platform.os.to_owned(),
                arch: self.platform.arch.to_owned(),
                lib_name: self.platform.generic_lib_name().to_owned(),
                tried: Tried(tried),
            });
        };
        let Some(dest) = cache_version_dir else {
            tried.push("download: no cache directory to put the library in".to_owned());
            return Err(self.not_found(tried));
        };
        eprintln!(
            "densa: ONNX Runtime not found; fetching onnxruntime=={ORT_VERSION} with pip into {}",
            dest.display()
        );
        match self.download(&python, tag, &dest) {
            Ok(path) => found(path, OrtSource::Downloaded),
            Err(reason) => Err(OrtLibError::DownloadFailed {
                reason,
                lib_name: self.platform.generic_lib_name().to_owned(),
                tried: Tried(tried),
            }),
        }
    }

    /// `pip download`s the wheel into a staging directory beside `dest` and extracts the library
    /// into `dest`; the staging directory is removed whatever happens.
    fn download(&self, python: &OsStr, tag: &str, dest: &Path) -> Result<PathBuf, String> {
        fs::create_dir_all(dest).map_err(|e| format!("creating {}: {e}", dest.display()))?;
        let staging = StagingDir::create(dest.parent().unwrap_or(dest))?;
        let args: Vec<OsString> = [
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--platform",
            tag,
            "--python-version",
            WHEEL_PYTHON_VERSION,
            &format!("onnxruntime=={ORT_VERSION}"),
            "-d",
        ]
        .iter()
        .map(OsString::from)
        .chain([staging.0.clone().into_os_string()])
        .collect();
        (self.pip)(python, &args)?;

        let wheel = fs::read_dir(&staging.0)
            .map_err(|e| format!("reading {}: {e}", staging.0.display()))?
            .filter_map(Result::ok)
            .map(|entry| entry.path())
            .find(|path| {
                path.file_name()
                    .and_then(OsStr::to_str)
                    .is_some_and(|name| name.starts_with("onnxruntime-") && name.ends_with(".whl"))
            })
            .ok_or_else(|| {
                format!(
                    "pip reported success but left no onnxruntime-*.whl in {}",
                    staging.0.display()
                )
            })?;
        extract_library(&wheel, self.platform, dest)
    }
}

/// A uniquely named scratch directory, removed on drop.
struct StagingDir(PathBuf);

impl StagingDir {
    fn create(parent: &Path) -> Result<StagingDir, String> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |elapsed| elapsed.subsec_nanos());
        let dir = parent.join(format!(".pip-download-{}-{nanos}", std::process::id()));
        fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        Ok(StagingDir(dir))
    }
}

impl Drop for StagingDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Extracts `onnxruntime/capi/<library>` from the wheel into `dest_dir` atomically (temporary
/// file, fsync, rename) and returns the library's path.
fn extract_library(wheel: &Path, platform: Platform, dest_dir: &Path) -> Result<PathBuf, String> {
    const CAPI: &str = "onnxruntime/capi/";
    let shown = wheel.display();
    let file = File::open(wheel).map_err(|e| format!("opening {shown}: {e}"))?;
    let mut archive = zip::ZipArchive::new(file).map_err(|e| format!("reading {shown}: {e}"))?;
    let (entry_name, file_name) = archive
        .file_names()
        .filter_map(|name| {
            let file_name = name.strip_prefix(CAPI)?;
            platform
                .is_library_name(file_name)
                .then(|| (name.to_owned(), file_name.to_owned()))
        })
        .max_by_key(|(_, file_name)| library_rank(file_name))
        .ok_or_else(|| format!("{shown} has no {CAPI}{}*", platform.generic_lib_name()))?;

    let dest = dest_dir.join(&file_name);
    let temp = dest_dir.join(format!(".{file_name}.tmp-{}", std::process::id()));
    let write = |archive: &mut zip::ZipArchive<File>| -> io::Result<()> {
        let mut entry = archive.by_name(&entry_name).map_err(io::Error::other)?;
        let mut out = File::create(&temp)?;
        io::copy(&mut entry, &mut out)?;
        out.sync_all()?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            out.set_permissions(fs::Permissions::from_mode(0o755))?;
        }
        drop(out);
        fs::rename(&temp, &dest)?;
        // Make the rename itself durable; not possible (nor needed) on every platform.
        if let Ok(dir) = File::open(dest_dir) {
            let _ = dir.sync_all();
        }
        Ok(())
    };
    write(&mut archive).map_err(|e| {
        let _ = fs::remove_file(&temp);
        format!(
            "extracting {entry_name} from {shown} to {}: {e}",
            dest.display()
        )
    })?;
    Ok(dest)
}

/// Runs `python -c PYTHON_QUERY`. A missing interpreter or package is an `Err` explaining which.
fn query_python(python: &OsStr) -> Result<PythonOrt, String> {
    let shown = python.to_string_lossy();
    let output = Command::new(python)
        .args(["-c", PYTHON_QUERY])
        .output()
        .map_err(|e| format!("could not run `{shown}`: {e}"))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let last = stderr.lines().last().unwrap_or("").trim();
        return Err(format!("`{shown}` cannot import onnxruntime ({last})"));
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let mut lines = stdout.lines().map(str::trim);
    match (lines.next(), lines.next()) {
        (Some(version), Some(dir)) if !version.is_empty() && !dir.is_empty() => Ok(PythonOrt {
            version: version.to_owned(),
            dir: PathBuf::from(dir),
        }),
        _ => Err(format!(
            "`{shown}` printed no onnxruntime version and directory"
        )),
    }
}

/// Runs `python <args>` with its output captured (densa's stdout may carry data); on failure the
/// end of pip's stderr goes into the message.
fn run_pip(python: &OsStr, args: &[OsString]) -> Result<(), String> {
    let shown = format!(
        "{} {}",
        python.to_string_lossy(),
        args.iter()
            .map(|arg| arg.to_string_lossy())
            .collect::<Vec<_>>()
            .join(" ")
    );
    let output = Command::new(python)
        .args(args)
        .output()
        .map_err(|e| format!("could not run `{shown}`: {e}"))?;
    if output.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|line| !line.trim().is_empty())
        .collect();
    let tail = lines[lines.len().saturating_sub(5)..].join("\n    ");
    Err(format!("`{shown}` failed ({}):\n    {tail}", output.status))
}

/// Finds the ONNX Runtime library from the real environment (see the module documentation for
/// the order). With `allow_download`, and `DENSA_ORT_NO_DOWNLOAD` unset, a missing library is
/// fetched with pip into densa's cache.
pub fn locate(allow_download: bool) -> Result<OrtLibrary, OrtLibError> {
    Probe::from_process().locate(allow_download)
}

struct OrtRuntime {
    library: OrtLibrary,
    environment: Environment,
}

/// The first call's outcome, success or failure, for the whole process: `ort` can load only one
/// library and build only one environment per process.
static RUNTIME: OnceLock<Result<OrtRuntime, OrtLibError>> = OnceLock::new();

fn runtime(allow_download: bool) -> Result<&'static OrtRuntime, OrtLibError> {
    RUNTIME
        .get_or_init(|| {
            let library = locate(allow_download)?;
            // ort resolves a relative path against the executable's directory, not the current
            // directory; discovery already made it absolute.
            let builder = ort::init_from(&library.path).map_err(|e| OrtLibError::Load {
                path: library.path.clone(),
                found_via: library.source,
                reason: e.to_string(),
            })?;
            let environment = builder
                .with_name("densa")
                // A toolkit should not phone home on the user's behalf (only Microsoft's Windows
                // builds send telemetry at all).
                .with_telemetry(false)
                .build()
                .map_err(|e| OrtLibError::Environment {
                    reason: e.to_string(),
                })?;
            tracing::info!(
                path = %library.path.display(),
                source = %library.source,
                "loaded ONNX Runtime"
            );
            Ok(OrtRuntime {
                library,
                environment,
            })
        })
        .as_ref()
        .map_err(Clone::clone)
}

/// Loads ONNX Runtime (see [`locate`]) and builds the process-wide `ort` environment, once per
/// process: later calls return the first call's result whatever their `allow_download`.
pub fn init(allow_download: bool) -> Result<&'static OrtLibrary, OrtLibError> {
    runtime(allow_download).map(|runtime| &runtime.library)
}

/// The process-wide `ort` environment, after [`init`]; `ort::session::Session::builder` takes it.
pub fn environment(allow_download: bool) -> Result<&'static Environment, OrtLibError> {
    runtime(allow_download).map(|runtime| &runtime.environment)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    const LINUX: Platform = Platform {
        os: "linux",
        arch: "x86_64",
    };

    fn touch(path: &Path) -> PathBuf {
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, b"not really a library").unwrap();
        path.to_path_buf()
    }

    /// A Linux probe with no variables, no Python package and a pip that must not run.
    fn probe(cwd: &Path) -> Probe {
        Probe {
            env: HashMap::new(),
            cwd: Some(cwd.to_path_buf()),
            platform: LINUX,
            python: Box::new(|_| Err("python3 not found (test)".to_owned())),
            pip: Box::new(|_, _| panic!("pip must not run in this test")),
        }
    }

    fn set(probe: &mut Probe, key: &str, value: impl Into<OsString>) {
        probe.env.insert(key.to_owned(), value.into());
    }

    fn python_package(version: &'static str, dir: PathBuf) -> PythonQuery {
        Box::new(move |_| {
            Ok(PythonOrt {
                version: version.to_owned(),
                dir: dir.clone(),
            })
        })
    }

    #[test]
    fn env_var_beats_project_local_beats_cache() {
        let root = tempfile::tempdir().unwrap();
        let root = root.path();
        let from_env = touch(&root.join("elsewhere/libonnxruntime.so.1.31.1"));
        let local = touch(&root.join("project/.ort/libonnxruntime.so.1.31.1"));
        let cached = touch(&root.join("cache/onnxruntime/1.31.1/libonnxruntime.so.1.31.1"));
        let nested = root.join("project/src/deep");
        fs::create_dir_all(&nested).unwrap();

        let mut p = probe(&nested);
        set(&mut p, "DENSA_CACHE_DIR", root.join("cache"));
        set(&mut p, "ORT_DYLIB_PATH", &from_env);
        let lib = p.locate(false).unwrap();
        assert_eq!((lib.path, lib.source), (from_env, OrtSource::EnvVar));

        p.env.remove("ORT_DYLIB_PATH");
        let lib = p.locate(false).unwrap();
        assert_eq!((lib.path, lib.source), (local, OrtSource::ProjectLocal));

        p.cwd = Some(root.join("elsewhere"));
        let lib = p.locate(false).unwrap();
        assert_eq!((lib.path, lib.source), (cached, OrtSource::UserCache));
    }

    #[test]
    fn cache_beats_python_package() {
        let root = tempfile::tempdir().unwrap();
        let root = root.path();
        let cached = touch(&root.join("cache/onnxruntime/1.31.1/libonnxruntime.so.1.31.1"));
        touch(&root.join("site/onnxruntime/capi/libonnxruntime.so.1.31.1"));
        let mut p = probe(root);
        set(&mut p, "DENSA_CACHE_DIR", root.join("cache"));
        p.python = python_package("1.31.1", root.join("site/onnxruntime"));
        let lib = p.locate(false).unwrap();
        assert_eq!((lib.path, lib.source), (cached, OrtSource::UserCache));
    }

    #[test]
    fn relative_env_var_resolves_against_cwd() {
        let root = tempfile::tempdir().unwrap();
        let lib = touch(&root.path().join("lib/libonnxruntime.so"));
        let mut p = probe(root.path());
        set(&mut p, "ORT_DYLIB_PATH", "lib/libonnxruntime.so");
        assert_eq!(p.locate(false).unwrap().path, lib);
    }

    #[test]
    fn env_var_at_missing_file_is_an_error() {
        let root = tempfile::tempdir().unwrap();
        // A project-local copy exists, but a stale variable must not be silently ignored.
        touch(&root.path().join(".ort/libonnxruntime.so.1.31.1"));
        let mut p = probe(root.path());
        let missing = root.path().join("gone/libonnxruntime.so");
        set(&mut p, "ORT_DYLIB_PATH", &missing);
        let err = p.locate(true).unwrap_err();
        assert!(
            matches!(&err, OrtLibError::EnvVarMissingFile { path } if *path == missing),
            "{err:?}"
        );
        let text = err.to_string();
        assert!(
            text.contains("ORT_DYLIB_PATH points at a missing file"),
            "{text}"
        );
        assert!(text.contains(&missing.display().to_string()), "{text}");
    }

    #[test]
    fn empty_env_var_counts_as_unset() {
        let root = tempfile::tempdir().unwrap();
        let local = touch(&root.path().join(".ort/libonnxruntime.so.1.31.1"));
        let mut p = probe(root.path());
        set(&mut p, "ORT_DYLIB_PATH", "");
        assert_eq!(p.locate(false).unwrap().path, local);
    }

    #[test]
    fn project_local_prefers_the_versioned_library() {
        let root = tempfile::tempdir().unwrap();
        let ort = root.path().join(".ort");
        touch(&ort.join("libonnxruntime.so"));
        touch(&ort.join("libonnxruntime.so.1.30.0"));
        touch(&ort.join("libonnxruntime_providers_shared.so"));
        let wanted = touch(&ort.join("libonnxruntime.so.1.31.1"));
        touch(&ort.join("libonnxruntime.so.1.4.0"));
        let lib = probe(root.path()).locate(false).unwrap();
        assert_eq!(lib.path, wanted);
    }

    #[test]
    fn empty_ort_dir_is_skipped_and_reported() {
        let root = tempfile::tempdir().unwrap();
        fs::create_dir_all(root.path().join(".ort")).unwrap();
        touch(&root.path().join(".ort/libonnxruntime_providers_shared.so"));
        let err = probe(root.path()).locate(false).unwrap_err();
        assert!(
            err.to_string()
                .contains(".ort: no libonnxruntime.so* in it"),
            "{err}"
        );
    }

    #[test]
    fn library_names_per_platform() {
        let mac = Platform {
            os: "macos",
            arch: "aarch64",
        };
        let windows = Platform {
            os: "windows",
            arch: "x86_64",
        };
        assert!(LINUX.is_library_name("libonnxruntime.so"));
        assert!(LINUX.is_library_name("libonnxruntime.so.1.31.1"));
        assert!(!LINUX.is_library_name("libonnxruntime_providers_shared.so"));
        assert!(!LINUX.is_library_name(".libonnxruntime.so.1.31.1.tmp-7"));
        assert!(!LINUX.is_library_name("libonnxruntime.sox"));
        assert!(mac.is_library_name("libonnxruntime.1.31.1.dylib"));
        assert!(!mac.is_library_name("libonnxruntime_providers_shared.dylib"));
        assert!(windows.is_library_name("onnxruntime.dll"));
        assert_eq!(mac.wheel_tag(), Some("macosx_14_0_arm64"));
        assert_eq!(
            Platform {
                os: "linux",
                arch: "aarch64"
            }
            .wheel_tag(),
            Some("manylinux_2_28_aarch64")
        );
        assert_eq!(windows.wheel_tag(), None);
    }

    #[test]
    fn cache_dir_order() {
        let root = tempfile::tempdir().unwrap();
        let mut p = probe(root.path());
        assert_eq!(p.cache_dir(), None);
        set(&mut p, "HOME", "/home/u");
        assert_eq!(p.cache_dir(), Some(PathBuf::from("/home/u/.cache/densa")));
        set(&mut p, "XDG_CACHE_HOME", "relative/is/ignored");
        assert_eq!(p.cache_dir(), Some(PathBuf::from("/home/u/.cache/densa")));
        set(&mut p, "XDG_CACHE_HOME", "/xdg");
        assert_eq!(p.cache_dir(), Some(PathBuf::from("/xdg/densa")));
        set(&mut p, "DENSA_CACHE_DIR", "/densa-cache");
        assert_eq!(p.cache_dir(), Some(PathBuf::from("/densa-cache")));
    }

    #[test]
    fn python_package_is_used_when_recent_enough() {
        let root = tempfile::tempdir().unwrap();
        let package = root.path().join("site-packages/onnxruntime");
        let lib = touch(&package.join("capi/libonnxruntime.so.1.31.1"));
        touch(&package.join("capi/libonnxruntime_providers_shared.so"));
        for version in ["1.31.1", "1.31.0", "1.32.0.dev20260101", "2.0.0"] {
            let mut p = probe(root.path());
            p.python = python_package(version, package.clone());
            let found = p.locate(false).unwrap();
            assert_eq!(
                (&found.path, found.source),
                (&lib, OrtSource::PythonPackage)
            );
        }
    }

    #[test]
    fn python_package_too_old_is_skipped() {
        let root = tempfile::tempdir().unwrap();
        let package = root.path().join("site-packages/onnxruntime");
        touch(&package.join("capi/libonnxruntime.so.1.20.1"));
        let mut p = probe(root.path());
        p.python = python_package("1.20.1", package);
        let err = p.locate(false).unwrap_err();
        assert!(matches!(err, OrtLibError::NotFound { .. }), "{err:?}");
        assert!(err.to_string().contains("onnxruntime 1.20.1"), "{err}");
        assert!(err.to_string().contains("older than the 1.31"), "{err}");
    }

    #[test]
    fn python_interpreter_comes_from_densa_python() {
        let root = tempfile::tempdir().unwrap();
        let asked = Arc::new(Mutex::new(Vec::new()));
        let mut p = probe(root.path());
        let record = asked.clone();
        p.python = Box::new(move |python| {
            record.lock().unwrap().push(python.to_owned());
            Err("no package (test)".to_owned())
        });
        p.locate(false).unwrap_err();
        set(&mut p, "DENSA_PYTHON", "/opt/py/bin/python3.12");
        p.locate(false).unwrap_err();
        assert_eq!(
            *asked.lock().unwrap(),
            [
                OsString::from("python3"),
                OsString::from("/opt/py/bin/python3.12")
            ]
        );
    }

    #[test]
    fn missing_interpreter_is_not_found_not_a_failure() {
        let why = query_python(OsStr::new("/nonexistent/densa-test/python3")).unwrap_err();
        assert!(why.contains("could not run"), "{why}");
    }

    #[test]
    fn nothing_found_says_how_to_get_it() {
        let root = tempfile::tempdir().unwrap();
        let mut p = probe(root.path());
        set(&mut p, "DENSA_CACHE_DIR", root.path().join("cache"));
        let text = p.locate(false).unwrap_err().to_string();
        for needle in [
            "ONNX Runtime 1.31.1 was not found",
            "pip install onnxruntime==1.31.1",
            "ORT_DYLIB_PATH",
            "./.ort/",
            "Tried:",
            "python3 not found (test)",
            "download: not allowed here",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
        }
    }

    #[test]
    fn no_download_env_var_stops_the_download() {
        let root = tempfile::tempdir().unwrap();
        let mut p = probe(root.path());
        set(&mut p, "DENSA_CACHE_DIR", root.path().join("cache"));
        set(&mut p, "DENSA_ORT_NO_DOWNLOAD", "1");
        let text = p.locate(true).unwrap_err().to_string();
        assert!(text.contains("disabled by DENSA_ORT_NO_DOWNLOAD"), "{text}");
        assert!(text.contains("pip install onnxruntime==1.31.1"), "{text}");
    }

    #[test]
    fn unsupported_platform_says_so() {
        let root = tempfile::tempdir().unwrap();
        let mut p = probe(root.path());
        set(&mut p, "DENSA_CACHE_DIR", root.path().join("cache"));
        p.platform = Platform {
            os: "freebsd",
            arch: "x86_64",
        };
        let err = p.locate(true).unwrap_err();
        assert!(
            matches!(err, OrtLibError::DownloadUnsupported { .. }),
            "{err:?}"
        );
        let text = err.to_string();
        assert!(text.contains("not on freebsd x86_64"), "{text}");
        assert!(text.contains("pip install onnxruntime==1.31.1"), "{text}");
    }

    /// A wheel-shaped zip: the library, the providers library and some Python.
    fn write_fake_wheel(path: &Path, library_bytes: &[u8]) {
        let mut zip = zip::ZipWriter::new(File::create(path).unwrap());
        let options = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Deflated);
        for (name, bytes) in [
            ("onnxruntime/__init__.py", &b"# python"[..]),
            (
                "onnxruntime/capi/libonnxruntime_providers_shared.so",
                b"providers",
            ),
            ("onnxruntime/capi/libonnxruntime.so.1.31.1", library_bytes),
            ("onnxruntime-1.31.1.dist-info/RECORD", b"record"),
        ] {
            zip.start_file(name, options).unwrap();
            zip.write_all(bytes).unwrap();
        }
        zip.finish().unwrap();
    }

    #[test]
    fn download_fetches_the_wheel_with_pip_and_extracts_the_library() {
        let root = tempfile::tempdir().unwrap();
        let cache = root.path().join("cache");
        let calls = Arc::new(Mutex::new(Vec::new()));
        let mut p = probe(root.path());
        set(&mut p, "DENSA_CACHE_DIR", &cache);
        set(&mut p, "DENSA_PYTHON", "my-python");
        let record = calls.clone();
        p.pip = Box::new(move |python, args| {
            let args: Vec<String> = args
                .iter()
                .map(|a| a.to_string_lossy().into_owned())
                .collect();
            let dir = PathBuf::from(args.last().unwrap());
            write_fake_wheel(
                &dir.join("onnxruntime-1.31.1-cp311-cp311-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl"),
                b"the library",
            );
            record.lock().unwrap().push((python.to_owned(), args));
            Ok(())
        });

        let lib = p.locate(true).unwrap();
        let expected = cache.join("onnxruntime/1.31.1/libonnxruntime.so.1.31.1");
        assert_eq!((&lib.path, lib.source), (&expected, OrtSource::Downloaded));
        assert_eq!(fs::read(&expected).unwrap(), b"the library");

        let calls = calls.lock().unwrap();
        assert_eq!(calls.len(), 1);
        let (python, args) = &calls[0];
        assert_eq!(python, "my-python");
        let joined = args.join(" ");
        assert!(
            joined.starts_with(
                "-m pip download --no-deps --only-binary=:all: --platform manylinux_2_28_x86_64 \
                 --python-version 3.11 onnxruntime==1.31.1 -d "
            ),
            "{joined}"
        );
        // Only the library stays: no wheel, no staging directory, no temporary file.
        let left: Vec<_> = fs::read_dir(cache.join("onnxruntime"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, [OsString::from("1.31.1")]);
        let left: Vec<_> = fs::read_dir(cache.join("onnxruntime/1.31.1"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, [OsString::from("libonnxruntime.so.1.31.1")]);

        // The next run finds it in the cache without pip.
        p.pip = Box::new(|_, _| panic!("pip must not run again"));
        let again = p.locate(true).unwrap();
        assert_eq!((again.path, again.source), (expected, OrtSource::UserCache));
    }

    #[test]
    fn pip_failure_is_reported_with_the_way_out() {
        let root = tempfile::tempdir().unwrap();
        let mut p = probe(root.path());
        set(&mut p, "DENSA_CACHE_DIR", root.path().join("cache"));
        p.pip = Box::new(|_, _| Err("`python3 -m pip download` failed: no network".to_owned()));
        let err = p.locate(true).unwrap_err();
        assert!(matches!(err, OrtLibError::DownloadFailed { .. }), "{err:?}");
        let text = err.to_string();
        assert!(text.contains("no network"), "{text}");
        assert!(text.contains("pip install onnxruntime==1.31.1"), "{text}");
        assert!(!root
            .path()
            .join("cache/onnxruntime/1.31.1/libonnxruntime.so.1.31.1")
            .exists());
    }

    #[test]
    fn wheel_without_library_is_an_error() {
        let root = tempfile::tempdir().unwrap();
        let wheel = root.path().join("onnxruntime-1.31.1-py3-none-any.whl");
        let mut zip = zip::ZipWriter::new(File::create(&wheel).unwrap());
        zip.start_file(
            "onnxruntime/__init__.py",
            zip::write::SimpleFileOptions::default(),
        )
        .unwrap();
        zip.finish().unwrap();
        let why = extract_library(&wheel, LINUX, root.path()).unwrap_err();
        assert!(
            why.contains("has no onnxruntime/capi/libonnxruntime.so*"),
            "{why}"
        );
    }

    /// The real thing: loads the library this machine has (the `onnxruntime` pip package here)
    /// and builds the environment. Without a library it only prints a note, unless
    /// `DENSA_REQUIRE_ORT=1`.
    #[test]
    fn init_with_installed_onnxruntime() {
        let library = match init(false) {
            Ok(library) => library,
            Err(err) if std::env::var("DENSA_REQUIRE_ORT").as_deref() != Ok("1") => {
                eprintln!("note: skipping init_with_installed_onnxruntime: {err}");
                return;
            }
            Err(err) => panic!("DENSA_REQUIRE_ORT=1 but ONNX Runtime is unavailable: {err}"),
        };
        eprintln!(
            "ONNX Runtime from {} ({})",
            library.path.display(),
            library.source
        );
        assert!(library.path.is_file());
        // A second call returns the same, cached, library and environment.
        assert!(std::ptr::eq(library, init(true).unwrap()));
        environment(false).unwrap();
        assert!(ort::info().contains("ORT Build Info"), "{}", ort::info());
    }
}
