//! Bounds on every input, shared by the DTM API, the CRD schemas and the controller, so that the
//! three refuse the same things with the same words.
//!
//! They are chosen from real needs and sized so that a real API server's CEL cost budget is met
//! with room to spare: a rule's work is the product of the lengths of the lists it walks and the
//! strings it compares (`tests/crd.rs` checks it).

/// Most steps of a saga or msg, and most branches of a Tcc.
pub const MAX_STEPS: usize = 64;
/// Most `dependsOn` entries of one saga step.
pub const MAX_DEPENDS_ON: usize = 16;
/// Longest step or branch name (a DNS label).
pub const MAX_NAME_LEN: usize = 63;
/// Longest branch URL.
pub const MAX_URL_LEN: usize = 2048;
/// Longest path of a Service endpoint (and its gRPC method).
pub const MAX_PATH_LEN: usize = 1024;
/// Longest base64 payload of a step or branch (`payloadBase64`): 1.5 KiB of bytes, small enough for the
/// CEL cost of the CRDs' immutability rules.
pub const MAX_PAYLOAD_BASE64_LEN: usize = 2048;
/// Longest gRPC method of a Service endpoint.
pub const MAX_GRPC_METHOD_LEN: usize = 128;
/// A gRPC method of a Service endpoint: `package.Service/Method`.
pub const GRPC_METHOD_PATTERN: &str = "^[A-Za-z0-9_.]+/[A-Za-z0-9_]+$";
/// Most headers sent on every branch call.
pub const MAX_HEADERS: usize = 32;
/// Longest header name.
pub const MAX_HEADER_NAME_LEN: usize = 256;
/// Longest header value.
pub const MAX_HEADER_VALUE_LEN: usize = 4096;
/// Longest gid (DTM's column width, and what DTM's barrier tables accept).
pub const MAX_GID_LEN: usize = 128;
/// Longest Kubernetes object name referenced (a Secret: a DNS subdomain).
pub const MAX_OBJECT_NAME_LEN: usize = 253;

/// Longest instance id (`--instance-id`): a pod name fits, and with the lease nonce it stays
/// within the stores' 128-byte owner column.
pub const MAX_INSTANCE_ID_LEN: usize = 100;

/// Longest transaction timeout, msg delay or TTL in seconds: one year.
pub const MAX_TIMEOUT_SECONDS: i64 = 365 * 24 * 3600;
/// Longest timeout of one branch call in seconds: one hour.
pub const MAX_CALL_TIMEOUT_SECONDS: i64 = 3600;
/// Longest retry interval (first or capped) in seconds: one day.
pub const MAX_RETRY_INTERVAL_SECONDS: i64 = 24 * 3600;
/// Most immediate retries of a saga action before it compensates.
pub const MAX_RETRY_LIMIT: i64 = 1000;

/// A DNS label (RFC 1123): Service names, namespaces, step names.
pub const DNS_LABEL_PATTERN: &str = "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$";
/// A header name: an RFC 9110 token.
pub const HEADER_NAME_PATTERN: &str = "^[!#$%&'*+.^_`|~0-9A-Za-z-]+$";

/// A list is longer than allowed.
pub fn check_count(what: &str, count: usize, max: usize) -> Result<(), String> {
    if count > max {
        return Err(format!("{what}: at most {max} allowed, got {count}"));
    }
    Ok(())
}

/// A string is longer than allowed (in bytes).
pub fn check_len(what: &str, text: &str, max: usize) -> Result<(), String> {
    if text.len() > max {
        return Err(format!("{what}: at most {max} bytes allowed, got {}", text.len()));
    }
    Ok(())
}

/// A duration or count is outside `min..=max`.
pub fn check_range(what: &str, value: i64, min: i64, max: i64) -> Result<(), String> {
    if !(min..=max).contains(&value) {
        return Err(format!("{what} must be between {min} and {max}, got {value}"));
    }
    Ok(())
}

/// True for a DNS label of at most 63 characters.
pub fn is_dns_label(text: &str) -> bool {
    let bytes = text.as_bytes();
    let edge = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    !bytes.is_empty()
        && bytes.len() <= MAX_NAME_LEN
        && bytes.first().is_some_and(edge)
        && bytes.last().is_some_and(edge)
        && bytes.iter().all(|b| edge(b) || *b == b'-')
}

/// True for an RFC 9110 token (a header name).
pub fn is_token(text: &str) -> bool {
    !text.is_empty()
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_and_tokens() {
        assert!(is_dns_label("bank-1"));
        assert!(!is_dns_label("-bank") && !is_dns_label("Bank") && !is_dns_label("a.b") && !is_dns_label(""));
        assert!(!is_dns_label(&"a".repeat(64)));
        assert!(is_token("X-Request-Id") && is_token("a!#$%&'*+-.^_`|~"));
        assert!(!is_token("a b") && !is_token("a:b") && !is_token(""));
    }

    #[test]
    fn messages_name_the_field_and_the_limit() {
        assert_eq!(
            check_count("steps", 65, 64).unwrap_err(),
            "steps: at most 64 allowed, got 65"
        );
        assert_eq!(
            check_len("url", "abc", 2).unwrap_err(),
            "url: at most 2 bytes allowed, got 3"
        );
        assert_eq!(
            check_range("retry_limit", -1, 0, 5).unwrap_err(),
            "retry_limit must be between 0 and 5, got -1"
        );
        assert!(check_range("x", 5, 0, 5).is_ok());
    }
}
