"""MkDocs hooks (mkdocs.yml `hooks:`): what must not drift from the code is written from the
code when the site is built.

- `reference/config.md`: every config knob of every registered method, model family and
  dataset, of `train.*` and `tracking.*`: its type, default, what it accepts and its help
  comment. Types, defaults and comments come from the schema dataclasses' source; "accepts"
  is what the dataclass's own checks answer to an out-of-range value, so it is the message a
  user would get, never a copy of it.
- `reference/cli.md`: every subcommand's `--help` text, as `peftseg <command> --help` prints it.
- `<!-- gen: NAME ARGS -->` in any page is replaced by a generated table: `registry methods`,
  `registry families`, `registry datasets` (from peftseg.registry, also kept in README.md by
  `python docs/hooks.py --write-readme`), `benchmark FILE [time]`, `export_parity FILE`,
  `coco_eval FILE`, `attention_block FILE`, `memory_goals FILE` (also in README.md), `variants_memory FILE` and `params FILE` (each
  from docs/benchmarks/FILE, as the script that measured it wrote it).

Nothing here imports torch except the export-parity table (for today's tolerance).
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import os
import re
import subprocess
import sys
import textwrap
import typing
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
BENCHMARKS = DOCS / "benchmarks"
CONF = ROOT / "conf"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

GEN = re.compile(r"<!-- gen: ([\w-]+)((?: [^>]*?)?) -->")
README_BLOCK = re.compile(r"(<!-- gen: ((?:registry \w+|memory_goals \S+)) -->\n)(.*?)(<!-- /gen -->)", re.S)


# --- small formatting helpers -------------------------------------------------------------

def _cell(text) -> str:
    """One Markdown table cell: no newline, no unescaped pipe, no `*` read as emphasis outside code."""
    parts = str(text).replace("\n", " ").replace("|", "\\|").split("`")
    parts[::2] = [part.replace("*", "\\*") for part in parts[::2]]  # the text between code spans
    return "`".join(parts).strip()


def _table(header: list[str], rows: list[list], align: str = "") -> str:
    align = align or "l" * len(header)
    rule = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |", "| " + " | ".join(rule) + " |"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _bytes(n: float) -> str:
    gib, mib = 1024 ** 3, 1024 ** 2
    if n >= gib:
        return f"{n / gib:.2f} GiB"
    return f"{n / mib:.0f} MiB" if n >= 100 * mib else f"{n / mib:.1f} MiB"


def _count(n: float) -> str:
    for unit, size in (("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(int(n))


def _override_value(value) -> str:
    """A value as it is written on the command line (Hydra's override syntax)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return value if value else "''"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_override_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_override_value(v)}" for k, v in value.items()) + "}"
    return str(value)


# --- the registry: one line per method, family, dataset -----------------------------------

def _model_presets() -> dict[str, list[str]]:
    """family -> the conf/model presets that build it (a preset names its family's schema, or
    extends another preset)."""
    import yaml

    def family(name: str, seen=()) -> str | None:
        path = CONF / "model" / f"{name}.yaml"
        if not path.is_file() or name in seen:
            return None
        data = yaml.safe_load(path.read_text()) or {}
        if data.get("family"):
            return data["family"]
        for entry in data.get("defaults", []):
            entry = str(entry)
            ref = re.search(r"/schema/model/(\w+)@_here_", entry)
            if ref:
                return ref.group(1)
            if (CONF / "model" / f"{entry}.yaml").is_file():
                return family(entry, (*seen, name))
        return None

    out: dict[str, list[str]] = {}
    for path in sorted((CONF / "model").glob("*.yaml")):
        out.setdefault(family(path.stem) or "?", []).append(path.stem)
    return out


def _preset_values(name: str) -> dict:
    """conf/model/<name>.yaml's own values over those of the presets it extends."""
    import yaml

    data = yaml.safe_load((CONF / "model" / f"{name}.yaml").read_text()) or {}
    values: dict = {}
    for entry in data.pop("defaults", []):
        if (CONF / "model" / f"{entry}.yaml").is_file():
            values.update(_preset_values(str(entry)))
    return {**values, **data}


def _image_size(preset: str) -> int:
    """The image side a model preset runs at: its own value, else its family's default."""
    from peftseg.registry import FAMILIES

    family = next(f for f, names in _model_presets().items() if preset in names)
    return int(_preset_values(preset).get("image_size", FAMILIES.get(family).config().image_size))


def registry_table(kind: str) -> str:
    from peftseg.registry import DATASETS, FAMILIES, METHODS

    if kind == "methods":
        rows = [[f"`{m.name}`", m.summary, "yes" if m.mergeable else "—"] for m in METHODS]
        return _table(["method", "what trains", "merges into the base"], rows)
    if kind == "families":
        presets = _model_presets()
        rows = [[f"`{f.name}`", ", ".join(f"`{p}`" for p in presets.get(f.name, [])), f.summary] for f in FAMILIES]
        return _table(["family", "presets (`model=`)", "what it is"], rows)
    if kind == "datasets":
        rows = [[f"`{d.name}`", d.summary] for d in DATASETS]
        return _table(["dataset", "what it is"], rows)
    raise ValueError(f"registry table {kind!r}: methods, families or datasets")


# --- config knobs -------------------------------------------------------------------------

@dataclasses.dataclass
class Knob:
    key: str
    type: str
    default: str
    accepts: str
    help: str


_PROBE_INT, _PROBE_FLOAT, _PROBE_STR = 987654321, 1e30, "zz_probe"
_PROBE_TEXT = re.compile(r"\[?'?-?(?:987654321|1e\+30|zz_probe)'?\]?")


def _field_sources(cls) -> dict[str, tuple[str, str]]:
    """name -> (annotation as written, help comment) of every dataclass field of `cls` and its
    bases: the comment lines right above the field plus the comment at the end of its line."""
    out: dict[str, tuple[str, str]] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        lines = source.splitlines()
        for node in ast.parse(source).body[0].body:
            if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
                continue
            above = []
            i = node.lineno - 2
            while i >= 0 and lines[i].strip().startswith("#"):
                above.insert(0, lines[i].strip().lstrip("#").strip())
                i -= 1
            line = lines[node.lineno - 1]
            inline = line.split("#", 1)[1].strip() if "#" in line and "#" not in line.split("=", 1)[0] else ""
            help_text = " ".join(part for part in (" ".join(above), inline) if part)
            out[node.target.id] = (ast.unparse(node.annotation), help_text)
    return out


def _readable_type(annotation: str) -> str:
    m = re.fullmatch(r"Optional\[(.+)\]", annotation)
    if m:
        return f"{_readable_type(m.group(1))} or null"
    annotation = re.sub(r"\s*\|\s*None$", " or null", annotation)
    return {"Any": "any"}.get(annotation, annotation)


def _probe_values(hint) -> list:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union or type(hint).__name__ == "UnionType":
        hint = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is bool:
        return []
    if hint is int:
        return [-_PROBE_INT, _PROBE_INT]
    if hint is float:
        return [-_PROBE_FLOAT, _PROBE_FLOAT]
    if hint in (str, typing.Any):
        return [_PROBE_STR]
    if origin in (list, tuple):
        inner = args[0] if args else str
        low = {int: -_PROBE_INT, float: -_PROBE_FLOAT}.get(inner, _PROBE_STR)
        high = {int: _PROBE_INT, float: _PROBE_FLOAT}.get(inner, _PROBE_STR)
        return [[low], [high]] if low != high else [[low]]
    return []


def _accepts_from(message: str, key: str) -> str:
    """What a field accepts, in a few words, from the message its check gives a bad value."""
    m = re.search(r"must be an integer (from \S+ to \S+|at least \S+) \(got", message)
    if m:
        return "integer " + m.group(1).replace("at least ", "≥ ").replace("from ", "")
    m = re.search(r"must be a number (.+?) \(got", message)
    if m:
        return "number " + m.group(1).replace(">=", "≥").replace("<=", "≤")
    m = re.search(r"is not one of the choices: (.+?) \(e\.g\.", message)
    if m:
        return "one of " + ", ".join(f"`{c.strip()}`" for c in m.group(1).split(","))
    m = re.search(r"choose (?:one (?:or both )?of|from) \[([^\]]+)\]", message)
    if m:
        return "one of " + ", ".join(f"`{c.strip().strip(chr(39))}`" for c in m.group(1).split(","))
    # another check: the refusal itself, up to its first clause (the probe value shown as …)
    text = _PROBE_TEXT.sub("…", message)
    while re.search(r"\([^()]*\)", text):
        text = re.sub(r"\s*\([^()]*\)", "", text)
    clauses = re.split(r"; |: ", text)
    text = ": ".join(clauses[:2]) if clauses[0].endswith("out of range") else clauses[0]
    text = text.strip().rstrip(".")
    text = (text[:137] + "…") if len(text) > 140 else text
    return f"refused: {text}"


def _accepts(cls, name: str, hint, key: str) -> str:
    from peftseg.errors import UserError

    found: list[str] = []
    for value in _probe_values(hint):
        try:
            cls(**{name: value})
        except UserError as e:
            text = _accepts_from(str(e), key)
            if text and text not in found:
                found.append(text)
        except Exception:  # a check that is not a UserError says nothing a user reads
            pass
    return "; ".join(found)


def knobs(cls, prefix: str) -> list[Knob]:
    """Every field of the config dataclass `cls` as `prefix.<field>`; a field that is itself a
    config dataclass (adapter_lora's parts) is listed knob by knob under its own prefix."""
    from omegaconf import MISSING

    sources = _field_sources(cls)
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if f.name == "name":
            continue
        key = f"{prefix}.{f.name}"
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            out += knobs(hint, key)
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else MISSING)
        annotation, help_text = sources.get(f.name, (getattr(hint, "__name__", str(hint)), ""))
        required = default == MISSING
        out.append(Knob(key, _readable_type(annotation), "required" if required else f"`{_override_value(default)}`",
                        "" if required else _accepts(cls, f.name, hint, key), help_text))
    return out


def _knob_table(items: list[Knob]) -> str:
    return _table(["knob", "type", "default", "accepts", "what it does"],
                  [[f"`{k.key}`", k.type, k.default, k.accepts, k.help] for k in items])


def _preset_rows(group: str, presets: list[str]) -> list[list[str]]:
    """One row per conf/<group>/<preset>.yaml: its first comment line and what it sets."""
    import yaml

    rows = []
    for name in presets:
        text = (CONF / group / f"{name}.yaml").read_text()
        data = yaml.safe_load(text) or {}
        first = next((line.lstrip("# ").strip() for line in text.splitlines()
                      if line.startswith("#") and not line.startswith("# @package")), "")
        extends = [str(e) for e in data.pop("defaults", []) if (CONF / group / f"{e}.yaml").is_file()]
        data.pop("name", None)
        data.pop("family", None)
        sets = ", ".join(f"`{k}={_override_value(v)}`" for k, v in data.items())
        if extends:
            sets = f"extends `{'`, `'.join(extends)}`" + (f"; {sets}" if sets else "")
        rows.append([f"`{name}`", first, sets or "the family's defaults"])
    return rows


def _space(knob) -> str:
    """A search-space knob (peftseg.search_space) as `method.key` and its range."""
    if hasattr(knob, "low"):
        return f"`method.{knob.key}` {knob.low}–{knob.high}" + (" (log)" if getattr(knob, "log", False) else "")
    values = getattr(knob, "values", getattr(knob, "choices", ()))
    return f"`method.{knob.key}` in " + " / ".join(f"`{_override_value(v)}`" for v in values)


def config_reference() -> str:
    from peftseg.config import Config
    from peftseg.registry import DATASETS, FAMILIES, METHODS

    hints = typing.get_type_hints(Config)
    train_cls = hints["train"]
    tracking_cls = next(a for a in typing.get_args(hints["tracking"]) if a is not type(None))
    parts = [
        "---",
        "hide: [navigation]  # wide tables: the page's own table of contents stays",
        "---",
        "",
        "# Configuration reference",
        "",
        "Generated from the code when this site is built: the registered methods, model families and",
        "datasets, their config dataclasses (types, defaults, the comment beside each field) and the",
        "checks those dataclasses run. **accepts** is what the check answers to a value out of range",
        "(a bad value stops `peftseg train` within a second, exit status 2, with that message); empty",
        "where any value of the type is taken, or where the value is checked when the model or data is",
        "built. Set any knob on the command line: `peftseg train group=<option> group.knob=value`;",
        "`peftseg train --help [group=<option> …]` prints the same knobs with the values a run would use.",
        "",
        "## train",
        "",
        "Pick a schedule with `train=<preset>`; each sets only what differs from the defaults below:",
        "",
        _table(["preset", "what it is", "sets"],
               _preset_rows("train", sorted(p.stem for p in (CONF / "train").glob("*.yaml")))),
        "",
        _knob_table(knobs(train_cls, "train")),
        "",
        "## Methods",
        "",
    ]
    for spec in METHODS:
        parts += [f"### method={spec.name}", "", spec.summary + ".", ""]
        props = [p for p, on in (("merges into the base weights (`peftseg merge`)", spec.mergeable),
                                 ("adds modules of its own (accounted as `peft`)", spec.adds_parameters),
                                 ("reads `method.blocks`", spec.block_aware),
                                 ("trains every weight", spec.trains_everything)) if on]
        if props:
            parts += ["Properties: " + "; ".join(props) + ".", ""]
        if spec.search_space:
            parts += [f"`peftseg search` samples: {', '.join(map(_space, spec.search_space))}.", ""]
        parts += [_knob_table(knobs(spec.config, "method")), ""]
    parts += ["## Model families", "",
              "A family's knobs are the published model's shape; each preset (`model=<preset>`) sets only",
              "what differs.", ""]
    presets = _model_presets()
    for spec in FAMILIES:
        parts += [f"### {spec.name}", "", spec.summary + ".", ""]
        if presets.get(spec.name):
            parts += [_table(["preset", "what it is", "sets"], _preset_rows("model", presets[spec.name])), ""]
        parts += [_knob_table(knobs(spec.config, "model")), ""]
    parts += ["## Datasets", ""]
    for spec in DATASETS:
        parts += [f"### dataset={spec.name}", "", spec.summary + f" (evaluator: `{spec.evaluator_type}`).", "",
                  _knob_table(knobs(spec.config, "dataset")), ""]
    parts += ["## tracking", "", "Set by `+tracking=mlflow` (see [Tracking](../tracking.md)):", "",
              _knob_table(knobs(tracking_cls, "tracking")), "",
              "## objective", "",
              f"`objective` (default `{_override_value(Config.objective)}`): what `peftseg search` optimises; "
              "see [Search](../search.md).", ""]
    return "\n".join(parts)


# --- the command line ---------------------------------------------------------------------

_HELP_SCRIPT = """
import contextlib, io, json, sys
from peftseg.cli import COMMANDS, main
out = {}
for command in ["", *COMMANDS]:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        try:
            main(([command] if command else []) + ["--help"])
        except SystemExit:
            pass
    out[command] = buf.getvalue()
print(json.dumps(out))
"""


def cli_help() -> dict[str, str]:
    """command -> its `--help` text ("" -> `peftseg --help`), from a fresh interpreter."""
    env = {**os.environ, "COLUMNS": "100", "PYTHONPATH": os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}
    proc = subprocess.run([sys.executable, "-c", _HELP_SCRIPT], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"peftseg --help failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def cli_reference() -> str:
    texts = cli_help()
    parts = ["# Command-line reference", "",
             "Every subcommand's `--help`, as this version prints it (generated when the site is built).", ""]
    for command, text in texts.items():
        title = f"peftseg {command}".strip()
        parts += [f"## {title}", "", f"`{title} --help`:", "", "```text", text.rstrip(), "```", ""]
    return "\n".join(parts)


# --- benchmark tables from docs/benchmarks/*.json ------------------------------------------

def _load(name: str):
    return json.loads((BENCHMARKS / name).read_text())


def _describe(row: dict, attention: bool = True, targets: bool = False) -> str:
    parts = [row["method"]]
    if targets and row.get("targets"):  # only where the rows differ in them
        parts.append("on " + ", ".join(row["targets"]))
    if row.get("blocks") not in (None, "all"):
        parts.append(f"blocks={row['blocks']}")
    if row.get("base_dtype") not in (None, "fp32"):
        parts.append(f"base_dtype={row['base_dtype']}")
    if row.get("activation_checkpointing"):
        parts.append("activation checkpointing")
    if attention and row.get("attention"):  # only where the rows differ in it
        parts.append(f"{row['attention']} attention")
    if "peer" in str(row.get("loop", "")):
        parts.append("detectron2's own training loop")
    return ", ".join(parts)


def _time_cell(r: dict) -> str:
    """The median step time, with its quartiles where the file has them (benchmark.py --repeat)."""
    cell = f"{r['step_time_s']:.1f} s"
    if r.get("step_time_p25_s") is not None and r["step_time_p25_s"] != r["step_time_p75_s"]:
        cell += f" ({r['step_time_p25_s']:.1f}–{r['step_time_p75_s']:.1f})"
    return cell


def _ratio_cell(r: dict) -> str:
    """The time ratio, with the range of the per-round ratios where the file has them."""
    cell = f"{r['step_time_ratio']:.2f}"
    low, high = r.get("step_time_ratio_min"), r.get("step_time_ratio_max")
    if low is not None and low != high:
        cell += f" ({low:.2f}–{high:.2f})"
    return cell


def benchmark_table(name: str, time: bool = False) -> str:
    """A `scripts/benchmark.py --json` file: one row per variant, ratios against its baseline."""
    data = _load(name)
    base = data.get("baseline", "full")
    header = ["variant", "what runs", "trainable %"]
    align = "llr"
    if time:
        header += ["step time", f"× {base}"]
        align += "rr"
    header += ["peak memory", f"× {base}", "weights", "gradients", "optimizer state", "activations"]
    align += "rrrrrr"
    rows = []
    attentions = {r.get("attention") for r in data["methods"].values()}
    targets = {tuple(r.get("targets", ())) for r in data["methods"].values()}
    for label, r in data["methods"].items():
        row = [f"`{label}`", _describe(r, len(attentions) > 1, len(targets) > 1), f"{100 * r['ratio']:.1f}"]
        if time:
            row += [_time_cell(r), _ratio_cell(r)]
        row += [_bytes(r["peak_memory_bytes"]), f"{r['peak_memory_ratio']:.2f}", _bytes(r["weights_bytes"]),
                _bytes(r["gradients_bytes"]), _bytes(r["optimizer_state_bytes"]), _bytes(r["activations_bytes"])]
        rows.append(row)
    note = (f"`{data['model']}` at {data['image_size']} px, batch {data['batch']}, {data['device']}; "
            f"{data['steps_per_method']} timed step(s) per variant; memory: {data['memory']}. "
            f"Source: `docs/benchmarks/{name}`.")
    return _table(header, rows, align) + "\n\n" + note


def memory_goals_table(name: str) -> str:
    """A `scripts/benchmark.py --memory-only --goals …` file: activations, peak and ratio of each
    row, and whether it meets its goal (a goal not met says so)."""
    data = _load(name)
    base = data.get("baseline", "full")
    rows = []
    for label, r in data["methods"].items():
        what = [r["method"]]
        if r.get("checkpoint_parts"):
            what.append("checkpointing " + "+".join(r["checkpoint_parts"]))
        if r.get("precision") not in (None, "fp32"):
            what.append(r["precision"].replace("amp_", "AMP "))
        if r.get("attention") == "detectron2":
            what.append("detectron2 attention")
        goal = r.get("goal")
        met = "" if goal is None else ("met" if r["goal_met"] else "NOT met")
        rows.append([f"`{label}`", ", ".join(what), f"{r['activations_bytes'] / 2**20:,.0f}",
                     f"{r['peak_memory_bytes'] / 2**20:,.0f}", f"{r['peak_memory_ratio']:.3f}",
                     "" if goal is None else f"≤ {goal:.2f}", met])
    note = (f"`{data['model']}` at {data['image_size']} px, batch {data['batch']}, {data['device']}; "
            f"ratios against `{base}`; memory: {data['memory']}. Source: `docs/benchmarks/{name}`.")
    return _table(["variant", "what runs", "activations MiB", "peak MiB", f"× {base}", "goal", "met"], rows,
                  "llrrrll") + "\n\n" + note


def export_parity_table(name: str) -> str:
    from peftseg.checkpoint.export import tolerance_for

    rows = []
    for r in _load(name):
        label = [f"`{r['model']}`", r["method"], r["format"]]
        if r.get("refused"):
            rows.append(label + ["refused: " + re.split(r": the \w+ exporter", r["refused"])[0], "", "", "", "", "", "", ""])
            continue
        diff = r["max_abs_diff"]
        tol = tolerance_for(_image_size(r["model"]))
        pixels = r.get("mask_pixels")  # binary masks: a pixel flips or not, counted against its allowance
        within = (all(diff[k] <= tol[k] for k in ("scores", "boxes") + (() if pixels else ("masks",)))
                  and r["classes_equal"] and (not pixels or pixels["differing"] <= pixels["allowed"]))
        cells = [("0" if diff[k] == 0 else f"{diff[k]:.1e}") for k in ("scores", "boxes", "masks")]
        if pixels and pixels["differing"]:
            cells[2] = f"{pixels['differing']} of {pixels['compared']} px"
        rows.append(label + [f"{r['export_seconds']:.1f}", f"{r['file_bytes'] / 2 ** 20:.1f}",
                             str(r.get("compared_detections", sum(r.get("detections", [])))), *cells,
                             "yes" if r["classes_equal"] else "no", "yes" if within else "**no**"])
    header = ["model", "method", "format", "export s", "MiB", "compared", "scores", "boxes (px)", "masks",
              "classes equal", "within tolerance"]
    return (_table(header, rows, "lllrrrrrrll") + "\n\n"
            f"Max abs differences between the exported file and PyTorch; \"within tolerance\" is checked "
            f"against today's rule (`peftseg export --help`). Source: `docs/benchmarks/{name}`.")


def coco_eval_table(name: str) -> str:
    data = _load(name)
    rows = []
    for task, r in data["rows"].items():
        rows.append([task, f"{r['pycocotools_s']:.1f} s", f"{r['fast_s']:.1f} s", f"{r['speedup']:.1f}×",
                     f"{r['AP']:.3f}" if "AP" in r else "", f"{r['max_abs_diff_AP']:g}" if "max_abs_diff_AP" in r else ""])
    return (_table(["task", "pycocotools", "faster-coco-eval", "speed-up", "AP (both)", "max |ΔAP|"], rows, "lrrrrr")
            + f"\n\n{data['images']} images, {data['instances']:,} instances, {data['detections']:,} detections. "
              f"Source: `docs/benchmarks/{name}`.")


def attention_block_table(name: str) -> str:
    data = _load(name)
    rows = []
    base = data["rows"]["detectron2"]
    for impl, r in data["rows"].items():
        rows.append([impl, _bytes(r["peak_bytes"]), f"{r['peak_bytes'] / base['peak_bytes']:.2f}",
                     f"{r['time_s']:.1f} s", f"{r['time_s'] / base['time_s']:.2f}"])
    diff = data["max_rel_diff"]
    return (_table(["forward", "peak memory", "× detectron2", "time", "× detectron2"], rows, "lrrrr")
            + f"\n\nOne attention block, {data['tokens']} tokens, width {data['dim']}, {data['heads']} heads, "
              f"forward + backward on {data['device']}; outputs agree to {diff['output']:.1e} and gradients to "
              f"{diff['grads']:.1e} (relative). Source: `docs/benchmarks/{name}`.")


def variants_memory_table(name: str) -> str:
    data = _load(name)
    b = data["bytes"]
    rows = [["base (held once)", _bytes(b["base"]), ""]]
    for v in data["variants"]:
        rows.append([f"+ `{v}`", _bytes(b["variants"][v]), _bytes(b["separate_measured"][v])])
    rows.append(["**total**", f"**{_bytes(b['shared_total'])}**", f"**{_bytes(b['separate_measured_total'])}**"])
    overrides = " ".join(data.get("overrides", [])) or "the defaults"
    return (_table(["part", "one base + variants", "as separate models (loaded alone)"], rows, "lrr")
            + f"\n\n`{data['model']}`, tensor bytes; runs trained with {overrides}; loading the "
              f"{len(data['variants'])} variants took {data['load_variants_seconds']} s. "
              f"Source: `docs/benchmarks/{name}`.")


def params_table(name: str) -> str:
    """A `scripts/param_table.py --json` file."""
    data = _load(name)
    rows = [[r["label"], _count(r["trainable"]), _count(r["total"]), f"{100 * r['ratio']:.2f}",
             f"{100 * (r['peft'] + r['backbone_trainable']) / r['backbone']:.2f}"] for r in data["rows"]]
    return (_table([f"{data['model']} ({data['num_classes']} classes)", "trainable", "total", "trainable %",
                    "backbone %"], rows, "lrrrr")
            + f"\n\nSource: `docs/benchmarks/{name}` (`scripts/param_table.py --model {data['model']} --json`).")


def knobs_table(group: str, name: str = "") -> str:
    """The knob table of one option: `knobs method lora`, `knobs model vitdet`, `knobs train`."""
    from peftseg.config import Config
    from peftseg.registry import DATASETS, FAMILIES, METHODS

    if group == "train":
        return _knob_table(knobs(typing.get_type_hints(Config)["train"], "train"))
    registry = {"method": METHODS, "model": FAMILIES, "dataset": DATASETS}[group]
    return _knob_table(knobs(registry.get(name).config, group))


def family_maps_table() -> str:
    """What each family offers the methods, from its registered FamilyMap."""
    from peftseg.registry import FAMILIES

    rows = []
    for spec in FAMILIES:
        fm = spec.family_map
        # plain text, not code: long lists of names wrap between names instead of inside them
        rows.append([f"`{spec.name}`", ", ".join(fm.lora_targets),
                     ", ".join(fm.adapter_sites) or "—",
                     ", ".join(fm.task_layers), "yes" if fm.token_grid is not None else "—",
                     "yes" if fm.side_body else "—", "yes" if fm.checkpoint_blocks else "—",
                     ", ".join(p.rstrip(".") for p in fm.frozen) or "—"])
    return _table(["family", "target groups (`method.targets`)", "adapter sites", "task layers",
                   "Mona", "side path", "activation checkpointing", "never trained"], rows)


def weight_layouts_table() -> str:
    from peftseg.registry import FAMILIES

    rows = [[f"`{spec.name}`", layout.description, layout.hint] for spec in FAMILIES for layout in spec.weight_layouts]
    return _table(["family", "`model.weights` may also be", "which preset fits"], rows)


def yaml_knobs_table(path: str, prefix: str) -> str:
    """The knobs of a conf/ yaml with the comment on each line: `yaml_knobs conf/… hydra.launcher`."""
    rows = []
    for line in (ROOT / path).read_text().splitlines():
        m = re.match(r"^(\w+):\s*([^#]*?)\s*(?:#\s*(.*))?$", line)
        if m and m.group(1) != "defaults" and not m.group(1).startswith("_"):  # _target_: no knob
            value = m.group(2) or "—"
            rows.append([f"`{prefix}.{m.group(1)}`", f"`{value}`", m.group(3) or ""])
    return _table(["knob", "default", "what it does"], rows) + f"\n\nSource: `{path}`."


def generate(name: str, args: list[str]) -> str:
    if name == "yaml_knobs":
        return yaml_knobs_table(*args)
    if name == "registry":
        return registry_table(args[0])
    if name == "knobs":
        return knobs_table(*args)
    if name == "family_maps":
        return family_maps_table()
    if name == "weight_layouts":
        return weight_layouts_table()
    if name == "benchmark":
        return benchmark_table(args[0], time="time" in args[1:])
    tables = {"export_parity": export_parity_table, "coco_eval": coco_eval_table,
              "attention_block": attention_block_table, "variants_memory": variants_memory_table,
              "params": params_table, "memory_goals": memory_goals_table}
    if name not in tables:
        raise ValueError(f"<!-- gen: {name} --> is not a generated table; known: registry, benchmark, "
                         + ", ".join(tables))
    return tables[name](args[0])


def expand(markdown: str) -> str:
    return GEN.sub(lambda m: generate(m.group(1), m.group(2).split()), markdown)


# --- README.md: its registry tables are generated too -------------------------------------

def readme_with_tables(text: str) -> str:
    return README_BLOCK.sub(lambda m: m.group(1) + generate(m.group(2).split()[0], m.group(2).split()[1:]) + "\n"
                            + m.group(4), text)


# --- MkDocs events ------------------------------------------------------------------------

GENERATED_PAGES = {"reference/config.md": config_reference, "reference/cli.md": cli_reference}


def on_files(files, config):
    from mkdocs.structure.files import File

    for src_uri, make in GENERATED_PAGES.items():
        files.append(File.generated(config, src_uri, content=make()))
    return files


def on_page_markdown(markdown, page, config, files):
    from mkdocs.exceptions import PluginError

    try:
        return expand(markdown)
    except (OSError, ValueError, KeyError) as e:  # a missing or malformed source: name the page
        raise PluginError(f"docs/hooks.py could not generate a table in {page.file.src_uri}: {e!r}") from e


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="README.md's generated tables")
    ap.add_argument("--write-readme", action="store_true", help="rewrite the tables between the gen markers")
    args = ap.parse_args()
    readme = ROOT / "README.md"
    new = readme_with_tables(readme.read_text())
    if args.write_readme:
        readme.write_text(new)
    else:
        sys.stdout.write(new)
