"""Lossless coding with the integer local pixel model: exact round trips on any schedule,
thread count and batch, code length at the model's NLL, and clear errors on bad streams."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import zlib
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from interp.compress import (
    BUCKET,
    SCHEDULES,
    QuantizedLocalModel,
    _tables,
    decode,
    decode_stream,
    encode,
    encode_stream,
    load_quantized,
    num_waves,
    save_quantized,
    stream_info,
    wavefront_order,
)
from interp.errors import ConfigError, DataError
from interp.models.pixel import FullPixelCNN, LocalPixelCNN, PixelConfig

ROOT = Path(__file__).resolve().parents[2]
#: Examples of the property-based round trip (the benchmark runs 10,000).
HYPOTHESIS_EXAMPLES = int(os.environ.get("INTERP_COMPRESS_EXAMPLES", "1000"))


def random_model(head: str = "logistic", channels: int = 1, horizon: int = 2,
                 hidden: int | None = None, blocks: int = 1, std: float = 0.3,
                 seed: int = 0, mixtures: int = 3) -> LocalPixelCNN:
    """An untrained model with large random weights: peaky, varied distributions."""
    torch.manual_seed(seed)
    hidden = hidden or (8 if channels == 1 else 9)
    m = LocalPixelCNN(PixelConfig(channels=channels, horizon=horizon, hidden=hidden,
                                  blocks=blocks, head=head, mixtures=mixtures))
    with torch.no_grad():
        for p in m.parameters():
            torch.nn.init.normal_(p, std=std)
    return m.eval()


@cache
def qmodel(head: str, channels: int, horizon: int = 2, std: float = 0.3, seed: int = 0
           ) -> QuantizedLocalModel:
    return QuantizedLocalModel.from_model(random_model(head, channels, horizon, std=std,
                                                       seed=seed))


def images_of(kind: str, n: int, c: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "black":
        return torch.zeros(n, c, h, w, dtype=torch.uint8)
    if kind == "white":
        return torch.full((n, c, h, w), 255, dtype=torch.uint8)
    if kind == "noise":
        return torch.randint(0, 256, (n, c, h, w), generator=g, dtype=torch.uint8)
    # smooth: a random colour gradient plus a little noise
    yy = torch.linspace(0, 1, h)[:, None]
    xx = torch.linspace(0, 1, w)[None, :]
    a = torch.rand(n, c, 3, 1, 1, generator=g) * 255
    img = a[:, :, 0] + (a[:, :, 1] - a[:, :, 0]) * yy + (a[:, :, 2] - a[:, :, 0]) * xx
    img = img + torch.randn(n, c, h, w, generator=g) * 3
    return img.round().clamp(0, 255).to(torch.uint8)


@pytest.fixture(scope="module")
def mnist():
    from interp.data.images import mnist_digits

    return mnist_digits().images


def _train(head: str, images: torch.Tensor, steps: int, batch: int) -> LocalPixelCNN:
    torch.manual_seed(0)
    m = LocalPixelCNN(PixelConfig(channels=1, horizon=2, hidden=32, blocks=1, head=head,
                                  mixtures=4))
    opt = torch.optim.Adam(m.parameters(), lr=5e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        loss = m.loss(images[torch.randint(0, images.shape[0], (batch,), generator=g)])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return m.eval()


@pytest.fixture(scope="module")
def trained(mnist):
    """Briefly trained models on 1000 MNIST digits (a few seconds on one thread)."""
    return {"logistic": _train("logistic", mnist[:1000], 150, 16),
            "categorical": _train("categorical", mnist[:1000], 60, 8)}


# ---------------------------------------------------------------------- the integer model


def test_tables_are_exact_integer_lookups():
    t = _tables()
    assert t.exp[0] == 1 << 24 and t.exp[-1] == 0 and (np.diff(t.exp) <= 0).all()
    assert (np.diff(t.sig) >= 0).all() and t.sig[0] >= 0 and t.sig[-1] <= 1 << 30
    assert t.sig[t.sig.size // 2] == 1 << 29                      # sigmoid(0) = 1/2
    assert t.exp.dtype == t.sig.dtype == t.inv_s.dtype == np.int64


@pytest.mark.parametrize("head", ["categorical", "logistic"])
@pytest.mark.parametrize("channels", [1, 3])
def test_pmf_is_a_positive_integer_distribution(head, channels):
    q = qmodel(head, channels)
    x = torch.cat([images_of(k, 1, channels, 5, 6) for k in ("black", "white", "noise")])
    pmf = q.pmf(x)
    assert pmf.dtype == torch.int64 and pmf.shape == (3, channels, 5, 6, 256)
    assert (pmf > 0).all() and (pmf.sum(-1) == 1 << 48).all()
    # the NLL is the PMF at the image's values
    p = pmf.gather(-1, x.long().unsqueeze(-1)).squeeze(-1).double()
    nll = (48 - torch.log2(p)).flatten(1).sum(1)
    torch.testing.assert_close(nll, q.nll_bits(x).double())


@pytest.mark.parametrize("head", ["categorical", "logistic"])
@pytest.mark.parametrize("channels", [1, 3])
def test_quantized_matches_float_model_of_random_weights(head, channels):
    m = random_model(head, channels, std=0.2, seed=3)
    q = QuantizedLocalModel.from_model(m)
    x = torch.cat([images_of(k, 2, channels, 8, 9, seed=1) for k in ("noise", "smooth")])
    with torch.no_grad():
        fb = m.bits_per_dim(x).double()
    gap = (q.bits_per_dim(x).double() / fb - 1).abs()
    assert gap.max() < 0.002, gap


@pytest.mark.parametrize("head", ["categorical", "logistic"])
def test_trained_model_quantization_gap_and_code_length(trained, mnist, head):
    """A briefly trained model: quantized bits/dim within 0.2% of the float model's, and the
    real code length within 1% + a few bytes of the quantized model's own NLL."""
    m = trained[head]
    q = QuantizedLocalModel.from_model(m)
    x = mnist[1000:1032]
    with torch.no_grad():
        fb = m.bits_per_dim(x).mean().item()
    qb = q.bits_per_dim(x).mean().item()
    assert fb < 3.0                          # it did learn something (8 = uniform)
    assert abs(qb / fb - 1) < 0.002, (fb, qb)
    streams = encode(q, x)
    nll = q.nll_bits(x)
    for s, bits in zip(streams, nll.tolist()):
        payload = 8 * sum(stream_info(s).payload_bytes)
        assert payload <= 1.01 * bits + 8 * 8, (payload, bits)  # 2 substreams: <= 8 bytes
    one = encode_stream(q, x)
    assert 8 * len(one) <= 1.01 * nll.sum().item() + 8 * 32
    assert torch.equal(decode(q, streams, batch_size=32), x)


def test_weight_bits_trade_precision():
    m = random_model("logistic", 1, std=0.2, seed=5)
    x = images_of("smooth", 2, 1, 8, 8)
    with torch.no_grad():
        fb = m.bits_per_dim(x).double()
    gaps = [(QuantizedLocalModel.from_model(m, weight_bits=b).bits_per_dim(x) / fb - 1)
            .abs().max().item() for b in (4, 12)]
    assert gaps[1] < 0.002 and gaps[1] <= gaps[0]


def test_from_model_refuses_other_models_and_bad_settings():
    full = FullPixelCNN(PixelConfig(kind="full", channels=1, hidden=8, dilations=(1, 2)))
    with pytest.raises(ConfigError, match="LocalPixelCNN"):
        QuantizedLocalModel.from_model(full)
    with pytest.raises(ConfigError, match="weight_bits"):
        QuantizedLocalModel.from_model(random_model(), weight_bits=1)
    with pytest.raises(ConfigError, match="2\\^52"):
        QuantizedLocalModel.from_model(random_model(blocks=1), weight_bits=24, act_bits=40)


# ---------------------------------------------------------------------- round trips


def test_wavefront_order_is_causal_and_counts_waves():
    for H, W, h in [(1, 1, 1), (1, 7, 2), (7, 1, 3), (6, 9, 1), (32, 32, 3)]:
        order, bounds = wavefront_order(H, W, h)
        assert sorted(order.tolist()) == list(range(H * W))
        assert len(bounds) - 1 == num_waves(H, W, h) == (min(h, W - 1) + 1) * (H - 1) + W
        assert (np.diff(bounds) > 0).all()                        # no empty wave
        wave = np.empty(H * W, dtype=int)
        for t in range(len(bounds) - 1):
            wave[order[bounds[t]:bounds[t + 1]]] = t
        for i in range(H):
            for j in range(W):
                ctx = [(i - r, j + d) for r in range(1, h + 1) for d in range(-h, h + 1)]
                ctx += [(i, j - d) for d in range(1, h + 1)]
                for a, b in ctx:
                    if 0 <= a < H and 0 <= b < W:
                        assert wave[a * W + b] < wave[i * W + j]
    assert num_waves(32, 32, 3) == 156      # the research note's figure


CASES = [  # (kind, C, H, W)
    ("black", 1, 1, 1), ("white", 1, 1, 1), ("noise", 1, 1, 1), ("noise", 3, 1, 1),
    ("black", 1, 5, 7), ("white", 3, 4, 4), ("noise", 1, 1, 9), ("noise", 3, 9, 1),
    ("noise", 3, 6, 5), ("smooth", 3, 8, 8), ("smooth", 1, 12, 3),
]


@pytest.mark.parametrize("head", ["categorical", "logistic"])
@pytest.mark.parametrize("kind,c,h,w", CASES)
def test_round_trip_both_schedules(head, kind, c, h, w):
    q = qmodel(head, c, horizon=1 + (h * w) % 3)
    x = images_of(kind, 3, c, h, w, seed=h * w)
    streams = encode(q, x)
    assert len(streams) == 3 and all(isinstance(s, bytes) for s in streams)
    for sch in SCHEDULES:
        assert torch.equal(decode(q, streams, schedule=sch, batch_size=2), x), sch
    one = encode_stream(q, x)
    for sch in SCHEDULES:
        assert torch.equal(decode_stream(q, one, schedule=sch), x), sch


@pytest.mark.parametrize("head", ["categorical", "logistic"])
def test_round_trip_mnist_digits(trained, mnist, head):
    q = QuantizedLocalModel.from_model(trained[head])
    x = mnist[2000:2006]
    streams = encode(q, x)
    for sch in SCHEDULES:
        assert torch.equal(decode(q, streams, schedule=sch, batch_size=4), x)


def test_numpy_images_and_streams_independent_of_the_batch():
    q = qmodel("logistic", 3)
    x = images_of("smooth", 4, 3, 6, 7)
    together = encode(q, x.numpy())
    alone = [encode(q, x[i:i + 1])[0] for i in range(4)]
    assert together == alone
    assert torch.equal(decode(q, alone[::-1], batch_size=3), x.flip(0))


def test_decode_in_a_fresh_process_with_other_threads_and_batch(tmp_path):
    """The issue's test: encode here, decode in a new process with another thread count and
    another batch size - bit-exact, with both schedules, from the saved quantized model."""
    q = QuantizedLocalModel.from_model(random_model("logistic", 3, horizon=2, hidden=12,
                                                    blocks=2, std=0.3, seed=7))
    x = torch.cat([images_of("smooth", 3, 3, 9, 11, seed=2), images_of("noise", 2, 3, 9, 11)])
    save_quantized(q, tmp_path / "q")
    (tmp_path / "streams.pkl").write_bytes(pickle.dumps(encode(q, x)))
    code = (
        "import pickle, sys, torch\n"
        "from interp.compress import load_quantized, decode\n"
        f"q = load_quantized({str(tmp_path / 'q')!r})\n"
        f"s = pickle.loads(open({str(tmp_path / 'streams.pkl')!r}, 'rb').read())\n"
        "out = [decode(q, s, schedule=k, batch_size=2) for k in ('wavefront', 'sequential')]\n"
        "assert torch.equal(out[0], out[1])\n"
        "sys.stdout.buffer.write(pickle.dumps((torch.get_num_threads(), out[0].numpy())))\n"
    )
    threads = "2" if torch.get_num_threads() == 1 else "1"
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads,
           "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr.decode()[-3000:]
    n_threads, y = pickle.loads(out.stdout)
    assert n_threads == int(threads)
    assert np.array_equal(y, x.numpy())


@settings(max_examples=HYPOTHESIS_EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_round_trip_property(data):
    """Random sizes 1..12 x 1..12, C in {1, 3}, both heads, horizons 1..3, random contents
    (noise, flat, sparse black/white, gradients): every stream decodes bit-exactly."""
    head = data.draw(st.sampled_from(["categorical", "logistic"]), "head")
    c = data.draw(st.sampled_from([1, 3]), "C")
    horizon = data.draw(st.integers(1, 3), "horizon")
    q = qmodel(head, c, horizon=horizon, std=[0.2, 0.5][horizon % 2])
    n = data.draw(st.integers(1, 2), "n")
    h, w = data.draw(st.integers(1, 12), "H"), data.draw(st.integers(1, 12), "W")
    kind = data.draw(st.sampled_from(["noise", "flat", "sparse", "gradient"]), "kind")
    size = n * c * h * w
    if kind == "noise":
        raw = np.frombuffer(data.draw(st.binary(min_size=size, max_size=size)), np.uint8)
    elif kind == "flat":
        raw = np.full(size, data.draw(st.integers(0, 255)), np.uint8)
    elif kind == "sparse":
        rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
        raw = np.where(rng.random(size) < 0.1, 255, 0).astype(np.uint8)
    else:
        raw = (np.arange(size) * data.draw(st.integers(1, 40)) % 256).astype(np.uint8)
    x = torch.from_numpy(raw.copy()).reshape(n, c, h, w)
    schedule = data.draw(st.sampled_from(SCHEDULES), "schedule")
    streams = encode(q, x)
    y = decode(q, streams, schedule=schedule, batch_size=data.draw(st.integers(1, 2)))
    assert torch.equal(y, x)


# ---------------------------------------------------------------------- bad streams


@pytest.fixture(scope="module")
def small_case():
    q = qmodel("logistic", 3, horizon=1)
    x = images_of("smooth", 1, 3, 4, 5, seed=4)
    return q, x, encode(q, x)[0]


def test_every_truncation_raises_data_error(small_case):
    q, x, s = small_case
    for cut in range(len(s)):
        with pytest.raises(DataError, match="stream 0 is (truncated/corrupted|not)"):
            decode(q, [s[:cut]])


def test_every_corrupted_byte_raises_data_error(small_case):
    q, x, s = small_case
    for pos in range(len(s)):
        for flip in (0x01, 0xFF):
            bad = bytearray(s)
            bad[pos] ^= flip
            with pytest.raises(DataError) as err:
                decode(q, [bytes(bad)], schedule="wavefront")
            msg = str(err.value)
            assert "stream 0" in msg and ("re-encode" in msg or "model" in msg), msg


def test_appended_garbage_and_second_stream_named(small_case):
    q, x, s = small_case
    with pytest.raises(DataError, match="stream 1 is truncated/corrupted"):
        decode(q, [s, s + b"\x07\x00\x00\x01"])
    with pytest.raises(DataError, match="stream 2"):
        decode(q, [s, s, s[:-3]], batch_size=2)


def test_header_errors_are_clear(small_case, unchecked):
    q, x, s = small_case
    with pytest.raises(DataError, match="not a local-pixel-codec stream"):
        decode(q, [b"PNG" + s[3:]])
    with pytest.raises(DataError, match="format version 9"):
        decode(q, [s[:3] + bytes([9]) + s[4:]])
    with pytest.raises(DataError, match="single-image stream: use decode\\)"):
        decode_stream(q, s)
    with pytest.raises(DataError, match="use decode_stream"):
        decode(q, [encode_stream(q, x)])
    with pytest.raises(DataError, match="no streams"):
        decode(q, [])
    with unchecked():  # what a caller without the run-time type checker gets
        with pytest.raises(DataError, match="list of streams"):
            decode(q, s)
        with pytest.raises(ConfigError, match="schedule 'diagonal' is unknown"):
            decode(q, [s], schedule="diagonal")
    small = encode(q, images_of("noise", 1, 3, 2, 2))[0]
    with pytest.raises(DataError, match="different sizes"):
        decode(q, [s, small])


def test_stream_of_another_model_is_refused(small_case):
    q, x, s = small_case
    other = QuantizedLocalModel.from_model(random_model("logistic", 3, horizon=1, seed=11))
    assert other.fingerprint != q.fingerprint
    with pytest.raises(DataError, match="not encoded with this model"):
        decode(other, [s])
    gray = qmodel("logistic", 1, horizon=1)
    with pytest.raises(DataError, match="3-channel images but the model codes 1"):
        decode(gray, [s])
    with pytest.raises(DataError, match="channels"):
        encode(gray, x)


def test_stream_info_and_header_size(small_case):
    q, x, s = small_case
    info = stream_info(s)
    assert (info.images, info.channels, info.height, info.width) == (1, 3, 4, 5)
    assert info.crc32 == zlib.crc32(x[0].numpy().tobytes())
    assert len(info.payload_bytes) == 2 * 3
    assert info.header_bytes + sum(info.payload_bytes) == len(s)
    page = info._repr_html_()  # Jupyter: a compact table
    assert page.startswith("<table>") and "3 x 4 x 5" in page and f"{info.crc32:08x}" in page
    gray = encode(qmodel("logistic", 1), images_of("smooth", 1, 1, 28, 28))[0]
    first = stream_info(gray).payload_bytes[0]
    assert stream_info(gray).header_bytes == 16 + (first >= 128)  # 3+1+1+1+1+varint+4+4
    assert BUCKET * BUCKET == 256


def test_save_load_round_trip_and_damage(tmp_path, small_case):
    q, x, s = small_case
    path = save_quantized(q, tmp_path / "model")
    q2 = load_quantized(path)
    assert q2.fingerprint == q.fingerprint and q2.config == q.config
    assert torch.equal(decode(q2, [s]), x)
    (path / "quantized.json").write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        load_quantized(path)
    save_quantized(q, path)
    data = (path / "quantized.safetensors").read_bytes()
    (path / "quantized.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="truncated"):
        load_quantized(path)
    with pytest.raises(DataError, match="does not exist"):
        load_quantized(tmp_path / "nowhere")
