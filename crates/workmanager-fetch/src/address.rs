//! Which addresses a code source may live at: only globally routable ones.
//!
//! `refusal` names the first rule an address breaks, in words a user can act
//! on ("a link-local address (169.254.0.0/16, cloud metadata)"), or `None`
//! for a public address. IPv6 forms that carry an IPv4 address (mapped,
//! compatible, NAT64, 6to4) are judged by the IPv4 address they carry, so
//! `[::ffff:127.0.0.1]` is loopback like `127.0.0.1`.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Why `ip` may not be a code source, or `None` when it is public.
pub fn refusal(ip: IpAddr) -> Option<String> {
    match ip {
        IpAddr::V4(v4) => v4_refusal(v4).map(str::to_string),
        IpAddr::V6(v6) => v6_refusal(v6),
    }
}

fn in_v4(ip: Ipv4Addr, net: [u8; 4], prefix: u32) -> bool {
    let mask = if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - prefix)
    };
    u32::from(ip) & mask == u32::from(Ipv4Addr::from(net)) & mask
}

/// IPv4 special-purpose ranges (IANA registry) that are not globally routable.
const V4_BLOCKED: &[([u8; 4], u32, &str)] = &[
    (
        [0, 0, 0, 0],
        8,
        "an unspecified or \"this network\" address (0.0.0.0/8)",
    ),
    ([10, 0, 0, 0], 8, "a private address (10.0.0.0/8)"),
    (
        [100, 64, 0, 0],
        10,
        "a shared carrier-grade NAT address (100.64.0.0/10)",
    ),
    ([127, 0, 0, 0], 8, "a loopback address (127.0.0.0/8)"),
    (
        [169, 254, 0, 0],
        16,
        "a link-local address (169.254.0.0/16, cloud metadata)",
    ),
    ([172, 16, 0, 0], 12, "a private address (172.16.0.0/12)"),
    (
        [192, 0, 0, 0],
        24,
        "an IETF protocol address (192.0.0.0/24)",
    ),
    ([192, 0, 2, 0], 24, "a documentation address (192.0.2.0/24)"),
    (
        [192, 88, 99, 0],
        24,
        "a 6to4 relay anycast address (192.88.99.0/24)",
    ),
    ([192, 168, 0, 0], 16, "a private address (192.168.0.0/16)"),
    (
        [198, 18, 0, 0],
        15,
        "a benchmarking address (198.18.0.0/15)",
    ),
    (
        [198, 51, 100, 0],
        24,
        "a documentation address (198.51.100.0/24)",
    ),
    (
        [203, 0, 113, 0],
        24,
        "a documentation address (203.0.113.0/24)",
    ),
    ([224, 0, 0, 0], 4, "a multicast address (224.0.0.0/4)"),
    ([255, 255, 255, 255], 32, "the broadcast address"),
    ([240, 0, 0, 0], 4, "a reserved address (240.0.0.0/4)"),
];

fn v4_refusal(ip: Ipv4Addr) -> Option<&'static str> {
    V4_BLOCKED
        .iter()
        .find(|(net, prefix, _)| in_v4(ip, *net, *prefix))
        .map(|(_, _, why)| *why)
}

/// The IPv4 address carried by two 16-bit groups of an IPv6 address.
fn v4_in(hi: u16, lo: u16) -> Ipv4Addr {
    Ipv4Addr::from((u32::from(hi) << 16) | u32::from(lo))
}

fn v6_refusal(ip: Ipv6Addr) -> Option<String> {
    let s = ip.segments();
    let embedded = |v4: Ipv4Addr, form: &str| {
        v4_refusal(v4).map(|why| format!("{why}, written as an {form} IPv6 address"))
    };
    if ip.is_unspecified() {
        return Some("the unspecified address (::)".into());
    }
    if ip.is_loopback() {
        return Some("a loopback address (::1)".into());
    }
    // ::ffff:a.b.c.d — IPv4-mapped.
    if let Some(v4) = ip.to_ipv4_mapped() {
        return embedded(v4, "IPv4-mapped");
    }
    // ::a.b.c.d — IPv4-compatible (deprecated, still routed by some stacks).
    if s[..6] == [0; 6] {
        return embedded(v4_in(s[6], s[7]), "IPv4-compatible");
    }
    // 64:ff9b::/96 — NAT64 well-known prefix.
    if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        return embedded(v4_in(s[6], s[7]), "NAT64");
    }
    if s[0] == 0x64 && s[1] == 0xff9b && s[2] == 1 {
        return Some("a local-use NAT64 address (64:ff9b:1::/48)".into());
    }
    // 2002:aabb:ccdd::/48 — 6to4 carries aa.bb.cc.dd.
    if s[0] == 0x2002 {
        let v4 = v4_in(s[1], s[2]);
        return embedded(v4, "6to4");
    }
    let first = s[0];
    let why = if first & 0xfe00 == 0xfc00 {
        "a unique-local (private) address (fc00::/7)"
    } else if first & 0xffc0 == 0xfe80 {
        "a link-local address (fe80::/10)"
    } else if first & 0xffc0 == 0xfec0 {
        "a site-local address (fec0::/10)"
    } else if first & 0xff00 == 0xff00 {
        "a multicast address (ff00::/8)"
    } else if first == 0x2001 && s[1] == 0x0db8 {
        "a documentation address (2001:db8::/32)"
    } else if first & 0xfff0 == 0x3ff0 {
        "a documentation address (3fff::/20)"
    } else if first == 0x2001 && s[1] < 0x0200 {
        "an IETF special-purpose address (2001::/23: Teredo, benchmarking, ORCHID)"
    } else if first == 0x0100 && s[1..4] == [0, 0, 0] {
        "a discard-only address (100::/64)"
    } else if first & 0xe000 != 0x2000 {
        // Only 2000::/3 is allocated as global unicast.
        "a reserved address (outside the global unicast range 2000::/3)"
    } else {
        return None;
    };
    Some(why.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(s: &str) -> bool {
        refusal(s.parse().unwrap()).is_some()
    }

    #[test]
    fn every_special_ipv4_range_is_refused_at_both_ends() {
        for (net, prefix, _) in V4_BLOCKED {
            let lo = u32::from(Ipv4Addr::from(*net));
            let hi = lo | (u32::MAX.checked_shr(*prefix).unwrap_or(0));
            for ip in [lo, hi] {
                let ip = Ipv4Addr::from(ip);
                assert!(refusal(IpAddr::V4(ip)).is_some(), "{ip} must be refused");
            }
        }
    }

    #[test]
    fn the_seed_ranges_and_metadata_are_refused_with_their_reason() {
        for (ip, word) in [
            ("10.1.2.3", "private"),
            ("172.16.0.1", "private"),
            ("172.31.255.255", "private"),
            ("192.168.1.1", "private"),
            ("127.0.0.1", "loopback"),
            ("127.255.255.254", "loopback"),
            ("169.254.169.254", "link-local"),
            ("100.64.0.1", "carrier-grade"),
            ("0.0.0.0", "unspecified"),
            ("255.255.255.255", "broadcast"),
            ("224.0.0.1", "multicast"),
            ("::1", "loopback"),
            ("::", "unspecified"),
            ("fc00::1", "unique-local"),
            ("fd12:3456::1", "unique-local"),
            ("fe80::1", "link-local"),
            ("ff02::1", "multicast"),
            ("2001:db8::1", "documentation"),
        ] {
            let why = refusal(ip.parse().unwrap()).unwrap_or_default();
            assert!(why.contains(word), "{ip}: {why:?} should say {word}");
        }
    }

    #[test]
    fn ipv6_forms_carrying_a_blocked_ipv4_are_refused() {
        for ip in [
            "::ffff:127.0.0.1",
            "::ffff:7f00:1",
            "::ffff:169.254.169.254",
            "::127.0.0.1",
            "::10.0.0.1",
            "64:ff9b::7f00:1",
            "64:ff9b::a9fe:a9fe",
            "64:ff9b:1::1",
            "2002:7f00:1::1",
            "2002:0a00:0001::1",
            "2002:c0a8:0101::",
        ] {
            assert!(refused(ip), "{ip} must be refused");
        }
        let why = refusal("::ffff:7f00:1".parse().unwrap()).unwrap_or_default();
        assert!(
            why.contains("loopback") && why.contains("IPv4-mapped"),
            "{why}"
        );
    }

    #[test]
    fn ipv6_forms_carrying_a_public_ipv4_and_public_addresses_pass() {
        for ip in [
            "93.184.215.14",
            "8.8.8.8",
            "1.1.1.1",
            "172.32.0.1",
            "100.128.0.1",
            "192.169.0.1",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
            "2002:0808:0808::1",
            "2606:4700:4700::1111",
            "2a00:1450:4001:80b::200e",
        ] {
            assert!(
                !refused(ip),
                "{ip} is public: {:?}",
                refusal(ip.parse().unwrap())
            );
        }
    }

    #[test]
    fn reserved_and_special_ipv6_space_is_refused() {
        for ip in [
            "100::1",
            "2001::1",
            "2001:2::1",
            "2001:10::1",
            "3fff::1",
            "4000::1",
            "fec0::1",
            "::2:3:4:5:6",
        ] {
            assert!(refused(ip), "{ip} must be refused");
        }
    }
}
