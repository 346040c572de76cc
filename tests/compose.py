"""docker/compose.yaml read as the commands its services run, so tests can run them without Docker."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker" / "compose.yaml"


def load() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def dockerfile(service: dict) -> Path:
    build = service["build"]
    return (COMPOSE.parent / build["context"] / build["dockerfile"]).resolve()


def instructions(path: Path, keyword: str) -> list[str]:
    """The arguments of every `keyword` instruction of a Dockerfile (continuation lines joined)."""
    text = path.read_text().replace("\\\n", " ")
    return [line.split(None, 1)[1].strip() for line in text.splitlines() if line.upper().startswith(keyword + " ")]


def entrypoint(service: dict) -> str:
    """The console script the service's image runs (its Dockerfile's ENTRYPOINT, exec form)."""
    [line] = instructions(dockerfile(service), "ENTRYPOINT")
    [script] = json.loads(line)
    return script


def module(script: str) -> str:
    """The module behind a console script, from pyproject.toml (e.g. hivegym-join -> hivegym.peer.cli)."""
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    return scripts[script].split(":")[0]


def commands(replace: dict[str, str]) -> dict[str, list[str]]:
    """{service: [module, *arguments]} with every key of `replace` replaced in every argument, in order."""
    found = {}
    for name, service in load()["services"].items():
        args = [str(a) for a in service["command"]]
        for old, new in replace.items():
            args = [a.replace(old, new) for a in args]
        found[name] = [module(entrypoint(service)), *args]
    return found
