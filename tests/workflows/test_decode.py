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
