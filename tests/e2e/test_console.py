"""The web console (/console) in a real headless Chromium: Debian's `chromium`, driven by
Playwright against the system browser (never a downloaded one).

One server, one SDK training loop (forward_backward + optim_step a few times, a sampler
checkpoint), then in the browser: sign in with the key, open the run, see its loss curve (one
SVG vertex per optimizer step), the checkpoint, and a Playground chat; another key sees none
of it. Screenshots go to docs/console-*.png (docs/console.md shows them).
"""

import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from e2e_helpers import Server, adam, run_server, sft_datum

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DOCS = Path(__file__).resolve().parents[2] / "docs"
OWNER, OTHER = "tml-console-owner", "tml-console-other"
STEPS = 3
SEQS = [[5, 9, 13, 17, 21, 25, 29], [7, 11, 15, 19, 23]]
TIMEOUT_MS = 60_000

try:
    from playwright.sync_api import Browser, Page, expect, sync_playwright
except ImportError:  # pragma: no cover - the dev extra installs it
    sync_playwright = None


def _skip_reason() -> str | None:
    if sync_playwright is None:
        return "playwright is not installed (pip install -e '.[dev]')"
    if CHROMIUM is None:
        return "no system chromium (apt-get install chromium; .ci/run installs it as root)"
    return None


@dataclass(frozen=True)
class Trained:
    server: Server
    run_id: str
    sampler_path: str


@pytest.fixture(scope="module")
def trained(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Trained]:
    with run_server(tiny_model_dir, tmp_path_factory.mktemp("console")) as server:
        sc = server.client(OWNER)
        tc = sc.create_lora_training_client(base_model=server.model, rank=4, seed=3).result()
        for _ in range(STEPS):
            tc.forward_backward([sft_datum(s) for s in SEQS], "cross_entropy").result()
            tc.optim_step(adam(1e-2)).result()
        sampler_path = tc.save_weights_for_sampler("console").result().path
        yield Trained(server, tc.model_id, sampler_path)
        sc.close("success").result(timeout=10)


@pytest.fixture(scope="module")
def browser() -> Iterator["Browser"]:
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield b
        b.close()


def signed_in(browser: "Browser", server: Server, key: str) -> "Page":
    page = browser.new_page(viewport={"width": 1200, "height": 760})
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(f"{server.base_url}/console")
    page.fill("#api-key", key)
    page.click("#signin-form button[type=submit]")
    expect(page.locator("#tabs")).to_be_visible()
    return page


def api(server: Server, key: str, path: str) -> httpx.Response:
    return httpx.get(f"{server.base_url}{path}", headers={"X-API-Key": key}, timeout=30)


def test_metrics_endpoint(trained: Trained) -> None:
    r = api(trained.server, OWNER, f"/api/v1/console/training_runs/{trained.run_id}/metrics")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["steps"] == STEPS and body["training_run_id"] == trained.run_id
    fwd = [p for p in body["points"] if p["kind"] == "forward_backward"]
    opt = [p for p in body["points"] if p["kind"] == "optim_step"]
    assert [p["step"] for p in fwd] == list(range(STEPS))
    assert [p["step"] for p in opt] == list(range(STEPS))
    assert all(p["metrics"]["loss:sum"] > 0 for p in fwd)
    assert all(p["metrics"]["grad_norm"] > 0 for p in opt)
    seqs = [p["seq_id"] for p in body["points"]]
    assert seqs == sorted(seqs)
    # Training lowers the loss on the same data.
    assert fwd[-1]["metrics"]["loss:sum"] < fwd[0]["metrics"]["loss:sum"]


def test_metrics_and_status_are_per_user(trained: Trained) -> None:
    server = trained.server
    path = f"/api/v1/console/training_runs/{trained.run_id}/metrics"
    ghost = trained.run_id.replace(trained.run_id[:8], "00000000")
    theirs, unknown = (
        api(server, OTHER, path),
        api(server, OTHER, path.replace(trained.run_id, ghost)),
    )
    assert theirs.status_code == unknown.status_code == 404
    assert theirs.json()["detail"].replace(trained.run_id, "X") == unknown.json()["detail"].replace(
        ghost, "X"
    )
    assert api(server, "", path).status_code == 401
    status = api(server, OTHER, "/api/v1/console/status").json()
    assert [m["model"] for m in status["models"]] == [server.model]
    assert all(m["queue_depth"] >= 0 for m in status["models"])
    assert status["recent_errors"] == []
    assert api(server, OTHER, "/api/v1/console/samplers").json() == {"samplers": []}
    assert api(server, OWNER, "/console/static/..%2Fapp.py").status_code == 404


def test_console_shows_run_curve_checkpoint_and_chats(trained: Trained, browser: "Browser") -> None:
    server = trained.server
    page = signed_in(browser, server, OWNER)
    row = page.locator(f'#runs-table tr[data-run="{trained.run_id}"]')
    expect(row).to_be_visible()
    row.click()
    curve = page.locator('.chart[data-metric="loss:sum"] path.curve')
    expect(curve).to_have_attribute("data-points", str(STEPS))
    vertices = re.findall(r"[ML]", curve.get_attribute("d") or "")
    assert len(vertices) == STEPS
    grad = page.locator('.chart[data-metric="grad_norm"] path.curve')
    expect(grad).to_have_attribute("data-points", str(STEPS))
    expect(page.locator(f'#run-detail tr[data-path="{trained.sampler_path}"]')).to_be_visible()
    DOCS.mkdir(exist_ok=True)
    page.screenshot(path=str(DOCS / "console-run.png"))

    page.click('#tabs button[data-tab="checkpoints"]')
    expect(page.locator(f'#checkpoints-all tr[data-path="{trained.sampler_path}"]')).to_be_visible()
    page.click('#tabs button[data-tab="samplers"]')  # saving for a sampler made none
    expect(page.locator("#samplers-table tbody")).to_contain_text("None.")
    page.click('#tabs button[data-tab="sessions"]')
    expect(page.locator("#sessions-table tbody")).to_contain_text(trained.run_id)
    page.click('#tabs button[data-tab="status"]')
    expect(page.locator("#queue-table tbody")).to_contain_text(server.model)
    workers = page.locator("#replicas-table tbody tr")
    expect(workers).to_have_count(1)  # the in-process worker (Ray replicas: one row each)
    expect(workers.first).to_contain_text("ready")
    expect(workers.first).to_contain_text("in-process")

    page.click('#tabs button[data-tab="playground"]')
    expect(page.locator(f'#pg-model option[value="{trained.sampler_path}"]')).to_have_count(1)
    page.select_option("#pg-model", trained.sampler_path)
    page.fill("#pg-temperature", "0")
    page.fill("#pg-max-tokens", "8")
    page.fill("#pg-input", "Hello there")
    page.click("#pg-send")
    expect(page.locator(".msg.user")).to_have_text("Hello there")
    expect(page.locator(".msg.assistant")).to_have_count(1)
    assert page.locator("#pg-error").text_content() == ""
    page.screenshot(path=str(DOCS / "console-playground.png"))
    page.close()


def test_another_key_sees_none_of_it(trained: Trained, browser: "Browser") -> None:
    page = signed_in(browser, trained.server, OTHER)
    expect(page.locator("#runs-table tbody")).to_contain_text("No training runs yet.")
    assert page.locator("#runs-table tr[data-run]").count() == 0
    page.click('#tabs button[data-tab="checkpoints"]')
    expect(page.locator("#checkpoints-all tbody")).to_contain_text("None.")
    assert trained.run_id not in page.content()
    page.close()


def test_bad_key_is_refused(trained: Trained, browser: "Browser") -> None:
    page = browser.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(f"{trained.server.base_url}/console")
    page.fill("#api-key", "not-a-key")
    page.click("#signin-form button[type=submit]")
    expect(page.locator("#signin-error")).to_contain_text("401")
    expect(page.locator("#tabs")).to_be_hidden()
    page.close()
