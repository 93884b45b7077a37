"""Rewards served by another process: the wire format, `RemoteReward` (a reward on a `visalign serve-rewards`
server, `remote:http://HOST:PORT/NAME`) and `WorkerReward` (a reward served by a worker process started from
another Python interpreter, `worker:PYTHON:NAME`), so a reward whose dependencies clash with the trainer's runs in
its own environment, as flow_grpo's reward server and verl's HTTP scorers do.

The wire format (JSON; docs/guide/rewards.md has the whole schema): a tensor is {"dtype", "shape", "data"}, its
raw little-endian C-order bytes in base64, so pixels and scores cross exactly (NaN sub-scores included).
A scoring request is POST NAME {"prompts", "images" | "videos", "source_images", "metadata", "groups"}; the answer is
{"reward", "output": "tensor" | "dict", "scores": {"score": tensor, sub-score: tensor, ...}}.
"""

from __future__ import annotations

import base64
import binascii
import collections
import json
import math
import os
import queue
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import warnings
import weakref

import torch
from torch import Tensor

from visalign.rewards.base import Reward, RewardError, RewardOutput

try:  # the `serve` extra: the client side of the wire
    import httpx
except ImportError as err:  # pragma: no cover - the extra is part of the dev install
    raise ImportError(f"remote and worker rewards need httpx: pip install 'visalign[serve]' ({err})") from err

# The dtypes a tensor may cross in; uint8 images arrive as float32 / 255 on the server.
WIRE_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
               "bfloat16": torch.bfloat16, "uint8": torch.uint8}
CLIENT_HEADER = "X-Visalign-Client"  # "host:pid", so a server can tell its callers apart (health's `clients`)
RETRIED_STATUS = (502, 503, 504)  # a proxy or a restarting server; a 500 is the reward's own error, not retried
# What a server says about each reward it serves (`visalign.rewards.server.describe_served`) and a client reads.
DESCRIBED = ("inputs", "value_range", "higher_is_better", "needs_prompts", "uses_source_images", "groupwise",
             "min_group_size")


def encode_tensor(tensor: Tensor) -> dict:
    """A tensor as {"dtype", "shape", "data": base64 of its raw little-endian bytes}: exact, any shape."""
    tensor = tensor.detach().to("cpu").contiguous()
    names = {dtype: name for name, dtype in WIRE_DTYPES.items()}
    if tensor.dtype not in names:
        raise RewardError(f"cannot send a {tensor.dtype} tensor; allowed dtypes: {', '.join(WIRE_DTYPES)}")
    raw = tensor.reshape(-1).view(torch.uint8).numpy().tobytes()
    return {"dtype": names[tensor.dtype], "shape": list(tensor.shape), "data": base64.b64encode(raw).decode("ascii")}


def decode_tensor(field: dict, label: str) -> Tensor:
    """The tensor `encode_tensor` wrote; RewardError naming `label` for an unknown dtype or a byte count that
    does not fit the shape."""
    dtype = WIRE_DTYPES.get(field.get("dtype"))
    if dtype is None:
        raise RewardError(f"{label}.dtype={field.get('dtype')!r}; allowed: {', '.join(WIRE_DTYPES)}")
    shape = field.get("shape")
    if not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape):
        raise RewardError(f"{label}.shape must be a list of non-negative integers, got {shape!r}")
    try:
        raw = base64.b64decode(field.get("data", ""), validate=True)
    except (binascii.Error, TypeError, ValueError) as err:
        raise RewardError(f"{label}.data is not base64: {err}") from None
    expected = math.prod(shape) * dtype.itemsize
    if len(raw) != expected:
        raise RewardError(f"{label}: shape {shape} of {field['dtype']} needs {expected} bytes, got {len(raw)}")
    if not raw:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(raw), dtype=dtype).reshape(shape)


def jsonable_metadata(metadata: list[dict]) -> tuple[list[dict], list[str]]:
    """Each sample's metadata without the values JSON cannot carry (e.g. the world's SceneSpec objects, which
    its rewards rebuild from the prompt), and the keys left out."""
    kept, dropped = [], set()
    for entry in metadata:
        row = {}
        for key, value in entry.items():
            try:
                json.dumps(value)
            except (TypeError, ValueError):
                dropped.add(f"{key} ({type(value).__name__})")
                continue
            row[key] = value
        kept.append(row)
    return kept, sorted(dropped)


def _detail(response: httpx.Response) -> str:
    """The server's error message ({"detail": ...} from FastAPI), else the body's start."""
    try:
        detail = response.json().get("detail")
    except (ValueError, AttributeError):
        detail = None
    return str(detail) if detail is not None else response.text[:300]


def _served(key: str, convert=lambda value: value) -> property:
    """A Reward attribute read from the server's description of the reward (fetched once)."""
    return property(lambda self: convert(self.properties[key]), doc=f"`{key}` as the server describes it")


class RemoteReward(Reward):
    """A reward scored by a `visalign serve-rewards` server: `remote:http://HOST:PORT/NAME`.

    Its properties (inputs, value range, direction, whether it needs prompts or judges edits) are the served
    reward's, read from the server at construction; it is never differentiable (pixels cross as bytes). Each
    batch of up to `batch_size` samples is one request; the server batches it again with the reward's own
    batch size. A request that fails in transport (refused, reset, timed out) or with HTTP 502/503/504 is
    retried `retries` times, waiting `backoff` seconds doubling each time, then raises RewardError naming the
    server and the attempts; a 404 (reward not served), 422 (bad input) or 500 (the reward raised) raises at
    once with the server's message. No score is ever made up."""

    differentiable = False
    inputs = _served("inputs", tuple)
    value_range = _served("value_range", lambda value: None if value is None else tuple(value))
    higher_is_better = _served("higher_is_better")
    needs_prompts = _served("needs_prompts")
    uses_source_images = _served("uses_source_images")
    groupwise = _served("groupwise")
    min_group_size = _served("min_group_size")

    def __init__(self, url: str, *, timeout: float = 300.0, retries: int = 3, backoff: float = 1.0,
                 batch_size: int = 32):
        self._setup(timeout, retries, backoff, batch_size)
        self.url = self.parse_spec(url)["url"]
        self.name = f"remote:{self.url}"
        self.properties  # noqa: B018 - at construction: a wrong address or an unserved reward fails here

    @staticmethod
    def parse_spec(rest: str) -> dict:
        """`http://HOST:PORT/NAME` (the spec after "remote:") -> the constructor's {"url"}; ValueError if malformed."""
        parts = urllib.parse.urlsplit(rest)
        if parts.scheme not in ("http", "https") or not parts.netloc or len(parts.path) < 2 or parts.query:
            raise ValueError(f"reward 'remote:{rest}': expected remote:http://HOST:PORT/NAME, NAME a reward the "
                             "server serves (see its /health)")
        return {"url": rest}

    @classmethod
    def describe_spec(cls, rest: str) -> dict:
        """The attributes `describe` reports, as the server describes the reward (no weights load here)."""
        reward = cls(rest)
        keys = ("differentiable", "inputs", "uses_source_images", "value_range", "higher_is_better", "groupwise",
                "min_group_size")
        return {key: getattr(reward, key) for key in keys}

    def _setup(self, timeout: float, retries: int, backoff: float, batch_size: int) -> None:
        for option, value, ok, rule in (("timeout", timeout, timeout > 0, "> 0"),
                                        ("retries", retries, retries >= 0, ">= 0"),
                                        ("backoff", backoff, backoff >= 0, ">= 0")):
            if not ok:
                raise ValueError(f"{type(self).__name__}: {option}={value} must be {rule}")
        super().__init__(batch_size=batch_size)
        self.timeout, self.retries, self.backoff = float(timeout), int(retries), float(backoff)
        self._http = httpx.Client(timeout=httpx.Timeout(self.timeout, connect=min(self.timeout, 10.0)),
                                  headers={CLIENT_HEADER: f"{socket.gethostname()}:{os.getpid()}"})
        self._properties: dict | None = None
        self._lock = threading.Lock()

    @property
    def properties(self) -> dict:
        """The served reward's description (GET on its URL), fetched once."""
        with self._lock:
            if self._properties is None:
                self._properties = self._fetch_properties()
        return self._properties

    def _fetch_properties(self) -> dict:
        response = self._request("GET")
        if response.status_code != 200:
            raise RewardError(f"{self.name}: {_detail(response)} (HTTP {response.status_code})")
        try:
            properties = response.json()
            missing = [key for key in DESCRIBED if key not in properties]
        except (json.JSONDecodeError, TypeError):
            missing = DESCRIBED
        if missing:
            raise RewardError(f"{self.name}: {self.url} does not describe a reward (no {', '.join(missing)}); is it "
                              "a `visalign serve-rewards` server?")
        return properties

    def _server(self) -> str:
        """The server as errors name it."""
        return f"reward server {self.url}"

    def _request(self, method: str, **kwargs) -> httpx.Response:
        """The response to one request, retried with exponential backoff while the server is unreachable."""
        attempts = self.retries + 1
        for attempt in range(1, attempts + 1):
            try:
                response = self._http.request(method, self.url, **kwargs)
                if response.status_code not in RETRIED_STATUS:
                    return response
                failure = f"HTTP {response.status_code}: {_detail(response)}"
            except httpx.TransportError as err:  # refused, reset, timed out: the server may be restarting
                failure = f"{type(err).__name__}: {err}"
            if attempt < attempts:
                wait = self.backoff * 2 ** (attempt - 1)
                warnings.warn(f"{self.name}: attempt {attempt} of {attempts} failed ({failure}); retrying in "
                              f"{wait:g} s", RuntimeWarning, stacklevel=3)
                time.sleep(wait)
        raise RewardError(f"{self.name}: {self._server()} did not answer after {attempts} attempts (timeout "
                          f"{self.timeout:g} s, backoff {self.backoff:g} s doubling); last: {failure}")

    def score(self, *, prompts, images, videos, metadata, source_images=None, groups=None) -> RewardOutput:
        body = {"prompts": prompts, "metadata": None, "groups": None if groups is None else groups.tolist()}
        for key, value in (("images", images), ("videos", videos), ("source_images", source_images)):
            body[key] = None if value is None else encode_tensor(value)
        if metadata is not None:
            body["metadata"], dropped = jsonable_metadata(metadata)
            if dropped:
                warnings.warn(f"{self.name}: metadata {', '.join(dropped)} is not JSON and does not reach the "
                              "server", RuntimeWarning, stacklevel=2)
        response = self._request("POST", json=body)
        if response.status_code != 200:
            raise RewardError(f"{self.name}: {_detail(response)} (HTTP {response.status_code})")
        device = (images if images is not None else videos).device  # where an in-process reward's scores would be
        try:
            answer = response.json()
            scores = {key: decode_tensor(field, f"scores.{key}").to(device) for key, field in answer["scores"].items()}
            return scores if answer["output"] == "dict" else scores["score"]
        except (json.JSONDecodeError, TypeError, KeyError, AttributeError) as err:
            raise RewardError(f"{self.name}: the server's answer is not a reward's scores ({err!r})") from None


class WorkerReward(RemoteReward):
    """A reward served by a worker process of another Python interpreter: `worker:PYTHON:NAME` runs
    `PYTHON -m visalign.rewards.worker NAME` (that environment needs visalign with the `serve` extra and the
    reward's own dependencies), so a reward with pinned dependencies lives in its own environment.

    The worker starts on first use (a score or a property), serves on a free local port and stops when this
    process exits or the reward is closed (it also stops by itself when its stdin closes, so a killed parent
    leaves no orphan). `options` are the served reward's constructor options; the others are the client's, as
    for `remote:`. Its stderr is passed through, prefixed, and its last lines name why it failed to start."""

    def __init__(self, python: str, reward: str, *, options: dict | None = None, start_timeout: float = 600.0,
                 timeout: float = 300.0, retries: int = 3, backoff: float = 1.0, batch_size: int = 32):
        self._setup(timeout, retries, backoff, batch_size)
        spec = self.parse_spec(f"{python}:{reward}")
        self.name = f"worker:{python}:{reward}"
        if not start_timeout > 0:
            raise ValueError(f"{self.name}: start_timeout={start_timeout} must be > 0")
        self.python, self.reward, self.options = spec["python"], spec["reward"], dict(options or {})
        try:
            json.dumps(self.options)  # the options cross as JSON: fail here, not in the worker
        except TypeError as err:
            raise ValueError(f"{self.name}: options must be JSON values ({err})") from None
        self.start_timeout = float(start_timeout)
        self.url: str | None = None
        self.process: subprocess.Popen | None = None
        self._stderr_tail: collections.deque[str] = collections.deque(maxlen=20)

    @staticmethod
    def parse_spec(rest: str) -> dict:
        """`PYTHON:NAME` (the spec after "worker:") -> {"python", "reward"}; ValueError if malformed or PYTHON is
        not an executable (a path, or a name on PATH). NAME may itself hold colons (a dotted path)."""
        python, sep, reward = rest.partition(":")
        if not sep or not python or not reward:
            raise ValueError(f"reward 'worker:{rest}': expected worker:PYTHON:NAME, e.g. "
                             "worker:/envs/videoalign/bin/python:videoalign")
        if shutil.which(python) is None:
            raise ValueError(f"reward 'worker:{rest}': no Python interpreter at {python!r} (an executable path or a "
                             "name on PATH)")
        return {"python": python, "reward": reward}

    @classmethod
    def describe_spec(cls, rest: str) -> dict:
        """What `describe` reports without starting the worker: not differentiable; the rest is the base class's
        permissive defaults until the worker runs (the reward's own input checks apply then)."""
        cls.parse_spec(rest)
        keys = ("uses_source_images", "value_range", "higher_is_better", "groupwise", "min_group_size")
        return {"differentiable": False, "inputs": ("images", "videos"), **{key: getattr(Reward, key) for key in keys}}

    def _fetch_properties(self) -> dict:
        self._start()
        return super()._fetch_properties()

    def _server(self) -> str:
        state = "running" if self.process.poll() is None else f"exited with code {self.process.returncode}"
        return f"worker {self.python} (pid {self.process.pid}, {state}) at {self.url}"

    def _start(self) -> None:
        """Launch the worker and wait for the address it announces on its first stdout line."""
        command = [self.python, "-m", "visalign.rewards.worker", self.reward, "--options", json.dumps(self.options)]
        try:
            self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                            stderr=subprocess.PIPE, text=True)
        except OSError as err:
            raise RewardError(f"{self.name}: cannot start {self.python}: {err}") from None
        weakref.finalize(self, _stop, self.process)
        stderr = threading.Thread(target=_pass_stderr, args=(self.process, self._stderr_tail, self.reward),
                                  daemon=True)
        stderr.start()
        announced: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: announced.put(self.process.stdout.readline()), daemon=True).start()
        try:
            line = announced.get(timeout=self.start_timeout).strip()
        except queue.Empty:
            _stop(self.process)
            raise RewardError(f"{self.name}: the worker did not start serving within {self.start_timeout:g} s "
                              "(raise the start_timeout option for a slow model)") from None
        if not line:  # stdout closed before the address: the worker is exiting
            try:
                code = self.process.wait(10)
            except subprocess.TimeoutExpired:
                _stop(self.process)
                code = self.process.returncode
            stderr.join(5)  # its last lines say why
            raise RewardError(f"{self.name}: the worker exited with code {code} before serving {self.reward!r} (its "
                              f"interpreter needs visalign[serve] and the reward's dependencies); its stderr "
                              f"ends:\n{''.join(self._stderr_tail)}")
        self.url = f"{line}/{self.reward}"

    def close(self) -> None:
        """Stop the worker now (it stops at exit anyway)."""
        if self.process is not None:
            _stop(self.process)


def _pass_stderr(process: subprocess.Popen, tail: collections.deque, label: str) -> None:
    """Copy a worker's stderr to ours, each line prefixed, keeping the last lines for error messages."""
    for line in process.stderr:
        tail.append(line)
        sys.stderr.write(f"[worker {label}] {line}")


def _stop(process: subprocess.Popen) -> None:
    """Close the worker's stdin (it shuts down by itself), then terminate, then kill, a few seconds each."""
    if process.poll() is not None:
        return
    try:
        process.stdin.close()
        process.wait(5)
    except (OSError, subprocess.TimeoutExpired):
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
