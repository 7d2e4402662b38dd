"""The tests' local Ray Serve: one Ray and one Serve for the whole session (conftest's `serve_instance`), on which
each module deploys the applications it tests and deletes them after (`applications`, `one_app`).

Starting Ray and Serve is paid once; each module still gets replicas of its own, started for it with its settings
(tests that kill replicas or change their number see no other module's). Every application of a module has a name
of its own in the session, so what a test reads by application (handles, metrics, replica logs) is its module's.
"""

from __future__ import annotations

import socket
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 420
DELETE_TIMEOUT_S = 180  # a deleted application's replicas may first drain (the autoscaling config allows 120 s)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def local_serve(num_cpus: int = 4):
    """A local Ray (`num_cpus`: room for the largest module's replicas, a quarter of a core each) with Serve on a free
    port; yields the base URL and the Prometheus metrics URL, and shuts both down after."""
    import ray
    from ray import serve

    from deployments.serve_cli import wait_for_proxies

    http_port, metrics_port = free_port(), free_port()
    # Replica processes import our packages from the checkout (an installed omniray needs nothing).
    ray.init(num_cpus=num_cpus, include_dashboard=False, _metrics_export_port=metrics_port,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": http_port})
        wait_for_proxies(START_TIMEOUT_S)  # Serve's deploy call allows the proxy only 60 s
        yield {"url": f"http://127.0.0.1:{http_port}", "metrics": f"http://127.0.0.1:{metrics_port}/metrics"}
    finally:
        serve.shutdown()
        ray.shutdown()


def wait_running(names: list[str]) -> None:
    """Until every application runs; a deployment that cannot start fails the tests with Serve's message."""
    from ray import serve

    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        apps = serve.status().applications
        for name in names:
            if name in apps and apps[name].status == "DEPLOY_FAILED":
                details = {d: s.message for d, s in apps[name].deployments.items() if s.message}
                pytest.fail(f"application {name} failed to deploy: {apps[name].message} {details}")
        if all(name in apps and apps[name].status == "RUNNING" for name in names):
            return
        time.sleep(1)
    pytest.fail(f"applications {names} not running after {START_TIMEOUT_S} s: {serve.status().applications}")


@contextmanager
def applications(names: list[str]):
    """The named applications, deployed by the caller: waits until they run, yields, then deletes them and checks
    that the instance is left bare and healthy for the next module (no application left, every proxy healthy)."""
    from ray import serve

    try:
        wait_running(names)
        yield
    finally:
        for name in names:
            serve.delete(name, _blocking=False)
        _assert_bare()


def _assert_bare() -> None:
    from ray import serve

    deadline = time.monotonic() + DELETE_TIMEOUT_S
    while (left := serve.status().applications) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, f"applications left after the module: {sorted(left)}"
    proxies = serve.status().proxies
    assert proxies and all(state == "HEALTHY" for state in proxies.values()), proxies


def metric_samples(metrics_url: str, app: str) -> str:
    """The lines of the Prometheus exposition that are samples of the application's replicas (Serve tags each with
    its application): the session's Ray also exports other modules' samples, of the same metric names."""
    exposition = urllib.request.urlopen(metrics_url, timeout=30).read().decode()
    return "\n".join(line for line in exposition.splitlines() if f'application="{app}"' in line)


@contextmanager
def one_app(settings: dict, name: str):
    """`build_app(settings)` deployed at `/` as application `name`, for the block (`applications`)."""
    from ray import serve
    from ray.serve.api import RunTarget

    from deployments.app import build_app

    # deploy without waiting, then wait with a deadline and Serve's own failure messages
    serve.run_many([RunTarget(build_app(settings), name=name, route_prefix="/")],
                   wait_for_ingress_deployment_creation=False, wait_for_applications_running=False)
    with applications([name]):
        yield
