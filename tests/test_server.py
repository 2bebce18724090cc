"""Server mode: pushes over HTTP into `python -m draftadapt.server`, a vLLM server in another process.

Unit tests (no engine): the header checks that refuse a staged push before its data is read, the
route guard, the Prometheus reader, the server command. One integration module: ONE server
process (tiny random target, random EAGLE-3 draft), rollouts over the OpenAI API, pushes through
`EngineSwapper(RemoteEngine(...))`, a restart.
"""
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from conftest import save_tiny

SPEC = {"fc.weight": [[4, 6], "torch.float32"], "d2t": [[3], "torch.int64"]}
FORBIDDEN = {"embed_tokens.weight": "shared with the target"}


# ------------------------------------------------------------------ payload headers (no engine)

def _staged(tmp_path, tensors, extra: bytes = b""):
    from safetensors.torch import save_file

    tmp_path.mkdir(parents=True, exist_ok=True)
    f = tmp_path / "model.safetensors"
    save_file(tensors, str(f))
    with open(f, "ab") as fh:
        fh.write(extra)
    return tmp_path


GOOD = {"fc.weight": torch.zeros(4, 6), "d2t": torch.tensor([0, 2, 2])}


@pytest.mark.parametrize("case, tensors, extra, needle", [
    ("unknown name", {**GOOD, "midlayer.extra.weight": torch.zeros(2)}, b"", "unknown tensor"),
    ("forbidden name", {**GOOD, "embed_tokens.weight": torch.zeros(2)}, b"", "shared with the target"),
    ("int for float", {**GOOD, "fc.weight": torch.zeros(4, 6, dtype=torch.int32)}, b"", "dtype I32, expected"),
    ("float64", {**GOOD, "fc.weight": torch.zeros(4, 6, dtype=torch.float64)}, b"", "dtype F64"),
    ("float for int", {**GOOD, "d2t": torch.zeros(3)}, b"", "d2t: dtype F32, expected torch.int64"),
    ("shape", {**GOOD, "fc.weight": torch.zeros(6, 4)}, b"", "shape (6, 4), expected (4, 6)"),
    ("oversize", GOOD, b"\0" * 4096, "(oversize)"),
])
def test_a_staged_push_is_refused_from_its_header_before_any_data_is_read(tmp_path, case, tensors, extra, needle):
    from draftadapt.engine.payload import check_safetensors_dir

    with pytest.raises(ValueError, match="refused draft push before loading") as err:
        check_safetensors_dir(_staged(tmp_path / "p", tensors, extra), SPEC, "draft", FORBIDDEN)
    assert needle in str(err.value), f"{case}: {err.value}"


def test_a_valid_staged_push_passes_and_a_forged_header_size_is_refused(tmp_path):
    from draftadapt.engine.payload import check_push, check_safetensors_dir, read_safetensors_dir

    good = _staged(tmp_path / "good", GOOD)
    assert check_safetensors_dir(good, SPEC, "draft", FORBIDDEN) == (good / "model.safetensors").stat().st_size
    forged = tmp_path / "forged"
    forged.mkdir()
    (forged / "model.safetensors").write_bytes((1 << 40).to_bytes(8, "little") + b"{}")
    with pytest.raises(ValueError, match="header of 1099511627776 bytes"):
        check_safetensors_dir(forged, SPEC, "draft")
    nan = _staged(tmp_path / "nan", {**GOOD, "fc.weight": torch.full((4, 6), float("nan"))})
    check_safetensors_dir(nan, SPEC, "draft")  # values are not in the header: check_push sees them once loaded
    with pytest.raises(ValueError, match="fc.weight: non-finite values"):
        check_push(read_safetensors_dir(nan), {k: (tuple(v[0]), v[1]) for k, v in SPEC.items()}, "draft")


# ------------------------------------------------------------------ the route guard, the counters, the command

def _guarded_app(token):
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from draftadapt.engine.serve import PushGuard

    calls = []

    async def handler(request):
        calls.append(request.url.path)
        return JSONResponse({"ok": True})

    app = Starlette(routes=[Route(p, handler, methods=["GET", "POST"])
                            for p in ("/collective_rpc", "/update_weights", "/v1/completions", "/health", "/metrics")])
    return PushGuard(app, token=token, allow_remote=False), calls


def test_every_weight_route_needs_the_token_and_a_loopback_client():
    from starlette.testclient import TestClient

    app, calls = _guarded_app("tok")
    local = TestClient(app, client=("127.0.0.1", 5000))
    auth = {"Authorization": "Bearer tok"}
    assert local.post("/collective_rpc").status_code == 401
    assert local.post("/update_weights", headers={"Authorization": "Bearer nope"}).status_code == 401
    assert local.post("/v1/completions").status_code == 401
    assert calls == [], "a refused request must never reach a handler"
    assert local.post("/collective_rpc", headers=auth).status_code == 200
    assert local.get("/health").status_code == 200 and local.get("/metrics").status_code == 200
    remote = TestClient(app, client=("10.1.2.3", 5000))
    assert remote.post("/collective_rpc", headers=auth).status_code == 403, "weight routes: loopback only"
    assert remote.post("/v1/completions", headers=auth).status_code == 200, "the OpenAI API may be remote"
    assert calls == ["/collective_rpc", "/health", "/metrics", "/v1/completions"]


METRICS = """# HELP vllm:spec_decode_num_drafts Number of spec decoding drafts.
# TYPE vllm:spec_decode_num_drafts counter
vllm:spec_decode_num_drafts_total{engine="0",model_name="m"} 19.0
vllm:spec_decode_num_drafts_created{engine="0",model_name="m"} 1.7e+09
vllm:spec_decode_num_draft_tokens_total{engine="0",model_name="m"} 57.0
vllm:spec_decode_num_accepted_tokens_total{engine="0",model_name="m"} 30.0
vllm:spec_decode_num_accepted_tokens_total{engine="1",model_name="m"} 2.0
vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",model_name="m",position="0"} 17.0
vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",model_name="m",position="2"} 5.0
vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",model_name="m",position="1"} 8.0
vllm:num_requests_running{engine="0",model_name="m"} 0.0
"""


def test_spec_counters_are_read_from_prometheus_text():
    from draftadapt.engine.remote import spec_counters_from_prometheus

    c = spec_counters_from_prometheus(METRICS)
    assert (c.drafts, c.draft_tokens, c.accepted, c.accepted_per_pos) == (19, 57, 32, (17, 8, 5))


def test_the_server_binds_loopback_by_default_and_needs_a_token_elsewhere():
    from draftadapt.engine.serve import build_command, parse_args

    args, extra = parse_args(["/m", "--draft", "/d", "--", "--dtype", "float32"])
    cmd, env = build_command(args, extra, {"DRAFTADAPT_TOKEN": "s3cret"})
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1" and cmd[-2:] == ["--dtype", "float32"]
    assert "s3cret" not in " ".join(cmd), "the token never goes on a command line (ps shows it)"
    assert env["VLLM_API_KEY"] == "s3cret" and env["VLLM_SERVER_DEV_MODE"] == "1"
    assert json.loads(cmd[cmd.index("--speculative-config") + 1])["model"] == "/d"
    with pytest.raises(ValueError, match="not loopback: set DRAFTADAPT_TOKEN"):
        build_command(parse_args(["/m", "--draft", "/d", "--host", "0.0.0.0"])[0], [], {})


# ------------------------------------------------------------------ one real server (another process)

PROMPTS = [[1, 4 + i, 50 + 3 * i, 7, 48 + i, 9] for i in range(8)]


@dataclass
class Served:
    url: str
    token: str
    push_dir: Path
    root: Path
    argv: list
    env: dict
    proc: subprocess.Popen
    trained: dict  # a draft trained on the target's greedy outputs for PROMPTS
    model: str  # the served model's name (its absolute path)
    start_draft: dict  # the draft the server started with (random)

    def engine(self, token="same"):
        from draftadapt.engine.remote import RemoteEngine

        return RemoteEngine(self.url, token=self.token if token == "same" else token, push_dir=self.push_dir)

    def spawn(self) -> None:
        log = open(self.root / "server.log", "ab")
        # its own process group: vLLM's engine core is a child that outlives a killed API server (orphaned, busy)
        self.proc = subprocess.Popen(self.argv, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def start(self) -> float:
        self.spawn()
        try:
            return self.engine().wait_ready(timeout=240)
        except TimeoutError:
            self.stop()
            raise AssertionError("server did not start:\n" + (self.root / "server.log").read_text()[-4000:])

    def stop(self) -> None:
        """A crash: SIGKILL to the API server and its engine core (the whole process group)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)
        for _ in range(100):  # the group empties once the engine core is gone too
            try:
                os.killpg(self.proc.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)
        raise AssertionError("a process of the killed server (its vLLM engine core?) is still alive")

    def rollouts(self, max_tokens=24) -> list[str]:
        """Greedy completions of PROMPTS through the OpenAI API (one batched request)."""
        body = {"model": self.model, "prompt": PROMPTS, "max_tokens": max_tokens, "temperature": 0.0}
        req = urllib.request.Request(self.url + "/v1/completions", data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json",
                                              "Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(req, timeout=120) as resp:
            choices = json.loads(resp.read())["choices"]
        return [c["text"] for c in sorted(choices, key=lambda c: c["index"])]

    def rollout_ids(self, max_tokens=24) -> torch.Tensor:
        """[len(PROMPTS), 6 + max_tokens] prompt + greedy completion ids through the OpenAI API."""
        body = {"model": self.model, "prompt": PROMPTS, "max_tokens": max_tokens, "temperature": 0.0,
                "ignore_eos": True, "return_token_ids": True}
        req = urllib.request.Request(self.url + "/v1/completions", data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json",
                                              "Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(req, timeout=120) as resp:
            choices = sorted(json.loads(resp.read())["choices"], key=lambda c: c["index"])
        return torch.tensor([p + c["token_ids"] for p, c in zip(PROMPTS, choices)])

    def acceptance(self, swapper) -> tuple[float, list[str]]:
        before = swapper.spec_counters()
        texts = self.rollouts()
        return (swapper.spec_counters() - before).acceptance_length, texts


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_on_greedy_outputs(model_dir, config):
    """An EAGLE-3 draft fitted to the tiny target's greedy continuations of PROMPTS (seconds)."""
    from transformers import AutoModelForCausalLM

    from draftadapt.checkpoint import draft_state_for_push
    from draftadapt.drafts.eagle3 import Eagle3Draft
    from draftadapt.offline import train_offline

    target = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        seqs = [target.generate(torch.tensor([p]), max_new_tokens=40, do_sample=False, eos_token_id=None)[0].tolist()
                for p in PROMPTS]
    torch.manual_seed(1)
    draft = Eagle3Draft.from_target(config, aux_layer_ids=(1, 2, 3))
    return draft_state_for_push(train_offline(target, seqs, steps=150, draft=draft, batch_size=8, progress=False))


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from transformers import AutoConfig

    from draftadapt.checkpoint import save_eagle3
    from draftadapt.drafts.eagle3 import Eagle3Draft

    root = tmp_path_factory.mktemp("server")
    model_dir, tok_dir = save_tiny("llama", root, hidden=128, layers=4)
    config = AutoConfig.from_pretrained(model_dir)
    torch.manual_seed(0)
    draft_dir = save_eagle3(Eagle3Draft.from_target(config, aux_layer_ids=(1, 2, 3)), root / "draft", config)
    port, token, push_dir = _free_port(), secrets.token_hex(16), root / "push"
    argv = [sys.executable, "-m", "draftadapt.server", str(model_dir), "--draft", str(draft_dir), "--port", str(port),
            "--push-dir", str(push_dir), "--", "--tokenizer", str(tok_dir), "--dtype", "float32", "--enforce-eager",
            "--max-model-len", "512", "--max-num-seqs", "8", "--disable-uvicorn-access-log"]
    env = {**os.environ, "DRAFTADAPT_TOKEN": token, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1",
           "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])}
    from draftadapt.checkpoint import draft_state_for_push, load_eagle3

    s = Served(f"http://127.0.0.1:{port}", token, push_dir, root, argv, env, None, {}, str(Path(model_dir).resolve()),
               draft_state_for_push(load_eagle3(draft_dir)))
    s.spawn()  # starts while the draft trains
    try:
        s.trained = _train_on_greedy_outputs(model_dir, config)
        s.engine().wait_ready(timeout=240)
        yield s
    finally:
        s.stop()


@pytest.mark.vllm
class TestServerMode:
    def test_a_push_over_http_moves_acceptance_and_keeps_outputs(self, served):
        from draftadapt.engine.swap import EngineSwapper

        swapper = EngineSwapper(served.engine())
        al_random, texts_random = served.acceptance(swapper)
        result = swapper.push_draft(served.trained, (swapper.draft_version or 0) + 1)
        assert result.pushed and result.verified and result.bytes > 0
        assert list(served.push_dir.iterdir()) == [], "the staged file is removed after the push"
        al_trained, texts_trained = served.acceptance(swapper)
        print(f"AL over HTTP: random {al_random:.2f} -> pushed {al_trained:.2f}; push {result.seconds * 1e3:.0f} ms")
        assert al_random < 1.2, al_random
        assert al_trained > al_random + 0.8, (al_random, al_trained)
        assert texts_trained == texts_random, "greedy outputs must not depend on the draft"

    def test_on_step_end_trains_on_features_captured_in_the_trainer_and_pushes_over_http(self, served):
        from transformers import AutoModelForCausalLM

        from draftadapt.adapter import AdapterConfig, DraftAdapter
        from draftadapt.drafts.eagle3 import Eagle3Draft
        from draftadapt.engine.swap import EngineSwapper
        from draftadapt.trainer import TrainerConfig

        swapper = EngineSwapper(served.engine())
        v0 = (swapper.draft_version or 0) + 1
        assert swapper.push_draft(served.start_draft, v0).verified  # serve the random start draft again
        policy = AutoModelForCausalLM.from_pretrained(served.model, dtype=torch.float32).eval()
        torch.manual_seed(0)
        draft = Eagle3Draft.from_target(policy.config, aux_layer_ids=(1, 2, 3))  # = the served start draft
        adapter = DraftAdapter(draft, policy.get_input_embeddings(),
                               AdapterConfig(train_steps=40, batch_tokens=256, min_tokens=64), TrainerConfig(lr=3e-3),
                               sink=swapper)
        adapter.on_step_end(v0)  # the counters' baseline; nothing captured yet
        history = []
        for step in range(v0 + 1, v0 + 4):
            ids = served.rollout_ids()  # rollouts over HTTP, served by the draft pushed at the previous step
            completion = torch.zeros_like(ids, dtype=torch.bool)
            completion[:, len(PROMPTS[0]):] = True
            with adapter.capture(policy) as cap, torch.no_grad():  # the trainer's log-prob recompute
                policy(input_ids=ids, attention_mask=torch.ones_like(ids))
            adapter.on_rollouts(cap.rollout_batch(ids, torch.ones_like(ids), completion, policy_version=step))
            stats = adapter.on_step_end(step)
            assert stats.pushed and stats.push_result.verified, stats.push_reason
            history.append(stats.spec.acceptance_length)
        al_adapted, _ = served.acceptance(swapper)
        print(f"adapter over HTTP: AL per step {[round(a, 2) for a in history]}, then {al_adapted:.2f}")
        assert history[0] < 1.2, "step 1's rollouts were served by the random draft"
        assert al_adapted > history[0] + 0.5, (history, al_adapted)

    def test_a_request_without_the_token_changes_nothing(self, served):
        from draftadapt.engine.swap import EngineSwapper

        owner = served.engine()
        version = owner.collective_rpc("draftadapt_info")[0]["versions"]["draft"]
        stranger = served.engine(token=None)
        with pytest.raises(RuntimeError, match="HTTP 401"):
            EngineSwapper(stranger)
        for route, body in (("/collective_rpc", {"method": "draftadapt_forget_version", "kwargs": {"kind": "draft"}}),
                            ("/collective_rpc", {"method": "draftadapt_inject_fault", "kwargs": {"kind": "draft"}}),
                            ("/reset_prefix_cache", None)):
            with pytest.raises(RuntimeError, match="HTTP 401"):
                stranger._request("POST", route, body)
        (check,) = owner.collective_rpc("draftadapt_check", kwargs={"kind": "draft"})
        assert check["version"] == version and check["ok"] and not check["repaired"], check

    @pytest.mark.parametrize("case", ["nan", "unknown name", "wrong dtype", "outside the push root", "linked out",
                                      "digest"])
    def test_a_bad_push_is_refused_and_the_old_draft_keeps_serving(self, served, case):
        from draftadapt.engine.payload import checksum, tensors_to_bytes

        owner = served.engine()
        version = owner.collective_rpc("draftadapt_info")[0]["versions"]["draft"]
        state = dict(served.trained)
        kw = {"kind": "draft", "version": version + 100}
        if case == "nan":
            state["fc.weight"] = state["fc.weight"].clone().index_fill_(0, torch.tensor([0]), float("nan"))
        elif case == "unknown name":
            state["midlayer.spare.weight"] = torch.zeros(3)
        elif case == "wrong dtype":
            state["fc.weight"] = state["fc.weight"].to(torch.int32)
        kw["expected_checksum"] = "0" * 16 if case == "digest" else checksum(state)
        if case in ("outside the push root", "linked out"):  # a well-formed checkpoint the server could read
            elsewhere = served.root / "elsewhere"
            elsewhere.mkdir(exist_ok=True)
            (elsewhere / "model.safetensors").write_bytes(tensors_to_bytes(state))
            kw["path"] = str(elsewhere)
            if case == "linked out":  # a dir inside the root whose file is a link to one outside it
                inside = served.push_dir / "linked"
                inside.mkdir(parents=True, exist_ok=True)
                (inside / "model.safetensors").symlink_to(elsewhere / "model.safetensors")
                kw["path"] = str(inside)
        else:
            kw["payload"] = tensors_to_bytes(state)  # staged by RemoteEngine, bypassing the driver's checks
        with pytest.raises(RuntimeError, match="HTTP 500.*refused") as err:
            owner.collective_rpc("draftadapt_push", kwargs=kw)
        print(f"{case}: {str(err.value)[:160]}")
        shutil.rmtree(served.push_dir / "linked", ignore_errors=True)  # this test's own file, not a staged one
        (check,) = owner.collective_rpc("draftadapt_check", kwargs={"kind": "draft"})
        assert check["version"] == version and check["ok"] and not check["repaired"], (case, check)
        assert list(served.push_dir.iterdir()) == [], "a refused push's staged file is removed too"

    def test_a_restarted_server_gets_the_latest_draft_again(self, served):
        from draftadapt.engine.swap import EngineSwapper

        swapper = EngineSwapper(served.engine())
        latest = (swapper.draft_version or 0) + 1
        assert swapper.push_draft(served.trained, latest).verified  # the swapper keeps its last push for re-pushes
        al_before, _ = served.acceptance(swapper)
        served.stop()
        waited = served.start()
        assert served.engine().collective_rpc("draftadapt_info")[0]["versions"]["draft"] is None, "a fresh server"
        assert swapper.ensure_latest("draft") == ["re-pushed"]
        (check,) = served.engine().collective_rpc("draftadapt_check", kwargs={"kind": "draft"})
        assert check["version"] == latest and check["ok"]
        al_after, _ = served.acceptance(swapper)
        print(f"restart: {waited:.1f} s; AL {al_before:.2f} before, {al_after:.2f} after the re-push")
        assert abs(al_after - al_before) < 0.05, "the same draft on the same greedy prompts: the same acceptance"

    def test_a_policy_refit_over_http_serves_the_new_policy_and_keeps_the_draft(self, served):
        from conftest import tiny_model

        from draftadapt.engine.swap import EngineSwapper

        swapper = EngineSwapper(served.engine())
        before = served.rollouts()
        assert swapper.push_draft(served.trained, (swapper.draft_version or 0) + 1).verified
        result = swapper.refit_policy(tiny_model("llama", seed=7, hidden=128, layers=4).state_dict(),
                                      (swapper.policy_version or 0) + 1)
        assert result.pushed and result.verified, result
        assert served.rollouts() != before, "the refitted policy writes other completions"
        (check,) = served.engine().collective_rpc("draftadapt_check", kwargs={"kind": "draft"})
        assert check["ok"] and check["version"] == swapper.draft_version, "the refit left the draft's weights alone"
