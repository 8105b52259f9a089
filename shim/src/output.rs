//! Output files whose length each snapshot records ([`crate::Shim::output`], `sv_output`):
//! the program appends to them; at every snapshot the shim writes out what the program wrote
//! so far (its own buffer, or the C stream's) and records the file's length in the manifest
//! ([`OutputMark`]); before the manifest is committed the file is fsynced. A run that resumes
//! from the snapshot cuts the file back to that length when it opens it again, so the file
//! ends byte for byte as an uninterrupted run's, whenever the program was killed.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use supervise_store::error::{Error, Result, io_err};
use supervise_store::format::{MAX_OUTPUT_PATH, OutputMark};

/// Bytes an [`Output`] collects before it writes them to its file.
pub const OUTPUT_BUFFER: usize = 64 * 1024;

/// Where the program's bytes wait before they reach the file.
pub(crate) enum Sink {
    /// The shim's own buffer ([`Output`]).
    Buffer(Vec<u8>),
    /// A C stream (`FILE *`, from `sv_output`): flushed with `fflush`.
    Stdio(*mut libc::FILE),
    /// Closed: the program dropped its handle (the length stays recorded).
    Closed,
}

/// One output file of this run.
pub(crate) struct OutputFile {
    /// The path recorded in manifests (absolute: canonical directory + name).
    pub(crate) key: String,
    /// The file, opened for appending (shared with the writer thread, which fsyncs it).
    pub(crate) file: Option<Arc<File>>,
    /// Its length: bytes the program wrote that reached the file.
    pub(crate) len: u64,
    pub(crate) sink: Sink,
}

// SAFETY: the `FILE *` of a `Sink::Stdio` is only used under the `Mutex` that holds this
// value (fflush and fileno are thread-safe on a stream the program does not close; the C
// header says the shim owns it), so moving the pointer between threads is sound.
unsafe impl Send for OutputFile {}

impl OutputFile {
    /// Writes the program's pending bytes to the file and returns its length: everything the
    /// program wrote so far.
    pub(crate) fn flush(&mut self) -> Result<u64> {
        let path = PathBuf::from(&self.key);
        match &mut self.sink {
            Sink::Closed => {}
            Sink::Buffer(buf) => {
                let Some(file) = &self.file else {
                    return Ok(self.len);
                };
                let mut done = 0;
                let result = loop {
                    if done == buf.len() {
                        break Ok(());
                    }
                    match (&**file).write(&buf[done..]) {
                        Ok(0) => break Err(io::Error::from(io::ErrorKind::WriteZero)),
                        Ok(n) => done += n,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => break Err(e),
                    }
                };
                buf.drain(..done);
                self.len += done as u64;
                result.map_err(io_err("write output", path))?;
            }
            Sink::Stdio(fp) => {
                // SAFETY: a stream sv_output opened, which the shim owns and has not closed.
                if unsafe { libc::fflush(*fp) } != 0 {
                    return Err(Error::Io {
                        op: "fflush output",
                        path,
                        source: io::Error::last_os_error(),
                    });
                }
                if let Some(file) = &self.file {
                    self.len = file.metadata().map_err(io_err("stat output", path))?.len();
                }
            }
        }
        Ok(self.len)
    }

    /// The file's mark for a manifest.
    pub(crate) fn mark(&self) -> OutputMark {
        OutputMark {
            path: self.key.clone(),
            len: self.len,
        }
    }

    /// Flushes and closes the program's side (a C stream with `fclose`); the file's length
    /// stays recorded, and the file open for the snapshots' fsync.
    pub(crate) fn close(&mut self) -> Result<()> {
        let flushed = self.flush().map(|_| ());
        if let Sink::Stdio(fp) = std::mem::replace(&mut self.sink, Sink::Closed) {
            // SAFETY: the shim's own stream, closed exactly once (the sink is now Closed).
            unsafe { libc::fclose(fp) };
        }
        flushed
    }
}

/// The shared state of one output file.
pub(crate) type Shared = Arc<Mutex<OutputFile>>;

pub(crate) fn lock(shared: &Shared) -> MutexGuard<'_, OutputFile> {
    shared.lock().unwrap_or_else(|p| p.into_inner())
}

/// An append-only output file from [`crate::Shim::output`]: `write!` to it as to a file. It
/// buffers by itself (do not wrap it in a `BufWriter`: bytes in a buffer the shim cannot see
/// would be missing from the length a snapshot records); each snapshot writes the buffer out
/// first, and so do [`flush`](Write::flush) and dropping it.
pub struct Output {
    shared: Shared,
}

impl Output {
    pub(crate) fn new(shared: Shared) -> Self {
        Self { shared }
    }

    /// The path recorded in snapshots (under a store: the absolute path).
    pub fn path(&self) -> PathBuf {
        PathBuf::from(&lock(&self.shared).key)
    }

    /// The file's length, counting bytes still in the buffer.
    pub fn len(&self) -> u64 {
        let out = lock(&self.shared);
        let pending = match &out.sink {
            Sink::Buffer(buf) => buf.len() as u64,
            _ => 0,
        };
        out.len + pending
    }

    /// True when nothing was written (and the file was empty).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Write for Output {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let mut out = lock(&self.shared);
        let full = match &out.sink {
            Sink::Buffer(buf) => buf.len() + data.len() > OUTPUT_BUFFER,
            _ => false,
        };
        if full {
            out.flush().map_err(io::Error::other)?;
        }
        match &mut out.sink {
            Sink::Buffer(buf) => buf.extend_from_slice(data),
            _ => return Err(io::Error::other("output file is closed")),
        }
        if data.len() >= OUTPUT_BUFFER {
            out.flush().map_err(io::Error::other)?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        lock(&self.shared)
            .flush()
            .map(|_| ())
            .map_err(io::Error::other)
    }
}

impl Drop for Output {
    fn drop(&mut self) {
        // As BufWriter: an error here has no one to go to (call flush to see it).
        let _ = lock(&self.shared).close();
    }
}

/// The path recorded for `path`: its directory's canonical path joined with its name.
pub(crate) fn recorded_path(path: &Path) -> Result<String> {
    let bad = |why: &str| Error::Output {
        path: path.to_owned(),
        why: why.to_owned(),
    };
    let name = path.file_name().ok_or_else(|| bad("names no file"))?;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let dir = std::fs::canonicalize(dir).map_err(io_err("resolve the directory of", path))?;
    let key = dir.join(name);
    let key = key
        .to_str()
        .ok_or_else(|| bad("is not valid UTF-8"))?
        .to_owned();
    if key.len() > MAX_OUTPUT_PATH || key.contains('\0') {
        return Err(bad("is longer than PATH_MAX (4096 bytes) or holds a NUL"));
    }
    Ok(key)
}

/// Opens `path` for appending, created if missing (0666 less the umask, as a program's own
/// output file would be).
pub(crate) fn open_append(path: &Path) -> Result<File> {
    OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o666)
        .open(path)
        .map_err(io_err("open output", path))
}

/// Opens the output file `key` and cuts it to `len` (the length a snapshot recorded, or 0 on a
/// fresh start): a file shorter than that is an error naming it and both lengths (`seq`: the
/// snapshot that recorded it). The cut and the file's name in its directory are made durable.
pub(crate) fn open_at(key: &str, len: u64, seq: Option<u64>) -> Result<File> {
    let path = Path::new(key);
    let file = open_append(path)?;
    let found = file.metadata().map_err(io_err("stat output", path))?.len();
    if found < len {
        return Err(Error::OutputShorter {
            path: path.to_owned(),
            seq,
            recorded: len,
            found,
        });
    }
    if found > len {
        file.set_len(len).map_err(io_err("truncate output", path))?;
    }
    file.sync_all().map_err(io_err("fsync output", path))?;
    if let Some(dir) = path.parent() {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err("fsync directory of output", path))?;
    }
    Ok(file)
}
