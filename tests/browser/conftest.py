"""Fixtures for the browser tests: one real `headforge serve` (embedded mode, no Redis) for the
whole session, and a runner for the Playwright script `drive.mjs` in headless Chromium.

The server gets its own data folder but reuses the model repository of `HEADFORGE_HOME`
(`headforge models pull` fills it). Screenshots land in `test-artifacts/browser/`.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from needs import missing

ROOT = Path(__file__).resolve().parents[2]
DRIVER = Path(__file__).with_name("drive.mjs")
STATIC_INDEX = ROOT / "headforge" / "service" / "static" / "index.html"
PLAYWRIGHT = ROOT / "web" / "node_modules" / "playwright-core"
CHROMIUM = os.environ.get("HEADFORGE_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = ROOT / "test-artifacts" / "browser"


def unavailable(reason: str) -> None:
    """Skip when a browser-test prerequisite is missing, or fail where the CI script installed them
    all (it sets HEADFORGE_REQUIRE_BROWSER=1 and HEADFORGE_STRICT_TESTS=1), so a broken setup cannot
    pass as skipped."""
    if os.environ.get("HEADFORGE_REQUIRE_BROWSER") == "1":
        pytest.fail(f"browser tests required but {reason}")
    missing(reason)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _stop_group(proc: subprocess.Popen[bytes]) -> None:
    """Stop the server and the worker it spawned: they share the process group started for it."""
    for sig, grace in ((signal.SIGTERM, 20.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            proc.poll()
            try:
                os.killpg(proc.pid, 0)  # anyone left in the group?
            except ProcessLookupError:
                return
            time.sleep(0.2)


@pytest.fixture(scope="session")
def browser_tools() -> None:
    """Node, playwright-core, Chromium and the built web app must all be present."""
    if shutil.which("node") is None:
        unavailable("node is not installed")
    if not PLAYWRIGHT.exists():
        unavailable("web/node_modules/playwright-core is missing: run `cd web && npm ci`")
    if not Path(CHROMIUM).exists():
        unavailable(f"no Chromium at {CHROMIUM}: `apt-get install chromium`")
    if not STATIC_INDEX.exists():
        unavailable("the web app is not built: run `cd web && npm ci && npm run build`")


@pytest.fixture(scope="session")
def api_keys() -> dict[str, str]:
    """Two fresh keys: `main` with the default limits, `limited` allowed one job submission a minute."""
    return {"main": "hf_" + secrets.token_urlsafe(24), "limited": "hf_" + secrets.token_urlsafe(24)}


@pytest.fixture(scope="session")
def server(
    browser_tools: None, api_keys: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """Start `headforge serve` with API keys on a free port; yield its base URL ("http://127.0.0.1:PORT/").
    No FLAME asset, whatever HEADFORGE_HOME holds: the page must show `flame` as unavailable."""
    data = tmp_path_factory.mktemp("serve-data")
    yield from _serve(data, api_keys, data / "no-flame" / "flame.npz", "serve.log")


@pytest.fixture(scope="session")
def flame_server(
    browser_tools: None, api_keys: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """A second `headforge serve` with the tests' synthetic FLAME asset, for FLAME heads (animation)."""
    from flame_synthetic import imported_synthetic_flame

    data = tmp_path_factory.mktemp("serve-flame-data")
    _, asset = imported_synthetic_flame(data)
    yield from _serve(data, api_keys, asset, "serve-flame.log")


def _serve(data: Path, api_keys: dict[str, str], flame_asset: Path, log_name: str) -> Iterator[str]:
    digest = {name: hashlib.sha256(key.encode()).hexdigest() for name, key in api_keys.items()}
    keys = [
        {"id": "browser", "sha256": digest["main"]},
        {
            "id": "browser-limited",
            "sha256": digest["limited"],
            "rate_limit_per_minute": 1,
            "rate_limit_burst": 1,
        },
    ]
    keys_file = data / "keys.json"
    keys_file.write_text(json.dumps({"keys": keys}))
    port = _free_port()
    env = dict(os.environ)
    for name in ("HEADFORGE_REDIS_URL", "HEADFORGE_API_KEYS", "HEADFORGE_S3_BUCKET"):
        env.pop(name, None)
    env.update(
        HEADFORGE_DATA_DIR=str(data),
        HEADFORGE_API_KEYS_FILE=str(keys_file),
        HEADFORGE_FLAME_ASSET=str(flame_asset),
        HEADFORGE_JSON_LOGS="0",
        PYTHONUNBUFFERED="1",
    )
    log_path = data / "serve.log"
    log = log_path.open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "headforge", "serve", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(
                    f"`headforge serve` exited with {proc.returncode}:\n{log_path.read_text(errors='replace')[-4000:]}"
                )
            try:
                if httpx.get(base + "readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(
                    f"`headforge serve` not ready after 120 s:\n{log_path.read_text(errors='replace')[-4000:]}"
                )
            time.sleep(0.5)
        if httpx.get(base, timeout=10).status_code != 200:
            pytest.fail("the server does not serve the web app at /")
        yield base
    finally:
        _stop_group(proc)
        log.close()
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(log_path, ARTIFACTS / log_name)


@pytest.fixture(scope="session")
def drive() -> Callable[..., dict[str, Any]]:
    """`drive(scenario, url, photo)` runs drive.mjs and returns its report."""
    return _drive


def _drive(
    scenario: str, url: str, photo: Path | list[Path], *, name: str = "", timeout_s: float = 300, **extra: Any
) -> dict[str, Any]:
    """Run one scenario of drive.mjs and return its report; fails on a script crash. `extra` goes
    into the script's config (apiKey, submits)."""
    config = {
        "url": url,
        "photo": [str(p) for p in photo] if isinstance(photo, list) else str(photo),
        "out": str(ARTIFACTS),
        "chromium": CHROMIUM,
        "name": name or scenario,
        **extra,
    }
    proc = subprocess.run(
        ["node", str(DRIVER), scenario, json.dumps(config)],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        cwd=ROOT,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        pytest.fail(
            f"drive.mjs {scenario} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    report: dict[str, Any] = json.loads(lines[-1])
    if report.get("exception"):
        pytest.fail(
            f"drive.mjs {scenario} raised:\n{report['exception']}\nreport: {json.dumps(report)[:3000]}"
        )
    return report
