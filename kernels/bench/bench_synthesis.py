"""Benchmark: cost of one brain-guided diffusion step (BrainDiVE) against one unguided step.

Per prior, in the same process, interleaved over rounds (median of the rounds):

* **unguided step**: one no-grad UNet ε + ``scheduler.step`` (what plain sampling costs);
* **guided step**: the same plus :func:`brainenc.synthesis.guided_step` (a second UNet pass with graph, the VAE
  decode of x̃, the encoder, and the backward through all three to the latents);
* **guided + checkpointing**: the guided step with UNet and VAE gradient checkpointing.

Priors (random weights; the cost is the architecture's): ``tiny_sd`` (the test pipeline of
``shared/reference/diffusers_offline.md`` §3.1: 8×8 latents, 64 px), ``small_sd`` (UNet [64, 128, 256] at 32×32
latents, 4-level VAE to 256 px), ``pixel32`` (a pixel ``UNet2DModel`` [32, 64, 64] at 32 px, the embedded-default
kind); ``--sd21`` adds an SD-2.1-base-sized UNet/VAE (865 M + 84 M parameters, 64×64 latents, 512 px; for a GPU).
The encoder is a stand-in: a small conv net on 64 px for the CPU priors; OpenCLIP ViT-B/16 (random) at 224 px
with CLIP normalisation for ``--sd21`` (BrainDiVE's encoder backbone).

Memory: on CPU each prior runs in a fresh process with ``MALLOC_MMAP_THRESHOLD_=65536`` (freed buffers go back
to the OS, so RSS tracks live bytes); before each measured step the peak-RSS mark is reset
(``/proc/self/clear_refs``) and ``peak_step_mb`` = VmHWM after the step − VmRSS before it. On CUDA:
``max_memory_allocated`` after ``reset_peak_memory_stats``, minus the allocation before the step.

    flock /tmp/brainenc-bench.lock .venv/bin/python kernels/bench/bench_synthesis.py
    .venv/bin/python kernels/bench/bench_synthesis.py --device cuda --sd21 --priors sd21   # GPU run
    .venv/bin/python kernels/bench/bench_synthesis.py --quick                             # smoke run, $TMPDIR

Writes ``kernels/results/synthesis_cpu.json`` (``--device cuda``: ``synthesis_cuda.json``).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_reconstruction import _machine  # noqa: E402  (the shared machine-info helper)

PRIORS = ("tiny_sd", "small_sd", "pixel32")
MODES = ("unguided", "guided", "guided_ckpt")
V = 100  # encoder outputs


# ------------------------------------------------------------------------------------------------ builders
def _build_prior(name, device, dtype):
    import diffusers as d
    import torch

    from brainenc.synthesis import Prior

    torch.manual_seed(0)
    sd_sched = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", prediction_type="epsilon",
                    steps_offset=1, clip_sample=False, set_alpha_to_one=False, timestep_spacing="leading")
    with torch.device(device):  # build on the target device (the SD-2.1-sized init is slow on CPU; "meta": shapes only)
        if name == "tiny_sd":
            unet = d.UNet2DConditionModel(
                sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=[32, 64],
                down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], cross_attention_dim=32, attention_head_dim=[2, 4],
                use_linear_projection=True, norm_num_groups=8)
            vae = d.AutoencoderKL(block_out_channels=[8, 16, 16, 16], layers_per_block=1, norm_num_groups=8,
                                  latent_channels=4, down_block_types=["DownEncoderBlock2D"] * 4,
                                  up_block_types=["UpDecoderBlock2D"] * 4)
            pe = torch.randn(1, 77, 32)
        elif name == "small_sd":
            unet = d.UNet2DConditionModel(
                sample_size=32, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=[64, 128, 256],
                down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
                up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"], cross_attention_dim=256,
                attention_head_dim=[2, 4, 8], use_linear_projection=True, norm_num_groups=32)
            vae = d.AutoencoderKL(block_out_channels=[32, 64, 128, 128], layers_per_block=1, norm_num_groups=32,
                                  latent_channels=4, down_block_types=["DownEncoderBlock2D"] * 4,
                                  up_block_types=["UpDecoderBlock2D"] * 4, sample_size=256)
            pe = torch.randn(1, 77, 256)
        elif name == "sd21":
            # stabilityai/stable-diffusion-2-1-base unet/config.json and vae/config.json (the fields that differ
            # from diffusers' defaults), random weights
            unet = d.UNet2DConditionModel(
                sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                block_out_channels=[320, 640, 1280, 1280],
                down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                  "DownBlock2D"],
                up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
                cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20], use_linear_projection=True,
                norm_num_groups=32, act_fn="silu", flip_sin_to_cos=True, freq_shift=0)
            vae = d.AutoencoderKL(block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4,
                                  down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                                  sample_size=512, scaling_factor=0.18215, norm_num_groups=32, act_fn="silu")
            pe = torch.randn(1, 77, 1024)
        elif name == "pixel32":
            unet = d.UNet2DModel(
                sample_size=32, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=[32, 64, 64],
                down_block_types=["DownBlock2D", "DownBlock2D", "AttnDownBlock2D"],
                up_block_types=["AttnUpBlock2D", "UpBlock2D", "UpBlock2D"], norm_num_groups=16)
            return Prior(unet=unet.to(dtype), scheduler=d.DDPMScheduler(), identity={"bench": name})
        else:
            raise SystemExit(f"unknown prior {name!r}")
    sched = d.DDIMScheduler(**sd_sched)
    return Prior(unet=unet, scheduler=sched, vae=vae, prompt_embeds=pe, identity={"bench": name}).to(dtype=dtype)


def _build_encoder(kind, device):
    import torch
    import torch.nn.functional as F

    torch.manual_seed(1)
    if kind == "conv":
        class ConvEncoder(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.net = torch.nn.Sequential(
                    torch.nn.Conv2d(3, 16, 3, stride=2, padding=1), torch.nn.GELU(),
                    torch.nn.Conv2d(16, 32, 3, stride=2, padding=1), torch.nn.GELU(),
                    torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(32, V))

            def forward(self, img):
                return self.net(F.interpolate(img, size=64, mode="bilinear", align_corners=False, antialias=True))

        return ConvEncoder().to(device).eval().requires_grad_(False)
    import open_clip

    class ClipEncoder(torch.nn.Module):  # BrainDiVE's readout: W · e/||e|| + b on a CLIP ViT-B/16 embedding
        def __init__(self):
            super().__init__()
            self.visual = open_clip.create_model("ViT-B-16", pretrained=None).visual
            self.readout = torch.nn.Linear(512, V)
            self.register_buffer("mean", torch.tensor([0.48145466, 0.4578275, 0.40821073])[:, None, None])
            self.register_buffer("std", torch.tensor([0.26862954, 0.26130258, 0.27577711])[:, None, None])

        def forward(self, img):
            x = F.interpolate(img, size=224, mode="bilinear", align_corners=False)
            e = self.visual((x - self.mean) / self.std)
            return self.readout(e / e.norm(dim=-1, keepdim=True))

    return ClipEncoder().to(device).eval().requires_grad_(False)


# ------------------------------------------------------------------------------------------------ memory
def _status_mb(key):
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key):
                return int(line.split()[1]) / 1024
    return float("nan")


class _Peak:
    """Peak extra memory of a block: CPU RSS high-water mark (reset first) or CUDA max allocated."""

    def __init__(self, device):
        self.device = device

    def __enter__(self):
        import torch

        gc.collect()
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated() / 2**20
        else:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
            self.base = _status_mb("VmRSS")
        return self

    def __exit__(self, *exc):
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() / 2**20 - self.base
        else:
            self.peak = _status_mb("VmHWM") - self.base
        return False


# ------------------------------------------------------------------------------------------------ one prior
def run_prior(name, device, dtype_name, batch, rounds, encoder_kind):
    import torch

    from brainenc.synthesis import guided_step, initial_noise, make_scheduler
    from brainenc.synthesis.objectives import ResponseObjective

    dtype = getattr(torch, dtype_name)
    t_build = time.perf_counter()
    prior = _build_prior(name, device, dtype)
    enc = _build_encoder(encoder_kind, device)
    build_s = time.perf_counter() - t_build
    obj = ResponseObjective.voxels(list(range(0, V, 3)), n_voxels=V)
    sch = make_scheduler("ddim", prior.scheduler)
    sch.set_timesteps(50, device=device)
    t = sch.timesteps[25]
    x = initial_noise(prior, list(range(batch)), device)
    models = [m for m in (prior.unet, prior.vae) if m is not None]

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def step(mode):
        with torch.no_grad():
            eps = prior.eps(x, t)
        if mode != "unguided":
            eps, _ = guided_step(prior, x, t, enc, obj, 100.0, eps=eps)
        out = sch.step(eps, t, x).prev_sample
        sync()
        return out

    def set_ckpt(on):
        for m in models:
            (m.enable_gradient_checkpointing if on else m.disable_gradient_checkpointing)()

    # warm-up at batch 1 of every mode (one-time autograd / kernel set-up), then one memory-measured call per mode
    x_full = x
    x = x_full[:1]
    for mode in MODES:
        set_ckpt(mode == "guided_ckpt")
        step(mode)
    x = x_full
    res = {"prior": prior.describe(), "encoder": encoder_kind, "batch": batch, "dtype": dtype_name,
           "build_seconds": build_s, "timestep": int(t), "baseline_rss_mb": _status_mb("VmRSS"),
           "unet_params_m": sum(p.numel() for p in prior.unet.parameters()) / 1e6,
           "vae_params_m": sum(p.numel() for p in prior.vae.parameters()) / 1e6 if prior.vae is not None else 0.0,
           "encoder_params_m": sum(p.numel() for p in enc.parameters()) / 1e6, "modes": {}}
    if device == "cuda":
        res["baseline_cuda_allocated_mb"] = torch.cuda.memory_allocated() / 2**20
    for mode in MODES:
        set_ckpt(mode == "guided_ckpt")
        with _Peak(device) as pk:
            t0 = time.perf_counter()
            step(mode)
            first = time.perf_counter() - t0
        res["modes"][mode] = {"peak_step_mb": pk.peak, "first_call_seconds": first, "seconds": []}
    # timing: rounds of (unguided, guided, guided_ckpt), interleaved
    for _ in range(rounds):
        for mode in MODES:
            set_ckpt(mode == "guided_ckpt")
            t0 = time.perf_counter()
            step(mode)
            res["modes"][mode]["seconds"].append(time.perf_counter() - t0)
    set_ckpt(False)
    for mode in MODES:
        r = res["modes"][mode]
        r["median_seconds"] = statistics.median(r["seconds"])
        r["seconds_per_image"] = r["median_seconds"] / batch
    u, g, c = (res["modes"][m] for m in MODES)
    res["ratios"] = {
        "guided_over_unguided_time": g["median_seconds"] / u["median_seconds"],
        "guided_ckpt_over_guided_time": c["median_seconds"] / g["median_seconds"],
        "guided_over_unguided_peak_mb": g["peak_step_mb"] / max(u["peak_step_mb"], 1e-9),
        "guided_ckpt_over_guided_peak_mb": c["peak_step_mb"] / max(g["peak_step_mb"], 1e-9),
    }
    res["braindive_50_steps_seconds_per_image"] = 50 * g["seconds_per_image"]
    return res


def _worker(spec):
    res = run_prior(**spec)
    print("RESULT " + json.dumps(res), flush=True)


def _in_child(spec):
    """Run one prior in a fresh process (its own RSS), with mmap'd large buffers so RSS tracks live bytes."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], env=env, capture_output=True,
                          text=True)
    if proc.returncode != 0:
        raise SystemExit(f"worker {spec['name']} failed:\n{proc.stderr[-3000:]}")
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    res = json.loads(line[len("RESULT "):])
    res["process_seconds"] = time.perf_counter() - t0
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--priors", nargs="+", default=None, help=f"subset of {list(PRIORS) + ['sd21']}")
    p.add_argument("--sd21", action="store_true", help="add the SD-2.1-base-sized prior (for a GPU)")
    p.add_argument("--dtype", default=None, choices=["float32", "float16"],
                   help="model dtype (default float32 on CPU, float16 on CUDA)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=None)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("BRAINENC_QUIET", "1")
    if args.worker:
        _worker(json.loads(args.worker))
        return
    from brainenc._utils.io import write_json

    priors = list(args.priors or (PRIORS + (("sd21",) if args.sd21 else ())))
    if args.sd21 and "sd21" not in priors:
        priors.append("sd21")
    dtype = args.dtype or ("float16" if args.device == "cuda" else "float32")
    rounds = 2 if args.quick else args.rounds
    t_all = time.perf_counter()
    results = {}
    for name in priors:
        spec = {"name": name, "device": args.device, "dtype_name": dtype, "batch": args.batch, "rounds": rounds,
                "encoder_kind": "clip-vit-b-16" if name == "sd21" else "conv"}
        print(f"{name} ...", flush=True)
        r = _in_child(spec) if args.device == "cpu" else run_prior(**spec)
        results[name] = r
        for mode in MODES:
            m = r["modes"][mode]
            print(f"  {mode:12s} {m['median_seconds']:8.4f} s/step  peak {m['peak_step_mb']:8.1f} MB", flush=True)
        print(f"  guided/unguided time {r['ratios']['guided_over_unguided_time']:.2f}x, "
              f"ckpt/guided peak {r['ratios']['guided_ckpt_over_guided_peak_mb']:.2f}x", flush=True)
    result = {"benchmark": "synthesis", "date": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv),
              "machine": _machine(args.device), "load_average_at_end": os.getloadavg(),
              "total_seconds": time.perf_counter() - t_all,
              "method": {"step": "DDIM timestep 25 of 50; unguided = no-grad UNet eps + scheduler.step; guided = "
                                 "+ brainenc.synthesis.guided_step (scale 100, objective = mean of 34 of 100 outputs)",
                         "timing": f"median of {rounds} interleaved rounds after a warm-up and one memory-measured "
                                   "call per mode",
                         "memory": ("CPU: fresh process per prior, MALLOC_MMAP_THRESHOLD_=65536, peak-RSS mark reset "
                                    "via /proc/self/clear_refs, peak_step_mb = VmHWM after - VmRSS before"
                                    if args.device == "cpu" else
                                    "CUDA: max_memory_allocated after reset_peak_memory_stats - allocated before"),
                         "encoder": "conv: 2-conv stand-in at 64 px (cost not the real encoder's); clip-vit-b-16: "
                                    "random OpenCLIP ViT-B/16 at 224 px + linear readout (BrainDiVE's backbone)"},
              "priors": results}
    if args.out:
        path = Path(args.out)
    elif args.quick:
        path = Path(tempfile.gettempdir()) / f"synthesis_quick_{args.device}.json"
    else:
        path = ROOT / "kernels" / "results" / f"synthesis_{args.device}.json"
    write_json(path, result)
    print(f"wrote {path} ({result['total_seconds']:.0f} s)")


if __name__ == "__main__":
    main()
