"""A slow, plain-torch stand-in for the flash-attn kernels, so transformers' flash_attention_2
path runs on a CPU.

Only the CUDA kernel is replaced. Everything around it stays real: transformers' 2-D flash
masks, `_upad_input`, the packed-sequence check on position ids, cu_seqlens, bottom-right causal
alignment for queries shorter than keys, and the Qwen2.5-VL vision tower's varlen windows. Those
are the parts where token dropping can go wrong under flash-attention; the kernel's own rounding
is left to the GPU tests.

Each kernel call is recorded (`Recorder.calls`) so a test can see how many sequences
flash-attention was handed: one sample split into several is the packed-sequence bug.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import transformers.modeling_flash_attention_utils as flash_utils


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool) -> torch.Tensor:
    """One sequence. q [Lq, H, D], k and v [Lk, Hkv, D]. Causal masks align bottom-right, as in
    flash-attn >= 2.1: query i sees keys up to i + (Lk - Lq)."""
    heads_per_kv = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(heads_per_kv, dim=1), v.repeat_interleave(heads_per_kv, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.float(), k.float()) * scale
    if causal:
        lq, lk = q.shape[0], k.shape[0]
        seen = torch.arange(lk)[None, :] <= torch.arange(lq)[:, None] + (lk - lq)
        scores = scores.masked_fill(~seen, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(dim=-1), v.float()).to(q.dtype)


@dataclass
class KernelCall:
    varlen: bool  # the variable-length kernel (padding or packed sequences) or the plain one
    causal: bool
    sequences: int  # how many separate sequences the kernel attended over


@dataclass
class Recorder:
    calls: list[KernelCall] = field(default_factory=list)

    def causal_calls(self) -> list[KernelCall]:
        """The language model's calls (the vision towers attend without a causal mask)."""
        return [c for c in self.calls if c.causal]

    # The signatures follow flash_attn's: transformers inspects them to pick the kwargs it passes.
    def flash_attn_func(self, q, k, v, dropout_p=0.0, softmax_scale=None, causal=False,
                        window_size=(-1, -1), softcap=0.0, deterministic=False):
        self.calls.append(KernelCall(False, causal, q.shape[0]))
        scale = softmax_scale or q.shape[-1] ** -0.5
        return torch.stack([_attend(q[b], k[b], v[b], scale, causal) for b in range(q.shape[0])])

    def flash_attn_varlen_func(self, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                               dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                               softcap=0.0, deterministic=False):
        self.calls.append(KernelCall(True, causal, len(cu_seqlens_q) - 1))
        scale = softmax_scale or q.shape[-1] ** -0.5
        out = torch.empty_like(q)
        bounds_q, bounds_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
        for (q0, q1), (k0, k1) in zip(zip(bounds_q, bounds_q[1:]), zip(bounds_k, bounds_k[1:])):
            out[q0:q1] = _attend(q[q0:q1], k[k0:k1], v[k0:k1], scale, causal)
        return out


def install(monkeypatch) -> Recorder:
    """Route transformers' flash-attention calls to the reference kernel for one test."""
    recorder = Recorder()
    kernels = (recorder.flash_attn_func, recorder.flash_attn_varlen_func, None,
               flash_utils._pad_input, flash_utils._unpad_input)
    process_kwargs = flash_utils._lazy_define_process_function(recorder.flash_attn_varlen_func)
    monkeypatch.setattr(flash_utils, "lazy_import_flash_attention", lambda *_, **__: (kernels, (process_kwargs, dict)))
    return recorder
