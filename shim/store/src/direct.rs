//! `O_DIRECT` I/O, which moves a file's bytes between the disk and our memory without the
//! page cache: the aligned buffers it needs, reopening an open file for direct reads, and
//! turning it off where a filesystem refuses it.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;

/// Alignment O_DIRECT needs of buffers, offsets and lengths (a multiple of any common
/// device's logical block size).
pub(crate) const DIRECT_ALIGN: usize = 4096;

/// A buffer of memory of its own, aligned for O_DIRECT, and asked to be backed by huge pages
/// where it is 2 MiB or more (they are used when transparent huge pages are enabled, as they
/// are by default): a direct request is cut into pieces of at most `max_segments` (often 128
/// to 254) physically contiguous runs, so from 4 KiB pages an 8 MiB read is eight or more
/// requests (8 MiB reads took 0.35-0.42 s for 650 MiB of packs from 4 KiB pages, 0.30-0.31 s
/// from huge pages). Its pages are zero until written, and the kernel provides them on first
/// write (a `Vec` filled element by element made a small state's snapshot 25x slower in a
/// test build). A process forked meanwhile does not get it (`MADV_DONTFORK`).
pub(crate) struct AlignedBuf {
    /// The mapping: `len` bytes from `base`, ours alone, of which the first `cap` are used.
    base: std::ptr::NonNull<u8>,
    len: usize,
    cap: usize,
}

// SAFETY: an `AlignedBuf` owns its mapping; no other value points into it.
unsafe impl Send for AlignedBuf {}

/// Huge page size on the machines we run on.
const HUGE: usize = 2 << 20;

impl AlignedBuf {
    /// A buffer of `cap` usable bytes, all zero.
    pub(crate) fn new(cap: usize) -> std::io::Result<Self> {
        let huge = cap >= HUGE;
        let len = cap.max(1).next_multiple_of(DIRECT_ALIGN);
        // Room to start at a huge page boundary; the rest is unmapped below.
        let map_len = if huge { len + HUGE } else { len };
        // SAFETY: a new private anonymous mapping; no existing memory is touched.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let addr = ptr as usize;
        let head = if huge { (HUGE - addr % HUGE) % HUGE } else { 0 };
        let tail = map_len - head - len;
        // SAFETY: both ranges are whole pages of the mapping just made (`addr` and `len` are
        // page multiples, and `head` is a page multiple below `HUGE`), outside `[addr + head,
        // addr + head + len)`, and nothing points into them.
        unsafe {
            if head > 0 {
                libc::munmap(ptr, head);
            }
            if tail > 0 {
                libc::munmap((addr + head + len) as *mut libc::c_void, tail);
            }
        }
        let start = (addr + head) as *mut libc::c_void;
        // SAFETY: advice on our own mapping, which changes how its pages are backed and
        // whether a child process gets them, not what they hold; a buffer whose advice is
        // refused works the same, only in smaller pieces.
        unsafe {
            if huge {
                libc::madvise(start, len, libc::MADV_HUGEPAGE);
            }
            libc::madvise(start, len, libc::MADV_DONTFORK);
        }
        let base = std::ptr::NonNull::new(start.cast::<u8>())
            .ok_or_else(|| std::io::Error::other("mmap gave a null address"))?;
        Ok(Self { base, len, cap })
    }

    /// Its usable bytes.
    pub(crate) fn bytes(&self) -> &[u8] {
        // SAFETY: `cap <= len`, the mapping lives as long as `self` and holds initialized
        // bytes (zero until written); `&self` excludes writers.
        unsafe { std::slice::from_raw_parts(self.base.as_ptr(), self.cap) }
    }

    /// Its usable bytes, to fill.
    pub(crate) fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `bytes`, and `&mut self` makes this the only reference.
        unsafe { std::slice::from_raw_parts_mut(self.base.as_ptr(), self.cap) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: unmaps the mapping this buffer owns; no reference into it outlives `self`.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
    }
}

/// The open file `file` opened again for direct reads, or `None` where that cannot be done
/// (no `/proc`, or a filesystem without O_DIRECT). It is the same open file reached through
/// its `/proc/self/fd` link, not its path looked up again, so no symlink can be put in its
/// place.
pub(crate) fn reopen_direct(file: &File) -> Option<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT | libc::O_CLOEXEC)
        .open(format!("/proc/self/fd/{}", file.as_raw_fd()))
        .ok()
}

/// Reads into `buf` from `offset` with a file opened for direct I/O, until at least `need`
/// bytes are in or the file ends; returns the bytes read. `EINVAL` means the filesystem
/// refuses this direct read (a larger alignment, or no O_DIRECT at all).
pub(crate) fn read_direct(
    file: &File,
    buf: &mut [u8],
    offset: u64,
    need: usize,
) -> std::io::Result<usize> {
    use std::os::unix::fs::FileExt;
    let mut got = 0;
    // A read that ends off the alignment has reached the end of the file.
    while got < need && got % DIRECT_ALIGN == 0 {
        match file.read_at(&mut buf[got..], offset + got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// Turns O_DIRECT off on an open file (its filesystem refused a direct write).
pub(crate) fn stop_direct(file: &File) -> std::io::Result<()> {
    let fd = file.as_raw_fd();
    // SAFETY: fcntl F_GETFL/F_SETFL on a descriptor the caller owns; integers only.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags < 0 || libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_DIRECT) < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn a_direct_read_gives_the_bytes_and_stops_at_the_end_of_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let data: Vec<u8> = (0..3 * DIRECT_ALIGN + 100)
            .map(|i| (i * 31) as u8)
            .collect();
        File::create(&path).unwrap().write_all(&data).unwrap();
        let file = File::open(&path).unwrap();
        // Where this filesystem has no O_DIRECT (tmpfs before Linux 6.6), nothing to test.
        let Some(direct) = reopen_direct(&file) else {
            return;
        };
        let mut buf = AlignedBuf::new(8 * DIRECT_ALIGN).unwrap();
        assert_eq!(buf.bytes().as_ptr().align_offset(DIRECT_ALIGN), 0);
        let got = read_direct(&direct, buf.bytes_mut(), DIRECT_ALIGN as u64, usize::MAX).unwrap();
        assert_eq!(got, data.len() - DIRECT_ALIGN);
        assert_eq!(&buf.bytes()[..got], &data[DIRECT_ALIGN..]);
        // An offset not aligned: refused with EINVAL (the readers then read buffered), or
        // served right by a filesystem that allows it.
        match read_direct(&direct, &mut buf.bytes_mut()[..DIRECT_ALIGN], 1, 1) {
            Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EINVAL), "{e}"),
            Ok(n) => assert_eq!(&buf.bytes()[..n], &data[1..1 + n]),
        }
    }
}
