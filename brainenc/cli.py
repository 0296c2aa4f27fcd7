"""The ``brainenc`` command line.

Every sub-command works with its defaults (subject ``subj01``, the default data root), so
``brainenc simulate && brainenc prepare`` just works. The data root is resolved the same way
everywhere: ``--data-dir`` > ``$BRAINENC_DATA`` > ``~/brainenc_data``. Errors raised by
brainenc are printed as one line (exit status 2); ``--debug`` shows the traceback.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

from brainenc import __version__
from brainenc._utils.paths import nsd_root, prepared_root, resolve_data_dir, runs_root
from brainenc.exceptions import BrainencError, ConfigError

EPILOG = """\
typical session:
  brainenc simulate                      # write a simulated subject in the NSD on-disk format
  brainenc prepare                       # betas -> z-scored, repeat-averaged arrays + manifest
  brainenc info                          # what the prepared dataset holds
  brainenc run pipelines/quickstart.toml # features -> ridge -> evaluation -> report

data root: --data-dir > $BRAINENC_DATA > ~/brainenc_data
  <root>/nsd       NSD release layout (nsddata/, nsddata_betas/, nsddata_stimuli/) or a simulated one
  <root>/prepared  cached prepared datasets (one folder per set of choices)
  <root>/features  cached stimulus features
  <root>/runs      one folder per (pipeline, subject)
"""


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", default=argparse.SUPPRESS,
                   help="data root (default: $BRAINENC_DATA or ~/brainenc_data)")
    p.add_argument("--nsd-root", default=argparse.SUPPRESS,
                   help="NSD release root (default: <data root>/nsd)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (repeatable), e.g. --set zscore=false")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="brainenc",
        description="Encoding and decoding models of the visual brain on NSD-style fMRI.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"brainenc {__version__}")
    parser.add_argument("--data-dir", default=None, help="data root (default: $BRAINENC_DATA or ~/brainenc_data)")
    parser.add_argument("--nsd-root", default=None, help="NSD release root (default: <data root>/nsd)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("simulate", help="write a simulated subject in the exact NSD on-disk format",
                       description="Write a simulated subject (expdesign .mat, stimuli hdf5, int16 NIfTI betas, "
                                   "ROIs, ncsnr) plus a ground-truth file, under <data root>/nsd.")
    _common(p)
    p.add_argument("--subject", default="subj01", help="subject to simulate (default: subj01)")
    p.add_argument("--seed", type=int, default=0, help="random seed; same seed -> identical files (default: 0)")
    p.add_argument("--force", action="store_true", help="overwrite an existing simulated subject")

    p = sub.add_parser("prepare", help="betas -> z-scored, masked, repeat-averaged arrays (cached)",
                       description="Read one subject's NSD betas session by session and write a prepared "
                                   "dataset (responses, 73k image ids, split, ROI masks, noise ceiling, manifest) "
                                   "under <data root>/prepared. A second call with the same choices is a cache hit.")
    _common(p)
    p.add_argument("--subject", default="subj01", help="subject (default: subj01)")
    p.add_argument("--space", default=None, help="func1pt8mm | func1mm | fsaverage (default: func1pt8mm)")
    p.add_argument("--beta-version", default=None,
                   help="betas_assumehrf | betas_fithrf | betas_fithrf_GLMdenoise_RR (default: GLMdenoise_RR)")
    p.add_argument("--split", default=None, help="shared1000 | shared515 | algonauts | nsd37 (default: shared1000)")
    p.add_argument("--repeats", default=None, help="average | single (default: average)")
    p.add_argument("--config", default=None, help="TOML file with prepare options ([prepare] table or top level)")

    p = sub.add_parser("info", help="what prepared datasets hold (subjects, sessions, trials, splits, ROIs)")
    _common(p)
    p.add_argument("--subject", default=None, help="only this subject")
    p.add_argument("path", nargs="?", default=None, help="a prepared dataset folder (default: all under the data root)")

    p = sub.add_parser("sys-info", help="versions, devices and data roots")
    _common(p)

    p = sub.add_parser("run", help="run a pipeline spec (TOML) for one subject, resumably",
                       description="Run the stages of a pipeline spec (prepare -> features -> fit -> evaluate -> "
                                   "report). Finished stages are skipped; a changed config reruns what depends on it.")
    _common(p)
    p.add_argument("pipeline", nargs="?", default="pipelines/quickstart.toml",
                   help="pipeline TOML (a path, or a name under pipelines/; default: quickstart)")
    who = p.add_mutually_exclusive_group()
    who.add_argument("--subject", default=None, help="subject (default: subj01); a group task (networks): the run's name (default: cohort)")
    who.add_argument("--subjects", default=None, metavar="LIST",
                     help="several subjects: subj01,subj02 | subj01-subj04 | all; one run folder each, "
                          "then a summary table across them")
    p.add_argument("--out", default=None, help="run folder (default: <data root>/runs/<pipeline>/<subject>); "
                                               "with --subjects, the folder holding one folder per subject")
    p.add_argument("--stages", default=None, help="comma-separated subset of stages to run")
    g = p.add_argument_group("several subjects (--subjects)")
    g.add_argument("--executor", default="local", choices=("local", "slurm", "serial"),
                   help="local: a process pool sized by cores and memory; slurm: one job per subject through "
                        "submitit; serial: one after another here (default: local)")
    g.add_argument("--jobs", type=int, default=None, help="local: subjects at once (default: from [resources])")
    g.add_argument("--cpus", type=int, default=None, help="cores per subject ([resources] cpus)")
    g.add_argument("--mem-gb", type=float, default=None, help="memory per subject in GB ([resources] memory_gb)")
    g.add_argument("--gpus", type=int, default=None, help="slurm: GPUs per job ([resources] gpus)")
    g.add_argument("--time-min", type=int, default=None, help="slurm: time limit in minutes ([resources] time_min)")
    g.add_argument("--partition", default=None, help="slurm: partition ([resources] partition)")
    g.add_argument("--no-wait", action="store_true", help="slurm: return after submitting (rerun to summarise)")

    p = sub.add_parser("reconstruct", help="images from a subject's test-set fMRI, scored with the MindEye2 suite",
                       description="Run a reconstruct pipeline (decode the test set, reconstruct in resumable "
                                   "batches, score against a shuffled-voxels control, write PNGs + a metric table "
                                   "into the run folder's report). Same as 'brainenc run' on a task = "
                                   "\"reconstruct\" spec.")
    _common(p)
    p.add_argument("pipeline", nargs="?", default="reconstruct_quickstart",
                   help="pipeline TOML with [pipeline] task = \"reconstruct\" (default: reconstruct_quickstart)")
    p.add_argument("--subject", default=None, help="subject (default: subj01)")
    p.add_argument("--out", default=None, help="run folder (default: <data root>/runs/<pipeline>/<subject>)")
    p.add_argument("--stages", default=None, help="comma-separated subset of stages to run")

    p = sub.add_parser("synthesize", help="images synthesised to drive a brain region (BrainDiVE)",
                       description="Run a synthesize pipeline: fit the guiding and held-out encoders, sample the "
                                   "diffusion prior with brain guidance for each objective and without it from the "
                                   "same seeds (resumable per batch), score both with the held-out encoder, write "
                                   "PNGs + JSON records and a report. Same as 'brainenc run' on a task = "
                                   "\"synthesize\" spec; --roi/--contrast/--n override its [synthesis] table.")
    _common(p)
    p.add_argument("pipeline", nargs="?", default="synthesize_quickstart",
                   help="pipeline TOML with [pipeline] task = \"synthesize\" (default: synthesize_quickstart)")
    p.add_argument("--roi", default=None, help="one ROI to drive (e.g. FFA-1; 'A+B' unites ROIs)")
    p.add_argument("--contrast", default=None, help="with --roi: maximise mean(ROI) - mean(CONTRAST) (e.g. OFA)")
    p.add_argument("--n", type=int, default=None, help="images per objective (synthesis.n)")
    p.add_argument("--subject", default=None, help="subject (default: subj01)")
    p.add_argument("--out", default=None, help="run folder (default: <data root>/runs/<pipeline>/<subject>)")
    p.add_argument("--stages", default=None, help="comma-separated subset of stages to run")

    p = sub.add_parser("train-prior", help="train the small pixel-space diffusion prior of the simulated scenes",
                       description="Train a diffusers UNet2DModel (DDPM, epsilon-prediction) on the simulated "
                                   "subject's scenes at low resolution, reproducibly (seeded; config, data identity "
                                   "and versions recorded), and write <out>.safetensors (fp16) + <out>.json "
                                   "(with the weights' sha256, checked at load). Resumable: checkpoints go to "
                                   "<out>.run/. Options are PriorConfig keys via --set (e.g. --set n_images=500 "
                                   "--set train.epochs=2).")
    _common(p)
    p.add_argument("--out", default=None,
                   help="output stem (default: <data root>/priors/scene_prior32)")
    p.add_argument("--config", default=None, help="TOML file with a [prior] table of PriorConfig keys")
    p.add_argument("--fresh", action="store_true", help="ignore existing checkpoints in <out>.run/")
    return parser


def _roots(args) -> tuple[Path, Path]:
    data_dir = resolve_data_dir(getattr(args, "data_dir", None))
    nsd = Path(args.nsd_root).expanduser().resolve() if getattr(args, "nsd_root", None) else nsd_root(data_dir)
    return data_dir, nsd


def cmd_simulate(args) -> int:
    from brainenc.config import apply_overrides, from_dict
    from brainenc.datasets.simulate import SimulationConfig, simulate_subject

    _, nsd = _roots(args)
    cfg = from_dict(SimulationConfig, apply_overrides({"subject": args.subject, "seed": args.seed}, args.overrides))
    t0 = time.perf_counter()
    result = simulate_subject(nsd, cfg, overwrite=args.force)
    print(f"simulated {cfg.subject} in {time.perf_counter() - t0:.1f} s")
    print(f"  NSD-format files: {nsd}")
    print(f"  ground truth:     {result.ground_truth_path}")
    print("next: brainenc prepare")
    return 0


def _prepare_config(args):
    from brainenc.config import apply_overrides, from_dict, load_toml
    from brainenc.datasets.prepare import PrepareConfig

    base: dict = {}
    if args.config:
        data = load_toml(args.config)
        base = dict(data.get("prepare", data))
    base["subject"] = args.subject
    for key, attr in (("space", "space"), ("beta_version", "beta_version"), ("split", "split"), ("repeats", "repeats")):
        if getattr(args, attr, None) is not None:
            base[key] = getattr(args, attr)
    return from_dict(PrepareConfig, apply_overrides(base, args.overrides))


def cmd_prepare(args) -> int:
    from brainenc._utils.io import kill_scope
    from brainenc.datasets import layout
    from brainenc.datasets.prepare import prepare_subject
    from brainenc.exceptions import DataFormatError

    data_dir, nsd = _roots(args)
    cfg = _prepare_config(args)
    # a killed 'brainenc simulate' leaves folders that look complete: say so instead of failing on a missing file
    entry = (layout.simulation_manifest(nsd) or {}).get("subjects", {}).get(cfg.subject)
    if entry is not None and not entry.get("complete", False):
        raise DataFormatError(f"{nsd}: the simulation of {cfg.subject} was interrupted; "
                              f"rerun 'brainenc simulate --subject {cfg.subject}' (same settings) first")
    t0 = time.perf_counter()
    with kill_scope("prepare"):
        ds = prepare_subject(nsd, cfg, cache_root=prepared_root(data_dir))
    state = "cache hit" if ds.cache_hit else f"prepared in {time.perf_counter() - t0:.1f} s"
    print(f"{cfg.subject}: {state}")
    print(f"  prepared dataset: {ds.path}")
    print(f"  {ds.n_samples} samples x {ds.n_voxels} voxels; splits {ds.split_counts()}")
    return 0


def cmd_info(args) -> int:
    from brainenc.datasets.prepare import list_prepared, load_prepared

    data_dir, _ = _roots(args)
    paths = [Path(args.path)] if args.path else list_prepared(prepared_root(data_dir), subject=args.subject)
    if not paths:
        print(f"no prepared datasets under {prepared_root(data_dir)}; run: brainenc prepare")
        return 1
    for p in paths:
        print(load_prepared(p).describe())
        print()
    return 0


def cmd_sys_info(args) -> int:
    import importlib

    data_dir, nsd = _roots(args)
    print(f"brainenc   {__version__}")
    print(f"python     {platform.python_version()} ({sys.executable})")
    print(f"platform   {platform.platform()}; {os.cpu_count()} CPUs")
    for mod in ("numpy", "scipy", "h5py", "nibabel", "sklearn", "skimage", "nilearn", "torch", "torchvision",
                "safetensors", "open_clip", "timm", "triton", "himalaya", "diffusers"):
        try:
            m = importlib.import_module(mod)
            print(f"{mod:<10} {getattr(m, '__version__', '?')}")
        except Exception:  # noqa: BLE001 - optional packages may fail in many ways
            print(f"{mod:<10} (not installed)")
    try:
        import torch

        print(f"torch threads {torch.get_num_threads()}; CUDA available: {torch.cuda.is_available()}")
        for i in range(torch.cuda.device_count()):
            print(f"  cuda:{i} {torch.cuda.get_device_name(i)}")
    except ImportError:
        pass
    print(f"data root  {data_dir} ({'exists' if data_dir.exists() else 'missing'}; "
          f"from {'--data-dir' if getattr(args, 'data_dir', None) else ('$BRAINENC_DATA' if os.environ.get('BRAINENC_DATA') else 'default')})")
    print(f"NSD root   {nsd} ({'exists' if nsd.exists() else 'missing'})")
    print(f"runs       {runs_root(data_dir)}")
    return 0


def cmd_run(args) -> int:
    from brainenc.workflows import run_pipeline

    data_dir, nsd = _roots(args)
    stages = [s.strip() for s in args.stages.split(",")] if args.stages else None
    t0 = time.perf_counter()
    if args.subjects is not None:
        return _run_many(args, data_dir, nsd, stages, t0)
    for flag in ("jobs", "cpus", "mem_gb", "gpus", "time_min", "partition"):
        if getattr(args, flag) is not None:
            print(f"brainenc run: error: --{flag.replace('_', '-')} applies to --subjects runs", file=sys.stderr)
            return 2
    run_dir = run_pipeline(args.pipeline, subject=args.subject, data_dir=data_dir, nsd_root=nsd,
                           out=args.out, overrides=args.overrides, stages=stages)
    print(f"done in {time.perf_counter() - t0:.1f} s")
    print(f"  run folder: {run_dir}")
    report = Path(run_dir) / "report" / "index.md"
    if report.exists():
        print(f"  report:     {report}")
    return 0


def _run_many(args, data_dir, nsd, stages, t0) -> int:
    from brainenc.workflows.multi import run_subjects

    resources = {k: v for k, v in (("cpus", args.cpus), ("memory_gb", args.mem_gb), ("gpus", args.gpus),
                                   ("time_min", args.time_min), ("partition", args.partition)) if v is not None}
    result = run_subjects(args.pipeline, args.subjects, executor=args.executor, jobs=args.jobs, data_dir=data_dir,
                          nsd_root=nsd, out=args.out, overrides=args.overrides, stages=stages,
                          resources=resources, wait=not args.no_wait)
    print(f"{result.pipeline}: {len(result.outcomes)} subjects in {time.perf_counter() - t0:.1f} s")
    for o in result.outcomes:
        extra = f" (job {o.job_id})" if o.job_id else ""
        detail = o.error if o.status == "failed" else str(o.run_dir)
        print(f"  {o.subject}  {o.status:<9} {o.seconds:7.1f} s{extra}  {detail}")
    if result.summary_dir is not None:
        print(f"  summary:   {result.summary_dir / 'summary.md'}")
    if result.failed:
        print("rerun the same command to resume: finished stages are kept", file=sys.stderr)
        return 1
    return 0


def _run_task(args, task: str, table: str, overrides: list[str]) -> int:
    """Run a task-specific pipeline verb (``brainenc reconstruct`` / ``synthesize``) and print its table."""
    from brainenc.workflows import load_pipeline, run_pipeline

    spec = load_pipeline(args.pipeline, overrides=overrides)
    if spec.pipeline.task != task:
        raise ConfigError(f"'{args.pipeline}' is a {spec.pipeline.task!r} pipeline; 'brainenc {task}' runs "
                          f"specs with [pipeline] task = \"{task}\" (use 'brainenc run' for the others)")
    data_dir, nsd = _roots(args)
    stages = [s.strip() for s in args.stages.split(",")] if args.stages else None
    t0 = time.perf_counter()
    run_dir = run_pipeline(args.pipeline, subject=args.subject, data_dir=data_dir, nsd_root=nsd,
                           out=args.out, overrides=overrides, stages=stages)
    print(f"done in {time.perf_counter() - t0:.1f} s")
    print(f"  run folder: {run_dir}")
    path = Path(run_dir) / "evaluate" / table
    if path.exists():
        print(path.read_text().rstrip())
    report = Path(run_dir) / "report" / "index.md"
    if report.exists():
        print(f"  report:     {report}")
    return 0


def cmd_reconstruct(args) -> int:
    return _run_task(args, "reconstruct", "metrics.md", list(args.overrides))


def cmd_synthesize(args) -> int:
    import json

    overrides = list(args.overrides)
    if args.contrast is not None and args.roi is None:
        raise ConfigError("--contrast needs --roi (the objective is mean(ROI) - mean(CONTRAST))")
    if args.roi is not None:
        if args.contrast is not None:
            overrides += ["synthesis.rois=[]", f"synthesis.contrasts={json.dumps([[args.roi, args.contrast]])}"]
        else:
            overrides += [f"synthesis.rois={json.dumps([args.roi])}", "synthesis.contrasts=[]"]
    if args.n is not None:
        overrides.append(f"synthesis.n={int(args.n)}")
    return _run_task(args, "synthesize", "table.md", overrides)


def cmd_train_prior(args) -> int:
    from brainenc.config import apply_overrides, from_dict, load_toml
    from brainenc.synthesis.prior import PriorConfig, save_prior, train_prior

    data_dir, _ = _roots(args)
    base: dict = {}
    if args.config:
        data = load_toml(args.config)
        base = dict(data.get("prior", data))
    cfg = from_dict(PriorConfig, apply_overrides(base, args.overrides))
    out = Path(args.out).expanduser() if args.out else data_dir / "priors" / "scene_prior32"
    t0 = time.perf_counter()
    unet, record = train_prior(cfg, run_dir=Path(f"{out}.run"), resume=not args.fresh)
    path = save_prior(unet, record, out)
    print(f"trained the prior in {time.perf_counter() - t0:.0f} s "
          f"(best epoch {record['train']['best_epoch']}, val loss {record['train']['best_val_loss']:.4f})")
    print(f"  weights + record: {path.with_suffix('.safetensors')}, {path}")
    return 0


COMMANDS = {"simulate": cmd_simulate, "prepare": cmd_prepare, "info": cmd_info,
            "sys-info": cmd_sys_info, "run": cmd_run, "reconstruct": cmd_reconstruct,
            "train-prior": cmd_train_prior, "synthesize": cmd_synthesize}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if args.quiet:
        os.environ["BRAINENC_QUIET"] = "1"
    from brainenc._utils.logging import configure_cli_logging

    configure_cli_logging()
    try:
        return COMMANDS[args.command](args)
    except BrainencError as exc:
        if args.debug:
            raise
        print(f"brainenc {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"brainenc {args.command}: interrupted (finished stages are kept; rerun to resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
