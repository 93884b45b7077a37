"""The reward server behind `visalign serve-rewards` and `worker:` rewards: loaded rewards served over HTTP on
FastAPI + uvicorn, one batch per request, in the wire format of `visalign.rewards.remote`.

    GET  /health   {"status": "ok", "pid", "rewards": {NAME: description}, "clients": {"host:pid": requests}}
    GET  /NAME     the description: class, differentiable (always false here), inputs, value_range,
                   higher_is_better, needs_prompts, uses_source_images, groupwise, min_group_size,
                   batch_size, summary, options
    POST /NAME     {"prompts", "images" | "videos", "source_images", "metadata", "groups"}
                   -> {"reward", "output": "tensor" | "dict", "scores": {"score": tensor, sub-score: tensor}}

A request runs through the reward's own call (input checks, batching by its batch size) under no_grad, with
`allow_invalid` so a non-finite score comes back as NaN and the caller's own call decides. Errors: 404 names the
served rewards, 422 carries the reward's RewardError message (or the field that failed to decode), 500 the
exception the reward's code raised. One request at a time per reward: models and tokenizers are not all
thread-safe, and two batches at once would double the memory.
"""

from __future__ import annotations

import collections
import os
import socket
import threading
from typing import Any

import torch

from visalign.rewards.base import Reward, RewardError
from visalign.rewards.registry import summary
from visalign.rewards.remote import CLIENT_HEADER, decode_tensor, encode_tensor

try:  # the `serve` extra
    import uvicorn
    from fastapi import FastAPI, Header, HTTPException
    from pydantic import BaseModel
except ImportError as err:  # pragma: no cover - the extra is part of the dev install
    raise ImportError(f"the reward server needs fastapi and uvicorn: pip install 'visalign[serve]' ({err})") from err


class WireTensor(BaseModel):
    """A tensor on the wire: its raw little-endian C-order bytes in base64."""

    dtype: str  # float32, float64, float16, bfloat16 or uint8 (images: 0-255, divided by 255)
    shape: list[int]
    data: str


class ScoreRequest(BaseModel):
    """One batch: the keyword arguments of a reward call."""

    prompts: list[str] | None = None
    images: WireTensor | None = None  # [B, 3, H, W] in [0, 1]
    videos: WireTensor | None = None  # [B, F, 3, H, W] in [0, 1]
    source_images: WireTensor | None = None  # [B, 3, H', W']: the images edits started from
    metadata: list[dict[str, Any]] | None = None
    groups: list[int] | None = None  # a group id per sample, read by groupwise rewards


def describe_served(reward: Reward, options: dict | None = None) -> dict:
    """A loaded reward's properties as the server reports them (the remote reward adopts them)."""
    cls = type(reward)
    return {"class": f"{cls.__module__}.{cls.__qualname__}", "differentiable": False, "inputs": list(reward.inputs),
            "value_range": None if reward.value_range is None else list(reward.value_range),
            "higher_is_better": reward.higher_is_better, "needs_prompts": reward.needs_prompts,
            "uses_source_images": reward.uses_source_images, "groupwise": reward.groupwise,
            "min_group_size": reward.min_group_size, "batch_size": reward.batch_size,
            "summary": summary(cls.__doc__), "options": options or {}}


def _media(field: WireTensor, label: str) -> torch.Tensor:
    tensor = decode_tensor(field.model_dump(), label)
    return tensor.float() / 255 if tensor.dtype == torch.uint8 else tensor


def build_app(rewards: dict[str, Reward], options: dict[str, dict] | None = None) -> FastAPI:
    """The FastAPI app serving `rewards` by name (`options`: each reward's constructor options, for /health)."""
    if "health" in rewards:
        raise ValueError("a served reward cannot be named 'health' (the health endpoint)")
    options = options or {}
    locks = {name: threading.Lock() for name in rewards}
    clients: collections.Counter[str] = collections.Counter()
    clients_lock = threading.Lock()
    app = FastAPI(title="visalign rewards", description=__doc__)

    def served(name: str) -> Reward:
        if name not in rewards:
            raise HTTPException(404, f"unknown reward {name!r}; this server serves: {', '.join(rewards)}")
        return rewards[name]

    @app.get("/health")
    def health() -> dict:
        with clients_lock:
            seen = dict(clients)
        return {"status": "ok", "pid": os.getpid(), "clients": seen,
                "rewards": {name: describe_served(r, options.get(name)) for name, r in rewards.items()}}

    @app.get("/{name:path}")
    def description(name: str) -> dict:
        return describe_served(served(name), options.get(name))

    @app.post("/{name:path}")
    def score(name: str, request: ScoreRequest, client: str = Header("unknown", alias=CLIENT_HEADER)) -> dict:
        reward = served(name)
        with clients_lock:
            clients[client] += 1
        try:
            media = {key: _media(getattr(request, key), key) for key in ("images", "videos", "source_images")
                     if getattr(request, key) is not None}
            with locks[name], torch.no_grad():
                out = reward(prompts=request.prompts, metadata=request.metadata, groups=request.groups,
                             allow_invalid=True, **media)
        except RewardError as err:
            raise HTTPException(422, str(err)) from None
        except Exception as err:  # the reward's own code failed: named for the caller's error
            raise HTTPException(500, f"reward {name!r} raised {type(err).__name__}: {err}") from None
        scores = out if isinstance(out, dict) else {"score": out}
        return {"reward": name, "output": "dict" if isinstance(out, dict) else "tensor",
                "scores": {k: encode_tensor(v if v.is_floating_point() else v.float()) for k, v in scores.items()}}

    return app


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: a free one). It listens before its address is announced, so a
    client that connects at once waits in the backlog instead of being refused."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.listen(128)
    return sock


def address(sock: socket.socket) -> str:
    """The http:// address a bound socket serves."""
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if sock.family == socket.AF_INET6 else f"http://{host}:{port}"


def make_server(rewards: dict[str, Reward], options: dict[str, dict] | None = None,
                log_level: str = "info") -> uvicorn.Server:
    """A uvicorn server for the rewards; `server.run(sockets=[bind(...)])` serves until Ctrl-C / SIGTERM or
    `server.should_exit = True`."""
    config = uvicorn.Config(build_app(rewards, options), log_level=log_level, lifespan="off")
    return uvicorn.Server(config)
