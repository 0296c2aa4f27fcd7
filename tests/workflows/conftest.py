"""The tiny pipeline spec the workflow tests run: a simulated subject (1 session, 50 shared images,
a 16x20x16 grid) and the Gabor backbone (no weights, fast) on 64-pixel images.

``tiny_spec(...)`` writes it to ``<tmp_path>/tiny.toml`` with the ``[[fit]]`` tables asked for
(:data:`FITS`), so each test states only what it changes.
"""
from pathlib import Path

import pytest

#: simulator settings of the tiny subject (TOML values)
SIM = {"n_sessions": "1", "n_shared": "50", "grid": "[16, 20, 16]", "stimulus_compression": "1",
       "nifti_compression": "1", "write_stim_info": "false", "write_hemi_rois": "false"}

HEADER = """
[pipeline]
name = "{name}"

[prepare]
simulate = true

[simulate]
{sim}

[features]
backbone = "gabor"
image_size = 64
layer = "last"
batch_size = 32
options = {{cycles_per_image = [2, 4, 8], n_orientations = 4, grid = 4}}
"""

#: the [[fit]] tables by name (``routing`` takes ``families`` and ``epochs``)
FITS = {
    "ridge": """
[[fit]]
name = "ridge"
inputs = {{ features = "tokens", grid_pool = 2 }}
alphas = [1.0, 100.0, 10000.0]
cv = 3
""",
    "pooled": """
[[fit]]
name = "pooled"
inputs = {{ features = "pooled" }}
alphas = [1.0, 100.0]
cv = 3
""",
    "raw": """
[[fit]]
name = "raw"
inputs = {{ features = "pooled" }}
standardize = false
alphas = [10.0]
cv = 3
""",
    "routing": """
[[fit]]
name = "routing"
kind = "routing"
queries = "rois"
families = {families}
val_fraction = 0.2
[fit.model]
d_model = 16
n_heads = 2
d_ffn = 32
[fit.train]
epochs = {epochs}
batch_size = 32
device = "cpu"
amp = false
""",
}

REPORT = """
[report]
n_best_voxels = 4
n_slices = 4
"""


def tiny_spec_text(name: str = "tiny", fits=("ridge", "pooled", "routing"), *,
                   families=("prf-visualrois", "floc-faces"), epochs: int = 2, tail: str = REPORT) -> str:
    """The tiny spec as TOML text; ``tail`` follows the fits (``[evaluate]``, ``[report]`` tables)."""
    fam = "[" + ", ".join(f'"{f}"' for f in families) + "]"
    text = HEADER.format(name=name, sim="\n".join(f"{k} = {v}" for k, v in SIM.items()))
    text += "".join(FITS[f].format(families=fam, epochs=epochs) for f in fits)
    return text + tail


@pytest.fixture
def tiny_sim() -> dict:
    """The tiny subject's simulator settings (``brainenc simulate --set key=value``)."""
    return dict(SIM)


@pytest.fixture
def tiny_spec(tmp_path):
    """``tiny_spec(**kwargs) -> Path``: :func:`tiny_spec_text` written to ``<tmp_path>/tiny.toml``."""

    def write(**kwargs) -> Path:
        path = tmp_path / "tiny.toml"
        path.write_text(tiny_spec_text(**kwargs))
        return path

    return write
