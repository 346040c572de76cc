"""ListCheckpoints and DownloadCheckpoint: the run directory's signed packages, served as they are on disk.
The server verifies nothing: the client checks hash and signature against the key it was given."""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO, Iterator

import grpc

from hivegym.protocol import hivegym_pb2 as pb
from hivegym.protocol.checkpoint import CheckpointError, check_name, parse_manifest, weights_name
from hivegym.protocol.rpc import CHUNK_BYTES

MAX_LISTED = 100  # packages per ListCheckpoints reply (a run publishes a handful)


class CheckpointStore:
    def __init__(self, directory: Path | None):
        self.directory = directory

    def manifests(self) -> list[tuple[str, bytes]]:
        if self.directory is None or not self.directory.is_dir():
            return []
        out = []
        for path in sorted(self.directory.glob("*.json"))[:MAX_LISTED]:
            try:
                data = path.read_bytes()
                check_name(path.stem)
                parse_manifest(data)
            except (OSError, CheckpointError):
                continue  # half-written or foreign files are not offered
            out.append((path.stem, data))
        return out

    def list(self, request: pb.ListCheckpointsRequest, context: grpc.ServicerContext) -> pb.ListCheckpointsReply:
        return pb.ListCheckpointsReply(checkpoints=[pb.CheckpointEntry(name=name, manifest_json=data.decode())
                                                    for name, data in self.manifests()])

    def open(self, name: str, context: grpc.ServicerContext) -> tuple[bytes, dict, BinaryIO]:
        """The manifest and an open weights file of one package; retried while the package is being replaced."""
        path = None if self.directory is None else self.directory / f"{check_name(name)}.json"
        for _ in range(3):
            try:
                data = path.read_bytes() if path is not None else None
            except FileNotFoundError:
                data = None
            if data is None:
                context.abort(grpc.StatusCode.NOT_FOUND, f"no checkpoint named {name!r}; ListCheckpoints shows "
                                                         f"what there is")
            try:
                manifest = parse_manifest(data)
            except CheckpointError as e:
                context.abort(grpc.StatusCode.DATA_LOSS, f"checkpoint {name!r} is unusable on the coordinator: {e}")
            try:
                return data, manifest, open(self.directory / weights_name(name, manifest["weights"]["sha256"]), "rb")
            except FileNotFoundError:
                continue  # replaced between reading the manifest and opening its weights: read again
        context.abort(grpc.StatusCode.UNAVAILABLE, f"checkpoint {name!r} is being replaced; try again")

    def download(self, request: pb.DownloadCheckpointRequest, context: grpc.ServicerContext
                 ) -> Iterator[pb.CheckpointChunk]:
        data, manifest, f = self.open(request.name, context)
        with f:
            total = os.fstat(f.fileno()).st_size
            if request.sha256 and request.sha256 != manifest["weights"]["sha256"]:
                context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                              f"checkpoint {request.name!r} was replaced by a newer one; download it again from 0")
            if request.offset > total:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                              f"offset {request.offset} is past the end of the weights ({total} bytes)")
            offset, first = request.offset, True
            f.seek(offset)
            while first or offset < total:
                chunk = f.read(CHUNK_BYTES)
                yield pb.CheckpointChunk(manifest_json=data.decode() if first else "", total_bytes=total,
                                         offset=offset, data=chunk)
                offset, first = offset + len(chunk), False
                if not chunk:
                    break
