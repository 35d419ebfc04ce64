"""The report's explorer in a real browser: headless Chromium opens report.html from disk.

Each check reads the page and compares it with the report's data file, parsed here with ``json``
(and with what the page itself loaded): the coloured tokens' values, the units ranked for a
selected span (the LSTMVis rule, recomputed in Python), the audit-row jump, the sample note.
A console error fails the test. A screenshot of each state lands under the test's tmp_path;
with ``LSTM_REWRITE_SCREENSHOT=docs/explorer.png`` the keras3 run also writes the README's one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest

from conftest import FLAVOURS

try:
    from selenium import webdriver
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select
except ImportError:  # the static-page test below still runs
    webdriver = None

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
if webdriver is None:
    _NO_BROWSER = "selenium is not installed (pip install -r requirements.txt)"
elif not (CHROMIUM and CHROMEDRIVER):
    _NO_BROWSER = "no headless browser: chromium and chromedriver are not on PATH (`make browser` installs them)"
else:
    _NO_BROWSER = ""
needs_browser = pytest.mark.skipif(bool(_NO_BROWSER), reason=_NO_BROWSER)

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "lstm_rewrite" / "data"
FIXTURE = Path(__file__).parent / "data" / "explorer_fixture"
TOL = 1e-6


# --- the browser and the reports --------------------------------------------------------------

@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tmp_path_factory.mktemp("chromium-profile")
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--no-first-run", "--window-size=1280,1400", f"--user-data-dir={profile}"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    browser = webdriver.Chrome(options=options, service=webdriver.ChromeService(CHROMEDRIVER))
    yield browser
    browser.quit()


@pytest.fixture(scope="module", params=FLAVOURS)
def demo_report(request, tmp_path_factory):
    """The demo's report, written to disk, for each Keras flavour: (flavour, directory)."""
    from lstm_rewrite import audit
    from lstm_rewrite.demo import demo_data, load_demo_model

    x, depth, vocab = demo_data()
    report = audit(load_demo_model(request.param), x, labels={"depth": depth}, vocab=vocab, progress=False)
    out = tmp_path_factory.mktemp(f"report-{request.param}")
    report.to_html(str(out))
    return request.param, out


def read_data(directory: Path) -> dict:
    """explorer_data.js parsed by Python: the JSON after ``window.LSTM_REPORT =``."""
    text = (directory / "explorer_data.js").read_text(encoding="utf-8")
    match = re.search(r"window\.LSTM_REPORT\s*=\s*(.*?);?\s*$", text, re.S)
    assert match, "explorer_data.js does not set window.LSTM_REPORT"
    return json.loads(match.group(1))


def open_page(driver, directory: Path) -> dict:
    driver.get((directory / "report.html").as_uri())
    data = read_data(directory)
    assert driver.execute_script("return window.LSTM_REPORT") == data
    return data


def assert_no_console_errors(driver):
    errors = [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
    assert not errors, f"console errors: {errors}"


def shoot(driver, path: Path):
    driver.save_screenshot(str(path))
    assert path.stat().st_size > 0


# --- what the page shows, and what it should show ---------------------------------------------

def page_state(driver) -> dict:
    return driver.execute_script("""
        var v = function (id) { return document.getElementById(id).value; };
        return {layer: Number(v('layer-select')), unit: Number(v('unit-select')),
                quantity: v('quantity-select'), sequence: Number(v('sequence-select')),
                tokens: Array.from(document.querySelectorAll('#text .tok')).map(function (s) {
                    return {step: Number(s.dataset.step), value: s.dataset.value === undefined ? null : s.dataset.value,
                            valid: s.classList.contains('valid'), colour: s.style.backgroundColor,
                            title: s.title, text: s.textContent}; }),
                ranked: Array.from(document.querySelectorAll('#span-results li')).map(function (li) {
                    return [Number(li.dataset.unit), Number(li.dataset.score)]; }),
                note: document.getElementById('sample-note').textContent,
                row: document.getElementById('unit-row').textContent};
    """)


def check_text(driver, data: dict, layer: int, unit: int, quantity: str, sequence: int):
    """The page shows this layer, unit, quantity and sequence, each valid token coloured with
    the data's value, padded tokens uncoloured."""
    state = page_state(driver)
    assert (state["layer"], state["unit"], state["quantity"], state["sequence"]) == (layer, unit, quantity, sequence)
    seq = data["layers"][layer]["sequences"][sequence]
    valid = [t for t in state["tokens"] if t["valid"]]
    assert [t["step"] for t in valid] == seq["steps"]
    assert all(t["colour"] for t in valid if t["value"] != "NaN")
    for token, row in zip(valid, seq["values"][quantity]):
        expected = row[unit]
        if expected is None:
            assert token["value"] == "NaN" and not token["colour"]
        else:
            assert abs(float(token["value"]) - expected) <= TOL, token
            assert f"{quantity} = {expected:.3f}" in token["title"]
    padded = [t for t in state["tokens"] if not t["valid"]]
    assert all(t["value"] is None and not t["colour"] for t in padded)
    if data["tokens"] is not None:
        assert [t["step"] for t in state["tokens"]] == list(range(len(data["tokens"][sequence])))
        shown = [t["text"] for t in state["tokens"]]
        assert [s for s, tok in zip(shown, data["tokens"][sequence]) if " " not in tok] == \
            [tok for tok in data["tokens"][sequence] if " " not in tok]
    else:
        assert [t["text"] for t in valid] == [str(s) for s in seq["steps"]]
    assert f"{data['shown']} of {data['sequences']} sequences" in state["note"]
    columns = data["layers"][layer]["columns"]
    assert all(name in state["row"] for name in columns)
    return state


def scores(data: dict, layer: int, quantity: str, sequence: int, a: int, b: int) -> dict[int, float]:
    """LSTMVis's selection, from the data file: each unit's mean inside positions a..b of the
    valid steps minus its mean over a window of the span's length on each side (clipped to the
    valid steps); with nothing around, the inside mean."""
    rows = data["layers"][layer]["sequences"][sequence]["values"][quantity]
    length = b - a + 1
    around = list(range(max(0, a - length), a)) + list(range(b + 1, min(len(rows), b + 1 + length)))
    out = {}
    for unit in range(data["layers"][layer]["units"]):
        inside = [rows[p][unit] for p in range(a, b + 1) if rows[p][unit] is not None]
        outside = [rows[p][unit] for p in around if rows[p][unit] is not None]
        if inside:
            mean_in = sum(inside) / len(inside)
            out[unit] = mean_in - sum(outside) / len(outside) if outside else mean_in
    return out


def select_span(driver, data: dict, layer: int, sequence: int, a: int, b: int):
    """Click the token at valid position a, shift-click the one at b."""
    steps = data["layers"][layer]["sequences"][sequence]["steps"]
    first = driver.find_element(By.CSS_SELECTOR, f"#text .tok[data-step='{steps[a]}']")
    last = driver.find_element(By.CSS_SELECTOR, f"#text .tok[data-step='{steps[b]}']")
    ActionChains(driver).click(first).key_down(Keys.SHIFT).click(last).key_up(Keys.SHIFT).perform()


def check_ranking(driver, data: dict, layer: int, quantity: str, sequence: int, a: int, b: int):
    """The page's ranked units are the top 10 by the Python scores (units whose scores tie may
    come in either order, so each unit's own score is checked too)."""
    expected = scores(data, layer, quantity, sequence, a, b)
    top = sorted(expected.items(), key=lambda s: (-s[1], s[0]))[:10]
    ranked = page_state(driver)["ranked"]
    assert len(ranked) == len(top) > 0
    assert [score for _, score in ranked] == pytest.approx([score for _, score in top], abs=TOL)
    assert all(abs(expected[unit] - score) <= TOL for unit, score in ranked), (ranked, top)
    return ranked


def check_audit_jump(driver, data: dict, layer: int):
    link = driver.find_element(By.CSS_SELECTOR, "#span-results li .audit-link")
    unit = int(link.find_element(By.XPATH, "..").get_attribute("data-unit"))
    link.click()
    prefix = re.sub(r"[^A-Za-z0-9._-]", "_", data["layers"][layer]["prefix"])
    target = f"unit-{prefix}-{unit}"
    assert driver.current_url.endswith("#" + target)
    highlighted = driver.find_elements(By.CSS_SELECTOR, ".explorer-target")
    assert [row.get_attribute("id") for row in highlighted] == [target]
    return unit


def layer_index(data: dict, prefix: str) -> int:
    return [layer["prefix"] for layer in data["layers"]].index(prefix)


# --- the tests --------------------------------------------------------------------------------

@needs_browser
def test_demo_report_explorer(driver, demo_report, tmp_path):
    flavour, directory = demo_report
    data = open_page(driver, directory)
    initial = data["initial"]
    layer = layer_index(data, initial["layer"])
    check_text(driver, data, layer, initial["unit"], initial["quantity"], initial["sequence"])
    shoot(driver, tmp_path / "1-initial.png")

    # Another unit and sequence, picked with the selects.
    units = data["layers"][layer]["units"]
    unit, sequence = (initial["unit"] + 3) % units, min(2, data["shown"] - 1)
    Select(driver.find_element(By.ID, "unit-select")).select_by_value(str(unit))
    Select(driver.find_element(By.ID, "sequence-select")).select_by_value(str(sequence))
    check_text(driver, data, layer, unit, initial["quantity"], sequence)
    Select(driver.find_element(By.ID, "quantity-select")).select_by_value("h")
    check_text(driver, data, layer, unit, "h", sequence)
    Select(driver.find_element(By.ID, "quantity-select")).select_by_value("c")
    shoot(driver, tmp_path / "2-unit-sequence.png")

    # A span in the middle of the sequence, and the units on during it.
    n = len(data["layers"][layer]["sequences"][sequence]["steps"])
    a, b = n // 3, n // 3 + max(1, n // 8)
    select_span(driver, data, layer, sequence, a, b)
    ranked = check_ranking(driver, data, layer, "c", sequence, a, b)
    assert len(driver.find_elements(By.CSS_SELECTOR, "#text .tok.in-span")) == b - a + 1
    shoot(driver, tmp_path / "3-span.png")

    # Picking a ranked unit selects it; "audit row" jumps to its row in the table.
    driver.find_element(By.CSS_SELECTOR, "#span-results li .select-unit").click()
    check_text(driver, data, layer, ranked[0][0], "c", sequence)
    check_audit_jump(driver, data, layer)
    shoot(driver, tmp_path / "4-audit-row.png")

    # The label-tracking shortcut opens the tracking unit.
    if data["tracking"]:
        best = data["tracking"][0]
        driver.find_element(By.CSS_SELECTOR, "#tracking-links .tracking-link").click()
        check_text(driver, data, layer_index(data, best["layer"]), best["unit"], best["quantity"], sequence)
        shoot(driver, tmp_path / "5-tracking-unit.png")
    # The README's picture: the tracking unit over a sequence, with the span's ranked units.
    target = os.environ.get("LSTM_REWRITE_SCREENSHOT")
    if target and flavour == "keras3":
        path = Path(target) if Path(target).is_absolute() else ROOT / target
        path.parent.mkdir(parents=True, exist_ok=True)
        driver.execute_script("document.getElementById('explorer').scrollIntoView()")
        driver.find_element(By.ID, "explorer").screenshot(str(path))
    assert_no_console_errors(driver)


def test_demo_report_reads_without_javascript(demo_report):
    """The static page stands alone: summary, one table per layer with row ids, nothing fetched."""
    _, directory = demo_report
    page = (directory / "report.html").read_text(encoding="utf-8")
    data = read_data(directory)
    assert re.search(r"<pre>.*\S.*</pre>", page, re.S)
    assert page.count("<table") == len(data["layers"])
    for layer in data["layers"]:
        prefix = re.sub(r"[^A-Za-z0-9._-]", "_", layer["prefix"])
        assert all(f"unit-{prefix}-{u}" in page for u in range(layer["units"]))
    assert re.search(r"<div id=['\"]explorer['\"]></div>", page)
    for name in ("report.html", "explorer.js", "explorer.css"):
        text = (directory / name).read_text(encoding="utf-8")
        assert not re.search(r"(src|href)\s*=\s*['\"]?(https?:)?//", text), name
        assert "fetch(" not in text and "XMLHttpRequest" not in text, name
    assert data["shown"] <= data["sequences"] and data["shown"] == len(data["layers"][0]["sequences"])


@needs_browser
def test_fixture_gru_layers_and_no_tokens(driver, tmp_path):
    """A hand-written data file: no token input, a GRU layer without c, a layer with no
    embedded sequence, a missing value."""
    directory = tmp_path / "report"
    shutil.copytree(FIXTURE, directory)
    for name in ("explorer.js", "explorer.css"):
        shutil.copyfile(ASSETS / name, directory / name)
    data = open_page(driver, directory)
    initial = data["initial"]
    layer = layer_index(data, initial["layer"])
    check_text(driver, data, layer, initial["unit"], "c", initial["sequence"])
    Select(driver.find_element(By.ID, "sequence-select")).select_by_value("0")
    Select(driver.find_element(By.ID, "unit-select")).select_by_value("3")
    check_text(driver, data, layer, 3, "c", 0)  # holds the missing value
    shoot(driver, tmp_path / "1-lstm.png")

    gru = layer_index(data, "bi.forward")
    Select(driver.find_element(By.ID, "layer-select")).select_by_value(str(gru))
    options = [o.get_attribute("value") for o in Select(driver.find_element(By.ID, "quantity-select")).options]
    assert options == ["h", "z", "r", "n"]
    check_text(driver, data, gru, data["active_units"]["bi.forward"][0], "h", 0)
    select_span(driver, data, gru, 0, 3, 5)
    check_ranking(driver, data, gru, "h", 0, 3, 5)
    check_audit_jump(driver, data, gru)
    Select(driver.find_element(By.ID, "quantity-select")).select_by_value("z")
    check_text(driver, data, gru, page_state(driver)["unit"], "z", 0)
    check_ranking(driver, data, gru, "z", 0, 3, 5)
    lines = driver.find_elements(By.CSS_SELECTOR, "#gate-chart path.line")
    assert sorted(line.get_attribute("data-quantity") for line in lines) == ["n", "r", "z"]
    # A span at the start: nothing before it, a window after it.
    select_span(driver, data, gru, 0, 0, 1)
    check_ranking(driver, data, gru, "z", 0, 0, 1)
    shoot(driver, tmp_path / "2-gru.png")

    empty = layer_index(data, "empty")
    Select(driver.find_element(By.ID, "layer-select")).select_by_value(str(empty))
    assert driver.find_elements(By.CSS_SELECTOR, "#text .tok") == []
    assert "No sequence" in driver.find_element(By.ID, "text").text
    Select(driver.find_element(By.ID, "sequence-select")).select_by_value("2")
    shoot(driver, tmp_path / "3-empty.png")
    assert "3 of 40 sequences" in driver.find_element(By.ID, "sample-note").text
    assert_no_console_errors(driver)
