"""Fixtures of the reliability suite: the session's tiny MoE checkpoint and the summary table.

The checkpoint is made locally (no model hub), the same way as tests/serving/conftest.py does.
Each test adds one row of figures to `REPORT`; the table is printed once at the end of the run
(pytest's terminal summary, so it shows with or without `-s`) and written to a file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from moe_serving.tinymodel import make_model

SUMMARY_FILE = Path("/tmp/moe-reliability-summary.txt")


@dataclass
class Row:
    """Figures of one reliability test (counts of requests by how they ended)."""

    test: str
    sent: int = 0
    ok: int = 0
    rejected: int = 0  # refused cleanly: 4xx / 503 + Retry-After / INVALID_ARGUMENT ...
    failed: int = 0  # an error the client was not promised (5xx, INTERNAL, broken stream)
    lost: int = 0  # no answer within the client's time bound (a hang)
    notes: list[str] = field(default_factory=list)


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)

    def row(self, test: str) -> Row:
        row = Row(test)
        self.rows.append(row)
        return row

    def table(self) -> str:
        head = ("test", "sent", "ok", "rejected-cleanly", "failed", "lost/hung", "notes")
        cells = [
            (r.test, str(r.sent), str(r.ok), str(r.rejected), str(r.failed), str(r.lost))
            for r in self.rows
        ]
        widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(head[:-1])]
        lines = [" | ".join(h.ljust(w) for h, w in zip(head, widths, strict=False)) + " | notes"]
        lines.append("-+-".join("-" * w for w in widths) + "-+------")
        for row, cell in zip(self.rows, cells, strict=True):
            text = " | ".join(c.ljust(w) for c, w in zip(cell, widths, strict=True))
            lines.append(f"{text} | {'; '.join(row.notes)}")
        return "\n".join(lines)


REPORT = Report()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if REPORT.rows:
        table = REPORT.table()
        terminalreporter.section("reliability summary")
        terminalreporter.write_line(table)
        SUMMARY_FILE.write_text(table + "\n")
        terminalreporter.write_line(f"(also written to {SUMMARY_FILE})")


@pytest.fixture(scope="session")
def tiny_gemma4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default tiny Gemma-4-style MoE checkpoint (made once per session)."""
    return make_model("gemma4", tmp_path_factory.mktemp("tiny-models") / "gemma4", seed=0)


@pytest.fixture(scope="module")
def report() -> Report:
    return REPORT
