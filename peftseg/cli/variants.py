"""Labelled method variants for the scripts that compare methods side by side
(scripts/benchmark.py, scripts/transfer.py): `METHOD` or `LABEL:METHOD:KEY=VALUE[:KEY=VALUE…]`,
e.g. `lora+ckpt:lora:train.activation_checkpointing=true` or `lora-last4:lora:method.blocks=last:4`.
"""

from __future__ import annotations

from peftseg.errors import UserError


def split_entries(arg: str) -> list[str]:
    """Split a comma-separated list of entries on commas outside brackets (a value may be a list: method.blocks=[8,9])."""
    entries, depth, cur = [], 0, ""
    for ch in arg:
        if ch in "[(":
            depth += 1
        elif ch in "])":
            depth -= 1
        if ch == "," and depth == 0:
            entries.append(cur)
            cur = ""
        else:
            cur += ch
    entries.append(cur)
    return [e.strip() for e in entries if e.strip()]


def parse_entry(entry: str, option: str = "--methods") -> tuple[str, str, list[str]]:
    """`METHOD` or `LABEL:METHOD:KEY=VALUE[:KEY=VALUE…]` -> (label, method, overrides). A
    segment without "=" continues the previous value (method.blocks=last:4)."""
    parts = entry.split(":")
    if len(parts) == 1:
        return entry, entry, []
    if not parts[0] or not parts[1]:
        raise UserError(f"{option} entry {entry!r}: write METHOD or LABEL:METHOD:KEY=VALUE[:KEY=VALUE…].")
    label, method, overrides = parts[0], parts[1], []
    for seg in parts[2:]:
        if "=" in seg or not overrides:
            if "=" not in seg:
                raise UserError(f"{option} entry {entry!r}: {seg!r} is not KEY=VALUE; write "
                                "LABEL:METHOD:KEY=VALUE[:KEY=VALUE…].")
            overrides.append(seg)
        else:
            overrides[-1] += ":" + seg
    return label, method, overrides
