"""Stage engine semantics on toy stages: skip, rerun downstream, resume after a crash."""
import json

import pytest

from brainenc.exceptions import ConfigError
from brainenc.workflows.engine import Stage, read_stage_record, run_stages, select_stages, stage_key


class Boom(RuntimeError):
    pass


def _pipeline(calls, cfg_a=1, cfg_b=2, fail_in=None):
    """a -> b -> c, and a -> d; each stage writes a file and logs its call."""

    def make(name):
        def func(ctx):
            calls.append(name)
            if fail_in == name:
                raise Boom(name)
            p = ctx.path("out", f"{name}.txt")
            upstream = {k: v["value"] for k, v in ctx.inputs.items()}
            p.write_text(json.dumps(upstream))
            return {"files": [ctx.rel(p)], "value": f"{name}:{ctx.key[:4]}"}
        return func

    return [
        Stage("a", make("a"), config={"x": cfg_a}),
        Stage("b", make("b"), config={"y": cfg_b}, deps=["a"]),
        Stage("c", make("c"), config={}, deps=["b"]),
        Stage("d", make("d"), config={"z": 0}, deps=["a"]),
    ]


def test_first_run_runs_all_and_writes_records(tmp_path):
    calls = []
    res = run_stages(tmp_path, _pipeline(calls), echo=lambda s: None)
    assert calls == ["a", "b", "c", "d"]
    assert [r.status for r in res] == ["ran"] * 4
    rec = read_stage_record(tmp_path, "c")
    assert rec["key"] == res[2].key and rec["deps"] == {"b": res[1].key}
    assert "seconds" in rec and rec["outputs"]["files"] == ["out/c.txt"]


def test_rerun_same_config_is_noop(tmp_path):
    calls = []
    run_stages(tmp_path, _pipeline(calls), echo=lambda s: None)
    calls.clear()
    lines = []
    res = run_stages(tmp_path, _pipeline(calls), echo=lines.append)
    assert calls == []
    assert all(r.status == "up to date" for r in res)
    assert "c: up to date" in lines


def test_changed_config_reruns_stage_and_downstream_only(tmp_path):
    calls = []
    run_stages(tmp_path, _pipeline(calls), echo=lambda s: None)
    calls.clear()
    run_stages(tmp_path, _pipeline(calls, cfg_b=3), echo=lambda s: None)
    assert calls == ["b", "c"]  # a and d untouched
    calls.clear()
    run_stages(tmp_path, _pipeline(calls, cfg_a=5, cfg_b=3), echo=lambda s: None)
    assert calls == ["a", "b", "c", "d"]


def test_version_change_invalidates(tmp_path):
    calls = []
    run_stages(tmp_path, _pipeline(calls), echo=lambda s: None, version="1")
    calls.clear()
    run_stages(tmp_path, _pipeline(calls), echo=lambda s: None, version="2")
    assert calls == ["a", "b", "c", "d"]


def test_crash_then_resume_at_first_unfinished_stage(tmp_path):
    calls = []
    with pytest.raises(Boom):
        run_stages(tmp_path, _pipeline(calls, fail_in="c"), echo=lambda s: None)
    assert calls == ["a", "b", "c"]
    assert read_stage_record(tmp_path, "c") is None and read_stage_record(tmp_path, "b") is not None
    calls.clear()
    run_stages(tmp_path, _pipeline(calls), echo=lambda s: None)
    assert calls == ["c", "d"]


def test_crash_during_rerun_removes_stale_record(tmp_path):
    calls = []
    run_stages(tmp_path, _pipeline(calls), echo=lambda s: None)
    with pytest.raises(Boom):
        run_stages(tmp_path, _pipeline(calls, cfg_b=9, fail_in="b"), echo=lambda s: None)
    assert read_stage_record(tmp_path, "b") is None
    calls.clear()
    # going back to the old config must not trust the removed record; c's record (made
    # from the same b key) stays valid
    run_stages(tmp_path, _pipeline(calls), echo=lambda s: None)
    assert calls == ["b"]


def test_missing_output_file_reruns(tmp_path):
    calls = []
    run_stages(tmp_path, _pipeline(calls), echo=lambda s: None)
    (tmp_path / "out" / "d.txt").unlink()
    calls.clear()
    run_stages(tmp_path, _pipeline(calls), echo=lambda s: None)
    assert calls == ["d"]


def test_targets_run_dependencies_not_downstream(tmp_path):
    calls = []
    run_stages(tmp_path, _pipeline(calls), targets=["b"], echo=lambda s: None)
    assert calls == ["a", "b"]
    calls.clear()
    run_stages(tmp_path, _pipeline(calls), targets=["c"], force=["c"], echo=lambda s: None)
    assert calls == ["c"]


def test_group_selection_and_unknown_stage():
    stages = [Stage("prep", lambda c: {}), Stage("fit.ridge", lambda c: {}, deps=["prep"]),
              Stage("fit.other", lambda c: {}, deps=["prep"]), Stage("eval", lambda c: {}, deps=["fit.ridge"])]
    assert select_stages(stages, ["fit"]) == {"prep", "fit.ridge", "fit.other"}
    with pytest.raises(ConfigError, match="unknown stage 'fitt'.*Did you mean 'fit'"):
        select_stages(stages, ["fitt"])


def test_bad_graph_is_rejected(tmp_path):
    with pytest.raises(ConfigError, match="unknown stage 'zz'"):
        run_stages(tmp_path, [Stage("a", lambda c: {}, deps=["zz"])])
    with pytest.raises(ConfigError, match="cycle"):
        run_stages(tmp_path, [Stage("a", lambda c: {}, deps=["b"]), Stage("b", lambda c: {}, deps=["a"])])


def test_stage_key_depends_on_config_deps_version():
    k = stage_key({"a": 1}, {"x": "1"}, "0.1")
    assert k == stage_key({"a": 1}, {"x": "1"}, "0.1")
    assert len({k, stage_key({"a": 2}, {"x": "1"}, "0.1"), stage_key({"a": 1}, {"x": "2"}, "0.1"),
                stage_key({"a": 1}, {"x": "1"}, "0.2")}) == 4


def test_a_volatile_stage_runs_every_time_and_its_dependants_follow_its_outputs(tmp_path):
    """The encoding graph's ``simulate`` stage: always looks, dependants rerun only when what it found changed."""
    world = {"fingerprint": "v1"}
    calls = []

    def look(ctx):
        calls.append("look")
        return {"data": world["fingerprint"]}

    def use(ctx):
        calls.append("use")
        return {"seen": ctx.inputs["look"]["data"]}

    stages = [Stage("look", look, config={"root": "/x"}, volatile=True), Stage("use", use, deps=["look"])]
    run_stages(tmp_path, stages)
    run_stages(tmp_path, stages)
    assert calls == ["look", "use", "look"]  # the volatile stage ran again, its dependant did not
    key_v1 = read_stage_record(tmp_path, "use")["key"]
    world["fingerprint"] = "v2"  # the data changed outside the run folder
    res = run_stages(tmp_path, stages)
    assert calls[-2:] == ["look", "use"] and res[-1].status == "ran"
    assert read_stage_record(tmp_path, "use")["outputs"]["seen"] == "v2"
    assert read_stage_record(tmp_path, "use")["key"] != key_v1
    world["fingerprint"] = "v1"  # and back: the key is the one of the first run again
    run_stages(tmp_path, stages)
    assert read_stage_record(tmp_path, "use")["key"] == key_v1


def test_checkpoint_dir_is_per_stage_key_and_drops_other_keys(tmp_path):
    from brainenc.workflows.engine import StageContext

    a = StageContext(tmp_path, "fit", "a" * 64, {}).checkpoint_dir("enc")
    (a / "ckpt.safetensors").write_bytes(b"x")
    assert a == tmp_path / "train" / "enc" / ("a" * 16)
    assert StageContext(tmp_path, "fit", "a" * 64, {}).checkpoint_dir("enc") == a and (a / "ckpt.safetensors").exists()
    (tmp_path / "train" / "enc" / "stray.txt").write_text("old layout")
    b = StageContext(tmp_path, "fit", "b" * 64, {}).checkpoint_dir("enc")  # another configuration
    assert b.is_dir() and sorted(p.name for p in (tmp_path / "train" / "enc").iterdir()) == ["b" * 16]
    assert StageContext(tmp_path, "other", "c" * 64, {}).checkpoint_dir("dec").parent.name == "dec"
    assert b.is_dir()  # other names untouched
