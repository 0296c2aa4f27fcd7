"""A small make-like engine for per-subject stages: idempotent, resumable, cached by key.

Each :class:`Stage` has a *key*: a digest of its own configuration, the keys of the stages it
depends on and the brainenc version. When a stage finishes, the engine writes
``<run>/stages/<stage>.json`` (key, timings, outputs) atomically and *last*, so the record
exists only for a complete stage. On the next run a stage is skipped ("up to date") when its
record holds the same key and every file it lists still exists; otherwise it runs again, and
because downstream keys contain upstream keys, everything downstream reruns too. A run killed
in the middle therefore restarts at the first unfinished stage. Outputs handed to downstream
stages in memory are normalised exactly as the record stores them (:func:`brainenc._utils.io.jsonable`),
so a stage sees the same inputs whether its dependencies ran in this call or were read back.
Those recorded outputs are the only channel between stages: a stage finds every file it reads
in the record of the stage that wrote it.

A *volatile* stage runs on every call (a cheap look at something outside the run folder, such
as whether the input data exist, simulating them when they do not); the key its dependants see
is a digest of its own key and its outputs, so they rerun exactly when what it found changed.

The engine knows nothing about fMRI: stage functions receive a :class:`StageContext` and return
a mapping of outputs (JSON values; paths under ``"files"`` are checked on the next run).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from brainenc import __version__
from brainenc._utils.io import jsonable, kill_point, kill_scope, read_json, write_json
from brainenc._utils.logging import get_logger
from brainenc.config import canonical_json
from brainenc.exceptions import ConfigError, DataFormatError

__all__ = ["Stage", "StageContext", "StageResult", "stage_key", "run_stages", "select_stages",
           "read_stage_record", "STAGES_DIR"]

STAGES_DIR = "stages"

log = get_logger("workflows")


@dataclasses.dataclass
class StageContext:
    """What a stage function gets.

    Attributes
    ----------
    run_dir : Path
        The run folder.
    name : str
        This stage's name.
    key : str
        This stage's key (hex digest).
    inputs : dict
        ``{dependency name: outputs mapping recorded by that dependency}`` (the only way a stage
        learns what its dependencies produced).
    """

    run_dir: Path
    name: str
    key: str
    inputs: dict[str, dict]

    def path(self, *parts: str) -> Path:
        """A path inside the run folder (parent folders created)."""
        p = self.run_dir.joinpath(*parts)
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def checkpoint_dir(self, name: str) -> Path:
        """``train/<name>/<stage key>/`` in the run folder (created) for a trainer's checkpoints.

        Other keys' folders under ``train/<name>/`` are removed: a checkpoint written under another
        configuration or other data must never be resumed.
        """
        import shutil

        root = self.run_dir / "train" / name
        folder = root / self.key[:16]
        if root.is_dir():
            for old in root.iterdir():
                if old != folder:
                    shutil.rmtree(old) if old.is_dir() else old.unlink()
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def rel(self, path: str | Path) -> str:
        """``path`` relative to the run folder when inside it, else absolute (for records)."""
        path = Path(path).resolve()
        try:
            return str(path.relative_to(self.run_dir.resolve()))
        except ValueError:
            return str(path)


@dataclasses.dataclass
class Stage:
    """One step of a pipeline.

    Parameters
    ----------
    name : str
        Unique name; ``group.member`` names (e.g. ``fit.ridge``) are selected by their group too.
    func : callable
        ``func(ctx: StageContext) -> Mapping`` returning JSON-serialisable outputs. Files the
        stage produced go under the ``"files"`` key (paths relative to the run folder or absolute).
    config : Any
        The stage's own configuration (dataclass or JSON-like); part of the key.
    deps : sequence of str
        Names of the stages this one reads from; their keys are part of this key.
    volatile : bool
        Run on every call, never "up to date"; dependants see a key that digests this stage's
        outputs (so its outputs must describe what it found, deterministically).
    """

    name: str
    func: Callable[[StageContext], Mapping[str, Any]]
    config: Any = None
    deps: Sequence[str] = ()
    volatile: bool = False

    @property
    def group(self) -> str:
        return self.name.split(".", 1)[0]


@dataclasses.dataclass
class StageResult:
    """What happened to one stage in a :func:`run_stages` call."""

    name: str
    key: str
    status: str  # "ran" | "up to date"
    seconds: float
    outputs: dict


def stage_key(config: Any, dep_keys: Mapping[str, str], version: str = __version__) -> str:
    """Digest of a stage's config, its dependencies' keys and the package version.

    Parameters
    ----------
    config : dataclass or JSON-like
    dep_keys : mapping
        ``{dependency name: key}``.
    version : str
        brainenc version (a new release invalidates every cached stage).

    Returns
    -------
    str
        16 hex characters.
    """
    payload = canonical_json({"config": config, "deps": dict(sorted(dep_keys.items())), "version": version})
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _record_path(run_dir: Path, name: str) -> Path:
    return Path(run_dir) / STAGES_DIR / f"{name}.json"


def read_stage_record(run_dir: str | Path, name: str) -> dict | None:
    """The finished-stage record of ``name`` in ``run_dir``, or None if absent or unreadable."""
    path = _record_path(Path(run_dir), name)
    if not path.is_file():
        return None
    try:
        record = read_json(path)
    except DataFormatError:
        return None
    return record if isinstance(record, dict) else None


def _files_exist(run_dir: Path, outputs: Mapping) -> bool:
    for f in outputs.get("files", []) or []:
        p = Path(f)
        if not p.is_absolute():
            p = run_dir / p
        if not p.exists():
            return False
    return True


def _toposort(stages: Sequence[Stage]) -> list[Stage]:
    by_name: dict[str, Stage] = {}
    for s in stages:
        if s.name in by_name:
            raise ConfigError(f"duplicate stage name {s.name!r}")
        by_name[s.name] = s
    for s in stages:
        for d in s.deps:
            if d not in by_name:
                raise ConfigError(f"stage {s.name!r} depends on unknown stage {d!r}")
    order: list[Stage] = []
    mark: dict[str, int] = {}

    def visit(s: Stage, chain: tuple[str, ...]) -> None:
        if mark.get(s.name) == 2:
            return
        if mark.get(s.name) == 1:
            raise ConfigError(f"stage dependency cycle: {' -> '.join(chain + (s.name,))}")
        mark[s.name] = 1
        for d in s.deps:
            visit(by_name[d], chain + (s.name,))
        mark[s.name] = 2
        order.append(s)

    for s in stages:  # declaration order breaks ties, so the pipeline order is kept
        visit(s, ())
    return order


def select_stages(stages: Sequence[Stage], targets: Sequence[str] | None) -> set[str]:
    """Names of the stages needed for ``targets`` (a target and everything it depends on).

    ``targets`` may name a stage (``fit.ridge``) or a group (``fit``); None selects all.
    """
    by_name = {s.name: s for s in stages}
    if not targets:
        return set(by_name)
    groups = {s.group for s in stages}
    wanted: set[str] = set()
    for t in targets:
        t = t.strip()
        if t in by_name:
            wanted.add(t)
        elif t in groups:
            wanted.update(s.name for s in stages if s.group == t)
        else:
            import difflib

            options = sorted(set(by_name) | groups)
            close = difflib.get_close_matches(t, options, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"unknown stage {t!r}; stages are {', '.join(options)}.{hint}")
    needed: set[str] = set()
    todo = list(wanted)
    while todo:
        n = todo.pop()
        if n not in needed:
            needed.add(n)
            todo.extend(by_name[n].deps)
    return needed


def run_stages(
    run_dir: str | Path,
    stages: Sequence[Stage],
    targets: Sequence[str] | None = None,
    *,
    force: Sequence[str] = (),
    version: str = __version__,
    echo: Callable[[str], None] | None = None,
) -> list[StageResult]:
    """Run the stages of one pipeline in dependency order, skipping those up to date.

    Parameters
    ----------
    run_dir : path
        Run folder; records go to ``<run_dir>/stages/<name>.json``.
    stages : sequence of Stage
    targets : sequence of str, optional
        Stage or group names to bring up to date (with their dependencies); default all.
    force : sequence of str
        Stage names to rerun even when up to date.
    version : str
        Package version mixed into every key.
    echo : callable, optional
        Receives one line per stage ("fit.ridge: up to date", ...); default: the logger.

    Returns
    -------
    list of StageResult
        In execution order, for the selected stages.

    Notes
    -----
    If a stage raises, the exception propagates; stages finished before it keep their
    records, so the next call resumes at the failed stage.
    """
    run_dir = Path(run_dir)
    (run_dir / STAGES_DIR).mkdir(parents=True, exist_ok=True)
    say = echo or log.info
    order = _toposort(stages)
    needed = select_stages(order, targets)
    keys: dict[str, str] = {}
    outputs: dict[str, dict] = {}
    results: list[StageResult] = []
    for s in order:
        if s.name not in needed:
            continue
        key = stage_key(s.config, {d: keys[d] for d in s.deps}, version)
        keys[s.name] = key
        record = read_stage_record(run_dir, s.name)
        if (s.name not in force and not s.volatile and record is not None and record.get("key") == key
                and _files_exist(run_dir, record.get("outputs", {}))):
            outputs[s.name] = record.get("outputs", {})
            say(f"{s.name}: up to date")
            results.append(StageResult(s.name, key, "up to date", 0.0, outputs[s.name]))
            continue
        # a stale record must not survive a crash of the rerun
        _record_path(run_dir, s.name).unlink(missing_ok=True)
        say(f"{s.name}: running")
        ctx = StageContext(run_dir=run_dir, name=s.name, key=key,
                           inputs={d: outputs[d] for d in s.deps})
        started = time.time()
        t0 = time.perf_counter()
        with kill_scope(s.name):
            kill_point("start")
            # downstream stages must see the outputs exactly as a later run reads them back from
            # the record (sorted keys, lists): a resumed run then behaves like an uninterrupted one
            out = dict(s.func(ctx) or {})
            try:
                out = jsonable(out)
            except (TypeError, ValueError) as exc:
                raise TypeError(f"stage {s.name!r} returned outputs JSON cannot hold ({exc})") from None
            seconds = time.perf_counter() - t0
            write_json(_record_path(run_dir, s.name), {
                "stage": s.name, "key": key, "deps": {d: keys[d] for d in s.deps},
                "version": version, "config": json.loads(canonical_json(s.config)),
                "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
                "seconds": round(seconds, 3), "outputs": out,
            })
            kill_point("end")
        outputs[s.name] = out
        if s.volatile:  # dependants rerun exactly when what this stage found changed
            keys[s.name] = stage_key({"outputs": out}, {s.name: key}, version)
        say(f"{s.name}: done in {seconds:.1f} s")
        results.append(StageResult(s.name, key, "ran", seconds, out))
    return results
