"""schemathesis against the live OpenAPI document of the shared stack: no request may get a 5xx."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from stacklib import KEYS, Stack

pytestmark = [pytest.mark.service, pytest.mark.timeout(600)]


def test_schemathesis_finds_no_server_errors(redis_stack: Stack, tmp_path: Path) -> None:
    command = [
        sys.executable,
        "-m",
        "schemathesis.cli",
        "run",
        f"{redis_stack.base_url}/openapi.json",
        "--checks",
        "not_a_server_error",
        "--max-examples",
        "25",
        "--seed",
        "20261121",
        "--header",
        f"Authorization: Bearer {KEYS['alice']}",
        "--request-timeout",
        "90",
        "--workers",
        "1",
        "--no-shrink",
        "--suppress-health-check",
        "all",
    ]
    run = subprocess.run(command, capture_output=True, text=True, timeout=540, cwd=tmp_path)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-6000:]
    tested = re.search(r"Tested:\s+(\d+)", output)
    assert tested is not None and int(tested.group(1)) >= 12, output[-3000:]  # every operation was exercised
