"""The web dashboard in a real browser (headless Chromium from Debian, driven by
Playwright with its executable path) against a real local cluster (real services on a
real nats-server), over HTTPS with a throwaway certificate:

- the page shows both nodes and who owns each group;
- a failover triggered from outside (node-a's services killed) changes the owner on the
  page without a reload (the live stream, Server-Sent Events), and the timeline shows
  the failover's events;
- an action from the page is refused without credentials (and over the API without a
  token or with a wrong one), works with an operator's token (maintenance on and off,
  a failback that moves the groups home, standby on and off that moves node-b's groups
  away, each seen on the page), and a refusal by the policy is shown with its reason;
- screenshots are saved (``VTLHA_SCREENSHOTS=DIR`` keeps them; docs/img/ holds one).
"""

from __future__ import annotations

import json
import os
import re
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import yaml
from playwright.sync_api import Page, expect, sync_playwright
from vtlha_dashboard import auth

from vtlha.messages import Event
from vtlha_lab.localcluster import LocalCluster, prepare_config
from vtlha_lab.tlsmaterial import make_tls

#: the operator tools' end-to-end tests: their own target (make test-ops, run by .ci/run)
pytestmark = pytest.mark.ops

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "cluster.yaml"
CHROMIUM = "/usr/bin/chromium"
#: PLATFORM.md, "Browser and metrics checks"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run"]
WAIT_MS = 30_000  # the longest any one thing may take to show on the page


def start_dashboard(c: LocalCluster, tmp_path: Path,
                    others: dict[str, str] | None = None) -> tuple[str, ssl.SSLContext, str]:
    """The dashboard on the witness, HTTPS, one operator (alice, NATS user operator) and
    ``others`` (token -> NATS user: operators named after their user); returns its URL, a
    TLS context trusting its CA, and alice's token."""
    tls = make_tls(tmp_path / "dashboard-tls", ["127.0.0.1"])
    token = auth.new_token()
    ops = tmp_path / "operators.yaml"
    ops.write_text(yaml.safe_dump({"operators": {
        "alice": {"token_sha256": auth.token_hash(token), "nats_user": "operator"},
        **{f"as-{user}": {"token_sha256": auth.token_hash(t), "nats_user": user}
           for t, user in (others or {}).items()}}}))
    port = c.cfg.port(c.cfg.witness.host, "dashboard")
    argv = [sys.executable, "-m", "vtlha_dashboard.main", "--config", str(c.config_path),
            "--node", c.cfg.witness.host, "--state-dir", str(c.state_root),
            "--nats", ",".join(c.client_urls()), "--http-port", str(port),
            "--tls-cert", tls["cert"], "--tls-key", tls["key"], "--operators", str(ops),
            "--refresh", "0.2"]
    path = os.pathsep.join(p for p in (str(ROOT / "services" / "dashboard"),
                                       os.environ.get("PYTHONPATH", "")) if p)
    c.procs.spawn(c.cfg.witness.host, "dashboard", argv, env={"PYTHONPATH": path})
    ctx = ssl.create_default_context(cafile=tls["ca"])
    url = f"https://127.0.0.1:{port}"
    c.wait_for(lambda: call(url, ctx, "GET", "/readyz")[0] == 200, 30, interval=0.1,
               what="the dashboard to be ready (it read the cluster's status)")
    return url, ctx, token


def call(url: str, ctx: ssl.SSLContext, method: str, path: str, body: Any = None,
         token: str | None = None) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url + path, method=method, headers=headers,
                                 data=None if body is None else json.dumps(body).encode())
    try:
        with urllib.request.urlopen(req, timeout=10, context=ctx) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def events_of(c: LocalCluster) -> list[Event]:
    """The stream's events, read on a thread of its own (``c.events`` runs an event loop,
    and Playwright's sync API has one running on this thread)."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(c.events).result(timeout=30)


def owner(page: Page, group: str) -> Any:
    return expect(page.locator(f'tr[data-group="{group}"] .owner'))


def shot(page: Page, tmp_path: Path, name: str) -> Path:
    d = Path(os.environ.get("VTLHA_SCREENSHOTS") or tmp_path / "screenshots")
    d.mkdir(parents=True, exist_ok=True)
    p = d / f"{name}.png"
    page.screenshot(path=str(p), full_page=True)
    assert p.stat().st_size > 10_000  # rendered, not blank
    return p


@pytest.mark.timeout(240)  # a cluster, a failover, a restart and a failback
def test_the_dashboard_follows_a_failover_live_and_acts_only_for_an_operator(
        local_cluster: LocalCluster, tmp_path: Path) -> None:
    c = local_cluster
    c.start()
    c.wait_for(c.home_held, 30, what="every group held by its home node")
    url, ctx, token = start_dashboard(c, tmp_path)
    homes = {g: home for g, (home, _) in c.cfg.groups().items()}

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            page = browser.new_context(ignore_https_errors=True,
                                       viewport={"width": 1400, "height": 1000}).new_page()
            loads: list[str] = []
            page.on("load", lambda p: loads.append(p.url))
            page.on("dialog", lambda d: d.accept())  # the page's "are you sure?"
            page.goto(url + "/")

            # ---- both nodes, every owner at home, live -------------------------------
            expect(page.locator("#live")).to_have_text("live", timeout=WAIT_MS)
            for n in ("node-a", "node-b"):
                expect(page.locator(f'tr[data-node="{n}"] .up')).to_have_text(
                    "up", timeout=WAIT_MS)
            for g, home in homes.items():
                owner(page, g).to_have_text(home, timeout=WAIT_MS)
            expect(page.locator("#arbiter")).to_contain_text("active arbiter witness")
            expect(page.locator("#timeline li").first).to_be_visible(timeout=WAIT_MS)
            shot(page, tmp_path, "dashboard-healthy")

            # ---- a failover from outside shows up without a reload ---------------------
            page.evaluate("window.vtlhaSamePage = true")
            killed_at = time.monotonic()
            assert c.crash("node-a")
            owner(page, "node-a-data").to_have_text("node-b", timeout=WAIT_MS)
            shown_s = time.monotonic() - killed_at
            owner(page, "node-a-mgmt").to_have_text("node-b", timeout=WAIT_MS)
            expect(page.locator('tr[data-node="node-a"] .up')).to_have_text(
                "DOWN", timeout=WAIT_MS)
            expect(page.locator('#timeline li[data-kind="failover.completed"]').first
                   ).to_be_visible(timeout=WAIT_MS)
            for g in ("node-a-data", "node-a-mgmt"):  # node-b's own reports say so
                expect(page.locator(f'tr[data-group="{g}"] .served')).to_have_text(
                    "served", timeout=WAIT_MS)
            assert page.evaluate("window.vtlhaSamePage") is True and len(loads) == 1
            print(f"owner of node-a-data shown on the page {shown_s:.2f} s after the kill")

            # ---- an action without credentials is refused -----------------------------
            pair = page.locator('section[data-pair="pair-1"]')
            pair.get_by_role("button", name="Maintenance on").click()
            expect(page.locator("#error")).to_contain_text("HTTP 401", timeout=WAIT_MS)
            expect(page.locator("#error")).to_contain_text("sign in")
            for tok in (None, "not-" + token):
                status, body = call(url, ctx, "POST", "/api/action/maintenance",
                                    {"pair": "pair-1", "on": True}, token=tok)
                assert status == 401 and body["ok"] is False, body
            assert call(url, ctx, "GET", "/api/whoami")[0] == 401
            expect(pair.locator(".maintenance")).to_have_text("maintenance off")
            assert not [e for e in events_of(c) if e.kind == "pair.maintenance"]

            # ---- with the operator's token it works --------------------------------------
            page.fill("#token", "wrong")
            page.click("#signin-btn")
            expect(page.locator("#error")).to_contain_text("Sign-in refused: unknown token")
            page.fill("#token", token)
            page.click("#signin-btn")
            expect(page.locator("#who")).to_have_text(
                "signed in as alice (NATS user operator)", timeout=WAIT_MS)
            pair.get_by_role("button", name="Maintenance on").click()
            expect(page.locator("#message")).to_contain_text("maintenance:", timeout=WAIT_MS)
            expect(pair.locator(".maintenance")).to_have_text("maintenance on",
                                                              timeout=WAIT_MS)
            expect(page.locator('#timeline li[data-kind="pair.maintenance"]').first
                   ).to_contain_text("[alice (dashboard)]", timeout=WAIT_MS)
            pair.get_by_role("button", name="Maintenance off").click()
            expect(pair.locator(".maintenance")).to_have_text("maintenance off",
                                                              timeout=WAIT_MS)

            # ---- a refusal by the policy says why ------------------------------------------
            page.locator('tr[data-group="node-b-data"]').get_by_role(
                "button", name="Switchover").click()
            expect(page.locator("#error")).to_contain_text("switchover refused (HTTP 409)",
                                                           timeout=WAIT_MS)
            expect(page.locator("#error")).to_contain_text("node-a")
            owner(page, "node-b-data").to_have_text("node-b")
            shot(page, tmp_path, "dashboard-failover")

            # ---- node-a back; failback from the page moves its groups home ------------------
            c.start_node("node-a")
            row = page.locator('tr[data-node="node-a"]')
            expect(row.locator(".up")).to_have_text("up", timeout=WAIT_MS)
            # the policy lets a node take its groups back once it reports every device
            # reachable, a healthy management path and its checks passing: the page too
            expect(row.locator(".storage")).to_have_text(re.compile(r"\d+ devices ok"),
                                                         timeout=WAIT_MS)
            expect(row.locator(".mgmt")).to_have_text("healthy", timeout=WAIT_MS)
            expect(row.locator(".checks")).to_have_text(re.compile(r"\d+ ok"),
                                                        timeout=WAIT_MS)
            pair.get_by_role("button", name="Failback").click()
            expect(page.locator("#message, #error").filter(has_text="failback")
                   ).to_be_visible(timeout=WAIT_MS)
            assert page.locator("#error").is_hidden(), page.locator("#error").text_content()
            for g in ("node-a-data", "node-a-mgmt"):
                owner(page, g).to_have_text("node-a", timeout=WAIT_MS)
            expect(page.locator('#timeline li[data-kind="failback.completed"]').first
                   ).to_be_visible(timeout=WAIT_MS)
            shot(page, tmp_path, "dashboard-failback")

            # ---- standby from the page: node-b's groups go to node-a and stay ---------------
            node_b = page.locator('tr[data-node="node-b"]')
            node_b.get_by_role("button", name="Standby on").click()
            expect(page.locator("#message")).to_contain_text("standby:", timeout=WAIT_MS)
            expect(pair.locator(".standby")).to_have_text("standby: node-b", timeout=WAIT_MS)
            for g in ("node-b-data", "node-b-mgmt"):
                owner(page, g).to_have_text("node-a", timeout=WAIT_MS)
            node_b.get_by_role("button", name="Standby off").click()
            expect(pair.locator(".standby")).to_have_text("none in standby", timeout=WAIT_MS)
            assert page.evaluate("window.vtlhaSamePage") is True and len(loads) == 1
        finally:
            browser.close()
    kinds = {(e.kind, e.data.get("operator")) for e in c.events()}
    for kind in ("pair.maintenance", "failback.started", "node.standby"):
        assert (kind, "alice (dashboard)") in kinds, kind


@pytest.mark.timeout(180)
def test_on_a_secured_bus_it_reads_as_its_own_user_and_acts_as_the_operators(
        tmp_path: Path) -> None:
    """A cluster as deployed (`vtlha deploy render`'s users and permissions, TLS): the
    dashboard reads as the read-only user ``dashboard`` (status and timeline filled,
    nothing refused), alice's action goes out as the NATS user ``operator`` and works,
    and an operator mapped to a user whose credential this host does not hold is told
    so (503) — the request is sent with the mapped user's credential or not at all."""
    path = prepare_config(EXAMPLE, tmp_path, cluster="dash-secured", single_server=True)
    c = LocalCluster(path, tmp_path)
    c.secure()
    try:
        c.start()
        c.wait_for(c.home_held, 40, what="every group held by its home node")
        admin_seed = Path(c.cfg.nats.credentials_dir or "") / "admin.nk"
        admin_seed.unlink()  # admin's credential stays offline (docs/deploy.md)
        other = auth.new_token()
        url, ctx, token = start_dashboard(c, tmp_path, {other: "admin"})
        st = call(url, ctx, "GET", "/status")[1]
        assert st["nats_auth"]["user"] == "dashboard" and st["nats_auth"]["tls"] is True
        c.wait_for(lambda: call(url, ctx, "GET", "/api/events")[1]["events"], 20,
                   what="the timeline to hold the cluster's events")
        status = call(url, ctx, "GET", "/api/status")[1]
        assert status["error"] is None
        owners = {g["name"]: g["owner"] for g in status["status"]["groups"]}
        assert owners == {g: home for g, (home, _) in c.cfg.groups().items()}

        code, body = call(url, ctx, "POST", "/api/action/maintenance",
                          {"pair": "pair-1", "on": True}, token=token)
        assert code == 200 and body["ok"] is True, body
        assert body["operator"] == "alice"
        code, body = call(url, ctx, "POST", "/api/action/maintenance",
                          {"pair": "pair-1", "on": False}, token=other)
        assert code == 503 and "no credential for NATS user admin" in body["error"], body
        c.wait_for(lambda: [e for e in c.events() if e.kind == "pair.maintenance"
                            and e.data.get("operator") == "alice (dashboard)"], 10,
                   what="the pair.maintenance event naming alice")
        with urllib.request.urlopen(url + "/", timeout=10, context=ctx) as r:
            csp = r.headers["Content-Security-Policy"]
            assert "script-src 'self'" in csp and "default-src 'none'" in csp
            assert r.headers["Strict-Transport-Security"]
        with urllib.request.urlopen(url + "/static/app.js", timeout=10, context=ctx) as r:
            assert r.headers["Content-Type"].startswith("text/javascript")
        for missing in ("/static/cluster.yaml", "/static/..%2fmain.py"):
            try:
                urllib.request.urlopen(url + missing, timeout=10, context=ctx)
                raise AssertionError(f"{missing} was served")
            except urllib.error.HTTPError as e:
                assert e.code == 404
        log = c.procs.find(c.cfg.witness.host, "dashboard").log_path.read_text()
        assert "permissions violation" not in log.lower()  # its own user was refused nothing
    finally:
        c.stop()


def test_operators_without_tls_or_a_bad_operators_file_refuse_to_start(tmp_path: Path) -> None:
    """Tokens travel over HTTPS only: --operators without a certificate is refused at
    start, as is an operators file with a mistake (one line naming it); exit 2."""
    path = prepare_config(EXAMPLE, tmp_path, cluster="dash-refused", single_server=True)
    ops = tmp_path / "operators.yaml"
    ops.write_text("operators:\n  alice: {token_sha256: abc}\n")
    tls = make_tls(tmp_path / "tls")
    base = [sys.executable, "-m", "vtlha_dashboard.main", "--config", str(path), "--node",
            "witness", "--state-dir", str(tmp_path / "state"), "--nats", "nats://127.0.0.1:9"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(ROOT / "services" / "dashboard"), os.environ.get("PYTHONPATH", ""))
        if p)}
    for extra, message in (
            (["--operators", str(ops)], "--operators needs --tls-cert and --tls-key"),
            (["--operators", str(ops), "--tls-cert", tls["cert"], "--tls-key", tls["key"]],
             f"{ops}: operators.alice.token_sha256: 64 lowercase hex digits"),
            (["--tls-cert", tls["cert"]], "--tls-cert and --tls-key go together")):
        out = subprocess.run([*base, *extra], capture_output=True, text=True, timeout=30,
                             env=env)
        assert out.returncode == 2, out.stderr
        assert message in out.stderr
