"""`ferry keys create|list|show|set|revoke` against a live API on loopback (the real app
under uvicorn in a thread, real PostgreSQL and Redis; no worker needed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from redis import Redis

from api.app import create_app
from api.core.settings import ApiSettings
from cli.main import main
from ferry_testing.procs import ROOT, free_port
from storage.objects import ObjectStoreSettings
from storage.settings import StorageSettings
from tests.conftest import KEY_A, REDIS_BASE, new_database

pytestmark = pytest.mark.timeout(120)

REDIS_URL = f"{REDIS_BASE}/8"  # no test stack uses db 8
ADMIN = "sk-admin-cli-" + os.urandom(6).hex()


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    Redis.from_url(REDIS_URL).flushdb()
    with new_database("ferry_test_keys_cli") as database_url:
        app = create_app(
            ApiSettings(api_keys=[KEY_A], admin_key=ADMIN, migrate_on_start=False),
            StorageSettings(database_url=database_url, redis_url=REDIS_URL),
            ObjectStoreSettings(object_store="local", object_dir=tmp_path_factory.mktemp("o")),
        )
        port = free_port()
        server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
        )
        thread = threading.Thread(target=server.run, name="keys-cli-api", daemon=True)
        thread.start()
        deadline = time.monotonic() + 60
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "API did not start"
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
        server.should_exit = True
        thread.join(30)


def ferry_keys(
    capsys: pytest.CaptureFixture[str], url: str, *args: str, admin: str | None = ADMIN
) -> tuple[int, str, str]:
    """`ferry keys ...` in this process: (exit status, stdout, stderr)."""
    argv = ["keys", *args, "--url", url, *(["--admin-key", admin] if admin else [])]
    try:
        status = main(argv)
    except SystemExit as exc:
        status = exc.code if isinstance(exc.code, int) else 1
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
    out, err = capsys.readouterr()
    return status, out, err


def models_status(url: str, token: str) -> int:
    return httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {token}"}).status_code


def created(out: str) -> tuple[str, str]:
    fields = dict(line.split(":", 1) for line in out.strip().splitlines())
    fields = {name: value.strip() for name, value in fields.items()}
    return fields["id"], fields["key"]


def test_create_prints_a_working_token_once_and_list_shows_it(
    capsys: pytest.CaptureFixture[str], url: str
) -> None:
    status, out, err = ferry_keys(
        capsys, url, "create", "--name", "cli team", "--requests-per-minute", "30", "--weight", "2"
    )
    assert status == 0, err
    key_id, token = created(out)
    assert key_id.startswith("key_") and token.startswith("sk-ferry-")
    assert "shown this once" in err
    assert models_status(url, token) == 200

    status, out, _ = ferry_keys(capsys, url, "list")
    assert status == 0
    header, *lines = out.strip().splitlines()
    assert header.split() == ["ID", "NAME", "SOURCE", "CREATED", "STATUS", "LIMITS"]
    row = next(line for line in lines if line.startswith(key_id))
    assert "cli team" in row and "admin" in row and "active" in row
    assert "requests_per_minute=30 weight=2" in row
    assert token not in out
    assert any(" env " in line for line in lines)  # FERRY_API_KEYS' key

    status, out, _ = ferry_keys(capsys, url, "list", "--json")
    listed = {k["id"]: k for k in json.loads(out)}
    assert listed[key_id]["limits"]["weight"] == 2
    assert all("key" not in k for k in listed.values())


def test_set_changes_and_clears_limits(capsys: pytest.CaptureFixture[str], url: str) -> None:
    _, out, _ = ferry_keys(capsys, url, "create", "--name", "tune", "--tokens-per-minute", "100")
    key_id, _ = created(out)
    status, out, err = ferry_keys(
        capsys, url, "set", key_id, "--max-priority", "4", "--clear", "tokens-per-minute"
    )
    assert status == 0, err
    key: dict[str, Any] = json.loads(out)
    assert key["limits"]["max_priority"] == 4
    assert key["limits"]["tokens_per_minute"] is None
    status, out, _ = ferry_keys(capsys, url, "set", key_id, "--name", "tuned")
    assert json.loads(out)["name"] == "tuned"
    assert json.loads(out)["limits"]["max_priority"] == 4
    status, out, _ = ferry_keys(capsys, url, "show", key_id)
    assert (json.loads(out)["name"], json.loads(out)["effective_limits"]["weight"]) == ("tuned", 1)


def test_revoke_makes_the_token_401(capsys: pytest.CaptureFixture[str], url: str) -> None:
    _, out, _ = ferry_keys(capsys, url, "create", "--name", "short-lived")
    key_id, token = created(out)
    assert models_status(url, token) == 200
    status, out, _ = ferry_keys(capsys, url, "revoke", key_id)
    assert (status, out.strip()) == (0, f"revoked {key_id}")
    assert models_status(url, token) == 401  # this API process forgot its cache
    _, out, _ = ferry_keys(capsys, url, "list")
    assert "revoked" in next(line for line in out.splitlines() if line.startswith(key_id))


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["create", "--name", "neg", "--max-queued-jobs", "-1"], "max_queued_jobs"),
        (["create", "--name", "big", "--tokens-per-minute", str(10**12)], "tokens_per_minute"),
        (["create", "--name", ""], "name"),
        (["set", "key_nope", "--weight", "2"], "No API key with id `key_nope`"),
        (["revoke", "key_nope"], "No API key with id `key_nope`"),
        (["show", "key_nope"], "No API key with id `key_nope`"),
    ],
)
def test_refused_requests_exit_non_zero_with_the_apis_message(
    capsys: pytest.CaptureFixture[str], url: str, args: list[str], expected: str
) -> None:
    before = json.loads(ferry_keys(capsys, url, "list", "--json")[1])
    status, out, err = ferry_keys(capsys, url, *args)
    assert status == 1
    assert "ferry keys: error 4" in err and expected in err
    assert out == ""
    assert json.loads(ferry_keys(capsys, url, "list", "--json")[1]) == before


def test_wrong_or_missing_admin_key_and_unreachable_server(
    capsys: pytest.CaptureFixture[str], url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    status, _, err = ferry_keys(capsys, url, "list", admin=KEY_A)
    assert status == 1 and "not its admin key" in err
    monkeypatch.delenv("FERRY_ADMIN_KEY", raising=False)
    status, _, err = ferry_keys(capsys, url, "list", admin=None)
    assert status == 1 and "no admin key" in err
    status, _, err = ferry_keys(capsys, f"http://127.0.0.1:{free_port()}", "list")
    assert status == 1 and "cannot reach" in err
    status, _, err = ferry_keys(capsys, url, "set", "key_x")
    assert status == 1 and "nothing to change" in err


def test_the_command_reads_ferry_url_and_ferry_admin_key(url: str, tmp_path: Path) -> None:
    env = {**os.environ, "FERRY_URL": url, "FERRY_ADMIN_KEY": ADMIN}
    run = subprocess.run(
        [sys.executable, "-m", "cli.main", "keys", "create", "--name", "from-env"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    _, token = created(run.stdout)
    assert models_status(url, token) == 200
    refused = subprocess.run(
        [sys.executable, "-m", "cli.main", "keys", "revoke", "key_nope"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 1
    assert "No API key with id `key_nope`" in refused.stderr


def test_ferry_serve_passes_ferry_admin_key_through_and_makes_none_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from cli.embedded import embedded_api_settings

    monkeypatch.setenv("FERRY_ADMIN_KEY", ADMIN)
    served = embedded_api_settings(ApiSettings(), "sk-embedded", ["m"], no_auth=False)
    assert served.admin_key == ADMIN
    assert served.api_keys == ["sk-embedded"]
    monkeypatch.delenv("FERRY_ADMIN_KEY")
    assert embedded_api_settings(ApiSettings(), "k", ["m"], no_auth=False).admin_key is None
