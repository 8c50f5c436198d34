"""Memory of N task variants on one base vs N separate models.

    .venv/bin/python scripts/variants_memory.py --model vitdet_b --variants 4 --out variants_memory

Makes N LoRA run checkpoints of one base (scripts/synthetic_run.py: random base, as without
model.weights, trained tensors set by seeded noise; ranks/targets vary per variant), then
- loads them as `peftseg predict checkpoint=[…]` does (peftseg.checkpoint.variants): tensor
  bytes of the base once + each variant's delta, and the process RSS growth;
- loads each alone (peftseg.checkpoint.load), one at a time: the tensor bytes of its model,
  summed over the N (what N separate models hold);
- with --check-outputs: checks that each variant's outputs on one image equal its
  single-loaded outputs (tests/test_variants.py checks that on vitdet_tiny).
Writes <out>/variants_memory.json and prints the table.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from synthetic_run import synthetic_run  # noqa: E402

VARIANT_METHODS = [  # (label, overrides): LoRA variants that differ in rank and targets
    ("lora_r8_qkv", ["method=lora", "method.rank=8", "method.targets=[attn_qkv]"]),
    ("lora_r4_qkv_proj", ["method=lora", "method.rank=4", "method.targets=[attn_qkv,attn_proj]"]),
    ("lora_r16_mlp", ["method=lora", "method.rank=16", "method.targets=[mlp]"]),
    ("lora_r8_all", ["method=lora", "method.rank=8", "method.targets=[attn_qkv,attn_proj,mlp]"]),
]


def tensor_bytes(model) -> int:
    seen = {}
    for t in model.state_dict().values():
        seen[(t.data_ptr(), t.numel(), t.dtype)] = t.numel() * t.element_size()
    return sum(seen.values())


def rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="vitdet_b")
    ap.add_argument("--variants", type=int, default=4)
    ap.add_argument("--out", type=Path, default=Path("variants_memory"))
    ap.add_argument("--overrides", nargs="*", default=[], help="added to every variant, e.g. method.train_task_layers=false")
    ap.add_argument("--check-outputs", action="store_true",
                    help="also compare each variant's outputs on one image with its single-loaded model")
    args = ap.parse_args()

    import torch

    from peftseg.checkpoint.load import load_model
    from peftseg.checkpoint.variants import load_variants

    torch.set_grad_enabled(False)
    runs = []
    for i in range(args.variants):
        label, overrides = VARIANT_METHODS[i % len(VARIANT_METHODS)]
        run = args.out / f"{i}-{label}"
        if not (run / "model_final.safetensors").is_file():
            synthetic_run(run, [f"model={args.model}", *overrides, *args.overrides], noise_seed=i)
        runs.append(run)
    gc.collect()
    before = rss()
    start = time.perf_counter()
    vset = load_variants([str(r) for r in runs], [])
    load_s = time.perf_counter() - start
    rss_shared = rss() - before
    mem = vset.memory()
    size = int(vset.variants[0].cfg.model.image_size)
    inputs, shared_out = None, {}
    if args.check_outputs:  # one forward per variant, twice: minutes for vitdet_b on a CPU
        g = torch.Generator().manual_seed(0)
        inputs = [{"image": torch.rand(3, size, size, generator=g) * 255, "height": size, "width": size}]
        shared_out = {v.name: vset.activate(v)(inputs)[0]["instances"] for v in vset}
    separate, exact = {}, {}
    for v in vset:
        alone = load_model(str(v.source), []).model
        separate[v.name] = tensor_bytes(alone)
        if inputs is not None:
            ref = alone(inputs)[0]["instances"]
            got = shared_out[v.name]
            exact[v.name] = bool(len(ref) == len(got) and torch.equal(ref.scores, got.scores)
                                 and torch.equal(ref.pred_masks, got.pred_masks)
                                 and torch.equal(ref.pred_boxes.tensor, got.pred_boxes.tensor))
        del alone
        gc.collect()
    record = {
        "model": args.model, "overrides": args.overrides, "variants": [v.name for v in vset], "image_size": size,
        "bytes": {**mem, "separate_measured": separate, "separate_measured_total": sum(separate.values())},
        "rss_growth_shared_bytes": rss_shared, "load_variants_seconds": round(load_s, 2),
        "outputs_equal_single_loading": exact or "not checked (--check-outputs)",
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "variants_memory.json").write_text(json.dumps(record, indent=2) + "\n")
    mib = 2**20
    print(f"{args.model}, {len(runs)} LoRA variants (MiB of tensors)")
    print(f"  base once                 {mem['base'] / mib:9.1f}")
    for v in vset:
        print(f"  + {v.name:<22} {mem['variants'][v.name] / mib:9.1f}   alone: {separate[v.name] / mib:9.1f}"
              f"   outputs equal: {exact.get(v.name, 'not checked')}")
    print(f"  shared total              {mem['shared_total'] / mib:9.1f}")
    print(f"  {len(runs)} separate models        {sum(separate.values()) / mib:9.1f}")
    print(f"  RSS growth of load_variants: {rss_shared / mib:.1f} MiB; load time {load_s:.1f} s")


if __name__ == "__main__":
    main()
