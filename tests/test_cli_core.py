"""The `novelcrafter` command: subcommands exist, and failures are one `error:` line."""

from __future__ import annotations

from support import run_cli


def test_help_lists_the_architecture_commands() -> None:
    out = run_cli("--help")
    assert out.returncode == 0
    for name in ("ingest", "train", "generate", "run", "serve", "status"):
        assert name in out.stdout
    serve = run_cli("serve", "--help")
    for name in ("ingest", "trainer", "inference", "all"):
        assert name in serve.stdout


def test_bad_base_model_is_one_error_line() -> None:
    out = run_cli("model", "provision", "--base-model", "no-such-model")
    assert out.returncode != 0
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert lines[-1].startswith("error: unknown base model")
    assert "Traceback" not in out.stderr
