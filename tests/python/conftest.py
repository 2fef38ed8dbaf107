"""Starts the real `workmanager` binary for the external-client tests."""
import json
import os
import pathlib
import subprocess
import time
import urllib.request

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _binary():
    path = os.path.abspath(os.environ.get("WORKMANAGER_BIN") or str(ROOT / "target" / "debug" / "workmanager"))
    if not os.path.exists(path):
        pytest.fail(f"no workmanager binary at {path}; build it with `cargo build --bin workmanager`")
    return path


class Service:
    def __init__(self, tmp):
        self.tmp = tmp
        ports = tmp / "ports.json"
        self.log = open(tmp / "service.log", "wb")
        self.proc = subprocess.Popen(
            [_binary(), "serve", "--http-port", "0", "--grpc-port", "0",
             "--state-path", str(tmp / "state.redb"), "--port-file", str(ports)],
            cwd=tmp, stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT,
        )
        deadline = time.time() + 30
        while not ports.exists():
            if self.proc.poll() is not None or time.time() > deadline:
                raise RuntimeError("workmanager did not start: " + (tmp / "service.log").read_text())
            time.sleep(0.02)
        p = json.loads(ports.read_text())
        self.http = f"http://127.0.0.1:{p['http']}"
        self.grpc = f"127.0.0.1:{p['grpc']}"
        while True:
            try:
                with urllib.request.urlopen(self.http + "/health/ready") as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                raise RuntimeError("workmanager did not become ready")
            time.sleep(0.05)

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@pytest.fixture
def service(tmp_path):
    s = Service(tmp_path)
    yield s
    s.stop()
