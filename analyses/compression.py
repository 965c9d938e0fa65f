"""Lossless compression with a local pixel model, against the codecs people would use instead.

:func:`compare_codecs` encodes a set of images with :mod:`interp.compress` (the integer copy of
a :class:`~interp.models.pixel.LocalPixelCNN` plus ANS), decodes them again with every decode
schedule to check the round trip is bit-exact, times both directions, and puts the actual
code lengths next to

- the likelihoods: the float model's NLL and the quantized (integer) model's NLL, which is
  what the coder can reach (the difference between the two is the quantization gap; the
  difference between the code length and the quantized NLL is the coder's overhead plus the
  stream headers);
- generic lossless codecs on the same images: PNG (Pillow, ``optimize=True``), WebP lossless
  (``quality=100, method=6``), zlib (level 9) and lzma (preset 9 | extreme) per image - via
  :func:`analyses.ood.codec_bits_per_dim` - and zlib / lzma of the whole set concatenated
  (the fairest comparison for :func:`~interp.compress.encode_stream`'s one stream for all).

All numbers are bits per subpixel (bits/dim): ``8 * bytes / (C*H*W)``, averaged over images.
:func:`plot_codecs` draws them as bars.
"""

from __future__ import annotations

import lzma
import math
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import plotly.graph_objects as go
import torch
from jaxtyping import UInt8
from torch import Tensor

from analyses.ood import codec_bits_per_dim
from interp.compress import (
    SCHEDULES,
    QuantizedLocalModel,
    decode,
    decode_stream,
    encode,
    encode_stream,
    stream_info,
)
from interp.errors import ConfigError, DataError, check_number, suggest
from interp.plots import color_for, figure
from interp.results import Result, bulky

__all__ = ["PER_IMAGE_CODECS", "CompressionResult", "compare_codecs", "plot_codecs"]

#: Generic codecs compared image by image (names of :func:`analyses.ood.codec_bits_per_dim`).
PER_IMAGE_CODECS: tuple[str, ...] = ("png", "webp", "zlib", "lzma")

Images = UInt8[Tensor, "n c h w"] | UInt8[np.ndarray, "n c h w"]


@dataclass(repr=False)
class CompressionResult(Result):
    """Code lengths (bits/dim) of our coder and of generic codecs on the same images.

    Attributes:
        n_images, channels, height, width: the image set.
        head, horizon, weight_bits: the model and its quantization.
        stream_bpd: our per-image streams (:func:`~interp.compress.encode`), headers included.
        payload_bpd: the same without the stream headers (the entropy coder's output).
        set_stream_bpd: one stream for all images (:func:`~interp.compress.encode_stream`).
        quantized_nll_bpd: the integer model's NLL (what the coder should reach).
        float_nll_bpd: the float model's NLL (NaN when only a quantized model was given).
        quantization_gap: ``quantized / float - 1`` (relative; NaN without the float model).
        coder_overhead: ``payload / quantized NLL - 1`` (relative).
        codec_bpd: generic codecs per image (``png``, ``webp``, ``zlib``, ``lzma``) and on the
            whole set concatenated (``zlib_set``, ``lzma_set``).
        roundtrip_exact: every decode (each schedule, and the one-stream decode) gave back the
            images bit for bit.
        encode_images_per_s: :func:`~interp.compress.encode`'s throughput (wall clock).
        decode_images_per_s: :func:`~interp.compress.decode`'s throughput per schedule.
        per_image: per-image bits/dim of ours, the NLLs and the codecs.
    """

    n_images: int
    channels: int
    height: int
    width: int
    head: str
    horizon: int
    weight_bits: int
    stream_bpd: float
    payload_bpd: float
    set_stream_bpd: float
    quantized_nll_bpd: float
    float_nll_bpd: float
    quantization_gap: float
    coder_overhead: float
    codec_bpd: dict[str, float]
    roundtrip_exact: bool
    encode_images_per_s: float
    decode_images_per_s: dict[str, float]
    per_image: list[dict[str, float]] = bulky(list)

    def table(self) -> list[dict[str, Any]]:
        """One row per method, best first: ``{"method", "bits/dim"}``."""
        rows = [("ours: one stream for all", self.set_stream_bpd),
                ("ours: per-image streams", self.stream_bpd),
                ("ours: per-image payload (no headers)", self.payload_bpd),
                ("quantized model NLL", self.quantized_nll_bpd),
                ("float model NLL", self.float_nll_bpd)]
        rows += [(_LABELS.get(k, k), v) for k, v in self.codec_bpd.items()]
        rows = [(k, v) for k, v in rows if not (isinstance(v, float) and math.isnan(v))]
        return [{"method": k, "bits/dim": v} for k, v in sorted(rows, key=lambda r: r[1])]


_LABELS = {"png": "PNG", "webp": "WebP lossless", "zlib": "zlib -9", "lzma": "lzma -9e",
           "bz2": "bz2 -9", "zlib_set": "zlib -9 (whole set)", "lzma_set": "lzma -9e (whole set)"}


def _as_tensor(images) -> Tensor:
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.ascontiguousarray(images))
    return images.detach().to("cpu").contiguous()


def compare_codecs(
    model: QuantizedLocalModel | torch.nn.Module,
    images: Images,
    *,
    weight_bits: int = 12,
    schedules: Sequence[str] = SCHEDULES,
    batch_size: int = 64,
    codecs: Sequence[str] = PER_IMAGE_CODECS,
) -> CompressionResult:
    """Compress ``images`` with the model and with generic codecs; verify and time the coder.

    Args:
        model: a :class:`~interp.models.pixel.LocalPixelCNN` (quantized here with
            ``weight_bits``; its float NLL is reported too) or a ready
            :class:`~interp.compress.QuantizedLocalModel`.
        images: uint8 ``[N, C, H, W]`` (torch or NumPy), ``C`` the model's channels.
        weight_bits: bits per integer weight when ``model`` is a float model.
        schedules: decode schedules to verify and time (``"sequential"``, ``"wavefront"``).
        batch_size: images decoded in lockstep.
        codecs: generic per-image codecs (:data:`PER_IMAGE_CODECS`, or ``"bz2"`` too).

    Returns:
        A :class:`CompressionResult`.
    """
    from interp.models.pixel import LocalPixelCNN

    x = _as_tensor(images)
    if x.shape[0] == 0:
        raise DataError("compare_codecs needs at least one image.")
    schedules = list(schedules)
    for s in schedules:
        if s not in SCHEDULES:
            raise ConfigError(f"schedule {s!r} is unknown; use {', '.join(SCHEDULES)}."
                              f"{suggest(str(s), SCHEDULES)}")
    check_number("batch_size", batch_size, low=1, integer=True)
    if isinstance(model, QuantizedLocalModel):
        q, float_bpd = model, None
    elif isinstance(model, LocalPixelCNN):
        q = QuantizedLocalModel.from_model(model, weight_bits=weight_bits)
    else:
        raise ConfigError(f"compare_codecs needs a LocalPixelCNN or a QuantizedLocalModel, got "
                          f"{type(model).__name__} (for a FullPixelCNN pass its .local).")
    if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] != q.channels:
        raise DataError(f"images must be uint8 [N, {q.channels}, H, W] for this "
                        f"{q.channels}-channel model, got {x.dtype} of shape {tuple(x.shape)}.")
    if isinstance(model, LocalPixelCNN):
        was_training = model.training
        model.eval()
        dev = next(model.parameters()).device
        with torch.no_grad():
            float_bpd = torch.cat([model.bits_per_dim(x[i:i + 256].to(dev)).cpu()
                                   for i in range(0, x.shape[0], 256)]).double()
        model.train(was_training)
    n, C, H, W = x.shape
    dims = C * H * W

    t0 = time.perf_counter()
    streams = encode(q, x)
    enc_rate = n / max(time.perf_counter() - t0, 1e-9)
    exact = True
    dec_rate = {}
    for s in schedules:
        t0 = time.perf_counter()
        y = decode(q, streams, schedule=s, batch_size=batch_size)
        dec_rate[s] = n / max(time.perf_counter() - t0, 1e-9)
        exact = exact and bool(torch.equal(y, x))
    one = encode_stream(q, x)
    exact = exact and bool(torch.equal(decode_stream(q, one), x))

    stream_bits = np.array([8.0 * len(s) for s in streams]) / dims
    payload_bits = np.array([8.0 * sum(stream_info(s).payload_bytes) for s in streams]) / dims
    q_bpd = q.bits_per_dim(x).double().numpy()
    per_codec = {c: codec_bits_per_dim(x, c) for c in codecs}
    raw = np.ascontiguousarray(x.numpy().transpose(0, 2, 3, 1)).tobytes()
    codec_bpd = {c: float(v.mean()) for c, v in per_codec.items()}
    codec_bpd["zlib_set"] = 8.0 * len(zlib.compress(raw, 9)) / (n * dims)
    codec_bpd["lzma_set"] = 8.0 * len(lzma.compress(raw, preset=9 | lzma.PRESET_EXTREME)) / (n * dims)

    fb = float("nan") if float_bpd is None else float(float_bpd.mean())
    qb = float(q_bpd.mean())
    per_image = []
    for i in range(n):
        row = {"stream": float(stream_bits[i]), "payload": float(payload_bits[i]),
               "quantized_nll": float(q_bpd[i])}
        if float_bpd is not None:
            row["float_nll"] = float(float_bpd[i])
        row.update({c: float(v[i]) for c, v in per_codec.items()})
        per_image.append(row)
    return CompressionResult(
        n_images=n, channels=C, height=H, width=W, head=q.head, horizon=q.horizon,
        weight_bits=int(q.config["weight_bits"]),
        stream_bpd=float(stream_bits.mean()), payload_bpd=float(payload_bits.mean()),
        set_stream_bpd=8.0 * len(one) / (n * dims), quantized_nll_bpd=qb, float_nll_bpd=fb,
        quantization_gap=qb / fb - 1 if float_bpd is not None and fb > 0 else float("nan"),
        coder_overhead=float(payload_bits.mean()) / qb - 1 if qb > 0 else float("nan"),
        codec_bpd=codec_bpd, roundtrip_exact=exact, encode_images_per_s=enc_rate,
        decode_images_per_s=dec_rate, per_image=per_image)


def plot_codecs(result: CompressionResult) -> go.Figure:
    """Bars of bits/dim per method (ours, the model NLLs, the generic codecs), best first."""
    rows = result.table()
    names = [r["method"] for r in rows]
    vals = [r["bits/dim"] for r in rows]
    colors = [color_for(n, i) if not n.startswith(("ours", "quantized", "float"))
              else ("#0072B2" if n.startswith("ours") else "#56B4E9") for i, n in enumerate(names)]
    fig = figure(title=f"Lossless code length on {result.n_images} images of "
                       f"{result.channels}x{result.height}x{result.width} "
                       f"({result.head} head, horizon {result.horizon})",
                 height=460, width=760, showlegend=False)
    fig.add_trace(go.Bar(x=names, y=vals, marker_color=colors,
                         text=[f"{v:.3f}" for v in vals], textposition="outside",
                         hovertemplate="%{x}: %{y:.4f} bits/dim<extra></extra>"))
    fig.update_xaxes(title_text="method (codec)", tickangle=-30)
    fig.update_yaxes(title_text="code length (bits per subpixel, bits/dim)", rangemode="tozero")
    return fig
