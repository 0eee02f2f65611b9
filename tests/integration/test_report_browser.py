"""report.html renders in a real browser: headless Chromium (Debian's `chromium` package) decodes every
embedded plot and paints it.

CI installs the browser with `apt-get install -y chromium`; without /usr/bin/chromium this test is skipped.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium: apt-get install -y chromium")

# Flags for a closed network: without the background-networking ones Chromium stalls on refused connections.
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--hide-scrollbars", "--mute-audio"]
WIDTH = 1280

# Appended to a copy of the page (the report itself has no script): once loaded, write every image's
# decoded size and position, and the page height, into the DOM for --dump-dom.
PROBE = """<script>
window.addEventListener("load", () => {
  const imgs = [...document.images].map(i => {
    const r = i.getBoundingClientRect();
    return {alt: i.alt, complete: i.complete, naturalWidth: i.naturalWidth, naturalHeight: i.naturalHeight,
            x: r.left + scrollX, y: r.top + scrollY, w: r.width, h: r.height};
  });
  const pre = document.createElement("pre");
  pre.id = "probe";
  pre.textContent = JSON.stringify({imgs, height: document.documentElement.scrollHeight});
  document.body.appendChild(pre);
});
</script>"""


def chromium(args: list[str], tmp_path: Path, name: str) -> subprocess.CompletedProcess:
    profile = tmp_path / f"profile-{name}"  # a new empty profile each run
    cmd = [str(CHROMIUM), *FLAGS, f"--user-data-dir={profile}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    from align.report.build import ReportArgs, build_report
    from align.report.results import load_eval
    from report_runs import realistic_run

    d = tmp_path_factory.mktemp("browser")
    runs = [
        load_eval(realistic_run(d / "sft", seed=1, verifier_p=0.5, rm_mean=0.0, length_mean=60, method="sft")),
        load_eval(realistic_run(d / "dpo", seed=2, verifier_p=0.7, rm_mean=1.0, length_mean=70, kl=4.0)),
        load_eval(realistic_run(d / "ppo", seed=3, verifier_p=0.2, rm_mean=2.0, length_mean=90, kl=9.0, method="ppo")),
    ]
    build_report(runs, d / "report", ReportArgs(n_bootstrap=200))
    return d / "report" / "report.html"


def test_report_plots_decode_and_paint_in_chromium(report, tmp_path):
    # 1. Every <img> decoded (naturalWidth > 0), read from the live DOM.
    probed = tmp_path / "probed.html"
    probed.write_text(report.read_text(encoding="utf-8").replace("</body>", PROBE + "</body>"), encoding="utf-8")
    proc = chromium([f"--window-size={WIDTH},1000", "--virtual-time-budget=5000", "--dump-dom", probed.as_uri()], tmp_path, "dom")
    match = re.search(r'<pre id="probe">(.*?)</pre>', proc.stdout, re.S)
    assert match, f"no probe output; chromium said: {proc.stderr[-2000:]}"
    probe = json.loads(match.group(1).replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">"))
    imgs = probe["imgs"]
    assert len(imgs) == 2, imgs  # reward vs KL, training curves
    for img in imgs:
        assert img["complete"] and img["naturalWidth"] > 300 and img["naturalHeight"] > 200, img
        assert img["w"] > 300 and img["h"] > 200, img

    # 2. The screenshot of the whole page shows the plots: inside each image's box, plenty of non-white
    # pixels and coloured (plotted) ones, not a blank or broken-image box.
    height = int(probe["height"]) + 50
    shot = tmp_path / "report.png"
    proc = chromium([f"--window-size={WIDTH},{height}", f"--screenshot={shot}", report.as_uri()], tmp_path, "shot")
    assert shot.is_file(), proc.stderr[-2000:]
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert pixels.shape[1] == WIDTH and pixels.shape[0] >= height - 60
    for img in imgs:
        box = pixels[int(img["y"]) : int(img["y"] + img["h"]), int(img["x"]) : int(img["x"] + img["w"])]
        assert box.size, img
        non_white = (box.min(axis=-1) < 235).mean()
        coloured = ((box.max(axis=-1) - box.min(axis=-1)) > 60).mean()  # matplotlib's blue/orange/green
        assert non_white > 0.02, (img["alt"], non_white)
        assert coloured > 0.002, (img["alt"], coloured)
    # Outside the plots the page is mostly white (it rendered as a page, not as an error screen).
    assert (pixels.min(axis=-1) > 235).mean() > 0.5
