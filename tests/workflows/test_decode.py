"""The decode task (Brain-IT) end to end on tiny simulated subjects: records, stored numbers ==
recomputed, cluster maps, transfer curve, resume, spec errors."""
import json
from pathlib import Path

import numpy as np
import pytest

from brainenc.exceptions import ConfigError
from brainenc.workflows import load_pipeline, run_pipeline

from conftest import SIM

SPEC = """
[pipeline]
name = "tinydecode"
task = "decode"

[data]
subjects = ["subj01", "subj02", "subj03"]
transfer_subject = "subj04"
transfer_sessions = [1, 2]

[simulate]
{sim}
anatomy_jitter = 0.1

[features]
image_size = 64
encoder_layers = ["blocks.10", "blocks.15"]
semantic_layer = "blocks.15"
lowlevel_layers = ["blocks.5", "blocks.10"]

[encoder]
voxels_per_example = 200
model = {{embed_dim = 16, token_dim = 16, dropout = 0.0}}
train = {{epochs = 2, batch_size = 32}}

[clusters]
n_clusters = 6
covariance_type = "diag"

[bit_semantic]
voxels_per_example = 300
model = {{width = 32, heads = 2, n_self = 1}}
train = {{epochs = 2, batch_size = 32, warmup_epochs = 1}}

[bit_lowlevel]
voxels_per_example = 300
group_samples = [16, 8]
model = {{width = 32, heads = 2, n_self = 1}}
train = {{epochs = 2, batch_size = 32, warmup_epochs = 1}}

[ridge]
alphas = [100.0, 10000.0]

[augment]
n_images = 24

[transfer]
encoder_train = {{epochs = 1}}
bit_train = {{epochs = 1, warmup_epochs = 0}}
"""


def _spec(tmp_path: Path) -> Path:
    sim = dict(SIM, n_sessions="2")
    path = tmp_path / "tinydecode.toml"
    path.write_text(SPEC.format(sim="\n".join(f"{k} = {v}" for k, v in sim.items())))
    return path


@pytest.mark.slow
def test_decode_end_to_end(tmp_path):
    import nibabel as nib

    from brainenc import load
    from brainenc.datasets.multisubject import feature_rows
    from brainenc.datasets.prepare import load_prepared
    from brainenc.metrics.retrieval import feature_retrieval

    data = tmp_path / "data"
    spec = _spec(tmp_path)
    run = run_pipeline(spec, data_dir=data)
    stage = lambda name: json.loads((run / "stages" / f"{name}.json").read_text())["outputs"]  # noqa: E731
    rec = stage("data")
    dss = {s: load_prepared(p) for s, p in rec["prepared"].items()}
    assert len({d.n_voxels for d in dss.values()}) > 1  # different anatomy per subject
    assert set(rec["transfer"]) == {"1", "2"}
    assert load_prepared(rec["transfer"]["1"]).n_samples < dss["subj04"].n_samples

    res = json.loads((run / "evaluate" / "results.json").read_text())
    assert set(res["results"]) == {"subj01", "subj02", "subj03"}
    r = res["results"]["subj02"]["bit"]["semantic"]
    assert 0.0 <= r["two_way"] <= 1.0 and r["chance_two_way"] == 0.5 and r["chance_top1"] == 1 / r["n"]

    # the stored numbers are what the saved decoder predicts from the stored test responses
    bit = load(stage("bit.semantic")["model"])
    from brainenc.datasets.multisubject import MultiSubjectDataset

    ms = MultiSubjectDataset([dss[s] for s in ("subj01", "subj02", "subj03")])
    rows = ms.test_rows("subj02")
    ids = np.asarray(dss["subj02"].image_ids)[rows]
    frec = stage("features")
    from brainenc.workflows.decode import _Data

    sec = load_pipeline(spec).sections
    fs = _Data(sec, type("R", (), {"features_root": data / "features"})).features(
        "blocks.15", np.asarray(frec["image_ids_all"]), frec["stimuli"])
    true = np.asarray(feature_rows(fs.tokens, fs.image_ids, ids), np.float32)
    again = feature_retrieval(bit.predict(np.asarray(dss["subj02"].responses[rows]), "subj02"), true)
    assert again["two_way"] == pytest.approx(r["two_way"], abs=1e-9)

    # augmentation: unseen images, the encoder's predictions for their assigned subject, in the BIT training set
    aug = stage("augment")
    aug_ids = np.load(aug["image_ids"])
    from brainenc.datasets import layout
    from brainenc.datasets.nsd import load_expdesign
    from brainenc.datasets.unseen import read_images

    assert aug_ids.size == 24 and not np.isin(aug_ids, frec["image_ids_all"]).any()
    assert not np.isin(aug_ids, load_expdesign(layout.expdesign_path(data / "nsd")).sharedix).any()
    import h5py

    with h5py.File(aug["stimuli"], "r") as f:
        np.testing.assert_array_equal(f["imgBrick"][5], read_images(data / "nsd", aug_ids[5:6])[0])
    subj = np.load(aug["subject"])
    assert np.bincount(subj).tolist() == [8, 8, 8] == aug["per_subject"]
    enc = load(stage("encoder")["model"])
    local = np.arange(24)
    dd = _Data(sec, type("R", (), {"features_root": data / "features"}))
    tokens = [np.asarray(dd.features(layer, local, aug["stimuli"]).tokens) for layer in ("blocks.10", "blocks.15")]
    Ya = np.load(aug["responses"])
    for s in range(3):
        rows = np.nonzero(subj == s)[0]
        V = ms.n_voxels[s]
        np.testing.assert_allclose(Ya[rows, :V], enc.predict([t[rows] for t in tokens], s), rtol=1e-5, atol=1e-5)
        assert (Ya[rows, V:] == 0).all()
    assert stage("bit.semantic")["n_augmented"] == 24 == stage("bit.lowlevel")["n_augmented"]

    # clusters: shared ids, maps in subject space
    cl = load(stage("clusters")["model"])
    assert cl.sizes().shape == (3, 6)
    img = nib.load(run / "report" / "clusters" / "subj02_clusters.nii.gz")
    vals = np.asarray(img.dataobj)[tuple(np.asarray(dss["subj02"].geometry["indices"]).T)]
    np.testing.assert_array_equal(vals, cl.labels("subj02") + 1)
    tr = json.loads((run / "evaluate" / "transfer.json").read_text())
    assert tr["curve"]["bit"]["sessions"] == [1, 2] and len(tr["curve"]["ridge"]["two_way"]) == 2
    assert (run / "report" / "index.html").is_file() and (run / "report" / "transfer.png").is_file()

    # rerun: nothing recomputed
    stamp = (run / "stages" / "bit.semantic.json").stat().st_mtime_ns
    run_pipeline(spec, data_dir=data)
    assert (run / "stages" / "bit.semantic.json").stat().st_mtime_ns == stamp


def test_decode_spec_errors(tmp_path):
    spec = _spec(tmp_path)
    with pytest.raises(ConfigError, match="transfer_subject"):
        load_pipeline(spec, overrides=["data.transfer_subject='subj01'"])
    with pytest.raises(ConfigError, match="bit_semantic.loss"):
        load_pipeline(spec, overrides=["bit_semantic.loss='l1'"])
    with pytest.raises(ConfigError, match="encoder.voxel"):
        load_pipeline(spec, overrides=["encoder.voxels=3"])
    with pytest.raises(ConfigError, match="augment.n_images"):
        load_pipeline(spec, overrides=["augment.n_images=-1"])


def _brick(path: Path, n: int, fill: int = 0) -> Path:
    import h5py

    with h5py.File(path, "w") as f:
        f.create_dataset("imgBrick", data=np.full((n, 8, 8, 3), fill, dtype=np.uint8))
    return path


def test_augment_images_file_is_checked_before_any_work(tmp_path):
    from brainenc.exceptions import DataFormatError

    spec, data = _spec(tmp_path), tmp_path / "data"
    with pytest.raises(DataFormatError, match=r"augment.images: .*missing.hdf5 does not exist"):
        run_pipeline(spec, data_dir=data, overrides=[f"augment.images={tmp_path / 'missing.hdf5'}"])
    with pytest.raises(DataFormatError, match=r"holds 10 images; n_images = 24"):
        run_pipeline(spec, data_dir=data, overrides=[f"augment.images={_brick(tmp_path / 'small.hdf5', 10)}"])
    import h5py

    with h5py.File(tmp_path / "float.hdf5", "w") as f:
        f.create_dataset("imgBrick", data=np.zeros((30, 8, 8, 3), np.float32))
    with pytest.raises(DataFormatError, match=r"float.hdf5: dataset 'imgBrick' must be uint8"):
        run_pipeline(spec, data_dir=data, overrides=[f"augment.images={tmp_path / 'float.hdf5'}"])
    assert not (data / "nsd").exists()  # nothing was simulated
    with pytest.raises(ConfigError, match="augment.images"):
        run_pipeline(spec, data_dir=data, overrides=["augment.images=3"])


def test_augment_stage_key_follows_the_images_file(tmp_path):
    from brainenc.workflows.decode import build_decode_graph

    spec = _spec(tmp_path)
    brick = _brick(tmp_path / "extra.hdf5", 40)

    def aug_config(overrides):
        stages = build_decode_graph(load_pipeline(spec, overrides=overrides), run=None)
        return next(s.config for s in stages if s.name == "augment")

    default = aug_config([])
    assert "images" not in default  # the default key is the one older runs have
    first = aug_config([f"augment.images={brick}"])
    assert first["images"] == str(brick.resolve()) and first == aug_config([f"augment.images={brick}"])
    _brick(brick, 40, fill=9)  # same name and shape, other pixels
    assert aug_config([f"augment.images={brick}"])["images_identity"] != first["images_identity"]


def test_augment_source_draws_rows_of_the_file(tmp_path):
    from brainenc.exceptions import DataFormatError
    from brainenc.workflows.decode import DecodeAugment, _augment_source

    brick = _brick(tmp_path / "extra.hdf5", 10)
    a = DecodeAugment(n_images=4, seed=3, images=str(brick))
    stim, rows, ids = _augment_source(tmp_path / "no_nsd_root", a, seen=[], folder=tmp_path / "aug")
    assert stim == brick.resolve() and rows.tolist() == ids.tolist() and rows.dtype == np.int64
    assert rows.tolist() == sorted(set(rows.tolist())) and 0 <= rows.min() and rows.max() < 10 and rows.size == 4
    assert _augment_source(tmp_path, a, [], tmp_path / "aug")[1].tolist() == rows.tolist()  # seeded
    draws = {tuple(_augment_source(tmp_path, DecodeAugment(4, s, str(brick)), [], tmp_path)[1]) for s in range(6)}
    assert len(draws) > 1
    assert not (tmp_path / "aug").exists()  # the file is used in place
    with pytest.raises(DataFormatError, match="holds 10 images; n_images = 11"):
        _augment_source(tmp_path, DecodeAugment(11, 0, str(brick)), [], tmp_path)


@pytest.mark.slow
def test_decode_augment_from_an_images_file(tmp_path):
    """The augment stage on an external image brick of another image size: rows drawn from the file, the
    encoder's predictions for them, low-level tokens of the real images' scales."""
    import h5py

    from brainenc import load
    from brainenc.workflows.decode import _Data

    rng = np.random.default_rng(0)
    brick = tmp_path / "extra.hdf5"
    with h5py.File(brick, "w") as f:
        f.create_dataset("imgBrick", data=rng.integers(0, 256, (40, 96, 96, 3), dtype=np.uint8))
    data = tmp_path / "data"
    spec = _spec(tmp_path)
    run = run_pipeline(spec, data_dir=data, overrides=[f"augment.images={brick}"], stages=["augment"])
    aug = json.loads((run / "stages" / "augment.json").read_text())["outputs"]
    assert aug["source"] == "file" and aug["stimuli"] == str(brick.resolve()) and aug["n_images"] == 24
    rows = np.load(aug["feature_ids"])
    np.testing.assert_array_equal(rows, np.load(aug["image_ids"]))
    assert rows.size == 24 and np.unique(rows).size == 24 and rows.max() < 40
    assert not (run / "augment" / "stimuli.hdf5").exists()
    sec = load_pipeline(spec).sections
    enc = load(json.loads((run / "stages" / "encoder.json").read_text())["outputs"]["model"])
    dd = _Data(sec, type("R", (), {"features_root": data / "features"}))
    tokens = [np.asarray(dd.features(layer, rows, aug["stimuli"]).tokens) for layer in ("blocks.10", "blocks.15")]
    subj, Ya = np.load(aug["subject"]), np.load(aug["responses"])
    for s in range(3):
        r = np.nonzero(subj == s)[0]
        V = enc.voxel_counts_[s]
        np.testing.assert_allclose(Ya[r, :V], enc.predict([t[r] for t in tokens], s), rtol=1e-5, atol=1e-5)
        assert (Ya[r, V:] == 0).all()
    low = np.load(aug["lowlevel"], mmap_mode="r")
    assert low.shape[0] == 24 and np.isfinite(np.asarray(low, np.float32)).all()


def test_augment_pool_too_small_names_the_way_out(tmp_path):
    from brainenc.datasets.simulate import SimulationConfig, simulate_subject
    from brainenc.exceptions import DataFormatError
    from brainenc.workflows.decode import DecodeAugment, _augment_source

    root = tmp_path / "nsd"
    simulate_subject(root, SimulationConfig(subject="subj01", n_sessions=1, n_shared=50, grid=(16, 20, 16)))
    with pytest.raises(DataFormatError, match=r"only \d+ 73k ids .*use images from outside NSD .*'\[augment\] images'"):
        _augment_source(root, DecodeAugment(n_images=73000), seen=[], folder=tmp_path / "aug")
