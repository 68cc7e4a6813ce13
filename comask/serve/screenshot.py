"""Screenshot of the `comask serve` page in headless Chromium (for the docs).

    python -m comask.serve.screenshot --weights CKPT --image IMG --out docs/img/serve_page.png

Starts the service on a free loopback port, uploads the image through the page's file input,
hovers one instance in the list and saves the window. Needs Debian's chromium + chromium-driver.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


def take_screenshot(url: str, image: str | Path, out: str | Path, score: float = 0.5, hover: int | None = 0,
                    window: tuple[int, int] = (1280, 860)) -> int:
    """Drive the page at `url`; returns the number of instances listed."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    for p in (CHROMIUM, CHROMEDRIVER):
        if not os.access(p, os.X_OK):
            raise SystemExit(f"{p} not found: apt-get install -y chromium chromium-driver")
    with tempfile.TemporaryDirectory(prefix="comask-chromium-") as profile:
        opts = webdriver.ChromeOptions()
        opts.binary_location = CHROMIUM
        for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                     "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                     f"--user-data-dir={profile}", f"--window-size={window[0]},{window[1]}",
                     "--force-device-scale-factor=1", "--hide-scrollbars"):
            opts.add_argument(flag)
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
        try:
            driver.get(f"{url}/?score={score}")
            driver.find_element(By.ID, "file-input").send_keys(str(Path(image).resolve()))
            WebDriverWait(driver, 120).until(
                lambda d: d.execute_script("return document.body.dataset.state") in ("done", "error"))
            if driver.execute_script("return document.body.dataset.state") == "error":
                raise SystemExit("the page reported: " + driver.find_element(By.ID, "error").text)
            rows = [r for r in driver.find_elements(By.CSS_SELECTOR, "#instance-rows tr") if r.is_displayed()]
            if hover is not None and hover < len(rows):
                ActionChains(driver).move_to_element(rows[hover]).perform()
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            driver.save_screenshot(str(out))
            return len(rows)
        finally:
            driver.quit()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m comask.serve.screenshot", description=__doc__.splitlines()[0])
    p.add_argument("--weights", required=True)
    p.add_argument("--image", default=None, help="default: a synthetic shapes image")
    p.add_argument("--out", default="docs/img/serve_page.png")
    p.add_argument("--score", type=float, default=0.5, help="initial position of the page's score slider")
    p.add_argument("--hover", type=int, default=0, help="row to hover (-1: none)")
    p.add_argument("--device", default="cpu")
    a = p.parse_args(argv)

    from comask.serve.app import create_app, load_predictor
    from comask.serve.loadtest import background_server, png_bytes, synthetic_image

    predictor, info = load_predictor(a.weights, a.device)
    with tempfile.TemporaryDirectory() as tmp:
        image = a.image
        if image is None:
            image = Path(tmp) / "shapes.png"
            image.write_bytes(png_bytes(synthetic_image(192, 256, seed=1)))
        with background_server(create_app(predictor, info)) as url:
            n = take_screenshot(url, image, a.out, a.score, None if a.hover < 0 else a.hover)
    print(f"wrote {a.out} ({n} instances listed)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
