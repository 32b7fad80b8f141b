"""Who owns the state a graph runs on: the compiled model, and the module instance.

Dynamo shares compiled graphs more widely than a user expects. Two ``torch.compile``
calls with equal backend and options compare equal (``_TorchCompileWrapper.__eq__``),
so the second one runs the graph the first one compiled; and with parameters as
graph inputs (inlined ``nn.Module``s) one graph serves every instance of a class.
State therefore cannot live in the graph. It lives on the ``_TorchCompileWrapper``
of the ``torch.compile`` call (one per compiled model, reachable from the compiled
module, dropped by ``copy.deepcopy``/``pickle``), looked up at each call from the
Dynamo frame that is running, and inside it per module instance, told apart by the
identity of the graph's first parameter input.
"""

from __future__ import annotations

import sys
import threading
from typing import Any, Callable

STATE_ATTR = "_adacorr_model_state"
_WRAPPER = "_TorchCompileWrapper"
_LOCK = threading.Lock()


def compile_wrapper_of(callback: Any) -> Any | None:
    """The ``_TorchCompileWrapper`` behind a Dynamo callback (the chain of
    ``_torchdynamo_orig_backend`` wrappers), or None."""
    node = callback
    for _ in range(16):
        if node is None:
            return None
        if type(node).__name__ == _WRAPPER:
            return node
        node = getattr(node, "_torchdynamo_orig_backend", None)
    return None


def compiling_wrapper() -> Any | None:
    """The wrapper of the ``torch.compile`` call compiling now (its ``__call__`` is on the stack)."""
    frame = sys._getframe(1)
    try:
        while frame is not None:
            candidate = frame.f_locals.get("self") if frame.f_code.co_name == "__call__" else None
            if type(candidate).__name__ == _WRAPPER:
                return candidate
            frame = frame.f_back
        return None
    finally:
        del frame


_ENTRY_NAMES = ("compile_wrapper", "_fn")  # the function _TorchDynamoContext.__call__ returns (torch 2.13, 2.11)


def calling_wrapper() -> Any | None:
    """The wrapper of the compiled model being called now: the innermost Dynamo entry
    frame on the stack (``_TorchDynamoContext.__call__``'s wrapper function) holds its
    callback (a ``disable`` frame on the way holds none)."""
    frame = sys._getframe(1)
    try:
        while frame is not None:
            code = frame.f_code
            if code.co_name in _ENTRY_NAMES and code.co_filename.endswith("eval_frame.py"):
                wrapper = compile_wrapper_of(frame.f_locals.get("callback"))
                if wrapper is not None:
                    return wrapper
            frame = frame.f_back
        return None
    finally:
        del frame


def state_on(wrapper: Any, make: Callable[[], Any]) -> Any:
    """The state attached to ``wrapper``, made by ``make()`` on first use (thread-safe)."""
    state = wrapper.__dict__.get(STATE_ATTR)
    if state is None:
        with _LOCK:
            state = wrapper.__dict__.get(STATE_ATTR)
            if state is None:
                state = make()
                wrapper.__dict__[STATE_ATTR] = state
    return state
