"""``pkcs11:`` URIs (RFC 7512) naming a private key in a PKCS#11 token: parsing, and the rules
ktlsd holds them to (pure; imports only :mod:`ktlsd.settings`, nothing of the agent or the TLS
engine).

``x509.private_key`` (the agent's configuration, both roles) and ``ktlsd connect/listen --key``
take such a URI instead of a file name, e.g.
``pkcs11:token=host-keys;object=tls;type=private?pin-source=file:/etc/tlshd/token.pin``.

What is accepted:

* path attributes (``;``-separated): ``token``, ``manufacturer``, ``serial``, ``model``,
  ``library-*``, ``slot-*``, ``object``, ``id``, ``type`` (must be ``private`` when given) --
  handed to OpenSSL's PKCS#11 support unchanged; ``object`` or ``id`` is required, so a URI
  never means "whichever key comes first";
* query attributes (``&``-separated): ``pin-value`` (the PIN itself) or ``pin-source`` (a file
  holding it: ``file:/abs/path`` or ``/abs/path``), and ``x-*`` vendor attributes.
* ``module-name`` and ``module-path`` are refused: the module ktlsd loads is the
  administrator's ``[ktlsd] pkcs11_module`` (``--pkcs11-module`` for the tools), never
  something a URI chooses.

The PIN never reaches OpenSSL inside the URI (:meth:`Pkcs11Uri.for_openssl` drops it), never a
``repr``, an exception or a log line (:func:`redact`); errors name the attribute, not its value.
"""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass, field

from ktlsd.settings import redact_pin_value

SCHEME = "pkcs11:"

_PATH_ATTRIBUTES = frozenset({
    "token", "manufacturer", "serial", "model", "library-manufacturer",
    "library-description", "library-version", "object", "type", "id", "slot-manufacturer",
    "slot-description", "slot-id",
})
_PIN_ATTRIBUTES = ("pin-value", "pin-source")
_MODULE_ATTRIBUTES = ("module-name", "module-path")


def is_pkcs11_uri(text: str | None) -> bool:
    """Whether a configured key names a token key (else it is a file name)."""
    return bool(text) and text[: len(SCHEME)].lower() == SCHEME  # type: ignore[index]


def redact(text: str) -> str:
    """``text`` with any ``pin-value`` replaced, for logs and messages."""
    return redact_pin_value(text)


@dataclass(frozen=True)
class Pkcs11Uri:
    """A parsed ``pkcs11:`` key URI: what to hand to OpenSSL and where the PIN comes from.

    ``str()`` and ``repr()`` show the URI with the PIN redacted.
    """

    path: tuple[tuple[str, str], ...]
    vendor_query: tuple[tuple[str, str], ...] = ()
    pin_value: str | None = field(default=None, repr=False)
    pin_source: str | None = None

    def for_openssl(self) -> str:
        """The URI without PIN attributes (percent-encoding as written)."""
        text = SCHEME + ";".join(f"{k}={v}" for k, v in self.path)
        if self.vendor_query:
            text += "?" + "&".join(f"{k}={v}" for k, v in self.vendor_query)
        return text

    def pin_file(self) -> str | None:
        """The absolute path ``pin-source`` names, or None."""
        if self.pin_source is None:
            return None
        source = self.pin_source
        if source.lower().startswith("file:"):
            source = source[len("file:"):]
            if source.startswith("//"):  # file:///abs/path
                source = source[2:]
        return source

    def __str__(self) -> str:
        shown = self.for_openssl()
        if self.pin_value is not None or self.pin_source is not None:
            shown += "&" if "?" in shown else "?"
            shown += ("pin-value=<redacted>" if self.pin_value is not None
                      else f"pin-source={self.pin_source}")
        return shown


def parse_pkcs11_uri(text: str) -> Pkcs11Uri:
    """Parse and check a key URI; ValueError with a one-line, PIN-free reason."""
    if not is_pkcs11_uri(text):
        raise ValueError("not a pkcs11: URI")
    body = text[len(SCHEME):]
    path_text, _, query_text = body.partition("?")
    path: list[tuple[str, str]] = []
    vendor: list[tuple[str, str]] = []
    pins: dict[str, str] = {}

    def attributes(part: str, separator: str) -> list[tuple[str, str]]:
        found = []
        for item in part.split(separator):
            if not item:
                continue
            name, equals, value = item.partition("=")
            if not equals or not name:
                # Not echoed: a mistyped PIN attribute would put the PIN in the message.
                raise ValueError("an attribute is not name=value")
            found.append((name.strip().lower(), value.strip()))
        return found

    # pin-value in the path is not RFC 7512 but some tools write it there: take it as a PIN.
    for name, value in attributes(path_text, ";") + attributes(query_text, "&"):
        if name in _PIN_ATTRIBUTES:
            if name in pins:
                raise ValueError(f"{name} given twice")
            pins[name] = value
        elif name in _MODULE_ATTRIBUTES:
            raise ValueError(
                f"{name} is not accepted: ktlsd loads only the administrator's PKCS#11 module "
                "([ktlsd] pkcs11_module, or --pkcs11-module for connect/listen)"
            )
        elif name in _PATH_ATTRIBUTES:
            if any(n == name for n, _ in path):
                raise ValueError(f"{name} given twice")
            path.append((name, value))
        elif name.startswith("x-"):
            vendor.append((name, value))
        else:
            raise ValueError(f"unknown attribute {name!r}")
    names = {n for n, _ in path}
    if not names & {"object", "id"}:
        raise ValueError("name the key with object= or id=")
    key_type = dict(path).get("type")
    if key_type is not None and key_type.lower() != "private":
        raise ValueError(f"type={key_type} does not name a private key")
    if len(pins) > 1:
        raise ValueError("give pin-value or pin-source, not both")
    pin_value = pins.get("pin-value")
    pin_source = pins.get("pin-source")
    if pin_value is not None:
        pin_value = urllib.parse.unquote(pin_value)
    uri = Pkcs11Uri(path=tuple(path), vendor_query=tuple(vendor), pin_value=pin_value,
                    pin_source=urllib.parse.unquote(pin_source) if pin_source else None)
    pin_file = uri.pin_file()
    if pin_source is not None and (not pin_file or not pin_file.startswith("/")):
        raise ValueError("pin-source must be an absolute file name (file:/path or /path)")
    return uri
