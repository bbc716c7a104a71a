//! Join token text from an operator or a joiner: parse must never panic, and whatever parses
//! must print back to the same text.
#![no_main]

use libfuzzer_sys::fuzz_target;
use starling_transport::JoinToken;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data)
        && let Ok(token) = text.parse::<JoinToken>()
    {
        assert_eq!(token.to_string(), text.trim());
    }
});
