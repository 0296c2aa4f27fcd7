"""``brainenc run --subjects``: subject lists, pool sizing, the local / serial / SLURM executors, the
summary table across subjects, failure isolation and resumption."""
import json
import os
import stat
import sys
from pathlib import Path

import numpy as np
import pytest

from brainenc.cli import main
from brainenc.exceptions import ConfigError
from brainenc.workflows.engine import read_stage_record
from brainenc.workflows.multi import parse_subjects, plan_local_workers, run_subjects, summary_rows
from brainenc.workflows.spec import parse_pipeline


def test_parse_subjects():
    assert parse_subjects("subj02,1, subj02") == ["subj01", "subj02"]
    assert parse_subjects("subj02-subj04") == ["subj02", "subj03", "subj04"]
    assert parse_subjects("all") == [f"subj0{i}" for i in range(1, 9)]
    assert parse_subjects(["3", "subj01"]) == ["subj01", "subj03"]
    with pytest.raises(ConfigError, match="subjects"):
        parse_subjects("subj09")
    with pytest.raises(ConfigError, match="backwards"):
        parse_subjects("subj04-subj02")
    with pytest.raises(ConfigError, match="empty"):
        parse_subjects(" , ")


def test_plan_local_workers_is_bounded_by_cores_memory_and_subjects():
    assert plan_local_workers(4, cpus=1, memory_gb=2, cores=2, available_gb=20) == (2, 1)
    assert plan_local_workers(4, cpus=1, memory_gb=8, cores=16, available_gb=20) == (2, 8)  # memory-bound
    assert plan_local_workers(2, cpus=1, memory_gb=1, cores=16, available_gb=100) == (2, 8)  # subject-bound
    assert plan_local_workers(4, cpus=4, memory_gb=1, cores=8, available_gb=100) == (2, 4)  # cpu-bound
    assert plan_local_workers(4, cpus=1, memory_gb=64, cores=8, available_gb=10) == (1, 8)  # never zero
    assert plan_local_workers(4, jobs=3, cores=2, available_gb=1) == (3, 1)  # explicit
    with pytest.raises(ConfigError, match="jobs"):
        plan_local_workers(4, jobs=0)


def test_resources_table_is_validated():
    base = {"pipeline": {"name": "x"}}
    spec = parse_pipeline(dict(base, resources={"cpus": 2, "memory_gb": 3.5, "partition": "gpu",
                                                "slurm": {"account": "lab"}}))
    assert (spec.resources.cpus, spec.resources.memory_gb, spec.resources.slurm) == (2, 3.5, {"account": "lab"})
    assert spec.resolved()["resources"]["partition"] == "gpu"
    for bad in ({"memory_gb": 0}, {"cpus": 0}, {"gpus": -1}, {"time_min": 1.5}, {"slurm": "account=lab"}):
        with pytest.raises(ConfigError, match="resources."):
            parse_pipeline(dict(base, resources=bad))
    with pytest.raises(ConfigError, match="resources.cpu"):
        parse_pipeline(dict(base, resources={"cpu": 2}))


def _check_summary(root: Path, subjects):
    summary = json.loads((root / "summary" / "summary.json").read_text())
    assert summary["subjects"] == list(subjects)
    rows = summary["rows"]
    assert [r["subject"] for r in rows] == list(subjects)
    for r in rows:  # the table holds each run's own numbers
        own = json.loads((root / r["subject"] / "scores" / "summary.json").read_text())["models"][r["model"]]
        assert r["r_mean"] == pytest.approx(own["r"]["mean"], rel=1e-12)
        assert r["nc_norm/prf-visualrois/V1v"] == pytest.approx(own["nc_norm"]["rois"]["prf-visualrois/V1v"])
    vals = np.array([r["r_mean"] for r in rows])
    agg = summary["across_subjects"][rows[0]["model"]]["r_mean"]
    assert agg["mean"] == pytest.approx(vals.mean()) and agg["sd"] == pytest.approx(vals.std(ddof=1))
    md = (root / "summary" / "summary.md").read_text()
    assert "mean ± sd" in md and all(f"| {s} |" in md for s in subjects)
    assert (root / "summary" / "summary.csv").read_text().count("\n") == len(rows) + 1


@pytest.mark.slow
def test_local_executor_runs_each_subject_resumably_and_summarises(tiny_spec, tmp_path, capsys):
    spec = tiny_spec(fits=("pooled",))
    data = tmp_path / "data"
    rc = main(["-q", "run", str(spec), "--subjects", "subj01,subj02", "--executor", "local", "--jobs", "2",
               "--data-dir", str(data)])
    out = capsys.readouterr().out
    assert rc == 0, out
    root = data / "runs" / "tiny"
    assert "summary.md" in out
    _check_summary(root, ["subj01", "subj02"])
    first = {s: read_stage_record(root / s, "fit.pooled")["key"] for s in ("subj01", "subj02")}
    stamp = (root / "subj02" / "scores" / "summary.json").stat().st_mtime_ns
    # each subject is an ordinary run: rerunning one alone (or all) finds everything up to date
    res = run_subjects(spec, "subj01,subj02", executor="serial", data_dir=data)
    assert res.ok and (root / "subj02" / "scores" / "summary.json").stat().st_mtime_ns == stamp
    assert {s: read_stage_record(root / s, "fit.pooled")["key"] for s in first} == first
    # subject-specific data: the two subjects' models differ
    a, b = (json.loads((root / s / "scores" / "summary.json").read_text())["models"]["pooled"]["r"]["mean"]
            for s in ("subj01", "subj02"))
    assert a != b


@pytest.mark.slow
def test_a_failing_subject_does_not_stop_the_others(tiny_spec, tmp_path, capsys):
    spec = tiny_spec(fits=("pooled",))
    data = tmp_path / "data"
    assert run_subjects(spec, ["subj01"], executor="serial", data_dir=data).ok
    # subj03 has no data and the override forbids simulating it: one line, exit 1, no summary
    rc = main(["-q", "run", str(spec), "--subjects", "subj01,subj03", "--executor", "local",
               "--data-dir", str(data), "--set", "prepare.simulate=false"])
    cap = capsys.readouterr()
    assert rc == 1
    line = [ln for ln in cap.out.splitlines() if "subj03" in ln][0]
    assert "failed" in line and "no NSD data for subj03" in line
    assert "ok" in [ln for ln in cap.out.splitlines() if "subj01" in ln][0]
    assert "rerun the same command" in cap.err
    # the summary of the earlier subj01-only run is left as it was: no table over a failed subject
    summary = json.loads((data / "runs" / "tiny" / "summary" / "summary.json").read_text())
    assert summary["subjects"] == ["subj01"]


@pytest.mark.slow
def test_slurm_path_through_submitit_local_cluster(tiny_spec, tmp_path):
    pytest.importorskip("submitit")
    spec = tiny_spec(fits=("pooled",))
    data = tmp_path / "data"
    res = run_subjects(spec, "subj01,subj02", executor="slurm", slurm_cluster="local", data_dir=data,
                       resources={"time_min": 10, "memory_gb": 2.0})
    assert res.ok, [o.error for o in res.outcomes]
    assert all(o.job_id for o in res.outcomes)
    root = data / "runs" / "tiny"
    _check_summary(root, ["subj01", "subj02"])
    assert list((root / "slurm").glob("*_log.out"))  # submitit's job logs beside the runs


def test_slurm_submission_with_a_mocked_sbatch(tiny_spec, tmp_path, monkeypatch):
    """The sbatch script carries partition, time, GPUs, memory, CPUs and extra options; no waiting."""
    pytest.importorskip("submitit")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "sbatch_calls"
    fake = bin_dir / "sbatch"
    fake.write_text(f"#!{sys.executable}\nimport shutil, sys\n"
                    f"shutil.copy(sys.argv[-1], {str(record)!r})\n"
                    "print('Submitted batch job 4242')\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    srun = bin_dir / "srun"  # submitit checks that srun exists before it submits
    srun.write_text("#!/bin/sh\nexit 1\n")
    srun.chmod(srun.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    spec = tiny_spec(fits=("pooled",))
    text = spec.read_text() + '\n[resources]\ncpus = 4\nmemory_gb = 12\nslurm = { account = "lab" }\n'
    spec.write_text(text.replace("simulate = true", "simulate = false"))
    res = run_subjects(spec, "subj01,subj02", executor="slurm", data_dir=tmp_path / "data", wait=False,
                       resources={"partition": "gpu", "gpus": 1, "time_min": 90})
    assert [o.status for o in res.outcomes] == ["submitted", "submitted"]
    assert [o.job_id for o in res.outcomes] == ["4242_0", "4242_1"]  # one array job
    assert res.summary_dir is None
    script = record.read_text()
    for line in ("#SBATCH --partition=gpu", "#SBATCH --time=90", "#SBATCH --gpus-per-node=1", "#SBATCH --mem=12GB",
                 "#SBATCH --cpus-per-task=4", "#SBATCH --account=lab", "#SBATCH --array=0-1"):
        assert line in script, script


def test_cli_rejects_pool_flags_without_subjects(capsys, tiny_spec, tmp_path):
    assert main(["run", str(tiny_spec()), "--jobs", "2", "--data-dir", str(tmp_path)]) == 2
    assert "--jobs applies to --subjects" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["run", "--subject", "subj01", "--subjects", "subj01,subj02"])
    assert main(["run", str(tiny_spec()), "--subjects", "subj01", "--executor", "local", "--data-dir",
                 str(tmp_path), "--stages", "nope"]) == 2
    assert "nope" in capsys.readouterr().err


def test_summary_rows_name_a_run_without_scores(tmp_path):
    from brainenc.exceptions import DataFormatError

    with pytest.raises(DataFormatError, match="subj05"):
        summary_rows({"subj05": tmp_path / "subj05"})
