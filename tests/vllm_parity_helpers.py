"""Shared by the subprocess scripts that load our drafts into vLLM's own model classes (EAGLE-3 and MTP parity):
the one piece of vLLM they replace, its paged-attention kernel, by a plain cached causal attention."""
import torch


class CachedCausalAttention(torch.nn.Module):
    """Causal attention over every key/value seen so far (a KV cache without pages): q, k, v of n new tokens."""

    def __init__(self, nh, nkv, hd):
        super().__init__()
        self.nh, self.nkv, self.hd, self.k, self.v = nh, nkv, hd, None, None

    def forward(self, q, k, v):
        n = q.shape[0]
        k, v = k.view(n, self.nkv, self.hd), v.view(n, self.nkv, self.hd)
        self.k = k if self.k is None else torch.cat([self.k, k])
        self.v = v if self.v is None else torch.cat([self.v, v])
        total = self.k.shape[0]
        mask = torch.arange(total)[None, :] <= (total - n + torch.arange(n))[:, None]
        rep = self.nh // self.nkv
        out = torch.nn.functional.scaled_dot_product_attention(
            q.view(n, self.nh, self.hd).transpose(0, 1), self.k.transpose(0, 1).repeat_interleave(rep, 0),
            self.v.transpose(0, 1).repeat_interleave(rep, 0), attn_mask=mask, scale=self.hd ** -0.5)
        return out.transpose(0, 1).reshape(n, -1)


def run_parity_script(script: str, marker: str, tmp_path) -> str:
    """Run a parity script in a fresh process (vLLM's module state stays out of the test session); it gets the
    tests directory and `tmp_path` as argv. Fails unless it printed `marker`; returns the marker line."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    tests = Path(__file__).parent
    env = dict(os.environ, OMP_NUM_THREADS="1", VLLM_ENABLE_V1_MULTIPROCESSING="0", HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", script, str(tests), str(tmp_path)], capture_output=True,
                          text=True, env=env, timeout=300, cwd=tests.parent)
    assert marker in proc.stdout, proc.stdout[-3000:] + proc.stderr[-5000:]
    return next(line for line in proc.stdout.splitlines() if marker in line)
