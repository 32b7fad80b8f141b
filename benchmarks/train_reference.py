"""Train the reference checkpoints of adacorr_compile.lab.reference from scratch.

    python benchmarks/train_reference.py --out adacorr_compile/lab/reference/weights [--minutes N]

Trains, with fixed seeds, on the synthetic glyph data:
  1. the glyph classifier (used for sample-quality metrics),
  2. the class-conditional DiT (DDPM epsilon objective, cosine schedule),
  3. the class-conditional Flux transformer (rectified flow, velocity),
  4. with ``--only sd3`` (not by default): the class-conditional SD3 (MMDiT) transformer, the
     held-out reference, trained exactly as the Flux one.
The diffusion models are trained under a wall-clock budget (``--minutes``,
split evenly) rather than a fixed step count; the step count reached is logged.
Each model's EMA weights are saved as fp16 safetensors beside a JSON config
(which also records the training summary). Afterwards every model is reloaded
through the package loaders, sampled (50 steps, the sampler's default guidance) and scored; sample grids
go to benchmarks/results/reference_samples_{dit,flux,sd3}.png and a summary to
benchmarks/results/train_reference.md. A run of SD3 alone rewrites only the SD3 section of an
existing summary (the other models' sections and the notes written by hand stay).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import platform
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from adacorr_compile.lab.reference import classifier as clf_mod  # noqa: E402
from adacorr_compile.lab.reference import data as data_mod  # noqa: E402
from adacorr_compile.lab.reference import models as models_mod  # noqa: E402
from adacorr_compile.lab.sampling import DEFAULT_GUIDANCE, make_dit_scheduler, reference_sampler, save_grid  # noqa: E402

logger = logging.getLogger("train_reference")

# ------------------------------------------------------------------ initialisation


def _xavier_linears(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def _zero(m: nn.Module) -> None:
    for p in m.parameters():
        nn.init.zeros_(p)


def init_dit_weights(model: nn.Module) -> None:
    """DiT-paper initialisation: xavier linears, N(0, 0.02) embeddings, and the
    adaLN-Zero modulation and output layers zeroed (every block starts as identity)."""
    _xavier_linears(model)
    w = model.pos_embed.proj.weight
    nn.init.xavier_uniform_(w.view(w.shape[0], -1))
    nn.init.zeros_(model.pos_embed.proj.bias)
    for block in model.transformer_blocks:
        emb = block.norm1.emb
        nn.init.normal_(emb.class_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(emb.timestep_embedder.linear_1.weight, std=0.02)
        nn.init.normal_(emb.timestep_embedder.linear_2.weight, std=0.02)
        _zero(block.norm1.linear)
    _zero(model.proj_out_1)
    _zero(model.proj_out_2)


def _init_class_conditioned(wrapper: models_mod.ClassConditioned, modulations: list[nn.Module]) -> None:
    """The DiT recipe on a class-conditioned Flux or SD3: xavier linears, N(0, 0.02) timestep
    embedding, the blocks' adaLN ``modulations`` and the output layers zeroed, N(0, 1) class tokens."""
    tr = wrapper.transformer
    _xavier_linears(tr)
    for lin in (tr.time_text_embed.timestep_embedder.linear_1, tr.time_text_embed.timestep_embedder.linear_2):
        nn.init.normal_(lin.weight, std=0.02)
    for m in modulations:
        _zero(m)
    _zero(tr.norm_out.linear)
    _zero(tr.proj_out)
    nn.init.normal_(wrapper.text_tokens, std=1.0)
    nn.init.normal_(wrapper.pooled, std=1.0)


def init_flux_weights(wrapper: models_mod.ClassConditionedFlux) -> None:
    """Same recipe for Flux: zero the adaLN modulations and the output projection."""
    tr = wrapper.transformer
    modulations = [m for block in tr.transformer_blocks for m in (block.norm1.linear, block.norm1_context.linear)]
    _init_class_conditioned(wrapper, modulations + [block.norm.linear for block in tr.single_transformer_blocks])


def init_sd3_weights(wrapper: models_mod.ClassConditionedSD3) -> None:
    """Same recipe for SD3 (the patch embedding xavier as the DiT's): every joint block's image and
    text modulations (the last block's text norm is the continuous adaLN) zeroed."""
    tr = wrapper.transformer
    w = tr.pos_embed.proj.weight
    nn.init.xavier_uniform_(w.view(w.shape[0], -1))
    nn.init.zeros_(tr.pos_embed.proj.bias)
    modulations = [m for block in tr.transformer_blocks for m in (block.norm1.linear, block.norm1_context.linear)]
    _init_class_conditioned(wrapper, modulations)


# ------------------------------------------------------------------------ helpers


class EMA:
    def __init__(self, model: nn.Module, max_decay: float):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.max_decay = max_decay
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        decay = min(self.max_decay, (1 + self.updates) / (10 + self.updates))
        for e, p in zip(self.model.parameters(), model.parameters()):
            e.lerp_(p.detach(), 1.0 - decay)


def lr_at(progress: float, base_lr: float, step: int, warmup: int) -> float:
    """Linear warmup then cosine decay (to 10%) over the time budget."""
    warm = min(1.0, (step + 1) / warmup)
    cos = 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return base_lr * warm * cos


def save_fp16(model: nn.Module, path: Path) -> int:
    from safetensors.torch import save_file

    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path))
    return path.stat().st_size


def resume_from(model: nn.Module, out: Path, name: str, args) -> dict:
    """With ``--resume``: load the EMA weights ``out`` already holds into ``model`` and
    return the earlier training record (steps and wall time so far), to continue training
    where the committed checkpoint stopped (fresh optimizer, warm-up and cosine schedule)."""
    if not args.resume:
        return {}
    state = models_mod._load_state(out / f"{name}.safetensors")
    model.load_state_dict(state, strict=True)
    before = json.loads((out / f"{name}_config.json").read_text())["training"]
    earlier = {"resumed_steps": before["steps"] + before.get("resumed_steps", 0),
               "resumed_wall_s": round(before["wall_s"] + before.get("resumed_wall_s", 0.0), 1)}
    logger.info("%s: resuming from %s (%d steps so far)", name, out, earlier["resumed_steps"])
    return earlier


def write_json(path: Path, obj: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def forward_time_cfg16(fn) -> float:
    """Median seconds of ``fn()`` (a CFG batch of 16) after two warm-up calls."""
    with torch.no_grad():
        for _ in range(2):
            fn()
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def time_budgeted_train(name, model, loss_fn, images, labels, args, budget_s, seed, checkpoint=None):
    """Train ``model`` with AdamW + EMA until ``budget_s`` seconds have passed.

    ``checkpoint(ema_model, info)`` is called every ``args.checkpoint_every`` minutes."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0)
    ema = EMA(model, args.ema_decay)
    train_model = torch.compile(model) if args.compile else model
    model.train()
    n = images.shape[0]
    perm = torch.randperm(n, generator=gen)
    pos = 0
    step = 0
    t_start = time.perf_counter()
    last_ckpt = t_start
    window: list[float] = []
    history: list[tuple[int, float, float]] = []
    while True:
        elapsed = time.perf_counter() - t_start
        if elapsed >= budget_s or (args.max_steps and step >= args.max_steps):
            break
        if pos + args.batch_size > n:
            perm = torch.randperm(n, generator=gen)
            pos = 0
        idx = perm[pos:pos + args.batch_size]
        pos += args.batch_size
        lr = lr_at(elapsed / budget_s, args.lr, step, args.warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        opt.zero_grad(set_to_none=True)
        try:
            loss = loss_fn(train_model, images[idx], labels[idx], gen)
            loss.backward()
        except Exception:  # torch.compile failure on the first step: fall back to eager
            if step > 0 or train_model is model:
                raise
            logger.exception("%s: torch.compile failed, training eagerly", name)
            train_model = model
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(train_model, images[idx], labels[idx], gen)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema.update(model)
        step += 1
        window.append(loss.item())
        if step % args.log_every == 0:
            mean = sum(window) / len(window)
            history.append((step, round(time.perf_counter() - t_start, 1), mean))
            logger.info("%s step %d  t=%.0fs  loss %.4f  lr %.2e", name, step, time.perf_counter() - t_start, mean, lr)
            window = []
        if checkpoint is not None and time.perf_counter() - last_ckpt >= args.checkpoint_every * 60:
            checkpoint(ema.model, {"steps": step, "wall_s": round(time.perf_counter() - t_start, 1),
                                   "partial": True})
            last_ckpt = time.perf_counter()
    wall = time.perf_counter() - t_start
    tail = [h[2] for h in history[-3:]] or window
    final_loss = sum(tail) / max(len(tail), 1)
    logger.info("%s done: %d steps in %.0fs, final loss %.4f", name, step, wall, final_loss)
    return ema.model, {"steps": step, "wall_s": round(wall, 1), "final_loss": round(final_loss, 5),
                       "batch_size": args.batch_size, "lr": args.lr, "ema_decay": args.ema_decay,
                       "loss_history": [list(h) for h in history]}


# ----------------------------------------------------------------------- training


def train_classifier(args, images, labels, held_x, held_y, out: Path) -> dict:
    torch.manual_seed(args.seed + 10)
    gen = torch.Generator().manual_seed(args.seed + 10)
    cfg = clf_mod.classifier_config(data_mod.NUM_CLASSES)
    model = clf_mod.build_classifier(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    n = images.shape[0]
    bs = 128
    steps_per_epoch = n // bs
    total = steps_per_epoch * args.classifier_epochs
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=total, pct_start=0.1)
    t0 = time.perf_counter()
    step = 0
    for epoch in range(args.classifier_epochs):
        model.train()
        perm = torch.randperm(n, generator=gen)
        running = 0.0
        for i in range(steps_per_epoch):
            idx = perm[i * bs:(i + 1) * bs]
            loss = F.cross_entropy(model(images[idx]), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            running += loss.item()
            step += 1
        acc = clf_mod.class_accuracy(model, held_x, held_y)
        logger.info("classifier epoch %d  loss %.4f  held-out acc %.4f  t=%.0fs",
                    epoch + 1, running / steps_per_epoch, acc, time.perf_counter() - t0)
    model.eval()
    acc = clf_mod.class_accuracy(model, held_x, held_y)
    info = {"steps": step, "epochs": args.classifier_epochs, "wall_s": round(time.perf_counter() - t0, 1),
            "final_loss": round(running / steps_per_epoch, 5), "heldout_accuracy": round(acc, 4),
            "heldout_size": int(held_x.shape[0])}
    size = save_fp16(model, out / "classifier.safetensors")
    write_json(out / "classifier_config.json", {"model": cfg, "training": info})
    logger.info("classifier saved (%d bytes), held-out accuracy %.4f", size, acc)
    return info


def dit_loss_fn(alphas_cumprod: torch.Tensor, null_class: int, p_uncond: float, min_snr: float):
    """Epsilon MSE; with ``min_snr > 0`` each sample is weighted by min(SNR, gamma) / SNR
    (Min-SNR-gamma weighting), which down-weights the easy low-noise steps."""
    def loss_fn(model, x0, y, gen):
        b = x0.shape[0]
        t = torch.randint(0, alphas_cumprod.shape[0], (b,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        ab = alphas_cumprod[t].view(b, 1, 1, 1)
        xt = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
        drop = torch.rand(b, generator=gen) < p_uncond
        y = torch.where(drop, torch.full_like(y, null_class), y)
        pred = model(xt, timestep=t, class_labels=y).sample
        per_sample = (pred - noise).square().mean(dim=(1, 2, 3))
        if min_snr > 0:
            snr = alphas_cumprod[t] / (1 - alphas_cumprod[t])
            per_sample = per_sample * (snr.clamp(max=min_snr) / snr)
        return per_sample.mean()
    return loss_fn


def flux_loss_fn(null_class: int, p_uncond: float):
    def loss_fn(model, x0, y, gen):
        b = x0.shape[0]
        t = torch.sigmoid(torch.randn(b, generator=gen))  # logit-normal flow time
        noise = torch.randn(x0.shape, generator=gen)
        tt = t.view(b, 1, 1, 1)
        xt = (1 - tt) * x0 + tt * noise
        drop = torch.rand(b, generator=gen) < p_uncond
        y = torch.where(drop, torch.full_like(y, null_class), y)
        pred = model(xt, t, y)
        return F.mse_loss(pred, noise - x0)
    return loss_fn


def train_dit(args, images, labels, out: Path, budget_s: float) -> dict:
    torch.manual_seed(args.seed + 20)
    cfg = models_mod.dit_config(data_mod.NUM_CLASSES)
    model = models_mod.build_dit(cfg)
    init_dit_weights(model)
    earlier = resume_from(model, out, "dit", args)
    nparams = models_mod.count_parameters(model)
    logger.info("DiT: %d parameters, budget %.0fs", nparams, budget_s)
    alphas_cumprod = make_dit_scheduler().alphas_cumprod.float()
    loss_fn = dit_loss_fn(alphas_cumprod, data_mod.NUM_CLASSES, args.p_uncond, args.min_snr)

    def save(ema_model, info):
        info.update(earlier)
        info["parameters"] = nparams
        info["objective"] = ("DDPM epsilon-prediction MSE (Min-SNR-%g weighting), uniform t in [0, 1000), "
                             "label dropout %.2f" % (args.min_snr, args.p_uncond))
        write_json(out / "dit_config.json", {"model": cfg, "num_classes": data_mod.NUM_CLASSES,
                                             "null_class": data_mod.NUM_CLASSES,
                                             "scheduler": models_mod.DIT_SCHEDULER_CONFIG, "training": info})
        return save_fp16(ema_model, out / "dit.safetensors")

    ema_model, info = time_budgeted_train("dit", model, loss_fn, images, labels, args, budget_s, args.seed + 21,
                                          checkpoint=save)
    size = save(ema_model, info)
    logger.info("DiT saved (%d bytes)", size)
    return info


# the rectified-flow models: kind -> (name, config, builder, initialiser, seed offset, extra record of the wrapper)
FLOW_MODELS = {
    "flux": ("Flux", models_mod.flux_config, models_mod.build_flux, init_flux_weights, 30, lambda m: {"patch": m.patch}),
    "sd3": ("SD3", models_mod.sd3_config, models_mod.build_sd3, init_sd3_weights, 40, lambda m: {}),
}


def train_flow(kind: str, args, images, labels, out: Path, budget_s: float) -> dict:
    """Train the rectified-flow model ``kind`` (``flux`` or ``sd3``): the same data, objective,
    optimiser, EMA and schedule for both; its own seeds."""
    name, make_config, build, init, seed, record = FLOW_MODELS[kind]
    torch.manual_seed(args.seed + seed)
    cfg = make_config()
    model = build(cfg, num_classes=data_mod.NUM_CLASSES)
    init(model)
    earlier = resume_from(model, out, kind, args)
    nparams = models_mod.count_parameters(model)
    logger.info("%s: %d parameters, budget %.0fs", name, nparams, budget_s)
    loss_fn = flux_loss_fn(data_mod.NUM_CLASSES, args.p_uncond)

    def save(ema_model, info):
        info.update(earlier)
        info["parameters"] = nparams
        info["objective"] = ("rectified flow: x_t=(1-t)x0+t*noise, target noise-x0, t~logit-normal(0,1), "
                             "label dropout %.2f" % args.p_uncond)
        write_json(out / f"{kind}_config.json", {"model": cfg, "num_classes": data_mod.NUM_CLASSES,
                                                 "null_class": data_mod.NUM_CLASSES,
                                                 "num_text_tokens": model.num_text_tokens,
                                                 "image_size": model.image_size, **record(model),
                                                 "training": info})
        return save_fp16(ema_model, out / f"{kind}.safetensors")

    ema_model, info = time_budgeted_train(kind, model, loss_fn, images, labels, args, budget_s, args.seed + seed + 1,
                                          checkpoint=save)
    size = save(ema_model, info)
    logger.info("%s saved (%d bytes)", name, size)
    return info


# ---------------------------------------------------------------------- evaluation


def evaluate(kind: str, out: Path, results_dir: Path, classifier, held_x, args) -> dict:
    """Reload through the package loader, sample, score, save the grid."""
    per_class = args.eval_per_class
    labels = torch.arange(data_mod.NUM_CLASSES).repeat(per_class)
    model = models_mod.load_reference(kind, out)
    sampler = reference_sampler(kind)
    if kind == "dit":
        def fwd():
            return model(torch.randn(16, 3, 32, 32), timestep=torch.full((16,), 500),
                         class_labels=torch.arange(16) % 11).sample
    else:

        def fwd():
            return model(torch.randn(16, 3, 32, 32), torch.full((16,), 0.5), torch.arange(16) % 11)
    fwd_s = forward_time_cfg16(fwd)
    guidance = DEFAULT_GUIDANCE[kind]
    t0 = time.perf_counter()
    imgs = torch.cat([sampler(model, labels[i:i + 40], num_steps=50, guidance_scale=guidance, seed=i)
                      for i in range(0, labels.shape[0], 40)])
    sample_s = time.perf_counter() - t0
    acc50 = clf_mod.class_accuracy(classifier, imgs, labels)
    imgs10 = sampler(model, labels[:40], num_steps=10, guidance_scale=guidance, seed=0)
    acc10 = clf_mod.class_accuracy(classifier, imgs10, labels[:40])
    fid = clf_mod.fid_proxy(classifier, imgs, held_x[:2000])
    save_grid(imgs, results_dir / f"reference_samples_{kind}.png", nrow=data_mod.NUM_CLASSES, scale=2)
    res = {"forward_cfg16_s": round(fwd_s, 4), "sample_acc_50steps": round(acc50, 4),
           "sample_acc_10steps": round(acc10, 4), "guidance": guidance, "fid_proxy": round(fid, 3),
           "n_samples": int(labels.shape[0]), "sampling_wall_s": round(sample_s, 1)}
    logger.info("%s eval: %s", kind, res)
    return res


def _machine() -> str:
    return f"{platform.machine()} ({os.cpu_count()} CPU cores, shared), torch {torch.__version__}"


def model_section(name: str, m: dict) -> list[str]:
    """The summary lines of one diffusion model (``name``: DiT, Flux or SD3) from its JSON record."""
    tr = m["training"]
    c = m["model"]
    hidden = f"hidden {c['num_attention_heads'] * c['attention_head_dim']} ({c['num_attention_heads']} heads x {c['attention_head_dim']})"
    if name == "DiT":
        arch = (f"DiTTransformer2DModel, {c['num_layers']} blocks, {hidden}, patch {c['patch_size']}, "
                f"{(c['sample_size'] // c['patch_size']) ** 2} tokens, adaLN-Zero, {c['num_embeds_ada_norm']} class embeddings (null = {m['null_class']})")
    elif name == "Flux":
        arch = (f"FluxTransformer2DModel, {c['num_layers']} double + {c['num_single_layers']} single blocks, "
                f"{hidden}, {(m['image_size'] // m['patch']) ** 2} image tokens "
                f"({m['patch']}x{m['patch']} packed RGB, {c['in_channels']} ch) + "
                f"{m['num_text_tokens']} class tokens, null class = {m['null_class']}")
    else:
        arch = (f"SD3Transformer2DModel (MMDiT), {c['num_layers']} joint blocks (the last one context_pre_only), "
                f"{hidden}, patch {c['patch_size']}: {(m['image_size'] // c['patch_size']) ** 2} image tokens + "
                f"{m['num_text_tokens']} class tokens (joint dim {c['joint_attention_dim']}, pooled {c['pooled_projection_dim']}), "
                f"QK norm {c.get('qk_norm')}, null class = {m['null_class']}")
    lines = [f"## {name}", "", f"- {arch}", f"- parameters: {tr['parameters']:,}",
             f"- objective: {tr['objective']}",
             f"- AdamW lr {tr['lr']} (warmup + cosine over the time budget), batch {tr['batch_size']}, "
             f"EMA {tr['ema_decay']}",
             f"- **{tr['steps']} steps in {tr['wall_s']:.0f} s**, final loss {tr['final_loss']:.4f}"
             + (f" (resumed: {tr['resumed_steps']} steps in {tr['resumed_wall_s']:.0f} s before this run, "
                f"{tr['steps'] + tr['resumed_steps']} in all)" if tr.get("resumed_steps") else "")]
    ev = m.get("eval")
    if ev:
        lines += [f"- eager fp32 forward of a CFG batch of 16: {ev['forward_cfg16_s'] * 1000:.0f} ms",
                  f"- generated-sample class accuracy (classifier): **{ev['sample_acc_50steps']:.3f}** "
                  f"at 50 steps ({ev['n_samples']} samples, CFG {ev.get('guidance', 4.0):g}), "
                  f"{ev['sample_acc_10steps']:.3f} at 10 steps "
                  "(40 samples)",
                  f"- FID proxy (classifier features, {ev['n_samples']} samples vs 2000 held-out): "
                  f"{ev['fid_proxy']:.2f} (held-out vs held-out at the same sizes: {ev['fid_floor']:.2f})",
                  f"- samples: `reference_samples_{name.lower()}.png` (each row = classes 0-9)"]
    hist = tr.get("loss_history", [])
    if hist:
        pick = hist[:: max(1, len(hist) // 8)] + ([hist[-1]] if hist[-1] not in hist[:: max(1, len(hist) // 8)] else [])
        lines += ["", "| step | time (s) | loss |", "| --- | --- | --- |"]
        lines += [f"| {s} | {t:.0f} | {loss:.4f} |" for s, t, loss in pick]
    lines.append("")
    return lines


def replace_section(text: str, section: list[str]) -> str:
    """``text`` (a summary) with the section headed like ``section`` (``## Name``) replaced by it,
    up to the next ``## `` heading; appended when there is none."""
    lines = text.rstrip("\n").split("\n")
    head = section[0]
    if head not in lines:
        return "\n".join(lines + [""] + section) + "\n"
    i = lines.index(head)
    j = next((k for k in range(i + 1, len(lines)) if lines[k].startswith("## ")), len(lines))
    return "\n".join(lines[:i] + section + lines[j:]).rstrip("\n") + "\n"


def write_summary(path: Path, cmd: str, total_s: float, out: Path, kinds: list[str]) -> None:
    def meta(name):
        p = out / f"{name}_config.json"
        return json.loads(p.read_text()) if p.exists() else None

    if kinds == ["sd3"] and path.exists():
        # the held-out model alone: its section only, the rest of the summary (and its notes) as it is
        how = ("evaluation only (`--eval-only`)" if args_ns.eval_only else
               f"{args_ns.threads} thread(s)" + (", training step under torch.compile" if args_ns.compile else ""))
        section = model_section("SD3", meta("sd3"))
        section[2:2] = [f"The held-out family: the backend's defaults were not tuned on it. Trained as Flux (same data, "
                        "objective, optimiser, EMA, batch size, learning rate) and sampled as Flux (Euler, Flux's default "
                        f"guidance) by `{cmd}` on {_machine()} ({how}; {total_s / 60:.1f} min in all, evaluation included).",
                        ""]
        path.write_text(replace_section(path.read_text(encoding="utf-8"), section), encoding="utf-8")
        return
    clf, dit, flux, sd3 = meta("classifier"), meta("dit"), meta("flux"), meta("sd3")
    lines = ["# Reference checkpoints: training log", "",
             "Reproduce (from the repo root, CPU, fixed seeds):", "", "```", cmd, "```", "",
             f"- machine: {_machine()}; "
             + ("evaluation only (`--eval-only`): the training figures below are the checkpoints' own records"
                if args_ns.eval_only else
                f"DiT and Flux trained side by side, one process with {args_ns.worker_threads} thread(s) each"
                if args_ns.parallel and {"dit", "flux"} <= set(args_ns.only or ("dit", "flux"))
                else f"{args_ns.threads} threads, one model after the other")
             + (", training step under torch.compile" if args_ns.compile and not args_ns.eval_only else ""),
             f"- total wall time of this run: {total_s / 60:.1f} min", "",
             "Data: synthetic glyphs (digits 0-9 in DejaVu Sans regular/bold, random size 16-26 px, "
             "position, rotation +-20 deg, foreground/background colours), 3x32x32 in [-1, 1]; "
             f"train split seed {data_mod.TRAIN_SEED} ({args_ns.train_size} images), "
             f"held-out seed {data_mod.HELDOUT_SEED}.", ""]
    if clf:
        tr = clf["training"]
        lines += ["## Classifier", "",
                  f"- CNN channels {clf['model']['channels']}, feature dim {clf['model']['feature_dim']}",
                  f"- {tr['epochs']} epoch(s) over {tr['steps'] * 128} images ({tr['steps']} steps, batch 128) in {tr['wall_s']:.0f} s, "
                  f"final loss {tr['final_loss']:.4f}",
                  f"- held-out accuracy: **{tr['heldout_accuracy']:.4f}** ({tr['heldout_size']} images)", ""]
    for name, m in (("DiT", dit), ("Flux", flux), ("SD3", sd3)):
        if m:
            lines += model_section(name, m)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


args_ns = None


def main(argv=None) -> None:
    global args_ns
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=REPO / "adacorr_compile/lab/reference/weights")
    p.add_argument("--results", type=Path, default=REPO / "benchmarks/results")
    p.add_argument("--minutes", type=float, default=40.0,
                   help="wall-clock budget for diffusion training: each model's budget when they train in "
                        "parallel (default), split between them with --no-parallel")
    p.add_argument("--parallel", action=argparse.BooleanOptionalAction, default=True,
                   help="train DiT and Flux side by side, one single-threaded process each")
    p.add_argument("--worker-threads", type=int, default=1)
    p.add_argument("--worker", choices=["dit", "flux", "sd3"], default=None, help=argparse.SUPPRESS)
    p.add_argument("--checkpoint-every", type=float, default=10.0, help="minutes between EMA checkpoints")
    p.add_argument("--only", nargs="*", choices=["classifier", "dit", "flux", "sd3"], default=None,
                   help="what to train (default: classifier dit flux; the held-out sd3 only when named)")
    p.add_argument("--skip-eval", action="store_true")
    p.add_argument("--eval-only", action="store_true",
                   help="no training: re-evaluate the checkpoints in --out (e.g. after a sampler default changed)")
    p.add_argument("--train-size", type=int, default=40000)
    p.add_argument("--heldout-size", type=int, default=5000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--ema-decay", type=float, default=0.995)
    p.add_argument("--p-uncond", type=float, default=0.1)
    p.add_argument("--min-snr", type=float, default=5.0, help="Min-SNR-gamma loss weighting for the DiT (0 = off)")
    p.add_argument("--max-steps", type=int, default=0, help="stop earlier than the time budget (0 = no limit)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the weights already in --out (fresh optimizer and schedule) instead of a new init")
    p.add_argument("--classifier-epochs", type=int, default=1)
    p.add_argument("--classifier-train-size", type=int, default=24000)
    p.add_argument("--eval-per-class", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="torch.compile the training forward/backward")
    args = p.parse_args(argv)
    if args.eval_only and args.skip_eval:
        raise SystemExit("--eval-only and --skip-eval exclude each other")
    args_ns = args
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    args.results.mkdir(parents=True, exist_ok=True)
    only = set(args.only or ["classifier", "dit", "flux"])
    t_all = time.perf_counter()

    t0 = time.perf_counter()
    # the train split only feeds training; --eval-only needs the held-out split alone
    images, labels = data_mod.make_dataset(0 if args.eval_only else args.train_size, data_mod.TRAIN_SEED)
    held_x, held_y = data_mod.make_dataset(args.heldout_size, data_mod.HELDOUT_SEED)
    logger.info("rendered %d train + %d held-out images in %.1fs", images.shape[0], held_x.shape[0],
                time.perf_counter() - t0)

    if "classifier" in only and not args.worker and not args.eval_only:
        k = min(args.classifier_train_size, images.shape[0])
        train_classifier(args, images[:k], labels[:k], held_x, held_y, args.out)
    kinds = [k for k in ("dit", "flux", "sd3") if k in only]
    if args.worker:
        kinds = [args.worker]
    evals: dict = {}
    if len(kinds) > 1 and args.parallel and not args.eval_only:
        # One single-threaded worker per model, side by side (train + eval each).
        procs = []
        for kind in kinds:
            cmd = [sys.executable, str(Path(__file__).resolve()), *(argv if argv is not None else sys.argv[1:]),
                   "--worker", kind, "--threads", str(args.worker_threads)]
            logger.info("starting worker: %s", kind)
            procs.append((kind, subprocess.Popen(cmd)))
        failed = [kind for kind, proc in procs if proc.wait() != 0]
        if failed:
            raise SystemExit(f"worker(s) failed: {failed}")
    else:
        budget = args.minutes * 60.0 / max(len(kinds), 1)
        trainers = {"dit": train_dit, "flux": partial(train_flow, "flux"), "sd3": partial(train_flow, "sd3")}
        if not args.eval_only:
            for kind in kinds:
                trainers[kind](args, images, labels, args.out, budget)
        if not args.skip_eval:
            classifier = clf_mod.load_reference_classifier(args.out)
            n_eval = 10 * args.eval_per_class
            fid_floor = clf_mod.fid_proxy(classifier, held_x[2000:2000 + n_eval], held_x[:2000])
            for kind in kinds:
                evals[kind] = evaluate(kind, args.out, args.results, classifier, held_x, args)
                evals[kind]["fid_floor"] = round(fid_floor, 3)
                meta_path = args.out / f"{kind}_config.json"
                meta = json.loads(meta_path.read_text())
                meta["eval"] = evals[kind]
                write_json(meta_path, meta)
    if args.worker:
        return
    total = time.perf_counter() - t_all
    cmd = "python benchmarks/train_reference.py " + " ".join(
        a if not a.startswith(str(REPO)) else os.path.relpath(a, REPO) for a in (argv or sys.argv[1:]))
    write_summary(args.results / "train_reference.md", cmd, total, args.out, kinds)
    summary = {"total_min": round(total / 60, 1)}
    for kind in ("dit", "flux", "sd3"):
        meta_path = args.out / f"{kind}_config.json"
        if meta_path.exists():
            summary[kind] = json.loads(meta_path.read_text()).get("eval")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
