"""Which client certificates a server lets in by name: tlshd's ``x509.client_allowed_sans``.

Pure (no I/O): :class:`AllowedSans` holds the list as configured and :meth:`AllowedSans.check`
judges one DER certificate -- the client's own (leaf) certificate, after OpenSSL verified its
chain against the truststore. The engine (:mod:`ktlsd.tls.handshake`) calls it from
OpenSSL's verification, so a refused client gets a ``bad_certificate`` alert at once and the
handshake fails with ``UNTRUSTED_CERTIFICATE`` (DONE status EACCES, as tlshd).

The rules are tlshd's (ktls-utils pull request #150: commits 0a90888, 20a30e0, 7f9cee7, not
in any release as of 1.4.0), except where marked:

* the list is a GLib string list: ``name;name;...`` (the configuration reader splits it);
* only the leaf certificate is examined (tlshd's first version examined every certificate
  the client sent; 20a30e0 fixed that);
* only its subjectAltName entries of type dNSName and iPAddress count; the subject's common
  name is never consulted (no CN fallback), nor e-mail, URI or other-name entries;
* a DNS SAN matches an entry equal to it ignoring ASCII case (tlshd: byte-exact ``strcmp``;
  DNS names are case-insensitive, RFC 4343 and RFC 5280 section 7.2, so this lets in the
  same names only);
* an IP SAN matches an entry that is the same address, IPv4 or IPv6 (tlshd compares the
  ``inet_ntop`` text, so only the canonical spelling such as ``2001:db8::1`` works there; any
  spelling of the same address works here);
* no wildcards either way: ``*.example.com`` in the list matches only a certificate SAN that
  is literally ``*.example.com``, and such a SAN matches only that entry;
* a certificate whose SAN extension cannot be read, or with an iPAddress SAN that is not 4
  or 16 bytes long, is refused (tlshd: the same, since 7f9cee7);
* no SAN extension, or no DNS/IP SAN in the list: refused.

An empty list allows every certificate the truststore accepts (tlshd: the list is "optional"
since 7f9cee7). Whether a client must send a certificate at all is the server's
``client_auth``; tlshd applies the list only with ``x509.client_auth = true`` -- ktlsd's
configuration makes a list imply it (see :mod:`ktlsd.config`).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from cryptography import x509

__all__ = ["AllowedSans", "SanCheck"]

_SHOWN_SANS = 4  # SANs named in a refusal, at most (a certificate may carry hundreds)
_SHOWN_CHARS = 64  # of each

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def _ascii_lower(text: str) -> str:
    return text.translate(_LOWER)


_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def _ip(text: str) -> IpAddress | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _shown(text: str) -> str:
    """A SAN as it may appear in a log line: printable ASCII, bounded."""
    short = text[:_SHOWN_CHARS]
    printable = "".join(c if " " < c < "\x7f" else f"\\x{ord(c):02x}" for c in short)
    return printable + ("..." if len(text) > _SHOWN_CHARS else "")


@dataclass(frozen=True)
class SanCheck:
    """The verdict on one certificate: ``allowed``, the SAN that matched, and the DNS/IP SANs
    the certificate carries (``DNS:name``/``IP:address``) or why they could not be read."""

    allowed: bool
    matched: str | None = None
    presented: tuple[str, ...] = ()
    problem: str | None = None

    @property
    def reason(self) -> str:
        """One line for a refusal: the SANs the certificate carries (not secrets)."""
        if self.allowed:
            return f"client certificate SAN {self.matched} is allowed"
        if self.problem is not None:
            return f"client certificate refused: {self.problem}"
        if not self.presented:
            return ("client certificate has no DNS or IP SAN "
                    "(x509.client_allowed_sans is set)")
        shown = ", ".join(_shown(s) for s in self.presented[:_SHOWN_SANS])
        if len(self.presented) > _SHOWN_SANS:
            shown += f" and {len(self.presented) - _SHOWN_SANS} more"
        plural = "s" if len(self.presented) > 1 else ""
        return f"client certificate SAN{plural} {shown} not in x509.client_allowed_sans"


@dataclass(frozen=True)
class AllowedSans:
    """The configured names (``entries``, as written); empty allows every certificate."""

    entries: tuple[str, ...] = ()
    _dns: frozenset[str] = field(init=False, repr=False, compare=False)
    _ips: frozenset[IpAddress] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        ips = {ip for ip in map(_ip, self.entries) if ip is not None}
        # Every entry is also a candidate DNS name (tlshd compares each entry with both).
        object.__setattr__(self, "_dns", frozenset(_ascii_lower(e) for e in self.entries))
        object.__setattr__(self, "_ips", frozenset(ips))

    def __bool__(self) -> bool:
        return bool(self.entries)

    def check(self, certificate: bytes) -> SanCheck:
        """Judge a DER certificate (the client's leaf) against the list."""
        if not self.entries:
            return SanCheck(allowed=True)
        try:
            cert = x509.load_der_x509_certificate(certificate)
            try:
                names = cert.extensions.get_extension_for_class(
                    x509.SubjectAlternativeName
                ).value
            except x509.ExtensionNotFound:
                return SanCheck(allowed=False)
            general_names = list(names)
        except (ValueError, x509.DuplicateExtension) as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            return SanCheck(allowed=False,
                            problem=f"its subjectAltName cannot be read ({_shown(first)})")
        presented: list[str] = []
        for general_name in general_names:  # in certificate order, as tlshd reads them
            if isinstance(general_name, x509.DNSName):
                name = general_name.value
                presented.append(f"DNS:{name}")
                if _ascii_lower(name) in self._dns:
                    return SanCheck(allowed=True, matched=presented[-1])
            elif isinstance(general_name, x509.IPAddress):
                address = general_name.value
                if not isinstance(address, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
                    # 8 or 32 bytes: an address with a netmask, which has no place in a SAN
                    return SanCheck(allowed=False,
                                    problem=f"its IP SAN {address} is not a single address")
                presented.append(f"IP:{address}")
                if address in self._ips:
                    return SanCheck(allowed=True, matched=presented[-1])
        return SanCheck(allowed=False, presented=tuple(presented))
