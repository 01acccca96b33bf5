"""The key file (hashes only, atomic, re-read on change), the CLI that manages it, the start-up
warning when authentication is off, and the rate-limit rule, without a server."""

from __future__ import annotations

import logging
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from app.api_keys import KeyFileError, KeyRing, add_key, hash_secret, parse_scopes, read_keys, revoke_key, write_keys
from app.rate_limits import gcra
from tests.conftest import REPO


def run_cli(keys_file: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "app.cli", "keys", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=60, env={**os.environ, "UNBOX_API_KEYS_FILE": str(keys_file)})


def test_cli_shows_the_key_once_and_stores_only_its_hash(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys.toml"
    added = run_cli(keys_file, "add", "radiology", "--scopes", "jobs,explain", "--rate-limit", "30")
    assert added.returncode == 0, added.stderr
    token = added.stdout.strip().splitlines()[-1]
    assert token.startswith("ubx_") and " " not in token
    text = keys_file.read_text()
    assert token not in text and token.split("_", 2)[2] not in text  # neither the key nor its secret
    assert hash_secret(token) in text
    assert stat.S_IMODE(keys_file.stat().st_mode) == 0o600
    (record,) = read_keys(keys_file).values()
    assert record.scopes == ("explain", "jobs") and record.rate_limit_per_minute == 30
    listed = run_cli(keys_file, "list")
    assert record.id in listed.stdout and "radiology" in listed.stdout and "sha256" not in listed.stdout
    assert run_cli(keys_file, "revoke", record.id).returncode == 0
    assert read_keys(keys_file) == {}
    unknown = run_cli(keys_file, "revoke", record.id)
    assert unknown.returncode == 2 and "no key" in unknown.stderr
    bad_scope = run_cli(keys_file, "add", "x", "--scopes", "root")
    assert bad_scope.returncode == 2 and "unknown scopes" in bad_scope.stderr


def test_keyring_checks_the_secret_and_follows_the_file(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys.toml"
    record, token = add_key(keys_file, "a", parse_scopes("predict"))
    ring = KeyRing(keys_file)
    assert ring.lookup(token) == record
    forged = token[:-1] + ("A" if token[-1] != "A" else "B")  # right id, wrong secret
    assert ring.lookup(forged) is None and ring.lookup("ubx_nonsense") is None and ring.lookup("") is None
    second, token2 = add_key(keys_file, "b", parse_scopes("jobs"))
    ring.refresh(force=True)
    assert ring.lookup(token2) == second
    keys_file.write_text("[[keys]\nbroken")  # a half-finished hand edit keeps the last good keys
    ring.refresh(force=True)
    assert ring.lookup(token) == record
    write_keys(keys_file, {record.id: record, second.id: second})  # the operator repairs it
    revoke_key(keys_file, record.id)
    ring.refresh(force=True)
    assert ring.lookup(token) is None and ring.lookup(token2) == second
    keys_file.unlink()  # a deleted file holds no keys: fail closed
    ring.refresh(force=True)
    assert ring.lookup(token2) is None


def test_invalid_key_files_are_refused_with_the_reason(tmp_path: Path) -> None:
    bad = tmp_path / "keys.toml"
    bad.write_text('[[keys]]\nid = "abc"\nname = "x"\nhash = "sha256:00"\nscopes = ["jobs"]\n')
    with pytest.raises(KeyFileError, match="12 hex digits"):
        read_keys(bad)
    bad.write_text('[[keys]]\nid = "0123456789ab"\nname = "x"\nhash = "plain-secret"\nscopes = ["jobs"]\n')
    with pytest.raises(KeyFileError, match="sha256"):
        read_keys(bad)
    from app.main import create_app
    from app.settings import SettingsError, load_settings

    with pytest.raises(SettingsError, match="UNBOX_API_KEYS_FILE"):
        create_app(load_settings(models=[], api_keys_file=bad))
    from fastapi.testclient import TestClient

    missing = tmp_path / "missing.toml"  # fails closed until a key is added, without a restart
    with TestClient(create_app(load_settings(models=[], api_keys_file=missing))) as client:
        assert client.get("/v1/models").status_code == 401
        _, token = add_key(missing, "late", parse_scopes("predict"))
        time.sleep(1.1)  # the key file is checked at most once a second
        assert client.get("/v1/models", headers={"Authorization": f"Bearer {token}"}).status_code == 200


def test_open_api_on_a_public_address_warns_loudly(caplog: pytest.LogCaptureFixture) -> None:
    from app.main import create_app
    from app.settings import load_settings

    with caplog.at_level(logging.WARNING, logger="unbox"):
        create_app(load_settings(models=[], host="127.0.0.1"))
    assert "AUTHENTICATION IS OFF" not in caplog.text
    with caplog.at_level(logging.WARNING, logger="unbox"):
        create_app(load_settings(models=[], host="0.0.0.0"))
    assert "AUTHENTICATION IS OFF" in caplog.text


def test_gcra_allows_the_minute_then_one_per_interval() -> None:
    arrival, now, answers = 0.0, 1000.0, []
    for _ in range(7):
        decision, arrival = gcra(arrival, now, 6)
        answers.append(decision.allowed)
    assert answers == [True] * 6 + [False]
    assert decision.retry_after_s == pytest.approx(10.0)
    decision, arrival = gcra(arrival, now + 10.0, 6)  # one interval later: one more
    assert decision.allowed and decision.remaining == 0
    assert not gcra(arrival, now + 10.5, 6)[0].allowed
    assert gcra(arrival, now + 80.0, 6)[0].remaining == 5  # a quiet minute refills the quota

