"""The playground at ``/`` in a real headless Chromium: type a prompt, submit it as a job, watch the progress bar
fill from the event stream, and see the image appear (the same image the API stores for that job)."""
import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install -e '.[serve]'")
pytest.importorskip("uvicorn", reason="the serve extra is not installed: pip install -e '.[serve]'")
httpx = pytest.importorskip("httpx", reason="the serve extra is not installed: pip install -e '.[serve]'")

from .browser import Browser, find_chromium  # noqa: E402
from .serve_helpers import live, models  # noqa: E402,F401  (fixtures)

CHROMIUM = find_chromium()


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (Debian: apt-get install chromium)")
def test_playground_submits_a_prompt_and_shows_the_image(live, tmp_path):
    url = live(max_wait_ms=0)
    browser = Browser(CHROMIUM, tmp_path / "profile")
    try:
        browser.open(url + "/")
        browser.wait_for("document.readyState === 'complete' && !!document.getElementById('go')")
        browser.js("document.getElementById('prompt').value = 'a blue star on the right';"
                   "document.getElementById('steps').value = '40'; document.getElementById('seed').value = '4';"
                   "document.getElementById('go').click()")
        widths = set()
        for _ in range(600):                    # the bar moves while the job runs (sampled, not timed)
            state = browser.js("[document.getElementById('fill').style.width,"
                               " !!document.querySelector('#out img.result')]")
            widths.add(state[0])
            if state[1]:
                break
        src = browser.wait_for("(() => { const i = document.querySelector('#out img.result');"
                               " return i && i.complete && i.naturalWidth > 0 ? i.getAttribute('src') : null })()")
        status = browser.js("document.getElementById('status').textContent")
        widths.add(browser.js("document.getElementById('fill').style.width"))
        rows = browser.wait_for("document.querySelectorAll('#queue tbody tr').length")
        browser.screenshot(tmp_path / "playground.png")
    finally:
        browser.close()
    assert status.startswith("done: seed 4"), status
    assert "100%" in widths and len(widths - {"", "0px", "0", "100%"}) >= 1, widths   # partial progress was shown
    job_id = src.split("/")[3]
    job = httpx.get(f"{url}/v1/jobs/{job_id}").json()
    assert job["status"] == "succeeded" and job["input"]["prompt"] == "a blue star on the right"
    assert httpx.get(url + src).content[:4] == b"\x89PNG" and rows >= 1
    assert (tmp_path / "playground.png").stat().st_size > 1000
