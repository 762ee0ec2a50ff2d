"""Safe by default: loopback without a token, no placeholder secrets, /metrics behind the token,
settings finite and in range, jobs limited to allowed base models and Hub pushes, login
attempts limited for all clients together.

Each service is the real ``novelcrafter serve …`` process; each refusal is one ``error:`` line
and exit status 1, before anything is served.
"""

from __future__ import annotations

import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import requests
from console_support import csrf_of, start_console
from novelcrafter.coordinator import job_config
from support import NOVELCRAFTER, Proc, base_env, free_port, run_cli, wait_port

from novelcrafter import config
from novelcrafter.config import SETTINGS_CLASSES, Settings, get_settings
from novelcrafter.errors import InvalidArgument
from novelcrafter.exposure import MIN_SECRET_CHARS, check_listen, weakness
from novelcrafter.metrics import metrics_listen
from novelcrafter.models import check_job_base_model, provision_base_model
from novelcrafter.train_settings import with_defaults
from novelcrafter.v1 import common_pb2

TOKEN = "safe-defaults-T0ken-for-tests-0b7e"

# One short command per service: each must refuse before it serves (or loads a model).
SERVE = {
    "ingest": lambda store, listen: ["serve", "ingest", "--store", store, "--listen", listen],
    "inference": lambda store, listen: ["serve", "inference", "--store", store, "--listen", listen],
    "console": lambda store, listen: ["serve", "console", "--listen", listen],
    "serve all": lambda store, listen: ["serve", "all", "--store", store, "--ingest-listen", listen],
}


def _one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    return errors[0]


# --- listeners ---------------------------------------------------------------------------------


def test_every_default_address_is_loopback() -> None:
    defaults = [
        config.DEFAULT_INGEST_LISTEN,
        config.DEFAULT_INFERENCE_LISTEN,
        config.DEFAULT_HTTP_LISTEN,
        config.DEFAULT_CONSOLE_LISTEN,
    ]
    assert all(address.startswith("127.0.0.1:") for address in defaults), defaults
    settings = Settings(_env_file=None)
    assert settings.auth_token is None and not settings.allow_unauthenticated
    for address in defaults:
        check_listen(address, "test", settings)  # no token needed on loopback
    # /metrics binds where its service binds; a trainer (no listener) on loopback.
    assert metrics_listen(settings, "trainer") == "127.0.0.1:9102"
    assert metrics_listen(settings, "ingest", "127.0.0.1:50051") == "127.0.0.1:9101"
    assert metrics_listen(settings, "inference", "0.0.0.0:50052") == "0.0.0.0:9103"
    assert metrics_listen(settings, "inference", "[::1]:50052") == "[::1]:9103"


@pytest.mark.integration
@pytest.mark.parametrize("service", sorted(SERVE))
def test_every_service_refuses_all_interfaces_without_a_token(service: str, tmp_path: Path) -> None:
    argv = SERVE[service](str(tmp_path / "store"), f"0.0.0.0:{free_port()}")
    line = _one_error_line(run_cli(*argv, timeout=120))
    assert "refusing to listen on 0.0.0.0:" in line
    assert "NOVELCRAFTER_AUTH_TOKEN" in line and "--allow-unauthenticated" in line, line


@pytest.mark.integration
def test_metrics_beyond_loopback_without_a_token_is_refused(tmp_path: Path) -> None:
    env = base_env(NOVELCRAFTER_METRICS_LISTEN=f"0.0.0.0:{free_port()}")
    argv = ["serve", "ingest", "--store", str(tmp_path / "store"), "--listen", f"127.0.0.1:{free_port()}"]
    line = _one_error_line(run_cli(*argv, env=env, timeout=120))
    assert "refusing to listen" in line and "/metrics" in line, line


@pytest.mark.integration
def test_allow_unauthenticated_serves_all_interfaces_with_a_warning(tmp_path: Path) -> None:
    port = free_port()
    argv = [NOVELCRAFTER, "serve", "ingest", "--store", str(tmp_path / "store"),
            "--listen", f"0.0.0.0:{port}", "--allow-unauthenticated"]  # fmt: skip
    proc = Proc(argv, base_env(NOVELCRAFTER_METRICS_LISTEN="off"), tmp_path / "ingest.log")
    try:
        wait_port(port, 60, proc.popen)
        deadline = time.monotonic() + 10
        while "WITHOUT authentication" not in proc.output() and time.monotonic() < deadline:
            time.sleep(0.1)
        warning = " W novelcrafter.exposure: listening beyond loopback WITHOUT authentication"
        assert warning in proc.output(), proc.output()  # W: a warning, in the text log format
    finally:
        assert proc.stop() == 0


# --- secrets -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value", ["change-me-auth-token", "change-me-minio-secret", "minioadmin", "CHANGEME", "short-token"]
)
def test_placeholders_and_short_secrets_are_weak(value: str) -> None:
    assert weakness(value)
    assert weakness("x" * (MIN_SECRET_CHARS - 1))
    assert weakness("7c1e0b5d9a2f4e6b8c0d") is None


@pytest.mark.integration
@pytest.mark.parametrize("service", ["ingest", "inference", "console", "trainer"])
def test_every_service_refuses_a_placeholder_token(service: str, tmp_path: Path) -> None:
    store = str(tmp_path / "store")
    argv = {"trainer": ["serve", "trainer", "--store", store]}.get(
        service, SERVE.get(service, lambda *_: [])(store, f"127.0.0.1:{free_port()}")
    )
    env = base_env(NOVELCRAFTER_AUTH_TOKEN="change-me-auth-token", NOVELCRAFTER_METRICS_LISTEN="off")
    line = _one_error_line(run_cli(*argv, env=env, timeout=120))
    assert "NOVELCRAFTER_AUTH_TOKEN is a documented placeholder" in line, line
    assert "change-me-auth-token" not in line  # the value itself is never echoed


@pytest.mark.integration
def test_a_short_token_and_a_placeholder_s3_secret_are_refused(tmp_path: Path) -> None:
    argv = ["serve", "ingest", "--store", str(tmp_path / "store"), "--listen", f"127.0.0.1:{free_port()}"]
    short = _one_error_line(run_cli(*argv, env=base_env(NOVELCRAFTER_AUTH_TOKEN="abc123"), timeout=120))
    assert f"shorter than {MIN_SECRET_CHARS} characters" in short, short
    s3 = base_env(
        NOVELCRAFTER_STORE="s3://bucket/prefix",
        NOVELCRAFTER_S3_ENDPOINT="127.0.0.1:1",
        AWS_ACCESS_KEY_ID="novelcrafter",
        AWS_SECRET_ACCESS_KEY="change-me-minio-secret",
    )
    line = _one_error_line(run_cli("serve", "trainer", env=s3, timeout=120))
    assert "AWS_SECRET_ACCESS_KEY is a documented placeholder" in line, line
    db = base_env(NOVELCRAFTER_DB="postgresql://novelcrafter:change-me-postgres-password@127.0.0.1:1/x")
    line = _one_error_line(
        run_cli("serve", "coordinator", "--store", str(tmp_path / "store"), env=db, timeout=120)
    )
    assert "the password in NOVELCRAFTER_DB is a documented placeholder" in line, line
    assert "change-me-postgres-password" not in line


# --- /metrics ----------------------------------------------------------------------------------


def _get(url: str, token: str | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@pytest.mark.integration
def test_metrics_need_the_token_when_one_is_set_and_health_stays_open(tmp_path: Path) -> None:
    port, metrics = free_port(), free_port()
    argv = [NOVELCRAFTER, "serve", "ingest", "--store", str(tmp_path / "store"),
            "--listen", f"127.0.0.1:{port}"]  # fmt: skip
    env = base_env(NOVELCRAFTER_AUTH_TOKEN=TOKEN, NOVELCRAFTER_METRICS_LISTEN=f"127.0.0.1:{metrics}")
    proc = Proc(argv, env, tmp_path / "ingest.log")
    try:
        wait_port(metrics, 60, proc.popen)
        base = f"http://127.0.0.1:{metrics}"
        assert _get(f"{base}/metrics")[0] == 401
        assert _get(f"{base}/metrics", "wrong-token-of-enough-length")[0] == 401
        status, body = _get(f"{base}/metrics", TOKEN)
        assert status == 200 and "novelcrafter_" in body
        assert _get(f"{base}/healthz") == (200, "ok\n")  # probes carry no token
    finally:
        proc.stop()
    assert TOKEN not in proc.output()


# --- settings ----------------------------------------------------------------------------------


def _numeric_settings() -> list[tuple[type[Settings], str]]:
    seen: dict[str, tuple[type[Settings], str]] = {}
    for cls in SETTINGS_CLASSES:
        for name, info in cls.model_fields.items():
            if info.annotation in (int, float, int | None, float | None):
                seen.setdefault(name, (cls, name))
    return sorted(seen.values(), key=lambda item: item[1])


@pytest.mark.parametrize("cls,name", _numeric_settings(), ids=lambda v: v if isinstance(v, str) else "")
@pytest.mark.parametrize("value", ["nan", "inf", "-1e30", "1e30"])
def test_numeric_settings_are_finite_and_in_range(
    cls: type[Settings], name: str, value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    variable = config.env_names(cls, name)[0]
    monkeypatch.setenv(variable, value)
    with pytest.raises(InvalidArgument, match=variable):
        get_settings(cls)


def test_every_numeric_setting_declares_its_range() -> None:
    for cls, name in _numeric_settings():
        metadata = cls.model_fields[name].metadata
        assert any(hasattr(m, "le") for m in metadata), f"{name} has no upper bound"
        assert any(hasattr(m, "ge") or hasattr(m, "gt") for m in metadata), f"{name} has no lower bound"


@pytest.mark.integration
def test_a_nan_upload_limit_stops_the_service_with_one_line(tmp_path: Path) -> None:
    argv = ["serve", "ingest", "--store", str(tmp_path / "store"), "--listen", f"127.0.0.1:{free_port()}"]
    line = _one_error_line(run_cli(*argv, env=base_env(NOVELCRAFTER_MAX_UPLOAD_MB="nan"), timeout=120))
    assert "NOVELCRAFTER_MAX_UPLOAD_MB" in line and "finite" in line, line
    flag = _one_error_line(run_cli("serve", "inference", "--max-concurrency", "0", timeout=120))
    assert "--max-concurrency" in flag, flag


# --- what a job may ask for --------------------------------------------------------------------


def _config(**fields: str) -> common_pb2.JobConfig:
    return with_defaults(common_pb2.JobConfig(**fields), base_model=config.DEFAULT_BASE_MODEL)


def test_a_job_base_model_is_a_registry_name_store_model_hub_id_or_allowed_folder(tmp_path: Path) -> None:
    allowed = tmp_path / "models"
    (allowed / "llama").mkdir(parents=True)
    (tmp_path / "secret").mkdir()
    settings = Settings(_env_file=None, model_dirs=str(allowed))
    for fine in ("smollm2-135m-instruct", "store:my-model", "meta-llama/Llama-3.2-1B-Instruct"):
        job_config.validate(_config(base_model=fine), settings)
    assert check_job_base_model(str(allowed / "llama"), settings) == str((allowed / "llama").resolve())
    for bad in (
        "/etc",
        str(tmp_path / "secret"),
        f"{allowed}/../secret",
        "../data",
        "./models",
        "~/models",
        "a/b/c",
        "store:../x",
    ):
        with pytest.raises(InvalidArgument, match="base_model"):
            job_config.validate(_config(base_model=bad), settings)
    # a symlink inside the allowed folder that points outside it is outside
    (allowed / "escape").symlink_to(tmp_path / "secret")
    with pytest.raises(InvalidArgument, match="outside NOVELCRAFTER_MODEL_DIRS"):
        check_job_base_model(str(allowed / "escape"), settings)
    # without NOVELCRAFTER_MODEL_DIRS a job names no folder at all
    with pytest.raises(InvalidArgument, match="NOVELCRAFTER_MODEL_DIRS"):
        check_job_base_model(str(allowed / "llama"), Settings(_env_file=None))


def test_a_trainer_never_reads_a_folder_a_job_names_outside_the_allowed_ones(tmp_path: Path) -> None:
    relative = tmp_path / "org" / "model"
    relative.mkdir(parents=True)
    (relative / "config.json").write_text("{}")
    settings = Settings(_env_file=None, home=tmp_path / "home", hf_endpoint="http://127.0.0.1:1")
    with pytest.raises(InvalidArgument, match=r"outside|NOVELCRAFTER_MODEL_DIRS"):
        provision_base_model(str(relative), settings, from_job=True)
    # The operator's own flag still names any folder.
    assert provision_base_model(str(relative), settings) == relative.resolve()


def test_hub_pushes_only_when_the_operator_allows_them() -> None:
    job = _config(hub_repo_id="someone/novel-adapter")
    with pytest.raises(InvalidArgument, match="NOVELCRAFTER_HUB_PUSH=1"):
        job_config.validate(job, Settings(_env_file=None))
    job_config.validate(job, Settings(_env_file=None, hub_push=True))
    scoped = Settings(_env_file=None, hub_push=True, hub_namespace="my-studio")
    with pytest.raises(InvalidArgument, match="namespace 'my-studio'"):
        job_config.validate(job, scoped)
    job_config.validate(_config(hub_repo_id="my-studio/novel-adapter"), scoped)


# --- console login -----------------------------------------------------------------------------


@pytest.mark.integration
def test_login_attempts_are_limited_for_all_clients_together(tmp_path: Path) -> None:
    console = start_console(tmp_path, "127.0.0.1:1", "127.0.0.1:1", env={"NOVELCRAFTER_AUTH_TOKEN": TOKEN})
    try:
        sessions = []
        for _ in range(40):  # 40 clients, each with its own session and CSRF token
            session = requests.Session()
            sessions.append((session, csrf_of(session.get(f"{console.url}/login").text)))
        answers: list[tuple[int, float]] = []
        started = time.monotonic()

        def guess(session: requests.Session, csrf: str) -> None:
            data = {"csrf": csrf, "token": "not-the-token-but-long-enough", "next": "/books"}
            status = session.post(f"{console.url}/login", data=data, allow_redirects=False).status_code
            answers.append((status, time.monotonic() - started))

        threads = [threading.Thread(target=guess, args=pair) for pair in sessions]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        checked = sorted(t for status, t in answers if status == 401)
        refused = [status for status, _ in answers if status == 429]
        print(f"40 parallel guesses: {len(checked)} checked over {checked[-1]:.1f} s, {len(refused)} refused")
        assert len(answers) == 40 and len(checked) + len(refused) == 40
        assert refused, "parallel guesses were not limited"
        # 5 per second for everyone: the n-th checked guess cannot end before (n - 1) / 5 s.
        assert all(t >= (i / 5.0) for i, t in enumerate(checked)), checked
        time.sleep(6)  # the window passes; the real token still logs in
        session = requests.Session()
        page = session.get(f"{console.url}/login")
        data = {"csrf": csrf_of(page.text), "token": TOKEN, "next": "/books"}
        assert session.post(f"{console.url}/login", data=data, allow_redirects=False).status_code == 303
    finally:
        console.stop()
