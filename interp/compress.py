"""Lossless image compression with a local pixel model: an integer model, rANS, wavefront decoding.

NeLLoC-style coding (see ``/work/shared/research/image-likelihood.md``): one forward pass of a
:class:`~interp.models.pixel.LocalPixelCNN` gives every subpixel's distribution, an entropy
coder (constriction's stack ANS) turns them into bits, and the decoder recovers the pixels one
at a time - or, because each pixel only sees ``h`` rows up and ``h`` columns left/right, a
whole anti-diagonal *wave* at a time.

Why an integer model
--------------------
Encoder and decoder must compute bit-identical probabilities, but float network outputs
differ in the last ulp between thread counts, batch sizes and SIMD tails. The coder therefore
uses :class:`QuantizedLocalModel`, an integer copy of the float model whose every step is
exact and so independent of summation order:

- Inputs are the odd integers ``a = 2x - 255`` (``a / 255`` is the float model's [-1, 1]
  input, and zero padding is the same in both).
- Each layer's (causally masked) weights are integers of ``weight_bits`` bits with a
  power-of-two scale per output channel; the input layer absorbs the 1/255. Layers run as
  float64 ``F.conv2d``/matmuls on integer-valued tensors; every partial sum stays below 2^52
  (asserted from the weight and activation ranges when quantizing), so every sum is exact in
  any order. After each layer the accumulator is rounded to ``act_frac_bits`` fractional bits
  by adding half and floor-dividing by a power of two (exact), then clamped to
  ``act_bits`` bits; ReLUs sit where the float model has them.
- The head gives integer parameters (16 fractional bits). Per subpixel an integer CDF
  ``Wcum(v)``, ``v = 0..256`` (0 to ``2^28``), is built with integer arithmetic only (no float
  function is ever evaluated at coding time): categorical: weights
  ``r_v = E[clamp(max_l - l_v, 0, Dmax)] + 1`` with ``E[d] = floor(2^24 exp(-d / 2^10))``
  (a table from Python's ``math.exp``; the ``+1`` keeps every value possible), then
  ``Wcum(v) = floor(cumsum(r)_v 2^28 / sum(r))``; logistic mixture: each component's CDF at
  the bin edges through an interpolated integer sigmoid table at the fixed-point argument
  ``u = (edge - mu) * inv_s`` (``inv_s`` from a table of ``exp(-log_s)``; ``log_s`` clamped to
  [-7, 7], ``mu`` to [-4, 4]; CDF = 0 below value 0 and full above 255, as the float model's
  edge cases), mixed with weights from the E table, plus a uniform floor of weight 1e-4 like
  the float model's.
- Coding is in two stages per subpixel: the value's bucket ``v // 16`` with weights from
  ``Wcum`` at the bucket bounds, then its offset ``v % 16`` with weights from ``Wcum``
  inside the bucket, each renormalised to integer weights ``w`` summing to ``2^24 - 16``.
  The model's probability of a value is ``(wb + 1)(wf + 1) / 2^48``: the ``+1`` means nothing
  has zero probability. (Two stages of 16 need ``Wcum`` at 34 points per subpixel instead of
  257 - the logistic mixture's decoding cost - for about 2.5 more bytes of coder state per
  channel.)
- The weights go to ``constriction.stream.model.Categorical(perfect=False)`` with the stack
  coder ``AnsCoder``. Its fast (lazy) quantizer maps 16 weights summing to ``2^24 - 16`` to
  exactly ``(w + 1) / 2^24`` at its 24-bit precision (scale exactly 1, all sums exact
  integers below 2^24), so the code length is the quantized model's own NLL plus a few bytes
  of final coder state. ``perfect=True`` would search for a "better" approximation of weights
  that are already exact, only slower; ``perfect`` is set explicitly because its default
  changes between constriction versions, which would change the bitstream.

Streams
-------
Every image gets one self-contained stream (:func:`encode`): a header of 16 bytes for small
grayscale images (magic ``LPC``, format version, C, H, W, substream lengths, a 4-byte check
that hashes these fields with the quantized model's fingerprint - so a stream of another
model or a damaged header is refused before decoding, and a corrupted size can never make
the decoder run long - and the image's CRC32) and two ANS substreams (buckets, offsets) per
colour channel. Within a substream the pixels are in *wavefront order* (by wave
``i*(h+1) + j``, then row; see :func:`wavefront_order`), a valid causal order for both schedules: ``"sequential"``
decodes one pixel (all channels in order) per step, ``"wavefront"`` all pixels of a wave per
step (``D + (h+1)(D-1)`` steps for a ``D x D`` image), both batched across images. Channels and stages need their
own substreams because the wavefront decoder decodes stage 1 of channel 0 for a whole wave
before stage 2, and channel 0 before channel 1 (channel ``c`` depends on channels ``< c`` of
the same pixel), while the sequential one goes pixel by pixel. :func:`encode_stream` puts
many images of one size into one stream (one header, one coder per substream). Decoding
verifies everything: a truncated or corrupted stream, a stream of another model or format
raises :class:`~interp.errors.DataError` and never hangs (every loop is bounded by the pixel
count; the CRC32 and the coder's end state are checked).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import struct
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, no_type_check

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int64, UInt8
from torch import Tensor

from interp.errors import ConfigError, DataError, check_number, suggest
from interp.io import read_json, read_tensors, save_tensors, write_json

__all__ = [
    "FORMAT_VERSION", "SCHEDULES", "QuantizedLocalModel", "StreamInfo", "decode",
    "decode_stream", "encode", "encode_stream", "load_quantized", "num_waves",
    "save_quantized", "stream_info", "wavefront_order",
]

Schedule = Literal["sequential", "wavefront"]
SCHEDULES = ("sequential", "wavefront")
Images = UInt8[Tensor, "n c h w"] | UInt8[np.ndarray, "n c h w"]

#: Bitstream format version (bump when the integer model's arithmetic or the layout changes).
FORMAT_VERSION = 1
MAGIC = b"LPC"          # one image per stream
MAGIC_MULTI = b"LPM"    # many images of one size in one stream
#: constriction's default ANS coder works at 24-bit probability precision.
PRECISION = 24
BUCKET = 16                     # values per bucket: a value is coded as (bucket, offset)
STAGE_TOTAL = (1 << PRECISION) - BUCKET  # sum of a stage's weights; the coder adds 1 to each
BASE_TOTAL = 1 << 28            # the integer model's CDF runs from 0 to this
OUT_FRAC = 16                   # fractional bits of the head's integer outputs
_E_FRAC = 10                    # the E table's argument resolution: 2^-10 nats
_E_BITS = 24                    # E[0] = 2^24
_CDF_BITS = 30                  # component CDFs in units of 2^-30
_U_FRAC = 20                    # sigmoid argument: 20 fractional bits
_SIG_STEP = 10                  # sigmoid table step 2^-10, linear interpolation between
_SIG_RANGE = 32                 # |u| <= 32
_IS_BITS = 32                   # inv_s / 255 in units of 2^-32
_LOG_S_MIN, _LOG_S_MAX = -7, 7  # log_s clamp (the float model clamps at -7 below)
_MU_MAX = 4                     # |mu| <= 4 (the data lives in [-1, 1])
_UNIFORM_WEIGHT = 1e-4          # as the float model's logistic head
_EXACT_LIMIT = 1 << 52          # every float64 partial sum stays below this
_UNIFORM_FLOOR = round(_UNIFORM_WEIGHT * BASE_TOTAL / 256)  # base weight of every value
MAX_PIXELS = 1 << 24            # per image: a header claiming more is corrupt
_FAMILY = None


@no_type_check
def _family():
    global _FAMILY
    if _FAMILY is None:
        import constriction

        # perfect=False: the fast, lazy quantizer (see the module docstring). Must be explicit.
        _FAMILY = constriction.stream.model.Categorical(perfect=False)
    return _FAMILY


# --------------------------------------------------------------------------- lookup tables


@dataclass(frozen=True)
class _Tables:
    exp: np.ndarray  # E[d] = floor(2^24 exp(-d / 2^10)), d = 0..DMAX (E[DMAX] = 0)
    sig: np.ndarray  # round(2^30 sigmoid(k / 2^10 - 32)), k = 0..65536
    sig_packed: np.ndarray  # (sig[k + 1] - sig[k], 0 at the end) << 32 | sig[k]: one gather
    inv_s: np.ndarray  # round(2^32 exp(-k / 2^10) / 255), k = -7*2^10..7*2^10 (offset)
    digest: bytes


@functools.cache
def _tables() -> _Tables:
    """The integer lookup tables, from Python's ``math.exp`` (the same on every run)."""
    scale = 1 << _E_BITS
    exp = []
    d = 0
    while True:
        v = math.floor(scale * math.exp(-d / (1 << _E_FRAC)))
        exp.append(v)
        if v == 0:
            break
        d += 1
    half = _SIG_RANGE << _SIG_STEP
    sig = []
    for k in range(2 * half + 1):
        t = (k - half) / (1 << _SIG_STEP)
        s = 1.0 / (1.0 + math.exp(-t)) if t >= 0 else math.exp(t) / (1.0 + math.exp(t))
        sig.append(round(s * (1 << _CDF_BITS)))
    lo, hi = _LOG_S_MIN << _E_FRAC, _LOG_S_MAX << _E_FRAC
    inv_s = [round(math.exp(-k / (1 << _E_FRAC)) * (1 << _IS_BITS) / 255) for k in range(lo, hi + 1)]
    t = {n: np.array(v, dtype=np.int64) for n, v in
         (("exp", exp), ("sig", sig), ("inv_s", inv_s))}
    h = hashlib.sha256()
    for n in ("exp", "sig", "inv_s"):
        h.update(t[n].astype("<i8").tobytes())
        t[n].flags.writeable = False
    slope = np.append(np.diff(t["sig"]), 0)
    assert int(slope.max()) <= 1 << 18 and int(t["sig"].max()) <= 1 << _CDF_BITS
    packed = (slope << 32) | t["sig"]
    packed.flags.writeable = False
    return _Tables(t["exp"], t["sig"], packed, t["inv_s"], h.digest())


# The integer PMF stage works on NumPy int64 arrays: exact, the same on every thread count,
# and with less per-call overhead than torch for the decoder's small batches. The helpers
# called once per decoding step are @no_type_check: a run-time type check per call (as the
# test suite's import hook adds) would cost more than the step itself; the public functions
# that call them are checked.


@no_type_check
def _exp_weights(logits: np.ndarray, tab: _Tables) -> np.ndarray:
    """E[clamp(max - l, 0, Dmax)] along the last axis (integer logits, OUT_FRAC bits)."""
    d = (logits.max(-1, keepdims=True) - logits) >> (OUT_FRAC - _E_FRAC)
    return tab.exp.take(np.minimum(d, tab.exp.size - 1, out=d))


@no_type_check
def _cumulative(params: np.ndarray, v: np.ndarray, head: str, mixtures: int) -> np.ndarray:
    """The base model's integer CDF ``Wcum(v)`` (``[M, E]``) for integer head parameters
    ``[M, P]`` at points ``v`` ``[M, E]`` (or ``[E]`` for all rows) in 0..256: ``Wcum(0) =
    0``, ``Wcum(256) = BASE_TOTAL``, nondecreasing; ``Wcum(v+1) - Wcum(v)`` is value ``v``'s
    weight. Integer arithmetic only (every product below 2^63)."""
    tab = _tables()
    if head == "categorical":
        r = _exp_weights(params, tab) + 1                   # [M, 256], <= 2^24 + 1
        s = r.sum(1, keepdims=True)                         # < 2^33
        if v.ndim == 1:
            cum = r.cumsum(1)[:, np.maximum(v - 1, 0)]
        else:
            cum = np.take_along_axis(r.cumsum(1), np.maximum(v - 1, 0), 1)
        return np.where(v > 0, cum, 0) * BASE_TOTAL // s    # < 2^61
    # components outermost ([K, M, E]): the mixture's sum adds K contiguous arrays
    k = mixtures
    pi = _exp_weights(params[:, :k], tab).T[:, :, None]    # [K, M, 1], <= 2^24
    mu_max = _MU_MAX << OUT_FRAC
    mu255 = 255 * np.clip(params[:, k:2 * k], -mu_max, mu_max).T[:, :, None]
    ls = params[:, 2 * k:] >> (OUT_FRAC - _E_FRAC)
    np.clip(ls, _LOG_S_MIN << _E_FRAC, _LOG_S_MAX << _E_FRAC, out=ls)
    inv_s = tab.inv_s.take(ls - (_LOG_S_MIN << _E_FRAC)).T[:, :, None]  # [K, M, 1], <= 2^34.1
    # bin edges in units of 1/255 (a = 2x - 255 space): value x spans (2x-256, 2x-254]
    edge = (2 * v - 256) << OUT_FRAC                        # [M, E] or [E]
    u = np.subtract(edge, mu255)                            # [K, M, E], |.| < 2^26.3
    u *= inv_s                                              # < 2^60.4
    u >>= OUT_FRAC + _IS_BITS - _U_FRAC
    lim = _SIG_RANGE << _U_FRAC
    np.clip(u, -lim, lim - 1, out=u)
    shift = _U_FRAC - _SIG_STEP
    idx = u >> shift
    idx += _SIG_RANGE << _SIG_STEP
    u &= (1 << shift) - 1                                   # the fraction, < 2^10
    # one gather of (slope << 32 | sig); slope <= 2^18, so slope * fraction < 2^28
    packed = tab.sig_packed.take(idx)
    cdf = (packed >> 32) * u
    cdf >>= shift
    packed &= 0xFFFFFFFF
    cdf += packed                                           # [K, M, E], <= 2^30
    cdf *= pi
    pi_sum = pi.sum(0)                                      # [M, 1]
    mix = cdf.sum(0) >> _CDF_BITS                           # <= sum(pi) <= K 2^24
    # CDF 0 below value 0 and full above 255, whatever the components say
    mix = np.where(v == 0, 0, np.where(v == 256, pi_sum, mix))
    u0 = _UNIFORM_FLOOR
    return u0 * v + mix * (BASE_TOTAL - 256 * u0) // pi_sum  # < 2^58


@no_type_check
def _coarse(wc: np.ndarray) -> np.ndarray:
    """Coder CDF of the bucket stage from ``Wcum`` at bucket bounds (``0 .. STAGE_TOTAL``)."""
    return wc * STAGE_TOTAL // BASE_TOTAL


@no_type_check
def _fine(wc: np.ndarray, lo: np.ndarray, hi: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Coder CDF of the within-bucket stage at offset ``j`` (``Wcum`` at ``16b + j``, the
    bucket's bounds ``lo``, ``hi``); a bucket of zero base weight is uniform."""
    span = hi - lo
    return np.where(span > 0, (wc - lo) * STAGE_TOTAL // np.maximum(span, 1),
                    j * STAGE_TOTAL // BUCKET)


_COARSE_V = np.arange(0, 257, BUCKET, dtype=np.int64)
_FINE_J = np.arange(BUCKET + 1, dtype=np.int64)
_INNER_J = _FINE_J[1:-1]


@no_type_check
def _coarse_weights(params: np.ndarray, head: str, mixtures: int
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Bucket-stage weights ``[M, 16]`` (sum STAGE_TOTAL), and ``Wcum`` at the bucket
    bounds ``[M, 17]`` for :func:`_fine_weights`. ``Wcum(0)`` and ``Wcum(256)`` are
    constants, so only the 15 inner bounds are computed."""
    inner = _cumulative(params, _COARSE_V[1:-1], head, mixtures)
    wc = np.zeros((inner.shape[0], _COARSE_V.size), dtype=np.int64)
    wc[:, 1:-1] = inner
    wc[:, -1] = BASE_TOTAL
    c = _coarse(wc)
    return c[:, 1:] - c[:, :-1], wc


@no_type_check
def _fine_weights(params: np.ndarray, bucket: np.ndarray, bounds: np.ndarray, head: str,
                  mixtures: int) -> np.ndarray:
    """Within-bucket weights ``[M, 16]`` (sum STAGE_TOTAL) for the decoded buckets ``[M]``;
    ``bounds``: ``Wcum`` at the bucket bounds from :func:`_coarse_weights` (the buckets'
    ends are taken from there, only the 15 inner points are computed)."""
    rows = np.arange(bucket.size)
    lo, hi = bounds[rows, bucket][:, None], bounds[rows, bucket + 1][:, None]
    wc = np.empty((bucket.size, BUCKET + 1), dtype=np.int64)
    wc[:, 0], wc[:, -1] = lo[:, 0], hi[:, 0]
    wc[:, 1:-1] = _cumulative(params, bucket[:, None] * BUCKET + _INNER_J, head, mixtures)
    f = _fine(wc, lo, hi, _FINE_J)
    return f[:, 1:] - f[:, :-1]


@no_type_check
def _stage_bounds(params: np.ndarray, x: np.ndarray, head: str, mixtures: int
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Both stages' coder intervals of symbols ``x`` ``[M]``: bucket ``[lo, hi)`` and
    within-bucket ``[lo, hi)`` (in 0..STAGE_TOTAL), from ``Wcum`` at four points."""
    x = x.astype(np.int64)
    b = x // BUCKET
    j = x - b * BUCKET
    v = np.stack([b * BUCKET, b * BUCKET + BUCKET, x, x + 1], 1)
    wc = _cumulative(params, v, head, mixtures)
    lo, hi = wc[:, 0], wc[:, 1]
    return (_coarse(lo), _coarse(hi), _fine(wc[:, 2], lo, hi, j), _fine(wc[:, 3], lo, hi, j + 1))


# --------------------------------------------------------------------------- the model


@dataclass
class _Layer:
    """One integer layer: ``floor((x @ W.T + b + half) * scale)``, clamped (float64, exact)."""

    weight_t: Tensor  # [in, out], integers
    bias: Tensor      # [out], integers: the bias (at the accumulator's scale) + 2^(s-1) or 0
    scale: Tensor     # [out], 2^-s

    def sub(self, inputs: int, outputs: slice) -> _Layer:
        """The layer restricted to its first ``inputs`` inputs and to ``outputs``."""
        return _Layer(self.weight_t[:inputs, outputs].contiguous(), self.bias[outputs],
                      self.scale[outputs])


def _quantize_layer(w: Tensor, b: Tensor, in_exp: int, out_exp: int, weight_bits: int
                    ) -> dict[str, Tensor]:
    """Integer weights ``round(w 2^k)`` of ``weight_bits`` bits with one power-of-two scale
    ``k`` per output row, the bias at the accumulator's scale ``2^(k + in_exp)``, and the
    output shift ``s = k + in_exp - out_exp``."""
    w = w.detach().to("cpu", torch.float64).reshape(w.shape[0], -1)
    b = b.detach().to("cpu", torch.float64)
    wmax = (1 << (weight_bits - 1)) - 1
    ks = []
    for row in w.abs().amax(1).tolist():
        k = (weight_bits - 1) - math.frexp(row)[1] if row > 0 else 0
        ks.append(min(k, 40 - in_exp))  # tiny rows: keep the bias scale bounded
    k = torch.tensor(ks, dtype=torch.int64)
    pw = torch.ldexp(torch.ones_like(b), k.to(torch.float64))
    wq = torch.round(w * pw[:, None]).clamp_(-wmax, wmax)
    bq = torch.round(torch.ldexp(b, (k + in_exp).to(torch.float64)))
    return {"weight": wq.to(torch.int64), "bias": bq.to(torch.int64),
            "shift": k + in_exp - out_exp}


def _make_layer(t: dict[str, Tensor], name: str, in_max: float) -> _Layer:
    w = t[f"{name}.weight"].to(torch.float64)
    w = w.reshape(w.shape[0], -1)
    b = t[f"{name}.bias"].to(torch.float64)
    s = t[f"{name}.shift"].to(torch.float64)
    half = torch.where(s > 0, torch.ldexp(torch.ones_like(s), (s - 1).clamp(min=0)),
                       torch.zeros_like(s))
    bound = (w.abs().sum(1) * in_max + b.abs() + half).max().item() if w.numel() else 0.0
    if not bound < _EXACT_LIMIT:
        raise ConfigError(
            f"Quantized layer {name}: partial sums could reach {bound:.3g} >= 2^52, where "
            "float64 stops being exact. Use fewer weight_bits or act_bits.")
    return _Layer(w.t().contiguous(), b + half, torch.ldexp(torch.ones_like(s), -s))


class QuantizedLocalModel:
    """An integer copy of a :class:`~interp.models.pixel.LocalPixelCNN` for entropy coding.

    Build it with :meth:`from_model`; save and load it with :func:`save_quantized` /
    :func:`load_quantized`. Every output is an exact integer function of the image, the same
    on any machine, thread count and batch composition (see the module docstring).

    Attributes:
        config: architecture (``channels, horizon, hidden, blocks, head, mixtures``) and
            quantization settings (``weight_bits, act_bits, act_frac_bits``).
        tensors: the integer weights, biases and shifts (int64), by layer name.
        fingerprint: 4 bytes identifying the weights, settings and lookup tables (the first
            bytes of ``digest``); every stream's header check is keyed with ``digest``, so a
            stream of another model is refused.
    """

    KEYS = ("channels", "horizon", "hidden", "blocks", "head", "mixtures", "weight_bits",
            "act_bits", "act_frac_bits")

    def __init__(self, config: dict, tensors: dict[str, Tensor]) -> None:
        missing = [k for k in self.KEYS if k not in config]
        if missing:
            raise DataError(f"Quantized model config has no {missing[0]!r} entry; it was "
                            "written by another version or is incomplete.")
        self.config = {k: config[k] for k in self.KEYS}
        c = self.config
        self.channels, self.horizon, self.hidden = int(c["channels"]), int(c["horizon"]), int(c["hidden"])
        self.n_blocks, self.head, self.mixtures = int(c["blocks"]), str(c["head"]), int(c["mixtures"])
        if self.head not in ("categorical", "logistic"):
            raise DataError(f"Quantized model head {self.head!r} is unknown.")
        if self.head == "logistic" and self.mixtures > 64:
            raise ConfigError(f"mixtures={self.mixtures}: the integer mixture supports at most "
                              "64 components.")
        self.n_params = 256 if self.head == "categorical" else 3 * self.mixtures
        self.tensors = {k: v.to("cpu", torch.int64).contiguous() for k, v in tensors.items()}
        self.act_max = float((1 << (int(c["act_bits"]) - 1)) - 1)
        names = ["conv_in"] + [f"blocks.{i}.conv{j}" for i in range(self.n_blocks)
                               for j in (1, 2)] + ["head"]
        for n in names:
            for part in ("weight", "bias", "shift"):
                if f"{n}.{part}" not in self.tensors:
                    raise DataError(f"Quantized model has no tensor {n}.{part!r}; the file is "
                                    "incomplete or of another kind.")
        C, h = self.channels, self.horizon
        self.kernel = (h + 1, 2 * h + 1)
        self.fan_in = C * self.kernel[0] * self.kernel[1]
        shapes = {"conv_in": (self.hidden, C, *self.kernel),
                  "head": (C * self.n_params, self.hidden)}
        shapes.update({f"blocks.{i}.conv{j}": (self.hidden, self.hidden)
                       for i in range(self.n_blocks) for j in (1, 2)})
        for n, shape in shapes.items():
            got = [tuple(self.tensors[f"{n}.{part}"].shape) for part in ("weight", "bias", "shift")]
            if got != [shape, shape[:1], shape[:1]]:
                raise DataError(f"Quantized layer {n} has tensors of shapes {got}, expected "
                                f"{[shape, shape[:1], shape[:1]]} for this configuration; the "
                                "file is damaged or of another model.")
        w0 = self.tensors["conv_in.weight"]
        self._conv_in = _make_layer(self.tensors, "conv_in", 255.0)
        self._conv_w = w0.to(torch.float64)
        self._blocks = [(_make_layer(self.tensors, f"blocks.{i}.conv1", self.act_max),
                         _make_layer(self.tensors, f"blocks.{i}.conv2", self.act_max))
                        for i in range(self.n_blocks)]
        self._head = _make_layer(self.tensors, "head", self.act_max)
        p = self.n_params
        # Channel c's parameters only depend on the hidden units of colour groups <= c (the
        # first n_c units; every weight from a later group into them is masked to zero), so
        # the decoder, which needs one channel at a time, runs only those: exact, and 1/3
        # and 2/3 of the work for channels 0 and 1 of a colour image.
        self._per_channel = []
        for c in range(C):
            n_c = int((torch.arange(self.hidden) * C // self.hidden <= c).sum())
            keep = slice(0, n_c)
            self._per_channel.append((
                self._conv_in.sub(self.fan_in, keep),
                [(l1.sub(n_c, keep), l2.sub(n_c, keep)) for l1, l2 in self._blocks],
                self._head.sub(n_c, slice(c * p, (c + 1) * p))))
        h_ = hashlib.sha256(json.dumps(self.config, sort_keys=True).encode())
        h_.update(FORMAT_VERSION.to_bytes(1, "little"))
        for k in sorted(self.tensors):
            h_.update(k.encode())
            h_.update(self.tensors[k].numpy().astype("<i8").tobytes())
        h_.update(_tables().digest)
        self.digest: bytes = h_.digest()
        self.fingerprint: bytes = self.digest[:4]

    # ------------------------------------------------------------------ building
    @classmethod
    def from_model(cls, local, weight_bits: int = 12, act_bits: int = 32,
                   act_frac_bits: int = 16) -> QuantizedLocalModel:
        """Quantize a :class:`~interp.models.pixel.LocalPixelCNN` (see the module docstring).

        Args:
            local: the float model (its masked weights are used; any device).
            weight_bits: bits per integer weight, sign included (one power-of-two scale per
                output channel).
            act_bits: bits of the hidden activations (they are clamped to that range).
            act_frac_bits: fractional bits of the hidden activations.
        """
        from interp.models.pixel import LocalPixelCNN

        if not isinstance(local, LocalPixelCNN):
            raise ConfigError(f"QuantizedLocalModel.from_model needs a LocalPixelCNN, got "
                              f"{type(local).__name__}: only a local model has the finite "
                              "horizon the wavefront decoder relies on (use model.local of a "
                              "FullPixelCNN).")
        check_number("weight_bits", weight_bits, low=2, high=24, integer=True)
        check_number("act_bits", act_bits, low=8, high=40, integer=True)
        check_number("act_frac_bits", act_frac_bits, low=0, high=act_bits - 2, integer=True)
        cfg = local.config
        t: dict[str, Tensor] = {}

        def add(name: str, conv, in_exp: int, out_exp: int, in_scale: float = 1.0) -> None:
            w = conv.weight.detach().double() * conv.causal_mask.double() / in_scale
            for k, v in _quantize_layer(w, conv.bias, in_exp, out_exp, weight_bits).items():
                t[f"{name}.{k}"] = v

        a = act_frac_bits
        add("conv_in", local.conv_in, 0, a, 255.0)
        t["conv_in.weight"] = t["conv_in.weight"].reshape(local.conv_in.weight.shape)
        for i, blk in enumerate(local.blocks):
            add(f"blocks.{i}.conv1", blk.conv1, a, a)
            add(f"blocks.{i}.conv2", blk.conv2, a, a)
        add("head", local.head, a, OUT_FRAC)
        config = {"channels": cfg.channels, "horizon": cfg.horizon, "hidden": cfg.hidden,
                  "blocks": cfg.blocks, "head": cfg.head, "mixtures": cfg.mixtures,
                  "weight_bits": weight_bits, "act_bits": act_bits, "act_frac_bits": a}
        return cls(config, t)

    def __repr__(self) -> str:
        c = self.config
        return (f"QuantizedLocalModel(C={self.channels}, horizon={self.horizon}, "
                f"hidden={self.hidden}, blocks={self.n_blocks}, head={self.head!r}, "
                f"weight_bits={c['weight_bits']}, fingerprint={self.fingerprint.hex()})")

    # ------------------------------------------------------------------ integer network
    @no_type_check
    def _tail(self, hid: Tensor, channel: int | None, patches: bool = False) -> Tensor:
        """Blocks and head on ``[M, hidden]`` integer features (or, with ``patches``, the
        input layer first on flattened patches ``[M, C*(h+1)*(2h+1)]``) -> int64 parameters
        (of one channel, or all). Each layer: ``floor((x @ W.T + b + half) * 2^-s)``,
        clamped; every value an integer below 2^52, so float64 is exact."""
        amax = self.act_max
        if channel is None:
            conv_in, blocks, head = self._conv_in, self._blocks, self._head
        else:
            conv_in, blocks, head = self._per_channel[channel]
        if patches:
            L = conv_in
            hid = torch.addmm(L.bias, hid, L.weight_t).mul_(L.scale).floor_().clamp_(-amax, amax)
        for l1, l2 in blocks:
            t = torch.addmm(l1.bias, hid.clamp(min=0), l1.weight_t)
            t = t.mul_(l1.scale).floor_().clamp_(0, amax)      # the next ReLU folded in
            t = torch.addmm(l2.bias, t, l2.weight_t).mul_(l2.scale).floor_().clamp_(-amax, amax)
            hid = t.add_(hid).clamp_(-amax, amax)
        L = head
        out = torch.addmm(L.bias, hid.clamp(min=0), L.weight_t)
        return out.mul_(L.scale).floor_().clamp_(-amax, amax).to(torch.int64)

    def _check_images(self, images, what: str = "images") -> Tensor:
        if isinstance(images, np.ndarray):
            images = torch.from_numpy(np.ascontiguousarray(images))
        if not isinstance(images, Tensor) or images.dtype != torch.uint8 or images.ndim != 4:
            raise DataError(f"{what} must be uint8 [N, C, H, W], got "
                            f"{getattr(images, 'dtype', type(images).__name__)} of shape "
                            f"{tuple(getattr(images, 'shape', ()))}.")
        if images.shape[1] != self.channels:
            raise DataError(f"{what} have {images.shape[1]} channels but the model codes "
                            f"{self.channels}.")
        if images.shape[0] == 0 or images.shape[2] == 0 or images.shape[3] == 0:
            raise DataError(f"{what} are empty (shape {tuple(images.shape)}).")
        return images.to("cpu").contiguous()

    def _chunks(self, x: Tensor, pixels: int = 8192):
        """Yield ``(first image, int64 parameters [b, H, W, C, P])`` over chunks of images
        (about ``pixels`` pixels each): the batched integer forward pass."""
        n, C, H, W = x.shape
        h = self.horizon
        step = max(1, pixels // (H * W))
        L = self._conv_in
        for s in range(0, n, step):
            a = F.pad(x[s:s + step].to(torch.float64) * 2 - 255, (h, h, h, 0))
            acc = F.conv2d(a, self._conv_w)                     # [b, hidden, H, W], exact
            acc = acc.permute(0, 2, 3, 1).reshape(-1, self.hidden)
            hid = acc.add_(L.bias).mul_(L.scale).floor_().clamp_(-self.act_max, self.act_max)
            yield s, self._tail(hid, None).reshape(-1, H, W, C, self.n_params)

    def params(self, images: Images) -> Int64[Tensor, "n c p h w"]:
        """Integer head parameters of every subpixel (one batched pass; exact)."""
        x = self._check_images(images)
        return torch.cat([p for _, p in self._chunks(x)]).permute(0, 3, 4, 1, 2)

    def pmf(self, images: Images) -> Int64[Tensor, "n c h w 256"]:
        """Each subpixel's integer PMF as the coder sees it: ``(wb + 1) * (wf + 1)`` for the
        value's bucket and offset weights; every row sums to exactly 2^48."""
        x = self._check_images(images)
        out = []
        for _, p in self._chunks(x):
            flat = p.reshape(-1, self.n_params).numpy()
            wc = _cumulative(flat, np.arange(257), self.head, self.mixtures)
            wb = np.diff(_coarse(wc[:, ::BUCKET]), axis=1) + 1                 # [M, 16]
            seg = np.lib.stride_tricks.sliding_window_view(wc, BUCKET + 1, axis=1)[:, ::BUCKET]
            wf = np.diff(_fine(seg, seg[..., :1], seg[..., -1:], _FINE_J), axis=2) + 1
            out.append(torch.from_numpy(wb[:, :, None] * wf).reshape(*p.shape[:4], 256))
        return torch.cat(out).permute(0, 3, 1, 2, 4)


    def stage_bounds(self, images: Images) -> Int64[Tensor, "4 n c h w"]:
        """Every subpixel's two coder intervals: bucket ``[lo, hi)`` and offset ``[lo, hi)``
        (each in ``0..2^24-16``), from one batched pass."""
        x = self._check_images(images)
        out = []
        for s, p in self._chunks(x):
            b = p.shape[0]
            sym = x[s:s + b].permute(0, 2, 3, 1).reshape(-1).numpy()
            bounds = _stage_bounds(p.reshape(-1, self.n_params).numpy(), sym, self.head,
                                   self.mixtures)
            out.append(torch.from_numpy(np.stack(bounds)).reshape(4, *p.shape[:4]))
        return torch.cat(out, 1).permute(0, 1, 4, 2, 3)

    def nll_bits(self, images: Images) -> Float[Tensor, " n"]:
        """Per-image code length the quantized model implies, ``-sum log2 p``, in bits."""
        b0, b1, f0, f1 = self.stage_bounds(images).to(torch.float64)
        bits = 2 * PRECISION - torch.log2(b1 - b0 + 1) - torch.log2(f1 - f0 + 1)
        return bits.flatten(1).sum(1)

    def bits_per_dim(self, images: Images) -> Float[Tensor, " n"]:
        """Per-image NLL of the quantized model in bits per subpixel (what the coder reaches)."""
        x = self._check_images(images)
        return self.nll_bits(x) / x[0].numel()


# --------------------------------------------------------------------------- save / load


def save_quantized(qmodel: QuantizedLocalModel, path: str | Path) -> Path:
    """Write ``qmodel`` to the directory ``path`` (``quantized.safetensors`` with the integer
    tensors, ``quantized.json`` with the settings and fingerprint), atomically per file."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_tensors(path / "quantized.safetensors", qmodel.tensors,
                 metadata={"fingerprint": qmodel.fingerprint.hex()})
    write_json(path / "quantized.json", {"format_version": FORMAT_VERSION,
                                         "fingerprint": qmodel.fingerprint.hex(),
                                         "config": qmodel.config})
    return path


def load_quantized(path: str | Path) -> QuantizedLocalModel:
    """Read a model written by :func:`save_quantized`; a missing, damaged or mismatched file
    raises DataError naming it."""
    path = Path(path)
    fix = "Write it again with interp.compress.save_quantized."
    meta = read_json(path / "quantized.json", what="Quantized model settings", fix=fix)
    if "config" not in meta or "fingerprint" not in meta:
        raise DataError(f"Quantized model settings {str(path / 'quantized.json')!r} have no "
                        f"'config'/'fingerprint' entry. {fix}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise DataError(f"Quantized model {str(path)!r} has format version "
                        f"{meta.get('format_version')!r}; this code reads {FORMAT_VERSION}. {fix}")
    tensors = read_tensors(path / "quantized.safetensors", what="Quantized model weights", fix=fix)
    model = QuantizedLocalModel(meta["config"], tensors)
    if model.fingerprint.hex() != meta["fingerprint"]:
        raise DataError(f"Quantized model {str(path)!r}: fingerprint {model.fingerprint.hex()} "
                        f"does not match the stored {meta['fingerprint']} (damaged file, or "
                        f"this machine builds different lookup tables). {fix}")
    return model


# --------------------------------------------------------------------------- orders


def num_waves(height: int, width: int, horizon: int) -> int:
    """Decoding steps of the wavefront schedule: ``(h'+1)(H-1) + W`` with ``h' = min(h, W-1)``
    (``D + (h+1)(D-1)`` for a ``D x D`` image)."""
    return (min(horizon, width - 1) + 1) * (height - 1) + width


@functools.lru_cache(maxsize=64)
def wavefront_order(height: int, width: int, horizon: int) -> tuple[np.ndarray, np.ndarray]:
    """(raster indices of the pixels in stream order, start offset of every wave + the end).

    Pixel ``(i, j)`` belongs to wave ``i*(h'+1) + j`` with ``h' = min(h, W-1)`` (an image
    narrower than the horizon clips the context on the right); within a wave pixels go by
    row. Every pixel's context (rows above within ``h`` columns, ``h`` pixels to the left)
    lies in earlier waves, and no wave is empty."""
    i, j = np.divmod(np.arange(height * width), width)
    wave = i * (min(horizon, width - 1) + 1) + j
    order = np.lexsort((i, wave))
    counts = np.bincount(wave, minlength=num_waves(height, width, horizon))
    bounds = np.concatenate([[0], np.cumsum(counts)])
    return order, bounds


@functools.lru_cache(maxsize=64)
def _patch_index(C: int, H: int, W: int, h: int) -> tuple[Tensor, Tensor]:
    """Flat indices (into the padded ``[C, H+h, W+2h]`` image) of every pixel's patch
    ``[HW, C*(h+1)*(2h+1)]`` in stream order, and of every pixel itself ``[C, HW]``."""
    order, _ = wavefront_order(H, W, h)
    Hp, Wp = H + h, W + 2 * h
    i, j = np.divmod(order, W)
    c = np.arange(C)[:, None, None]
    r = np.arange(h + 1)[None, :, None]
    q = np.arange(2 * h + 1)[None, None, :]
    base = (c * Hp + r) * Wp + q                                    # [C, h+1, 2h+1]
    patch = base.reshape(1, -1) + (i * Wp + j)[:, None]
    own = np.arange(C)[:, None] * Hp * Wp + ((i + h) * Wp + (j + h))[None, :]
    return torch.from_numpy(patch), torch.from_numpy(own)


# --------------------------------------------------------------------------- headers


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


class _Reader:
    def __init__(self, data: bytes, label: str):
        self.data, self.pos, self.label = data, 0, label

    def fail(self, what: str) -> DataError:
        return DataError(f"{self.label} is truncated/corrupted: {what}; re-encode or check the "
                         "file.")

    def take(self, n: int, what: str) -> bytes:
        if self.pos + n > len(self.data):
            raise self.fail(f"it ends inside the {what} (byte {self.pos} of {len(self.data)})")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def varint(self, what: str) -> int:
        n = shift = 0
        for _ in range(10):
            b = self.take(1, what)[0]
            n |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                return n
        raise self.fail(f"its {what} is not a valid number")


@dataclass(frozen=True)
class StreamInfo:
    """What a stream's header says (see :func:`stream_info`)."""

    images: int
    channels: int
    height: int
    width: int
    check: str          # hash of the model's fingerprint and the header fields (hex)
    crc32: int          # of the image bytes (C, H, W order; all images for a multi stream)
    header_bytes: int
    payload_bytes: tuple[int, ...]

    def _repr_html_(self) -> str:
        """A compact table in Jupyter."""
        from interp.results import html_table

        rows = [("images", self.images), ("shape (C x H x W)",
                                          f"{self.channels} x {self.height} x {self.width}"),
                ("header bytes", self.header_bytes),
                ("payload bytes", " + ".join(f"{b:,}" for b in self.payload_bytes)),
                ("check", self.check), ("crc32", f"{self.crc32:08x}")]
        return html_table(rows, caption="StreamInfo")


def _words(payload: np.ndarray) -> bytes:
    """ANS words as little-endian bytes, without the last word's zero high bytes."""
    return payload.astype("<u4").tobytes().rstrip(b"\x00")


def _check(q: QuantizedLocalModel, fields: bytes) -> bytes:
    """4 bytes tying a header to the model: a stream of another model, or one whose header
    fields were damaged, fails this check before any decoding."""
    return hashlib.sha256(q.digest + fields).digest()[:4]


def _header(magic: bytes, q: QuantizedLocalModel, n: int | None, H: int, W: int, crc: int,
            payloads: list[bytes]) -> bytes:
    head = [magic, bytes([FORMAT_VERSION, q.channels])]
    if n is not None:
        head.append(_varint(n))
    head += [_varint(H), _varint(W)] + [_varint(len(p)) for p in payloads[:-1]]
    fields = b"".join(head)
    return b"".join([fields, _check(q, fields), struct.pack("<I", crc)] + payloads)


def _parse(data: bytes, q: QuantizedLocalModel | None, label: str, multi: bool
           ) -> tuple[StreamInfo, list[bytes]]:
    """Header and substreams of a stream; every inconsistency raises DataError."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise DataError(f"{label} must be bytes, got {type(data).__name__}.")
    data = bytes(data)
    r = _Reader(data, label)
    magic = r.take(3, "header")
    want = MAGIC_MULTI if multi else MAGIC
    if magic != want:
        other = MAGIC if multi else MAGIC_MULTI
        hint = (f" (it is a {'single-image' if multi else 'multi-image'} stream: use "
                f"{'decode' if multi else 'decode_stream'})") if magic == other else ""
        raise DataError(f"{label} is not a local-pixel-codec stream (magic {magic!r}, "
                        f"expected {want!r}){hint}; re-encode or check the file.")
    version, C = r.take(2, "header")
    if version != FORMAT_VERSION:
        raise DataError(f"{label} has format version {version}; this code reads version "
                        f"{FORMAT_VERSION}. Decode it with the version that wrote it, or the "
                        "file is corrupted; re-encode or check the file.")
    n = r.varint("image count") if multi else 1
    H, W = r.varint("height"), r.varint("width")
    if C < 1 or H < 1 or W < 1 or n < 1 or H * W > MAX_PIXELS or n * H * W * C > 8 * MAX_PIXELS:
        raise r.fail(f"its header gives an impossible size (N={n}, C={C}, H={H}, W={W})")
    sizes = [r.varint("substream length") for _ in range(2 * C - 1)]
    fields = data[:r.pos]
    check = r.take(4, "header check")
    (crc,) = struct.unpack("<I", r.take(4, "checksum"))
    if q is not None and check != _check(q, fields):
        if C != q.channels:
            raise DataError(f"{label} holds {C}-channel images but the model codes "
                            f"{q.channels} channels (or its header is corrupted); decode it "
                            "with the model that wrote it, or re-encode.")
        raise DataError(f"{label} was not encoded with this model (fingerprint "
                        f"{q.fingerprint.hex()}), or its header is truncated/corrupted; decode "
                        "it with the model that wrote it (load_quantized of its saved copy), "
                        "or re-encode / check the file.")
    header_bytes = r.pos
    rest = len(data) - r.pos
    if sum(sizes) > rest:
        raise r.fail(f"its substreams need {sum(sizes)} bytes but only {rest} follow the header")
    sizes.append(rest - sum(sizes))
    payloads = [r.take(s, "payload") for s in sizes]
    info = StreamInfo(n, C, H, W, check.hex(), crc, header_bytes, tuple(sizes))
    return info, payloads


def stream_info(stream: bytes) -> StreamInfo:
    """Parse a stream's header (either kind) without a model (nothing is verified beyond
    the layout)."""
    multi = bytes(stream[:3]) == MAGIC_MULTI
    return _parse(stream, None, "stream", multi)[0]


def _coder(payload: bytes, label: str):
    import constriction

    pad = (-len(payload)) % 4
    words = np.frombuffer(payload + b"\x00" * pad, dtype="<u4").astype(np.uint32)
    try:
        return constriction.stream.stack.AnsCoder(words)
    except (ValueError, RuntimeError) as e:  # e.g. a last word of zero
        raise DataError(f"{label} is truncated/corrupted: the coder refuses its payload ({e}); "
                        "re-encode or check the file.") from e


# --------------------------------------------------------------------------- encoding


def _rows(lo: Tensor, hi: Tensor, x: Tensor) -> np.ndarray:
    """float32 ``[M, 16]`` weight rows giving symbol ``x`` exactly its coder interval
    ``[lo, hi)`` of a stage: ``lo`` at ``x-1``, ``hi - lo`` at ``x``, the rest at ``x+1`` (sum
    STAGE_TOTAL). The coder only looks at the row's sum up to ``x`` and its total, so this
    encodes exactly as the decoder's full row of weights does."""
    m = x.shape[0]
    rows = np.zeros((m, BUCKET + 2), dtype=np.float32)
    ar = np.arange(m)
    xi = x.numpy()
    rows[ar, xi] = lo.numpy()
    rows[ar, xi + 1] = (hi - lo).numpy()
    rows[ar, xi + 2] = (STAGE_TOTAL - hi).numpy()
    return np.ascontiguousarray(rows[:, 1:BUCKET + 1])


def _encode_symbols(coder, x: Tensor, lo: Tensor, hi: Tensor, chunk: int = 1 << 16) -> None:
    """Push one stage's symbols (in decode order) onto an ANS stack, last chunk first."""
    fam = _family()
    m = x.shape[0]
    for s in reversed(range(0, m, chunk)):
        sl = slice(s, s + chunk)
        coder.encode_reverse(x[sl].numpy().astype(np.int32), fam, _rows(lo[sl], hi[sl], x[sl]))


def _prepare(q: QuantizedLocalModel, images) -> tuple[Tensor, list[tuple[Tensor, Tensor, Tensor]]]:
    """The images, and per substream (channel c: ``2c`` buckets, ``2c+1`` offsets) the
    symbols and their coder intervals ``[n, HW]`` in stream order."""
    x = q._check_images(images)
    n, C, H, W = x.shape
    if H * W > MAX_PIXELS:
        raise ConfigError(f"Images of {H}x{W} pixels exceed the codec's {MAX_PIXELS} pixels.")
    order, _ = wavefront_order(H, W, q.horizon)
    ordt = torch.from_numpy(order)
    bounds = q.stage_bounds(x).reshape(4, n, C, H * W)[..., ordt]
    sym = x.reshape(n, C, H * W)[..., ordt].to(torch.int64)
    bucket, offset = sym // BUCKET, sym % BUCKET
    subs = []
    for c in range(C):
        subs.append((bucket[:, c], bounds[0, :, c], bounds[1, :, c]))
        subs.append((offset[:, c], bounds[2, :, c], bounds[3, :, c]))
    return x, subs


def encode(qmodel: QuantizedLocalModel, images: Images) -> list[bytes]:
    """One self-contained stream per image, from one batched pass of the integer model.

    Args:
        qmodel: the integer model (:meth:`QuantizedLocalModel.from_model`).
        images: uint8 ``[N, C, H, W]`` with ``C = qmodel.channels``; any size from 1x1.

    Returns:
        ``N`` byte strings; :func:`decode` recovers the images bit-exactly.
    """
    import constriction

    x, subs = _prepare(qmodel, images)
    n, C, H, W = x.shape
    out = []
    for b in range(n):
        payloads = []
        for sym, lo, hi in subs:
            coder = constriction.stream.stack.AnsCoder()
            _encode_symbols(coder, sym[b], lo[b], hi[b])
            payloads.append(_words(coder.get_compressed()))
        crc = zlib.crc32(x[b].numpy().tobytes())
        out.append(_header(MAGIC, qmodel, None, H, W, crc, payloads))
    return out


def encode_stream(qmodel: QuantizedLocalModel, images: Images) -> bytes:
    """All images (one size) in one stream: one header and one coder per substream, so the
    per-image overhead disappears; :func:`decode_stream` decodes all of them together."""
    import constriction

    x, subs = _prepare(qmodel, images)
    n, C, H, W = x.shape
    payloads = []
    for sym, lo, hi in subs:
        coder = constriction.stream.stack.AnsCoder()
        # stream order: pixel (in wavefront order) major, image minor
        _encode_symbols(coder, sym.t().reshape(-1), lo.t().reshape(-1), hi.t().reshape(-1))
        payloads.append(_words(coder.get_compressed()))
    crc = zlib.crc32(x.numpy().tobytes())
    return _header(MAGIC_MULTI, qmodel, n, H, W, crc, payloads)


# --------------------------------------------------------------------------- decoding


def _check_schedule(schedule: str) -> None:
    if schedule not in SCHEDULES:
        raise ConfigError(f"schedule {schedule!r} is unknown; use one of "
                          f"{', '.join(SCHEDULES)}.{suggest(str(schedule), SCHEDULES)}")


@no_type_check
def _pop(coders: list, weights: np.ndarray, B: int, k: int, label: str) -> np.ndarray:
    """Decode one symbol per row of ``weights`` ``[B*k, 16]`` (image-major) from one
    substream: ``coders`` holds one coder per image, or one for all (pixel-major order)."""
    fam = _family()
    w = np.ascontiguousarray(weights, dtype=np.float32).reshape(B, k, BUCKET)
    try:
        if len(coders) == 1 and B > 1:
            rows = np.ascontiguousarray(w.transpose(1, 0, 2)).reshape(k * B, BUCKET)
            return coders[0].decode(fam, rows).reshape(k, B).T.reshape(-1).astype(np.int64)
        if k == 1:
            return np.array([coders[b].decode(fam, w[b]) for b in range(B)],
                            dtype=np.int64).reshape(-1)
        return np.concatenate([coders[b].decode(fam, w[b]) for b in range(B)]).astype(np.int64)
    except (ValueError, RuntimeError) as e:  # constriction's own errors
        raise DataError(f"{label} is truncated/corrupted: the coder failed ({e}); re-encode "
                        "or check the file.") from e


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Run torch on one thread inside (restored after). The decoder's steps are many small
    operations that gain nothing from more threads, and OpenMP's busy waiting makes them
    many times slower when other jobs share the cores."""
    n = torch.get_num_threads()
    if n > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if n > 1:
            torch.set_num_threads(n)


def _run_decoder(q: QuantizedLocalModel, coders: list[list], B: int, H: int, W: int,
                 schedule: str, label: str) -> Tensor:
    """Decode ``B`` images of ``H x W`` in lockstep. ``coders[s]`` (substream ``s``) is one
    coder per image, or a single coder holding all images (pixel-major order)."""
    with _one_thread():
        return _decode_steps(q, coders, B, H, W, schedule, label)


def _decode_steps(q: QuantizedLocalModel, coders: list[list], B: int, H: int, W: int,
                  schedule: str, label: str) -> Tensor:
    C, h = q.channels, q.horizon
    Hp, Wp = H + h, W + 2 * h
    a = torch.zeros(B, C * Hp * Wp, dtype=torch.float64)   # a = 2x - 255; pads stay 0
    patch_idx, own_idx = _patch_index(C, H, W, h)
    _, bounds = wavefront_order(H, W, h)
    if schedule == "wavefront":
        steps = zip(bounds[:-1].tolist(), bounds[1:].tolist())
    else:
        steps = ((p, p + 1) for p in range(H * W))
    for start, stop in steps:                                # bounded: <= H*W steps
        k = stop - start
        idx = patch_idx[start:stop]
        for c in range(C):
            params = q._tail(a[:, idx].reshape(B * k, q.fan_in), c, patches=True).numpy()
            weights, bounds = _coarse_weights(params, q.head, q.mixtures)
            bucket = _pop(coders[2 * c], weights, B, k, label)
            offset = _pop(coders[2 * c + 1],
                          _fine_weights(params, bucket, bounds, q.head, q.mixtures), B, k,
                          label)
            value = torch.from_numpy((bucket * BUCKET + offset) * 2 - 255).reshape(B, k)
            a[:, own_idx[c, start:stop]] = value.to(torch.float64)
    img = a.reshape(B, C, Hp, Wp)[:, :, h:, h:h + W]
    return ((img + 255) / 2).to(torch.uint8)


def _left_over(coders: list) -> bool:
    return any(not cd.is_empty() for cd in coders)


def decode(qmodel: QuantizedLocalModel, streams: Sequence[bytes],
           schedule: Schedule = "wavefront", batch_size: int = 64) -> UInt8[Tensor, "n c h w"]:
    """Decode streams of :func:`encode` (all of one image size) bit-exactly.

    Args:
        qmodel: the model that encoded them (its fingerprint is checked).
        streams: byte strings, one image each.
        schedule: ``"wavefront"`` (all pixels of an anti-diagonal wave per step,
            :func:`num_waves` steps) or ``"sequential"`` (one pixel per step, ``H*W`` steps).
            Both give the same images; neither depends on threads or batching.
        batch_size: images decoded in lockstep (one integer-network pass per step for all).
            The steps run on one torch thread (they are many small operations; OpenMP's
            busy waiting would slow them down on shared cores); to use more cores, decode
            several lists of streams in separate processes.

    Returns:
        uint8 ``[N, C, H, W]``.

    Raises:
        DataError: a stream is truncated, corrupted, of another model or format, or the
            streams hold images of different sizes.
    """
    _check_schedule(schedule)
    check_number("batch_size", batch_size, low=1, integer=True)
    if isinstance(streams, (bytes, bytearray)):
        raise DataError("decode takes a list of streams (one per image); for one stream of "
                        "encode_stream use decode_stream.")
    streams = list(streams)
    if not streams:
        raise DataError("decode got no streams.")
    parsed = [_parse(s, qmodel, f"stream {i}", multi=False) for i, s in enumerate(streams)]
    shapes = {(p[0].height, p[0].width) for p in parsed}
    if len(shapes) > 1:
        raise DataError(f"The streams hold images of {len(shapes)} different sizes "
                        f"({sorted(shapes)[:3]}...); decode each size separately.")
    (H, W), C = shapes.pop(), qmodel.channels
    out = torch.empty(len(streams), C, H, W, dtype=torch.uint8)
    for s in range(0, len(streams), batch_size):
        batch = parsed[s:s + batch_size]
        coders = [[_coder(p[1][i], f"stream {s + b}") for b, p in enumerate(batch)]
                  for i in range(2 * C)]
        label = f"stream {s}" if len(batch) == 1 else f"one of streams {s}..{s + len(batch) - 1}"
        img = _run_decoder(qmodel, coders, len(batch), H, W, schedule, label)
        for b, (info, _) in enumerate(batch):
            what = ""
            if _left_over([cd[b] for cd in coders]):
                what = "data is left over after the last pixel"
            elif zlib.crc32(img[b].numpy().tobytes()) != info.crc32:
                what = "the decoded image fails its CRC32 check"
            if what:
                raise DataError(f"stream {s + b} is truncated/corrupted: {what}; re-encode or "
                                "check the file.")
        out[s:s + len(batch)] = img
    return out


def decode_stream(qmodel: QuantizedLocalModel, stream: bytes,
                  schedule: Schedule = "wavefront") -> UInt8[Tensor, "n c h w"]:
    """Decode a stream of :func:`encode_stream` (all its images together)."""
    _check_schedule(schedule)
    info, payloads = _parse(stream, qmodel, "stream 0", multi=True)
    coders = [[_coder(p, "stream 0")] for p in payloads]
    img = _run_decoder(qmodel, coders, info.images, info.height, info.width, schedule,
                       "stream 0")
    what = ""
    if _left_over([cd[0] for cd in coders]):
        what = "data is left over after the last pixel"
    elif zlib.crc32(img.numpy().tobytes()) != info.crc32:
        what = "the decoded images fail their CRC32 check"
    if what:
        raise DataError(f"stream 0 is truncated/corrupted: {what}; re-encode or check the "
                        "file.")
    return img
