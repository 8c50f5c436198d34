"""`peftseg merge`: a run's mergeable method (the LoRA family) folded into the base weights."""

from __future__ import annotations

from peftseg.cli.common import console, print_text, split_args, wants_help

MERGE_HELP = """\
usage: peftseg merge checkpoint=<run dir or model_* file> [output=<file>] [train.device=…]

Folds the method into the base weights (mergeable methods: {mergeable}) and writes the plain
model's tensors (default: model_merged.safetensors beside the checkpoint; an output ending in
.pth gets detectron2's checkpoint layout), loadable with model.weights=<file>.
"""


def main(argv: list[str]) -> int:
    """`peftseg merge`: fold the method into the base, save a plain detectron2 checkpoint."""
    if wants_help(argv):
        from peftseg.registry import METHODS

        print_text(MERGE_HELP.format(mergeable=", ".join(m.name for m in METHODS if m.mergeable)))
        return 0
    from peftseg.checkpoint.merge import merge_checkpoint
    from peftseg.report.tables import fmt_bytes

    options, overrides, _ = split_args(argv, "merge", ("checkpoint", "output"), required=("checkpoint",),
                                       example="checkpoint=outputs/<date>/<time>")
    loaded, out = merge_checkpoint(options["checkpoint"], overrides, options.get("output"))
    console.print(f"merged {loaded.cfg.method.name} into {loaded.cfg.model.name}: {out} "
                  f"({fmt_bytes(out.stat().st_size)})")
    return 0
