"""Adapters that plug `DraftAdapter` into other RL trainers (TRL); each imports its framework lazily."""
