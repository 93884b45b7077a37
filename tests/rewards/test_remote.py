"""Rewards as services on localhost: a server started here serves several rewards; remote scores equal in-process
scores; a server killed mid-request gives retries, then an error naming it; two training processes share one
server; a worker from a second interpreter (a separate process) scores the same."""

import json
import os
import re
import socket
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest
import torch
import yaml
from PIL import Image

from visalign import rewards
from visalign.cli import main as cli_main
from visalign.pairs import load_image
from visalign.rewards import RewardError
from visalign.rewards.remote import encode_tensor
from visalign.rewards.server import address, bind, make_server
from visalign.train import run as run_training
from visalign.trainers.config import check_rewards
from visalign.world.model import WorldAdapter

ROOT = Path(__file__).resolve().parents[2]
HELPERS = "tests.helpers.remote_rewards"
SERVED = ["brightness", "saturation", "source-l1", f"{HELPERS}:SubScores", f"{HELPERS}:TinyPickScore",
          "tests.helpers.toy_rewards:AlwaysNaN"]
# Subprocesses: one thread each (two cores), offline, the repository importable (tests.helpers).
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="module")
def server():
    """A reward server on a free local port, in a thread of this process."""
    served = {name: rewards.load(name) for name in SERVED}
    uvicorn_server = make_server(served, log_level="warning")
    sock = bind("127.0.0.1", 0)
    thread = threading.Thread(target=uvicorn_server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    yield address(sock)
    uvicorn_server.should_exit = True
    thread.join(10)


def _same(got, expected):
    assert type(got) is type(expected)
    if isinstance(expected, dict):
        assert list(got) == list(expected)
        for key in expected:
            torch.testing.assert_close(got[key], expected[key], atol=1e-6, rtol=0, equal_nan=True)
    else:
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_remote_scores_equal_in_process_scores(server, tmp_path, capsys):
    torch.manual_seed(0)
    images, videos, sources = torch.rand(5, 3, 32, 32), torch.rand(2, 3, 3, 16, 16), torch.rand(5, 3, 24, 24)
    prompts = ["a red circle", "a blue square", "two green triangles", "a cat", "a red circle"]
    cases = {"brightness": {"images": images}, "saturation": {"videos": videos},
             "source-l1": {"images": images, "source_images": sources},
             f"{HELPERS}:SubScores": {"images": images},
             f"{HELPERS}:TinyPickScore": {"images": images, "prompts": prompts}}
    for name, inputs in cases.items():
        local = rewards.load(name)
        remote = rewards.load(f"remote:{server}/{name}", batch_size=2)  # several requests per call
        for key in ("inputs", "value_range", "higher_is_better", "needs_prompts", "uses_source_images"):
            assert getattr(remote, key) == getattr(local, key), (name, key)
        assert remote.differentiable is False
        _same(remote(**inputs), local(**inputs))
    sub = rewards.load(f"remote:{server}/{HELPERS}:SubScores")(images=images)
    assert torch.isnan(sub["green_even"][1::2]).all() and torch.isfinite(sub["green_even"][::2]).all()

    # a non-finite score comes back as NaN only to a caller that allows it, as in process
    always_nan = rewards.load(f"remote:{server}/tests.helpers.toy_rewards:AlwaysNaN")
    with pytest.raises(RewardError, match="returned non-finite values at"):
        always_nan(images=images)
    assert torch.isnan(always_nan(images=images, allow_invalid=True)).all()

    # metadata JSON cannot carry is left out, with a warning, and the batch still scores
    with pytest.warns(RuntimeWarning, match=r"metadata spec \(object\) is not JSON"):
        scores = rewards.load(f"remote:{server}/brightness")(images=images, metadata=[{"spec": object()}] * 5)
    _same(scores, rewards.load("brightness")(images=images))

    # `visalign rewards score` takes a remote name like any other
    path = tmp_path / "a.png"
    Image.fromarray((torch.rand(16, 16, 3) * 255).byte().numpy()).save(path)
    assert cli_main(["rewards", "score", "--reward", f"remote:{server}/brightness", "--prompt", "a", "--json",
                     str(path)]) == 0
    table = json.loads(capsys.readouterr().out)
    expected = rewards.load("brightness")(images=load_image(path)[None])
    assert table[str(path)][f"remote:{server}/brightness"] == pytest.approx(float(expected[0]), abs=1e-6)


def test_health_lists_the_served_rewards_and_errors_are_http_codes(server):
    health = httpx.get(f"{server}/health").json()
    assert list(health["rewards"]) == SERVED and health["pid"] == os.getpid()
    brightness = health["rewards"]["brightness"]
    assert brightness["differentiable"] is False  # pixels cross as bytes: no gradient comes back
    assert brightness["inputs"] == ["images", "videos"] and brightness["value_range"] == [0.0, 1.0]
    assert brightness["needs_prompts"] is False and health["rewards"]["source-l1"]["uses_source_images"] is True

    response = httpx.post(f"{server}/nope", json={})
    assert response.status_code == 404
    assert response.json()["detail"] == f"unknown reward 'nope'; this server serves: {', '.join(SERVED)}"
    short = {"dtype": "float32", "shape": [1, 3, 2, 2], "data": "AAAA"}
    response = httpx.post(f"{server}/brightness", json={"images": short})
    assert response.status_code == 422
    assert response.json()["detail"] == "images: shape [1, 3, 2, 2] of float32 needs 48 bytes, got 3"
    response = httpx.post(f"{server}/brightness", json={"images": encode_tensor(torch.full((1, 3, 2, 2), 2.0))})
    assert response.status_code == 422
    assert response.json()["detail"] == "brightness: images must be in [0, 1], got values in [2.000, 2.000]"
    # uint8 images are 8-bit pixels: divided by 255 on the server
    pixels = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    answer = httpx.post(f"{server}/brightness", json={"images": encode_tensor(pixels)}).json()
    assert answer["output"] == "tensor"
    from visalign.rewards.remote import decode_tensor

    _same(decode_tensor(answer["scores"]["score"], "score"), rewards.load("brightness")(images=pixels.float() / 255))

    with pytest.raises(RewardError, match=r"unknown reward 'nope'; this server serves: brightness, .* \(HTTP 404\)"):
        rewards.load(f"remote:{server}/nope")
    with pytest.raises(RewardError, match="does not describe a reward .*is it a `visalign serve-rewards` server"):
        rewards.load(f"remote:{server}/health")
    with pytest.raises(ValueError, match="expected remote:http://HOST:PORT/NAME"):
        rewards.load("remote:localhost:8000")
    with pytest.raises(ValueError, match="retries=-1 must be >= 0"):
        rewards.load(f"remote:{server}/brightness", retries=-1)
    with pytest.raises(ValueError, match="unknown reward 'nope'; this server serves"):  # a trainer config, at load
        check_rewards({f"remote:{server}/nope": 1.0}, [])
    with pytest.raises(ValueError, match="sampling.drift needs differentiable rewards"):
        from visalign.trainers import load_train_config

        load_train_config(None, [f"rewards={{'remote:{server}/brightness': 1.0}}", "sampling.drift.scale=0.1"])


def _cli_server(*names: str) -> tuple[subprocess.Popen, str]:
    """`visalign serve-rewards` on a free port in a subprocess, and the address it prints."""
    command = [sys.executable, "-m", "visalign.cli", "serve-rewards", "--port", "0"]
    process = subprocess.Popen(command + [a for n in names for a in ("--reward", n)], stdout=subprocess.PIPE,
                               text=True, cwd=ROOT, env=ENV)
    line = process.stdout.readline()
    found = re.search(r"http://\S+", line)
    assert found, f"no address announced: {line!r}"
    return process, found.group()


def test_a_server_killed_mid_request_gives_retries_then_an_error_naming_it():
    process, url = _cli_server("brightness", f"{HELPERS}:Slow")
    try:
        quick = rewards.load(f"remote:{url}/brightness", retries=2, backoff=0.05)
        slow = rewards.load(f"remote:{url}/{HELPERS}:Slow", retries=2, backoff=0.05)
        images = torch.rand(2, 3, 8, 8)
        _same(quick(images=images), rewards.load("brightness")(images=images))
        threading.Timer(0.5, process.kill).start()  # the slow request is in flight then
        with (pytest.warns(RuntimeWarning, match="retrying") as retried,
              pytest.raises(RewardError, match=rf"reward server {re.escape(url)}/\S+ did not answer after 3 attempts")):
            slow(images=images)
        messages = [str(w.message) for w in retried]
        assert [re.search(r"attempt \d of \d", m).group() for m in messages] == ["attempt 1 of 3", "attempt 2 of 3"]
        with pytest.warns(RuntimeWarning), pytest.raises(RewardError, match=f"remote:{re.escape(url)}/brightness"):
            quick(images=images)  # never a silent zero or NaN
    finally:
        process.kill()
        process.wait()


def test_two_training_processes_share_one_server(server, tmp_path):
    """One 1-step run in a subprocess (`visalign train`) and one in this process at the same time, both scoring
    on the one server; it counts each caller's requests."""
    checkpoint = tmp_path / "world.safetensors"
    WorldAdapter.random(0).save_pretrained(checkpoint)
    spec = f"remote:{server}/brightness"
    config = tmp_path / "remote.yaml"
    config.write_text(yaml.safe_dump({"trainer": "flow_grpo", "model": {"name": "world", "path": str(checkpoint)},
                                      "rewards": {spec: 1.0}}))
    tiny = ["train.max_steps=1", "train.prompts_per_step=2", "train.group_size=4", "train.train_batch_size=4",
            "sampling.batch_size=4", "sampling.steps=3", "run.eval_every=0", "run.log_with=none",
            "run.progress=false", "run.checkpoint_every=100"]
    clients = f"{server}/health"
    here = f"{socket.gethostname()}:{os.getpid()}"
    before = httpx.get(clients).json()["clients"].get(here, 0)
    other = subprocess.Popen([sys.executable, "-m", "visalign.cli", "train", str(config),
                              f"run.out_dir={tmp_path / 'other'}", *tiny], cwd=ROOT, env=ENV, stderr=subprocess.PIPE,
                             text=True)
    try:
        with pytest.warns(RuntimeWarning, match=r"metadata spec \(SceneSpec\) is not JSON"):  # the world's spec objects
            history = run_training(str(config), [f"run.out_dir={tmp_path / 'here'}", *tiny])
    finally:
        error = other.communicate(timeout=300)[1]
    assert other.returncode == 0, error
    seen = httpx.get(clients).json()["clients"]
    # 8 samples scored in batches of 4: two requests from each run
    assert seen[here] - before == 2 and seen[f"{socket.gethostname()}:{other.pid}"] == 2
    assert 0 < history[0][f"rewards/{spec}/mean"] < 1
    step = json.loads((tmp_path / "other" / "metrics.jsonl").read_text().splitlines()[0])
    assert 0 < step[f"rewards/{spec}/mean"] < 1


def test_a_worker_in_another_interpreter_scores_the_same():
    options = {"mode": "area", "threshold": 0.3}
    worker = rewards.load(f"worker:{sys.executable}:saturation", options=options)
    assert worker.process is None  # started on first use, not when built
    images = torch.rand(4, 3, 16, 16)
    try:
        _same(worker(images=images), rewards.load("saturation", **options)(images=images))
        assert worker.process.pid != os.getpid() and worker.process.poll() is None
        health = httpx.get(worker.url.rsplit("/", 1)[0] + "/health").json()
        assert health["pid"] == worker.process.pid and health["rewards"]["saturation"]["options"] == options
    finally:
        worker.close()
    assert worker.process.poll() is not None


def test_worker_errors_name_the_interpreter_and_the_import():
    with pytest.raises(ValueError, match="no Python interpreter at '/no/such/python'"):
        rewards.describe("worker:/no/such/python:brightness")
    with pytest.raises(ValueError, match="expected worker:PYTHON:NAME"):
        rewards.describe(f"worker:{sys.executable}")
    broken = rewards.load(f"worker:{sys.executable}:no_such_package.rewards:Thing")
    with pytest.raises(RewardError, match=r"exited with code 2 before serving(.|\n)*cannot import reward "
                                          r"'no_such_package.rewards:Thing'"):
        broken(images=torch.rand(1, 3, 8, 8))
