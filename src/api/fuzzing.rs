//! Entry points of the fuzz targets under `fuzz/`, compiled only by `cargo fuzz` (which sets
//! `--cfg fuzzing`): every decoder and check a request body goes through before the store, and
//! the outbound policy with the property it must keep.

use std::net::IpAddr;

use serde_json::{Map, Value};
use url::Host;

use super::wire::{TransRequest, branch_request, check_url, msg_custom};
use crate::invoke::policy::OutboundPolicy;

/// Decodes `body` as every route that takes a JSON body does, then runs each check on it.
/// Panics only on a bug: every input must end in a value or an `ApiError`.
pub fn decode_body(body: &[u8], policy: &OutboundPolicy) {
    let Ok(text) = std::str::from_utf8(body) else {
        return;
    };
    if let Ok(req) = serde_json::from_str::<TransRequest>(text) {
        let _ = (req.gid(), req.trans_type(), req.options(), req.check_protocol());
        let _ = check_url(policy, "query_prepared", &req.query_prepared);
        for step in req.steps().unwrap_or_default() {
            let _ = check_url(policy, "action", &step.action);
            let _ = check_url(policy, "compensate", &step.compensate);
        }
        let _ = msg_custom(&req.custom_data());
        let _ = req.extra("branch_id");
    }
    if let Ok(fields) = serde_json::from_str::<Map<String, Value>>(text) {
        let _ = branch_request(fields);
    }
}

/// Checks `url` with `policy` and, when it is allowed and names an address literally, that the
/// address is one the policy allows: link-local and metadata never, and inside `allowed_cidrs`
/// when that list is not empty. Panics when the policy let through what it must refuse.
pub fn check_policy(policy: &OutboundPolicy, url: &str, allowed_cidrs: &[ipnet::IpNet]) {
    let Ok(parsed) = policy.check(url) else {
        return;
    };
    let ip = match parsed.host() {
        Some(Host::Ipv4(ip)) => IpAddr::V4(ip),
        Some(Host::Ipv6(ip)) => ip.to_canonical(),
        _ => return,
    };
    let link_local = match ip {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) == 0xfe80,
    };
    assert!(!link_local, "{url:?} allowed, but it names link-local {ip}");
    assert!(
        allowed_cidrs.is_empty() || allowed_cidrs.iter().any(|net| net.contains(&ip)),
        "{url:?} allowed, but {ip} is outside {allowed_cidrs:?}"
    );
}
