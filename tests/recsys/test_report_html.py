"""``report.html`` (issue 18): the page ``recsys replay`` and the A/B analysis write is
self-contained (no script, no external reference, plots as data: URIs) and, opened in
headless Chromium (Debian's ``chromium``), shows its tables and its plots: every image
decodes (naturalWidth > 0), has a visible box, and its box in a screenshot of the real
page holds the plot's pixels. Skips with a reason when Chromium is not installed
(``.ci/run`` installs it; ``$RECSYS_CHROMIUM`` names another binary)."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from recsys.errors import ValidationError
from recsys.report_html import (
    Bullets,
    Heading,
    Image,
    Table,
    Text,
    render_html,
    render_markdown,
    write_html,
)

_TESTS = Path(__file__).resolve().parents[1]
for _dir in (_TESTS / "recsys" / "abtest", _TESTS / "recsys" / "replay"):
    if str(_dir) not in sys.path:
        sys.path.insert(0, str(_dir))

FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--hide-scrollbars", "--force-device-scale-factor=1", "--mute-audio",
]  # fmt: skip

# Appended to a COPY of the page (the real page allows no script): after load, it writes
# what the browser laid out and decoded into <pre id="probe"> for --dump-dom.
PROBE = """<script>
window.addEventListener("load", () => {
  const box = (el) => {
    const r = el.getBoundingClientRect(), cs = getComputedStyle(el);
    return {x: r.left + scrollX, y: r.top + scrollY, w: r.width, h: r.height,
            shown: cs.visibility === "visible" && cs.display !== "none" && +cs.opacity > 0};
  };
  const out = {
    images: [...document.images].map((i) => ({complete: i.complete, nw: i.naturalWidth,
                                               nh: i.naturalHeight, ...box(i)})),
    tables: [...document.querySelectorAll("table")].map((t) => ({rows: t.rows.length,
             cols: t.rows[0].cells.length, text: t.rows[0].textContent, ...box(t)})),
    headings: [...document.querySelectorAll("h1, h2")].map((h) => h.textContent),
    height: document.documentElement.scrollHeight,
  };
  const pre = document.createElement("pre");
  pre.id = "probe";
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>"""


def chromium() -> str:
    path = os.environ.get("RECSYS_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(path).is_file():
        pytest.skip(f"Chromium not installed ({path} missing; Debian package chromium)")
    return path


def run_chromium(binary: str, tmp: Path, *args: str) -> str:
    profile = tmp / f"profile-{len(list(tmp.glob('profile-*')))}"  # fresh each run
    res = subprocess.run(
        [binary, *FLAGS, f"--user-data-dir={profile}", *args],
        capture_output=True, text=True, timeout=180, check=False,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout


def check_page_in_chromium(page: Path, tmp: Path, tables: int, images: int) -> dict:
    """Open ``page`` in headless Chromium; check ``tables`` tables and ``images`` images
    are laid out, visible and decoded, and the images' pixels are in a screenshot."""
    from PIL import Image as PILImage

    binary = chromium()
    text = page.read_text(encoding="utf-8")
    # the real page: parsed DOM has the tables, and data: images only
    dom = run_chromium(binary, tmp, "--dump-dom", page.as_uri())
    assert dom.count("<table") == tables and dom.count("<img") == images
    assert all(
        src.startswith("data:image/png;base64,") for src in re.findall(r'src="([^"]*)"', dom)
    )
    # a copy with the probe (CSP relaxed for that one inline script)
    probe_page = tmp / "probe.html"
    probe_page.write_text(
        text.replace(
            "default-src 'none';", "default-src 'none'; script-src 'unsafe-inline';"
        ).replace("</body>", PROBE + "</body>"),
        encoding="utf-8",
    )
    out = run_chromium(binary, tmp, "--dump-dom", probe_page.as_uri())
    found = re.search(r'<pre id="probe">(.*?)</pre>', out, re.S)
    assert found, "the probe did not run"
    probe = json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    assert len(probe["tables"]) == tables and len(probe["images"]) == images
    for t in probe["tables"]:
        assert t["shown"] and t["w"] > 50 and t["h"] > 10 and t["rows"] >= 2, t
    for im in probe["images"]:
        assert im["complete"] and im["nw"] > 100 and im["nh"] > 100, im  # decoded
        assert im["shown"] and im["w"] > 100 and im["h"] > 50, im
    # a screenshot of the real page (no script): each image's box holds the plot
    height = min(int(probe["height"]) + 50, 30000)
    shot = tmp / "shot.png"
    run_chromium(binary, tmp, f"--screenshot={shot}", f"--window-size=1280,{height}", page.as_uri())
    pixels = np.asarray(PILImage.open(io.BytesIO(shot.read_bytes())).convert("RGB"))
    for im in probe["images"]:
        x, y, w, h = (round(im[k]) for k in ("x", "y", "w", "h"))
        crop = pixels[y + 2 : y + h - 2, x + 2 : x + w - 2]
        assert crop.size, (im, pixels.shape)
        ink = (crop.min(axis=2) < 200).mean()  # not white / light grey: lines, text, bars
        colours = len(np.unique(crop.reshape(-1, 3), axis=0))
        assert ink > 0.01 and colours > 20, (im, ink, colours)
    return probe


def test_page_is_self_contained_and_escaped(tmp_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 3))
    ax.plot([0, 1, 2], [1, 3, 2])
    fig.savefig(tmp_path / "p.png")
    plt.close(fig)
    blocks = [
        Text("a <b> & **bold** `code`"),
        Heading("Rows"),
        Table([{"policy": "<static>", "ndcg@10": 0.12345, "events": 12345}]),
        Bullets(["one", "  sub", "two"]),
        Image(tmp_path / "p.png", "p"),
    ]
    page = render_html("T <1>", blocks)
    assert "<script" not in page and "http://" not in page and "https://" not in page
    assert "Content-Security-Policy" in page and "default-src 'none'" in page
    assert "a &lt;b&gt; &amp; <strong>bold</strong> <code>code</code>" in page
    assert "<td>&lt;static&gt;</td>" in page and '<td class="num">0.1235</td>' in page
    assert '<td class="num">12,345</td>' in page and "<title>T &lt;1&gt;</title>" in page
    assert page.count('src="data:image/png;base64,') == 1
    md = render_markdown("T", blocks)
    assert "| policy | ndcg@10 | events |" in md and "![p](p.png)" in md and "  - sub" in md
    (tmp_path / "bad.png").write_text("not a png")
    with pytest.raises(ValidationError, match="not a PNG"):
        render_html("x", [Image(tmp_path / "bad.png")])
    with pytest.raises(ValidationError, match="cannot read"):
        write_html(tmp_path / "x.html", "x", [Image(tmp_path / "missing.png")])


def test_abtest_report_html_renders_in_chromium(tmp_path: Path) -> None:
    chromium()
    from abtest_synthetic import T0, events, experiment

    from recsys.abtest.analysis import analyze
    from recsys.abtest.plots import make_plots
    from recsys.abtest.report import write_report
    from recsys.abtest.usertable import summarise

    exp = experiment()
    ids, arms, ev, pre = events(exp)
    users, daily = summarise(ids, arms, ev, metrics=exp.metrics, start=T0, pre_events=pre)
    report = analyze(exp, users, daily)
    out = tmp_path / "ab"
    write_report(out, report, make_plots(report, out))
    page = out / "report.html"
    md = (out / "report.md").read_text()
    probe = check_page_in_chromium(page, tmp_path, tables=md.count("\n|---"), images=2)
    assert probe["headings"][0] == "A/B test report: synthetic"
    assert {"Verdict", "Arms", "Differences vs control", "Plots"} <= set(probe["headings"])


def test_replay_report_html_renders_in_chromium(tmp_path: Path, tmp_path_factory) -> None:
    chromium()
    import torch
    from replay_world import build_world

    from recsys.cli import main

    torch.set_num_threads(1)
    world = build_world(tmp_path_factory.mktemp("html-replay-world"))
    out = tmp_path / "replay"
    rc = main(["replay", "--dataset", str(world.root), "--cache-dir", str(world.cache),
               "--no-progress", "--out", str(out), "--budgets", "100,20"])  # fmt: skip
    assert rc == 0
    md = (out / "results.md").read_text()
    probe = check_page_in_chromium(out / "report.html", tmp_path, md.count("\n|---"), images=3)
    assert probe["headings"][0].startswith("Replay: ")
    assert "Quality (full-catalogue ranking, seen items excluded)" in probe["headings"]
    assert any("policy" in t["text"] for t in probe["tables"])
