"""Image sources (HDF5 lazy reads, reorder, identity) and torch preprocessing vs torchvision/PIL."""
import h5py
import numpy as np
import pytest

from brainenc.exceptions import ConfigError, DataFormatError
from brainenc.features import ArrayImages, HDF5Images, Preprocess
from brainenc.features.images import as_image_source, check_image_ids


@pytest.fixture
def brick(tmp_path):
    rng = np.random.default_rng(1)
    arr = rng.integers(0, 256, size=(12, 6, 5, 3), dtype=np.uint8)
    path = tmp_path / "stim.hdf5"
    with h5py.File(path, "w") as f:
        f.create_dataset("imgBrick", data=arr)
    return path, arr


def test_hdf5_reads_unsorted_ids_with_duplicates(brick):
    path, arr = brick
    src = HDF5Images(path)
    ids = np.array([7, 2, 7, 11, 0, 2])
    out = src.read(ids)
    assert out.dtype == np.uint8 and out.shape == (6, 6, 5, 3)
    np.testing.assert_array_equal(out, arr[ids])
    np.testing.assert_array_equal(src.read([5]), arr[[5]])
    assert len(src) == 12


def test_hdf5_rejects_bad_ids_and_layout(brick, tmp_path):
    path, _ = brick
    src = HDF5Images(path)
    with pytest.raises(DataFormatError, match="holds 12 images"):
        src.read([3, 12])
    with pytest.raises(DataFormatError, match="0-based"):
        src.read([-1])
    bad = tmp_path / "bad.hdf5"
    with h5py.File(bad, "w") as f:
        f.create_dataset("imgBrick", data=np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(DataFormatError, match=r"uint8 \[n, H, W, 3\]"):
        HDF5Images(bad)
    with pytest.raises(DataFormatError, match="no dataset 'other'"):
        HDF5Images(path, key="other")


def test_identity_follows_content_not_path(brick, tmp_path):
    path, arr = brick
    a = HDF5Images(path).identity()
    moved = tmp_path / "moved"
    moved.mkdir()
    (moved / "stim.hdf5").write_bytes(path.read_bytes())
    assert HDF5Images(moved / "stim.hdf5").identity() == a
    with h5py.File(moved / "stim.hdf5", "r+") as f:
        f["imgBrick"][11] = 255 - f["imgBrick"][11]  # last image is always sampled
    assert HDF5Images(moved / "stim.hdf5").identity() != a
    b = arr.copy()
    b[3, 0, 0, 0] ^= 1
    assert ArrayImages(arr).identity() != ArrayImages(b).identity()
    assert ArrayImages(arr).identity() == ArrayImages(arr.copy()).identity()


def test_as_image_source_and_id_checks(brick):
    path, arr = brick
    assert isinstance(as_image_source(arr), ArrayImages)
    assert isinstance(as_image_source(str(path)), HDF5Images)
    with pytest.raises(DataFormatError):
        as_image_source([1, 2, 3])
    with pytest.raises(DataFormatError, match="1-D"):
        check_image_ids(np.zeros((2, 2), int))
    with pytest.raises(DataFormatError, match="integers"):
        check_image_ids(np.array([0.5]))
    with pytest.raises(DataFormatError, match="uint8"):
        ArrayImages(arr.astype(np.float32))


def test_preprocess_matches_torchvision_resize_crop():
    import torch
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    rng = np.random.default_rng(2)
    img = rng.integers(0, 256, size=(2, 90, 130, 3), dtype=np.uint8)
    pre = Preprocess(size=64, resize_mode="shortest", crop_pct=0.875, interpolation="bilinear",
                     mean=(0.1, 0.2, 0.3), std=(0.5, 0.6, 0.7))
    ours = pre(img)
    x = torch.from_numpy(img).permute(0, 3, 1, 2).float() / 255
    ref = TF.center_crop(TF.resize(x, 73, interpolation=InterpolationMode.BILINEAR, antialias=True), [64, 64])
    ref = TF.normalize(ref, [0.1, 0.2, 0.3], [0.5, 0.6, 0.7])
    assert ours.shape == (2, 3, 64, 64)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_preprocess_close_to_pil_bicubic(photos):
    from PIL import Image

    img = photos["chelsea"]  # 300 x 451
    pre = Preprocess(size=224, resize_mode="shortest", crop_pct=0.875, mean=(0, 0, 0), std=(1, 1, 1))
    ours = pre(img[None])[0].permute(1, 2, 0).numpy()
    pil = Image.fromarray(img).resize((int(256 * 451 / 300), 256), Image.BICUBIC)
    w, h = pil.size
    left, top = int(round((w - 224) / 2)), int(round((h - 224) / 2))
    ref = np.asarray(pil.crop((left, top, left + 224, top + 224)), dtype=np.float32) / 255
    assert np.abs(ours - ref).mean() < 0.01


def test_preprocess_squash_longest_and_validation():
    img = np.full((1, 20, 40, 3), 200, np.uint8)
    sq = Preprocess(size=(16, 16), resize_mode="squash", mean=(0, 0, 0), std=(1, 1, 1))(img)
    assert sq.shape == (1, 3, 16, 16)
    lo = Preprocess(size=16, resize_mode="longest", mean=(0, 0, 0), std=(1, 1, 1), fill=0.0)(img)
    assert lo.shape == (1, 3, 16, 16)
    assert float(lo[0, 0, 0, 0]) == 0.0 and abs(float(lo[0, 0, 8, 8]) - 200 / 255) < 1e-5  # padded rows on top
    with pytest.raises(ConfigError, match="resize_mode"):
        Preprocess(resize_mode="crop")
    with pytest.raises(ConfigError, match="uint8"):
        Preprocess()(np.zeros((1, 8, 8, 3), np.float32))
    assert Preprocess(size=224).with_size(256).size == (256, 256)
