"""``divscope report RUN_DIR``: one self-contained HTML page (and/or Markdown) for a run.

Works on a ranking run (a directory with ``ranking.json`` as written by ``kl_demo.py`` or
``divscope rank --json``; the sample files it names are read for the token view) and on a
persona run (``divergence_matrices.json``, ``generations.json``, ``cosine.json``, optionally
``explain.json``). The HTML inlines its CSS, JS and figures (PNG as data URIs) and makes no
network request: sortable tables, heatmaps, the top items' text with each token coloured by
its divergence and, on hover, both sides' top-k at that position.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from divscope.bounded import json_int
from divscope.report.tables import fmt, shorten
from divscope.runmeta import file_sha256

CSS = """
body{font-family:system-ui,sans-serif;margin:24px;max-width:1200px;color:#222}
h1{font-size:1.5em}h2{margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:8px 0;font-size:13px}
th,td{border:1px solid #ccc;padding:3px 7px;text-align:left}
th{background:#f2f2f2;cursor:pointer;user-select:none}
th.sorted-asc::after{content:" \\25B2"}th.sorted-desc::after{content:" \\25BC"}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.tokens{font-family:monospace;font-size:13px;line-height:1.9;white-space:pre-wrap;
border:1px solid #ddd;padding:8px;background:#fafafa}
.tok{border-radius:2px;cursor:default}
#tip{position:fixed;display:none;background:#fff;border:1px solid #888;padding:6px;
font:12px monospace;box-shadow:2px 2px 6px #999;z-index:10;pointer-events:none}
#tip table{font-size:11px}.muted{color:#777}img{max-width:100%}
.note{background:#fff8e1;border-left:4px solid #f0c040;padding:6px 10px;margin:6px 0}
.ok{color:#1a7f37}.fail{color:#c62828;font-weight:bold}
"""

JS = """
function sortTable(th){const table=th.closest('table');const idx=[...th.parentNode.children]
.indexOf(th);const body=table.tBodies[0];const rows=[...body.rows];const asc=!th.classList
.contains('sorted-asc');rows.sort((a,b)=>{const x=a.cells[idx].dataset.v??a.cells[idx]
.textContent,y=b.cells[idx].dataset.v??b.cells[idx].textContent;const fx=parseFloat(x),
fy=parseFloat(y);let c=(!isNaN(fx)&&!isNaN(fy))?fx-fy:x.localeCompare(y);return asc?c:-c});
rows.forEach(r=>body.appendChild(r));table.querySelectorAll('th').forEach(h=>h.classList
.remove('sorted-asc','sorted-desc'));th.classList.add(asc?'sorted-asc':'sorted-desc')}
document.querySelectorAll('table.sortable th').forEach(th=>th.addEventListener('click',
()=>sortTable(th)));
const tip=document.getElementById('tip');
document.querySelectorAll('.tok').forEach(t=>{t.addEventListener('mouseenter',e=>{
const d=JSON.parse(t.dataset.info);let h='<b>'+esc(d.token)+'</b> &nbsp; '+esc(d.value)+
'<table><tr><th>'+esc(d.a_name)+'</th><th>p</th><th>'+esc(d.b_name)+'</th><th>p</th></tr>';
const n=Math.max(d.a.length,d.b.length);for(let i=0;i<n;i++){const x=d.a[i]||['',''],
y=d.b[i]||['',''];h+='<tr><td>'+esc(x[0])+'</td><td>'+x[1]+'</td><td>'+esc(y[0])+'</td><td>'
+y[1]+'</td></tr>'}tip.innerHTML=h+'</table>'+(d.note?'<div>'+esc(d.note)+'</div>':'');
tip.style.display='block';tip.style.left=(e.clientX+12)+'px';tip.style.top=(e.clientY+12)
+'px'});t.addEventListener('mouseleave',()=>{tip.style.display='none'})});
function esc(s){return String(s).replace(/[&<>"]/g,c=>({'&':'&amp;','<':'&lt;','>':'&gt;',
'"':'&quot;'}[c]))}
"""


class ReportError(ValueError):
    """The directory is not a run divscope can report on; names it and the fix."""


# ---------------------------------------------------------------------------- building blocks


def _category_rows(summary: list[dict[str, Any]]) -> list[list[Any]]:
    """Table rows of a category summary (``divscope.stats.categories.category_means`` rows)."""
    return [[c["category"], c["n"], c["mean"], c["ci_low"], c["ci_high"]] for c in summary]


def _fmt(v: Any) -> str:
    """A cell's text: numbers in the one format of :func:`divscope.report.tables.fmt`."""
    if v is None:
        return "–"
    return fmt(v) if isinstance(v, float) else str(v)


def table(
    headers: list[str], rows: list[list[Any]], *, sortable: bool = True, table_id: str | None = None
) -> str:
    """An HTML table; numeric cells carry their value for sorting."""
    tid = f' id="{table_id}"' if table_id else ""
    cls = ' class="sortable"' if sortable else ""
    out = [f"<table{tid}{cls}><thead><tr>"]
    out += [f"<th>{html.escape(h)}</th>" for h in headers]
    out.append("</tr></thead><tbody>")
    for row in rows:
        out.append("<tr>")
        for v in row:
            if isinstance(v, int | float) and not isinstance(v, bool):
                out.append(f'<td class="num" data-v="{v!r}">{_fmt(v)}</td>')
            elif v is None:
                out.append('<td class="num" data-v="NaN">–</td>')
            else:
                out.append(f"<td>{html.escape(str(v))}</td>")
        out.append("</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def md_escape(text: str) -> str:
    """Markdown text that shows ``<``, ``>`` and ``&`` literally (Markdown renders raw HTML)."""
    return html.escape(str(text), quote=False)


def md_table(headers: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        return md_escape(_fmt(v)).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _png(fig: Any) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _color(value: float, scale: float) -> str:
    if not np.isfinite(value):
        return "rgba(200,200,200,0.5)"
    x = max(-1.0, min(1.0, value / scale)) if scale > 0 else 0.0
    return f"rgba(220,40,40,{x:.3f})" if x >= 0 else f"rgba(40,90,220,{-x:.3f})"


def token_html(tokens: list[str], values: list[float], infos: list[dict[str, Any]]) -> str:
    """Tokens as spans coloured by value (red positive, blue negative); hover shows ``info``."""
    finite = [abs(v) for v in values if v is not None and np.isfinite(v)]
    scale = float(np.quantile(finite, 0.98)) if finite else 1.0
    spans = []
    for tok, v, info in zip(tokens, values, infos, strict=True):
        v = float("nan") if v is None else float(v)
        data = html.escape(json.dumps(info), quote=True)
        spans.append(
            f'<span class="tok" style="background:{_color(v, scale)}" '
            f'data-info="{data}">{html.escape(tok)}</span>'
        )
    return '<div class="tokens">' + "".join(spans) + "</div>"


class Page:
    """Collects sections; renders self-contained HTML and/or Markdown."""

    def __init__(self, title: str) -> None:
        self.title = title
        self.html: list[str] = []
        self.md: list[str] = [f"# {md_escape(title)}"]
        self.figures: list[tuple[str, bytes]] = []

    def heading(self, text: str) -> None:
        self.html.append(f"<h2>{html.escape(text)}</h2>")
        self.md.append(f"\n## {md_escape(text)}")

    def para(self, text: str, cls: str | None = None) -> None:
        c = f' class="{cls}"' if cls else ""
        self.html.append(f"<p{c}>{html.escape(text)}</p>")
        self.md.append(f"\n{md_escape(text)}")

    def table(self, headers: list[str], rows: list[list[Any]], table_id: str | None = None) -> None:
        self.html.append(table(headers, rows, table_id=table_id))
        self.md.append("\n" + md_table(headers, rows))

    def figure(self, name: str, fig: Any, caption: str = "") -> None:
        data = _png(fig)
        self.figures.append((name, data))
        b64 = base64.b64encode(data).decode()
        self.html.append(
            f'<figure><img alt="{html.escape(name)}" '
            f'src="data:image/png;base64,{b64}"><figcaption class="muted">'
            f"{html.escape(caption)}</figcaption></figure>"
        )
        self.md.append(f"\n![{md_escape(caption or name)}](FIGDIR/{name}.png)")

    def raw_html(self, fragment: str, md_text: str | None = None) -> None:
        self.html.append(fragment)
        if md_text:  # the caller escapes what came from files (md_escape)
            self.md.append("\n" + md_text)

    def render_html(self) -> str:
        body = "\n".join(self.html)
        return (
            f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f"<title>{html.escape(self.title)}</title><style>{CSS}</style></head><body>"
            f'<h1>{html.escape(self.title)}</h1>{body}<div id="tip"></div>'
            f"<script>{JS}</script></body></html>"
        )


# ---------------------------------------------------------------------------- ranking runs


def _ranking_report(run: Path, page: Page) -> None:
    doc = _checked_ranking(run / "ranking.json")
    r, meta = _read_ranking(run, doc)
    _ranking_summary(r, meta, page)
    _ranking_tables(r, page)
    from divscope.report.diff_sections import diff_sections

    diff_sections(run, page)  # a model diff's summary, what changed, layers (when present)
    _ranking_token_views(run, r, page, doc.get("file_sha256"))


def _read_ranking(run: Path, doc: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """The run's checked ranking.json ``doc`` as a :class:`Ranking`, and its metadata (or {})."""
    from divscope.estimators.ranking import PromptScore, Ranking

    meta = (
        json.loads((run / "metadata.json").read_text()) if (run / "metadata.json").exists() else {}
    )
    prompts = [
        PromptScore(**{k: p.get(k) for k in PromptScore.__dataclass_fields__})
        for p in doc["prompts"]
    ]
    r = Ranking(
        doc["metric"],
        doc["models"],
        doc.get("files", []),
        doc.get("units", {}),
        doc.get("available_metrics", []),
        doc.get("notes", []),
        prompts,
        doc.get("bootstrap", {}).get("n", 0),
        doc.get("bootstrap", {}).get("ci_level", 0.95),
        str(doc.get("ci_method", "percentile bootstrap over responses")),  # older files: that
    )
    return r, meta


def _checked_ranking(path: Path) -> dict[str, Any]:
    """ranking.json, checked field by field (a crafted or damaged file gets one clear error)."""

    def bad(what: str) -> ReportError:
        return ReportError(
            f"{path}: {what}. Fix: regenerate it with divscope rank --json, diff or kl_demo"
        )

    try:
        doc = json.loads(path.read_text(encoding="utf-8"), parse_int=json_int)
    except (OSError, ValueError, RecursionError) as e:  # ValueError: not UTF-8 or JSON
        raise bad(f"unreadable ({type(e).__name__})") from None
    num = (int, float)
    if not isinstance(doc, dict) or not isinstance(doc.get("metric"), str):
        raise bad("no metric")
    models = doc.get("models")
    if not (
        isinstance(models, list) and len(models) == 2 and all(isinstance(m, str) for m in models)
    ):
        raise bad("models must be two names")
    if not isinstance(doc.get("prompts"), list):
        raise bad("no prompts list")
    digests = doc.get("file_sha256")
    if digests is not None and not (
        isinstance(digests, list) and all(isinstance(d, str) for d in digests)
    ):
        raise bad("file_sha256 must be a list of hex digests")
    for i, p in enumerate(doc["prompts"]):
        ok = (
            isinstance(p, dict)
            and type(p.get("index")) is int
            and (p.get("rank") is None or type(p.get("rank")) is int)
            and isinstance(p.get("prompt"), str)
            and isinstance(p.get("scores"), dict)
            and all(v is None or type(v) in num for v in p["scores"].values())
            and isinstance(p.get("ci"), dict)
            and all(
                v is None
                or (isinstance(v, list) and len(v) == 2 and all(type(x) in num for x in v))
                for v in p["ci"].values()
            )
            and all(
                isinstance(p.get(k), list) and len(p[k]) == 2 and all(type(x) is int for x in p[k])
                for k in ("n_responses", "excluded_responses")
            )
        )
        if not ok:
            raise bad(f"prompt {i} is malformed (index/rank must be integers, scores numbers)")
    return doc


def _ranking_summary(r: Any, meta: dict[str, Any], page: Page) -> None:
    m, prompts = r.metric, r.prompts
    page.heading("Run")
    page.table(
        ["field", "value"],
        [
            ["models", " vs ".join(r.models)],
            ["metric", m],
            ["units", r.units.get(m, "")],
            ["files", ", ".join(r.files)],
            ["created", meta.get("created")],
            ["divscope", meta.get("divscope_version")],
            ["git commit", meta.get("git_commit")],
        ],
    )
    page.heading("Checks and notes")
    for note in r.notes:
        page.para(note, "note")
    excluded = sum(sum(p.excluded_responses) for p in prompts)
    unscored = [p for p in prompts if p.rank is None]
    page.para(
        f"{len(prompts)} prompts, {len(unscored)} unscored, {excluded} responses "
        "excluded for missing logprobs (never scored as 0)."
    )


def _ranking_tables(r: Any, page: Page) -> None:
    from divscope.estimators.ranking import category_summary
    from divscope.report import plots

    m, prompts = r.metric, r.prompts
    page.heading("Prompts ranked")
    cats = any(p.category for p in prompts)
    headers = (
        ["rank", "index"]
        + (["category"] if cats else [])
        + [m, "ci low", "ci high", "n_a", "n_b", "prompt"]
    )
    rows = []
    for p in sorted(prompts, key=lambda p: (p.rank is None, p.rank or 0)):
        ci = p.ci.get(m) or [None, None]
        rows.append(
            [p.rank, p.index]
            + ([p.category] if cats else [])
            + [p.scores.get(m), ci[0], ci[1], p.n_responses[0], p.n_responses[1], p.prompt[:120]]
        )
    page.table(headers, rows, table_id="prompts")
    if cats:
        page.heading("By category")
        page.table(
            ["category", "n", "mean", "ci low", "ci high"],
            _category_rows(category_summary(r)),
            table_id="categories",
        )
        page.figure("category_means", plots.category_means(r), f"mean {m} per category")
    page.heading("Figures")
    page.figure("heatmap", plots.score_heatmap(r, top=15), "top prompts x metrics")
    page.figure("ranked_scores", plots.ranked_scores(r, top=15), "scores with CIs")
    page.figure("distribution", plots.score_distribution(r), f"{m} over prompts")


def sample_file(run: Path, name: str) -> Path:
    """Where a sample file that ranking.json names is: beside ranking.json first (a run folder
    copied or moved carries its files), then the path as recorded (absolute, or relative to
    the run or the working directory), then relative to the run's grandparent (``kl_demo``'s
    ``eval_results/<run>/`` naming files from the project root)."""
    for p in (run / Path(name).name, run / name, Path(name), run.parent.parent / name):
        if p.is_file():
            return p
    return Path(name)


def check_sample_files(run: Path, files: list[Path], digests: list[str] | None) -> None:
    """Refuse sample files whose SHA-256 is not the one ranking.json records for them.

    Raises:
        ReportError: A file is not the one the ranking was computed from.
    """
    for f, want in zip(files, digests or [], strict=False):
        if f.is_file() and file_sha256(f) != want:
            raise ReportError(
                f"{f} is not the sample file {run / 'ranking.json'} was computed from (its "
                "SHA-256 differs from the recorded file_sha256). Fix: keep a run's files "
                "together, or rerun the diff"
            )


def check_sample_prompts(run: Path, r: Any, *sets: Any) -> None:
    """Refuse sample files whose prompts are not the ranking's (another run's files).

    Raises:
        ReportError: A file's model is not the ranking's, or a ranked prompt is missing from
            it or has another text.
    """
    for s, model in zip(sets, r.models, strict=True):
        if s.model != model:
            raise ReportError(
                f"{s.path} holds samples of {s.model!r}, and {run / 'ranking.json'} ranks "
                f"{model!r}: these samples belong to another run. Fix: keep a run's files "
                "together, or rerun the ranking on these files"
            )
        by_index = {rec.index: rec.prompt for rec in s.records}
        for p in r.prompts:
            if by_index.get(p.index) != p.prompt:
                raise ReportError(
                    f"{s.path}: prompt {p.index} is not the one {run / 'ranking.json'} ranks "
                    f"({shorten(p.prompt, 40)!r}): these samples belong to another run. Fix: "
                    "keep a run's files together, or rerun the ranking on these files"
                )


def _ranking_token_views(run: Path, r: Any, page: Page, digests: list[str] | None = None) -> None:
    """The top 3 prompts' first responses, each token coloured by its contribution."""
    from divscope.estimators.contributions import token_contributions
    from divscope.samples.read import load_pair

    page.heading("Top prompts, token by token")
    files = [sample_file(run, f) for f in r.files]
    check_sample_files(run, files, digests)
    try:
        a, b = load_pair(*files)
    except Exception as e:  # noqa: BLE001 - the report still has everything else
        page.para(f"sample files not readable ({e}); token view skipped", "note")
        return
    check_sample_prompts(run, r, a, b)
    for p in sorted([p for p in r.prompts if p.rank is not None], key=lambda p: p.rank)[:3]:
        ra, rb = a.record(p.index), b.record(p.index)
        tokens, values, kind = token_contributions(ra, rb, 0, model_b=b.model)
        resp = ra.usable[0]
        infos = _token_infos(resp, tokens, values, kind, a, b)
        page.raw_html(
            f"<h3>#{html.escape(str(p.rank))}: prompt {html.escape(str(p.index))}</h3>"
            f"<p>{html.escape(p.prompt)}</p>"
            f'<p class="muted">{html.escape(a.model)}\'s first response; colour: '
            f"per-token {kind} contribution (red: {html.escape(a.model)} more likely)"
            f"</p>" + token_html(tokens, [float(v) for v in values], infos),
            f"### #{p.rank}: prompt {p.index}\n\n{md_escape(p.prompt)}\n\n"
            f"> {md_escape(' '.join(resp.text[:500].split()))}",
        )


def _top5(strings: dict[int, str], ids: np.ndarray, logprobs: np.ndarray) -> list[list[Any]]:
    return [
        [strings[j], round(float(np.exp(v)), 4)]
        for j, v in zip(ids, logprobs, strict=True)
        if j >= 0
    ][:5]


def _token_infos(
    resp: Any, tokens: list[str], values: Any, kind: str, a: Any, b: Any
) -> list[dict[str, Any]]:
    """Hover data per token: both sides' top 5 at that position (where B's are aligned)."""
    strings = a.vocab.strings
    cross = resp.cross.get(b.model)
    infos = []
    for t, tok in enumerate(tokens):
        top_a = _top5(strings, resp.scores.top_ids[t], resp.scores.top_logprobs[t])
        top_b: list[list[Any]] = []
        note = ""
        if cross is not None and cross.aligned and cross.scores.top_ids.shape[1]:
            top_b = _top5(strings, cross.scores.top_ids[t], cross.scores.top_logprobs[t])
        elif cross is not None:
            note = (
                f"{b.model} tokenises differently: its log-probability is spread over "
                "the text (per-byte view)"
            )
        else:
            note = f"no cross-score under {b.model}: legacy heuristic"
        infos.append(
            {
                "token": tok,
                "value": f"{kind} term {values[t]:.4f}",
                "a_name": a.model,
                "a": top_a,
                "b_name": b.model,
                "b": top_b,
                "note": note,
            }
        )
    return infos


# ---------------------------------------------------------------------------- persona runs


def _persona_report(run: Path, page: Page) -> None:
    mats = json.loads((run / "divergence_matrices.json").read_text())
    gens_path = run / "generations.json"
    gens = json.loads(gens_path.read_text()) if gens_path.exists() else {}
    cosine = (
        json.loads((run / "cosine.json").read_text()) if (run / "cosine.json").exists() else None
    )
    if isinstance(mats, dict) and "persona_names" in mats and "js_matrix" in mats:
        mats, cosine = _reference_matrices(run, mats), _reference_cosine(run, mats["persona_names"])
    if not (isinstance(mats, dict) and {"personas", "js", "kl_sym", "kl_asym"} <= set(mats)):
        raise ReportError(
            f"{run / 'divergence_matrices.json'}: neither divscope's persona matrices nor the "
            "published reference's {persona_names, js_matrix, kl_matrix}. Fix: pass the "
            "directory of a persona run (persona_js_demo.py or divscope personas)"
        )
    _persona_summary(mats, page)
    rows = _persona_pairs(mats, cosine, page)
    _persona_categories(run, gens, page)
    _persona_heatmaps(mats, cosine, page)
    if cosine:
        _cosine_by_layer(cosine, mats["personas"], rows, page)
    explain = run / "explain.json"
    if explain.exists():
        _persona_explanations(json.loads(explain.read_text()), page)
    else:
        page.para(
            "no explain.json in this run (divscope personas --explain-pairs N writes it)", "muted"
        )


def _reference_matrices(run: Path, d: dict[str, Any]) -> dict[str, Any]:
    """The published reference's matrices in divscope's shape. Its ``kl_asym_matrix`` holds
    absolute values, so the signed asymmetry is recomputed from ``kl_matrix``
    (``kl[a][b] = KL(P_a||P_b)`` on a's answers), as :func:`divscope.stats.analysis.load_matrices`
    reads it."""
    if "kl_matrix" not in d:
        raise ReportError(
            f"{run / 'divergence_matrices.json'}: the reference format without kl_matrix. "
            "Fix: use divscope analyze for its JS statistics"
        )
    kl = np.asarray(d["kl_matrix"], dtype=float)
    meta = d.get("metadata", {})
    return {
        "personas": list(d["persona_names"]),
        "js": d["js_matrix"],
        "kl_sym": (0.5 * (kl + kl.T)).tolist(),
        "kl_asym": (kl - kl.T).tolist(),
        "checks": {},
        "metadata": {
            "model": meta.get("model"),
            "created": meta.get("timestamp"),
            "git_commit": meta.get("git_commit"),
            "parameters": {"n_questions": meta.get("n_questions")},
            "warnings": [
                "a run in the published reference's format: its consistency checks were not "
                "recorded; KL asymmetry is recomputed signed from kl_matrix"
            ],
        },
    }


def _reference_cosine(run: Path, names: list[str]) -> dict[str, Any] | None:
    """Centred cosine from the reference's ``{cosine_matrix_l<k>, persona_names}`` files that
    cover every persona, in ``cosine.json``'s shape (None when there is none)."""
    import re

    out: dict[str, Any] = {"layers": [], "centred": {}}
    for f in sorted(run.glob("cosine_*.json")):
        d = json.loads(f.read_text())
        if not (isinstance(d, dict) and set(names) <= set(d.get("persona_names", []))):
            continue
        idx = [d["persona_names"].index(n) for n in names]
        for k, m in d.items():
            if re.fullmatch(r"cosine_matrix_l\d+", k):
                layer = int(k.rsplit("_l", 1)[1])
                out["layers"].append(layer)
                out["centred"][str(layer)] = np.asarray(m)[np.ix_(idx, idx)].tolist()
    out["layers"].sort()
    return out if out["layers"] else None


def _persona_summary(mats: dict[str, Any], page: Page) -> None:
    meta = mats.get("metadata", {})
    page.heading("Run")
    params = meta.get("parameters", {})
    page.table(
        ["field", "value"],
        [
            ["model", meta.get("model")],
            ["personas", len(mats["personas"])],
            ["questions", params.get("n_questions")],
            ["max new tokens", params.get("max_new_tokens")],
            ["dtype", meta.get("dtype")],
            ["positions scored", meta.get("tokens_scored")],
            ["created", meta.get("created")],
            ["divscope", meta.get("divscope_version")],
            ["git commit", meta.get("git_commit")],
        ],
    )
    for w in meta.get("warnings", []):
        page.para(w, "note")
    page.heading("Checks")
    checks = mats.get("checks", {})
    page.table(
        ["check", "ok", "measured"],
        [
            [
                k,
                "yes" if v.get("ok") else "NO",
                ", ".join(
                    f"{a}={_fmt(b) if isinstance(b, float) else b}"
                    for a, b in v.items()
                    if a != "ok"
                ),
            ]
            for k, v in checks.items()
            if isinstance(v, dict)
        ],
        table_id="checks",
    )


def _persona_pairs(
    mats: dict[str, Any], cosine: dict[str, Any] | None, page: Page
) -> list[list[Any]]:
    """The table of persona pairs, farthest by JS first; returns its rows."""
    names = mats["personas"]
    n = len(names)
    js, kl_sym, kl_asym = (np.asarray(mats[k]) for k in ("js", "kl_sym", "kl_asym"))
    layers = [str(x) for x in cosine["layers"]] if cosine else []
    page.heading("Persona pairs")
    rows = []
    for i in range(n):
        for j in range(i + 1, n):
            rows.append(
                [names[i], names[j], float(js[i, j]), float(kl_sym[i, j]), float(kl_asym[i, j])]
                + [float(cosine["centred"][layer][i][j]) for layer in layers]
            )
    rows.sort(key=lambda r: -r[2])
    page.table(
        ["a", "b", "js", "kl_sym", "kl_asym (a's answers)"] + [f"cos centred L{x}" for x in layers],
        rows,
        table_id="pairs",
    )
    return rows


def _persona_categories(run: Path, gens: dict[str, Any], page: Page) -> None:
    """Mean JS per question category (over questions, off-diagonal pairs) with CIs."""
    from divscope.runmeta import read_csv
    from divscope.stats.categories import category_means

    qcat = {qid: (q.get("category") or "(none)") for qid, q in gens.get("questions", {}).items()}
    per_prompt = run / "per_prompt.csv"
    if not (per_prompt.exists() and qcat):
        return
    by_cat: dict[str, list[float]] = {}
    by_q: dict[str, list[float]] = {}
    for row in read_csv(per_prompt):
        if row["generator"] != row["other"]:
            by_q.setdefault(row["question_id"], []).append(float(row["js"]))
    for qid, vals in by_q.items():
        by_cat.setdefault(qcat.get(qid, "(none)"), []).append(float(np.mean(vals)))
    page.heading("By question category")
    page.table(
        ["category", "questions", "mean JS", "ci low", "ci high"],
        _category_rows(category_means(by_cat)),
        table_id="qcategories",
    )


def _persona_heatmaps(mats: dict[str, Any], cosine: dict[str, Any] | None, page: Page) -> None:
    from divscope.report import persona_plots as pp

    names = mats["personas"]
    js, kl_asym = np.asarray(mats["js"]), np.asarray(mats["kl_asym"])
    page.heading("Heatmaps")
    order = pp.cluster_order(js)
    page.figure(
        "js",
        pp.matrix_heatmap(js, names, order=order, label="JS [nats]", title="JS (clustered)"),
        "JS between personas",
    )
    page.figure(
        "kl_asym",
        pp.matrix_heatmap(
            kl_asym, names, order=order, diverging=True, label="nats", title="KL asymmetry"
        ),
        "KL(P_row||P_col) - KL(P_col||P_row) on the row persona's answers",
    )
    if cosine:
        last = [str(x) for x in cosine["layers"]][-1]
        page.figure(
            "cosine",
            pp.matrix_heatmap(
                np.asarray(cosine["centred"][last]),
                names,
                order=order,
                diverging=True,
                label="cosine",
                title=f"centred cosine, layer {last}",
            ),
            "centred cosine of last-prompt-position hidden states",
        )


def _cosine_by_layer(
    cosine: dict[str, Any], names: list[str], rows: list[list[Any]], page: Page
) -> None:
    """Centred cosine per layer for the 5 farthest and 3 closest pairs by JS."""
    from divscope.personas.explain import pair_cosine_by_layer
    from divscope.report.persona_plots import cosine_by_layer

    page.heading("Cosine by layer")
    curves = pair_cosine_by_layer(cosine, names)
    top = [f"{r[0]}|{r[1]}" for r in rows[:5]] + [f"{r[0]}|{r[1]}" for r in rows[-3:]]
    fig = cosine_by_layer(curves, [int(x) for x in cosine["layers"]], top)
    page.figure("cosine_by_layer", fig, "per persona pair")


def _persona_explanations(explanations: list[dict[str, Any]], page: Page) -> None:
    page.heading("What changed")
    for ex in explanations:
        a, b = ex["a"], ex["b"]
        wc = ex["what_changed"]
        page.raw_html(
            f"<h3>{html.escape(a)} → {html.escape(b)}</h3>", f"### {md_escape(a)} -> {md_escape(b)}"
        )
        page.para(
            f"over {ex['positions']} positions of both personas' answers; {wc['definition']}",
            "muted",
        )
        if wc.get("note"):
            page.para(wc["note"])
        for key, label in (
            ("boosted_in_b", f"boosted under {b}"),
            ("suppressed_in_b", f"suppressed under {b}"),
        ):
            page.raw_html(f"<h4>{html.escape(label)}</h4>", f"#### {md_escape(label)}")
            page.table(
                ["token", "Δ probability", "weighted log-ratio"],
                [[repr(t["token"]), t["delta_prob"], t["weighted_log_ratio"]] for t in wc[key]],
            )
        resp = max(ex["responses"], key=lambda r: r["mean_js"])
        infos = [
            {
                "token": tok,
                "value": f"JS {j:.4f}, KL(a||b) {ka:.4f}",
                "a_name": a,
                "a": [[t, round(p, 4)] for t, p in ta],
                "b_name": b,
                "b": [[t, round(p, 4)] for t, p in tb],
                "note": "",
            }
            for tok, j, ka, ta, tb in zip(
                resp["tokens"], resp["js"], resp["kl_ab"], resp["top_a"], resp["top_b"], strict=True
            )
        ]
        page.raw_html(
            f'<p class="muted">{html.escape(resp["generator"])}\'s answer to '
            f"{html.escape(str(resp.get('question') or resp['question_id']))}; colour:"
            " per-token JS between the two personas</p>"
            + token_html(resp["tokens"], resp["js"], infos),
            "Most divergent positions: "
            + md_escape(
                ", ".join(f"{p['token']!r} ({p['js']:.3f})" for p in resp["top_positions"])
            ),
        )


# ---------------------------------------------------------------------------- entry point


def build_report(
    run_dir: str | Path,
    out: str | Path | None = None,
    fmt: str = "html",
    *,
    overwrite: bool = False,
) -> list[Path]:
    """Write the report of a run; returns the files written.

    Raises:
        ReportError: ``run_dir`` holds neither a ranking nor a persona run.
        FileExistsError: an output exists and ``overwrite`` is False.
    """
    from divscope.runmeta import atomic_write, atomic_write_text

    run = Path(run_dir)
    if run.is_file():
        raise ReportError(
            f"{run} is a file; the report reads a run directory (its ranking.json or persona "
            f"files with their metadata). Fix: pass its directory, {run.parent}"
        )
    if not run.is_dir():
        raise ReportError(f"{run}: no such directory. Fix: pass a run directory")
    if (run / "ranking.json").exists():
        page = Page(f"divscope — prompt ranking: {run.name}")
        builder = _ranking_report
    elif (run / "divergence_matrices.json").exists():
        page = Page(f"divscope — persona divergence: {run.name}")
        builder = _persona_report
    else:
        raise ReportError(
            f"{run}: neither ranking.json nor divergence_matrices.json. Fix: pass the "
            "directory of a kl_demo / divscope rank --json run or of a persona run"
        )
    if fmt not in ("html", "md", "both"):
        raise ValueError("format must be html, md or both")
    builder(run, page)
    out = Path(out) if out else run / "report.html"
    figdir = out.with_name(out.stem + "_figures")
    targets = [out.with_suffix(".html")] if fmt in ("html", "both") else []
    if fmt in ("md", "both"):
        targets += [out.with_suffix(".md")] + [figdir / f"{n}.png" for n, _ in page.figures]
    clash = [str(t) for t in targets if t.exists()]
    if clash and not overwrite:  # checked before anything is written
        raise FileExistsError(f"{', '.join(clash)} exist(s); not overwriting")
    written = []
    if fmt in ("html", "both"):
        written.append(atomic_write_text(targets[0], page.render_html(), overwrite=True))
    if fmt in ("md", "both"):
        for name, data in page.figures:
            atomic_write(figdir / f"{name}.png", lambda f, d=data: f.write(d), overwrite=True)
        text = "\n".join(page.md).replace("FIGDIR", figdir.name) + "\n"
        written.append(atomic_write_text(out.with_suffix(".md"), text, overwrite=True))
    return written
