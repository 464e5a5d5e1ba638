#!/usr/bin/env python3
"""Train-step timing of the public MedSegDiff-V2 code (KidsWithTokens/MedSegDiff @ 60850bf), for the side-by-side
figures of ``docs/performance.md``; the public code itself is not part of this repository (``--repo``).

Measurement method: the repo's V2 network (`UNetModel_newpreview`) in the
README's BraTS configuration (scripts/segmentation_train.py defaults + README flags:
--image_size 256 --num_channels 128 --class_cond False --num_res_blocks 2 --num_heads 1
--learn_sigma True --use_scale_shift_norm False --attention_resolutions 16 --diffusion_steps 1000
--noise_schedule linear --rescale_learned_sigmas False --rescale_timesteps False --lr 1e-4;
data_name BRATS -> in_ch 5; version 'new' is the default = V2), built with the repo's own
`create_model_and_diffusion`. Synthetic tensors: image (B,4,S,S) randn + mask (B,1,S,S) in {0,1},
concatenated on dim 1 exactly like TrainLoop.run_step. Timesteps from the repo's UniformSampler.
Loss exactly as TrainLoop.forward_backward:
    losses, sample = diffusion.training_losses_segmentation(model, None, batch, t, model_kwargs={})
    loss = (losses["loss"] * weights + losses["loss_cal"] * 10).mean()
then loss.backward() and AdamW(lr=1e-4, weight_decay=0.0) step (train_util defaults).
Timed step = zero_grad + timestep sampling + fwd + loss + bwd + AdamW step.  Not included (they are
bookkeeping in TrainLoop, not the train step): EMA update, grad/param-norm logging (.item() per
parameter), logger calls, the "param.grad is None" print loop.

PyTorch defaults (TF32 for cuDNN convolutions as the default, cudnn.benchmark off).
Timing: CUDA events per step on cuda (perf_counter on cpu), `--warmup` untimed + `--steps` timed.

Gradient checkpointing: the repo's AttentionBlock.forward calls
`checkpoint(self._forward, (x,), self.parameters(), True)` -- hard-wired True, ignoring
use_checkpoint. Its hand-written CheckpointFunction re-runs the forward in backward WITHOUT the
autocast state, so with bf16 autocast the recomputed attention is fp32 while incoming grads are
bf16 -> backward fails. For bf16 rows (and any row tagged ':nockpt') this script monkeypatches
`guided_diffusion.unet.checkpoint` (the name AttentionBlock looks up at call time) with a
function that simply calls `func(*inputs)`; no file of the repo is modified.  fp32 rows keep the
repo's behaviour (attention checkpointing on) unless tagged ':nockpt'.

Row spec: "B:dtype[:ckpt|:nockpt]", dtype in {fp32, bf16}; e.g. "4:fp32 8:fp32 8:bf16".
"""

import argparse
import json
import os
import sys
import time
import traceback
import types
import warnings

import numpy as np
import torch as th

HERE = os.path.dirname(os.path.abspath(__file__))


def _stub_missing(repo):
    """Install tiny stand-ins for optional imports the repo makes at module level but never uses
    on the training path (sampling / nnUNet-inference / checkpoint-IO helpers only). A stub is
    installed only where the real package cannot be imported."""

    def _missing(name):
        def f(*a, **k):
            raise NotImplementedError(f"{name} is a stub in bench_public_medsegdiff.py (package not installed)")

        return f

    def need(mod):
        try:
            __import__(mod)
            return False
        except Exception:
            return True

    stubs = []
    if need("batchgenerators.augmentations.utils"):
        for n in ("batchgenerators", "batchgenerators.augmentations", "batchgenerators.augmentations.utils"):
            sys.modules[n] = types.ModuleType(n)
        sys.modules["batchgenerators.augmentations.utils"].pad_nd_image = _missing("pad_nd_image")
        stubs.append("batchgenerators")
    if need("scipy.ndimage"):
        for n in ("scipy", "scipy.ndimage", "scipy.ndimage.filters"):
            sys.modules[n] = types.ModuleType(n)
        sys.modules["scipy"].ndimage = sys.modules["scipy.ndimage"]
        sys.modules["scipy.ndimage"].filters = sys.modules["scipy.ndimage.filters"]
        sys.modules["scipy.ndimage.filters"].gaussian_filter = _missing("gaussian_filter")
        stubs.append("scipy")
    if need("torchvision.utils") or need("torchvision.transforms"):
        for n in ("torchvision", "torchvision.utils", "torchvision.transforms"):
            sys.modules[n] = types.ModuleType(n)
        sys.modules["torchvision"].utils = sys.modules["torchvision.utils"]
        sys.modules["torchvision"].transforms = sys.modules["torchvision.transforms"]
        sys.modules["torchvision.utils"].save_image = _missing("save_image")
        stubs.append("torchvision")
    if need("blobfile"):
        sys.modules["blobfile"] = types.ModuleType("blobfile")
        stubs.append("blobfile")
    return stubs


def readme_brats_args(size):
    from guided_diffusion.script_util import model_and_diffusion_defaults

    a = model_and_diffusion_defaults()
    a.update(
        image_size=size,
        num_channels=128,
        class_cond=False,
        num_res_blocks=2,
        num_heads=1,
        learn_sigma=True,
        use_scale_shift_norm=False,
        attention_resolutions="16",
        diffusion_steps=1000,
        noise_schedule="linear",
        rescale_learned_sigmas=False,
        rescale_timesteps=False,
        in_ch=5,  # segmentation_train.py sets args.in_ch = 5 for data_name BRATS (the default)
        version="new",  # default; V2 = UNetModel_newpreview
    )
    return a


def build(size, device):
    from guided_diffusion.script_util import create_model_and_diffusion

    model, diffusion = create_model_and_diffusion(**readme_brats_args(size))
    model.to(device)
    return model, diffusion


def count_params(model):
    total = sum(p.numel() for p in model.parameters())
    hwm = sum(p.numel() for p in model.hwm.parameters()) if hasattr(model, "hwm") else 0
    return total, total - hwm, hwm


def parse_rows(spec):
    rows = []
    for tok in spec.split():
        parts = tok.split(":")
        b, dt = int(parts[0]), parts[1].lower()
        assert dt in ("fp32", "bf16"), tok
        ck = parts[2].lower() if len(parts) > 2 else ("nockpt" if dt == "bf16" else "ckpt")
        assert ck in ("ckpt", "nockpt"), tok
        rows.append((b, dt, ck))
    return rows


def run_row(b, dt, ck, args, device):
    import guided_diffusion.unet as unet_mod
    from guided_diffusion.resample import create_named_schedule_sampler

    orig_ckpt = unet_mod.checkpoint
    if ck == "nockpt":
        unet_mod.checkpoint = lambda func, inputs, params, flag: func(*inputs)
    is_cuda = device.type == "cuda"
    try:
        th.manual_seed(0)
        np.random.seed(0)
        model, diffusion = build(args.size, device)
        model.train()
        total, unet_p, hwm_p = count_params(model)
        sampler = create_named_schedule_sampler("uniform", diffusion, maxt=1000)
        opt = th.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
        img = th.randn(b, 4, args.size, args.size, device=device)
        mask = (th.rand(b, 1, args.size, args.size, device=device) > 0.5).float()
        batch0 = th.cat((img, mask), dim=1)  # as TrainLoop.run_step
        amp = th.autocast(device.type, dtype=th.bfloat16) if dt == "bf16" else None

        def step():
            opt.zero_grad(set_to_none=False)  # repo's zero_grad zeroes grads in place
            # training_losses_segmentation writes the noisy mask into x_start in place
            # (x_start.float() is a no-op for fp32), so hand it a fresh copy each step.
            micro = batch0.clone()
            t, weights = sampler.sample(micro.shape[0], device)
            if amp is not None:
                with amp:
                    losses, _sample = diffusion.training_losses_segmentation(model, None, micro, t, model_kwargs={})
                    loss = (losses["loss"] * weights + losses["loss_cal"] * 10).mean()
            else:
                losses, _sample = diffusion.training_losses_segmentation(model, None, micro, t, model_kwargs={})
                loss = (losses["loss"] * weights + losses["loss_cal"] * 10).mean()
            loss.backward()
            opt.step()
            return loss

        for _ in range(args.warmup):
            loss = step()
        if is_cuda:
            th.cuda.synchronize(device)
            th.cuda.reset_peak_memory_stats(device)
        times = []
        for _ in range(args.steps):
            if is_cuda:
                e0, e1 = th.cuda.Event(enable_timing=True), th.cuda.Event(enable_timing=True)
                e0.record()
                loss = step()
                e1.record()
                times.append((e0, e1))
            else:
                t0 = time.perf_counter()
                loss = step()
                times.append((time.perf_counter() - t0) * 1e3)
        if is_cuda:
            th.cuda.synchronize(device)
            times = [a.elapsed_time(z) for a, z in times]
            peak = th.cuda.max_memory_allocated(device) / 2**30
        else:
            peak = float("nan")
        lv = float(loss.detach().float())
        ms = float(np.mean(times))
        res = dict(
            batch=b,
            dtype=dt,
            attn_ckpt=(ck == "ckpt"),
            ok=True,
            ms_per_step=ms,
            ms_median=float(np.median(times)),
            ms_min=float(np.min(times)),
            slices_per_s=b / (ms / 1e3),
            peak_gib=peak,
            params_m=total / 1e6,
            params_unet_m=unet_p / 1e6,
            params_cond_m=hwm_p / 1e6,
            final_loss=lv,
            loss_finite=bool(np.isfinite(lv)),
        )
    except Exception as e:  # record OOM / autocast failures per row
        res = dict(
            batch=b,
            dtype=dt,
            attn_ckpt=(ck == "ckpt"),
            ok=False,
            error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300],
            traceback=traceback.format_exc()[-2000:],
        )
    finally:
        unet_mod.checkpoint = orig_ckpt
        if is_cuda:
            th.cuda.synchronize(device)
            th.cuda.empty_cache()
    return res


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--rows", default="4:fp32 8:fp32 8:bf16")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--out", default=None, help="JSON path for the results")
    p.add_argument(
        "--repo",
        default=os.path.join(HERE, "..", ".baseline", "MedSegDiff"),
        help="a checkout of github.com/KidsWithTokens/MedSegDiff at commit 60850bf (not part of this repository)",
    )
    p.add_argument(
        "--params-only", action="store_true", help="only build the model (on --device) and print the parameter count"
    )
    args = p.parse_args()

    sys.path.insert(0, os.path.abspath(args.repo))
    stubs = _stub_missing(args.repo)
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch.cuda.amp.autocast import in unet.py
    th.backends.cudnn.benchmark = False

    device = th.device(args.device)
    name = th.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"torch {th.__version__} | cuda {th.version.cuda} | device {name}", flush=True)
    print(f"repo {os.path.abspath(args.repo)} | stubs for missing optional imports: {stubs or 'none'}")
    print(
        f"cudnn.benchmark={th.backends.cudnn.benchmark} cudnn.allow_tf32={th.backends.cudnn.allow_tf32} "
        f"matmul.allow_tf32={th.backends.cuda.matmul.allow_tf32}",
        flush=True,
    )

    if args.params_only:
        model, _ = build(args.size, device)
        total, unet_p, hwm_p = count_params(model)
        print(
            f"size {args.size}: params {total / 1e6:.2f} M = diffusion UNet {unet_p / 1e6:.2f} M "
            f"+ condition net (hwm) {hwm_p / 1e6:.2f} M"
        )
        return

    results = []
    for b, dt, ck in parse_rows(args.rows):
        r = run_row(b, dt, ck, args, device)
        results.append(r)
        if r["ok"]:
            print(
                f"B={b} {dt} attn_ckpt={r['attn_ckpt']}: {r['ms_per_step']:.1f} ms/step "
                f"(median {r['ms_median']:.1f}, min {r['ms_min']:.1f}), {r['slices_per_s']:.1f} slices/s, "
                f"peak {r['peak_gib']:.2f} GiB, params {r['params_m']:.1f} M, loss {r['final_loss']:.4f}",
                flush=True,
            )
        else:
            print(f"B={b} {dt} attn_ckpt={r['attn_ckpt']}: FAILED {r['error']}", flush=True)

    print("\n| batch | dtype | attn ckpt | ms/step | slices/s | peak GiB | params (M) |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        if r["ok"]:
            print(
                f"| {r['batch']} | {r['dtype']} | {'on' if r['attn_ckpt'] else 'off'} | {r['ms_per_step']:.1f} | "
                f"{r['slices_per_s']:.1f} | {r['peak_gib']:.2f} | {r['params_m']:.1f} |"
            )
        else:
            checkpointing = "on" if r["attn_ckpt"] else "off"
            print(f"| {r['batch']} | {r['dtype']} | {checkpointing} | failed: {r['error'][:80]} | | | |")

    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        meta = dict(
            torch=th.__version__,
            cuda=th.version.cuda,
            device=name,
            size=args.size,
            warmup=args.warmup,
            steps=args.steps,
            repo_commit="60850bf",
            stubs=stubs,
            cudnn_benchmark=False,
            cudnn_allow_tf32=th.backends.cudnn.allow_tf32,
            matmul_allow_tf32=th.backends.cuda.matmul.allow_tf32,
        )
        with open(args.out, "w") as f:
            json.dump(dict(meta=meta, rows=results), f, indent=2)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
