"""The synthesize task (BrainDiVE) end to end on the tiny simulated subject with the shipped prior:
records, stored numbers == recomputed, resume per batch, CLI, spec errors."""
import json
from pathlib import Path

import numpy as np
import pytest

from brainenc.cli import main
from brainenc.exceptions import ConfigError, MissingWeightsError
from brainenc.workflows import load_pipeline, run_pipeline

from conftest import SIM

SPEC = """
[pipeline]
name = "tinysynth"
task = "synthesize"

[prepare]
simulate = true

[simulate]
{sim}

[guide]
features = {{ backbone = "efficientnet-lite0", layer = "blocks.15", image_size = 64 }}
rows = "half-a"
unit_norm = true
alphas = [10.0, 1000.0, 100000.0]

[heldout]
features = {{ backbone = "efficientnet-lite0", layer = "blocks.10", image_size = 64 }}
alphas = [10.0, 1000.0, 100000.0]

[synthesis]
rois = ["PPA"]
contrasts = [["OFA", "FFA-1"]]
n = 6
steps = 6
scheduler = "ddim"
scale = 20.0
batch_size = 4
keep_fraction = 0.5

[report]
n_show = 3
{extra}
"""


def _spec(tmp_path: Path, extra: str = "") -> Path:
    path = tmp_path / "tinysynth.toml"
    path.write_text(SPEC.format(sim="\n".join(f"{k} = {v}" for k, v in SIM.items()), extra=extra))
    return path


@pytest.mark.slow
def test_synthesize_end_to_end_resume_and_records(tmp_path):
    import torch

    from brainenc.synthesis import ResponseObjective, load_prior, synthesize
    from brainenc.workflows.synthesize import SynthesisSection, _load_encoder

    data = tmp_path / "data"
    spec = _spec(tmp_path)
    run = run_pipeline(spec, subject="subj01", data_dir=data)
    res = json.loads((run / "evaluate" / "table.json").read_text())
    assert set(res["objectives"]) == {"PPA", "OFA-minus-FFA-1"}
    for name in ("unguided", "PPA", "OFA-minus-FFA-1"):
        folder = run / "synthesize" / name
        assert len(list(folder.glob("seed*.png"))) == 6 and len(list(folder.glob("seed*.json"))) == 6
        assert len(list(folder.glob("batch*.npz"))) == 2
    rec = json.loads((run / "synthesize" / "PPA" / "seed00003.json").read_text())
    assert rec["seed"] == 3 and rec["guided"] and rec["scale"] == 20.0 and rec["steps"] == 6
    assert rec["encoder"]["estimator"] == "ridge" and rec["prior"]["identity"]["sha256"]
    assert rec["objective"]["kind"] == "roi"

    # stored numbers are what the held-out encoder says about the stored images
    enc = json.loads((run / "stages" / "encoders.json").read_text())["outputs"]["encoders"]
    held = _load_encoder(enc["heldout"], "cpu")
    from brainenc.datasets.prepare import load_prepared

    ds = load_prepared(json.loads((run / "stages" / "prepare.json").read_text())["outputs"]["prepared"])
    obj = ResponseObjective.from_masks(ds.roi_masks(), ["PPA"])
    with np.load(run / "synthesize" / "PPA" / "batch000.npz", allow_pickle=False) as z:
        imgs0 = z["images"]
    with np.load(run / "synthesize" / "PPA" / "batch001.npz", allow_pickle=False) as z:
        imgs = np.concatenate([imgs0, z["images"]])
    with torch.no_grad():
        v = obj(held(torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255)).numpy()
    assert res["objectives"]["PPA"]["heldout"]["guided"]["mean"] == pytest.approx(float(v.mean()), rel=1e-4,
                                                                                 abs=1e-5)
    # the unguided control is the prior's own sample of the same seeds
    guide = _load_encoder(enc["guide"], "cpu")
    syn = load_pipeline(spec).sections["synthesis"]
    ref = synthesize(load_prior(), guide, obj, list(range(6)), syn.guidance(), guided=False)
    ung = np.concatenate([np.load(run / "synthesize" / "unguided" / f"batch00{k}.npz")["images"] for k in (0, 1)])
    assert np.array_equal(ref["images"], ung)
    assert not np.array_equal(ung, imgs)
    # guidance raises the guiding encoder's objective (the circular check; the held-out one is reported)
    g = res["objectives"]["PPA"]["guide"]
    assert g["guided"]["mean"] > g["unguided"]["mean"]
    assert (run / "report" / "index.html").is_file() and (run / "report" / "figures" / "grid_PPA.png").is_file()

    # rerun: nothing to do; a lost batch is redone alone, identically
    stamp = (run / "synthesize" / "PPA" / "batch000.npz").stat().st_mtime_ns
    (run / "synthesize" / "PPA" / "batch001.npz").unlink()
    run_pipeline(spec, subject="subj01", data_dir=data, force=["synthesize"])
    assert (run / "synthesize" / "PPA" / "batch000.npz").stat().st_mtime_ns == stamp
    with np.load(run / "synthesize" / "PPA" / "batch001.npz", allow_pickle=False) as z:
        assert np.array_equal(z["images"], imgs[4:])
    # a changed scale reruns synthesis from scratch
    run_pipeline(spec, subject="subj01", data_dir=data, overrides=["synthesis.scale=0.0"])
    with np.load(run / "synthesize" / "PPA" / "batch000.npz", allow_pickle=False) as z:
        assert np.array_equal(z["images"], ung[:4])   # scale 0 = the unguided images

    # the CLI verb: one ROI, a contrast, a count
    out = tmp_path / "cli"
    assert main(["--data-dir", str(data), "-q", "synthesize", str(spec), "--roi", "PPA", "--contrast", "OPA",
                 "--n", "2", "--out", str(out), "--set", "evaluate.clip={arch='ViT-B-32-quickgelu', weights='random'}"]) == 0
    res = json.loads((out / "evaluate" / "table.json").read_text())
    zs = res["objectives"]["PPA-minus-OPA"]["clip_zero_shot"]
    assert zs["category"] == "places" and zs["labels"] == ["faces", "places", "bodies", "words", "food"]
    assert sum(zs["unguided"]["fraction"]) == pytest.approx(1.0)
    assert "CLIP zero-shot" in (out / "report" / "index.md").read_text()
    assert list(res["objectives"]) == ["PPA-minus-OPA"] and res["n"] == 2
    assert res["objectives"]["PPA-minus-OPA"]["objective"]["kind"] == "contrast"


def test_synthesize_spec_errors(tmp_path):
    with pytest.raises(ConfigError, match="itself"):
        load_pipeline(_spec(tmp_path), overrides=['synthesis.contrasts=[["PPA", "PPA"]]'])
    with pytest.raises(ConfigError, match="keep_fraction"):
        load_pipeline(_spec(tmp_path), overrides=["synthesis.keep_fraction=0"])
    with pytest.raises(ConfigError, match="rows"):
        load_pipeline(_spec(tmp_path), overrides=["heldout.rows='odd'"])
    with pytest.raises(ConfigError, match="steps"):
        load_pipeline(_spec(tmp_path), overrides=["synthesis.steps=0"])
    with pytest.raises(ConfigError, match="no objective"):
        load_pipeline(_spec(tmp_path), overrides=["synthesis.rois=[]", "synthesis.contrasts=[]"])


def test_zero_shot_classify_picks_the_matching_prompt():
    import torch

    from brainenc.features.openclip import build_clip_model, zero_shot_classify

    model = build_clip_model("ViT-B-32-quickgelu", seed=0)
    imgs = np.random.default_rng(0).integers(0, 256, (3, 40, 40, 3), dtype=np.uint8)
    out = zero_shot_classify(imgs, model, arch="ViT-B-32-quickgelu")
    assert out["probs"].shape == (3, 5) and np.allclose(out["probs"].sum(1), 1, atol=1e-5)
    # make the image tower return the text embedding of "food": every image must be classified food
    import open_clip

    tok = open_clip.get_tokenizer("ViT-B-32-quickgelu")
    with torch.no_grad():
        food = model.encode_text(tok(["a photo of food"]))
    model.encode_image = lambda x: food.expand(x.shape[0], -1)
    assert zero_shot_classify(imgs, model, arch="ViT-B-32-quickgelu")["pred"].tolist() == [4, 4, 4]


def test_missing_prior_stops_before_work(tmp_path):
    with pytest.raises(MissingWeightsError, match="synthesis.prior"):
        run_pipeline(_spec(tmp_path), subject="subj01", data_dir=tmp_path / "d",
                     overrides=[f"synthesis.prior='{tmp_path / 'sd21'}'"])
    assert not (tmp_path / "d" / "nsd").exists()
    with pytest.raises(MissingWeightsError, match="evaluate.clip.weights"):
        run_pipeline(_spec(tmp_path), subject="subj01", data_dir=tmp_path / "d",
                     overrides=[f"evaluate.clip={{weights='{tmp_path / 'clip.pt'}'}}"])


def test_cli_refuses_other_tasks(tmp_path, capsys):
    assert main(["--data-dir", str(tmp_path), "synthesize", "quickstart"]) == 2
    assert "synthesize" in capsys.readouterr().err
    assert main(["--data-dir", str(tmp_path), "synthesize", "--contrast", "OFA"]) == 2
