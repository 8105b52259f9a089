//! What a capture is: at the program's safe point the shim only copies what the snapshot needs
//! into reusable buffers (values, slices, the dirty chunks of tracked regions) and hands them
//! to a writer thread, which hashes, compresses and writes them durably while the program
//! computes on. This module holds the pieces every path shares: [`Capture`] (what the
//! program's snapshot closure adds entries to), the captured [`Item`]s and [`CaptureTask`],
//! and the page-aligned capture buffers. The paths themselves live in the submodules:
//!
//! - `copy`: copying regions at the safe point (whole, or their written chunks); beyond the
//!   capture memory budget, the writer reads them in place, part by part, while the program
//!   waits;
//! - `dirty`: which chunks of a region were written since its base, and protecting their
//!   pages again once the program goes on;
//! - `tracker`: the kernel's write tracking (userfaultfd and `PAGEMAP_SCAN`);
//! - `scan`: reading the written pages on a thread of its own while the program copies;
//! - `fork`: taking a snapshot in a forked copy-on-write process;
//! - `background`: the writer thread and what it reports back.

mod background;
mod copy;
mod dirty;
mod fork;
mod scan;
mod tracker;

pub(crate) use background::{Background, Work};
pub(crate) use scan::Scanner;
pub(crate) use tracker::DirtyTracker;

use std::collections::HashSet;
use std::fs::File;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, Sender};
use std::time::Instant;

use aligned_vec::{AVec, ConstAlign};
use serde::Serialize;

use supervise_store::error::{Error, Result};
use supervise_store::format::{
    ArrayShape, EntryKind, Origin, OutputMark, dtype_itemsize, element_of_dtype,
};
use supervise_store::name;
use supervise_store::writer::Element;

/// A capture buffer: page-aligned. Regions are page-aligned too, and a copy whose destination
/// sits a few bytes past its source modulo 4 KiB runs 3-6x slower on x86 (loads falsely wait
/// on the stores just before them: "4K aliasing"); malloc's large blocks start 16 bytes into
/// a page, exactly that case. Measured: 10 MiB of dirty chunks 3.8-6 ms unaligned, 1.0-1.3 ms
/// aligned.
pub(crate) type Buffer = AVec<u8, ConstAlign<4096>>;

/// An empty capture buffer (allocates nothing).
pub(crate) fn empty_buffer() -> Buffer {
    AVec::new(0)
}

/// Makes room for `len` bytes in `buf`, asking for transparent huge pages on large buffers:
/// freshly touched memory is slow to fault in page by page, and capture buffers are only ever
/// copied into whole (unlike regions, whose writes are tracked page by page).
pub(crate) fn reserve_capture(buf: &mut Buffer, len: usize) {
    buf.clear();
    if buf.capacity() < len {
        *buf = AVec::with_capacity(0, len);
        if len >= 4 << 20 {
            let start = buf.as_mut_ptr() as usize;
            let aligned = (start + 4095) & !4095;
            let end = (start + len) & !4095;
            if end > aligned {
                // SAFETY: advice on whole pages inside the buffer's own allocation; it changes
                // how the pages are backed, never their contents.
                unsafe {
                    libc::madvise(
                        aligned as *mut libc::c_void,
                        end - aligned,
                        libc::MADV_HUGEPAGE,
                    )
                };
            }
        }
    }
}

/// Appends `src` to `out` with stores that bypass the CPU's caches
/// ([`supervise_store::stream`]) when `out` has room for it, else as `extend_from_slice`
/// does; returns whether there was room. The copy is written here and read back later by the
/// writer (to store it, then to compare with the region), so filling the caches with it only
/// slows the program's pause: 10 MiB of scattered 64 KiB chunks copied into a buffer out of
/// cache took 0.58-0.96 ms with such stores and 0.80-1.21 ms with `memcpy` (12 rounds each,
/// side by side, on this VM kind). Whole-region copies keep `extend_from_slice`: glibc's
/// `memcpy` streams large copies itself.
pub(crate) fn append_streamed(out: &mut Buffer, src: &[u8]) -> bool {
    if out.capacity() - out.len() < src.len() {
        out.extend_from_slice(src);
        return false;
    }
    let len = out.len();
    // SAFETY: `len + src.len()` is within the capacity (checked), so the `src.len()` bytes
    // at `len` are in `out`'s allocation, which `src` cannot overlap (`out` is borrowed
    // mutably); `set_len` counts only bytes the copy has written, and the copy's fence
    // orders its stores before the buffer is handed to the writer thread.
    unsafe {
        supervise_store::stream::copy_raw(out.as_mut_ptr().add(len), src);
        out.set_len(len + src.len());
    }
    true
}

/// One entry of a captured snapshot, owned.
pub(crate) enum Item {
    /// All the bytes of an entry.
    Whole {
        name: String,
        kind: EntryKind,
        data: Buffer,
        shuffle: u8,
    },
    /// A region read in place, in a forked snapshot process (whose memory nothing else writes).
    Mapped {
        name: String,
        kind: EntryKind,
        addr: usize,
        len: usize,
        shuffle: u8,
    },
    /// The chunks of a region that changed since snapshot `base`, one after another.
    Delta {
        name: String,
        base: u64,
        dirty: Vec<usize>,
        data: Buffer,
        shuffle: u8,
    },
    /// A region given in parts while the writer stores them, because copying it at once
    /// would exceed the capture memory budget: all of it (`base` `None`), or its chunks written
    /// since snapshot `base`. The writer hands each copied part's buffer back through
    /// `returns`, says through `read` when it is done with a part read in place, and fails
    /// the snapshot unless the parts held exactly `chunks` chunks.
    Parts {
        name: String,
        kind: EntryKind,
        len: u64,
        base: Option<u64>,
        shuffle: u8,
        chunks: usize,
        parts: Receiver<Part>,
        returns: Sender<Buffer>,
        read: Sender<()>,
    },
}

/// Chunks of a region given in parts: their numbers, and their bytes.
pub(crate) struct Part {
    pub(crate) chunks: Vec<usize>,
    pub(crate) bytes: PartBytes,
}

/// Where the bytes of a [`Part`] are.
pub(crate) enum PartBytes {
    /// Copied, one chunk after another: the program may write the region again.
    Copied(Buffer),
    /// In the region itself, read there while the program waits at its safe point, until the
    /// writer says it is done with them.
    InPlace(Arc<crate::region::RegionMem>),
}

impl Item {
    fn into_buffer(self) -> Buffer {
        match self {
            Item::Whole { data, .. } | Item::Delta { data, .. } => data,
            Item::Mapped { .. } | Item::Parts { .. } => empty_buffer(),
        }
    }

    /// The bytes this item holds in its own buffer.
    pub(crate) fn held(&self) -> usize {
        match self {
            Item::Whole { data, .. } | Item::Delta { data, .. } => data.capacity(),
            Item::Mapped { .. } | Item::Parts { .. } => 0,
        }
    }
}

/// A captured snapshot on its way to the writer thread.
pub(crate) struct CaptureTask {
    pub(crate) tag: Option<String>,
    pub(crate) items: Vec<Item>,
    pub(crate) started: Instant,
    /// What produced the snapshot.
    pub(crate) origin: Option<Origin>,
    /// The program's output files at the safe point (their bytes written out).
    pub(crate) outputs: OutputsAt,
    /// A rank's part of an epoch: the snapshot's number.
    pub(crate) seq: Option<u64>,
    /// The shapes of the entries given as arrays (regions and [`Capture::array`]).
    pub(crate) arrays: Vec<ArrayShape>,
    /// The regions whose written pages the writer protects again, comparing them with the
    /// copies in `items`, once the snapshot is committed (or failed).
    pub(crate) reprotect: Vec<dirty::Reprotect>,
}

/// The output files at a safe point: their marks for the manifest, and the files to fsync
/// before it is committed.
#[derive(Default)]
pub(crate) struct OutputsAt {
    pub(crate) marks: Vec<OutputMark>,
    pub(crate) files: Vec<(PathBuf, Arc<File>)>,
}

/// What the program's snapshot closure adds entries to: typed values and slices, copied at
/// once into reusable buffers so the program can go on while they are written.
pub struct Capture<'a> {
    pub(crate) items: &'a mut Vec<Item>,
    pub(crate) buffers: &'a mut Vec<Buffer>,
    pub(crate) names: &'a mut HashSet<String>,
    pub(crate) arrays: &'a mut Vec<ArrayShape>,
}

impl Capture<'_> {
    fn claim(&mut self, name: &str) -> Result<()> {
        name::validate("entry", name)?;
        if !self.names.insert(name.to_owned()) {
            return Err(Error::DuplicateEntry {
                name: name.to_owned(),
            });
        }
        Ok(())
    }

    fn buffer(&mut self, len: usize) -> Buffer {
        let mut buf = self.buffers.pop().unwrap_or_else(empty_buffer);
        reserve_capture(&mut buf, len);
        buf
    }

    /// Copies `bytes` as entry `name` of `kind` (its name claimed already).
    fn whole(&mut self, name: &str, kind: EntryKind, bytes: &[u8], shuffle: u8) {
        let mut data = self.buffer(bytes.len());
        data.extend_from_slice(bytes);
        self.items.push(Item::Whole {
            name: name.to_owned(),
            kind,
            data,
            shuffle,
        });
    }

    /// Adds a typed value (serialized as JSON).
    pub fn value<T: Serialize + ?Sized>(&mut self, name: &str, value: &T) -> Result<()> {
        self.claim(name)?;
        let json = serde_json::to_vec(value).map_err(|source| Error::Serde {
            name: name.to_owned(),
            source,
        })?;
        if json.len() as u64 > supervise_store::format::MAX_VALUE_LEN {
            return Err(Error::ValueTooLarge {
                name: name.to_owned(),
                len: json.len() as u64,
                max: supervise_store::format::MAX_VALUE_LEN,
            });
        }
        self.whole(name, EntryKind::Value, &json, 0);
        Ok(())
    }

    /// Adds a slice, copied now (the copy is the program's whole pause for it).
    pub fn slice<T: Element>(&mut self, name: &str, slice: &[T]) -> Result<()> {
        self.claim(name)?;
        let size = std::mem::size_of::<T>();
        let kind = EntryKind::Slice {
            elem: T::NAME.to_owned(),
            elem_size: size as u32,
        };
        self.whole(name, kind, bytemuck::cast_slice(slice), size as u8);
        Ok(())
    }

    /// Adds an array of `shape` (C order, outermost first), copied now: a slice whose
    /// snapshot records the shape (see [`crate::Shim::array`]). The product of the dimensions
    /// must be `data.len()`.
    pub fn array<T: Element>(&mut self, name: &str, data: &[T], shape: &[usize]) -> Result<()> {
        let shape = shape_of(name, shape)?;
        let itemsize = std::mem::size_of::<T>() as u64;
        check_bytes(name, &shape, itemsize, std::mem::size_of_val(data))?;
        self.slice(name, data)?;
        self.arrays.push(ArrayShape {
            entry: name.to_owned(),
            shape,
            dtype: None,
        });
        Ok(())
    }

    /// Adds an array of `shape` whose elements have numpy type `dtype` (e.g. `"<f8"`,
    /// `"<c16"`, `"|b1"`: a byte order, a kind letter and the size in bytes), given as its
    /// bytes in C order; its snapshot records the shape and type. The numpy type of an element
    /// type the store has ([`Element`], `"<f8"` is `f64`) is stored as that type (shuffled
    /// by its size before compression, as [`array`](Self::array) does); any other as bytes.
    pub fn array_bytes(
        &mut self,
        name: &str,
        bytes: &[u8],
        shape: &[usize],
        dtype: &str,
    ) -> Result<()> {
        let shape = shape_of(name, shape)?;
        let itemsize = dtype_itemsize(dtype).ok_or_else(|| Error::BadArray {
            name: name.to_owned(),
            why: format!(
                "{dtype:?} is not a plain numpy type (a byte order, a kind letter, a size: \
                 \"<f8\"); structured and object arrays are not stored"
            ),
        })?;
        check_bytes(name, &shape, itemsize, bytes.len())?;
        let typed = element_of_dtype(dtype);
        match typed {
            Some((elem, size)) => {
                self.claim(name)?;
                let kind = EntryKind::Slice {
                    elem: elem.to_owned(),
                    elem_size: size,
                };
                self.whole(name, kind, bytes, size as u8);
            }
            None => self.raw(name, bytes)?,
        }
        self.arrays.push(ArrayShape {
            entry: name.to_owned(),
            shape,
            dtype: typed.is_none().then(|| dtype.to_owned()),
        });
        Ok(())
    }

    /// Adds untyped bytes (the C ABI's regions), stored as a `u8` slice. Lengths that are a
    /// multiple of 8 are byte-shuffled as 8-byte elements before compression: C simulation
    /// state is mostly `double`, and shuffling only changes how well a chunk compresses.
    pub fn raw(&mut self, name: &str, bytes: &[u8]) -> Result<()> {
        self.claim(name)?;
        let kind = EntryKind::Slice {
            elem: "u8".to_owned(),
            elem_size: 1,
        };
        let shuffle = if bytes.len().is_multiple_of(8) { 8 } else { 0 };
        self.whole(name, kind, bytes, shuffle);
        Ok(())
    }
}

/// A shape as the manifest records it: at most [`MAX_ARRAY_DIMS`] dimensions.
///
/// [`MAX_ARRAY_DIMS`]: supervise_store::format::MAX_ARRAY_DIMS
pub(crate) fn shape_of(name: &str, shape: &[usize]) -> Result<Vec<u64>> {
    let max = supervise_store::format::MAX_ARRAY_DIMS;
    if shape.len() > max {
        return Err(Error::BadArray {
            name: name.to_owned(),
            why: format!("{} dimensions (at most {max})", shape.len()),
        });
    }
    Ok(shape.iter().map(|&d| d as u64).collect())
}

/// Checks that `shape` of `itemsize`-byte elements is `len` bytes.
fn check_bytes(name: &str, shape: &[u64], itemsize: u64, len: usize) -> Result<()> {
    let bytes = shape.iter().try_fold(itemsize, |n, &d| n.checked_mul(d));
    if bytes != Some(len as u64) {
        return Err(Error::BadArray {
            name: name.to_owned(),
            why: format!(
                "shape {shape:?} of {itemsize}-byte elements does not fit its {len} bytes of data"
            ),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streamed_appends_give_exactly_the_bytes_and_stream_only_into_room() {
        let src: Vec<u8> = (0..200_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        // (room, lengths appended in turn): whole chunks, then a short tail; a short append
        // that leaves the end off a line, then more; appends past the room (the buffer grows).
        let cases: [(usize, &[usize]); 3] = [
            (70_000, &[65_536, 4096, 100, 64, 1000]),
            (70_000, &[7, 64, 1000, 65_536, 3000, 1000]),
            (65_536, &[65_536, 64, 70_000]),
        ];
        for (room, appends) in cases {
            let mut out = empty_buffer();
            reserve_capture(&mut out, room);
            let mut want = Vec::new();
            let mut at = 0;
            for &len in appends {
                let fits = out.capacity() - out.len() >= len;
                let got = append_streamed(&mut out, &src[at..at + len]);
                want.extend_from_slice(&src[at..at + len]);
                assert_eq!(got, fits, "{room} {len}");
                assert_eq!(out.as_slice(), want.as_slice(), "{room} {len}");
                at += len;
            }
            assert!(
                out.capacity() > room,
                "the last append of each case has no room"
            );
        }
        // A missing fence cannot be seen from one thread; the writer thread reads only after
        // the buffer is handed over through a channel.
    }
}
