"""The README's screenshot of the SAM web app, and the click latency the page reports, on the offline demo weights.

    python tools/sam_web_screenshot.py docs/sam_web.png [--clicks 10]

Makes the demo (``examples/make_sam_demo.py``) in a temporary folder, starts
``python -m mlx_evit.sam serve`` on it, opens the page in headless Chromium
(Debian's ``chromium`` + ``chromium-driver``, driven by selenium), picks the
example photo, clicks ``--clicks`` points one after the other (each a fresh
prompt: clear, click), prints the encoder, decoder and click-to-mask times the
page shows, then adds a background point and saves a screenshot (PNG, palette
reduced to stay small).
"""

from __future__ import annotations

import argparse
import io
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from sam_web import ENV, Server, wait_for  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output", type=Path)
    parser.add_argument("--clicks", type=int, default=10)
    args = parser.parse_args()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.support.ui import Select

    with tempfile.TemporaryDirectory() as tmp:
        demo = Path(tmp) / "sam_demo"
        subprocess.run([sys.executable, str(ROOT / "examples" / "make_sam_demo.py"), str(demo)], check=True, env=ENV)
        server = Server("--weights", str(demo / "model"), "--images", str(demo / "images"))
        options = webdriver.ChromeOptions()
        options.binary_location = "/usr/bin/chromium"
        for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                     "--disable-background-networking", "--disable-component-update", "--disable-sync",
                     "--hide-scrollbars", "--window-size=1100,780", f"--user-data-dir={tmp}/profile"):
            options.add_argument(flag)
        d = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
        try:
            d.get(server.url)
            wait_for(lambda: len(d.find_elements("css selector", "#library option")) > 1, 60, "the library")
            Select(d.find_element("id", "library")).select_by_value("cat.jpg")
            wait_for(lambda: d.find_element("id", "status").get_attribute("data-state") == "ready", 600, "ready")
            marks = d.find_element("id", "marks")

            def click(dx: int, dy: int, right: bool = False) -> None:
                n = len(d.find_elements("css selector", "#prompts li"))
                d.execute_script("document.getElementById('status').dataset.state = 'waiting';")
                chain = ActionChains(d).move_to_element_with_offset(marks, dx, dy)
                (chain.context_click() if right else chain.click()).perform()
                wait_for(lambda: len(d.find_elements("css selector", "#prompts li")) == n + 1
                         and d.find_element("id", "status").get_attribute("data-state") == "shown", 300, "a mask")

            for i in range(args.clicks):  # one-point prompts at different places
                d.find_element("id", "clear").click()
                time.sleep(0.2)
                click(-40 + 9 * i, -10 + 5 * (i % 4))
            timings = {k: d.find_element("id", f"t-{k}").text for k in ("encode", "decode", "click")}
            print(f"page timings after {args.clicks} clicks: encoder {timings['encode']}; decoder {timings['decode']}; "
                  f"click to mask {timings['click']}")
            click(150, 120, right=True)
            time.sleep(0.5)
            shot = Image.open(io.BytesIO(d.get_screenshot_as_png())).convert("RGB")
        finally:
            d.quit()
            server.stop()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    shot.quantize(colors=256, method=Image.Quantize.FASTOCTREE).save(args.output, optimize=True)
    print(f"wrote {args.output} ({args.output.stat().st_size // 1024} KB, {shot.width}x{shot.height})")
    median = re.search(r"median of \d+: ([\d.]+) ms", timings["click"])
    if median:
        print(f"median click to mask: {median.group(1)} ms")


if __name__ == "__main__":
    main()
