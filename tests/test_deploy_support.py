"""Readers for the deployment files (compose, Dockerfiles, kustomize), shared by the
deployment tests, and the tests of those readers themselves.

They read the files the way Docker and Kubernetes do, as far as the checks need:
compose variable interpolation (``${VAR:-default}``, ``${VAR:?error}``, ``$$``),
``env_file`` + ``environment``, Dockerfile instructions with line continuations,
``ARG`` defaults in ``FROM``, and ``kubectl kustomize`` output.
"""

from __future__ import annotations

import functools
import json
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from support import ROOT

COMPOSE_FILE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ("cpu", "gpu")
SCHEMAS = ROOT / "tests" / "schemas"
# The NovelCrafter services in docker-compose.yml, and the third-party ones beside them: the
# object store and its bucket job, the job coordinator's database, the GPU serving engine.
APP_SERVICES = ("coordinator", "ingest", "trainer", "trainer-gpu", "inference", "inference-gpu", "console")
INFRA_SERVICES = ("minio", "minio-init", "postgres", "vllm")
# Compose services that run another service's image (inference-gpu: inference with --engine
# vllm; coordinator: the ingest image's `serve coordinator`).
SAME_IMAGE_AS = {"inference-gpu": "inference", "coordinator": "ingest"}
DOCKERFILES = {
    "ingest": ROOT / "services" / "ingest" / "Dockerfile",
    "trainer": ROOT / "services" / "trainer" / "Dockerfile.cpu",
    "trainer-gpu": ROOT / "services" / "trainer" / "Dockerfile.gpu",
    "inference": ROOT / "services" / "inference" / "Dockerfile",
    "console": ROOT / "services" / "console" / "Dockerfile",
}

BUILD_SCRIPT = ROOT / "deploy" / "build-images.sh"


def built_images() -> dict[str, str]:
    """What `make images` builds (the table in deploy/build-images.sh): {image:latest: Dockerfile}."""
    table = BUILD_SCRIPT.read_text().split('IMAGES="', 1)[1].split('"', 1)[0]
    rows = [line.split() for line in table.splitlines() if line.strip()]
    return {f"{image}:latest": dockerfile for _, dockerfile, image in rows}


# --- compose interpolation ------------------------------------------------------------------

_VAR = re.compile(r"\$(?:(\$)|\{([^}]*)\}|([A-Za-z_][A-Za-z0-9_]*))")
_BRACED = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?+])(.*))?$", re.S)


class InterpolationError(ValueError):
    pass


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's variable substitution of one string (the rules of the compose specification)."""

    def replace(match: re.Match[str]) -> str:
        if match.group(1):
            return "$"  # $$ is a literal $
        if match.group(3):
            return env.get(match.group(3), "")
        inner = _BRACED.match(match.group(2))
        if not inner:
            raise InterpolationError(f"invalid interpolation format ${{{match.group(2)}}}")
        name, op, arg = inner.group(1), inner.group(2), inner.group(3) or ""
        value = env.get(name)
        unset_or_empty = value is None or (op is not None and op.startswith(":") and value == "")
        if op is None:
            return value or ""
        if op.endswith("-"):
            return interpolate(arg, env) if unset_or_empty else value
        if op.endswith("?"):
            if unset_or_empty:
                raise InterpolationError(f"required variable {name} is missing a value: {arg}")
            return value
        return "" if unset_or_empty else interpolate(arg, env)  # ":+" / "+"

    return _VAR.sub(replace, text)


def interpolate_tree(node: Any, env: dict[str, str]) -> Any:
    """Interpolate every string value (not keys) of a loaded YAML document."""
    if isinstance(node, dict):
        return {key: interpolate_tree(value, env) for key, value in node.items()}
    if isinstance(node, list):
        return [interpolate_tree(value, env) for value in node]
    if isinstance(node, str):
        return interpolate(node, env)
    return node


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines of a compose env file (comments and blank lines skipped)."""
    values: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise ValueError(f"{path.name}: not KEY=VALUE: {raw!r}")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key.strip()] = value
    return values


def commented_env_keys(path: Path) -> set[str]:
    """Keys of commented-out ``# KEY=value`` examples in an env file."""
    return set(re.findall(r"^#\s+([A-Z][A-Z0-9_]*)=", path.read_text(), flags=re.M))


@functools.cache
def dotenv_file() -> Path:
    """The ``.env`` a user has: what ``make env`` (deploy/make-env.sh) writes from
    ``.env.example``, with new secrets, into a folder of its own (never the checkout's)."""
    target = Path(tempfile.mkdtemp(prefix="dotenv-")) / ".env"
    subprocess.run([str(ROOT / "deploy" / "make-env.sh"), str(target)], check=True, capture_output=True)
    return target


def load_compose(dotenv: dict[str, str] | None = None) -> dict[str, Any]:
    """docker-compose.yml with YAML merge keys resolved and ``.env`` values interpolated
    (the ``.env`` that ``make env`` writes stands in for the user's)."""
    raw = yaml.safe_load(COMPOSE_FILE.read_text())
    return interpolate_tree(raw, read_env_file(dotenv_file()) if dotenv is None else dotenv)


def service_env(service: dict[str, Any]) -> dict[str, str]:
    """The environment compose gives a service's container (before the image's own ENV):
    its env_file(s) (``.env`` as ``make env`` writes it), then ``environment`` on top."""
    env: dict[str, str] = {}
    files = service.get("env_file", [])
    for entry in [files] if isinstance(files, (str, dict)) else files:
        name = entry if isinstance(entry, str) else entry["path"]
        path = dotenv_file() if name in (".env", "./.env") else ROOT / name
        env.update(read_env_file(path))
    environment = service.get("environment", {})
    if isinstance(environment, list):
        environment = dict(item.partition("=")[::2] for item in environment)
    env.update({key: "" if value is None else str(value) for key, value in environment.items()})
    return env


# --- Dockerfiles -----------------------------------------------------------------------------


@dataclass
class Stage:
    base: str  # the FROM image, ARG defaults substituted
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)  # (INSTRUCTION, arguments)

    def all(self, instruction: str) -> list[str]:
        return [args for name, args in self.instructions if name == instruction]

    def env(self) -> dict[str, str]:
        """The stage's ENV values (``KEY=VALUE`` pairs; ``$VAR`` references left as they are)."""
        values: dict[str, str] = {}
        for args in self.all("ENV"):
            for token in shlex.split(args):
                key, sep, value = token.partition("=")
                if sep:
                    values[key] = value
        return values

    def exec_form(self, instruction: str) -> list[str]:
        """The last ENTRYPOINT/CMD, which must be in exec (JSON) form."""
        args = self.all(instruction)[-1]
        return json.loads(args)


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order: comments dropped, continuations joined."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1].rstrip() + " "
            continue
        line = (pending + stripped).strip()
        pending = ""
        if line:
            name, _, args = line.partition(" ")
            instructions.append((name.upper(), args.strip()))
    return instructions


def dockerfile_stages(path: Path) -> list[Stage]:
    """The build stages of a Dockerfile, with global ARG defaults substituted into FROM."""
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for name, rest in dockerfile_instructions(path):
        if name == "ARG" and not stages:
            key, _, default = rest.partition("=")
            args[key] = default
        elif name == "FROM":
            words = rest.split()
            image = interpolate(words[0], args)
            alias = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            stages.append(Stage(image, alias))
        elif stages:
            stages[-1].instructions.append((name, rest))
    return stages


def copy_sources(args: str) -> list[str]:
    """Source paths of a COPY/ADD without --from (exec or shell form), flags skipped."""
    words = json.loads(args) if args.startswith("[") else shlex.split(args)
    words = [w for w in words if not w.startswith("--")]
    return words[:-1]


# --- kustomize -------------------------------------------------------------------------------


def kubectl() -> str:
    path = shutil.which("kubectl")
    if path is None:
        pytest.skip("kubectl is not installed: `kubectl kustomize` renders the overlays (CI has it)")
    return path


def kustomize(directory: Path) -> list[dict[str, Any]]:
    """Render a kustomization with ``kubectl kustomize`` (offline); its objects."""
    result = subprocess.run(
        [kubectl(), "kustomize", str(directory)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, f"kubectl kustomize {directory} failed:\n{result.stderr[-3000:]}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def pod_spec(obj: dict[str, Any]) -> dict[str, Any] | None:
    """The pod template spec of a workload object, or None."""
    if obj["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        return obj["spec"]["template"]["spec"]
    return None


# --- the CLI ---------------------------------------------------------------------------------

_PARSE_ARGV = r"""
import json, sys
import typer
from novelcrafter import cli

try:  # typer >= 0.2x carries its own copy of click
    from typer import _click as click
except ImportError:
    import click

cli._load_commands()
root = typer.main.get_command(cli.app)
results = []
for argv in json.loads(sys.argv[1]):
    args, cmd, path = list(argv), root, ["novelcrafter"]
    try:
        ctx = click.Context(root, info_name="novelcrafter")
        while hasattr(cmd, "get_command"):  # a group: descend into the named subcommand
            if not args:
                raise ValueError("a subcommand is missing")
            name = args.pop(0)
            sub = cmd.get_command(ctx, name)
            if sub is None:
                raise ValueError(f"no such command {name!r}")
            path.append(name)
            if (sub.help or "").startswith("(not available yet"):
                raise ValueError("the command is only a placeholder: its service is not built yet")
            cmd = sub
            if hasattr(cmd, "get_command"):
                ctx = click.Context(cmd, info_name=name, parent=ctx)
        cmd.make_context(" ".join(path), args, parent=ctx)  # parses and checks; runs nothing
        results.append(None)
    except (click.ClickException, ValueError) as exc:
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        results.append(f"`{' '.join(path)}`: {message}")
print(json.dumps(results))
"""


def cli_rejections(argvs: list[list[str]]) -> dict[str, str]:
    """Parse each argv (without the leading ``novelcrafter``) with the real CLI's parser, in a
    fresh process; returns ``{argv: why it is rejected}`` for the ones it does not accept."""
    unique = [list(a) for a in dict.fromkeys(tuple(a) for a in argvs)]
    result = subprocess.run(
        [sys.executable, "-c", _PARSE_ARGV, json.dumps(unique)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    verdicts = json.loads(result.stdout.strip().splitlines()[-1])
    return {" ".join(argv): why for argv, why in zip(unique, verdicts, strict=True) if why}


_LIST_ENVVARS = r"""
import functools
import json
import typer
from novelcrafter import cli

cli._load_commands()
names = set()
stack = [typer.main.get_command(cli.app)]
while stack:
    command = stack.pop()
    stack.extend(getattr(command, "commands", {}).values())
    for param in command.params:
        envvar = getattr(param, "envvar", None)
        names.update([envvar] if isinstance(envvar, str) else envvar or [])
print(json.dumps(sorted(names)))
"""


def cli_envvars() -> set[str]:
    """Environment variables that CLI options read directly (``typer.Option(envvar=…)``)."""
    result = subprocess.run(
        [sys.executable, "-c", _LIST_ENVVARS], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return set(json.loads(result.stdout.strip().splitlines()[-1]))


def settings_env_names() -> set[str]:
    """Every environment variable the settings read (``NOVELCRAFTER_<FIELD>`` or its alias), of
    every service (the declarations in novelcrafter.config)."""
    from novelcrafter.config import SETTINGS_CLASSES, env_names

    return {env for cls in SETTINGS_CLASSES for name in cls.model_fields for env in env_names(cls, name)}


def host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


def flag_value(argv: list[str], flag: str) -> str | None:
    """The value of ``--flag VALUE`` or ``--flag=VALUE`` in an argv."""
    for i, word in enumerate(argv):
        if word == flag and i + 1 < len(argv):
            return argv[i + 1]
        if word.startswith(flag + "="):
            return word.split("=", 1)[1]
    return None


# --- tests of the readers themselves ---------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("${A}", "a"),
        ("$A-$B", "a-"),
        ("${B:-dflt}", "dflt"),
        ("${E:-dflt}", "dflt"),
        ("${E-dflt}", ""),
        ("${B-dflt}", "dflt"),
        ("${A:+alt}", "alt"),
        ("${E:+alt}", ""),
        ("${E+alt}", "alt"),
        ("$$A and $${A}", "$A and ${A}"),
        ("${B:-x$A}", "xa"),
        ("x${A:?must be set}y", "xay"),
    ],
)
def test_interpolation_follows_the_compose_rules(text: str, expected: str) -> None:
    assert interpolate(text, {"A": "a", "E": ""}) == expected


@pytest.mark.parametrize("text", ["${B:?set B in .env}", "${E:?empty is not enough}", "${B?unset}"])
def test_interpolation_of_a_missing_required_variable_fails(text: str) -> None:
    with pytest.raises(InterpolationError):
        interpolate(text, {"E": ""})


def test_dockerfile_reader_joins_continuations_and_substitutes_args(tmp_path: Path) -> None:
    dockerfile = tmp_path / "Dockerfile"
    dockerfile.write_text(
        "# comment\nARG IMG=python:3.11.14-slim\nFROM ${IMG} AS build\nRUN a \\\n && b\n"
        'FROM ${IMG}\nENV A=1 \\\n    B="two words"\nCOPY --from=build /x /y\nCMD ["serve", "x"]\n'
    )
    build, final = dockerfile_stages(dockerfile)
    assert (build.base, build.name, build.all("RUN")) == ("python:3.11.14-slim", "build", ["a && b"])
    assert final.env() == {"A": "1", "B": "two words"}
    assert final.exec_form("CMD") == ["serve", "x"]
    assert copy_sources('--chown=1:1 a.txt "b c" /dst/') == ["a.txt", "b c"]
