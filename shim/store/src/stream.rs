//! Copies that bypass the CPU's caches: for bytes written now and read next by something else
//! (the disk's DMA for a pack block, the writer thread for a capture buffer), filling the
//! caches with them only evicts what the copying thread needs and costs the reads that
//! ownership of each destination line takes first. On x86-64 the bulk of such a copy uses SSE2
//! non-temporal stores; elsewhere, and for the unaligned head and the tail, a plain copy.

/// Copies `src` into `dst` (of the same length) with non-temporal stores where it can, and
/// orders them before anything this thread does next.
///
/// # Panics
/// If the lengths differ.
pub fn copy(dst: &mut [u8], src: &[u8]) {
    assert_eq!(
        dst.len(),
        src.len(),
        "a streaming copy between equal lengths"
    );
    // SAFETY: `dst` is valid for writes of `src.len()` bytes (same length, checked), `src`
    // for reads, and a `&mut` cannot overlap a `&`.
    unsafe { copy_raw(dst.as_mut_ptr(), src) }
}

/// [`copy`] into raw memory, such as a vector's spare capacity.
///
/// # Safety
/// `dst` is valid for writes of `src.len()` bytes, which do not overlap `src`.
pub unsafe fn copy_raw(dst: *mut u8, src: &[u8]) {
    #[cfg(target_arch = "x86_64")]
    {
        // Below a few lines the fence costs more than the caches it spares.
        if src.len() >= 256 {
            let head = dst.align_offset(64).min(src.len());
            let body = (src.len() - head) / 64 * 64;
            // SAFETY: the three parts split `src.len()` bytes, each within both ranges (the
            // caller's promise); `dst + head` is 64-byte aligned (`align_offset`) and `body`
            // a multiple of 64, as `stream_lines` needs.
            unsafe {
                std::ptr::copy_nonoverlapping(src.as_ptr(), dst, head);
                stream_lines(dst.add(head), src.as_ptr().add(head), body);
                let done = head + body;
                std::ptr::copy_nonoverlapping(
                    src.as_ptr().add(done),
                    dst.add(done),
                    src.len() - done,
                );
            }
            return;
        }
    }
    // SAFETY: the caller's promise.
    unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst, src.len()) }
}

/// Copies `len` bytes from `src` to `dst` with non-temporal stores, then fences them (no
/// thread, this one included, may otherwise see them in order).
///
/// # Safety
/// Both ranges are valid for `len` bytes and do not overlap; `len` is a multiple of 64;
/// `dst` is 16-byte aligned.
#[cfg(target_arch = "x86_64")]
unsafe fn stream_lines(dst: *mut u8, src: *const u8, len: usize) {
    use std::arch::x86_64::{__m128i, _mm_loadu_si128, _mm_sfence, _mm_stream_si128};
    debug_assert!(len.is_multiple_of(64) && (dst as usize).is_multiple_of(16));
    let mut i = 0;
    while i + 64 <= len {
        // SAFETY: `i + 64 <= len`, within both ranges (the caller's promise); `dst + i` is
        // 16-byte aligned (`dst` is, and `i` is a multiple of 64); SSE2 is part of x86-64.
        unsafe {
            let s = src.add(i).cast::<__m128i>();
            let d = dst.add(i).cast::<__m128i>();
            let (a, b) = (_mm_loadu_si128(s), _mm_loadu_si128(s.add(1)));
            let (c, e) = (_mm_loadu_si128(s.add(2)), _mm_loadu_si128(s.add(3)));
            _mm_stream_si128(d, a);
            _mm_stream_si128(d.add(1), b);
            _mm_stream_si128(d.add(2), c);
            _mm_stream_si128(d.add(3), e);
        }
        i += 64;
    }
    // SAFETY: a store fence has no preconditions.
    unsafe { _mm_sfence() };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_length_and_alignment_is_copied_exactly() {
        let src: Vec<u8> = (0..5100u32).map(|i| (i * 7 + i / 251) as u8).collect();
        for len in [0, 1, 63, 64, 255, 256, 257, 1000, 4096, 4999] {
            for offset in [0, 1, 15, 16, 63] {
                let mut dst = vec![0xAAu8; len + 128];
                copy(&mut dst[offset..offset + len], &src[3..3 + len]);
                assert_eq!(
                    &dst[offset..offset + len],
                    &src[3..3 + len],
                    "{len} at {offset}"
                );
                assert!(
                    dst[..offset].iter().all(|&b| b == 0xAA),
                    "before {len} at {offset}"
                );
                assert!(
                    dst[offset + len..].iter().all(|&b| b == 0xAA),
                    "after {len} at {offset}"
                );
            }
        }
    }
}
