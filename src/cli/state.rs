//! The state directory: one folder per VM created with `monstervm create`.
//!
//! ```text
//! <state>/vms/NAME/vm.toml      the VM definition (utils::config::VmConfig)
//!                  lock         held (an OFD write lock) by the VMM for its whole life
//!                  pid          the VMM's process ID, removed on a clean exit
//!                  api.sock     the API's Unix socket
//!                  api.addr     the API's TCP address, when it listens on TCP
//!                  serial.log   everything the guest wrote to its serial port
//!                  vmm.log      the VMM's stdout and stderr (its tracing log)
//!                  last_error   why the last run ended in failure, if it did
//! ```
//!
//! The lock, not the pid file, decides whether a VMM runs: the kernel drops the lock when
//! the process dies however it dies, and a reused process ID cannot fake it. `start` takes
//! the lock before it spawns the VMM and hands the locked descriptor down, so two `start`s
//! of one VM cannot both succeed.

use std::fs::{DirBuilder, File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::utils::config::{ConfigError, VmConfig};

/// Environment variable that gives the state directory when `--state-dir` is absent.
pub const STATE_DIR_ENV: &str = "MONSTERVM_STATE_DIR";
/// Environment variable through which `start` passes the locked descriptor to the VMM.
pub const LOCK_FD_ENV: &str = "MONSTERVM_LOCK_FD";
/// Environment variable through which `start` passes the write end of a pipe to the VMM.
/// The VMM writes one byte to it once the VM runs, so `start` need not poll the API.
pub const READY_FD_ENV: &str = "MONSTERVM_READY_FD";
/// Longest path a Unix socket address holds on Linux (`sun_path` is 108 bytes with the NUL).
pub const MAX_SOCKET_PATH_BYTES: usize = 107;

/// Errors raised by the state directory.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("no state directory: set --state-dir, MONSTERVM_STATE_DIR, XDG_STATE_HOME or HOME")]
    NoHome,
    #[error("failed to {action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("VM {name} not found in {state_dir}: create it with `monstervm create {name}`")]
    NotFound { name: String, state_dir: PathBuf },
    #[error("VM {name} already exists in {state_dir}: delete it or choose another name")]
    AlreadyExists { name: String, state_dir: PathBuf },
    #[error("VM {name} is in use by a running VMM or another monstervm command")]
    Locked { name: String },
    #[error(
        "API socket path {path} is {len} bytes, over the {MAX_SOCKET_PATH_BYTES}-byte limit of Unix sockets: use a shorter --state-dir"
    )]
    SocketPathTooLong { path: PathBuf, len: usize },
    #[error("{LOCK_FD_ENV}={fd} is not an open descriptor of {path}: run the VMM through `monstervm start`")]
    BadInheritedLock { fd: RawFd, path: PathBuf },
}

fn io_error<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> StateError + 'a {
    move |source| StateError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// The root of the state directory.
#[derive(Debug, Clone)]
pub struct StateDir {
    root: PathBuf,
}

impl StateDir {
    /// Uses `explicit` (from `--state-dir` or `MONSTERVM_STATE_DIR`), else
    /// `$XDG_STATE_HOME/monstervm`, else `$HOME/.local/state/monstervm`. Root follows the
    /// same rule, so `sudo` with a preserved HOME finds the invoking user's VMs.
    pub fn resolve(explicit: Option<&Path>) -> Result<StateDir, StateError> {
        let root = match explicit {
            Some(path) => path.to_path_buf(),
            None => default_root()?,
        };
        // The VMM gets this path on its command line and may not share our working folder.
        let root = std::path::absolute(&root).map_err(io_error("resolve", &root))?;
        Ok(StateDir { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn vms_dir(&self) -> PathBuf {
        self.root.join("vms")
    }

    /// Returns the folder of VM `name`, which need not exist yet.
    pub fn vm(&self, name: &str) -> Result<VmDir, StateError> {
        validate_name(name)?;
        Ok(VmDir {
            name: name.to_string(),
            path: self.vms_dir().join(name),
        })
    }

    /// Returns the folder of VM `name`, or [`StateError::NotFound`].
    pub fn existing_vm(&self, name: &str) -> Result<VmDir, StateError> {
        let vm = self.vm(name)?;
        if !vm.config_path().is_file() {
            return Err(StateError::NotFound {
                name: name.to_string(),
                state_dir: self.root.clone(),
            });
        }
        Ok(vm)
    }

    /// Creates the folder of `config.name` with its definition and lock file.
    pub fn create_vm(&self, config: &VmConfig) -> Result<VmDir, StateError> {
        let vms = self.vms_dir();
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&vms)
            .map_err(io_error("create", &vms))?;

        let vm = self.vm(&config.name)?;
        match DirBuilder::new().mode(0o700).create(&vm.path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                return Err(StateError::AlreadyExists {
                    name: config.name.clone(),
                    state_dir: self.root.clone(),
                })
            }
            Err(e) => return Err(io_error("create", &vm.path)(e)),
        }
        vm.check_socket_path()?;

        // Write through a temporary name so that a half-written definition never appears.
        let staging = vm.path.join("vm.toml.tmp");
        std::fs::write(&staging, config.to_toml()).map_err(io_error("write", &staging))?;
        std::fs::rename(&staging, vm.config_path())
            .map_err(io_error("write", &vm.config_path()))?;
        Ok(vm)
    }

    /// Returns the names of every VM folder that contains a definition, sorted.
    pub fn vm_names(&self) -> Result<Vec<String>, StateError> {
        let vms = self.vms_dir();
        let entries = match std::fs::read_dir(&vms) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_error("read", &vms)(e)),
        };
        let mut names = Vec::new();
        for entry in entries {
            let entry = entry.map_err(io_error("read", &vms))?;
            let Some(name) = entry.file_name().to_str().map(str::to_string) else {
                continue;
            };
            if validate_name(&name).is_ok() && entry.path().join("vm.toml").is_file() {
                names.push(name);
            }
        }
        names.sort();
        Ok(names)
    }
}

fn default_root() -> Result<PathBuf, StateError> {
    // The XDG base directory specification ignores relative paths.
    if let Some(xdg) = std::env::var_os("XDG_STATE_HOME").map(PathBuf::from) {
        if xdg.is_absolute() {
            return Ok(xdg.join("monstervm"));
        }
    }
    match std::env::var_os("HOME").map(PathBuf::from) {
        Some(home) if home.is_absolute() => Ok(home.join(".local/state/monstervm")),
        _ => Err(StateError::NoHome),
    }
}

/// Checks `name` with the same rule as the VM definition, because it becomes a path.
pub fn validate_name(name: &str) -> Result<(), ConfigError> {
    VmConfig {
        name: name.to_string(),
        ..VmConfig::default()
    }
    .validate()
}

/// The folder of one VM.
#[derive(Debug, Clone)]
pub struct VmDir {
    name: String,
    path: PathBuf,
}

impl VmDir {
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn config_path(&self) -> PathBuf {
        self.path.join("vm.toml")
    }

    pub fn lock_path(&self) -> PathBuf {
        self.path.join("lock")
    }

    pub fn pid_path(&self) -> PathBuf {
        self.path.join("pid")
    }

    pub fn socket_path(&self) -> PathBuf {
        self.path.join("api.sock")
    }

    pub fn api_addr_path(&self) -> PathBuf {
        self.path.join("api.addr")
    }

    pub fn serial_log_path(&self) -> PathBuf {
        self.path.join("serial.log")
    }

    pub fn vmm_log_path(&self) -> PathBuf {
        self.path.join("vmm.log")
    }

    pub fn last_error_path(&self) -> PathBuf {
        self.path.join("last_error")
    }

    /// Fails when the API socket's path does not fit in a Unix socket address.
    pub fn check_socket_path(&self) -> Result<(), StateError> {
        let path = self.socket_path();
        let len = path.as_os_str().len();
        if len > MAX_SOCKET_PATH_BYTES {
            return Err(StateError::SocketPathTooLong { path, len });
        }
        Ok(())
    }

    /// Loads and checks the VM definition.
    pub fn load_config(&self) -> Result<VmConfig, StateError> {
        Ok(VmConfig::load(&self.config_path())?)
    }

    /// Returns the process ID in the pid file, or `None` if the file is absent or garbled.
    pub fn read_pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.pid_path())
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    pub fn write_pid(&self, pid: u32) -> Result<(), StateError> {
        let path = self.pid_path();
        std::fs::write(&path, format!("{pid}\n")).map_err(io_error("write", &path))
    }

    /// Returns the recorded reason of the last failure, if any.
    pub fn read_last_error(&self) -> Option<String> {
        let text = std::fs::read_to_string(self.last_error_path()).ok()?;
        let text = text.trim();
        (!text.is_empty()).then(|| text.to_string())
    }

    pub fn write_last_error(&self, message: &str) -> Result<(), StateError> {
        let path = self.last_error_path();
        std::fs::write(&path, format!("{message}\n")).map_err(io_error("write", &path))
    }

    /// Removes `path` inside this folder, ignoring a file that is already gone.
    pub fn remove_file(&self, path: &Path) -> Result<(), StateError> {
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_error("remove", path)(e)),
            _ => Ok(()),
        }
    }

    /// Removes what a VMM leaves behind when it dies without cleaning up.
    pub fn remove_runtime_files(&self) -> Result<(), StateError> {
        self.remove_file(&self.socket_path())?;
        self.remove_file(&self.api_addr_path())?;
        self.remove_file(&self.pid_path())
    }

    fn open_lock_file(&self) -> Result<File, StateError> {
        let path = self.lock_path();
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(io_error("open", &path))
    }

    /// Returns true while a VMM, or a command that is starting or deleting the VM, holds
    /// the VM's lock.
    pub fn is_locked(&self) -> Result<bool, StateError> {
        let file = self.open_lock_file()?;
        let mut lock = whole_file_write_lock();
        // SAFETY: `lock` is a valid flock struct that F_OFD_GETLK fills in, and the
        // descriptor stays open for the duration of the call.
        let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_GETLK, &mut lock) };
        if rc != 0 {
            return Err(io_error("query the lock on", &self.lock_path())(
                io::Error::last_os_error(),
            ));
        }
        Ok(i32::from(lock.l_type) != libc::F_UNLCK)
    }

    /// Takes the VM's lock without waiting, or returns [`StateError::Locked`].
    pub fn try_lock(&self) -> Result<VmLock, StateError> {
        let file = self.open_lock_file()?;
        match set_lock(&file) {
            Ok(()) => Ok(VmLock { file }),
            Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EACCES)) => {
                Err(StateError::Locked {
                    name: self.name.clone(),
                })
            }
            Err(e) => Err(io_error("lock", &self.lock_path())(e)),
        }
    }

    /// Adopts the lock that `start` handed down as descriptor `fd`, after checking that
    /// `fd` is this VM's lock file.
    pub fn adopt_lock(&self, fd: RawFd) -> Result<VmLock, StateError> {
        let bad_lock = || StateError::BadInheritedLock {
            fd,
            path: self.lock_path(),
        };
        let expected = std::fs::metadata(self.lock_path()).map_err(|_| bad_lock())?;
        // SAFETY: stat is plain old data, so all zeros is a valid value.
        let mut stat: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: `stat` is a valid buffer for fstat to fill; a descriptor that is not open
        // yields EBADF.
        if fd < 3 || unsafe { libc::fstat(fd, &mut stat) } != 0 {
            return Err(bad_lock());
        }
        if stat.st_dev != expected.dev() || stat.st_ino != expected.ino() {
            return Err(bad_lock());
        }
        // SAFETY: the descriptor is open and refers to the lock file (checked above), and
        // nothing else in this process owns it: `start` passed it only through LOCK_FD_ENV.
        let file = unsafe { File::from_raw_fd(fd) };
        // SAFETY: F_SETFD with FD_CLOEXEC only changes the descriptor's flags.
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
        // Setting the lock again through the inherited description succeeds only if that
        // description holds it, which proves that `start` locked it for us.
        set_lock(&file).map_err(|_| StateError::Locked {
            name: self.name.clone(),
        })?;
        Ok(VmLock { file })
    }
}

fn whole_file_write_lock() -> libc::flock {
    // SAFETY: flock is plain old data, so all zeros is a valid value.
    let mut lock: libc::flock = unsafe { std::mem::zeroed() };
    lock.l_type = libc::F_WRLCK as libc::c_short;
    lock.l_whence = libc::SEEK_SET as libc::c_short;
    lock
}

fn set_lock(file: &File) -> io::Result<()> {
    let mut lock = whole_file_write_lock();
    // SAFETY: `lock` is a valid flock struct and the descriptor is open.
    let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &mut lock) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A held VM lock. It is released when the last descriptor of its open file description
/// closes: on drop, or when the VMM that inherited it exits.
#[derive(Debug)]
pub struct VmLock {
    file: File,
}

impl VmLock {
    /// Returns the descriptor, for handing the lock to a child process.
    pub fn raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> (tempfile::TempDir, StateDir) {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::resolve(Some(dir.path())).unwrap();
        (dir, state)
    }

    #[test]
    fn create_then_list_and_load() {
        let (_dir, state) = state();
        let config = VmConfig {
            name: "web".into(),
            memory_mib: 64,
            ..VmConfig::default()
        };

        let vm = state.create_vm(&config).unwrap();

        assert_eq!(state.vm_names().unwrap(), vec!["web".to_string()]);
        assert_eq!(vm.load_config().unwrap(), config);
        let error = state.create_vm(&config).unwrap_err();
        assert!(matches!(error, StateError::AlreadyExists { .. }), "{error}");
    }

    #[test]
    fn missing_vm_is_not_found() {
        let (_dir, state) = state();
        let error = state.existing_vm("nope").unwrap_err();
        assert!(matches!(error, StateError::NotFound { .. }), "{error}");
    }

    #[test]
    fn path_like_names_are_rejected() {
        let (_dir, state) = state();
        for name in ["../etc", ".hidden", "a/b", ""] {
            assert!(state.vm(name).is_err(), "{name:?}");
        }
    }

    #[test]
    fn lock_is_exclusive_and_released_on_drop() {
        let (_dir, state) = state();
        let vm = state.create_vm(&VmConfig::default()).unwrap();
        assert!(!vm.is_locked().unwrap());

        let lock = vm.try_lock().unwrap();
        assert!(vm.is_locked().unwrap());
        assert!(matches!(vm.try_lock(), Err(StateError::Locked { .. })));

        drop(lock);
        assert!(!vm.is_locked().unwrap());
        vm.try_lock().unwrap();
    }

    #[test]
    fn long_socket_path_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let deep = dir.path().join("d".repeat(100));
        let state = StateDir::resolve(Some(&deep)).unwrap();

        let error = state.create_vm(&VmConfig::default()).unwrap_err();
        assert!(
            matches!(error, StateError::SocketPathTooLong { .. }),
            "{error}"
        );
    }

    #[test]
    fn adopted_lock_must_be_the_lock_file() {
        let (dir, state) = state();
        let vm = state.create_vm(&VmConfig::default()).unwrap();
        let other = File::create(dir.path().join("other")).unwrap();

        let error = vm.adopt_lock(other.as_raw_fd()).unwrap_err();
        assert!(
            matches!(error, StateError::BadInheritedLock { .. }),
            "{error}"
        );
    }
}
