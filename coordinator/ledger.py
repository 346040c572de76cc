"""The ledger of verified contributions: peers, signed receipts, audits, bans and credits in one SQLite file (WAL).

Credits are the env steps of a peer's accepted receipts once it has passed an audit, and zero for a banned peer:
audits sample receipts, so a passed audit vouches for the receipts around it, and one failure past the strike
threshold voids all of them. A receipt whose audit found its parameters off the swarm's ('unmatched': the peer
missed an averaging round) is not credited, and is no strike.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS peers (
    peer_id TEXT PRIMARY KEY,
    public_key BLOB NOT NULL,
    name TEXT NOT NULL,
    device TEXT NOT NULL,
    libp2p_id TEXT NOT NULL DEFAULT '',
    joined REAL NOT NULL,
    strikes INTEGER NOT NULL DEFAULT 0,
    banned INTEGER NOT NULL DEFAULT 0,
    ban_reason TEXT NOT NULL DEFAULT '',
    banned_at REAL                 -- unix seconds
);
CREATE TABLE IF NOT EXISTS receipts (
    peer_id TEXT NOT NULL REFERENCES peers(peer_id),
    epoch INTEGER NOT NULL,
    batch INTEGER NOT NULL,
    env_steps INTEGER NOT NULL,
    work_s REAL NOT NULL,          -- collecting + computing, as the peer reports it
    received REAL NOT NULL,        -- unix seconds
    data BLOB NOT NULL,            -- the msgpack receipt as signed
    signature BLOB NOT NULL,
    audit TEXT,                    -- NULL (not sampled), 'pending', 'passed', 'failed', 'unmatched' or 'skipped'
    audit_detail TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (peer_id, epoch, batch)
);
"""


class Duplicate(Exception):
    """A receipt for this (peer, epoch, batch) is already in the ledger."""


class Ledger:
    """Thread-safe: one connection behind a lock (the gRPC threads write receipts, the main thread audits)."""

    def __init__(self, path: Path):
        self.db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")  # WAL: durable at checkpoints, never corrupt
        self.db.executescript(SCHEMA)
        self.lock = threading.Lock()

    def add_peer(self, peer_id: str, public_key: bytes, name: str, device: str, now: float) -> None:
        """Register a key, or update the name and device of a known one (strikes and bans stay)."""
        with self.lock:
            self.db.execute("INSERT INTO peers (peer_id, public_key, name, device, joined) VALUES (?, ?, ?, ?, ?) "
                            "ON CONFLICT(peer_id) DO UPDATE SET name = excluded.name, device = excluded.device",
                            (peer_id, public_key, name, device, now))

    def set_libp2p_id(self, peer_id: str, libp2p_id: str) -> None:
        with self.lock:
            self.db.execute("UPDATE peers SET libp2p_id = ? WHERE peer_id = ?", (libp2p_id, peer_id))

    def peer(self, peer_id: str) -> dict | None:
        with self.lock:
            row = self.db.execute("SELECT peer_id, public_key, name, device, libp2p_id, strikes, banned, ban_reason "
                                  "FROM peers WHERE peer_id = ?", (peer_id,)).fetchone()
        keys = ("peer_id", "public_key", "name", "device", "libp2p_id", "strikes", "banned", "ban_reason")
        return None if row is None else dict(zip(keys, row))

    def add_receipt(self, peer_id: str, epoch: int, batch: int, env_steps: int, work_s: float, now: float,
                    data: bytes, signature: bytes, audit: str | None) -> None:
        with self.lock:
            try:
                self.db.execute("INSERT INTO receipts (peer_id, epoch, batch, env_steps, work_s, received, data, "
                                "signature, audit) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                                (peer_id, epoch, batch, env_steps, work_s, now, data, signature, audit))
            except sqlite3.IntegrityError:
                raise Duplicate(f"a receipt for epoch {epoch} batch {batch} of peer {peer_id} was already accepted"
                                ) from None

    def receipt_counts(self, peer_id: str) -> tuple[int, int]:
        """(receipts accepted, audits passed) of a peer."""
        with self.lock:
            return self.db.execute("SELECT COUNT(*), COALESCE(SUM(audit = 'passed'), 0) FROM receipts "
                                   "WHERE peer_id = ?", (peer_id,)).fetchone()

    def record_audit(self, peer_id: str, epoch: int, batch: int, verdict: str, detail: str) -> int:
        """Store an audit's verdict ('passed', 'failed', 'unmatched' or 'skipped'); returns the peer's strikes."""
        with self.lock:
            self.db.execute("UPDATE receipts SET audit = ?, audit_detail = ? WHERE peer_id = ? AND epoch = ? "
                            "AND batch = ?", (verdict, detail, peer_id, epoch, batch))
            if verdict == "failed":
                self.db.execute("UPDATE peers SET strikes = strikes + 1 WHERE peer_id = ?", (peer_id,))
            return self.db.execute("SELECT strikes FROM peers WHERE peer_id = ?", (peer_id,)).fetchone()[0]

    def strike(self, peer_id: str) -> int:
        """A strike that is not a failed audit (what a peer sent into a round contradicts its receipts)."""
        with self.lock:
            self.db.execute("UPDATE peers SET strikes = strikes + 1 WHERE peer_id = ?", (peer_id,))
            return self.db.execute("SELECT strikes FROM peers WHERE peer_id = ?", (peer_id,)).fetchone()[0]

    def peer_by_libp2p_id(self, libp2p_id: str) -> str | None:
        with self.lock:
            row = self.db.execute("SELECT peer_id FROM peers WHERE libp2p_id = ?", (libp2p_id,)).fetchone()
        return row and row[0]

    def receipts(self, peer_id: str, first_epoch: int, last_epoch: int) -> list[bytes]:
        """The stored (signed) receipt bytes of a peer for epochs first_epoch..last_epoch."""
        with self.lock:
            return [r[0] for r in self.db.execute("SELECT data FROM receipts WHERE peer_id = ? AND epoch BETWEEN ? "
                                                  "AND ?", (peer_id, first_epoch, last_epoch))]

    def ban(self, peer_id: str, reason: str) -> None:
        with self.lock:
            self.db.execute("UPDATE peers SET banned = 1, ban_reason = ?, banned_at = ? WHERE peer_id = ?",
                            (reason, time.time(), peer_id))

    def banned_libp2p_ids(self) -> list[str]:
        with self.lock:
            return [r[0] for r in self.db.execute("SELECT libp2p_id FROM peers WHERE banned = 1 AND libp2p_id != ''")]

    def leaderboard(self) -> list[dict]:
        """Per peer, most credits first (see the module's docstring for what a credit is)."""
        query = """
            SELECT p.peer_id, p.name, p.device, p.banned,
                   COALESCE(SUM(r.env_steps), 0),
                   COALESCE(SUM(CASE WHEN r.audit IS NULL OR r.audit IN ('passed', 'pending', 'skipped')
                                THEN r.env_steps END), 0),
                   COALESCE(SUM(CASE WHEN r.audit = 'passed' THEN r.env_steps END), 0),
                   COUNT(CASE WHEN r.audit = 'passed' THEN 1 END),
                   COUNT(CASE WHEN r.audit = 'failed' THEN 1 END),
                   COALESCE(SUM(r.work_s), 0) / 3600.0
            FROM peers p LEFT JOIN receipts r ON r.peer_id = p.peer_id
            GROUP BY p.peer_id"""
        with self.lock:
            rows = self.db.execute(query).fetchall()
        board = []
        for peer_id, name, device, banned, claimed, creditable, verified, passed, failed, hours in rows:
            credits = 0 if banned or passed == 0 else creditable
            board.append(dict(peer_id=peer_id, peer_name=name, device=device, banned=bool(banned),
                              steps_claimed=claimed, steps_verified=verified, audits_passed=passed,
                              audits_failed=failed, credits=credits, device_hours=hours))
        return sorted(board, key=lambda row: (-row["credits"], -row["steps_claimed"], row["peer_id"]))

    def close(self) -> None:
        with self.lock:
            self.db.close()
