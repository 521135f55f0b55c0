"""Helpers shared by the PAI-EAS tests: the seeds' client snippets copied with host and token
filled in, run or imported, and the jobs they left, read in SQL."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import psycopg

from tests.conftest import Stack

SEEDS = Path(__file__).parent / "eas_seeds"


def seed_copy(name: str, tmp_path: Path, placeholders: dict[str, str]) -> Path:
    """The seed's file with its host/token placeholders filled in, nothing else changed."""
    text = (SEEDS / name).read_text()
    for placeholder, value in placeholders.items():
        assert placeholder in text, placeholder
        text = text.replace(placeholder, value)
    path = tmp_path / name
    path.write_text(text)
    return path


def run_seed(path: Path, *args: str, timeout: float = 300) -> str:
    """Run the seed as a script; what it printed (no newline translation: the tiny
    model's random text may hold a carriage return)."""
    done = subprocess.run(
        [sys.executable, str(path), *args],
        capture_output=True,
        timeout=timeout,
        cwd=path.parent,
        env={**os.environ, "PYTHONIOENCODING": "utf-8"},
    )
    out, err = done.stdout.decode(), done.stderr.decode()
    assert done.returncode == 0, out + err
    return out


def import_seed(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"seed_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def mllm_placeholders(stack: Stack, key: str) -> dict[str, str]:
    return {"'<service_url>'": repr(stack.url), "'<token>'": repr(key)}


def jobs_whose_prompt_has(stack: Stack, text: str) -> list[dict[str, Any]]:
    """Stored requests (oldest first) of jobs whose prompt contains `text`."""
    url = stack.database_url.replace("postgresql+asyncpg://", "postgresql://")
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT request FROM jobs WHERE request::text LIKE %s ORDER BY id", (f"%{text}%",)
        ).fetchall()
    return [row[0] for row in rows]


def contents(request: dict[str, Any]) -> list[tuple[str, Any]]:
    return [(m["role"], m["content"]) for m in request["messages"]]


def latest_job_id(stack: Stack, key: str) -> str | None:
    with stack.client(key) as client:
        first: str | None = client.get("/v1/jobs", params={"limit": 1}).json()["first_id"]
    return first
