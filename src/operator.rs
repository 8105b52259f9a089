//! The running supervisor's socket for operator commands (`supervise status`, `supervise
//! snapshot`): `<store>/<job>/supervisor.sock`, one JSON request line, one JSON reply line.
//!
//! Socket paths are limited to 107 bytes and a store can sit deep in a file system, so both
//! ends reach the socket through `/proc/self/fd/<directory fd>/supervisor.sock`, which is short
//! whatever the store's path.

use std::fs::File;
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

const SOCKET_NAME: &str = "supervisor.sock";

/// A request from an operator command.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// What the job is doing.
    Status,
    /// Take a snapshot now; reply when it is durable.
    Snapshot,
}

/// What a running supervisor says about its job.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Status {
    /// The supervisor's pid.
    pub supervisor_pid: u32,
    /// The running child's pid, if one runs.
    pub child_pid: Option<u32>,
    /// When the supervisor started (ms since the epoch).
    pub started_unix_ms: u64,
    /// Restarts so far.
    pub restarts: u32,
    /// The newest snapshot (sequence number), if any.
    pub last_snapshot: Option<u64>,
    /// When it was taken (ms since the epoch).
    pub last_snapshot_unix_ms: Option<u64>,
    /// The command.
    pub command: String,
    /// Whether the running program's shim has connected to the supervisor (`Some(false)`: the
    /// program has not initialised the shim, or not yet, so it takes no snapshot). `None` in
    /// the reply of a supervisor older than this field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shim_connected: Option<bool>,
    /// The newest snapshot that is on every durable tier (`None`: none yet, no durable tier,
    /// or a supervisor older than this field).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_off_node: Option<u64>,
    /// The snapshot interval now, in milliseconds (`None` from a supervisor older than this
    /// field).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub every_ms: Option<u64>,
    /// With `--every auto`, why that interval (`young-daly`, `overhead-budget`, `every-max`,
    /// `every-min`, `measuring`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub every_why: Option<String>,
}

/// The reply to a request.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Reply {
    /// Whether the request was carried out.
    pub ok: bool,
    /// The error, when not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// For `status`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<Status>,
    /// For `snapshot`: the new snapshot's sequence number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<u64>,
}

impl Reply {
    /// A failure reply.
    pub fn error(msg: impl Into<String>) -> Self {
        Self {
            ok: false,
            error: Some(msg.into()),
            status: None,
            snapshot: None,
        }
    }
}

fn short_path(dir: BorrowedFd<'_>) -> String {
    format!("/proc/self/fd/{}/{SOCKET_NAME}", dir.as_raw_fd())
}

/// Opens the job directory without following a link at its last component.
fn open_dir(job_dir: &Path) -> Result<File> {
    let fd = nix::fcntl::open(
        job_dir,
        nix::fcntl::OFlag::O_RDONLY
            | nix::fcntl::OFlag::O_DIRECTORY
            | nix::fcntl::OFlag::O_NOFOLLOW
            | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .with_context(|| format!("cannot open {}", job_dir.display()))?;
    Ok(File::from(fd))
}

/// A client connected to the operator socket, with what it has sent so far.
pub struct Client {
    stream: UnixStream,
    inbox: Vec<u8>,
}

impl Client {
    /// The client's socket (for polling).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.stream.as_fd()
    }

    /// Reads what arrived; returns a whole request once there is one, `Err` when the client
    /// is gone or sent garbage.
    pub fn read_request(&mut self) -> std::result::Result<Option<Request>, ()> {
        let mut buf = [0u8; 1024];
        loop {
            match self.stream.read(&mut buf) {
                Ok(0) => return Err(()),
                Ok(n) => self.inbox.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return Err(()),
            }
            if self.inbox.len() > 64 * 1024 {
                return Err(());
            }
        }
        match self.inbox.iter().position(|b| *b == b'\n') {
            Some(end) => serde_json::from_slice(&self.inbox[..end])
                .map(Some)
                .map_err(|_| {
                    self.reply(&Reply::error("bad request"));
                }),
            None => Ok(None),
        }
    }

    /// Sends the reply (best effort: a client that left misses it).
    pub fn reply(&mut self, reply: &Reply) {
        if let Ok(mut line) = serde_json::to_string(reply) {
            line.push('\n');
            let _ = self.stream.set_nonblocking(false);
            let _ = self.stream.set_write_timeout(Some(Duration::from_secs(1)));
            let _ = self.stream.write_all(line.as_bytes());
        }
    }
}

/// The supervisor's end: a listening socket in the job directory, removed when dropped (if
/// the file there is still the socket this server created).
pub struct Server {
    listener: UnixListener,
    /// The job directory, to remove the socket from.
    dir: supervise_store::fsops::Dir,
    /// The socket file's device and inode.
    id: (u64, u64),
}

impl Server {
    /// Listens in `job_dir` (the caller holds the job lock, so a socket left there is a dead
    /// supervisor's and is replaced; anything else there, such as a planted link or file, is
    /// refused and left alone). The socket is made 0600 before it listens.
    pub fn bind(job_dir: &Path) -> Result<Self> {
        use nix::sys::socket::{AddressFamily, SockFlag, SockType, UnixAddr};
        use nix::sys::stat::{FchmodatFlags, Mode, SFlag};
        let dir = supervise_store::fsops::Dir::open_owned(job_dir)?;
        let shown = job_dir.join(SOCKET_NAME);
        if let Some(st) = dir.stat(SOCKET_NAME)? {
            if st.st_mode & SFlag::S_IFMT.bits() != SFlag::S_IFSOCK.bits() {
                return Err(supervise_store::Error::Unsafe {
                    path: shown,
                    kind: supervise_store::UnsafeKind::NotExpectedKind {
                        found: supervise_store::fsops::kind_of(&st),
                    },
                }
                .into());
            }
            dir.remove(SOCKET_NAME)?;
        }
        let path = short_path(dir.as_fd());
        let listen = || -> nix::Result<std::os::fd::OwnedFd> {
            let fd = nix::sys::socket::socket(
                AddressFamily::Unix,
                SockType::Stream,
                SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
                None,
            )?;
            nix::sys::socket::bind(fd.as_raw_fd(), &UnixAddr::new(path.as_str())?)?;
            // Nobody else may connect: 0600 before listen (until then connects are refused).
            nix::sys::stat::fchmodat(
                dir.as_fd(),
                SOCKET_NAME,
                Mode::from_bits_truncate(0o600),
                FchmodatFlags::FollowSymlink,
            )?;
            nix::sys::socket::listen(&fd, nix::sys::socket::Backlog::new(16)?)?;
            Ok(fd)
        };
        let fd = listen().with_context(|| format!("cannot listen on {}", shown.display()))?;
        let st = dir
            .stat(SOCKET_NAME)?
            .with_context(|| format!("{} vanished after it was created", shown.display()))?;
        Ok(Self {
            listener: UnixListener::from(fd),
            id: (st.st_dev, st.st_ino),
            dir,
        })
    }

    /// The listening socket (for polling).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.listener.as_fd()
    }

    /// Accepts the clients waiting.
    pub fn accept(&self) -> Vec<Client> {
        let mut clients = Vec::new();
        while let Ok((stream, _)) = self.listener.accept() {
            if stream.set_nonblocking(true).is_ok() {
                clients.push(Client {
                    stream,
                    inbox: Vec::new(),
                });
            }
        }
        clients
    }
}

impl Drop for Server {
    /// Removes the socket file, unless it is no longer the one this server created (another
    /// supervisor's, after this one lost the job): best effort, as a socket left behind is
    /// replaced by the next supervisor anyway.
    fn drop(&mut self) {
        if let Ok(Some(st)) = self.dir.stat(SOCKET_NAME)
            && (st.st_dev, st.st_ino) == self.id
        {
            let _ = self.dir.remove(SOCKET_NAME);
        }
    }
}

/// Sends `request` to the supervisor running the job in `job_dir` and waits up to `timeout`
/// for its reply. `Ok(None)`: no supervisor listens there.
pub fn ask(job_dir: &Path, request: &Request, timeout: Duration) -> Result<Option<Reply>> {
    let dir = open_dir(job_dir)?;
    let mut stream = match UnixStream::connect(short_path(dir.as_fd())) {
        Ok(s) => s,
        Err(e) if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::ConnectionRefused) => {
            return Ok(None);
        }
        Err(e) => return Err(e).context("cannot reach the supervisor"),
    };
    stream.set_read_timeout(Some(timeout))?;
    let mut line = serde_json::to_string(request)?;
    line.push('\n');
    stream.write_all(line.as_bytes())?;
    let mut reply = String::new();
    match BufReader::new(&stream).read_line(&mut reply) {
        Ok(0) => bail!("the supervisor closed the connection without a reply"),
        Ok(_) => Ok(Some(
            serde_json::from_str(&reply).context("the supervisor's reply does not parse")?,
        )),
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
            bail!(
                "no reply from the supervisor within {}",
                humantime::format_duration(timeout)
            )
        }
        Err(e) => Err(e).context("cannot read the supervisor's reply"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_socket_is_removed_on_drop_only_if_it_is_still_ours() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join(SOCKET_NAME);
        let server = Server::bind(dir.path()).unwrap();
        assert!(sock.exists());
        drop(server);
        assert!(!sock.exists(), "removed when the server is dropped");

        // A second server (a new supervisor) replaced the first one's socket: dropping the
        // first leaves the second's alone.
        let first = Server::bind(dir.path()).unwrap();
        let second = Server::bind(dir.path()).unwrap();
        drop(first);
        assert!(sock.exists(), "the second server's socket stays");
        assert!(UnixStream::connect(&sock).is_ok(), "and still listens");
        drop(second);
        assert!(!sock.exists());

        // Anything else put there in its place is left alone too.
        let server = Server::bind(dir.path()).unwrap();
        std::fs::remove_file(&sock).unwrap();
        std::fs::write(&sock, b"not ours").unwrap();
        drop(server);
        assert_eq!(std::fs::read(&sock).unwrap(), b"not ours");
    }

    #[test]
    fn a_status_without_the_newer_fields_still_parses() {
        let old = r#"{"ok":true,"status":{"supervisor_pid":7,"child_pid":null,
            "started_unix_ms":1,"restarts":0,"last_snapshot":null,
            "last_snapshot_unix_ms":null,"command":"sim"}}"#;
        let reply: Reply = serde_json::from_str(old).unwrap();
        let status = reply.status.unwrap();
        assert_eq!(status.supervisor_pid, 7);
        assert_eq!(status.shim_connected, None);
        let new = Status {
            shim_connected: Some(false),
            ..Status::default()
        };
        let back: Status = serde_json::from_str(&serde_json::to_string(&new).unwrap()).unwrap();
        assert_eq!(back.shim_connected, Some(false));
    }
}
