//! The C ABI called as C would: bad arguments and bad order give negative codes and a message,
//! never a crash.

use std::ffi::{CStr, c_void};

use supervise::*;

fn last_error() -> String {
    // SAFETY: sv_last_error returns a NUL-terminated string valid until the next call.
    unsafe { CStr::from_ptr(sv_last_error()) }
        .to_string_lossy()
        .into_owned()
}

#[test]
fn misuse_is_an_error_code_with_a_message() {
    // SAFETY (every `unsafe` call below): each pointer is NULL, a C string literal, or points
    // to `data`/`hex`, which outlive the calls; NULLs are what the test checks are refused.
    let mut data = [1.0f64; 16];
    let ptr = data.as_mut_ptr() as *mut c_void;
    // Before sv_init.
    assert_eq!(unsafe { sv_protect(c"grid".as_ptr(), ptr, 128) }, SV_ESTATE);
    assert!(last_error().contains("sv_init"), "{}", last_error());
    // No SUPERVISE_* variables here: the shim is off, and everything still answers.
    assert_eq!(sv_init(), SV_OK);
    assert_eq!(sv_init(), SV_ESTATE, "a second sv_init");
    assert_eq!(unsafe { sv_protect(std::ptr::null(), ptr, 128) }, SV_EINVAL);
    assert!(last_error().contains("NULL"));
    assert_eq!(
        unsafe { sv_protect(c"grid".as_ptr(), std::ptr::null_mut(), 128) },
        SV_EINVAL
    );
    assert_eq!(unsafe { sv_protect(c"grid".as_ptr(), ptr, 0) }, SV_EINVAL);
    assert_eq!(unsafe { sv_protect(c"a/b".as_ptr(), ptr, 128) }, SV_EINVAL);
    assert!(last_error().contains("a/b"), "{}", last_error());
    assert_eq!(unsafe { sv_unprotect(c"nope".as_ptr()) }, SV_EINVAL);
    assert!(last_error().contains("nope"));
    assert_eq!(unsafe { sv_protect(c"grid".as_ptr(), ptr, 128) }, SV_OK);
    assert_eq!(sv_is_restart(), 0);
    assert_eq!(sv_restore(), SV_EINVAL, "nothing to restore from");
    assert_eq!(sv_checkpoint_requested(), 0);
    assert_eq!(unsafe { sv_poll(std::ptr::null()) }, 0);
    assert_eq!(unsafe { sv_checkpoint(c"step 1".as_ptr()) }, SV_OK);
    assert_eq!(unsafe { sv_unprotect(c"grid".as_ptr()) }, SV_OK);
    let mut hex = [0 as std::ffi::c_char; 65];
    assert_eq!(unsafe { sv_digest_hex(ptr, 128, hex.as_mut_ptr()) }, SV_OK);
    // SAFETY: sv_digest_hex wrote 64 digits and a NUL.
    let hex = unsafe { CStr::from_ptr(hex.as_ptr()) }
        .to_str()
        .unwrap()
        .to_owned();
    let bytes: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
    assert_eq!(hex, blake3::hash(&bytes).to_hex().as_str());
    assert_eq!(
        unsafe { sv_digest_hex(std::ptr::null(), 1, std::ptr::null_mut()) },
        SV_EINVAL
    );
    sv_finalize();
    assert_eq!(
        unsafe { sv_checkpoint(std::ptr::null()) },
        SV_ESTATE,
        "after sv_finalize"
    );
    sv_finalize();
}
