"""TLS session tags (tls-session-tags(7), tlshd 1.4): tag files, GnuTLS field formats, DONE.

* tlshd's documented examples -- the two snippets of tls-session-tags(7) and the example file
  ktls-utils ships (etc/tlshd/tags.example) -- rewritten here as test data, evaluated against
  certificates built for each case;
* the file grammar and tlshd's error rule (the rest of a faulty file is dropped, what came
  before stays, the next file is read), file selection and order, reload;
* the certificate fields against GnuTLS itself (``certtool -i``), since tlshd matches the
  strings GnuTLS makes;
* DONE: the kernel's ``tag`` attribute (nfsd tree's handshake.yaml: attribute 4, string,
  multi-attr) with ktlsd's own netlink codec, and the service's TAG attribute;
* a real handshake: openssl s_client with a certificate made by the openssl CLI, the agent
  as the TLS server through the handshake service, the tags in the consumer's DONE.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import errno
import logging
import os
import re
import socket
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from ktlsd.agent import Agent
from ktlsd.client import submit
from ktlsd.commands import doctor
from ktlsd.commands.doctor import Status
from ktlsd.peer_certificate import certificate_fields
from ktlsd.request import AuthMode, HandshakeDone, HandshakeRequest, MessageType
from ktlsd.session_tags import (
    TagConfig,
    TagFileReader,
    YamlEvent,
    glib_pattern,
    load_tags_directory,
    parse_tlshd_time,
    reload_tags,
    yaml_events,
)
from ktlsd.settings import AgentSettings
from ktlsd.tls.session import CipherSuite, PeerIdentity, Role, Session
from ktlsd.upcall.genl import AttrKind, AttrPolicy, FamilyInfo
from ktlsd.upcall.kernel import KernelCapabilities
from ktlsd.upcall.netlink import (
    DoneAttr,
    DoneAttr4,
    DoneAttributes,
    decode_done,
    encode_done,
)
from ktlsd.upcall.nlattr import decode_attrs
from ktlsd.upcall.service import HandshakeService
from ktlsd.upcall.wire import DoneExtAttr, decode_done_message, encode_done_message
from ktlsd.workers import WorkerPool
from tests.agent_helpers import FIELD, ONE_UID_FOR_ALL, LogLines, running_agent
from tests.peers import openssl_client
from tests.waiting import run

# --- certificates for the examples -------------------------------------------------------------

_EC = ec.generate_private_key(ec.SECP256R1())
_NOW = datetime.datetime.now(datetime.UTC).replace(microsecond=0)


def _name(*parts: tuple[x509.ObjectIdentifier, str]) -> x509.Name:
    return x509.Name([x509.NameAttribute(oid, value) for oid, value in parts])


def make_cert(
    subject: x509.Name,
    issuer: x509.Name | None = None,
    *,
    key_usage: tuple[str, ...] | None = None,
    serial: int = 0x1234,
    signer: Any = None,
    algorithm: Any = "default",
    not_before: datetime.datetime | None = None,
    not_after: datetime.datetime | None = None,
) -> bytes:
    """A DER certificate for ``subject`` (self-issued unless ``issuer`` is given)."""
    signer = signer or _EC
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer or subject)
        .public_key(_EC.public_key())
        .serial_number(serial)
        .not_valid_before(not_before or _NOW - datetime.timedelta(days=1))
        .not_valid_after(not_after or _NOW + datetime.timedelta(days=30))
    )
    if key_usage is not None:
        flags = {name: name in key_usage for name in (
            "digital_signature", "content_commitment", "key_encipherment", "data_encipherment",
            "key_agreement", "key_cert_sign", "crl_sign", "encipher_only", "decipher_only")}
        builder = builder.add_extension(x509.KeyUsage(**flags), critical=True)
    if algorithm == "default":
        algorithm = None if isinstance(signer, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    kwargs: dict[str, Any] = {}
    if isinstance(signer, rsa.RSAPrivateKey) and getattr(algorithm, "name", "") == "sha384":
        kwargs["rsa_padding"] = padding.PSS(padding.MGF1(hashes.SHA384()), 48)
    cert = builder.sign(signer, algorithm, **kwargs)
    return cert.public_bytes(serialization.Encoding.DER)


MU_CA = _name((NameOID.COUNTRY_NAME, "US"), (NameOID.ORGANIZATION_NAME, "Monsters University"),
              (NameOID.COMMON_NAME, "MU Registrar"))
FT_CA = _name((NameOID.COUNTRY_NAME, "US"),
              (NameOID.ORGANIZATION_NAME, "Fear Technology Institute"),
              (NameOID.COMMON_NAME, "FTI Registrar"))
BOTH_CA = _name((NameOID.COUNTRY_NAME, "US"), (NameOID.ORGANIZATION_NAME, "Monsters University"),
                (NameOID.ORGANIZATION_NAME, "Fear Technology Institute"),
                (NameOID.COMMON_NAME, "Exchange Registrar"))


def student(ou: str, cn: str) -> x509.Name:
    return _name((NameOID.COUNTRY_NAME, "US"), (NameOID.ORGANIZATION_NAME, "Monsters University"),
                 (NameOID.ORGANIZATIONAL_UNIT_NAME, ou), (NameOID.COMMON_NAME, cn))


SIGNING = ("digital_signature", "content_commitment")

# tls-session-tags(7), FORMAT > Filters and > Tags: the filter "monsters-university" and the
# tag "ror-mu-chapter" (the page elides the other two filters with "..."; they are defined
# here the way the page describes them).
MAN_PAGE_EXAMPLE = """\
filters:
  monsters-university:
    type: "x509.tbs.issuer"
    pattern: "*,O=Monsters University,*"
  fear-tech:
    type: "x509.tbs.issuer"
    pattern: "*,O=Fear Technology Institute,*"
  fraternity-ror:
    type: "x509.tbs.subject"
    pattern: "*,OU=Roar Omega Roar,*"
tags:
  ror-mu-chapter:
    filter:
      - monsters-university
      - not fear-tech
      - fraternity-ror
"""

# ktls-utils' etc/tlshd/tags.example (the file `make install` puts in tags.d), same content.
SHIPPED_EXAMPLE = """\
---
filters:
  monsters-university: {type: x509.tbs.issuer, pattern: "*,O=Monsters University,*"}
  fear-tech: {type: x509.tbs.issuer, pattern: "*,O=Fear Technology Institute,*"}
  school-scaring: {type: x509.tbs.subject, pattern: "*,OU=School of Scaring,*"}
  school-can-design: {type: x509.tbs.subject, pattern: "*,OU=School of Scream Can Design,*"}
  sorority-hss: {type: x509.tbs.subject, pattern: "*,OU=Eta Hiss Hiss,*"}
  fraternity-ror: {type: x509.tbs.subject, pattern: "*,OU=Roar Omega Roar,*"}
  fraternity-ok: {type: x509.tbs.subject, pattern: "*,OU=Oozma Kappa,*"}
  valid-keyusage:
    type: x509.extension.keyUsage
    purpose: [digitalSignature, nonRepudiation]
tags:
  ror-mu-chapter: {filter: [monsters-university, fraternity-ror, valid-keyusage]}
  ror-ft-chapter: {filter: [fear-tech, fraternity-ror, valid-keyusage]}
  can-design-student-materials: {filter: [school-can-design]}
"""


def tags_from(tmp_path: Path, **files: str) -> TagConfig:
    directory = tmp_path / "tags.d"
    directory.mkdir(exist_ok=True)
    for name, text in files.items():
        (directory / name.replace("_", ".")).write_text(text)
    return load_tags_directory(str(directory))


# --- tlshd's documented examples ---------------------------------------------------------------


def test_the_man_page_example(tmp_path: Path) -> None:
    tags = tags_from(tmp_path, example_yml=MAN_PAGE_EXAMPLE)
    assert tags.problems == () and list(tags.tags) == ["ror-mu-chapter"]
    sulley = make_cert(student("Roar Omega Roar", "sulley"), MU_CA)
    assert tags.match(sulley) == ("ror-mu-chapter",)
    # issued by the other school: monsters-university fails
    assert tags.match(make_cert(student("Roar Omega Roar", "randall"), FT_CA)) == ()
    # an issuer naming both schools: "not fear-tech" excludes it
    assert tags.match(make_cert(student("Roar Omega Roar", "exchange"), BOTH_CA)) == ()
    # another fraternity
    assert tags.match(make_cert(student("Oozma Kappa", "mike"), MU_CA)) == ()
    # no key usage needed by this tag; no peer certificate: no tag
    assert tags.match(make_cert(student("Roar Omega Roar", "johnny"), MU_CA,
                                key_usage=("key_agreement",))) == ("ror-mu-chapter",)
    assert tags.match(None) == ()


def test_the_shipped_example_file(tmp_path: Path) -> None:
    tags = tags_from(tmp_path, tags_yaml=SHIPPED_EXAMPLE)
    assert tags.problems == ()
    assert len(tags.filters) == 8
    assert list(tags.tags) == ["ror-mu-chapter", "ror-ft-chapter", "can-design-student-materials"]
    cases = {
        make_cert(student("Roar Omega Roar", "sulley"), MU_CA, key_usage=SIGNING):
            ("ror-mu-chapter",),
        make_cert(student("Roar Omega Roar", "randall"), FT_CA, key_usage=SIGNING):
            ("ror-ft-chapter",),
        # both issuers and the right key usage: both chapters (no "not" here)
        make_cert(student("Roar Omega Roar", "exchange"), BOTH_CA,
                  key_usage=(*SIGNING, "key_encipherment")): ("ror-mu-chapter", "ror-ft-chapter"),
        # only one of the two key usage bits: no chapter
        make_cert(student("Roar Omega Roar", "johnny"), MU_CA, key_usage=("digital_signature",)):
            (),
        # no key usage extension at all: no chapter
        make_cert(student("Roar Omega Roar", "chet"), MU_CA): (),
        make_cert(student("School of Scream Can Design", "art"), MU_CA):
            ("can-design-student-materials",),
        make_cert(student("Eta Hiss Hiss", "carrie"), MU_CA, key_usage=SIGNING): (),
    }
    for der, expected in cases.items():
        assert tags.match(der) == expected, certificate_fields(der)


# --- the grammar and tlshd's error rule ---------------------------------------------------------


def test_a_faulty_file_keeps_what_came_before_and_the_next_file_is_read(tmp_path: Path) -> None:
    tags = tags_from(
        tmp_path,
        a_yml="filters:\n  any: {type: x509.tbs.subject, pattern: '*'}\n"
              "tags:\n  first: {filter: [any]}\n  second: {filter: [nope]}\n"
              "  third: {filter: [any]}\n",
        b_yaml="tags:\n  from-b: {filter: [any]}\n",
        c_txt="tags:\n  ignored: {filter: [any]}\n",
    )
    assert [os.path.basename(f) for f in tags.files] == ["a.yml", "b.yaml"]
    assert list(tags.tags) == ["first", "from-b"]
    [problem] = tags.problems
    assert str(problem).endswith(
        "a.yml:5: tag 'second' names undefined filter 'nope'; the rest of the file is ignored")
    # a YAML syntax error: the same rule (libyaml's events before the error were used)
    (tmp_path / "syntax").mkdir()
    (tmp_path / "syntax" / "a.yml").write_text(
        "filters:\n  kept: {type: x509.tbs.subject, pattern: a}\n"
        "\tlost: {type: x509.tbs.subject, pattern: b}\n")
    (tmp_path / "syntax" / "b.yml").write_text("tags:\n  t: {filter: [kept]}\n")
    syntax = load_tags_directory(str(tmp_path / "syntax"))
    assert list(syntax.filters) == ["kept"] and list(syntax.tags) == ["t"]
    [problem] = syntax.problems
    assert "a.yml:3: YAML: " in str(problem)


@pytest.mark.parametrize(("text", "line", "words"), [
    ("filters:\n  x: {type: x509.extension.extendedKeyUsage}\n", 2,
     "filter type 'x509.extension.extendedKeyUsage' is not supported"),
    ("filters:\n  x: {type: x509.tbs.subject, colour: red}\n", 2, "unexpected filter key"),
    ("filters:\n  x: {type: x509.extension.keyUsage, purpose: [signing]}\n", 2,
     "unknown key usage 'signing'"),
    ("filters:\n  bad.name: {type: x509.tbs.subject, pattern: x}\n", 2, "may only contain"),
    ("filters:\n  x: {pattern: '*'}\n", 2, "filter 'x' has no type"),
    ("filters:\n  x: {type: x509.tbs.issuer}\n", 2, "filter 'x' is missing a pattern"),
    ("filters:\n  x: {type: x509.extension.keyUsage}\n", 2, "missing a key usage purpose"),
    ("filters:\n  x: {type: x509.tbs.subject, type: x509.tbs.issuer, pattern: a}\n", 2,
     "type given twice"),
    ("filters:\n  x: {type: x509.tbs.subject, pattern: '" + "*?" * 9 + "'}\n", 2,
     "too many wildcards (18 > 16)"),
    ("filters:\n  x: {type: x509.tbs.validity.notAfter, pattern: 'next year'}\n", 2,
     "cannot parse time 'next year'"),
    ("filters:\n  x: {type: x509.tbs.subject, pattern: a}\ntags:\n  t: {filter: ['not  x']}\n",
     4, "filter name ' x' may only contain"),
    ("filters:\n  x: &a {type: x509.tbs.subject, pattern: a}\n  y: *a\n", 3, "unexpected alias"),
    ("colours:\n  x: 1\n", 1, "unexpected top-level key 'colours'"),
    ("- filters\n", 1, "unexpected sequence start (a document must be a mapping)"),
    ("filters:\n  x: {type: x509.tbs.subject, pattern: a}\ntags:\n  t: {filter: x}\n", 4,
     "unexpected scalar 'x' (filter must be a list)"),
    ("filters:\n  x: {type: [a]}\n", 2, "unexpected sequence start (type must be a string)"),
    ("filters:\n  x: {type: x509.tbs.subject\n", 3, "YAML:"),
    ("filters: [\n", 1, "unexpected sequence start (filters must be a mapping of names)"),
    ("filters:\n  x: {type: x509.tbs.subject, pattern: a}\n\ty: 1\n", 3, "YAML:"),
])
def test_each_rejection_is_one_line_with_file_and_line(
    tmp_path: Path, text: str, line: int, words: str
) -> None:
    tags = tags_from(tmp_path, t_yml=text)
    assert len(tags.problems) == 1, tags.problems
    message = str(tags.problems[0])
    assert "\n" not in message and words in message, message
    assert message.startswith(f"{tmp_path}/tags.d/t.yml:{line}: "), message
    assert tags.filters == {} or "x" in tags.filters  # nothing after the error was kept


def test_duplicates_across_files_and_definition_order(tmp_path: Path) -> None:
    tags = tags_from(
        tmp_path,
        a_yml="filters:\n  x: {type: x509.tbs.subject, pattern: a}\n",
        b_yml="filters:\n  y: {type: x509.tbs.subject, pattern: b}\n"
              "  x: {type: x509.tbs.issuer, pattern: c}\n"
              "  z: {type: x509.tbs.issuer, pattern: d}\n",
        c_yml="tags:\n  t: {filter: [y]}\n  t: {filter: [x]}\n",
        d_yml="tags:\n  u: {filter: [later]}\n"
              "filters:\n  later: {type: x509.tbs.subject, pattern: a}\n",
    )
    assert list(tags.filters) == ["x", "y"]
    assert tags.filters["x"].pattern == "a"  # the first definition stays
    assert list(tags.tags) == ["t"] and tags.tags["t"].filters == ("y",)
    messages = [str(p) for p in tags.problems]
    assert any("duplicate filter name 'x' (defined in" in m and "b.yml:3" in m for m in messages)
    assert any("c.yml:3: duplicate tag name 't'" in m for m in messages)
    assert any("d.yml:2: tag 'u' names undefined filter 'later'" in m for m in messages)


def test_extraneous_arguments_are_noted_but_the_filter_stays(tmp_path: Path) -> None:
    tags = tags_from(tmp_path, t_yml=(
        "filters:\n"
        "  a: {type: x509.tbs.subject, pattern: '*', purpose: [cRLSign]}\n"
        "  b: {type: x509.extension.keyUsage, purpose: [keyCertSign], pattern: x}\n"
        "  c: {type: x509.derived.selfSigned, pattern: ignored}\n"
        "tags:\n  t: {filter: [a, b, c]}\n"))
    assert list(tags.filters) == ["a", "b", "c"] and list(tags.tags) == ["t"]
    assert [(p.line, p.rest_ignored) for p in tags.problems] == [(2, False), (3, False)]
    assert "key usage purpose is extraneous" in str(tags.problems[0])
    assert "pattern is extraneous" in str(tags.problems[1])


def test_tags_without_positive_filters_match_a_peer_without_certificate(tmp_path: Path) -> None:
    tags = tags_from(tmp_path, t_yml=(
        "filters:\n  self: {type: x509.derived.selfSigned}\n"
        "tags:\n  everyone: {}\n  no-self-signed: {filter: ['not self']}\n"
        "  self-signed: {filter: [self]}\n"))
    assert tags.match(None) == ("everyone", "no-self-signed")
    assert tags.match(make_cert(MU_CA)) == ("everyone", "self-signed")
    assert tags.match(make_cert(student("x", "y"), MU_CA)) == ("everyone", "no-self-signed")
    assert tags.match(b"not a certificate") == ("everyone", "no-self-signed")


def test_the_state_machine_directly() -> None:
    """Sans I/O: events in, definitions out (what a libyaml stream of one filter gives)."""
    reader = TagFileReader()
    events = [YamlEvent("stream_start", 1), YamlEvent("document_start", 1),
              YamlEvent("mapping_start", 1), YamlEvent("scalar", 1, "filters"),
              YamlEvent("mapping_start", 2), YamlEvent("scalar", 2, "v"),
              YamlEvent("mapping_start", 2), YamlEvent("scalar", 2, "type"),
              YamlEvent("scalar", 2, "x509.tbs.version"), YamlEvent("scalar", 2, "pattern"),
              YamlEvent("scalar", 2, "3"), YamlEvent("mapping_end", 2),
              YamlEvent("mapping_end", 3), YamlEvent("mapping_end", 3),
              YamlEvent("document_end", 3), YamlEvent("stream_end", 3)]
    reader.read_file("f.yml", events)
    assert reader.problems == [] and reader.filters["v"].pattern == "3"
    assert [e.kind for e in yaml_events(b"")] == ["stream_start", "stream_end"]
    assert [e.kind for e in yaml_events(b"a: b\n---\nc: d\n")].count("document_start") == 2


def test_file_selection(tmp_path: Path) -> None:
    directory = tmp_path / "tags.d"
    directory.mkdir()
    (directory / "b.yml").write_text("tags:\n  from-b: {}\n")
    (directory / ".hidden.yaml").write_text("tags:\n  from-hidden: {}\n")
    (directory / "a.YML").write_text("tags:\n  upper-case: {}\n")
    (directory / "c.yml~").write_text("tags:\n  backup: {}\n")
    (directory / "dir.yml").mkdir()
    (directory / "link.yml").symlink_to(directory / "b.yml")
    tags = load_tags_directory(str(directory))
    assert [os.path.basename(f) for f in tags.files] == [".hidden.yaml", "b.yml", "link.yml"]
    assert list(tags.tags) == ["from-hidden", "from-b"]
    # the symlink is read (after b.yml, so its tag is a duplicate), the directory refused
    messages = [str(p) for p in tags.problems]
    assert any("dir.yml: not read: not a regular file" in m for m in messages)
    assert any("link.yml:2: duplicate tag name 'from-b'" in m for m in messages)
    assert load_tags_directory(str(tmp_path / "absent")).note.endswith("does not exist: "
                                                                        "no session tags")


def test_reload_reads_again_and_keeps_the_old_tags_when_the_directory_is_unreadable(
    tmp_path: Path
) -> None:
    tags = tags_from(tmp_path, a_yml="tags:\n  one: {}\n")
    directory = tags.directory
    Path(directory, "b.yml").write_text("tags:\n  two: {}\n")
    fresh = reload_tags(tags, directory)
    assert list(fresh.tags) == ["one", "two"]
    os.rename(directory, directory + ".moved")
    assert reload_tags(fresh, directory) is fresh
    # a different directory (configuration changed) is taken as it is
    assert reload_tags(fresh, str(tmp_path / "other")).tags == {}


def test_glib_patterns() -> None:
    assert glib_pattern("a*c").fullmatch("ac") and glib_pattern("a*c").fullmatch("abbc")
    assert glib_pattern("a?c").fullmatch("abc") and not glib_pattern("a?c").fullmatch("ac")
    assert glib_pattern("é?").fullmatch("éü")  # one character, not one byte
    assert glib_pattern("[ab]").fullmatch("[ab]") and not glib_pattern("[ab]").fullmatch("a")
    assert glib_pattern("a.b").fullmatch("a.b") and not glib_pattern("a.b").fullmatch("axb")
    assert not glib_pattern("abc").fullmatch("ABC")
    assert glib_pattern("").fullmatch("") and not glib_pattern("").fullmatch("x")


def test_tlshd_time_strings() -> None:
    local = int(time.mktime((2026, 1, 2, 3, 4, 5, 0, 0, 0)))
    assert parse_tlshd_time("2026-01-02 03:04:05") == local
    assert parse_tlshd_time("2026-1-2 3:4:5") == local
    assert parse_tlshd_time(" 2026-01-02\t\n03:04:05 and anything") == local
    assert parse_tlshd_time("2026-01-0203:04:05") == local  # the space matches no space too
    assert parse_tlshd_time("2026-13-01 00:00:00") is None
    assert parse_tlshd_time("2026-01-02") is None
    assert parse_tlshd_time("2026/01/02 03:04:05") is None
    assert parse_tlshd_time("2026-02-31 00:00:60") == int(
        time.mktime((2026, 3, 3, 0, 1, 0, 0, 0, 0)))  # mktime normalises, as in C


def test_validity_filters_compare_as_tlshd_code_does(tmp_path: Path) -> None:
    def stamp(when: datetime.datetime) -> str:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(when.timestamp()))

    begin = datetime.datetime(2026, 3, 1, 12, 0, 0, tzinfo=datetime.UTC)
    end = datetime.datetime(2027, 3, 1, 12, 0, 0, tzinfo=datetime.UTC)
    der = make_cert(MU_CA, not_before=begin, not_after=end)
    day = datetime.timedelta(days=1)
    cases = [("x509.tbs.validity.notBefore", begin + day, True),
             ("x509.tbs.validity.notBefore", begin, True),
             ("x509.tbs.validity.notBefore", begin - day, False),
             ("x509.tbs.validity.notAfter", end - day, True),
             ("x509.tbs.validity.notAfter", end, True),
             ("x509.tbs.validity.notAfter", end + day, False)]
    for index, (kind, when, expected) in enumerate(cases):
        tags = tags_from(tmp_path, **{f"t{index}_yml": (
            f"filters:\n  f: {{type: {kind}, pattern: '{stamp(when)}'}}\n"
            "tags:\n  t: {filter: [f]}\n")})
        assert tags.match(der) == (("t",) if expected else ()), (kind, when)
        Path(tags.files[0]).unlink()


def test_fingerprint_serial_version_and_signature_filters(tmp_path: Path) -> None:
    der = make_cert(MU_CA, serial=0x80FF)
    fields = certificate_fields(der)
    assert fields is not None
    assert fields.serial == "0080ff" and fields.version == "3"
    tags = tags_from(tmp_path, t_yml=(
        "filters:\n"
        f"  sha1: {{type: x509.derived.fingerprint, pattern: '{fields.sha1[:8]}*'}}\n"
        f"  sha256: {{type: x509.derived.fingerprint, pattern: '*{fields.sha256[-6:]}'}}\n"
        f"  upper: {{type: x509.derived.fingerprint, pattern: '{fields.sha1.upper()}'}}\n"
        "  serial: {type: x509.tbs.serialNumber, pattern: '0080ff'}\n"
        "  v3: {type: x509.tbs.version, pattern: '3'}\n"
        "  ecdsa: {type: x509.cert.signatureAlgorithm, pattern: 'ECDSA-*'}\n"
        "tags:\n  a: {filter: [sha1]}\n  b: {filter: [sha256]}\n  c: {filter: [upper]}\n"
        "  d: {filter: [serial, v3, ecdsa]}\n"))
    assert tags.match(der) == ("a", "b", "d")


# --- the fields against GnuTLS ------------------------------------------------------------------


def _certtool(der: bytes, tmp_path: Path) -> dict[str, str]:
    path = tmp_path / "cert.der"
    path.write_bytes(der)
    out = subprocess.run(["certtool", "-i", "--inder", "--infile", str(path)],
                         capture_output=True, text=True, check=True).stdout
    found: dict[str, str] = {}
    for key, label in (("version", "Version"), ("serial", "Serial Number (hex)"),
                       ("issuer", "Issuer"), ("subject", "Subject"),
                       ("signature_algorithm", "Signature Algorithm")):
        match = re.search(rf"^\t{re.escape(label)}: (.*)$", out, re.M)
        assert match, (label, out)
        found[key] = match.group(1)
    for digest in ("sha1", "sha256"):
        match = re.search(rf"^\t\t{digest}:([0-9a-f]+)$", out, re.M)
        assert match, out
        found[digest] = match.group(1)
    return found


def _tricky_names() -> list[x509.Name]:
    bmp = x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "Bé BMP",
                             _type=x509.name._ASN1Type.BMPString)
    multi = x509.RelativeDistinguishedName([
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "one"),
        x509.NameAttribute(NameOID.USER_ID, "two"),
    ])
    return [
        _name((NameOID.COMMON_NAME, 'a,b+c"d\\e<f>g;h'), (NameOID.ORGANIZATION_NAME, "#lead"),
              (NameOID.LOCALITY_NAME, " both ends ")),
        x509.Name([x509.RelativeDistinguishedName([x509.NameAttribute(NameOID.COUNTRY_NAME,
                                                                      "DE")]),
                   multi, x509.RelativeDistinguishedName([bmp])]),
        _name((NameOID.DOMAIN_COMPONENT, "org"), (NameOID.DOMAIN_COMPONENT, "example"),
              (NameOID.EMAIL_ADDRESS, "root@example.org"), (NameOID.COMMON_NAME, "Zoë Ünïcode"),
              (x509.ObjectIdentifier("1.3.6.1.4.1.99999.1"), "private"),
              (NameOID.SERIAL_NUMBER, "42"), (NameOID.STREET_ADDRESS, "Main St"),
              (NameOID.TITLE, "Dr"), (NameOID.GIVEN_NAME, "Ann")),
    ]


def test_fields_are_formatted_as_gnutls_formats_them(tmp_path: Path) -> None:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ed_key = ed25519.Ed25519PrivateKey.generate()
    names = _tricky_names()
    certificates = [make_cert(names[0], names[1], serial=0xFF00FF),
                    make_cert(names[1], names[2], signer=rsa_key),
                    make_cert(names[2], names[0], signer=ed_key, serial=1),
                    make_cert(MU_CA, signer=rsa_key, algorithm=hashes.SHA384())]
    for der in certificates:
        fields = certificate_fields(der)
        assert fields is not None
        mine = {key: getattr(fields, key) for key in (
            "version", "serial", "issuer", "subject", "signature_algorithm", "sha1", "sha256")}
        assert mine == _certtool(der, tmp_path)
    algorithms = [certificate_fields(der).signature_algorithm  # type: ignore[union-attr]
                  for der in certificates]
    assert algorithms == ["ECDSA-SHA256", "RSA-SHA256", "EdDSA-Ed25519", "RSA-PSS-SHA384"]


# --- DONE -------------------------------------------------------------------------------------


def _kernel(attr4: AttrKind | None) -> KernelCapabilities:
    done = {DoneAttr.STATUS: AttrPolicy(DoneAttr.STATUS, AttrKind.U32),
            DoneAttr.SOCKFD: AttrPolicy(DoneAttr.SOCKFD, AttrKind.S32),
            DoneAttr.REMOTE_AUTH: AttrPolicy(DoneAttr.REMOTE_AUTH, AttrKind.U32)}
    if attr4 is not None:
        done[DoneAttr.SESSION_ID_OR_TAG] = AttrPolicy(DoneAttr.SESSION_ID_OR_TAG, attr4)
    return KernelCapabilities(family=FamilyInfo("handshake", 23, 1, {"tlshd": 6}),
                              done_attrs=done, policy_known=True)


def test_done_carries_one_string_attribute_per_tag_where_the_kernel_declares_it() -> None:
    """nfsd tree: ``- name: tag, type: string, multi-attr: true`` (attribute 4 of ``done``),
    ``[HANDSHAKE_A_DONE_TAG] = { .type = NLA_STRING }``; the kernel nla_strdup()s each."""
    tagged = _kernel(AttrKind.STRING)  # what NLA_STRING dumps as
    assert tagged.done_tags and _kernel(AttrKind.NUL_STRING).done_tags
    assert "sent in DONE" in tagged.session_tags_line()
    done = HandshakeDone(status=0, sockfd=9, remote_auth=(77,), tags=("ror-mu-chapter", "x"))
    attrs = decode_attrs(encode_done(done, tagged.done_attributes))
    assert attrs == [(1, (0).to_bytes(4, "little")), (2, (9).to_bytes(4, "little")),
                     (3, (77).to_bytes(4, "little")), (4, b"ror-mu-chapter\0"), (4, b"x\0")]
    assert decode_done(encode_done(done, tagged.done_attributes), tagged.done_attributes).tags \
        == done.tags
    # failed handshakes carry none; a kernel whose attribute 4 is the u32 session id or that
    # has no attribute 4 never gets a tag
    failed = HandshakeDone(status=errno.EACCES, sockfd=9, tags=("x",))
    assert [t for t, _ in decode_attrs(encode_done(failed, tagged.done_attributes))] == [1, 2]
    for kernel in (_kernel(AttrKind.U32), _kernel(None)):
        assert not kernel.done_tags
        assert 4 not in [t for t, _ in decode_attrs(encode_done(done, kernel.done_attributes))]
    assert _kernel(None).session_tags_line() == (
        "session tags are not sent: DONE declares no tag attribute "
        "(DONE accepts: status, sockfd, remote-auth)")
    assert DoneAttributes(DoneAttr4.TAG).tag


def test_the_service_done_carries_tags_only_on_success() -> None:
    session = Session(role=Role.SERVER, suite=CipherSuite.TLS_AES_128_GCM_SHA256,
                      client_secret=b"c" * 32, server_secret=b"s" * 32, peer=PeerIdentity())
    message = encode_done_message(HandshakeDone(status=0, sockfd=-1, session=session,
                                                tags=("a", "b-c")))
    _, done = decode_done_message(message)
    assert done.tags == ("a", "b-c")
    failed = encode_done_message(HandshakeDone(status=errno.EIO, sockfd=-1, tags=("a",)))
    assert decode_done_message(failed)[1].tags == ()
    assert DoneExtAttr.TAG == 102


# --- the agent, doctor ---------------------------------------------------------------------------


def test_doctor_lists_files_problems_tags_and_the_kernel(tmp_path: Path) -> None:
    tags = tags_from(tmp_path, example_yml=MAN_PAGE_EXAMPLE,
                     zz_yml="tags:\n  broken: {filter: [missing]}\n")
    config = tmp_path / "config"
    config.write_text(f"[ktlsd]\ntags_directory={tags.directory}\n")
    checks = doctor.check_session_tags(str(config), caps=_kernel(None))
    lines = [c.line() for c in checks]
    assert lines[0].startswith("OK      session tags: 1 tags, 3 filters from 2 files in ")
    assert lines[0].endswith("read example.yml, zz.yml")
    assert lines[1].startswith("MISSING tag file: ") and "zz.yml:2:" in lines[1]
    assert lines[2] == (
        "INFO    tag ror-mu-chapter: monsters-university (x509.tbs.issuer "
        "'*,O=Monsters University,*') and fraternity-ror (x509.tbs.subject "
        "'*,OU=Roar Omega Roar,*') and not fear-tech (x509.tbs.issuer "
        "'*,O=Fear Technology Institute,*') [example.yml]")
    assert lines[3].startswith("INFO    session tags to kernel: session tags are not sent: "
                               "DONE declares no tag attribute")
    ok = doctor.check_session_tags(str(config), caps=_kernel(AttrKind.STRING))[-1]
    assert ok.status is Status.OK
    config.write_text(f"[ktlsd]\ntags_directory={tmp_path}/absent\n")
    assert doctor.check_session_tags(str(config), caps=_kernel(None))[0].status is Status.INFO


class _TaglessSource:
    """An upcall source whose DONE cannot carry tags (a kernel without the attribute)."""

    name = "kernel"
    accepts_session_tags = False


def test_the_agent_says_once_at_start_when_tags_cannot_reach_a_source(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tags = tags_from(tmp_path, example_yml=MAN_PAGE_EXAMPLE)
    agent = Agent(AgentSettings(tags_directory=tags.directory), [_TaglessSource()])  # type: ignore[list-item]
    with caplog.at_level(logging.INFO, logger="ktlsd"):
        agent._announce_tags()
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("session tags: 1 tags, 3 filters from 1 files") for m in messages)
    assert ("session tags: 1 defined, but the kernel source cannot carry them (its DONE "
            "declares no tag attribute): not sent to its consumers") in messages
    # reload picks up a new file
    Path(tags.directory, "more.yml").write_text("tags:\n  all: {}\n")
    with caplog.at_level(logging.INFO, logger="ktlsd"):
        agent.reload(AgentSettings(tags_directory=tags.directory))
    assert list(agent.tags.tags) == ["ror-mu-chapter", "all"]


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@contextlib.asynccontextmanager
async def agent_with_workers(path: str, settings: AgentSettings,
                             workers: int) -> AsyncIterator[None]:
    """:func:`running_agent`, or (``workers`` > 0) the same agent with a pool of real worker
    processes reading and answering the service's requests (``ktlsd run --workers N``)."""
    if not workers:
        async with running_agent(path, settings):
            yield
        return
    pool = WorkerPool(workers)
    await pool.start()
    service = HandshakeService(path, limits=ONE_UID_FOR_ALL)
    try:
        await service.start()
        pool.serve_service(service)
        agent = Agent(settings, [service], runner=pool)
        task = asyncio.create_task(agent.run())
        try:
            yield
        finally:
            await agent.stop()
            await asyncio.wait_for(task, 30)
    finally:
        await service.close()
        await pool.close()


@pytest.mark.parametrize("workers", [0, 2], ids=["in-process", "workers"])
def test_a_real_handshake_gives_the_peer_its_tags(tmp_path: Path, workers: int) -> None:
    """openssl s_client presents a certificate made by the openssl CLI; the agent is the TLS
    server for a consumer of the handshake service; the consumer's DONE carries the tags --
    also when a worker process reads the request and sends DONE itself (``--workers 2``)."""
    pki = tmp_path / "pki"
    pki.mkdir()
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
             "-subj", "/C=US/O=Monsters University/CN=MU Registrar", cwd=pki)
    for name, subject, usage in (
        ("server", "/C=US/O=Monsters University/CN=localhost", "digitalSignature"),
        ("sulley", "/C=US/O=Monsters University/OU=Roar Omega Roar/CN=sulley",
         "digitalSignature,nonRepudiation"),
        ("art", "/C=US/O=Monsters University/OU=School of Scream Can Design/CN=art",
         "digitalSignature"),
    ):
        _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                 "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subject, cwd=pki)
        (pki / f"{name}.ext").write_text(f"keyUsage=critical,{usage}\n")
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                 "-set_serial", "0x8a01", "-days", "2", "-extfile", f"{name}.ext",
                 "-out", f"{name}.pem", cwd=pki)
    tags = tags_from(tmp_path, tags_yml=SHIPPED_EXAMPLE, man_yml=MAN_PAGE_EXAMPLE.replace(
        "ror-mu-chapter", "ror-mu-chapter-manpage").replace("monsters-university:", "mu2:")
        .replace("fear-tech:", "ft2:").replace("fraternity-ror:", "ror2:")
        .replace("- monsters-university", "- mu2").replace("- not fear-tech", "- not ft2")
        .replace("- fraternity-ror", "- ror2"))
    assert tags.problems == () and len(tags.tags) == 4
    sock_path = str(tmp_path / "handshake.sock")
    settings = AgentSettings(tags_directory=tags.directory)

    async def serve_one(client: str) -> tuple[HandshakeDone, str]:
        with socket.create_server(("127.0.0.1", 0)) as listener:
            port = listener.getsockname()[1]
            args = ["-cert", str(pki / f"{client}.pem"), "-key", str(pki / f"{client}.key"),
                    "-CAfile", str(pki / "ca.pem"), "-ign_eof"]
            with openssl_client(port, *args) as peer:
                loop = asyncio.get_running_loop()
                listener.setblocking(False)
                conn, _ = await loop.sock_accept(listener)
                with conn:
                    done = await submit(
                        conn, role="server", auth="x509", truststore=pki / "ca.pem",
                        certificate=pki / "server.pem", private_key=pki / "server.key",
                        require_client_cert=True, service_path=sock_path)
                return done, peer.output()

    async def main() -> None:
        log = LogLines()
        with log.attached():
            async with agent_with_workers(sock_path, settings, workers):
                sulley, _ = await serve_one("sulley")
                art, _ = await serve_one("art")
        if workers:  # read, run and answered by a worker, not forwarded to the supervisor
            assert sum("request handed to worker" in m for m in log.messages) == 2
        assert (sulley.status, sulley.reason) == (0, "")
        assert sulley.tags == ("ror-mu-chapter-manpage", "ror-mu-chapter")  # man.yml < tags.yml
        assert art.status == 0 and art.tags == ("can-design-student-materials",)
        lines = [dict(FIELD.findall(line)) for line in log.handshake_lines()]
        assert [fields.get("tags") for fields in lines] == [
            "ror-mu-chapter-manpage,ror-mu-chapter", "can-design-student-materials"]

    run(main())


def test_tags_only_for_the_server_side_of_x509(tmp_path: Path) -> None:
    from ktlsd.agent import _session_tags

    tags = tags_from(tmp_path, t_yml="tags:\n  everyone: {}\n")
    session = Session(role=Role.SERVER, suite=CipherSuite.TLS_AES_128_GCM_SHA256,
                      client_secret=b"c" * 32, server_secret=b"s" * 32, peer=PeerIdentity())
    for message_type, auth, expected in (
        (MessageType.SERVERHELLO, AuthMode.X509, ("everyone",)),
        (MessageType.SERVERHELLO, AuthMode.PSK, ()),
        (MessageType.CLIENTHELLO, AuthMode.X509, ()),
        (MessageType.CLIENTHELLO, AuthMode.UNAUTH, ()),
    ):
        request = HandshakeRequest(sockfd=3, message_type=message_type, auth_mode=auth)
        assert _session_tags(tags, request, session) == expected, (message_type, auth)


def test_a_block_style_definition_is_reported_at_its_own_line(tmp_path: Path) -> None:
    tags = tags_from(tmp_path, t_yml=(
        "filters:\n"
        "  ok:\n    type: x509.tbs.subject\n    pattern: a\n"
        "  untyped:\n    pattern: b\n"
        "  later:\n    type: x509.tbs.subject\n    pattern: c\n"))
    assert list(tags.filters) == ["ok"]
    [problem] = tags.problems
    assert str(problem).endswith("t.yml:5: filter 'untyped' has no type; the rest of the file "
                                 "is ignored")


def test_ktlsd_run_reads_the_tags_at_start_and_again_on_sighup(tmp_path: Path) -> None:
    import signal

    from tests.agent_helpers import AgentProcess

    tags = tags_from(tmp_path, example_yml=MAN_PAGE_EXAMPLE,
                     broken_yml="tags:\n  x: {filter: [nowhere]}\n")
    work = tmp_path / "agent"
    work.mkdir()
    with AgentProcess(work, f"[ktlsd]\ntags_directory = {tags.directory}\n") as agent:
        agent.wait_for(r"broken\.yml:2: tag 'x' names undefined filter 'nowhere'; the rest of "
                       r"the file is ignored")
        agent.wait_for(r"session tags: 1 tags, 3 filters from 2 files in .* \(ror-mu-chapter\)")
        Path(tags.directory, "broken.yml").write_text("tags:\n  everyone: {}\n")
        agent.signal(signal.SIGHUP)
        agent.wait_for(r"session tags reloaded: 2 tags, 3 filters from 2 files in .*"
                       r"\(everyone, ror-mu-chapter\)")
        assert agent.stop() == 0


@settings(max_examples=300, deadline=None)
@given(pattern=st.text(alphabet="ab*?", max_size=8), text=st.text(alphabet="abc", max_size=10))
def test_glib_patterns_match_as_a_regular_expression_would(pattern: str, text: str) -> None:
    """The backtracking-free matcher agrees with the plain regular-expression reading of
    GPatternSpec on every small case."""
    regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    assert glib_pattern(pattern).fullmatch(text) == bool(re.fullmatch(regex, text, re.DOTALL))


def test_a_pattern_of_many_stars_cannot_stall_the_agent() -> None:
    """16 wildcards (tlshd's maximum) against a long near-miss subject: linear-ish work (a
    regular expression would backtrack for ages here)."""
    pattern = "*a" * 15 + "*b"
    assert not glib_pattern(pattern).fullmatch("a" * 4000)
    assert glib_pattern(pattern).fullmatch("a" * 4000 + "b")
