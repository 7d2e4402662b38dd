"""`omniray serve`: start (or join) a Ray cluster, deploy the app, print the URL, block until Ctrl-C, shut down.

Without `--config` the app is built here with its CPU defaults (no `--model`: the embedded tiny checkpoint, so
it runs on a laptop); with `--config FILE` the serve config file is deployed as `serve run FILE` would, with
`--model`, `--api-key`, `--host` and `--port` overriding what the file says.
"""

from __future__ import annotations

import argparse
import signal
import time
from pathlib import Path

APP_NAME = "omniray"
DEPLOY_TIMEOUT_S = 1800.0  # a hub download of the 30B checkpoint takes a while


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="checkpoint folder or hub id (default: the embedded tiny model)")
    parser.add_argument("--config", type=Path, default=None, help="a serve config file, e.g. serve_config.gpu.yaml")
    parser.add_argument("--host", default=None, help="HTTP host (default 127.0.0.1, or the config file's)")
    parser.add_argument("--port", type=int, default=None, help="HTTP port (default 8000, or the config file's)")
    parser.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` on /v1 routes")
    parser.add_argument("--compile", choices=["auto", "on", "off"], default=None,
                        help="compiled decode steps (default auto, or the config file's: on CUDA only; `on` for a "
                             "long-running CPU service, whose replicas then compile for minutes at their first start)")
    parser.add_argument("--address", default=None,
                        help="Ray cluster to join (e.g. auto); default: start a local one")


def run(args: argparse.Namespace) -> int:
    import ray
    from ray import serve

    ray.init(address=args.address, namespace="serve")
    # Ctrl-C, and `kill`, systemd or Kubernetes (SIGTERM), stop it (set after ray.init, which installs its own)
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        host, port = _deploy_config(args) if args.config is not None else _deploy_builder(args)
        url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
        print(f"omniray is serving at {url}/v1 (OpenAI API), health at {url}/health; Ctrl-C to stop", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:  # also after a failed deployment: Ray and Serve are ours to stop
        _ignore_stop_signals()  # a second Ctrl-C must not cut the shutdown short with a traceback
        print("shutting down", flush=True)
        serve.shutdown()
        ray.shutdown()
    return 0


def _interrupt(signum, frame) -> None:
    _ignore_stop_signals()  # first thing: a signal right behind this one would interrupt the unwinding
    raise KeyboardInterrupt


def _ignore_stop_signals() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _overrides(args: argparse.Namespace) -> dict:
    return {k: v for k, v in (("model", args.model), ("api_key", args.api_key), ("compile", args.compile))
            if v is not None}


def _deploy_builder(args: argparse.Namespace) -> tuple[str, int]:
    from ray import serve

    from deployments.app import build_app

    host, port = args.host or "127.0.0.1", args.port or 8000
    serve.start(http_options={"host": host, "port": port})
    wait_for_proxies(DEPLOY_TIMEOUT_S)
    serve.run(build_app(_overrides(args)), name=APP_NAME, route_prefix="/")  # returns once every replica is up
    return host, port


def _deploy_config(args: argparse.Namespace) -> tuple[str, int]:
    import yaml
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    raw = yaml.safe_load(args.config.read_text())
    http = raw.setdefault("http_options", {})
    http.update({k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None})
    for app in raw.get("applications", []):
        if app.get("import_path") == "deployments.app:build_app":
            app.setdefault("args", {}).update(_overrides(args))
    config = ServeDeploySchema.model_validate(raw)
    serve.start(proxy_location=config.proxy_location, http_options=config.http_options.model_dump())
    wait_for_proxies(DEPLOY_TIMEOUT_S)
    # What `serve run FILE` does: hand the whole config (per-deployment options included) to the controller.
    _get_global_client().deploy_apps(config)
    _wait_running([app.name for app in config.applications])
    return config.http_options.host, config.http_options.port


def wait_for_proxies(timeout_s: float) -> None:
    """Until every HTTP proxy is healthy. Serve's own deploy calls give the proxies a fixed 60 s and then raise,
    which a busy machine (a laptop, a loaded CI runner) can exceed while the proxy actor still starts fine."""
    from ray import serve

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        proxies = serve.status().proxies
        if proxies and all(state == "HEALTHY" for state in proxies.values()):
            return
        time.sleep(1)
    raise SystemExit(f"Serve's HTTP proxy did not become healthy within {timeout_s:.0f} s: {serve.status().proxies}")


def _wait_running(names: list[str]) -> None:
    from ray import serve

    deadline = time.monotonic() + DEPLOY_TIMEOUT_S
    while time.monotonic() < deadline:
        apps = serve.status().applications
        states = {n: apps[n].status if n in apps else "NOT_STARTED" for n in names}
        failed = {n: apps[n].message for n, s in states.items() if s == "DEPLOY_FAILED"}
        if failed:
            raise SystemExit(f"deployment failed: {failed}")
        if all(s == "RUNNING" for s in states.values()):
            return
        time.sleep(2)
    raise SystemExit(f"the application did not start within {DEPLOY_TIMEOUT_S:.0f} s")
