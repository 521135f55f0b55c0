"""Which IP addresses the API may fetch image URLs from: the SSRF guard's one decision.

Every address a URL's host resolves to passes through `address_refusal` before the fetcher
connects (see fetch.py), on every redirect hop. The rule is an allow-list in spirit: only
globally routable unicast addresses pass. The `ipaddress` properties do most of the work;
the explicit networks below cover what they miss or what differs between Python versions
(multicast counts as "global" there, CGNAT and 192.0.0.0/24 moved between releases), and
IPv6 forms that embed an IPv4 address (mapped, 6to4, NAT64) are judged by that address.
"""

from __future__ import annotations

from collections.abc import Iterable
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network

IPAddress = IPv4Address | IPv6Address
IPNetwork = IPv4Network | IPv6Network

# Instance-metadata endpoints of the large clouds: refused even inside an allowed network.
METADATA_ADDRESSES: frozenset[IPAddress] = frozenset(
    ip_address(a)
    for a in (
        "169.254.169.254",  # AWS, GCP, Azure, OpenStack, DigitalOcean ...
        "169.254.170.2",  # AWS ECS task metadata
        "169.254.169.253",  # AWS VPC DNS
        "fd00:ec2::254",  # AWS IMDS over IPv6
        "100.100.100.200",  # Alibaba Cloud
        "192.0.0.192",  # Oracle Cloud
        "168.63.129.16",  # Azure wire server (in public address space)
    )
)

# Special-purpose ranges (RFC 6890 and successors) never reachable as a public image host.
SPECIAL_NETWORKS: tuple[IPNetwork, ...] = tuple(
    ip_network(n)
    for n in (
        "0.0.0.0/8",
        "100.64.0.0/10",
        "192.0.0.0/24",
        "192.0.2.0/24",
        "192.88.99.0/24",
        "198.18.0.0/15",
        "198.51.100.0/24",
        "203.0.113.0/24",
        "240.0.0.0/4",
        "::/96",
        "100::/64",
        "2001::/23",
        "2001:db8::/32",
        "64:ff9b:1::/48",
        "fc00::/7",
        "fe80::/10",
        "fec0::/10",
    )
)

_NAT64 = ip_network("64:ff9b::/96")


def parse_networks(values: Iterable[str]) -> tuple[IPNetwork, ...]:
    """CIDRs (or single addresses) from settings; raises ValueError on a bad one."""
    return tuple(ip_network(v.strip(), strict=False) for v in values if v.strip())


def embedded_ipv4(ip: IPv6Address) -> IPv4Address | None:
    """The IPv4 address an IPv6 address stands for, if it is one of the forms that route
    to IPv4: IPv4-mapped (::ffff:a.b.c.d), 6to4 (2002:AABB:CCDD::) or NAT64 (64:ff9b::/96)."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip in _NAT64:
        return IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def address_refusal(ip: IPAddress, allowed: Iterable[IPNetwork] = ()) -> str | None:
    """Why the fetcher must not connect to `ip` (e.g. "loopback"), or None if it may.

    `allowed` networks (operator settings: an internal image server, tests) pass although
    they are private; cloud metadata addresses never pass.
    """
    allowed = tuple(allowed)
    if isinstance(ip, IPv6Address):
        if ip.scope_id:
            ip = IPv6Address(ip.compressed.split("%", 1)[0])
        inner = embedded_ipv4(ip)
        if inner is not None:
            # Where the packets really go: judged as that IPv4 address, allow-list too.
            reason = address_refusal(inner, allowed)
            return f"an IPv6 form of {reason}" if reason else None
    if ip in METADATA_ADDRESSES:
        return "a cloud metadata address"
    if any(ip in net for net in allowed if net.version == ip.version):
        return None
    return _special_use(ip)


def _special_use(ip: IPAddress) -> str | None:
    if ip.is_loopback:
        return "a loopback address"
    if ip.is_unspecified:
        return "the unspecified address"
    if ip.is_link_local:
        return "a link-local address"
    if ip.is_multicast:
        return "a multicast address"
    if ip.is_private:
        return "a private address"
    if ip.is_reserved:
        return "a reserved address"
    if isinstance(ip, IPv6Address) and ip.is_site_local:
        return "a site-local address"
    if any(ip in net for net in SPECIAL_NETWORKS if net.version == ip.version):
        return "a special-purpose address"
    if not ip.is_global:
        return "a non-global address"
    return None
