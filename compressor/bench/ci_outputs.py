"""The gate's result in the formats CI systems read: JUnit XML, Markdown ($GITHUB_STEP_SUMMARY), JSON.

JUnit: one test case per budget (failure for a broken budget, error for a failed measurement, skipped
for a relative budget judged without a baseline). Bad input (exit 2) is one test case in error, so a CI
test view shows why the gate did not run instead of showing nothing.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from compressor.bench.gate import GateResult, Verdict, format_value, run_gate
from compressor.errors import CompressorError

EXIT_MEANING = {0: "pass", 1: "budget broken", 2: "bad input", 3: "measurement failed"}
_ICON = {"pass": "✅", "fail": "❌", "error": "⚠️", "skipped": "➖", "inconclusive": "❔"}


def _case_name(v: Verdict) -> str:
    return v.budget.label


def junit_xml(result: GateResult, suite: str = "compressor.gate") -> str:
    cases = result.verdicts
    failures = sum(v.status == "fail" for v in cases)
    errors = sum(v.status == "error" for v in cases) + (1 if result.error else 0)
    skipped = sum(v.status == "skipped" for v in cases)
    total = len(cases) + (1 if result.error else 0)
    counts = {"tests": str(total), "failures": str(failures), "errors": str(errors), "skipped": str(skipped)}
    root = ET.Element("testsuites", {"name": suite, **counts})
    ts = ET.SubElement(root, "testsuite", {"name": suite, **counts})
    if result.error:
        case = ET.SubElement(ts, "testcase", {"classname": suite, "name": "gate input"})
        kind = EXIT_MEANING.get(result.exit_code, "error")
        ET.SubElement(case, "error", {"message": result.error, "type": kind}).text = result.error
    for v in cases:
        classname = f"{suite}.{v.budget.target or 'model'}"
        case = ET.SubElement(ts, "testcase", {"classname": classname, "name": _case_name(v)})
        line = v.line()
        if v.status == "fail":
            ET.SubElement(case, "failure", {"message": line, "type": "budget broken"}).text = line
        elif v.status == "error":
            ET.SubElement(case, "error", {"message": line, "type": "measurement failed"}).text = line
        elif v.status == "skipped":
            ET.SubElement(case, "skipped", {"message": line})
        ET.SubElement(case, "system-out").text = line
    ET.indent(root)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_summary(result: GateResult, title: str = "Latency contract") -> str:
    """A short Markdown block: headline with the exit code, then one table row per budget."""
    code = result.exit_code
    head = "✅ PASS" if code == 0 else f"❌ {EXIT_MEANING.get(code, 'failed').upper()}"
    lines = [f"### {title}: {head} (exit {code})", ""]
    if result.error:
        return "\n".join([*lines, f"{EXIT_MEANING.get(code, 'error').capitalize()}: `{_cell(result.error)}`", ""])
    lines += [
        "| | budget | measured | interval | allowed | runs | note |",
        "|---|---|---|---|---|---|---|",
    ]
    for v in result.verdicts:
        b = v.budget
        measured = "not measured" if v.measured is None else format_value(v.measured, b)
        interval = "-" if v.interval is None else f"{format_value(v.interval[0], b, unit=False)} – {format_value(v.interval[1], b)}"
        if v.interval is not None:
            interval += f" ({v.confidence:.0%})"
        allowed = ("≤ " if b.upper else "≥ ") + format_value(b.limit, b)
        if b.relative:
            allowed += f" (+{b.max_regression})"
        runs = "-" if not v.runs else str(v.runs) + (f" vs {v.baseline_runs}" if v.baseline_runs else "")
        row = [_ICON.get(v.status, ""), f"`{b.label}`", measured, interval, allowed, runs, _cell(v.note)]
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    lines += [f"_{n}_" for n in result.notes]
    lines.append(
        "Latency is judged on a confidence interval over repeated runs: pass only when the whole interval is "
        "within the limit; see docs/gate.md."
    )
    return "\n".join(lines) + "\n"


def result_json(result: GateResult) -> dict[str, Any]:
    return {
        "schema": "compressor-gate/1",
        "exit_code": result.exit_code,
        "outcome": EXIT_MEANING.get(result.exit_code, "failed"),
        "error": result.error,
        "verdicts": [v.to_dict() for v in result.verdicts],
        "runs": result.runs,
        "notes": result.notes,
        "baseline_written": str(result.baseline_written) if result.baseline_written else None,
    }


def write_outputs(
    result: GateResult, *, junit: Path | None = None, markdown: Path | None = None, json_path: Path | None = None
) -> None:
    """Write the asked formats. Markdown is appended (so $GITHUB_STEP_SUMMARY keeps earlier steps)."""
    if junit is not None:
        _write(Path(junit), junit_xml(result))
    if markdown is not None:
        path = Path(markdown)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(markdown_summary(result))
    if json_path is not None:
        _write(Path(json_path), json.dumps(result_json(result), indent=2) + "\n")


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def gate_with_outputs(
    source: Path,
    budgets: Path,
    *,
    junit: Path | None = None,
    markdown: Path | None = None,
    json_path: Path | None = None,
    **options: Any,
) -> GateResult:
    """`run_gate`, then the asked CI files; on bad input or a failed measurement the files say so and the
    error is raised again (the CLI turns it into one line and its exit code)."""
    try:
        result = run_gate(source, budgets, **options)
    except CompressorError as exc:
        write_outputs(GateResult([], exc.exit_code, error=str(exc)), junit=junit, markdown=markdown, json_path=json_path)
        raise
    write_outputs(result, junit=junit, markdown=markdown, json_path=json_path)
    return result
