"""`omniray serve --config serve_config.yaml` as a user runs it: a fresh process starts Ray, deploys the tiny CPU
config (the embedded checkpoint, fractional CPUs), prints the URL, answers, and shuts down cleanly on SIGTERM,
even with more signals right behind it."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from common.tiny import tiny_writer_version

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 420


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_omniray_serve_with_the_cpu_config(tmp_path):
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HOME": str(tmp_path)}  # the tiny checkpoint goes to HOME/.cache
    log = open(tmp_path / "serve.log", "w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "deployments.cli", "serve", "--config", "serve_config.yaml", "--port", str(port)],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while "omniray is serving at" not in (tmp_path / "serve.log").read_text():
            assert proc.poll() is None, "omniray serve exited:\n" + (tmp_path / "serve.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "omniray serve did not start:\n" + (tmp_path / "serve.log").read_text()[-3000:]
            time.sleep(2)
        url = f"http://127.0.0.1:{port}"
        assert requests.get(url + "/health", timeout=60).status_code == 200
        reply = requests.post(url + "/v1/chat/completions", timeout=120,
                              json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}).json()
        assert reply["model"] == "omniray-tiny" and reply["usage"]["completion_tokens"] >= 1
        assert (tmp_path / ".cache" / "omniray" / f"tiny-default-{tiny_writer_version()}" / "config.json").is_file()
    finally:
        proc.send_signal(signal.SIGTERM)
        for again in (signal.SIGINT, signal.SIGTERM):  # an impatient user: more signals while Serve shuts down
            time.sleep(0.3)
            if proc.poll() is None:
                proc.send_signal(again)
        try:
            code = proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
        log.close()
    output = (tmp_path / "serve.log").read_text()
    assert code == 0 and output.count("shutting down") == 1 and "Traceback" not in output, output[-3000:]
