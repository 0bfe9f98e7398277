//! The outbound policy on arbitrary URL text: what it allows must name no link-local or metadata
//! address, and with an allow-list, no address outside it.
#![no_main]

use std::sync::LazyLock;

use kubetx::invoke::policy::OutboundPolicy;
use libfuzzer_sys::fuzz_target;

static PERMISSIVE: LazyLock<OutboundPolicy> = LazyLock::new(OutboundPolicy::permissive);
static CIDRS: LazyLock<Vec<ipnet::IpNet>> =
    LazyLock::new(|| vec!["127.0.0.0/8".parse().unwrap(), "fd00::/8".parse().unwrap()]);
static LISTED: LazyLock<OutboundPolicy> = LazyLock::new(|| {
    OutboundPolicy::new(&["bank.example".to_owned()], &["127.0.0.0/8".to_owned(), "fd00::/8".to_owned()]).unwrap()
});

fuzz_target!(|text: &str| {
    kubetx::api::fuzzing::check_policy(&PERMISSIVE, text, &[]);
    kubetx::api::fuzzing::check_policy(&LISTED, text, &CIDRS);
});
