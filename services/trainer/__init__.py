"""NovelCrafter trainer service."""
