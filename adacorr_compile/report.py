"""What the passes found in a model: regions, streams, side inputs, what was left out."""

from __future__ import annotations

from typing import Any

from .api import _model_state
from .policies import step_role


def report(compiled: Any) -> dict[str, Any]:
    """Regions found (module path, class, stream shapes, side inputs), the spans of chained
    regions that share one cache, and the reasons anything was left unguarded, for every
    graph compiled so far."""
    model = _model_state(compiled)
    graphs = []
    for g in model.graphs:
        info = getattr(g, "analysis", None)
        graphs.append(
            {
                "regions": [{**b.describe(), "role": step_role(model.config, k)} for k, b in enumerate(info.blocks)]
                if info is not None else [],
                "unguarded": [{"where": w, "reason": r} for w, r in info.skipped] if info is not None else [],
                "bodies_compiled": g.bodies_compiled,
                # runs of chained regions sharing one cache (passes/chain_regions.py); spans of one left out
                "spans": [paths for paths in info.spans if len(paths) > 1] if info is not None else [],
            }
        )
    return {"graphs": graphs, "fallbacks": list(model.fallbacks), "config": model.config}


def format_report(rep: dict[str, Any]) -> str:
    lines = []
    for k, g in enumerate(rep["graphs"]):
        lines.append(f"graph {k}: {len(g['regions'])} guarded regions, {g['bodies_compiled']} distinct block bodies")
        for r in g["regions"]:
            streams = ", ".join(f"{s['input']}{s['shape']}" for s in r["streams"])
            side = ", ".join(f"{s['name']}{s['shape']}" for s in r["side_inputs"]) or "-"
            role = "" if r.get("role", "block") == "block" else f"  [step {r['role']}]"
            lines.append(f"  {r['path']:<32} {r['class']:<28} streams: {streams}{role}")
            lines.append(f"  {'':<32} {'':<28} side inputs: {side}; {r['parameters']} parameters, {r['nodes']} nodes")
        for paths in g.get("spans", []):
            lines.append(f"  one cache for the span {paths[0]} .. {paths[-1]} ({len(paths)} chained regions)")
        for u in g["unguarded"]:
            lines.append(f"  unguarded {u['where']}: {u['reason']}")
    for reason in rep["fallbacks"]:
        lines.append(f"compiled without guards: {reason}")
    if not rep["graphs"] and not rep["fallbacks"]:
        lines.append("nothing compiled")
    return "\n".join(lines)
