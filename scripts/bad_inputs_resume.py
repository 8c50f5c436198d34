"""The resume cases of docs/troubleshooting.md ("Resume"), run in-process: prints one
markdown row per case with the UserError text the CLI prints after `error:` (exit 2).

    .venv/bin/python scripts/bad_inputs_resume.py [work dir, default /tmp/trust_b_bad]
"""

from __future__ import annotations

import sys
from pathlib import Path

from omegaconf import OmegaConf

from peftseg.checkpoint.files import FINAL, PeftCheckpointer, read_checkpoint
from peftseg.checkpoint.resume import check_resumable, resumed_config
from peftseg.config import compose_config
from peftseg.build import build_for_run
from peftseg.errors import UserError

FIRST = ["train=smoke", "train.max_iter=6", "train.warmup_iters=0", "train.base_lr=1e-3"]
CLASSES = ["circle", "square", "triangle"]


def main(work: Path) -> None:
    cfg = compose_config(FIRST)
    meta = {"config": OmegaConf.to_container(cfg, resolve=True), "class_names": CLASSES}
    run, done = work / "run", work / "finished"
    model = build_for_run(cfg, len(CLASSES))
    ckpt = PeftCheckpointer(model, save_dir=str(run), meta=meta)
    ckpt.save("model_0000002", iteration=2)
    ckpt.save("model_0000005", iteration=5)
    (run / "last_checkpoint").write_text("model_0000002.pth")
    PeftCheckpointer(model, save_dir=str(done), meta=meta).save(FINAL, iteration=5)

    def resume(target, *given):
        overrides = [f"train.resume={target}", *given]
        return resumed_config(compose_config(overrides), overrides)

    def other_classes():
        source, data = read_checkpoint(run / "model_0000002.pth")
        check_resumable(source, data, data["peftseg"]["config"], ["cat", "dog", "bird"])

    cases = [
        ("`train.resume=<run of train=smoke train.max_iter=6>` alone (no override repeated)",
         lambda: f"(no error) resumes with train.name={resume(run).train.name}, "
                 f"train.max_iter={resume(run).train.max_iter}: the run's own config, recorded so"),
        ("`train.resume=<run>` `train.num_workers=3 train.device=cpu`",
         lambda: f"(no error) applied and recorded: train.num_workers={resume(run, 'train.num_workers=3').train.num_workers}"),
        ("`train.resume=<run>/model_0000002.pth train.base_lr=0.1` (its schedule: 1e-3)",
         lambda: resume(run / "model_0000002.pth", "train.base_lr=0.1")),
        ("`train.resume=<run> train.max_iter=50`", lambda: resume(run, "train.max_iter=50")),
        ("`train.resume=<run of train=smoke> train=default`", lambda: resume(run, "train=default")),
        ("`train.resume=<run of method=lora> method=bitfit`", lambda: resume(run, "method=bitfit")),
        ("`train.resume=<finished run>`", lambda: resume(done)),
        ("`train.resume=<run>/model_0000005.pth` (after the last step of max_iter=6)",
         lambda: resume(run / "model_0000005.pth")),
        ("`train.resume=<run>` on a dataset with other class names", other_classes),
    ]
    for i, (what, case) in enumerate(cases, 1):
        try:
            seen = case()
        except UserError as e:
            seen = f"exit 2: error: {e}"
        print(f"| R{i} | {what} | {seen} |")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/trust_b_bad"))
