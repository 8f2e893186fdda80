"""Configuration: tlshd's files read unchanged, the [ktlsd] section, errors with file:line."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ktlsd.config import (
    CONFIG_PATH,
    LEGACY_CONFIG_PATH,
    AgentConfig,
    ConfigError,
    find_config,
    glib_integer,
    load_config,
    parse_key_file,
    split_list,
    unescape,
)
from ktlsd.settings import DEFAULT_SERVICE_PATH, DEFAULT_SESSION_LIFETIME, DEFAULT_TIMEOUT_MS

# ktls-utils' shipped /etc/tlshd/config (etc/tlshd/config), typed in verbatim, licence header
# included, comments and all.
SHIPPED_CONFIG = """\
#
# Copyright (c) 2022 Oracle and/or its affiliates.
#
# This file is part of ktls-utils.
#
# ktls-utils is free software; you can redistribute it and/or
# modify it under the terms of the GNU General Public License as
# published by the Free Software Foundation; version 2.
#
# This program is distributed in the hope that it will be useful,
# but WITHOUT ANY WARRANTY; without even the implied warranty of
# MERCHANTABILITY or FITNESS FOR A PARTICULAR PURPOSE. See the GNU
# General Public License for more details.
#
# You should have received a copy of the GNU General Public License
# along with this program; if not, write to the Free Software
# Foundation, Inc., 51 Franklin Street, Fifth Floor, Boston, MA
# 02110-1301, USA.
#
# See tlshd.conf(5) for details.
#

[debug]
loglevel=0
tls=0
nl=0

[authenticate]
#keyrings= <keyring>;<keyring>;<keyring>

[authenticate.client]
#x509.truststore= <pathname>
#x509.crl= <pathname>
#x509.certificate= <pathname>
#x509.private_key= <pathname>
#x509.pq.certificate= <pathname>
#x509.pq.private_key= <pathname>

[authenticate.server]
#x509.truststore= <pathname>
#x509.crl= <pathname>
#x509.certificate= <pathname>
#x509.private_key= <pathname>
#x509.client_auth= <0|1>
#x509.client_allowed_sans= <client1.example.com;client2.example.com>
#x509.pq.certificate= <pathname>
#x509.pq.private_key= <pathname>
"""

# The first tlshd.conf ktls-utils shipped (src/tlshd/tlshd.conf), with its [main] section.
LEGACY_MAIN_CONFIG = """\
#
# See tlshd.conf(5) for details.
#

[main]
debug=0
tlsdebug=0
nl_debug=0

#keyrings= <keyring>;<keyring>;<keyring>

[authenticate.client]
#x509.certificate= <pathname>
#x509.private_key= <pathname>
"""


# /etc/tlshd.conf as Debian 13 ships it (ktls-utils 1.0.0), comments as in the package.
DEBIAN_13_TLSHD_CONF = SHIPPED_CONFIG.split("[debug]")[0] + """\
[debug]
loglevel=0
tls=0
nl=0

[authenticate]
#keyrings= <keyring>;<keyring>;<keyring>

[authenticate.client]
#x509.truststore= <pathname>
#x509.certificate= <pathname>
#x509.private_key= <pathname>

[authenticate.server]
#x509.truststore= <pathname>
#x509.certificate= <pathname>
#x509.private_key= <pathname>
"""


def write(tmp_path: Path, text: str, name: str = "config") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_shipped_default_config_reads_unchanged(tmp_path: Path,
                                                caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="ktlsd.config")
    config = load_config(write(tmp_path, SHIPPED_CONFIG))
    assert config.path and config.path.endswith("config")
    assert (config.debug_loglevel, config.debug_tls, config.debug_nl) == (0, 0, 0)
    assert config.keyrings == ()
    assert config.client.certificate is None and config.server.truststore is None
    # ktlsd's own settings take their defaults
    assert config.service_socket == DEFAULT_SERVICE_PATH
    assert config.default_timeout_ms == 10_000
    assert config.effective_log_level == "info"
    assert caplog.records == []  # nothing unknown, nothing to warn about


def test_man_page_settings_uncommented(tmp_path: Path) -> None:
    """Every option tlshd.conf(5) documents, filled in as the man page describes them."""
    certs = tmp_path / "certs"
    certs.mkdir()
    for name in ("ca.pem", "crl.pem", "client.pem", "client.key", "server.pem", "server.key"):
        (certs / name).write_text("placeholder\n")
    text = (
        SHIPPED_CONFIG.replace("loglevel=0", "loglevel=2")
        .replace("#keyrings= <keyring>;<keyring>;<keyring>", "keyrings= .nvme;nfs-keys;12345")
        .replace("[authenticate.client]\n#x509.truststore= <pathname>\n#x509.crl= <pathname>\n"
                 "#x509.certificate= <pathname>\n#x509.private_key= <pathname>",
                 f"[authenticate.client]\nx509.truststore= {certs}/ca.pem\n"
                 f"x509.crl= {certs}/crl.pem\nx509.certificate= {certs}/client.pem\n"
                 f"x509.private_key= {certs}/client.key")
        .replace("[authenticate.server]\n#x509.truststore= <pathname>\n#x509.crl= <pathname>\n"
                 "#x509.certificate= <pathname>\n#x509.private_key= <pathname>\n"
                 "#x509.client_auth= <0|1>\n"
                 "#x509.client_allowed_sans= <client1.example.com;client2.example.com>",
                 f"[authenticate.server]\nx509.truststore= {certs}/ca.pem\n"
                 f"x509.certificate= {certs}/server.pem\nx509.private_key= {certs}/server.key\n"
                 "x509.client_auth= 1\n"
                 "x509.client_allowed_sans= client1.example.com;client2.example.com")
    )
    config = load_config(write(tmp_path, text))
    assert config.debug_loglevel == 2 and config.effective_log_level == "debug"
    assert config.keyrings == (".nvme", "nfs-keys", "12345")
    assert config.client.truststore == f"{certs}/ca.pem"
    assert config.client.crl == f"{certs}/crl.pem"
    assert config.client.certificate == f"{certs}/client.pem"
    assert config.client.private_key == f"{certs}/client.key"
    assert config.server.certificate == f"{certs}/server.pem"
    assert config.server.crl is None
    assert config.server.client_auth is True
    assert config.server.client_allowed_sans == ("client1.example.com", "client2.example.com")


def test_debian_13_legacy_file_at_the_legacy_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv("KTLSD_CONFIG", raising=False)
    caplog.set_level(logging.INFO, logger="ktlsd.config")
    legacy = write(tmp_path, DEBIAN_13_TLSHD_CONF, "tlshd.conf")
    config = load_config(search=(legacy, str(tmp_path / "absent-config")))
    assert config.path == legacy and config.keyrings == ()
    assert config.client == config.server == AgentConfig().client
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_legacy_main_section(tmp_path: Path) -> None:
    text = LEGACY_MAIN_CONFIG.replace("debug=0", "debug=1").replace(
        "#keyrings= <keyring>;<keyring>;<keyring>", "keyrings=.nfs;.nfsd;"
    )
    config = load_config(write(tmp_path, text, "tlshd.conf"))
    assert config.debug_loglevel == 1
    assert config.keyrings == (".nfs", ".nfsd")


def test_search_order_prefers_the_legacy_file_like_tlshd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KTLSD_CONFIG", raising=False)
    legacy = write(tmp_path, "[debug]\nloglevel=3\n", "tlshd.conf")
    current = write(tmp_path, "[debug]\nloglevel=4\n", "config")
    assert load_config(search=(legacy, current)).debug_loglevel == 3
    os.unlink(legacy)
    assert load_config(search=(legacy, current)).debug_loglevel == 4
    os.unlink(current)
    assert load_config(search=(legacy, current)) == AgentConfig()  # no file: defaults
    # the environment names a file; an explicit argument beats it
    monkeypatch.setenv("KTLSD_CONFIG", write(tmp_path, "[debug]\nloglevel=5\n", "env"))
    assert load_config(search=()).debug_loglevel == 5
    explicit = write(tmp_path, "[debug]\nloglevel=6\n", "explicit")
    assert load_config(explicit).debug_loglevel == 6
    assert find_config(explicit) == explicit


def test_default_search_paths_are_tlshds() -> None:
    from ktlsd.config import SEARCH_PATHS

    assert SEARCH_PATHS == (LEGACY_CONFIG_PATH, CONFIG_PATH)
    assert CONFIG_PATH == "/etc/tlshd/config" and LEGACY_CONFIG_PATH == "/etc/tlshd.conf"


def test_ktlsd_section(tmp_path: Path) -> None:
    text = SHIPPED_CONFIG + (
        "\n[ktlsd]\nservice_socket = /run/test/hs.sock\nservice_mode = 0600\n"
        "service_group = nvme\nkernel = no\nmax_concurrent = 16\npending_limit = 7\n"
        "default_timeout_ms = 2500\nsession_lifetime = 600\n"
        "log_level = WARNING\ngroups = X25519:P-256\n"
    )
    config = load_config(write(tmp_path, text))
    assert config.service_socket == "/run/test/hs.sock"
    assert config.service_mode == 0o600 and config.service_group == "nvme"
    assert config.kernel == "no" and config.max_concurrent == 16 and config.pending_limit == 7
    assert config.default_timeout_ms == 2500 and config.session_lifetime == 600
    assert config.effective_log_level == "warning"
    assert config.groups == "X25519:P-256"
    off = load_config(write(tmp_path, "[ktlsd]\nservice_socket = none\nservice_group = 1234\n",
                            "off"))
    assert off.service_socket is None and off.service_group == 1234


@pytest.mark.parametrize(
    ("text", "line", "needle"),
    [
        ("[debug]\nloglevel\n", 2, "not a key=value pair"),
        ("loglevel=1\n[debug]\n", 1, "before any [group]"),
        ("[debug\nloglevel=1\n", 1, "unterminated group"),
        ("[]\n", 1, "invalid group name"),
        ("[debug]\n=1\n", 2, "empty key name"),
        ("[ktlsd]\nmax_concurrent = many\n", 2, "max_concurrent: 'many' is not an integer"),
        ("[ktlsd]\n\npending_limit = -1\n", 3, "below the minimum 0"),
        ("[ktlsd]\nkernel = maybe\n", 2, "not one of auto, yes, no"),
        ("[ktlsd]\nservice_mode = 999\n", 2, "not an integer"),
        ("[ktlsd]\ndefault_timeout_ms = 0\n", 2, "below the minimum 1"),
        ("[authenticate.server]\nx509.client_auth = perhaps\n", 2, "not a boolean"),
        ("[authenticate]\nkeyrings = a\\qb\n", 2, "invalid escape"),
        ("[authenticate.client]\nx509.certificate = /nonexistent/c.pem\n", 2,
         "x509.certificate is set but x509.private_key is not"),
    ],
)
def test_errors_are_one_line_with_file_and_line(tmp_path: Path, text: str, line: int,
                                                needle: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as error:
        load_config(path)
    message = str(error.value)
    assert message.startswith(f"{path}:{line}: ")
    assert needle in message
    assert "\n" not in message


def test_unreadable_and_non_utf8_files(tmp_path: Path) -> None:
    missing = str(tmp_path / "absent")
    with pytest.raises(ConfigError, match=f"^{missing}: cannot read: No such file"):
        load_config(missing)
    binary = tmp_path / "binary"
    binary.write_bytes(b"[debug]\nloglevel=1\n# \xff\xfe\n")
    with pytest.raises(ConfigError, match=r":3: not valid UTF-8$"):
        load_config(str(binary))


def test_unknown_groups_and_keys_warn_but_load(tmp_path: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="ktlsd.config")
    text = (
        "[debug]\nloglevel=1\nverbose=yes\n[future]\nthing=1\n[tags]\nx=1\n"
        "[ktlsd]\nturbo=1\n"
    )
    config = load_config(write(tmp_path, text))
    assert config.debug_loglevel == 1
    messages = [r.getMessage() for r in caplog.records]
    assert any("unknown key verbose in [debug]" in m and ":3:" in m for m in messages)
    assert any("unknown group [future]" in m for m in messages)
    assert any("unknown key turbo in [ktlsd]" in m for m in messages)
    # tlshd has no [tags] group (its session tags live in /etc/tlshd/tags.d files): unknown here.
    assert any("unknown group [tags]" in m for m in messages)


def test_tlshd_integers_follow_tlshd_and_duplicates_last_wins(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="ktlsd.config")
    config = load_config(write(tmp_path, "[debug]\nloglevel=lots\ntls=1\ntls=2\n"))
    assert config.debug_loglevel == 0 and config.debug_tls == 2
    messages = [r.getMessage() for r in caplog.records]
    assert any("loglevel" in m and "using 0 as tlshd does" in m for m in messages)
    assert any("set again" in m for m in messages)


def test_key_file_details() -> None:
    keyfile = parse_key_file(
        "  # indented comment\n[a]\n  key = value with spaces  \r\nname[de] = ignored\n"
        "[b]\nx=1\n[a]\ny=2\n"
    )
    assert {k: v.value for k, v in keyfile.groups["a"].items()} == {
        "key": "value with spaces", "y": "2",
    }
    assert keyfile.groups["a"]["y"].line == 8
    assert unescape(r"a\sb\tc\\d\;e") == "a b\tc\\d;e"
    with pytest.raises(ValueError, match="lone backslash"):
        unescape("abc\\")
    assert split_list(r"one;two\;three; four ;;") == ["one", "two;three", "four"]


def test_paths_that_do_not_exist_are_warned_not_fatal(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="ktlsd.config")
    config = load_config(write(tmp_path, "[authenticate.server]\nx509.truststore=/nope/ca.pem\n"))
    assert config.server.truststore == "/nope/ca.pem"
    assert any("does not exist" in r.getMessage() for r in caplog.records)


def test_agent_settings_bridge(tmp_path: Path) -> None:
    pytest.importorskip("ktlsd.agent")
    key = tmp_path / "k.pem"
    cert = tmp_path / "c.pem"
    key.write_text("x")
    cert.write_text("x")
    config = load_config(write(
        tmp_path,
        f"[authenticate]\nkeyrings=.nvme\n[authenticate.server]\nx509.certificate={cert}\n"
        f"x509.private_key={key}\n[ktlsd]\nmax_concurrent=3\ngroups=X25519\n",
    ))
    settings = config.agent_settings()
    assert settings.server_x509.certificate == str(cert)
    assert settings.server_x509.private_key == str(key)
    assert settings.keyrings == (".nvme",) and settings.concurrency == 3
    assert settings.groups == "X25519"


def test_agent_settings_carry_timeout_and_lifetime(tmp_path: Path) -> None:
    config = load_config(write(
        tmp_path, "[ktlsd]\ndefault_timeout_ms = 2500\nsession_lifetime = 600\n"))
    settings = config.agent_settings()
    assert settings.default_timeout_ms == 2500
    assert settings.session_lifetime == 600 and settings.keep_sessions
    defaults = AgentConfig().agent_settings()
    assert defaults.default_timeout_ms == DEFAULT_TIMEOUT_MS
    assert defaults.session_lifetime == DEFAULT_SESSION_LIFETIME and defaults.keep_sessions
    none_kept = load_config(write(tmp_path, "[ktlsd]\nsession_lifetime = 0\n", "zero"))
    assert not none_kept.agent_settings().keep_sessions


def test_retired_record_layer_is_warned_about_not_an_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="ktlsd.config")
    config = load_config(write(tmp_path, "[ktlsd]\nrecord_layer = user\n"))
    assert config == AgentConfig(path=config.path)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1, messages
    assert ":2: [ktlsd] record_layer is no longer read: user-space consumers choose" in (
        messages[0])


def test_the_configuration_imports_nothing_of_the_agent() -> None:
    """config.py sits on ktlsd.settings only: loading a configuration pulls in neither the
    agent, the material resolver, the TLS engine nor the upcall sources."""
    code = (
        "import sys, ktlsd.config\n"
        "heavy = [m for m in ('ktlsd.agent', 'ktlsd.material', 'ktlsd.tls', 'ktlsd.upcall',"
        " 'ktlsd.request', 'ktlsd.keyring') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True, cwd=Path(__file__).resolve().parent.parent)
    assert result.stdout.strip() == ""


# What g_key_file_get_integer() (GLib 2.74, libglib-2.0.so.0 on this host) returns for each
# value, recorded by calling the library: None where it fails (tlshd then uses 0).
GLIB_INTEGERS: list[tuple[str, int | None]] = [
    ("2", 2), ("2 # two", 2), ("  7  # c", 7), ("2\tx", 2), ("2 3", 2), ("+2", 2),
    ("-2", -2), ("010", 10), ("2147483647", 2147483647), ("-2147483648", -2147483648),
    ("2# two", None), ("2#two", None), ("2abc", None), ("0x10", None), ("2.5", None),
    ("1e3", None), ("2\\s", None), ("", None), ("- 2", None), ("\uff12", None),
    ("2147483648", None), ("-2147483649", None), ("99999999999", None), ("1_000", None),
]


@pytest.mark.parametrize(("raw", "expected"), GLIB_INTEGERS)
def test_integers_are_read_as_glib_reads_them(raw: str, expected: int | None) -> None:
    if expected is None:
        with pytest.raises(ValueError):
            glib_integer(raw)
    else:
        assert glib_integer(raw) == expected


def test_a_trailing_comment_after_an_integer_is_ignored_as_glib_does(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="ktlsd.config")
    config = load_config(write(tmp_path, "[debug]\nloglevel=2 # two\ntls = 1 # one\n"
                                         "nl=3# three\n"))
    assert (config.debug_loglevel, config.debug_tls) == (2, 1)
    assert config.effective_log_level == "debug"
    # "3# three": no whitespace after the number, so GLib fails and tlshd uses 0
    assert config.debug_nl == 0
    (warning,) = [r.getMessage() for r in caplog.records]
    assert ":4: [debug] nl: '3# three' is not an integer; using 0 as tlshd does" in warning


def test_the_integer_table_is_what_glib_itself_answers() -> None:
    """Ask the real libglib (when installed) for every value of :data:`GLIB_INTEGERS`."""
    import ctypes

    try:
        glib = ctypes.CDLL("libglib-2.0.so.0")
    except OSError:
        pytest.skip("libglib-2.0.so.0 is not installed")
    glib.g_key_file_new.restype = ctypes.c_void_p
    glib.g_key_file_free.argtypes = [ctypes.c_void_p]
    glib.g_key_file_load_from_data.argtypes = [ctypes.c_void_p, ctypes.c_char_p,
                                               ctypes.c_ssize_t, ctypes.c_int, ctypes.c_void_p]
    glib.g_key_file_get_integer.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_char_p,
                                            ctypes.POINTER(ctypes.c_void_p)]
    glib.g_error_free.argtypes = [ctypes.c_void_p]
    for raw, expected in GLIB_INTEGERS:
        data = f"[debug]\nloglevel={raw}\n".encode()
        keyfile = glib.g_key_file_new()
        try:
            assert glib.g_key_file_load_from_data(keyfile, data, len(data), 0, None)
            error = ctypes.c_void_p()
            value = glib.g_key_file_get_integer(keyfile, b"debug", b"loglevel",
                                                ctypes.byref(error))
            failed = bool(error.value)
            if failed:
                glib.g_error_free(error)
        finally:
            glib.g_key_file_free(keyfile)
        assert (None if failed else value) == expected, raw


@pytest.mark.parametrize("key", ["tags_directory", "pkcs11_module", "key_log_file"])
def test_ktlsd_paths_must_be_absolute(tmp_path: Path, key: str) -> None:
    """A relative path would resolve against the agent's working directory: refused."""
    with pytest.raises(ConfigError, match=rf"{key}: 'relative/x' is not an absolute path"):
        load_config(write(tmp_path, f"[ktlsd]\n{key}=relative/x\n"))
    assert load_config(write(tmp_path, "[ktlsd]\ntags_directory=\n")).tags_directory == (
        "/etc/tlshd/tags.d")
