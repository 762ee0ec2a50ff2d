"""NovelCrafter inference service."""
