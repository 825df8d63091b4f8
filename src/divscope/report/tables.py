"""Tables for people: one number format, compact text in a terminal, HTML in a notebook.

A :class:`Table` is what the demos hand to IPython's ``display``: in a notebook it renders as
an HTML table (every column, full text), anywhere else ``display`` prints it, and it prints as
a compact text table that fits the terminal (or 100 columns when the output is piped): long
text columns are shortened first, then the rightmost optional columns are left out with a
line that names them. Numbers everywhere go through :func:`fmt` (4 significant digits).
Nothing here prints; the demos and the CLI do.
"""

from __future__ import annotations

import html
import math
import shutil
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from divscope.estimators.ranking import Ranking

SIG = 4  # significant digits of every number a table, a CI or a check shows
PIPED_WIDTH = 100  # text width when the output is not a terminal


def fmt(v: Any, sig: int = SIG) -> str:
    """One value as text: floats to ``sig`` significant digits (trailing zeros kept, so a
    column reads evenly; whole floats too large for that as integers), integers as they are,
    None as ``-``, bools as yes/no, pairs as ``[lo, hi]``."""
    if v is None:
        return "-"
    if isinstance(v, bool | np.bool_):
        return "yes" if v else "no"
    if isinstance(v, str):
        return v
    if isinstance(v, Sequence | np.ndarray):
        return "[" + ", ".join(fmt(x, sig) for x in v) + "]"
    try:
        x = float(v)
    except (TypeError, ValueError):
        return str(v)
    if math.isnan(x):
        return "nan"
    if x == 0:
        return "0"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    if x == int(x) and abs(x) < 1e15 and (_is_int(v) or abs(x) >= 10**sig):
        return str(int(x))
    return f"{x:#.{sig}g}"


def _is_int(v: Any) -> bool:
    return isinstance(v, int | np.integer)


def fmt_ci(ci: Sequence[float] | None, sig: int = SIG) -> str:
    """A confidence interval as ``[lo, hi]`` (``-`` when there is none)."""
    return "-" if ci is None or len(ci) != 2 else f"[{fmt(ci[0], sig)}, {fmt(ci[1], sig)}]"


def fmt_items(values: Mapping[str, Any], skip: Iterable[str] = ()) -> str:
    """``k=v, k=v`` with every value through :func:`fmt`."""
    return ", ".join(f"{k}={fmt(v)}" for k, v in values.items() if k not in set(skip))


def terminal_width() -> int:
    """The terminal's width, or :data:`PIPED_WIDTH` when the output is piped."""
    return shutil.get_terminal_size((PIPED_WIDTH, 24)).columns


def printable(s: str) -> str:
    """``s`` safe for a terminal: control characters and other non-printable characters shown
    as escapes (``\\x1b``), never sent raw."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in s)


def shorten(s: str, n: int) -> str:
    """``s`` on one line, printable, at most ``n`` characters (``…`` where cut)."""
    s = printable(" ".join(str(s).split()))
    return s if len(s) <= n else s[: max(n - 1, 0)] + "…"


def _is_number(v: Any) -> bool:
    if isinstance(v, bool | np.bool_ | str) or v is None:
        return False
    try:
        float(v)
    except (TypeError, ValueError):
        return False
    return True


class Table:
    """Rows of named cells, shown as HTML in a notebook and as compact text elsewhere.

    Args:
        rows: One mapping per row (column name -> value).
        columns: Column order (default: the first row's keys, then any new ones).
        text_columns: The columns the text view shows (default: all), most important first;
            the last ones are left out when the table does not fit.
        flex: Text columns shortened to make the text view fit.
        title: A line above the table.
        footer: Lines below the table (explanations, notes).
        min_flex: The narrowest a flex column gets before columns are left out.
    """

    def __init__(
        self,
        rows: Iterable[Mapping[str, Any]],
        columns: Sequence[str] | None = None,
        *,
        text_columns: Sequence[str] | None = None,
        flex: Sequence[str] = ("prompt", "text", "question", "system prompt"),
        title: str | None = None,
        footer: Sequence[str] = (),
        min_flex: int = 24,
    ) -> None:
        self.rows = [dict(r) for r in rows]
        if columns is None:
            columns = list(dict.fromkeys(k for r in self.rows for k in r))
        self.columns = list(columns)
        self.text_columns = list(text_columns) if text_columns is not None else self.columns
        self.flex = [c for c in flex if c in self.text_columns]
        self.title = title
        self.footer = list(footer)
        self.min_flex = min_flex

    def __len__(self) -> int:
        return len(self.rows)

    def cells(self, column: str, html_view: bool = False) -> list[str]:
        """The column's cells as text (numbers through :func:`fmt`)."""
        out = []
        for r in self.rows:
            s = fmt(r.get(column))
            out.append(s if html_view else printable(" ".join(s.split())))
        return out

    def numeric(self, column: str) -> bool:
        vals = [r.get(column) for r in self.rows if r.get(column) is not None]
        return bool(vals) and all(_is_number(v) for v in vals)

    def text(self, width: int | None = None) -> str:
        """The compact text view, at most ``width`` characters wide where it can be."""
        width = width or terminal_width()
        cols = list(self.text_columns)
        cells = {c: self.cells(c) for c in cols}
        widths = {c: max([len(c)] + [len(s) for s in cells[c]]) for c in cols}
        left_out: list[str] = []

        def total() -> int:
            return sum(widths[c] for c in cols) + 2 * (len(cols) - 1)

        for c in sorted(self.flex, key=lambda c: -widths[c]):  # shorten text columns first
            excess = total() - width
            if excess > 0:
                widths[c] = max(len(c), self.min_flex, widths[c] - excess)
        while total() > width and len(cols) > 2 and cols[-1] not in self.flex:
            left_out.insert(0, cols.pop())
        while total() > width and len(cols) > 2 and len(self.flex) < len(cols):
            drop = next(c for c in reversed(cols) if c not in self.flex)
            cols.remove(drop)
            left_out.insert(0, drop)
        right = {c: self.numeric(c) for c in cols}

        def line(values: dict[str, str]) -> str:
            parts = []
            for c in cols:
                v = shorten(values[c], widths[c]) if c in self.flex else values[c]
                parts.append(v.rjust(widths[c]) if right[c] else v.ljust(widths[c]))
            return "  ".join(parts).rstrip()

        out = [self.title] if self.title else []
        out.append(line({c: c for c in cols}))
        out.append("-" * min(width, len(out[-1])))
        out += [line({c: cells[c][i] for c in cols}) for i in range(len(self.rows))]
        if left_out:
            out.append(f"(not shown here: {', '.join(left_out)}; see the HTML report)")
        return "\n".join(out + self.footer)

    def html(self) -> str:
        """The HTML view: every column, full text, numbers right-aligned."""
        out = [f"<p><b>{html.escape(self.title)}</b></p>"] if self.title else []
        out.append('<table class="dataframe"><thead><tr>')
        out += [f"<th>{html.escape(c)}</th>" for c in self.columns]
        out.append("</tr></thead><tbody>")
        cells = {c: self.cells(c, html_view=True) for c in self.columns}
        right = {c: self.numeric(c) for c in self.columns}
        for i in range(len(self.rows)):
            out.append("<tr>")
            for c in self.columns:
                style = ' style="text-align: right"' if right[c] else ' style="text-align: left"'
                out.append(f"<td{style}>{html.escape(cells[c][i])}</td>")
            out.append("</tr>")
        out.append("</tbody></table>")
        out += [f"<p>{html.escape(f)}</p>" for f in self.footer]
        return "".join(out)

    def __str__(self) -> str:
        return self.text()

    __repr__ = __str__

    def _repr_html_(self) -> str:
        return self.html()


def frame_table(df: Any, *, index: str | None = None, **kwargs: Any) -> Table:
    """A :class:`Table` of a pandas DataFrame; ``index`` names a column for its index."""
    records = df.to_dict("records")
    if index is not None:
        records = [{index: i, **r} for i, r in zip(df.index, records, strict=True)]
    cols = ([index] if index is not None else []) + [str(c) for c in df.columns]
    return Table(records, cols, **kwargs)


# ---------------------------------------------------------------------------- the demos' tables


def ranking_table(r: Ranking, top: int | None = None) -> Table:
    """The ranked prompts: rank, index, score and CI, prompt (text view); every
    non-directional metric, category, responses and exclusions as well (HTML view).

    ``top`` keeps the N most different scored prompts; unscored prompts follow with their
    reason.
    """
    m = r.metric
    ci_name = f"{round(r.ci_level * 100)}% CI"
    ordered = sorted(r.prompts, key=lambda p: (p.rank is None, p.rank or 0, p.index))
    scored = [p for p in ordered if p.rank is not None]
    shown = (scored[:top] if top is not None else scored) + [p for p in ordered if p.rank is None]
    others = [x for x in r.available if not x.endswith(("_ab", "_ba")) and x != m]
    cats = any(p.category for p in r.prompts)
    js_name = "JS [lower, upper]"  # certified on the sampled positions (topk_js_lb, _ub)
    js = "topk_js_ub" in r.available
    rows = []
    for p in shown:
        row: dict[str, Any] = {"rank": p.rank, "idx": p.index, m: p.scores.get(m)}
        row[ci_name] = fmt_ci(p.ci.get(m))
        if js:
            lb, ub = p.scores.get("topk_js_lb"), p.scores.get("topk_js_ub")
            row[js_name] = fmt_ci(None if lb is None or ub is None else [lb, ub])
        row["n a/b"] = f"{p.n_responses[0]}/{p.n_responses[1]}"
        row["excl a/b"] = f"{p.excluded_responses[0]}/{p.excluded_responses[1]}"
        row["prompt"] = p.prompt if p.rank is not None else f"({p.reason}) {p.prompt}"
        if cats:
            row["category"] = p.category
        row |= {x: p.scores.get(x) for x in others}
        rows.append(row)
    text = ["rank", "idx", m, ci_name, *[js_name] * js, "n a/b"]
    if any(sum(p.excluded_responses) for p in r.prompts):
        text.append("excl a/b")
    columns = ["rank", "idx", m, ci_name, *[js_name] * js, "n a/b", "excl a/b"]
    columns += ["category"] * cats + ["prompt"] + others
    return Table(rows, columns, text_columns=text + ["prompt"], flex=("prompt",))


def checks_table(checks: Mapping[str, Any], descriptions: Mapping[str, str]) -> Table:
    """Consistency checks: ok, what each tests, what was measured."""
    rows = []
    for k, v in checks.items():
        if not isinstance(v, Mapping):
            continue
        row = {"status": "ok" if v.get("ok") else "FAIL", "check": k}
        row |= {"tests": descriptions.get(k, ""), "measured": fmt_items(v, skip=("ok",)) or "-"}
        row["measured (what it tests)"] = f"{row['measured']} ({row['tests']})"
        rows.append(row)
    return Table(
        rows,
        ["status", "check", "measured", "tests"],
        text_columns=["status", "check", "measured (what it tests)"],
        flex=("measured (what it tests)",),
    )


# ---------------------------------------------------------------------------- statistics

VERDICT_NOTES = {
    "discrimination": (
        "  what it tests: whether JS separates these personas at all; its spread over pairs "
        "must be large in absolute terms (std) and relative terms (max/min)."
    ),
    "discrimination_pass": "  PASS: JS spreads enough across pairs to rank them.",
    "discrimination_fail": (
        "  FAIL: the pairs' JS values are too alike to rank pairs by JS (more questions or "
        "longer answers may help; the thresholds are the pre-registered ones)."
    ),
    "redundancy": (
        "  rho: Spearman correlation of JS with that cosine over the pairs (JS is a distance and "
        "cosine a similarity, so agreement shows as negative rho). Mantel p: how often permuting "
        "the personas gives |rho| at least as large (pairs share personas, so an ordinary p "
        "would be too small). redundant: |rho| > {threshold}, JS orders the pairs almost as "
        "that cosine does and adds little beyond it."
    ),
    "leakage": (
        "  negative rho: personas closer in JS leak more. The comparison asks, on the same "
        "directed pairs, whether -JS or cosine predicts leakage better (Meng-Rosenthal-Rubin z "
        "for two correlations sharing leakage); p < 0.05: unlikely if both predicted equally."
    ),
}


def analysis_summary(result: Mapping[str, Any]) -> list[str | Table]:
    """The statistics of ``divscope analyze`` (or the persona demo) for people: each verdict
    with one line on what it tests and what to conclude, then the small-sample warnings.
    Strings print as they are; tables go through ``display``/``print``."""
    d = result["discrimination"]
    th = d["thresholds"]
    verdict = "PASS" if d["pass"] else "FAIL"
    out: list[str | Table] = [
        f"discrimination gate (std > {th['std']} nats and max/min > {th['ratio']}): {verdict}. "
        f"JS over {d['n_pairs']} pairs: mean {fmt(d['mean'])}, std {fmt(d['std'])} "
        f"({'pass' if d['pass_std'] else 'fail'}), max/min {fmt(d['ratio'])} "
        f"({'pass' if d['pass_ratio'] else 'fail'})",
        VERDICT_NOTES["discrimination"],
        VERDICT_NOTES["discrimination_pass" if d["pass"] else "discrimination_fail"],
    ]
    red = result.get("redundancy") or {}
    if red:
        first = next(iter(red.values()))
        out.append(
            Table(
                (
                    {"JS vs": k, "spearman_rho": v["spearman_rho"], "pearson_r": v["pearson_r"],
                     "mantel_p": v["mantel_p"], "redundant": v["redundant"]}
                    for k, v in red.items()
                ),
                title=f"redundancy with cosine ({first['n_pairs']} pairs, "
                f"{first['mantel_permutations']} Mantel permutations):",
            )
        )  # fmt: skip
        out.append(VERDICT_NOTES["redundancy"].format(threshold=first.get("threshold", 0.8)))
    lk = result.get("leakage")
    if lk:
        out.append(
            f"leakage ({lk['n_pairs']} directed pairs, {lk['n_sources']} sources): JS rho "
            f"{fmt(lk['js_spearman_rho'])} (p {fmt(lk['js_spearman_p'])})"
        )
        for k, v in lk["cosine"].items():
            cmp = v.get("comparison") or {}
            line = f"  cosine {k}: rho {fmt(v['spearman_rho'])}"
            if cmp:
                line += (
                    f"; rho(-JS) - rho(cos) = {fmt(cmp['difference'])}, MRR z "
                    f"{fmt(cmp['statistic'])}, p {fmt(cmp['p'])}"
                )
            elif v.get("comparison_note"):
                line += f"; {v['comparison_note']}"
            out.append(line)
        out.append(VERDICT_NOTES["leakage"])
    out += [f"warning: {w}" for w in result.get("warnings", [])]
    return out
