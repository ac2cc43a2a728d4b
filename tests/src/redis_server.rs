//! A throwaway redis-server for tests (issue #4: two nodes sharing Redis,
//! Redis stopped and restarted mid-run).
//!
//! Like the PostgreSQL harness, it runs the machine's own binary (Debian
//! package `redis-server`) on a free loopback port, with no persistence, in
//! a temp dir. A watchdog shell process kills the server and removes the dir
//! if the test process exits without dropping the [`RedisServer`]. Each call
//! to [`RedisServer::start`] starts its own server, because tests stop and
//! restart it.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

const INSTALL_HINT: &str = "redis-server not found: install the Debian package `redis-server` (apt-get install -y redis-server)";

/// How long a (re)started server may take to answer `PING`.
const READY_TIMEOUT: Duration = Duration::from_secs(15);

/// A redis-server owned by a test; killed (and its dir removed) on drop.
pub struct RedisServer {
    /// `redis://127.0.0.1:<port>/`, for `RedisBus::connect` (livechat-core,
    /// feature `redis`) or an example server's `REDIS_URL`.
    pub url: String,
    port: u16,
    dir: PathBuf,
    binary: PathBuf,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts a server on a free loopback port and waits until it answers.
    ///
    /// # Panics
    /// When the `redis-server` binary is missing (the message names the
    /// Debian package `redis-server`), or the server does not start.
    #[must_use]
    pub fn start() -> Self {
        let binary = find_binary().unwrap_or_else(|| panic!("{INSTALL_HINT}"));
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .unwrap_or_else(|e| panic!("free port for redis-server: {e}"))
            .port();
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let dir = std::env::temp_dir().join(format!(
            "livechat-redis-{}-{}-{nanos}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        spawn_watchdog(&dir);
        let mut server = Self {
            url: format!("redis://127.0.0.1:{port}/"),
            port,
            dir,
            binary,
            child: None,
        };
        server.spawn();
        server
    }

    /// The port the server listens on (kept across [`Self::restart`]).
    #[must_use]
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Whether the server is currently started.
    #[must_use]
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Kills the server and waits for it to exit (clients see their
    /// connections drop). Does nothing when already stopped.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
            let _ = std::fs::remove_file(self.pid_file());
        }
    }

    /// Starts the server again on the same port (stopping it first if it
    /// runs) and waits until it answers; it starts empty.
    ///
    /// # Panics
    /// When the server does not start.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    fn pid_file(&self) -> PathBuf {
        self.dir.join("server.pid")
    }

    fn spawn(&mut self) {
        let log_path = self.dir.join("redis.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .unwrap_or_else(|e| panic!("create {}: {e}", log_path.display()));
        let log_err = log
            .try_clone()
            .unwrap_or_else(|e| panic!("redis-server log: {e}"));
        let mut child = Command::new(&self.binary)
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--dir"])
            .arg(&self.dir)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .unwrap_or_else(|e| panic!("run {}: {e}; {INSTALL_HINT}", self.binary.display()));
        // For the watchdog: which process to kill if this one dies first.
        let _ = std::fs::write(self.pid_file(), child.id().to_string());
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if answers_ping(self.port) {
                break;
            }
            if let Ok(Some(status)) = child.try_wait() {
                let _ = std::fs::remove_file(self.pid_file());
                panic!(
                    "redis-server on port {} exited ({status}): {}",
                    self.port,
                    std::fs::read_to_string(&log_path).unwrap_or_default()
                );
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                let _ = std::fs::remove_file(self.pid_file());
                panic!(
                    "redis-server on port {} did not answer within {READY_TIMEOUT:?}: {}",
                    self.port,
                    std::fs::read_to_string(&log_path).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.child = Some(child);
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl std::fmt::Debug for RedisServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisServer")
            .field("url", &self.url)
            .field("running", &self.is_running())
            .finish_non_exhaustive()
    }
}

/// `redis-server` on `PATH`, or where Debian installs it.
fn find_binary() -> Option<PathBuf> {
    let mut candidates: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    candidates.extend(["/usr/bin", "/usr/sbin", "/usr/local/bin"].map(PathBuf::from));
    candidates
        .into_iter()
        .map(|dir| dir.join("redis-server"))
        .find(|path| path.is_file())
}

/// Whether a Redis on `port` answers `PING` with `+PONG`.
fn answers_ping(port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let mut reply = [0_u8; 7];
    stream
        .set_read_timeout(Some(Duration::from_secs(1)))
        .is_ok()
        && stream.write_all(b"PING\r\n").is_ok()
        && stream.read_exact(&mut reply).is_ok()
        && &reply == b"+PONG\r\n"
}

/// Watchdog: once this test process is gone, kill the server it left
/// running and remove `dir`; it exits by itself once `dir` is removed. It
/// runs detached (the `sh` we wait for backgrounds it), so it leaves no
/// zombie behind.
fn spawn_watchdog(dir: &Path) {
    let dir = dir.display().to_string().replace('\'', r"'\''");
    let script = format!(
        "(while kill -0 {pid} 2>/dev/null && [ -d '{dir}' ]; do sleep 1; done; \
         if [ -f '{dir}/server.pid' ]; then kill -9 \"$(cat '{dir}/server.pid')\" 2>/dev/null; fi; \
         rm -rf '{dir}') &",
        pid = std::process::id()
    );
    let status = Command::new("sh")
        .args(["-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap_or_else(|e| panic!("redis-server watchdog: {e}"));
    assert!(
        status.success(),
        "redis-server watchdog: sh exited with {status}"
    );
}
