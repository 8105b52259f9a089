//! A whole pack file scanned record by record (`pack_scan::scan_pack`), every chunk decoded
//! and verified: never a panic, memory bounded by one chunk.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use supervise_store::pack_scan::scan_pack;

fuzz_target!(|data: &[u8]| {
    if let Ok(records) = scan_pack(data, Path::new("fuzz.pack")) {
        assert!(records.windows(2).all(|w| w[0].offset < w[1].offset));
    }
});
