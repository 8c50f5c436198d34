"""`peftseg list`, and the text of `peftseg train --help`: what there is to choose.

Hydra's own `--help` lists every config group, the internal `schema/*` ones included, and
no knob; this one lists the real groups with each option's description (the registered
summary of a method or dataset, the first sentence of a model or train yaml's leading
comment), wrapped to the terminal, then every knob of the chosen options with its value and
the comment its dataclass field carries. Source of truth: the registry, conf/*.yaml and the
schema dataclasses.
"""

from __future__ import annotations

import dataclasses
import inspect
import re

from peftseg.config import CONF_DIR, GROUPS, default_choices, group_options

_SCHEMA_REF = re.compile(r"/schema/(\w+)/(\w+)@_here_")


def description(group: str, name: str) -> str:
    """A method's or dataset's registered one-line summary; for model presets and train
    recipes (which no registry lists one by one) the first sentence of their yaml's leading
    comment, a long one without its parenthesised asides (sources, file names, counts); a
    family's own name, without a yaml, is the family at its dataclass's defaults."""
    from peftseg.config import REGISTERED

    registry = REGISTERED.get(group)
    path = CONF_DIR / group / f"{name}.yaml"
    if registry is not None and name in registry.names() and not (group == "model" and path.is_file()):
        summary = registry.get(name).summary
        return f"{summary} (the family's default shape)" if group == "model" else summary
    comment = []
    for line in (path.read_text().splitlines() if path.is_file() else []):
        if line.startswith("# @package"):
            continue
        if not line.startswith("#"):
            break  # the leading comment ends at its first other line
        comment.append(line.lstrip("#").strip())
    return first_sentence(comment)


_ASIDE = re.compile(r"\s*\([^()]*\)")
LONG = 120  # a first sentence longer than this is shown without its parenthesised asides


def _sentence_end(text: str) -> int:
    """Where the first sentence of `text` ends: after the first full stop outside parentheses
    that a space or the end follows (not e.g., not the dots of res3..res5); else its length."""
    depth = 0
    for i, c in enumerate(text):
        depth += (c == "(") - (c == ")")
        if c == "." and depth <= 0 and text[i + 1:i + 2] in ("", " ") and not text[:i + 1].endswith(("e.g.", "i.e.")):
            return i + 1
    return len(text)


def first_sentence(lines: list[str]) -> str:
    """The first sentence of a comment written over several lines, whole: lines joined (a word
    hyphenated across a line break joined back); a long one without its parenthesised asides."""
    text = ""
    for line in lines:
        if not line:
            break  # a blank comment line ends the paragraph
        joined = text.endswith("-") and len(text) > 1 and text[-2].isalnum()
        text += line if joined or not text else " " + line
    text = text[:_sentence_end(text)]
    if len(text) > LONG:
        while _ASIDE.search(text):
            text = _ASIDE.sub("", text)
    return text


def list_text(width: int = 100) -> str:
    """What there is to choose, one option a paragraph: its name, then its description wrapped
    to `width` columns under itself."""
    import textwrap

    lines = []
    for group in GROUPS:
        names = group_options(group)
        name_width = max(map(len, names))
        indent = " " * (name_width + 4)
        lines.append(f"{group}s ({group}=<name>):")
        for n in names:
            text = description(group, n)
            lines += textwrap.wrap(text, width=max(width, len(indent) + 40), initial_indent=f"  {n:<{name_width}}  ",
                                   subsequent_indent=indent, break_on_hyphens=False) or [f"  {n}"]
        lines.append("")
    lines += textwrap.wrap("Each option's knobs: peftseg train --help [model=…] [method=…] [dataset=…] [train=…]",
                           width=width, subsequent_indent="  ")
    return "\n".join(lines)


def _field_comments(cls) -> dict[str, str]:
    """name -> the `# …` comment on the line that declares the dataclass field."""
    comments = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        for m in re.finditer(r"^\s+(\w+)\s*:[^#\n]*#\s*(.+)$", source, re.MULTILINE):
            comments[m.group(1)] = m.group(2).strip()
    return comments


def _yaml_comments(group: str, name: str) -> dict[str, str]:
    path = CONF_DIR / group / f"{name}.yaml"
    text = path.read_text() if path.is_file() else ""
    return {m.group(1): m.group(2).strip() for m in re.finditer(r"^(\w+):[^#\n]*#\s*(.+)$", text, re.MULTILINE)}


def preset(group: str, name: str):
    """(schema dataclass, preset values) of conf/<group>/<name>.yaml, without Hydra; a preset
    that extends another (swin_b: defaults [swin_t]) is merged over it."""
    from omegaconf import OmegaConf

    from peftseg.config import schemas

    path = CONF_DIR / group / f"{name}.yaml"
    if not path.is_file():  # a registered method or dataset without a yaml: its dataclass defaults
        cls = schemas()[group][name]
        return cls, OmegaConf.structured(cls)
    raw = OmegaConf.load(path)
    cls, base = None, None
    for entry in raw.pop("defaults", []):
        entry = str(entry)
        ref = _SCHEMA_REF.search(entry)
        if ref:
            cls = schemas()[group][ref.group(2)]
        elif entry != "_self_" and (CONF_DIR / group / f"{entry}.yaml").is_file():
            cls, base = preset(group, entry)
    values = base if base is not None else OmegaConf.structured(cls)
    return cls, OmegaConf.merge(values, raw)


def _value(v) -> str:
    from omegaconf import OmegaConf

    if OmegaConf.is_config(v):
        v = OmegaConf.to_container(v)
    if isinstance(v, list):
        return "[" + ",".join(map(str, v)) + "]"
    if isinstance(v, dict):
        return "{…}"
    return repr(v) if isinstance(v, str) else str(v)


def train_help(argv: list[str]) -> str:
    chosen = default_choices()
    for arg in argv:
        key, eq, value = arg.lstrip("+").partition("=")
        if eq and key in GROUPS and value in group_options(key):
            chosen[key] = value
    lines = [
        "usage: peftseg train [-m] [group=option ...] [group.knob=value ...] [hydra overrides]",
        "  -m runs a sweep: comma-separated values (method=full,lora); +tracking=mlflow logs to",
        "  MLflow (sqlite:///mlflow.db here); `peftseg search` optimises objective=… with Optuna.",
        "  Hydra's own help: peftseg train --hydra-help.",
        "",
    ]
    for group in GROUPS:
        names = group_options(group)
        lines.append(f"{group}: " + ", ".join(f"{n}*" if n == chosen[group] else n for n in names))
    lines += ["  (* = used now; pick another with group=<option>, its knobs are listed then)", ""]
    for group in GROUPS:
        cls, values = preset(group, chosen[group])
        # the preset's own line comment (image_size: 128  # 8x8 tokens) says more than the field's
        comments = {**_field_comments(cls), **_yaml_comments(group, chosen[group])}
        lines.append(f"{group}={chosen[group]}  {description(group, chosen[group])}")
        for f in dataclasses.fields(cls):
            if f.name == "name":
                continue
            comment = comments.get(f.name, "")
            lines.append(f"  {group}.{f.name}={_value(values[f.name])}" + (f"  # {comment}" if comment else ""))
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    from peftseg.cli.common import console, print_text

    # a terminal's own width; piped output (80 by default) gets the 100 columns peftseg report uses
    print_text(list_text(console.width if console.is_terminal else max(console.width, 100)))
    return 0
