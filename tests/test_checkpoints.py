"""Checkpoint packages over real gRPC on 127.0.0.1: hivegym-pull and hivegym-play as real processes, every
refusal (tampered, truncated, wrongly signed) leaving no file, and bad DownloadCheckpoint requests."""

import json
import subprocess
import sys
from concurrent import futures

import grpc
import numpy as np
import pytest
from PIL import Image

from hivegym.coordinator.checkpoint_service import CheckpointStore
from hivegym.coordinator.server import _handler
from hivegym.distill.actor import Actor
from hivegym.distill.dagger import Distillation, RandomActor, Result, Settings
from hivegym.distill.package import manifests, publish_best
from hivegym.protocol import hivegym_pb2 as pb
from hivegym.protocol.checkpoint import sign_manifest, weights_name
from hivegym.protocol.identity import Identity, format_join
from hivegym.protocol.policy import build_policy
from hivegym.protocol.rollout import evaluate
from hivegym.protocol.rpc import SERVICE
from servers import TestServer

ENV = "CartPole-v1"
INVALID = grpc.StatusCode.INVALID_ARGUMENT


def publish_packages(directory, identity) -> dict:
    """The teacher (an untrained run policy) and a tiny student, published like the coordinator does."""
    settings = Settings(eval_episodes=3)
    teacher = Actor.from_teacher(build_policy(ENV, 64, 2, seed=0))
    student = Actor(4, 2, True, [4, 4])
    returns = lambda actor: evaluate(actor, ENV, settings.eval_episodes, settings.eval_seed)  # noqa: E731
    distillation = Distillation(returns(teacher), returns(RandomActor(ENV, 0)),
                                [Result("tiny", student, returns(student), 1, 0.1)])
    publish_best(directory, identity, manifests(ENV, teacher, 3, "test", distillation, settings))
    return {"teacher": teacher, "tiny": student}


class Coordinator:
    def __init__(self, directory, identity, store=None):
        self.directory, self.identity = directory, identity
        self.test_server = None
        if store is None:  # the real server: verifier, ledger (in a folder of its own) and these packages
            (directory.parent / "coordinator").mkdir(exist_ok=True)
            self.test_server = TestServer(directory.parent / "coordinator", checkpoints_dir=directory)
            self.server, port = self.test_server.server, self.test_server.port
        else:  # a misbehaving coordinator: our handlers around another store
            self.server = grpc.server(futures.ThreadPoolExecutor(2))
            handlers = {m: _handler(m, getattr(store, f)) for m, f in
                        [("ListCheckpoints", "list"), ("DownloadCheckpoint", "download")]}
            self.server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, handlers)])
            port = self.server.add_insecure_port("127.0.0.1:0")
            self.server.start()
        self.address = f"127.0.0.1:{port}"
        self.join = format_join(self.address, identity.public_key)
        self.channel = grpc.insecure_channel(self.address)

    def download(self, data: bytes) -> list[pb.CheckpointChunk]:
        call = self.channel.unary_stream(f"/{SERVICE}/DownloadCheckpoint",
                                         response_deserializer=pb.CheckpointChunk.FromString)
        return list(call(data, timeout=10))

    def close(self):
        self.channel.close()
        if self.test_server is not None:
            self.test_server.close()
        else:
            self.server.stop(None)


@pytest.fixture
def served(tmp_path):
    identity = Identity.generate()
    actors = publish_packages(tmp_path / "checkpoints", identity)
    coordinator = Coordinator(tmp_path / "checkpoints", identity)
    coordinator.actors = actors
    yield coordinator
    coordinator.close()


def run(module: str, *args, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hivegym.distill.cli", module, *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def pull(coordinator, *args) -> subprocess.CompletedProcess:
    return run("pull", "--coordinator", coordinator.join, "--retries", 2, "--timeout", 5, *args)


def refused(result, *words):
    assert result.returncode == 1, result
    errors = [line for line in result.stderr.splitlines() if line.startswith("hivegym-")]
    assert "Traceback" not in result.stderr and len(errors) == 1, result.stderr  # besides a progress bar
    for word in words:
        assert word in errors[0], result.stderr


def assert_nothing_in(directory):
    assert not directory.exists() or list(directory.iterdir()) == []


def weights_path(coordinator, name):
    manifest = json.loads((coordinator.directory / f"{name}.json").read_text())
    return coordinator.directory / weights_name(name, manifest["weights"]["sha256"])


def test_list_shows_every_signed_package(served):
    result = pull(served, "--list")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[:3] == ["name", "role", "params"]
    assert [line.split()[0] for line in lines[1:]] == ["CartPole-v1-tiny", "CartPole-v1-teacher"]  # by size


def test_pull_by_size_then_play_matches_the_student(served, tmp_path):
    out = tmp_path / "out"
    result = pull(served, "--size", "tiny", "-o", out)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["CartPole-v1-tiny.json", "CartPole-v1-tiny.pt"]
    played = run("play", out / "CartPole-v1-tiny.json", "--episodes", 4, "--seed", 7, "--key", served.join)
    assert played.returncode == 0, played.stderr
    line = json.loads(played.stdout)
    expected = evaluate(served.actors["tiny"], ENV, 4, 7)
    assert line["mean"] == pytest.approx(np.mean(expected)) and line["std"] == pytest.approx(np.std(expected))
    assert line["signature"] == "verified" and line["params"] == 4 * 4 + 4 + 4 * 4 + 4 + 4 * 2 + 2


def test_pull_best_takes_the_highest_return(served, tmp_path):
    result = pull(served, "--best", "-o", tmp_path)
    assert result.returncode == 0, result.stderr
    best = max(served.actors, key=lambda k: (np.mean(evaluate(served.actors[k], ENV, 3, 1_000_000)),
                                             -sum(p.numel() for p in served.actors[k].parameters())))
    assert (tmp_path / f"CartPole-v1-{best}.pt").exists()


def test_tampered_weights_are_refused_and_leave_nothing(served, tmp_path):
    path = weights_path(served, "CartPole-v1-teacher")
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    refused(pull(served, "CartPole-v1-teacher", "-o", tmp_path / "out"), "altered", "nothing was saved")
    assert_nothing_in(tmp_path / "out")


def test_truncated_weights_are_refused_and_leave_nothing(served, tmp_path):
    path = weights_path(served, "CartPole-v1-teacher")
    path.write_bytes(path.read_bytes()[:1000])
    refused(pull(served, "CartPole-v1-teacher", "-o", tmp_path / "out"), "1000", "truncated")
    assert_nothing_in(tmp_path / "out")


def test_manifest_signed_by_another_key_is_refused(served, tmp_path):
    path = served.directory / "CartPole-v1-tiny.json"
    path.write_text(json.dumps(sign_manifest(json.loads(path.read_text()), Identity.generate())))
    refused(pull(served, "CartPole-v1-tiny", "-o", tmp_path / "out"), "not signed by the coordinator key")
    assert_nothing_in(tmp_path / "out")
    listed = pull(served, "--list")
    assert "CartPole-v1-tiny" not in listed.stdout and "not listed: CartPole-v1-tiny" in listed.stderr


class CutShort(CheckpointStore):
    """Sends the first 100 bytes of the weights, then ends every stream as if all was sent."""

    def download(self, request, context):
        for chunk in super().download(request, context):
            if chunk.offset < 100:
                yield pb.CheckpointChunk(manifest_json=chunk.manifest_json, total_bytes=chunk.total_bytes,
                                         offset=chunk.offset, data=chunk.data[:100 - chunk.offset])
            return


class FailsOnce(CheckpointStore):
    """Sends 100 bytes, then fails with UNAVAILABLE, once; records the offsets asked for."""

    def __init__(self, directory):
        super().__init__(directory)
        self.offsets = []

    def download(self, request, context):
        self.offsets.append(request.offset)
        for chunk in super().download(request, context):
            if len(self.offsets) == 1:
                yield pb.CheckpointChunk(manifest_json=chunk.manifest_json, total_bytes=chunk.total_bytes,
                                         offset=0, data=chunk.data[:100])
                context.abort(grpc.StatusCode.UNAVAILABLE, "connection lost")
            yield chunk


def test_a_stream_cut_short_is_refused_and_leaves_nothing(served, tmp_path):
    cut = Coordinator(served.directory, served.identity, CutShort(served.directory))
    try:
        refused(pull(cut, "CartPole-v1-teacher", "-o", tmp_path / "out"), "ended at 100 of", "truncated")
    finally:
        cut.close()
    assert_nothing_in(tmp_path / "out")


def test_an_interrupted_download_resumes_from_its_offset(served, tmp_path):
    store = FailsOnce(served.directory)
    flaky = Coordinator(served.directory, served.identity, store)
    try:
        result = pull(flaky, "CartPole-v1-teacher", "-o", tmp_path)
    finally:
        flaky.close()
    assert result.returncode == 0, result.stderr
    assert store.offsets == [0, 100]
    served_bytes = weights_path(served, "CartPole-v1-teacher").read_bytes()
    assert (tmp_path / "CartPole-v1-teacher.pt").read_bytes() == served_bytes


def request(name="CartPole-v1-tiny", offset=0, sha256="") -> bytes:
    return pb.DownloadCheckpointRequest(name=name, offset=offset, sha256=sha256).SerializeToString()


@pytest.mark.parametrize("name", ["", "../CartPole-v1-tiny", "a/b", ".hidden", "x" * 81, "tiny\n", "..", "a..b"])
def test_bad_names_are_invalid_argument(served, name):
    with pytest.raises(grpc.RpcError) as info:
        served.download(request(name=name))
    assert info.value.code() == INVALID and "checkpoint name" in info.value.details()


def test_bad_download_requests_get_a_clear_status(served):
    size = weights_path(served, "CartPole-v1-tiny").stat().st_size
    cases = [(request(name="nothere"), grpc.StatusCode.NOT_FOUND, "no checkpoint named"),
             (request(offset=-1), INVALID, "offset must be >= 0"),
             (request(offset=size + 1), INVALID, "past the end"),
             (request(sha256="abc"), INVALID, "sha256"),
             (request(sha256="0" * 64), grpc.StatusCode.FAILED_PRECONDITION, "replaced"),
             (b"\xff\xff\xff", INVALID, "not a valid DownloadCheckpointRequest")]
    for data, code, words in cases:
        with pytest.raises(grpc.RpcError) as info:
            served.download(data)
        assert info.value.code() == code and words in info.value.details(), (data, info.value)
    last = served.download(request(offset=size))  # a finished download: the manifest and no bytes
    assert len(last) == 1 and last[0].data == b"" and last[0].manifest_json


def test_download_resumes_at_any_offset(served):
    whole = weights_path(served, "CartPole-v1-teacher").read_bytes()
    chunks = served.download(request(name="CartPole-v1-teacher", offset=1234))
    assert chunks[0].offset == 1234 and b"".join(c.data for c in chunks) == whole[1234:]


def test_play_refuses_altered_weights_and_a_wrong_key(served, tmp_path):
    assert pull(served, "CartPole-v1-tiny", "-o", tmp_path).returncode == 0
    other = format_join(served.address, Identity.generate().public_key)
    refused(run("play", tmp_path / "CartPole-v1-tiny", "--key", other), "not signed by the coordinator key")
    weights = tmp_path / "CartPole-v1-tiny.pt"
    weights.write_bytes(weights.read_bytes() + b"\0")
    refused(run("play", tmp_path / "CartPole-v1-tiny.pt"), "bytes; the manifest says")


def test_play_records_a_gif(served, tmp_path):
    assert pull(served, "CartPole-v1-tiny", "-o", tmp_path).returncode == 0
    gif = tmp_path / "episode.gif"
    result = run("play", tmp_path / "CartPole-v1-tiny.json", "--episodes", 1, "--record", gif)
    assert result.returncode == 0, result.stderr
    frames = json.loads(result.stdout)["recorded"]["frames"]
    assert frames == json.loads(result.stdout)["mean"] + 1  # CartPole: reward 1 per step, plus the reset frame
    with Image.open(gif) as image:
        assert image.format == "GIF" and image.size == (600, 400) and image.n_frames > 1


def test_pull_needs_the_key_in_the_join_string(served):
    result = run("pull", "--coordinator", served.address, "--list")
    refused(result, "key is missing")


@pytest.mark.parametrize("module, prog", [("pull", "hivegym-pull"), ("play", "hivegym-play")])
def test_help_is_instant(module, prog):
    code = f"""
import sys
from hivegym.distill.cli import {module}_main
try:
    {module}_main(["--help"])
except SystemExit as e:
    assert e.code == 0, e.code
heavy = sorted(m for m in ("torch", "hivemind", "gymnasium", "grpc", "numpy", "cryptography") if m in sys.modules)
assert not heavy, heavy
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert run(module, "--help").stdout.startswith(f"usage: {prog}")
