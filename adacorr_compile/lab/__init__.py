"""adacorr_compile.lab: the tools around the compiler, apart from it.

The reference models and their weights (:mod:`~adacorr_compile.lab.reference`), the samplers
(:mod:`~adacorr_compile.lab.sampling`), the tiny random-weight model families the tests and
``adacorr inspect`` use (:mod:`~adacorr_compile.lab.tiny`), the measurement harness
(:mod:`~adacorr_compile.lab.bench`, :mod:`~adacorr_compile.lab.methods`,
:mod:`~adacorr_compile.lab.peer_caches`, :mod:`~adacorr_compile.lab.metrics`,
:mod:`~adacorr_compile.lab.plots`; the head-to-head rounds of ``benchmarks/peers.py`` and
``benchmarks/front.py``, :mod:`~adacorr_compile.lab.rounds`, and the fronts' comparison,
:mod:`~adacorr_compile.lab.fronts`), the reference workloads of ``adacorr calibrate``
(:mod:`~adacorr_compile.lab.workloads`) and ``adacorr demo`` (:mod:`~adacorr_compile.lab.demo`).

They need the ``lab`` extra (``pip install "adacorr_compile[lab]"``: diffusers, safetensors,
numpy, tqdm, matplotlib, scikit-image); the compiler itself needs torch alone. Nothing outside
this package imports it at module level, and this ``__init__`` imports none of its modules:
import the one you need (``from adacorr_compile.lab import bench``). Its modules import the
compiler's modules directly (``adacorr_compile.api``, ``adacorr_compile.config``), never the
``adacorr_compile`` facade.
"""

