//! Turning a raw chunk into stored bytes and back: optional byte-shuffle (for numeric slices:
//! byte k of every element is grouped together, which makes smooth floating-point fields
//! compressible), zstd, and "store raw" when compression does not pay.

use std::path::Path;

use crate::error::{Error, Result};
use crate::format::{Codec, RecordHeader};

/// zstd level for chunks that are not byte-shuffled (bytes, values).
pub const ZSTD_LEVEL: i32 = 1;
/// zstd level for byte-shuffled numeric chunks: after the shuffle, level -1 compresses a smooth
/// f64 field as well as level 1 (1.542 vs 1.541) about 1.5 times faster (measured here).
pub const ZSTD_LEVEL_SHUFFLED: i32 = -1;

/// Groups byte `j` of every `width`-byte element together: out = plane 0, plane 1, ...
/// A tail shorter than one element is copied as is.
pub fn shuffle(input: &[u8], width: usize, out: &mut Vec<u8>) {
    out.clear();
    out.resize(input.len(), 0);
    let width = width.max(1);
    let n = input.len() / width;
    let done = match width {
        8 => {
            let from = simd::shuffle::<8>(input, out, n);
            shuffle8(input, out, n, from)
        }
        4 => {
            let from = simd::shuffle::<4>(input, out, n);
            shuffle4(input, out, n, from)
        }
        _ => 0,
    };
    for j in 0..width {
        for k in done..n {
            out[j * n + k] = input[k * width + j];
        }
    }
    out[n * width..].copy_from_slice(&input[n * width..]);
}

/// Inverse of [`shuffle`], writing into `out` (same length as `input`). Any width (0 and 1
/// copy) and any lengths are accepted without a panic: only the first
/// `min(input.len(), out.len())` bytes take part.
pub fn unshuffle(input: &[u8], width: usize, out: &mut [u8]) {
    let len = input.len().min(out.len());
    let (input, out) = (&input[..len], &mut out[..len]);
    let width = width.max(1);
    let n = len / width;
    let done = match width {
        8 => {
            let from = simd::unshuffle::<8>(input, out, n);
            unshuffle8(input, out, n, from)
        }
        4 => {
            let from = simd::unshuffle::<4>(input, out, n);
            unshuffle4(input, out, n, from)
        }
        _ => 0,
    };
    for j in 0..width {
        for k in done..n {
            out[k * width + j] = input[j * n + k];
        }
    }
    out[n * width..].copy_from_slice(&input[n * width..]);
}

/// Transposes an 8x8 byte matrix held as eight little-endian rows (its own inverse).
#[inline(always)]
fn transpose8(r: &mut [u64; 8]) {
    for k in 0..4 {
        let t = ((r[k] >> 32) ^ r[k + 4]) & 0x0000_0000_FFFF_FFFF;
        r[k] ^= t << 32;
        r[k + 4] ^= t;
    }
    for k in [0, 1, 4, 5] {
        let t = ((r[k] >> 16) ^ r[k + 2]) & 0x0000_FFFF_0000_FFFF;
        r[k] ^= t << 16;
        r[k + 2] ^= t;
    }
    for k in [0, 2, 4, 6] {
        let t = ((r[k] >> 8) ^ r[k + 1]) & 0x00FF_00FF_00FF_00FF;
        r[k] ^= t << 8;
        r[k + 1] ^= t;
    }
}

/// Transposes a 4x4 byte matrix held as four little-endian rows (its own inverse).
#[inline(always)]
fn transpose4(r: &mut [u32; 4]) {
    for k in 0..2 {
        let t = ((r[k] >> 16) ^ r[k + 2]) & 0x0000_FFFF;
        r[k] ^= t << 16;
        r[k + 2] ^= t;
    }
    for k in [0, 2] {
        let t = ((r[k] >> 8) ^ r[k + 1]) & 0x00FF_00FF;
        r[k] ^= t << 8;
        r[k + 1] ^= t;
    }
}

/// Shuffles whole groups of 8 eight-byte elements from element `from` (a multiple of 8) on;
/// returns how many elements are done.
fn shuffle8(input: &[u8], out: &mut [u8], n: usize, from: usize) -> usize {
    let groups = n / 8;
    for g in from / 8..groups {
        let mut r = [0u64; 8];
        for (k, row) in r.iter_mut().enumerate() {
            let at = (g * 8 + k) * 8;
            *row = u64::from_le_bytes(input[at..at + 8].try_into().expect("8 bytes"));
        }
        transpose8(&mut r);
        for (j, row) in r.iter().enumerate() {
            out[j * n + g * 8..j * n + g * 8 + 8].copy_from_slice(&row.to_le_bytes());
        }
    }
    groups * 8
}

fn unshuffle8(input: &[u8], out: &mut [u8], n: usize, from: usize) -> usize {
    let groups = n / 8;
    for g in from / 8..groups {
        let mut r = [0u64; 8];
        for (j, row) in r.iter_mut().enumerate() {
            let at = j * n + g * 8;
            *row = u64::from_le_bytes(input[at..at + 8].try_into().expect("8 bytes"));
        }
        transpose8(&mut r);
        for (k, row) in r.iter().enumerate() {
            let at = (g * 8 + k) * 8;
            out[at..at + 8].copy_from_slice(&row.to_le_bytes());
        }
    }
    groups * 8
}

/// Shuffles whole groups of 4 four-byte elements from element `from` (a multiple of 4) on;
/// returns how many elements are done.
fn shuffle4(input: &[u8], out: &mut [u8], n: usize, from: usize) -> usize {
    let groups = n / 4;
    for g in from / 4..groups {
        let mut r = [0u32; 4];
        for (k, row) in r.iter_mut().enumerate() {
            let at = (g * 4 + k) * 4;
            *row = u32::from_le_bytes(input[at..at + 4].try_into().expect("4 bytes"));
        }
        transpose4(&mut r);
        for (j, row) in r.iter().enumerate() {
            out[j * n + g * 4..j * n + g * 4 + 4].copy_from_slice(&row.to_le_bytes());
        }
    }
    groups * 4
}

fn unshuffle4(input: &[u8], out: &mut [u8], n: usize, from: usize) -> usize {
    let groups = n / 4;
    for g in from / 4..groups {
        let mut r = [0u32; 4];
        for (j, row) in r.iter_mut().enumerate() {
            let at = j * n + g * 4;
            *row = u32::from_le_bytes(input[at..at + 4].try_into().expect("4 bytes"));
        }
        transpose4(&mut r);
        for (k, row) in r.iter().enumerate() {
            let at = (g * 4 + k) * 4;
            out[at..at + 4].copy_from_slice(&row.to_le_bytes());
        }
    }
    groups * 4
}

/// Shuffles of 16 elements at a time with SSE2, which every x86-64 CPU has: the 16 elements
/// of `R` bytes sit in `R` registers of 16 bytes, and interleaving the bytes of register `k`
/// with those of register `k + R/2`, `R` registers at a time, transposes them into `R` planes
/// of 16 bytes when done four times (for `R` = 8 or 4); three times (`R` = 8) or twice
/// (`R` = 4) turns planes back into elements. The scalar transposes were a sixth of a full
/// snapshot's writer time (`perf`, 1 GiB of f64): these shuffle 64 KiB at 5.9-6.4 GiB/s
/// against 3.9-4.1, and unshuffle into memory at 8.5-10.2 against 7.0-8.8 (one core, three
/// rounds each, side by side).
#[cfg(all(target_arch = "x86_64", target_feature = "sse2"))]
mod simd {
    use std::arch::x86_64::{
        __m128i, _mm_loadu_si128, _mm_storeu_si128, _mm_unpackhi_epi8, _mm_unpacklo_epi8,
    };

    /// One interleaving of every register `k` with register `k + R/2` (`R` is 4 or 8: the
    /// step counts below hold for those alone).
    #[inline(always)]
    fn step<const R: usize>(y: [__m128i; R]) -> [__m128i; R] {
        const { assert!(R == 4 || R == 8) };
        std::array::from_fn(|i| {
            let (a, b) = (y[i / 2], y[i / 2 + R / 2]);
            // SAFETY: this module is built only where SSE2 is enabled (the x86-64 baseline);
            // the calls only compute on registers.
            unsafe {
                if i % 2 == 0 {
                    _mm_unpacklo_epi8(a, b)
                } else {
                    _mm_unpackhi_epi8(a, b)
                }
            }
        })
    }

    /// Shuffles the first `n / 16` groups of 16 `R`-byte elements of `input` (`n` elements)
    /// into `out`; returns how many elements it did.
    pub(super) fn shuffle<const R: usize>(input: &[u8], out: &mut [u8], n: usize) -> usize {
        let groups = n / 16;
        assert!(n <= input.len() / R && n <= out.len() / R);
        for g in 0..groups {
            // SAFETY: the loads read `input[16 R g..16 R (g + 1)]` and the stores write
            // `out[j n + 16 g..j n + 16 (g + 1)]` for `j < R`, all inside the `n R` bytes
            // both hold (asserted above, without an overflow); both are unaligned accesses.
            unsafe {
                let src = input.as_ptr().add(g * 16 * R);
                let mut y: [__m128i; R] =
                    std::array::from_fn(|k| _mm_loadu_si128(src.add(16 * k).cast()));
                for _ in 0..4 {
                    y = step(y);
                }
                for (j, plane) in y.iter().enumerate() {
                    _mm_storeu_si128(out.as_mut_ptr().add(j * n + g * 16).cast(), *plane);
                }
            }
        }
        groups * 16
    }

    /// The inverse of [`shuffle`].
    pub(super) fn unshuffle<const R: usize>(input: &[u8], out: &mut [u8], n: usize) -> usize {
        let groups = n / 16;
        assert!(n <= input.len() / R && n <= out.len() / R);
        let steps = if R == 8 { 3 } else { 2 };
        for g in 0..groups {
            // SAFETY: the loads read `input[j n + 16 g..j n + 16 (g + 1)]` for `j < R` and
            // the stores write `out[16 R g..16 R (g + 1)]`, all inside the `n R` bytes both
            // hold (asserted above, without an overflow); both are unaligned accesses.
            unsafe {
                let mut y: [__m128i; R] = std::array::from_fn(|j| {
                    _mm_loadu_si128(input.as_ptr().add(j * n + g * 16).cast())
                });
                for _ in 0..steps {
                    y = step(y);
                }
                let dst = out.as_mut_ptr().add(g * 16 * R);
                for (k, elements) in y.iter().enumerate() {
                    _mm_storeu_si128(dst.add(16 * k).cast(), *elements);
                }
            }
        }
        groups * 16
    }
}

/// Elsewhere the scalar transposes do every group.
#[cfg(not(all(target_arch = "x86_64", target_feature = "sse2")))]
mod simd {
    pub(super) fn shuffle<const R: usize>(_: &[u8], _: &mut [u8], _: usize) -> usize {
        0
    }
    pub(super) fn unshuffle<const R: usize>(_: &[u8], _: &mut [u8], _: usize) -> usize {
        0
    }
}

/// Reusable per-thread state for encoding chunks.
pub struct Encoder {
    compressor: zstd::bulk::Compressor<'static>,
    fast: zstd::bulk::Compressor<'static>,
    shuffled: Vec<u8>,
}

/// An encoded chunk, ready to append to a pack.
pub struct Encoded {
    /// The record header.
    pub header: RecordHeader,
    /// The stored bytes.
    pub data: Vec<u8>,
}

impl Encoder {
    /// A new encoder.
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            compressor: zstd::bulk::Compressor::new(ZSTD_LEVEL)?,
            fast: zstd::bulk::Compressor::new(ZSTD_LEVEL_SHUFFLED)?,
            shuffled: Vec::new(),
        })
    }

    /// Encodes `raw` (whose blake3 is `hash`), shuffling with `width` first when `width > 1`.
    /// Falls back to storing raw bytes when zstd saves less than 1/32 of the size.
    pub fn encode(&mut self, raw: &[u8], hash: [u8; 32], width: u8) -> std::io::Result<Encoded> {
        let mut data = Vec::new();
        let header = self.encode_into(raw, hash, width, &mut data)?;
        Ok(Encoded { header, data })
    }

    /// [`encode`](Self::encode) into `data` (cleared first, and kept for the next chunk: a
    /// worker that stores many chunks allocates its output once); returns the record header.
    pub fn encode_into(
        &mut self,
        raw: &[u8],
        hash: [u8; 32],
        width: u8,
        data: &mut Vec<u8>,
    ) -> std::io::Result<RecordHeader> {
        let width_usize = usize::from(width);
        let (input, compressor): (&[u8], _) = if width_usize > 1 {
            shuffle(raw, width_usize, &mut self.shuffled);
            (&self.shuffled, &mut self.fast)
        } else {
            (raw, &mut self.compressor)
        };
        data.clear();
        data.reserve(zstd::zstd_safe::compress_bound(raw.len()));
        compressor.compress_to_buffer(input, data)?;
        let (codec, shuffle) = if data.len() < raw.len() - raw.len() / 32 {
            (Codec::Zstd, width)
        } else {
            data.clear();
            data.extend_from_slice(raw);
            (Codec::Raw, 0)
        };
        Ok(RecordHeader {
            hash,
            raw_len: raw.len() as u32,
            stored_len: data.len() as u32,
            codec,
            shuffle,
        })
    }
}

/// Reusable per-thread state for decoding chunks.
pub struct Decoder {
    decompressor: zstd::bulk::Decompressor<'static>,
    scratch: Vec<u8>,
}

impl Decoder {
    /// A new decoder.
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            decompressor: zstd::bulk::Decompressor::new()?,
            scratch: Vec::new(),
        })
    }

    /// Decodes the stored bytes of a record into `out` (exactly `header.raw_len` bytes) and
    /// verifies the result against `header.hash`. `path` names the pack in errors.
    pub fn decode(
        &mut self,
        header: &RecordHeader,
        stored: &[u8],
        out: &mut [u8],
        path: &Path,
    ) -> Result<()> {
        let corrupt = |why: String| Error::Corrupt {
            path: path.to_owned(),
            why,
        };
        if out.len() != header.raw_len as usize || stored.len() != header.stored_len as usize {
            return Err(corrupt(format!(
                "chunk {} has lengths {}/{} where {}/{} were expected",
                hex(&header.hash[..8]),
                header.raw_len,
                header.stored_len,
                out.len(),
                stored.len()
            )));
        }
        match header.codec {
            Codec::Raw if stored.len() != out.len() => {
                return Err(corrupt(format!(
                    "chunk {} is stored raw but its stored length {} is not its length {}",
                    hex(&header.hash[..8]),
                    header.stored_len,
                    header.raw_len
                )));
            }
            Codec::Raw => out.copy_from_slice(stored),
            Codec::Zstd => {
                let shuffled = header.shuffle > 1;
                let target: &mut [u8] = if shuffled {
                    self.scratch.resize(out.len(), 0);
                    &mut self.scratch
                } else {
                    out
                };
                let n = self
                    .decompressor
                    .decompress_to_buffer(stored, target)
                    .map_err(|e| {
                        corrupt(format!(
                            "chunk {} does not decompress: {e}",
                            hex(&header.hash[..8])
                        ))
                    })?;
                if n != header.raw_len as usize {
                    return Err(corrupt(format!(
                        "chunk {} decompresses to {n} bytes, not {}",
                        hex(&header.hash[..8]),
                        header.raw_len
                    )));
                }
                if shuffled {
                    unshuffle(&self.scratch, usize::from(header.shuffle), out);
                }
            }
        }
        if blake3::hash(out).as_bytes() != &header.hash {
            return Err(corrupt(format!(
                "chunk {} does not match its hash",
                hex(&header.hash[..8])
            )));
        }
        Ok(())
    }
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The plain definition, to check the fast paths against.
    fn reference(input: &[u8], width: usize) -> Vec<u8> {
        let n = input.len() / width;
        let mut out = input.to_vec();
        for j in 0..width {
            for k in 0..n {
                out[j * n + k] = input[k * width + j];
            }
        }
        out
    }

    #[test]
    fn fast_shuffles_match_the_definition() {
        let input: Vec<u8> = (0..4099u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        for width in [2, 3, 4, 8] {
            for len in [0, 7, 8, 63, 64, 65, 127, 128, 129, 1000, 4099] {
                let mut s = Vec::new();
                shuffle(&input[..len], width, &mut s);
                let expected = reference(&input[..len], width);
                assert_eq!(s, expected, "width {width} len {len}");
                let mut back = vec![0; len];
                unshuffle(&expected, width, &mut back);
                assert_eq!(back, &input[..len], "width {width} len {len}: back");
            }
        }
    }

    #[test]
    fn shuffle_round_trips_with_tail() {
        let input: Vec<u8> = (0..1003u32).map(|i| (i * 31 % 251) as u8).collect();
        for width in [2, 4, 8] {
            let mut s = Vec::new();
            shuffle(&input, width, &mut s);
            let mut back = vec![0; input.len()];
            unshuffle(&s, width, &mut back);
            assert_eq!(back, input, "width {width}");
        }
    }

    #[test]
    fn unshuffle_takes_any_width_and_any_lengths() {
        let input: Vec<u8> = (0..300u32).map(|i| (i * 7 % 256) as u8).collect();
        for width in 0..=255usize {
            for len in [0, 1, 7, 8, 9, 64, 255, 256, 300] {
                for out_len in [0, len / 2, len, len + 3] {
                    let mut out = vec![0; out_len];
                    unshuffle(&input[..len], width, &mut out);
                    if width <= 1 && out_len == len {
                        assert_eq!(out, &input[..len], "width {width} len {len}");
                    }
                }
            }
        }
    }

    #[test]
    fn every_flipped_header_bit_is_corrupt_never_a_panic() {
        let smooth: Vec<f64> = (0..8192).map(|i| (i as f64 * 1e-3).sin()).collect();
        let raw: &[u8] = bytemuck::cast_slice(&smooth);
        let mut enc = Encoder::new().unwrap();
        let mut dec = Decoder::new().unwrap();
        let e = enc.encode(raw, *blake3::hash(raw).as_bytes(), 8).unwrap();
        assert_eq!(e.header.codec, Codec::Zstd);
        let path = Path::new("p");
        // The codec byte flipped from zstd to raw: the stored length is not the raw length.
        let as_raw = RecordHeader {
            codec: Codec::Raw,
            ..e.header
        };
        let mut out = vec![0; raw.len()];
        let err = dec.decode(&as_raw, &e.data, &mut out, path).unwrap_err();
        assert!(matches!(err, Error::Corrupt { .. }), "{err}");
        // Every other bit of the header: damage (or a header that does not decode), except
        // the reserved bytes, which no reader looks at.
        let bytes = e.header.encode();
        for bit in 0..RecordHeader::LEN * 8 {
            let mut b = bytes;
            b[bit / 8] ^= 1 << (bit % 8);
            let Ok(h) = RecordHeader::decode(&b, path) else {
                continue;
            };
            let mut out = vec![0; (h.raw_len as usize).min(1 << 20)];
            let stored = &e.data[..(h.stored_len as usize).min(e.data.len())];
            let result = dec.decode(&h, stored, &mut out, path);
            if bit / 8 >= 42 {
                result.unwrap();
            } else {
                let err = result.unwrap_err();
                assert!(matches!(err, Error::Corrupt { .. }), "bit {bit}: {err}");
            }
        }
    }

    #[test]
    fn smooth_floats_compress_and_noise_is_stored_raw() {
        let smooth: Vec<f64> = (0..8192).map(|i| (i as f64 * 1e-3).sin()).collect();
        let raw: &[u8] = bytemuck::cast_slice(&smooth);
        let mut enc = Encoder::new().unwrap();
        let mut dec = Decoder::new().unwrap();
        let hash = *blake3::hash(raw).as_bytes();
        let e = enc.encode(raw, hash, 8).unwrap();
        assert_eq!(e.header.codec, Codec::Zstd);
        let plain = enc.encode(raw, hash, 0).unwrap();
        assert!(
            e.data.len() < raw.len() * 9 / 10,
            "{} of {}",
            e.data.len(),
            raw.len()
        );
        assert!(
            e.data.len() < plain.data.len() * 9 / 10,
            "shuffle {} vs plain {}",
            e.data.len(),
            plain.data.len()
        );
        let mut out = vec![0; raw.len()];
        dec.decode(&e.header, &e.data, &mut out, Path::new("p"))
            .unwrap();
        assert_eq!(out, raw);

        let mut x = 0x2545_F491_4F6C_DD1Du64;
        let noise: Vec<u8> = (0..65536)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 32) as u8
            })
            .collect();
        let hash = *blake3::hash(&noise).as_bytes();
        let e = enc.encode(&noise, hash, 0).unwrap();
        assert_eq!(e.header.codec, Codec::Raw);
        let mut bad = e.data.clone();
        bad[100] ^= 1;
        let mut out = vec![0; noise.len()];
        let err = dec
            .decode(&e.header, &bad, &mut out, Path::new("p"))
            .unwrap_err();
        assert!(err.to_string().contains("does not match its hash"), "{err}");
    }
}
