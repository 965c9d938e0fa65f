"""compare_codecs: our coder's real code lengths next to the model NLLs and generic codecs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from analyses.compression import (
    PER_IMAGE_CODECS,
    CompressionResult,
    compare_codecs,
    plot_codecs,
)
from analyses.ood import codec_bits_per_dim
from interp.compress import QuantizedLocalModel
from interp.errors import ConfigError, DataError
from interp.models.pixel import FullPixelCNN, LocalPixelCNN, PixelConfig


def _model(channels: int = 1, head: str = "logistic", std: float = 0.2) -> LocalPixelCNN:
    torch.manual_seed(0)
    m = LocalPixelCNN(PixelConfig(channels=channels, horizon=2, hidden=6 * channels,
                                  blocks=1, head=head, mixtures=3))
    with torch.no_grad():
        for p in m.parameters():
            torch.nn.init.normal_(p, std=std)
    return m


def _smooth(n: int, c: int, size: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(0, 200, size)
    img = ramp[None, None, :, None] + ramp[None, None, None, :] * 0.2
    img = img + torch.rand(n, c, 1, 1, generator=g) * 40 + torch.randn(n, c, size, size,
                                                                          generator=g) * 2
    return img.clamp(0, 255).round().to(torch.uint8)


@pytest.fixture(scope="module")
def digits():
    from interp.data.images import mnist_digits

    return mnist_digits().images[:8]


@pytest.fixture(scope="module")
def gray_result(digits):
    return compare_codecs(_model(1), digits, batch_size=4)


def test_result_fields_and_consistency(gray_result, digits):
    r = gray_result
    assert (r.n_images, r.channels, r.height, r.width) == (8, 1, 28, 28)
    assert r.roundtrip_exact is True
    assert set(r.codec_bpd) == {*PER_IMAGE_CODECS, "zlib_set", "lzma_set"}
    assert set(r.decode_images_per_s) == {"sequential", "wavefront"}
    assert r.encode_images_per_s > 0 and all(v > 0 for v in r.decode_images_per_s.values())
    # headers make per-image streams longer than their payload; one stream amortises them
    assert r.stream_bpd > r.payload_bpd > 0 and r.set_stream_bpd < r.stream_bpd
    # the coder reaches the quantized model's NLL within 1% plus a few bytes per image
    assert r.payload_bpd <= 1.01 * r.quantized_nll_bpd + 8 * 8 / 784
    assert abs(r.quantization_gap) < 0.01
    assert math.isclose(r.quantization_gap, r.quantized_nll_bpd / r.float_nll_bpd - 1)
    # the per-image codec numbers are analyses.ood's
    np.testing.assert_allclose(r.codec_bpd["png"], codec_bits_per_dim(digits, "png").mean())
    assert len(r.per_image) == 8 and {"stream", "float_nll", "webp"} <= set(r.per_image[0])


def test_table_plot_and_json_round_trip(gray_result):
    rows = gray_result.table()
    assert [r["bits/dim"] for r in rows] == sorted(r["bits/dim"] for r in rows)
    assert any(r["method"] == "PNG" for r in rows)
    fig = plot_codecs(gray_result)
    assert fig.layout.xaxis.title.text and "bits/dim" in fig.layout.yaxis.title.text
    assert len(fig.data[0].x) == len(rows)
    back = CompressionResult.from_json(gray_result.to_json())
    assert back.codec_bpd == gray_result.codec_bpd and back.per_image == gray_result.per_image
    assert "per_image" not in repr(back)


def test_colour_images_with_a_quantized_model():
    q = QuantizedLocalModel.from_model(_model(3, "categorical"))
    x = _smooth(3, 3, 10)
    r = compare_codecs(q, x.numpy(), schedules=["wavefront"], codecs=["png", "zlib"])
    assert r.roundtrip_exact and r.channels == 3
    assert math.isnan(r.float_nll_bpd) and math.isnan(r.quantization_gap)
    assert set(r.decode_images_per_s) == {"wavefront"}
    assert set(r.codec_bpd) == {"png", "zlib", "zlib_set", "lzma_set"}
    assert not any(math.isnan(row["bits/dim"]) for row in r.table())


def test_bad_arguments():
    m = _model(1)
    x = _smooth(2, 1, 6)
    with pytest.raises(ConfigError, match="schedule 'zigzag'"):
        compare_codecs(m, x, schedules=["zigzag"])
    with pytest.raises(ConfigError, match="LocalPixelCNN"):
        compare_codecs(FullPixelCNN(PixelConfig(kind="full", hidden=6, dilations=(1,))), x)
    with pytest.raises(DataError, match="1-channel model"):
        compare_codecs(m, _smooth(2, 3, 6))
    with pytest.raises(DataError, match="at least one image"):
        compare_codecs(m, x[:0])
