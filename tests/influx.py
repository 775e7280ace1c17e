#!/usr/bin/env python3
"""A private InfluxDB 1.x server for tests: install it, start it, query it, stop it.

The time-series example (examples/timeseries_pipe.py) can store its points in
InfluxDB 1.x; tests/test_timeseries.py checks that against a real ``influxd``,
Debian's package ``influxdb`` (version 1.6).

* ``python tests/influx.py install`` (what ``make testdeps`` runs) installs the
  package with apt-get when ``influxd`` is missing. A fresh machine may not
  know the package yet, so a failed install is retried once after
  ``apt-get update``. Installing needs root, as CI has.
* :class:`Influxd` starts ``influxd`` with a configuration of its own in a
  temporary directory: HTTP and the RPC service bound to 127.0.0.1 on free
  ports, its own meta, data and WAL directories, usage reporting and the
  internal monitor database off. It is stopped (and its files removed) when
  the ``with`` block ends, so the machine's own InfluxDB, if any, is never
  touched.

Only the standard library is used (urllib for the HTTP API).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Dict, List, Optional

PACKAGE = "influxdb"
BINARY = "influxd"

CONFIG = """\
reporting-disabled = true
bind-address = "127.0.0.1:{rpc_port}"

[meta]
  dir = "{dir}/meta"
  logging-enabled = false

[data]
  dir = "{dir}/data"
  wal-dir = "{dir}/wal"
  wal-fsync-delay = "0s"
  query-log-enabled = false

[monitor]
  store-enabled = false

[subscriber]
  enabled = false

[continuous_queries]
  enabled = false

[http]
  enabled = true
  bind-address = "127.0.0.1:{http_port}"
  log-enabled = false
  pprof-enabled = false
"""


def binary() -> Optional[str]:
    """The path of ``influxd``, or None."""
    return shutil.which(BINARY) or (
        "/usr/bin/influxd" if os.access("/usr/bin/influxd", os.X_OK) else None
    )


def install(log: Any = sys.stderr) -> str:
    """Make sure ``influxd`` is installed (apt-get, root only); return its path.

    Raises RuntimeError with the reason when it is missing and cannot be installed.
    """
    path = binary()
    if path:
        return path
    if os.geteuid() != 0:
        raise RuntimeError(
            "influxd is missing and installing it needs root: apt-get install %s" % PACKAGE
        )
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    command = ["apt-get", "install", "-y", "-qq", PACKAGE]
    print("installing %s (apt-get)" % PACKAGE, file=log, flush=True)
    if subprocess.run(command, env=env, stdin=subprocess.DEVNULL).returncode != 0:
        # A fresh machine may not know the package yet: update the lists once.
        print("apt-get install failed; running apt-get update once", file=log, flush=True)
        subprocess.run(["apt-get", "update", "-qq"], env=env, stdin=subprocess.DEVNULL, check=True)
        subprocess.run(command, env=env, stdin=subprocess.DEVNULL, check=True)
    path = binary()
    if not path:
        raise RuntimeError("apt-get installed %s, but there is no influxd" % PACKAGE)
    return path


def _free_port() -> int:
    # influxd cannot report a port it picked itself, so a free one is chosen here;
    # Influxd.start() retries when it was taken meanwhile.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Influxd:
    """A private ``influxd`` on 127.0.0.1; a context manager. ``url`` is its HTTP API."""

    def __init__(self) -> None:
        self.dir = ""
        self.url = ""
        self.proc: Optional[subprocess.Popen[bytes]] = None
        self._log: Any = None

    def __enter__(self) -> Influxd:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def start(self, timeout: float = 60.0) -> None:
        path = install()
        self.dir = tempfile.mkdtemp(prefix="chirp-influxd-")
        problem = ""
        for _ in range(3):
            http_port, rpc_port = _free_port(), _free_port()
            config = os.path.join(self.dir, "influxdb.conf")
            with open(config, "w") as f:
                f.write(CONFIG.format(dir=self.dir, http_port=http_port, rpc_port=rpc_port))
            self._log = open(os.path.join(self.dir, "influxd.log"), "wb")
            self.proc = subprocess.Popen(
                [path, "run", "-config", config],
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
            )
            self.url = "http://127.0.0.1:%d" % http_port
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and self.proc.poll() is None:
                if self.ping():
                    return
                time.sleep(0.1)
            problem = self.log_tail()
            self._end_process()
        self.stop()
        raise RuntimeError("influxd did not start:\n%s" % problem)

    def ping(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/ping", timeout=2) as res:
                return bool(res.status == 204)
        except (urllib.error.URLError, OSError):
            return False

    def query(self, q: str, db: Optional[str] = None) -> List[Dict[str, Any]]:
        """Run an InfluxQL query; return the ``results`` list of the JSON answer."""
        params = {"q": q, "epoch": "ns"}
        if db:
            params["db"] = db
        data = urllib.parse.urlencode(params).encode()
        with urllib.request.urlopen(self.url + "/query", data=data, timeout=30) as res:
            answer = json.load(res)
        results: List[Dict[str, Any]] = answer["results"]
        for result in results:
            if "error" in result:
                raise RuntimeError("InfluxDB: %s: %s" % (q, result["error"]))
        return results

    def log_tail(self, lines: int = 30) -> str:
        try:
            with open(os.path.join(self.dir, "influxd.log"), "rb") as f:
                return b"".join(f.readlines()[-lines:]).decode(errors="replace")
        except OSError:
            return ""

    def _end_process(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def stop(self) -> None:
        """Stop the server and remove its directory."""
        self._end_process()
        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = ""


def main(argv: List[str]) -> int:
    if argv == ["install"]:
        try:
            print(install())
        except (RuntimeError, subprocess.CalledProcessError) as exc:
            print("tests/influx.py: error: %s" % exc, file=sys.stderr)
            return 1
        return 0
    if argv == ["run"]:  # by hand: a private server until Ctrl-C
        with Influxd() as server:
            print("influxd at %s (Ctrl-C stops it)" % server.url, flush=True)
            try:
                while server.proc is not None and server.proc.poll() is None:
                    time.sleep(0.5)
            except KeyboardInterrupt:
                pass
        return 0
    print("usage: python tests/influx.py install|run", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
