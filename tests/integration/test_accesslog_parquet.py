"""Every node's proxy writes its access log as Parquet files when the mesh is installed with
``access_log.parquet_dir`` (``tests.integration.conftest`` installs it so): real requests
through the mesh become rows, read back with pyarrow, cut by row count and by age."""
from __future__ import annotations

import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray

from actors.proxy_worker import proxy_actor_name
from mesh.client import NAMESPACE
from proxy_core.accesslog import PARQUET_SCHEMA
from tests.integration.conftest import ACCESS_LOG_ROTATE_ROWS

pytestmark = pytest.mark.ray

SERVICE = "alog"
FQDN = f"{SERVICE}.default.svc.cluster.local"
CLUSTER = f"outbound|8000||{FQDN}"
OK, FAILED = 40, 5    # more than ACCESS_LOG_ROTATE_ROWS: at least one file is cut by its row count


def our_rows(directory: Path) -> tuple[pa.Table, list[Path]]:
    """Every complete file's rows that name this test's service, and the files."""
    files = sorted(directory.glob("*.parquet"))
    tables = [pq.read_table(f) for f in files]
    for f, t in zip(files, tables):
        assert t.schema.equals(PARQUET_SCHEMA), f"{f.name}: {t.schema}"
        assert t.num_rows <= ACCESS_LOG_ROTATE_ROWS, f"{f.name}: {t.num_rows} rows, rotation is every " \
                                                     f"{ACCESS_LOG_ROTATE_ROWS}"
    table = pa.concat_tables(tables) if tables else PARQUET_SCHEMA.empty_table()
    return table.filter(pa.compute.equal(table["upstream_cluster"], CLUSTER)), files


def test_proxies_write_the_access_log_as_parquet(mesh, access_log_dir: Path) -> None:
    mesh.deploy(SERVICE, "v1", node_index=1)
    mesh.wait_endpoints(SERVICE, 1)
    started = time.time()
    for i in range(OK):
        assert mesh.get(f"http://{SERVICE}:8000/ok/{i}", headers={"user-agent": "alog-test"})[0] == 200
    for _ in range(FAILED):
        assert mesh.get(f"http://{SERVICE}:8000/status/503")[0] == 503
    deadline = time.monotonic() + 15   # the last file is cut once its oldest row is 1 s old
    rows, files = our_rows(access_log_dir)
    while rows.num_rows < OK + FAILED and time.monotonic() < deadline:
        time.sleep(0.5)
        rows, files = our_rows(access_log_dir)
    assert rows.num_rows == OK + FAILED, rows.to_pylist()[:3]

    data = rows.to_pylist()
    assert sorted(r["path"] for r in data if r["response_code"] == 200) == sorted(f"/ok/{i}" for i in range(OK))
    assert [r["path"] for r in data if r["response_code"] == 503] == ["/status/503"] * FAILED
    assert {(r["method"], r["protocol"], r["authority"], r["listener"]) for r in data} == \
        {("GET", "HTTP/1.1", f"{SERVICE}:8000", "http_proxy")}
    assert {r["response_flags"] for r in data if r["response_code"] == 200} == {"-"}
    # The mesh's default retry policy retries a 503; the last answer's flag says so.
    assert {r["response_flags"] for r in data if r["response_code"] == 503} == {"URX"}
    assert {r["user_agent"] for r in data if r["path"].startswith("/ok/")} == {"alog-test"}
    assert len({r["request_id"] for r in data}) == OK + FAILED
    assert all(r["bytes_sent"] > 0 and r["duration"] >= 0 and r["upstream_host"] for r in data)
    times = [r["start_time"].timestamp() for r in data]
    assert started - 1 <= min(times) and max(times) <= time.time()

    # Node 0's proxy served these requests: its files carry its pid, and more than one was cut.
    proxy = ray.get_actor(proxy_actor_name(mesh.nodes[0]), namespace=NAMESPACE)
    pid = ray.get(proxy.status.remote(), timeout=10)["pid"]
    mine = [f for f in files if f.name.split("-")[-2] == str(pid)]
    assert len(mine) >= 2, [f.name for f in files]
