//! Starting, watching and stopping the replicated program.

pub mod resp;

use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// Why the program could not be run.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// No program given.
    #[error(
        "no program to run: give it after --, e.g. falcon replicate -- redis-server --port 7001"
    )]
    Missing,
    /// It could not be started.
    #[error("starting {program:?}: {source}")]
    Spawn {
        /// The program.
        program: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// It never accepted connections.
    #[error(
        "{program:?} did not accept connections on {addr} within {waited:?} (is it configured to listen there?)"
    )]
    NotListening {
        /// The program.
        program: String,
        /// Where falcon expected it.
        addr: SocketAddr,
        /// How long falcon waited.
        waited: Duration,
    },
    /// Something already listens where the program should.
    #[error(
        "something already listens on {addr}: stop it first (a program left over from an earlier run?), or change app = in the cluster file"
    )]
    PortTaken {
        /// The address.
        addr: SocketAddr,
    },
    /// It exited while falcon waited for it.
    #[error("{program:?} exited with {status} before it accepted connections")]
    Exited {
        /// The program.
        program: String,
        /// Its exit status.
        status: ExitStatus,
    },
}

/// The signals falcon passes on to the program (reload, log rotation and the like).
pub const FORWARDED: [Signal; 3] = [Signal::SIGHUP, Signal::SIGUSR1, Signal::SIGUSR2];

/// Signals received and not yet passed on, one bit per signal number.
static PENDING: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

extern "C" fn note_signal(sig: libc::c_int) {
    // Only an atomic operation: async-signal-safe.
    if (0..64).contains(&sig) {
        PENDING.fetch_or(1 << sig, std::sync::atomic::Ordering::Relaxed);
    }
}

/// From now on, the [`FORWARDED`] signals are caught and kept for
/// [`take_signals`] instead of ending falcon.
pub fn catch_forwarded_signals() -> std::io::Result<()> {
    use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, sigaction};
    let action = SigAction::new(
        SigHandler::Handler(note_signal),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    for sig in FORWARDED {
        // SAFETY: the handler only does an atomic read-modify-write.
        unsafe { sigaction(sig, &action) }.map_err(std::io::Error::from)?;
    }
    Ok(())
}

/// The signals caught since the last call.
pub fn take_signals() -> Vec<Signal> {
    let bits = PENDING.swap(0, std::sync::atomic::Ordering::Relaxed);
    FORWARDED
        .into_iter()
        .filter(|s| bits & (1 << (*s as i32)) != 0)
        .collect()
}

/// The running program.
pub struct App {
    child: Child,
    /// Its name, for messages.
    pub program: String,
}

impl App {
    /// Starts `argv` (same working directory and environment; its output goes
    /// to `log_file` when given, else to the terminal) and waits until `addr`
    /// accepts connections.
    pub fn start(
        argv: &[String],
        addr: SocketAddr,
        timeout: Duration,
        log_file: Option<&std::path::Path>,
    ) -> Result<App, AppError> {
        if argv.is_empty() {
            return Err(AppError::Missing);
        }
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Err(AppError::PortTaken { addr });
        }
        let mut app = App::spawn(argv, log_file, None)?;
        let started = Instant::now();
        loop {
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok(app);
            }
            if let Ok(Some(status)) = app.child.try_wait() {
                return Err(AppError::Exited {
                    program: app.program.clone(),
                    status,
                });
            }
            if started.elapsed() > timeout {
                app.stop(Duration::from_secs(2));
                return Err(AppError::NotListening {
                    program: app.program.clone(),
                    addr,
                    waited: timeout,
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts `argv` as [`App::start`] does, without waiting for a port;
    /// `keep_fd` stays open in the child (under the same number).
    pub fn spawn(
        argv: &[String],
        log_file: Option<&std::path::Path>,
        keep_fd: Option<std::os::fd::RawFd>,
    ) -> Result<App, AppError> {
        let (program, args) = argv.split_first().ok_or(AppError::Missing)?;
        let mut cmd = Command::new(program);
        cmd.args(args).stdin(Stdio::null());
        // Its own process group: Ctrl-C at the terminal reaches falcon only,
        // which flushes its log and then stops the program itself.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        // If falcon dies (even by SIGKILL), the program gets SIGTERM instead
        // of living on as an orphan that a restarted replica would mistake
        // for its own fresh copy.
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if let Some(fd) = keep_fd {
                    let fl = libc::fcntl(fd, libc::F_GETFD);
                    if fl < 0 || libc::fcntl(fd, libc::F_SETFD, fl & !libc::FD_CLOEXEC) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        if let Some(path) = log_file {
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|source| AppError::Spawn {
                    program: program.clone(),
                    source,
                })?;
            let f2 = f.try_clone().map_err(|source| AppError::Spawn {
                program: program.clone(),
                source,
            })?;
            cmd.stdout(f).stderr(f2);
        }
        let child = cmd.spawn().map_err(|source| AppError::Spawn {
            program: program.clone(),
            source,
        })?;
        Ok(App {
            child,
            program: program.clone(),
        })
    }

    /// The program's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its exit status, if it has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Passes a signal on to the program.
    pub fn signal(&self, sig: Signal) {
        let _ = kill(Pid::from_raw(self.child.id() as i32), sig);
    }

    /// Waits up to `wait` for the program to exit on its own.
    pub fn wait_exit(&mut self, wait: Duration) -> Option<ExitStatus> {
        let until = Instant::now() + wait;
        loop {
            if let Some(s) = self.exited() {
                return Some(s);
            }
            if Instant::now() >= until {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGTERM, then SIGKILL after `grace`; waits for it.
    pub fn stop(&mut self, grace: Duration) -> Option<ExitStatus> {
        if let Some(s) = self.exited() {
            return Some(s);
        }
        self.signal(Signal::SIGTERM);
        let until = Instant::now() + grace;
        while Instant::now() < until {
            if let Some(s) = self.exited() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.signal(Signal::SIGKILL);
        self.child.wait().ok()
    }
}

impl Drop for App {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(2));
    }
}
