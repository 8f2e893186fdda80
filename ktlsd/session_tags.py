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

Filter types (fields of the peer's *leaf* certificate, formatted as GnuTLS formats them for
tlshd: :mod:`ktlsd.peer_certificate`)
    ``x509.tbs.subject`` / ``x509.tbs.issuer`` (the RFC 4514 DN string),
    ``x509.tbs.serialNumber`` (lower-case hex), ``x509.tbs.version`` (``1``..``3``),
    ``x509.cert.signatureAlgorithm`` (``RSA-SHA256``, ``ECDSA-SHA384``, ``RSA-PSS-SHA256``,
    ``EdDSA-Ed25519``, ``ML-DSA-65``, ... or the dotted OID), ``x509.derived.fingerprint``
    (lower-case hex SHA-1 or SHA-256: either may match) take a wildcard pattern;
    ``x509.derived.selfSigned`` holds when the issuer DN string equals the subject's;
    ``x509.extension.keyUsage`` when every listed bit is set (no extension: no match);
    ``x509.tbs.validity.notBefore`` when the certificate's notBefore is **at or before** the
    given time, ``x509.tbs.validity.notAfter`` when its notAfter is **at or after** it -- what
    tlshd 1.4's code does; its man page describes both comparisons the other way round.
    ``x509.extension.extendedKeyUsage`` is documented by tlshd but not implemented there, so
    a filter of that type is an unknown type, as in tlshd. No filter matches a field the
    certificate lacks, nor a session without a peer certificate.

Matching never raises and never logs per handshake; it costs one DER walk of the leaf
certificate per server x509 session, done only when tags are configured.
"""

from __future__ import annotations

import enum
import functools
import importlib
import logging
import os
import re
import stat
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from ktlsd.peer_certificate import KEY_USAGE_BITS, CertificateFields, certificate_fields

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


@dataclass(frozen=True)
class GlibPattern:
    """GLib's ``GPatternSpec``: ``*`` any run of characters, ``?`` one character, everything
    else literal, matched against the whole string (:meth:`fullmatch`).

    Matched in O(len(pattern) * len(text)) at worst, whatever the pattern: a greedy scan that
    only ever backs up to the last ``*`` (no regular expression, so no exponential or
    high-degree polynomial backtracking on the agent's event loop, where every server x509
    handshake is matched against every filter).
    """

    pattern: str

    def fullmatch(self, text: str) -> bool:
        pattern = self.pattern
        p = t = 0
        star = -1  # position in the pattern just after the last '*' seen
        resume = 0  # where in the text that '*' would next try to end
        while t < len(text):
            if p < len(pattern) and pattern[p] == "*":
                star, resume = p + 1, t
                p += 1
            elif p < len(pattern) and (pattern[p] == "?" or pattern[p] == text[t]):
                p += 1
                t += 1
            elif star >= 0:  # let the last '*' take one more character
                resume += 1
                p, t = star, resume
            else:
                return False
        return all(c == "*" for c in pattern[p:])


@functools.lru_cache(maxsize=256)
def glib_pattern(pattern: str) -> GlibPattern:
    """The :class:`GlibPattern` of ``pattern`` (cached: filters are matched per handshake)."""
    return GlibPattern(pattern)


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
        fields = certificate_fields(peer_certificate) if peer_certificate else None
        cache: dict[str, bool] = {}

        def holds(name: str) -> bool:
            if name not in cache:
                definition = self.filters.get(name)
                cache[name] = (definition is not None and fields is not None
                               and filter_matches(definition, fields))
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
    """The tag file's reading stops here (tlshd's PS_FAILURE / PS_UNEXPECTED_INPUT_TOKEN).
    ``line``: where the definition at fault starts, when not at the current event."""

    def __init__(self, message: str, line: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.line = line


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
            self.problems.append(TagProblem(path, exc.line or line, exc.message))
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
        name, kind, pattern, line = spec["name"], spec["type"], spec["pattern"], spec["line"]
        purposes: set[str] = spec["purposes"]
        if kind is None:
            raise _Rejected(f"filter {name!r} has no type", line)
        threshold = None
        if kind.takes_pattern or kind.takes_time:
            if pattern is None:
                raise _Rejected(f"filter {name!r} is missing a pattern", line)
            if kind.takes_time:
                threshold = parse_tlshd_time(pattern)
                if threshold is None:
                    raise _Rejected(f"filter {name!r}: cannot parse time {pattern!r} "
                                    "(YYYY-MM-DD HH:MM:SS)", line)
            if purposes:
                self._note(spec["line"], f"filter {name!r}: key usage purpose is extraneous")
        elif kind is FilterType.KEY_USAGE:
            if not purposes:
                raise _Rejected(f"filter {name!r} is missing a key usage purpose", line)
            if pattern is not None:
                self._note(spec["line"], f"filter {name!r}: pattern is extraneous")
        existing = self.filters.get(name)
        if existing is not None:
            raise _Rejected(f"duplicate filter name {name!r} (defined in {existing.path} and "
                            f"{self._path})", line)
        self.filters[name] = TagFilter(name=name, type=kind, path=self._path, pattern=pattern,
                                       purposes=frozenset(purposes), threshold=threshold)
        return "filter"

    # -- tags
    def _tag_create(self, event: YamlEvent) -> str:
        _check_name(event.value, "tag")
        self._tag = {"name": event.value, "line": event.line, "filters": [], "inverted": []}
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
            raise _Rejected(f"duplicate tag name {spec['name']!r}", spec["line"])
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


# --- matching ------------------------------------------------------------------------------------


def filter_matches(definition: TagFilter, fields: CertificateFields) -> bool:
    """Whether ``definition`` holds for a certificate with ``fields`` (tlshd's ``ft_match``)."""
    kind = definition.type
    if kind is FilterType.KEY_USAGE:
        return fields.key_usage is not None and definition.purposes <= fields.key_usage
    if kind is FilterType.SELF_SIGNED:
        return fields.issuer is not None and fields.issuer == fields.subject
    if kind is FilterType.NOT_BEFORE:  # tlshd: threshold >= activation time
        return definition.threshold is not None and definition.threshold >= fields.not_before
    if kind is FilterType.NOT_AFTER:  # tlshd: threshold <= expiration time
        return definition.threshold is not None and definition.threshold <= fields.not_after
    pattern = glib_pattern(definition.pattern or "")
    if kind is FilterType.FINGERPRINT:
        return bool(pattern.fullmatch(fields.sha1) or pattern.fullmatch(fields.sha256))
    value = {
        FilterType.SIGNATURE_ALGORITHM: fields.signature_algorithm,
        FilterType.VERSION: fields.version,
        FilterType.SERIAL_NUMBER: fields.serial,
        FilterType.ISSUER: fields.issuer,
        FilterType.SUBJECT: fields.subject,
    }[kind]
    return value is not None and pattern.fullmatch(value)
