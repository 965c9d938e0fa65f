"""The examples run top to bottom as plain scripts, offline, and print what they promise.

Each example runs in a subprocess exactly as a reader would start it
(``python examples/NAME.py``). ``OMP_NUM_THREADS`` defaults to 1 there: on a shared 2-core
machine a second busy process makes torch's 2-thread kernels many times slower on models this
small, and one thread is as fast as two when the machine is idle.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def _run(name: str, timeout: float, **env: str) -> str:
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                "HF_DATASETS_OFFLINE": "1", **env}
    full_env.setdefault("OMP_NUM_THREADS", "1")
    proc = subprocess.run([sys.executable, str(EXAMPLES / name)], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout, check=False)
    assert proc.returncode == 0, (
        f"{name} exited with {proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}"
        f"\n--- stderr\n{proc.stderr[-3000:]}")
    return proc.stdout


def _number(pattern: str, text: str) -> float:
    m = re.search(pattern, text)
    assert m, f"no line matching {pattern!r} in:\n{text}"
    return float(m.group(1).replace(",", ""))


def test_masks_tour(tmp_path):
    out = _run("01_masks_tour.py", timeout=180, TMPDIR=str(tmp_path))  # its files go there
    for line in [
        "q copy == de-interleaved fused rows: True",
        "output unchanged with the fused weight zeroed: True",
        "detached; output restored exactly: True",
        "head 1 query == q bias everywhere: True",
        "other heads unchanged: True",
        "inclusion-exclusion holds: True",
        "random_like keeps the per-target counts: True",
        "round trip identical: True",
        "paper-format round trip identical: True",
        "refused: Refusing to load builtins.print",
    ]:
        assert line in out, f"missing {line!r} in:\n{out}"
    assert "this would have run" not in out  # the unsafe pickle never executed
    # modes: "off" and "ablate" of a fresh set (nothing kept yet) are the full model exactly
    assert _number(r"mode=off\s+max \|logits - full model\| = ([\d.]+)", out) == 0
    assert _number(r"mode=ablate max \|logits - full model\| = ([\d.]+)", out) == 0
    assert _number(r"mode=keep\s+max \|logits - full model\| = ([\d.]+)", out) > 0
    # the fitted subnetwork for head 2's output lies inside head 2's q/k/v rows
    m = re.search(r"kept weights inside head 2's q/k/v rows: (\d+) of (\d+)", out)
    assert m and int(m.group(1)) == int(m.group(2)) > 0, out
    err_sub = _number(r"error of subnetwork: ([\d.]+)", out)
    err_rand = _number(r"error of random, same counts: ([\d.]+)", out)
    assert err_sub < 0.1 < err_rand


@pytest.mark.slow
def test_bigram_subnetwork_ci_scale(tmp_path):
    out = _run("02_bigram_subnetwork.py", timeout=600, INTERP_EXAMPLE_SCALE="ci",
               INTERP_EXAMPLE_OUT=str(tmp_path))
    assert "scale=ci" in out
    r = {name: _number(rf"sufficiency {name}\s+r = (-?[\d.]+)", out)
         for name in ("full model", "bigram subnetwork", "random subnetwork")}
    # sufficiency: the subnetwork predicts like the bigram model, better than the full model
    # (the paper's finding) and far better than a random subnetwork of the same size
    # (ci scale, seed 0: 0.94, 0.83, 0.66)
    assert r["bigram subnetwork"] > 0.85, r
    assert r["bigram subnetwork"] > r["full model"] + 0.03, r
    assert r["bigram subnetwork"] > r["random subnetwork"] + 0.15, r
    # necessity: removing it hurts many times more than removing the random one (ci: 10.8)
    full = _number(r"necessity: loss full ([\d.]+)", out)
    without = {k: _number(rf"without {k} ([\d.]+) \(\+", out) for k in ("bigram", "random")}
    increase = {k: _number(rf"without {k} [\d.]+ \(\+([\d.]+)\)", out)
                for k in ("bigram", "random")}
    for k in without:  # the printed increase is the difference of the printed losses
        assert increase[k] == pytest.approx(without[k] - full, abs=2e-3), (k, out)
    assert increase["bigram"] > 0.3 and increase["random"] >= 0, increase
    assert _number(r"necessity ratio \(bigram / random loss increase\) = ([\d.]+)", out) > 3
    # without it, greedy text collapses toward repeated tokens
    distinct = {k: _number(rf"--- {k}, greedy \(distinct ([\d.]+)\)", out)
                for k in ("full", "without bigram")}
    assert distinct["without bigram"] < distinct["full"] - 0.2, distinct
    # layout: the per-layer shares add up to 1, the first MLP layer holds the plurality
    # (ci: 0.71) and the summary shares are sums of the per-layer rows
    shares = {}
    for layer, row in re.findall(r"^  layer (\d+): (.+)$", out, flags=re.M):
        for kind, pct in re.findall(r"(\w+) ([\d.]+)%", row):
            shares[(int(layer), kind)] = float(pct) / 100
    assert len(shares) == 12, shares  # 2 layers x (q, k, v, o, mlp_in, mlp_out)
    assert sum(shares.values()) == pytest.approx(1.0, abs=0.01)
    first_mlp = _number(r"first-MLP share ([\d.]+)", out)
    assert first_mlp == pytest.approx(shares[(0, "mlp_in")] + shares[(0, "mlp_out")], abs=0.01)
    assert first_mlp > 0.5  # a plurality at ci scale is in fact a majority
    mlp = _number(r"MLP share ([\d.]+)", out.split("first-MLP share", 1)[1])
    assert mlp == pytest.approx(sum(v for (_, k), v in shares.items() if k.startswith("mlp")),
                                abs=0.01)
    kept, total = (int(x.replace(",", "")) for x in
                   re.search(r"layout: ([\d,]+) of ([\d,]+) kept", out).groups())
    assert re.search(rf"kept {kept:,} / {total:,} = ", out), out  # the mask's own summary
    # residual stream: the embedding layer maps to the input embeddings without rotating,
    # both blocks rotate it (ci: 0.0, 64.6, 72.0 for the full model; 0.0, 57.4, 65.1)
    for label in ("full model", "bigram subnetwork"):
        found = re.search(rf"residual {label}\s+rotation to input \(deg\) per layer: (.+)", out)
        assert found, out
        rotations = [float(v) for v in found.group(1).split(",")]
        assert len(rotations) == 3  # embeddings + 2 blocks
        assert rotations[0] < 1.0 and min(rotations[1:]) > 20.0, (label, rotations)
    assert (tmp_path / "figures" / "rotations.html").is_file()
    assert (tmp_path / "figures" / "plotly.min.js").is_file()
    assert (tmp_path / "masks" / "bigram.safetensors").is_file()
