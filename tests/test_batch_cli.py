"""`ferry batch`: run a JSONL file against a server and on the embedded default; status,
download and cancel of a remote batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from cli import embedded
from ferry_testing.procs import ROOT
from tests.conftest import KEY_A, TINY, Stack

pytestmark = [pytest.mark.timeout(900), pytest.mark.e2e]


def lines_file(
    path: Path, n: int, *, bad_line_at: int | None = None, model: str = TINY
) -> list[str]:
    """n chat lines (and one line that is not JSON); returns the valid custom_ids."""
    ids, rows = [], []
    for i in range(n):
        if bad_line_at is not None and i + 1 == bad_line_at:
            rows.append("not json at all")
        ids.append(f"line-{i}")
        rows.append(
            json.dumps(
                {
                    "custom_id": f"line-{i}",
                    "method": "POST",
                    "url": "/v1/chat/completions",
                    "body": {
                        "model": model,
                        "max_tokens": 6,
                        "temperature": 0,
                        "messages": [{"role": "user", "content": f"Hello {i}"}],
                    },
                }
            )
        )
    path.write_text("\n".join(rows) + "\n")
    return ids


def ferry(
    *args: str, env: dict[str, str] | None = None, cwd: Path = ROOT, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cli.main", *args],
        cwd=cwd,
        env=env if env is not None else dict(os.environ),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def read(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_batch_run_against_a_server(stack: Stack, tmp_path: Path) -> None:
    source = tmp_path / "in.jsonl"
    ids = lines_file(source, 8, bad_line_at=3)
    out, err = tmp_path / "out.jsonl", tmp_path / "err.jsonl"
    server = ("--server", stack.url, "--api-key", KEY_A)
    run = ferry("batch", "run", str(source), "-o", str(out), "--errors", str(err), *server)
    assert run.returncode == 0, run.stderr
    assert "batch completed: 8 done, 1 failed of 9" in run.stderr
    results = read(out)
    assert [r["custom_id"] for r in results] == ids
    assert all(r["response"]["status_code"] == 200 for r in results)
    assert [(e["error"]["line"], e["error"]["code"]) for e in read(err)] == [(3, "invalid_json")]

    batch_id = run.stderr.split("batch ", 1)[1].split()[0]
    shown = ferry("batch", "status", batch_id, *server)
    assert shown.returncode == 0 and json.loads(shown.stdout)["status"] == "completed"
    again_out, again_err = tmp_path / "again.jsonl", tmp_path / "again-err.jsonl"
    fetched = ferry(
        "batch", "download", batch_id, "-o", str(again_out), "--errors", str(again_err), *server
    )
    assert fetched.returncode == 0, fetched.stderr
    assert again_out.read_bytes() == out.read_bytes()
    assert again_err.read_bytes() == err.read_bytes()
    refused = ferry("batch", "cancel", batch_id, *server)
    assert refused.returncode != 0 and "error 409" in refused.stderr


def test_batch_run_on_the_embedded_default(tmp_path: Path, model_cache: Path) -> None:
    source = tmp_path / "in.jsonl"
    ids = lines_file(source, 5, model=embedded.DEFAULT_MODEL)
    out = tmp_path / "out.jsonl"
    # Nothing from a test deployment: the embedded default brings its own everything.
    env = {k: v for k, v in os.environ.items() if not k.startswith("FERRY_")}
    env["FERRY_MODEL_CACHE_DIR"] = str(model_cache)
    data_dir = tmp_path / "data"
    run = ferry(
        "batch",
        "run",
        str(source),
        "-o",
        str(out),
        "--data-dir",
        str(data_dir),
        "--engine",
        "transformers",
        env=env,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr + (data_dir / "batch-run.log").read_text()
    results = read(out)
    assert [r["custom_id"] for r in results] == ids
    assert all(r["response"]["body"]["object"] == "chat.completion" for r in results)
    # The run used the data directory: SQLite, its objects, and its key.
    assert (data_dir / "ferry.db").exists() and (data_dir / "api-key").exists()
    assert any((data_dir / "objects" / "files").iterdir())
