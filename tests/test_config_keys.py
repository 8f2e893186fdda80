"""Every configuration key, in the code, in docs/configuration.md and in tlshd 1.4.

* The table "Every key: tlshd 1.4 and ktlsd" of docs/configuration.md has exactly the rows
  of ``ktlsd.config.config_keys()`` (group, key, which tlshd, what ktlsd does).
* Its tlshd 1.4 rows are exactly the keys ktls-utils 1.4.0's tlshd reads
  (tests/data/tlshd-1.4-config-keys.txt, which says where the list comes from).
* The reader behaves as the table says: a file setting every tlshd key logs one line for
  each ignored key (warning, or notice for debug levels) and nothing for supported ones; a
  zero or empty ignored key logs nothing; a key outside the table is warned about as unknown.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest

from ktlsd.config import TLSHD_KEYS, KeyBehaviour, config_keys, load_config
from ktlsd.log_output import NOTICE

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "configuration.md"
TLSHD_14 = Path(__file__).resolve().parent / "data" / "tlshd-1.4-config-keys.txt"
SECTION = "## Every key: tlshd 1.4 and ktlsd"
ROW = re.compile(r"^\| `([^`]+)` \| `([^`]+)` \| ([^|]+?) \| ([^|]+?) \| .*\|$")

Row = tuple[str, str, str, str]


def doc_rows() -> list[Row]:
    text = DOC.read_text()
    assert SECTION in text, f"{DOC} lost its section {SECTION!r}"
    body = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    rows: list[Row] = []
    for line in body.splitlines():
        if line.startswith("| `"):
            match = ROW.match(line)
            assert match is not None, f"malformed row: {line!r}"
            group, key, tlshd, behaviour = match.groups()
            rows.append((group, key, tlshd.strip(), behaviour.strip()))
    return rows


def code_rows() -> list[Row]:
    return [(k.group, k.key, k.tlshd, k.behaviour.value) for k in config_keys()]


def tlshd_14_keys() -> set[tuple[str, str]]:
    keys = set()
    for line in TLSHD_14.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            group, key = line.split()
            keys.add((group, key))
    return keys


def test_the_document_lists_exactly_the_code_table() -> None:
    documented, coded = doc_rows(), code_rows()
    assert len(documented) == len(set(documented)), "a row twice in the document"
    assert len(coded) == len(set(coded)), "a row twice in the code"
    missing = sorted(set(coded) - set(documented))
    extra = sorted(set(documented) - set(coded))
    assert not missing and not extra, (f"rows in the code, not in {DOC.name}: {missing}; "
                                       f"in {DOC.name}, not in the code: {extra}")
    assert {b for *_, b in documented} <= {b.value for b in KeyBehaviour}


def test_the_tlshd_14_rows_are_tlshd_14s_keys() -> None:
    ours = {(g, k) for g, k, tlshd, _ in code_rows() if tlshd == "1.4"}
    theirs = tlshd_14_keys()
    assert len(theirs) == 17  # 4 [debug], 1 [authenticate], 6 + 6 x509 keys
    assert ours == theirs
    # Every tlshd key is in tlshd's groups, never reported ktlsd-only.
    assert all(k.behaviour is not KeyBehaviour.KTLSD_ONLY for k in TLSHD_KEYS)
    assert all(k.why for k in TLSHD_KEYS if k.behaviour is KeyBehaviour.IGNORED)


VALUES = {"int": "3", "bool": "true", "list": "one;two"}


def every_tlshd_key(tmp_path: Path, *, zero: bool = False) -> str:
    """A configuration setting every key of TLSHD_KEYS (paths: real files; pairs complete)."""
    pem = tmp_path / "file.pem"
    pem.write_text("not read when the configuration is loaded\n")
    groups: dict[str, list[str]] = {}
    for row in TLSHD_KEYS:
        value = str(pem) if row.kind == "path" else VALUES[row.kind]
        if zero and row.behaviour is KeyBehaviour.IGNORED:
            value = "0" if row.kind == "int" else ""
        groups.setdefault(row.group, []).append(f"{row.key} = {value}")
    return "".join(f"[{g}]\n" + "\n".join(lines) + "\n" for g, lines in groups.items())


def test_the_reader_follows_the_table(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="ktlsd.config")
    path = tmp_path / "config"
    path.write_text(every_tlshd_key(tmp_path) + "[debug]\nnot_a_key = 1\n")
    config = load_config(str(path))
    assert config.debug_loglevel == 3 and config.keyrings == ("one", "two")
    assert config.server.client_auth is True
    logged = {}
    for record in caplog.records:
        match = re.search(r"\[([\w.]+)\] ([\w.]+) ignored: ", record.getMessage())
        if match:
            logged[(match.group(1), match.group(2))] = record.levelno
    expected = {(k.group, k.key): (NOTICE if k.kind == "int" else logging.WARNING)
                for k in TLSHD_KEYS if k.behaviour is KeyBehaviour.IGNORED}
    assert logged == expected
    unknown = [r.getMessage() for r in caplog.records if "unknown key" in r.getMessage()]
    assert len(unknown) == 1 and "unknown key not_a_key in [debug] ignored" in unknown[0]


def test_ignored_keys_left_at_zero_or_empty_say_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """tlshd's shipped file sets tls=0 and nl=0: nothing to say about those."""
    caplog.set_level(logging.DEBUG, logger="ktlsd.config")
    path = tmp_path / "config"
    text = every_tlshd_key(tmp_path, zero=True)
    path.write_text(text)
    load_config(str(path))
    assert not [r for r in caplog.records if " ignored: " in r.getMessage()]
    # Every tlshd key ktlsd ignores is now one of tlshd's debug integers.
    assert "tls = 0" in text and "tlsdebug = 0" in text
