"""Where webhooks may go: an allow-list decision, checked when a job is submitted and again on every delivery.

By default only public addresses are reachable (OWASP's SSRF rules): loopback, private, link-local (the cloud metadata
service at 169.254.169.254 among them), shared (100.64.0.0/10), multicast, reserved and unspecified addresses are
refused, as are URLs carrying credentials and hosts that do not resolve. ``allow`` opens what an operator trusts:
host names (matched exactly, case-insensitively) and CIDR networks (``127.0.0.0/8``, ``10.1.2.3``, ``::1``).

A delivery resolves the host again, checks the address and connects to *that* address (the Host header and the TLS
server name stay the URL's), so a DNS answer that changes between the check and the connection (DNS rebinding) cannot
swap a private address in.

>>> policy = EgressPolicy()
>>> policy.problem("http://169.254.169.254/latest/meta-data").split(";")[0]
'169.254.169.254 is a link-local address'
>>> policy.problem("http://user:pw@example.com/hook")
'the webhook URL carries credentials; put a secret in the path or verify the signature instead'
>>> EgressPolicy(allow=("127.0.0.0/8",)).problem("http://127.0.0.1:9/hook") is None
True
"""
from __future__ import annotations

import ipaddress
import socket
import urllib.parse

_KINDS = (("is_loopback", "loopback"), ("is_link_local", "link-local"), ("is_multicast", "multicast"),
          ("is_unspecified", "unspecified"), ("is_reserved", "reserved"), ("is_private", "private"))


def address_kind(ip) -> "str | None":
    """Why ``ip`` is not a public unicast address (e.g. ``"private"``), or None if it is one."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    for attr, kind in _KINDS:
        if getattr(ip, attr):
            return kind
    return None if ip.is_global else "non-public"


def parse_allow(entry: str):
    """One ``--webhook-allow`` value: a CIDR network / address, or a host name (lower-cased)."""
    text = str(entry).strip()
    if not text:
        raise ValueError("--webhook-allow needs a HOST or a CIDR network, e.g. 127.0.0.1 or 10.0.0.0/8")
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        pass
    if any(c in text for c in "/:@ ") or len(text) > 253:
        raise ValueError(f"--webhook-allow {text!r} is neither a CIDR network nor a host name")
    return text.lower().rstrip(".")


class EgressPolicy:
    """The allow-list decision for webhook targets (see the module's docstring)."""

    def __init__(self, allow=(), resolve=socket.getaddrinfo):
        self.allow = tuple(parse_allow(a) for a in allow)
        self._hosts = {a for a in self.allow if isinstance(a, str)}
        self._nets = [a for a in self.allow if not isinstance(a, str)]
        self._getaddrinfo = resolve

    def _allowed_ip(self, ip) -> bool:
        return any(ip.version == n.version and ip in n for n in self._nets)

    def _resolve(self, host: str, port: int) -> list:
        try:
            infos = self._getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError, OSError) as e:
            raise LookupError(f"the webhook host {host[:100]!r} does not resolve ({e})") from None
        return [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]

    def split(self, url: str) -> tuple:
        """(scheme, host, port) of ``url``, or ValueError naming what is wrong with it."""
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("the webhook must be an http:// or https:// URL with a host")
        if parts.username is not None or parts.password is not None:
            raise ValueError("the webhook URL carries credentials; put a secret in the path or verify the "
                             "signature instead")
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            raise ValueError("the webhook URL has an invalid port") from None
        return parts.scheme, parts.hostname.lower().rstrip("."), port

    def addresses(self, url: str) -> tuple:
        """(scheme, host, port, [checked addresses]) for a delivery: every address the host resolves to must be
        allowed. Raises ValueError (a refused target) or LookupError (it does not resolve)."""
        scheme, host, port = self.split(url)
        if host in self._hosts:
            return scheme, host, port, self._resolve(host, port)
        try:
            ips = [ipaddress.ip_address(host)]
        except ValueError:
            ips = self._resolve(host, port)
        for ip in ips:
            kind = address_kind(ip)
            if kind is not None and not self._allowed_ip(ip):
                raise ValueError(f"{ip} is a {kind} address; webhooks go to public addresses unless the server "
                                 "allows it (--webhook-allow HOST|CIDR)")
        return scheme, host, port, ips

    def problem(self, url: str) -> "str | None":
        """Why ``url`` may not receive webhooks (one line), or None when it may."""
        try:
            self.addresses(url)
        except (ValueError, LookupError) as e:
            return str(e)
        return None
