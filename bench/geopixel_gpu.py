"""GeoPixel per-tile cost on one GPU: full-size architecture, random bfloat16 weights, a 1024² tile.

    python bench/geopixel_gpu.py                    # full size (InternLM-XComposer-2.5-7B + CLIP-L + SAM2-L) on cuda
    python bench/geopixel_gpu.py --batch 1 --batch 8
    python bench/geopixel_gpu.py --config toy/config.json --device cpu  # smoke run of a toy configuration

The model is built directly on the device in bfloat16 (float32 on the CPU) with random weights: speed does
not depend on the values, and no 22 GB download is needed. The prompt is BOS, the tile (4 081 image tokens
for 1024² with the published geometry: a 3 x 3 HD grid) and ``--prompt-tokens`` text tokens. Generation
is forced to ``--tokens`` tokens (no stop id). Reported, per batch size:

* ``prefill_s``: CLIP on the HD crops, projector, and the language model over the whole prompt, up to the
  first generated token;
* ``decode_tok_s``: generated tokens per second per sequence with the KV cache (tokens 2..N);
* ``reencode_tok_s``: the same without a cache (the published method: every step re-encodes the whole
  sequence), measured over ``--reencode-tokens`` steps and extrapolated to N tokens at that rate (a
  slight overestimate of its speed: later steps re-encode a few hundred more tokens);
* ``mask_s``: SAM2 on the tile plus the mask decoder for ``--masks`` [SEG] states;
* ``peak_gib``: peak GPU memory allocated;
* ``tile_s_cached`` / ``tile_s_reencoding``: per tile, prefill + N tokens + masks, each divided by the
  batch size; ``speedup``: the published method at batch 1 over ours at this batch size.

Each timing is the fastest of ``--repeat`` runs. Prints one JSON object per batch size, and writes them all to ``--out`` when given.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from geobatch.models.geopixel.config import GeoPixelConfig
from geobatch.models.geopixel.engine import Answer, GeoPixel, Query
from geobatch.models.geopixel.loading import build_model

# InternLM-XComposer-2.5-7B's language-model sizes (GeoPixel adds [SEG], <p>, </p> to its 92 544 pieces); the
# position and RoPE settings do not change the cost of a ~4.4k-token sequence. CLIP ViT-L/14 at 560 px and
# SAM2 Hiera-L are GeoPixelConfig's defaults. A real config.json can be given instead with --config.
FULL_SIZE = {
    "vocab_size": 92547,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "max_position_embeddings": 24576,
    "rms_norm_eps": 1e-5,
    "rope_theta": 1000000,
    "rope_scaling": {"type": "dynamic", "factor": 2.0},
}


def random_model(config: GeoPixelConfig, device: str, dtype: str) -> GeoPixel:
    """The architecture on ``device`` in ``dtype``, every parameter random (norm scales 1, biases 0)."""
    model = build_model(config, device=device, dtype=dtype)
    generator = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.ndim >= 2 or "GN" in name:
                parameter.normal_(0.0, 0.02, generator=generator)
            else:
                parameter.fill_(1.0 if name.endswith("weight") else 0.0)
    return model.eval()


def _synchronise(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(device: str, run, repeat: int = 1) -> float:
    """The fastest of ``repeat`` runs of ``run()``, in seconds (the device synchronised around each)."""
    best = float("inf")
    for _ in range(repeat):
        _synchronise(device)
        started = time.perf_counter()
        run()
        _synchronise(device)
        best = min(best, time.perf_counter() - started)
    return best


def measure(model: GeoPixel, device: str, args: argparse.Namespace, batch: int) -> dict:
    rng = np.random.default_rng(0)
    tile = rng.integers(0, 256, (args.tile, args.tile, 3), dtype=np.uint8)
    text = rng.integers(3, model.config.vocab_size, args.prompt_tokens).tolist()
    queries = [Query(tile, (1,), tuple(text)) for _ in range(batch)]

    def answer(tokens: int, use_cache: bool = True):
        return model.answer(queries, max_new_tokens=tokens, stop_ids=(), seg_token_id=-1, use_cache=use_cache)

    answer(2)  # warm-up: kernels, allocator
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    prefill = _timed(device, lambda: answer(1), args.repeat)
    cached = _timed(device, lambda: answer(args.tokens), args.repeat)
    reencoding = _timed(device, lambda: answer(args.reencode_tokens, use_cache=False), args.repeat)
    decode_step = (cached - prefill) / (args.tokens - 1)
    reencode_step = (reencoding - prefill) / (args.reencode_tokens - 1)
    states = torch.randn(args.masks, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    fake = Answer(token_ids=(), seg_states=states.to(device, model.output.weight.dtype))
    mask = _timed(device, lambda: model.segment([tile] * batch, [fake] * batch), args.repeat)
    tokens_after_first = args.tokens - 1
    tile_cached = (prefill + tokens_after_first * decode_step + mask) / batch
    tile_reencoding = (prefill + tokens_after_first * reencode_step + mask) / batch
    return {
        "batch": batch,
        "tile_px": args.tile,
        "image_tokens": model.image_tokens(args.tile, args.tile),
        "prompt_tokens": 1 + model.image_tokens(args.tile, args.tile) + args.prompt_tokens,
        "generated_tokens": args.tokens,
        "prefill_s": round(prefill, 4),
        "decode_tok_s": round(1 / decode_step, 2),
        "reencode_tok_s": round(1 / reencode_step, 3),
        "reencode_extrapolated_from_tokens": args.reencode_tokens,
        "mask_s": round(mask, 4),
        "masks_per_tile": args.masks,
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.startswith("cuda") else None,
        "tile_s_cached": round(tile_cached, 4),
        "tile_s_reencoding": round(tile_reencoding, 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--config", type=Path, default=None, help="a checkpoint's config.json instead of the sizes here"
    )
    parser.add_argument("--device", default="cuda", help="cuda (default), or cpu for a smoke run of a toy --config")
    parser.add_argument("--batch", type=int, action="append", help="tiles per call; repeat for several (default 1)")
    parser.add_argument("--tile", type=int, default=1024, help="tile side in pixels")
    parser.add_argument("--tokens", type=int, default=300, help="generated tokens per tile")
    parser.add_argument("--reencode-tokens", type=int, default=4, help="tokens generated without a cache")
    parser.add_argument("--prompt-tokens", type=int, default=40, help="text tokens of the question")
    parser.add_argument("--masks", type=int, default=8, help="[SEG] states per tile")
    parser.add_argument("--repeat", type=int, default=3, help="runs per timing; the fastest counts")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args()
    device = args.device
    dtype = "float32" if device == "cpu" else "bfloat16"
    sizes = json.loads(args.config.read_text()) if args.config else FULL_SIZE
    config = GeoPixelConfig.from_dict(sizes, source=str(args.config or "bench"))
    started = time.perf_counter()
    model = random_model(config, device, dtype)
    built = time.perf_counter() - started
    machine = torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu"
    print(
        f"# {machine}, {dtype}, {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters, built in {built:.1f} s"
    )
    results = []
    for batch in args.batch or [1]:
        result = measure(model, device, args, batch)
        results.append(result)
        print(json.dumps(result))
    published = next((r for r in results if r["batch"] == 1), results[0])["tile_s_reencoding"]
    for result in results:
        result["speedup_vs_published_batch1"] = round(published / result["tile_s_cached"], 1)
        print(f"batch {result['batch']}: {result['tile_s_cached']} s/tile, {result['speedup_vs_published_batch1']}x")
    if args.out:
        args.out.write_text(json.dumps({"device": machine, "dtype": dtype, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
