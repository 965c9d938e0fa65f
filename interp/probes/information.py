"""Mutual information between features and inputs / labels, for picking a distillation teacher.

Wang et al. (NeurIPS 2022, "Efficient Knowledge Distillation from Model Checkpoints") pick the
training checkpoint whose features ``F`` hold the most task-related information: they estimate
``I(X;F)`` with a decoder that reconstructs the input and ``I(Y;F)`` with a probe classifier,
min-max normalise both across checkpoints and take the checkpoint maximising their sum. This
module implements that rule with estimators whose assumptions are stated:

``I(X;F)``, decoder (Gaussian-error bound, nats per input dimension)
    ``X`` is flattened and scaled to ``[0, 1]`` (one global affine map; every estimate below
    is invariant to it). A decoder ``g`` is fitted on a training split; on the held-out split,
    per input dimension ``d`` with ``MSE_d = E[(X_d - g(F)_d)^2]``::

        I_d = 0.5 * log(Var(X_d) / MSE_d) = -0.5 * log(1 - R^2_d)

    For Gaussian ``X_d`` this is a lower bound on ``I(X_d; F)``: ``h(X_d | F) <= h(X_d - g(F))
    <= 0.5 log(2 pi e MSE_d)`` and ``h(X_d) = 0.5 log(2 pi e Var(X_d))``; it is exact for
    jointly Gaussian ``(X, F)`` with the linear decoder (then ``I = 0.5 log(1 + SNR)``). For
    other ``X`` it is the information of a Gaussian channel with the same error ("Gaussian
    error assumption"). ``i_xf`` is the mean of ``I_d`` over non-constant input dimensions,
    floored at 0 (information is never negative). It averages per-dimension (marginal)
    informations: it does not count what correlated pixels share only once, as a joint
    ``log det`` would, but it needs no ``D x D`` input covariance. ``r2`` is the
    variance-weighted held-out ``R^2 = 1 - sum_d MSE_d / sum_d Var(X_d)``.

    The default decoder is **linear** (ridge regression on standardised features, solved in
    closed form: exact, deterministic, a fraction of a second), so the estimate counts linearly
    decodable information. Its ridge is chosen from :data:`RIDGE_GRID` by the error on the
    last fifth of the training split, every candidate solved from one eigendecomposition.
    ``decoder="mlp"`` (one hidden ReLU layer, full-batch Adam for ``steps`` seeded steps)
    decodes more but costs ``steps`` passes over ``N x (D h + h P)``; use it for small
    inputs or on an accelerator.

    Features are standardised with training-split statistics only. Columns that are constant,
    or whose training std is below :data:`MIN_RELATIVE_STD` (1e-3) times the median std of
    the non-constant columns, are dropped; held-out z-scores are clipped per column to the
    range seen in training. Without this, a ReLU unit that fires on one or two training rows
    gets a tiny std, reaches ``|z|`` of thousands on held-out rows where it fires, and the
    fitted decoder extrapolates (held-out R^2 far below 0, ``I(X;F)`` floored to 0). The
    decoder applied to held-out rows is still a fixed function of ``F`` fitted without them,
    so the estimate stays a held-out one; the same standardisation feeds the probe.

``I(Y;F)``, probe (Barber-Agakov variational lower bound, nats)
    A linear softmax probe ``q(y|f)`` (standardised features, L2 penalty, full-batch L-BFGS
    from zeros: the problem is convex, so it is deterministic) is trained on the training
    split, its penalty chosen from :data:`L2_GRID` by the cross-entropy on the last fifth of
    that split (an over-confident probe makes the bound loose, even vacuous), then refitted
    on the whole training split. ``I(Y;F) = H(Y) - H(Y|F) >= H(Y) - CE_heldout`` for any
    ``q``, with ``CE = E[-log q(y|f)]`` on the held-out split and ``H(Y)`` the plug-in entropy
    of the label marginal over all samples; ``i_yf = max(0, H(Y) - CE)`` (still a bound, as
    ``I >= 0``).

``CKA`` (normalised HSIC), for comparison
    ``CKA(K, L) = <HKH, HLH>_F / (||HKH||_F ||HLH||_F)`` on a seeded subsample of at most
    ``cka_samples`` rows (the same rows for every checkpoint). ``K`` on the features and on
    ``X``: RBF ``exp(-||a - b||^2 / (2 sigma^2))`` with ``sigma^2`` the median squared
    pairwise distance (median heuristic), or linear. For ``Y`` the kernel is the one-hot
    Gram matrix (1 when two samples share a class). A dependence measure in ``[0, 1]``, not
    in nats; it ranks checkpoints without training anything.

All training runs on the features' device (CPU tensors: CPU) inside
:func:`interp.numerics.no_denormals`, and every estimator is timed per checkpoint. The
held-out split never chooses anything, so the bounds stay bounds. The train / held-out split
(and the CKA subsample) is seeded and the same for every checkpoint. Cost per checkpoint of
5,000 x 128 features on one CPU thread: about 0.3-0.8 s (the probe dominates; more classes,
more time); torch's one-time optimizer import is paid in the setup, not by a checkpoint.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int, Real, Shaped
from torch import Tensor
from tqdm.auto import tqdm

from interp.errors import ConfigError, DataError, InterpError, check_number, suggest
from interp.models.lm import resolve_device
from interp.numerics import no_denormals
from interp.probes.stats import check_hook_names
from interp.results import Result, bulky

__all__ = [
    "CheckpointInformation",
    "DecoderEstimate",
    "InformationResult",
    "ProbeEstimate",
    "TeacherChoice",
    "cka",
    "collect_features",
    "decoder_information",
    "information_curve",
    "minmax_normalise",
    "probe_information",
    "select_teacher",
]

log = logging.getLogger(__name__)

Key = int | str
Decoder = Literal["linear", "mlp"]
Kernel = Literal["rbf", "linear"]
Method = Literal["variational", "cka"]

#: Fewest training and held-out samples an estimate is made from.
MIN_SPLIT = 10
#: Pairwise distances the RBF bandwidth's median is taken over.
_MEDIAN_PAIRS = 200_000
#: A reconstruction error below this fraction of the variance counts as this fraction
#: (caps one dimension's information at 0.5 * log(1e12) = 13.8 nats).
_MIN_RELATIVE_MSE = 1e-12
#: Ridge penalties the linear decoder chooses from (relative to unit-variance features).
RIDGE_GRID = tuple(10.0 ** (e / 2) for e in range(-12, 5))
#: Ridge used when the training split is too small to set a fifth aside for choosing one.
FALLBACK_RIDGE = 1e-2
#: L2 penalties the probe chooses from (largest first; warm-started path).
L2_GRID = (1.0, 1e-1, 1e-2, 1e-3, 1e-4)
#: Feature columns whose training std is below this fraction of the median training std of
#: the non-constant columns are dropped before a decoder or probe is fitted.
MIN_RELATIVE_STD = 1e-3


# --------------------------------------------------------------------------- results


@dataclass(repr=False)
class DecoderEstimate(Result):
    """``I(X;F)`` from a reconstruction decoder (see the module docstring).

    Attributes:
        i_xf: mean over input dimensions of ``0.5 log(Var(X_d) / MSE_d)``, floored at 0
            (nats per dimension).
        r2: variance-weighted held-out R^2 of the reconstruction.
        mse: mean held-out squared error per dimension, ``X`` scaled to [0, 1].
        n_dims: input dimensions used (constant ones are dropped).
    """

    i_xf: float
    r2: float
    mse: float
    n_dims: int
    decoder: str = "linear"
    ridge: float = math.nan
    seconds: float = 0.0


@dataclass(repr=False)
class ProbeEstimate(Result):
    """``I(Y;F) >= H(Y) - CE_heldout`` from a linear softmax probe (nats)."""

    i_yf: float
    accuracy: float
    ce: float
    h_y: float
    l2: float = math.nan
    seconds: float = 0.0


@dataclass(repr=False)
class CheckpointInformation(Result):
    """Every estimate for one checkpoint; ``*_norm`` are min-max normalised across the curve.

    Attributes:
        i_xf, r2_x: decoder estimate of ``I(X;F)`` (nats per input dim) and its held-out R^2.
        i_yf, accuracy, ce, h_y: probe bound on ``I(Y;F)`` (nats), its held-out accuracy and
            cross-entropy, and the label entropy.
        cka_xf, cka_yf: CKA between the features and ``X``, and between them and one-hot ``Y``.
        ridge, l2: the penalties the decoder and the probe chose.
        score: ``i_xf_norm + i_yf_norm``, the quantity the selection rule maximises.
        seconds: wall time per estimator (``decoder``, ``probe``, ``cka``).
    """

    key: int | str
    i_xf: float
    r2_x: float
    i_yf: float
    accuracy: float
    ce: float
    h_y: float
    cka_xf: float
    cka_yf: float
    ridge: float = math.nan
    l2: float = math.nan
    i_xf_norm: float = math.nan
    i_yf_norm: float = math.nan
    score: float = math.nan
    seconds: dict[str, float] = bulky(dict)


@dataclass(repr=False)
class InformationResult(Result):
    """Information estimates per checkpoint (:func:`information_curve`).

    Attributes:
        checkpoints: one :class:`CheckpointInformation` per checkpoint, in the order given.
        exclude: keys left out of the min/max of the normalisation (still normalised) and
            out of the teacher candidates.
        selected: the teacher :func:`select_teacher` picks with ``exclude``.
        setup_seconds: time shared by all checkpoints (scaling ``X``, its and ``Y``'s kernels).
        seconds: total wall time.
    """

    checkpoints: list[CheckpointInformation] = bulky(list)
    exclude: list[int | str] = bulky(list)
    selected: int | str | None = None
    n_samples: int = 0
    n_train: int = 0
    n_test: int = 0
    d_x: int = 0
    n_classes: int = 0
    decoder: str = "linear"
    kernel: str = "rbf"
    cka_samples: int = 0
    seed: int = 0
    setup_seconds: float = 0.0
    seconds: float = 0.0

    @property
    def keys(self) -> list[int | str]:
        return [c.key for c in self.checkpoints]

    def get(self, key: Key) -> CheckpointInformation:
        for c in self.checkpoints:
            if c.key == key:
                return c
        raise ConfigError(f"No checkpoint {key!r}; checkpoints: {self.keys}.")

    def values(self, name: str) -> dict[Key, float]:
        """``{key: value}`` of one per-checkpoint field, e.g. ``values("i_xf")``."""
        fields = {f for f in CheckpointInformation.__dataclass_fields__
                  if f not in ("key", "seconds")}
        if name not in fields:
            raise ConfigError(f"Unknown field {name!r}; fields: {sorted(fields)}."
                              f"{suggest(name, fields)}")
        return {c.key: getattr(c, name) for c in self.checkpoints}

    def normalised(self, name: str, exclude: Iterable[Key] | None = None) -> dict[Key, float]:
        """:func:`minmax_normalise` of one field (default: this result's ``exclude``)."""
        return minmax_normalise(self.values(name), self.exclude if exclude is None else exclude)

    def table(self) -> list[dict[str, Any]]:
        """One flat dict per checkpoint (for a DataFrame or a report table)."""
        rows = []
        for c in self.checkpoints:
            row = {k: v for k, v in c.to_dict().items() if k != "seconds"}
            row.update({f"seconds_{k}": v for k, v in c.seconds.items()})
            rows.append(row)
        return rows

    def summary_rows(self) -> list[tuple[str, Any]]:
        return [("checkpoints", len(self.checkpoints)), ("exclude", self.exclude),
                *super().summary_rows()]


@dataclass(repr=False)
class TeacherChoice(Result):
    """The checkpoint maximising normalised ``I(X;F) + I(Y;F)`` (:func:`select_teacher`).

    ``key, seconds = choice`` unpacks the selection and the estimation time.

    Attributes:
        key: the selected checkpoint.
        score: its normalised sum.
        seconds: wall time of the estimators the rule used, summed over every checkpoint
            estimated (excluded ones included; for ``method="cka"`` with the shared setup).
        keys, scores: every checkpoint and its score (excluded ones included, not eligible).
    """

    key: int | str
    score: float
    seconds: float
    method: str = "variational"
    exclude: list[int | str] = bulky(list)
    keys: list[int | str] = bulky(list)
    scores: list[float] = bulky(list)

    def __iter__(self) -> Iterator[Any]:
        return iter((self.key, self.seconds))


# --------------------------------------------------------------------------- features


@torch.no_grad()
def collect_features(
    model,
    inputs: Shaped[Tensor, "n ..."],
    hook_name: str,
    batch_size: int = 500,
    device: str | torch.device | None = None,
) -> Float[Tensor, "n d"]:
    """Activations of ``model`` at ``hook_name`` for every input, flattened to ``[N, D]``.

    Runs a TransformerLens ``HookedRootModule`` (or bridge) in eval mode without gradients,
    ``batch_size`` inputs at a time, with one forward hook that stores only that activation
    (``run_with_hooks``; models with only ``run_with_cache`` get ``names_filter``), so no full
    cache is held. All dimensions but the first (batch) are flattened. With ``device``, the
    model and the inputs move there; the features stay on the device the model ran on.
    The model's training mode is restored afterwards.
    """
    check_number("batch_size", batch_size, low=1, integer=True)
    if inputs.ndim == 0 or inputs.shape[0] == 0:
        raise DataError("collect_features got no inputs; pass a tensor with one row per sample.")
    if not hasattr(model, "run_with_hooks") and not hasattr(model, "run_with_cache"):
        raise ConfigError(f"{type(model).__name__} has neither run_with_hooks nor run_with_cache; "
                          "pass a TransformerLens HookedRootModule.")
    check_hook_names(model, [hook_name])
    if device is not None:
        model.to(device)
    run_device = resolve_device(model, device)
    was_training = model.training
    model.eval()
    store: dict[str, Tensor] = {}

    def hook(act: Tensor, hook) -> None:
        store["act"] = act.detach()

    out: list[Tensor] = []
    try:
        for start in range(0, inputs.shape[0], batch_size):
            batch = inputs[start:start + batch_size].to(run_device)
            store.clear()
            if hasattr(model, "run_with_hooks"):
                model.run_with_hooks(batch, fwd_hooks=[(hook_name, hook)])
            else:
                _, cache = model.run_with_cache(batch, names_filter=hook_name)
                store["act"] = cache[hook_name].detach()
                del cache
            if "act" not in store:
                raise InterpError(f"Hook {hook_name!r} did not fire in the forward pass of "
                                  f"{type(model).__name__}; pick a hook point the forward uses.")
            act = store.pop("act")
            if act.ndim == 0 or act.shape[0] != batch.shape[0]:
                raise DataError(
                    f"The activation at {hook_name!r} has shape {tuple(act.shape)}, whose first "
                    f"dimension is not the batch ({batch.shape[0]}); pick a hook point with "
                    "the batch first.")
            out.append(act.reshape(act.shape[0], -1))
    finally:
        store.clear()
        model.train(was_training)
    return torch.cat(out)


# --------------------------------------------------------------------------- preparation


def _split(n: int, test_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Seeded random train / held-out row indices (CPU)."""
    check_number("test_fraction", test_fraction, low=0, high=1, low_open=True, high_open=True)
    n_test = int(round(n * test_fraction))
    n_train = n - n_test
    if n_test < MIN_SPLIT or n_train < MIN_SPLIT:
        raise DataError(
            f"Too few samples to estimate information: N={n} with test_fraction={test_fraction:g} "
            f"leaves {n_train} training and {n_test} held-out samples; at least {MIN_SPLIT} of "
            "each are needed (hundreds give usable estimates). Pass more inputs or change "
            "test_fraction.")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[:n_train], perm[n_train:]


def _features(features: Tensor, what: str) -> Float[Tensor, "n d"]:
    """Flatten to ``[N, D]`` float32 and refuse non-finite values."""
    if features.ndim == 0 or features.shape[0] == 0:
        raise DataError(f"{what} are empty; pass a tensor with one row per sample.")
    if not torch.is_floating_point(features):
        raise DataError(f"{what} have dtype {features.dtype}; features must be floating point.")
    f = features.detach().reshape(features.shape[0], -1).float()
    if f.shape[1] == 0:
        raise DataError(f"{what} have no feature dimensions (shape {tuple(features.shape)}).")
    bad = ~torch.isfinite(f)
    if bad.any():
        rows = int(bad.any(1).sum())
        raise DataError(
            f"{what} contain {int(bad.sum())} NaN/inf values in {rows} of {f.shape[0]} rows: the "
            "model may have diverged or overflowed in half precision. Collect the features in "
            "float32, or drop those rows from the features, inputs and labels alike.")
    return f


def _inputs(inputs: Tensor, device: torch.device) -> Float[Tensor, "n p"]:
    """Flatten ``X`` to ``[N, P]`` float32 scaled to [0, 1] by its global min and max."""
    if inputs.ndim == 0 or inputs.shape[0] == 0:
        raise DataError("The inputs X are empty; pass a tensor with one row per sample.")
    x = inputs.detach().reshape(inputs.shape[0], -1).to(device=device, dtype=torch.float32)
    if x.shape[1] == 0 or not torch.isfinite(x).all():
        raise DataError("The inputs X have no dimensions or contain NaN/inf; pass finite inputs.")
    lo, hi = x.min(), x.max()
    if not hi > lo:
        raise DataError("The inputs X are constant: there is nothing to reconstruct.")
    return (x - lo) / (hi - lo)


def _labels(labels: Tensor, device: torch.device) -> tuple[Int[Tensor, " n"], int]:
    """Labels as class ids ``0..C-1`` (sorted unique values), and ``C``."""
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise DataError(f"Labels have dtype {labels.dtype}; pass integer class ids.")
    if labels.ndim != 1:
        raise DataError(f"Labels must be one class id per sample (1-d), got shape "
                        f"{tuple(labels.shape)}.")
    classes, y = torch.unique(labels.detach().long(), return_inverse=True)
    if len(classes) < 2:
        raise DataError("Every label is the same class: I(Y;F) is 0 and no probe can be "
                        "trained. Pass labels of at least two classes.")
    return y.to(device), len(classes)


def _check_rows(counts: Mapping[str, int]) -> None:
    """DataError unless every named row count is the same."""
    if len(set(counts.values())) > 1:
        listed = ", ".join(f"{k} {v}" for k, v in counts.items())
        raise DataError(
            f"Row counts differ: {listed}. Row i of the features, inputs and labels must be "
            "the same sample; collect the features from the same inputs, in the same order.")


def _standardise(train: Tensor, test: Tensor) -> tuple[Tensor, Tensor]:
    """z-score both splits with the training split's statistics, robust to rare units.

    Every statistic comes from the training split only (nothing is chosen on held-out rows):

    * columns that are constant on the training split, or whose training std is below
      :data:`MIN_RELATIVE_STD` times the median std of the non-constant columns, are set to
      0 in both splits (dropped) instead of being divided by a tiny std;
    * held-out z-scores are clipped, per column, to the range the training z-scores span, so
      a unit that is almost always off in training (a rarely firing ReLU) cannot reach
      ``|z|`` in the thousands on a held-out row and make a fitted model extrapolate.
    """
    mean = train.mean(0)
    std = train.std(0)
    varies = std > 1e-8 * (1 + mean.abs())
    if varies.any():
        varies &= std >= MIN_RELATIVE_STD * std[varies].median()
    scale = torch.where(varies, std.reciprocal(), torch.zeros_like(std))
    ztr = (train - mean) * scale
    zte = torch.maximum(torch.minimum((test - mean) * scale, ztr.amax(0)), ztr.amin(0))
    return ztr, zte


def _solve_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


# --------------------------------------------------------------------------- I(X;F)


@dataclass
class _Targets:
    """``X`` prepared once for every checkpoint: training and held-out rows centred by the
    training mean, constant dimensions dropped, the held-out variance per dimension."""

    train: Tensor
    test: Tensor
    var: Tensor
    n_inner: int


def _inner_size(n_train: int) -> int:
    """Training rows that fit the model while a penalty is chosen; the remaining fifth
    validates it. 0 when that fifth would be under ``MIN_SPLIT`` rows (no selection)."""
    n_val = n_train // 5
    return n_train - n_val if n_val >= MIN_SPLIT else 0


def _targets(x: Float[Tensor, "n p"], train: Int[Tensor, " n_tr"],
             test: Int[Tensor, " n_te"]) -> _Targets:
    xtr, xte = x[train], x[test]
    mean = xtr.mean(0)
    keep = (xtr.var(0) > 1e-12) & (xte.var(0) > 1e-12)
    if not keep.any():
        raise DataError("Every input dimension is constant on the training or held-out split; "
                        "there is nothing to reconstruct.")
    if not keep.all():
        xtr, xte, mean = xtr[:, keep], xte[:, keep], mean[keep]
    xte = xte - mean
    return _Targets(train=xtr - mean, test=xte, var=xte.double().var(0, unbiased=False),
                    n_inner=_inner_size(len(train)))


def _moments(f: Float[Tensor, "m d"], x: Float[Tensor, "m p"], dt: torch.dtype) -> tuple:
    """Raw sums a ridge fit needs: ``F^T F``, ``F^T X``, ``sum F``, ``sum X``, rows."""
    return ((f.T @ f).to(dt), (f.T @ x).to(dt), f.sum(0).to(dt), x.sum(0).to(dt), f.shape[0])


def _select_ridge(inner: tuple, val: tuple, grid: Tensor) -> float:
    """The ridge on ``grid`` with the least validation error, every candidate solved at once.

    With ``S = V diag(s) V^T`` the inner fit's feature covariance and ``M = V^T R`` its
    rotated cross-covariance, the validation predictions are ``A V diag(c) M`` with
    ``c = 1 / (s + ridge)`` and ``A`` the centred validation features, so the validation
    error is ``||B||^2 - 2 c . lin + c^T Q c`` with ``lin`` and ``Q`` built once from
    ``d x p`` and ``d x d`` products: no extra pass over the data per candidate.
    """
    gff, gfx, sf, sx, m = inner
    mf, mx = sf / m, sx / m
    s, v = torch.linalg.eigh(gff / m - torch.outer(mf, mf))
    rot = v.T @ (gfx / m - torch.outer(mf, mx))
    gff_v, gfx_v, sf_v, sx_v, m_v = val
    atb = gfx_v - torch.outer(sf_v, mx) - torch.outer(mf, sx_v) + m_v * torch.outer(mf, mx)
    ata = gff_v - torch.outer(sf_v, mf) - torch.outer(mf, sf_v) + m_v * torch.outer(mf, mf)
    lin = ((v.T @ atb) * rot).sum(1)
    quad = (v.T @ ata @ v) * (rot @ rot.T)
    c = 1 / (s.clamp(min=0)[None, :] + grid[:, None].to(s))
    sse = -2 * c @ lin + ((c @ quad) * c).sum(1)
    return float(grid[int(torch.argmin(sse))])


def _fit_linear_decoder(ftr: Float[Tensor, "n_tr d"], targets: _Targets,
                        ridge: float | None) -> tuple[Callable[[Tensor], Tensor], float]:
    """Ridge map with an unpenalised intercept, ``W = (S + ridge I)^-1 R`` on the training
    covariances; ``ridge=None`` picks it from :data:`RIDGE_GRID` on an inner validation split
    first. Returns the predictor and the ridge used."""
    dt = _solve_dtype(ftr.device)
    xtr, k = targets.train, targets.n_inner
    if ridge is None and k:
        inner, val = _moments(ftr[:k], xtr[:k], dt), _moments(ftr[k:], xtr[k:], dt)
        ridge = _select_ridge(inner, val, torch.tensor(RIDGE_GRID, dtype=dt))
        gff, gfx, sf, sx, m = (a + b for a, b in zip(inner, val))
    else:
        ridge = FALLBACK_RIDGE if ridge is None else ridge
        gff, gfx, sf, sx, m = _moments(ftr, xtr, dt)
    mf, mx = sf / m, sx / m
    cov = gff / m - torch.outer(mf, mf)
    cov.diagonal().add_(ridge)
    weight = torch.linalg.solve(cov, gfx / m - torch.outer(mf, mx))
    bias = (mx - mf @ weight).float()
    weight = weight.float()
    return (lambda f: f @ weight + bias), float(ridge)


def _fit_mlp_decoder(ftr: Float[Tensor, "n_tr d"], xtr: Float[Tensor, "n_tr p"], *,
                     hidden: int, steps: int, lr: float, seed: int) -> Callable[[Tensor], Tensor]:
    """One hidden ReLU layer, full-batch Adam for ``steps`` steps, seeded initialisation."""
    d, p = ftr.shape[1], xtr.shape[1]
    g = torch.Generator().manual_seed(seed)
    w1 = (torch.randn(d, hidden, generator=g) * math.sqrt(2.0 / d)).to(ftr.device)
    w2 = (torch.randn(hidden, p, generator=g) * math.sqrt(1.0 / hidden) * 0.1).to(ftr.device)
    params = [w1.requires_grad_(), torch.zeros(hidden, device=ftr.device, requires_grad=True),
              w2.requires_grad_(), xtr.mean(0).clone().requires_grad_()]

    def forward(f: Tensor) -> Tensor:
        return torch.relu(f @ params[0] + params[1]) @ params[2] + params[3]

    opt = torch.optim.Adam(params, lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            loss = (forward(ftr) - xtr).square().mean()
            loss.backward()
            opt.step()
    return lambda f: forward(f).detach()


def _decoder_estimate(
    ftr: Float[Tensor, "n_tr d"], fte: Float[Tensor, "n_te d"], targets: _Targets, *,
    decoder: Decoder, ridge: float | None, hidden: int, steps: int, lr: float, seed: int,
) -> DecoderEstimate:
    t0 = time.perf_counter()
    ftr, fte = _standardise(ftr, fte)
    with torch.no_grad():
        if decoder == "linear":
            predict, used = _fit_linear_decoder(ftr, targets, ridge)
        elif decoder == "mlp":
            predict, used = _fit_mlp_decoder(ftr, targets.train, hidden=hidden, steps=steps,
                                             lr=lr, seed=seed), math.nan
        else:
            raise ConfigError(f"decoder must be 'linear' or 'mlp', got {decoder!r}.")
        mse = (targets.test - predict(fte)).square().mean(0).double()
    var = targets.var
    per_dim = 0.5 * torch.log(var / torch.maximum(mse, var * _MIN_RELATIVE_MSE))
    return DecoderEstimate(
        i_xf=max(0.0, float(per_dim.mean())),
        r2=float(1 - mse.sum() / var.sum()),
        mse=float(mse.mean()),
        n_dims=int(var.shape[0]),
        decoder=decoder,
        ridge=used,
        seconds=time.perf_counter() - t0,
    )


def decoder_information(
    features: Float[Tensor, "n ..."],
    inputs: Real[Tensor, "n ..."],
    *,
    seed: int = 0,
    test_fraction: float = 0.2,
    decoder: Decoder = "linear",
    ridge: float | None = None,
    hidden: int = 256,
    steps: int = 300,
    lr: float = 1e-2,
) -> DecoderEstimate:
    """``I(X;F)`` in nats per input dimension from a decoder reconstructing ``X`` from ``F``.

    See the module docstring for the estimate and its Gaussian-error assumption.

    Args:
        seed: seeds the train / held-out split (and the MLP's initialisation).
        decoder: ``"linear"`` (closed-form ridge) or ``"mlp"`` (one hidden layer, Adam).
        ridge: L2 penalty of the linear decoder relative to the standardised features' unit
            variance; None picks it from :data:`RIDGE_GRID` by the error on the last fifth of
            the training split (held-out rows are never used to choose it).
        hidden, steps, lr: the MLP decoder's width, full-batch Adam steps and learning rate.
    """
    _check_options(ridge=ridge, hidden=hidden, steps=steps, lr=lr)
    f = _features(features, "The features")
    _check_rows({"features": f.shape[0], "inputs X": inputs.shape[0] if inputs.ndim else 0})
    x = _inputs(inputs, f.device)
    train, test = (i.to(f.device) for i in _split(f.shape[0], test_fraction, seed))
    with no_denormals():
        return _decoder_estimate(f[train], f[test], _targets(x, train, test), decoder=decoder,
                                 ridge=ridge, hidden=hidden, steps=steps, lr=lr, seed=seed)


# --------------------------------------------------------------------------- I(Y;F)


def _entropy(y: Int[Tensor, " n"], n_classes: int) -> float:
    p = torch.bincount(y, minlength=n_classes).double() / y.shape[0]
    p = p[p > 0]
    return float(-(p * p.log()).sum())


def _fit_probe(f: Float[Tensor, "m d"], y: Int[Tensor, " m"], n_classes: int, l2: float,
               max_iter: int, init: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """Softmax regression, mean cross-entropy + ``l2 ||W||^2``, full-batch L-BFGS."""
    if init is None:
        weight = torch.zeros(f.shape[1], n_classes, device=f.device)
        bias = torch.zeros(n_classes, device=f.device)
    else:
        weight, bias = (t.clone() for t in init)
    weight.requires_grad_()
    bias.requires_grad_()
    opt = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, history_size=20,
                            tolerance_grad=1e-4, tolerance_change=1e-6,
                            line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(f @ weight + bias, y) + l2 * weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return weight.detach(), bias.detach()


def _probe_estimate(
    ftr: Float[Tensor, "n_tr d"], fte: Float[Tensor, "n_te d"],
    ytr: Int[Tensor, " n_tr"], yte: Int[Tensor, " n_te"], *,
    n_classes: int, h_y: float, l2: float | Sequence[float], max_iter: int,
) -> ProbeEstimate:
    t0 = time.perf_counter()
    ftr, fte = _standardise(ftr, fte)
    init = None
    if isinstance(l2, (int, float)):
        chosen = float(l2)
    else:
        grid = sorted((float(v) for v in l2), reverse=True)
        k = _inner_size(ftr.shape[0])
        chosen = grid[len(grid) // 2]
        if k:
            # warm-started path from the strongest penalty down, stopped once the
            # validation cross-entropy rises
            best = math.inf
            params = None
            for value in grid:
                params = _fit_probe(ftr[:k], ytr[:k], n_classes, value, max_iter, params)
                with torch.no_grad():
                    val = float(F.cross_entropy(ftr[k:] @ params[0] + params[1], ytr[k:]))
                if val >= best:
                    break
                best, chosen, init = val, value, params
    weight, bias = _fit_probe(ftr, ytr, n_classes, chosen, max_iter, init)
    with torch.no_grad():
        logits = fte @ weight + bias
        ce = float(F.cross_entropy(logits.double(), yte))
        accuracy = float((logits.argmax(1) == yte).double().mean())
    return ProbeEstimate(i_yf=max(0.0, h_y - ce), accuracy=accuracy, ce=ce, h_y=h_y, l2=chosen,
                         seconds=time.perf_counter() - t0)


def probe_information(
    features: Float[Tensor, "n ..."],
    labels: Int[Tensor, " n"],
    *,
    seed: int = 0,
    test_fraction: float = 0.2,
    l2: float | Sequence[float] = L2_GRID,
    max_iter: int = 100,
) -> ProbeEstimate:
    """``I(Y;F) >= H(Y) - CE_heldout`` in nats from a linear softmax probe (Barber-Agakov).

    Args:
        seed: seeds the train / held-out split.
        l2: penalty ``l2 * ||W||^2`` added to the mean cross-entropy (standardised features);
            a sequence is a grid searched from the largest value down (warm-started), by the
            cross-entropy on the last fifth of the training split; the probe is then refitted
            on the whole training split. Held-out rows are never used to choose it.
        max_iter: L-BFGS iterations per fit (full batch, strong-Wolfe line search).
    """
    _check_options(l2=l2, max_iter=max_iter)
    f = _features(features, "The features")
    _check_rows({"features": f.shape[0], "labels Y": labels.shape[0] if labels.ndim else 0})
    y, n_classes = _labels(labels, f.device)
    train, test = (i.to(f.device) for i in _split(f.shape[0], test_fraction, seed))
    with no_denormals():
        return _probe_estimate(f[train], f[test], y[train], y[test], n_classes=n_classes,
                               h_y=_entropy(y, n_classes), l2=l2, max_iter=max_iter)


# --------------------------------------------------------------------------- CKA


def _centred_gram(z: Float[Tensor, "m k"], kernel: Kernel) -> Float[Tensor, "m m"]:
    z = z - z.mean(0)
    gram = z @ z.T
    if kernel == "rbf":
        sq = gram.diagonal()
        dist = (sq[:, None] + sq[None, :] - 2 * gram).clamp_(min=0)
        m = dist.shape[0]
        off = dist.flatten()[1:].view(m - 1, m + 1)[:, :-1]  # the off-diagonal entries
        off = off[: max(1, _MEDIAN_PAIRS // m)]  # enough pairs for the median heuristic
        scale = float(off.median())
        if not scale > 0:
            scale = float(off.mean())
        gram = torch.exp(dist / (-2 * scale)) if scale > 0 else torch.ones_like(dist)
    elif kernel != "linear":
        raise ConfigError(f"kernel must be 'rbf' or 'linear', got {kernel!r}.")
    gram = gram - gram.mean(0, keepdim=True)
    return gram - gram.mean(1, keepdim=True)


def _onehot_gram(y: Int[Tensor, " m"], n_classes: int) -> Float[Tensor, "m m"]:
    onehot = F.one_hot(y, n_classes).float()
    return _centred_gram(onehot, "linear")


def _sq_norm(a: Float[Tensor, "m m"]) -> float:
    return float(a.square().sum(dtype=torch.float64))


def _cka(a: Float[Tensor, "m m"], b: Float[Tensor, "m m"], a_sq: float | None = None,
         b_sq: float | None = None) -> float:
    """``<a, b>_F / (||a||_F ||b||_F)`` of centred Gram matrices (0 if one is zero)."""
    a_sq = _sq_norm(a) if a_sq is None else a_sq
    b_sq = _sq_norm(b) if b_sq is None else b_sq
    denom = math.sqrt(a_sq * b_sq)
    return float((a * b).sum(dtype=torch.float64)) / denom if denom > 0 else 0.0


def _subsample(n: int, max_samples: int, seed: int) -> Tensor:
    check_number("cka_samples", max_samples, low=3, integer=True)
    if n <= max_samples:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed + 1))[:max_samples]


def cka(
    a: Real[Tensor, "n ..."],
    b: Real[Tensor, "n ..."],
    *,
    kernel: Kernel = "rbf",
    max_samples: int = 2000,
    seed: int = 0,
) -> float:
    """Centred kernel alignment (normalised HSIC) between two sets of rows, in ``[0, 1]``.

    Both are flattened to rows; with ``N > max_samples`` a seeded subsample of rows is used.
    ``kernel="rbf"`` uses the median heuristic for the bandwidth on each side. For labels,
    pass one-hot rows (``F.one_hot(y).float()``) with ``kernel="linear"``.
    """
    if a.shape[0] != b.shape[0]:
        raise DataError(f"Row counts differ: {a.shape[0]} vs {b.shape[0]}; row i of both must "
                        "be the same sample.")
    fa = _features(a.float() if not a.is_floating_point() else a, "The first argument")
    fb = _features(b.float() if not b.is_floating_point() else b, "The second argument")
    idx = _subsample(fa.shape[0], max_samples, seed).to(fa.device)
    return _cka(_centred_gram(fa[idx], kernel), _centred_gram(fb.to(fa.device)[idx], kernel))


# --------------------------------------------------------------------------- curve


def minmax_normalise(values: Mapping[Key, float],
                     exclude: Iterable[Key] = ()) -> dict[Key, float]:
    """``(v - min) / (max - min)`` for every key, min and max taken over the keys not in
    ``exclude`` (excluded keys are normalised with the same min and max, so they may fall
    outside [0, 1]). When the included values are all equal, every result is 0."""
    exclude = _check_exclude(values, exclude)
    included = [float(v) for k, v in values.items() if k not in exclude]
    lo, hi = min(included), max(included)
    span = hi - lo
    if not span > 1e-12 * max(1.0, abs(hi), abs(lo)):
        return {k: 0.0 for k in values}
    return {k: (float(v) - lo) / span for k, v in values.items()}


def _check_exclude(values: Mapping[Key, Any], exclude: Iterable[Key]) -> set[Key]:
    exclude = {exclude} if isinstance(exclude, (int, str)) else set(exclude)
    unknown = [k for k in exclude if k not in values]
    if unknown:
        names = [str(k) for k in values]
        raise ConfigError(f"exclude names {unknown} that are not checkpoints; checkpoints: "
                          f"{list(values)}.{suggest(str(unknown[0]), names)}")
    if len(exclude) >= len(values):
        raise ConfigError(f"exclude={sorted(map(str, exclude))} leaves no checkpoint to "
                          "normalise over; exclude fewer.")
    return exclude


def _check_options(**options: Any) -> None:
    for name, value in options.items():
        if name in ("hidden", "steps", "max_iter"):
            check_number(name, value, low=1, integer=True)
        elif name == "ridge":
            if value is not None:
                check_number(name, value, low=0, low_open=True)
        elif name == "l2":
            values = [value] if isinstance(value, (int, float)) else list(value)
            if not values:
                raise ConfigError("l2 is an empty grid; pass a number or several.")
            for v in values:
                check_number(name, v, low=0)
        else:
            check_number(name, value, low=0, low_open=True)


def _warm_up_optimizer() -> None:
    """Take one L-BFGS step on a scalar: torch's first optimizer step imports its compiler
    (seconds), which would otherwise be timed as the first checkpoint's probe."""
    w = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=1)

    def closure() -> Tensor:
        opt.zero_grad()
        loss = (w - 1).square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)


def _checkpoint(key: Key, features: Tensor, targets: _Targets, train: Tensor, test: Tensor,
                ytr: Tensor, yte: Tensor, sub: Tensor, gram_x: tuple[Tensor, float],
                gram_y: tuple[Tensor, float], *, n_classes: int, h_y: float, kernel: Kernel,
                l2: float | Sequence[float], max_iter: int, **decoder_options: Any,
                ) -> CheckpointInformation:
    """Every estimator for one checkpoint's features (inputs and labels prepared once)."""
    f = _features(features, f"Features of checkpoint {key!r}")
    _check_rows({f"features of checkpoint {key!r}": f.shape[0],
                 "inputs X": len(train) + len(test)})
    if f.device != train.device:
        raise DataError(f"Features of checkpoint {key!r} are on {f.device}, the first "
                        f"checkpoint's on {train.device}; move them to one device.")
    ftr, fte = f[train], f[test]
    dec = _decoder_estimate(ftr, fte, targets, **decoder_options)
    probe = _probe_estimate(ftr, fte, ytr, yte, n_classes=n_classes, h_y=h_y, l2=l2,
                            max_iter=max_iter)
    t0 = time.perf_counter()
    gram_f = _centred_gram(f[sub], kernel)
    sq_f = _sq_norm(gram_f)
    cka_xf = _cka(gram_f, gram_x[0], sq_f, gram_x[1])
    cka_yf = _cka(gram_f, gram_y[0], sq_f, gram_y[1])
    del gram_f
    cka_seconds = time.perf_counter() - t0
    log.info("checkpoint %r: I(X;F)=%.4g nats/dim (R^2 %.3f), I(Y;F)>=%.4g nats (acc %.3f), "
             "CKA x %.3f y %.3f", key, dec.i_xf, dec.r2, probe.i_yf, probe.accuracy,
             cka_xf, cka_yf)
    return CheckpointInformation(
        key=key, i_xf=dec.i_xf, r2_x=dec.r2, i_yf=probe.i_yf, accuracy=probe.accuracy,
        ce=probe.ce, h_y=h_y, cka_xf=cka_xf, cka_yf=cka_yf, ridge=dec.ridge, l2=probe.l2,
        seconds={"decoder": dec.seconds, "probe": probe.seconds, "cka": cka_seconds})


def information_curve(
    features_by_checkpoint: Mapping[int | str, Float[Tensor, "_n ..."]],
    inputs: Real[Tensor, "n ..."],
    labels: Int[Tensor, " n"],
    *,
    seed: int = 0,
    test_fraction: float = 0.2,
    exclude: Iterable[Key] = (),
    decoder: Decoder = "linear",
    kernel: Kernel = "rbf",
    cka_samples: int = 2000,
    ridge: float | None = None,
    l2: float | Sequence[float] = L2_GRID,
    max_iter: int = 100,
    hidden: int = 256,
    steps: int = 300,
    lr: float = 1e-2,
    progress: bool = False,
) -> InformationResult:
    """Every estimator for every checkpoint, min-max normalised across the checkpoints.

    Args:
        features_by_checkpoint: ``{checkpoint key (epoch, step or name): features [N, ...]}``,
            row i computed from ``inputs[i]`` (e.g. by :func:`collect_features`).
        inputs: ``X``, one row per sample (images, token ids, ...); flattened, scaled to [0, 1].
        labels: ``Y``, integer class ids.
        seed: seeds the train / held-out split (the same for every checkpoint), the CKA
            subsample and the MLP decoder.
        exclude: checkpoint keys left out of the normalisation's min and max (normalised
            with the others' min and max) and out of the teacher candidates, e.g. the first
            epochs, whose near-random features have outlying information.
        decoder, ridge, hidden, steps, lr: see :func:`decoder_information`.
        l2, max_iter: see :func:`probe_information`.
        kernel, cka_samples: kernel on features and inputs, and the subsample size, of CKA.

    Returns:
        :class:`InformationResult`; its ``selected`` is :func:`select_teacher`'s choice.
    """
    t_start = time.perf_counter()
    if not features_by_checkpoint:
        raise DataError("features_by_checkpoint is empty; pass {checkpoint: features}.")
    for key in features_by_checkpoint:
        if isinstance(key, bool) or not isinstance(key, (int, str)):
            raise ConfigError(f"Checkpoint keys must be ints or strings (epochs, steps, names); "
                              f"got {key!r} of type {type(key).__name__}.")
    exclude = _check_exclude(features_by_checkpoint, exclude)
    _check_options(ridge=ridge, l2=l2, max_iter=max_iter, hidden=hidden, steps=steps, lr=lr)
    if decoder not in ("linear", "mlp"):
        raise ConfigError(f"decoder must be 'linear' or 'mlp', got {decoder!r}.")
    if kernel not in ("rbf", "linear"):
        raise ConfigError(f"kernel must be 'rbf' or 'linear', got {kernel!r}.")

    n = inputs.shape[0] if inputs.ndim else 0
    _check_rows({"inputs X": n, "labels Y": labels.shape[0] if labels.ndim else 0})
    first = next(iter(features_by_checkpoint.values()))
    device = first.device
    x = _inputs(inputs, device)
    d_x = x.shape[1]
    y, n_classes = _labels(labels, device)
    train_cpu, test_cpu = _split(n, test_fraction, seed)
    train, test = train_cpu.to(device), test_cpu.to(device)
    h_y = _entropy(y, n_classes)
    targets = _targets(x, train, test)
    ytr, yte = y[train], y[test]
    sub = _subsample(n, cka_samples, seed).to(device)
    _warm_up_optimizer()
    with no_denormals():
        gram_x = _centred_gram(x[sub], kernel)
        gram_y = _onehot_gram(y[sub], n_classes)
        sq_x, sq_y = _sq_norm(gram_x), _sq_norm(gram_y)
    del x
    setup_seconds = time.perf_counter() - t_start

    rows: list[CheckpointInformation] = []
    items = tqdm(features_by_checkpoint.items(), desc="information",
                 total=len(features_by_checkpoint), disable=not progress)
    with no_denormals():
        for key, features in items:
            rows.append(_checkpoint(key, features, targets, train, test, ytr, yte, sub,
                                    (gram_x, sq_x), (gram_y, sq_y), n_classes=n_classes, h_y=h_y,
                                    kernel=kernel, decoder=decoder, ridge=ridge, hidden=hidden,
                                    steps=steps, lr=lr, seed=seed, l2=l2, max_iter=max_iter))

    result = InformationResult(
        checkpoints=rows, exclude=list(exclude), n_samples=n, n_train=len(train_cpu),
        n_test=len(test_cpu), d_x=d_x, n_classes=n_classes, decoder=decoder,
        kernel=kernel, cka_samples=len(sub), seed=seed, setup_seconds=setup_seconds)
    choice = select_teacher(result)
    nx, ny = result.normalised("i_xf"), result.normalised("i_yf")
    for row, score in zip(rows, choice.scores):
        row.i_xf_norm, row.i_yf_norm, row.score = nx[row.key], ny[row.key], score
    result.selected = choice.key
    result.seconds = time.perf_counter() - t_start
    return result


def select_teacher(
    result: InformationResult,
    exclude: Iterable[Key] | None = None,
    *,
    method: Method = "variational",
) -> TeacherChoice:
    """The paper's rule: the checkpoint maximising ``norm I(X;F) + norm I(Y;F)``.

    Both are min-max normalised across the checkpoints (:func:`minmax_normalise`); keys in
    ``exclude`` (default: the result's own) are left out of the min and max and are not
    candidates. Ties go to the earlier checkpoint in the result's order.

    Args:
        method: ``"variational"`` (decoder ``i_xf`` and probe ``i_yf``, as the paper) or
            ``"cka"`` (``cka_xf`` and ``cka_yf``).

    Returns:
        :class:`TeacherChoice` with the key and the seconds the estimates took (it unpacks
        as ``key, seconds``).
    """
    if method not in ("variational", "cka"):
        raise ConfigError(f"method must be 'variational' or 'cka', got {method!r}.")
    if not result.checkpoints:
        raise DataError("The information result has no checkpoints.")
    exclude = set(result.exclude if exclude is None else exclude)
    names = ("i_xf", "i_yf") if method == "variational" else ("cka_xf", "cka_yf")
    nx = result.normalised(names[0], exclude)
    ny = result.normalised(names[1], exclude)
    keys = result.keys
    scores = [nx[k] + ny[k] for k in keys]
    best = max((i for i, k in enumerate(keys) if k not in exclude), key=lambda i: (scores[i], -i))
    used = ("decoder", "probe") if method == "variational" else ("cka",)
    seconds = sum(c.seconds.get(u, 0.0) for c in result.checkpoints for u in used)
    if method == "cka":
        seconds += result.setup_seconds
    return TeacherChoice(key=keys[best], score=scores[best], seconds=seconds, method=method,
                         exclude=list(exclude), keys=keys, scores=scores)
