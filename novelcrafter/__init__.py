"""NovelCrafter: LoRA adapters that write like a book, trained by workers and served over gRPC.

The shared core (store, config, gRPC bootstrap, logging, generated stubs) lives here;
the services import it as ``novelcrafter.ingest``, ``novelcrafter.trainer`` and
``novelcrafter.inference`` (sources under ``services/``).
"""

__version__ = "0.1.0"
