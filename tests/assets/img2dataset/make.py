"""Make the img2dataset fixtures in this folder with the real img2dataset package (not in CI).

    python3 -m venv /tmp/i2d && /tmp/i2d/bin/pip install img2dataset   # heavy: opencv, albumentations...
    /tmp/i2d/bin/python tests/assets/img2dataset/make.py

Serves 4 small generated images (and one text file that is not an image) on 127.0.0.1 with
http.server, writes a URL list of 13 URLs (4 images, 8 that answer 404, 1 that is not an image)
with a caption column, and runs img2dataset on it three times: output_format webdataset, parquet
and files, into webdataset/, parquet/ and files/ here. Most URLs fail on purpose: link lists
with many dead URLs are the normal case the job must take. Everything is tiny (a few KB).
"""

from __future__ import annotations

import csv
import http.server
import os
import shutil
import threading
from functools import partial
from pathlib import Path

HERE = Path(__file__).resolve().parent


def images(folder: Path) -> list[str]:
    import cv2  # img2dataset's own dependency (it has no PIL)
    import numpy as np

    names = []
    for i, color in enumerate([(30, 30, 200), (30, 200, 30), (200, 30, 30), (30, 200, 200)]):  # BGR
        img = np.zeros((20, 24 + 8 * i, 3), dtype=np.uint8)
        img[:] = color
        img[::4, ::4] = 255  # a little structure, so the JPEGs differ in more than color
        ok, data = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 70])
        name = f"img{i}.jpg"
        (folder / name).write_bytes(data.tobytes())
        names.append(name)
    (folder / "notimage.jpg").write_text("this is not an image")
    return names


def main() -> None:
    from img2dataset import download

    work = Path(os.environ.get("TMPDIR", "/tmp")) / "i2d-fixture-www"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    names = images(work)
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(work))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    rows = []
    for i in range(13):  # images at 0, 4, 8, 12; the text file at 6; 404s elsewhere
        if i % 4 == 0:
            url = f"{base}/{names[i // 4]}"
        elif i == 6:
            url = f"{base}/notimage.jpg"
        else:
            url = f"{base}/missing-{i}.jpg"
        rows.append({"url": url, "caption": f"caption {i}"})
    urls = work / "urls.csv"
    with urls.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["url", "caption"])
        w.writeheader()
        w.writerows(rows)
    try:
        for fmt in ("webdataset", "parquet", "files"):
            out = HERE / fmt
            shutil.rmtree(out, ignore_errors=True)
            download(url_list=str(urls), input_format="csv", url_col="url", caption_col="caption",
                     output_folder=str(out), output_format=fmt, resize_mode="no", encode_format="jpg",
                     processes_count=1, thread_count=2, number_sample_per_shard=100, timeout=5,
                     extract_exif=False, distributor="multiprocessing")
            for junk in out.glob("*.json"):  # run-level bookkeeping with absolute paths and timings
                if not junk.name.endswith("_stats.json"):
                    junk.unlink()
    finally:
        server.shutdown()


if __name__ == "__main__":
    main()
