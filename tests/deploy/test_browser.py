"""The Airflow UI in headless Chromium (Debian's ``chromium`` package, driven by Playwright).

1. Log in (simple auth manager), find ``llmrec_daily`` in the Dags list, open its trigger form,
   set the namespace, trigger; the run exists with the form's conf and its page shows. (It is then
   marked failed: the REST-triggered runs of the other tests cover the pipeline itself.)
2. The llmrec plugin page (Browse → "llmrec runs"): per version the metrics against the best
   baseline, the gate outcome, the promotion status and the HTML report link, which opens.
3. A production run into a second store (named only by its run conf): its asset event is that
   store's asset, and the plugin lists the store; selecting it shows the run's bundle as current.

Screenshots: ``test-artifacts/deploy/browser-*.png``. ``playwright install`` cannot download
browsers here: Playwright drives ``/usr/bin/chromium`` (``LLMREC_CHROMIUM`` overrides), and the
test skips when it is absent (``apt-get install -y chromium``).

Run: ``.venv/bin/python -m pytest -m integration tests/deploy -k browser``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from llmrec_tasks.airflow_glue import bundle_asset_uri, store_key
from tests.deploy.airflow_proc import ADMIN_PASSWORD, ADMIN_USER, skip_or_fail, wait_until
from tests.deploy.checks import (
    DAG_ID,
    PRODUCTION_DATE,
    bundle_versions,
    current_pointer,
    production_conf,
    run_and_wait,
)

pytestmark = pytest.mark.browser

CHROMIUM = os.environ.get("LLMREC_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
BROWSER_NAMESPACE = "exp-browser"
SECOND_STORE_DATE = "2026-11-02T00:00:00Z"  # not the default store's date: another version id
UI_TIMEOUT_MS = 30_000


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    if not Path(CHROMIUM).is_file():
        skip_or_fail(f"chromium not found at {CHROMIUM} (apt-get install -y chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        skip_or_fail("playwright (pip) is not installed")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def page(browser, local_airflow, artifacts_dir, request):
    """A logged-in page; on failure a screenshot ``browser-FAILED-<test>.png`` is kept."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000}, base_url=local_airflow.base_url)
    context.set_default_timeout(UI_TIMEOUT_MS)
    page = context.new_page()
    try:
        login(page)
        yield page
    finally:
        rep = getattr(request.node, "rep_call", None)  # set by conftest's makereport hook
        if rep is None or rep.failed:
            # Do not hide the test's own failure behind a failing screenshot.
            with contextlib.suppress(Exception):
                page.screenshot(
                    path=str(artifacts_dir / f"browser-FAILED-{request.node.name}.png"), full_page=True
                )
        context.close()


def login(page) -> None:
    page.goto("/", wait_until="networkidle")
    page.locator("input[name=username]").fill(ADMIN_USER)
    page.locator("input[name=password]").fill(ADMIN_PASSWORD)
    page.locator("button[type=submit]").click()
    page.get_by_role("button", name="Browse").wait_for()  # the UI's navigation: logged in


def shot(page, artifacts_dir: Path, name: str) -> Path:
    path = artifacts_dir / f"browser-{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def trigger_from_form(page, artifacts_dir: Path, namespace: str, attempts: int = 3) -> None:
    """Open the trigger form, expand its Namespace section, set the namespace and the data, submit.

    The DAG page re-renders when the DAG is re-parsed or runs change state, and that can close an
    open modal: then reload and start again. A form the UI refuses to submit fails at once."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    for attempt in range(attempts):
        try:
            page.get_by_test_id("trigger-dag-button").first.click()
            dialog = page.get_by_role("dialog")
            dialog.get_by_text("Namespace", exact=True).first.click(timeout=10_000)
            field = dialog.locator("#element_namespace")
            assert field.input_value(timeout=10_000) == "production"
            field.fill(namespace, timeout=10_000)
            dialog.get_by_text("Data source", exact=True).first.click(timeout=10_000)
            data = dialog.locator("#element_data_uri")
            assert data.input_value(timeout=5_000) == ""  # no default data source; its help says why
            dialog.get_by_text("Variable llmrec_data_uri", exact=False).first.wait_for(timeout=5_000)
            data.fill("sample", timeout=10_000)
            shot(page, artifacts_dir, "02-trigger-form")
            submit = dialog.get_by_role("button", name="Trigger", exact=True)
            if not submit.is_enabled(timeout=5_000):
                dialog.get_by_text("Data source", exact=True).click()
                shot(page, artifacts_dir, "02-trigger-form-invalid")
                pytest.fail(
                    "the trigger form cannot be submitted with its defaults (only namespace and data set); "
                    "see browser-02-trigger-form-invalid.png for the field the UI marks invalid"
                )
            submit.click(timeout=5_000)
            return
        except PlaywrightTimeout:
            shot(page, artifacts_dir, f"02-trigger-form-closed-{attempt}")
            page.reload(wait_until="networkidle")
    pytest.fail(f"could not submit the trigger form in {attempts} attempts (the modal kept closing)")


def test_find_dag_and_trigger_from_form(page, local_airflow, artifacts_dir):
    dep = local_airflow
    # A quiet DAG page: no backfill or run about to change state under the open form.
    wait_until(
        lambda: (
            all(
                b["completed_at"] for b in dep.api("GET", "backfills", params={"dag_id": DAG_ID})["backfills"]
            )
            and not [r for r in dep.dag_runs(DAG_ID) if r["state"] in ("queued", "running")]
        ),
        300,
        "earlier runs and backfills to finish",
        interval=3,
    )
    runs_before = {r["dag_run_id"] for r in dep.dag_runs(DAG_ID)}

    page.goto("/dags", wait_until="networkidle")
    page.get_by_placeholder("Search Dags").fill("llmrec")
    card_link = page.locator(f'a[href$="/dags/{DAG_ID}"]').first
    card_link.wait_for()
    shot(page, artifacts_dir, "01-dags-list")
    card_link.click()
    page.wait_for_url(f"**/dags/{DAG_ID}**")
    # Let the DAG page finish loading: a modal opened while its data still arrives can be closed
    # by the re-render.
    page.wait_for_load_state("networkidle")
    page.get_by_text("Overview", exact=True).first.wait_for()

    trigger_from_form(page, artifacts_dir, BROWSER_NAMESPACE)

    new_run = wait_until(
        lambda: next((r for r in dep.dag_runs(DAG_ID) if r["dag_run_id"] not in runs_before), None),
        60,
        "the run triggered from the form",
    )
    assert new_run["run_type"] == "manual", new_run
    assert new_run["conf"]["namespace"] == BROWSER_NAMESPACE, new_run["conf"]
    assert new_run["conf"]["data_uri"] == "sample", new_run["conf"]  # entered in the form
    shot(page, artifacts_dir, "03-triggered")

    # The UI shows the run with the conf from the form.
    page.goto(f"/dags/{DAG_ID}/runs/{new_run['dag_run_id']}", wait_until="networkidle")
    page.get_by_text(new_run["dag_run_id"]).first.wait_for()
    shot(page, artifacts_dir, "04-run-page")
    # The pipeline itself is covered by the REST-triggered runs; stop this one (as an operator would
    # with "Mark as failed") so that it does not compete for the two cores with the next tests.
    dep.api("PATCH", f"dags/{DAG_ID}/dagRuns/{new_run['dag_run_id']}", json={"state": "failed"})
    wait_until(
        lambda: all(
            t["state"] not in ("running", "queued", "scheduled")
            for t in dep.task_instances(DAG_ID, new_run["dag_run_id"])
        ),
        120,
        "the stopped run's tasks to end",
    )


def test_plugin_page_shows_versions_metrics_gate_and_report(
    page, local_airflow, artifacts_dir, sample_folder
):
    dep = local_airflow
    if current_pointer(dep.store_uri, "production") is None:  # run alone: publish one first
        run_and_wait(dep, production_conf(dep.store_uri, sample_folder), PRODUCTION_DATE)
    current = current_pointer(dep.store_uri, "production")["version"]

    page.goto("/dags", wait_until="networkidle")
    page.get_by_role("button", name="Browse").click()
    page.get_by_text("llmrec runs").click()
    page.wait_for_url("**/plugin/llmrec**")
    frame = page.frame_locator("iframe").first
    frame.get_by_test_id("current-version").wait_for()
    assert frame.get_by_test_id("current-version").inner_text().strip() == current

    row = frame.locator(f'tr[data-version="{current}"]')
    assert row.get_by_test_id("gate").inner_text().strip() == "passed"
    assert row.get_by_test_id("promotion").inner_text().strip() == "current"
    cells = row.locator("td").all_inner_texts()
    assert cells[2].strip() not in ("", "–"), f"no ranker metric shown: {cells}"
    assert cells[3].strip() not in ("", "–"), f"no baseline shown: {cells}"
    shot(page, artifacts_dir, "05-plugin-production")

    # The report link points at the report, which the plugin serves.
    href = row.get_by_test_id("report-link").get_attribute("href")
    assert href and urlsplit(href).path.rstrip("/").endswith(f"/report/production/{current}"), href
    assert parse_qs(urlsplit(href).query).get("store") == [store_key(dep.store_uri)], href
    report = page.context.new_page()
    report.goto(href if "://" in href else f"{dep.base_url}{href}")
    body = report.content()
    assert "<html" in body.lower() and len(body) > 500, body[:500]
    report.screenshot(path=str(artifacts_dir / "browser-06-report.png"), full_page=True)
    report.close()

    # Experiment namespaces (the backfill's, the browser run's) are listed next to production.
    namespaces = [ns for ns in ("exp-backfill-lr", BROWSER_NAMESPACE) if bundle_versions(dep.store_uri, ns)]
    if namespaces:
        ns = namespaces[0]
        frame.get_by_role("link", name=ns, exact=True).click()
        frame.get_by_test_id("namespace-current").filter(has_text=ns).wait_for()
        rows = frame.locator("tr[data-version]")
        assert rows.count() == len(bundle_versions(dep.store_uri, ns))
        shot(page, artifacts_dir, f"07-plugin-{ns}")

    # Clicking the links inside the UI's iframe: the iframe is sandboxed ("allow-scripts
    # allow-same-origin allow-forms allow-downloads": no popups, no top navigation), so a link
    # with target="_blank" or "_top" does nothing for the user.
    page.goto("/plugin/llmrec", wait_until="networkidle")
    frame = page.frame_locator("iframe").first
    row = frame.locator(f'tr[data-version="{current}"]')
    popups: list = []
    page.context.on("page", lambda p: popups.append(p))
    row.get_by_test_id("report-link").click()
    page.wait_for_timeout(3000)
    in_frame = any("/llmrec/report/" in f.url for f in page.frames)
    shot(page, artifacts_dir, "08-after-report-click")
    assert popups or in_frame, (
        "clicking the plugin's report link opens nothing: the Airflow UI's plugin iframe is sandboxed "
        "without allow-popups, so target=_blank is blocked (open the report in the frame instead)"
    )


def test_plugin_shows_a_second_store_after_selecting_it(page, local_airflow, artifacts_dir, sample_folder):
    dep = local_airflow
    second = (dep.work_dir / "store-b").as_uri()  # the deployment's default store is dep.store_uri
    run, _ = run_and_wait(dep, production_conf(second, sample_folder), SECOND_STORE_DATE)
    version = current_pointer(second, "production")["version"]
    default_current = current_pointer(dep.store_uri, "production")
    assert default_current is None or default_current["version"] != version

    # The promoted bundle's event is the second store's production asset, not the default store's.
    events = dep.api(
        "GET", "assets/events", params={"source_dag_id": DAG_ID, "source_run_id": run["dag_run_id"]}
    )["asset_events"]
    assert [e["uri"] for e in events] == [bundle_asset_uri(second, "production")], events
    assert events[0]["uri"] != bundle_asset_uri(dep.store_uri, "production")

    key = store_key(second)
    page.goto("/plugin/llmrec", wait_until="networkidle")
    frame = page.frame_locator("iframe").first
    frame.get_by_test_id("store-current").wait_for()
    assert frame.get_by_test_id("store-current").inner_text().strip() == store_key(dep.store_uri)
    assert frame.locator(f'tr[data-version="{version}"]').count() == 0  # not in the default store
    link = frame.locator(f'a[data-store="{key}"]')
    link.wait_for()  # listed: the run's conf named it
    shot(page, artifacts_dir, "09-plugin-stores")
    link.click()

    frame.get_by_test_id("store-current").filter(has_text=key).wait_for()
    assert frame.get_by_test_id("store-uri").inner_text().strip() == second
    assert frame.get_by_test_id("current-version").inner_text().strip() == version
    row = frame.locator(f'tr[data-version="{version}"]')
    assert row.get_by_test_id("gate").inner_text().strip() == "passed"
    assert row.get_by_test_id("promotion").inner_text().strip() == "current"
    href = row.get_by_test_id("report-link").get_attribute("href")
    assert href and href.endswith(f"/report/production/{version}?store={key}"), href
    shot(page, artifacts_dir, "10-plugin-second-store")
