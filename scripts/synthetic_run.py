"""A run checkpoint without training, for measurements of loading/export (not of accuracy):
the run's model and method built as `peftseg train` builds them, every trained tensor moved
off its initial value by seeded noise (zero-initialised LoRA B / adapter up included, so the
method changes the outputs), written by the trainer's own checkpointer."""

from __future__ import annotations

from pathlib import Path

CLASSES = ["circle", "square", "triangle"]


def synthetic_run(run_dir: Path, overrides: list[str], noise_seed: int, scale: float = 0.02) -> Path:
    import torch
    from omegaconf import OmegaConf

    from peftseg.checkpoint.files import FINAL, PeftCheckpointer
    from peftseg.config import compose_config
    from peftseg.build import build_for_run

    cfg = compose_config(["train=smoke", *overrides])
    model = build_for_run(cfg, len(CLASSES))
    g = torch.Generator().manual_seed(noise_seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)
    meta = {"config": OmegaConf.to_container(cfg, resolve=True), "class_names": CLASSES}
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    PeftCheckpointer(model, save_dir=str(run_dir), meta=meta).save(FINAL)
    return Path(run_dir)
