"""dims: the JSON form of the exported state's symbolic dimensions, and its evaluation.

The ONNX export (:mod:`adacorr_compile.export.onnx`) writes each state tensor's
shape into the model's metadata as expressions over the model inputs' dimensions
(:func:`_expr_ast`); the state the runner creates
(:func:`adacorr_compile.export.onnx.initial_state`) and the TensorRT profiles
(:func:`adacorr_compile.export.tensorrt.profiles_for`) evaluate them for concrete
input shapes (:func:`eval_dim`). :class:`ExportError` lives here because
:func:`_expr_ast` raises it. A leaf of the export package (torch and sympy only), so
that ``onnx`` and ``tensorrt`` both import it without importing each other.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch


class ExportError(RuntimeError):
    """The model cannot be exported with cache guards; the message says why."""


def _expr_ast(expr: Any, bindings: Mapping[Any, tuple[str, int]]) -> Any:
    """A JSON form of a (symbolic) dimension in terms of model-input dimensions:
    ``int``, ``{"input": name, "axis": a}``, ``["add"|"mul", ...]``, ``["floordiv"|"mod", a, b]``."""
    import sympy

    from torch.utils._sympy.functions import FloorDiv, Mod, PythonMod

    if isinstance(expr, torch.SymInt):
        expr = expr.node.expr
    if isinstance(expr, int):
        return int(expr)
    if isinstance(expr, sympy.Integer):
        return int(expr)
    if isinstance(expr, sympy.Symbol):
        if expr not in bindings:
            raise ExportError(f"dimension {expr} is not a dimension of any model input; cannot size the cache state")
        name, axis = bindings[expr]
        return {"input": name, "axis": axis}
    if isinstance(expr, sympy.Add):
        return ["add", *(_expr_ast(a, bindings) for a in expr.args)]
    if isinstance(expr, sympy.Mul):
        return ["mul", *(_expr_ast(a, bindings) for a in expr.args)]
    if isinstance(expr, FloorDiv):
        return ["floordiv", _expr_ast(expr.args[0], bindings), _expr_ast(expr.args[1], bindings)]
    if isinstance(expr, (Mod, PythonMod)):
        return ["mod", _expr_ast(expr.args[0], bindings), _expr_ast(expr.args[1], bindings)]
    raise ExportError(f"cannot express the state dimension {expr} ({type(expr).__name__}) in terms of the inputs")


def eval_dim(ast: Any, shapes: Mapping[str, Sequence[int]]) -> int:
    """Evaluate a dimension written by :func:`_expr_ast` for the given input shapes."""
    if isinstance(ast, int):
        return ast
    if isinstance(ast, dict):
        return int(shapes[ast["input"]][ast["axis"]])
    op, *args = ast
    vals = [eval_dim(a, shapes) for a in args]
    if op == "add":
        return sum(vals)
    if op == "mul":
        out = 1
        for v in vals:
            out *= v
        return out
    if op == "floordiv":
        return vals[0] // vals[1]
    if op == "mod":
        return vals[0] % vals[1]
    raise ValueError(f"unknown dimension operator {op!r}")
