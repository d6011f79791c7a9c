"""The deployments against the session's real ``prefect server start``, driven by the ``prefect`` CLI as a user would.

Flows run in-process never reach the filter routes that ``prefect deploy`` and
``prefect deployment ls`` call; with fastapi 0.151 and later, a real server answered them 422
(the 3.8 client sends ``"limit": null``). These tests keep the pinned versions honest.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
PREFECT = str(Path(sys.executable).with_name("prefect"))
POOL = "skumatch-process"  # the work pool prefect.yaml names


def _prefect(env: dict[str, str], *args: str) -> str:
    """Run a ``prefect`` CLI command from the repository root; its output, or a failure showing it."""
    result = subprocess.run(
        [PREFECT, "--no-prompt", *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, f"prefect {' '.join(args)} failed:\n{result.stdout[-3000:]}{result.stderr[-3000:]}"
    return result.stdout


def test_prefect_deploy_all_registers_the_deployments_and_the_filters_answer(prefect_api):
    _prefect(prefect_api, "work-pool", "create", POOL, "--type", "process")
    deployed = _prefect(prefect_api, "deploy", "--all")
    assert "retrain/grocery-store" in deployed
    # Each of these calls a /filter route that answered 422 with fastapi 0.151 and later.
    listed = _prefect(prefect_api, "deployment", "ls")
    assert "retrain/grocery-store" in listed
    _prefect(prefect_api, "flow-run", "ls")
    inspected = _prefect(prefect_api, "work-pool", "inspect", POOL)
    assert POOL in inspected
