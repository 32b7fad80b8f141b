"""A tiny DiT-like model and a step-level continuous-batching simulator for tests/test_requests.py.

Each request samples ``steps`` Euler steps of its own timesteps with classifier-free guidance
(two rows per call: its class label and the null label); requests join at their arrival tick
and leave when done, so every call's batch mixes requests at different steps."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

import adacorr_compile


class Block(torch.nn.Module):
    """adaLN-zero-like block: attention and MLP, both modulated by the conditioning."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm1 = torch.nn.LayerNorm(dim, elementwise_affine=False)
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.proj = torch.nn.Linear(dim, dim)
        self.norm2 = torch.nn.LayerNorm(dim, elementwise_affine=False)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(dim, 2 * dim), torch.nn.GELU(), torch.nn.Linear(2 * dim, dim))
        self.ada = torch.nn.Linear(dim, 4 * dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift1, scale1, shift2, scale2 = self.ada(torch.nn.functional.silu(c)).unsqueeze(1).chunk(4, dim=-1)
        h = self.norm1(x) * (1 + scale1) + shift1
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        x = x + self.proj(torch.nn.functional.scaled_dot_product_attention(q, k, v))
        h = self.norm2(x) * (1 + scale2) + shift2
        return x + self.mlp(h)


class TinyDiT(torch.nn.Module):
    """Patchified tokens in, noise prediction out; per-row timestep and class label. Its token
    and channel counts are odd: under dynamic=True, Dynamo gives equal sizes one symbol, and an
    even batch equal to one of them would be specialised with it."""

    def __init__(self, dim: int = 32, depth: int = 4, tokens: int = 9, channels: int = 3, classes: int = 10) -> None:
        super().__init__()
        self.dim, self.channels = dim, channels
        self.embed = torch.nn.Linear(channels, dim)
        self.pos = torch.nn.Parameter(torch.randn(1, tokens, dim) * 0.02)
        self.t_mlp = torch.nn.Sequential(torch.nn.Linear(dim, dim), torch.nn.SiLU(), torch.nn.Linear(dim, dim))
        self.labels = torch.nn.Embedding(classes + 1, dim)
        self.blocks = torch.nn.ModuleList(Block(dim) for _ in range(depth))
        self.out = torch.nn.Linear(dim, channels)

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
        angles = timestep.float()[:, None] * freqs[None]
        c = self.t_mlp(torch.cat([angles.cos(), angles.sin()], dim=-1)) + self.labels(class_labels)
        h = self.embed(x) + self.pos
        for block in self.blocks:
            h = block(h, c)
        return self.out(h)


def tiny_model(seed: int = 0) -> TinyDiT:
    torch.manual_seed(seed)
    return TinyDiT().eval()


NULL_LABEL = 10


@dataclass
class Req:
    """One request: its id, arrival tick, step count, guidance, label and noise seed."""

    id: str
    arrival: int
    steps: int
    guidance: float
    label: int
    seed: int
    x: torch.Tensor | None = None
    done: int = 0
    cancel_at: int | None = None  # cancelled after this many steps
    trace: list = field(default_factory=list)

    def start(self) -> None:
        g = torch.Generator().manual_seed(self.seed)
        self.x = torch.randn(1, 9, 3, generator=g)

    def timesteps(self) -> list[float]:
        return [1000.0 * (1.0 - k / self.steps) for k in range(self.steps)]

    def rows(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        t = self.timesteps()[self.done]
        x = torch.cat([self.x, self.x])
        return x, torch.full((2,), t), torch.tensor([self.label, NULL_LABEL])

    def advance(self, eps: torch.Tensor) -> None:
        cond, uncond = eps[0:1], eps[1:2]
        guided = uncond + self.guidance * (cond - uncond)
        self.x = self.x - guided / self.steps
        self.done += 1


def solo(fast, req: Req) -> torch.Tensor:
    """``req`` sampled alone: one private generation, its two CFG rows per call."""
    req = Req(req.id, 0, req.steps, req.guidance, req.label, req.seed)
    req.start()
    with torch.no_grad(), adacorr_compile.generation(fast, num_steps=req.steps):
        for _ in range(req.steps):
            req.advance(fast(*req.rows()))
    return req.x


def serve(fast, reqs: list[Req], rng: torch.Generator, use_requests: bool = True, interleave: bool = True,
          max_batch: int | None = None) -> dict[str, torch.Tensor]:
    """Step-level continuous batching: at every tick the live requests (arrived, not done,
    up to ``max_batch``) go into one call, in a shuffled order, their rows either grouped
    ([c, u] per request) or interleaved ([c...; u...]). Returns each finished request's sample;
    a cancelled one is released and left out."""
    pending = sorted(reqs, key=lambda r: r.arrival)
    live: list[Req] = []
    out: dict[str, torch.Tensor] = {}
    tick = 0
    while pending or live:
        while pending and pending[0].arrival <= tick:
            r = pending.pop(0)
            r.start()
            live.append(r)
        if live:
            batch = live if max_batch is None else live[:max_batch]
            order = [batch[i] for i in torch.randperm(len(batch), generator=rng).tolist()]
            parts = [r.rows() for r in order]
            if interleave:
                rows = [p[0][0:1] for p in parts] + [p[0][1:2] for p in parts]
                xs = torch.cat(rows)
                ts = torch.cat([p[1][0:1] for p in parts] + [p[1][1:2] for p in parts])
                ys = torch.cat([p[2][0:1] for p in parts] + [p[2][1:2] for p in parts])
                ids = [r.id for r in order] * 2
            else:
                xs, ts, ys = (torch.cat([p[k] for p in parts]) for k in range(3))
                ids = [r.id for r in order for _ in range(2)]
            with torch.no_grad():
                if use_requests:
                    with adacorr_compile.requests(fast, ids, num_steps={r.id: r.steps for r in order}):
                        eps = fast(xs, ts, ys)
                else:
                    eps = fast(xs, ts, ys)
            n = len(order)
            for i, r in enumerate(order):
                rows = [i, i + n] if interleave else [2 * i, 2 * i + 1]
                r.advance(eps[rows])
                if r.cancel_at is not None and r.done >= r.cancel_at:
                    if use_requests:
                        adacorr_compile.release(fast, r.id)
                    live.remove(r)
                elif r.done == r.steps:
                    out[r.id] = r.x
                    live.remove(r)
        tick += 1
    return out


def schedule(seed: int, count: int, steps=(6, 8, 10), guidance=(1.0, 3.0, 5.0), rate: float = 0.7) -> list[Req]:
    """Seeded Poisson arrivals (exponential gaps, in ticks) with random steps, guidance, labels."""
    g = torch.Generator().manual_seed(seed)
    reqs, clock = [], 0.0
    for i in range(count):
        clock += float(torch.empty(1).exponential_(rate, generator=g))
        pick = lambda seq: seq[int(torch.randint(len(seq), (1,), generator=g))]  # noqa: E731
        reqs.append(Req(f"r{i}", int(clock), pick(steps), pick(guidance), int(torch.randint(10, (1,), generator=g)), 100 + i))
    return reqs
