#!/usr/bin/env python3
"""Time the diffusers Flux2KleinPipeline on CPU, split by stage; the FLUX.2 twin of
../../../shared/reference/bench/bench_diffusers.py, with the same output lines. Prints one line per run
(`run N: text Xs step Xs vae Xs total Xs`), then one JSON line with medians over the counted runs.

    python bench_diffusers.py --model MODEL_DIR [--height 256 --width 256 --steps 4 --guidance 1.0
                              --num-images 1 --runs 3 --warmup 2 --threads 2]

Stages: text_encode_s = text encoder forward (the pipeline pads every prompt to max_sequence_length=512
tokens and keeps the pad rows); denoise_per_step_s = (end of last step - start of first transformer call) /
steps; vae_decode_s = VAE decoder forward (after BN de-normalisation, unpatchify and post_quant_conv);
total_s = the whole pipeline call with output_type="pil". The model dir's is_distilled (true for the bench
model) means guidance is ignored: one transformer call per step.
"""
import argparse
import json
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

PROMPT = "a photo of a cat sitting on a wooden table next to a window, soft morning light"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--height", type=int, default=256)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--guidance", type=float, default=1.0)
    ap.add_argument("--num-images", type=int, default=1)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=2, help="uncounted runs first (first runs in a fresh VM are much slower)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    from diffusers import Flux2KleinPipeline

    pipe = Flux2KleinPipeline.from_pretrained(a.model, torch_dtype=torch.float32, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    marks = {}

    def pre(key):
        def f(*_args, **_kw):
            marks.setdefault(key + "_start", time.perf_counter())
        return f

    def post(key):
        def f(*_args, **_kw):
            marks[key + "_end"] = time.perf_counter()
        return f

    pipe.text_encoder.register_forward_pre_hook(pre("te"))
    pipe.text_encoder.register_forward_hook(post("te"))
    pipe.transformer.register_forward_pre_hook(pre("tr"))
    pipe.vae.decoder.register_forward_pre_hook(pre("vae"))
    pipe.vae.decoder.register_forward_hook(post("vae"))

    def on_step_end(p, i, t, kw):
        marks["step_end"] = time.perf_counter()
        return {}

    res = {"te": [], "step": [], "vae": [], "total": []}
    for r in range(a.warmup + a.runs):
        marks.clear()
        g = torch.Generator().manual_seed(r)
        t0 = time.perf_counter()
        pipe(prompt=PROMPT, height=a.height, width=a.width, num_inference_steps=a.steps, guidance_scale=a.guidance,
             num_images_per_prompt=a.num_images, generator=g, output_type="pil", callback_on_step_end=on_step_end)
        total = time.perf_counter() - t0
        te = marks["te_end"] - marks["te_start"]
        step = (marks["step_end"] - marks["tr_start"]) / a.steps
        vae = marks["vae_end"] - marks["vae_start"]
        print(f"run {r}: text {te:.3f}s step {step:.3f}s vae {vae:.3f}s total {total:.3f}s", flush=True)
        if r >= a.warmup:
            for k, v in (("te", te), ("step", step), ("vae", vae), ("total", total)):
                res[k].append(v)
    print(json.dumps({
        "impl": f"diffusers {__import__('diffusers').__version__} / torch {torch.__version__}",
        "pipeline": "Flux2KleinPipeline", "threads": a.threads, "height": a.height, "width": a.width,
        "steps": a.steps, "guidance": a.guidance, "num_images": a.num_images, "runs": a.runs, "warmup": a.warmup,
        "text_encode_s": round(statistics.median(res["te"]), 4),
        "denoise_per_step_s": round(statistics.median(res["step"]), 4),
        "vae_decode_s": round(statistics.median(res["vae"]), 4),
        "total_s": round(statistics.median(res["total"]), 4),
    }))


if __name__ == "__main__":
    main()
