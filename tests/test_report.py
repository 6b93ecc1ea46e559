"""jobs.report on a real run (tiny random checkpoint, local Ray, tar shards with bad images),
rendered in headless Chromium and checked through the DOM it builds."""

from __future__ import annotations

import base64
import datetime as dt
import io
import json
import os
import re
import shutil
import subprocess
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path

import boto3
import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

from cogvlm import parse_boxes
from jobs import report
from pipeline import load_config, run
from pipeline.rows import to_table

from .data import good_image, webdataset_shards

TASKS = {"caption": {"max_new_tokens": 6},
         "vqa": {"questions": ["What color is it?"], "max_new_tokens": 4},
         "grounding": {"max_new_tokens": 10}}


def job(ckpt: Path, tok: Path, inp: Path, out: Path) -> dict:
    """The job on CPU with the tiny checkpoint (as tests/test_pipeline.py runs it)."""
    return {"input": {"path": str(inp)}, "output": {"path": str(out)}, "tasks": TASKS,
            "model": {"source": str(ckpt), "tokenizer": str(tok), "dtype": "fp32", "gpus_per_replica": 0,
                      "batch_size": 4, "preprocess_workers": 1}}


def upload_dir(endpoint: str, bucket: str, local: Path, prefix: str) -> None:
    client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing", aws_secret_access_key="testing",
                          region_name="us-east-1")
    for f in sorted(local.rglob("*")):
        if f.is_file():
            client.upload_file(str(f), bucket, f"{prefix}/{f.relative_to(local).as_posix()}")


# --- a headless browser and the DOM it returns ------------------------------------------------------

@pytest.fixture(scope="session")
def chromium() -> str:
    """The browser, before anything costly starts: missing, the tests fail in CI and skip elsewhere."""
    path = shutil.which("chromium")
    if path is None:
        msg = "chromium is not installed: apt-get install chromium (.ci/run installs it)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return path


def browse(chromium: str, page: Path, *args: str) -> str:
    """Run headless Chromium on a local file; returns its stdout."""
    cmd = [chromium, "--headless", "--disable-gpu", "--no-sandbox", "--disable-dev-shm-usage",
           "--hide-scrollbars", f"--user-data-dir={page.parent / '.chromium'}", *args, page.as_uri()]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


class Node:
    def __init__(self, tag: str, attrs: dict[str, str], parent: "Node | None") -> None:
        self.tag, self.attrs, self.parent = tag, attrs, parent
        self.children: list[Node | str] = []

    @property
    def classes(self) -> set[str]:
        return set(self.attrs.get("class", "").split())

    def text(self) -> str:
        return "".join(c if isinstance(c, str) else c.text() for c in self.children)

    def all(self, tag: str | None = None, cls: str | None = None, **attrs: str) -> list["Node"]:
        """Descendants by tag, class and attributes (data_task= matches data-task)."""
        found = []
        for c in self.children:
            if isinstance(c, str):
                continue
            if ((tag is None or c.tag == tag) and (cls is None or cls in c.classes)
                    and all(c.attrs.get(k.replace("_", "-")) == v for k, v in attrs.items())):
                found.append(c)
            found += c.all(tag, cls, **attrs)
        return found


class Dom(HTMLParser):
    VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "wbr"}

    def __init__(self, text: str) -> None:
        super().__init__()
        self.root = self.current = Node("#root", {}, None)
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list) -> None:
        node = Node(tag, {k: v or "" for k, v in attrs}, self.current)
        self.current.children.append(node)
        if tag not in self.VOID:
            self.current = node

    def handle_startendtag(self, tag: str, attrs: list) -> None:
        self.current.children.append(Node(tag, {k: v or "" for k, v in attrs}, self.current))

    def handle_endtag(self, tag: str) -> None:
        node = self.current
        while node.parent is not None and node.tag != tag:
            node = node.parent
        if node.parent is not None:
            self.current = node.parent

    def handle_data(self, data: str) -> None:
        self.current.children.append(data)


def assert_self_contained(text: str) -> None:
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", text, re.I), "external resource"
    assert not re.search(r"url\(\s*['\"]?(https?:)?//|@import|<script[^>]+src|<link", text, re.I)


# --- tests ----------------------------------------------------------------------------------------

def test_report_of_a_real_run(chromium, ray_cluster, ckpt_v1, tokenizer_v1, s3_bucket, tmp_path, capsys):
    expected = webdataset_shards(tmp_path / "in", n_shards=2, per_shard=3, bad=True)
    out = tmp_path / "out"
    summary = run(load_config(data=job(ckpt_v1, tokenizer_v1, tmp_path / "in", out)))
    df = pd.read_parquet(out / "data")

    # the default file name, beside the output; all images sampled so every one is checked
    capsys.readouterr()
    assert report.main([str(out), "--sample", "20", "--seed", "1"]) == 0
    html_path = tmp_path / "out_report.html"
    assert capsys.readouterr().out.strip() == str(html_path)
    text = html_path.read_text()
    assert_self_contained(text)
    dom = Dom(browse(chromium, html_path, "--dump-dom")).root

    # runs: the one run, with its summary's numbers
    (row,) = dom.all("tr", "run")
    assert row.attrs["data-run-id"] == summary["run_id"]
    field = {td.attrs["data-field"]: td.text() for td in row.all("td")}
    assert field["images"] == str(summary["images"]) == str(len(expected))
    assert field["rows"] == str(len(df))
    assert field["shards_processed"] == "2 of 2" and field["shards_failed"] == "0"
    # one definition of the rates: the final progress.json and summary.json read the same clock
    # once, and the page shows both rates as the run recorded them, labelled
    final = json.loads((out / "_runs" / summary["run_id"] / "progress.json").read_text())
    assert final["state"] == "done" and final["images_done"] == summary["images"]
    rates = ("wall_s", "images_per_s", "first_commit_s", "steady_images_per_s")
    assert {k: final[k] for k in rates} == {k: summary[k] for k in rates} and summary["steady_images_per_s"]
    assert field["images_per_s"] == f"{summary['images_per_s']:.3f}"
    assert field["steady_images_per_s"] == f"{summary['steady_images_per_s']:.3f}"

    # status counts by task and status equal the Parquet's
    want = df.groupby(["task", "status"]).size()
    cells = dom.all("td", "status-count")
    got = {(td.attrs["data-task"], td.attrs["data-status-count"]): int(td.text()) for td in cells}
    assert {k: v for k, v in got.items() if v} == {k: int(v) for k, v in want.items()}
    assert len(cells) == df.task.nunique() * df.status.nunique()
    totals = {td.attrs["data-status-total"]: int(td.text()) for td in dom.all("td", "status-total")}
    assert totals == dict(Counter(df.status))

    # up to 3 distinct example messages per failing status, taken from the rows
    for status in set(df.status) - {"ok"}:
        examples = dom.all("li", "error-example", data_status=status)
        assert 1 <= len(examples) <= 3, status
        messages = set(df[df.status == status].error_message)
        for li in examples:
            assert any(m in li.text() for m in messages), li.text()
    assert dom.all("li", "error-example", data_status="decode_error")
    assert dom.all("li", "error-example", data_status="image_too_large")

    # throughput: one chart for the run, a point per committed shard
    (chart,) = dom.all("svg", "throughput")
    assert chart.attrs["data-run-id"] == summary["run_id"] and chart.attrs["data-points"] == "2"
    assert chart.all("polyline", "series") and len(chart.all("circle", "commit")) == 2
    assert {t.text() for t in chart.all("text", "axis-label")} == {"seconds since the run started",
                                                                 "images committed"}

    # gallery: every image of every task; ok images as thumbnails, bad ones as placeholders with a reason
    for task in TASKS:
        items = dom.all("figure", "gallery-item", data_task=task)
        assert {i.attrs["data-key"] for i in items} == set(expected), task
        for item in items:
            key = item.attrs["data-key"]
            if expected[key] == "ok":
                (img,) = item.all("img", "thumb-img")
                assert img.attrs["src"].startswith("data:image/jpeg;base64,")
                thumb = Image.open(io.BytesIO(base64.b64decode(img.attrs["src"].split(",", 1)[1])))
                assert thumb.format == "JPEG" and max(thumb.size) <= 256
                assert max(int(img.attrs["width"]), int(img.attrs["height"])) == 256  # shown fitted to 256
                answers = item.all("div", "response")
                assert [a.text() for a in answers] == df[(df.key == key) & (df.task == task)] \
                    .sort_values("task_index").response.tolist()
            else:
                (ph,) = item.all("div", "placeholder")
                assert ph.attrs["data-reason"], key
                assert item.all("div", "row-error")
    vqa = dom.all("figure", "gallery-item", data_task="vqa")[0]
    assert "What color is it?" in vqa.text()

    # the same output on an S3-compatible store reads the same (the report is written locally)
    bucket, endpoint = s3_bucket
    upload_dir(endpoint, bucket, out, "out")
    with pytest.raises(SystemExit):
        report.main([f"s3://{bucket}/out"])
    s3_html = tmp_path / "s3_report.html"
    assert report.main([f"s3://{bucket}/out", "--endpoint-url", endpoint, "--sample", "20", "--seed", "1",
                        "--out", str(s3_html)]) == 0
    s3_dom = Dom(s3_html.read_text()).root
    assert {(td.attrs["data-task"], td.attrs["data-status-count"], td.text()) for td in
            s3_dom.all("td", "status-count")} == {(td.attrs["data-task"], td.attrs["data-status-count"], td.text())
                                                  for td in cells}
    assert [i.attrs["data-key"] for i in s3_dom.all("figure", "gallery-item")] == \
        [i.attrs["data-key"] for i in dom.all("figure", "gallery-item")]
    assert len(s3_dom.all("img", "thumb-img")) == len(dom.all("img", "thumb-img"))
    assert s3_dom.all("svg", "throughput")[0].attrs["data-points"] == "2"

    # a picture for a person to look at
    shot = tmp_path / "report.png"
    browse(chromium, html_path, f"--screenshot={shot}", "--window-size=1280,2000")
    assert Image.open(shot).size == (1280, 2000)
    with capsys.disabled():
        print(f"\nreport screenshot: {shot}\nreport: {html_path}")


def test_grounding_boxes_are_drawn_on_the_thumbnail(chromium, tmp_path):
    """The tiny random model rarely answers with boxes: draw parsed boxes on a real image."""
    text = "a dog [[086,540,400,760]] and a cat [[500,100,900,450]]"
    size = (400, 300)
    grounding = parse_boxes(text, image_size=size)
    table = to_table([{"key": "k0", "source_uri": "/in/00000.tar", "image_index": 0, "task": "grounding",
                       "task_index": 0, "prompt": "Where?", "response": text, "status": "ok",
                       "boxes_json": json.dumps(grounding.to_dict()), "width": size[0], "height": size[1]}],
                     {"run_id": "r"})
    row = table.to_pandas().to_dict("records")[0]
    page = tmp_path / "boxes.html"
    page.write_text(report.page("boxes", report.gallery_item("grounding", [row], good_image(7, size))))
    assert_self_contained(page.read_text())
    dom = Dom(browse(chromium, page, "--dump-dom")).root

    (item,) = dom.all("figure", "gallery-item", data_task="grounding")
    (img,) = item.all("img", "thumb-img")
    tw, th = int(img.attrs["width"]), int(img.attrs["height"])
    assert (tw, th) == (256, 192)
    (svg,) = item.all("svg", "boxes")
    rects = svg.all("rect", "box")
    assert [r.attrs["data-phrase"] for r in rects] == ["a dog", "and a cat"]
    for rect, box in zip(rects, grounding.boxes):
        x0, y0, x1, y1 = box.box  # normalized: the thumbnail keeps the aspect ratio
        got = [float(rect.attrs[k]) for k in ("x", "y", "width", "height")]
        assert got == pytest.approx([x0 * tw, y0 * th, (x1 - x0) * tw, (y1 - y0) * th], abs=1.0)
    assert [t.text() for t in svg.all("text", "box-label")] == ["a dog", "and a cat"]


# --- model text, keys and names are text, never markup ----------------------------------------------

# what a model (or a dataset's keys and paths) may say; names that become paths hold no '/'
EVIL = ('<script>window.__pwned=1</script><img src=x onerror="window.__pwned=1">"><b class="injected">b</b>'
        "'><svg onload=\"window.__pwned=1\"><iframe srcdoc='<script>parent.__pwned=1</script>'></iframe>")
EVIL_NAME = 'x"><img src=x onerror="window.__pwned=1"><b class="injected">'
PROBE = ("<script>window.addEventListener('load', () => {document.body.setAttribute('data-probe', 'ran');"
         "document.body.setAttribute('data-pwned', String(window.__pwned));});</script>")


def write_output(out: Path, runs: dict[str, dict], shards: list[tuple[str, str, list[dict]]]) -> None:
    """A job output by hand: runs (run id -> summary/progress/config), and committed shards
    (shard id, run id, rows): data file and ledger marker, as the job writes them."""
    for d in ("data", "_ledger", "_runs"):
        (out / d).mkdir(parents=True, exist_ok=True)
    for run_id, record in runs.items():
        (out / "_runs" / run_id).mkdir()
        for name in ("summary", "progress"):
            if name in record:
                (out / "_runs" / run_id / f"{name}.json").write_text(json.dumps(record[name]))
        if "config" in record:
            (out / "_runs" / run_id / "config.yaml").write_text(json.dumps(record["config"]))  # JSON is YAML
    for i, (shard_id, run_id, rows) in enumerate(shards):
        pq.write_table(to_table(rows, {"run_id": run_id, "shard_id": shard_id}), out / "data" / f"{shard_id}.parquet")
        (out / "_ledger" / f"{shard_id}.json").write_text(json.dumps(
            {"shard_id": shard_id, "run_id": run_id, "images": len({r["image_index"] for r in rows}),
             "rows": len(rows), "committed_at": f"2026-01-01T00:0{i}:00+00:00"}))


def evil_rows(inp: Path) -> list[dict]:
    """Rows of one image whose every text field is markup and script, and one failed row."""
    key = EVIL_NAME
    (inp / f"{key}.png").write_bytes(good_image(3, (64, 48), "PNG"))
    grounding = {"boxes": [{"phrase": EVIL, "box": [0.1, 0.1, 0.6, 0.7], "box_pixels": None}], "errors": [EVIL]}
    base = {"key": key, "source_uri": str(inp), "image_index": 0, "width": 64, "height": 48}
    return [dict(base, task="caption", task_index=0, prompt=EVIL, response=EVIL, status="ok"),
            dict(base, task="vqa", task_index=0, prompt=EVIL, response=EVIL, status="ok"),
            dict(base, task="vqa", task_index=1, prompt=EVIL, status="generation_error", error_message=EVIL),
            dict(base, task="grounding", task_index=0, prompt=EVIL, response=EVIL, status="ok",
                 boxes_json=json.dumps(grounding)),
            dict(base, task=EVIL_NAME, task_index=0, prompt=EVIL, status=EVIL_NAME, error_message=EVIL),
            dict(base, key=EVIL, image_index=1, task="caption", task_index=0, prompt=EVIL, status="decode_error",
                 error_message=EVIL)]


def browse_inert(chromium: str, html_path: Path) -> Node:
    """The page with a probe appended, in Chromium: the DOM after load, asserting no injected
    script ran and no injected element exists."""
    text = html_path.read_text()
    assert_self_contained(text)
    probed = html_path.with_name("probed-" + html_path.name)
    probed.write_text(text.replace("</body>", PROBE + "</body>"))
    dom = Dom(browse(chromium, probed, "--virtual-time-budget=3000", "--dump-dom")).root
    (body,) = dom.all("body")
    assert body.attrs.get("data-probe") == "ran"  # scripts run in this browser: the probe below means something
    assert body.attrs.get("data-pwned") == "undefined"
    assert len(dom.all("script")) == 1  # the probe's own
    assert not dom.all(cls="injected") and not dom.all("iframe")
    assert all(i.attrs.get("class", "").startswith("thumb-img") for i in dom.all("img"))
    assert not [n.tag for n in dom.all() if any(a.startswith("on") for a in n.attrs)]
    return dom


def test_model_text_is_text_never_markup(chromium, tmp_path):
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    rows = evil_rows(inp)
    write_output(out, {EVIL_NAME: {"summary": {"run_id": EVIL_NAME, "mode": EVIL, "images": 2, "rows": len(rows),
                                                 "status_counts": {EVIL: 1, "ok": 3}, "shards_failed": [EVIL_NAME],
                                                 "shards_processed": 1, "shards_total": 2},
                                     "config": {"input": {"path": str(inp), "format": "folder"}}}},
                 [(EVIL_NAME, EVIL_NAME, rows)])
    (out / "data" / f"{EVIL_NAME}2.parquet").write_bytes(b"")  # a data file without a marker: its name is shown
    html_path = tmp_path / "evil.html"
    assert report.main([str(out), "--out", str(html_path)]) == 0
    dom = browse_inert(chromium, html_path)

    # every piece of it is on the page, as the text it was
    (run,) = dom.all("tr", "run")
    assert run.attrs["data-run-id"] == EVIL_NAME
    field = {td.attrs["data-field"]: td.text() for td in run.all("td")}
    assert field["run_id"] == EVIL_NAME and field["mode"] == EVIL and EVIL in field["status_counts"]
    assert EVIL_NAME in field["shards_failed"]
    assert EVIL_NAME in dom.all("p", "uncommitted")[0].text()
    assert {td.attrs["data-status-count"] for td in dom.all("td", "status-count")} >= {EVIL_NAME, "ok"}
    assert {tr.attrs["data-task"] for tr in dom.all("tr") if "data-task" in tr.attrs} >= {EVIL_NAME, "vqa"}
    examples = dom.all("li", "error-example")
    assert {e.attrs["data-key"] for e in examples} == {EVIL_NAME, EVIL}
    assert all(e.text().endswith(EVIL) for e in examples)

    vqa = dom.all("figure", "gallery-item", data_task="vqa", data_key=EVIL_NAME)[0]
    assert [p.text() for p in vqa.all("div", "prompt")] == [EVIL, EVIL]
    assert [r.text() for r in vqa.all("div", "response")] == [EVIL]
    assert [r.text() for r in vqa.all("div", "row-error")] == [EVIL]
    (img,) = vqa.all("img", "thumb-img")
    assert img.attrs["alt"] == EVIL_NAME
    ground = dom.all("figure", "gallery-item", data_task="grounding")[0]
    assert [r.attrs["data-phrase"] for r in ground.all("rect", "box")] == [EVIL]
    assert [t.text() for t in ground.all("text", "box-label")] == [EVIL]
    assert EVIL in ground.all("ul", "box-list")[0].text() and ground.all("ul", "box-errors")[0].text() == EVIL
    odd = dom.all("figure", "gallery-item", data_task=EVIL_NAME)[0]
    assert odd.attrs["data-status"] == EVIL_NAME and odd.all("span", "badge")[0].text() == EVIL_NAME
    broken = dom.all("figure", "gallery-item", data_key=EVIL)[0]
    assert broken.all("div", "placeholder") and broken.all("code")[0].text() == EVIL


def test_page_keeps_plain_strings_as_text(chromium, tmp_path):
    """page() keeps rendered markup (gallery_item's) and escapes anything else it is given."""
    html_path = tmp_path / "plain.html"
    html_path.write_text(report.page(EVIL, EVIL))
    dom = browse_inert(chromium, html_path)
    (body,) = dom.all("body")
    assert dom.all("title")[0].text() == EVIL and body.children[0] == EVIL  # then the probe


# --- runs: states as the README names them, and image counts that cannot be misread ---------------

def caption_rows(source: str, keys: list[str]) -> list[dict]:
    return [{"key": k, "source_uri": source, "image_index": i, "task": "caption", "task_index": 0, "prompt": "Describe",
             "response": "a thing", "status": "ok", "width": 8, "height": 8} for i, k in enumerate(keys)]


def report_dom(out: Path, tmp_path: Path) -> Node:
    html_path = tmp_path / "report.html"
    assert report.main([str(out), "--out", str(html_path), "--sample", "0"]) == 0
    return Dom(html_path.read_text()).root


def test_run_states_are_the_readmes(tmp_path):
    now = dt.datetime.now(dt.timezone.utc)
    progress = {"images_done": 3, "images_total": 9, "shards_done": 1, "shards_total": 3, "eta_s": 30.0}
    out = tmp_path / "out"
    write_output(out, {
        # all shards already committed: the run did nothing, and says so in its summary only
        "a-nothing": {"summary": {"images": 0, "rows": 0, "shards_processed": 0, "shards_total": 1,
                                  "message": "nothing new to process"}},
        "b-done": {"summary": {"images": 3, "shards_failed": []}, "progress": dict(progress, state="done")},
        "c-incomplete": {"summary": {"images": 3, "shards_failed": ["s2"]},
                         "progress": dict(progress, state="incomplete")},
        "d-failed": {"progress": dict(progress, state="failed", updated_at=now.isoformat())},
        "e-running": {"progress": dict(progress, state="running", updated_at=now.isoformat())},
        "f-killed": {"progress": dict(progress, state="running",
                                      updated_at=(now - dt.timedelta(hours=2)).isoformat())},
    }, [("s1", "b-done", caption_rows("/in/s1.tar", ["k0", "k1", "k2"]))])
    dom = report_dom(out, tmp_path)
    runs = {tr.attrs["data-run-id"]: tr for tr in dom.all("tr", "run")}
    state = {run_id: tr.attrs["data-state"] for run_id, tr in runs.items()}
    assert state == {"a-nothing": "done", "b-done": "done", "c-incomplete": "incomplete", "d-failed": "failed",
                     "e-running": "running", "f-killed": "stopped"}
    cell = {run_id: {td.attrs["data-field"]: td.text() for td in tr.all("td")} for run_id, tr in runs.items()}
    for run_id, s in state.items():
        assert cell[run_id]["state"].split(" (")[0] == s
    assert cell["f-killed"]["state"] == "stopped (no summary, no progress for 2.0 h)"
    assert cell["e-running"]["progress"] == "3 / 9, ETA 30 s" and cell["f-killed"]["progress"] == "3 / 9"
    assert "finished" not in dom.text()


def test_rates_are_the_runs_own_and_labelled(tmp_path):
    """The report computes no rate: it shows the wall and steady rates each run recorded (its
    summary, or while it runs its progress.json), under labelled columns (issue 20)."""
    now = dt.datetime.now(dt.timezone.utc).isoformat()
    out = tmp_path / "out"
    write_output(out, {
        "a-demo": {"summary": {"images": 4, "wall_s": 25.7, "images_per_s": 0.1559, "first_commit_s": 25.6,
                               "steady_images_per_s": 82.9, "shards_failed": []},
                   "progress": {"state": "done", "wall_s": 25.7, "images_per_s": 0.1559,
                                "steady_images_per_s": 82.9}},
        "b-running": {"progress": {"state": "running", "updated_at": now, "images_done": 30, "wall_s": 60.0,
                                   "images_per_s": 0.5, "steady_images_per_s": 2.5}},
    }, [])
    dom = report_dom(out, tmp_path)
    heads = [th.text() for th in dom.all("table", "runs")[0].all("th")]
    assert "images/s wall" in heads and "images/s steady" in heads
    cell = {tr.attrs["data-run-id"]: {td.attrs["data-field"]: td.text() for td in tr.all("td")}
            for tr in dom.all("tr", "run")}
    assert {r: (c["images_per_s"], c["steady_images_per_s"], c["wall_s"]) for r, c in cell.items()} == \
        {"a-demo": ("0.156", "82.900", "26 s"), "b-running": ("0.500", "2.500", "60 s")}


def test_image_counts_agree_or_say_why_not(tmp_path):
    """Run a committed s1 (3 images); run b took s1's claim over and committed it again, then s2
    and s3: the runs committed 13 images, the data holds 10 distinct ones (issue 20)."""
    out = tmp_path / "out"
    shards = [("s1", "b", caption_rows("/in/s1.tar", ["k0", "k1", "k2"])),
              ("s2", "b", caption_rows("/in/s2.tar", ["k0", "k1", "k2", "k3"])),
              ("s3", "b", caption_rows("/in/s3.tar", ["k0", "k1", "k2"]))]
    write_output(out, {"a": {"summary": {"images": 3, "shards_processed": 1}},
                       "b": {"summary": {"images": 10, "shards_processed": 3}}}, shards)
    dom = report_dom(out, tmp_path)
    (totals,) = dom.all("span", id="totals")
    assert totals.attrs["data-images"] == "10" and "10 distinct images" in totals.text()
    cell = {tr.attrs["data-run-id"]: {td.attrs["data-field"]: td.text() for td in tr.all("td")}
            for tr in dom.all("tr", "run")}
    assert [(cell[r]["images"], cell[r]["images_in_data"]) for r in "ab"] == [("3", "0"), ("10", "10")]
    heads = [th.text() for th in dom.all("table", "runs")[0].all("th")]
    assert heads[3:5] == ["images committed", "in the data now"]
    (note,) = dom.all("p", "count-note")
    assert (note.attrs["data-images"], note.attrs["data-images-committed"], note.attrs["data-images-in-data"]) == \
        ("10", "13", "10")  # each run's images in the data add up to the header's
    assert "10 distinct images" in note.text() and "13 in all" in note.text() and "counts in each" in note.text()

    # a shard written by a run whose record is gone: counted at the top, and said where it is
    shutil.rmtree(out / "_runs" / "a")
    write_output(out, {}, [("s4", "a", caption_rows("/in/s4.tar", ["k0", "k1"]))])
    dom = report_dom(out, tmp_path)
    (note,) = dom.all("p", "count-note")
    assert (note.attrs["data-images"], note.attrs["data-images-committed"], note.attrs["data-images-in-data"]) == \
        ("12", "10", "10")
    assert "2 more were written by runs without a record" in note.text()
