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
shared copy of the base, each variant switched in turn and evaluated, checked and recorded as
`peftseg eval` does it alone; <output>/<run dir name>/eval.json each (the name takes as many
parent folders as it needs to be unique; default output: eval_variants/ in the working
directory), and the tensor memory of base + variants next to separate models. A variant
without a result (e.g. NaN AP) is recorded as failed, the others still run, and the command
exits with status 2.
"""


RECORD = "eval.json"
MEMORY = "memory.json"  # checkpoint=[…]: beside the variants' folders


def main(argv: list[str]) -> int:
    """`peftseg eval`: rebuild base + method, load the checkpoint, run the dataset's evaluator."""
    if wants_help(argv):
        from peftseg.registry import DATASETS

        print_text(EVAL_HELP.format(datasets="|".join(DATASETS.names())))
        return 0
    from peftseg.checkpoint.load import load_model
    from peftseg.cli.many import checkpoint_list
    from peftseg.build import resolve_device
    from peftseg.params import count_parameters

    options, overrides, _ = split_args(argv, "eval", ("checkpoint", "output"), required=("checkpoint",),
                                       example="checkpoint=outputs/<date>/<time>")
    many = checkpoint_list(options["checkpoint"])
    if many is not None:
        return _eval_variants(many, overrides, options.get("output"))
    r = load_model(options["checkpoint"], overrides, need_dataset=True)
    r.model.to(resolve_device(r.cfg.train.device))
    out_dir = Path(options.get("output") or r.source.parent / f"eval_{r.source.stem}")
    record = evaluate_checkpoint(r, out_dir, count_parameters(r.model).to_dict())
    _show(record, out_dir)
    return 0


def owner(checkpoint: Path) -> dict:
    """What an eval.json records of its making, so that a rerun replaces only its own evaluation."""
    return {"checkpoint_path": str(Path(checkpoint).resolve())}


def check_output(out_dir: Path, sources: list[Path], checkpoint: Path) -> None:
    """Where the evaluation of `checkpoint` may write (invariant 2, peftseg.io.output_guard): a folder
    that is not a checkpoint, not inside a run's own folders (visualize reads the run's eval/), and
    not holding the evaluation of another checkpoint."""
    from peftseg.io.output_guard import check_targets, output_dir, replaceable

    output_dir(out_dir, inputs=sources, what="output=")
    check_targets([out_dir / RECORD, out_dir / "coco_instances_results.json"], sources, what="output=")
    replaceable(out_dir / RECORD, out_dir / RECORD, owner(checkpoint))


def evaluate_checkpoint(loaded, out_dir: Path, params: dict) -> dict:
    """One loaded checkpoint (peftseg.checkpoint.load.Loaded, its dataset registered) evaluated and
    recorded in out_dir/eval.json: the record when its numbers are a result ("ok"); otherwise
    the record is written as "failed" with the reason, and a UserError says so. One checkpoint
    and each variant of checkpoint=[…] go through here alike."""
    from peftseg.engine.evaluate import evaluate
    from peftseg.errors import UserError
    from peftseg.finite import check_result
    from peftseg.io.atomic import write_json
    from peftseg.io.output_guard import write_errors
    from peftseg.results import evaluator_metrics

    check_output(out_dir, [loaded.source], loaded.source)
    with write_errors(out_dir):
        results = evaluate(loaded.model, loaded.splits.val, loaded.cfg.model.image_size, out_dir,
                           loaded.cfg.train.num_workers)
    record = {
        "checkpoint": str(loaded.source), **owner(loaded.source), "checkpoint_kind": loaded.kind, "dataset": loaded.cfg.dataset.name,
        "params": params, "metrics": evaluator_metrics(results), "status": "ok",
    }
    try:  # invariant 1: NaN/inf is never written as a result (peftseg.finite decides, as for runs)
        check_result(record["metrics"], f"evaluating {loaded.source} on {loaded.splits.val!r}", "this evaluation has",
                     params=record["params"])
    except UserError as exc:
        with write_errors(out_dir):
            write_json(out_dir / RECORD, {**record, "status": "failed", "error": str(exc)})
        raise UserError(f"{exc} The reason is in {out_dir / RECORD}.") from None
    with write_errors(out_dir):
        write_json(out_dir / RECORD, record)
    return record


def _show(record: dict, out_dir: Path) -> None:
    from peftseg.report.tables import eval_table

    console.print(eval_table(record))
    console.print(f"record: {out_dir / RECORD}")


def _eval_variants(checkpoints: list[str], overrides: list[str], output: str | None) -> int:
    """checkpoint=[a,b,…]: `peftseg eval` of each checkpoint, on one shared base (each variant
    switched in); <output>/<variant>/eval.json each, and the memory of base + variants."""
    from peftseg.checkpoint.variants import load_variants
    from peftseg.cli.many import print_memory
    from peftseg.build import resolve_device
    from peftseg.errors import UserError
    from peftseg.io.atomic import write_json
    from peftseg.io.output_guard import check_targets, output_dir, replaceable, write_errors

    root = Path(output or "eval_variants")
    vset = load_variants(checkpoints, overrides, need_dataset=True, reserved_names=(MEMORY,))
    sources = [v.source for v in vset]
    # what memory.json records of its making: a rerun replaces only its own, for the same checkpoints
    made_of = {"checkpoint_paths": [str(Path(s).resolve()) for s in sources]}
    # every file checked before any variant is evaluated: a bad output= stops the command whole
    output_dir(root, inputs=sources, what="output=")
    check_targets([root / MEMORY], sources, what="output=")
    replaceable(root / MEMORY, root / MEMORY, made_of)
    for v in vset:
        check_output(root / v.name, sources, v.source)
    vset.to(resolve_device(vset.variants[0].cfg.train.device))
    failed: list[tuple[str, UserError]] = []
    for v in vset:
        console.print(f"[bold]{v.name}[/] ({v.cfg.method.name})", highlight=False)
        try:
            record = evaluate_checkpoint(vset.loaded(v), root / v.name, vset.param_counts(v).to_dict())
        except UserError as exc:  # the other variants are still evaluated; the command fails at the end
            console.print(f"no result: the reason is in {root / v.name / RECORD}", highlight=False)
            failed.append((v.name, exc))
            continue
        _show(record, root / v.name)
    mem = print_memory(console, vset)
    with write_errors(root):
        write_json(root / MEMORY, {**mem, **made_of})
    if failed:
        reasons = " ".join(f"[{name}] {exc}" for name, exc in failed)
        raise UserError(f"{len(failed)} of {len(vset.variants)} variants gave no result "
                        f"({', '.join(name for name, _ in failed)}): recorded as failed in their eval.json; the other "
                        f"variants' records are ok. {reasons}")
    return 0
