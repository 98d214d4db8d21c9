"""The access log's Parquet sink: schema and values, rotation by rows and by age, atomic
file appearance, close(), the command-line flags, and one run through a real proxy."""
from __future__ import annotations

import asyncio
import datetime as dt
import http.client
import io
import json
import os
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from proxy_core import accesslog
from proxy_core.__main__ import make_access_log, parse_args
from proxy_core.accesslog import PARQUET_SCHEMA, AccessLog
from tests.unit.conftest import cluster, snapshot, vhost

pytestmark = pytest.mark.timeout(30)

T0 = 1_700_000_000.0
JSON_FIELDS = ["start_time", "method", "path", "protocol", "response_code", "response_flags", "bytes_received",
               "bytes_sent", "duration", "upstream_service_time", "x_forwarded_for", "user_agent", "request_id",
               "authority", "upstream_host", "upstream_cluster", "route_name", "downstream_remote_address",
               "listener", "downstream_peer_uri_san", "grpc_status"]


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def request(i: int, **over: Any) -> dict[str, Any]:
    """log()'s arguments for the i-th request; the odd ones carry every optional field."""
    full = i % 2 == 1
    args = dict(start_time=T0 + i + 0.123456, method="GET", path=f'/p/{i}?q="é"', protocol="HTTP/1.1",
                response_code=200 + i, response_flags="-" if full else "UF,URX", bytes_received=i * 10,
                bytes_sent=2**40 + i, duration_ms=i, upstream_service_time=i if full else None,
                x_forwarded_for="10.0.0.1" if full else None, user_agent="curl/8" if full else None,
                request_id=f"rid-{i}" if full else None, authority="reviews:9080",
                upstream_host="127.0.0.1:9" if full else None,
                upstream_cluster="outbound|9080||reviews" if full else None, route_name="default" if full else None,
                downstream_remote_address="127.0.0.1:5555", listener="http_proxy")
    args.update(over)
    return args


def parquet_files(d: Path) -> list[Path]:
    return sorted(d.glob("*.parquet"))


def read_all(d: Path) -> pa.Table:
    return pa.concat_tables([pq.read_table(f) for f in parquet_files(d)])


def test_rows_round_trip_with_schema_and_match_the_json_lines(tmp_path: Path) -> None:
    sink = io.StringIO()
    log = AccessLog(sink, parquet_dir=str(tmp_path))
    for i in range(4):
        log.log(**request(i))
    log.close()
    [f] = parquet_files(tmp_path)
    table = pq.read_table(f)
    assert table.schema.equals(PARQUET_SCHEMA)
    assert table.schema.names == JSON_FIELDS
    assert str(table.schema.field("start_time").type) == "timestamp[ms, tz=UTC]"
    assert table.column("start_time")[0].as_py() == dt.datetime(2023, 11, 14, 22, 13, 20, 123000,
                                                                tzinfo=dt.timezone.utc)
    assert table.column("bytes_sent").to_pylist() == [2**40 + i for i in range(4)]
    assert table.column("upstream_service_time").to_pylist() == [None, 1, None, 3]
    lines = [json.loads(line) for line in sink.getvalue().splitlines()]
    for row, line in zip(table.to_pylist(), lines, strict=True):
        stamp = row.pop("start_time")
        assert stamp.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z" == line.pop("start_time")
        assert row == {k: v for k, v in line.items() if k != "start_time"}


def test_parquet_off_writes_no_files_and_disabled_log_ignores_the_directory(tmp_path: Path) -> None:
    log = AccessLog(io.StringIO())
    assert log.parquet is None
    off = AccessLog(io.StringIO(), enabled=False, parquet_dir=str(tmp_path / "never"))
    off.log(**request(1))
    off.close()
    assert off.parquet is None and not (tmp_path / "never").exists()


def test_rotation_by_rows_and_close_writes_the_rest(tmp_path: Path) -> None:
    log = AccessLog(io.StringIO(), parquet_dir=str(tmp_path), rotate_rows=3, rotate_seconds=3600)
    for i in range(7):
        log.log(**request(i))
    assert log.parquet is not None and len(log.parquet.rows) == 1   # 3 + 3 handed to the writer
    log.close()
    files = parquet_files(tmp_path)
    assert [pq.read_metadata(f).num_rows for f in files] == [3, 3, 1]
    assert read_all(tmp_path).column("response_code").to_pylist() == [200 + i for i in range(7)]
    assert [f.name.split("-")[-1] for f in files] == ["000001.parquet", "000002.parquet", "000003.parquet"]
    assert all(f.name.startswith("access-") and f"-{os.getpid()}-" in f.name for f in files)
    log.close()   # a second close (ProxyServer.close after an explicit one) writes nothing more
    assert parquet_files(tmp_path) == files


async def test_rotation_by_age_follows_the_clock(tmp_path: Path) -> None:
    clock = FakeClock()
    log = AccessLog(io.StringIO(), parquet_dir=str(tmp_path), rotate_seconds=0.05, clock=clock)
    try:
        log.log(**request(0))
        clock.now += 0.04
        log.log(**request(1))
        await asyncio.sleep(0.3)               # several timer ticks, oldest row 0.04 s old
        assert parquet_files(tmp_path) == []
        clock.now += 0.01                      # now 0.05 s old: the next tick cuts the file
        await _wait_for_files(tmp_path, 1)
        log.log(**request(2))                  # the next file's age counts from its own first row
        clock.now += 0.049
        await asyncio.sleep(0.2)
        assert len(parquet_files(tmp_path)) == 1
        clock.now += 0.001
        await _wait_for_files(tmp_path, 2)
        assert [pq.read_metadata(f).num_rows for f in parquet_files(tmp_path)] == [2, 1]
    finally:
        log.close()


async def _wait_for_files(d: Path, n: int) -> None:
    for _ in range(200):
        if len(parquet_files(d)) >= n:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"expected {n} parquet files in {d}, have {parquet_files(d)}")


def test_files_appear_only_complete_under_their_final_name(tmp_path: Path, monkeypatch) -> None:
    seen_while_writing: list[list[str]] = []
    real_write = pq.write_table

    def spying_write(table: pa.Table, where: Any, **kw: Any) -> None:
        real_write(table, where, **kw)
        seen_while_writing.append(sorted(os.listdir(tmp_path)))   # written, not yet renamed

    monkeypatch.setattr(accesslog.pq, "write_table", spying_write)
    log = AccessLog(io.StringIO(), parquet_dir=str(tmp_path), rotate_rows=2)
    for i in range(4):
        log.log(**request(i))
    log.close()
    assert len(seen_while_writing) == 2
    first, second = seen_while_writing
    assert len(first) == 1 and first[0].startswith(".access-") and first[0].endswith(".parquet.tmp")
    assert [n for n in second if n.endswith(".parquet")] == [parquet_files(tmp_path)[0].name]
    assert sorted(os.listdir(tmp_path)) == [f.name for f in parquet_files(tmp_path)]   # no temp files left


def test_failed_write_drops_and_counts_rows_without_raising(tmp_path: Path) -> None:
    target = tmp_path / "logs"
    log = AccessLog(io.StringIO(), parquet_dir=str(target), rotate_rows=2)
    target.rmdir()                             # the directory vanishes under the proxy
    for i in range(3):
        log.log(**request(i))
    log.close()
    assert log.parquet is not None and log.parquet.rows_dropped == 3
    assert not target.exists()


def test_invalid_rotation_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        AccessLog(io.StringIO(), parquet_dir=str(tmp_path), rotate_rows=0)
    with pytest.raises(ValueError):
        AccessLog(io.StringIO(), parquet_dir=str(tmp_path), rotate_seconds=0)


def test_command_line_flags(tmp_path: Path, capsys) -> None:
    args = parse_args(["--snapshot", "s.json", "--access-log-parquet", str(tmp_path),
                       "--access-log-rotate-rows", "500", "--access-log-rotate-seconds", "2.5"])
    log = make_access_log(args, io.StringIO())
    try:
        assert log.parquet is not None and log.parquet.directory == str(tmp_path)
        assert (log.parquet.rotate_rows, log.parquet.rotate_seconds) == (500, 2.5)
    finally:
        log.close()
    default = make_access_log(parse_args(["--snapshot", "s.json"]), io.StringIO())
    assert default.parquet is None and default.enabled
    for bad in (["--access-log-rotate-rows", "0"], ["--access-log-rotate-seconds", "-1"],
                ["--no-access-log", "--access-log-parquet", str(tmp_path)]):
        with pytest.raises(SystemExit):
            parse_args(["--snapshot", "s.json", *bad])
    assert "--access-log" in capsys.readouterr().err


async def test_proxy_requests_land_in_parquet_like_the_json_lines(env, tmp_path: Path) -> None:
    cl = "outbound|9080||reviews"
    up = await env.upstream()
    sink = io.StringIO()
    log = AccessLog(sink, parquet_dir=str(tmp_path))
    snap = snapshot(vhosts=[vhost("reviews", 9080, [{"name": "default", "route": [{"cluster": cl}]}])],
                    clusters={cl: cluster(up.port)})
    p = await env.proxy(snap, log)

    def fetch(path: str, headers: dict[str, str]) -> int:
        c = http.client.HTTPConnection("127.0.0.1", p.ports["http_proxy"], timeout=10)
        c.request("POST", path, body=b"12345", headers=headers)
        status = c.getresponse().status
        c.close()
        return status

    assert await asyncio.to_thread(fetch, "/a", {"Host": "reviews:9080", "User-Agent": "t/1",
                                                 "X-Request-Id": "rid-1"}) == 200
    # REGISTRY_ONLY: a host outside the registry goes to BlackHoleCluster, answered locally (502)
    assert await asyncio.to_thread(fetch, "/missing", {"Host": "nowhere:1"}) == 502
    log.close()   # ProxyServer.close() closes it again at teardown
    table = read_all(tmp_path)
    lines = [json.loads(line) for line in sink.getvalue().splitlines()]
    assert table.num_rows == len(lines) == 2 and table.schema.equals(PARQUET_SCHEMA)
    for row, line in zip(table.to_pylist(), lines, strict=True):
        assert row.pop("start_time").strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z" == line.pop("start_time")
        assert row == line
    first, second = table.to_pylist()
    assert (first["path"], first["bytes_received"], first["user_agent"], first["request_id"]) == \
        ("/a", 5, "t/1", "rid-1")
    assert first["upstream_host"] == f"127.0.0.1:{up.port}" and first["upstream_cluster"] == cl
    assert (second["response_code"], second["upstream_cluster"]) == (502, "BlackHoleCluster")
    assert second["upstream_host"] is None and second["user_agent"] is None
