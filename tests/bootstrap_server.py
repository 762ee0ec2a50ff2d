"""A real server process built with the shared bootstrap, for tests of the bootstrap itself.

Its IngestService is a minimal servicer (the bootstrap is what is under test):
ListBooks sleeps SLOW_SECONDS then answers (an in-flight RPC for the SIGTERM test);
GetBook raises domain errors so the error interceptor's mapping can be checked.
"""

from __future__ import annotations

import os
import sys
import time

from novelcrafter import errors
from novelcrafter.logs import configure_logging
from novelcrafter.rpc import Service, start_server
from novelcrafter.v1 import common_pb2, ingest_pb2, ingest_pb2_grpc


class DemoIngest(ingest_pb2_grpc.IngestServiceServicer):
    def ListBooks(self, request, context):
        time.sleep(float(os.environ.get("SLOW_SECONDS", "0")))
        return ingest_pb2.ListBooksResponse(books=[common_pb2.BookManifest(book_id="0123456789abcdef")])

    def GetBook(self, request, context):
        if request.book_id == "crash":
            raise RuntimeError("secret internal detail")
        if request.book_id == "bad":
            raise errors.InvalidArgument("book id 'bad' is not valid")
        raise errors.NotFound(f"no book {request.book_id}")


def main() -> None:
    configure_logging()
    server = start_server(
        [
            Service(
                "novelcrafter.v1.IngestService",
                DemoIngest(),
                ingest_pb2_grpc.add_IngestServiceServicer_to_server,
            )
        ],
        sys.argv[1],
    )
    server.install_signal_handlers()
    print(f"PORT {server.port}", flush=True)
    server.wait()


if __name__ == "__main__":
    main()
