"""The record of one graphfold run: statistics before and after, rewrites, declines, validation."""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field

from graphfold.engine import Decline, Rewrite
from graphfold.validate import ValidationResult

STAT_ROWS = (("nodes", "nodes"), ("convs", "convs"), ("depth", "depth"), ("params", "params"), ("macs", "MACs"))


@dataclass
class Report:
    before: dict
    after: dict
    rewrites: list[Rewrite] = field(default_factory=list)
    declines: list[Decline] = field(default_factory=list)
    validation: ValidationResult | None = None
    input_shapes: dict[str, list[int]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def counts(self) -> Counter:
        """Rewrites per pass name."""
        return Counter(r.pass_name for r in self.rewrites)

    def to_dict(self) -> dict:
        validation = self.validation.to_dict() if self.validation else {"passed": None, "skipped": True}
        return {
            "before": self.before,
            "after": self.after,
            "rewrites": [r.to_dict() for r in self.rewrites],
            "declines": [d.to_dict() for d in self.declines],
            "validation": validation,
            "input_shapes": self.input_shapes,
            "notes": self.notes,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=_jsonable)

    def table(self) -> str:
        """Before/after table of the model statistics."""
        lines = [f"{'':8}{'before':>14}{'after':>14}{'change':>10}"]
        for key, label in STAT_ROWS:
            old, new = self.before.get(key), self.after.get(key)
            lines.append(f"{label:8}{_human(old):>14}{_human(new):>14}{_change(old, new):>10}")
        return "\n".join(lines)

    def summary(self) -> str:
        """The CLI's readable summary: table, rewrites per pass, declines per reason, validation."""
        lines = [self.table(), ""]
        counts = self.counts()
        if counts:
            lines.append("rewrites:")
            lines.extend(f"  {name:28} {count}" for name, count in counts.items())
        else:
            lines.append("rewrites: none")
        reasons = Counter((d.pass_name, d.reason) for d in self.declines)
        if reasons:
            lines.append("declined:")
            for (name, reason), count in reasons.most_common(8):
                lines.append(f"  {name:28} {count}  ({reason})")
            if len(reasons) > 8:
                lines.append(f"  ... {len(reasons) - 8} more reasons; see graphfold inspect")
        if self.validation is not None:
            lines.append(self.validation.summary())
        lines.extend(self.notes)
        return "\n".join(lines)


def _human(value) -> str:
    if value is None:
        return "?"
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e4)):
        if abs(value) >= size:
            shown = value / (size if unit != "k" else 1e3)
            return f"{shown:.2f}{unit}"
    return str(value)


def _change(old, new) -> str:
    if not old or new is None or old == new:
        return ""
    return f"{(new - old) / old * 100:+.1f}%"


def _jsonable(value):
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)
