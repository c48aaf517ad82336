"""The web app as a person uses it: a real headless Chromium opens the page, uploads a photo, clicks, drags.

What the page shows (the overlay canvas's pixels) must equal
:class:`~mlx_evit.sam.SamPredictor`'s mask for the prompts the page lists.
Needs Debian's ``chromium`` and ``chromium-driver`` and the ``selenium``
package (the ``test`` extra; ``.ci/run`` installs the browser). Without them
the tests fail, saying what to install; set ``MLX_EVIT_SKIP_BROWSER=1`` to
skip them on a machine that cannot have a browser.
"""

from __future__ import annotations

import base64
import io
import os
import re
import shutil

import numpy as np
import pytest
from PIL import Image

import mlx_evit
from mlx_evit.sam import SamAutomaticMaskGenerator, SamPredictor
from mlx_evit.tasks.mask_generator import rle_to_mask
from mlx_evit.tasks.transforms import load_image

from sam_web import PHOTOS, Server, make_model_dir, wait_for

CAT, ROCKET = PHOTOS / "cat.png", PHOTOS / "rocket.jpg"
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1280,860")
INSTALL = ("apt-get install chromium chromium-driver (Debian; .ci/run does it) and pip install selenium "
           "(the test extra), or set MLX_EVIT_SKIP_BROWSER=1 to skip the browser tests")


def _find(*names: str) -> str | None:
    for name in names:
        path = shutil.which(name) or (f"/usr/bin/{name}" if os.path.exists(f"/usr/bin/{name}") else None)
        if path:
            return path
    return None


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if os.environ.get("MLX_EVIT_SKIP_BROWSER") == "1":
        pytest.skip("MLX_EVIT_SKIP_BROWSER=1")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail(f"selenium is not installed: {INSTALL}")
    chromium, driver_path = _find("chromium", "chromium-browser", "google-chrome"), _find("chromedriver")
    if chromium is None or driver_path is None:
        pytest.fail(f"no headless browser (chromium: {chromium}, chromedriver: {driver_path}): {INSTALL}")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium_profile')}")
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    driver.set_page_load_timeout(120)
    driver.set_script_timeout(120)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("webapp_browser_model") / "l0_128")


@pytest.fixture(scope="module")
def server(model_dir):
    s = Server("--weights", str(model_dir), "--images", str(PHOTOS))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def predictor(model_dir):
    return SamPredictor(mlx_evit.load(model_dir))


# -- reading the page ------------------------------------------------------------------------------

def state(driver) -> str:
    return driver.find_element("id", "status").get_attribute("data-state")


def wait_state(driver, wanted: str, timeout: float = 300) -> None:
    def check():
        s = state(driver)
        if s == "error":
            raise AssertionError(f"the page shows an error: {driver.find_element('id', 'error').text}")
        return s == wanted

    wait_for(check, timeout, f"the page's state {wanted!r} (now {state(driver)!r})")


def overlay_alpha(driver) -> np.ndarray:
    """The overlay canvas's alpha channel, ``(H, W)`` uint8 (read back as PNG)."""
    url = driver.execute_script("return document.getElementById('overlay').toDataURL('image/png');")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGBA"))[..., 3]


def shown_mask(driver) -> np.ndarray:
    """The overlay's coloured pixels (alpha > 0): what the page shows as masks."""
    return overlay_alpha(driver) > 0


def prompts(driver) -> list[dict]:
    return [{k: li.get_attribute(f"data-{k}") for k in ("kind", "x", "y", "label", "box")}
            for li in driver.find_elements("css selector", "#prompts li")]


def after(driver, action, n_prompts: int) -> None:
    """Do ``action`` (a prompt) and wait until the page lists ``n_prompts`` prompts and shows their mask."""
    driver.execute_script("document.getElementById('status').dataset.state = 'test-waiting';")
    action()
    wait_for(lambda: len(prompts(driver)) == n_prompts, 60, f"{n_prompts} prompts listed")
    wait_state(driver, "shown")


def expected(predictor, driver, multimask=True):
    """SamPredictor's masks (best first) and scores for the prompts the page lists."""
    listed = prompts(driver)
    points = [(float(p["x"]), float(p["y"])) for p in listed if p["kind"] == "point"]
    labels = [int(p["label"]) for p in listed if p["kind"] == "point"]
    boxes = [[float(v) for v in p["box"].split(",")] for p in listed if p["kind"] == "box"]
    masks, scores, _ = predictor.predict(np.array(points).reshape(-1, 2) if points else None,
                                         np.array(labels) if points else None,
                                         np.array(boxes[-1]) if boxes else None, multimask_output=multimask)
    order = np.argsort(-scores, kind="stable")
    return masks[order], scores[order]


# -- the tests -------------------------------------------------------------------------------------

def test_click_shows_the_mask_of_sam_predictor(browser, server, predictor):
    from selenium.webdriver.common.action_chains import ActionChains

    d = browser
    d.get(server.url)
    wait_for(lambda: "efficientvit_sam_l0" in d.find_element("id", "model").text, 60, "the model's name")
    d.find_element("id", "file").send_keys(str(CAT))
    wait_state(d, "ready")
    image = np.asarray(load_image(CAT))
    predictor.set_image(image)
    marks = d.find_element("id", "marks")
    assert (int(marks.get_attribute("width")), int(marks.get_attribute("height"))) == (451, 300)

    # A left click: one foreground point, three candidates, the best shown.
    after(d, lambda: ActionChains(d).move_to_element_with_offset(marks, -60, -30).click().perform(), 1)
    listed = prompts(d)
    assert listed[0]["kind"] == "point" and listed[0]["label"] == "1"
    rect = d.execute_script("const r = arguments[0].getBoundingClientRect(); return [r.width, r.height];", marks)
    clicked = ((rect[0] / 2 - 60) * 451 / rect[0], (rect[1] / 2 - 30) * 300 / rect[1])  # where the pointer went
    assert abs(float(listed[0]["x"]) - clicked[0]) < 2 and abs(float(listed[0]["y"]) - clicked[1]) < 2, (listed, clicked)
    masks, scores = expected(predictor, d)
    assert 0.01 < masks[0].mean() < 0.99
    np.testing.assert_array_equal(shown_mask(d), masks[0])
    buttons = d.find_elements("css selector", "#candidates button")
    assert [float(b.get_attribute("data-score")) for b in buttons] == pytest.approx(scores.tolist(), abs=1e-5)
    buttons[2].click()  # choose the third candidate
    wait_for(lambda: "chosen" in d.find_elements("css selector", "#candidates button")[2].get_attribute("class"), 10)
    np.testing.assert_array_equal(shown_mask(d), masks[2])

    # A right click: a background point.
    after(d, lambda: ActionChains(d).move_to_element_with_offset(marks, 100, 60).context_click().perform(), 2)
    assert prompts(d)[1]["label"] == "0"
    masks, _ = expected(predictor, d)
    np.testing.assert_array_equal(shown_mask(d), masks[0])

    # Undo drops it; a drag draws a box; one candidate when multimask is off.
    after(d, lambda: d.find_element("id", "undo").click(), 1)
    np.testing.assert_array_equal(shown_mask(d), expected(predictor, d)[0][0])
    after(d, lambda: d.find_element("id", "multimask").click(), 1)
    assert len(d.find_elements("css selector", "#candidates button")) == 1
    after(d, lambda: ActionChains(d).move_to_element_with_offset(marks, -150, -100).click_and_hold()
          .move_by_offset(200, 150).release().perform(), 2)
    listed = prompts(d)
    assert listed[1]["kind"] == "box"
    x0, y0, x1, y1 = (float(v) for v in listed[1]["box"].split(","))
    assert x1 - x0 > 100 and y1 - y0 > 80
    np.testing.assert_array_equal(shown_mask(d), expected(predictor, d, multimask=False)[0][0])

    # Clear: nothing shown. The page asked nothing of any other server.
    d.find_element("id", "clear").click()
    wait_for(lambda: not prompts(d) and not shown_mask(d).any(), 30, "a cleared overlay")
    resources = d.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert resources and all(r.startswith(server.url) or r.startswith("data:") for r in resources), resources
    print(f"\npage timings: decoder {d.find_element('id', 't-decode').text}; "
          f"click to mask {d.find_element('id', 't-click').text}; encoder {d.find_element('id', 't-encode').text}")


def test_library_and_segment_everything(browser, server, predictor):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.support.ui import Select

    d = browser
    d.get(server.url)
    wait_for(lambda: len(d.find_elements("css selector", "#library option")) > 1, 60, "the folder's images")
    Select(d.find_element("id", "library")).select_by_value(ROCKET.name)
    wait_state(d, "ready")
    image = np.asarray(load_image(ROCKET))
    marks = d.find_element("id", "marks")
    assert (int(marks.get_attribute("height")), int(marks.get_attribute("width"))) == image.shape[:2]
    for field, value in (("pps", "3"), ("iou-thresh", "0"), ("stab-thresh", "0"), ("nms-thresh", "1")):
        d.execute_script("arguments[0].value = arguments[1];", d.find_element("id", field), value)
    d.find_element("id", "everything").click()
    wait_state(d, "everything-done")
    records = SamAutomaticMaskGenerator(predictor, points_per_side=3, pred_iou_thresh=0.0,
                                        stability_score_thresh=0.0, box_nms_thresh=1.0,
                                        output_mode="uncompressed_rle").generate(image)
    masks = [rle_to_mask(r["segmentation"]) for r in sorted(records, key=lambda r: -r["area"])]
    assert d.find_element("id", "everything-info").text.startswith(f"{len(masks)} masks") and len(masks) > 5
    np.testing.assert_array_equal(shown_mask(d), np.any(masks, axis=0))
    # Hovering highlights the smallest mask under the pointer (largest drawn first, small ones on top).
    h, w = image.shape[:2]
    top = np.full((h, w), -1)
    for k, m in enumerate(masks):
        top[m] = k
    count = np.sum(masks, axis=0)
    # A pixel under two masks or more, whose neighbours have the same top mask (rounding of the pointer).
    py, px = next((y, x) for y, x in zip(*np.nonzero((count >= 2) & (top > 0)))
                  if 0 < y < h - 1 and 0 < x < w - 1 and (top[y - 1 : y + 2, x - 1 : x + 2] == top[y, x]).all())
    rect = d.execute_script("const r = arguments[0].getBoundingClientRect(); return [r.width, r.height];", marks)
    ActionChains(d).move_to_element_with_offset(marks, round((px + 0.5) * rect[0] / w - rect[0] / 2),
                                                round((py + 0.5) * rect[1] / h - rect[1] / 2)).perform()
    info = d.find_element("id", "everything-info")
    match = wait_for(lambda: re.match(r"mask (\d+): area (\d+) px", info.text), 10, "the hover info")
    k = int(match.group(1)) - 1
    assert int(match.group(2)) == int(masks[k].sum())
    assert k == top[py, px]
    np.testing.assert_array_equal(overlay_alpha(d) == 200, masks[k])  # highlighted whole
