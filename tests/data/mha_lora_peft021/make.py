"""Writes this folder: a seem_tiny LoRA run on its decoder attention (peft's LoRA on
nn.MultiheadAttention) trained under peft 0.21.2, and that model's predictions on two images.
peft 0.21.2 applies the out_proj update twice in the forward; tests/test_mha_lora.py checks that
today's peft loads the checkpoint as the model that was trained (the same predictions).

Run from the repository root with peft 0.21.2 first on the path, e.g.:
    .venv/bin/python -m pip install --no-deps --target /tmp/peft021 peft==0.21.2
    PYTHONPATH=/tmp/peft021 OMP_NUM_THREADS=1 .venv/bin/python tests/data/mha_lora_peft021/make.py
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import peft
import torch
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
OVERRIDES = ["model=seem_tiny", "method=lora", "method.targets=[decoder_attn]", "train=smoke",
             "train.max_iter=6", "train.warmup_iters=0", "train.base_lr=0.02", "train.num_workers=0",
             "train.progress=false", "dataset.num_val=2"]
MASKS_KEPT = 10


def main() -> None:
    if peft.__version__ != "0.21.2":
        sys.exit(f"peft {peft.__version__} is first on the path; this fixture is made under peft 0.21.2")
    from peftseg.checkpoint.load import load_model
    from peftseg.config import compose_config
    from peftseg.engine.run import run

    with tempfile.TemporaryDirectory() as tmp:
        os.environ["PEFTSEG_CACHE"] = str(Path(tmp) / "cache")
        run_dir = Path(tmp) / "run"
        run_dir.mkdir()
        os.chdir(tmp)
        record = run(compose_config(OVERRIDES), run_dir, run_dir.name)
        assert record.status == "ok", record.error
        loaded = load_model(str(run_dir), [], need_dataset=True)
        images = [torch.as_tensor(d["image"]) for d in _val_images(loaded)]
        with torch.no_grad():
            outputs = loaded.model([{"image": im, "height": im.shape[1], "width": im.shape[2]} for im in images])
        tensors = {}
        for i, (image, out) in enumerate(zip(images, outputs)):
            inst = out["instances"]
            top = inst.scores.argsort(descending=True)[:MASKS_KEPT]  # the masks of every query: megabytes
            tensors.update({f"{i}.image": image, f"{i}.scores": inst.scores, f"{i}.classes": inst.pred_classes,
                            f"{i}.boxes": inst.pred_boxes.tensor, f"{i}.top": top,
                            f"{i}.masks": inst.pred_masks[top].to(torch.uint8)})
        for name in ("model_final.safetensors", "results.json"):
            shutil.copy(run_dir / name, HERE / name)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(HERE / "predictions.safetensors"),
                  metadata={"peft": peft.__version__, "overrides": json.dumps(OVERRIDES)})
    print(f"wrote {HERE}")


def _val_images(loaded):
    from detectron2.data import DatasetCatalog, detection_utils

    dicts = DatasetCatalog.get(loaded.splits.val)[:2]
    return [{"image": torch.as_tensor(detection_utils.read_image(d["file_name"], format="RGB").copy()).permute(2, 0, 1)}
            for d in dicts]


if __name__ == "__main__":
    main()
