//! Registered memory regions: page-aligned anonymous mappings that the shim allocates, restores
//! at start, tracks for writes, and captures at every snapshot without the program listing
//! them. The program uses a [`Region`] as a slice.

use std::marker::PhantomData;
use std::ops::{Deref, DerefMut};
use std::sync::Arc;

use supervise_store::error::{Error, Result};
use supervise_store::format::{ArrayShape, EntryKind};
use supervise_store::writer::Element;

/// Regions at least this large are mapped 2 MiB-aligned with transparent huge pages: fork,
/// whole copies, hashing and restore all run faster on huge pages (one translation per
/// 2 MiB), and dirty tracking stays exact: with asynchronous write-protect the kernel splits
/// a huge page on its first write and records the written 4 KiB pages (checked on Linux 6.18).
const HUGE_ABOVE: usize = 4 << 20;
const HUGE_PAGE: usize = 2 << 20;

/// The mapping behind a region.
pub(crate) struct RegionMem {
    addr: usize,
    /// Bytes of the region's part of the mapping (a whole number of pages, at least one).
    pub(crate) mapped: usize,
    /// The whole mapping (with the slack used for alignment), for munmap.
    base: usize,
    base_len: usize,
    /// Bytes in use (the entry's length).
    pub(crate) bytes: usize,
    pub(crate) name: String,
    pub(crate) kind: EntryKind,
    pub(crate) shuffle: u8,
    /// The shape the program gave it (see [`crate::Shim::array`]), recorded in each snapshot.
    pub(crate) shape: Option<Vec<u64>>,
}

// SAFETY: RegionMem owns a private anonymous mapping that lives as long as it does, with no
// thread affinity; the program's writes go through `Region` (one owner, `&mut`).
unsafe impl Send for RegionMem {}
// SAFETY: shared references only read the mapping: at the program's safe points (inside
// `Shim::snapshot`), and, after one, in `differs` (volatile word reads that may race with the
// program's writes; what they see only decides whether a chunk is taken again). Rust code
// cannot write it during a safe point (`Region` needs `&mut`), but the C ABI
// allows other threads to write `sv_alloc` memory during `sv_checkpoint` (see its header): such
// a write races with the copy (a data race outside Rust's model, on plain bytes), and the
// copy of that page may mix old and new bytes. The page is then taken again by the next
// snapshot (dirty tracking marks it written; without tracking every capture copies it whole).
unsafe impl Sync for RegionMem {}

impl RegionMem {
    pub(crate) fn new(
        name: &str,
        kind: EntryKind,
        bytes: usize,
        shuffle: u8,
        shape: Option<Vec<u64>>,
    ) -> Result<Arc<Self>> {
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        let mapped = bytes.div_ceil(page).max(1) * page;
        let huge = bytes >= HUGE_ABOVE;
        let base_len = if huge { mapped + HUGE_PAGE } else { mapped };
        // SAFETY: a new private anonymous mapping with no address hint; checked for failure.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                base_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(Error::Io {
                op: "map memory for region",
                path: name.into(),
                source: std::io::Error::last_os_error(),
            });
        }
        let base = ptr as usize;
        let addr = if huge {
            (base + HUGE_PAGE - 1) & !(HUGE_PAGE - 1)
        } else {
            base
        };
        if huge {
            // SAFETY: advice on pages of the mapping just made; changes backing, not contents.
            unsafe { libc::madvise(addr as *mut libc::c_void, mapped, libc::MADV_HUGEPAGE) };
        }
        Ok(Arc::new(Self {
            addr,
            base,
            base_len,
            mapped,
            bytes,
            name: name.to_owned(),
            kind,
            shuffle,
            shape,
        }))
    }

    /// The shape recorded in a snapshot for this region, if the program gave one.
    pub(crate) fn array_shape(&self) -> Option<ArrayShape> {
        self.shape.as_ref().map(|shape| ArrayShape {
            entry: self.name.clone(),
            shape: shape.clone(),
            dtype: None,
        })
    }

    /// Start address of the mapping.
    pub(crate) fn addr(&self) -> usize {
        self.addr
    }

    /// The region's bytes.
    pub(crate) fn bytes(&self) -> &[u8] {
        // SAFETY: the mapping is `mapped >= bytes` long and lives as long as `self`.
        unsafe { std::slice::from_raw_parts(self.addr as *const u8, self.bytes) }
    }

    /// Whether the region's bytes from `at` differ from `copy`, read while the program may be
    /// writing them (after it went on from a safe point). A word read as a write lands is
    /// either value: it can only make bytes look changed, or look unchanged when the write
    /// came after their protection, which the tracker records anyway.
    pub(crate) fn differs(&self, at: usize, copy: &[u8]) -> bool {
        assert!(
            at.checked_add(copy.len())
                .is_some_and(|end| end <= self.bytes)
        );
        let words = copy.len() / 8;
        let base = self.addr + at;
        for (i, want) in copy.chunks_exact(8).enumerate() {
            // SAFETY: inside the mapping (checked above), which lives as long as `self`; the
            // read is volatile because another thread may write the word at the same time.
            let got = unsafe { std::ptr::read_volatile((base + i * 8) as *const [u8; 8]) };
            if got != want {
                return true;
            }
        }
        (words * 8..copy.len()).any(|i| {
            // SAFETY: as above, one byte.
            unsafe { std::ptr::read_volatile((base + i) as *const u8) != copy[i] }
        })
    }

    /// Copies the bytes into `dest` (exactly as long) and gives each piece of the mapping
    /// back to the system once copied: a staged restore entry being loaded into the program's
    /// own memory (it reads as zeros afterwards).
    pub(crate) fn copy_out(&mut self, dest: &mut [u8]) {
        const PIECE: usize = 64 << 20;
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        let mut at = 0;
        while at < dest.len().min(self.bytes) {
            let end = (at + PIECE).min(dest.len()).min(self.bytes);
            dest[at..end].copy_from_slice(&self.bytes()[at..end]);
            // Whole pages of what was copied (the last piece: to the mapping's end).
            let start = self.addr + at;
            let stop = if end == self.bytes {
                self.addr + self.mapped
            } else {
                (self.addr + end) / page * page
            };
            if stop > start {
                // SAFETY: whole pages inside this value's own mapping; `&mut self` means no
                // reference into it is alive, and nothing reads those bytes again.
                unsafe {
                    libc::madvise(
                        start as *mut libc::c_void,
                        stop - start,
                        libc::MADV_DONTNEED,
                    )
                };
            }
            at = end;
        }
    }

    /// The region's bytes, to fill them at restore (before the program has the region).
    #[allow(clippy::mut_from_ref)]
    pub(crate) fn bytes_mut_unshared(&self) -> &mut [u8] {
        // SAFETY: called only while the region is being created, before any `Region` handle
        // or other reference to the mapping exists.
        unsafe { std::slice::from_raw_parts_mut(self.addr as *mut u8, self.bytes) }
    }
}

impl Drop for RegionMem {
    fn drop(&mut self) {
        // SAFETY: unmapping the mapping this value owns; no reference to it outlives `self`.
        unsafe { libc::munmap(self.base as *mut libc::c_void, self.base_len) };
    }
}

/// A registered region of `len` elements of `T`, used as a slice. It is in every snapshot
/// until dropped, restored at start when the snapshot has it, and, where the kernel allows,
/// only the parts written since the last snapshot are copied and stored.
pub struct Region<T: Element> {
    mem: Arc<RegionMem>,
    len: usize,
    _elem: PhantomData<T>,
}

impl<T: Element> Region<T> {
    pub(crate) fn new(mem: Arc<RegionMem>, len: usize) -> Self {
        Self {
            mem,
            len,
            _elem: PhantomData,
        }
    }

    /// The entry name.
    pub fn name(&self) -> &str {
        &self.mem.name
    }
}

impl<T: Element> Deref for Region<T> {
    type Target = [T];

    fn deref(&self) -> &[T] {
        // SAFETY: the mapping is page-aligned (so aligned for T), holds `len` elements, is
        // zero-initialised or restored (valid for a Pod T), and lives as long as `self.mem`.
        unsafe { std::slice::from_raw_parts(self.mem.addr() as *const T, self.len) }
    }
}

impl<T: Element> DerefMut for Region<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        // SAFETY: as for `deref`; `&mut self` makes this the only handle writing through Rust
        // references (the shim reads the mapping only inside `Shim::snapshot`).
        unsafe { std::slice::from_raw_parts_mut(self.mem.addr() as *mut T, self.len) }
    }
}

#[cfg(test)]
mod tests {
    use super::RegionMem;
    use supervise_store::format::EntryKind;

    #[test]
    fn copy_out_copies_every_piece_and_gives_the_pages_back() {
        // Two whole pieces of 64 MiB and a short one, with a length that is no whole page.
        let len = (128 << 20) + 12_345;
        let kind = EntryKind::Slice {
            elem: "u8".into(),
            elem_size: 1,
        };
        let mut mem = RegionMem::new("staged", kind, len, 1, None).unwrap();
        for (i, b) in mem.bytes_mut_unshared().iter_mut().enumerate() {
            *b = (i % 251) as u8;
        }
        let mut dest = vec![0u8; len];
        std::sync::Arc::get_mut(&mut mem)
            .unwrap()
            .copy_out(&mut dest);
        assert!(dest.iter().enumerate().all(|(i, &b)| b == (i % 251) as u8));
        // Given back: the mapping reads as zeros now.
        assert!(mem.bytes().iter().all(|&b| b == 0));
    }
}
