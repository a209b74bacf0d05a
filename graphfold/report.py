"""The record of one graphfold run: statistics before and after, rewrites, declines, validation."""
from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field

from graphfold.engine import Decline, Rewrite
from graphfold.validate import ValidationResult

MAX_LISTED = 12
NAMES_SHOWN = 3  # node names a grouped decline line shows before "..."
REFIT_PASSES = ("refit-linearize", "refit-erase")  # graphfold.refit.stage, not imported: it is heavy
_QUOTED = re.compile(r"'[^']*'")
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
    calibration: dict | None = None  # the data approximations were measured on (Calibration.info())
    approximate: dict | None = None  # tolerance, measured errors, rollbacks (graphfold.approx)
    accuracy: dict | None = None  # top-1 before/after on labelled calibration data
    refit: dict | None = None  # --refit: budgets, holdout metrics, every candidate (graphfold.refit)

    def counts(self) -> Counter:
        """Rewrites per pass name (constant folding counts the nodes it folded)."""
        counts: Counter = Counter()
        for r in self.rewrites:
            counts[r.pass_name] += r.count
        return counts

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
            "calibration": self.calibration,
            "approximate": self.approximate,
            "accuracy": self.accuracy,
            "refit": self.refit,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=_jsonable)

    def table(self) -> str:
        """Before/after table of the model statistics, and file sizes where both files were written."""
        lines = [f"{'':8}{'before':>14}{'after':>14}{'change':>10}"]
        for key, label in STAT_ROWS:
            old, new = self.before.get(key), self.after.get(key)
            lines.append(f"{label:8}{_human(old):>14}{_human(new):>14}{_change(old, new):>10}")
        old, new = self.before.get("file_bytes"), self.after.get("file_bytes")
        if old is not None and new is not None:
            lines.append(f"{'file':8}{_bytes(old):>14}{_bytes(new):>14}{_change(old, new):>10}")
        return "\n".join(lines)

    def decline_groups(self, passes: set[str] | None = None) -> list[tuple[str, str, list[str]]]:
        """Declines grouped by pass and reason, largest group first: (pass, reason, anchor node names).

        Reasons that differ only in the tensor they quote ("intermediate 'x' is used by 2 nodes")
        are one group, shown with ``'...'`` for the name; the JSON report keeps every reason whole.
        """
        groups: dict[tuple[str, str], list[str]] = {}
        reasons: dict[tuple[str, str], set[str]] = {}
        for d in self.declines:
            if passes is None or d.pass_name in passes:
                key = (d.pass_name, _QUOTED.sub("'...'", d.reason))
                groups.setdefault(key, []).append(d.nodes[0] if d.nodes else "?")
                reasons.setdefault(key, set()).add(d.reason)
        ordered = sorted(groups.items(), key=lambda item: -len(item[1]))
        return [(name, next(iter(reasons[name, template])) if len(reasons[name, template]) == 1 else template, nodes)
                for (name, template), nodes in ordered]

    def decline_lines(self, passes: set[str] | None = None, limit: int | None = None) -> list[str]:
        """One line per decline reason: pass, count, reason, the first few nodes it applies to."""
        groups = self.decline_groups(passes)
        lines = [f"  {name:28} {len(nodes):>4}  {reason}: {_names(nodes)}"
                 for name, reason, nodes in groups[:limit]]
        if limit is not None and len(groups) > limit:
            lines.append(f"  ... {len(groups) - limit} more reasons; see graphfold inspect")
        return lines

    def summary(self) -> str:
        """The CLI's readable summary: table, rewrites per pass, declines per reason, validation."""
        lines = [self.table(), ""]
        counts = self.counts()
        if counts:
            lines.append("rewrites:")
            lines.extend(f"  {name:28} {count}" for name, count in counts.items())
        else:
            lines.append("rewrites: none")
        approximate = set((self.approximate or {}).get("passes", ()))
        if self.refit is not None:
            approximate |= set(REFIT_PASSES)
        exact_passes = {d.pass_name for d in self.declines} - approximate
        declined = self.decline_lines(exact_passes, limit=8)
        if declined:
            lines.append("declined:")
            lines.extend(declined)
        if self.approximate is not None and self.approximate.get("requested"):
            lines.extend(self._approximate_lines(approximate))
        if self.refit is not None:
            lines.extend(self._refit_lines())
        elif self.accuracy is not None and self.accuracy.get("before") is not None:
            after = self.accuracy.get("after")
            lines.append(f"top-1 accuracy on {self.accuracy['samples']} labelled calibration samples: "
                         f"{self.accuracy['before']:.2%} -> {'?' if after is None else format(after, '.2%')}")
        if self.validation is not None:
            lines.append(self.validation.summary())
            lines.extend(filter(None, [self.validation.weak_warning()]))
        lines.extend(self.notes)
        return "\n".join(lines)

    def _refit_lines(self) -> list[str]:
        """One line per accepted refit rewrite, the reasons candidates were rejected, the measured outcome."""
        info = self.refit
        lines = [f"learned folding (--refit; fitted on {info['fit_samples']} calibration samples, decided on "
                 f"{info['holdout_samples']} held out):"]
        kept = [r for r in self.rewrites if r.pass_name in REFIT_PASSES]
        lines.extend(f"  {r.pass_name:16} {r.detail}" for r in kept)
        if not kept:
            lines.append("  none kept")
        rejected = Counter(c["reason"].split(" (")[0] if "cost model" in c["reason"] else c["reason"]
                           for c in info["candidates"] if c["status"] != "accepted")
        if rejected:
            lines.append(f"  rejected {sum(rejected.values())} candidates; most common reasons:")
            lines.extend(f"    {count} x {reason}" for reason, count in rejected.most_common(3))
        for part in ("holdout", "fit"):
            before, after = info["before"][part], info["after"][part]
            text = f"  {part:8} agreement with the original {_share(after['agreement'])}, logit error " \
                   f"{after['rel_error']:.3f}"
            if before.get("accuracy") is not None:
                text += f", top-1 accuracy {_share(before['accuracy'])} -> {_share(after['accuracy'])}"
            lines.append(text)
        lines.append(f"  estimated cost x{info['estimated_cost_ratio']:.2f} of the exact fold; "
                     f"{info['fit_seconds']:.1f} s fitting, {info['seconds']:.1f} s in all")
        lines.extend(f"  {note}" for note in info.get("notes", []))
        return lines

    def _approximate_lines(self, passes: set[str]) -> list[str]:
        """Per approximate rewrite the error it added, the total, and every approximate decline."""
        info, calibration = self.approximate, self.calibration or {}
        source = "seeded random inputs" if calibration.get("random") else calibration.get("source", "?")
        samples, selected = calibration.get("samples", "?"), info.get("selection_samples")
        measured = f"selected on the first {selected} of {samples}" if selected not in (None, samples) else \
            f"measured on {samples}"
        lines = [f"approximate folding (--tolerance {info.get('tolerance', 0):g}; {measured} samples of {source}):"]
        kept = [r for r in self.rewrites if not r.exact]
        for r in kept[:MAX_LISTED]:
            lines.append(f"  {r.pass_name:20} +{r.error_bound or 0:.2e}  {r.detail}")
        if len(kept) > MAX_LISTED:
            lines.append(f"  ... {len(kept) - MAX_LISTED} more approximate rewrites; see --report")
        total = info.get("measured_error")
        if total is not None:
            lines.append(f"  total relative output error {total:.3g} (tolerance {info.get('tolerance', 0):g}, "
                         f"exact folds alone {info.get('base_error', 0):.3g})")
        elif not kept:
            lines.append("  none kept")
        declined = [d for d in self.declines if d.pass_name in passes]
        if declined:
            lines.append(f"  declined ({len(declined)}):")
            lines.extend(f"    {d.pass_name:20} {', '.join(d.nodes)}: {d.reason}" for d in declined[:MAX_LISTED])
            if len(declined) > MAX_LISTED:
                lines.append(f"    ... {len(declined) - MAX_LISTED} more; see --report or graphfold inspect")
        return lines


def _share(value) -> str:
    return "?" if value is None else f"{value:.2%}"


def _human(value) -> str:
    if value is None:
        return "?"
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e4)):
        if abs(value) >= size:
            shown = value / (size if unit != "k" else 1e3)
            return f"{shown:.2f}{unit}"
    return str(value)


def _bytes(value: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if value >= size:
            return f"{value / size:.2f} {unit}"
    return f"{value} B"


def _change(old, new) -> str:
    if not old or new is None or old == new:
        return ""
    ratio = new / old
    # A percentage past +999% is unreadable and overflows the column: "x" and the factor instead.
    return f"x{_human(round(ratio)) if ratio >= 100 else format(ratio, '.1f')}" if ratio >= 10 else \
        f"{(ratio - 1) * 100:+.1f}%"


def _names(nodes: list[str]) -> str:
    shown = ", ".join(nodes[:NAMES_SHOWN])
    return shown + (", ..." if len(nodes) > NAMES_SHOWN else "")


def _jsonable(value):
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)
