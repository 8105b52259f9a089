//! One rank of a job of many processes: the connection to the supervisor's endpoint (a Unix
//! socket or TCP, since launchers pass on variables but not descriptors) and the handshake in
//! which each side proves it knows the job's secret (see [`supervise_store::control`]).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use supervise_store::config::{Endpoint, RankLink};
use supervise_store::control::{Event, Request, proof, proofs_equal};
use supervise_store::error::{Error, Result};

/// The stream to the supervisor: the inherited socket, or a rank's connection.
pub(crate) enum Link {
    /// A Unix stream socket.
    Unix(UnixStream),
    /// A TCP connection.
    Tcp(TcpStream),
}

impl Link {
    pub(crate) fn try_clone(&self) -> std::io::Result<Link> {
        Ok(match self {
            Link::Unix(s) => Link::Unix(s.try_clone()?),
            Link::Tcp(s) => Link::Tcp(s.try_clone()?),
        })
    }

    pub(crate) fn set_read_timeout(&self, timeout: Option<Duration>) -> std::io::Result<()> {
        match self {
            Link::Unix(s) => s.set_read_timeout(timeout),
            Link::Tcp(s) => s.set_read_timeout(timeout),
        }
    }
}

impl AsRawFd for Link {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Link::Unix(s) => s.as_raw_fd(),
            Link::Tcp(s) => s.as_raw_fd(),
        }
    }
}

impl Read for Link {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Link::Unix(s) => s.read(buf),
            Link::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Link {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Link::Unix(s) => s.write(buf),
            Link::Tcp(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// What the supervisor told a rank that joined.
pub(crate) struct Joined {
    pub(crate) link: Link,
    pub(crate) rank: u32,
    pub(crate) size: u32,
    pub(crate) agree: bool,
    /// The epoch the job resumes from and this rank's part of it.
    pub(crate) resume: Option<(u64, u64)>,
    /// Safe points the program had passed at that epoch.
    pub(crate) step: u64,
}

/// How long the handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// The longest handshake line accepted.
const MAX_LINE: usize = 64 << 10;

/// Connects to the supervisor and joins the job as `link.rank` (rank 0 of 1 when neither the
/// launcher nor the program said).
pub(crate) fn join(link: &RankLink) -> Result<Joined> {
    let endpoint = link.endpoint.to_string();
    let fail = |why: String| Error::RankLink {
        endpoint: endpoint.clone(),
        why,
    };
    let (rank, size) = link.rank.unwrap_or((0, 1));
    let mut stream = match &link.endpoint {
        Endpoint::Unix(path) => UnixStream::connect(path).map(Link::Unix),
        Endpoint::Tcp(addr) => TcpStream::connect(addr.as_str()).map(|s| {
            let _ = s.set_nodelay(true);
            Link::Tcp(s)
        }),
    }
    .map_err(|e| fail(format!("cannot connect: {e}")))?;
    stream
        .set_read_timeout(Some(HANDSHAKE_TIMEOUT))
        .map_err(|e| fail(format!("cannot set a timeout: {e}")))?;
    let server_nonce = match read_request(&mut stream).map_err(fail)? {
        Request::Challenge { nonce } => nonce,
        other => return Err(fail(format!("expected a challenge, got {other:?}"))),
    };
    let nonce = random_hex().map_err(|e| fail(format!("no random bytes: {e}")))?;
    let join = Event::Join {
        rank,
        size,
        pid: std::process::id(),
        host: nix::unistd::gethostname()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_default(),
        proof: proof(&link.secret, "rank", &server_nonce, &nonce, rank),
        nonce: nonce.clone(),
        agree: link.agree,
    };
    stream
        .write_all(join.to_line().as_bytes())
        .map_err(|e| fail(format!("cannot send: {e}")))?;
    match read_request(&mut stream).map_err(fail)? {
        Request::Welcome {
            proof: theirs,
            epoch,
            seq,
            step,
        } => {
            let side = supervise_store::control::welcome_side(epoch, seq, step);
            let ours = proof(&link.secret, &side, &server_nonce, &nonce, rank);
            if !proofs_equal(&ours, &theirs) {
                return Err(fail(
                    "the supervisor's proof does not hold (not this job's supervisor)".into(),
                ));
            }
            stream
                .set_read_timeout(None)
                .map_err(|e| fail(format!("cannot clear the timeout: {e}")))?;
            Ok(Joined {
                link: stream,
                rank,
                size,
                agree: link.agree,
                resume: epoch.zip(seq),
                step,
            })
        }
        Request::Refused { why } => Err(fail(format!("refused: {why}"))),
        other => Err(fail(format!("expected a welcome, got {other:?}"))),
    }
}

/// Reads one request line byte by byte (nothing past it is consumed).
fn read_request(stream: &mut Link) -> std::result::Result<Request, String> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match stream.read(&mut byte) {
            Ok(0) => return Err("the supervisor closed the connection".into()),
            Ok(_) if byte[0] == b'\n' => break,
            Ok(_) if line.len() >= MAX_LINE => return Err("a line too long".into()),
            Ok(_) => line.push(byte[0]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("cannot read: {e}")),
        }
    }
    serde_json::from_slice(&line).map_err(|e| format!("a bad message: {e}"))
}

/// 16 random bytes as hex.
pub(crate) fn random_hex() -> std::io::Result<String> {
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}
