//! A real S3-compatible server for tests: moto (`moto_server`, from `moto[server]` on PyPI,
//! which `./scripts/test --install-only` installs into `target/test-venv`) on a free loopback
//! port, with one empty bucket. moto checks no signatures (any credentials do) and enforces
//! the conditional writes (`If-None-Match: *`, `If-Match`).
//!
//! The binary is `$SUPERVISE_TEST_MOTO`, else `target/test-venv/bin/moto_server` in the
//! repository. Shared by the object tier's unit tests (`src/remote/object.rs` includes this
//! file) and the end-to-end tests: it uses nothing but std and `nix`.
//!
//! moto keeps its objects in memory only (it has no persistence option): [`S3Server::stop`]
//! and [`S3Server::restart`] lose them. For a server that goes away and comes back with its
//! objects, [`S3Server::pause`] and [`S3Server::resume`] stop and continue the process.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// How long moto may take to answer after it was started (it imports a lot of Python).
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// A running moto server with one bucket; killed when dropped (also when a test panics).
pub struct S3Server {
    /// `http://127.0.0.1:PORT`: what `--s3-endpoint` and `AWS_ENDPOINT_URL` take.
    pub endpoint: String,
    /// The bucket created at start.
    pub bucket: String,
    port: u16,
    child: Option<Child>,
    log: PathBuf,
}

impl S3Server {
    /// Starts moto on a free port and creates the bucket. Panics when moto is not installed
    /// ("run ./scripts/test --install-only") or does not answer within a minute.
    ///
    /// The server also dies with the thread that started it (`PR_SET_PDEATHSIG`), so that
    /// no server outlives a killed test run: start it in the test that uses it, not in a
    /// static shared by tests.
    pub fn start() -> S3Server {
        let mut last = String::new();
        // The port is free when chosen; another process may take it before moto binds it.
        for _ in 0..3 {
            let port = free_port();
            let mut server = S3Server {
                endpoint: format!("http://127.0.0.1:{port}"),
                bucket: "supervise-test".to_string(),
                port,
                child: None,
                log: std::env::temp_dir()
                    .join(format!("supervise-moto-{}-{port}.log", std::process::id())),
            };
            match server.launch() {
                Ok(()) => return server,
                Err(why) => last = why,
            }
        }
        panic!("moto did not start: {last}");
    }

    /// `s3://BUCKET/PREFIX` (`s3://BUCKET` for an empty prefix).
    pub fn url(&self, prefix: &str) -> String {
        let prefix = prefix.trim_matches('/');
        if prefix.is_empty() {
            format!("s3://{}", self.bucket)
        } else {
            format!("s3://{}/{prefix}", self.bucket)
        }
    }

    /// The environment a client of this server needs: test credentials, a region and
    /// `AWS_ENDPOINT_URL`.
    pub fn env(&self) -> Vec<(String, String)> {
        [
            ("AWS_ACCESS_KEY_ID", "test"),
            ("AWS_SECRET_ACCESS_KEY", "test"),
            ("AWS_REGION", "us-east-1"),
            ("AWS_ENDPOINT_URL", self.endpoint.as_str()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    /// Kills the server: its port refuses connections (a client fails at once) and its
    /// objects are gone.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops the server and starts a new one on the same port, with the bucket again but
    /// EMPTY: moto's objects live in its memory only.
    pub fn restart(&mut self) {
        self.stop();
        if let Err(why) = self.launch() {
            panic!("moto did not restart on port {}: {why}", self.port);
        }
    }

    /// Stops the process (SIGSTOP) without closing its socket: the kernel still accepts
    /// connections, but no request is answered, so a client hangs until its own timeouts.
    /// This is what a hung or unreachable store looks like; [`S3Server::resume`] brings it
    /// back with its objects.
    pub fn pause(&mut self) {
        self.signal(Signal::SIGSTOP);
    }

    /// Continues a paused server (SIGCONT); requests queued meanwhile are then answered.
    pub fn resume(&mut self) {
        self.signal(Signal::SIGCONT);
    }

    fn signal(&self, signal: Signal) {
        let child = self.child.as_ref().expect("the moto server is not running");
        let pid = Pid::from_raw(i32::try_from(child.id()).expect("a pid fits an i32"));
        kill(pid, signal).expect("cannot signal the moto server");
    }

    /// Starts moto on `self.port`, waits until it answers and creates the bucket.
    fn launch(&mut self) -> Result<(), String> {
        let log = File::create(&self.log).map_err(|e| format!("{}: {e}", self.log.display()))?;
        let err = log.try_clone().map_err(|e| e.to_string())?;
        let mut command = Command::new(moto_binary());
        command
            .args(["-H", "127.0.0.1", "-p", &self.port.to_string()])
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err);
        // SAFETY: the closure runs in the forked child before exec and only makes the prctl
        // system call (async-signal-safe, no allocation, no lock).
        unsafe {
            command.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)
            });
        }
        let child = command
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", moto_binary().display()))?;
        self.child = Some(child);
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                self.child = None;
                return Err(format!("moto exited ({status}): {}", self.log_tail()));
            }
            if http(self.port, "GET", "/").is_some() {
                break;
            }
            if Instant::now() > deadline {
                self.stop();
                return Err(format!(
                    "no answer within {START_TIMEOUT:?}: {}",
                    self.log_tail()
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let path = format!("/{}", self.bucket);
        match http(self.port, "PUT", &path) {
            Some(200) => Ok(()),
            other => {
                self.stop();
                Err(format!("creating the bucket answered {other:?}"))
            }
        }
    }

    /// The end of moto's output, for messages.
    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let start = text.len().saturating_sub(2000);
        let start = (start..text.len())
            .find(|&i| text.is_char_boundary(i))
            .unwrap_or(text.len());
        text[start..].to_string()
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_file(&self.log);
    }
}

/// `$SUPERVISE_TEST_MOTO`, else the repository's `target/test-venv/bin/moto_server`.
fn moto_binary() -> PathBuf {
    let path = match std::env::var_os("SUPERVISE_TEST_MOTO") {
        Some(path) => PathBuf::from(path),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/test-venv/bin/moto_server"),
    };
    if !path.is_file() {
        panic!(
            "moto is not installed: run ./scripts/test --install-only (no {})",
            path.display()
        );
    }
    path
}

/// A loopback port nobody listens on right now.
fn free_port() -> u16 {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind a loopback port");
    listener.local_addr().expect("its address").port()
}

/// One unsigned HTTP/1.1 request with an empty body; the status code, `None` when nothing
/// answered within two seconds.
fn http(port: u16, method: &str, path: &str) -> Option<u16> {
    let address = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let timeout = Duration::from_secs(2);
    let mut stream = TcpStream::connect_timeout(&address, timeout).ok()?;
    stream.set_read_timeout(Some(timeout)).ok()?;
    stream.set_write_timeout(Some(timeout)).ok()?;
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\n\
         Connection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).ok()?;
    let mut answer = Vec::new();
    stream.take(64 << 10).read_to_end(&mut answer).ok()?;
    let status = String::from_utf8_lossy(&answer);
    status.split_whitespace().nth(1)?.parse().ok()
}
