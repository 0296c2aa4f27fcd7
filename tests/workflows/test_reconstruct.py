"""The reconstruct task end to end on the tiny simulated subject (Lite0 maps at 32 px, pixel
inversion, pixel metrics + random AlexNet), its resumability and its spec errors."""
import json
from pathlib import Path

import numpy as np
import pytest

from brainenc.cli import main
from brainenc.exceptions import ConfigError
from brainenc.workflows import load_pipeline, run_pipeline

from conftest import SIM

SPEC = """
[pipeline]
name = "tinyrecon"
task = "reconstruct"

[prepare]
simulate = true

[simulate]
{sim}

[targets]
cnn = "efficientnet-lite0"
input_size = 32
batch_size = 64

[decoder]
alphas = [100.0, 10000.0, 1000000.0]

[lowlevel]
size = 32
iterations = 8
batch_size = 20

[evaluate]
metrics = ["pixcorr", "ssim", "alexnet2", "alexnet5"]
weights = "random"
batch_size = 50

[report]
n_show = 4
{extra}
"""


def _spec(tmp_path: Path, extra: str = "") -> Path:
    path = tmp_path / "tinyrecon.toml"
    path.write_text(SPEC.format(sim="\n".join(f"{k} = {v}" for k, v in SIM.items()), extra=extra))
    return path


@pytest.mark.slow
def test_reconstruct_end_to_end_resume_and_report(tmp_path):
    from brainenc.metrics.reconstruction import score_reconstruction_sets
    from brainenc.features import HDF5Images

    data = tmp_path / "data"
    run = run_pipeline(_spec(tmp_path), subject="subj01", data_dir=data)
    rec = json.loads((run / "evaluate" / "metrics.json").read_text())
    n = rec["n"]
    assert n == 50 and set(rec["sets"]) == {"model", "shuffled"}
    # the stored numbers are what the suite computes from the stored images
    decode = json.loads((run / "stages" / "decode.json").read_text())["outputs"]
    ids = np.asarray(decode["test_image_ids"])
    prepared = json.loads((run / "stages" / "prepare.json").read_text())["outputs"]["prepared"]
    from brainenc.datasets.prepare import load_prepared

    real = HDF5Images(load_prepared(prepared).stimuli_path).read(ids)
    low = {k: np.load(run / "lowlevel" / f"{k}.npy", allow_pickle=False) for k in ("model", "shuffled")}
    assert low["model"].shape == (50, 32, 32, 3) and low["model"].dtype == np.uint8
    again = score_reconstruction_sets(real, low, ["pixcorr", "ssim", "alexnet2", "alexnet5"], weights="random",
                                      batch_size=50)
    for s in ("model", "shuffled"):
        for m, v in again["sets"][s]["metrics"].items():
            assert rec["sets"][s]["metrics"][m] == pytest.approx(v, rel=1e-6, abs=1e-9)
    # decoding carries image information: the decoded maps correlate with the true maps, the control's do not
    r, rc = decode["target_r"], decode["target_r_control"]
    assert np.mean(list(r.values())) > np.mean(list(rc.values())) + 0.05
    # report: one PNG per test image, the grid, the metric table
    rep = run / "report"
    assert len(list((rep / "images").glob("*.png"))) == 50
    assert (rep / "figures" / "grid.png").is_file() and (rep / "index.html").is_file()
    md = (rep / "index.md").read_text()
    assert "shuffled-voxels control" in md and "alexnet2" in md
    assert (run / "evaluate" / "metrics.csv").read_text().count("\n") == 3

    # a rerun is a no-op
    before = {p: p.stat().st_mtime_ns for p in (run / "lowlevel" / "model").glob("batch*.npy")}
    run_pipeline(_spec(tmp_path), subject="subj01", data_dir=data)
    assert {p: p.stat().st_mtime_ns for p in before} == before
    # a batch lost with its stage record is redone alone, with the same pixels (seeded per batch)
    (run / "stages" / "lowlevel.json").unlink()
    lost = run / "lowlevel" / "model" / "batch0001.npy"
    old = np.load(lost)
    lost.unlink()
    run_pipeline(_spec(tmp_path), subject="subj01", data_dir=data)
    np.testing.assert_array_equal(np.load(lost), old)
    others = {p: p.stat().st_mtime_ns for p in before if p != lost}
    assert others == {p: before[p] for p in others}
    # a changed inversion config reruns lowlevel from scratch (old batches are not reused)
    run_pipeline(_spec(tmp_path), subject="subj01", data_dir=data, overrides=["lowlevel.iterations=4"])
    assert (run / "lowlevel" / "model" / "batch0000.npy").stat().st_mtime_ns != before[run / "lowlevel" / "model" / "batch0000.npy"]


def test_spec_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="semantic.checkpoint"):
        load_pipeline(_spec(tmp_path, '[semantic]\nroute = "sdxl_unclip"\n'))
    with pytest.raises(ConfigError, match="semantic.route"):
        load_pipeline(_spec(tmp_path, '[semantic]\nroute = "magic"\n'))
    with pytest.raises(ConfigError, match="evaluate.metrics"):
        load_pipeline(_spec(tmp_path, "").as_posix(), overrides=['evaluate.metrics=["fid"]'])
    with pytest.raises(ConfigError, match="lowlevel.parameterization"):
        load_pipeline(_spec(tmp_path), overrides=['lowlevel.parameterization="vqgan"'])
    with pytest.raises(ConfigError, match="targets.cnn"):
        load_pipeline(_spec(tmp_path), overrides=['targets.cnn="resnet"'])
    with pytest.raises(ConfigError, match="unknown table 'features'"):
        load_pipeline(_spec(tmp_path, '[features]\nbackbone = "gabor"\n'))


def test_cli_reconstruct_refuses_other_tasks(tmp_path, capsys):
    assert main(["reconstruct", "quickstart", "--data-dir", str(tmp_path)]) == 2
    assert "'brainenc reconstruct' runs specs with" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["reconstruct_quickstart", "nsd_reconstruct_lowlevel", "nsd_reconstruct_sdxl_unclip"])
def test_shipped_reconstruct_specs_parse(name):
    spec = load_pipeline(name)
    assert spec.pipeline.task == "reconstruct"


def test_missing_weights_stop_the_run_before_any_work(tmp_path):
    from brainenc.exceptions import MissingWeightsError

    with pytest.raises(MissingWeightsError, match="evaluate.weights.alexnet: /nope/alexnet.pth"):
        run_pipeline(_spec(tmp_path), subject="subj01", data_dir=tmp_path / "data",
                     overrides=['evaluate.weights={alexnet = "/nope/alexnet.pth"}'])
    assert not (tmp_path / "data" / "nsd").exists()


@pytest.mark.slow
def test_semantic_route_with_tiny_sdxl_unclip(tmp_path):
    """The diffusion stage on the tiny unclip6-shaped UNet/VAE (saved as a diffusers folder), the semantic
    target from a tiny random CLIP: the final images come from the diffusion stage, and the report shows them."""
    pytest.importorskip("diffusers")
    from brainenc.decoding import _tiny_diffusion as tiny

    unclip = tmp_path / "unclip"
    tiny.tiny_unclip_unet(cross_attention_dim=64).save_pretrained(unclip / "unet")
    tiny.tiny_vae().save_pretrained(unclip / "vae")
    extra = f"""
[semantic]
route = "sdxl_unclip"
checkpoint = "{unclip.as_posix()}"
num_steps = 4
start_step = 2
image_size = 64
batch_size = 25
"""
    spec = _spec(tmp_path, extra)
    overrides = ['targets.semantic_backbone="clip:ViT-B-32"', 'targets.semantic_output="tokens"',
                 'targets.semantic_options={pretrained = "random", model_cfg = {embed_dim = 16, vision_cfg = '
                 '{image_size = 32, layers = 2, width = 64, patch_size = 8, head_width = 32}, text_cfg = '
                 '{context_length = 8, vocab_size = 64, width = 32, heads = 2, layers = 1}}}',
                 "evaluate.blurry_blend=0.25", 'evaluate.metrics=["pixcorr", "ssim"]']
    run = run_pipeline(spec, subject="subj01", data_dir=tmp_path / "data", overrides=overrides)
    sem = json.loads((run / "stages" / "semantic.json").read_text())["outputs"]
    final = np.load(sem["images"]["model"], allow_pickle=False)
    low = np.load(run / "lowlevel" / "model.npy", allow_pickle=False)
    assert final.shape == (50, 64, 64, 3) and low.shape == (50, 32, 32, 3)
    assert final.min() >= 25 and final.max() <= 230  # the paper's output squeeze (x - .5) * .8 + .5
    tok = np.load(run / "decode" / "model_semantic.npy", allow_pickle=False)
    assert tok.shape == (50, 16, 64)
    rec = json.loads((run / "evaluate" / "metrics.json").read_text())
    assert rec["sets"]["model"]["blurry_blend"] == 0.25
    assert "final" in (run / "report" / "index.md").read_text()
