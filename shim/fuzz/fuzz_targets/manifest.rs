//! `Manifest::decode` on any bytes: never a panic, never an allocation beyond the fuzzer's
//! bound; a manifest that decodes re-encodes to one that decodes to the same. An input that
//! does not start with the manifest magic is taken as a manifest body and framed with a valid
//! header, length and checksum first, so the fuzzer reaches the body's decoder and checks.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use supervise_store::format::{MANIFEST_MAGIC, Manifest, file_header};

fuzz_target!(|data: &[u8]| {
    let path = Path::new("fuzz.snap");
    let framed;
    let file = if data.starts_with(MANIFEST_MAGIC) {
        data
    } else {
        let mut f = file_header(MANIFEST_MAGIC).to_vec();
        f.extend_from_slice(&(data.len() as u64).to_le_bytes());
        f.extend_from_slice(data);
        f.extend_from_slice(blake3::hash(data).as_bytes());
        framed = f;
        &framed
    };
    if let Ok(m) = Manifest::decode(file, path) {
        let again = Manifest::decode(&m.encode(), path).expect("a decoded manifest re-encodes");
        assert_eq!(again, m);
    }
});
