"""calibrate: the backend setting for *your* model and *your* quality target.

The default ``reuse_threshold`` was chosen on the two reference models; on another model
lambda has another scale and the default may skip nothing (or too much). :func:`calibrate`
measures instead of guessing::

    import adacorr_compile
    from adacorr_compile.calibrate import pipeline_workload

    work = pipeline_workload(pipe, prompt_embeds=..., num_inference_steps=30)
    result = adacorr_compile.calibrate(*work, target_psnr=30, out="calib.json")
    fast = torch.compile(pipe.transformer, backend="adacorr", options=result.options)
    # later, elsewhere: options=adacorr_compile.load_options("calib.json")

What it does, in one process:

1. **uncached reference**: one generation per seed with the *uncached* model: plain
   ``torch.compile(model)`` (Inductor; the model itself when the options say
   ``lowering="eager"``), the speed reference the benchmark uses too. With caching off the
   backend returns the same outputs (float32 round-off), so these are the outputs a cached
   setting is compared with.
2. **sweep**: every setting (each threshold, times each ``variants`` entry) runs one
   generation per seed on the model compiled with the adacorr backend. Settings that differ
   only in decision fields (:data:`RUNTIME_FIELDS`: ``reuse_threshold``, the guards,
   ``forecast``, ...) share one compiled model: the backend reads its options when it
   compiles, so :func:`_swap_config` replaces the config its guarded regions read at run time
   (no recompile; the sweep runs under ``torch.compiler.set_stance("fail_on_recompile")``).
   Options that shape the compiled graph (``scope``, ``policy``, ``correction``, ``blend``,
   ``decision``, ``score``, ``gamma``, ``lowering``, ...) get one compile per distinct set.
3. **measure**, per setting: the fraction of block evaluations skipped
   (``adacorr_compile.stats(compiled)["totals"]``), PSNR and SSIM of each seed's outputs
   against the uncached ones (mean over the seed's images; then mean over seeds and worst
   seed), and the wall-clock ratio uncached / cached timed **interleaved**: each cached
   generation right after an uncached one of the same seed, so that machine load lands on
   both sides; the median of these per-pair ratios and their min-max spread are reported.
4. **choose**: among the settings whose PSNR (``rule="mean"``: mean over seeds; ``"worst"``:
   the worst seed) is at least ``target_psnr``, the one that skips most (ties: the higher
   PSNR); or, given ``target_speed`` instead, among the settings whose speed is at least
   ``target_speed``, the one with the highest PSNR by ``rule`` (ties: the faster). The speed is
   measured (step 3); ``speed_measure="fitted"`` (the default) reads it from one cost model fitted
   to every timed pair of the sweep (:func:`fitted_speeds`: a generation's time is linear in the
   share of blocks it computes), ``"median"`` takes each setting's own median; with a few pairs
   per setting on a loaded machine the median of one setting moves by 20-40%, the fit pools all. If none meets
   the target, the result is caching off (``{"policy": "never"}``, ``result.met`` False, a
   warning): a safe setting, never a silent miss.
5. **write** (``out=...``): a JSON file (the chosen options, target, rule, the whole table,
   the command and environment; :func:`load_options` reads it back) and a Pareto plot PNG
   beside it (blocks skipped vs PSNR, speedup vs PSNR; the chosen point marked).

A *workload* is ``(run, model, value_range)``: ``run(compiled_model, seed) -> tensor`` runs one
whole generation with the compiled model it is given (images or latents out), ``model`` is the
module to compile (a pipeline's transformer), ``value_range`` the outputs' nominal range for
PSNR (None: each seed's uncached output's min..max). :func:`pipeline_workload` and
:func:`factory_workload` build one; the reference models' workloads are the lab's
(:func:`adacorr_compile.lab.workloads.reference_workload`).

Imports need torch alone; scoring (PSNR / SSIM with scikit-image, :mod:`adacorr_compile.lab.metrics`)
and the plot (:mod:`adacorr_compile.lab.plots`) need the ``lab`` extra, checked before any work.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import statistics
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, NamedTuple, Sequence

import torch

from .api import reset as reset_model, stats as model_stats
from .calibration_file import FORMAT, load_options, write
from .config import AdaCorrConfig
from .extras import require_lab

logger = logging.getLogger("adacorr_compile")

DEFAULT_THRESHOLDS = (0.04, 0.06, 0.08, 0.1, 0.12, 0.15, 0.2, 0.3)
RULES = ("mean", "worst")
SPEED_MEASURES = ("fitted", "median")
SPEED_KEYS = {"fitted": "speed_fitted", "median": "speedup"}  # the table column each speed measure reads

# Options the guarded regions read from their config at every call (policies.py, region.py):
# changing them on a compiled model changes its decisions and nothing it compiled. The others
# shape what the backend compiled (the passes read scope, decision, blend, correction and policy
# to chain regions; score, spatial_weight and gamma are baked into the fused OEM kernels; lowering,
# inductor_mode, timestep_arg, min_blocks are compile-time) and need a compile of their own.
RUNTIME_FIELDS = frozenset({
    "reuse_threshold", "warmup_steps", "max_consecutive_reuses", "late_phase", "late_threshold_factor",
    "late_extra_reuses", "final_steps", "forecast", "forecast_max_change",
    "probe_forecast", "interval", "first_block_threshold",
})
# The front grid: our settings measured on the quality/speed front of the three reference models
# (benchmarks/front.py, benchmarks/results/front_*.md), from the default (about 2x) to the most
# aggressive (about 3.5x on the reference DiT), each a label and its options. Every option but the
# first_block entries' ``policy`` is a RUNTIME_FIELDS one, so the whole grid runs on two compiles.
# ``adacorr calibrate --target-speed X`` sweeps it (``--front``) and keeps the best PSNR among the
# settings at least X fast: calibration picks from the front. The comments say where an entry leads.
FIRST_BLOCK_RULE = {"policy": "first_block", "reuse_threshold": 1.0, "max_consecutive_reuses": 1000, "late_phase": None,
                    "final_steps": 0}
FRONT_SETTINGS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("default (thr=0.08, cap=3)", {}),
    ("late cap +3", {"late_extra_reuses": 3}),  # Flux, SD3 at 2x
    ("thr=0.12, cap=4", {"reuse_threshold": 0.12, "max_consecutive_reuses": 4}),
    ("thr=0.15, cap=4", {"reuse_threshold": 0.15, "max_consecutive_reuses": 4}),
    ("thr=0.12, late cap +4", {"reuse_threshold": 0.12, "late_extra_reuses": 4}),
    ("thr=0.12, cap=6", {"reuse_threshold": 0.12, "max_consecutive_reuses": 6}),  # DiT at 2.5x
    ("thr=0.2, cap=4, late cap +4", {"reuse_threshold": 0.2, "max_consecutive_reuses": 4, "late_extra_reuses": 4}),
    # one threshold throughout, no forced last compute: Flux and SD3 at about 68% skipped
    ("thr=0.2, cap=6, late_phase=None, final_steps=0",
     {"reuse_threshold": 0.2, "max_consecutive_reuses": 6, "late_phase": None, "final_steps": 0}),
    ("thr=0.22, cap=6, late_phase=None, final_steps=0",
     {"reuse_threshold": 0.22, "max_consecutive_reuses": 6, "late_phase": None, "final_steps": 0}),
    ("thr=0.25, cap=6", {"reuse_threshold": 0.25, "max_consecutive_reuses": 6}),
    ("thr=0.25, cap=8", {"reuse_threshold": 0.25, "max_consecutive_reuses": 8}),  # SD3 at 70%
    ("thr=0.4, cap=8", {"reuse_threshold": 0.4, "max_consecutive_reuses": 8}),  # DiT, Flux at 3x
    ("thr=0.4, cap=8, final_steps=0", {"reuse_threshold": 0.4, "max_consecutive_reuses": 8, "final_steps": 0}),
    ("thr=0.4, cap=12, final_steps=0", {"reuse_threshold": 0.4, "max_consecutive_reuses": 12, "final_steps": 0}),
    ("thr=0.25, cap=16, final_steps=0", {"reuse_threshold": 0.25, "max_consecutive_reuses": 16, "final_steps": 0}),
    ("thr=1.0, cap=16", {"reuse_threshold": 1.0, "max_consecutive_reuses": 16}),
    ("thr=1.0, cap=16, final_steps=0", {"reuse_threshold": 1.0, "max_consecutive_reuses": 16, "final_steps": 0}),
    # FBCache's decision rule (the first block's relative L1 change) in our runtime, with our forecast and no cap:
    # where its schedule places the computes better than our probe's (benchmarks/results/README.md, "Quality/speed
    # front": our runtime given the peer's compute steps reproduces the peer); SD3 at 2x, Flux at 3x
    ("first_block 0.12", FIRST_BLOCK_RULE | {"first_block_threshold": 0.12}),
    ("first_block 0.35", FIRST_BLOCK_RULE | {"first_block_threshold": 0.35}),
)


def front_variants() -> list[dict[str, Any]]:
    """:data:`FRONT_SETTINGS` as :func:`calibrate`'s ``variants`` (each sets its own threshold:
    one setting each; the default's threshold written out)."""
    default = AdaCorrConfig().reuse_threshold
    return [{"reuse_threshold": default, **options} for _, options in FRONT_SETTINGS]


# options kept when the result falls back to caching off (how to compile, not what to decide)
_COMPILE_FIELDS = ("lowering", "inductor_mode", "timestep_arg", "min_blocks")

Run = Callable[[Any, int], torch.Tensor]


class Workload(NamedTuple):
    """What :func:`calibrate` samples: ``calibrate(*workload, target_psnr=...)``."""

    run: Run  # run(compiled_model, seed) -> output tensor of one whole generation
    model: torch.nn.Module  # the module to compile (its blocks are the ones cached)
    value_range: tuple[float, float] | None = None  # nominal range of the outputs (None: from the uncached outputs)


# ---------------------------------------------------------------------------- workloads
def _as_float_tensor(out: Any) -> torch.Tensor:
    """A pipeline's or a model's output as a float tensor on the CPU: ``.images`` /
    ``.frames`` / ``.sample`` / the first element; numpy images ``[N, H, W, C]`` and lists of PIL
    images become ``[N, C, H, W]``."""
    for name in ("images", "frames", "sample"):
        if hasattr(out, name):
            out = getattr(out, name)
            break
    else:
        if isinstance(out, (tuple, list)) and out and not hasattr(out[0], "getpixel"):
            out = out[0]
    np = sys.modules.get("numpy")  # outputs can be numpy arrays only where numpy is installed (and imported)
    if isinstance(out, list) and out and hasattr(out[0], "getpixel"):  # PIL images (PIL needs numpy)
        import numpy as np

        out = np.stack([np.asarray(im, dtype=np.float32) / 255.0 for im in out])
    if np is not None and isinstance(out, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(out)).float()
        if t.dim() == 4 and t.shape[-1] in (1, 3, 4) and t.shape[1] not in (1, 3, 4):
            t = t.permute(0, 3, 1, 2)
        elif t.dim() == 3 and t.shape[-1] not in (1, 3, 4):  # [N, H, W] grey
            t = t[:, None]
        return t.contiguous()
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"calibrate: the generation returned {type(out).__name__}; expected a tensor, numpy array or images")
    return out.detach().float().cpu()


def output_tensor(out: Any) -> torch.Tensor:
    """A model call's output as a tensor: ``.sample``, else the first element, else itself."""
    if hasattr(out, "sample"):
        return out.sample
    if isinstance(out, (tuple, list)):
        return out[0]
    return out


def pipeline_workload(pipe: Any, output_type: str = "latent", generator_device: str = "cpu", **call_kwargs: Any) -> Workload:
    """A diffusers pipeline and the keyword arguments of one call: each generation sets
    ``pipe.transformer`` to the compiled model for the call (then puts the original back),
    passes ``generator=torch.Generator(generator_device).manual_seed(seed)`` and
    ``output_type`` (``"latent"``: compare latents, the cheapest; ``"pt"`` / ``"np"``: decoded
    images, range [0, 1]; a pipeline that always decodes, such as ``DiTPipeline``, returns
    images whatever it is told), and returns the output as a float tensor."""
    for key in ("generator", "output_type"):
        if key in call_kwargs:
            raise ValueError(f"pipeline_workload: {key!r} is set per generation by calibrate; leave it out of the call kwargs")
    model = pipe.transformer

    def run(compiled: Any, seed: int) -> torch.Tensor:
        original = pipe.transformer
        pipe.transformer = compiled
        try:
            out = pipe(**call_kwargs, generator=torch.Generator(generator_device).manual_seed(int(seed)), output_type=output_type)
        finally:
            pipe.transformer = original
        return _as_float_tensor(out)

    value_range = (0.0, 1.0) if output_type in ("pt", "np", "pil") else None
    return Workload(run, model, value_range)


def factory_workload(model: torch.nn.Module, inputs: Callable[..., dict[str, Any]], steps: int = 20,
                     t_max: float = 1000.0) -> Workload:
    """A ``(model, inputs)`` factory (``adacorr inspect --model package.module:factory``) as a
    workload: a plain loop of ``steps`` calls ``compiled(**inputs(k, t_k))`` with a falling
    timestep ``t_k = t_max * (1 - k / steps)``, after ``torch.manual_seed(seed)`` (factories that
    draw from torch's generator vary with the seed; ``inputs`` that are fixed give the same
    inputs for every seed). There is no sampler: the outputs do not feed back into the inputs.
    The result is every step's output (``.sample`` or the first element), concatenated along the
    batch axis (``[steps * B, ...]``): each step's outputs count as images. A real sampling loop
    (:func:`pipeline_workload`, or your own ``run``) measures what you will see; this one shows
    how the model's lambda behaves on the given inputs."""
    @torch.no_grad()
    def run(compiled: Any, seed: int) -> torch.Tensor:
        torch.manual_seed(int(seed))
        outs = []
        for k in range(steps):
            t = t_max * (1.0 - k / steps)
            outs.append(output_tensor(compiled(**inputs(k, t))).detach().float().cpu())
        return torch.cat(outs)

    return Workload(run, model, None)


# ------------------------------------------------------------------- the config swap
def _swap_config(compiled: Any, changes: Mapping[str, Any]) -> dict[int, tuple[Any, Any]]:
    """Give the guarded regions of ``compiled`` (every graph it compiled) a config with
    ``changes`` applied (``AdaCorrConfig.replace``: validated), and its model state too;
    returns what was there, for :func:`_restore_config`.

    Internal, for calibration: only :data:`RUNTIME_FIELDS` are accepted (a ``ValueError``
    names any other: it shapes the compiled graph and needs ``torch.compile`` with that option).
    The regions read ``region.config`` (and their shared ``region.math.config``) at every call,
    so the next call decides with the new values. Dynamo shares one compiled graph between
    ``torch.compile`` calls with equal options: a model compiled elsewhere with the same options
    sees the change until it is restored. Call ``adacorr_compile.reset(compiled)`` before the
    next generation (caches were filled under the old values)."""
    from .api import _model_state

    bad = sorted(set(changes) - RUNTIME_FIELDS)
    if bad:
        raise ValueError(
            f"calibrate: option(s) {', '.join(map(repr, bad))} shape the compiled graph and cannot be changed on a "
            f"compiled model; only {', '.join(sorted(RUNTIME_FIELDS))} can (give the others to calibrate's "
            "variants: each distinct set is compiled once)"
        )
    state = _model_state(compiled)
    if not state.graphs:
        raise ValueError("calibrate: the model has not compiled yet (run one generation first)")
    holders: dict[int, Any] = {id(state): state}  # each object once (one RegionMath serves a graph's regions)
    for graph in state.graphs:
        for region in graph.regions:
            holders.setdefault(id(region), region)
            holders.setdefault(id(region.math), region.math)
    saved = {key: (obj, obj.config) for key, obj in holders.items()}
    for obj, cfg in saved.values():
        obj.config = cfg.replace(**changes)
    return saved


def _restore_config(saved: Mapping[int, tuple[Any, Any]]) -> None:
    for obj, cfg in saved.values():
        obj.config = cfg


@contextmanager
def swapped_config(compiled: Any, changes: Mapping[str, Any]) -> Iterator[None]:
    """``with swapped_config(compiled, {"reuse_threshold": 0.1}):`` the compiled model decides
    with these values inside the block (see :func:`_swap_config`), as before after it."""
    saved = _swap_config(compiled, changes)
    try:
        yield
    finally:
        _restore_config(saved)


# ----------------------------------------------------------------------------- result
@dataclass
class CalibrationResult:
    """What :func:`calibrate` measured and chose.

    ``options``: the backend options to compile with (the base options plus the chosen
    setting; caching off where no setting met the target). ``table``: one row per setting
    (a dict: ``setting``, ``options``, ``skipped``, ``psnr_mean``, ``psnr_worst_seed``,
    ``psnr_worst_image``, ``ssim_mean``, ``ssim_worst_seed``, ``speedup`` (median of the
    per-pair ratios uncached / cached), ``speedup_min``, ``speedup_max``, ``seconds_cached``,
    ``seconds_uncached``, ``mean_lambda``, ``meets``, and the per-seed values). ``chosen``: the
    chosen row (None: none met). ``target_speed``: the speed target when the choice was by
    speed (:func:`choose_at_speed`; ``target_psnr`` is then not a target), else None;
    ``speed_measure``: which speed it was compared with (``"fitted"``: each row's
    ``speed_fitted``, ``"median"``: its ``speedup``).
    ``compiles_in_sweep``: graphs Dynamo compiled during the sweep (0: the sweep ran under
    ``fail_on_recompile``)."""

    options: dict[str, Any]
    table: list[dict[str, Any]]
    chosen: dict[str, Any] | None
    target_psnr: float
    rule: str
    met: bool
    seeds: list[int]
    uncached: str
    base_options: dict[str, Any] = field(default_factory=dict)
    compiles_in_sweep: int = 0
    seconds: float = 0.0
    paths: dict[str, str] = field(default_factory=dict)
    target_speed: float | None = None
    speed_measure: str = "fitted"

    @property
    def target(self) -> str:
        """The target in words: ``"PSNR mean >= 30 dB"`` or ``"speed >= 2.5x (fitted), ..."``."""
        if self.target_speed is not None:
            return f"speed >= {self.target_speed:g}x ({self.speed_measure}), highest PSNR {self.rule}"
        return f"PSNR {self.rule} >= {self.target_psnr:g} dB"

    def format_table(self) -> str:
        """The table as text (what ``adacorr calibrate`` prints)."""
        width = max([len("setting")] + [len(r["setting"]) for r in self.table]) + 1
        header = (f" {'setting':<{width}} {'skipped':>8} {'PSNR mean':>10} {'worst seed':>10} {'worst img':>9} "
                  f"{'SSIM':>6} {'speedup (min-max)':>18} {'fitted':>7} {'lambda':>7}  meets {self.target}")
        lines = [header, "-" * len(header)]
        for row in self.table:
            mark = "*" if self.chosen is not None and row["setting"] == self.chosen["setting"] else " "
            speed = f"{row['speedup']:.2f}x ({row['speedup_min']:.2f}-{row['speedup_max']:.2f})"
            lam = "n/a" if row["mean_lambda"] is None else f"{row['mean_lambda']:.3f}"
            lines.append(
                f"{mark}{row['setting']:<{width}} {row['skipped']:>8.1%} {_db(row['psnr_mean']):>10} "
                f"{_db(row['psnr_worst_seed']):>10} {_db(row['psnr_worst_image']):>9} {row['ssim_mean']:>6.3f} "
                f"{speed:>18} {row.get('speed_fitted', row['speedup']):>6.2f}x {lam:>7}  {'yes' if row['meets'] else 'no'}"
            )
        lines.append("(* chosen; speedup: the setting's median of its pairs; fitted: from one cost model fitted to every "
                     "pair of the table; lambda: mean over steps of the measured lambda; PSNR/SSIM against the uncached "
                     "outputs)")
        return "\n".join(lines)


def _db(x: float) -> str:
    return "exact" if x == math.inf else f"{x:.2f}"


# -------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class _Setting:
    label: str
    structural: tuple[tuple[str, Any], ...]  # options of the compile it runs on (besides the base)
    runtime: tuple[tuple[str, Any], ...]  # options swapped in at run time

    @property
    def options(self) -> dict[str, Any]:
        return {**dict(self.structural), **dict(self.runtime)}


def _settings(base: Mapping[str, Any], thresholds: Sequence[float], variants: Sequence[Mapping[str, Any]]) -> list[_Setting]:
    out: list[_Setting] = []
    for variant in variants:
        structural = tuple(sorted((k, v) for k, v in variant.items() if k not in RUNTIME_FIELDS))
        runtime = {k: v for k, v in variant.items() if k in RUNTIME_FIELDS}
        values = [runtime["reuse_threshold"]] if "reuse_threshold" in runtime else list(thresholds)
        for thr in values:
            rt = {**runtime, "reuse_threshold": thr}
            AdaCorrConfig.from_options({**base, **dict(structural), **rt})  # a bad option fails before any work
            label = ", ".join(f"{k}={v}" for k, v in [*structural, *sorted(rt.items())] if k != "reuse_threshold")
            label = f"thr={thr:g}" + (f", {label}" if label else "")
            out.append(_Setting(label, structural, tuple(sorted(rt.items()))))
    labels = [s.label for s in out]
    repeated = sorted({x for x in labels if labels.count(x) > 1})
    if repeated:
        raise ValueError(f"calibrate: setting(s) {', '.join(repeated)} given twice (repeated thresholds or variants)")
    return out


def _uncached_model(model: torch.nn.Module, base: Mapping[str, Any]) -> tuple[Any, str]:
    cfg = AdaCorrConfig.from_options(base)
    if cfg.lowering == "eager":
        return model, "the eager model (lowering='eager')"
    mode = None if cfg.inductor_mode == "default" else cfg.inductor_mode
    return torch.compile(model, mode=mode), "plain torch.compile (Inductor)" + (f", mode={mode}" if mode else "")


def _unique_graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _mean_lambda(stats: Mapping[str, Any]) -> float | None:
    import numpy as np

    values = [r["mean_lambda"] for r in stats["regions"] if r.get("mean_lambda") is not None]
    return float(np.mean(values)) if values else None


# ---------------------------------------------------------------------------- calibrate
def calibrate(
    run: Run,
    model: torch.nn.Module,
    value_range: tuple[float, float] | None = None,
    *,
    target_psnr: float = 30.0,
    target_speed: float | None = None,
    speed_measure: str = "fitted",
    rule: str = "mean",
    seeds: Sequence[int] = (0, 1),
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    variants: Sequence[Mapping[str, Any]] = ({},),
    options: Mapping[str, Any] | None = None,
    reps: int = 1,
    out: str | Path | None = None,
    plot: bool = True,
    progress: bool = True,
    command: str | None = None,
) -> CalibrationResult:
    """Measure settings of the adacorr backend on ``model`` with ``run`` and pick the one that
    skips most while meeting ``target_psnr``, or (``target_speed`` given: ``target_psnr`` is then
    ignored) the one with the highest PSNR among those at least ``target_speed`` fast by
    ``speed_measure`` (``"fitted"`` or ``"median"``, see the module docstring).

    ``run(compiled_model, seed)``: one whole generation with the compiled model it is given,
    returning its outputs (a tensor; images or latents). ``model``: the module to compile.
    ``value_range``: the outputs' nominal range for PSNR (images in [-1, 1]: ``(-1, 1)``; None:
    each seed's uncached output's min..max). ``rule``: ``"mean"`` (mean over seeds of each
    seed's mean PSNR) or ``"worst"`` (the worst seed's). ``thresholds``: the ``reuse_threshold``
    values swept; ``variants``: option sets each threshold is tried with (``[{}, {"forecast":
    "none"}, {"policy": "interval", "interval": 3, "reuse_threshold": 1.0}]``; one that sets
    ``reuse_threshold`` is one setting); ``options``: base options of every compile (e.g.
    ``{"lowering": "eager"}``). ``reps``: timed (uncached, cached) pairs per seed and setting.
    ``out``: JSON path (the plot goes beside it, ``.png``), None writes nothing.
    ``command``: recorded in the JSON (default: ``sys.argv``).
    """
    seeds = _checked_seeds(target_psnr, rule, seeds, reps)
    _check_target_speed(target_speed)
    if speed_measure not in SPEED_MEASURES:
        raise ValueError(f"calibrate: speed_measure got {speed_measure!r}; expected one of {', '.join(SPEED_MEASURES)}")
    base = dict(options or {})
    AdaCorrConfig.from_options(base)
    settings = _settings(base, thresholds, variants)
    if not settings:
        raise ValueError("calibrate: nothing to sweep (no thresholds)")
    require_lab("calibrate (it scores the outputs: PSNR and SSIM with scikit-image)", ("numpy", "skimage"))
    if out is not None and plot:
        require_lab("calibrate's plot (plot=False writes the JSON alone)", ("matplotlib",))
    t_start = time.perf_counter()

    uncached, uncached_name = _uncached_model(model, base)
    logger.info("calibrate: %d settings x %d seeds; uncached reference: %s", len(settings), len(seeds), uncached_name)
    reference = _reference_outputs(run, uncached, seeds)
    rows, compiles = _sweep(run, model, uncached, base, settings, seeds, reps, reference, value_range, progress)
    table = [rows[s.label] for s in settings]
    for row, speed in zip(table, fitted_speeds(table)):
        row["speed_fitted"] = speed
    chosen, chosen_options = _choice(table, base, target_psnr, rule, target_speed, speed_measure)
    result = CalibrationResult(
        options=chosen_options, table=table, chosen=chosen, target_psnr=float(target_psnr), rule=rule,
        met=chosen is not None, seeds=seeds, uncached=uncached_name, base_options=base, compiles_in_sweep=compiles,
        seconds=time.perf_counter() - t_start, target_speed=None if target_speed is None else float(target_speed),
        speed_measure=speed_measure,
    )
    if out is not None:
        write(result, out, command=command, plot=plot)
    return result


def _checked_seeds(target_psnr: float, rule: str, seeds: Sequence[int], reps: int) -> list[int]:
    """The seeds as distinct ints; a bad rule, target, seed list or ``reps`` is a ``ValueError``."""
    if rule not in RULES:
        raise ValueError(f"calibrate: rule got {rule!r}; expected one of {', '.join(RULES)}")
    if not (isinstance(target_psnr, (int, float)) and math.isfinite(target_psnr)):
        raise ValueError(f"calibrate: target_psnr got {target_psnr!r}; expected a finite number (dB)")
    seeds = [int(s) for s in seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"calibrate: seeds got {seeds!r}; expected distinct ints")
    if reps < 1:
        raise ValueError(f"calibrate: reps got {reps!r}; expected an int >= 1")
    return seeds


def _check_target_speed(target_speed: float | None) -> None:
    """A ``ValueError`` for a speed target that is not a finite number above 1 (None: no speed target)."""
    if target_speed is None:
        return
    if isinstance(target_speed, bool) or not isinstance(target_speed, (int, float)) or not math.isfinite(target_speed) \
            or target_speed <= 1:
        raise ValueError(f"calibrate: target_speed got {target_speed!r}; expected a number > 1 (times faster than "
                         "uncached)")


def _reference_outputs(run: Run, uncached: Any, seeds: Sequence[int]) -> dict[int, torch.Tensor]:
    """One generation per seed with the uncached model (the first call compiles it), as float on the CPU."""
    with torch.no_grad():
        reference = {seed: run(uncached, seed) for seed in seeds}
    for seed, ref in reference.items():
        if not isinstance(ref, torch.Tensor):
            raise TypeError(f"calibrate: run(model, {seed}) returned {type(ref).__name__}; expected a tensor")
        reference[seed] = ref.detach().float().cpu()
    return reference


def _sweep(run: Run, model: torch.nn.Module, uncached: Any, base: Mapping[str, Any], settings: Sequence[_Setting],
           seeds: Sequence[int], reps: int, reference: Mapping[int, torch.Tensor],
           value_range: tuple[float, float] | None, progress: bool) -> tuple[dict[str, dict[str, Any]], int]:
    """Measure every setting: one compile per distinct set of graph-shaping options, the settings
    of a compile swapped in at run time (no recompile). Returns the rows by setting label and the
    graphs Dynamo compiled during the sweep."""
    groups: dict[tuple[tuple[str, Any], ...], list[_Setting]] = {}
    for s in settings:
        groups.setdefault(s.structural, []).append(s)
    rows: dict[str, dict[str, Any]] = {}
    compiles = 0
    bar = _progress_bar(len(settings) * len(seeds), progress)
    try:
        for structural, members in groups.items():
            group_options = {**base, **dict(structural)}
            compiled = torch.compile(model, backend="adacorr", options=group_options)
            _warm_up(run, compiled, members, seeds[0], group_options)
            before = _unique_graphs()
            with torch.compiler.set_stance("fail_on_recompile"):
                for setting in members:
                    with swapped_config(compiled, dict(setting.runtime)):
                        rows[setting.label] = _measure(run, uncached, compiled, setting, seeds, reps, reference,
                                                       value_range, bar)
            compiles += _unique_graphs() - before
    finally:
        bar.close()
    return rows, compiles


def _choice(table: Sequence[dict[str, Any]], base: Mapping[str, Any], target_psnr: float,
            rule: str, target_speed: float | None = None,
            speed_measure: str = "fitted") -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """(the chosen row or None, the options to compile with): the base options plus the chosen
    setting, or caching off (``policy="never"``, the base's compile options kept) with a warning."""
    by_speed = target_speed is not None
    chosen = choose_at_speed(table, target_speed, rule, speed_measure) if by_speed else choose(table, target_psnr, rule)
    key = SPEED_KEYS[speed_measure]
    if chosen is not None:
        chosen_options = {**base, **chosen["options"]}
        logger.info("calibrate: chose %s: %.1f%% skipped, PSNR %s (%s), %.2fx (%s)", chosen["setting"],
                    100 * chosen["skipped"], _db(psnr_by_rule(chosen, rule)), rule, chosen[key], speed_measure)
    else:
        chosen_options = {**{k: v for k, v in base.items() if k in _COMPILE_FIELDS}, "policy": "never"}
        missed = (f"a speed >= {target_speed:g}x ({speed_measure}; fastest: {max(r[key] for r in table):.2f}x)" if by_speed
                  else f"PSNR {rule} >= {target_psnr:g} dB (best: {_db(max(psnr_by_rule(r, rule) for r in table))} dB)")
        logger.warning("calibrate: no setting reached %s; the result is caching off (policy='never'): try %s", missed,
                       "higher thresholds or caps" if by_speed else "lower thresholds or another variant")
    AdaCorrConfig.from_options(chosen_options)
    return chosen, chosen_options


def choose(table: Sequence[dict[str, Any]], target_psnr: float, rule: str = "mean") -> dict[str, Any] | None:
    """Set each row's ``"meets"`` (its PSNR by ``rule`` >= ``target_psnr``) and return the row
    that skips most among those that meet it (ties: the higher PSNR), or None if none does."""
    if rule not in RULES:
        raise ValueError(f"calibrate: rule got {rule!r}; expected one of {', '.join(RULES)}")
    for row in table:
        row["meets"] = psnr_by_rule(row, rule) >= target_psnr
    meeting = [r for r in table if r["meets"]]
    return max(meeting, key=lambda r: (r["skipped"], psnr_by_rule(r, rule))) if meeting else None


def choose_at_speed(table: Sequence[dict[str, Any]], target_speed: float, rule: str = "mean",
                    speed_measure: str = "fitted") -> dict[str, Any] | None:
    """Set each row's ``"meets"`` (its speed >= ``target_speed``: ``speed_fitted`` for
    ``speed_measure="fitted"``, see :func:`fitted_speeds`; ``speedup``, the median of its own
    interleaved pairs' ratios uncached / cached, for ``"median"``) and return the row with the
    highest PSNR by ``rule`` among those that meet it (ties: the faster), or None if none does."""
    if rule not in RULES:
        raise ValueError(f"calibrate: rule got {rule!r}; expected one of {', '.join(RULES)}")
    if speed_measure not in SPEED_MEASURES:
        raise ValueError(f"calibrate: speed_measure got {speed_measure!r}; expected one of {', '.join(SPEED_MEASURES)}")
    _check_target_speed(target_speed)
    key = SPEED_KEYS[speed_measure]
    for row in table:
        row["meets"] = row[key] >= target_speed
    meeting = [r for r in table if r["meets"]]
    return max(meeting, key=lambda r: (psnr_by_rule(r, rule), r[key])) if meeting else None


def fitted_speeds(table: Sequence[Mapping[str, Any]]) -> list[float]:
    """Each row's speed over the uncached model from one cost model fitted to all the table's
    timed pairs: a cached generation's time over the uncached one's is ``a + b * c``, ``c`` the
    share of block evaluations it computed (``1 - skipped``: the blocks computed cost ``b``, the
    sampler, the guards and the reuses ``a``). Theil-Sen (the median of the slopes between every
    two pairs, then the median intercept): a pair that load slowed moves it little. Where the
    table cannot carry a fit (one computed share only, or a fit that predicts a time <= 0) each
    row keeps its own median (``speedup``), logged."""
    points = [(1.0 - row["skipped"], 1.0 / s) for row in table for s in (row.get("speedup_pairs") or [row["speedup"]])]
    slopes = [(y2 - y1) / (x2 - x1) for i, (x1, y1) in enumerate(points) for x2, y2 in points[i + 1:]
              if abs(x2 - x1) > 1e-9]
    if slopes:
        b = statistics.median(slopes)
        a = statistics.median(y - b * x for x, y in points)
        ratios = [a + b * (1.0 - row["skipped"]) for row in table]
        if min(ratios) > 0:
            return [1.0 / r for r in ratios]
    logger.info("calibrate: the timed pairs carry no cost model (one computed share, or a fit <= 0): each setting's "
                "fitted speed is its own median")
    return [float(row["speedup"]) for row in table]


class _NoBar:
    """The progress bar where none is shown (``progress=False``, or tqdm not installed)."""

    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(total: int, enabled: bool) -> Any:
    """tqdm's bar (the lab extra) where it is wanted and installed, else one that shows nothing."""
    if not enabled or importlib.util.find_spec("tqdm") is None:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="calibrate", unit="gen", leave=False)


def psnr_by_rule(row: Mapping[str, Any], rule: str) -> float:
    """A table row's PSNR by ``rule``: the mean over seeds (``"mean"``) or the worst seed's."""
    return row["psnr_mean"] if rule == "mean" else row["psnr_worst_seed"]


def _warm_up(run: Run, compiled: Any, members: Sequence[_Setting], seed: int, options: Mapping[str, Any]) -> None:
    """One untimed generation that compiles the model (Dynamo, and the regions' fused kernels of
    both the compute and the reuse path: at the group's largest threshold), then checks that
    the backend guarded the blocks."""
    permissive = max(members, key=lambda s: dict(s.runtime)["reuse_threshold"])
    t0 = time.perf_counter()
    with torch.no_grad():
        run(compiled, seed)  # compiles: the config the regions get is the compile's
        with swapped_config(compiled, dict(permissive.runtime)):
            reset_model(compiled)
            run(compiled, seed)
    stats = model_stats(compiled)
    if not stats["totals"]["regions"]:
        raise RuntimeError(f"calibrate: the model compiled with options {dict(options)} has no guarded regions: "
                           f"nothing to calibrate ({'; '.join(stats['fallbacks']) or 'no repeated blocks found'})")
    if stats["fallbacks"]:
        logger.warning("calibrate: %s", "; ".join(stats["fallbacks"]))
    logger.info("calibrate: compiled %s with %d guarded regions in %.1f s", dict(options) or "the defaults",
                stats["totals"]["regions"], time.perf_counter() - t0)


def _measure(run: Run, uncached: Any, compiled: Any, setting: _Setting, seeds: Sequence[int], reps: int,
             reference: Mapping[int, torch.Tensor], value_range: tuple[float, float] | None, bar: Any) -> dict[str, Any]:
    """One setting: per seed, ``reps`` timed pairs (uncached, then cached with a reset before);
    the first cached generation of each seed gives its outputs and counts."""
    import numpy as np

    from .lab.metrics import seed_scores

    per_seed = []
    ratios, t_cached, t_uncached = [], [], []
    for seed in seeds:
        entry: dict[str, Any] = {"seed": seed}
        for rep in range(reps):
            with torch.no_grad():
                t0 = time.perf_counter()
                run(uncached, seed)
                t1 = time.perf_counter()
                reset_model(compiled)
                t2 = time.perf_counter()
                output = run(compiled, seed)
                t3 = time.perf_counter()
            t_uncached.append(t1 - t0)
            t_cached.append(t3 - t2)
            ratios.append((t1 - t0) / (t3 - t2))
            if rep == 0:
                stats = model_stats(compiled)
                totals = stats["totals"]
                entry["skipped"] = totals["reuses"] / totals["calls"] if totals["calls"] else 0.0
                entry["mean_lambda"] = _mean_lambda(stats)
                entry.update(seed_scores(output.detach().float().cpu(), reference[seed], value_range))
        per_seed.append(entry)
        bar.update(1)
    lambdas = [e["mean_lambda"] for e in per_seed if e["mean_lambda"] is not None]
    ssims = [e["ssim"] for e in per_seed]
    row = {
        "setting": setting.label,
        "options": setting.options,
        "reuse_threshold": dict(setting.runtime)["reuse_threshold"],
        "skipped": float(np.mean([e["skipped"] for e in per_seed])),
        "psnr_mean": float(np.mean([e["psnr"] for e in per_seed])),
        "psnr_worst_seed": float(min(e["psnr"] for e in per_seed)),
        "psnr_worst_image": float(min(e["psnr_worst_image"] for e in per_seed)),
        "ssim_mean": float(np.mean(ssims)),
        "ssim_worst_seed": float(min(ssims)),
        "speedup": float(statistics.median(ratios)),
        "speedup_min": float(min(ratios)),
        "speedup_max": float(max(ratios)),
        "speedup_pairs": [float(r) for r in ratios],
        "seconds_cached": float(statistics.median(t_cached)),
        "seconds_uncached": float(statistics.median(t_uncached)),
        "mean_lambda": float(np.mean(lambdas)) if lambdas else None,
        "per_seed": per_seed,
    }
    logger.info("calibrate: %s: %.1f%% skipped, PSNR %s dB (worst seed %s), %.2fx (%.2f-%.2f)", setting.label,
                100 * row["skipped"], _db(row["psnr_mean"]), _db(row["psnr_worst_seed"]), row["speedup"],
                row["speedup_min"], row["speedup_max"])
    return row


__all__ = [
    "DEFAULT_THRESHOLDS", "FORMAT", "RUNTIME_FIELDS", "CalibrationResult", "Workload", "calibrate", "choose",
    "choose_at_speed", "fitted_speeds",
    "factory_workload", "load_options", "pipeline_workload", "psnr_by_rule", "swapped_config", "write",
]
