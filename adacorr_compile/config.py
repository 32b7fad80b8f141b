"""AdaCorrConfig: every knob of the adacorr backend, defined once, validated.

The method is AdaCorrection (Liu, Yu, Lengerich, Wu, arXiv 2602.13357): an
Offset Estimation Module (OEM) scores how far a Transformer block's input moved
since the last denoising step, an Adaptive Correction Module (ACM) turns the
score into a weight ``lambda = clip(gamma * S, 0, 1)``, and the guarded region
either reuses its offset-corrected cache or recomputes the block.

Build a config from ``torch.compile(..., options={...})`` with
:meth:`AdaCorrConfig.from_options`; an unknown key or a bad value raises a
``ValueError`` that names the key, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

SCORES = ("relative", "paper")
POLICIES = ("adacorr", "interval", "first_block", "never", "paper")
LOWERINGS = ("inductor", "eager", "tensorrt")
DRIFT_REFERENCES = ("previous", "cached")
DECISIONS = ("batch", "sample")
SCOPES = ("block", "step")
FORECASTS = ("none", "linear")
INDUCTOR_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass(frozen=True)
class AdaCorrConfig:
    """Options of the ``adacorr`` backend (``torch.compile(..., options=...)``).

    Method (paper, section "OEM" and "ACM"):

    gamma: ACM sensitivity; ``lambda = clip(gamma * S, 0, 1)``. Paper default 1.0.
    spatial_weight: weight of the spatial-variation term in the offset score
        (the paper's lambda in ``S = D_temp^2 + lambda * D_spat``). Paper default 1.0.
    score: ``"paper"`` is the paper's score exactly; ``"relative"`` is its
        scale-free variant (see :func:`adacorr_compile.oem.relative_offset_score`):
        temporal drift relative to the token norm, spatial term gated by the drift,
        so that an unchanged input scores 0 and scaling the hidden states changes
        nothing.
    drift_reference: the OEM compares the block input with the input of the
        ``"previous"`` step (paper) or with the input at the block's last fresh
        compute (``"cached"``: the drift the reused cache actually carries).

    Decision:

    policy: what decides reuse. ``"adacorr"``: reuse when lambda <=
        ``reuse_threshold``. ``"interval"``: recompute every ``interval`` steps (FORA).
        ``"first_block"``: the first region always computes; the others reuse when the
        relative change of its residual is below ``first_block_threshold`` (FBCache).
        ``"never"``: never reuse (the compiled model equals plain compilation).
        ``"paper"``: the paper's algorithm as written: every block computes at every
        step and its output is blended with the stored one by lambda (``blend=True``
        required); nothing is skipped, so nothing is saved (``preset="paper"``).
    correction: apply AdaCorrection on top of the policy. True: reuse returns the
        offset-corrected cache ``input + cached residual`` and, for ``interval`` and
        ``first_block``, a reuse is vetoed when lambda > ``reuse_threshold``.
        False: the policy alone with its own reuse rule (``interval`` and ``adacorr``
        return the cached block output as it was; ``first_block`` adds the cached
        residual, as FBCache does).
    reuse_threshold: lambda at or below which a region may reuse.
    blend: on a compute step the policy chose, return ``(1 - lambda) * corrected_cache +
        lambda * fresh`` (the paper's ACM blend) instead of the fresh output alone; a
        compute a guard forces (warm-up, final steps, reuse cap, a non-finite cache) returns
        the fresh output. Meaningless with ``policy="never"`` (rejected).
    interval: recompute period of the ``interval`` policy (steps).
    first_block_threshold: relative residual change threshold of ``first_block``.
    warmup_steps: the first steps of a generation always compute.
    max_consecutive_reuses: a region recomputes after this many reuses in a row.
    late_phase: ``(start, end)``, shares of the generation (``step / (steps - 1)``): from
        ``start`` the threshold rises linearly to ``reuse_threshold *
        late_threshold_factor``, reached at ``end``; from ``end`` on the reuse cap is
        ``max_consecutive_reuses + late_extra_reuses``. The late steps of a sampler move
        along a smoother path, where a reuse's forecast errs less for the same measured
        drift. Where the generation's length is not known (no step count, no timestep
        to extrapolate it from) every step counts as early.
        None: one threshold and one cap throughout. The default ``(0.2, 0.5)`` with factor 2 and one extra reuse is
        measured (benchmarks/results/README.md, "Late phase").
    late_threshold_factor: the threshold from ``late_phase[1]`` on, as a multiple of
        ``reuse_threshold`` (so a calibrated threshold carries it along).
    late_extra_reuses: reuses in a row added to the cap from ``late_phase[1]`` on.
    final_steps: the last steps of a generation always compute (needs the step
        count: ``generation(model, num_steps=N)``, ``reset(model, num_steps=N)``, a
        pipeline's cache context, the timesteps (evenly spaced or shifted), or the length
        of the previous generation).
    decision: ``"batch"``: one decision per region for the whole batch (a
        classifier-free-guidance pair shares it); ``"sample"``: one per sample, as a
        mask over the batch (the block still runs on the whole batch when any sample
        needs it).
    scope: ``"block"``: every region decides for itself from its own lambda (the
        paper's per-block AdaCorrection). ``"step"``: one decision per denoising step
        for all blocks, as FBCache takes it: the first region always computes, the
        second (the probe) scores the first block's fresh residual (output - input)
        with the OEM against its value when the probe last computed and decides with
        the policy (lambda, guards, correction veto); every later region follows that
        verdict without measuring anything, so the network reuses or recomputes as a
        whole and a step costs one host read. (The probe scores the first block's
        response rather than its own input: the input is dominated by the noisy latent,
        which moves little between steps, while the block's response to the timestep
        does; benchmarks/results/README.md, "Per block or per step", records the comparison.)
    forecast: what a reuse returns. ``"none"``: the cached value (output, or residual
        added to the input) as it was at the last compute. ``"linear"``: that value
        extrapolated to the current step from the last two computes of the region
        (first-order Taylor in the step index, as TaylorSeer and cache-dit's calibrator
        do): ``v + (v - v_prev) * (step - step_v) / (step_v - step_prev)``; until a region
        has computed twice in a generation it reuses as with ``"none"``.
    forecast_max_change: ``forecast="linear"`` extrapolates only from two computes between
        which the cached values changed by at most this share of their size per step
        (``||v - v_prev|| <= forecast_max_change * (step_v - step_prev) * ||v||``, see
        :func:`adacorr_compile.acm.steady`); after a faster change they are reused as
        they are until the next compute. ``float("inf")``: always extrapolate (TaylorSeer's
        rule). The default 0.1 is measured (benchmarks/results/README.md, "Forecast").
    probe_forecast: with ``scope="step"`` and ``forecast="linear"``, the probe scores the
        first block's fresh residual against the forecast of its reference (extrapolated from
        the probe's last two computes, as a reuse extrapolates the caches, under the same
        ``forecast_max_change`` gate) instead of against the reference as it was stored: the
        drift the step's reuse would actually carry. A smooth trajectory then scores near 0 and
        is reused up to ``max_consecutive_reuses``; a curved phase (the first steps of flow
        models) scores high and computes. False (the default): the drift from the stored
        reference. Ignored under ``scope="block"`` or ``forecast="none"``. Measured in
        benchmarks/results/README.md, "Forecast-aware probe": at equal skipped share it gains
        about 3 dB of mean PSNR on the reference DiT, is level on Flux and loses on SD3, so it
        is not the default.

    Several processes:

    decision_group: which ranks take one decision together (every rank of the group reuses
        or computes a block alike; ranks that meet in a block's collectives must be in one
        group, or the one that computes waits forever for the one that reused). The scores
        are built from partial sums that one SUM all-reduce per step adds across the group,
        so the decision is the one a single process would take on the whole sequence.
        ``"auto"`` (default): the ranks the model is sharded over (diffusers' context or
        tensor parallelism, DTensor-sharded blocks), else none (one process, data or CFG
        parallelism: each rank decides for its own batch); ``"world"``: all ranks (e.g. CFG
        ranks voting jointly); ``"none"``: each rank alone; or a ``ProcessGroup`` or
        one-dimensional ``DeviceMesh``. See :mod:`adacorr_compile.runtime.distributed`.

    Lowering:

    lowering: ``"inductor"`` (default), ``"eager"`` (block bodies run as FX graphs,
        useful for debugging and for counting executions) or ``"tensorrt"``
        (torch-tensorrt for block bodies, Inductor for the rest; needs torch-tensorrt).
    inductor_mode: Inductor mode for the compiled parts.
    timestep_arg: name of the model's forward argument that carries the timestep;
        when the timestep goes up between calls, a new generation starts.
    min_blocks: fewer repeated blocks than this and the model compiles unguarded.
    max_requests: most requests alive at once in one compiled model under
        :func:`adacorr_compile.requests` (each holds its own caches and clock in a slot until
        its ``num_steps`` are done or it is released); one more is refused with an error
        naming this option, so a serving loop that forgets to release cannot grow memory
        without bound.
    dump_graphs: log the FX graph before and after each pass (also the environment
        variable ``ADACORR_DUMP_GRAPHS=1``).
    """

    gamma: float = 1.0
    spatial_weight: float = 1.0
    score: str = "relative"
    drift_reference: str = "cached"
    # The defaults of the decision (scope="step", correction, forecast="linear", the threshold)
    # were chosen with benchmarks/run_benchmark.py on both reference models; the figures that
    # chose them live in the README's results table and in benchmarks/results/README.md
    # ("Why the defaults are what they are"), not here.
    policy: str = "adacorr"
    correction: bool = True
    reuse_threshold: float = 0.08
    blend: bool = False
    interval: int = 3
    first_block_threshold: float = 0.08
    warmup_steps: int = 2
    max_consecutive_reuses: int = 3
    late_phase: tuple[float, float] | None = (0.2, 0.5)
    late_threshold_factor: float = 2.0
    late_extra_reuses: int = 1
    final_steps: int = 1
    decision: str = "batch"
    scope: str = "step"
    forecast: str = "linear"
    forecast_max_change: float = 0.1
    probe_forecast: bool = False
    decision_group: Any = "auto"
    lowering: str = "inductor"
    inductor_mode: str = "default"
    timestep_arg: str = "timestep"
    min_blocks: int = 2
    max_requests: int = 64
    dump_graphs: bool = field(default_factory=lambda: os.environ.get("ADACORR_DUMP_GRAPHS", "") not in ("", "0"))

    def __post_init__(self) -> None:
        for f in fields(self):
            _check_field(f.name, getattr(self, f.name))
        if self.late_phase is not None:  # a list (from JSON) as a tuple of floats: the config stays hashable
            object.__setattr__(self, "late_phase", tuple(float(x) for x in self.late_phase))
        if self.policy == "paper" and not self.blend:
            raise ValueError(
                "adacorr option 'policy'='paper' computes every block and blends its output by lambda: it needs "
                "'blend'=True (options={'preset': 'paper'} sets both)"
            )
        if self.blend and self.policy == "never":
            raise ValueError(
                "adacorr options 'blend'=True and 'policy'='never' mean nothing together: 'never' computes every "
                "block fresh and blend only blends the computes the policy chooses; use blend=False, or another policy"
            )

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | "AdaCorrConfig" | None = None) -> "AdaCorrConfig":
        """Build a config from ``torch.compile`` options; unknown keys raise ``ValueError``."""
        if options is None:
            return cls()
        if isinstance(options, AdaCorrConfig):
            return options
        if not isinstance(options, Mapping):
            raise ValueError(f"adacorr options must be a dict, got {type(options).__name__}")
        known = {f.name for f in fields(cls)}
        for key in options:
            if key not in known and key != "preset":
                raise ValueError(
                    f"unknown adacorr option {key!r} (value {options[key]!r}); allowed options: "
                    f"{', '.join(sorted(known | {'preset'}))}"
                )
        options = dict(options)
        preset = options.pop("preset", None)
        if preset is not None:
            if preset not in PRESETS:
                raise ValueError(f"adacorr option 'preset' got {preset!r}; expected one of {', '.join(map(repr, PRESETS))}")
            options = {**PRESETS[preset], **options}  # options given beside the preset override it
        return cls(**options)

    def replace(self, **changes: Any) -> "AdaCorrConfig":
        """A copy with some fields changed (validated)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def describe(cls) -> list[tuple[str, str, str]]:
        """(name, default, allowed) rows for documentation and the CLI."""
        rows = []
        defaults = cls()
        for f in fields(cls):
            rows.append((f.name, repr(getattr(defaults, f.name)), _ALLOWED[f.name][1]))
        return rows


# Named option sets (``options={"preset": name}``; options given beside it override it).
# Only these are "the paper's method" (arXiv 2602.13357, Algorithm 1 as DESIGN.md section 1
# states it): the paper's offset score against the previous step, gamma and lambda_s as in
# the paper, the blend of the stored and the fresh output by lambda.
PRESETS: dict[str, dict[str, Any]] = {
    # every block computes at every step; its output is (1 - lambda) * stored + lambda * fresh
    "paper": {"score": "paper", "drift_reference": "previous", "gamma": 1.0, "spatial_weight": 1.0, "policy": "paper",
              "blend": True, "correction": False, "scope": "block", "forecast": "none", "decision": "batch",
              "warmup_steps": 0, "final_steps": 0},
    # the same signal turned into a skip: lambda <= reuse_threshold reuses the stored output,
    # a compute blends as above
    "paper-skip": {"score": "paper", "drift_reference": "previous", "gamma": 1.0, "spatial_weight": 1.0,
                   "policy": "adacorr", "blend": True, "correction": False, "scope": "block", "forecast": "none",
                   "decision": "batch", "late_phase": None},
}


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# name -> (predicate, description of what is allowed)
_ALLOWED: dict[str, tuple[Any, str]] = {
    "gamma": (lambda v: _is_number(v) and v >= 0, "a number >= 0"),
    "spatial_weight": (lambda v: _is_number(v) and v >= 0, "a number >= 0"),
    "score": (lambda v: v in SCORES, " | ".join(SCORES)),
    "drift_reference": (lambda v: v in DRIFT_REFERENCES, " | ".join(DRIFT_REFERENCES)),
    "policy": (lambda v: v in POLICIES, " | ".join(POLICIES)),
    "correction": (lambda v: isinstance(v, bool), "True | False"),
    "reuse_threshold": (lambda v: _is_number(v) and 0 <= v <= 1, "a number in [0, 1]"),
    "blend": (lambda v: isinstance(v, bool), "True | False"),
    "interval": (lambda v: _is_int(v) and v >= 1, "an int >= 1"),
    "first_block_threshold": (lambda v: _is_number(v) and v >= 0, "a number >= 0"),
    "warmup_steps": (lambda v: _is_int(v) and v >= 0, "an int >= 0"),
    "max_consecutive_reuses": (lambda v: _is_int(v) and v >= 0, "an int >= 0"),
    "late_phase": (lambda v: v is None or (isinstance(v, (tuple, list)) and len(v) == 2 and all(map(_is_number, v))
                                           and 0 <= v[0] <= v[1] <= 1),
                   "None or (start, end) with 0 <= start <= end <= 1 (shares of the generation)"),
    "late_threshold_factor": (lambda v: _is_number(v) and 0 < v < float("inf"), "a finite number > 0"),
    "late_extra_reuses": (lambda v: _is_int(v) and v >= 0, "an int >= 0"),
    "final_steps": (lambda v: _is_int(v) and v >= 0, "an int >= 0"),
    "decision": (lambda v: v in DECISIONS, " | ".join(DECISIONS)),
    "scope": (lambda v: v in SCOPES, " | ".join(SCOPES)),
    "forecast": (lambda v: v in FORECASTS, " | ".join(FORECASTS)),
    "forecast_max_change": (lambda v: _is_number(v) and v >= 0, "a number >= 0 (float('inf'): always extrapolate)"),
    "probe_forecast": (lambda v: isinstance(v, bool), "True | False"),
    "decision_group": (lambda v: _is_group(v), "'auto' | 'world' | 'none' | a torch.distributed ProcessGroup | "
                                              "a one-dimensional DeviceMesh"),
    "lowering": (lambda v: v in LOWERINGS, " | ".join(LOWERINGS)),
    "inductor_mode": (lambda v: v in INDUCTOR_MODES, " | ".join(INDUCTOR_MODES)),
    "timestep_arg": (lambda v: isinstance(v, str) and v.isidentifier(), "a Python identifier (the forward argument name)"),
    "min_blocks": (lambda v: _is_int(v) and v >= 1, "an int >= 1"),
    "max_requests": (lambda v: _is_int(v) and v >= 1, "an int >= 1 (live requests per compiled model)"),
    "dump_graphs": (lambda v: isinstance(v, bool), "True | False"),
}


def _is_group(v: Any) -> bool:
    """A ``decision_group`` value (the distributed types are looked up only for a non-string)."""
    if isinstance(v, str):
        return v in ("auto", "world", "none")
    try:
        from torch.distributed import ProcessGroup
        from torch.distributed.device_mesh import DeviceMesh
    except ImportError:  # pragma: no cover - a torch without distributed
        return False
    return isinstance(v, (ProcessGroup, DeviceMesh))


def _check_field(name: str, value: Any) -> None:
    ok, allowed = _ALLOWED[name]
    try:
        good = bool(ok(value))
    except TypeError:
        good = False
    if not good:
        raise ValueError(f"adacorr option {name!r} got {value!r} ({type(value).__name__}); expected {allowed}")


@functools.lru_cache(maxsize=None)
def _option_error_type() -> type[ValueError]:
    """A ValueError that Dynamo hands to the caller as it is: Dynamo wraps what a backend
    raises in ``BackendCompilerFailed`` except its own ``ShortenTraceback`` (re-raised
    unchanged by ``OutputGraph``, ``convert_frame`` and ``eval_frame``), so the error
    subclasses both. Made on first use: importing the API does not import Dynamo."""
    try:
        from torch._dynamo.exc import ShortenTraceback
    except ImportError:  # another torch: a plain ValueError (Dynamo may wrap it)
        return ValueError

    class AdaCorrOptionError(ValueError, ShortenTraceback):
        """A bad ``torch.compile(..., backend="adacorr", options=...)`` option."""

        def __init__(self, message: str, first_useful_frame: Any = None) -> None:
            ValueError.__init__(self, message)
            self.first_useful_frame = first_useful_frame  # Dynamo's frames before it are dropped from the traceback

        def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
            return (ValueError, (str(self),))

    AdaCorrOptionError.__module__, AdaCorrOptionError.__qualname__ = __name__, "AdaCorrOptionError"
    return AdaCorrOptionError


def option_error(exc: ValueError, frame: Any = None) -> ValueError:
    """``exc`` (a bad option, from :meth:`AdaCorrConfig.from_options`) as the ValueError
    the backend raises: the user reads it at the first call instead of Dynamo's
    ``BackendCompilerFailed``. ``frame``: the backend's frame, where its traceback starts."""
    return _option_error_type()(str(exc), frame)
