"""`peftseg eval`: evaluate a trained checkpoint again, on its dataset or another with the same classes."""

from __future__ import annotations

from pathlib import Path

from peftseg.cli.common import console, print_text, split_args, wants_help

EVAL_HELP = """\
usage: peftseg eval checkpoint=<run dir, model_* file or merged file> [output=<dir>] [overrides…]

Rebuilds the run's model and method from the checkpoint, loads the trained tensors and
evaluates them. A PEFT checkpoint and a `peftseg merge` file carry their model, method and
classes; a plain detectron2 checkpoint needs model=<preset> and dataset=… (its classes).
The model and method come from the checkpoint; these may be overridden with Hydra's
syntax, as for `peftseg train`:
  dataset=<{datasets}> and dataset.<key>=…   evaluate on other data (same classes)
  train.device=…  train.num_workers=…
Writes <output>/eval.json (default: eval_<checkpoint name>/ beside the checkpoint).

checkpoint=[runA,runB,…]: run checkpoints of one base model (task variants) evaluated on one
shared copy of the base, each variant switched in turn; <output>/<run dir name>/eval.json each
(default output: eval_variants/ in the working directory), and the tensor memory of base +
variants next to separate models.
"""


def main(argv: list[str]) -> int:
    """`peftseg eval`: rebuild base + method, load the checkpoint, run the dataset's evaluator."""
    if wants_help(argv):
        from peftseg.registry import DATASETS

        print_text(EVAL_HELP.format(datasets="|".join(DATASETS.names())))
        return 0
    from peftseg.engine.evaluate import evaluate
    from peftseg.checkpoint.load import load_model
    from peftseg.cli.many import checkpoint_list
    from peftseg.engine.run import resolve_device
    from peftseg.params import count_parameters
    from peftseg.io.atomic import write_json
    from peftseg.results import evaluator_metrics
    from peftseg.report.tables import eval_table
    from peftseg.errors import UserError
    from peftseg.finite import check_result
    from peftseg.io.output_guard import check_targets, output_dir, write_errors

    options, overrides, _ = split_args(argv, "eval", ("checkpoint", "output"), required=("checkpoint",),
                                       example="checkpoint=outputs/<date>/<time>")
    many = checkpoint_list(options["checkpoint"])
    if many is not None:
        return _eval_variants(many, overrides, options.get("output"))
    r = load_model(options["checkpoint"], overrides, need_dataset=True)
    device = resolve_device(r.cfg.train.device)
    r.model.to(device)
    out_dir = Path(options.get("output") or r.source.parent / f"eval_{r.source.stem}")
    # invariant 2 (peftseg.io.output_guard): not the checkpoint, not the run's eval/ (visualize reads it)
    output_dir(out_dir, inputs=[r.source], what="output=")
    check_targets([out_dir / "eval.json", out_dir / "coco_instances_results.json"], [r.source], what="output=")
    with write_errors(out_dir):
        results = evaluate(r.model, r.splits.val, r.cfg.model.image_size, out_dir, r.cfg.train.num_workers)
    record = {
        "checkpoint": str(r.source), "checkpoint_kind": r.kind, "dataset": r.cfg.dataset.name,
        "params": count_parameters(r.model).to_dict(), "metrics": evaluator_metrics(results), "status": "ok",
    }
    try:  # invariant 1: NaN/inf is never written as a result (peftseg.finite decides, as for runs)
        check_result(record["metrics"], f"evaluating {r.source} on {r.splits.val!r}", "this evaluation has",
                     params=record["params"])
    except UserError as exc:
        with write_errors(out_dir):
            write_json(out_dir / "eval.json", {**record, "status": "failed", "error": str(exc)})
        raise UserError(f"{exc} The reason is in {out_dir / 'eval.json'}.") from None
    with write_errors(out_dir):
        write_json(out_dir / "eval.json", record)
    console.print(eval_table(record))
    console.print(f"record: {out_dir / 'eval.json'}")
    return 0


def _eval_variants(checkpoints: list[str], overrides: list[str], output: str | None) -> int:
    from peftseg.checkpoint.variants import load_variants
    from peftseg.cli.many import print_memory
    from peftseg.engine.evaluate import evaluate
    from peftseg.engine.run import resolve_device
    from peftseg.io.atomic import write_json
    from peftseg.report.tables import eval_table
    from peftseg.results import evaluator_metrics

    vset = load_variants(checkpoints, overrides, need_dataset=True)
    vset.to(resolve_device(vset.variants[0].cfg.train.device))
    root = Path(output or "eval_variants")
    for v in vset:
        model = vset.activate(v)
        out_dir = root / v.name
        results = evaluate(model, vset.splits.val, v.cfg.model.image_size, out_dir, v.cfg.train.num_workers)
        record = {
            "checkpoint": str(v.source), "checkpoint_kind": "peft", "dataset": v.cfg.dataset.name,
            "variant_of_shared_base": True, "params": vset.param_counts(v), "metrics": evaluator_metrics(results),
        }
        write_json(out_dir / "eval.json", record)
        console.print(f"[bold]{v.name}[/] ({v.cfg.method.name})", highlight=False)
        console.print(eval_table(record))
        console.print(f"record: {out_dir / 'eval.json'}")
    mem = print_memory(console, vset)
    write_json(root / "memory.json", mem)
    return 0
