"""The ways the lab runs a reference model: a :class:`Method` turns the reference model into
the callable a sampler runs (uncached eager, uncached Inductor, the adacorr backend with some
options, the ONNX export run by onnxruntime); the peers' caches are in
:mod:`adacorr_compile.lab.peer_caches`. Also the helpers that reach into a reference model
(its transformer, its blocks) and count the blocks that really ran.
"""

from __future__ import annotations

import copy
import types
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..config import AdaCorrConfig


@dataclass
class Method:
    name: str
    kind: str  # "baseline" | "ours" | "peer" | "onnx"
    build: Callable[[Any], Any]  # reference model -> callable for the sampler
    lowering: str  # "eager", "inductor" or "onnxruntime": the uncached run of the same lowering is its speed reference
    policy: str | None = None
    correction: bool | None = None
    setting: float | None = None  # the swept value (threshold, interval)
    options: dict[str, Any] = field(default_factory=dict)
    cleanup: Callable[[Any], None] | None = None
    sampler_kwargs: dict[str, Any] = field(default_factory=dict)  # e.g. cfg_calls=2: CFG as two calls per step


def _fresh_function(f: Any) -> Any:
    """A copy of ``f`` with new code objects, and of the function it wraps (``__wrapped__``, held
    in a closure cell of the decorator's wrapper)."""
    inner = getattr(f, "__wrapped__", None)
    new_inner = _fresh_function(inner) if inner is not None else None
    closure = None
    if f.__closure__:
        closure = tuple(types.CellType(new_inner) if inner is not None and c.cell_contents is inner else c
                        for c in f.__closure__)
    g = types.FunctionType(f.__code__.replace(co_name=f.__code__.co_name), f.__globals__, f.__name__, f.__defaults__,
                           closure)
    g.__kwdefaults__, g.__qualname__ = f.__kwdefaults__, f.__qualname__
    g.__dict__.update(f.__dict__)
    if new_inner is not None:
        g.__wrapped__ = new_inner
    return g


def own_forward(module: torch.nn.Module) -> None:
    """Give ``module`` a forward with code objects of its own. Dynamo keeps its compiled code per
    code object, so two ``torch.compile`` of copies of one model class in one process can share
    (or spoil) each other's graphs; a forward of its own gives each copy its own compile."""
    module.forward = types.MethodType(_fresh_function(type(module).forward), module)


def transformer_of(model: Any) -> torch.nn.Module:
    """The diffusers transformer inside a reference model (itself for DiT)."""
    return getattr(model, "transformer", model)


def with_transformer(model: Any, transformer: Any) -> Any:
    """A shallow copy of a wrapper model whose ``transformer`` is replaced (DiT: the new model)."""
    if not hasattr(model, "transformer"):
        return transformer
    new = copy.copy(model)
    new._modules = dict(model._modules)
    new._modules["transformer"] = transformer
    return new


def block_modules(transformer: torch.nn.Module) -> list[torch.nn.Module]:
    """The Transformer blocks (children of ModuleLists named *blocks) in order."""
    blocks = []
    for name, child in transformer.named_children():
        if isinstance(child, torch.nn.ModuleList) and name.endswith("blocks"):
            blocks.extend(child)
    return blocks


class BlockCounter:
    """Counts block evaluations that really ran in eager code: a forward hook on each
    block's first submodule (a skipped block never reaches its submodules, even when
    a cache hook wraps the block's own forward)."""

    def __init__(self, transformer: torch.nn.Module) -> None:
        self.count = 0
        self.handles = []
        for block in block_modules(transformer):
            first = next(block.children())
            self.handles.append(first.register_forward_hook(self._hook))

    def _hook(self, *_: Any) -> None:
        self.count += 1

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def ours(name: str, options: dict[str, Any], setting: float | None = None, lowering: str = "inductor",
         cfg_calls: int = 1) -> Method:
    """Our backend with ``options``; ``cfg_calls=2`` samples with CFG as two calls per step
    (cond and uncond in diffusers' ``cache_context``, as Wan's or Flux's true-CFG pipeline)."""
    options = {"lowering": lowering, **options}

    def build(model: Any) -> Any:
        compiled = torch.compile(transformer_of(model), backend="adacorr", options=options)
        return with_transformer(model, compiled)

    cfg = AdaCorrConfig.from_options(options)  # labels from the config's own defaults
    return Method(name, "ours", build, cfg.lowering, cfg.policy, cfg.correction, setting, options,
                  sampler_kwargs={"cfg_calls": cfg_calls} if cfg_calls != 1 else {})


def eager_baseline() -> Method:
    return Method("uncached eager", "baseline", lambda m: m, "eager")


def inductor_baseline() -> Method:
    return Method("uncached inductor", "baseline", lambda m: with_transformer(m, torch.compile(transformer_of(m))), "inductor")


def _peer_compiled(model: Any, compiled: bool) -> Any:
    """The model as a peer's user runs it: with ``compiled``, its transformer under
    ``torch.compile`` (Inductor) after the peer's cache is enabled on it, as the peers' guides say."""
    return with_transformer(model, torch.compile(transformer_of(model))) if compiled else model


class OnnxDiT:
    """A DiT exported to ONNX and run by onnxruntime, callable like the DiT by the sampler
    (``model(x, timestep=t, class_labels=y)``); ``stats()``/``reset()`` are the runner's."""

    def __init__(self, runner: Any, config: Any) -> None:
        self.runner = runner
        self.config = config  # the DiT's diffusers config: the sampler reads its geometry

    def __call__(self, hidden_states: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        return self.runner(hidden_states=hidden_states, timestep=timestep, class_labels=class_labels)[0]

    def stats(self) -> dict[str, Any]:
        return self.runner.stats()

    def reset(self) -> None:
        self.runner.reset()


def onnx_dit(name: str, options: dict[str, Any] | None, workdir: str, setting: float | None = None) -> Method:
    """The reference DiT exported with :func:`adacorr_compile.export.to_onnx` (``options=None``:
    the uncached export) and run by onnxruntime on the CPU; its speed reference is the
    uncached onnxruntime run."""

    def build(model: Any) -> Any:
        import os

        from ..export import OnnxRunner, to_onnx

        size, channels = model.config.sample_size, model.config.in_channels
        example = {"hidden_states": torch.randn(2, channels, size, size), "timestep": torch.tensor([999, 999]),
                   "class_labels": torch.tensor([0, 1])}
        path = os.path.join(workdir, f"{abs(hash(name))}.onnx")
        with torch.no_grad():
            to_onnx(model, example, path, config=options, cache=options is not None)
        return OnnxDiT(OnnxRunner(path, providers=["CPUExecutionProvider"]), model.config)

    if options is None:
        return Method(name, "baseline", build, "onnxruntime")
    cfg = AdaCorrConfig.from_options(options)
    return Method(name, "onnx", build, "onnxruntime", cfg.policy, cfg.correction, setting, dict(options))
