//! A control-protocol line as the supervisor parses it (`serde_json::from_slice::<Event>`) and
//! as the shim parses it (a `str` line into `Request`): never a panic; what parses re-encodes
//! with `to_line` to the same message.
#![no_main]

use libfuzzer_sys::fuzz_target;
use supervise_store::control::{Event, Request};

fuzz_target!(|data: &[u8]| {
    if let Ok(event) = serde_json::from_slice::<Event>(data) {
        let line = event.to_line();
        assert_eq!(serde_json::from_str::<Event>(&line).ok(), Some(event));
    }
    if let Ok(text) = std::str::from_utf8(data)
        && let Ok(request) = serde_json::from_str::<Request>(text)
    {
        let line = request.to_line();
        assert_eq!(serde_json::from_str::<Request>(&line).ok(), Some(request));
    }
});
