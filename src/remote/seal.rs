//! Sealed tiers (`--encrypt-key FILE`): every object is encrypted and authenticated on this
//! node before it goes to storage someone else runs, and checked when it comes back.
//!
//! [`Sealed`] wraps any [`Tier`]. Packs, manifests and the lease all go through it, so the
//! store holds only sealed bytes. An object is stored as
//!
//! ```text
//! "SVSEAL"  u16 LE format version (1)  key id (8 bytes)  nonce prefix (19 random bytes)
//! segment 0, segment 1, ..., segment n-1 (the last one flagged as last)
//! ```
//!
//! Each segment is at most 64 KiB of content sealed with XChaCha20-Poly1305 (a 16-byte tag
//! after it), in the STREAM construction (Hoang, Reyhanitabar, Rogaway, Vizár): the nonce of
//! segment `i` is `prefix ‖ i as u32 BE ‖ last-segment flag`, and the object's key (the tier
//! key, `job/packs/NAME.pack`) is the associated data of every segment. So an object moved
//! to another key, segments reordered or dropped, an object cut at a segment boundary or
//! extended all fail authentication ([`TierError::Damaged`]); an object sealed with another
//! key is [`TierError::WrongKey`], a clear error and never a reason to start afresh. Empty
//! content is one empty last segment. Both ways stream one segment at a time: memory stays
//! bounded whatever the size of the object.
//!
//! The key file holds 32 random bytes as 64 hex digits ([`SealKey::generate`] writes one).
//! Two subkeys are derived from it with `blake3::derive_key`: the encryption key, and the key
//! of the key id (the first 8 bytes of a keyed blake3 of a constant), which names the key in
//! every object's header without revealing anything about it.
//!
//! # What the store learns, and what it does not
//!
//! The issue asks that chunk ids be keyed so that the store cannot test guesses of content
//! (with plain content hashes, someone holding a candidate file could hash its chunks and look
//! for them). Sealing whole objects gives that without a second hash: chunk hashes exist only
//! inside packs and manifests, and those reach the store sealed. What the store sees of an
//! object is its key (`<job>/packs/<seq>-<nonce>-<n>.pack`, a name made of a sequence number
//! and a random nonce, not derived from content; `<job>/snapshots/<generation>-<seq>.snap`;
//! `<job>/lease`), its size and its sealed bytes, which are indistinguishable from random
//! without the key. A guess of content cannot be checked against any of these. Manifests and
//! the lease are authenticated as well as encrypted, so the store (or anyone who can write to
//! it) cannot forge or alter them: a forged object fails authentication, and so does a
//! genuine one copied under another key (a manifest replayed as another seq, a pack under
//! another name).
//!
//! Not hidden: the job name (it is in every key), the number of objects and their sizes (a
//! pack's size is its content's plus 35 bytes plus 16 per 64 KiB), the times at which they
//! are written, read and deleted (so how often the job snapshots and how much changes), the
//! snapshot sequence numbers and lease generations in manifest keys. Not prevented: the store
//! deleting objects, or serving an older genuine object under the same key (a rollback of the
//! lease or of a pack to an earlier version of that same key); the layers above check what
//! they can (manifests name their packs and chunk hashes, which are verified on restore).
//!
//! A failed [`Tier::get`] may already have written the authenticated segments before the
//! failing one to `out`: the caller must discard everything it got (callers write to a
//! temporary file and rename it only on success). No byte that failed authentication is ever
//! written to `out`.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use chacha20poly1305::aead::generic_array::GenericArray;
use chacha20poly1305::aead::rand_core::RngCore;
use chacha20poly1305::aead::stream::{NewStream, StreamBE32, StreamPrimitive};
use chacha20poly1305::aead::{KeyInit, OsRng};
use chacha20poly1305::{Key, XChaCha20Poly1305};
use zeroize::{Zeroize, Zeroizing};

use super::{ObjectMeta, Tier, TierError, TierResult, Version};

/// The first bytes of every sealed object.
pub const MAGIC: &[u8; 6] = b"SVSEAL";

/// The format version this module writes and reads.
const FORMAT_VERSION: u16 = 1;

/// Bytes of the key id in a header.
const KEY_ID_LEN: usize = 8;

/// Bytes of the random nonce prefix (XChaCha20's 24-byte nonce less STREAM's 5).
const PREFIX_LEN: usize = 19;

/// Bytes of the header: magic, version, key id, nonce prefix.
pub const HEADER_LEN: usize = MAGIC.len() + 2 + KEY_ID_LEN + PREFIX_LEN;

/// Bytes of content in every segment but the last.
pub const SEGMENT: usize = 64 * 1024;

/// Bytes of the authentication tag after each segment.
pub const TAG: usize = 16;

/// Bytes of a whole sealed segment.
const SEALED_SEGMENT: usize = SEGMENT + TAG;

/// The longest key file read (a key is 65 bytes with its newline).
const KEY_FILE_MAX: u64 = 4096;

/// The context of the encryption subkey (blake3 `derive_key`).
const CONTEXT_ENCRYPTION: &str = "supervise 2026-12 seal encryption";

/// The context of the key id's subkey (blake3 `derive_key`).
const CONTEXT_KEY_ID: &str = "supervise 2026-12 seal key id";

/// What the key id's subkey hashes.
const KEY_ID_INPUT: &[u8] = b"supervise seal key id";

/// The STREAM flavour used: 32-bit big-endian segment counter and a last-segment byte.
type Stream = StreamBE32<XChaCha20Poly1305>;

/// The size of the sealed object holding `len` bytes of content (`None`: too large to seal,
/// more than 2^32 segments or past `u64`).
pub fn sealed_len(len: u64) -> Option<u64> {
    let segments = len.div_ceil(SEGMENT as u64).max(1);
    if segments > u64::from(u32::MAX) + 1 {
        return None;
    }
    (HEADER_LEN as u64)
        .checked_add(len)?
        .checked_add(segments.checked_mul(TAG as u64)?)
}

/// True when `bytes` (an object's first bytes, at least [`MAGIC`]'s length) start like a
/// sealed object: for telling a user that a store is sealed and needs `--encrypt-key`.
pub fn looks_sealed(bytes: &[u8]) -> bool {
    bytes.starts_with(MAGIC)
}

/// Why a key file could not be read or written.
#[derive(Debug)]
pub enum KeyError {
    /// There is no file at the path.
    Missing {
        /// The key file.
        path: PathBuf,
    },
    /// The file could not be opened or read, or is not a regular file.
    Unreadable {
        /// The key file.
        path: PathBuf,
        /// What the system said.
        why: String,
    },
    /// The file is far larger than a key.
    TooLarge {
        /// The key file.
        path: PathBuf,
        /// Its size in bytes.
        size: u64,
    },
    /// The file holds hex digits, but not 64 of them.
    WrongLength {
        /// The key file.
        path: PathBuf,
        /// How many characters it holds (without a final newline).
        digits: usize,
    },
    /// The file holds something else than hex digits (and one final newline).
    NotHex {
        /// The key file.
        path: PathBuf,
    },
    /// The file can be read by its group or by others: a secret must not be.
    Exposed {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// [`SealKey::generate`] found a file at the path: a key is never overwritten.
    Exists {
        /// The key file.
        path: PathBuf,
    },
    /// [`SealKey::generate`] could not write the file.
    Write {
        /// The key file.
        path: PathBuf,
        /// What went wrong.
        why: String,
    },
    /// The operating system's random number generator failed.
    Random {
        /// What it said.
        why: String,
    },
}

impl fmt::Display for KeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyError::Missing { path } => write!(f, "key file {}: no such file", path.display()),
            KeyError::Unreadable { path, why } => {
                write!(f, "key file {}: cannot read it: {why}", path.display())
            }
            KeyError::TooLarge { path, size } => write!(
                f,
                "key file {}: {size} bytes, not a key (64 hex digits)",
                path.display()
            ),
            KeyError::WrongLength { path, digits } => write!(
                f,
                "key file {}: {digits} characters, a key is 64 hex digits (32 bytes)",
                path.display()
            ),
            KeyError::NotHex { path } => write!(
                f,
                "key file {}: not hex digits, a key is 64 hex digits (32 bytes) and a newline",
                path.display()
            ),
            KeyError::Exposed { path, mode } => write!(
                f,
                "key file {path}: readable by group or others (mode {mode:04o}); it is a secret: \
                 chmod 600 {path}",
                path = path.display(),
                mode = mode & 0o7777
            ),
            KeyError::Exists { path } => write!(
                f,
                "key file {}: already exists; a key is never overwritten (objects sealed with \
                 it could not be read again)",
                path.display()
            ),
            KeyError::Write { path, why } => {
                write!(f, "key file {}: cannot write it: {why}", path.display())
            }
            KeyError::Random { why } => {
                write!(f, "the system's random number generator failed: {why}")
            }
        }
    }
}

impl std::error::Error for KeyError {}

/// The key of a sealed tier (`--encrypt-key FILE`): the derived encryption key and the key
/// id. The key itself is never printed (its `Debug` shows the id) and is wiped on drop.
#[derive(Clone)]
pub struct SealKey {
    /// The XChaCha20-Poly1305 key.
    encryption: [u8; 32],
    /// The key id written in every header.
    id: [u8; KEY_ID_LEN],
}

impl Drop for SealKey {
    fn drop(&mut self) {
        self.encryption.zeroize();
    }
}

impl fmt::Debug for SealKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SealKey")
            .field("id", &self.id_hex())
            .finish_non_exhaustive()
    }
}

impl SealKey {
    /// Reads the key file at `path`: 64 hex digits, optionally followed by a newline, in a
    /// regular file that only its owner can read (at most 4 KiB is read).
    pub fn load(path: &Path) -> Result<SealKey, KeyError> {
        let unreadable = |why: String| KeyError::Unreadable {
            path: path.to_path_buf(),
            why,
        };
        // Non-blocking: a FIFO put where the key should be must not hang the open.
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
            .open(path)
            .map_err(|e| match e.kind() {
                io::ErrorKind::NotFound => KeyError::Missing {
                    path: path.to_path_buf(),
                },
                _ => unreadable(e.to_string()),
            })?;
        let meta = file.metadata().map_err(|e| unreadable(e.to_string()))?;
        if !meta.is_file() {
            return Err(unreadable("not a regular file".into()));
        }
        let mode = meta.permissions().mode();
        if mode & 0o077 != 0 {
            return Err(KeyError::Exposed {
                path: path.to_path_buf(),
                mode,
            });
        }
        let too_large = |size| KeyError::TooLarge {
            path: path.to_path_buf(),
            size,
        };
        if meta.len() > KEY_FILE_MAX {
            return Err(too_large(meta.len()));
        }
        let mut text = Zeroizing::new(Vec::with_capacity(KEY_FILE_MAX as usize + 1));
        file.take(KEY_FILE_MAX + 1)
            .read_to_end(&mut text)
            .map_err(|e| unreadable(e.to_string()))?;
        if text.len() as u64 > KEY_FILE_MAX {
            return Err(too_large(text.len() as u64));
        }
        let mut digits: &[u8] = &text;
        if let Some(rest) = digits.strip_suffix(b"\n") {
            digits = rest.strip_suffix(b"\r").unwrap_or(rest);
        }
        if !digits.iter().all(u8::is_ascii_hexdigit) {
            return Err(KeyError::NotHex {
                path: path.to_path_buf(),
            });
        }
        if digits.len() != 64 {
            return Err(KeyError::WrongLength {
                path: path.to_path_buf(),
                digits: digits.len(),
            });
        }
        let mut raw = Zeroizing::new([0u8; 32]);
        for (byte, pair) in raw.iter_mut().zip(digits.chunks_exact(2)) {
            *byte = (hex_value(pair[0]) << 4) | hex_value(pair[1]);
        }
        Ok(SealKey::derive(&raw))
    }

    /// Makes a new key from the operating system's random number generator and writes it to
    /// `path` (mode 0600, never replacing an existing file: [`KeyError::Exists`]), durably:
    /// written to a temporary name in the same directory, synced, linked to `path`, and the
    /// directory synced.
    pub fn generate(path: &Path) -> Result<SealKey, KeyError> {
        let write_error = |why: String| KeyError::Write {
            path: path.to_path_buf(),
            why,
        };
        let name = path
            .file_name()
            .ok_or_else(|| write_error("not a file name".into()))?;
        let dir = match path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => Path::new("."),
        };
        if path.symlink_metadata().is_ok() {
            return Err(KeyError::Exists {
                path: path.to_path_buf(),
            });
        }
        let mut raw = Zeroizing::new([0u8; 32]);
        fill_random(&mut raw[..]).map_err(|why| KeyError::Random { why })?;
        let mut tag = [0u8; 6];
        fill_random(&mut tag).map_err(|why| KeyError::Random { why })?;
        let mut temp_name = std::ffi::OsString::from(".");
        temp_name.push(name);
        temp_name.push(format!(".{}.{}.tmp", std::process::id(), hex(&tag)));
        let temp = dir.join(temp_name);

        let mut text = Zeroizing::new(hex(&raw[..]));
        text.push('\n');
        let written = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&temp)
            .and_then(|mut file| {
                file.write_all(text.as_bytes())?;
                file.sync_all()
            });
        if let Err(e) = written {
            let _ = std::fs::remove_file(&temp);
            return Err(write_error(format!("{}: {e}", temp.display())));
        }
        // A link fails if anything is at `path`, a dangling symlink included: never replaced.
        let linked = std::fs::hard_link(&temp, path);
        let removed = std::fs::remove_file(&temp);
        match linked {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                return Err(KeyError::Exists {
                    path: path.to_path_buf(),
                });
            }
            Err(e) => return Err(write_error(e.to_string())),
        }
        if let Err(e) = removed {
            return Err(write_error(format!(
                "the key was written, but its temporary copy {} remains ({e}): remove it",
                temp.display()
            )));
        }
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| write_error(format!("syncing the directory {}: {e}", dir.display())))?;
        Ok(SealKey::derive(&raw))
    }

    #[cfg(test)]
    /// The key's id: names it in every sealed object's header without revealing it.
    pub fn id(&self) -> [u8; 8] {
        self.id
    }

    /// The key's id in hex, for messages.
    pub fn id_hex(&self) -> String {
        hex(&self.id)
    }

    /// The subkeys of the 32 key bytes.
    fn derive(raw: &[u8; 32]) -> SealKey {
        let encryption = blake3::derive_key(CONTEXT_ENCRYPTION, raw);
        let mut id_key = blake3::derive_key(CONTEXT_KEY_ID, raw);
        let digest = blake3::keyed_hash(&id_key, KEY_ID_INPUT);
        id_key.zeroize();
        let mut id = [0u8; KEY_ID_LEN];
        id.copy_from_slice(&digest.as_bytes()[..KEY_ID_LEN]);
        SealKey { encryption, id }
    }

    /// The STREAM of one object, from its nonce prefix.
    fn stream(&self, prefix: &[u8; PREFIX_LEN]) -> Stream {
        let aead = XChaCha20Poly1305::new(Key::from_slice(&self.encryption));
        Stream::from_aead(aead, GenericArray::from_slice(prefix))
    }
}

/// The value of one hex digit (checked by the caller).
fn hex_value(digit: u8) -> u8 {
    match digit {
        b'0'..=b'9' => digit - b'0',
        b'a'..=b'f' => digit - b'a' + 10,
        b'A'..=b'F' => digit - b'A' + 10,
        _ => 0,
    }
}

/// Lower-case hex of `bytes`.
fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 15)] as char);
    }
    s
}

/// Fills `buf` from the operating system's random number generator.
fn fill_random(buf: &mut [u8]) -> Result<(), String> {
    OsRng.try_fill_bytes(buf).map_err(|e| e.to_string())
}

/// A tier whose objects are sealed with a key before they reach the tier underneath, and
/// checked and opened when they come back (the module's doc says how).
pub struct Sealed {
    inner: Box<dyn Tier>,
    key: SealKey,
    describe: String,
}

impl Sealed {
    /// Seals every object written to `inner` with `key`.
    pub fn new(inner: Box<dyn Tier>, key: SealKey) -> Sealed {
        let describe = format!("{} (sealed)", inner.describe());
        Sealed {
            inner,
            key,
            describe,
        }
    }

    /// A new sealing reader over `data` (`len` bytes) for the object `key`.
    fn sealer<'a>(&self, key: &'a str, data: &'a mut dyn Read, len: u64) -> TierResult<Sealer<'a>> {
        let mut prefix = [0u8; PREFIX_LEN];
        fill_random(&mut prefix).map_err(|why| self.unavailable(key, why))?;
        Ok(Sealer::new(&self.key, prefix, key, data, len))
    }

    /// Seals a small object whole.
    fn seal_bytes(&self, key: &str, bytes: &[u8]) -> TierResult<Vec<u8>> {
        let len = bytes.len() as u64;
        let sealed = sealed_len(len).ok_or_else(|| self.too_large(key, u64::MAX))?;
        let mut data = bytes;
        let mut sealer = self.sealer(key, &mut data, len)?;
        let mut out = Vec::with_capacity(usize::try_from(sealed).unwrap_or(0));
        let read = sealer.read_to_end(&mut out);
        if let Some(failure) = sealer.failure.take() {
            return Err(self.failed(key, failure));
        }
        read.map_err(|e| self.unavailable(key, e.to_string()))?;
        Ok(out)
    }

    fn unavailable(&self, key: &str, why: String) -> TierError {
        TierError::Unavailable {
            tier: self.describe.clone(),
            key: key.to_string(),
            why,
        }
    }

    fn too_large(&self, key: &str, max: u64) -> TierError {
        TierError::TooLarge {
            tier: self.describe.clone(),
            key: key.to_string(),
            max,
        }
    }

    /// The error of a failure met while sealing or opening `key`.
    fn failed(&self, key: &str, failure: Failure) -> TierError {
        let (tier, key) = (self.describe.clone(), key.to_string());
        match failure {
            Failure::Damaged(why) => TierError::Damaged { tier, key, why },
            Failure::WrongKey => TierError::WrongKey { tier, key },
            Failure::TooLarge(max) => TierError::TooLarge { tier, key, max },
            Failure::Io(why) => TierError::Unavailable { tier, key, why },
        }
    }
}

impl Tier for Sealed {
    fn describe(&self) -> &str {
        &self.describe
    }

    /// The inner tier's listing: sizes are sealed sizes.
    fn list(&self, prefix: &str) -> TierResult<Vec<ObjectMeta>> {
        self.inner.list(prefix)
    }

    /// Streams the content of `key` into `out`, authenticating each 64 KiB segment before
    /// writing it. `max` bounds the content (the inner tier is given the sealed bound). On an
    /// error, `out` may hold the authenticated segments before the failing one: the caller
    /// must discard all of it.
    fn get(&self, key: &str, out: &mut dyn Write, max: u64) -> TierResult<Version> {
        let bound = sealed_len(max).unwrap_or(u64::MAX);
        let mut opener = Opener::new(&self.key, key, out, max, bound);
        let got = self.inner.get(key, &mut opener, bound);
        if let Some(failure) = opener.failure.take() {
            return Err(self.failed(key, failure));
        }
        let version = match got {
            Ok(version) => version,
            Err(TierError::TooLarge { .. }) => return Err(self.too_large(key, max)),
            Err(e) => return Err(e),
        };
        opener
            .finish()
            .map_err(|failure| self.failed(key, failure))?;
        Ok(version)
    }

    /// Seals `len` bytes of `data` as they are read, into an object of [`sealed_len`] bytes.
    fn put(&self, key: &str, data: &mut dyn Read, len: u64) -> TierResult<Version> {
        let sealed = sealed_len(len).ok_or_else(|| self.too_large(key, u64::MAX))?;
        let mut sealer = self.sealer(key, data, len)?;
        let put = self.inner.put(key, &mut sealer, sealed);
        if let Some(failure) = sealer.failure.take() {
            return Err(self.failed(key, failure));
        }
        put
    }

    fn create(&self, key: &str, bytes: &[u8]) -> TierResult<Version> {
        let sealed = self.seal_bytes(key, bytes)?;
        self.inner.create(key, &sealed)
    }

    fn replace(&self, key: &str, bytes: &[u8], version: &Version) -> TierResult<Version> {
        let sealed = self.seal_bytes(key, bytes)?;
        self.inner.replace(key, &sealed, version)
    }

    fn delete(&self, key: &str) -> TierResult<()> {
        self.inner.delete(key)
    }
}

/// What went wrong inside a [`Sealer`] or an [`Opener`], kept aside because the inner tier
/// sees only an `io::Error` and reports it its own way.
#[derive(Debug)]
enum Failure {
    /// The object is not what was sealed.
    Damaged(String),
    /// The object was sealed with another key.
    WrongKey,
    /// The content is longer than this bound.
    TooLarge(u64),
    /// The caller's reader or writer failed, or the random number generator.
    Io(String),
}

/// A reader of the sealed object: the header, then each segment sealed as it is read from
/// the content.
struct Sealer<'a> {
    stream: Stream,
    /// The object's key: associated data of every segment.
    aad: &'a [u8],
    data: &'a mut dyn Read,
    /// Content bytes not read yet.
    remaining: u64,
    /// The next segment's number.
    position: u32,
    /// The bytes being served: the header, then one sealed segment at a time.
    buf: Vec<u8>,
    /// How much of `buf` was served.
    served: usize,
    /// The last segment is in `buf`.
    done: bool,
    failure: Option<Failure>,
}

impl<'a> Sealer<'a> {
    fn new(
        key: &SealKey,
        prefix: [u8; PREFIX_LEN],
        object: &'a str,
        data: &'a mut dyn Read,
        len: u64,
    ) -> Sealer<'a> {
        let mut buf = Vec::with_capacity(SEALED_SEGMENT);
        buf.extend_from_slice(MAGIC);
        buf.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        buf.extend_from_slice(&key.id);
        buf.extend_from_slice(&prefix);
        Sealer {
            stream: key.stream(&prefix),
            aad: object.as_bytes(),
            data,
            remaining: len,
            position: 0,
            buf,
            served: 0,
            done: false,
            failure: None,
        }
    }

    /// Records `failure` and gives the inner tier an error to stop on.
    fn fail(&mut self, failure: Failure) -> io::Error {
        let e = io::Error::other(format!("{failure:?}"));
        self.failure = Some(failure);
        e
    }

    /// Reads and seals the next segment into `buf`.
    fn next_segment(&mut self) -> io::Result<()> {
        let n = self.remaining.min(SEGMENT as u64) as usize;
        self.buf.clear();
        self.buf.resize(n, 0);
        let mut filled = 0;
        while filled < n {
            match self.data.read(&mut self.buf[filled..]) {
                Ok(0) => {
                    let before = u64::from(self.position) * SEGMENT as u64;
                    let why = format!(
                        "the content ended after {} of {} bytes",
                        before + filled as u64,
                        before + self.remaining
                    );
                    return Err(self.fail(Failure::Io(why)));
                }
                Ok(k) => filled += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    let why = format!("reading the content: {e}");
                    return Err(self.fail(Failure::Io(why)));
                }
            }
        }
        self.remaining -= n as u64;
        let last = self.remaining == 0;
        if !last && self.position == u32::MAX {
            return Err(self.fail(Failure::TooLarge(u64::MAX)));
        }
        if self
            .stream
            .encrypt_in_place(self.position, last, self.aad, &mut self.buf)
            .is_err()
        {
            return Err(self.fail(Failure::Io("encryption failed".into())));
        }
        self.position = self.position.wrapping_add(1);
        self.done = last;
        self.served = 0;
        Ok(())
    }
}

impl Read for Sealer<'_> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.failure.is_some() {
            return Err(io::Error::other("sealing failed"));
        }
        if self.served == self.buf.len() {
            if self.done {
                return Ok(0);
            }
            self.next_segment()?;
        }
        let n = out.len().min(self.buf.len() - self.served);
        out[..n].copy_from_slice(&self.buf[self.served..self.served + n]);
        self.served += n;
        Ok(n)
    }
}

impl Drop for Sealer<'_> {
    fn drop(&mut self) {
        // The buffer held content in the clear before it was sealed.
        self.buf.zeroize();
    }
}

/// A writer that takes a sealed object as the inner tier streams it, checks its header, and
/// writes each segment's content to `out` once the segment is authenticated. A segment is
/// opened only when the next byte after it arrives (it is then not the last) or at
/// [`Opener::finish`] (it is the last).
struct Opener<'a> {
    key: &'a SealKey,
    aad: &'a [u8],
    out: &'a mut dyn Write,
    /// The caller's bound on the content.
    max: u64,
    /// The bound on the sealed object.
    bound: u64,
    /// Sealed bytes received.
    received: u64,
    header: Vec<u8>,
    /// Known once the header is checked.
    stream: Option<Stream>,
    /// The segment being received.
    segment: Vec<u8>,
    /// Its number.
    position: u32,
    failure: Option<Failure>,
}

impl<'a> Opener<'a> {
    fn new(
        key: &'a SealKey,
        object: &'a str,
        out: &'a mut dyn Write,
        max: u64,
        bound: u64,
    ) -> Opener<'a> {
        Opener {
            key,
            aad: object.as_bytes(),
            out,
            max,
            bound,
            received: 0,
            header: Vec::with_capacity(HEADER_LEN),
            stream: None,
            segment: Vec::with_capacity(SEALED_SEGMENT),
            position: 0,
            failure: None,
        }
    }

    /// Records `failure` and gives the inner tier an error to stop on.
    fn fail(&mut self, failure: Failure) -> io::Error {
        let e = io::Error::other(format!("{failure:?}"));
        self.failure = Some(failure);
        e
    }

    /// Checks the complete header and starts the stream.
    fn check_header(&self) -> Result<Stream, Failure> {
        let h = &self.header;
        if !h.starts_with(MAGIC) {
            return Err(Failure::Damaged(
                "not a sealed object (no SVSEAL header): written without --encrypt-key?".into(),
            ));
        }
        let version = u16::from_le_bytes([h[6], h[7]]);
        if version != FORMAT_VERSION {
            return Err(Failure::Damaged(format!(
                "sealed in format version {version}, this supervisor reads version \
                 {FORMAT_VERSION}"
            )));
        }
        if h[8..8 + KEY_ID_LEN] != self.key.id {
            return Err(Failure::WrongKey);
        }
        let mut prefix = [0u8; PREFIX_LEN];
        prefix.copy_from_slice(&h[8 + KEY_ID_LEN..HEADER_LEN]);
        Ok(self.key.stream(&prefix))
    }

    /// Authenticates the segment held (the last one if `last`) and writes its content out.
    fn open_segment(&mut self, last: bool) -> Result<(), Failure> {
        let Some(stream) = &self.stream else {
            return Err(Failure::Damaged("no header".into()));
        };
        if self.segment.len() < TAG {
            return Err(Failure::Damaged(format!(
                "truncated: segment {} has {} bytes, less than its tag",
                self.position,
                self.segment.len()
            )));
        }
        if !last && self.position == u32::MAX {
            return Err(Failure::Damaged(
                "more segments than a sealed object has".into(),
            ));
        }
        if stream
            .decrypt_in_place(self.position, last, self.aad, &mut self.segment)
            .is_err()
        {
            return Err(Failure::Damaged(format!(
                "segment {} fails authentication (altered, truncated, extended, or moved from \
                 another key)",
                self.position
            )));
        }
        let written = self.out.write_all(&self.segment);
        self.segment.zeroize();
        self.segment.clear();
        written.map_err(|e| Failure::Io(format!("writing the content: {e}")))?;
        self.position = self.position.wrapping_add(1);
        Ok(())
    }

    /// Called once the inner tier has given the whole object: opens the last segment.
    fn finish(mut self) -> Result<(), Failure> {
        if self.stream.is_none() {
            return Err(Failure::Damaged(format!(
                "truncated: {} bytes, shorter than the {HEADER_LEN}-byte header",
                self.header.len()
            )));
        }
        self.open_segment(true)
    }
}

impl Write for Opener<'_> {
    fn write(&mut self, mut bytes: &[u8]) -> io::Result<usize> {
        if self.failure.is_some() {
            return Err(io::Error::other("opening failed"));
        }
        let n = bytes.len();
        self.received = self.received.saturating_add(n as u64);
        if self.received > self.bound {
            let max = self.max;
            return Err(self.fail(Failure::TooLarge(max)));
        }
        while !bytes.is_empty() {
            if self.stream.is_none() {
                let take = bytes.len().min(HEADER_LEN - self.header.len());
                self.header.extend_from_slice(&bytes[..take]);
                bytes = &bytes[take..];
                if self.header.len() == HEADER_LEN {
                    match self.check_header() {
                        Ok(stream) => self.stream = Some(stream),
                        Err(failure) => return Err(self.fail(failure)),
                    }
                }
                continue;
            }
            if self.segment.len() == SEALED_SEGMENT {
                // More bytes follow: the segment held is not the last.
                if let Err(failure) = self.open_segment(false) {
                    return Err(self.fail(failure));
                }
            }
            let take = bytes.len().min(SEALED_SEGMENT - self.segment.len());
            self.segment.extend_from_slice(&bytes[..take]);
            bytes = &bytes[take..];
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{HashMap, HashSet};
    use std::sync::{Arc, Mutex};

    /// A test double of a tier (for the sealing logic only): objects in a map, versions from
    /// a counter. It streams in odd-sized pieces, so segments never line up with its writes.
    struct MemTier {
        objects: Mutex<HashMap<String, (Vec<u8>, u64)>>,
        counter: Mutex<u64>,
        /// Checks `max` up front (as a tier that knows sizes does); off, it streams blindly.
        checks_size: bool,
    }

    impl MemTier {
        fn new(checks_size: bool) -> Arc<MemTier> {
            Arc::new(MemTier {
                objects: Mutex::new(HashMap::new()),
                counter: Mutex::new(0),
                checks_size,
            })
        }

        fn raw(&self, key: &str) -> Vec<u8> {
            self.objects.lock().unwrap()[key].0.clone()
        }

        fn set_raw(&self, key: &str, bytes: Vec<u8>) {
            let version = self.next_version();
            self.objects
                .lock()
                .unwrap()
                .insert(key.to_string(), (bytes, version));
        }

        fn next_version(&self) -> u64 {
            let mut c = self.counter.lock().unwrap();
            *c += 1;
            *c
        }

        fn err(&self, key: &str, why: String) -> TierError {
            TierError::Unavailable {
                tier: "mem".into(),
                key: key.into(),
                why,
            }
        }
    }

    impl Tier for Arc<MemTier> {
        fn describe(&self) -> &str {
            "mem"
        }

        fn list(&self, prefix: &str) -> TierResult<Vec<ObjectMeta>> {
            Ok(self
                .objects
                .lock()
                .unwrap()
                .iter()
                .filter(|(k, _)| k.starts_with(prefix))
                .map(|(k, (b, _))| ObjectMeta {
                    key: k.clone(),
                    size: b.len() as u64,
                    modified_unix_ms: 0,
                })
                .collect())
        }

        fn get(&self, key: &str, out: &mut dyn Write, max: u64) -> TierResult<Version> {
            let (bytes, version) =
                self.objects
                    .lock()
                    .unwrap()
                    .get(key)
                    .cloned()
                    .ok_or_else(|| TierError::NotFound {
                        tier: "mem".into(),
                        key: key.into(),
                    })?;
            if self.checks_size && bytes.len() as u64 > max {
                return Err(TierError::TooLarge {
                    tier: "mem".into(),
                    key: key.into(),
                    max,
                });
            }
            for piece in bytes.chunks(7777) {
                out.write_all(piece)
                    .map_err(|e| self.err(key, e.to_string()))?;
            }
            Ok(Version(version.to_string()))
        }

        fn put(&self, key: &str, data: &mut dyn Read, len: u64) -> TierResult<Version> {
            let mut bytes = Vec::new();
            let mut piece = [0u8; 5000];
            loop {
                let n = data
                    .read(&mut piece)
                    .map_err(|e| self.err(key, e.to_string()))?;
                if n == 0 {
                    break;
                }
                bytes.extend_from_slice(&piece[..n]);
            }
            if bytes.len() as u64 != len {
                return Err(self.err(key, format!("{} bytes, not {len}", bytes.len())));
            }
            let version = self.next_version();
            self.objects
                .lock()
                .unwrap()
                .insert(key.into(), (bytes, version));
            Ok(Version(version.to_string()))
        }

        fn create(&self, key: &str, bytes: &[u8]) -> TierResult<Version> {
            let version = self.next_version();
            let mut objects = self.objects.lock().unwrap();
            if objects.contains_key(key) {
                return Err(TierError::Conflict {
                    tier: "mem".into(),
                    key: key.into(),
                });
            }
            objects.insert(key.into(), (bytes.to_vec(), version));
            Ok(Version(version.to_string()))
        }

        fn replace(&self, key: &str, bytes: &[u8], version: &Version) -> TierResult<Version> {
            let new = self.next_version();
            let mut objects = self.objects.lock().unwrap();
            match objects.get(key) {
                Some((_, v)) if v.to_string() == version.0 => {
                    objects.insert(key.into(), (bytes.to_vec(), new));
                    Ok(Version(new.to_string()))
                }
                _ => Err(TierError::Conflict {
                    tier: "mem".into(),
                    key: key.into(),
                }),
            }
        }

        fn delete(&self, key: &str) -> TierResult<()> {
            self.objects.lock().unwrap().remove(key);
            Ok(())
        }
    }

    /// A reader of `len` bytes of a repeating pattern, given out in small uneven pieces.
    struct Pattern {
        remaining: u64,
        offset: usize,
        calls: usize,
    }

    const PATTERN: &[u8] = b"The state of the heat equation at step 0042; ";

    impl Pattern {
        fn new(len: u64) -> Pattern {
            Pattern {
                remaining: len,
                offset: 0,
                calls: 0,
            }
        }
    }

    impl Read for Pattern {
        fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
            self.calls += 1;
            let piece = 1 + (self.calls * 311) % 3000;
            let n = (out.len().min(piece) as u64).min(self.remaining) as usize;
            for b in &mut out[..n] {
                *b = PATTERN[self.offset % PATTERN.len()];
                self.offset += 1;
            }
            self.remaining -= n as u64;
            Ok(n)
        }
    }

    fn pattern(len: usize) -> Vec<u8> {
        PATTERN.iter().copied().cycle().take(len).collect()
    }

    fn random_key() -> SealKey {
        let mut raw = [0u8; 32];
        fill_random(&mut raw).unwrap();
        SealKey::derive(&raw)
    }

    fn sealed(key: &SealKey) -> (Arc<MemTier>, Sealed) {
        let mem = MemTier::new(true);
        let tier = Sealed::new(Box::new(mem.clone()), key.clone());
        (mem, tier)
    }

    const KEY: &str = "heat-1/packs/0001-ab-000.pack";

    fn get(tier: &Sealed, key: &str) -> TierResult<Vec<u8>> {
        let mut out = Vec::new();
        tier.get(key, &mut out, u64::MAX).map(|_| out)
    }

    fn assert_damaged(result: TierResult<Vec<u8>>, what: &str) {
        match result {
            Err(TierError::Damaged { tier, key, .. }) => {
                assert_eq!(tier, "mem (sealed)");
                assert!(!key.is_empty());
            }
            other => panic!("{what}: {:?}", other.map(|v| v.len())),
        }
    }

    #[test]
    fn round_trips_every_size_around_segments_streaming() {
        let key = random_key();
        let (mem, tier) = sealed(&key);
        assert_eq!(tier.describe(), "mem (sealed)");
        for len in [
            0,
            1,
            SEGMENT - 1,
            SEGMENT,
            SEGMENT + 1,
            2 * SEGMENT,
            (1 << 20) + 7,
        ] {
            let version = tier
                .put(KEY, &mut Pattern::new(len as u64), len as u64)
                .unwrap();
            let raw = mem.raw(KEY);
            assert_eq!(raw.len() as u64, sealed_len(len as u64).unwrap(), "{len}");
            assert!(looks_sealed(&raw));
            let mut out = Vec::new();
            let got = tier.get(KEY, &mut out, len as u64).unwrap();
            assert_eq!(got, version);
            assert_eq!(out.len(), len);
            assert!(out == pattern(len), "content of {len} bytes differs");
            let listed = tier.list("heat-1/").unwrap();
            assert_eq!(listed.len(), 1);
            assert_eq!(listed[0].size, raw.len() as u64);
        }
        assert_eq!(sealed_len(0), Some(HEADER_LEN as u64 + TAG as u64));
        assert_eq!(
            sealed_len(SEGMENT as u64 + 1),
            Some(HEADER_LEN as u64 + SEGMENT as u64 + 1 + 2 * TAG as u64)
        );
    }

    #[test]
    fn stored_bytes_hold_no_run_of_the_content() {
        let key = random_key();
        let (mem, tier) = sealed(&key);
        let len = (1 << 20) + 7;
        tier.put(KEY, &mut Pattern::new(len), len).unwrap();
        let content = pattern(PATTERN.len() + 16);
        let windows: HashSet<&[u8]> = content.windows(16).collect();
        assert_eq!(windows.len(), PATTERN.len());
        let raw = mem.raw(KEY);
        let found = raw.windows(16).filter(|w| windows.contains(w)).count();
        assert_eq!(found, 0, "the sealed object holds runs of its content");
        // The same content sealed twice is two unrelated objects (a fresh nonce prefix).
        tier.put("other", &mut Pattern::new(len), len).unwrap();
        let other = mem.raw("other");
        let same = raw[HEADER_LEN..]
            .iter()
            .zip(&other[HEADER_LEN..])
            .filter(|(a, b)| a == b)
            .count();
        assert!(same < raw.len() / 100, "{same} equal bytes");
    }

    #[test]
    fn another_key_is_wrong_key_not_damage() {
        let (mem, tier) = sealed(&random_key());
        tier.put_bytes(KEY, b"content").unwrap();
        let other = Sealed::new(Box::new(mem.clone()), random_key());
        match get(&other, KEY) {
            Err(TierError::WrongKey { tier, key }) => {
                assert_eq!(tier, "mem (sealed)");
                assert_eq!(key, KEY);
            }
            other => panic!("{other:?}"),
        }
        // An object that was never sealed says so.
        mem.set_raw(
            "plain",
            b"a manifest in the clear, long enough for a header".to_vec(),
        );
        match get(&tier, "plain") {
            Err(TierError::Damaged { why, .. }) => assert!(why.contains("SVSEAL"), "{why}"),
            other => panic!("{other:?}"),
        }
    }

    /// Positions to damage in a sealed object of `len` bytes: every header byte, every
    /// 4099th byte, and around every segment's start and tag.
    fn damaged_positions(len: usize) -> Vec<usize> {
        let mut positions: Vec<usize> = (0..HEADER_LEN).collect();
        positions.extend((HEADER_LEN..len).step_by(4099));
        for boundary in (HEADER_LEN..len).step_by(SEALED_SEGMENT) {
            for p in [boundary, boundary + 1, boundary + SEGMENT - 1] {
                positions.extend((p..p + TAG + 1).filter(|&q| q < len));
            }
            positions.extend((boundary.saturating_sub(TAG)..boundary).filter(|&q| q >= HEADER_LEN));
        }
        positions.extend(len - TAG - 1..len);
        positions.sort_unstable();
        positions.dedup();
        positions
    }

    #[test]
    fn a_flipped_byte_anywhere_is_damage_and_nothing_unauthenticated_is_written() {
        let key = random_key();
        let (mem, tier) = sealed(&key);
        let len = 3 * SEGMENT + 1000;
        tier.put(KEY, &mut Pattern::new(len as u64), len as u64)
            .unwrap();
        let good = mem.raw(KEY);
        let positions = damaged_positions(good.len());
        assert!(positions.len() > 150, "{}", positions.len());
        for p in positions {
            let mut bad = good.clone();
            bad[p] ^= 0x20;
            mem.set_raw(KEY, bad);
            let mut out = Vec::new();
            let result = tier.get(KEY, &mut out, u64::MAX);
            let key_id = 8..8 + KEY_ID_LEN;
            match result {
                Err(TierError::WrongKey { .. }) if key_id.contains(&p) => {}
                Err(TierError::Damaged { .. }) if !key_id.contains(&p) => {}
                other => panic!("byte {p}: {other:?}"),
            }
            // Only segments before the damaged one reached `out`.
            let segment = p.saturating_sub(HEADER_LEN) / SEALED_SEGMENT;
            let allowed = if p < HEADER_LEN { 0 } else { segment * SEGMENT };
            assert!(
                out.len() <= allowed,
                "byte {p}: {} bytes written",
                out.len()
            );
            assert!(out == pattern(out.len()));
        }
    }

    #[test]
    fn truncated_extended_reordered_or_moved_objects_are_damage() {
        let key = random_key();
        let (mem, tier) = sealed(&key);
        for len in [0, 1, SEGMENT, 2 * SEGMENT + 5] {
            tier.put(KEY, &mut Pattern::new(len as u64), len as u64)
                .unwrap();
            let good = mem.raw(KEY);
            let mut cuts: Vec<usize> = (HEADER_LEN..good.len()).step_by(SEALED_SEGMENT).collect();
            cuts.extend([0, 1, HEADER_LEN - 1, HEADER_LEN + 1, good.len() - 1]);
            cuts.extend((0..good.len()).step_by(3001));
            for cut in cuts.into_iter().filter(|&c| c < good.len()) {
                mem.set_raw(KEY, good[..cut].to_vec());
                assert_damaged(get(&tier, KEY), &format!("{len} cut at {cut}"));
            }
            for extra in [&b"\0"[..], &[7u8; TAG], &good[HEADER_LEN..]] {
                let mut longer = good.clone();
                longer.extend_from_slice(extra);
                mem.set_raw(KEY, longer);
                assert_damaged(get(&tier, KEY), &format!("{len} + {}", extra.len()));
            }
            mem.set_raw("heat-1/packs/0002-cd-000.pack", good.clone());
            assert_damaged(get(&tier, "heat-1/packs/0002-cd-000.pack"), "moved");
            mem.set_raw(KEY, good);
            assert_eq!(get(&tier, KEY).unwrap(), pattern(len));
        }
        // Two segments swapped.
        let len = 3 * SEGMENT;
        tier.put(KEY, &mut Pattern::new(len as u64), len as u64)
            .unwrap();
        let good = mem.raw(KEY);
        let (a, b) = (HEADER_LEN, HEADER_LEN + SEALED_SEGMENT);
        let mut swapped = good.clone();
        swapped[a..b].copy_from_slice(&good[b..b + SEALED_SEGMENT]);
        swapped[b..b + SEALED_SEGMENT].copy_from_slice(&good[a..b]);
        mem.set_raw(KEY, swapped);
        assert_damaged(get(&tier, KEY), "swapped");
        // A segment of another object of the same key and key.
        tier.put(KEY, &mut Pattern::new(len as u64), len as u64)
            .unwrap();
        let mut spliced = mem.raw(KEY);
        spliced[b..b + SEALED_SEGMENT].copy_from_slice(&good[b..b + SEALED_SEGMENT]);
        mem.set_raw(KEY, spliced);
        assert_damaged(get(&tier, KEY), "spliced");
    }

    #[test]
    fn the_bound_is_on_the_content() {
        for checks_size in [true, false] {
            let mem = MemTier::new(checks_size);
            let tier = Sealed::new(Box::new(mem.clone()), random_key());
            for len in [0u64, 1000, SEGMENT as u64 + 3] {
                tier.put(KEY, &mut Pattern::new(len), len).unwrap();
                let (bytes, _) = tier.get_bytes(KEY, len).unwrap();
                assert_eq!(bytes.len() as u64, len);
                if len == 0 {
                    continue;
                }
                match tier.get_bytes(KEY, len - 1) {
                    Err(TierError::TooLarge { tier, key, max }) => {
                        assert_eq!(
                            (tier.as_str(), key.as_str(), max),
                            ("mem (sealed)", KEY, len - 1)
                        );
                    }
                    other => panic!("{checks_size} {len}: {other:?}"),
                }
            }
        }
    }

    #[test]
    fn short_content_fails_the_put() {
        let (mem, tier) = sealed(&random_key());
        match tier.put(KEY, &mut Pattern::new(100), 101) {
            Err(TierError::Unavailable { tier, why, .. }) => {
                assert_eq!(tier, "mem (sealed)");
                assert!(why.contains("100 of 101"), "{why}");
            }
            other => panic!("{other:?}"),
        }
        assert!(mem.list("").unwrap().is_empty());
    }

    #[test]
    fn create_and_replace_seal_and_keep_the_inner_versions() {
        let (mem, tier) = sealed(&random_key());
        let lease = "heat-1/lease";
        let v1 = tier.create(lease, b"holder node-a generation 1").unwrap();
        assert!(matches!(
            tier.create(lease, b"holder node-b generation 1"),
            Err(TierError::Conflict { .. })
        ));
        let raw = mem.raw(lease);
        assert!(looks_sealed(&raw));
        assert!(!raw.windows(6).any(|w| w == b"holder"));
        let v2 = tier
            .replace(lease, b"holder node-a generation 2", &v1)
            .unwrap();
        assert!(matches!(
            tier.replace(lease, b"holder node-b generation 2", &v1),
            Err(TierError::Conflict { .. })
        ));
        let (bytes, version) = tier.get_bytes(lease, 4096).unwrap();
        assert_eq!(bytes, b"holder node-a generation 2");
        assert_eq!(version, v2);
        tier.delete(lease).unwrap();
        assert!(matches!(
            tier.get_bytes(lease, 4096),
            Err(TierError::NotFound { .. })
        ));
    }

    fn write_key_file(dir: &Path, name: &str, text: &[u8], mode: u32) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        path
    }

    #[test]
    fn key_files_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let hex64 = "00112233445566778899aabbccddeeff00112233445566778899AABBCCDDEEFF";
        let a = write_key_file(dir.path(), "a", format!("{hex64}\n").as_bytes(), 0o600);
        let b = write_key_file(dir.path(), "b", hex64.as_bytes(), 0o400);
        let ka = SealKey::load(&a).unwrap();
        assert_eq!(ka.id(), SealKey::load(&b).unwrap().id());
        assert_eq!(ka.id_hex().len(), 16);
        assert!(!format!("{ka:?}").contains("0011"));

        let missing = dir.path().join("missing");
        assert!(
            matches!(SealKey::load(&missing), Err(KeyError::Missing { path }) if path == missing)
        );
        let open = write_key_file(dir.path(), "open", hex64.as_bytes(), 0o644);
        match SealKey::load(&open) {
            Err(e @ KeyError::Exposed { .. }) => {
                let msg = e.to_string();
                assert!(msg.contains("chmod 600") && msg.contains("0644"), "{msg}");
                assert!(msg.contains(&*open.to_string_lossy()), "{msg}");
            }
            other => panic!("{other:?}"),
        }
        let not_hex = write_key_file(
            dir.path(),
            "x",
            format!("{}zz\n", &hex64[..62]).as_bytes(),
            0o600,
        );
        assert!(matches!(
            SealKey::load(&not_hex),
            Err(KeyError::NotHex { .. })
        ));
        let spaced = write_key_file(dir.path(), "s", format!("{hex64}\n\n").as_bytes(), 0o600);
        assert!(matches!(
            SealKey::load(&spaced),
            Err(KeyError::NotHex { .. })
        ));
        let short = write_key_file(dir.path(), "short", &hex64.as_bytes()[..40], 0o600);
        assert!(matches!(
            SealKey::load(&short),
            Err(KeyError::WrongLength { digits: 40, .. })
        ));
        let long = write_key_file(dir.path(), "long", format!("{hex64}00").as_bytes(), 0o600);
        assert!(matches!(
            SealKey::load(&long),
            Err(KeyError::WrongLength { digits: 66, .. })
        ));
        let huge = write_key_file(dir.path(), "huge", &[b'a'; 5000], 0o600);
        assert!(matches!(
            SealKey::load(&huge),
            Err(KeyError::TooLarge { size: 5000, .. })
        ));
        assert!(matches!(
            SealKey::load(dir.path()),
            Err(KeyError::Unreadable { .. })
        ));
    }

    #[test]
    fn generate_writes_a_private_key_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("seal.key");
        let made = SealKey::generate(&path).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_eq!(meta.len(), 65);
        let loaded = SealKey::load(&path).unwrap();
        assert_eq!(made.id(), loaded.id());
        let text = std::fs::read(&path).unwrap();
        assert!(matches!(
            SealKey::generate(&path),
            Err(KeyError::Exists { .. })
        ));
        assert_eq!(
            std::fs::read(&path).unwrap(),
            text,
            "the key was overwritten"
        );
        // Nothing else left in the directory (no temporary copy of the secret).
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        // A dangling symlink is not followed nor replaced.
        let link = dir.path().join("link.key");
        std::os::unix::fs::symlink(dir.path().join("nowhere"), &link).unwrap();
        assert!(matches!(
            SealKey::generate(&link),
            Err(KeyError::Exists { .. })
        ));
        assert!(!dir.path().join("nowhere").exists());
        // Another key, another id, and it cannot read the first key's objects.
        let other = SealKey::generate(&dir.path().join("other.key")).unwrap();
        assert_ne!(other.id(), made.id());
        let mem = MemTier::new(true);
        Sealed::new(Box::new(mem.clone()), made)
            .put_bytes(KEY, b"x")
            .unwrap();
        assert!(matches!(
            get(&Sealed::new(Box::new(mem), other), KEY),
            Err(TierError::WrongKey { .. })
        ));
    }
}
