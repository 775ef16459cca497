"""The HTML report, rendered in a real headless Chromium: every quantized layer has a row, the
sorting script ran, the plots are there; the CLI writes report.html next to the artifact."""
import json
import math
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch

import qcompile
from qcompile import cli
from qcompile.report import LayerReport, Report

from conftest import TinyBlock


def _chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("the Debian package 'chromium' is not installed (apt-get install chromium; `make test` does it)")
    return exe


def render(path: Path, tmp_path: Path, fragment: str = "") -> str:
    """The DOM of ``path`` after its scripts ran, from headless Chromium."""
    cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'chromium-profile'}", "--dump-dom", path.resolve().as_uri() + fragment]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "<html" in done.stdout, done.stderr[-2000:]
    return done.stdout


class Dom(HTMLParser):
    """Tables by id: their attributes, and for each body row its data-row and cells' data-sort."""

    def __init__(self, text: str):
        super().__init__()
        self.tables, self.svgs, self.circles, self._table, self._row, self._in_body = {}, 0, 0, None, None, False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table":
            self._table = self.tables.setdefault(a.get("id"), {"attrs": a, "rows": [], "keys": []})
        elif tag == "tbody":
            self._in_body = True
        elif tag == "th" and self._table is not None:
            self._table["keys"].append(a.get("data-key"))
        elif tag == "tr" and self._in_body:
            self._row = {"row": a.get("data-row"), "sort": []}
            self._table["rows"].append(self._row)
        elif tag == "td" and self._row is not None:
            self._row["sort"].append(a.get("data-sort"))
        elif tag == "svg":
            self.svgs += 1
        elif tag == "circle":
            self.circles += 1

    def handle_endtag(self, tag):
        if tag == "tbody":
            self._in_body, self._row = False, None
        elif tag == "table":
            self._table = None


@pytest.fixture(scope="module")
def quantized():
    torch.manual_seed(0)
    model = TinyBlock().eval()
    g = torch.Generator().manual_seed(2)
    batches = [(torch.randint(0, 50, (4, 9), generator=g), torch.ones(4, 9, dtype=torch.long)) for _ in range(3)]
    return qcompile.quantize(model, "w8a8", batches[0], calibration=batches), batches


def test_every_quantized_layer_has_a_row_and_sorting_ran(quantized, tmp_path):
    q, _ = quantized
    path = q.report.to_html(tmp_path / "report.html")
    page = path.read_text()
    assert "<script" in page and "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "") \
        and "https://" not in page  # self-contained: nothing fetched
    dom = Dom(render(path, tmp_path, "#sort=-weight_sqnr"))
    layers = dom.tables["layers"]
    assert layers["attrs"].get("data-sortable") == "ready"  # set by the page's script, after it ran
    assert sorted(r["row"] for r in layers["rows"]) == sorted(r.layer for r in q.report.layers)
    assert len(q.report.layers) == 7
    # the fragment sorted the table on weight SQNR, descending, in the browser
    col = layers["keys"].index("weight_sqnr")
    got = [float(r["sort"][col]) for r in layers["rows"]]
    assert got == sorted(got, reverse=True) and got != [r.weight_sqnr for r in q.report.layers]
    # two plots: size before/after, and three SQNR series with a point per layer
    assert dom.svgs == 2 and dom.circles == 3 * 7
    assert f"{q.report.compression:.2f}x" in page


def test_missing_values_and_odd_names_render(tmp_path):
    layers = [LayerReport("enc.<b>0</b>", "linear", "int4", None, weight_sqnr=math.inf, output_sqnr=None,
                          cumulative_sqnr=12.0, weight_bytes_float=400, weight_bytes_quantized=0),
              LayerReport("enc.1", "linear", "int8", "int8", 30.0, 20.0, 5.0, 400, 100)]
    report = Report("custom", layers=layers, kept_float={"head": "sensitive"}, bytes_before=800, bytes_after=100)
    dom = Dom(render(report.to_html(tmp_path / "r.html"), tmp_path, "#sort=weight_sqnr"))
    rows = dom.tables["layers"]["rows"]
    assert [r["row"] for r in rows] == ["enc.1", "enc.<b>0</b>"]  # escaped, and inf sorts above 30 dB
    assert [r["row"] for r in dom.tables["kept-float"]["rows"]] == ["head"]


def test_cli_writes_report_html_next_to_the_artifact(quantized, tmp_path, monkeypatch, capsys):
    q, batches = quantized

    def tiny_job(recipe, *_args):
        return q, 0.0, batches

    monkeypatch.setitem(cli.JOBS, "tiny", tiny_job)
    assert cli.main(["quantize", "--model", "tiny", "--out", str(tmp_path / "out")]) == 0
    out = tmp_path / "out"
    assert "report.html" in capsys.readouterr().out
    manifest = json.loads((out / "qcompile.json").read_text())
    assert {"report.html", "report.json"} <= set(manifest["files"])  # checksummed with the model
    qcompile.load(out)
    dom = Dom(render(out / "report.html", tmp_path))
    assert len(dom.tables["layers"]["rows"]) == len(q.report.layers)
