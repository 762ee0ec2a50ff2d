"""NovelCrafter ingest service."""
