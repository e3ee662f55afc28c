"""quipsharp (public API re-exports are restored once all core modules land)."""
