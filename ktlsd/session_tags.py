"""TLS session tags, as tlshd 1.4 does them (tls-session-tags(7), ``/etc/tlshd/tags.d``).

After a successful handshake in which the agent is the TLS **server** and the request asked
for **x509** authentication (the only place tlshd 1.4 runs its matcher: ``server.c``), the
peer's leaf certificate is checked against the configured *filters*; every *tag* whose filters
all hold is attached to the session and sent in DONE (the kernel's ``tag`` attribute, when the
running kernel declares it; the service's DONE attribute ``TAG``). This module is the
sans-I/O core -- tag-file grammar, filter types, matching -- plus :func:`load_tags_directory`,
the thin driver that lists and reads the directory.

Which files, in which order
    Every directory entry whose name ends in ``.yml`` or ``.yaml`` (case-sensitive, dot files
    included, no recursion), as tlshd's ``g_dir_read_name`` loop. tlshd reads them in
    directory order (``readdir``: unspecified); ktlsd reads them sorted by name, so a tag that
    names a filter from another file works or fails the same way on every host. Entries that
    are not regular files (after symlinks) are skipped with a warning; files over
    :data:`MAX_TAG_FILE_BYTES` are refused.

File syntax (tlshd's libyaml event state machine, reproduced)
    A YAML stream of any number of documents, each a mapping whose keys are ``filters`` and
    ``tags`` (each may appear several times)::

        filters:
          NAME: {type: FILTER-TYPE, pattern: "WILDCARD", purpose: [KEY-USAGE, ...]}
        tags:
          NAME: {filter: [FILTER, "not FILTER", ...]}

    Names are 1..255 characters of ``[A-Za-z0-9_-]``. A filter needs ``type``; the pattern
    types need ``pattern`` (at most 16 ``*``/``?`` wildcards: GLib ``GPatternSpec``, ``*`` any
    run, ``?`` one character, nothing else special, whole-string match); the two validity types
    need ``pattern`` as ``YYYY-MM-DD HH:MM:SS`` (glibc ``strptime``, local time with DST off,
    as tlshd's ``mktime``); ``x509.extension.keyUsage`` needs ``purpose``. A tag may only name
    filters defined before it (earlier in the file or in an earlier file); ``not `` (one
    space) inverts a filter. Filter and tag names are unique across all files. A tag with no
    filters matches every server x509 session, one with only ``not`` filters every session
    whose peer sent no certificate, as in tlshd.

Errors, as tlshd
    The first thing tlshd's parser rejects in a file -- a YAML syntax error, an unknown key,
    filter type or key usage, an invalid or duplicate name, a tag naming an undefined filter,
    a filter that fails validation, an alias, a value of the wrong kind -- ends the reading of
    *that file*: the filters and tags completed before it stay defined, the definition being
    read and everything after it are dropped, and the next file is read. Each such problem is
    one :class:`TagProblem` (``file:line: what; the rest of the file is ignored``); tlshd's
    "extraneous" notes (a ``purpose`` on a pattern filter, a ``pattern`` on a key-usage filter)
    are problems that drop nothing. A directory that cannot be listed means no tags at start
    and, on reload, the tags already loaded are kept (tlshd refuses to start and keeps the old
    set on reload, respectively).

Filter types (the fields of the peer's *leaf* certificate, formatted as GnuTLS does)
    ``x509.tbs.subject`` / ``x509.tbs.issuer``: the DN as ``gnutls_x509_crt_get_dn3(..., 0)``:
    RFC 4514 order (last RDN first), GnuTLS attribute names (``CN``, ``OU``, ``O``, ``L``,
    ``ST``, ``C``, ``DC``, ``UID``, ``EMAIL``, ...; others as the dotted OID with ``#hex``),
    ``+`` inside a multi-valued RDN, RFC 4514 escapes; ``x509.tbs.serialNumber``: lower-case
    hex of the DER integer's content octets (a leading ``00`` kept); ``x509.tbs.version``:
    ``1``..``3``; ``x509.cert.signatureAlgorithm``: GnuTLS's name (``RSA-SHA256``,
    ``ECDSA-SHA384``, ``RSA-PSS-SHA256``, ``EdDSA-Ed25519``, ``ML-DSA-65``, ...) or the dotted
    OID; ``x509.derived.fingerprint``: lower-case hex SHA-1 or SHA-256 of the DER (either may
    match); ``x509.derived.selfSigned``: issuer DN string equals subject DN string;
    ``x509.extension.keyUsage``: every listed bit is set (no extension: no match);
    ``x509.tbs.validity.notBefore`` matches when the certificate's notBefore is **at or
    before** the given time, ``x509.tbs.validity.notAfter`` when its notAfter is **at or
    after** it -- what tlshd 1.4's code does; its man page describes both comparisons the
    other way round. ``x509.extension.extendedKeyUsage`` is documented by tlshd but not
    implemented there, so a filter of that type is an unknown type, as in tlshd. A filter on
    a field the certificate lacks (or a session without a peer certificate) does not match.

Matching never raises and never logs per handshake; it costs one DER walk of the leaf
certificate per session, done only when tags are configured.
"""

from __future__ import annotations

import calendar
import enum
import functools
import hashlib
import importlib
import logging
import os
import re
import stat
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("ktlsd.tags")

TAG_FILE_SUFFIXES = (".yml", ".yaml")
MAX_TAG_FILE_BYTES = 1 << 20
MAX_WILDCARDS = 16
MAX_NAME_LENGTH = 255
_NAME = re.compile(r"[A-Za-z0-9_-]+")


class FilterType(enum.Enum):
    """The filter types tlshd 1.4 implements (its ``tlshd_tags_static_filter_types``)."""

    SIGNATURE_ALGORITHM = "x509.cert.signatureAlgorithm"
    VERSION = "x509.tbs.version"
    SERIAL_NUMBER = "x509.tbs.serialNumber"
    ISSUER = "x509.tbs.issuer"
    NOT_BEFORE = "x509.tbs.validity.notBefore"
    NOT_AFTER = "x509.tbs.validity.notAfter"
    SUBJECT = "x509.tbs.subject"
    KEY_USAGE = "x509.extension.keyUsage"
    FINGERPRINT = "x509.derived.fingerprint"
    SELF_SIGNED = "x509.derived.selfSigned"

    @property
    def takes_pattern(self) -> bool:
        return self in _PATTERN_TYPES

    @property
    def takes_time(self) -> bool:
        return self in (FilterType.NOT_BEFORE, FilterType.NOT_AFTER)


_PATTERN_TYPES = frozenset({
    FilterType.SIGNATURE_ALGORITHM, FilterType.VERSION, FilterType.SERIAL_NUMBER,
    FilterType.ISSUER, FilterType.SUBJECT, FilterType.FINGERPRINT,
})

KEY_USAGE_BITS = (
    "digitalSignature", "nonRepudiation", "keyEncipherment", "dataEncipherment",
    "keyAgreement", "keyCertSign", "cRLSign", "encipherOnly", "decipherOnly",
)
"""RFC 5280 KeyUsage bit names, in bit order (bit 0 first), as tag files spell them."""


@dataclass(frozen=True)
class TagProblem:
    """One problem found in a tag file; ``str()`` is the one-line warning."""

    path: str
    line: int | None
    message: str
    rest_ignored: bool = True

    def __str__(self) -> str:
        where = f"{self.path}:{self.line}" if self.line is not None else self.path
        tail = "; the rest of the file is ignored" if self.rest_ignored else ""
        return f"{where}: {self.message}{tail}"


@functools.lru_cache(maxsize=256)
def glib_pattern(pattern: str) -> re.Pattern[str]:
    """GLib ``GPatternSpec`` as a regular expression: ``*`` any run, ``?`` one character,
    everything else literal, matched against the whole string."""
    parts: list[str] = []
    for char in pattern:
        if char == "*":
            if not parts or parts[-1] != ".*":
                parts.append(".*")
        elif char == "?":
            parts.append(".")
        else:
            parts.append(re.escape(char))
    return re.compile("".join(parts), re.DOTALL)


def _is_space(char: str) -> bool:
    return char in " \t\n\v\f\r"


def parse_tlshd_time(text: str) -> int | None:
    """``YYYY-MM-DD HH:MM:SS`` as tlshd reads it: glibc ``strptime`` (each number after
    optional white space, at most its width of digits, within its range; the space in the
    format matches any white space, none included; anything after the seconds ignored), then
    ``mktime`` in local time with DST off (``tm_isdst`` 0). None when it does not parse."""
    fields = (("Y", 0, 9999, 4), ("-",), ("m", 1, 12, 2), ("-",), ("d", 1, 31, 2), (" ",),
              ("H", 0, 23, 2), (":",), ("M", 0, 59, 2), (":",), ("S", 0, 61, 2))
    pos = 0
    values: list[int] = []
    for spec in fields:
        if len(spec) == 1:
            if spec[0] == " ":
                while pos < len(text) and _is_space(text[pos]):
                    pos += 1
            elif pos < len(text) and text[pos] == spec[0]:
                pos += 1
            else:
                return None
            continue
        _, low, high, width = spec
        while pos < len(text) and _is_space(text[pos]):
            pos += 1
        if pos >= len(text) or not "0" <= text[pos] <= "9":
            return None
        value = 0
        digits = 0
        while True:
            value = value * 10 + int(text[pos])
            pos += 1
            digits += 1
            if not (digits < width and value * 10 <= high and pos < len(text)
                    and "0" <= text[pos] <= "9"):
                break
        if not low <= value <= high:
            return None
        values.append(value)
    year, month, day, hour, minute, second = values
    try:
        return int(time.mktime((year, month, day, hour, minute, second, 0, 0, 0)))
    except (OverflowError, ValueError):
        return None


# --- definitions ------------------------------------------------------------------------------


@dataclass(frozen=True)
class TagFilter:
    """One filter: its type and argument (a pattern, key usage bits or a time)."""

    name: str
    type: FilterType
    path: str
    pattern: str | None = None
    purposes: frozenset[str] = frozenset()
    threshold: int | None = None  # the validity types: seconds since the epoch

    def describe(self) -> str:
        if self.type is FilterType.KEY_USAGE:
            argument = ",".join(b for b in KEY_USAGE_BITS if b in self.purposes)
        elif self.type is FilterType.SELF_SIGNED:
            argument = ""
        else:
            argument = self.pattern or ""
        return f"{self.type.value}" + (f" {argument!r}" if argument else "")


@dataclass(frozen=True)
class SessionTag:
    """One tag: the filters that must all match and those that must all not match."""

    name: str
    path: str
    filters: tuple[str, ...] = ()
    inverted: tuple[str, ...] = ()


@dataclass(frozen=True)
class TagConfig:
    """The tags read from one directory: what :meth:`match` evaluates against a peer.

    ``files`` are the tag files read (in reading order), ``problems`` what was wrong with
    them, ``note`` why nothing could be read (directory absent or unreadable, PyYAML
    missing), empty when the directory was read.
    """

    directory: str
    files: tuple[str, ...] = ()
    filters: Mapping[str, TagFilter] = field(default_factory=dict)
    tags: Mapping[str, SessionTag] = field(default_factory=dict)
    problems: tuple[TagProblem, ...] = ()
    note: str = ""
    listed: bool = True  # False: the directory could not be listed (absent, unreadable)

    @property
    def readable(self) -> bool:
        return not self.note

    def match(self, peer_certificate: bytes | None) -> tuple[str, ...]:
        """The tags a session whose peer presented ``peer_certificate`` (DER, the leaf; None:
        no certificate) gets, in definition order. Never raises."""
        if not self.tags:
            return ()
        peer = PeerCertificate(peer_certificate)
        cache: dict[str, bool] = {}

        def holds(name: str) -> bool:
            if name not in cache:
                definition = self.filters.get(name)
                cache[name] = definition is not None and peer.matches(definition)
            return cache[name]

        return tuple(
            tag.name for tag in self.tags.values()
            if not any(holds(f) for f in tag.inverted) and all(holds(f) for f in tag.filters)
        )

    def summary(self) -> str:
        """One line: how many tags and filters from how many files."""
        return (f"{len(self.tags)} tags, {len(self.filters)} filters from "
                f"{len(self.files)} files in {self.directory}")


# --- the tag-file state machine (tlshd's, event for event) ------------------------------------


@dataclass(frozen=True)
class YamlEvent:
    """A YAML parser event, as libyaml emits them; ``line`` is 1-based."""

    kind: str  # stream_start, stream_end, document_start, document_end, mapping_start,
    #            mapping_end, sequence_start, sequence_end, scalar, alias
    line: int
    value: str = ""


class _Rejected(Exception):
    """The tag file's reading stops here (tlshd's PS_FAILURE / PS_UNEXPECTED_INPUT_TOKEN)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def _check_name(name: str, what: str) -> None:
    if not 1 <= len(name.encode("utf-8", "surrogateescape")) <= MAX_NAME_LENGTH:
        raise _Rejected(f"{what} name {name!r} must be 1 to {MAX_NAME_LENGTH} characters")
    if not _NAME.fullmatch(name):
        raise _Rejected(f"{what} name {name!r} may only contain letters, digits, '_' and '-'")


class TagFileReader:
    """Builds filters and tags from the events of the tag files, one file after another.

    Feed each file's events with :meth:`read_file`; definitions accumulate across files
    (names are global, as in tlshd). Sans-I/O: the events come from the caller.
    """

    def __init__(self) -> None:
        self.filters: dict[str, TagFilter] = {}
        self.tags: dict[str, SessionTag] = {}
        self.problems: list[TagProblem] = []
        self._path = ""
        self._state = "start"
        self._filter: dict[str, Any] | None = None
        self._tag: dict[str, Any] | None = None

    def read_file(self, path: str, events: Iterable[YamlEvent]) -> None:
        """Consume one file's events until the stream ends or something is rejected.

        ``events`` may raise :class:`TagFileSyntaxError` (the YAML parser's own error): the
        definitions completed before it stay, as in tlshd.
        """
        self._path, self._state = path, "start"
        self._filter = self._tag = None
        line: int | None = None
        try:
            for event in events:
                line = event.line
                self._step(event)
                if self._state == "stop":
                    return
        except _Rejected as exc:
            self.problems.append(TagProblem(path, line, exc.message))
        except TagFileSyntaxError as exc:
            self.problems.append(TagProblem(path, exc.line, f"YAML: {exc.message}"))
        finally:
            self._filter = self._tag = None

    def _note(self, line: int, message: str) -> None:
        self.problems.append(TagProblem(self._path, line, message, rest_ignored=False))

    def _step(self, event: YamlEvent) -> None:
        state, kind, value = self._state, event.kind, event.value
        expected = _TRANSITIONS.get(state, {})
        if kind not in expected:
            shown = f"{kind} {value!r}" if kind == "scalar" else kind.replace("_", " ")
            raise _Rejected(f"unexpected {shown} ({_STATE_HELP.get(state, state)})")
        action = expected[kind]
        if action.startswith("@"):
            self._state = getattr(self, "_" + action[1:])(event)
        else:
            self._state = action

    # -- top level
    def _top_level_key(self, event: YamlEvent) -> str:
        if event.value == "filters":
            return "filters"
        if event.value == "tags":
            return "tags"
        raise _Rejected(f"unexpected top-level key {event.value!r} (filters or tags)")

    # -- filters
    def _filter_create(self, event: YamlEvent) -> str:
        _check_name(event.value, "filter")
        self._filter = {"name": event.value, "line": event.line, "type": None,
                        "pattern": None, "purposes": set()}
        return "filter_keys"

    def _filter_key(self, event: YamlEvent) -> str:
        if event.value == "type":
            return "filter_type"
        if event.value == "pattern":
            return "filter_pattern"
        if event.value == "purpose":
            return "filter_purpose_list"
        raise _Rejected(f"unexpected filter key {event.value!r} (type, pattern or purpose)")

    def _filter_type(self, event: YamlEvent) -> str:
        assert self._filter is not None
        if self._filter["type"] is not None:
            raise _Rejected(f"filter {self._filter['name']!r}: type given twice")
        try:
            self._filter["type"] = FilterType(event.value)
        except ValueError:
            raise _Rejected(f"filter type {event.value!r} is not supported") from None
        return "filter_key"

    def _filter_pattern(self, event: YamlEvent) -> str:
        assert self._filter is not None
        wildcards = sum(1 for c in event.value if c in "*?")
        if wildcards > MAX_WILDCARDS:
            raise _Rejected(f"pattern of filter {self._filter['name']!r} has too many "
                            f"wildcards ({wildcards} > {MAX_WILDCARDS})")
        self._filter["pattern"] = event.value
        return "filter_key"

    def _filter_purpose(self, event: YamlEvent) -> str:
        assert self._filter is not None
        if event.value not in KEY_USAGE_BITS:
            raise _Rejected(f"unknown key usage {event.value!r}")
        self._filter["purposes"].add(event.value)
        return "filter_purpose"

    def _filter_done(self, event: YamlEvent) -> str:
        spec, self._filter = self._filter, None
        assert spec is not None
        name, kind, pattern = spec["name"], spec["type"], spec["pattern"]
        purposes: set[str] = spec["purposes"]
        if kind is None:
            raise _Rejected(f"filter {name!r} has no type")
        threshold = None
        if kind.takes_pattern or kind.takes_time:
            if pattern is None:
                raise _Rejected(f"filter {name!r} is missing a pattern")
            if kind.takes_time:
                threshold = parse_tlshd_time(pattern)
                if threshold is None:
                    raise _Rejected(f"filter {name!r}: cannot parse time {pattern!r} "
                                    "(YYYY-MM-DD HH:MM:SS)")
            if purposes:
                self._note(spec["line"], f"filter {name!r}: key usage purpose is extraneous")
        elif kind is FilterType.KEY_USAGE:
            if not purposes:
                raise _Rejected(f"filter {name!r} is missing a key usage purpose")
            if pattern is not None:
                self._note(spec["line"], f"filter {name!r}: pattern is extraneous")
        existing = self.filters.get(name)
        if existing is not None:
            raise _Rejected(f"duplicate filter name {name!r} (defined in {existing.path} and "
                            f"{self._path})")
        self.filters[name] = TagFilter(name=name, type=kind, path=self._path, pattern=pattern,
                                       purposes=frozenset(purposes), threshold=threshold)
        return "filter"

    # -- tags
    def _tag_create(self, event: YamlEvent) -> str:
        _check_name(event.value, "tag")
        self._tag = {"name": event.value, "filters": [], "inverted": []}
        return "tag_keys"

    def _tag_key(self, event: YamlEvent) -> str:
        if event.value == "filter":
            return "tag_filter"
        raise _Rejected(f"unexpected tag key {event.value!r} (filter)")

    def _tag_filter(self, event: YamlEvent) -> str:
        assert self._tag is not None
        name, bucket = event.value, "filters"
        if name.startswith("not "):
            name, bucket = name[4:], "inverted"
        _check_name(name, "filter")
        if name not in self.filters:
            raise _Rejected(f"tag {self._tag['name']!r} names undefined filter {name!r}")
        self._tag[bucket].append(name)
        return "tag_filter_list"

    def _tag_done(self, event: YamlEvent) -> str:
        spec, self._tag = self._tag, None
        assert spec is not None
        if spec["name"] in self.tags:
            raise _Rejected(f"duplicate tag name {spec['name']!r}")
        self.tags[spec["name"]] = SessionTag(
            name=spec["name"], path=self._path, filters=tuple(spec["filters"]),
            inverted=tuple(spec["inverted"]),
        )
        return "tag"


_TRANSITIONS: dict[str, dict[str, str]] = {
    "start": {"stream_start": "stream"},
    "stream": {"document_start": "document", "stream_end": "stop"},
    "document": {"mapping_start": "top_level", "document_end": "stream"},
    "top_level": {"scalar": "@top_level_key", "mapping_end": "document"},
    "filters": {"mapping_start": "filter"},
    "filter": {"scalar": "@filter_create", "mapping_end": "top_level"},
    "filter_keys": {"mapping_start": "filter_key"},
    "filter_key": {"scalar": "@filter_key", "mapping_end": "@filter_done"},
    "filter_type": {"scalar": "@filter_type"},
    "filter_pattern": {"scalar": "@filter_pattern"},
    "filter_purpose_list": {"sequence_start": "filter_purpose"},
    "filter_purpose": {"scalar": "@filter_purpose", "sequence_end": "filter_key"},
    "tags": {"mapping_start": "tag"},
    "tag": {"scalar": "@tag_create", "mapping_end": "top_level"},
    "tag_keys": {"mapping_start": "tag_key"},
    "tag_key": {"scalar": "@tag_key", "mapping_end": "@tag_done"},
    "tag_filter": {"sequence_start": "tag_filter_list"},
    "tag_filter_list": {"scalar": "@tag_filter", "sequence_end": "tag_key"},
}
"""tlshd's transition table: state -> event kind -> next state or ``@action``."""

_STATE_HELP = {
    "document": "a document must be a mapping",
    "top_level": "expected filters or tags",
    "filters": "filters must be a mapping of names",
    "filter": "expected a filter name",
    "filter_keys": "a filter must be a mapping",
    "filter_key": "expected type, pattern or purpose",
    "filter_type": "type must be a string",
    "filter_pattern": "pattern must be a string",
    "filter_purpose_list": "purpose must be a list",
    "filter_purpose": "expected a key usage name",
    "tags": "tags must be a mapping of names",
    "tag": "expected a tag name",
    "tag_keys": "a tag must be a mapping",
    "tag_key": "expected filter",
    "tag_filter": "filter must be a list",
    "tag_filter_list": "expected a filter name",
}


# --- the YAML parser (libyaml through PyYAML) --------------------------------------------------


class TagFileSyntaxError(Exception):
    """The YAML parser rejected the file at ``line``."""

    def __init__(self, line: int | None, message: str) -> None:
        super().__init__(message)
        self.line = line
        self.message = message


class YamlUnavailable(RuntimeError):
    """PyYAML is not installed: tag files cannot be read."""


_EVENT_KINDS = {
    "StreamStartEvent": "stream_start", "StreamEndEvent": "stream_end",
    "DocumentStartEvent": "document_start", "DocumentEndEvent": "document_end",
    "MappingStartEvent": "mapping_start", "MappingEndEvent": "mapping_end",
    "SequenceStartEvent": "sequence_start", "SequenceEndEvent": "sequence_end",
    "ScalarEvent": "scalar", "AliasEvent": "alias",
}


def _yaml_module() -> Any:
    try:
        return importlib.import_module("yaml")
    except ImportError:
        raise YamlUnavailable(
            "PyYAML is not installed (Debian: python3-yaml): tag files cannot be read"
        ) from None


def yaml_events(data: bytes) -> Iterator[YamlEvent]:
    """The YAML events of ``data``, lazily, from libyaml when PyYAML was built with it (the
    parser tlshd uses), else PyYAML's Python port of it. A syntax error raises
    :class:`TagFileSyntaxError` after the events before it were yielded."""
    yaml = _yaml_module()
    loader_class = getattr(yaml, "CSafeLoader", None) or yaml.SafeLoader
    loader = loader_class(data)
    try:
        while True:
            try:
                if not loader.check_event():
                    return
                event = loader.get_event()
            except yaml.YAMLError as exc:
                mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
                line = mark.line + 1 if mark is not None else None
                problem = getattr(exc, "problem", None) or str(exc)
                raise TagFileSyntaxError(line, " ".join(str(problem).split())) from None
            kind = _EVENT_KINDS.get(type(event).__name__)
            if kind is None:
                continue
            mark = getattr(event, "start_mark", None)
            value = getattr(event, "value", None) if kind == "scalar" else None
            yield YamlEvent(kind, mark.line + 1 if mark is not None else 0, value or "")
    finally:
        loader.dispose()


# --- reading the directory (the I/O) -----------------------------------------------------------


def tag_file_names(names: Iterable[str]) -> list[str]:
    """The directory entries tlshd reads (``.yml``/``.yaml``), in ktlsd's order (sorted)."""
    return sorted(n for n in names if n.endswith(TAG_FILE_SUFFIXES))


def load_tags_directory(directory: str) -> TagConfig:
    """Read every tag file in ``directory`` (see the module docstring). Never raises."""
    try:
        entries = os.listdir(directory)
    except FileNotFoundError:
        return TagConfig(directory, note=f"{directory} does not exist: no session tags",
                         listed=False)
    except OSError as exc:
        return TagConfig(directory, note=f"cannot read {directory}: {exc.strerror or exc}",
                         listed=False)
    names = tag_file_names(entries)
    if not names:
        return TagConfig(directory)
    try:
        _yaml_module()
    except YamlUnavailable as exc:
        return TagConfig(directory, note=f"{len(names)} tag files in {directory}, but {exc}")
    reader = TagFileReader()
    files: list[str] = []
    for name in names:
        path = os.path.join(directory, name)
        try:
            data = _read_tag_file(path)
        except OSError as exc:
            reason = exc.strerror or str(exc)
            reader.problems.append(TagProblem(path, None, f"not read: {reason}",
                                              rest_ignored=False))
            continue
        files.append(path)
        reader.read_file(path, yaml_events(data))
    return TagConfig(directory, files=tuple(files), filters=reader.filters, tags=reader.tags,
                     problems=tuple(reader.problems))


def _read_tag_file(path: str) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OSError(0, "not a regular file")
        if info.st_size > MAX_TAG_FILE_BYTES:
            raise OSError(0, f"larger than {MAX_TAG_FILE_BYTES} bytes")
        chunks = []
        remaining = MAX_TAG_FILE_BYTES + 1
        while remaining > 0:
            chunk = os.read(fd, min(remaining, 1 << 16))
            if not chunk:
                break
            chunks.append(chunk)
            remaining -= len(chunk)
        if remaining <= 0:
            raise OSError(0, f"larger than {MAX_TAG_FILE_BYTES} bytes")
        return b"".join(chunks)
    finally:
        os.close(fd)


def reload_tags(previous: TagConfig, directory: str) -> TagConfig:
    """SIGHUP: read ``directory`` again; keep ``previous`` when the directory cannot be
    listed (as tlshd keeps its old tags when reloading fails)."""
    fresh = load_tags_directory(directory)
    if not fresh.listed and previous.directory == directory and previous.readable:
        log.warning("session tags: %s; keeping the %d tags loaded before", fresh.note,
                    len(previous.tags))
        return previous
    return fresh


def log_tag_config(tags: TagConfig, *, reloaded: bool = False) -> None:
    """The start-up (or reload) lines: one per problem, one summary."""
    for problem in tags.problems:
        log.warning("session tags: %s", problem)
    if tags.note:
        if not tags.listed and not os.path.lexists(tags.directory):
            log.debug("session tags: %s", tags.note)
        else:
            log.warning("session tags: %s", tags.note)
        return
    if tags.files or reloaded:
        names = ", ".join(tags.tags) or "none"
        log.info("session tags%s: %s (%s)", " reloaded" if reloaded else "", tags.summary(),
                 names)


# --- the peer certificate, field by field (DER) -------------------------------------------------


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
    return calendar.timegm((year, int(rest[0:2]), int(rest[2:4]), int(rest[4:6]),
                            int(rest[6:8]), int(rest[8:10]), 0, 0, 0))


_KEY_USAGE_OID = "2.5.29.15"


class PeerCertificate:
    """The fields of a peer's leaf certificate that tag filters look at, each formatted as
    GnuTLS gives it to tlshd, computed on first use. None for a field GnuTLS would fail to
    give (then no filter on it matches); no certificate at all matches nothing."""

    def __init__(self, der: bytes | None) -> None:
        self.der = der
        self._fields: dict[str, Any] | None = None

    def _parse(self) -> dict[str, Any]:
        if self._fields is not None:
            return self._fields
        fields: dict[str, Any] = {}
        self._fields = fields
        der = self.der
        if not der:
            return fields
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
            fields["version"] = str(version)
            serial = tbs[index]
            fields["serial"] = der[serial[1]:serial[2]].hex()
            issuer, validity, subject = tbs[index + 2], tbs[index + 3], tbs[index + 4]
            fields["issuer"] = _dn_string(der, issuer[1], issuer[2])
            fields["subject"] = _dn_string(der, subject[1], subject[2])
            times = _children(der, validity[1], validity[2])
            fields["not_before"] = _der_time(times[0][0], der[times[0][1]:times[0][2]])
            fields["not_after"] = _der_time(times[1][0], der[times[1][1]:times[1][2]])
            fields["signature"] = _signature_name(der, top[1][1], top[1][2])
            for element in tbs[index + 6:]:
                if element[0] != 0xA3:
                    continue
                extensions = _children(der, element[1], element[2])
                for extension in _children(der, extensions[0][1], extensions[0][2]):
                    parts = _children(der, extension[1], extension[2])
                    if _oid(der[parts[0][1]:parts[0][2]]) != _KEY_USAGE_OID:
                        continue
                    octets = parts[-1]
                    _, b_start, b_end, _ = _tlv(der, octets[1])
                    content = der[b_start + 1:b_end] if b_end > b_start else b""
                    value = int.from_bytes(content, "big") if content else 0
                    width = len(content) * 8
                    fields["key_usage"] = frozenset(
                        name for bit, name in enumerate(KEY_USAGE_BITS)
                        if bit < width and value >> (width - 1 - bit) & 1
                    )
            fields["sha1"] = hashlib.sha1(der).hexdigest()
            fields["sha256"] = hashlib.sha256(der).hexdigest()
        except (_DerError, IndexError, ValueError, UnicodeDecodeError):
            self._fields = fields = {}
        return fields

    def matches(self, definition: TagFilter) -> bool:
        """Whether ``definition`` holds for this certificate (tlshd's ``ft_match``)."""
        fields = self._parse()
        if not fields:
            return False
        kind = definition.type
        if kind is FilterType.KEY_USAGE:
            usage = fields.get("key_usage")
            return usage is not None and definition.purposes <= usage
        if kind is FilterType.SELF_SIGNED:
            issuer, subject = fields.get("issuer"), fields.get("subject")
            return issuer is not None and issuer == subject
        if kind is FilterType.NOT_BEFORE:
            return definition.threshold is not None and \
                definition.threshold >= fields["not_before"]
        if kind is FilterType.NOT_AFTER:
            return definition.threshold is not None and \
                definition.threshold <= fields["not_after"]
        pattern = glib_pattern(definition.pattern or "")
        if kind is FilterType.FINGERPRINT:
            return bool(pattern.fullmatch(fields["sha1"]) or pattern.fullmatch(fields["sha256"]))
        value = fields.get({
            FilterType.SIGNATURE_ALGORITHM: "signature", FilterType.VERSION: "version",
            FilterType.SERIAL_NUMBER: "serial", FilterType.ISSUER: "issuer",
            FilterType.SUBJECT: "subject",
        }[kind])
        return value is not None and pattern.fullmatch(value) is not None

    def describe(self) -> dict[str, Any]:
        """The formatted fields (for tests and ``ktlsd doctor``-style diagnostics)."""
        return dict(self._parse())
