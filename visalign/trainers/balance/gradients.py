"""Per-reward gradients of the trainable parameters, flattened into one [K, P] buffer (written in place, one
copy per parameter and reward; nothing else of size K×P is allocated), accumulated over micro-batches.

Under FSDP each process holds a shard of every parameter, so its rows hold the shards of the gradients: each
reward's gradient is a backward the engine reduce-scatters (already averaged over processes), and the Gram matrix
is the sum over processes of the shards' partial dot products, <g_k, g_l> = Σ_r <g_k^r, g_l^r>."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor

from visalign.trainers.sharding import is_sharded, local, shard_sum


class GradientBuffer:
    def __init__(self, params: list[torch.nn.Parameter], k: int, accelerator=None):
        self.params = list(params)
        self.accelerator = accelerator
        self.sharded = accelerator is not None and is_sharded(accelerator)
        self.sizes = [local(p).numel() for p in self.params]
        total = sum(self.sizes)
        device = self.params[0].device if self.params else "cpu"
        self.J = torch.zeros(k, total, dtype=torch.float32, device=device)
        self.tracked: Tensor | None = None  # per-reward gradients tracked across refreshes (track())

    def add(self, k: int, loss: Tensor, retain_graph: bool) -> None:
        """J[k] += d loss / d params (parameters the loss does not reach add nothing)."""
        if self.sharded:  # the shards are not in the graph: the engine's backward writes them (.grad), reduced
            for p in self.params:
                p.grad = None
            loss.backward(retain_graph=retain_graph)
            grads = [None if p.grad is None else local(p.grad) for p in self.params]
            for p in self.params:
                p.grad = None
        else:
            grads = torch.autograd.grad(loss, self.params, retain_graph=retain_graph, allow_unused=True)
        offset = 0
        for g, n in zip(grads, self.sizes, strict=True):
            if g is not None:
                self.J[k, offset:offset + n].add_(g.reshape(-1).float())
            offset += n

    def reduce(self, accelerator) -> None:
        """Average J over processes (each process holds its share of the batch; sharded rows already are)."""
        if accelerator is not None and accelerator.num_processes > 1 and not self.sharded:
            self.J = accelerator.reduce(self.J, reduction="mean")

    def gram(self) -> Tensor:
        return self._whole(_gram(self.J))

    def _whole(self, gram: Tensor) -> Tensor:
        """The Gram matrix of whole gradients: of shards, the sum of every process's partial one."""
        return shard_sum(gram, self.accelerator) if self.sharded else gram

    def apply(self, alpha: Tensor) -> Tensor:
        """Write d = Σ_k alpha_k J[k] into the parameters' .grad (added to what is there) and return d."""
        d = (alpha.to(self.J.device, torch.float64)[:, None] * self.J.double()).sum(0).float()
        offset = 0
        for p, n in zip(self.params, self.sizes, strict=True):
            part = d[offset:offset + n].view_as(local(p)).to(p.dtype)
            if isinstance(p, DTensor):
                part = DTensor.from_local(part, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
            p.grad = part.clone() if p.grad is None else p.grad + part
            offset += n
        return d

    def zero(self) -> None:
        self.J.zero_()

    def track(self, decay: float) -> Tensor:
        """Y <- decay Y + (1 - decay) J (Y = J at the first call) and the Gram matrix of Y. MoCo (Fernando et al.
        2023, arXiv 2210.12624, Alg. 1, y_k <- y_k - beta (y_k - g_k) with beta = 1 - decay): MGDA's weights
        from one step's stochastic gradients are biased, from tracked ones they follow the persistent part."""
        if self.tracked is None:
            self.tracked = self.J.clone()
        else:
            self.tracked.mul_(decay).add_(self.J, alpha=1 - decay)
        return self._whole(_gram(self.tracked))

    def state_dict(self) -> dict:
        return {"tracked": self.tracked.cpu() if self.tracked is not None else torch.zeros(0)}

    def load_state_dict(self, state: dict) -> None:
        y = state["tracked"]
        self.tracked = y.to(self.J.device, self.J.dtype) if y.numel() else None


def _gram(rows: Tensor) -> Tensor:
    """Inner products [K, K] of the rows of [K, P], in float64 on the CPU."""
    m = rows.double()
    return (m @ m.T).cpu()


def output_space_gram(losses: list[Tensor], output: Tensor) -> Tensor:
    """Gram matrix [K, K] of the per-reward loss gradients with respect to the network's output instead of its
    parameters, G_kl = <dL_k/dz, dL_l/dz> (MGDA-UB, Sener & Koltun 2018, arXiv 1810.04650, Sec. 3.3: the
    min-norm problem on the shared representation z bounds the one on the shared parameters, since
    |Σ alpha_k dL_k/dθ| <= |dz/dθ| |Σ alpha_k dL_k/dz|). Backpropagates through the loss only, never the network,
    and keeps the graph for the update's own backward. Outputs of different micro-batches or processes are
    different coordinates of z, so their Gram matrices add."""
    grads = [torch.autograd.grad(loss, output, retain_graph=True)[0].reshape(-1).double() for loss in losses]
    u = torch.stack(grads)
    return u @ u.T
