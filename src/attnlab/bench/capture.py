"""`attnlab bench --capture`: the cost of looking inside a model with `attnlab.probes.capture`.

    attnlab bench --capture                       # every model below
    python -m attnlab.bench.capture --models llama --budget 2 --json

For each model, one forward (no grad, eval mode, float32, B = 1) timed four ways in the same
rounds by `attnlab.bench.timing` (interleaved, rotating order; paired ratios):
- `eager`: the plain model with `attn_implementation="eager"` (the baseline: what a user without
  attnlab would run to get attention probabilities);
- `sdpa`: the same model with transformers' SDPA attention (no probabilities), for scale;
- `capture:none`: inside `capture(model, names=[])`, which routes attention through attnlab's
  function and records nothing (the price of the routing alone);
- `capture:pattern`: recording every layer's hook_pattern;
- `capture:all`: recording every hook (q, k, v, scores, pattern, z, attn_out, mlp_out, resid_post).
The issue's goal: a capturing forward within 1.3x of the eager one.

Models: random weights in the shapes of the real models the probes use (the shape sets the cost;
the weights do not), so the bench needs only transformers: `llama` (SmolLM2-135M's width, heads
and MLP, 8 of its 30 layers, N = 256), `bert` (all-MiniLM-L6-v2: 6 x 12 heads, 384 wide, N = 128),
`dinov2` (DINOv2-S/14 at 224 px: 12 x 6 heads, 384 wide, 257 tokens); and attnlab's own `causal_lm`
(8 layers of mhsa, 256 wide, N = 256), where `eager` means its reference backend and `sdpa` its default.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from attnlab._io import default_out, fmt, write_text
from attnlab.bench import report
from attnlab.bench.timing import Subject, run_rounds
from attnlab._env import loadavg
from attnlab.bench.worker import environment

MODELS = ("llama", "bert", "dinov2", "causal_lm")
WAYS = ("eager", "sdpa", "capture:none", "capture:pattern", "capture:all")


def build(name: str):
    """(model, inputs, description) with random weights and fixed inputs."""
    torch.manual_seed(0)
    if name == "causal_lm":
        from attnlab.models import CausalLM
        model = CausalLM(1000, 256, 4, 8).eval()
        return model, {"tokens": torch.randint(0, 1000, (1, 256))}, "attnlab CausalLM, 8 x mhsa, C=256, h=4, N=256"
    from attnlab._extras import optional_import
    transformers = optional_import("transformers", "hf", what="attnlab bench --capture")
    if name == "llama":
        c = transformers.LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=8,
                                     num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)
        model, inputs = transformers.LlamaModel(c), {"input_ids": torch.randint(0, 49152, (1, 256))}
        what = "Llama in SmolLM2-135M's shape, 8 layers, C=576, 9 heads (3 KV), N=256"
    elif name == "bert":
        c = transformers.BertConfig(vocab_size=30522, hidden_size=384, intermediate_size=1536, num_hidden_layers=6,
                                    num_attention_heads=12)
        model, inputs = transformers.BertModel(c), {"input_ids": torch.randint(0, 30522, (1, 128))}
        what = "BERT in all-MiniLM-L6-v2's shape, 6 layers, C=384, 12 heads, N=128"
    elif name == "dinov2":
        c = transformers.Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6,
                                      intermediate_size=1536, patch_size=14, image_size=224)
        model, inputs = transformers.Dinov2Model(c), {"pixel_values": torch.randn(1, 3, 224, 224)}
        what = "DINOv2-S/14 shape, 12 layers, C=384, 6 heads, 224 px (257 tokens)"
    else:
        raise ValueError(f"unknown model {name!r}; expected one of {MODELS}")
    return model.eval(), inputs, what


def subjects(name: str) -> tuple[list[Subject], str]:
    from attnlab.probes.capture import capture
    model, inputs, what = build(name)
    hf = name != "causal_lm"

    def set_way(way: str) -> None:
        if hf:
            model.set_attn_implementation("eager" if way != "sdpa" else "sdpa")
        else:
            for block in model.body.blocks:
                block.attn.backend = "reference" if way == "eager" else None

    def call(way: str):
        names = {"capture:none": [], "capture:pattern": "blocks.*.attn.hook_pattern", "capture:all": None}

        def run():
            set_way(way)
            with torch.no_grad():
                if way in names:
                    with capture(model, names=names[way]):
                        model(**inputs)
                else:
                    model(**inputs)
        return run
    return [Subject(way, {"fwd_ms": call(way)}) for way in WAYS], what


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="attnlab bench --capture", description=__doc__.split("\n")[0])
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {', '.join(MODELS)}")
    p.add_argument("--budget", type=float, default=3.0, help="seconds of timed rounds per model")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", type=Path, default=None, help="folder for capture.json and capture.md")
    p.add_argument("--json", action="store_true", help="print the JSON result too")
    args = p.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    bad = [m for m in models if m not in MODELS]
    if bad:
        print(f"attnlab bench --capture: unknown model {bad[0]!r}; expected some of {', '.join(MODELS)}", file=sys.stderr)
        return 2
    env = environment(args.threads, "cpu")
    results, lines = {}, []
    start = time.perf_counter()
    for name in models:
        subs, what = subjects(name)
        rounds = run_rounds(subs, budget_s=args.budget, baseline="eager", min_seconds=0.05)
        samples = rounds.samples
        base = samples.get("eager", {}).get("fwd_ms")
        rows = {}
        for way in WAYS:
            ms = samples.get(way, {}).get("fwd_ms")
            rows[way] = {"fwd_ms": report.median(ms), "iqr_ms": report.iqr(ms),
                         "ratio_to_eager": report.paired_ratio(ms, base), "rounds": len(ms or []),
                         "skipped": rounds.skipped.get(way)}
        results[name] = {"model": what, "ways": rows}
        lines += [f"**{name}**: {what}", "", "| way | forward ms | IQR | vs eager (paired) |", "| --- | --- | --- | --- |"]
        lines += [f"| {way} | {fmt(r['fwd_ms'], '.2f')} | {fmt(r['iqr_ms'], '.2f')} | {fmt(r['ratio_to_eager'], '.3f')}x |"
                  for way, r in rows.items()]
        lines.append("")
    env["loadavg"] = loadavg()
    page = "\n".join(["# attnlab bench --capture", "", f"Command: `attnlab bench --capture --models {','.join(models)} "
                      f"--budget {args.budget:g}`; {time.perf_counter() - start:.0f} s; torch threads "
                      f"{torch.get_num_threads()}; load average {env.get('loadavg')}.", ""] + lines)
    print(page)
    if args.out is not None or not args.json:
        out = args.out or default_out()
        out.mkdir(parents=True, exist_ok=True)
        write_text(out / "capture.json", json.dumps({"env": env, "results": results}, indent=1, default=str))
        write_text(out / "capture.md", page + "\n")
        print(f"wrote {out / 'capture.md'}")
    if args.json:
        print(json.dumps({"env": env, "results": results}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
