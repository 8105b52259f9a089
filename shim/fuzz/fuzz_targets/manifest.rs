//! `Manifest::decode` on any bytes: never a panic, never an allocation beyond the fuzzer's
//! bound; a manifest that decodes re-encodes to one that decodes to the same. An input that
//! does not start with the manifest magic is taken as a manifest body and framed with a valid
//! header (of the newest version, and of version 2, whose layout a manifest without arrays is
//! still written in), length and checksum first, so the fuzzer reaches both body decoders and
//! their checks.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use supervise_store::format::{MANIFEST_MAGIC, MANIFEST_VERSION, Manifest, file_header_of_version};

fn check(file: &[u8]) {
    let path = Path::new("fuzz.snap");
    if let Ok(m) = Manifest::decode(file, path) {
        let again = Manifest::decode(&m.encode(), path).expect("a decoded manifest re-encodes");
        assert_eq!(again, m);
    }
}

fuzz_target!(|data: &[u8]| {
    if data.starts_with(MANIFEST_MAGIC) {
        return check(data);
    }
    for version in [MANIFEST_VERSION, 2] {
        let mut f = file_header_of_version(MANIFEST_MAGIC, version).to_vec();
        f.extend_from_slice(&(data.len() as u64).to_le_bytes());
        f.extend_from_slice(data);
        f.extend_from_slice(blake3::hash(data).as_bytes());
        check(&f);
    }
});
