//! The URL rules: what a code-source URL may look like, and the host
//! allow-list. Parsing follows the WHATWG URL standard (the `url` crate, the
//! same parser the HTTP client uses), so the host we check is the host we
//! connect to: `http://2130706433/`, `http://0177.0.0.1/` and `http://127.1/`
//! all become 127.0.0.1 here, and international names become their ASCII
//! (punycode) form.
use std::net::IpAddr;

use url::{Host, Url};

/// A URL that passed the syntactic rules.
#[derive(Debug, Clone)]
pub struct Target {
    pub url: Url,
    /// Lower-case ASCII host without a trailing dot (the allow-list form).
    pub host: String,
    /// Set when the host is an IP literal (no DNS lookup then).
    pub ip: Option<IpAddr>,
    pub port: u16,
}

/// Parses and checks a code-source URL.
pub fn parse(raw: &str) -> Result<Target, String> {
    if raw.contains('\\') {
        return Err(format!(
            "the code source URL {raw:?} contains a backslash; write the URL with forward slashes"
        ));
    }
    if raw.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "the code source URL {raw:?} contains whitespace or control characters"
        ));
    }
    let url = Url::parse(raw)
        .map_err(|e| format!("the code source URL {raw:?} is not an absolute URL: {e}"))?;
    from_url(url)
}

/// Checks an already parsed URL (a redirect's target).
pub fn from_url(url: Url) -> Result<Target, String> {
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!(
            "the code source URL {url} uses the scheme {:?}; only https and http are allowed",
            url.scheme()
        ));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(
            "the code source URL carries credentials (user@host); send them in the request's credential field instead"
                .into(),
        );
    }
    let (host, ip) = match url.host() {
        None => return Err(format!("the code source URL {url} has no host")),
        Some(Host::Domain(d)) => (normalize(d), None),
        Some(Host::Ipv4(a)) => (a.to_string(), Some(IpAddr::V4(a))),
        Some(Host::Ipv6(a)) => (a.to_string(), Some(IpAddr::V6(a))),
    };
    if host.is_empty() {
        return Err(format!("the code source URL {url} has an empty host"));
    }
    let port = url
        .port_or_known_default()
        .ok_or_else(|| format!("the code source URL {url} has no port"))?;
    Ok(Target {
        url,
        host,
        ip,
        port,
    })
}

fn normalize(host: &str) -> String {
    host.trim_end_matches('.').to_ascii_lowercase()
}

/// One allow-list entry: an exact host, or `*.example.com` (any name below
/// example.com, not example.com itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostPattern {
    Exact(String),
    Suffix(String),
}

impl HostPattern {
    /// Reads a configured entry; international names are stored in their
    /// ASCII form so they compare with parsed URLs.
    pub fn parse(entry: &str) -> Result<HostPattern, String> {
        let entry = entry.trim();
        let (wild, name) = match entry.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, entry),
        };
        let refuse =
            || format!("{entry:?} is not a host name; write it as host.example or *.example");
        // '*' is a valid host character to the URL parser: only a leading
        // "*." is a wildcard, anywhere else it is a mistake.
        if name.is_empty()
            || name.contains(['/', '@', '*', '?', '#', '\\'])
            || (name.contains(':') && !name.starts_with('['))
        {
            return Err(refuse());
        }
        let ascii = Url::parse(&format!("http://{name}/"))
            .ok()
            .and_then(|u| {
                u.host().map(|h| match h {
                    Host::Domain(d) => normalize(d),
                    other => other.to_string(),
                })
            })
            .filter(|h| !h.is_empty())
            .ok_or_else(refuse)?;
        Ok(if wild {
            HostPattern::Suffix(ascii)
        } else {
            HostPattern::Exact(ascii)
        })
    }

    pub fn matches(&self, host: &str) -> bool {
        match self {
            HostPattern::Exact(h) => h == host,
            HostPattern::Suffix(s) => host
                .strip_suffix(s.as_str())
                .is_some_and(|head| head.len() > 1 && head.ends_with('.')),
        }
    }
}

/// True when `host` is allowed by `patterns` (an empty list allows any host).
pub fn allowed(patterns: &[HostPattern], host: &str) -> bool {
    patterns.is_empty() || patterns.iter().any(|p| p.matches(host))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip_of(raw: &str) -> Option<IpAddr> {
        parse(raw).ok().and_then(|t| t.ip)
    }

    #[test]
    fn every_spelling_of_loopback_becomes_127_0_0_1() {
        for raw in [
            "http://2130706433/",
            "http://0177.0.0.1/",
            "http://0x7f.1/",
            "http://0x7f000001/",
            "http://127.1/",
            "http://127.0.0.1./",
            "HTTP://127.0.0.1/",
        ] {
            assert_eq!(ip_of(raw), Some("127.0.0.1".parse().unwrap()), "{raw}");
        }
        assert_eq!(
            ip_of("http://[::ffff:127.0.0.1]/"),
            Some("::ffff:7f00:1".parse().unwrap())
        );
        assert_eq!(
            ip_of("http://[::ffff:7f00:1]/"),
            Some("::ffff:7f00:1".parse().unwrap())
        );
    }

    #[test]
    fn userinfo_backslashes_and_odd_schemes_are_refused_with_the_rule() {
        let e = parse("http://allowed.example@127.0.0.1/").unwrap_err();
        assert!(e.contains("credentials"), "{e}");
        let e = parse("http://user:pw@code.example/x.py").unwrap_err();
        assert!(e.contains("credentials"), "{e}");
        let e = parse("http://allowed.example\\@127.0.0.1/").unwrap_err();
        assert!(e.contains("backslash"), "{e}");
        let e = parse("file:///etc/passwd").unwrap_err();
        assert!(e.contains("scheme"), "{e}");
        let e = parse("ftp://code.example/x.py").unwrap_err();
        assert!(e.contains("scheme"), "{e}");
        let e = parse("gopher://127.0.0.1:6379/_FLUSHALL").unwrap_err();
        assert!(e.contains("scheme"), "{e}");
        let e = parse("/relative/path.py").unwrap_err();
        assert!(e.contains("not an absolute URL"), "{e}");
        let e = parse("http://code.example/a b.py").unwrap_err();
        assert!(e.contains("whitespace"), "{e}");
    }

    #[test]
    fn hosts_are_compared_lower_case_without_trailing_dot_and_in_ascii() {
        let t = parse("https://Code.EXAMPLE./worker.py").unwrap();
        assert_eq!((t.host.as_str(), t.port), ("code.example", 443));
        let idn = parse("https://bücher.example/w.py").unwrap();
        assert_eq!(idn.host, "xn--bcher-kva.example");
        let p = HostPattern::parse("Bücher.Example.").unwrap();
        assert!(p.matches(&idn.host));
    }

    #[test]
    fn allow_list_matches_exact_hosts_and_wildcard_subdomains_only() {
        let list: Vec<HostPattern> = ["code.example", "*.cdn.example"]
            .iter()
            .map(|e| HostPattern::parse(e).unwrap())
            .collect();
        assert!(allowed(&list, "code.example"));
        assert!(allowed(&list, "a.cdn.example"));
        assert!(allowed(&list, "a.b.cdn.example"));
        assert!(!allowed(&list, "cdn.example"));
        assert!(!allowed(&list, "evilcdn.example"));
        assert!(!allowed(&list, "code.example.evil"));
        assert!(!allowed(&list, "xcode.example"));
        assert!(allowed(&[], "anything.example"));
        assert!(HostPattern::parse("http://x.example/").is_err());
        assert!(HostPattern::parse("a*.example").is_err());
        assert!(HostPattern::parse("").is_err());
    }
}
