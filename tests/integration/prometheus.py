"""A real Prometheus server for tests: Debian's ``prometheus`` binary on loopback, a temporary
config and storage, stopped by its process handle.

The dashboards are only proven against the engine that evaluates them: PromQL's ``irate``,
``histogram_quantile`` and ``label_join`` over series scraped from Mixer's endpoints, found
through the file-based service discovery Mixer writes.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

BINARY = "/usr/bin/prometheus"
HOST = "127.0.0.1"
MIXER_JOB = "raymesh-mixer"  # the job name dashboards/README.md tells operators to use
RAY_JOB = "ray"


class PrometheusError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def scrape_config(mixer_sd_files: list[str], ray_targets: list[str], interval: str = "1s") -> dict[str, Any]:
    """Mixer's replicas by file SD (the files it writes), Ray's node metrics endpoints statically."""
    jobs: list[dict[str, Any]] = [{"job_name": MIXER_JOB, "file_sd_configs": [{"files": mixer_sd_files}]}]
    if ray_targets:
        jobs.append({"job_name": RAY_JOB, "static_configs": [{"targets": ray_targets}]})
    return {"global": {"scrape_interval": interval, "evaluation_interval": interval, "scrape_timeout": interval},
            "scrape_configs": jobs}


@dataclass(slots=True)
class PrometheusServer:
    workdir: Path
    config: dict[str, Any]
    port: int = 0
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self, timeout: float = 20.0) -> "PrometheusServer":
        if not os.access(BINARY, os.X_OK):
            raise PrometheusError(f"{BINARY} not found: install Debian's prometheus package "
                                  "(apt-get install -y prometheus)")
        config_file = self.workdir / "prometheus.yml"
        config_file.write_text(yaml.safe_dump(self.config))
        self.port = self.port or free_port()
        log = open(self.workdir / "prometheus.log", "wb")
        self.process = subprocess.Popen(
            [BINARY, f"--config.file={config_file}", f"--storage.tsdb.path={self.workdir / 'data'}",
             f"--web.listen-address={HOST}:{self.port}", "--storage.tsdb.retention.time=1h",
             "--log.level=warn"],
            stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise PrometheusError(f"prometheus exited with {self.process.returncode}: {self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as resp:
                    if resp.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError):
                pass
            time.sleep(0.1)
        raise PrometheusError(f"prometheus not ready after {timeout}s: {self.log_tail()}")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)

    def log_tail(self, chars: int = 2000) -> str:
        path = self.workdir / "prometheus.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def api(self, path: str, **params: Any) -> Any:
        """GET ``/api/v1/<path>``; the ``data`` of a success, or PrometheusError naming the error."""
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params, doseq=True)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as resp:
                body = json.load(resp)
        except urllib.error.HTTPError as exc:  # 400/422 carry PromQL errors in the body
            body = json.load(exc)
        if body.get("status") != "success":
            raise PrometheusError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        """An instant query (``/api/v1/query``): the vector's ``[{"metric": ..., "value": [t, v]}]``."""
        params: dict[str, Any] = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        data = self.api("query", **params)
        return data["result"] if data["resultType"] in ("vector", "matrix") else [{"metric": {}, "value": data["result"]}]

    def query_range(self, expr: str, start: float, end: float, step: float = 1.0) -> list[dict[str, Any]]:
        """What a Grafana time-series panel asks: ``[{"metric": ..., "values": [[t, v], ...]}]``."""
        return self.api("query_range", query=expr, start=f"{start:.3f}", end=f"{end:.3f}", step=step)["result"]

    def label_values(self, label: str, match: str) -> list[str]:
        """Grafana's ``label_values(match, label)`` template-variable query."""
        return self.api(f"label/{label}/values", **{"match[]": match})

    def active_targets(self) -> list[dict[str, Any]]:
        return self.api("targets", state="active")["activeTargets"]
