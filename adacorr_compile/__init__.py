"""adacorr_compile: a torch.compile backend that caches Diffusion Transformer blocks.

``torch.compile(model, backend="adacorr")`` rewrites each Transformer block into a
cache-guarded region implementing AdaCorrection (arXiv 2602.13357).
"""

from .api import cache_context, generation, regions, release, request_stats, requests, reset, stats
from .calibrate import calibrate, load_options
from .report import report
from .backend import adacorr_backend
from .config import AdaCorrConfig

__all__ = ["AdaCorrConfig", "adacorr_backend", "cache_context", "calibrate", "generation", "load_options", "regions", "release",
           "report", "request_stats", "requests", "reset", "stats"]
__version__ = "0.1.0"
