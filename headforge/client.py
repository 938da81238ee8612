"""A small typed client for the headforge REST API.

from headforge.client import HeadforgeClient

with HeadforgeClient("http://127.0.0.1:8000", api_key="hf_...") as client:
    job = client.submit(["photo.jpg"], pipeline="facemesh")
    job = client.wait(job["id"])
    client.download_artifacts(job, "out/")
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx

from headforge.errors import HeadforgeError

TERMINAL_STATUSES = frozenset({"succeeded", "failed", "canceled"})
ImageInput = str | Path | tuple[str, bytes]


class ApiError(HeadforgeError):
    """An error answered by the server, with its stable code, HTTP status and Retry-After."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        details: dict[str, Any] | None = None,
        retry_after: float | None = None,
    ):
        super().__init__(message, details=details, code=code)
        self.http_status = status
        self.retry_after = retry_after


class WaitTimeout(TimeoutError):
    """`wait_many` gave up; `jobs` holds the last document seen for every job, finished or not."""

    def __init__(self, message: str, jobs: dict[str, dict[str, Any]]):
        super().__init__(message)
        self.jobs = jobs


class HeadforgeClient:
    """Synchronous client; one `httpx.Client` connection pool per instance."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        timeout: float = 120.0,
        transport: httpx.BaseTransport | None = None,
    ):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(
            base_url=base_url.rstrip("/"), headers=headers, timeout=timeout, transport=transport
        )

    def __enter__(self) -> HeadforgeClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    # ------------------------------------------------------------------ plumbing

    def _check(self, response: httpx.Response) -> httpx.Response:
        if response.status_code < 400:
            return response
        try:
            error = response.json()["error"]
            code, message, details = error["code"], error["message"], error.get("details") or {}
        except (ValueError, KeyError, TypeError):
            code, message, details = "http_error", response.text[:500], {}
        retry = response.headers.get("Retry-After")
        raise ApiError(response.status_code, code, message, details, float(retry) if retry else None)

    @staticmethod
    def _files(field: str, images: Sequence[ImageInput]) -> list[tuple[str, tuple[str, bytes, str]]]:
        files = []
        for item in images:
            if isinstance(item, tuple):
                name, data = item
            else:
                path = Path(item)
                name, data = path.name, path.read_bytes()
            files.append((field, (name, data, "application/octet-stream")))
        return files

    @staticmethod
    def _form(options: dict[str, Any]) -> dict[str, Any]:
        form: dict[str, Any] = {}
        for key, value in options.items():
            if value is None:
                continue
            if key == "outputs" and not isinstance(value, str):
                form[key] = ",".join(value)
            else:
                form[key] = str(value)
        return form

    # ------------------------------------------------------------------ jobs

    def submit(
        self,
        images: Sequence[ImageInput],
        *,
        wait: int = 0,
        idempotency_key: str | None = None,
        **options: Any,
    ) -> dict[str, Any]:
        """POST /v1/jobs. Options: the fields of `ReconstructOptions` (pipeline, outputs, texture_size,
        splats, max_heads, seed, subject) and webhook_url.
        Returns the 202 body, or the finished job when `wait` seconds sufficed."""
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        response = self.http.post(
            "/v1/jobs",
            params={"wait": wait} if wait else None,
            files=self._files("images", images),
            data=self._form(options),
            headers=headers,
            timeout=max(120.0, wait + 30.0),
        )
        body: dict[str, Any] = self._check(response).json()
        return body

    def job(self, job_id: str) -> dict[str, Any]:
        body: dict[str, Any] = self._check(self.http.get(f"/v1/jobs/{job_id}")).json()
        return body

    def jobs(self, limit: int = 50) -> list[dict[str, Any]]:
        body: list[dict[str, Any]] = self._check(self.http.get("/v1/jobs", params={"limit": limit})).json()[
            "jobs"
        ]
        return body

    def wait(
        self,
        job_id: str,
        timeout: float = 600.0,
        poll: float = 0.25,
        on_update: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Poll until the job is succeeded, failed or canceled (or `timeout` passes: TimeoutError)."""
        return self.wait_many([job_id], timeout=timeout, poll=poll, on_update=on_update)[job_id]

    def wait_many(
        self,
        job_ids: Sequence[str],
        timeout: float = 600.0,
        poll: float = 0.25,
        on_update: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, dict[str, Any]]:
        """Poll every unfinished job in each round until all are succeeded, failed or canceled, and
        return the final documents by id. `on_update` sees each polled document as it arrives, so
        every job's progress moves together. `WaitTimeout` when `timeout` seconds pass without any
        job finishing (jobs queued behind each other each get that long)."""
        latest: dict[str, dict[str, Any]] = {}
        pending = list(dict.fromkeys(job_ids))
        deadline = time.monotonic() + timeout
        while True:
            for job_id in list(pending):
                job = self.job(job_id)
                latest[job_id] = job
                if on_update is not None:
                    on_update(job)
                if job["status"] in TERMINAL_STATUSES:
                    pending.remove(job_id)
                    deadline = time.monotonic() + timeout
            if not pending:
                return {job_id: latest[job_id] for job_id in job_ids}
            if time.monotonic() > deadline:
                states = ", ".join(f"{job_id} {latest[job_id]['status']}" for job_id in pending)
                raise WaitTimeout(f"no job finished in {timeout} s; still waiting for {states}", latest)
            time.sleep(poll)

    def delete(self, job_id: str) -> dict[str, Any] | None:
        response = self._check(self.http.delete(f"/v1/jobs/{job_id}"))
        return None if response.status_code == 204 else response.json()

    def artifact(self, job: dict[str, Any], name: str) -> bytes:
        url = next(a["url"] for a in job["artifacts"] if a["name"] == name)
        return self._check(self.http.get(url)).content

    def download_artifacts(self, job: dict[str, Any], out_dir: str | Path) -> list[Path]:
        """Save every artifact under `out_dir`, checking each file's size and sha256."""
        out = Path(out_dir)
        saved = []
        for artifact in job["artifacts"]:
            target = out / artifact["name"]
            target.parent.mkdir(parents=True, exist_ok=True)
            digest = hashlib.sha256()
            temporary = target.with_name(f".{target.name}.part")
            with self.http.stream("GET", artifact["url"]) as response:
                if response.status_code >= 400:
                    response.read()
                    self._check(response)
                with open(temporary, "wb") as handle:
                    for block in response.iter_bytes():
                        digest.update(block)
                        handle.write(block)
            if digest.hexdigest() != artifact["sha256"] or temporary.stat().st_size != artifact["size"]:
                temporary.unlink(missing_ok=True)
                raise ApiError(0, "checksum_mismatch", f"{artifact['name']} arrived corrupted")
            temporary.replace(target)
            saved.append(target)
        return saved

    # ------------------------------------------------------------------ batches and discovery

    def submit_batch(
        self,
        images: Sequence[ImageInput] = (),
        *,
        archive: ImageInput | None = None,
        idempotency_key: str | None = None,
        **options: Any,
    ) -> dict[str, Any]:
        files = self._files("images", images)
        if archive is not None:
            files += self._files("archive", [archive])
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        body: dict[str, Any] = self._check(
            self.http.post("/v1/batches", files=files, data=self._form(options), headers=headers)
        ).json()
        return body

    def batch(self, batch_id: str) -> dict[str, Any]:
        body: dict[str, Any] = self._check(self.http.get(f"/v1/batches/{batch_id}")).json()
        return body

    def batch_archive(self, batch_id: str) -> bytes:
        return self._check(self.http.get(f"/v1/batches/{batch_id}/archive")).content

    def models(self) -> dict[str, Any]:
        body: dict[str, Any] = self._check(self.http.get("/v1/models")).json()
        return body

    def ready(self) -> bool:
        try:
            return self.http.get("/readyz", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False
