"""A graph that is one whole block (regional compilation, graph breaks between blocks).

``transformer.compile_repeated_blocks(backend="adacorr")``, ``torch.compile`` of each block
by hand, and graph breaks between the blocks of a whole-model compile give graphs that each
hold one block's whole forward. The passes find no repeated siblings in such a graph; the
backend then asks :func:`lone_block` whether the graph is a numbered block of an owner's
container (a ``ModuleList`` / ``Sequential``), and if so the graph becomes one guarded
region of the owner's step (:mod:`adacorr_compile.runtime.regional`): the owner's forward
hooks start and end the step, its blocks take their roles in call order. Not a pass of the
list: it runs only where the list found nothing, on the pristine graph.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch
import torch.fx as fx

from ..config import AdaCorrConfig
from ..runtime.call_guard import PartRuntime, guard_calls, guarded_at_call
from ..runtime.region import RegionSpec
from ..runtime.regional import LoneBlockRuntime, argument_name, find_enclosing_site, regional_owner, shape_pairs
from ..runtime.state import ModelState
from .common import example_value
from .find_blocks import _is_param, _same

logger = logging.getLogger("adacorr_compile")
_PARTIAL = " (a graph break inside the block)"


def lone_block(
    original: fx.GraphModule, example_inputs: list[Any], config: AdaCorrConfig, model: ModelState, tx: Any,
    compile_plain: Callable[[fx.GraphModule, list[Any], AdaCorrConfig], Callable[..., Any]],
) -> Callable[..., Any] | str | None:
    """Regional compilation (``runtime/regional.py``): the runtime of a graph that is the whole
    forward of a numbered block of an owner module (a :class:`LoneBlockRuntime`); the graph
    compiled plainly where it is a part of a block that is guarded at its call
    (``runtime/call_guard.py``: a graph break inside the block); the reason it cannot be
    guarded; or None where the graph is not a block's forward (then the passes' reasons stand). ``tx`` is
    Dynamo's translator of the frame being compiled (its ``self`` is the block);
    ``compile_plain`` compiles the block's graph as plain Inductor would (the region's body)."""
    block = tx.f_locals.get("self") if tx is not None else None
    if not isinstance(block, torch.nn.Module):
        return None
    found = find_enclosing_site(block)
    if found is None:
        return None
    enclosing, site, arguments = found
    if arguments is None:  # no owner call to hook (or Dynamo runs it: a whole-model compile's nested frame)
        return None
    placeholders = [n for n in original.graph.nodes if n.op == "placeholder"]
    params = [i for i, (n, x) in enumerate(zip(placeholders, example_inputs)) if _is_param(n, x)]
    if guarded_at_call(enclosing):  # its CallGuard is the region: its graphs are plain parts of it
        return PartRuntime(compile_plain(original, example_inputs, config), params[0] if params else None, config)
    # a regionally compiled block's own compile has a state per block: the owner gets one; a
    # block frame of a whole-model compile shares the model's state (stats() shows both)
    if enclosing is not block:
        reason: str | None = f"{site.path}: a graph of its {type(block).__name__} compiled alone{_PARTIAL}"
    else:
        reason = _lone_refusal(original, tx, site, config)
    template = _lone_spec(original, example_inputs, site.path) if reason is None else reason
    # a part of the block (a graph break inside it), or a graph whose outputs pair with no input
    # (a part too where Dynamo resumes inside a function the block calls: no graph-break reason
    # marks it): the block's whole call is the region, checked again at the call
    at_call = isinstance(template, str) and site.count >= config.min_blocks
    if isinstance(template, str) and not at_call and site.hooked is not None:
        return None  # a whole-model compile's block frame in a short container: nothing changes for it
    owner = regional_owner(site, arguments, lambda: ModelState(config) if site.hooked is None else model)
    if isinstance(template, str):
        reason = template if template.startswith(site.path) else f"{site.path}: {template}"
    if at_call:  # runtime/call_guard.py
        if guard_calls(site, enclosing):
            logger.info("adacorr: %s; the blocks of its container are guarded at their calls", reason)
        return PartRuntime(compile_plain(original, example_inputs, config), params[0] if params else None, config)
    if isinstance(template, str):
        owner.model.note(reason)  # stats(owner)["fallbacks"] says why this block is not guarded
        return reason
    body = compile_plain(original, example_inputs, config)
    logger.info("adacorr: %s compiled alone: a guarded region of %s (%d blocks in its container)",
                site.path, type(site.owner).__name__, site.count)
    return LoneBlockRuntime(body, template, params[0] if params else None, None if params else site.path, config)


def _lone_refusal(gm: fx.GraphModule, tx: Any, site: Any, config: AdaCorrConfig) -> str | None:
    """Why a block's graph cannot be its guarded region: it is a part of the block (a graph
    break inside it), or the block's container is shorter than ``min_blocks``; or None."""
    reason = getattr(gm, "compile_subgraph_reason", None)
    if tx.f_code.co_name.startswith("torch_dynamo_resume") or getattr(reason, "graph_break", False):
        return f"{site.path}: its compiled graph is a part of the block{_PARTIAL}"
    if site.count < config.min_blocks:
        return f"{site.path}: its container has {site.count} block(s), fewer than min_blocks={config.min_blocks}"
    return None


def _lone_spec(gm: fx.GraphModule, example_inputs: list[Any], path: str) -> RegionSpec | str:
    """The region spec of a whole-block graph (inputs: the placeholders, outputs: the graph's),
    its streams paired by shape (:func:`shape_pairs`), or why there is none."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    output = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    outs = list(output) if isinstance(output, (tuple, list)) else [output]
    if not outs or not all(isinstance(o, fx.Node) and isinstance(example_value(o), torch.Tensor) for o in outs):
        return "the graph returns a value that is not a tensor"
    params = {i for i, (n, x) in enumerate(zip(placeholders, example_inputs)) if _is_param(n, x)}
    ins = [example_value(n) for n in placeholders]
    names = [argument_name(n.name) for n in placeholders]
    pairs = shape_pairs(ins, [example_value(o) for o in outs], params, _same, names)
    if isinstance(pairs, str):
        return pairs
    return RegionSpec(path, 0, tuple(pairs), tuple(sorted({i for i, _ in pairs})), len(outs), f"lone:{path}")
