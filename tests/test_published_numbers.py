"""Every measured figure README.md and docs/performance.md publish is generated from a committed
results JSON (`bumblefast bench report`, benchmarks/benchreport.py), never typed by hand.

The rule, applied to both files outside generated blocks (`bench-report`, `bench-table`), inline
values (`<!-- bench-value: ... -->...<!-- /bench-value -->`), fenced code, inline code and HTML
comments: a number (or a range `lo-hi`, or a `~`/`≈` estimate) followed by a unit is a
measurement. Units: `x` and `%` written against the number (`1.57x`, `91%`); and, after an
optional space or line break, tok/s, tokens/s, pairs/s, requests/s (optionally `k`/`M` before
them), tokens per second, CPU-s, CPU-seconds, s, ms, min, minutes, seconds, hours, MB, MiB, GB,
GiB, GFLOP/s, TFLOP/s, `M tokens` and `M per` (a rate: `4.5M per rank`). A bare number in a
table cell takes the unit its column header gives in parentheses (`rehearsal wall (s)`).

Not measurements, so not flagged: a target or a setting, i.e. a number right after `>=`, `<=`,
`target`, `default`, `every`, `timeout`, `limit` or `budget` (or before `target`, `limit`,
`timeout`, `budget`; for a table cell, a header naming one); numbers without such a unit
(2 cores, the 0.5B preset, a 151,936-row vocabulary, seq 1024, versions, step counts); and the
few config facts in NOT_MEASURED, each with its reason. A measurement that no committed JSON
holds belongs in docs/history.md (a dated journal, not published numbers), a pointer left where
it was.

The check also regenerates both files: a number edited by hand inside an inline value or a
generated block differs from what its JSON gives and fails here too.
"""

from __future__ import annotations

import json
import re
import sys

import pytest
from helpers import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))  # benchreport imports benchlib by name
import benchreport as R  # noqa: E402

_NUM = r"[~≈]?\s?\d[\d,]*(?:\.\d+)?(?:\s?[-–]\s?\d[\d,]*(?:\.\d+)?)?"
_SPACED = (
    r"(?:[kM]\s?)?(?:tok/s|tokens/s|tokens/cpu-s|pairs/s|requests/s)|tokens per (?:CPU-)?second|CPU-s(?:econds)?"
    r"|s|ms|min|minutes?|seconds?|hours?|MB|MiB|GB|GiB|[GT]FLOP/s"
)
UNIT = rf"(?:x|%|M\s+tokens|M\s+per|\s?(?:{_SPACED}))(?![\w/])"
MEASUREMENT = re.compile(rf"(?<![\w.,/+-]){_NUM}{UNIT}")
_SETTING = r"(?:>=|<=|≥|≤|\btargets?|\bdefault|\bevery|\btimeout|\blimit|\bbudget)"
EXEMPT_BEFORE = re.compile(rf"{_SETTING}(?:\s+of)?[\s:=]*$")
EXEMPT_AFTER = re.compile(r"^\s*(?:target|limit|timeout|budget)\b")

# Config facts the rule would read as measurements: (file, the phrase; a space matches any line
# break or run of spaces), each with its reason.
NOT_MEASURED = {
    ("README.md", "more than 1% were dropped"): "the threshold of prep's warning",
    ("README.md", "30% of the 125"): "the share of questions the demo data holds out",
    ("README.md", "exceeds 100%"): "what a fraction above one means",
    ("README.md", "in 24 GB"): "this machine's memory",
    ("docs/performance.md", "the machine's 24 GB"): "this machine's memory",
    ("README.md", "989 TFLOP/s"): "the H200's dense bf16 peak (flops.PEAK_TFLOPS_BF16)",
    ("docs/performance.md", "L40S 362 TFLOP/s"): "the last of the peak table (flops.PEAK_TFLOPS_BF16)",
    ("docs/performance.md", "H100 80GB HBM3"): "a device's name",
}


def _blank(m: re.Match) -> str:
    return re.sub(r"[^\n]", " ", m.group(0))


def prose(text: str, rel: str = "") -> str:
    """`text` with everything the rule does not read blanked out (same length, same lines)."""
    text = R.BLOCK.sub(_blank, text)
    text = R.TABLE_BLOCK.sub(_blank, text)
    text = R.VALUE.sub(lambda m: "VALUE".ljust(len(m.group(0))), text)
    text = re.sub(r"^[ \t]*```.*?^[ \t]*```", _blank, text, flags=re.S | re.M)
    text = re.sub(r"`[^`\n]*`", _blank, text)
    text = re.sub(r"<!--.*?-->", _blank, text, flags=re.S)
    for file, phrase in NOT_MEASURED:
        if file == rel:
            text = re.sub(_phrase(phrase), _blank, text)
    return text


def _phrase(phrase: str) -> str:
    return r"\s+".join(map(re.escape, phrase.split()))


def _table_cells(text: str):
    """(offset, 'NUMBER UNIT', header) for bare numbers in table cells whose header has a unit."""
    header, offset = None, 0
    for line in text.splitlines(keepends=True):
        if not line.startswith("|"):
            header = None
        elif header is None:
            header = [c.strip() for c in line.strip().strip("|").split("|")]
        elif not re.fullmatch(r"\|[-:| ]+\|\s*", line):
            pos = offset + 1
            for i, cell in enumerate(line.rstrip("\n").strip("|").split("|")):
                unit = re.search(r"\(([^()]*)\)\s*$", header[i]) if i < len(header) else None
                bare = re.fullmatch(r"\s*\**([~≈]?\d[\d,]*(?:\.\d+)?)\**\s*", cell)
                if unit and bare:
                    yield pos, f"{bare.group(1)} {unit.group(1)}", header[i]
                pos += len(cell) + 1
        offset += len(line)


def hand_typed(text: str, rel: str = "") -> list[tuple[int, str]]:
    """(line, figure) for every measurement-like figure outside what is generated (the rule above)."""
    text = prose(text, rel)
    line = lambda at: text.count("\n", 0, at) + 1  # noqa: E731
    found = []
    for m in MEASUREMENT.finditer(text):
        before = " ".join(text[max(0, m.start() - 40) : m.start()].split())
        after = " ".join(text[m.end() : m.end() + 20].split())
        if not (EXEMPT_BEFORE.search(before) or EXEMPT_AFTER.match(" " + after)):
            found.append((line(m.start()), " ".join(m.group(0).split())))
    for at, figure, header in _table_cells(text):
        if MEASUREMENT.fullmatch(figure) and not re.search(_SETTING, header):
            found.append((line(at), figure))
    return sorted(found)


def test_published_documents_carry_no_hand_typed_measurement():
    """README.md and docs/performance.md: no measurement outside the generated parts, and every
    generated part (tables, inline values) is what its committed JSON gives."""
    problems = []
    for rel in R.PUBLISHED:
        text = (ROOT / rel).read_text(encoding="utf-8")
        problems += [f"{rel}:{n}: {figure}" for n, figure in hand_typed(text, rel)]
        regenerated = R.render(text, ROOT, rel)
        old, new = text.splitlines(), regenerated.splitlines()
        problems += [
            f"{rel}:{n}: differs from its JSON (run `bumblefast bench report`): {a.strip()[:160]}"
            for n, (a, b) in enumerate(zip(old, new), 1)
            if a != b
        ]
        if len(old) != len(new):
            problems.append(f"{rel}: regenerating changes its length (run `bumblefast bench report`)")
    assert not problems, "hand-typed or stale measurements (generate them, or move them to docs/history.md):\n" + (
        "\n".join(problems)
    )


def test_not_measured_phrases_are_still_there():
    """Each config fact NOT_MEASURED exempts is in its file (a stale exemption goes)."""
    for file, phrase in NOT_MEASURED:
        assert re.search(_phrase(phrase), (ROOT / file).read_text(encoding="utf-8")), f"{file}: {phrase!r} is gone"


@pytest.mark.parametrize(
    ("text", "figures"),
    [
        ("2 workers on 2 cores: 1.46x, ZeRO-2 91%.", ["1.46x", "91%"]),
        ("one rank reads ~4.5M per rank, 3.38M tokens in\n763.8 s (12.7 minutes)", ["~4.5M per", "3.38M tokens"]),
        ("a range 1.0-1.3 CPU-s, 48k tokens/s, 11,883 MB, 989\nTFLOP/s", ["1.0-1.3 CPU-s", "48k tokens/s"]),
        ("targets: >= 1.3x, target 3x, the 1.3x target, default 300 s, every 30 s, the 540 s limit", []),
        ("2 cores, the 0.5B preset, 151,936 rows, seq 1024, torch 2.14.1, 20 steps, 4 x 4, ZeRO-2", []),
        ("`7.5 s` in code, <!-- 2.0x in a comment -->\n```\nmake x  # 44 s\n```\n", []),
        ("| step | timeout (s) | rehearsal wall (s) |\n|---|---:|---:|\n| install | 100 | 64 |\n", ["64 s"]),
    ],
)
def test_the_rule_finds_measurements_and_leaves_settings(text, figures):
    found = [f for _, f in hand_typed(text)]
    want = figures + (["763.8 s", "12.7 minutes"] if "763.8" in text else [])
    want += ["11,883 MB", "989 TFLOP/s"] if "11,883" in text else []
    assert sorted(found) == sorted(want)


def _doc(value_text: str, source: str = "x.json") -> str:
    marker = f"<!-- bench-report: begin {source} (generated) -->\n<!-- bench-report: end -->"
    return f"{marker}\n\nZeRO-2 scales at {value_text} on 2 cores.\n"


def test_inline_value_renders_from_the_json_and_a_stale_one_is_reported(tmp_path):
    """A synthetic doc and JSON: the value renders in its format, check reports a hand edit or a
    changed JSON, and a path that does not resolve names the file and line."""
    results = tmp_path / "benchmarks" / "results"
    results.mkdir(parents=True)
    report = {
        "schema": "bumblefast.bench/1", "date": "d", "size": "cpu", "host": "h", "cpu_count": 2, "device": "cpu",
        "seconds": 60.0, "sections": {},
        "scaling": {"eff": {"zero2": 0.9136}, "runs": [{"name": "a b", "tps": 1293.9}, {"name": "c", "tps": 2.5e6}]},
    }  # fmt: skip
    (tmp_path / "x.json").write_text(json.dumps(report))
    (results / "v.json").write_text(json.dumps(report))
    value = "<!-- bench-value: v.json scaling.eff.zero2 % -->{}<!-- /bench-value -->"
    doc = _doc(value.format("0%"))
    out = R.render(doc, tmp_path, "doc.md")
    assert value.format("91%") in out and R.render(out, tmp_path, "doc.md") == out
    assert hand_typed(out) == [] and hand_typed("ZeRO-2 scales at 91% on 2 cores.") == [(1, "91%")]
    for path, spec, shown in [
        ("scaling.runs[name=a b].tps", ",.1", "1,293.9"),
        ("scaling.runs.1.tps", ".2M", "2.50M"),
        ("scaling.runs[1].tps", ",", "2,500,000"),
        ("scaling.eff.zero2", ".3x", "0.914x"),
    ]:
        assert f"-->{shown}<!--" in R.render(_doc(f"<!-- bench-value: v.json {path} {spec} -->?<!-- /bench-value -->"),
                                             tmp_path)  # fmt: skip
    # published files: check reports a hand edit of the value, then a changed JSON
    (tmp_path / "README.md").write_text(out.replace("91%", "93%"))
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "performance.md").write_text(out)
    assert R.publish(None, check=True, root=tmp_path) == ["README.md"]
    assert R.publish(None, root=tmp_path) == ["README.md"] and R.publish(None, check=True, root=tmp_path) == []
    report["scaling"]["eff"]["zero2"] = 0.5
    (results / "v.json").write_text(json.dumps(report))
    assert R.publish(None, check=True, root=tmp_path) == list(R.PUBLISHED)
    for bad, said in [
        ("<!-- bench-value: v.json scaling.eff.zero3 % -->?<!-- /bench-value -->", "doc.md:4: bench-value v.json"),
        ("<!-- bench-value: v.json scaling.runs[name=z].tps , -->?<!-- /bench-value -->", "matches 0 elements"),
        ("<!-- bench-value: w.json a % -->?<!-- /bench-value -->", "names benchmarks/results/w.json"),
        ("<!-- bench-value: v.json scaling.eff.zero2 %%% -->?<!-- /bench-value -->", "is not [,][.N]"),
        ("<!-- bench-value: v.json scaling.eff.zero2 % -->?", "not `<!-- bench-value: FILE PATH FORMAT"),
    ]:
        with pytest.raises(R.UserError, match=re.escape(said)):
            R.render(_doc(bad), tmp_path, "doc.md")


def test_run_time_sentence_says_the_sections_and_the_target():
    report = {"size": "cpu", "seconds": 920.0, "sections": {"prep": {"seconds": 500.4}, "train": {"seconds": 419.6}}}
    assert R.run_time_table(report, "r.json") == (
        "`r.json` took 920 s (15.3 min; target <= 15 min: MISSED): prep 500 s, train 420 s (the report's `seconds`)."
    )
