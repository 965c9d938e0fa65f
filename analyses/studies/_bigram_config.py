"""The bigram study's configuration and mask-training recipes (a leaf: imports no study code).

A recipe is the mask-training procedure: optimizer lr, temperature schedule, step budget,
batch, λ sweep and spike retries. ``mini`` is what works on the tiny presets on 2 CPU cores;
``paper`` is the published one (research/bigram-subnetworks.md). Flags override single values
and the run records the recipe and its overrides in ``metrics.json``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from interp.errors import ConfigError, ModelLoadError, check_number, suggest
from interp.models.lm import PRESETS, dtype_name, resolve_dtype


@dataclass(frozen=True)
class MaskRecipe:
    """How every subnetwork of a run is trained (one recipe and budget everywhere)."""

    mask_lr: float
    temperature_factor: float
    mask_steps: int
    mask_batch: int
    lambdas: tuple[float, ...]
    spike_retries: int
    description: str = ""


RECIPES: dict[str, MaskRecipe] = {
    "mini": MaskRecipe(
        mask_lr=0.05, temperature_factor=1.01, mask_steps=500, mask_batch=16,
        lambdas=(0.0, 0.5, 1.0, 2.0, 5.0), spike_retries=0,
        description="tiny presets on a CPU: lr 0.05, T x1.01 per step, at most 500 steps of "
                    "16 sequences (measured to reach r > 0.95 at this scale)"),
    "paper": MaskRecipe(
        mask_lr=5e-5, temperature_factor=1.001, mask_steps=15_000, mask_batch=32,
        lambdas=(0.0, 1.0, 5.0, 10.0, 50.0, 100.0, 500.0, 1000.0), spike_retries=2,
        description="Chang & Bergen 2025: AdamW lr 5e-5, T x1.001 per step, at most 15k "
                    "steps of 32 x 128 tokens, stopping rule, up to 3 attempts on a loss spike"),
}

#: Config fields a recipe sets (a flag or argument may override each).
RECIPE_FIELDS = tuple(f.name for f in dataclasses.fields(MaskRecipe) if f.name != "description")

#: Fields that do not change results: a rerun may differ in them.
VOLATILE = frozenset({"out", "device"})


@dataclass
class BigramStudyConfig:
    """Everything that defines a run; the run directory is tied to it (``config.json``).

    Build with :meth:`from_recipe` (or :meth:`quick_defaults`) so the recipe's values fill
    the mask fields; :meth:`validate` rejects values that make no sense before any work.
    """

    out: str = "runs/default"
    corpus: str = "builtin"
    model: str = "tiny"
    vocab_size: int = 1024
    seed: int = 0
    device: str = "cpu"
    # compute dtype of LM and mask training (torch.autocast; masks and optimizer state stay
    # float32); the analyses run in float32
    dtype: str = "float32"
    # LM training (presets only)
    lm_steps: int = 1250
    lm_batch: int = 16
    seq_len: int = 128
    lm_lr: float = 3e-3
    lm_checkpoint_every: int = 250
    # masks: the recipe and its values
    recipe: str = "mini"
    lambdas: tuple[float, ...] = RECIPES["mini"].lambdas
    mask_steps: int = RECIPES["mini"].mask_steps
    mask_lr: float = RECIPES["mini"].mask_lr
    temperature_factor: float = RECIPES["mini"].temperature_factor
    mask_batch: int = RECIPES["mini"].mask_batch
    spike_retries: int = RECIPES["mini"].spike_retries
    tolerance: float = 0.04
    # evaluation
    eval_sequences: int = 64
    residual_sequences: int = 48
    checkpoint_steps: tuple[int, ...] = (250, 500)
    random_init_control: bool = True
    quick: bool = False

    @classmethod
    def from_recipe(cls, recipe: str = "mini", **overrides) -> BigramStudyConfig:
        """A config whose mask fields come from ``RECIPES[recipe]``, then ``overrides``."""
        if recipe not in RECIPES:
            raise ConfigError(f"Unknown recipe {recipe!r}; recipes are {sorted(RECIPES)}."
                              f"{suggest(recipe, RECIPES)}")
        base = {k: getattr(RECIPES[recipe], k) for k in RECIPE_FIELDS}
        return cls(recipe=recipe, **{**base, **overrides}).validate()

    @classmethod
    def quick_defaults(cls, recipe: str = "mini", **overrides) -> BigramStudyConfig:
        """The ``--quick`` run: the same pipeline, smaller (a few minutes on 2 cores)."""
        base = dict(lm_steps=400, lambdas=(0.0, 1.0), mask_steps=250, temperature_factor=1.02,
                    eval_sequences=32, residual_sequences=24, checkpoint_steps=(200,),
                    lm_checkpoint_every=200, random_init_control=False, quick=True)
        return cls.from_recipe(recipe, **{**base, **overrides})

    def overrides(self) -> dict:
        """Recipe fields whose value differs from the recipe's."""
        rec = RECIPES[self.recipe]
        return {k: getattr(self, k) for k in RECIPE_FIELDS
                if _plain(getattr(self, k)) != _plain(getattr(rec, k))}

    def recipe_record(self) -> dict:
        """What metrics.json and the report say about the recipe."""
        return {"name": self.recipe, "description": RECIPES[self.recipe].description,
                **{k: _plain(getattr(self, k)) for k in RECIPE_FIELDS},
                "overrides": {k: _plain(v) for k, v in self.overrides().items()}}

    def validate(self) -> BigramStudyConfig:
        """Raise ConfigError for a value that makes no sense (negative, zero, out of range)."""
        if self.recipe not in RECIPES:
            raise ConfigError(f"Unknown recipe {self.recipe!r}; recipes are {sorted(RECIPES)}."
                              f"{suggest(self.recipe, RECIPES)}")
        for name in ("lm_steps", "lm_batch", "lm_checkpoint_every", "mask_steps", "mask_batch",
                     "eval_sequences", "residual_sequences"):
            check_number(name, getattr(self, name), low=1, integer=True)
        check_number("vocab_size", self.vocab_size, low=258, integer=True)
        check_number("seq_len", self.seq_len, low=2, integer=True)
        check_number("seed", self.seed, low=0, integer=True)
        check_number("spike_retries", self.spike_retries, low=0, integer=True)
        check_number("lm_lr", self.lm_lr, low=0, low_open=True)
        check_number("mask_lr", self.mask_lr, low=0, low_open=True)
        check_number("temperature_factor", self.temperature_factor, low=1)
        check_number("tolerance", self.tolerance, low=0, high=1)
        self.dtype = dtype_name(resolve_dtype(self.dtype, self.device, option="dtype"))
        if not self.lambdas:
            raise ConfigError("lambdas is empty: give at least one sparsity weight, e.g. 0,1,5.")
        for lam in self.lambdas:
            check_number("every lambda", lam, low=0)
        if len(set(self.lambdas)) != len(self.lambdas):
            raise ConfigError(f"lambdas has duplicates: {list(self.lambdas)}. Give each "
                              "sparsity weight once.")
        for step in self.checkpoint_steps:
            check_number("every checkpoint step", step, low=1, integer=True)
        self.lambdas = tuple(sorted(float(x) for x in self.lambdas))
        self.checkpoint_steps = tuple(sorted(int(x) for x in self.checkpoint_steps))
        return self

    def to_dict(self) -> dict:
        return {k: _plain(v) for k, v in dataclasses.asdict(self).items()}

    def diff(self, stored: dict) -> list[str]:
        """Fields (besides volatile ones) in which ``stored`` (a config.json) differs."""
        new = self.to_dict()
        stored = {"dtype": "float32", **stored}  # runs from before the option were float32
        return sorted(k for k in set(stored) | set(new)
                      if k not in VOLATILE and stored.get(k) != new.get(k))


def model_kind(spec: str) -> str:
    """``"preset"``, or ``"hf"`` for a hub id or a local HF directory; a bare name close to a
    preset (a typo such as ``tiny5``) raises ConfigError instead of going to the hub; a local
    path that is missing or holds no HF model (no config.json) raises ModelLoadError."""
    if spec in PRESETS:
        return "preset"
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"--model {spec!r} is a directory but not a Hugging Face model (no config.json). "
                "Pass a directory written by save_pretrained (config.json, weights, tokenizer), "
                f"a hub id (owner/name), or a preset ({', '.join(sorted(PRESETS))}).")
        return "hf"
    if spec.startswith((".", "/", "~")) or path.exists():
        raise ModelLoadError(
            f"--model {spec!r} is not an existing model directory. Check the path, or pass a "
            f"hub id (owner/name) or a preset ({', '.join(sorted(PRESETS))}).")
    if "/" in spec:
        return "hf"
    hint = suggest(spec, PRESETS)
    if hint:
        raise ConfigError(f"Unknown model preset {spec!r}; presets are {sorted(PRESETS)}.{hint} "
                          "For an HF model pass its hub id (owner/name) or a local directory.")
    return "hf"


def _plain(v):
    return list(v) if isinstance(v, tuple) else v
