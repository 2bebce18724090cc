"""Offline draft pre-init: datasets (hub, local file, toy), optional regeneration with the target,
feature shards on disk, draft vocab, TTT training, export and acceptance-length evaluation.

`data.py` loads, checks and renders rows; `features.py` captures shards and trains from them;
`pipeline.py` chains the stages with resume. `recipes/preinit.py` is the command line.
"""
