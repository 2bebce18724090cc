"""The toy workload as a pre-init source: `data.source=toy` and `run.target=toy` for draftadapt/preinit.

Importing this module registers them (`preinit.data.register_rows`, `preinit.pipeline.register_target`);
the pre-init pipeline itself imports no workload. `recipes/preinit.py`, `draftadapt preinit` and the
toy presets (recipes/preinit_toy_*.yaml) import it.
"""
from __future__ import annotations

import random

from ..preinit.data import DataConfig, register_rows
from ..preinit.pipeline import register_target
from .task import STYLES, TaskConfig, sample_chat, sample_problem, solution

TOY_SCHEMAS = {"task": "dapo", "chat": "ultrachat"}  # toy domain -> the real schema its rows are written in


def toy_rows(domain: str, n: int, seed: int) -> list[dict]:
    """Toy rows in the real schemas: task problems as DAPO rows, chat as UltraChat rows.

    Prompts come from random.Random(seed) exactly as toy/draft.py `domain_prompts` draws them;
    reference responses from a second stream, so they do not shift the prompts.
    """
    rng, other = random.Random(seed), random.Random(seed + 1)
    rows = []
    for i in range(n):
        if domain == "task":
            p = sample_problem(rng)
            rows.append({"data_source": "toy-task", "prompt": [{"role": "user", "content": p.prompt}],
                         "ability": "ARITHMETIC", "extra_info": {"index": i},
                         "reward_model": {"ground_truth": str(p.answer), "style": "rule"},
                         "response": solution(p, other.choices(STYLES, weights=TaskConfig().style_weights)[0],
                                              other)})
        elif domain == "chat":
            ex = sample_chat(rng)
            rows.append({"prompt": ex.prompt, "prompt_id": f"toy-{i}",
                         "messages": [{"role": "user", "content": ex.prompt},
                                      {"role": "assistant", "content": ex.response}]})
        else:
            raise ValueError(f"toy domain {domain!r}; choose 'task' or 'chat'")
    return rows


def _rows(cfg: DataConfig) -> list[dict]:
    return toy_rows(cfg.path, cfg.max_rows or 1024, cfg.seed)  # max_rows: rows generated


def _policy(progress: bool) -> str:
    from .policy import toy_policy

    return str(toy_policy(progress=progress))


register_rows("toy", _rows, TOY_SCHEMAS)
register_target("toy", _policy)
