#!/usr/bin/env python3
"""Create the mid-size FLUX.2 [klein] benchmark model dir (random weights, deterministic) from the
configs next to this file, with the builder of ../../../shared/reference-flux2/make_reference.py
(diffusers' Flux2Transformer2DModel and AutoencoderKLFlux2, transformers' Qwen3ForCausalLM, the tiny
Qwen tokenizer; published repo layout).

    python make_bench_model.py --out MODEL_DIR [--seed 0] [--reference DIR]

The weights are ~210 MB in float32: write them outside the repository (scripts/bench-model-flux2 does).
"""
import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reference", default=os.environ.get("DIFFUSIOND_REFERENCE_FLUX2",
                                                          os.path.join(ROOT, "..", "shared", "reference-flux2")))
    a = ap.parse_args()
    sys.path.insert(0, os.path.abspath(a.reference))
    import make_reference  # noqa: E402  (the FLUX.2 one, from --reference)

    info = make_reference.build_model_dir(a.out, a.seed, HERE)
    t, te = info["transformer"], info["text_encoder"]
    print(f"FLUX.2 [klein] bench model written to {a.out}: transformer D {t['num_attention_heads'] * t['attention_head_dim']} "
          f"({t['num_layers']} double + {t['num_single_layers']} single blocks); text encoder hidden {te['hidden_size']}, "
          f"{te['num_hidden_layers']} layers, vocab {te['vocab_size']}")


if __name__ == "__main__":
    main()
