import numpy as np
import pytest
import torch
from PIL import Image

from interp.data import images as im
from interp.data.images import (
    ImageSet,
    builtin_images,
    load_hf_images,
    load_image_array,
    load_image_folder,
    mnist_digits,
    photo_patches,
    sklearn_digits,
)
from interp.errors import ConfigError, DataError


def _keys(s: ImageSet) -> set[bytes]:
    return {x.numpy().tobytes() for x in s.images}


def _gray_images(n=6, h=7, w=9, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w), dtype=np.uint8)


# --------------------------------------------------------------------------- digits


def test_mnist_full_set_is_500_real_digits_per_class():
    s = mnist_digits()
    assert s.shape == (5000, 1, 28, 28) and s.images.dtype == torch.uint8
    assert s.labels.dtype == torch.int64
    assert torch.bincount(s.labels).tolist() == [500] * 10
    assert s.images.min() == 0 and s.images.max() == 255
    assert len(_keys(s)) == 5000  # no duplicate images
    # a digit is ink on a black background: the border is (almost) empty, the centre not
    assert s.images[..., :3, :].float().mean() < 2 and s.images[..., 10:18, 10:18].float().mean() > 60


def test_mnist_split_is_fixed_stratified_and_disjoint():
    tr, te = mnist_digits("train"), mnist_digits("test")
    assert len(tr) == 4000 and len(te) == 1000
    assert torch.bincount(tr.labels).tolist() == [400] * 10
    assert torch.bincount(te.labels).tolist() == [100] * 10
    assert not _keys(tr) & _keys(te)
    assert _keys(tr) | _keys(te) == _keys(mnist_digits())
    assert torch.equal(mnist_digits("test").images, te.images)
    assert tr.labels[:20].unique().numel() > 3  # shuffled, not sorted by class


def test_builtin_mnist_subsets_are_seeded_and_stay_in_their_split():
    a = builtin_images("mnist", "test", n=50, seed=1)
    b = builtin_images("mnist", "test", n=50, seed=1)
    c = builtin_images("mnist", "test", n=50, seed=2)
    assert len(a) == 50 and torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, c.images)
    assert _keys(a) <= _keys(mnist_digits("test"))
    with pytest.raises(ConfigError):
        builtin_images("mnist", "test", n=1001)


def test_sklearn_digits_rescaled_and_resized():
    s = sklearn_digits()
    assert s.shape == (1797, 1, 8, 8) and s.images.dtype == torch.uint8
    assert s.images.min() == 0 and s.images.max() == 255
    assert set(s.labels.tolist()) == set(range(10))
    tr, te = sklearn_digits("train"), sklearn_digits("test")
    assert len(tr) + len(te) == 1797 and 340 < len(te) < 380
    big = sklearn_digits("test", size=28)
    assert big.shape == (len(te), 1, 28, 28) and torch.equal(big.labels, te.labels)
    assert abs(big.images.float().mean() - te.images.float().mean()) < 3  # same picture
    d = builtin_images("digits", "train")
    assert torch.equal(d.images, tr.images)


# --------------------------------------------------------------------------- photo patches


def test_patches_shape_determinism_and_contrast():
    a = photo_patches(400, seed=0)
    assert a.shape == (400, 1, 28, 28) and a.images.dtype == torch.uint8 and a.labels is None
    assert torch.equal(a.images, photo_patches(400, seed=0).images)
    b = photo_patches(400, seed=1)
    assert len(_keys(a) & _keys(b)) < 40  # another seed, other crops
    assert len(_keys(a)) == 400  # all distinct
    std = a.images.float().flatten(1).std(1)
    assert (std >= 4.0).all()  # near-flat crops are skipped
    assert a.images.min() < 30 and a.images.max() > 225
    assert a.images.float().mean(dim=(1, 2, 3)).std() > 20  # many photos, not one


def test_patch_splits_share_no_pixels():
    tr = builtin_images("patches", "train", n=6000)
    te = builtin_images("patches", "test")
    assert len(te) == 2000 and len(tr) == 6000
    assert not _keys(tr) & _keys(te)
    flipped = {x.flip(-1).numpy().tobytes() for x in te.images}
    assert not _keys(tr) & flipped
    # the bands: test crops come from the bottom rows of each photo only, train from the rest
    for channels in (1, 3):
        photos = dict(im._photos(channels))
        train = {p: a for p, f, a in im._bands(channels, "train", 28) if f == 1}
        test = {p: a for p, f, a in im._bands(channels, "test", 28) if f == 1}
        for p, a in photos.items():
            cut = int(round(a.shape[0] * (1 - im.HELD_OUT_ROWS)))
            assert np.array_equal(train[p], a[:cut]) and np.array_equal(test[p], a[cut:])
            assert a.shape[0] - cut >= 0.15 * a.shape[0]


def test_patches_can_be_many_and_all_listed_photos_are_used():
    s = builtin_images("patches", "train")
    assert len(s) == 20_000 and len(_keys(s)) == 20_000
    names = set(im.SKIMAGE_GRAY_PHOTOS + im.SKIMAGE_COLOUR_PHOTOS + im.SKLEARN_PHOTOS)
    assert {p for p, _ in im._photos(1)} == names
    assert {p for p, _ in im._photos(3)} == set(im.SKIMAGE_COLOUR_PHOTOS + im.SKLEARN_PHOTOS)


def test_rgb_patches_are_colour():
    s = builtin_images("patches_rgb", "test", n=300, seed=3)
    assert s.shape == (300, 3, 32, 32)
    x = s.images.float()
    assert (x[:, 0] - x[:, 2]).abs().mean() > 5  # channels differ: not gray copies
    assert torch.equal(s.images, builtin_images("patches_rgb", "test", n=300, seed=3).images)


def test_mnist_is_darker_and_flatter_than_patches():
    m, p = mnist_digits("test"), photo_patches(1000, split="test")
    assert m.images.float().mean() < 50 < 90 < p.images.float().mean()
    assert (m.images == 0).float().mean() > 0.6 > 0.1 > (p.images == 0).float().mean()


def test_patch_options_are_checked():
    with pytest.raises(ConfigError, match="smaller size"):
        photo_patches(10, size=200, split="test")
    with pytest.raises(ConfigError):
        photo_patches(0)


def test_unknown_builtin_name_and_split_raise_config_error(unchecked):
    with pytest.raises(ConfigError, match="Did you mean: mnist"):
        builtin_images("minst")
    with pytest.raises(ConfigError, match="patches"):
        builtin_images("photos")
    with unchecked(), pytest.raises(ConfigError, match="Did you mean: test"):
        builtin_images("digits", "tset")


# --------------------------------------------------------------------------- ImageSet


def _set(n=10):
    x = torch.arange(n * 4, dtype=torch.uint8).view(n, 1, 2, 2)
    return ImageSet(x, torch.arange(n) % 3, "toy", "test")


def test_imageset_split_take_subset():
    s = _set(10)
    a, b = s.split((0.7, 0.3), seed=0)
    assert (len(a), len(b)) == (7, 3)
    assert sorted(a.labels.tolist() + b.labels.tolist()) == sorted(s.labels.tolist())
    assert not _keys(a) & _keys(b)
    a2, _ = s.split((0.7, 0.3), seed=0)
    assert torch.equal(a.images, a2.images)
    assert not torch.equal(a.images, s.split((0.7, 0.3), seed=5)[0].images)
    c, d = s.split((4, 2), seed=1)
    assert (len(c), len(d)) == (4, 2) and not _keys(c) & _keys(d)
    assert s.split((0.25, 0.25), seed=0)[1].shape == (2, 1, 2, 2)  # floors, leaves the rest
    assert torch.equal(s.take(3).images, s.images[:3])
    mask = s.labels == 0
    assert s.subset(mask).labels.tolist() == [0] * int(mask.sum())
    assert s.subset([9, 0]).labels.tolist() == [0, 0] and len(s) == 10
    for bad in [(0.8, 0.3), (8, 3)]:
        with pytest.raises(ConfigError):
            s.split(bad)
    with pytest.raises(ConfigError):
        s.take(11)
    with pytest.raises(ConfigError):
        s.subset([10])


def test_imageset_rejects_mismatched_labels(unchecked):
    x = torch.zeros(3, 1, 2, 2, dtype=torch.uint8)
    with unchecked(), pytest.raises(DataError, match="labels"):
        ImageSet(x, torch.zeros(2, dtype=torch.int64), "toy", "test")
    with unchecked(), pytest.raises(DataError, match="uint8"):
        ImageSet(x.float(), None, "toy", "test")


# --------------------------------------------------------------------------- HF datasets


def test_load_hf_images_from_disk(tmp_path):
    import datasets

    arr = _gray_images(5)
    ds = datasets.Dataset.from_dict({"image": [Image.fromarray(a) for a in arr],
                                     "label": [3, 1, 4, 1, 5]})
    ds.save_to_disk(str(tmp_path / "ds"))
    s = load_hf_images(tmp_path / "ds")
    assert s.shape == (5, 1, 7, 9) and s.labels.tolist() == [3, 1, 4, 1, 5]
    assert np.array_equal(s.images[:, 0].numpy(), arr)
    s2 = load_hf_images(str(tmp_path / "ds"), n=2, label_key="label")
    assert len(s2) == 2 and torch.equal(s2.images, s.images[:2])
    with pytest.raises(DataError, match="'lbl'.*Did you mean: label"):
        load_hf_images(tmp_path / "ds", label_key="lbl")


def test_load_hf_images_rgb_dict_and_string_labels(tmp_path):
    import datasets

    rgb = np.random.default_rng(1).integers(0, 256, (4, 6, 5, 3), dtype=np.uint8)
    ds = datasets.Dataset.from_dict({"img": [Image.fromarray(a) for a in rgb],
                                     "labels": ["cat", "dog", "cat", "ant"]})
    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(tmp_path / "d"))
    s = load_hf_images(tmp_path / "d", split="test")
    assert s.shape == (1, 3, 6, 5)
    s = load_hf_images(tmp_path / "d")
    assert np.array_equal(s.images.permute(0, 2, 3, 1).numpy(), rgb)
    assert s.classes == ("ant", "cat", "dog") and s.labels.tolist() == [1, 2, 1, 0]
    with pytest.raises(DataError, match="no split 'valid'"):
        load_hf_images(tmp_path / "d", split="valid")


def test_load_hf_images_unavailable_dataset_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match="'svhn' .*ufldl-stanford/svhn.*cropped_digits.*network"):
        load_hf_images("svhn")
    with pytest.raises(DataError, match="no-such-user/no-images.*could not be loaded"):
        load_hf_images("no-such-user/no-images")
    with pytest.raises(DataError, match="does not exist"):
        load_hf_images(tmp_path / "missing")


# --------------------------------------------------------------------------- folders


def test_load_image_folder_flat_and_by_class(tmp_path):
    arr = _gray_images(4)
    for i, a in enumerate(arr):
        Image.fromarray(a).save(tmp_path / f"{i}.png")
    s = load_image_folder(tmp_path)
    assert s.shape == (4, 1, 7, 9) and s.labels is None
    assert np.array_equal(s.images[:, 0].numpy(), arr)  # sorted file order, lossless PNG

    root = tmp_path / "classes"
    for k, cls in enumerate(["b", "a"]):
        (root / cls).mkdir(parents=True)
        for i in range(k + 1):
            Image.fromarray(np.full((5, 5, 3), 40 * i, np.uint8)).save(root / cls / f"{i}.jpg")
    Image.fromarray(arr[0][:5, :5]).save(root / "a" / "gray.png")  # gray among colour
    s = load_image_folder(root)
    assert s.shape == (4, 3, 5, 5) and s.classes == ("a", "b")
    assert s.labels.tolist() == [0, 0, 0, 1]


def test_load_image_folder_errors_name_the_file(tmp_path):
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.zeros((4, 6), np.uint8)).save(tmp_path / "b.png")
    with pytest.raises(DataError, match=r"b\.png.* 6x4 .*a\.png.* 4x4.*one size"):
        load_image_folder(tmp_path)
    (tmp_path / "b.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match=r"b\.png.*not a readable"):
        load_image_folder(tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        load_image_folder(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="has no"):
        load_image_folder(tmp_path / "empty")


# --------------------------------------------------------------------------- arrays


@pytest.mark.parametrize("layout", ["nhw", "nhwc", "nchw", "float"])
def test_load_image_array_layouts(tmp_path, layout):
    rgb = np.random.default_rng(2).integers(0, 256, (3, 8, 6, 3), dtype=np.uint8)
    data = {"nhw": rgb[..., 0], "nhwc": rgb, "nchw": rgb.transpose(0, 3, 1, 2),
            "float": rgb.astype(np.float32) / 255}[layout]
    np.save(tmp_path / "x.npy", data)
    s = load_image_array(tmp_path / "x.npy")
    want = rgb[..., :1] if layout == "nhw" else rgb
    assert s.images.dtype == torch.uint8 and s.labels is None
    assert np.array_equal(s.images.permute(0, 2, 3, 1).numpy(), want)


def test_load_image_array_npz_with_labels(tmp_path):
    x = _gray_images(4).astype(np.int64)
    np.savez(tmp_path / "d.npz", images=x, labels=np.array([0, 1, 1, 0]))
    s = load_image_array(tmp_path / "d.npz")
    assert s.shape == (4, 1, 7, 9) and s.labels.tolist() == [0, 1, 1, 0]
    np.savez(tmp_path / "bad.npz", images=x, labels=np.array([0, 1]))
    with pytest.raises(DataError, match=r"bad\.npz.*4 integer labels"):
        load_image_array(tmp_path / "bad.npz")


@pytest.mark.parametrize("bad,match", [
    (np.full((2, 4, 4), 200.0), "float64 images, values 200.0..200.0, expected uint8"),
    (np.full((2, 4, 4), 1000, np.int16), "int16 images"),
    (np.array([["a"]]), "2-D"),
    (np.zeros((2, 4, 4, 5), np.uint8), "no axis of size 1 or 3"),
    (np.full((2, 4, 4), np.nan, np.float32), "float32 images"),
])
def test_load_image_array_rejects_bad_arrays(tmp_path, bad, match):
    np.save(tmp_path / "x.npy", bad)
    with pytest.raises(DataError, match=match) as e:
        load_image_array(tmp_path / "x.npy")
    assert "x.npy" in str(e.value) and "[N, H, W]" in str(e.value)


def test_load_image_array_file_errors(tmp_path):
    with pytest.raises(DataError, match=r"missing\.npy.*does not exist"):
        load_image_array(tmp_path / "missing.npy")
    (tmp_path / "t.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(DataError, match=r"t\.npy.*not a NumPy file"):
        load_image_array(tmp_path / "t.npy")
    with pytest.raises(DataError, match=r"\.npy or \.npz"):
        load_image_array(tmp_path / "x.csv")
