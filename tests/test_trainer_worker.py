"""The worker against the real coordinator over gRPC (in this process), and the Hub push
against a local HTTP server that speaks the Hub endpoints huggingface_hub 2.4 calls.
Every Hub commit carries the version's model card, whose numbers are meta.json's (issue 13)."""

from __future__ import annotations

import base64
import json
import threading
import time
from collections import defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from huggingface_hub import ModelCard
from huggingface_hub.repocard_data import model_index_to_eval_results
from novelcrafter.trainer.hub import HubPusher
from novelcrafter.trainer.part import BaseModel
from novelcrafter.trainer.worker import Worker
from support import free_port
from test_trainer_helpers import one_torch_thread, write_book  # noqa: F401 (autouse)

from novelcrafter import adapters, layout
from novelcrafter.config import get_settings
from novelcrafter.store import open_store
from novelcrafter.v1 import common_pb2, jobs_pb2

BOOK = "0a1b2c3d4e5f6a7b"
TOKEN = "hf_test_token"


class FakeHub:
    """The Hub endpoints an adapter push uses: create repo, create branch, preupload, commit,
    README metadata validation, and model info (whose ``cardData`` is the parsed metadata of the
    revision's README.md).

    Every file is answered ``uploadMode: regular`` so its bytes arrive base64 in the commit
    (a real Hub may choose LFS for large files; the commit API is the same)."""

    def __init__(self) -> None:
        self.repos: set[str] = set()
        self.branches: dict[str, set[str]] = defaultdict(set)
        self.files: dict[tuple[str, str], dict[str, bytes]] = defaultdict(dict)  # (repo, rev) -> files
        self.commits: list[tuple[str, str, dict[str, bytes]]] = []  # (repo, rev, files of that commit)
        self.auth: set[str] = set()
        self.validated = 0  # README.md metadata checks passed
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _reply(self, code: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                hub.auth.add(self.headers.get("authorization", ""))
                parts = self.path.split("?")[0].strip("/").split("/")
                if len(parts) >= 6 and parts[:2] == ["api", "models"] and parts[4] == "revision":
                    repo, rev = f"{parts[2]}/{parts[3]}", "/".join(parts[5:])
                    if repo not in hub.repos or rev not in hub.branches[repo]:
                        return self._reply(404, {"error": "Repository or revision not found"})
                    files = hub.files.get((repo, rev), {})
                    body = {"id": repo, "sha": "b" * 40, "siblings": [{"rfilename": f} for f in files]}
                    if "README.md" in files:
                        body["cardData"] = ModelCard(files["README.md"].decode()).data.to_dict()
                    return self._reply(200, body)
                self._reply(404, {"error": f"no route {self.path}"})

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                hub.auth.add(self.headers.get("authorization", ""))
                path = self.path.split("?")[0]
                parts = path.strip("/").split("/")
                if path == "/api/validate-yaml":
                    # Like the Hub, for a commit with a README.md: its metadata must parse, and
                    # its model-index must read back as evaluation results.
                    try:
                        data = ModelCard(json.loads(body)["content"]).data.to_dict()
                        if "model-index" in data:
                            model_index_to_eval_results(data["model-index"])
                    except Exception as exc:
                        return self._reply(400, {"errors": [{"message": str(exc)}], "warnings": []})
                    hub.validated += 1
                    return self._reply(200, {"errors": [], "warnings": []})
                if path == "/api/repos/create":
                    payload = json.loads(body)
                    repo = f"{payload.get('organization') or 'me'}/{payload['name']}"
                    if repo in hub.repos:
                        # Like the Hub: 409 with the repo url (huggingface_hub reads it on exist_ok).
                        body = {"error": "You already created this model repo", "url": f"{hub.url}/{repo}"}
                        return self._reply(409, body)
                    hub.repos.add(repo)
                    hub.branches[repo].add("main")
                    return self._reply(200, {"url": f"{hub.url}/{repo}"})
                if len(parts) >= 6 and parts[:2] == ["api", "models"]:
                    repo, action, rev = f"{parts[2]}/{parts[3]}", parts[4], "/".join(parts[5:])
                    if repo not in hub.repos:
                        return self._reply(404, {"error": "Repository not found"})
                    if action == "branch":
                        if rev in hub.branches[repo]:
                            return self._reply(409, {"error": "Branch already exists"})
                        hub.branches[repo].add(rev)
                        return self._reply(200, {})
                    if rev not in hub.branches[repo]:
                        return self._reply(404, {"error": f"Revision {rev} not found"})
                    if action == "preupload":
                        files = json.loads(body)["files"]
                        return self._reply(
                            200,
                            {
                                "files": [
                                    {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                    for f in files
                                ]
                            },
                        )
                    if action == "commit":
                        committed = {}
                        for line in body.splitlines():
                            item = json.loads(line)
                            if item["key"] == "file":
                                value = item["value"]
                                committed[value["path"]] = base64.b64decode(value["content"])
                            elif item["key"] != "header":
                                return self._reply(400, {"error": f"unexpected {item['key']}"})
                        hub.files[(repo, rev)].update(committed)
                        hub.commits.append((repo, rev, committed))
                        return self._reply(
                            200, {"commitUrl": f"{hub.url}/{repo}/commit/x", "commitOid": "a" * 40}
                        )
                self._reply(404, {"error": f"no route {path}"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hub():
    server = FakeHub()
    yield server
    server.close()


@pytest.fixture(scope="module")
def base(base_model_dir: Path) -> BaseModel:
    from novelcrafter.models import load_base_model, load_tokenizer

    model, tokenizer = load_base_model(base_model_dir), load_tokenizer(base_model_dir)
    return BaseModel(model, tokenizer, "smollm2-135m-instruct", "cpu")


@pytest.fixture
def coordinator(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The real ingest server (IngestService + JobService) on a free port, in this process."""
    from novelcrafter.ingest.server import start_ingest_server

    monkeypatch.setenv("NOVELCRAFTER_METRICS_LISTEN", "off")
    monkeypatch.setenv("NOVELCRAFTER_HUB_PUSH", "1")  # these jobs push to a (local) Hub
    settings = get_settings(store=str(tmp_path / "store"))
    store = open_store(settings=settings)
    server = start_ingest_server(settings, listen="127.0.0.1:0", store=store, metrics=False)
    yield server, settings.with_overrides(coordinator=f"127.0.0.1:{server.port}")
    server.stop(grace=1)


def _config(**training) -> common_pb2.JobConfig:
    defaults = dict(
        epochs=1, grad_accum=2, max_length=96, max_steps_per_part=2, checkpoint_every=1, eval_max_chunks=1
    )
    return common_pb2.JobConfig(
        training=common_pb2.TrainingConfig(**{**defaults, **training}, eval_earlier_parts=True)
    )


def _card_numbers(card: ModelCard) -> dict[tuple[str, str], float]:
    return {(r.dataset_config, r.metric_name): r.metric_value for r in card.data.eval_results}


def _meta_numbers(meta: adapters.AdapterMeta) -> dict[tuple[str, str], float]:
    """The perplexities of meta.json, keyed as the card's model-index names them."""
    m, own = meta.metrics, f"part-{meta.part:02d}"
    numbers = {
        (own, "Perplexity (adapter)"): m["adapter_perplexity"],
        (own, "Perplexity (base model)"): m["base_perplexity"],
    }
    for part, value in m["earlier_perplexity"].items():
        numbers[(f"part-{int(part):02d}", "Perplexity (adapter)")] = value
    for who, name in (("adapter", "Perplexity (adapter)"), ("base", "Perplexity (base model)")):
        if "book_perplexity" in m:
            numbers[("book-so-far", name)] = m["book_perplexity"][who]
    return numbers


@pytest.mark.timeout(300)
def test_hub_push_sends_the_version_with_its_card_to_its_branch_and_main(hub: FakeHub, tmp_path: Path, base):
    """The upload path on its own: each part's published files (card included) land on its branch
    and on main; a late push of an older part of the job does not take main back."""
    from novelcrafter.trainer.lora import attach, detach

    from novelcrafter.train_settings import LoraSettings

    store = open_store(str(tmp_path / "store"))
    write_book(store, BOOK, parts=2, train_chunks=1, test_chunks=1)
    folders = []
    for part in range(2):
        model = attach(base.model, LoraSettings(r=4 + part))
        folder = tmp_path / f"adapter{part}"
        model.save_pretrained(str(folder))
        base.model = detach(model)
        metrics = {"base_perplexity": 30.5, "adapter_perplexity": 20.25 - part, "earlier_perplexity": {}}
        adapters.publish_adapter(
            store, folder, book_id=BOOK, job_id="j-00000000f00d", part=part,
            base_model="smollm2-135m-instruct", metrics=metrics,
        )  # fmt: skip
        (folder / "notes.txt").write_text("not a file of the version: never pushed")
        folders.append(folder)
    pusher = HubPusher(TOKEN, endpoint=hub.url, retries=2, backoff_seconds=0.1)
    for part in (0, 1, 0):  # the second push of part 0 stands for a retry that finished late
        pusher.push("me/austen-lora", part, folders[part])
    pusher.close(timeout=60)
    assert [(o.branch, o.ok, o.error) for o in pusher.outcomes] == [
        ("part-00", True, ""),
        ("part-01", True, ""),
        ("part-00", True, ""),
    ]
    repo = "me/austen-lora"
    assert set(hub.files) == {(repo, "part-00"), (repo, "part-01"), (repo, "main")}
    for part, folder in enumerate(folders):
        got = hub.files[(repo, f"part-{part:02d}")]
        assert set(got) == set(adapters.VERSION_FILES)
        for name in adapters.VERSION_FILES:
            assert got[name] == (folder / name).read_bytes()
    assert hub.files[(repo, "main")] == hub.files[(repo, "part-01")]  # the newest part, card and all
    assert [(rev, sorted(files)) for _, rev, files in hub.commits] == [
        (rev, sorted(adapters.VERSION_FILES)) for rev in ("part-00", "main", "part-01", "main", "part-00")
    ]
    assert hub.validated == len(hub.commits)
    assert hub.auth == {f"Bearer {TOKEN}"}


@pytest.mark.timeout(600)
def test_worker_trains_a_job_over_grpc_and_pushes_each_part(coordinator, hub, base, monkeypatch):
    server, settings = coordinator
    write_book(server.store, BOOK, parts=2, train_chunks=4, test_chunks=1)
    config = _config()
    config.hub_repo_id = "me/austen-lora"
    job = server.coordinator.create_job(BOOK, config)
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    worker = Worker(
        settings.with_overrides(hf_token=TOKEN),
        server.store,
        device="cpu",
        worker_id="w-1",
        max_parts=2,
        base=base,
    )
    assert worker.run() == 0

    done = server.coordinator.get_job(job.job_id)
    assert done.state == jobs_pb2.JOB_STATE_SUCCEEDED
    versions = [layout.adapter_version_id(job.job_id, i) for i in range(2)]
    assert [p.adapter_version for p in done.parts] == versions == worker.completed
    assert [m.version for m in adapters.list_versions(server.store, BOOK)] == versions
    for part in done.parts:
        metrics = part.metrics
        assert metrics.steps == 2 and len(metrics.loss_curve) == 2
        assert metrics.base_perplexity > 1 and metrics.adapter_perplexity > 1 and metrics.device == "cpu"
        assert part.checkpoint_key == layout.checkpoint_prefix(job.job_id, part.index, 2)
    assert list(done.parts[1].metrics.earlier_perplexity) == [0]
    stored = server.store.get_json(layout.part_metrics_key(job.job_id, 1))
    assert stored["metrics"]["loss_curve"] == pytest.approx(list(done.parts[1].metrics.loss_curve))
    events = list(server.coordinator.watch_job(job.job_id))
    phases = {e.progress.phase for e in events if e.HasField("progress")}
    assert {"train", "checkpoint", "eval", "publish"} <= phases

    # The Hub got exactly the published files of each part (model card included) on its own
    # branch, and main got the newest part's.
    repo = "me/austen-lora"
    assert set(hub.files) == {(repo, "part-00"), (repo, "part-01"), (repo, "main")}
    for index, version in enumerate(versions):
        got = hub.files[(repo, f"part-{index:02d}")]
        assert set(got) == set(adapters.VERSION_FILES)
        meta = adapters.read_meta(server.store, BOOK, version)
        for name in adapters.VERSION_FILES:
            assert got[name] == server.store.get(meta.prefix + name)
    assert hub.files[(repo, "main")] == hub.files[(repo, "part-01")]
    # Every commit carries the card; its numbers are the version's meta.json numbers.
    assert [rev for _, rev, _ in hub.commits] == ["part-00", "main", "part-01", "main"]
    for _, rev, files in hub.commits:
        card = ModelCard(files["README.md"].decode())
        meta = adapters.read_meta(server.store, BOOK, card.data.to_dict()["novelcrafter"]["version"])
        assert rev in (f"part-{meta.part:02d}", "main")
        assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
        assert card.data.library_name == "peft"
        assert _card_numbers(card) == _meta_numbers(meta)
        assert json.loads(files["adapter_config.json"])["base_model_name_or_path"] == card.data.base_model
    second = adapters.read_meta(server.store, BOOK, versions[1]).metrics
    assert list(second["earlier_perplexity"]) == ["0"]
    # The book so far: parts 0 and 1's held-out text, token-weighted, so between the two.
    own, earlier = second["adapter_perplexity"], second["earlier_perplexity"]["0"]
    assert min(own, earlier) <= second["book_perplexity"]["adapter"] <= max(own, earlier)
    first = adapters.read_meta(server.store, BOOK, versions[0]).metrics
    assert first["book_perplexity"] == {
        "base": first["base_perplexity"],
        "adapter": first["adapter_perplexity"],
    }


@pytest.mark.timeout(600)
def test_stopped_worker_releases_with_checkpoint_and_next_resumes_despite_dead_hub(
    coordinator, base, monkeypatch
):
    server, settings = coordinator
    write_book(server.store, BOOK, parts=1, train_chunks=8, test_chunks=1)
    config = _config(max_steps_per_part=2, checkpoint_every=100)  # only the stop writes a mid-part checkpoint
    config.hub_repo_id = "me/unreachable"
    job = server.coordinator.create_job(BOOK, config)

    first = Worker(settings, server.store, device="cpu", worker_id="w-stop", base=base)

    def stop_after_first_step() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and server.coordinator.get_job(job.job_id).parts[0].step < 1:
            time.sleep(0.05)
        first.request_stop()  # what SIGTERM does

    watcher = threading.Thread(target=stop_after_first_step, daemon=True)
    watcher.start()
    assert first.run() == 0
    watcher.join()
    part = server.coordinator.get_job(job.job_id).parts[0]
    assert part.state == jobs_pb2.PART_STATE_READY and part.attempts == 0  # released, not failed
    stopped_at = int(part.checkpoint_key.rstrip("/").rsplit("-", 1)[1])
    assert 1 <= stopped_at <= 2  # normally 1; 2 if the stop lands while it evaluates
    assert adapters.latest_version(server.store, BOOK) is None

    # The Hub is unreachable for the next worker: the push fails in the background, training does not.
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")
    second = Worker(
        settings.with_overrides(hf_token=TOKEN),
        server.store,
        device="cpu",
        worker_id="w-next",
        max_parts=1,
        base=base,
    )
    second.hub = HubPusher(TOKEN, retries=2, backoff_seconds=0.1)
    assert second.run() == 0
    done = server.coordinator.get_job(job.job_id)
    assert done.state == jobs_pb2.JOB_STATE_SUCCEEDED
    assert done.parts[0].metrics.steps == 2 and len(done.parts[0].metrics.loss_curve) == 2
    assert any(
        e.message.endswith(f"resuming from {part.checkpoint_key}")
        for e in server.coordinator.watch_job(job.job_id)
    )
    assert [(o.branch, o.ok) for o in second.hub.outcomes] == [("part-00", False)]
    assert "Connect" in second.hub.outcomes[0].error
