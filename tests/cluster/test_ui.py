"""The web UI in a real headless Chromium: sign in, see the deployment and its instances."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from .harness import PASSWORD, Cluster, fake_backend, require, wait_for

pytestmark = [pytest.mark.browser, pytest.mark.slow]


@pytest.fixture
def browser(tmp_path: Path):
    chromium = shutil.which("chromium")
    driver_path = shutil.which("chromedriver")
    require(chromium is not None and driver_path is not None,
            "chromium / chromium-driver not installed")  # fmt: skip
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--window-size=1400,1000",
                 f"--user-data-dir={tmp_path / 'chrome-profile'}"):  # fmt: skip
        opts.add_argument(flag)
    driver = webdriver.Chrome(options=opts, service=Service(driver_path))
    try:
        yield driver
    finally:
        driver.quit()


def test_ui_shows_deployment_and_instances(cluster: Cluster, model_dir, browser, tmp_path) -> None:
    from selenium.webdriver.common.by import By

    cluster.start_server("w1")
    cluster.workers_ready(1)
    assert cluster.api.post("/v2/inference-backends", json=fake_backend()).status_code == 201
    dep = {"name": "ui-model", "local_path": str(model_dir), "backend": "fake", "replicas": 2}
    assert cluster.api.post("/v2/models", json=dep).status_code == 201
    cluster.wait_running("ui-model", 2)

    browser.get(cluster.url + "/")
    wait_for(lambda: browser.find_element(By.ID, "login-form").is_displayed(), 20, "login form")
    browser.find_element(By.ID, "password").send_keys(PASSWORD)
    browser.find_element(By.ID, "login-button").click()

    def table_text(table_id: str) -> str:
        return browser.find_element(By.CSS_SELECTOR, f"#{table_id} tbody").text

    wait_for(lambda: "ui-model" in table_text("deployments"), 20, "deployment row")
    wait_for(lambda: table_text("instances").count("running") == 2, 20, "two running instances")
    assert "2/2" in table_text("deployments")

    # live logs of the first instance
    browser.find_element(By.CSS_SELECTOR, "#instances tbody tr button").click()
    wait_for(lambda: "fake server for" in browser.find_element(By.ID, "logs").text, 20, "logs")

    shot = tmp_path / "cluster-ui.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    print(f"UI screenshot: {shot}")

    # workers tab shows the worker as ready
    browser.find_element(By.CSS_SELECTOR, "nav button[data-tab=workers]").click()
    wait_for(lambda: "ready" in table_text("workers"), 10, "worker row")
