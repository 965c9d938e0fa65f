"""Autoregressive image likelihood models with TransformerLens hooks: local and full.

Pixels are predicted in raster order, and the channels of one pixel in order (R, G, B).

- :class:`LocalPixelCNN` (NeLLoC-style): one type-A masked convolution of horizon ``h`` (each
  pixel sees the ``h`` rows above, ``2h+1`` wide, and the ``h`` pixels to its left), then
  1x1 residual blocks and a 1x1 output head. Its receptive field is exactly the horizon.
- :class:`FullPixelCNN`: a local branch plus a gated two-stream PixelCNN (vertical and
  horizontal stacks, no blind spot) whose dilations make its receptive field the whole
  causal past. The stacks feed a zero-initialised 1x1 *correction* into the local branch's
  features, so ``FullPixelCNN.from_local(local)`` starts exactly as the local model and
  learns only what the non-local past adds (trained from scratch, a full model of this size
  is worse than the local one and the non-local OOD score means nothing).

Heads: ``"categorical"`` (256-way softmax per subpixel) or ``"logistic"`` (discretized
logistic mixture, PixelCNN++ style, mixed with a uniform at weight 1e-4 so no value has zero
probability). With colour, hidden channels are split into one group per data channel and
every centre tap is masked so channel ``c`` only sees channels ``< c`` of its own pixel.

Inputs are uint8 images ``[batch, C, H, W]``; the models scale them to [-1, 1] themselves.
Every model has HookPoints on every block, so ``run_with_cache`` and mask sets work as on an
LM; :func:`pixel_targets` names the conv kernels with layer and block for the layout and
overlap analyses.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from jaxtyping import Float, UInt8
from torch import Tensor, nn
from transformer_lens import HookedRootModule
from transformer_lens.hook_points import HookPoint

from interp.errors import ConfigError, check_number, suggest

Head = Literal["categorical", "logistic"]
#: model input: uint8 pixel values, or floats already scaled to [-1, 1] (for input gradients)
PixelInput = UInt8[Tensor, "batch c h w"] | Float[Tensor, "batch c h w"]
HEADS = ("categorical", "logistic")
#: weight of the uniform distribution mixed into the logistic head
UNIFORM_WEIGHT = 1e-4
LN2 = math.log(2.0)


# --------------------------------------------------------------------------- masked conv


def _groups(n: int, data_channels: int) -> Tensor:
    """Data-channel group of each of ``n`` channels (contiguous blocks)."""
    return torch.arange(n) * data_channels // n


class MaskedConv2d(nn.Conv2d):
    """A convolution whose kernel is zero outside a causal footprint.

    ``footprint`` is a boolean ``[kh, kw]`` of allowed spatial taps; the centre tap
    ``centre`` is further restricted by data-channel groups: ``"A"`` lets output group g see
    input groups ``< g`` (the first layer: a pixel never sees itself), ``"B"`` groups ``<= g``.
    Masked taps are zero in the stored weight (so mask sets never count them) and are
    multiplied out in every forward pass (so training cannot revive them).
    """

    def __init__(self, in_channels: int, out_channels: int, footprint: Tensor,
                 centre: tuple[int, int] | None, mask_type: Literal["A", "B"],
                 data_channels: int = 1, padding: tuple[int, int, int, int] = (0, 0, 0, 0),
                 dilation: int | tuple[int, int] = 1):
        kh, kw = footprint.shape
        super().__init__(in_channels, out_channels, (kh, kw), dilation=dilation)
        mask = footprint.to(torch.bool)[None, None].expand(out_channels, in_channels, kh, kw).clone()
        if centre is not None:
            go = _groups(out_channels, data_channels)[:, None]
            gi = _groups(in_channels, data_channels)[None, :]
            mask[:, :, centre[0], centre[1]] = (gi < go) if mask_type == "A" else (gi <= go)
        self.register_buffer("causal_mask", mask.to(torch.float32), persistent=False)
        self.pad = padding  # (left, right, top, bottom), as F.pad takes it
        with torch.no_grad():
            self.weight.mul_(self.causal_mask)

    def forward(self, x: Tensor) -> Tensor:
        if any(self.pad):
            x = F.pad(x, self.pad)
        return F.conv2d(x, self.weight * self.causal_mask.to(self.weight.dtype), self.bias,
                        dilation=self.dilation)


def local_footprint(horizon: int) -> Tensor:
    """Taps of a type-A local kernel, ``[h + 1, 2h + 1]`` with the centre at ``(h, h)``:
    ``h`` full rows above and ``h`` pixels to the left (rows below would all be zero)."""
    fp = torch.zeros(horizon + 1, 2 * horizon + 1, dtype=torch.bool)
    fp[:horizon] = True
    fp[horizon, : horizon + 1] = True  # the centre itself is kept here and channel-masked
    return fp


def _pointwise(cin: int, cout: int, data_channels: int) -> MaskedConv2d:
    return MaskedConv2d(cin, cout, torch.ones(1, 1, dtype=torch.bool), (0, 0), "B",
                        data_channels)


# --------------------------------------------------------------------------- heads


def params_per_channel(head: str, mixtures: int) -> int:
    return 256 if head == "categorical" else 3 * mixtures


def scale_input(x: Tensor) -> Float[Tensor, "*shape"]:
    """Integer pixel values 0..255 -> [-1, 1] float32; float tensors are taken as already
    scaled (so gradients with respect to the input can be taken)."""
    if x.is_floating_point():
        return x
    return x.to(torch.float32) * (2.0 / 255.0) - 1.0


def _bin_mass(lo: Tensor, hi: Tensor) -> Tensor:
    """``σ(hi) - σ(lo)``, taken on the side where it is small so both tails keep precision."""
    return torch.where(lo > 0, torch.sigmoid(-lo) - torch.sigmoid(-hi),
                       torch.sigmoid(hi) - torch.sigmoid(lo))


def _mix_uniform(p: Tensor) -> Tensor:
    """log of ``(1 - w) p + w / 256``: no value has zero probability."""
    return torch.log((1.0 - UNIFORM_WEIGHT) * p + UNIFORM_WEIGHT / 256.0)


def _logistic_log_probs(
    params: Float[Tensor, "batch c p h w"], x: Tensor, mixtures: int
) -> Float[Tensor, "batch c h w"]:
    """log P(x) under a discretized logistic mixture (per subpixel, nats): each component's
    mass on the bin ``[x - 1/2, x + 1/2]`` (open-ended at 0 and 255), mixed, then mixed with
    the uniform."""
    logit_pi, mu, log_s = params.split(mixtures, dim=2)
    inv_s = torch.exp(-log_s.clamp(min=-7.0))
    c = scale_input(x).unsqueeze(2)
    xi = x.unsqueeze(2)
    inf = torch.tensor(float("inf"), device=params.device)
    lo = torch.where(xi == 0, -inf, inv_s * (c - 1.0 / 255.0 - mu))
    hi = torch.where(xi == 255, inf, inv_s * (c + 1.0 / 255.0 - mu))
    p = (torch.softmax(logit_pi, dim=2) * _bin_mass(lo, hi)).sum(2)
    return _mix_uniform(p)


def logistic_log_pmf(params: Float[Tensor, "*batch p"], mixtures: int
                     ) -> Float[Tensor, "*batch 256"]:
    """log of the full 256-value PMF of discretized logistic mixtures (last axis: params).

    Each component's CDF is evaluated once at the 257 bin edges (-inf, the 255 midpoints,
    +inf); a bin's mass is the difference taken on the side of the distribution where it
    is small (``σ(b) - σ(a)`` below the mean, ``σ(-a) - σ(-b)`` above), so both tails keep
    their precision. Agrees with :meth:`log_probs` to float32 rounding.
    """
    logit_pi, mu, log_s = params.unsqueeze(-1).split(mixtures, dim=-2)
    inv_s = torch.exp(-log_s.clamp(min=-7.0))
    inner = torch.arange(1, 256, device=params.device, dtype=params.dtype) * (2.0 / 255.0) - 1.0
    inner = inner - 1.0 / 255.0
    z = inv_s * (inner - mu)                                   # [..., K, 255]
    big = torch.full_like(z[..., :1], float("inf"))
    z = torch.cat([-big, z, big], dim=-1)                      # [..., K, 257]
    p = (torch.softmax(logit_pi, dim=-2) * _bin_mass(z[..., :-1], z[..., 1:])).sum(-2)
    return _mix_uniform(p)


# --------------------------------------------------------------------------- configs


@dataclass
class PixelConfig:
    """Architecture of a pixel model (JSON-able; a checkpoint store records it).

    Attributes:
        kind: "local" or "full".
        channels: data channels (1 grayscale, 3 colour).
        horizon: the local kernel's reach ``h`` (kernel ``2h+1``).
        hidden: channels of the local branch (a multiple of ``channels``).
        blocks: 1x1 residual blocks in the local branch.
        head: "categorical" or "logistic".
        mixtures: logistic components per subpixel.
        stack_channels, dilations: width and layer dilations of the full model's gated
            stacks (the receptive field reaches ``sum(dilations) + 1`` pixels back).
    """

    kind: Literal["local", "full"] = "local"
    channels: int = 1
    horizon: int = 3
    hidden: int = 64
    blocks: int = 1
    head: str = "logistic"
    mixtures: int = 5
    stack_channels: int = 32
    dilations: tuple[int, ...] = (1, 2, 4, 8, 16)

    def validate(self) -> PixelConfig:
        if self.kind not in ("local", "full"):
            raise ConfigError(f"Pixel model kind {self.kind!r} is unknown; use 'local' or 'full'."
                              f"{suggest(str(self.kind), ['local', 'full'])}")
        if self.head not in HEADS:
            raise ConfigError(f"Pixel model head {self.head!r} is unknown; use one of "
                              f"{', '.join(HEADS)}.{suggest(str(self.head), HEADS)}")
        check_number("channels", self.channels, low=1, integer=True)
        check_number("horizon", self.horizon, low=1, integer=True)
        check_number("hidden", self.hidden, low=1, integer=True)
        check_number("blocks", self.blocks, low=0, integer=True)
        check_number("mixtures", self.mixtures, low=1, integer=True)
        check_number("stack_channels", self.stack_channels, low=1, integer=True)
        if self.hidden % self.channels:
            raise ConfigError(f"hidden={self.hidden} must be a multiple of channels="
                              f"{self.channels} (one group of hidden units per colour channel).")
        if not self.dilations or any(int(d) < 1 for d in self.dilations):
            raise ConfigError(f"dilations={self.dilations!r}: give one positive integer per "
                              "stack layer.")
        self.dilations = tuple(int(d) for d in self.dilations)
        return self

    def to_dict(self) -> dict:
        d = asdict(self)
        d["dilations"] = list(self.dilations)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> PixelConfig:
        d = dict(d)
        if "dilations" in d:
            d["dilations"] = tuple(d["dilations"])
        return cls(**d).validate()


# --------------------------------------------------------------------------- models


class _PixelModel(HookedRootModule):
    """Shared log-likelihood API (subclasses define ``forward`` -> head parameters)."""

    config: PixelConfig

    def _params(self, out: Tensor) -> Float[Tensor, "batch c p h w"]:
        b, _, h, w = out.shape
        return out.reshape(b, self.config.channels, -1, h, w)

    def log_probs(self, x: UInt8[Tensor, "batch c h w"]) -> Float[Tensor, "batch c h w"]:
        """log P(x[b, c, i, j] | its causal past), nats, per subpixel."""
        return self.log_prob_of(self(x), x.unsqueeze(0))[0]

    def log_prob_of(self, params: Float[Tensor, "batch c p h w"],
                    values: UInt8[Tensor, "n batch c h w"]) -> Float[Tensor, "n batch c h w"]:
        """log P of ``n`` candidate values per subpixel under head parameters ``params``
        (from ``self(x)``: the context stays the true image)."""
        n = values.shape[0]
        if self.config.head == "categorical":
            lp = params.log_softmax(dim=2).unsqueeze(0).expand(n, *params.shape)
            return lp.gather(3, values.long().unsqueeze(3)).squeeze(3)
        flat = params.unsqueeze(0).expand(n, *params.shape).reshape(-1, *params.shape[1:])
        out = _logistic_log_probs(flat, values.reshape(-1, *values.shape[2:]),
                                  self.config.mixtures)
        return out.reshape(values.shape)

    def sample_values(self, params: Float[Tensor, "batch c p h w"], n: int,
                      generator: torch.Generator | None = None) -> UInt8[Tensor, "n batch c h w"]:
        """``n`` values per subpixel drawn from the distributions ``params`` describe (each
        subpixel given its true context: a Monte Carlo sample for KL estimates, not an
        autoregressive image sample)."""
        b, c, p, h, w = params.shape
        dev = params.device

        def rand(*shape: int) -> Tensor:
            return torch.rand(*shape, generator=generator, device=dev)

        if self.config.head == "categorical":
            probs = params.softmax(dim=2).permute(0, 1, 3, 4, 2).reshape(-1, p)
            v = torch.multinomial(probs, n, replacement=True, generator=generator)
            return v.T.reshape(n, b, c, h, w).to(torch.uint8)
        k = self.config.mixtures
        logit_pi, mu, log_s = params.detach().unsqueeze(0).split(k, dim=3)
        gumbel = -torch.log(-torch.log(rand(n, b, c, k, h, w).clamp(1e-12, 1 - 1e-7)))
        comp = (logit_pi + gumbel).argmax(dim=3, keepdim=True)
        mu = mu.expand(n, -1, -1, -1, -1, -1).gather(3, comp).squeeze(3)
        scale = log_s.clamp(min=-7.0).exp().expand(n, -1, -1, -1, -1, -1).gather(3, comp).squeeze(3)
        u = rand(n, b, c, h, w).clamp(1e-6, 1 - 1e-6)
        xs = mu + scale * (torch.log(u) - torch.log1p(-u))
        v = torch.round((xs + 1.0) * 127.5).clamp(0, 255)
        uniform = rand(n, b, c, h, w) < UNIFORM_WEIGHT
        v = torch.where(uniform, torch.floor(rand(n, b, c, h, w) * 256).clamp(max=255), v)
        return v.to(torch.uint8)

    def log_pmf(self, x: UInt8[Tensor, "batch c h w"]) -> Float[Tensor, "batch c h w 256"]:
        """log of each subpixel's predicted distribution over its 256 values."""
        params = self(x).movedim(2, -1)
        if self.config.head == "categorical":
            return params.log_softmax(dim=-1)
        return logistic_log_pmf(params, self.config.mixtures)

    def pmf(self, x: UInt8[Tensor, "batch c h w"]) -> Float[Tensor, "batch c h w 256"]:
        """Each subpixel's predicted distribution over its 256 values."""
        return self.log_pmf(x).exp()

    def bits_per_dim(self, x: UInt8[Tensor, "batch c h w"]) -> Float[Tensor, " batch"]:
        """Per-image negative log-likelihood in bits per subpixel."""
        lp = self.log_probs(x)
        return -lp.flatten(1).sum(1) / (lp[0].numel() * LN2)

    def loss(self, x: UInt8[Tensor, "batch c h w"]) -> Tensor:
        """Mean bits/dim of the batch (the training objective)."""
        return self.bits_per_dim(x).mean()


class LocalPixelCNN(_PixelModel):
    """NeLLoC-style local autoregressive model (see the module docstring).

    Hooks: ``hook_in`` (after the masked conv), ``blocks.{i}.hook_out``, ``hook_features``
    (the head's input), ``hook_params`` (head output).
    """

    def __init__(self, config: PixelConfig | None = None, **kwargs):
        super().__init__()
        cfg = (config or PixelConfig(**kwargs)).validate()
        self.config = cfg
        C, h = cfg.channels, cfg.horizon
        self.horizon = h
        self.conv_in = MaskedConv2d(C, cfg.hidden, local_footprint(h), (h, h), "A", C,
                                    padding=(h, h, h, 0))
        self.hook_in = HookPoint()
        self.blocks = nn.ModuleList(_ResBlock(cfg.hidden, C) for _ in range(cfg.blocks))
        self.hook_features = HookPoint()
        self.head = _pointwise(cfg.hidden, C * params_per_channel(cfg.head, cfg.mixtures), C)
        self.hook_params = HookPoint()
        self.setup()

    def features(self, x: PixelInput) -> Float[Tensor, "batch d h w"]:
        """The hidden features before the head (the full model adds its correction here)."""
        hid = self.hook_in(self.conv_in(scale_input(x)))
        for blk in self.blocks:
            hid = blk(hid)
        return hid

    def head_params(self, hid: Tensor) -> Float[Tensor, "batch c p h w"]:
        return self._params(self.hook_params(self.head(self.hook_features(F.relu(hid)))))

    def forward(self, x: PixelInput) -> Float[Tensor, "batch c p h w"]:
        return self.head_params(self.features(x))


class _ResBlock(nn.Module):
    """h + W2 relu(W1 relu(h)) with 1x1 channel-causal convolutions."""

    def __init__(self, hidden: int, data_channels: int):
        super().__init__()
        self.conv1 = _pointwise(hidden, hidden, data_channels)
        self.conv2 = _pointwise(hidden, hidden, data_channels)
        self.hook_out = HookPoint()

    def forward(self, h: Tensor) -> Tensor:
        return self.hook_out(h + self.conv2(F.relu(self.conv1(F.relu(h)))))


class _GatedLayer(nn.Module):
    """One dilated layer of the two-stream gated PixelCNN (no blind spot).

    Vertical features at (i, j) depend on rows <= i; the horizontal stream reads them shifted
    down one row, so it only ever sees rows above plus pixels to the left on its own row.
    """

    def __init__(self, ch: int, dilation: int):
        super().__init__()
        d = dilation
        ones = torch.ones
        self.v = MaskedConv2d(ch, 2 * ch, ones(2, 3, dtype=torch.bool), None, "B",
                              padding=(d, d, d, 0), dilation=d)
        self.h = MaskedConv2d(ch, 2 * ch, ones(1, 2, dtype=torch.bool), None, "B",
                              padding=(d, 0, 0, 0), dilation=d)
        self.v2h = MaskedConv2d(2 * ch, 2 * ch, ones(1, 1, dtype=torch.bool), None, "B")
        self.h_out = MaskedConv2d(ch, ch, ones(1, 1, dtype=torch.bool), None, "B")
        self.hook_v = HookPoint()
        self.hook_h = HookPoint()

    @staticmethod
    def _gate(a: Tensor) -> Tensor:
        x, y = a.chunk(2, dim=1)
        return torch.tanh(x) * torch.sigmoid(y)

    def forward(self, v: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        v_pre = self.v(v)
        v_new = v + self._gate(v_pre)
        down = F.pad(v_pre, (0, 0, 1, 0))[:, :, :-1]
        h_new = h + self.h_out(self._gate(self.h(h) + self.v2h(down)))
        return self.hook_v(v_new), self.hook_h(h_new)


class FullPixelCNN(_PixelModel):
    """Local branch + gated stacks over the whole causal past (see the module docstring).

    Hooks: the local branch's (``local.*``), ``stack.{i}.hook_v`` / ``hook_h``,
    ``hook_correction`` (what the non-local stacks add to the local features).
    """

    def __init__(self, config: PixelConfig | None = None, **kwargs):
        super().__init__()
        cfg = (config or PixelConfig(kind="full", **kwargs)).validate()
        self.config = cfg
        C, S = cfg.channels, cfg.stack_channels
        self.horizon = None
        self.local = LocalPixelCNN(PixelConfig(**{**cfg.to_dict(), "kind": "local",
                                                  "dilations": cfg.dilations}))
        one = torch.ones(1, 1, dtype=torch.bool)
        # first layer: vertical sees rows <= i (shifted down later), horizontal x(i, j-1)
        self.v_in = MaskedConv2d(C, S, torch.ones(2, 3, dtype=torch.bool), None, "B",
                                 padding=(1, 1, 1, 0))
        self.h_in = MaskedConv2d(C, S, one, None, "B")
        self.stack = nn.ModuleList(_GatedLayer(S, d) for d in cfg.dilations)
        self.correction = MaskedConv2d(S, cfg.hidden, one, None, "B")
        nn.init.zeros_(self.correction.weight)
        nn.init.zeros_(self.correction.bias)
        self.hook_correction = HookPoint()
        self.setup()

    @classmethod
    def from_local(cls, local: LocalPixelCNN, **overrides) -> FullPixelCNN:
        """A full model that starts exactly as ``local`` (zero correction)."""
        cfg = PixelConfig.from_dict({**local.config.to_dict(), **overrides, "kind": "full"})
        model = cls(cfg)
        model.local.load_state_dict(local.state_dict())
        return model.to(next(local.parameters()).device)

    def nonlocal_features(self, x: PixelInput) -> Float[Tensor, "batch s h w"]:
        xs = scale_input(x)
        v = self.v_in(xs)
        h = self.h_in(F.pad(xs, (1, 0, 0, 0))[..., :-1])
        h = h + F.pad(v, (0, 0, 1, 0))[:, :, :-1]
        for layer in self.stack:
            v, h = layer(v, h)
        return h

    def forward(self, x: PixelInput) -> Float[Tensor, "batch c p h w"]:
        corr = self.hook_correction(self.correction(self.nonlocal_features(x)))
        return self.local.head_params(self.local.features(x) + corr)


PixelModel = LocalPixelCNN | FullPixelCNN


def build_pixel_model(config: PixelConfig) -> LocalPixelCNN | FullPixelCNN:
    cfg = config.validate()
    return LocalPixelCNN(cfg) if cfg.kind == "local" else FullPixelCNN(cfg)


# --------------------------------------------------------------------------- targets


def pixel_targets(model: LocalPixelCNN | FullPixelCNN) -> list:
    """Every conv kernel of a pixel model as a mask :class:`~interp.masks.Target`.

    ``layer`` is the depth (the local branch: input conv 0, block ``i`` -> ``i + 1``, head
    last; the stacks: their own layer index) and ``block`` says which part: ``local_in``,
    ``local_block``, ``head``, ``stack_in``, ``stack_v``, ``stack_h``, ``stack_v2h``,
    ``stack_out``, ``correction``. Masked taps are zero, so they are never counted.
    """
    from interp.masks.targets import Target

    paths = {id(m): n for n, m in model.named_modules()}
    out = []

    def add(name: str, module: nn.Module, layer: int, block: str) -> None:
        out.append(Target(name=name, module=module, param_name="weight",
                          shape=tuple(module.weight.shape), layer=layer, block=block,
                          out_axis=0, module_path=paths[id(module)]))

    local = model.local if isinstance(model, FullPixelCNN) else model
    pre = "local." if isinstance(model, FullPixelCNN) else ""
    add(f"{pre}conv_in", local.conv_in, 0, "local_in")
    for i, blk in enumerate(local.blocks):
        add(f"{pre}blocks.{i}.conv1", blk.conv1, i + 1, "local_block")
        add(f"{pre}blocks.{i}.conv2", blk.conv2, i + 1, "local_block")
    add(f"{pre}head", local.head, len(local.blocks) + 1, "head")
    if isinstance(model, FullPixelCNN):
        add("v_in", model.v_in, 0, "stack_in")
        add("h_in", model.h_in, 0, "stack_in")
        for i, layer in enumerate(model.stack):
            add(f"stack.{i}.v", layer.v, i + 1, "stack_v")
            add(f"stack.{i}.h", layer.h, i + 1, "stack_h")
            add(f"stack.{i}.v2h", layer.v2h, i + 1, "stack_v2h")
            add(f"stack.{i}.h_out", layer.h_out, i + 1, "stack_out")
        add("correction", model.correction, len(model.stack) + 1, "correction")
    return out


def receptive_field(model: LocalPixelCNN | FullPixelCNN, shape: tuple[int, int, int],
                    position: tuple[int, int, int], seed: int = 0) -> Tensor:
    """Boolean ``[C, H, W]``: the input subpixels whose change moves the predicted
    distribution of subpixel ``position = (c, i, j)`` (nonzero gradient of its head
    parameters at a random image)."""
    C, H, W = shape
    c, i, j = position
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (1, C, H, W), generator=gen, dtype=torch.uint8)
    xf = scale_input(x).to(next(model.parameters()).device).requires_grad_(True)
    out = model(xf)[0, c, :, i, j]
    (grad,) = torch.autograd.grad(out.sum() + out.square().sum(), xf)
    return (grad[0] != 0).cpu()
