"""The proxy worker's ``access_log`` option becomes ``python -m proxy_core`` flags that the real
proxy's parser accepts; bad values fail where the option is given (install), naming it."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from actors.pilot import PilotOptions
from actors.proxy_worker import AccessLogOptions
from proxy_core.__main__ import parse_args

MESHCTL = str(Path(sys.executable).parent / "meshctl")


def test_options_become_the_proxy_flags(tmp_path) -> None:
    opts = AccessLogOptions.from_dict({"parquet_dir": str(tmp_path), "rotate_rows": 7, "rotate_seconds": 2})
    args = parse_args(["--snapshot", "s.json", *opts.args()])
    assert (args.access_log_parquet, args.access_log_rotate_rows, args.access_log_rotate_seconds) == \
        (str(tmp_path), 7, 2.0)
    assert AccessLogOptions.from_dict(None).args() == []                       # off by default
    assert AccessLogOptions.from_dict({"rotate_rows": 5}).args() == []          # no directory: off
    assert PilotOptions.from_dict({"access_log": opts.to_dict()}).to_dict()["access_log"] == opts.to_dict()


@pytest.mark.parametrize("bad,named", [({"rotate_rows": 0}, "rotate_rows"), ({"rotate_rows": "5"}, "rotate_rows"),
                                       ({"rotate_seconds": 0}, "rotate_seconds"),
                                       ({"rotate_seconds": True}, "rotate_seconds"),
                                       ({"parquet_dir": ["a"]}, "parquet_dir")])
def test_bad_values_fail_the_install_naming_the_option(bad, named) -> None:
    with pytest.raises(ValueError, match=f"access_log.{named}"):
        PilotOptions.from_dict({"access_log": {"parquet_dir": "/tmp/x", **bad}})


def test_meshctl_install_rejects_a_bad_rotation_before_contacting_a_cluster(tmp_path) -> None:
    r = subprocess.run([MESHCTL, "install", "--access-log-parquet", str(tmp_path), "--access-log-rotate-seconds", "-1"],
                       capture_output=True, text=True, timeout=60,
                       env={"PATH": "/usr/bin:/bin", "RAY_ADDRESS": "127.0.0.1:1"})
    assert r.returncode == 2 and "access_log.rotate_seconds must be a positive number" in r.stderr, r.stderr
