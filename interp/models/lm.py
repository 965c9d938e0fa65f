"""Language models as TransformerLens ``TransformerBridge``s: presets, HF loading, training.

Presets are built offline with ``TransformerBridge.boot_native``; HF models (GPT-2, GPT-NeoX /
Pythia, ...) load through ``boot_transformers`` from a hub id or a local directory.
``train_lm`` trains any bridge with AdamW, linear warmup and cosine decay, periodic
validation and checkpoints in a :class:`~interp.models.checkpoints.CheckpointStore`, and
resumes from the store's last checkpoint.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from interp.errors import ConfigError, InterpError, ModelLoadError, check_number, suggest
from interp.numerics import no_denormals
from interp.results import Result, bulky

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LMConfig:
    """Architecture of a native bridge (a subset of ``TransformerBridgeConfig``)."""

    n_layers: int = 2
    d_model: int = 128
    n_heads: int = 4
    d_mlp: int = 512
    n_ctx: int = 128
    act_fn: str = "gelu"
    normalization_type: str = "LN"
    positional_embedding_type: str = "rotary"

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads


#: Built-in architectures. ``tiny`` trains in minutes on 2 CPU cores; ``small`` is for GPUs.
PRESETS: dict[str, LMConfig] = {
    "test": LMConfig(n_layers=2, d_model=32, n_heads=4, d_mlp=64, n_ctx=64),
    "tiny": LMConfig(n_layers=2, d_model=128, n_heads=4, d_mlp=512, n_ctx=128),
    "tiny4": LMConfig(n_layers=4, d_model=128, n_heads=4, d_mlp=512, n_ctx=128),
    "small": LMConfig(n_layers=6, d_model=512, n_heads=8, d_mlp=2048, n_ctx=256),
}


def resolve_preset(preset: str | LMConfig) -> LMConfig:
    """The architecture of a preset name (ConfigError with suggestions for unknown names)."""
    if isinstance(preset, LMConfig):
        return preset
    if preset not in PRESETS:
        raise ConfigError(
            f"Unknown LM preset {preset!r}; presets are {sorted(PRESETS)}.{suggest(preset, PRESETS)}"
        )
    return PRESETS[preset]


def build_lm(
    preset: str | LMConfig,
    tokenizer,
    *,
    seed: int = 0,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
):
    """A randomly initialised native ``TransformerBridge`` (offline, ~0.1 s).

    ``tokenizer`` must be an HF tokenizer loaded from disk (see
    :func:`interp.data.text.train_tokenizer`); its length sets ``d_vocab``.
    """
    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge import TransformerBridge

    cfg = resolve_preset(preset)
    tb_cfg = TransformerBridgeConfig(
        n_layers=cfg.n_layers, d_model=cfg.d_model, n_heads=cfg.n_heads, d_head=cfg.d_head,
        d_mlp=cfg.d_mlp, d_vocab=len(tokenizer), n_ctx=cfg.n_ctx, act_fn=cfg.act_fn,
        normalization_type=cfg.normalization_type,
        positional_embedding_type=cfg.positional_embedding_type, seed=seed,
    )
    torch.manual_seed(seed)
    model = TransformerBridge.boot_native(tb_cfg, tokenizer=tokenizer, device=device, dtype=dtype)
    model.interp_config = asdict(cfg)
    return model


def load_hf_lm(
    name_or_dir: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    revision: str | None = None,
    tokenizer=None,
):
    """Wrap an HF causal LM (hub id or local ``save_pretrained`` directory) in a bridge.

    ``revision`` selects a training checkpoint on the hub (e.g. Pythia's ``"step4000"``).
    Without a network, pass a local directory.

    Raises:
        ModelLoadError: the path does not exist, a directory holds no HF model (no or a
            corrupt ``config.json``), the architecture is not one TransformerBridge supports
            (the message names it and the supported families), the hub cannot be reached,
            or the model does not fit in memory (an ``OSError``/``RuntimeError`` caused by
            running out of memory).
        torch.OutOfMemoryError, MemoryError: re-raised as they are, with a note on what to
            do (a smaller ``dtype``, another ``device``), so callers can catch them.
    """
    import re

    from transformer_lens.model_bridge import TransformerBridge

    from interp.io import read_json

    src = str(name_or_dir)
    path = Path(src).expanduser()
    is_dir = path.is_dir()
    hub_id = re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?", src) is not None
    if path.exists() and not is_dir:
        raise ModelLoadError(f"{src!r} is a file, not a model directory. Pass the directory "
                             "written by save_pretrained.")
    if not is_dir and (not hub_id or src.startswith((".", "~"))):
        raise ModelLoadError(f"Model directory {src!r} does not exist. Check the path.")
    config = None
    if is_dir:
        config_path = path / "config.json"
        if not config_path.exists():
            raise ModelLoadError(
                f"Directory {src!r} is not a Hugging Face model: it has no config.json. Pass a "
                "directory written by save_pretrained (config.json and weights), or a hub id."
            )
        config = read_json(config_path, error=ModelLoadError, what="Model config",
                           fix="Save the model again with save_pretrained.")
        unsupported = _unsupported_architecture(src, config)
        if unsupported:
            raise ModelLoadError(unsupported)
        if src.startswith("~"):
            src = str(path)
    oom_types = (MemoryError, getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError))
    try:
        model = TransformerBridge.boot_transformers(
            src, device=device, dtype=dtype, revision=revision, tokenizer=tokenizer
        )
    except oom_types as e:  # keep the type (callers may retry smaller); add what to do
        e.add_note(f"interp: model {src!r} does not fit in memory on {device} in {dtype}; "
                   "use a smaller dtype (torch.bfloat16 / torch.float16) or another device.")
        raise
    except Exception as e:
        if _out_of_memory(e):
            raise ModelLoadError(
                f"Model {src!r} does not fit in memory on {device} in {dtype} ({e}). Load it "
                "with a smaller dtype (torch.bfloat16 / torch.float16), on a device with more "
                "memory, or choose a smaller model."
            ) from e
        unsupported = _unsupported_architecture(src, config, e)
        if unsupported:
            raise ModelLoadError(unsupported) from e
        if isinstance(e, OSError) and is_dir:
            raise ModelLoadError(
                f"Could not load model directory {src!r}: {e}. Save the model there again with "
                "save_pretrained (config.json and its weights)."
            ) from e
        if isinstance(e, OSError):
            raise ModelLoadError(
                f"Could not load model {src!r}: {e}. Without a network, download it elsewhere "
                "(save_pretrained) and pass the local directory."
            ) from e
        fix = ("Its files are damaged or incomplete: save the model there again with "
               "save_pretrained." if is_dir else
               "Check the hub id, or pass a local directory written by save_pretrained.")
        raise ModelLoadError(f"Could not load model {src!r} through TransformerBridge: {e}. "
                             f"{fix}") from e
    model.eval()
    model.interp_config = {"hf": src, "revision": revision}
    return model


def _out_of_memory(error: BaseException | None) -> bool:
    """Whether ``error`` or an exception it was raised from means memory ran out."""
    import errno

    oom_types = (MemoryError, getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError))
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, oom_types):
            return True
        if isinstance(error, OSError) and error.errno == errno.ENOMEM:
            return True
        text = str(error).lower()
        if any(s in text for s in ("out of memory", "cannot allocate memory",
                                   "can't allocate memory")):
            return True
        error = error.__cause__ or error.__context__
    return False


#: Families named in the unsupported-architecture message (those TransformerBridge has).
_KNOWN_FAMILIES = {
    "GPT2LMHeadModel": "GPT-2", "GPTNeoXForCausalLM": "GPT-NeoX / Pythia",
    "LlamaForCausalLM": "Llama", "MistralForCausalLM": "Mistral", "Qwen2ForCausalLM": "Qwen2",
    "GemmaForCausalLM": "Gemma", "OPTForCausalLM": "OPT", "GPTJForCausalLM": "GPT-J",
    "GPTNeoForCausalLM": "GPT-Neo", "PhiForCausalLM": "Phi", "OlmoForCausalLM": "OLMo",
}


def _unsupported_architecture(src: str, config: dict | None,
                              error: BaseException | None = None) -> str | None:
    """The message for a model whose architecture TransformerBridge does not support, or None.

    From a local ``config`` (before loading), or from the bridge's ``error`` (hub models).
    """
    import re
    from types import SimpleNamespace

    try:
        from transformer_lens.factories.architecture_adapter_factory import (
            SUPPORTED_ARCHITECTURES,
        )
        from transformer_lens.model_bridge.sources.transformers import (
            determine_architecture_from_hf_config,
        )
    except ImportError:  # another TransformerLens layout: let the bridge decide
        return None
    if error is None:
        if config is None:
            return None
        try:
            determine_architecture_from_hf_config(SimpleNamespace(**config))
            return None
        except ValueError:
            archs, model_type = list(config.get("architectures") or []), config.get("model_type")
    else:
        text = str(error)
        if not isinstance(error, ValueError) or not re.search(
                r"Could not determine supported architecture|Unsupported architecture", text):
            return None
        if config is not None:
            archs, model_type = list(config.get("architectures") or []), config.get("model_type")
        else:
            found = re.search(r"Config architectures: \[([^\]]*)\]", text)
            archs = re.findall(r"'([^']+)'", found.group(1)) if found else []
            mt = re.search(r"Model type: (\S+)", text)
            model_type = mt.group(1) if mt else None
    name = ", ".join(archs) or "unknown"
    hint = suggest(archs[0], SUPPORTED_ARCHITECTURES) if archs else ""
    families = ", ".join(f"{fam} ({arch})" for arch, fam in _KNOWN_FAMILIES.items()
                         if arch in SUPPORTED_ARCHITECTURES)
    return (
        f"Model {src!r} has architecture {name} (model_type {model_type!r}), which "
        f"TransformerBridge does not support.{hint} Supported families include {families}, "
        f"and more: {len(SUPPORTED_ARCHITECTURES)} architectures in transformer_lens."
        "factories.architecture_adapter_factory.SUPPORTED_ARCHITECTURES. Use a model of one "
        "of them, or a native preset (build_lm)."
    )


def model_identity(model) -> dict:
    """A small JSON-able description used to check that files fit a model."""
    cfg = model.cfg
    return {
        "name": getattr(cfg, "model_name", "native"),
        "n_layers": cfg.n_layers,
        "d_model": cfg.d_model,
        "n_heads": cfg.n_heads,
        "d_mlp": getattr(cfg, "d_mlp", None),
        "d_vocab": cfg.d_vocab,
        **({"interp_config": model.interp_config} if hasattr(model, "interp_config") else {}),
    }


def resolve_device(model, device: str | torch.device | None = None) -> torch.device:
    """``device`` if given, else where ``model``'s parameters live (CPU for a parameterless one)."""
    if device is not None:
        return torch.device(device)
    p = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
    return p.device if p is not None else torch.device("cpu")


# --------------------------------------------------------------------------- precision

#: Compute dtypes a training loop can run its model in (``--dtype`` on the CLI).
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_DTYPE_ALIASES = {"fp32": "float32", "float": "float32", "bf16": "bfloat16",
                  "fp16": "float16", "half": "float16"}


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (the name configs and results record)."""
    return str(dtype).removeprefix("torch.")


def resolve_dtype(
    dtype: str | torch.dtype | None, device: str | torch.device, *, option: str = "dtype",
) -> torch.dtype:
    """The compute dtype of a training loop, checked against ``device``.

    ``None`` and ``"float32"`` mean plain float32 (no autocast). ``"bfloat16"`` /
    ``"float16"`` (or the torch dtypes, or ``bf16`` / ``fp16``) run the model's forward pass
    under :func:`torch.autocast`, while trained tensors and optimizer state stay float32.

    Raises:
        ConfigError: an unknown dtype (``option`` names the argument or flag in the message),
            float16 on a CPU (slow where it works at all, and its gradients need loss
            scaling: use bfloat16), bfloat16 on a GPU without bfloat16 support, or a device
            type torch cannot autocast.
    """
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        found = dtype if dtype in DTYPES.values() else None
        shown = dtype_name(dtype)
    elif isinstance(dtype, str):
        key = dtype.strip().lower().removeprefix("torch.")
        found = DTYPES.get(_DTYPE_ALIASES.get(key, key))
        shown = dtype
    else:
        found, shown = None, repr(dtype)
    if found is None:
        raise ConfigError(
            f"{option} {shown!s} is not a compute dtype; use one of {', '.join(DTYPES)} "
            f"(model compute under torch.autocast; masks and optimizer state stay float32)."
            f"{suggest(str(shown), DTYPES)}")
    if found is torch.float32:
        return found
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ConfigError(f"device {device!r} is not a device: use cpu, cuda or cuda:N.") from e
    if found is torch.float16 and dev.type == "cpu":
        raise ConfigError(
            f"{option} float16 needs a GPU: CPUs compute float16 slowly or not at all, and its "
            "narrow range needs loss scaling. Use bfloat16 on a CPU, or float32.")
    if (found is torch.bfloat16 and dev.type == "cuda" and torch.cuda.is_available()
            and not torch.cuda.is_bf16_supported()):
        raise ConfigError(
            f"{option} bfloat16: this GPU ({torch.cuda.get_device_name(dev)}) has no bfloat16 "
            "support. Use float16 (with loss scaling, done for you) or float32.")
    if not torch.amp.is_autocast_available(dev.type):
        raise ConfigError(f"{option} {dtype_name(found)}: torch cannot autocast on device type "
                          f"{dev.type!r}. Use float32 there.")
    if found is torch.bfloat16 and dev.type == "cpu":
        _warn_slow_cpu_bf16()
    return found


@functools.cache
def _warn_slow_cpu_bf16() -> None:
    """Once per process (rank 0 only): bfloat16 is slow on CPUs without bfloat16 matmul
    instructions."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return
    try:
        caps = torch.cpu.get_capabilities()
    except (AttributeError, RuntimeError):
        return  # unknown: do not warn
    if not (caps.get("avx512_bf16") or caps.get("amx_bf16")):
        log.warning("bfloat16 on a CPU without AVX512-BF16 or AMX: torch emulates its matmuls, "
                    "several times slower than float32 (7.8x measured on a 2-layer model). Use "
                    "it to check numerics; float32 is faster on this CPU.")


def autocast(device: str | torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """``torch.autocast`` to ``dtype`` on ``device``'s type; a no-op for float32."""
    if dtype is torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def grad_scaler(device: str | torch.device, dtype: torch.dtype) -> torch.amp.GradScaler | None:
    """A loss scaler for float16 (whose small gradients would underflow), else None."""
    if dtype is not torch.float16:
        return None
    return torch.amp.GradScaler(torch.device(device).type)


# --------------------------------------------------------------------------- losses


def lm_loss(
    logits: Float[Tensor, "batch pos d_vocab"], tokens: Int[Tensor, "batch pos"]
) -> Tensor:
    """Mean next-token cross-entropy in nats."""
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), tokens[:, 1:].reshape(-1)
    )


@torch.no_grad()
def mean_batch_loss(
    model, batches: Iterable[Int[Tensor, "_batch _pos"]], *,
    device: str | torch.device | None = None, progress: bool = False, desc: str = "loss",
) -> tuple[float, int]:
    """Token-weighted mean next-token loss over batches, and the number of tokens scored.

    The model runs in eval mode; its training flag is restored afterwards.
    """
    device = resolve_device(model, device)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for tokens in tqdm(batches, desc=desc, disable=not progress, leave=False):
            tokens = tokens.to(device).long()
            n = tokens[:, 1:].numel()
            total += lm_loss(model(tokens), tokens).item() * n
            count += n
    finally:
        model.train(was_training)
    if count == 0:
        raise InterpError("No tokens to score: pass [batch, pos] batches with pos >= 2.")
    return total / count, count


@torch.no_grad()
def evaluate_loss(
    model, tokens: Int[Tensor, " n"], *, seq_len: int = 128, batch_size: int = 16,
    max_batches: int | None = None, device: str | torch.device | None = None,
) -> float:
    """Mean next-token loss (nats/token) over a token stream, cut into fixed sequences."""
    from interp.data.text import to_sequences

    batches = to_sequences(tokens, seq_len).split(batch_size)
    if max_batches is not None:
        batches = batches[:max_batches]
    return mean_batch_loss(model, batches, device=device)[0]


def unigram_entropy(tokens: Int[Tensor, " n"], vocab_size: int) -> float:
    """Entropy (nats/token) of the unigram distribution estimated from counts."""
    counts = torch.bincount(tokens.flatten(), minlength=vocab_size).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log()).sum())


# --------------------------------------------------------------------------- training


@dataclass
class TrainConfig:
    """Hyperparameters of :func:`train_lm` (checked by :meth:`validate`)."""

    steps: int = 1250
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 3e-3
    weight_decay: float = 0.1
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 250
    eval_batches: int = 20
    checkpoint_every: int = 250
    seed: int = 0

    def validate(self) -> TrainConfig:
        """Raise ConfigError for values that make no sense (before minutes of training)."""
        for name in ("steps", "batch_size", "eval_every", "eval_batches", "checkpoint_every"):
            check_number(name, getattr(self, name), low=1, integer=True)
        check_number("seq_len", self.seq_len, low=2, integer=True)
        check_number("warmup_steps", self.warmup_steps, low=0, integer=True)
        check_number("lr", self.lr, low=0, low_open=True)
        check_number("weight_decay", self.weight_decay, low=0)
        check_number("min_lr_ratio", self.min_lr_ratio, low=0, high=1)
        check_number("grad_clip", self.grad_clip, low=0, low_open=True)
        return self

    def epochs(self, n_train_tokens: int) -> float:
        """How many passes over ``n_train_tokens`` the schedule makes."""
        return self.steps * self.batch_size * self.seq_len / max(1, n_train_tokens)


#: Warn when the schedule makes more passes than this over the training tokens.
EPOCH_WARNING = 4.0


@dataclass(repr=False)
class TrainResult(Result):
    """What :func:`train_lm` measured.

    Attributes:
        epochs: passes over the training tokens the schedule made.
        overfit_step: first evaluation step whose validation loss rose over the best one
            before it (None while it keeps falling); a warning is logged then.
        dtype: the compute dtype of the steps (``"float32"``, or the autocast dtype).
    """

    steps: int
    final_train_loss: float
    val_loss: float
    history: list[dict] = bulky(list)
    seconds: float = 0.0
    steps_per_second: float = 0.0
    resumed_from: int | None = None
    epochs: float = 0.0
    overfit_step: int | None = None
    dtype: str = "float32"


def _lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)


def _optimizer(model, cfg: TrainConfig) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.95),
    )


def train_lm(
    model,
    train_tokens: Int[Tensor, " n_train"],
    val_tokens: Int[Tensor, " n_val"],
    config: TrainConfig | None = None,
    *,
    store=None,
    device: str | torch.device | None = None,
    progress: bool = True,
    stop_after: int | None = None,
    loss_fn: Callable[..., Tensor] | None = None,
    dtype: str | torch.dtype | None = None,
) -> TrainResult:
    """Train ``model`` in place; with a ``store``, checkpoint and resume from its last step.

    Batches are a deterministic function of (seed, step), and the optimizer state and RNG are
    checkpointed, so an interrupted run resumed from the store ends with the same weights as
    an uninterrupted one. ``stop_after`` ends the run early after that many steps (used to
    simulate an interruption). ``loss_fn(model, batch) -> scalar`` replaces the next-token
    loss of the training steps (an objective, e.g. :class:`interp.distill.KDObjective`);
    validation still reports the next-token loss.

    ``dtype`` (``"float32"``, ``"bfloat16"``, ``"float16"``; see :func:`resolve_dtype`) runs
    forward passes, training and validation, under :func:`torch.autocast`. The weights,
    their gradients and AdamW's state stay in the model's dtype (float32 master weights);
    float16 adds loss scaling, whose state is checkpointed for exact resumption.
    """
    from interp.data.text import iterate_batches

    cfg = (config or TrainConfig()).validate()
    n_train = int(train_tokens.numel())
    if n_train < cfg.seq_len + 1:
        raise InterpError(
            f"The training text has {n_train} tokens, fewer than one sequence of seq_len + 1 = "
            f"{cfg.seq_len + 1}. Use a larger corpus or a shorter seq_len."
        )
    n_ctx = getattr(getattr(model, "cfg", None), "n_ctx", None)
    if isinstance(n_ctx, int) and cfg.seq_len > n_ctx:
        raise ConfigError(
            f"seq_len {cfg.seq_len} is longer than the model's context n_ctx {n_ctx}. Pass "
            f"seq_len <= {n_ctx} or a model with a longer context.")
    epochs = cfg.epochs(n_train)
    if epochs > EPOCH_WARNING:
        log.warning(
            "The LM schedule (%d steps x %d x %d tokens) makes %.1f passes over the %d "
            "training tokens; expect overfitting. Use fewer steps or a larger corpus.",
            cfg.steps, cfg.batch_size, cfg.seq_len, epochs, n_train)
    device = resolve_device(model, device)
    compute = resolve_dtype(dtype, device)
    model.to(device)
    opt = _optimizer(model, cfg)
    scaler = grad_scaler(device, compute)
    start, history, resumed = 0, [], None
    if store is not None and store.latest_step() is not None:
        ckpt = store.load(store.latest_step(), model=model, optimizer=opt, device=device)
        start, resumed = ckpt.step, ckpt.step
        history = list(ckpt.metadata.get("history", []))
        if scaler is not None and ckpt.metadata.get("grad_scaler"):
            scaler.load_state_dict(ckpt.metadata["grad_scaler"])
        stored = ckpt.metadata.get("dtype", "float32")
        if stored != dtype_name(compute):
            log.warning("resuming a run trained in %s with dtype %s: the steps after %d differ "
                        "from an uninterrupted run", stored, dtype_name(compute), start)
        log.info("resuming from step %d", start)
        if start >= cfg.steps:
            return TrainResult(start, history[-1]["train_loss"] if history else float("nan"),
                               ckpt.metadata.get("val_loss", float("nan")), history,
                               resumed_from=resumed, epochs=epochs,
                               overfit_step=_overfit_step(history),
                               dtype=dtype_name(compute))
    torch.manual_seed(cfg.seed + start)
    batches = iterate_batches(train_tokens, cfg.batch_size, cfg.seq_len, seed=cfg.seed, start=start)
    end = cfg.steps if stop_after is None else min(cfg.steps, start + stop_after)
    model.train()
    t0 = time.perf_counter()
    bar = tqdm(range(start, end), desc="train LM", disable=not progress, initial=start,
               total=cfg.steps)
    overfit = _overfit_step(history)
    with no_denormals():
        loss_val, val_loss, overfit = _train_steps(
            model, opt, batches, bar, cfg, val_tokens, device, store, history, overfit,
            loss_fn, compute, scaler)
    seconds = time.perf_counter() - t0
    model.eval()
    n = end - start
    if end == cfg.steps and math.isnan(val_loss):
        with autocast(device, compute):
            val_loss = evaluate_loss(model, val_tokens, seq_len=cfg.seq_len,
                                     batch_size=cfg.batch_size, max_batches=cfg.eval_batches)
    return TrainResult(end, loss_val, val_loss, history, seconds,
                       n / seconds if seconds > 0 else 0.0, resumed, epochs, overfit,
                       dtype_name(compute))


def _overfit_step(history: list[dict]) -> int | None:
    """First step whose validation loss is above the best earlier validation loss."""
    best = math.inf
    for rec in history:
        v = rec.get("val_loss")
        if v is None:
            continue
        if v > best:
            return rec["step"]
        best = min(best, v)
    return None


def _train_steps(model, opt, batches, bar, cfg, val_tokens, device, store, history, overfit,
                 loss_fn=None, compute=torch.float32, scaler=None):
    """The optimizer steps of :func:`train_lm` (``bar`` iterates over step indices);
    forward passes under autocast to ``compute``, float16 with the loss ``scaler``."""
    loss_val, val_loss = float("nan"), float("nan")
    best_val = min((r["val_loss"] for r in history if r.get("val_loss") is not None),
                   default=math.inf)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, cfg)
        batch = next(batches).to(device)
        with autocast(device, compute):
            loss = lm_loss(model(batch), batch) if loss_fn is None else loss_fn(model, batch)
        opt.zero_grad(set_to_none=True)
        if scaler is None:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
        else:  # float16: scaled backward; clip the true gradients; skip steps with inf/nan
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            scaler.step(opt)
            scaler.update()
        loss_val = loss.item()
        done = step + 1
        record = {"step": done, "train_loss": loss_val, "lr": _lr_at(step, cfg)}
        if done % cfg.eval_every == 0 or done == cfg.steps:
            with autocast(device, compute):
                val_loss = evaluate_loss(model, val_tokens, seq_len=cfg.seq_len,
                                         batch_size=cfg.batch_size, max_batches=cfg.eval_batches)
            record["val_loss"] = val_loss
            model.train()
            bar.set_postfix(loss=f"{loss_val:.3f}", val=f"{val_loss:.3f}")
            if val_loss > best_val and overfit is None:
                overfit = done
                log.warning(
                    "Validation loss rose at step %d (%.4f, best so far %.4f): the model "
                    "starts to overfit. Use fewer steps or a larger corpus.",
                    done, val_loss, best_val)
            best_val = min(best_val, val_loss)
        history.append(record)
        if store is not None and (done % cfg.checkpoint_every == 0 or done == cfg.steps):
            meta = {"val_loss": record.get("val_loss"), "train_config": asdict(cfg),
                    "history": history, "dtype": dtype_name(compute)}
            if scaler is not None:
                meta["grad_scaler"] = scaler.state_dict()
            store.save(model, done, optimizer=opt, metadata=meta)
    return loss_val, val_loss, overfit
