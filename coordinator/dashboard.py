"""The coordinator's dashboard: /api/status (JSON) and / (one self-contained HTML page that polls it).

A stdlib ThreadingHTTPServer in a thread of its own, like the gRPC server: it reads SwarmState under its lock,
and metrics.jsonl and checkpoints/*.json from the run directory, and changes nothing.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from hivegym.coordinator.checkpoint_service import CheckpointStore
from hivegym.coordinator.server import LIVE_WINDOW_S, PeerRecord, SwarmState

logger = logging.getLogger(__name__)

DEFAULT_PORT = 8080  # when no port is given and 8080 is taken, any free port is used instead
PAGE = Path(__file__).with_name("dashboard.html")
MAX_POINTS = 600  # each history series is thinned to at most this many points per answer
# per-peer columns from the ledger's leaderboard (SwarmState.ledger); null where there is no ledger row
VERIFICATION_FIELDS = ("audits_passed", "audits_failed", "credits", "banned")
Points = list[dict[str, float]]


class MetricsTail:
    """metrics.jsonl, read incrementally: each call parses only the lines written since the last one."""

    def __init__(self, path: Path):
        self.path = path
        self.offset = 0
        self.history: Points = []
        self.evals: Points = []
        self.at_epoch: dict[int, tuple[float, int]] = {}  # epoch -> (wall_s, env_steps) when it was logged
        self.lock = threading.Lock()

    def read(self, last_eval: tuple[int, float] | None = None) -> tuple[Points, Points]:
        """(history, evaluations); last_eval (epoch, return) is the newest one, which reaches metrics.jsonl only
        with the next epoch's line."""
        with self.lock:
            try:
                with open(self.path, "rb") as f:
                    f.seek(self.offset)
                    data = f.read()
            except OSError:
                data = b""
            complete = data[: data.rfind(b"\n") + 1]  # a line still being written waits for the next call
            self.offset += len(complete)
            for line in complete.splitlines():
                try:
                    self.add(json.loads(line))
                except (ValueError, TypeError, KeyError):
                    logger.debug("skipping a malformed line of %s", self.path)
            if last_eval is not None:
                self.add_eval(*last_eval)
            return thin(self.history), list(self.evals)

    def add(self, row: dict[str, Any]) -> None:
        point = {"wall_s": float(row["wall_s"]), "env_steps": int(row["env_steps"]),
                 "samples_per_second": float(row["samples_per_second"]), "peers": int(row["peers"])}
        if self.history and point["wall_s"] < self.history[-1]["wall_s"]:  # a restart appended to the file
            self.history, self.evals, self.at_epoch = [], [], {}
        self.history.append(point)
        self.at_epoch[int(row["epoch"])] = (point["wall_s"], point["env_steps"])
        if row.get("eval_return") is not None:
            self.add_eval(int(row["eval_epoch"]), float(row["eval_return"]))

    def add_eval(self, epoch: int, mean_return: float) -> None:
        """An evaluation, plotted where its snapshot was taken (not where its result arrived), once."""
        if self.evals and self.evals[-1]["epoch"] >= epoch:
            return
        last = self.history[-1] if self.history else {"wall_s": 0.0, "env_steps": 0}
        wall_s, env_steps = self.at_epoch.get(epoch, (last["wall_s"], last["env_steps"]))
        self.evals.append({"epoch": epoch, "return": mean_return, "wall_s": wall_s, "env_steps": env_steps})


def thin(points: Points) -> Points:
    step = max(1, math.ceil(len(points) / MAX_POINTS))
    kept = points[::step]
    if points and kept[-1] is not points[-1]:
        kept.append(points[-1])
    return kept


def read_checkpoints(directory: Path) -> list[dict[str, Any]]:
    """The packages that ListCheckpoints offers, one flat row each (a value that is not plain JSON is null)."""
    rows = []
    for name, data in CheckpointStore(directory).manifests():
        m = json.loads(data)
        teacher, evaluation = (m.get(k) if isinstance(m.get(k), dict) else {} for k in ("teacher", "evaluation"))
        row = {"name": name, "role": m["role"], "size": m["size"], "env_id": m["env_id"], "params": m["params"],
               "param_share": m.get("param_share"), "created": m.get("created"), "teacher_epoch": teacher.get("epoch"),
               "eval_return": evaluation.get("mean_return"), "teacher_return": evaluation.get("teacher_mean_return"),
               # (return - random) / (teacher - random), see distill/dagger.py
               "return_share": evaluation.get("return_share")}
        rows.append({k: v if _plain(v) else None for k, v in row.items()})
    return rows


def _plain(value: Any) -> bool:
    """NaN or infinity would make the whole answer invalid JSON; nested values are not shown."""
    return value is None or isinstance(value, (str, int)) or (isinstance(value, float) and math.isfinite(value))


class Dashboard:
    def __init__(self, state: SwarmState, run_dir: Path, host: str, port: int | None, info: dict[str, Any],
                 shown_host: str | None = None):
        """Serve on host:port (port None: 8080, or any free port if that is taken). info goes into every
        answer as it is (run id, target...); shown_host is the host in `url`. Raises RuntimeError if the
        address cannot be bound."""
        self.state, self.info = state, info
        self.checkpoints = run_dir / "checkpoints"
        self.metrics = MetricsTail(run_dir / "metrics.jsonl")
        self.page = PAGE.read_bytes()
        try:
            self.server = _Server((host, DEFAULT_PORT if port is None else port), self)
        except OSError as e:
            if port is not None:
                raise RuntimeError(f"cannot start the dashboard on {host}:{port} ({e.strerror}); choose another "
                                   "--dashboard-port, 0 for any free port, or --no-dashboard") from None
            self.server = _Server((host, 0), self)
        self.port = self.server.server_address[1]
        self.url = f"http://{shown_host or host}:{self.port}/"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.2},
                                       name="dashboard", daemon=True)
        self.thread.start()

    def status(self) -> dict[str, Any]:
        board = {} if self.state.ledger is None else {r["peer_id"]: r for r in self.state.ledger.leaderboard()}
        now = time.monotonic()
        with self.state.lock:
            s = self.state
            answer = {
                **self.info, "epoch": s.epoch, "uptime_s": round(now - s.started, 1),
                "live_peers": len(s.live_peers(now)),
                "samples_per_second": round(s.samples_per_second(now), 1), "env_steps": s.env_steps(),
                "last_eval": None if s.last_eval_return is None else {"return": s.last_eval_return,
                                                                      "epoch": s.last_eval_epoch},
                "peers": [peer_row(pid, p, now, board.get(pid, {}))
                          for pid, p in sorted(s.peers.items(), key=lambda item: (item[1].name, item[0]))],
            }
        last = answer["last_eval"]
        answer["history"], answer["evals"] = self.metrics.read(last and (last["epoch"], last["return"]))
        answer["checkpoints"] = read_checkpoints(self.checkpoints)
        return answer

    def close(self, timeout: float = 2.0) -> None:
        self.server.shutdown()  # returns once serve_forever has left its loop (within poll_interval)
        self.server.server_close()
        self.thread.join(timeout)


def peer_row(pid: str, peer: PeerRecord, now: float, ledger_row: dict[str, Any]) -> dict[str, Any]:
    """mean_return is null until an episode ends, and where it overflowed: a receipt's returns are each finite, their
    mean need not be."""
    row = {"name": peer.name, "peer_id": pid, "device": peer.device, "live": now - peer.last_seen <= LIVE_WINDOW_S,
           "last_seen_s": round(now - peer.last_seen, 1), "joined_s": round(now - peer.joined, 1),
           "epoch": peer.epoch, "env_steps": peer.env_steps, "samples": peer.samples,
           "mean_return": peer.mean_return if math.isfinite(peer.mean_return) else None,
           "samples_per_second": round(peer.samples_per_second, 1)}
    return {**row, **{key: ledger_row.get(key) for key in VERIFICATION_FIELDS}}


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], dashboard: Dashboard):
        self.dashboard = dashboard
        super().__init__(address, _Handler)

    def handle_error(self, request, client_address) -> None:
        logger.debug("dashboard request from %s failed", client_address, exc_info=True)


class _Handler(BaseHTTPRequestHandler):
    server_version = "hivegym-dashboard"
    timeout = 10  # seconds a connection may sit idle before it is closed

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        if path == "/":
            self.reply(200, "text/html; charset=utf-8", self.server.dashboard.page)
        elif path == "/api/status":
            try:
                body = json.dumps(self.server.dashboard.status(), allow_nan=False).encode()
            except Exception:
                logger.warning("dashboard status failed", exc_info=True)
                self.reply(500, "text/plain; charset=utf-8", b"internal error\n")
                return
            self.reply(200, "application/json", body)
        else:
            self.reply(404, "text/plain; charset=utf-8", b"not found\n")

    def reply(self, code: int, content_type: str, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:
        logger.debug("dashboard %s: %s", self.address_string(), format % args)
