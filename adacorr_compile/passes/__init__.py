"""The backend's passes, one per file, run by :mod:`.manager` in the order of :data:`PASSES`.

Each pass is ``(gm, config) -> gm`` and records what it learned in
``gm.meta["adacorr"]`` (:class:`~adacorr_compile.passes.common.Analysis`). Its entry in
:data:`PASSES` declares what it requires and provides (``Analysis`` fields, or the
stages ``bodies`` and ``lowered``); the manager checks them before each pass. See
README.md in this folder for the invariants each pass keeps.
"""

from .analyze_inputs import analyze_inputs
from .chain_regions import chain_regions
from .find_blocks import find_blocks
from .guard_blocks import guard_blocks
from .lower import lower
from .manager import Pass, PassPreconditionError, check_order, run_passes
from .outline_blocks import outline_blocks

# the order, once: each pass after what it requires
PASSES = [
    Pass(find_blocks, requires=["example_inputs"], provides=["blocks"]),
    Pass(
        analyze_inputs,
        requires=["example_inputs", "blocks"],
        provides=["timestep_index", "owner_index", "context_index", "input_indices"],
    ),
    Pass(outline_blocks, requires=["blocks"], provides=["bodies"]),
    Pass(guard_blocks, requires=["bodies"], provides=["regions"]),
    Pass(chain_regions, requires=["regions"], provides=["spans"]),
    Pass(lower, requires=["regions", "spans"], provides=["lowered", "bodies_compiled"]),
]
check_order(PASSES)  # an order mistake fails at import, naming the pass and what it misses

__all__ = [
    "PASSES",
    "Pass",
    "PassPreconditionError",
    "analyze_inputs",
    "check_order",
    "find_blocks",
    "outline_blocks",
    "guard_blocks",
    "chain_regions",
    "lower",
    "run_passes",
]
