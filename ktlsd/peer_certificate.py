"""The fields of a peer's certificate that TLS session tags look at, formatted as GnuTLS
formats them for tlshd (:mod:`ktlsd.session_tags`), from the certificate's DER.

tlshd 1.4 matches its tag filters against strings GnuTLS produces; a tag file written for
tlshd must match the same certificates here, so each field is produced the way GnuTLS does
(checked against ``certtool -i`` in tests/test_session_tags.py):

* **DN** (``gnutls_x509_crt_get_dn3(..., 0)`` / ``get_issuer_dn3``): RFC 4514 order, the last
  RDN first; ``+`` between the values of a multi-valued RDN (in DER order), ``,`` between
  RDNs; GnuTLS's attribute names (lib/x509/common.c: ``CN``, ``OU``, ``O``, ``L``, ``ST``,
  ``C``, ``DC``, ``UID``, ``EMAIL``, ``street``, ``title``, ``serialNumber``, ...), other
  attributes as the dotted OID with ``#`` and the hex of the whole DER value, and so is a
  value of the wrong string type, with a NUL, or undecodable. DirectoryString values as
  their bytes (UTF8String, PrintableString; a TeletexString when it is printable ASCII), a
  BMPString as UTF-8; UniversalString and other TeletexString as ``\\#`` and the hex of
  the content (GnuTLS escapes the ``#`` it made itself). RFC 4514 escapes with a backslash:
  ``, + " \\ < > ;`` anywhere, ``#`` or space first, space last. An empty Name or an empty
  DirectoryString: no DN (GnuTLS fails).
* **serial**: lower-case hex of the INTEGER's content octets (``00`` first when the high bit
  is set: ``gnutls_x509_crt_get_serial``); **version** ``1``..``3``.
* **signature algorithm**: GnuTLS's name (lib/algorithms/sign.c) for the outer
  signatureAlgorithm OID, ``RSA-PSS-SHA256/384/512`` by the PSS hash parameter; otherwise the
  dotted OID (as tlshd's fallback to ``gnutls_x509_crt_get_signature_oid``).
* **validity**: seconds since the epoch; **key usage**: the set bits' names, None without the
  extension; **fingerprints**: lower-case hex SHA-1 and SHA-256 of the DER.

Pure functions over bytes; a certificate this reader cannot walk gives no fields at all (no
filter matches), as a certificate GnuTLS cannot import gives tlshd none.
"""

from __future__ import annotations

from dataclasses import dataclass

KEY_USAGE_BITS = (
    "digitalSignature", "nonRepudiation", "keyEncipherment", "dataEncipherment",
    "keyAgreement", "keyCertSign", "cRLSign", "encipherOnly", "decipherOnly",
)
"""RFC 5280 KeyUsage bit names, in bit order (bit 0 first), as tag files spell them."""




class _DerError(ValueError):
    pass


def _tlv(data: bytes, pos: int) -> tuple[int, int, int, int]:
    """(tag, content start, content end, header start) of the element at ``pos``."""
    if pos + 2 > len(data):
        raise _DerError("truncated")
    tag = data[pos]
    if tag & 0x1F == 0x1F:
        raise _DerError("high tag number")
    first = data[pos + 1]
    start = pos + 2
    if first < 0x80:
        length = first
    else:
        count = first & 0x7F
        if count == 0 or count > 4 or start + count > len(data):
            raise _DerError("bad length")
        length = int.from_bytes(data[start:start + count], "big")
        start += count
    end = start + length
    if end > len(data):
        raise _DerError("truncated")
    return tag, start, end, pos


def _children(data: bytes, start: int, end: int) -> list[tuple[int, int, int, int]]:
    out = []
    pos = start
    while pos < end:
        element = _tlv(data, pos)
        if element[2] > end:
            raise _DerError("element overruns its parent")
        out.append(element)
        pos = element[2]
    return out


def _oid(content: bytes) -> str:
    if not content:
        raise _DerError("empty OID")
    arcs: list[int] = []
    value = 0
    for byte in content:
        value = (value << 7) | (byte & 0x7F)
        if not byte & 0x80:
            arcs.append(value)
            value = 0
    first = arcs[0]
    head = [0, first] if first < 40 else [1, first - 40] if first < 80 else [2, first - 80]
    return ".".join(str(a) for a in head + arcs[1:])


# GnuTLS's DN attribute table (lib/x509/common.c _oid2str): name, and how the value decodes:
# "dir" = DirectoryString CHOICE, else the one string tag allowed.
_PRINTABLE, _IA5, _UTF8, _NUMERIC = 0x13, 0x16, 0x0C, 0x12
_DN_ATTRIBUTES: dict[str, tuple[str, str | int]] = {
    "1.3.6.1.5.5.7.9.2": ("placeOfBirth", "dir"),
    "1.3.6.1.5.5.7.9.3": ("gender", _PRINTABLE),
    "1.3.6.1.5.5.7.9.4": ("countryOfCitizenship", _PRINTABLE),
    "1.3.6.1.5.5.7.9.5": ("countryOfResidence", _PRINTABLE),
    "2.5.4.6": ("C", _PRINTABLE),
    "2.5.4.9": ("street", "dir"),
    "2.5.4.12": ("title", "dir"),
    "2.5.4.10": ("O", "dir"),
    "2.5.4.11": ("OU", "dir"),
    "2.5.4.3": ("CN", "dir"),
    "2.5.4.7": ("L", "dir"),
    "2.5.4.8": ("ST", "dir"),
    "2.5.4.13": ("description", "dir"),
    "2.5.4.5": ("serialNumber", _PRINTABLE),
    "2.5.4.20": ("telephoneNumber", _PRINTABLE),
    "2.5.4.4": ("surName", "dir"),
    "2.5.4.43": ("initials", "dir"),
    "2.5.4.44": ("generationQualifier", "dir"),
    "2.5.4.42": ("givenName", "dir"),
    "2.5.4.65": ("pseudonym", "dir"),
    "2.5.4.46": ("dnQualifier", _PRINTABLE),
    "2.5.4.17": ("postalCode", "dir"),
    "2.5.4.41": ("name", "dir"),
    "2.5.4.15": ("businessCategory", "dir"),
    "0.9.2342.19200300.100.1.25": ("DC", _IA5),
    "0.9.2342.19200300.100.1.1": ("UID", "dir"),
    "1.2.840.113556.1.4.656": ("userPrincipalName", "dir"),
    "1.3.6.1.4.1.311.60.2.1.1": ("jurisdictionOfIncorporationLocalityName", "dir"),
    "1.3.6.1.4.1.311.60.2.1.2": ("jurisdictionOfIncorporationStateOrProvinceName", "dir"),
    "1.3.6.1.4.1.311.60.2.1.3": ("jurisdictionOfIncorporationCountryName", _PRINTABLE),
    "1.2.840.113549.1.9.1": ("EMAIL", _IA5),
    "1.3.6.1.5.5.7.8.5": ("XmppAddr", _UTF8),
    "1.2.643.100.1": ("OGRN", _NUMERIC),
    "1.2.643.100.3": ("SNILS", _NUMERIC),
    "1.2.643.100.5": ("OGRNIP", _NUMERIC),
    "1.2.643.3.131.1.1": ("INN", _NUMERIC),
}
_TELETEX, _UNIVERSAL, _BMP = 0x14, 0x1C, 0x1E
_DIRECTORY_STRING = frozenset({_TELETEX, _PRINTABLE, _UNIVERSAL, _UTF8, _BMP})
_ESCAPED = frozenset(b',+"\\<>;')


def _hex(data: bytes) -> str:
    return "#" + data.hex()


def _escape(value: bytes) -> bytes:
    """RFC 4514 escaping as GnuTLS's ``str_escape``."""
    out = bytearray()
    last = len(value) - 1
    for i, byte in enumerate(value):
        if byte in _ESCAPED or (i == 0 and byte in b"# ") or (i == last and byte == 0x20):
            out.append(0x5C)
        out.append(byte)
    return bytes(out)


def _dn_value(oid: str, tlv: bytes) -> bytes:
    """One attribute value as ``_gnutls_x509_dn_to_string``: decoded and escaped, or
    ``#`` and the hex of the whole DER value when unknown or undecodable."""
    entry = _DN_ATTRIBUTES.get(oid)
    if entry is None:
        return _hex(tlv).encode()
    try:
        tag, start, end, _ = _tlv(tlv, 0)
        if end != len(tlv):
            raise _DerError("trailing bytes")
        content = tlv[start:end]
        kind = entry[1]
        if kind == "dir":
            if tag not in _DIRECTORY_STRING:
                raise _DerError("not a DirectoryString")
            if tag == _TELETEX:
                text = content if all(0x20 <= b < 0x7F for b in content) \
                    else _hex(content).encode()
            elif tag == _BMP:
                try:
                    text = content.decode("utf-16-be").encode("utf-8")
                except UnicodeError:
                    text = _hex(content).encode()
            elif tag == _UNIVERSAL:
                text = _hex(content).encode()
            else:
                text = content
        else:
            if tag != kind:
                raise _DerError("unexpected string type")
            text = content
        if b"\0" in text:
            raise _DerError("embedded NUL")
    except _DerError:
        return _hex(tlv).encode()
    return _escape(text)


def _dn_string(der: bytes, start: int, end: int) -> str | None:
    """A Name as ``gnutls_x509_crt_get_dn3(..., 0)``; None where GnuTLS fails (an empty
    Name, an empty DirectoryString)."""
    rdns = _children(der, start, end)
    if not rdns:
        return None
    parts: list[bytes] = []
    for rdn_tag, rdn_start, rdn_end, _ in reversed(rdns):
        if rdn_tag != 0x31:
            raise _DerError("RDN is not a SET")
        values = []
        for atv_tag, atv_start, atv_end, _ in _children(der, rdn_start, rdn_end):
            if atv_tag != 0x30:
                raise _DerError("attribute is not a SEQUENCE")
            inner = _children(der, atv_start, atv_end)
            if len(inner) != 2 or inner[0][0] != 0x06:
                raise _DerError("bad attribute")
            oid = _oid(der[inner[0][1]:inner[0][2]])
            tlv = der[inner[1][3]:inner[1][2]]
            entry = _DN_ATTRIBUTES.get(oid)
            if entry is not None and entry[1] == "dir" and len(tlv) > 1 and tlv[1] == 0:
                return None  # GnuTLS refuses an empty DirectoryString
            name = entry[0] if entry is not None else oid
            values.append(name.encode() + b"=" + _dn_value(oid, tlv))
        parts.append(b"+".join(values))
    return b",".join(parts).decode("utf-8", "surrogateescape")


_HASHES = {"2.16.840.1.101.3.4.2.1": "SHA256", "2.16.840.1.101.3.4.2.2": "SHA384",
           "2.16.840.1.101.3.4.2.3": "SHA512"}
_RSA_PSS = "1.2.840.113549.1.1.10"
_SIGNATURE_NAMES = {
    "1.2.840.113549.1.1.11": "RSA-SHA256", "1.2.840.113549.1.1.12": "RSA-SHA384",
    "1.2.840.113549.1.1.13": "RSA-SHA512", "1.2.840.113549.1.1.14": "RSA-SHA224",
    "1.2.840.113549.1.1.5": "RSA-SHA1", "1.3.14.3.2.29": "RSA-SHA1",
    "1.2.840.113549.1.1.4": "RSA-MD5", "1.3.14.3.2.25": "RSA-MD5",
    "1.2.840.113549.1.1.2": "RSA-MD2", "1.3.36.3.3.1.2": "RSA-RMD160",
    "1.3.101.112": "EdDSA-Ed25519", "1.3.101.113": "EdDSA-Ed448",
    "1.2.840.10045.4.3.2": "ECDSA-SHA256", "1.2.840.10045.4.3.3": "ECDSA-SHA384",
    "1.2.840.10045.4.3.4": "ECDSA-SHA512", "1.2.840.10045.4.1": "ECDSA-SHA1",
    "1.2.840.10045.4.3.1": "ECDSA-SHA224",
    "2.16.840.1.101.3.4.3.9": "ECDSA-SHA3-224", "2.16.840.1.101.3.4.3.10": "ECDSA-SHA3-256",
    "2.16.840.1.101.3.4.3.11": "ECDSA-SHA3-384", "2.16.840.1.101.3.4.3.12": "ECDSA-SHA3-512",
    "2.16.840.1.101.3.4.3.13": "RSA-SHA3-224", "2.16.840.1.101.3.4.3.14": "RSA-SHA3-256",
    "2.16.840.1.101.3.4.3.15": "RSA-SHA3-384", "2.16.840.1.101.3.4.3.16": "RSA-SHA3-512",
    "2.16.840.1.101.3.4.3.5": "DSA-SHA3-224", "2.16.840.1.101.3.4.3.6": "DSA-SHA3-256",
    "2.16.840.1.101.3.4.3.7": "DSA-SHA3-384", "2.16.840.1.101.3.4.3.8": "DSA-SHA3-512",
    "1.2.840.10040.4.3": "DSA-SHA1", "1.3.14.3.2.27": "DSA-SHA1",
    "2.16.840.1.101.3.4.3.1": "DSA-SHA224", "2.16.840.1.101.3.4.3.2": "DSA-SHA256",
    "2.16.840.1.101.3.4.3.3": "DSA-SHA384", "2.16.840.1.101.3.4.3.4": "DSA-SHA512",
    "2.16.840.1.101.3.4.3.17": "ML-DSA-44", "2.16.840.1.101.3.4.3.18": "ML-DSA-65",
    "2.16.840.1.101.3.4.3.19": "ML-DSA-87",
}
"""GnuTLS's signature algorithm names (lib/algorithms/sign.c) by OID."""


def _signature_name(der: bytes, start: int, end: int) -> str:
    parts = _children(der, start, end)
    if not parts or parts[0][0] != 0x06:
        raise _DerError("bad AlgorithmIdentifier")
    oid = _oid(der[parts[0][1]:parts[0][2]])
    if oid != _RSA_PSS:
        return _SIGNATURE_NAMES.get(oid, oid)
    hash_oid = "1.3.14.3.2.26"  # RSASSA-PSS-params default: SHA-1 (no GnuTLS name)
    if len(parts) > 1 and parts[1][0] == 0x30:
        for tag, p_start, p_end, _ in _children(der, parts[1][1], parts[1][2]):
            if tag == 0xA0:
                algorithm = _children(der, p_start, p_end)
                inner = _children(der, algorithm[0][1], algorithm[0][2])
                hash_oid = _oid(der[inner[0][1]:inner[0][2]])
    hash_name = _HASHES.get(hash_oid)
    return f"RSA-PSS-{hash_name}" if hash_name else oid


def _der_time(tag: int, content: bytes) -> int:
    text = content.decode("ascii")
    if not text.endswith("Z"):
        raise _DerError("time without Z")
    if tag == 0x17:  # UTCTime YYMMDDHHMMSSZ
        year = int(text[:2])
        year += 2000 if year < 50 else 1900
        rest = text[2:-1]
    elif tag == 0x18:  # GeneralizedTime YYYYMMDDHHMMSSZ
        year = int(text[:4])
        rest = text[4:-1]
    else:
        raise _DerError("not a time")
    if len(rest) != 10 or not rest.isdigit():
        raise _DerError("bad time")
    import calendar

    return calendar.timegm((year, int(rest[0:2]), int(rest[2:4]), int(rest[4:6]),
                            int(rest[6:8]), int(rest[8:10]), 0, 0, 0))


_KEY_USAGE_OID = "2.5.29.15"


@dataclass(frozen=True)
class CertificateFields:
    """A certificate's fields as GnuTLS formats them; None where GnuTLS gives nothing."""

    version: str
    serial: str
    issuer: str | None
    subject: str | None
    not_before: int
    not_after: int
    signature_algorithm: str
    key_usage: frozenset[str] | None
    sha1: str
    sha256: str


def certificate_fields(der: bytes) -> CertificateFields | None:
    """The fields of the certificate ``der``; None when it cannot be walked."""
    import hashlib  # not before the agent is ready (tests/test_cli.py): first handshake only

    try:
        tag, start, end, _ = _tlv(der, 0)
        top = _children(der, start, end)
        if tag != 0x30 or len(top) != 3:
            raise _DerError("not a Certificate")
        tbs = _children(der, top[0][1], top[0][2])
        index = 0
        version = 1
        if tbs[0][0] == 0xA0:
            inner = _children(der, tbs[0][1], tbs[0][2])
            version = int.from_bytes(der[inner[0][1]:inner[0][2]], "big") + 1
            index = 1
        serial = tbs[index]
        issuer, validity, subject = tbs[index + 2], tbs[index + 3], tbs[index + 4]
        times = _children(der, validity[1], validity[2])
        key_usage: frozenset[str] | None = None
        for element in tbs[index + 6:]:
            if element[0] != 0xA3:
                continue
            extensions = _children(der, element[1], element[2])
            for extension in _children(der, extensions[0][1], extensions[0][2]):
                parts = _children(der, extension[1], extension[2])
                if _oid(der[parts[0][1]:parts[0][2]]) == _KEY_USAGE_OID:
                    key_usage = _key_usage(der, parts[-1])
        return CertificateFields(
            version=str(version),
            serial=der[serial[1]:serial[2]].hex(),
            issuer=_dn_string(der, issuer[1], issuer[2]),
            subject=_dn_string(der, subject[1], subject[2]),
            not_before=_der_time(times[0][0], der[times[0][1]:times[0][2]]),
            not_after=_der_time(times[1][0], der[times[1][1]:times[1][2]]),
            signature_algorithm=_signature_name(der, top[1][1], top[1][2]),
            key_usage=key_usage,
            sha1=hashlib.sha1(der).hexdigest(),
            sha256=hashlib.sha256(der).hexdigest(),
        )
    except (_DerError, IndexError, ValueError, UnicodeDecodeError):
        return None


def _key_usage(der: bytes, octets: tuple[int, int, int, int]) -> frozenset[str]:
    """The KeyUsage BIT STRING inside the extension's OCTET STRING: the set bits' names."""
    _, start, end, _ = _tlv(der, octets[1])
    content = der[start + 1:end] if end > start else b""
    value = int.from_bytes(content, "big") if content else 0
    width = len(content) * 8
    return frozenset(name for bit, name in enumerate(KEY_USAGE_BITS)
                     if bit < width and value >> (width - 1 - bit) & 1)
