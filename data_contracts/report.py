"""What validation found: `Violation`, `ValidationReport` and `ContractError`."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import polars as pl

Severity = Literal["error", "warning"]
N_EXAMPLES = 5


def example_rows(frame: pl.DataFrame) -> list[dict[str, Any]]:
    """Up to `N_EXAMPLES` rows as dicts, timestamps as ISO strings so that messages stay readable."""
    return [
        {k: (v.isoformat() if isinstance(v, dt.datetime | dt.date) else v) for k, v in row.items()}
        for row in frame.head(N_EXAMPLES).to_dicts()
    ]


@dataclass(frozen=True)
class Violation:
    """One broken rule in one file.

    `file` is relative to the dataset directory (e.g. `events/dt=2026-11-21/part-0.parquet`), `rows`
    the number of offending rows (0 for file-level problems), `examples` up to 5 offending rows,
    `message` the finding in words, and `fix` what to do about it.
    """

    rule: str
    file: str
    column: str | None
    rows: int
    examples: list[dict[str, Any]]
    severity: Severity
    fix: str
    message: str = ""

    def __str__(self) -> str:
        where = f"rule: {self.rule}" + (f", column {self.column}" if self.column else "")
        text = f"{self.file}: {self.message} ({where})"
        if self.examples:
            text += f"; examples: {self.examples}"
        return f"{text}; fix: {self.fix}"


@dataclass
class ValidationReport:
    """All violations of one `validate_dataset` call plus row counts.

    `counts` holds `rows` (total event rows validated), `rows_per_partition` ({"2022-04-25": n}),
    `positives` ({objective name: rows with its label true}), `users` and `items` (table rows).
    `quarantined` maps a quarantined rule to its row count; `quarantine_files` lists what was written.
    """

    dataset_dir: Path
    partitions: list[str] = field(default_factory=list)
    violations: list[Violation] = field(default_factory=list)
    counts: dict[str, Any] = field(default_factory=dict)
    quarantined: dict[str, int] = field(default_factory=dict)
    quarantine_files: list[Path] = field(default_factory=list)

    @property
    def errors(self) -> list[Violation]:
        return [v for v in self.violations if v.severity == "error"]

    @property
    def warnings(self) -> list[Violation]:
        return [v for v in self.violations if v.severity == "warning"]

    @property
    def ok(self) -> bool:
        return not self.errors

    def add(
        self,
        rule: str,
        file: str,
        column: str | None,
        message: str,
        fix: str,
        *,
        rows: int = 0,
        examples: list[dict[str, Any]] | None = None,
        severity: Severity = "error",
    ) -> None:
        """Record one violation."""
        self.violations.append(Violation(rule, file, column, rows, examples or [], severity, fix, message))

    def rules(self, severity: Severity | None = None) -> set[str]:
        """Names of the rules with at least one violation (of `severity` when given)."""
        return {v.rule for v in self.violations if severity is None or v.severity == severity}

    def raise_if_errors(self) -> ValidationReport:
        """Raise `ContractError` when any error was found; return self otherwise (for chaining)."""
        if not self.ok:
            raise ContractError(self)
        return self

    def summary_line(self) -> str:
        status = "OK" if self.ok else "FAILED"
        rows, n_err, n_warn = self.counts.get("rows", 0), len(self.errors), len(self.warnings)
        return (
            f"dataset {self.dataset_dir}: {status}, {n_err} errors, {n_warn} warnings, "
            f"{rows:,} event rows in {len(self.partitions)} partitions"
        )

    def to_markdown(self) -> str:
        """Human-readable report for the CLI and flow artifacts."""
        lines = [f"## Dataset validation: {self.summary_line()}", ""]
        per_part = self.counts.get("rows_per_partition", {})
        if per_part:
            lines += ["| partition | rows |", "|---|---:|"]
            lines += [f"| dt={dt} | {n:,} |" for dt, n in per_part.items()]
            lines.append("")
        positives = self.counts.get("positives", {})
        if positives:
            lines.append("Positives: " + ", ".join(f"{k} {v:,}" for k, v in positives.items()))
            lines.append("")
        features = self.counts.get("features", {})
        if features:
            lines.append("Features the model reads:")
            for filename, found in features.items():
                kinds = [f"{k} {', '.join(found[k])}" for k in ("categorical", "numeric") if found[k]]
                what = "; ".join(kinds) or "none (ids and behaviour histories only)"
                lines.append(f"- {filename} ({found['source']}): {what}")
            lines.append("")
        if self.quarantined:
            where = ", ".join(str(p) for p in self.quarantine_files) or "(no files)"
            lines.append("Quarantined rows: " + ", ".join(f"{k} {v:,}" for k, v in self.quarantined.items()))
            lines.append(f"Quarantine files: {where}")
            lines.append("")
        for title, items in (("Errors", self.errors), ("Warnings", self.warnings)):
            if items:
                lines.append(f"### {title} ({len(items)})")
                lines += [f"- {v}" for v in items]
                lines.append("")
        return "\n".join(lines).rstrip() + "\n"

    def __str__(self) -> str:
        return self.to_markdown()


class ContractError(ValueError):
    """A dataset broke the contract; `.report` has the details, the message lists every error."""

    def __init__(self, report: ValidationReport):
        self.report = report
        errors = "\n".join(f"- {v}" for v in report.errors)
        super().__init__(f"{report.summary_line()}\n{errors}")
