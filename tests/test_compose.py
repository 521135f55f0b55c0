"""compose.yaml against the Compose Specification (no Docker engine runs on the test
machines: its JSON schema, as check-jsonschema ships it), and the start-up order it
promises: migrations once, then the API replicas and workers, every service restarted."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = pytest.mark.timeout(60)
COMPOSE = Path(__file__).resolve().parent.parent / "compose.yaml"


CHECK = [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec"]


def _check(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CHECK, str(path)],
        capture_output=True,
        text=True,
        timeout=50,
    )


def _services() -> dict[str, dict[str, Any]]:
    services: dict[str, dict[str, Any]] = yaml.safe_load(COMPOSE.read_text())["services"]
    return services


def test_compose_file_follows_the_compose_specification() -> None:
    checked = _check(COMPOSE)
    assert checked.returncode == 0, checked.stdout + checked.stderr


@pytest.mark.parametrize(
    ("old", "new", "named"),
    [
        ("  api:\n", "  api:\n    restart_policy: always\n", "restart_policy"),
        ("condition: service_completed_successfully", "condition: service_done", "depends_on"),
    ],
    ids=["unknown-key", "unknown-condition"],
)
def test_a_compose_file_the_specification_refuses_fails_the_check(
    tmp_path: Path, old: str, new: str, named: str
) -> None:
    text = COMPOSE.read_text()
    assert old in text
    broken = tmp_path / "compose.yaml"
    broken.write_text(text.replace(old, new, 1))
    checked = _check(broken)
    assert checked.returncode == 1
    assert named in checked.stdout


def test_migrations_run_once_before_the_api_replicas_and_workers_start() -> None:
    services = _services()
    migrate = services["migrate"]
    assert migrate["command"] == ["ferry", "migrate"]
    assert migrate["restart"] == "no"  # a one-off step: done once per `up`
    for name in ("api", "worker"):
        assert services[name]["depends_on"]["migrate"] == {
            "condition": "service_completed_successfully"
        }, name
    # Replicas leave it to the migrate service (they would queue on a lock if it were on).
    assert services["api"]["environment"]["FERRY_MIGRATE_ON_START"] == "false"


def test_every_long_running_service_restarts_after_a_crash() -> None:
    for name, service in _services().items():
        if name != "migrate":
            assert service.get("restart") in {"unless-stopped", "on-failure", "always"}, name
