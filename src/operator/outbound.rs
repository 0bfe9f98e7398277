//! Which hosts the operator may call. A resource is written by whoever may create it in a
//! namespace; without a limit, it could make the controller call any address its pod reaches.

use std::net::IpAddr;
use std::str::FromStr;

use ipnet::IpNet;

/// Addresses never called whatever the configuration: link-local (including the cloud metadata
/// service at 169.254.169.254) and the AWS IPv6 metadata address.
const ALWAYS_REFUSED: [&str; 3] = ["169.254.0.0/16", "fe80::/10", "fd00:ec2::254/128"];

/// The allow-list of branch hosts.
#[derive(Debug, Clone)]
pub struct AllowList {
    /// Host patterns: `name` (exact) or `*.suffix`.
    hosts: Vec<String>,
    /// Address ranges for IP-literal hosts.
    cidrs: Vec<IpNet>,
    refused: Vec<IpNet>,
}

impl Default for AllowList {
    /// Cluster services only.
    fn default() -> Self {
        AllowList::new(&[], &[]).unwrap_or_else(|_| unreachable!("built-in patterns are valid"))
    }
}

impl AllowList {
    /// Cluster services (`*.svc`, `*.svc.cluster.local`) plus the given hosts and CIDRs.
    pub fn new(hosts: &[String], cidrs: &[String]) -> Result<Self, String> {
        let mut patterns = vec!["*.svc".to_owned(), "*.svc.cluster.local".to_owned()];
        patterns.extend(hosts.iter().map(|h| h.trim().to_ascii_lowercase()));
        let cidrs = cidrs.iter().map(|c| parse_net(c)).collect::<Result<Vec<_>, _>>()?;
        let refused = ALWAYS_REFUSED
            .iter()
            .map(|c| parse_net(c))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(AllowList {
            hosts: patterns,
            cidrs,
            refused,
        })
    }

    /// Checks a URL; the error says why it is refused.
    pub fn check(&self, url: &str) -> Result<(), String> {
        let host = host_of(url).ok_or_else(|| format!("{url:?} has no host"))?;
        let ip = IpAddr::from_str(host.trim_start_matches('[').trim_end_matches(']')).ok();
        if let Some(ip) = ip {
            if self.refused.iter().any(|net| net.contains(&ip)) {
                return Err(format!(
                    "{host} is a link-local or metadata address, which is never called"
                ));
            }
            if self.cidrs.iter().any(|net| net.contains(&ip)) {
                return Ok(());
            }
            return Err(format!("{host} is not in the allowed address ranges"));
        }
        let host = host.to_ascii_lowercase();
        let allowed = self.hosts.iter().any(|pattern| match pattern.strip_prefix('*') {
            Some(suffix) => host.ends_with(suffix) && host.len() > suffix.len(),
            None => *pattern == host,
        });
        if allowed {
            Ok(())
        } else {
            Err(format!(
                "host {host} is not allowed: only cluster services (*.svc) and configured hosts may be called"
            ))
        }
    }
}

fn parse_net(text: &str) -> Result<IpNet, String> {
    let text = text.trim();
    IpNet::from_str(text)
        .or_else(|_| IpAddr::from_str(text).map(IpNet::from))
        .map_err(|_| format!("invalid CIDR {text:?}"))
}

/// The host part of an http(s) URL, without port or credentials.
fn host_of(url: &str) -> Option<&str> {
    let rest = url.split_once("://")?.1;
    let authority = rest.split(['/', '?', '#']).next()?;
    let host_port = authority.rsplit('@').next()?;
    let host = if host_port.starts_with('[') {
        host_port.split_inclusive(']').next()?
    } else {
        host_port.split(':').next()?
    };
    (!host.is_empty()).then_some(host)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_services_are_allowed_by_default() {
        let list = AllowList::default();
        assert!(list.check("http://bank.default.svc:8080/api").is_ok());
        assert!(list.check("https://bank.default.svc.cluster.local/api").is_ok());
        assert!(list.check("http://example.com/api").is_err());
        assert!(list.check("http://10.0.0.1/api").is_err());
        assert!(
            list.check("http://svc/api").is_err(),
            "a bare 'svc' is not a service name"
        );
    }

    #[test]
    fn configured_hosts_and_cidrs_are_allowed() {
        let list = AllowList::new(
            &["payments.example.com".into(), "*.corp".into()],
            &["127.0.0.0/8".into()],
        )
        .expect("valid");
        assert!(list.check("http://payments.example.com/x").is_ok());
        assert!(list.check("http://a.b.corp:9/x").is_ok());
        assert!(list.check("http://127.0.0.1:4000/x").is_ok());
        assert!(list.check("http://user:pw@127.0.0.1:4000/x").is_ok());
        assert!(list.check("http://other.example.com/x").is_err());
    }

    #[test]
    fn metadata_and_link_local_are_always_refused() {
        let list = AllowList::new(&[], &["0.0.0.0/0".into(), "::/0".into()]).expect("valid");
        let error = list.check("http://169.254.169.254/latest/meta-data").unwrap_err();
        assert!(error.contains("metadata"), "{error}");
        assert!(list.check("http://[fe80::1]:80/").is_err());
        assert!(list.check("http://[fd00:ec2::254]/").is_err());
        assert!(list.check("http://[::1]:80/").is_ok());
    }

    #[test]
    fn bad_cidrs_are_reported() {
        assert_eq!(
            AllowList::new(&[], &["10.0.0.0/33".into()]).unwrap_err(),
            "invalid CIDR \"10.0.0.0/33\""
        );
    }
}
