"""Credentials without a server: where keys come from, how they are compared, which route needs which."""

from __future__ import annotations

import pytest

from serving.access import Credentials, presented_credential, route_kind


def test_keys_come_from_the_environment_and_a_file(tmp_path):
    keys_file = tmp_path / "keys"
    keys_file.write_text("# one key a line\nfile-key-1\n\nfile-key-2  # the shop app\n")
    credentials = Credentials.from_environment(
        {
            "SKUMATCH_API_KEYS": "env-a, env-b",
            "SKUMATCH_API_KEYS_FILE": str(keys_file),
            "SKUMATCH_ADMIN_TOKEN": "the-admin",
        }
    )
    for key in ("env-a", "env-b", "file-key-1", "file-key-2"):
        assert credentials.is_caller(key), key
    for wrong in ("env-", "env-a ", "ENV-A", "", "the-admin", "# one key a line"):
        assert not credentials.is_caller(wrong), wrong
    assert credentials.is_admin("the-admin") and not credentials.is_admin("env-a")
    assert credentials.callers_need_key


def test_nothing_configured_means_open_callers_and_no_admin():
    credentials = Credentials.from_environment({})
    assert not credentials.callers_need_key and credentials.admin_digest is None
    assert not credentials.is_admin("anything") and not credentials.is_admin(None)


def test_secrets_are_kept_as_digests_only():
    credentials = Credentials.from_environment({"SKUMATCH_API_KEYS": "plain-secret", "SKUMATCH_ADMIN_TOKEN": "tok"})
    assert "plain-secret" not in repr(credentials) and "tok'" not in repr(credentials)
    assert all(len(digest) == 32 for digest in credentials.caller_digests)


def test_an_unreadable_key_file_stops_start_up(tmp_path):
    # Fail closed: an operator who named a key file meant the service to need keys.
    with pytest.raises(OSError):
        Credentials.from_environment({"SKUMATCH_API_KEYS_FILE": str(tmp_path / "missing")})
    with pytest.raises(ValueError, match="one admin token"):
        Credentials.from_environment({"SKUMATCH_ADMIN_TOKEN": "a b"})


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"authorization": "Bearer k1"}, "k1"),
        ({"authorization": "bearer   k1 "}, "k1"),
        ({"x-api-key": "k2"}, "k2"),
        ({"authorization": "Basic dXNlcjpw"}, None),
        ({"authorization": "Bearer "}, None),
        ({}, None),
    ],
)
def test_presented_credential(headers, expected):
    assert presented_credential(headers) == expected


@pytest.mark.parametrize(
    ("path", "kind"),
    [
        ("/", "open"),
        ("/readyz", "open"),
        ("/metrics", "open"),
        ("/docs", "open"),
        ("/static_content/x.css", "open"),
        ("/match", "caller"),
        ("/info", "caller"),
        ("/thumbnail", "caller"),
        ("/nowhere", "caller"),
        ("/admin/reload", "admin"),
        ("/admin/anything", "admin"),
    ],
)
def test_route_kind(path, kind):
    assert route_kind(path) == kind
