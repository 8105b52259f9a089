//! The C ABI: `sv_*` functions for C, C++ and Fortran programs (see `include/supervise.h`).
//!
//! One shim per process, behind a lock: the functions may be called from any thread, but a
//! program normally calls them from the thread that computes. No Rust panic crosses the
//! boundary (each call is wrapped), and no call aborts the program: errors are negative codes,
//! with the message in [`sv_last_error`] for the calling thread.

use std::cell::RefCell;
use std::ffi::{CStr, CString, c_char, c_int, c_void};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Mutex;
use std::sync::atomic::{AtomicPtr, Ordering};

use supervise_shim::{DuePoll, EXIT_STOPPED, Error, Next, Region, Shim, Start};
use supervise_store::name;

/// Success.
pub const SV_OK: c_int = 0;
/// A bad argument: NULL pointer, bad or unknown name, zero size.
pub const SV_EINVAL: c_int = -1;
/// Called before `sv_init` succeeded (or after `sv_finalize`).
pub const SV_ESTATE: c_int = -2;
/// A region's size differs from the snapshot's (the message names both).
pub const SV_ESIZE: c_int = -3;
/// Reading or writing the store failed, or a snapshot is damaged.
pub const SV_EIO: c_int = -4;
/// An internal error (a bug): the shim caught it and stays usable where it can.
pub const SV_EINTERNAL: c_int = -5;
/// Stored data is damaged. From `sv_restore`: the snapshot was set aside, and the program must
/// start again (it then resumes from an older one).
pub const SV_EDAMAGED: c_int = -6;
/// From `sv_checkpoint` and `sv_poll`: a stop was requested (by the supervisor, by SIGTERM, or
/// because the supervisor is gone) and the final snapshot was taken (`sv_last_error` says
/// why if it failed). Clean up, call `sv_finalize`, and exit with `SV_EXIT_STOPPED`, e.g.
/// `return sv_finalize_stopped();` from `main`. The shim never ends the process itself.
pub const SV_STOP: c_int = 2;
/// The exit code of a program that stopped on request after its final snapshot: it tells the
/// supervisor the stop was clean and the job can be resumed.
pub const SV_EXIT_STOPPED: c_int = 75;
const _: () = assert!(SV_EXIT_STOPPED == EXIT_STOPPED);

struct Protected {
    name: String,
    ptr: usize,
    bytes: usize,
}

/// A region the shim allocated for the program (`sv_alloc`): typed `f64` when its size allows
/// (the byte-shuffle then applies), bytes otherwise.
enum Allocated {
    F64(Region<f64>),
    U8(Region<u8>),
}

impl Allocated {
    fn name(&self) -> &str {
        match self {
            Allocated::F64(r) => r.name(),
            Allocated::U8(r) => r.name(),
        }
    }
}

struct State {
    shim: Shim,
    protected: Vec<Protected>,
    allocated: Vec<Allocated>,
}

static STATE: Mutex<Option<State>> = Mutex::new(None);

/// What the polls read without taking `STATE`'s lock: the shim's pending-request word, set
/// by `sv_init` and cleared by `sv_finalize`. Each `DuePoll` put here is leaked on purpose (a
/// few dozen bytes per `sv_init`), so a poll racing `sv_finalize` never reads freed memory.
static POLL: AtomicPtr<DuePoll> = AtomicPtr::new(std::ptr::null_mut());

/// Every `DuePoll` ever put in `POLL`, so that the leaked ones stay reachable (to valgrind too).
static LEAKED: Mutex<Vec<&'static DuePoll>> = Mutex::new(Vec::new());

/// The pending-request word, if the shim is open.
fn poll_state() -> Option<&'static DuePoll> {
    let ptr = POLL.load(Ordering::Acquire);
    // SAFETY: non-null values come from `Box::leak` in sv_init and are never freed.
    (!ptr.is_null()).then(|| unsafe { &*ptr })
}

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_error(msg: &str) {
    let text = CString::new(msg.replace('\0', " ")).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = text);
}

type Outcome = std::result::Result<c_int, (c_int, String)>;

/// Runs `f` with the panic boundary and error recording every exported function needs.
fn guard(f: impl FnOnce() -> Outcome) -> c_int {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(v)) => v,
        Ok(Err((code, msg))) => {
            set_error(&msg);
            code
        }
        Err(_) => {
            set_error("internal error in the supervise shim (a bug; please report it)");
            SV_EINTERNAL
        }
    }
}

fn with_state<T>(
    f: impl FnOnce(&mut State) -> Result<T, (c_int, String)>,
) -> Result<T, (c_int, String)> {
    let mut guard = STATE.lock().unwrap_or_else(|p| p.into_inner());
    match guard.as_mut() {
        Some(state) => f(state),
        None => Err((SV_ESTATE, "sv_init has not been called (or failed)".into())),
    }
}

fn c_name(name: *const c_char) -> Result<String, (c_int, String)> {
    if name.is_null() {
        return Err((SV_EINVAL, "name is NULL".into()));
    }
    // SAFETY: the caller passes a NUL-terminated string (checked non-NULL above), valid for
    // the duration of the call, as the header documents.
    let name = unsafe { CStr::from_ptr(name) };
    let name = name
        .to_str()
        .map_err(|_| (SV_EINVAL, "name is not valid UTF-8".to_owned()))?;
    name::validate("entry", name).map_err(|e| (SV_EINVAL, e.to_string()))?;
    Ok(name.to_owned())
}

/// The C code of an error: an exhaustive match, so a new variant fails to compile until it
/// is given a code.
fn code_of(e: &Error) -> c_int {
    match e {
        Error::SizeMismatch { .. } | Error::ShapeMismatch { .. } | Error::RegionTooLarge { .. } => {
            SV_ESIZE
        }
        Error::InvalidName { .. }
        | Error::WrongKind { .. }
        | Error::BadArray { .. }
        | Error::Output { .. }
        | Error::DuplicateEntry { .. }
        | Error::ValueTooLarge { .. }
        | Error::Serde { .. }
        | Error::Env { .. }
        | Error::Aborted(_)
        | Error::NoSuchSnapshot { .. }
        | Error::NoSuchJob { .. } => SV_EINVAL,
        Error::Corrupt { .. } | Error::SnapshotDamaged { .. } | Error::RestoreDamaged { .. } => {
            SV_EDAMAGED
        }
        Error::Background(inner) => code_of(inner),
        Error::Io { .. }
        | Error::UnsupportedVersion { .. }
        | Error::SnapshotFailed(_)
        | Error::Unsafe { .. }
        | Error::OutputShorter { .. }
        | Error::TooLarge { .. }
        | Error::NotADirectory { .. }
        | Error::SignalHandler { .. }
        | Error::Thread { .. }
        | Error::Control { .. }
        | Error::RankLink { .. }
        | Error::SharedChunks { .. } => SV_EIO,
        Error::DeltaBase { .. } => SV_EIO,
        Error::Internal { .. } | Error::Overflow { .. } => SV_EINTERNAL,
    }
}

fn io(e: Error) -> (c_int, String) {
    (code_of(&e), e.to_string())
}

/// The rank and size `sv_set_rank` gave, for `sv_init`.
static RANK: Mutex<Option<(u32, u32)>> = Mutex::new(None);

/// `sv_set_agreement` was called with 1 before `sv_init`.
static AGREE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Tells the shim, before `sv_init`, that this MPI program agrees on each epoch's iteration
/// through its own communicator (`supervise_mpi.h`: `sv_mpi_poll`) instead of calling
/// `sv_checkpoint_requested` once per iteration. Every rank must say the same. Returns 0, or
/// `SV_ESTATE` after `sv_init`.
/// Thread safety: any thread, before `sv_init`.
#[unsafe(no_mangle)]
pub extern "C" fn sv_set_agreement(on: c_int) -> c_int {
    guard(|| {
        if STATE.lock().unwrap_or_else(|p| p.into_inner()).is_some() {
            return Err((
                SV_ESTATE,
                "sv_set_agreement must come before sv_init".into(),
            ));
        }
        AGREE.store(on != 0, Ordering::SeqCst);
        Ok(SV_OK)
    })
}

/// An MPI rank that agrees on epochs itself: the epoch the supervisor offers (> 0), its
/// negative for a final one (the program stops after it), `INT64_MIN` for a stop without an
/// epoch (the supervisor is gone), or 0 when none is offered. One atomic load. `supervise_mpi.h` reduces it over the communicator (the largest wins) and
/// passes the result to `sv_checkpoint_epoch` on every rank at the same iteration.
/// Thread safety: any thread.
#[unsafe(no_mangle)]
pub extern "C" fn sv_epoch_offered() -> i64 {
    match poll_state().and_then(DuePoll::epoch_offered) {
        Some((0, true)) => i64::MIN,
        Some((epoch, true)) => -(epoch as i64),
        Some((epoch, false)) => epoch as i64,
        None => 0,
    }
}

/// Takes this rank's part of epoch `epoch` (as `sv_epoch_offered` gives it: negative for a
/// final one, `INT64_MIN` for a stop without one) now, with every protected region, as
/// `sv_checkpoint` does. Returns 0, `SV_STOP` after the final one or for a stop (clean up and
/// `return sv_finalize_stopped();`), or a negative code. 0 with `epoch` 0 (nothing offered),
/// and for an epoch this rank took already or that ended.
/// Thread safety: as `sv_checkpoint`.
///
/// # Safety
/// As [`sv_checkpoint`].
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sv_checkpoint_epoch(epoch: i64, tag: *const c_char) -> c_int {
    guard(|| {
        if epoch == 0 {
            return Ok(SV_OK);
        }
        let (number, stop) = match epoch {
            i64::MIN => (0, true),
            e => (e.unsigned_abs(), e < 0),
        };
        with_state(|s| {
            if !s.shim.agree_on_epoch(number, stop) {
                return Ok(if stop && s.shim.agrees_on_epochs() {
                    SV_STOP
                } else {
                    SV_OK
                });
            }
            checkpoint(s, tag)
        })
    })
}

/// Tells the shim this process's rank and the job's size, for an MPI program under a launcher
/// whose variables the shim does not read (Open MPI, MPICH/PMI, MVAPICH and Slurm are read).
/// Call it before `sv_init` (for example with the numbers `MPI_Comm_rank` and
/// `MPI_Comm_size` give). Returns 0, or `SV_EINVAL` when `rank` is not below `size`, or
/// `SV_ESTATE` after `sv_init`.
/// Thread safety: any thread, before `sv_init`.
#[unsafe(no_mangle)]
pub extern "C" fn sv_set_rank(rank: c_int, size: c_int) -> c_int {
    guard(|| {
        if STATE.lock().unwrap_or_else(|p| p.into_inner()).is_some() {
            return Err((SV_ESTATE, "sv_set_rank must come before sv_init".into()));
        }
        if rank < 0 || size <= 0 || rank >= size {
            return Err((SV_EINVAL, format!("rank {rank} of {size} is out of range")));
        }
        *RANK.lock().unwrap_or_else(|p| p.into_inner()) = Some((rank as u32, size as u32));
        Ok(SV_OK)
    })
}

/// Starts the shim: reads the `SUPERVISE_*` environment (works without a supervisor: then it
/// does nothing, or snapshots locally with `SUPERVISE_STORE`) and opens the snapshot to
/// restore, if any. Call once, first. Returns 0, or a negative code.
///
/// Thread safety: call once, before any other `sv_*` call, from one thread.
#[unsafe(no_mangle)]
pub extern "C" fn sv_init() -> c_int {
    guard(|| {
        let mut state = STATE.lock().unwrap_or_else(|p| p.into_inner());
        if state.is_some() {
            return Err((SV_ESTATE, "sv_init was already called".into()));
        }
        let program = std::env::args()
            .next()
            .and_then(|a| {
                std::path::Path::new(&a)
                    .file_name()
                    .map(|f| f.to_string_lossy().into_owned())
            })
            .unwrap_or_else(|| "program".into());
        let mut config = supervise_shim::Config::from_env(&program).map_err(io)?;
        if let Some((rank, size)) = *RANK.lock().unwrap_or_else(|p| p.into_inner()) {
            config.set_rank(rank, size);
        }
        config.set_agreement(AGREE.load(Ordering::SeqCst));
        let shim = Shim::open(config).map_err(io)?;
        let poll: &'static DuePoll = Box::leak(Box::new(shim.due_poll()));
        LEAKED.lock().unwrap_or_else(|e| e.into_inner()).push(poll);
        POLL.store(std::ptr::from_ref(poll).cast_mut(), Ordering::Release);
        *state = Some(State {
            shim,
            protected: Vec::new(),
            allocated: Vec::new(),
        });
        Ok(SV_OK)
    })
}

/// Registers `bytes` bytes at `ptr` under `name` (letters, digits, `-`, `_`, `.`): every
/// later snapshot holds them, and `sv_restore` fills them. The memory must stay valid until
/// `sv_unprotect` or `sv_finalize`. Registering a name again replaces the earlier region.
/// Thread safety: any thread; serialised with the other calls.
///
/// # Safety
/// `name` is NULL or a NUL-terminated string; `ptr` is NULL or `bytes` bytes of memory that
/// stay valid, readable and writable while protected.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sv_protect(name: *const c_char, ptr: *mut c_void, bytes: usize) -> c_int {
    guard(|| {
        let name = c_name(name)?;
        if ptr.is_null() {
            return Err((SV_EINVAL, format!("sv_protect({name:?}): pointer is NULL")));
        }
        if bytes == 0 {
            return Err((SV_EINVAL, format!("sv_protect({name:?}): size is 0")));
        }
        with_state(|s| {
            if s.allocated.iter().any(|a| a.name() == name) {
                return Err((SV_EINVAL, format!("{name:?} is a region from sv_alloc")));
            }
            s.protected.retain(|p| p.name != name);
            s.protected.push(Protected {
                name,
                ptr: ptr as usize,
                bytes,
            });
            Ok(SV_OK)
        })
    })
}

/// Forgets the region `name`: later snapshots do not hold it. Unknown names are an error.
/// For a region from `sv_alloc`, this also frees its memory.
/// Thread safety: any thread; no other thread may use the memory of a freed `sv_alloc` region.
///
/// # Safety
/// `name` is NULL or a NUL-terminated string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sv_unprotect(name: *const c_char) -> c_int {
    guard(|| {
        let name = c_name(name)?;
        with_state(|s| {
            let before = s.protected.len() + s.allocated.len();
            s.protected.retain(|p| p.name != name);
            s.allocated.retain(|a| a.name() != name);
            if s.protected.len() + s.allocated.len() == before {
                return Err((SV_EINVAL, format!("no region {name:?} is protected")));
            }
            Ok(SV_OK)
        })
    })
}

/// Allocates `bytes` bytes of memory owned by the shim under `name` and returns it (NULL on
/// error, see `sv_last_error`). When this run resumes, the memory already holds the
/// snapshot's bytes (zeros if the snapshot has no such region; a size mismatch is an error).
/// Snapshots capture it without a whole copy where the kernel tracks writes: only the 64 KiB
/// chunks written since the last snapshot are copied. Page-aligned; valid until
/// `sv_unprotect(name)` or `sv_finalize`.
///
/// Thread safety: any thread; serialised with the other calls.
///
/// # Safety
/// `name` is NULL or a NUL-terminated string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sv_alloc(name: *const c_char, bytes: usize) -> *mut c_void {
    let mut out: *mut c_void = std::ptr::null_mut();
    guard(|| {
        let name = c_name(name)?;
        if bytes == 0 {
            return Err((SV_EINVAL, format!("sv_alloc({name:?}): size is 0")));
        }
        with_state(|s| {
            if s.protected.iter().any(|p| p.name == name) {
                return Err((SV_EINVAL, format!("{name:?} is already protected")));
            }
            let mut region = if bytes.is_multiple_of(8) {
                Allocated::F64(s.shim.region::<f64>(&name, bytes / 8).map_err(io)?)
            } else {
                Allocated::U8(s.shim.region::<u8>(&name, bytes).map_err(io)?)
            };
            out = match &mut region {
                Allocated::F64(r) => r.as_mut_ptr() as *mut c_void,
                Allocated::U8(r) => r.as_mut_ptr() as *mut c_void,
            };
            s.allocated.push(region);
            Ok(SV_OK)
        })
    });
    out
}

/// Opens the append-only output file `path` (relative to the working directory) as a C
/// stream, or returns NULL (see `sv_last_error`). Write to it with `fprintf`, `fputs`,
/// `fwrite`...; at every snapshot the shim calls `fflush` on it and records the file's length
/// (everything written before the safe point). A run resumed from a snapshot cuts the file
/// back to the length it recorded, so the file ends byte for byte as an uninterrupted run's;
/// a fresh start begins with an empty file; without a supervisor and without
/// `SUPERVISE_STORE` it is a plain file opened for appending. A file shorter than a snapshot
/// recorded is an error naming it and both lengths.
///
/// The shim owns the stream: never `fclose` it (`sv_finalize` flushes and closes it), and
/// write to the file only through it.
///
/// Thread safety: any thread; the stream may be written from one thread at a time, which must
/// not write during `sv_checkpoint`/`sv_poll` (call them from the writing thread).
///
/// # Safety
/// `path` is NULL or a NUL-terminated string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sv_output(path: *const c_char) -> *mut libc::FILE {
    let mut out: *mut libc::FILE = std::ptr::null_mut();
    guard(|| {
        if path.is_null() {
            return Err((SV_EINVAL, "sv_output: path is NULL".into()));
        }
        // SAFETY: a NUL-terminated string from the caller (checked non-NULL), valid for the
        // call, as the header documents.
        let path = unsafe { CStr::from_ptr(path) };
        let path = path
            .to_str()
            .map_err(|_| (SV_EINVAL, "sv_output: path is not valid UTF-8".to_owned()))?;
        with_state(|s| {
            out = s
                .shim
                .output_stdio(std::path::Path::new(path))
                .map_err(io)?;
            Ok(SV_OK)
        })
    });
    out
}

/// 1 when this run resumes from a snapshot, 0 when it starts fresh, negative on error.
///
/// Thread safety: any thread.
#[unsafe(no_mangle)]
pub extern "C" fn sv_is_restart() -> c_int {
    guard(|| {
        with_state(|s| {
            Ok(match s.shim.start() {
                Start::Resumed { .. } => 1,
                _ => 0,
            })
        })
    })
}

/// Fills every protected region from the snapshot this run resumes from, verifying every
/// chunk. A region the snapshot does not hold, or whose size differs, is an error naming it.
/// (Regions from `sv_alloc` are filled when allocated.)
///
/// Thread safety: any thread, while no thread writes the protected memory.
#[unsafe(no_mangle)]
pub extern "C" fn sv_restore() -> c_int {
    guard(|| {
        with_state(|s| {
            if !matches!(s.shim.start(), Start::Resumed { .. }) {
                return Err((SV_EINVAL, "this run does not resume from a snapshot".into()));
            }
            for p in &s.protected {
                // SAFETY: the program registered this memory as `bytes` writable bytes that
                // stay valid while protected (documented in the header).
                let dest = unsafe { std::slice::from_raw_parts_mut(p.ptr as *mut u8, p.bytes) };
                if !s.shim.load_slice(&p.name, dest).map_err(io)? {
                    return Err((
                        SV_EINVAL,
                        format!("the snapshot holds no region {:?}", p.name),
                    ));
                }
            }
            Ok(SV_OK)
        })
    })
}

/// 1 when a snapshot was requested (schedule, SIGUSR1, operator), else 0. One atomic load
/// when nothing is pending. Call it at safe points.
///
/// Thread safety: any thread; takes no lock.
#[unsafe(no_mangle)]
pub extern "C" fn sv_checkpoint_requested() -> c_int {
    guard(|| match poll_state() {
        Some(shared) => Ok(c_int::from(shared.due())),
        None => Err((SV_ESTATE, "sv_init has not been called (or failed)".into())),
    })
}

fn checkpoint(s: &mut State, tag: *const c_char) -> Outcome {
    let tag = if tag.is_null() {
        None
    } else {
        // SAFETY: a NUL-terminated string from the caller, valid for the call.
        Some(
            unsafe { CStr::from_ptr(tag) }
                .to_string_lossy()
                .into_owned(),
        )
    };
    let protected = &s.protected;
    let next = s
        .shim
        .snapshot(tag.as_deref(), |c| {
            for p in protected {
                // SAFETY: registered readable memory (see sv_protect); copied now, while the
                // program waits in this call.
                let bytes = unsafe { std::slice::from_raw_parts(p.ptr as *const u8, p.bytes) };
                c.raw(&p.name, bytes)?;
            }
            Ok(())
        })
        .map_err(io)?;
    Ok(match next {
        Next::Continue(_) => SV_OK,
        Next::Stop => {
            // `sv_last_error` tells about this final snapshot: empty when it is durable.
            match s.shim.wait_durable() {
                Ok(_) => set_error(""),
                Err(e) => set_error(&e.to_string()),
            }
            SV_STOP
        }
    })
}

/// Snapshots every protected region now: they are copied during the call, then written in the
/// background. `tag` (may be NULL) labels the snapshot (e.g. "step 1200"). Returns 0, or
/// `SV_STOP` when a stop was requested: this was the final snapshot (durable, or failed:
/// `sv_last_error` says why), and the program should clean up and exit with
/// `SV_EXIT_STOPPED` (`return sv_finalize_stopped();`).
/// Thread safety: any thread, while no thread writes `sv_protect` memory (it is copied during the call); `sv_alloc` memory may be written by other threads (tracked).
///
/// # Safety
/// `tag` is NULL or a NUL-terminated string; the protected memory is still valid.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sv_checkpoint(tag: *const c_char) -> c_int {
    guard(|| with_state(|s| checkpoint(s, tag)))
}

/// At a safe point: takes a snapshot if one was requested. Returns 1 if it took one, 0 if
/// none was due, `SV_STOP` if it took the final one before a requested stop (see
/// `sv_checkpoint`), negative on error.
/// Thread safety: as `sv_checkpoint`.
///
/// # Safety
/// As [`sv_checkpoint`].
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sv_poll(tag: *const c_char) -> c_int {
    guard(|| {
        // The common case, nothing due, takes no lock. A safe point is asked about once: a
        // rank of a job of many processes counts them.
        let due_now = poll_state().map(|shared| shared.due());
        if due_now == Some(false) {
            return Ok(0);
        }
        with_state(|s| {
            if due_now.is_none() && !s.shim.due() {
                return Ok(0);
            }
            checkpoint(s, tag).map(|code| if code == SV_STOP { SV_STOP } else { 1 })
        })
    })
}

/// 1 once a stop was requested (by the supervisor, by SIGTERM, or because the supervisor is
/// gone): the next `sv_checkpoint` or `sv_poll` takes the final snapshot and returns
/// `SV_STOP`. 0 otherwise, negative on error.
///
/// Thread safety: any thread.
#[unsafe(no_mangle)]
pub extern "C" fn sv_should_stop() -> c_int {
    guard(|| with_state(|s| Ok(c_int::from(s.shim.should_stop()))))
}

/// `sv_finalize`, then returns `SV_EXIT_STOPPED`, the exit code of a clean stop: after
/// `SV_STOP` and the program's own clean-up, `return sv_finalize_stopped();` from `main`.
///
/// Thread safety: as `sv_finalize`.
#[unsafe(no_mangle)]
pub extern "C" fn sv_finalize_stopped() -> c_int {
    sv_finalize();
    SV_EXIT_STOPPED
}

/// The message of the last error on this thread ("" if none). Valid until the next `sv_*`
/// call on this thread.
///
/// Thread safety: any thread; each thread sees its own last error.
#[unsafe(no_mangle)]
pub extern "C" fn sv_last_error() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}

/// Waits for a snapshot still being written and closes the shim. Call at the end.
///
/// Thread safety: once, at the end, when no other thread calls the shim.
#[unsafe(no_mangle)]
pub extern "C" fn sv_finalize() {
    let _ = guard(|| {
        let state = STATE.lock().unwrap_or_else(|p| p.into_inner()).take();
        POLL.store(std::ptr::null_mut(), Ordering::Release);
        if let Some(s) = state {
            s.shim.finish().map_err(io)?;
        }
        Ok(SV_OK)
    });
}

/// Writes the blake3 hash of `bytes` bytes at `ptr` as 64 hex digits and a NUL into `out`
/// (65 bytes): the hash the store uses, for programs that print a checksum of their state.
/// Thread safety: any thread (needs no shim).
///
/// # Safety
/// `ptr` is NULL or `bytes` readable bytes; `out` is NULL or 65 writable bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sv_digest_hex(
    ptr: *const c_void,
    bytes: usize,
    out: *mut c_char,
) -> c_int {
    guard(|| {
        if ptr.is_null() || out.is_null() {
            return Err((SV_EINVAL, "sv_digest_hex: NULL pointer".into()));
        }
        // SAFETY: the caller passes `bytes` readable bytes at `ptr` and 65 writable at `out`.
        let data = unsafe { std::slice::from_raw_parts(ptr as *const u8, bytes) };
        let hex = blake3::hash(data).to_hex();
        // SAFETY: as above; 64 digits and the NUL fit the documented 65 bytes.
        unsafe {
            std::ptr::copy_nonoverlapping(hex.as_ptr(), out as *mut u8, 64);
            *out.add(64) = 0;
        }
        Ok(SV_OK)
    })
}
