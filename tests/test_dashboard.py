"""The dashboard: its real HTTP server next to the real gRPC server, hostile requests, a real headless browser."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from browser import chromium
from hivegym.coordinator.dashboard import MAX_POINTS, VERIFICATION_FIELDS, Dashboard
from hivegym.coordinator.server import PeerRecord, SwarmState
from hivegym.protocol.checkpoint import publish
from hivegym.protocol.identity import Identity
from hivegym.protocol.rpc import CoordinatorClient
from procs import start_coordinator, wait_for
from servers import SMALL, TestServer


def metric_row(epoch: int, eval_return: float | None = None, eval_epoch: int = 0) -> str:
    return json.dumps({"time": 1e9 + epoch, "wall_s": 3.0 * epoch, "epoch": epoch, "env_steps": 1000 * epoch,
                       "samples_per_second": 500.0, "peers": 2, "eval_return": eval_return,
                       "eval_epoch": eval_epoch}) + "\n"


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def status(dashboard: Dashboard) -> dict:
    code, body = get(dashboard.url + "api/status")
    assert code == 200, body
    return json.loads(body)


@pytest.fixture
def swarm(tmp_path):
    """A gRPC server and a dashboard over one SwarmState (with the verifier's ledger), two peers that joined and
    handed in real signed receipts over gRPC (alice 3, bob 1), a run directory."""
    (tmp_path / "coordinator").mkdir()
    server = TestServer(tmp_path / "coordinator", maddrs=["/ip4/127.0.0.1/tcp/1/p2p/x"])
    client = CoordinatorClient(server.address, timeout=5, retries=1)
    server.peers, server.sent_returns = {}, {}
    for name, batches in (("alice", 3), ("bob", 1)):
        identity = server.peers[name] = Identity.generate()
        client.join(name, "cpu", server.credentials(identity, name))
        for batch in range(batches):
            receipt = server.receipt(identity, batch=batch)
            client.submit_receipt(*receipt.sign(identity))
            server.sent_returns.setdefault(name, []).append([r for per_env in receipt.returns for r in per_env])
    with server.state.lock:
        server.state.epoch = 7
    dashboard = Dashboard(server.state, tmp_path, "127.0.0.1", 0, {"run_id": "test-run", "target_return": 475.0})
    dashboard.server_under_test = server
    try:
        yield dashboard
    finally:
        dashboard.close()
        client.close()
        server.close()


STEPS = SMALL.rollout_size  # env steps per receipt


def test_status_reports_swarm_peers_and_history(swarm, tmp_path):
    (tmp_path / "metrics.jsonl").write_text(
        metric_row(1) + metric_row(2) + metric_row(3, 20.0, 2) + metric_row(4, 20.0, 2) + metric_row(5, 90.0, 4))
    s = status(swarm)
    assert (s["epoch"], s["live_peers"], s["env_steps"], s["run_id"], s["target_return"]) == (7, 2, 4 * STEPS,
                                                                                             "test-run", 475.0)
    assert [p["name"] for p in s["peers"]] == ["alice", "bob"]
    peers = swarm.server_under_test.peers
    assert [p["peer_id"] for p in s["peers"]] == [peers["alice"].peer_id, peers["bob"].peer_id]
    alice = s["peers"][0]
    assert (alice["env_steps"], alice["samples"], alice["live"]) == (3 * STEPS, 3 * STEPS * SMALL.update_epochs,
                                                                     True)
    # the mean over the episodes that ended in alice's last receipt that had any (null if none ended: 16 steps)
    ended = [returns for returns in swarm.server_under_test.sent_returns["alice"] if returns]
    expected = sum(ended[-1]) / len(ended[-1]) if ended else None
    assert alice["mean_return"] == pytest.approx(expected) and (expected is None or expected > 0)
    # the verification fields come from the ledger: nothing audited yet
    assert {k: alice[k] for k in VERIFICATION_FIELDS} == {"audits_passed": 0, "audits_failed": 0, "credits": 0,
                                                          "banned": False}
    assert [h["env_steps"] for h in s["history"]] == [1000, 2000, 3000, 4000, 5000]
    # each evaluation is placed where its snapshot was taken (epochs 2 and 4), once
    assert s["evals"] == [{"epoch": 2, "return": 20.0, "wall_s": 6.0, "env_steps": 2000},
                          {"epoch": 4, "return": 90.0, "wall_s": 12.0, "env_steps": 4000}]
    assert s["checkpoints"] == [] and s["last_eval"] is None
    with swarm.state.lock:  # an evaluation that has not reached metrics.jsonl yet is plotted too
        swarm.state.last_eval_return, swarm.state.last_eval_epoch = 150.0, 5
    assert status(swarm)["evals"][-1] == {"epoch": 5, "return": 150.0, "wall_s": 15.0, "env_steps": 5000}


def test_verification_fields_follow_the_ledger(swarm):
    server = swarm.server_under_test
    alice, bob = (server.peers[name].peer_id for name in ("alice", "bob"))
    server.ledger.record_audit(alice, 0, 1, "passed", "replayed")  # a passed audit vouches for alice's receipts
    server.ledger.record_audit(bob, 0, 0, "failed", "diverged")
    server.ledger.ban(bob, "test")
    rows = {p["name"]: p for p in status(swarm)["peers"]}
    assert {k: rows["alice"][k] for k in VERIFICATION_FIELDS} == {"audits_passed": 1, "audits_failed": 0,
                                                                  "credits": 3 * STEPS, "banned": False}
    assert {k: rows["bob"][k] for k in VERIFICATION_FIELDS} == {"audits_passed": 0, "audits_failed": 1,
                                                                "credits": 0, "banned": True}


def test_peers_with_one_name_are_told_apart_by_peer_id(swarm):
    server = swarm.server_under_test
    other = Identity.generate()  # a second machine that calls itself alice too
    client = CoordinatorClient(server.address, timeout=5, retries=1)
    try:
        client.join("alice", "cuda", server.credentials(other, "alice"))
    finally:
        client.close()
    rows = [p for p in status(swarm)["peers"] if p["name"] == "alice"]
    assert sorted(p["peer_id"] for p in rows) == sorted([server.peers["alice"].peer_id, other.peer_id])
    new = next(p for p in rows if p["peer_id"] == other.peer_id)
    assert (new["device"], new["env_steps"], new["credits"]) == ("cuda", 0, 0)


def test_without_a_ledger_the_verification_fields_are_null(tmp_path):
    state = SwarmState("{}", [])
    state.peers["0123456789abcdef"] = PeerRecord("carol", "cpu", time.monotonic(), time.monotonic())
    dashboard = Dashboard(state, tmp_path, "127.0.0.1", 0, {})
    try:
        (row,) = status(dashboard)["peers"]
    finally:
        dashboard.close()
    assert (row["name"], row["peer_id"]) == ("carol", "0123456789abcdef")
    assert all(row[k] is None for k in VERIFICATION_FIELDS)


def test_metrics_are_read_incrementally_and_thinned(swarm, tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    assert status(swarm)["history"] == []  # no file yet
    rows = "".join(metric_row(e) for e in range(1, 3 * MAX_POINTS))
    metrics.write_text(rows + "not json\n" + metric_row(3 * MAX_POINTS)[:20])  # a half-written last line
    history = status(swarm)["history"]
    assert len(history) <= MAX_POINTS + 1 and history[-1]["env_steps"] == 1000 * (3 * MAX_POINTS - 1)
    with open(metrics, "a") as f:
        f.write(metric_row(3 * MAX_POINTS)[20:])  # the line completes
    assert status(swarm)["history"][-1]["env_steps"] == 1000 * 3 * MAX_POINTS
    with open(metrics, "a") as f:  # a restarted coordinator appends to the same file: only its run is shown
        f.write(metric_row(1) + metric_row(2, 50.0, 1))
    s = status(swarm)
    assert [h["env_steps"] for h in s["history"]] == [1000, 2000] and [e["epoch"] for e in s["evals"]] == [1]


def test_checkpoints_are_the_published_packages(swarm, tmp_path):
    folder = tmp_path / "checkpoints"
    manifest = {"name": "CartPole-v1-tiny", "role": "student", "size": "tiny", "env_id": "CartPole-v1",
                "architecture": {"hidden": [4]}, "params": 35, "param_share": 0.0076, "teacher": {"epoch": 40},
                "evaluation": {"mean_return": 480.0, "teacher_mean_return": 500.0, "return_share": 0.96}}
    signed = publish(folder, manifest, b"weights", Identity.generate())
    (folder / "broken.json").write_text("{not json")
    (folder / "shapeless.json").write_text(json.dumps({"name": "shapeless", "role": "student"}))
    (folder / "huge.json").write_text(json.dumps({**signed, "name": "huge", "pad": "x" * 100_000}))
    # well-shaped but with NaN: what cannot be JSON is shown as null, and the answer stays valid JSON
    (folder / "nan.json").write_text(json.dumps({**signed, "name": "nan"}).replace("480.0", "NaN"))
    rows = status(swarm)["checkpoints"]
    assert [r["name"] for r in rows] == ["CartPole-v1-tiny", "nan"]
    assert (rows[0]["params"], rows[0]["param_share"], rows[0]["teacher_epoch"]) == (35, 0.0076, 40)
    assert (rows[0]["eval_return"], rows[0]["teacher_return"], rows[0]["return_share"]) == (480.0, 500.0, 0.96)
    assert rows[0]["created"] is None  # a field the manifest lacks is null, not an error
    assert rows[1]["eval_return"] is None and rows[1]["return_share"] == 0.96


def test_only_get_of_known_paths(swarm):
    assert get(swarm.url)[0] == 200 and b"/api/status" in get(swarm.url)[1]
    assert get(swarm.url + "api/status?x=1")[0] == 200
    for path in ("nope", "api/status/", "api", "../etc/passwd", "dashboard.html", "%00"):
        assert get(swarm.url + path)[0] == 404, path
    request = urllib.request.Request(swarm.url + "api/status", data=b"{}", method="POST")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(request, timeout=10)
    assert e.value.code == 501


def test_garbage_from_the_network_does_not_stop_it(swarm):
    host, port = "127.0.0.1", swarm.port
    for junk in (b"\x00\xff" * 5000 + b"\r\n\r\n", b"GET\r\n\r\n", b"GET / HTTP/9.9\r\n\r\n",
                 b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\n\r\n", b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 200 + b"\r\n",
                 b""):
        with socket.create_connection((host, port), timeout=5) as s:
            s.sendall(junk)
            s.shutdown(socket.SHUT_WR)
            s.settimeout(5)
            while s.recv(65536):  # the server answers (or closes) and never hangs
                pass
    idle = socket.create_connection((host, port), timeout=5)  # a client that never sends a thing
    try:
        assert status(swarm)["epoch"] == 7
    finally:
        idle.close()


def test_busy_port_is_a_clear_error_and_close_frees_it(tmp_path):
    state = SwarmState("{}", [])
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(RuntimeError, match=rf"cannot start the dashboard on 127.0.0.1:{port} .*--dashboard-port"):
            Dashboard(state, tmp_path, "127.0.0.1", port, {})
    dashboard = Dashboard(state, tmp_path, "127.0.0.1", port, {})
    started = time.monotonic()
    dashboard.close()
    assert time.monotonic() - started < 2 and not dashboard.thread.is_alive()
    Dashboard(state, tmp_path, "127.0.0.1", port, {}).close()  # the port is free again


def test_default_port_falls_back_when_8080_is_taken(tmp_path):
    with socket.socket() as taken:
        try:
            taken.bind(("127.0.0.1", 8080))
            taken.listen()
        except OSError:
            pass  # taken already, which is what this test needs
        dashboard = Dashboard(SwarmState("{}", []), tmp_path, "127.0.0.1", None, {})
        try:
            assert dashboard.port != 8080 and get(dashboard.url)[0] == 200
        finally:
            dashboard.close()


def test_launch_with_busy_dashboard_port_exits_with_one_line(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "hivegym.coordinator.cli", "--run-dir", str(tmp_path),
                                 "--dashboard-port", str(port), "--log-level", "ERROR"],
                                capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert result.returncode == 1
    assert f"hivegym-launch: cannot start the dashboard on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr


def test_page_renders_in_a_browser(swarm, tmp_path):
    browser = chromium(tmp_path)
    (tmp_path / "metrics.jsonl").write_text("".join(metric_row(e, 10.0 * e, e) for e in range(1, 8)))
    dom = browser.dom(swarm.url)
    assert re.search(r'id="epoch">7<', dom), dom[:2000]
    assert chart_points(dom, "eval-time") == 7 and chart_points(dom, "eval-steps") == 7
    assert "<td>alice</td>" in dom and f"<td>{swarm.server_under_test.peers['alice'].peer_id}</td>" in dom
    assert "<td>no</td>" in dom  # the peer table's banned column, from the ledger
    browser.screenshot(swarm.url, tmp_path / "dashboard.png")


def chart_points(dom: str, chart_id: str) -> int:
    """Points drawn in the chart's polyline (0 if it drew none)."""
    match = re.search(rf'<svg id="{chart_id}"[^>]*>(.*?)</svg>', dom, re.S)
    assert match, f"no chart {chart_id}"
    line = re.search(r'<polyline[^>]* points="([^"]*)"', match.group(1))
    if not line:
        return 0
    coordinates = [tuple(map(float, p.split(","))) for p in line.group(1).split()]
    assert all(math.isfinite(x) and math.isfinite(y) for x, y in coordinates)
    return len(coordinates)


@pytest.mark.slow
def test_dashboard_of_a_real_run(tmp_path):
    """A coordinator with one local peer: after a short run the page shows its epoch and an evaluation chart."""
    browser = chromium(tmp_path)
    coordinator, _ = start_coordinator(tmp_path, "--local-peers", "1", "--max-minutes", "4")
    try:
        url = json.loads((tmp_path / "coordinator.json").read_text())["dashboard"]
        wait_for(lambda: len(json.loads(get(url + "api/status")[1])["evals"]) >= 2, 180, "two evaluations")
        before = json.loads(get(url + "api/status")[1])["epoch"]
        dom = browser.dom(url)
        after = json.loads(get(url + "api/status")[1])["epoch"]
        shown = int(re.search(r'id="epoch">(\d+)<', dom).group(1))
        assert before <= shown <= after
        assert chart_points(dom, "eval-time") >= 2 and chart_points(dom, "rate-time") >= 2
        assert re.search(r"<td>local-0</td>", dom)
        browser.screenshot(url, tmp_path / "dashboard.png")
    finally:
        coordinator.stop()


def test_a_receipt_with_huge_returns_does_not_break_the_answer(swarm):
    """Returns are finite one by one, so the receipt is accepted (an audit judges it later); their mean overflows."""
    server = swarm.server_under_test
    alice = server.peers["alice"]
    receipt = server.receipt(alice, batch=3)
    receipt = dataclasses.replace(receipt, returns=[[1e308, 1e308], []])
    client = CoordinatorClient(server.address, timeout=5, retries=1)
    try:
        client.submit_receipt(*receipt.sign(alice))
    finally:
        client.close()
    rows = {p["name"]: p for p in status(swarm)["peers"]}  # valid JSON: allow_nan=False would refuse inf
    assert rows["alice"]["mean_return"] is None and rows["alice"]["env_steps"] == 4 * STEPS
