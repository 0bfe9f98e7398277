//! Every request decoder and check of the DTM API on arbitrary bodies.
#![no_main]

use std::sync::LazyLock;

use kubetx::invoke::policy::OutboundPolicy;
use libfuzzer_sys::fuzz_target;

static POLICY: LazyLock<OutboundPolicy> = LazyLock::new(OutboundPolicy::permissive);

fuzz_target!(|body: &[u8]| {
    kubetx::api::fuzzing::decode_body(body, &POLICY);
});
