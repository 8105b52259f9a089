//! Scanning a pack file record by record without a manifest (a pack is self-describing): each
//! record's header is checked, its stored bytes decoded and verified against its hash. The
//! scan stops with [`Error::Corrupt`] at the first bad record; memory is bounded by one chunk
//! ([`MAX_CHUNK_LEN`]), whatever the file says.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::codec::Decoder;
use crate::error::{Error, Result, io_err};
use crate::format::{self, ChunkRef, HEADER_LEN, MAX_CHUNK_LEN, PACK_MAGIC, RecordHeader};

/// Something a pack can be read from at an offset: a [`File`], or bytes in memory.
pub trait PackSource {
    /// Its length in bytes.
    fn source_len(&self) -> io::Result<u64>;
    /// Fills `buf` from `offset` (an error if the source ends first).
    fn read_at_exact(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
}

impl PackSource for File {
    fn source_len(&self) -> io::Result<u64> {
        Ok(self.metadata()?.len())
    }

    fn read_at_exact(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.read_exact_at(buf, offset)
    }
}

impl PackSource for [u8] {
    fn source_len(&self) -> io::Result<u64> {
        Ok(self.len() as u64)
    }

    fn read_at_exact(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let range = usize::try_from(offset)
            .ok()
            .and_then(|start| Some(start..start.checked_add(buf.len())?))
            .and_then(|range| self.get(range))
            .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
        buf.copy_from_slice(range);
        Ok(())
    }
}

/// One record found by a scan.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Scanned {
    /// Offset of the record's header in the pack.
    pub offset: u64,
    /// The record's header (checked; its chunk decoded and verified).
    pub header: RecordHeader,
}

/// Iterates over the records of a pack, in file order: `Ok` for each verified record, then
/// `None` at the end of the file, or one `Err` at the first bad record and `None` after it.
/// After an `Ok`, [`PackScanner::stored`] and [`PackScanner::raw`] hold that record's bytes.
pub struct PackScanner<'a, R: PackSource + ?Sized> {
    src: &'a R,
    path: PathBuf,
    len: u64,
    next: u64,
    done: bool,
    decoder: Decoder,
    stored: Vec<u8>,
    raw: Vec<u8>,
}

impl<'a, R: PackSource + ?Sized> PackScanner<'a, R> {
    /// Starts a scan of `src` (the pack at `path`, named in errors): checks the file header.
    pub fn new(src: &'a R, path: &Path) -> Result<Self> {
        let len = src.source_len().map_err(io_err("stat", path))?;
        let mut header = [0u8; HEADER_LEN];
        if len >= HEADER_LEN as u64 {
            src.read_at_exact(&mut header, 0)
                .map_err(io_err("read", path))?;
        }
        format::check_header(&header, PACK_MAGIC, "pack", path)?;
        Ok(Self {
            src,
            path: path.to_owned(),
            len,
            next: HEADER_LEN as u64,
            done: false,
            decoder: Decoder::new().map_err(io_err("create decompressor", path))?,
            stored: Vec::new(),
            raw: Vec::new(),
        })
    }

    /// The stored bytes (after the header) of the record last returned.
    pub fn stored(&self) -> &[u8] {
        &self.stored
    }

    /// The raw (decoded, verified) chunk of the record last returned.
    pub fn raw(&self) -> &[u8] {
        &self.raw
    }

    fn corrupt(&self, offset: u64, why: &str) -> Error {
        Error::Corrupt {
            path: self.path.clone(),
            why: format!("record at offset {offset}: {why}"),
        }
    }

    fn read_record(&mut self) -> Result<Scanned> {
        let offset = self.next;
        if self.len - offset < RecordHeader::LEN as u64 {
            return Err(self.corrupt(offset, "truncated record header"));
        }
        let mut bytes = [0u8; RecordHeader::LEN];
        self.src
            .read_at_exact(&mut bytes, offset)
            .map_err(io_err("read", &self.path))?;
        let header = RecordHeader::decode(&bytes, &self.path)
            .map_err(|e| self.corrupt(offset, &e.to_string()))?;
        let end = RecordHeader::end(offset, header.stored_len)
            .filter(|end| *end <= self.len)
            .ok_or_else(|| self.corrupt(offset, "truncated record"))?;
        // RecordHeader::decode bounds both lengths by MAX_CHUNK_LEN.
        debug_assert!(header.stored_len <= MAX_CHUNK_LEN && header.raw_len <= MAX_CHUNK_LEN);
        self.stored.resize(header.stored_len as usize, 0);
        self.src
            .read_at_exact(&mut self.stored, offset + RecordHeader::LEN as u64)
            .map_err(io_err("read", &self.path))?;
        self.raw.resize(header.raw_len as usize, 0);
        self.decoder
            .decode(&header, &self.stored, &mut self.raw, &self.path)
            .map_err(|e| self.corrupt(offset, &e.to_string()))?;
        self.next = end;
        Ok(Scanned { offset, header })
    }
}

impl<R: PackSource + ?Sized> Iterator for PackScanner<'_, R> {
    type Item = Result<Scanned>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done || self.next >= self.len {
            return None;
        }
        let result = self.read_record();
        self.done = result.is_err();
        Some(result)
    }
}

/// Reads the single records a manifest points at and verifies each: the record must be the
/// chunk the manifest names (hash and lengths), and its bytes must decode to that chunk.
pub struct RecordReader {
    decoder: Decoder,
    buf: Vec<u8>,
}

impl RecordReader {
    /// A reader with its own decompressor (`path` is named if one cannot be made).
    pub fn new(path: &Path) -> Result<Self> {
        Ok(Self {
            decoder: Decoder::new().map_err(io_err("create decompressor", path))?,
            buf: Vec::new(),
        })
    }

    /// Reads the record of `chunk` from `file` (the pack at `path`) and decodes it into `out`
    /// (exactly `chunk.raw_len` bytes), verified. A pack that ends first is an [`Error::Io`]
    /// whose source is `UnexpectedEof`; anything else wrong is [`Error::Corrupt`].
    pub fn read(
        &mut self,
        file: &File,
        path: &Path,
        chunk: &ChunkRef,
        out: &mut [u8],
    ) -> Result<()> {
        if chunk.stored_len > MAX_CHUNK_LEN {
            return Err(Error::Corrupt {
                path: path.to_owned(),
                why: format!("record at offset {} is too long", chunk.offset),
            });
        }
        let mut buf = std::mem::take(&mut self.buf);
        buf.resize(RecordHeader::LEN + chunk.stored_len as usize, 0);
        let result = file
            .read_exact_at(&mut buf, chunk.offset)
            .map_err(io_err("read", path))
            .and_then(|()| self.decode(&buf, path, chunk, out));
        self.buf = buf;
        result
    }

    /// Decodes `record` (the record of `chunk` read from the pack at `path`: its header and
    /// exactly its stored bytes) into `out` (exactly `chunk.raw_len` bytes), verified. Anything
    /// wrong is [`Error::Corrupt`].
    pub fn decode(
        &mut self,
        record: &[u8],
        path: &Path,
        chunk: &ChunkRef,
        out: &mut [u8],
    ) -> Result<()> {
        let header = RecordHeader::decode(record, path)?;
        if header.hash != chunk.hash
            || header.stored_len != chunk.stored_len
            || header.raw_len != chunk.raw_len
        {
            return Err(Error::Corrupt {
                path: path.to_owned(),
                why: format!(
                    "record at offset {} is not the chunk the snapshot names",
                    chunk.offset
                ),
            });
        }
        let stored = record.get(RecordHeader::LEN..).unwrap_or_default();
        self.decoder.decode(&header, stored, out, path)
    }
}

/// Scans a whole pack held in memory: every record, or the first damage.
pub fn scan_pack(bytes: &[u8], path: &Path) -> Result<Vec<Scanned>> {
    PackScanner::new(bytes, path)?.collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::Encoder;
    use crate::format::{Codec, file_header};

    /// A pack of records of each codec and shuffle width; returns it and its records' offsets.
    fn sample_pack() -> (Vec<u8>, Vec<u64>) {
        let mut enc = Encoder::new().unwrap();
        let mut pack = file_header(PACK_MAGIC).to_vec();
        let mut offsets = Vec::new();
        let smooth: Vec<f64> = (0..512).map(|i| (i as f64 * 1e-3).sin()).collect();
        let smooth: &[u8] = bytemuck::cast_slice(&smooth);
        let mut x = 0x2545_F491_4F6C_DD1Du64;
        let noise: Vec<u8> = (0..1024)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 32) as u8
            })
            .collect();
        for (raw, width) in [
            (smooth, 8),
            (smooth, 4),
            (smooth, 2),
            (smooth, 0),
            (&noise[..], 0),
        ] {
            let e = enc
                .encode(raw, *blake3::hash(raw).as_bytes(), width)
                .unwrap();
            offsets.push(pack.len() as u64);
            pack.extend_from_slice(&e.header.encode());
            pack.extend_from_slice(&e.data);
        }
        (pack, offsets)
    }

    #[test]
    fn scans_every_record_and_verifies_it() {
        let (pack, offsets) = sample_pack();
        let found = scan_pack(&pack, Path::new("p")).unwrap();
        let at: Vec<u64> = found.iter().map(|s| s.offset).collect();
        assert_eq!(at, offsets);
        assert_eq!(found[4].header.codec, Codec::Raw);
        assert_eq!(found[0].header.shuffle, 8);
    }

    #[test]
    fn every_truncation_and_flipped_byte_is_found() {
        let (pack, offsets) = sample_pack();
        for len in 0..pack.len() {
            match scan_pack(&pack[..len], Path::new("p")) {
                // Cut at a record boundary: the records before it, nothing more.
                Ok(found) => assert!(
                    offsets.contains(&(len as u64)) || len == HEADER_LEN,
                    "cut at {len}: {found:?}"
                ),
                Err(e) => assert!(
                    matches!(e, Error::Corrupt { .. } | Error::UnsupportedVersion { .. }),
                    "cut at {len}: {e}"
                ),
            }
        }
        for i in 0..pack.len() {
            let mut bad = pack.clone();
            bad[i] ^= 0x21;
            let reserved = offsets
                .iter()
                .any(|o| (o + 42..o + 44).contains(&(i as u64)));
            match scan_pack(&bad, Path::new("p")) {
                Ok(_) => assert!(reserved, "flipped byte {i} not found"),
                Err(e) => assert!(
                    matches!(e, Error::Corrupt { .. } | Error::UnsupportedVersion { .. }),
                    "byte {i}: {e}"
                ),
            }
        }
    }
}
