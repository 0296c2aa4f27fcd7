"""Benchmark: the reconstruction stack on CPU (or one GPU): metric suite, ridge decoder, feature
inversion, diffusion steps.

Measured in one run, each next to its anchor where one exists:

* **metric suite**: images/s per metric of :func:`brainenc.metrics.score_reconstruction_sets`
  (N ground truths + N reconstructions; real-size architectures with random weights, so the cost
  is that of the real networks), against the anchor loop MindEye2's notebook runs (torchvision
  ``create_feature_extractor`` + the identification loop / scikit-image SSIM per image) on the
  same images; the values must agree.
* **ridge decoder**: :class:`brainenc.decoding.RidgeDecoder` (GCV, one alpha per output) vs
  scikit-learn ``RidgeCV(alpha_per_target=True)`` on the quickstart's sizes.
* **feature inversion**: iterations/s and seconds per image of
  :func:`brainenc.decoding.lowlevel.invert_features`: pixel at 64 px (Lite0, the quickstart),
  DIP at 64 px, and the paper's setting (DIP at 224 px -> VGG16-BN at 112 px).
* **diffusion**: seconds per denoising step (CFG, batch 1) of our SDXL-unCLIP Euler loop on the
  tiny unclip6-shaped UNet (32x32 latents) and of the tiny SD img2img pipeline.

    flock /tmp/brainenc-bench.lock .venv/bin/python kernels/bench/bench_reconstruction.py
    .venv/bin/python kernels/bench/bench_reconstruction.py --quick        # smoke run, $TMPDIR

Writes ``kernels/results/reconstruction_cpu.json`` (``--device cuda``: ``reconstruction_cuda.json``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def _machine(device: str) -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    try:
        with open("/proc/cpuinfo") as fh:
            info["cpu_model"] = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
        with open("/proc/meminfo") as fh:
            info["mem_total_gb"] = round(int(fh.readline().split()[1]) / 2**20, 1)
    except (OSError, StopIteration):
        pass
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return info


def _photos(n: int, size: int = 256, seed: int = 0) -> np.ndarray:
    """n smooth colour images (low-pass noise + gradients): uint8 [n, size, size, 3]."""
    rng = np.random.default_rng(seed)
    from scipy.ndimage import gaussian_filter

    out = np.empty((n, size, size, 3), np.uint8)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for i in range(n):
        img = gaussian_filter(rng.standard_normal((size, size, 3)), sigma=(size / 24, size / 24, 0))
        img = img / (np.abs(img).max() + 1e-9) + 0.5 * np.stack([xx, yy, 1 - xx], -1) * rng.uniform(-1, 1, 3)
        img = (img - img.min()) / (img.max() - img.min() + 1e-9)
        out[i] = np.round(img * 255)
    return out


def _rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def bench_metrics(n: int, clip_model: str) -> dict:
    import torch
    from skimage.color import rgb2gray
    from skimage.metrics import structural_similarity
    from torchvision.models import alexnet
    from torchvision.models.feature_extraction import create_feature_extractor
    from torchvision.transforms import functional as TF

    from brainenc.metrics import score_reconstruction_sets

    real = _photos(n, seed=0)
    pred = np.clip(real.astype(np.float32) * 0.7 + 40 + np.random.default_rng(1).normal(0, 20, real.shape), 0, 255)
    pred = pred.astype(np.uint8)
    out: dict = {"n_images": n, "per_metric": {}}
    for m in ("pixcorr", "ssim", "alexnet2", "inception", "clip", "effnet", "swav"):
        t0 = time.perf_counter()
        res = score_reconstruction_sets(real, {"pred": pred}, [m], weights="random", clip_model=clip_model,
                                        batch_size=32)
        dt = time.perf_counter() - t0
        out["per_metric"][m] = {"seconds": dt, "images_per_s": 2 * n / dt, "value": res["sets"]["pred"]["metrics"][m]}
        print(f"  metric {m:9s} {dt:7.2f} s  {2 * n / dt:7.1f} img/s  value {out['per_metric'][m]['value']:.4f}",
              flush=True)
    # all metrics in one call: each network built once
    t0 = time.perf_counter()
    score_reconstruction_sets(real, {"pred": pred}, weights="random", clip_model=clip_model, batch_size=32)
    out["all_metrics_seconds"] = time.perf_counter() - t0

    # anchors: the notebook's loops on the same images
    x_r = torch.from_numpy(real).permute(0, 3, 1, 2).float() / 255
    x_p = torch.from_numpy(pred).permute(0, 3, 1, 2).float() / 255
    t0 = time.perf_counter()
    g_r = rgb2gray(TF.resize(x_r, [425], antialias=False).permute(0, 2, 3, 1).numpy())
    g_p = rgb2gray(TF.resize(x_p, [425], antialias=False).permute(0, 2, 3, 1).numpy())
    ss = [structural_similarity(p, r, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0)
          for p, r in zip(g_p, g_r)]
    dt = time.perf_counter() - t0
    out["anchor_ssim"] = {"seconds": dt, "value": float(np.mean(ss))}
    torch.manual_seed(0)
    net = alexnet(weights=None).eval()
    fx = create_feature_extractor(net, return_nodes=["features.4"])
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    t0 = time.perf_counter()
    with torch.no_grad():
        f_r = fx((TF.resize(x_r, [256], antialias=False) - mean) / std)["features.4"].flatten(1).double().numpy()
        f_p = fx((TF.resize(x_p, [256], antialias=False) - mean) / std)["features.4"].flatten(1).double().numpy()
    r = np.corrcoef(f_r, f_p)[n:, :n]  # r[i, j] = corr(pred_i, real_j)
    congruent = np.diag(r)
    ident = float(np.mean([(r[i] < congruent[i]).sum() / (n - 1) for i in range(n)]))
    dt = time.perf_counter() - t0
    out["anchor_alexnet2"] = {"seconds": dt, "value": ident}
    out["agreement"] = {"ssim_abs_diff": abs(out["anchor_ssim"]["value"] - out["per_metric"]["ssim"]["value"]),
                        "alexnet2_abs_diff": abs(ident - out["per_metric"]["alexnet2"]["value"])}
    out["ratios"] = {"ssim_ours_over_anchor_time": out["per_metric"]["ssim"]["seconds"] / out["anchor_ssim"]["seconds"],
                     "alexnet2_ours_over_anchor_time":
                         out["per_metric"]["alexnet2"]["seconds"] / out["anchor_alexnet2"]["seconds"]}
    return out


def bench_ridge(n_train: int, n_test: int, n_vox: int, n_out: int) -> dict:
    from sklearn.linear_model import RidgeCV
    from sklearn.preprocessing import StandardScaler

    from brainenc.decoding import RidgeDecoder

    rng = np.random.default_rng(0)
    W = rng.standard_normal((n_vox, 64)) / np.sqrt(n_vox)
    V = rng.standard_normal((n_train + n_test, n_vox)).astype(np.float32)
    T = ((V @ W) @ rng.standard_normal((64, n_out)) + rng.standard_normal((n_train + n_test, n_out))).astype(np.float32)
    alphas = [1e1, 1e2, 1e3, 1e4, 1e5]
    t0 = time.perf_counter()
    dec = RidgeDecoder(alphas=alphas).fit(V[:n_train], T[:n_train])
    ours = time.perf_counter() - t0
    pred = dec.predict(V[n_train:])
    t0 = time.perf_counter()
    xs, ys = StandardScaler().fit(V[:n_train]), StandardScaler().fit(T[:n_train])
    ref = RidgeCV(alphas=alphas, alpha_per_target=True).fit(xs.transform(V[:n_train]), ys.transform(T[:n_train]))
    want = ys.inverse_transform(ref.predict(xs.transform(V[n_train:])))
    anchor = time.perf_counter() - t0
    return {"n_train": n_train, "n_voxels": n_vox, "n_outputs": n_out, "ours_seconds": ours,
            "sklearn_ridgecv_seconds": anchor, "speedup": anchor / ours,
            "max_abs_diff_predictions": float(np.abs(pred - want).max()),
            "max_abs_diff_same_alpha": float(np.abs(pred - want)[:, np.isclose(dec.best_alphas_, ref.alpha_)].max()),
            "prediction_scale_max_abs": float(np.abs(want).max()),
            "alphas_equal_fraction": float(np.mean(np.isclose(dec.best_alphas_, ref.alpha_)))}


def bench_inversion(device: str, quick: bool) -> dict:
    import torch

    from brainenc.decoding.lowlevel import build_feature_cnn, invert_features

    out = {}
    photos = _photos(8, size=224, seed=3)
    cases = [("pixel_lite0_64px_batch25", "efficientnet-lite0", None, "pixel", 64, 64, 25, 20),
             ("dip_lite0_64px_batch1", "efficientnet-lite0", None, "dip", 64, 64, 1, 5),
             ("paper_dip224_vgg16bn112_batch1", "vgg16_bn", "random", "dip", 224, 112, 1, 2)]
    for name, cnn_name, weights, param, size, input_size, batch, iters in cases:
        if quick:
            iters = 2
        cnn = build_feature_cnn(cnn_name, weights=weights, device=device) if weights else \
            build_feature_cnn(cnn_name, device=device)
        imgs = torch.from_numpy(photos[np.arange(batch) % len(photos)]).permute(0, 3, 1, 2).float() / 255
        imgs = torch.nn.functional.interpolate(imgs, size=(input_size, input_size), mode="bilinear", antialias=True)
        with torch.no_grad():
            targets = [t.detach() for t in cnn(imgs.to(device))]
        invert_features(targets, cnn, parameterization=param, size=size, iterations=1, input_size=input_size)
        t0 = time.perf_counter()
        res = invert_features(targets, cnn, parameterization=param, size=size, iterations=iters,
                              input_size=input_size)
        dt = time.perf_counter() - t0
        out[name] = {"iterations": iters, "batch": batch, "seconds": dt, "iterations_per_s": iters / dt,
                     "seconds_per_image_per_iteration": dt / iters / batch,
                     "final_loss_mean": float(np.mean(res.final_loss))}
        print(f"  inversion {name}: {iters / dt:.2f} it/s, {dt / iters / batch:.3f} s per image-iteration", flush=True)
    out["paper_seconds_per_image_1800_iterations"] = \
        1800 * out["paper_dip224_vgg16bn112_batch1"]["seconds_per_image_per_iteration"]
    out["quickstart_seconds_per_image_100_iterations"] = \
        100 * out["pixel_lite0_64px_batch25"]["seconds_per_image_per_iteration"]
    return out


def bench_diffusion(steps: int) -> dict:
    import torch

    from brainenc.decoding import _tiny_diffusion as tiny
    from brainenc.decoding.diffusion import img2img_reconstruct, unclip_reconstruct

    out = {}
    unet, vae = tiny.tiny_unclip_unet(), tiny.tiny_vae()
    tok = torch.randn(1, 16, unet.config.cross_attention_dim)
    init = torch.rand(1, 3, 256, 256)
    times = {}
    for n in (2, 2 + steps):
        unclip_reconstruct(unet, vae, tok, init, num_steps=n + 1, start_step=1, image_size=256)  # warm
        t0 = time.perf_counter()
        unclip_reconstruct(unet, vae, tok, init, num_steps=n + 1, start_step=1, image_size=256)
        times[n] = time.perf_counter() - t0
    per = (times[2 + steps] - times[2]) / steps
    out["tiny_unclip_256px_cfg"] = {"seconds_per_step": per, "fixed_seconds": times[2] - 2 * per,
                                    "unet_params_m": sum(p.numel() for p in unet.parameters()) / 1e6}
    pipe = tiny.tiny_sd_img2img_pipeline()
    img = torch.rand(1, 3, 64, 64)
    times = {}
    for n in (2, 2 + steps):
        img2img_reconstruct(pipe, img, prompt="", strength=1.0, num_steps=n, guidance_scale=7.5)
        t0 = time.perf_counter()
        img2img_reconstruct(pipe, img, prompt="", strength=1.0, num_steps=n, guidance_scale=7.5)
        times[n] = time.perf_counter() - t0
    per = (times[2 + steps] - times[2]) / steps
    out["tiny_sd_img2img_64px_cfg"] = {"seconds_per_step": per, "fixed_seconds": times[2] - 2 * per}
    for k, v in out.items():
        print(f"  diffusion {k}: {v['seconds_per_step']:.4f} s/step", flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--n-images", type=int, default=100)
    p.add_argument("--clip-model", default="ViT-L-14-quickgelu")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=None)
    p.add_argument("--only-ridge", action="store_true", help="rerun the ridge row only and update the JSON")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("BRAINENC_QUIET", "1")
    n = 12 if args.quick else args.n_images
    t_all = time.perf_counter()
    print("metric suite", flush=True)
    metrics = None if args.only_ridge else bench_metrics(n, "ViT-B-32-quickgelu" if args.quick else args.clip_model)
    print("ridge decoder", flush=True)
    ridge = bench_ridge(*((120, 20, 500, 2000) if args.quick else (650, 100, 4000, 30000)))
    print(f"  ours {ridge['ours_seconds']:.2f} s, sklearn {ridge['sklearn_ridgecv_seconds']:.2f} s", flush=True)
    if args.only_ridge:
        path = Path(args.out) if args.out else ROOT / "kernels" / "results" / f"reconstruction_{args.device}.json"
        old = json.loads(path.read_text())
        old["ridge_decoder"] = ridge
        old["ridge_decoder_rerun"] = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv),
                                      "load_average": os.getloadavg()}
        path.write_text(json.dumps(old, indent=2) + "\n")
        print(f"updated {path}")
        return
    print("feature inversion", flush=True)
    inversion = bench_inversion(args.device, args.quick)
    print("diffusion", flush=True)
    diffusion = bench_diffusion(3 if args.quick else 10)
    result = {"benchmark": "reconstruction", "date": time.strftime("%Y-%m-%d %H:%M:%S"),
              "command": " ".join(sys.argv), "machine": _machine(args.device),
              "load_average_at_end": os.getloadavg(), "peak_rss_gb": _rss_gb(),
              "total_seconds": time.perf_counter() - t_all,
              "metrics": metrics, "ridge_decoder": ridge, "inversion": inversion, "diffusion": diffusion}
    if args.out:
        path = Path(args.out)
    elif args.quick:
        path = Path(tempfile.gettempdir()) / "reconstruction_quick.json"
    else:
        path = ROOT / "kernels" / "results" / f"reconstruction_{args.device}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
