"""Registry, config, validation, atomic I/O, data-root resolution, CLI plumbing."""
import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import pytest

from brainenc._utils.io import atomic_path, load_npy, read_json, save_npy, write_json
from brainenc._utils.paths import resolve_data_dir
from brainenc._utils.validation import check_array, check_option, check_subject
from brainenc.config import apply_overrides, config_hash, from_dict, to_dict
from brainenc.exceptions import ConfigError, DataFormatError
from brainenc.registry import Registry


def test_registry_did_you_mean():
    reg = Registry("backbone")
    reg.register("efficientnet-lite0", object())
    with pytest.raises(ConfigError, match="Did you mean 'efficientnet-lite0'"):
        reg.get("efficientnet-lite")
    with pytest.raises(ConfigError, match="already registered"):
        reg.register("efficientnet-lite0", object())
    assert reg.list("eff*") == ["efficientnet-lite0"]


@dataclasses.dataclass
class Inner:
    alphas: list[float] = dataclasses.field(default_factory=lambda: [1.0])
    cv: int = 5


@dataclasses.dataclass
class Outer:
    name: str = "x"
    mode: Literal["a", "b"] = "a"
    limit: Optional[int] = None
    inner: Inner = dataclasses.field(default_factory=Inner)


def test_from_dict_rejects_unknown_and_bad_types():
    cfg = from_dict(Outer, {"inner": {"alphas": [1, 10], "cv": 3}, "mode": "b"})
    assert cfg.inner.alphas == [1.0, 10.0] and cfg.mode == "b"
    with pytest.raises(ConfigError, match="unknown key 'inner.alpah'.*did you mean 'alphas'"):
        from_dict(Outer, {"inner": {"alpah": [1]}})
    with pytest.raises(ConfigError, match="'inner.cv' must be an integer"):
        from_dict(Outer, {"inner": {"cv": "5"}})
    with pytest.raises(ConfigError, match="'mode' must be one of"):
        from_dict(Outer, {"mode": "c"})
    assert from_dict(Outer, to_dict(cfg)) == cfg


def test_overrides_and_hash():
    d = apply_overrides({"fit": {"cv": 5}}, ["fit.cv=3", "fit.name=ridge", "zscore=false"])
    assert d == {"fit": {"cv": 3, "name": "ridge"}, "zscore": False}
    assert config_hash({"a": 1, "b": 2}) == config_hash({"b": 2, "a": 1})
    assert config_hash({"a": 1}) != config_hash({"a": 2})
    with pytest.raises(ConfigError):
        apply_overrides({}, ["novalue"])


def test_validation_messages():
    with pytest.raises(ConfigError, match=r"'space' must be one of .*'fsavg' was provided"):
        check_option("space", "fsavg", ["func1pt8mm", "fsaverage"])
    assert check_subject(1) == "subj01" and check_subject("subj3") == "subj03"
    with pytest.raises(ConfigError):
        check_subject("sub-01x")
    with pytest.raises(DataFormatError, match="betas.nii: 'X' contains 1 NaN"):
        check_array([1.0, np.nan], source="betas.nii")


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.json"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("partial")
            raise RuntimeError("killed")
    assert not target.exists() and list(tmp_path.iterdir()) == []
    write_json(target, {"a": np.float32(1.5)})
    assert read_json(target) == {"a": 1.5}
    save_npy(tmp_path / "x.npy", np.arange(3))
    assert load_npy(tmp_path / "x.npy").tolist() == [0, 1, 2]
    with pytest.raises(TypeError):
        save_npy(tmp_path / "o.npy", np.array([{}], dtype=object))
    (tmp_path / "bad.npy").write_bytes(b"garbage")
    with pytest.raises(DataFormatError, match="bad.npy"):
        load_npy(tmp_path / "bad.npy")


def test_data_root_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("BRAINENC_DATA", str(tmp_path / "env"))
    assert resolve_data_dir(tmp_path / "arg") == (tmp_path / "arg").resolve()
    assert resolve_data_dir() == (tmp_path / "env").resolve()
    monkeypatch.delenv("BRAINENC_DATA")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert resolve_data_dir() == (tmp_path / "home" / "brainenc_data").resolve()


def test_import_is_light():
    code = "import sys, brainenc; assert 'torch' not in sys.modules and 'h5py' not in sys.modules, sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("cmd", [[], ["simulate"], ["prepare"], ["info"], ["sys-info"], ["run"]])
def test_cli_help(cmd, capsys):
    from brainenc.cli import main

    with pytest.raises(SystemExit) as exc:
        main(cmd + ["--help"])
    assert exc.value.code == 0
    assert "usage: brainenc" in capsys.readouterr().out


def test_cli_sys_info(capsys, tmp_path):
    from brainenc.cli import main

    assert main(["--data-dir", str(tmp_path), "sys-info"]) == 0
    out = capsys.readouterr().out
    assert "data root" in out and str(tmp_path) in out and "torch" in out


def test_cli_one_line_error(capsys, tmp_path):
    from brainenc.cli import main

    assert main(["prepare", "--data-dir", str(tmp_path), "--subject", "nobody"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "subject" in err


@dataclasses.dataclass
class WithTuple:
    grid: tuple[int, int, int] = (1, 2, 3)


def test_fixed_length_tuple_coercion():
    assert from_dict(WithTuple, {"grid": [24, 28, 24]}).grid == (24, 28, 24)
    with pytest.raises(ConfigError, match=r"'grid\[1\]' must be an integer"):
        from_dict(WithTuple, {"grid": [24, "a", 24]})
    with pytest.raises(ConfigError, match="must have 3 items"):
        from_dict(WithTuple, {"grid": [24, 28]})
