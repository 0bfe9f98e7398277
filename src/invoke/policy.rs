//! The one outbound policy: which URLs and addresses kubetx may call. Every branch call of both
//! front doors, and the alert webhook, goes through it.
//!
//! A URL is parsed once, with the WHATWG parser of the `url` crate (the one the HTTP client
//! dials from), so decimal, octal and hexadecimal IPv4 forms, backslashes and `@` tricks are seen
//! exactly as they are dialed. Names are checked against the allowed host patterns before the
//! call, and the addresses they resolve to are checked again at connect time by the client's
//! resolver hook ([`super::Invoker`]), so DNS cannot lead a call into a refused range.

use std::net::IpAddr;
use std::str::FromStr;

use ipnet::IpNet;
use url::{Host, Url};

/// Host patterns of cluster services, allowed by the operator's default policy.
pub const CLUSTER_SERVICES: [&str; 2] = ["*.svc", "*.svc.cluster.local"];

/// Never called, whatever the configuration: link-local (with the cloud metadata service at
/// 169.254.169.254), the AWS IPv6 metadata address and Alibaba Cloud's metadata address.
const NEVER_CALLED: [&str; 4] = ["169.254.0.0/16", "fe80::/10", "fd00:ec2::254/128", "100.100.100.200/32"];

/// This host itself (loopback, "any"): a name resolving here is refused unless an allowed CIDR
/// covers the address, so that a DNS name cannot reach the coordinator's own ports.
const LOCAL: [&str; 4] = ["127.0.0.0/8", "::1/128", "0.0.0.0/8", "::/128"];

/// A configuration error of the policy.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// A CIDR (or address) of `--allow-cidrs` does not parse.
    #[error("invalid CIDR {0:?}")]
    Cidr(String),
    /// A host pattern of `--allow-hosts` is not `name`, `*.suffix` or `*`.
    #[error("invalid host pattern {0:?}: use a name, *.suffix or *; addresses go in allow-cidrs")]
    Host(String),
}

/// Why a URL or a resolved address is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// Not a URL the WHATWG parser accepts.
    #[error("not a valid URL: {0}")]
    Invalid(String),
    /// Not http or https.
    #[error("scheme {0:?} is not http or https")]
    Scheme(String),
    /// No host to call.
    #[error("the URL has no host")]
    NoHost,
    /// A link-local or metadata address.
    #[error("{0} is a link-local or metadata address, which is never called")]
    NeverCalled(IpAddr),
    /// An address outside the allowed ranges.
    #[error("{0} is not in the allowed address ranges")]
    Address(IpAddr),
    /// A name outside the allowed host patterns.
    #[error(
        "host {0} is not allowed: only the allowed hosts (cluster services *.svc by default in the operator) may be called"
    )]
    Host(String),
    /// A name whose every address is refused.
    #[error("host {host} resolves only to refused addresses: {reasons}")]
    Resolved {
        /// The name.
        host: String,
        /// Why each address was refused.
        reasons: String,
    },
}

/// One allowed host pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
enum HostPattern {
    /// Every name.
    Any,
    /// Exactly this name (lowercase, no trailing dot).
    Exact(String),
    /// Names ending with this suffix (starting with a dot), longer than it.
    Suffix(String),
}

impl HostPattern {
    fn parse(text: &str) -> Result<Self, PolicyError> {
        let lower = text.trim().to_ascii_lowercase();
        let invalid = || PolicyError::Host(text.to_owned());
        if lower == "*" {
            return Ok(HostPattern::Any);
        }
        let (name, wildcard) = match lower.strip_prefix("*.") {
            Some(rest) => (rest, true),
            None => (lower.as_str(), false),
        };
        let name = name.trim_end_matches('.');
        let valid_chars = name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_');
        if name.is_empty() || !valid_chars || name.starts_with('.') || IpAddr::from_str(name).is_ok() {
            return Err(invalid());
        }
        Ok(if wildcard {
            HostPattern::Suffix(format!(".{name}"))
        } else {
            HostPattern::Exact(name.to_owned())
        })
    }

    fn matches(&self, name: &str) -> bool {
        match self {
            HostPattern::Any => true,
            HostPattern::Exact(exact) => exact == name,
            HostPattern::Suffix(suffix) => name.len() > suffix.len() && name.ends_with(suffix.as_str()),
        }
    }
}

/// Which hosts and addresses may be called.
#[derive(Debug, Clone)]
pub struct OutboundPolicy {
    hosts: Vec<HostPattern>,
    cidrs: Vec<IpNet>,
    never: Vec<IpNet>,
    local: Vec<IpNet>,
    checked: CheckedUrls,
}

/// Most URLs [`OutboundPolicy::check`] remembers; it forgets them all when full.
const MAX_CHECKED_URLS: usize = 1024;
/// Longest URL it remembers (branch URLs are short; a long one is parsed every time).
const MAX_CHECKED_URL_LEN: usize = 512;

/// URLs already parsed and allowed, shared by the clones of one policy. Branch URLs repeat (every
/// transaction calls the same few endpoints, and the API checks them at submit too), and parsing
/// one costs more than the rest of its check: the parses were over a tenth of kubetx's
/// instructions per saga (BENCHMARKS.md). The answer depends on the string and the policy alone,
/// so a remembered one is the answer a fresh check would give.
#[derive(Debug, Clone, Default)]
struct CheckedUrls(std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, Url>>>);

impl CheckedUrls {
    fn get(&self, url: &str) -> Option<Url> {
        self.0.lock().ok()?.get(url).cloned()
    }

    fn contains(&self, url: &str) -> bool {
        self.0.lock().is_ok_and(|checked| checked.contains_key(url))
    }

    fn remember(&self, url: &str, parsed: &Url) {
        if url.len() > MAX_CHECKED_URL_LEN {
            return;
        }
        if let Ok(mut checked) = self.0.lock() {
            if checked.len() >= MAX_CHECKED_URLS {
                checked.clear();
            }
            checked.insert(url.to_owned(), parsed.clone());
        }
    }
}

impl OutboundPolicy {
    /// Exactly the given host patterns (`name`, `*.suffix`, `*`) and address ranges; link-local
    /// and metadata addresses stay refused.
    pub fn new(hosts: &[String], cidrs: &[String]) -> Result<Self, PolicyError> {
        let hosts = hosts
            .iter()
            .filter(|h| !h.trim().is_empty())
            .map(|h| HostPattern::parse(h))
            .collect::<Result<Vec<_>, _>>()?;
        let cidrs = cidrs
            .iter()
            .filter(|c| !c.trim().is_empty())
            .map(|c| parse_net(c))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(OutboundPolicy {
            hosts,
            cidrs,
            never: builtin(&NEVER_CALLED),
            local: builtin(&LOCAL),
            checked: CheckedUrls::default(),
        })
    }

    /// Every host and address except the always-refused ranges (the default of `kubetx serve`).
    pub fn permissive() -> Self {
        OutboundPolicy {
            hosts: vec![HostPattern::Any],
            cidrs: builtin(&["0.0.0.0/0", "::/0"]),
            never: builtin(&NEVER_CALLED),
            local: builtin(&LOCAL),
            checked: CheckedUrls::default(),
        }
    }

    /// Cluster services (`*.svc`, `*.svc.cluster.local`, `*.<service_domain>`) plus the given
    /// hosts and CIDRs (the operator's policy).
    pub fn cluster(hosts: &[String], cidrs: &[String], service_domain: &str) -> Result<Self, PolicyError> {
        let mut patterns: Vec<String> = CLUSTER_SERVICES.iter().map(|p| (*p).to_owned()).collect();
        let domain = service_domain.trim().trim_matches('.');
        if !domain.is_empty() {
            patterns.push(format!("*.{domain}"));
        }
        patterns.extend(hosts.iter().cloned());
        Self::new(&patterns, cidrs)
    }

    /// Parses and checks a URL: http(s), and a host that may be called.
    pub fn check(&self, url: &str) -> Result<Url, Refusal> {
        if let Some(parsed) = self.checked.get(url) {
            return Ok(parsed);
        }
        let parsed = Url::parse(url).map_err(|e| Refusal::Invalid(e.to_string()))?;
        self.check_url(&parsed)?;
        self.checked.remember(url, &parsed);
        Ok(parsed)
    }

    /// [`OutboundPolicy::check`] without the parsed URL (no copy of a remembered one).
    pub fn allows(&self, url: &str) -> Result<(), Refusal> {
        if self.checked.contains(url) {
            return Ok(());
        }
        self.check(url).map(drop)
    }

    /// Checks a parsed URL.
    pub fn check_url(&self, url: &Url) -> Result<(), Refusal> {
        if !matches!(url.scheme(), "http" | "https") {
            return Err(Refusal::Scheme(url.scheme().to_owned()));
        }
        match url.host() {
            None => Err(Refusal::NoHost),
            Some(Host::Ipv4(ip)) => self.check_literal(IpAddr::V4(ip)),
            Some(Host::Ipv6(ip)) => self.check_literal(IpAddr::V6(ip)),
            Some(Host::Domain(name)) => self.check_name(name),
        }
    }

    /// Checks a host name against the allowed patterns (case and a trailing dot ignored).
    pub fn check_name(&self, name: &str) -> Result<(), Refusal> {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        if self.hosts.iter().any(|pattern| pattern.matches(&name)) {
            Ok(())
        } else {
            Err(Refusal::Host(name))
        }
    }

    /// Checks an address written in a URL: it must be in an allowed range.
    pub fn check_literal(&self, ip: IpAddr) -> Result<(), Refusal> {
        let ip = unmapped(ip);
        self.check_never(ip)?;
        if self.cidrs.iter().any(|net| net.contains(&ip)) {
            Ok(())
        } else {
            Err(Refusal::Address(ip))
        }
    }

    /// Checks an address an allowed name resolved to: anything but the never-called ranges, and
    /// this host's own addresses only when an allowed range covers them.
    pub fn check_resolved(&self, ip: IpAddr) -> Result<(), Refusal> {
        let ip = unmapped(ip);
        self.check_never(ip)?;
        if self.local.iter().any(|net| net.contains(&ip)) && !self.cidrs.iter().any(|net| net.contains(&ip)) {
            return Err(Refusal::Address(ip));
        }
        Ok(())
    }

    /// The addresses of `host` that may be dialed; an error when none may.
    pub fn filter_resolved(&self, host: &str, found: &[IpAddr]) -> Result<Vec<IpAddr>, Refusal> {
        self.check_name(host)?;
        let mut allowed = Vec::with_capacity(found.len());
        let mut reasons = Vec::new();
        for ip in found {
            match self.check_resolved(*ip) {
                Ok(()) => allowed.push(*ip),
                Err(refusal) => reasons.push(refusal.to_string()),
            }
        }
        if allowed.is_empty() {
            return Err(Refusal::Resolved {
                host: host.to_owned(),
                reasons: if reasons.is_empty() {
                    "no address".to_owned()
                } else {
                    reasons.join("; ")
                },
            });
        }
        Ok(allowed)
    }

    fn check_never(&self, ip: IpAddr) -> Result<(), Refusal> {
        if self.never.iter().any(|net| net.contains(&ip)) {
            return Err(Refusal::NeverCalled(ip));
        }
        Ok(())
    }
}

/// An IPv4-mapped IPv6 address (`::ffff:a.b.c.d`) as the IPv4 address it reaches.
fn unmapped(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

fn parse_net(text: &str) -> Result<IpNet, PolicyError> {
    let text = text.trim();
    IpNet::from_str(text)
        .or_else(|_| IpAddr::from_str(text).map(IpNet::from))
        .map_err(|_| PolicyError::Cidr(text.to_owned()))
}

/// The built-in ranges; they are constants that parse.
fn builtin(texts: &[&str]) -> Vec<IpNet> {
    texts.iter().filter_map(|t| IpNet::from_str(t).ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| (*s).to_owned()).collect()
    }

    fn refused(policy: &OutboundPolicy, url: &str) -> String {
        match policy.check(url) {
            Ok(parsed) => panic!("{url} was allowed (parsed as host {:?})", parsed.host_str()),
            Err(refusal) => refusal.to_string(),
        }
    }

    #[test]
    fn a_remembered_check_answers_as_a_fresh_one_and_stays_bounded() {
        let policy = OutboundPolicy::cluster(&[], &[], "svc").expect("valid");
        let url = "http://bank.default.svc:8080/api/TransOut";
        let first = policy.check(url).expect("allowed");
        assert_eq!(policy.check(url).expect("allowed again"), first);
        // A clone shares what was remembered; a refusal is never remembered.
        assert_eq!(policy.clone().check(url).expect("allowed"), first);
        let outside = "http://example.com/x";
        assert!(refused(&policy, outside).contains("example.com"));
        assert!(refused(&policy, outside).contains("example.com"));
        // `allows` answers the same, remembered or not.
        assert!(policy.allows(url).is_ok() && policy.allows(outside).is_err());
        let fresh = "http://other.default.svc/x";
        assert!(policy.allows(fresh).is_ok() && policy.allows(fresh).is_ok());
        for i in 0..(MAX_CHECKED_URLS + 10) {
            assert!(policy.check(&format!("http://s{i}.ns.svc/")).is_ok());
        }
        assert!(policy.checked.0.lock().expect("lock").len() <= MAX_CHECKED_URLS);
        assert_eq!(policy.check(url).expect("allowed"), first);
    }

    #[test]
    fn cluster_services_only_by_default_in_the_operator() {
        let policy = OutboundPolicy::cluster(&[], &[], "svc").expect("valid");
        assert!(policy.check("http://bank.default.svc:8080/api").is_ok());
        assert!(policy.check("https://bank.default.svc.cluster.local/api").is_ok());
        assert!(
            policy.check("http://BANK.default.SVC./api").is_ok(),
            "case and trailing dot"
        );
        for url in [
            "http://example.com/api",
            "http://10.0.0.1/api",
            "http://svc/api",
            "ftp://bank.default.svc/",
        ] {
            refused(&policy, url);
        }
        // The bypass: the host the client dials is 127.0.0.1, whatever follows the `\`.
        let text = refused(&policy, "http://127.0.0.1:18081\\@bank.default.svc/api/Backslash");
        assert_eq!(text, "127.0.0.1 is not in the allowed address ranges");
        let text = refused(&policy, "http://bank.default.svc@127.0.0.1/x");
        assert_eq!(text, "127.0.0.1 is not in the allowed address ranges");
    }

    #[test]
    fn every_spelling_of_an_address_is_the_address() {
        let policy = OutboundPolicy::new(&strings(&["*.test"]), &strings(&["127.0.0.1/32"])).expect("valid");
        assert!(policy.check("http://127.0.0.1:1/").is_ok());
        for url in [
            "http://127.0.0.2:1/",
            "http://2130706434:1/",
            "http://0177.0.0.02:1/",
            "http://0x7f.0.0.0x2:1/",
            "http://0x7f000002:1/",
            "http://127.2:1/",
            "http://127.0.0.2.:1/",
            "http://%31%32%37.0.0.2:1/",
            "http://[::ffff:127.0.0.2]:1/",
            "http://[::ffff:7f00:2]:1/",
            "http://[::1]:1/",
            "http://127.0.0.2:1\\@a.test/",
            "http://a.test:1@127.0.0.2:1/",
            "http:/\\127.0.0.2:1/",
        ] {
            let text = refused(&policy, url);
            assert!(text.contains("not in the allowed address ranges"), "{url}: {text}");
        }
        assert!(
            policy.check("http://[::ffff:127.0.0.1]:1/").is_ok(),
            "mapped form of an allowed address"
        );
    }

    #[test]
    fn link_local_and_metadata_are_never_called() {
        let everything = OutboundPolicy::permissive();
        for url in [
            "http://169.254.169.254/latest/meta-data",
            "http://[::ffff:169.254.169.254]/",
            "http://0xa9fea9fe/",
            "http://[fe80::1]/",
            "http://[fd00:ec2::254]/",
            "http://100.100.100.200/",
        ] {
            assert!(refused(&everything, url).contains("never called"), "{url}");
        }
        assert!(everything.check("http://[::1]:80/").is_ok());
        assert!(everything.check("http://127.0.0.1:80/").is_ok());
        assert!(everything.check("http://anything.example/").is_ok());
    }

    #[test]
    fn resolved_addresses_are_checked() {
        let policy = OutboundPolicy::cluster(&[], &[], "svc").expect("valid");
        let cluster_ip: IpAddr = [10, 96, 0, 10].into();
        let loopback: IpAddr = [127, 0, 0, 1].into();
        let metadata: IpAddr = [169, 254, 169, 254].into();
        let mapped: IpAddr = "::ffff:127.0.0.1".parse().expect("ip");
        assert_eq!(
            policy.filter_resolved("bank.default.svc", &[cluster_ip]),
            Ok(vec![cluster_ip])
        );
        assert_eq!(
            policy.filter_resolved("bank.default.svc", &[metadata, cluster_ip]),
            Ok(vec![cluster_ip])
        );
        let error = policy
            .filter_resolved("evil.default.svc", &[loopback, mapped, metadata])
            .expect_err("refused");
        assert!(
            error.to_string().contains("resolves only to refused addresses"),
            "{error}"
        );
        assert!(policy.filter_resolved("example.com", &[cluster_ip]).is_err());
        let with_loopback = OutboundPolicy::cluster(&[], &strings(&["127.0.0.0/8"]), "svc").expect("valid");
        assert_eq!(
            with_loopback.filter_resolved("bank.default.svc", &[loopback]),
            Ok(vec![loopback])
        );
    }

    #[test]
    fn configuration_errors_are_reported() {
        assert_eq!(
            OutboundPolicy::new(&[], &strings(&["10.0.0.0/33"])).unwrap_err(),
            PolicyError::Cidr("10.0.0.0/33".to_owned())
        );
        for bad in ["127.0.0.1", "a/b", "*.", "x@y"] {
            assert!(OutboundPolicy::new(&strings(&[bad]), &[]).is_err(), "{bad}");
        }
        let policy = OutboundPolicy::new(&strings(&["Payments.Example.com.", "*.corp"]), &[]).expect("valid");
        assert!(policy.check("http://payments.example.com/x").is_ok());
        assert!(policy.check("http://a.b.corp:9/x").is_ok());
        assert!(policy.check("http://corp/x").is_err());
    }
}
