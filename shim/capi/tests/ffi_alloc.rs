//! `sv_alloc`: shim-owned memory for C programs, restored when allocated and snapshotted by
//! its written chunks only (its own test binary: the C ABI has one shim per process).

use std::ffi::c_void;

use supervise::*;
use supervise_store::Store;

#[test]
fn allocated_regions_restore_and_snapshot_only_what_changed() {
    let dir = tempfile::tempdir().unwrap();
    // SAFETY: set before any other thread of this test binary reads the environment (this
    // is its only test).
    unsafe {
        std::env::set_var("SUPERVISE_STORE", dir.path());
        std::env::set_var("SUPERVISE_JOB", "alloc");
    }
    let n = 8 << 20; // 64 MiB of f64
    assert_eq!(sv_init(), SV_OK);
    // SAFETY (every `unsafe` call below): C string literals and sizes; the returned memory
    // is used within its size while the shim is open.
    let p = unsafe { sv_alloc(c"field".as_ptr(), n * 8) } as *mut f64;
    assert!(!p.is_null());
    assert_eq!(p as usize % 4096, 0, "page-aligned");
    let field = unsafe { std::slice::from_raw_parts_mut(p, n) };
    for (i, v) in field.iter_mut().enumerate() {
        *v = (i as f64 * 1e-5).sin();
    }
    assert_eq!(unsafe { sv_checkpoint(c"full".as_ptr()) }, SV_OK);
    // 1% of the chunks (64 KiB = 8192 values each), scattered.
    for c in (0..1024).step_by(100) {
        field[c * 8192] += 1.0;
    }
    assert_eq!(unsafe { sv_checkpoint(c"one percent".as_ptr()) }, SV_OK);
    let expected: Vec<f64> = field.to_vec();
    // A name can be either protected or allocated, not both.
    let mut x = 0u64;
    assert_eq!(
        unsafe { sv_protect(c"field".as_ptr(), &mut x as *mut u64 as *mut c_void, 8) },
        SV_EINVAL
    );
    sv_finalize();

    let job = Store::open(dir.path()).unwrap().job("alloc").unwrap();
    let seqs = job.snapshot_seqs().unwrap();
    let last = job.read_manifest(*seqs.last().unwrap()).unwrap();
    assert_eq!(last.tag.as_deref(), Some("one percent"));
    assert!(
        last.stats.bytes_new <= 11 * 65536,
        "a snapshot after 11 chunks changed stored {} new bytes",
        last.stats.bytes_new
    );

    // A new start resumes: the allocation comes back filled.
    assert_eq!(sv_init(), SV_OK);
    assert_eq!(sv_is_restart(), 1);
    let p = unsafe { sv_alloc(c"field".as_ptr(), n * 8) } as *const f64;
    let back = unsafe { std::slice::from_raw_parts(p, n) };
    assert!(back == expected.as_slice(), "restored contents differ");
    // Another size for the same name is an error naming both sizes.
    assert_eq!(unsafe { sv_unprotect(c"field".as_ptr()) }, SV_OK);
    assert!(unsafe { sv_alloc(c"field".as_ptr(), 8) }.is_null());
    sv_finalize();
}
