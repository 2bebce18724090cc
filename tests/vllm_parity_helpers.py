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
