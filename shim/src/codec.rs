//! Turning a raw chunk into stored bytes and back: optional byte-shuffle (for numeric slices:
//! byte k of every element is grouped together, which makes smooth floating-point fields
//! compressible), zstd, and "store raw" when compression does not pay.

use std::path::Path;

use crate::error::{Error, Result};
use crate::format::{Codec, RecordHeader};

/// zstd level for chunks. Level 1 after a byte-shuffle compresses smooth f64 fields about as well
/// as level 3 (1.55 vs 1.57) at about twice the speed.
pub const ZSTD_LEVEL: i32 = 1;

/// Groups byte `j` of every `width`-byte element together: out = plane 0, plane 1, ...
/// A tail shorter than one element is copied as is.
pub fn shuffle(input: &[u8], width: usize, out: &mut Vec<u8>) {
    out.clear();
    out.resize(input.len(), 0);
    let n = input.len() / width;
    for j in 0..width {
        let plane = &mut out[j * n..(j + 1) * n];
        for (k, byte) in plane.iter_mut().enumerate() {
            *byte = input[k * width + j];
        }
    }
    out[n * width..].copy_from_slice(&input[n * width..]);
}

/// Inverse of [`shuffle`], writing into `out` (same length as `input`).
pub fn unshuffle(input: &[u8], width: usize, out: &mut [u8]) {
    let n = input.len() / width;
    for j in 0..width {
        let plane = &input[j * n..(j + 1) * n];
        for (k, byte) in plane.iter().enumerate() {
            out[k * width + j] = *byte;
        }
    }
    out[n * width..].copy_from_slice(&input[n * width..]);
}

/// Reusable per-thread state for encoding chunks.
pub struct Encoder {
    compressor: zstd::bulk::Compressor<'static>,
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
            shuffled: Vec::new(),
        })
    }

    /// Encodes `raw` (whose blake3 is `hash`), shuffling with `width` first when `width > 1`.
    /// Falls back to storing raw bytes when zstd saves less than 1/32 of the size.
    pub fn encode(&mut self, raw: &[u8], hash: [u8; 32], width: u8) -> std::io::Result<Encoded> {
        let width_usize = usize::from(width);
        let input: &[u8] = if width_usize > 1 {
            shuffle(raw, width_usize, &mut self.shuffled);
            &self.shuffled
        } else {
            raw
        };
        let mut data = Vec::with_capacity(zstd::zstd_safe::compress_bound(raw.len()));
        self.compressor.compress_to_buffer(input, &mut data)?;
        let (codec, shuffle, data) = if data.len() < raw.len() - raw.len() / 32 {
            (Codec::Zstd, width, data)
        } else {
            data.clear();
            data.extend_from_slice(raw);
            (Codec::Raw, 0, data)
        };
        Ok(Encoded {
            header: RecordHeader {
                hash,
                raw_len: raw.len() as u32,
                stored_len: data.len() as u32,
                codec,
                shuffle,
            },
            data,
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
