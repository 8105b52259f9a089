//! A pack record: `RecordHeader::decode` on the first 44 bytes, then `Decoder::decode` of the
//! bytes after it as the stored chunk; and `unshuffle` with any width and lengths.
#![no_main]

use std::cell::RefCell;
use std::path::Path;

use libfuzzer_sys::fuzz_target;
use supervise_store::codec::{Decoder, unshuffle};
use supervise_store::format::RecordHeader;

thread_local! {
    static DECODER: RefCell<Decoder> = RefCell::new(Decoder::new().expect("zstd context"));
}

fuzz_target!(|data: &[u8]| {
    let path = Path::new("fuzz.pack");
    if let Ok(header) = RecordHeader::decode(data, path) {
        let stored = &data[RecordHeader::LEN..];
        let stored = &stored[..stored.len().min(header.stored_len as usize)];
        let mut out = vec![0u8; header.raw_len as usize];
        DECODER.with(|d| {
            let _ = d.borrow_mut().decode(&header, stored, &mut out, path);
        });
    }
    if let Some((&width, rest)) = data.split_first() {
        let mut out = vec![0u8; rest.len() - rest.len() / (usize::from(width % 4) + 2)];
        unshuffle(rest, usize::from(width), &mut out);
    }
});
