"""The backend's passes, one per file, run in the order of :data:`PASSES`.

Each pass is ``(gm, config) -> gm`` and records what it learned in
``gm.meta["adacorr"]`` (:class:`~adacorr_compile.passes.common.Analysis`). See
README.md in this folder for the invariants each pass keeps.
"""

from .chain_regions import chain_regions
from .find_blocks import find_blocks
from .guard_blocks import guard_blocks
from .lower import lower
from .outline_blocks import outline_blocks

PASSES = [find_blocks, outline_blocks, guard_blocks, chain_regions, lower]

__all__ = ["PASSES", "find_blocks", "outline_blocks", "guard_blocks", "chain_regions", "lower"]
