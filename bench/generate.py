"""Time per generated token vs sequence length, with the KV cache and without it (full recompute each step).

    python bench/generate.py                                   # CPU: dim 256, 4 layers, up to 1024 positions
    python bench/generate.py --dim 512 --layers 8 --lengths 128,512,2048 --placement peri

A random-weight model (timing does not depend on the weights) decodes greedily from a 16-token prompt; for each
length L the table gives the milliseconds of the step that produces token L (the median over the 8 steps ending
there), once with models.generation's cache and once recomputing the whole prefix.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from normtron.models.config import ModelConfig
from normtron.models.transformer import Transformer
from normtron.models.generation import KVCache


@torch.no_grad()
def step_times(model: Transformer, lengths: list[int], use_cache: bool) -> dict[int, float]:
    """Milliseconds of the decode step at each length (median of the 8 steps up to it)."""
    tokens = torch.randint(0, model.cfg.vocab_size, (1, 16))
    cache = KVCache() if use_cache else None
    step_input, times = tokens, {}
    for _ in range(max(lengths) - tokens.shape[1]):
        start = time.perf_counter()
        logits = model(step_input, cache=cache) if use_cache else model(tokens)
        new = logits[:, -1].argmax(-1, keepdim=True)
        times[tokens.shape[1] + 1] = (time.perf_counter() - start) * 1e3
        tokens, step_input = torch.cat([tokens, new], dim=1), new
    return {n: statistics.median(times[m] for m in range(n - 7, n + 1)) for n in lengths}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--placement", default="pre")
    parser.add_argument("--lengths", default="64,128,256,512,1024")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: steadier timings)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lengths = [int(n) for n in args.lengths.split(",")]
    cfg = ModelConfig(dim=args.dim, n_layers=args.layers, n_heads=args.heads, vocab_size=args.vocab,
                      max_seq_len=max(lengths), placement=args.placement)
    model = Transformer(cfg)
    model.init_weights()
    model.eval()
    cached, full = step_times(model, lengths, True), step_times(model, lengths, False)
    print(f"dim {args.dim}, {args.layers} layers, vocab {args.vocab}, placement {args.placement}, fp32, "
          f"{args.threads} CPU thread(s); ms per generated token")
    print(f"{'length':>8} | {'KV cache':>9} | {'recompute':>9} | speed-up")
    for n in lengths:
        print(f"{n:>8} | {cached[n]:>9.2f} | {full[n]:>9.2f} | {full[n] / cached[n]:>7.1f}x")


if __name__ == "__main__":
    main()
