"""Per-service dependency sets (pyproject's extras): ingest and the console run without the
model stack, and a command that needs a set this installation lacks names the extra.

The images are the real check (tests/test_deploy_containers.py runs the ingest and console
images, which carry no torch); these run the same commands as processes with the model
stack's modules made unimportable, so a stray import shows up in the fast suite too.
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

from pdfs import Book, Heading, book_pdf, prose
from support import ROOT, base_env

from novelcrafter.cli import EXTRA_OF_MODULE

PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
MODEL_STACK = [module for module, extra in EXTRA_OF_MODULE.items() if extra in ("model", "all")]


def run_without(blocked: list[str], code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``code`` in a fresh interpreter where importing any of ``blocked`` fails as if absent."""
    guard = f"import sys\nfor name in {blocked!r}:\n    sys.modules[name] = None\n"
    return subprocess.run(
        [sys.executable, "-c", guard + code],
        env=base_env(),
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
    )


def extra_names(extra: str) -> set[str]:
    """Distribution names an extra brings, following novelcrafter[...] references."""
    names: set[str] = set()
    for requirement in PROJECT["optional-dependencies"][extra]:
        name = requirement.split(";")[0].split("[")[0]
        for stop in "<>=!~ ":
            name = name.split(stop)[0]
        if name == "novelcrafter":
            for inner in requirement.split("[", 1)[1].split("]")[0].split(","):
                names |= extra_names(inner.strip())
        else:
            names.add(name.lower())
    return names


def test_every_extra_named_by_the_cli_brings_that_module() -> None:
    distribution = {"pdfminer": "pdfminer.six", "fpdf": "fpdf2", "markdown_it": "markdown-it-py"}
    for module, extra in EXTRA_OF_MODULE.items():
        assert distribution.get(module, module).lower() in extra_names(extra), (module, extra)
    core = {r.split(">")[0].split("=")[0].split("<")[0].lower() for r in PROJECT["dependencies"]}
    assert not core & {"torch", "transformers", "pdfminer.six", "starlette", "matplotlib"}, core


def test_ingest_runs_without_the_model_stack(tmp_path: Path) -> None:
    pdf = tmp_path / "book.pdf"
    pdf.write_bytes(book_pdf(Book([Heading("CHAPTER I"), *prose(40)])))
    store = tmp_path / "store"
    code = (
        "from novelcrafter.cli import main\n"
        f"main(['ingest', {str(pdf)!r}, '--store', {str(store)!r}, '--parts', '2', '--json'])\n"
    )
    result = run_without(MODEL_STACK, code, tmp_path)
    assert result.returncode == 0, result.stderr
    assert '"book_id"' in result.stdout
    assert list(store.rglob("manifest.json")), "the book was not stored"


def test_the_console_and_ingest_servers_import_without_the_model_stack(tmp_path: Path) -> None:
    code = (
        "import novelcrafter.console.app, novelcrafter.console.server\n"
        "import novelcrafter.ingest.server, novelcrafter.coordinator.service\n"
        "print('ok')\n"
    )
    result = run_without(MODEL_STACK, code, tmp_path)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_a_command_whose_extra_is_missing_names_it(tmp_path: Path) -> None:
    code = "from novelcrafter.cli import main\nmain(['serve', 'inference', '--base-model', 'x'])\n"
    result = run_without(["torch"], code, tmp_path)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == (
        "error: this command needs torch, which this installation lacks: pip install 'novelcrafter[model]'"
    ), result.stderr
    assert "Traceback" not in result.stderr
