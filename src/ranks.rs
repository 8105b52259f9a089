//! The ranks of a job of many processes (an MPI job): the endpoint they join, and the relay
//! that makes them look like one program to the job's watch loop.
//!
//! The watch loop talks to its end of a socketpair exactly as to one program's shim. The relay
//! thread holds the other end: it admits ranks (each proves it knows the job's secret), sends
//! one `hello` once every rank joined, turns each snapshot request into an epoch (every rank
//! reports how many safe points it passed, the target is one past the largest, every rank
//! captures its part there), publishes the epoch once every part is durable, applies retention
//! over epochs while no rank writes, and reports the epoch as one snapshot (its number is the
//! epoch's). A rank lost or a part failed fails the epoch; its parts are removed before the
//! next one. See [`supervise_store::epoch`] and [`supervise_store::control`].

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use supervise_store::claims::{ChunkAt, ClaimTable, MAX_BATCH, hashes_from_hex};
use supervise_store::clock::{millis, now_unix_ms};
use supervise_store::config::{ENV_ENDPOINT, ENV_SECRET, Endpoint, RestoreFrom};
use supervise_store::control::{Event, Request, WarningKind, proof, proofs_equal};
use supervise_store::epoch::{self, Epoch, Part};
use supervise_store::retention::Retention;
use supervise_store::store::JobStore;
use supervise_store::writer::SnapshotReport;

/// Where ranks are asked to connect.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Listen {
    /// A Unix socket in a private directory (ranks on this machine).
    Unix,
    /// TCP at this address (`host:port`, port 0 for any); ranks are told `advertise:port`.
    Tcp {
        /// The address to bind.
        bind: String,
        /// The host name ranks connect to.
        advertise: String,
    },
}

impl Listen {
    /// Parses `unix`, `tcp` (all interfaces, any port, this host's name) or `tcp:HOST:PORT`.
    pub fn parse(value: &str) -> std::result::Result<Self, String> {
        match value {
            "unix" => Ok(Listen::Unix),
            "tcp" => Ok(Listen::Tcp {
                bind: "0.0.0.0:0".into(),
                advertise: hostname(),
            }),
            _ => {
                let addr = value
                    .strip_prefix("tcp:")
                    .ok_or_else(|| format!("{value:?}: expected unix, tcp or tcp:HOST:PORT"))?;
                let (host, port) = addr
                    .rsplit_once(':')
                    .filter(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok())
                    .ok_or_else(|| format!("{value:?}: expected tcp:HOST:PORT"))?;
                let advertise = if host == "0.0.0.0" || host == "::" {
                    hostname()
                } else {
                    host.to_owned()
                };
                Ok(Listen::Tcp {
                    bind: format!("{host}:{port}"),
                    advertise,
                })
            }
        }
    }
}

fn hostname() -> String {
    nix::unistd::gethostname()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_else(|_| "localhost".into())
}

/// What one life of the job hands the relay.
struct LifeStart {
    watch: UnixStream,
    restore: RestoreFrom,
    retention: Retention,
}

enum Order {
    Begin(LifeStart),
    /// The life ended: wait for its ranks to go (killing those on this host after `grace`),
    /// then answer.
    End {
        grace: Duration,
        done: Sender<Vec<u32>>,
    },
}

/// The endpoint and the relay thread.
pub struct Relay {
    endpoint: Endpoint,
    secret_hex: String,
    orders: Option<Sender<Order>>,
    wake: UnixStream,
    thread: Option<JoinHandle<()>>,
    dir: Option<PathBuf>,
}

impl Relay {
    /// Opens the endpoint and starts the relay thread for `job`.
    pub fn start(job: JobStore, listen: &Listen) -> Result<Self> {
        let secret = random_bytes::<32>().context("cannot read random bytes for the secret")?;
        let (listener, endpoint, dir) = match listen {
            Listen::Unix => {
                let dir = private_dir()?;
                let path = dir.join("ranks.sock");
                let l = UnixListener::bind(&path)
                    .with_context(|| format!("cannot listen on {}", path.display()))?;
                (Listener::Unix(l), Endpoint::Unix(path), Some(dir))
            }
            Listen::Tcp { bind, advertise } => {
                let l = TcpListener::bind(bind.as_str())
                    .with_context(|| format!("cannot listen on tcp:{bind}"))?;
                let port = l.local_addr()?.port();
                (
                    Listener::Tcp(l),
                    Endpoint::Tcp(format!("{advertise}:{port}")),
                    None,
                )
            }
        };
        listener.set_nonblocking()?;
        let (wake, woken) = UnixStream::pair()?;
        woken.set_nonblocking(true)?;
        let (orders, inbox) = channel();
        let thread = std::thread::Builder::new()
            .name("supervise-ranks".into())
            .spawn(move || {
                RelayLoop {
                    job,
                    secret,
                    listener,
                    woken,
                    inbox,
                    life: None,
                    joining: Vec::new(),
                }
                .run()
            })?;
        Ok(Self {
            endpoint,
            secret_hex: hex(&secret),
            orders: Some(orders),
            wake,
            thread: Some(thread),
            dir,
        })
    }

    /// The variables that tell the ranks where to join and the secret to prove.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            (ENV_ENDPOINT.to_owned(), self.endpoint.to_string()),
            (ENV_SECRET.to_owned(), self.secret_hex.clone()),
        ]
    }

    /// Where ranks connect.
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    fn order(&self, order: Order) {
        if let Some(orders) = &self.orders {
            let _ = orders.send(order);
            let _ = (&self.wake).write_all(b"x");
        }
    }

    /// A life begins: `watch` is the relay's end of the watch loop's control channel.
    pub fn begin_life(&self, watch: UnixStream, restore: RestoreFrom, retention: Retention) {
        self.order(Order::Begin(LifeStart {
            watch,
            restore,
            retention,
        }));
    }

    /// The life's program ended: waits until every rank of it is gone, killing those on this
    /// machine that are still there after `grace` (a rank must never outlive its life: the
    /// next one would be a second copy). Returns the ranks that had to be killed.
    pub fn end_life(&self, grace: Duration) -> Vec<u32> {
        let (done, answer) = channel();
        self.order(Order::End { grace, done });
        answer.recv_timeout(grace + END_EXTRA).unwrap_or_default()
    }
}

/// How long past the grace the supervisor waits for the relay's answer.
const END_EXTRA: Duration = Duration::from_secs(5);

impl Drop for Relay {
    fn drop(&mut self) {
        drop(self.orders.take());
        let _ = (&self.wake).write_all(b"x");
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        if let Some(dir) = &self.dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

fn private_dir() -> Result<PathBuf> {
    let base = std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .filter(|p| p.is_dir())
        .unwrap_or_else(std::env::temp_dir);
    let name = format!(
        "supervise-{}-{}",
        std::process::id(),
        hex(&random_bytes::<6>()?)
    );
    let dir = base.join(name);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .with_context(|| format!("cannot create {}", dir.display()))?;
    Ok(dir)
}

use std::os::unix::fs::DirBuilderExt;

fn random_bytes<const N: usize>() -> std::io::Result<[u8; N]> {
    let mut bytes = [0u8; N];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes)
}

/// Kills a rank's process: only a process the kernel named as the socket's peer, and only if
/// it is still the process that joined (its start time): never a pid a rank claimed, never a
/// reused one. Ranks over TCP are their launcher's to end. True if it was signalled.
fn kill_peer(pid: u32, started: u64) -> bool {
    pid > 1
        && start_time(pid) == Some(started)
        && nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        )
        .is_ok()
}

/// When process `pid` started (clock ticks since boot, `/proc/PID/stat` field 22): with the
/// pid, it names one process, never a later one that reuses the number.
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(19)?.parse().ok()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

enum Listener {
    Unix(UnixListener),
    Tcp(TcpListener),
}

impl Listener {
    fn set_nonblocking(&self) -> std::io::Result<()> {
        match self {
            Listener::Unix(l) => l.set_nonblocking(true),
            Listener::Tcp(l) => l.set_nonblocking(true),
        }
    }

    fn fd(&self) -> BorrowedFd<'_> {
        match self {
            Listener::Unix(l) => l.as_fd(),
            Listener::Tcp(l) => l.as_fd(),
        }
    }

    /// A new connection, `Ok(None)` when none waits, `Err` when accepting fails otherwise.
    fn accept(&self) -> std::result::Result<Option<Conn>, ()> {
        let accepted = match self {
            Listener::Unix(l) => l.accept().map(|(s, _)| Stream::Unix(s)),
            Listener::Tcp(l) => l.accept().map(|(s, _)| {
                let _ = s.set_nodelay(true);
                Stream::Tcp(s)
            }),
        };
        let stream = match accepted {
            Ok(s) => s,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(None),
            Err(e) if e.kind() == ErrorKind::Interrupted => return Ok(None),
            Err(_) => return Err(()),
        };
        if stream.set_nonblocking().is_err() {
            return Ok(None);
        }
        Ok(Some(Conn::new(stream)))
    }
}

enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Stream {
    fn set_nonblocking(&self) -> std::io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_nonblocking(true),
            Stream::Tcp(s) => s.set_nonblocking(true),
        }
    }

    fn fd(&self) -> RawFd {
        match self {
            Stream::Unix(s) => s.as_raw_fd(),
            Stream::Tcp(s) => s.as_raw_fd(),
        }
    }

    /// The pid of the peer of a Unix socket (the kernel's word, not the rank's).
    fn peer_pid(&self) -> Option<u32> {
        match self {
            Stream::Unix(s) => {
                nix::sys::socket::getsockopt(s, nix::sys::socket::sockopt::PeerCredentials)
                    .ok()
                    .map(|c| c.pid() as u32)
            }
            Stream::Tcp(_) => None,
        }
    }
}

/// The longest line accepted from a rank.
const MAX_LINE: usize = 1 << 20;

/// The most bytes waiting to be sent to one connection: a peer that stopped reading for that
/// long is lost.
const MAX_OUTBOX: usize = 64 << 20;

/// A connection, what it sent that is not yet a whole line, and what waits to be sent to it.
struct Conn {
    stream: Stream,
    inbox: Vec<u8>,
    outbox: Vec<u8>,
    open: bool,
}

impl Conn {
    fn new(stream: Stream) -> Self {
        Conn {
            stream,
            inbox: Vec::new(),
            outbox: Vec::new(),
            open: true,
        }
    }

    /// Queues `line` and sends what the socket takes now. The loop never waits on one peer:
    /// a rank whose control thread waits for its own writer, which waits for the loop to read
    /// it, must not stop the loop (the rest goes when poll says the socket has room).
    fn send(&mut self, line: &str) {
        if !self.open {
            return;
        }
        if self.outbox.len() + line.len() > MAX_OUTBOX {
            // A peer that stopped reading (stopped or hung: hang detection sees to the job).
            self.open = false;
            return;
        }
        self.outbox.extend_from_slice(line.as_bytes());
        self.flush();
    }

    /// Sends what the socket takes of the queued lines, without waiting.
    fn flush(&mut self) {
        let fd = self.stream.fd();
        while self.open && !self.outbox.is_empty() {
            // SAFETY: the fd is this connection's, open while `self` lives.
            let b = unsafe { BorrowedFd::borrow_raw(fd) };
            let flags =
                nix::sys::socket::MsgFlags::MSG_NOSIGNAL | nix::sys::socket::MsgFlags::MSG_DONTWAIT;
            match nix::sys::socket::send(b.as_raw_fd(), &self.outbox, flags) {
                Ok(n) => {
                    self.outbox.drain(..n);
                }
                Err(nix::errno::Errno::EINTR) => {}
                Err(nix::errno::Errno::EAGAIN) => return,
                Err(_) => self.open = false,
            }
        }
    }

    /// What to poll it for.
    fn poll_flags(&self) -> PollFlags {
        if self.outbox.is_empty() {
            PollFlags::POLLIN
        } else {
            PollFlags::POLLIN | PollFlags::POLLOUT
        }
    }

    /// Reads what is there; returns the whole lines.
    fn read_lines(&mut self) -> Vec<Vec<u8>> {
        let mut buf = [0u8; 8192];
        // A bounded read per turn: one connection cannot hold the loop or grow without bound.
        while self.inbox.len() <= MAX_LINE {
            let got = match &mut self.stream {
                Stream::Unix(s) => s.read(&mut buf),
                Stream::Tcp(s) => s.read(&mut buf),
            };
            match got {
                Ok(0) => {
                    self.open = false;
                    break;
                }
                Ok(n) => self.inbox.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(_) => {
                    self.open = false;
                    break;
                }
            }
        }
        let mut lines = Vec::new();
        while let Some(end) = self.inbox.iter().position(|b| *b == b'\n') {
            lines.push(self.inbox.drain(..=end).collect());
        }
        if self.inbox.len() > MAX_LINE {
            self.open = false;
        }
        lines
    }
}

/// A connection in its handshake.
struct Joining {
    conn: Conn,
    nonce: String,
    since: Instant,
}

/// A rank that joined.
struct Rank {
    conn: Conn,
    pid: u32,
    /// The socket's peer as the kernel names it (Unix sockets only), and its start time.
    peer: Option<(u32, u64)>,
    hello: bool,
    beats: u64,
}

/// One epoch being taken.
struct Taking {
    epoch: u64,
    started: Instant,
    stop: bool,
    at: HashMap<u32, u64>,
    target: Option<u64>,
    parts: HashMap<u32, SnapshotReport>,
    /// Ranks that said they write no part (failed or skipped).
    without: std::collections::HashSet<u32>,
    tag: Option<String>,
    failed: Option<String>,
    /// Which rank stores each chunk the ranks claimed (see `supervise_store::claims`).
    claims: ClaimTable,
}

/// One life of the job.
struct Life {
    watch: Conn,
    retention: Retention,
    /// The epoch the ranks resume from.
    from: Option<Epoch>,
    size: Option<u32>,
    ranks: HashMap<u32, Rank>,
    hello_sent: bool,
    beats_sent: u64,
    taking: Option<Taking>,
    /// Ranks still writing a part of a failed epoch (no retention runs until they finish).
    busy: HashMap<u32, (u64, Instant)>,
    /// Ranks lost while their process may live on (the kernel-named peer and its start time):
    /// killed when the life ends.
    lost: Vec<(u32, u64)>,
    /// The epoch to resume from could not be chosen (an I/O error): every rank is refused,
    /// rather than started from scratch.
    unchosen: Option<String>,
    /// The highest epoch number used in this life (a failed one's is not used again).
    last_epoch: u64,
    /// A stop was asked for while no stop epoch could begin: it begins as soon as one can.
    stop_wanted: bool,
    /// Refusals told in this life.
    refusals: u32,
    /// The ranks agree on each epoch's safe point themselves (known once one joined).
    agree: Option<bool>,
}

struct RelayLoop {
    job: JobStore,
    secret: [u8; 32],
    listener: Listener,
    woken: UnixStream,
    inbox: Receiver<Order>,
    life: Option<Life>,
    joining: Vec<Joining>,
}

/// How long a connection may take to prove itself.
const JOIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Connections still proving themselves, at most (more are closed at once).
const MAX_JOINING: usize = 4096;

/// Refusals told per life (then one line says more are not).
const MAX_REFUSALS_TOLD: u32 = 20;

/// An epoch that has not completed this long after its request fails (a rank told to capture
/// that never does, a control thread that stopped): the job takes the next one.
const EPOCH_DEADLINE: Duration = Duration::from_secs(600);

/// The warning that retention over epochs failed (the epochs themselves are safe).
fn retention_failed(why: &str) -> String {
    Event::Warning {
        kind: WarningKind::RetentionFailed,
        message: format!("retention over epochs failed: {why}"),
    }
    .to_line()
}

impl RelayLoop {
    fn run(mut self) {
        loop {
            let mut fds = vec![
                PollFd::new(self.woken.as_fd(), PollFlags::POLLIN),
                PollFd::new(self.listener.fd(), PollFlags::POLLIN),
            ];
            let mut raw: Vec<(RawFd, PollFlags)> = self
                .joining
                .iter()
                .map(|j| (j.conn.stream.fd(), j.conn.poll_flags()))
                .collect();
            if let Some(life) = &mut self.life {
                life.watch.flush();
                raw.push((life.watch.stream.fd(), life.watch.poll_flags()));
                for r in life.ranks.values_mut() {
                    r.conn.flush();
                    raw.push((r.conn.stream.fd(), r.conn.poll_flags()));
                }
            }
            // SAFETY: every fd belongs to a connection held by `self` until after the poll.
            let borrowed: Vec<(BorrowedFd<'_>, PollFlags)> = raw
                .iter()
                .map(|(fd, flags)| (unsafe { BorrowedFd::borrow_raw(*fd) }, *flags))
                .collect();
            fds.extend(borrowed.iter().map(|(b, flags)| PollFd::new(*b, *flags)));
            let _ = poll(&mut fds, PollTimeout::from(500u16));
            drop(fds);
            let mut byte = [0u8; 64];
            while (&self.woken).read(&mut byte).is_ok_and(|n| n > 0) {}
            loop {
                match self.inbox.try_recv() {
                    Ok(Order::Begin(start)) => self.begin(start),
                    Ok(Order::End { grace, done }) => {
                        let killed = self.end(grace);
                        let _ = done.send(killed);
                    }
                    Err(std::sync::mpsc::TryRecvError::Empty) => break,
                    Err(std::sync::mpsc::TryRecvError::Disconnected) => return,
                }
            }
            loop {
                match self.listener.accept() {
                    Ok(Some(conn)) if self.joining.len() < MAX_JOINING => self.challenge(conn),
                    Ok(Some(_)) => {}
                    Ok(None) => break,
                    // Out of descriptors, say: not a reason to spin.
                    Err(()) => {
                        std::thread::sleep(Duration::from_millis(50));
                        break;
                    }
                }
            }
            self.step_joining();
            self.step_life();
        }
    }

    fn begin(&mut self, start: LifeStart) {
        let _ = start.watch.set_nonblocking(true);
        let mut watch = Conn::new(Stream::Unix(start.watch));
        // Nothing writes now: the parts of epochs that never completed go before the ranks
        // start (retention waits for the next published epoch: the one to resume from may be
        // older than it would keep).
        if let Err(e) = epoch::collect(&self.job, &usize::MAX.into()) {
            watch.send(&retention_failed(&e.to_string()));
        }
        let mut unchosen = None;
        let (from, damaged) = match epoch::choose(&self.job, &start.restore) {
            Ok(chosen) => chosen,
            Err(e) => {
                let why = format!("cannot choose the epoch to resume from: {e}");
                watch.send(
                    &Event::Warning {
                        kind: WarningKind::RankRefused,
                        message: why.clone(),
                    }
                    .to_line(),
                );
                unchosen = Some(why);
                (None, Vec::new())
            }
        };
        for d in damaged {
            watch.send(
                &Event::RestoreDamaged {
                    seq: d.seq,
                    why: d.why,
                }
                .to_line(),
            );
        }
        self.life = Some(Life {
            watch,
            retention: start.retention,
            from,
            size: None,
            ranks: HashMap::new(),
            hello_sent: false,
            beats_sent: 0,
            taking: None,
            busy: HashMap::new(),
            lost: Vec::new(),
            unchosen,
            last_epoch: 0,
            stop_wanted: false,
            refusals: 0,
            agree: None,
        });
    }

    fn end(&mut self, grace: Duration) -> Vec<u32> {
        let Some(mut life) = self.life.take() else {
            return Vec::new();
        };
        // Ranks held for a target that will not come now go on (to their end).
        if let Some(t) = &mut life.taking
            && t.target.is_none()
        {
            t.failed = Some("the launcher ended".into());
        }
        finish_epoch(&self.job, &mut life);
        let deadline = Instant::now() + grace;
        loop {
            // What the ranks said before they ended still counts: the parts of a final epoch
            // are durable before the ranks stop, and it is published here.
            let numbers: Vec<u32> = life.ranks.keys().copied().collect();
            for n in numbers {
                let Some(rank) = life.ranks.get_mut(&n) else {
                    continue;
                };
                for line in rank.conn.read_lines() {
                    if let Ok(event) = serde_json::from_slice::<Event>(&line) {
                        on_rank_event(&self.job, &mut life, n, event);
                    }
                }
            }
            finish_epoch(&self.job, &mut life);
            let gone: Vec<u32> = life
                .ranks
                .iter()
                .filter(|(_, r)| !r.conn.open)
                .map(|(n, _)| *n)
                .collect();
            for n in gone {
                rank_lost(&self.job, &mut life, n);
            }
            finish_epoch(&self.job, &mut life);
            if life.ranks.is_empty() || Instant::now() >= deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let mut killed = Vec::new();
        for (n, rank) in &life.ranks {
            if let Some((pid, started)) = rank.peer
                && kill_peer(pid, started)
            {
                killed.push(*n);
            }
        }
        for (pid, started) in life.lost {
            kill_peer(pid, started);
        }
        killed.sort_unstable();
        killed
    }

    fn challenge(&mut self, mut conn: Conn) {
        let Ok(nonce) = random_bytes::<16>().map(|b| hex(&b)) else {
            return;
        };
        conn.send(
            &Request::Challenge {
                nonce: nonce.clone(),
            }
            .to_line(),
        );
        self.joining.push(Joining {
            conn,
            nonce,
            since: Instant::now(),
        });
    }

    fn warn(&mut self, message: String) {
        if let Some(life) = &mut self.life {
            life.refusals += 1;
            if life.refusals > MAX_REFUSALS_TOLD {
                return;
            }
            let message = if life.refusals == MAX_REFUSALS_TOLD {
                format!("{message} (further refusals in this life are not told)")
            } else {
                message
            };
            life.watch.send(
                &Event::Warning {
                    kind: WarningKind::RankRefused,
                    message,
                }
                .to_line(),
            );
        }
    }

    fn step_joining(&mut self) {
        let joining = std::mem::take(&mut self.joining);
        for mut j in joining {
            let lines = j.conn.read_lines();
            let Some(line) = lines.first() else {
                if j.conn.open && j.since.elapsed() < JOIN_TIMEOUT {
                    self.joining.push(j);
                }
                continue;
            };
            // A rank that joins before its life is known to the relay (the launcher is
            // spawned first) waits for it.
            if self.life.is_none() {
                if !j.conn.open || j.since.elapsed() >= JOIN_TIMEOUT {
                    continue;
                }
                let mut back: Vec<u8> = lines.concat();
                back.extend_from_slice(&j.conn.inbox);
                j.conn.inbox = back;
                self.joining.push(j);
                continue;
            }
            match serde_json::from_slice::<Event>(line) {
                Ok(Event::Join {
                    rank,
                    size,
                    pid,
                    host,
                    nonce,
                    proof: theirs,
                    agree,
                }) => self.admit(j, rank, size, pid, host, nonce, theirs, agree),
                _ => {
                    let why = "the first message is not a join".to_owned();
                    j.conn
                        .send(&Request::Refused { why: why.clone() }.to_line());
                    self.warn(format!("refused a connection: {why}"));
                }
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn admit(
        &mut self,
        mut j: Joining,
        rank: u32,
        size: u32,
        pid: u32,
        host: String,
        nonce: String,
        theirs: String,
        agree: bool,
    ) {
        let expected = proof(&self.secret, "rank", &j.nonce, &nonce, rank);
        let refusal = if !proofs_equal(&expected, &theirs) {
            Some("wrong secret".to_owned())
        } else if let Some(life) = &self.life {
            if let Some(why) = &life.unchosen {
                Some(why.clone())
            } else if size == 0 || size > epoch::MAX_RANKS || rank >= size {
                Some(format!("rank {rank} of {size} is out of range"))
            } else if life.size.is_some_and(|s| s != size) {
                Some(format!(
                    "the job has {} ranks, not {size}",
                    life.size.unwrap_or(0)
                ))
            } else if life.agree.is_some_and(|a| a != agree) {
                Some(format!(
                    "ranks must all count safe points or all agree on epochs themselves \
                     (supervise_mpi.h); rank {rank} {}",
                    if agree { "agrees" } else { "counts" }
                ))
            } else if life.ranks.contains_key(&rank) {
                Some(format!("rank {rank} has joined already"))
            } else if life.from.as_ref().is_some_and(|e| e.size != size) {
                Some(format!(
                    "the job resumes from epoch {} of {} ranks, not {size} (start it with as many \
                     ranks, or with --from none)",
                    life.from.as_ref().map_or(0, |e| e.epoch),
                    life.from.as_ref().map_or(0, |e| e.size)
                ))
            } else {
                None
            }
        } else {
            Some("the job is between lives".to_owned())
        };
        if let Some(why) = refusal {
            j.conn
                .send(&Request::Refused { why: why.clone() }.to_line());
            self.warn(format!("refused rank {rank} (pid {pid} on {host}): {why}"));
            return;
        }
        let Some(life) = &mut self.life else { return };
        life.size = Some(size);
        life.agree = Some(agree);
        let (epoch, seq, step) = match &life.from {
            Some(e) => (Some(e.epoch), Some(epoch::part_seq(e.epoch, rank)), e.step),
            None => (None, None, 0),
        };
        j.conn.send(
            &Request::Welcome {
                proof: proof(
                    &self.secret,
                    &supervise_store::control::welcome_side(epoch, seq, step),
                    &j.nonce,
                    &nonce,
                    rank,
                ),
                epoch,
                seq,
                step,
            }
            .to_line(),
        );
        let lines = std::mem::take(&mut j.conn.inbox);
        let peer = j
            .conn
            .stream
            .peer_pid()
            .and_then(|p| start_time(p).map(|t| (p, t)));
        let _ = host; // named in refusals only
        life.ranks.insert(
            rank,
            Rank {
                conn: Conn {
                    stream: j.conn.stream,
                    inbox: lines,
                    outbox: j.conn.outbox,
                    open: j.conn.open,
                },
                pid,
                peer,
                hello: false,
                beats: 0,
            },
        );
    }

    fn step_life(&mut self) {
        let Some(life) = &mut self.life else { return };
        for line in life.watch.read_lines() {
            match serde_json::from_slice::<Request>(&line) {
                Ok(Request::Snapshot) => begin_epoch(&self.job, life, false),
                Ok(Request::Stop) => begin_epoch(&self.job, life, true),
                _ => {}
            }
        }
        let numbers: Vec<u32> = life.ranks.keys().copied().collect();
        for n in numbers {
            let Some(rank) = life.ranks.get_mut(&n) else {
                continue;
            };
            let lines = rank.conn.read_lines();
            let open = rank.conn.open;
            for line in lines {
                if let Ok(event) = serde_json::from_slice::<Event>(&line) {
                    on_rank_event(&self.job, life, n, event);
                }
            }
            if !open {
                rank_lost(&self.job, life, n);
            }
        }
        finish_epoch(&self.job, life);
        // A rank that never answers for its part of a failed epoch would hold up every
        // epoch after it: it is lost (and killed, so that the launch restarts).
        let stuck: Vec<u32> = life
            .busy
            .iter()
            .filter(|(_, (_, since))| since.elapsed() > EPOCH_DEADLINE)
            .map(|(n, _)| *n)
            .collect();
        for n in stuck {
            life.watch.send(
                &Event::Warning {
                    kind: WarningKind::RankRefused,
                    message: format!(
                        "rank {n} did not answer for its part of a failed epoch in {}: killed",
                        crate::human::duration(EPOCH_DEADLINE)
                    ),
                }
                .to_line(),
            );
            if let Some((pid, started)) = life.ranks.get(&n).and_then(|r| r.peer) {
                kill_peer(pid, started);
            }
            rank_lost(&self.job, life, n);
        }
        if life.stop_wanted && life.taking.is_none() && life.busy.is_empty() && life.hello_sent {
            life.stop_wanted = false;
            begin_epoch(&self.job, life, true);
        }
    }
}

fn send_ranks(life: &mut Life, request: &Request) {
    let line = request.to_line();
    for rank in life.ranks.values_mut() {
        rank.conn.send(&line);
    }
}

fn begin_epoch(job: &JobStore, life: &mut Life, stop: bool) {
    let all = life.hello_sent && life.ranks.len() as u32 == life.size.unwrap_or(0);
    if stop {
        // A stop is never refused: it joins the epoch being coordinated, or follows it.
        if let Some(t) = &mut life.taking
            && t.target.is_none()
        {
            t.stop = true;
            return;
        }
        if life.taking.is_some() || !life.busy.is_empty() || !all {
            life.stop_wanted = true;
            return;
        }
    }
    let why = if !all {
        Some("not every rank has joined".to_owned())
    } else if life.taking.is_some() {
        Some("an epoch is being taken".to_owned())
    } else if !life.busy.is_empty() {
        Some("ranks are still writing parts of a failed epoch".to_owned())
    } else {
        None
    };
    if let Some(why) = why {
        life.watch.send(
            &Event::SnapshotFailed {
                error: format!("no epoch now: {why}"),
            }
            .to_line(),
        );
        return;
    }
    // No rank writes now: what failed epochs left goes first, so no rank builds on it.
    if let Err(e) = epoch::collect(job, &usize::MAX.into()) {
        life.watch.send(&retention_failed(&e.to_string()));
    }
    let n = match epoch::highest(job) {
        Ok(h) => h.max(life.last_epoch) + 1,
        Err(e) => {
            life.watch.send(
                &Event::SnapshotFailed {
                    error: format!("cannot number the epoch: {e}"),
                }
                .to_line(),
            );
            return;
        }
    };
    life.last_epoch = n;
    life.taking = Some(Taking {
        epoch: n,
        started: Instant::now(),
        stop,
        at: HashMap::new(),
        target: None,
        parts: HashMap::new(),
        without: std::collections::HashSet::new(),
        tag: None,
        failed: None,
        claims: ClaimTable::default(),
    });
    send_ranks(life, &Request::EpochBegin { epoch: n, stop });
    // Ranks that agree themselves take their parts on the offer: there is no target to name.
    if life.agree == Some(true)
        && let Some(t) = &mut life.taking
    {
        t.target = Some(0);
    }
}

fn on_rank_event(job: &JobStore, life: &mut Life, n: u32, event: Event) {
    match event {
        Event::Hello { .. } => {
            if let Some(r) = life.ranks.get_mut(&n) {
                r.hello = true;
            }
            let size = life.size.unwrap_or(0);
            if !life.hello_sent
                && life.ranks.len() as u32 == size
                && life.ranks.values().all(|r| r.hello)
            {
                life.hello_sent = true;
                let pid = life.ranks.get(&0).map_or(0, |r| r.pid);
                let (resumed_from, tag) = match &life.from {
                    Some(e) => (Some(e.epoch), e.tag.clone()),
                    None => (None, None),
                };
                life.watch.send(
                    &Event::Hello {
                        pid,
                        resumed_from,
                        tag,
                        damaged: Vec::new(),
                        capture: format!("{size} ranks"),
                    }
                    .to_line(),
                );
            }
        }
        Event::Progress { count } => {
            if let Some(r) = life.ranks.get_mut(&n) {
                r.beats = count;
            }
            let least = life.ranks.values().map(|r| r.beats).min().unwrap_or(0);
            if life.hello_sent && least > life.beats_sent {
                life.beats_sent = least;
                life.watch.send(&Event::Progress { count: least }.to_line());
            }
        }
        Event::EpochAt { epoch, step } => {
            let size = life.size.unwrap_or(0) as usize;
            if let Some(t) = &mut life.taking
                && t.epoch == epoch
                && t.target.is_none()
            {
                t.at.insert(n, step);
                if t.at.len() == size {
                    let target = t.at.values().copied().max().unwrap_or(0) + 1;
                    t.target = Some(target);
                    let (epoch, stop) = (t.epoch, t.stop);
                    send_ranks(
                        life,
                        &Request::EpochTarget {
                            epoch,
                            step: target,
                            stop,
                        },
                    );
                }
            }
        }
        Event::SnapshotDone(report) => {
            if let Some((e, _)) = epoch::part_of(report.seq)
                && life.busy.get(&n).map(|b| b.0) == Some(e)
            {
                life.busy.remove(&n);
            }
            match &mut life.taking {
                Some(t) if epoch::part_of(report.seq) == Some((t.epoch, n)) => {
                    if n == 0 {
                        t.tag = report.tag.clone();
                    }
                    t.parts.insert(n, report);
                }
                _ => {}
            }
        }
        Event::SnapshotFailed { error } => {
            life.busy.remove(&n);
            if let Some(t) = &mut life.taking {
                t.without.insert(n);
                t.failed.get_or_insert_with(|| format!("rank {n}: {error}"));
            }
        }
        Event::PartSkipped { epoch } => {
            if life.busy.get(&n).map(|b| b.0) == Some(epoch) {
                life.busy.remove(&n);
            }
            if let Some(t) = &mut life.taking
                && t.epoch == epoch
            {
                t.without.insert(n);
                t.failed.get_or_insert_with(|| {
                    format!("rank {n} did not take its snapshot at the target")
                });
            }
        }
        Event::RestoreDamaged { seq, why } => {
            // A rank's part does not verify: its whole epoch is set aside.
            if let Some((e, _)) = epoch::part_of(seq) {
                if let Err(err) = epoch::set_aside(job, e) {
                    // Not set aside: the next start would choose it again, and fail again
                    // (the restart policy gives up in the end); said, with why.
                    life.watch.send(
                        &Event::Warning {
                            kind: WarningKind::SetAsideFailed,
                            message: format!("epoch {e} is damaged but cannot be set aside: {err}"),
                        }
                        .to_line(),
                    );
                }
                life.watch.send(
                    &Event::RestoreDamaged {
                        seq: e,
                        why: format!("rank {n}: {why}"),
                    }
                    .to_line(),
                );
            }
        }
        Event::RestoreMismatch {
            seq,
            entry,
            stored_bytes,
            wanted_bytes,
            detail,
        } => {
            let seq = epoch::part_of(seq).map_or(seq, |(e, _)| e);
            life.watch.send(
                &Event::RestoreMismatch {
                    seq,
                    entry: format!("{entry} (rank {n})"),
                    stored_bytes,
                    wanted_bytes,
                    detail,
                }
                .to_line(),
            );
        }
        Event::Warning { kind, message } => life.watch.send(
            &Event::Warning {
                kind,
                message: format!("rank {n}: {message}"),
            }
            .to_line(),
        ),
        Event::ChunkClaims { epoch, id, hashes } => {
            // Outside the epoch being taken (a part of a failed one): the rank stores all.
            let (theirs, known) = match (&mut life.taking, hashes_from_hex(&hashes)) {
                (Some(t), Some(hashes)) if t.epoch == epoch => t.claims.claim(n, &hashes),
                (Some(t), None) if t.epoch == epoch => {
                    t.failed
                        .get_or_insert_with(|| format!("rank {n} claimed chunks with bad hashes"));
                    (Vec::new(), Vec::new())
                }
                _ => (Vec::new(), Vec::new()),
            };
            if let Some(rank) = life.ranks.get_mut(&n) {
                rank.conn
                    .send(&Request::ClaimAnswer { epoch, id, theirs }.to_line());
                send_chunks_at(rank, epoch, known);
            }
        }
        Event::ChunksStored { epoch, chunks } => {
            let Some(t) = &mut life.taking else { return };
            if t.epoch != epoch {
                return;
            }
            match t.claims.stored(n, chunks) {
                Ok(to) => {
                    for (waiter, chunks) in to {
                        if let Some(rank) = life.ranks.get_mut(&waiter) {
                            send_chunks_at(rank, epoch, chunks);
                        }
                    }
                }
                // The epoch fails at once rather than at its deadline (its end ends the waits).
                Err(why) => {
                    t.failed.get_or_insert(why);
                }
            }
        }
        Event::RecordsDamaged { .. } | Event::Join { .. } => {}
    }
}

/// Tells `rank` where chunks other ranks stored lie, in lines of at most `MAX_BATCH`.
fn send_chunks_at(rank: &mut Rank, epoch: u64, chunks: Vec<ChunkAt>) {
    for batch in chunks.chunks(MAX_BATCH) {
        rank.conn.send(
            &Request::ChunksAt {
                epoch,
                chunks: batch.to_vec(),
            }
            .to_line(),
        );
    }
}

fn rank_lost(_job: &JobStore, life: &mut Life, n: u32) {
    if let Some(peer) = life.ranks.remove(&n).and_then(|r| r.peer) {
        life.lost.push(peer);
    }
    life.busy.remove(&n);
    if let Some(t) = &mut life.taking
        && !t.parts.contains_key(&n)
    {
        t.failed.get_or_insert_with(|| format!("rank {n} was lost"));
    }
}

fn finish_epoch(job: &JobStore, life: &mut Life) {
    let size = life.size.unwrap_or(0);
    if let Some(t) = &mut life.taking
        && t.failed.is_none()
        && t.started.elapsed() > EPOCH_DEADLINE
    {
        t.failed = Some(format!(
            "not complete {} after it was asked for",
            crate::human::duration(EPOCH_DEADLINE)
        ));
    }
    let Some(t) = &life.taking else { return };
    let complete = t.parts.len() as u32 == size && size > 0;
    if !complete && t.failed.is_none() {
        return;
    }
    let Some(t) = life.taking.take() else { return };
    let published = if complete && t.failed.is_none() {
        publish(job, &t, size)
    } else {
        Err(t.failed.clone().unwrap_or_default())
    };
    send_ranks(
        life,
        &Request::EpochEnd {
            epoch: t.epoch,
            published: published.is_ok(),
        },
    );
    match published {
        Ok(e) => {
            let removed = match epoch::collect(job, &life.retention) {
                Ok(r) => r.removed_snapshots,
                Err(e) => {
                    life.watch.send(&retention_failed(&e.to_string()));
                    Vec::new()
                }
            };
            life.watch.send(
                &Event::SnapshotDone(SnapshotReport {
                    seq: e.epoch,
                    tag: e.tag.clone(),
                    bytes_total: e.bytes_total(),
                    bytes_new: e.bytes_new(),
                    bytes_compacted: 0,
                    bytes_written: e.bytes_written(),
                    duration_ms: e.duration_ms,
                    removed,
                    // Not measured for an epoch: its cost is taken from its duration.
                    pause_us: 0,
                    writer_cpu_us: 0,
                })
                .to_line(),
            );
        }
        Err(why) => {
            // Ranks that got the target and have not answered are still writing their part.
            // Each reports once: its part, its failure, or that it skipped it.
            if t.target.is_some() {
                for n in life.ranks.keys() {
                    if !t.parts.contains_key(n) && !t.without.contains(n) {
                        life.busy.insert(*n, (t.epoch, Instant::now()));
                    }
                }
            }
            life.watch.send(
                &Event::SnapshotFailed {
                    error: format!("epoch {} did not complete: {why}", t.epoch),
                }
                .to_line(),
            );
        }
    }
}

fn publish(job: &JobStore, t: &Taking, size: u32) -> std::result::Result<Epoch, String> {
    let mut parts = Vec::with_capacity(size as usize);
    for rank in 0..size {
        let report = t
            .parts
            .get(&rank)
            .ok_or_else(|| format!("rank {rank} has no part"))?;
        parts.push(Part {
            rank,
            seq: report.seq,
            manifest_blake3: epoch::manifest_hash(job, report.seq).map_err(|e| e.to_string())?,
            bytes_total: report.bytes_total,
            bytes_new: report.bytes_new,
            bytes_written: report.bytes_written,
        });
    }
    let e = Epoch {
        job: job.name().to_owned(),
        epoch: t.epoch,
        step: t.target.unwrap_or(0),
        size,
        created_unix_ms: now_unix_ms(),
        tag: t.tag.clone(),
        duration_ms: millis(t.started.elapsed()),
        parts,
    };
    epoch::publish(job, &e).map_err(|e| e.to_string())?;
    Ok(e)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader};
    use supervise_store::claims::{ChunkAt, hash_hex, hashes_hex};

    /// A connection of the relay's and the socket at its other end.
    fn conn() -> (Conn, BufReader<UnixStream>) {
        let (ours, theirs) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        theirs
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        (Conn::new(Stream::Unix(ours)), BufReader::new(theirs))
    }

    fn read(peer: &mut BufReader<UnixStream>) -> Request {
        let mut line = String::new();
        peer.read_line(&mut line).unwrap();
        serde_json::from_str(&line).unwrap()
    }

    /// A life of `size` ranks taking epoch 7, and each rank's end of its connection.
    fn taking(size: u32) -> (Life, Vec<BufReader<UnixStream>>) {
        let (watch, _) = conn();
        let mut ranks = HashMap::new();
        let mut peers = Vec::new();
        for n in 0..size {
            let (c, peer) = conn();
            ranks.insert(
                n,
                Rank {
                    conn: c,
                    pid: 0,
                    peer: None,
                    hello: true,
                    beats: 0,
                },
            );
            peers.push(peer);
        }
        let life = Life {
            watch,
            retention: 1usize.into(),
            from: None,
            size: Some(size),
            ranks,
            hello_sent: true,
            beats_sent: 0,
            taking: Some(Taking {
                epoch: 7,
                started: Instant::now(),
                stop: false,
                at: HashMap::new(),
                target: Some(3),
                parts: HashMap::new(),
                without: Default::default(),
                tag: None,
                failed: None,
                claims: ClaimTable::default(),
            }),
            busy: HashMap::new(),
            lost: Vec::new(),
            unchosen: None,
            last_epoch: 7,
            stop_wanted: false,
            refusals: 0,
            agree: Some(false),
        };
        (life, peers)
    }

    fn at(hash: &[u8; 32]) -> ChunkAt {
        ChunkAt {
            hash: hash_hex(hash),
            pack: "00000000000007340032-0123456789abcdef-000".into(),
            offset: 16,
            stored_len: 10,
            raw_len: 65536,
        }
    }

    fn claims(epoch: u64, hashes: &[[u8; 32]]) -> Event {
        Event::ChunkClaims {
            epoch,
            id: 1,
            hashes: hashes_hex(hashes),
        }
    }

    #[test]
    fn the_relay_answers_claims_and_forwards_locations_to_the_ranks_waiting() {
        let dir = tempfile::tempdir().unwrap();
        let job = supervise_store::Store::open(dir.path())
            .unwrap()
            .job("j")
            .unwrap();
        let (mut life, mut peers) = taking(3);
        let (a, b, c) = ([1u8; 32], [2u8; 32], [3u8; 32]);
        let answer = |theirs: Vec<u32>| Request::ClaimAnswer {
            epoch: 7,
            id: 1,
            theirs,
        };
        on_rank_event(&job, &mut life, 0, claims(7, &[a, b]));
        assert_eq!(read(&mut peers[0]), answer(vec![]));
        on_rank_event(&job, &mut life, 1, claims(7, &[b, c]));
        assert_eq!(read(&mut peers[1]), answer(vec![0]));
        // Rank 0's packs are durable: rank 1 hears where b lies.
        let stored = Event::ChunksStored {
            epoch: 7,
            chunks: vec![at(&a), at(&b)],
        };
        on_rank_event(&job, &mut life, 0, stored);
        let told = Request::ChunksAt {
            epoch: 7,
            chunks: vec![at(&b)],
        };
        assert_eq!(read(&mut peers[1]), told);
        // A later claim of b gets its location with the answer.
        on_rank_event(&job, &mut life, 2, claims(7, &[b]));
        assert_eq!(read(&mut peers[2]), answer(vec![0]));
        assert_eq!(read(&mut peers[2]), told);
        // A claim for another epoch (a part of a failed one): store everything.
        on_rank_event(&job, &mut life, 2, claims(6, &[a]));
        let stale = Request::ClaimAnswer {
            epoch: 6,
            id: 1,
            theirs: vec![],
        };
        assert_eq!(read(&mut peers[2]), stale);
        assert!(life.taking.as_ref().unwrap().failed.is_none());
        // A report with a bad hash fails the epoch at once.
        let mut bad = at(&c);
        bad.hash.truncate(10);
        let stored = Event::ChunksStored {
            epoch: 7,
            chunks: vec![bad],
        };
        on_rank_event(&job, &mut life, 1, stored);
        let failed = life.taking.as_ref().unwrap().failed.clone().unwrap();
        assert!(failed.contains("rank 1"), "{failed}");
    }

    #[test]
    fn a_peer_that_reads_slowly_never_holds_the_relay() {
        let (mut conn, mut peer) = conn();
        let line = format!("{}\n", "x".repeat(64 << 10));
        let started = Instant::now();
        // Far more than a socket buffer holds, to a peer that is not reading.
        for _ in 0..64 {
            conn.send(&line);
        }
        assert!(started.elapsed() < Duration::from_secs(1));
        assert!(conn.open && !conn.outbox.is_empty());
        assert_eq!(conn.poll_flags(), PollFlags::POLLIN | PollFlags::POLLOUT);
        // The peer reads; flushes send the rest, every line whole and in order.
        let reader = std::thread::spawn(move || {
            let mut got = 0;
            let mut text = String::new();
            while got < 64 {
                text.clear();
                peer.read_line(&mut text).unwrap();
                assert_eq!(text.len(), (64 << 10) + 1);
                got += 1;
            }
        });
        while !conn.outbox.is_empty() {
            conn.flush();
            std::thread::sleep(Duration::from_millis(1));
        }
        reader.join().unwrap();
        assert!(conn.open);
        assert_eq!(conn.poll_flags(), PollFlags::POLLIN);
    }
}
