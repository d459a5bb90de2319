"""Token sampling with upstream Kronos semantics and a counter-based random source.

Filtering (per row): temperature first; if top_k > 0 keep every logit >= the k-th largest
(ties kept) and ignore top_p; else if top_p < 1 keep the smallest prefix of the sorted
distribution whose mass reaches top_p (the token that crosses it is kept, the top-1 always).

Randomness: every draw is a pure function of (row key, step, stream), computed with the
splitmix64 mixer. A row's samples therefore do not depend on which other rows share the
batch, on the device, or on the global torch RNG (which is never touched).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """Bijective 64-bit mixer (uint64 arrays; wrapping arithmetic)."""
    z = x.astype(np.uint64) + _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


def path_keys(seed: int, count: int) -> np.ndarray:
    """Keys of `count` sample paths of one series drawn with `seed` -> uint64 [count]."""
    base = splitmix64(np.array([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))
    return splitmix64(base ^ np.arange(count, dtype=np.uint64))


def uniforms(keys: np.ndarray, step: int, stream: int) -> np.ndarray:
    """One U[0, 1) float64 per key for draw number `step` of `stream` -> [len(keys)]."""
    counter = np.uint64((step << 1) | stream)
    bits = splitmix64(splitmix64(keys ^ splitmix64(np.array([counter], dtype=np.uint64))))
    return (bits >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def draw_table(keys: np.ndarray, steps: int) -> np.ndarray:
    """All draws of a generation at once: [len(keys), steps, 2] with [:, t, s] equal to
    uniforms(keys, t, s)."""
    counters = (np.arange(steps, dtype=np.uint64)[:, None] << np.uint64(1)) | np.arange(2, dtype=np.uint64)
    bits = splitmix64(splitmix64(keys[:, None, None] ^ splitmix64(counters)[None]))
    return (bits >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def filter_logits(
    logits: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    max_top_k: int | None = None,
    any_top_p: bool | None = None,
) -> torch.Tensor:
    """logits [N, V] (already divided by temperature), per-row top_k [N], top_p [N] -> [N, V]
    with removed entries set to -inf.

    `max_top_k` (largest top_k, 0 if none) and `any_top_p` (some row uses top-p) may be
    passed when known on the host, which spares the device two synchronisations.
    """
    V = logits.shape[-1]
    out = logits.clone()
    use_k = top_k > 0
    if max_top_k is None:
        max_top_k = int(top_k.max())
    if max_top_k > 0:
        k = top_k.clamp(1, V)  # [N]
        kth = torch.topk(logits, min(max_top_k, V), dim=-1).values.gather(1, (k - 1)[:, None])  # [N, 1]
        remove = (logits < kth) & use_k[:, None]
        out = out.masked_fill(remove, float("-inf"))
    use_p = (~use_k) & (top_p < 1.0)
    if any_top_p is None:
        any_top_p = bool(use_p.any())
    if any_top_p:
        sorted_logits, sorted_idx = torch.sort(logits, descending=True)  # [N, V]
        cumulative = torch.cumsum(F.softmax(sorted_logits, dim=-1), dim=-1)
        remove_sorted = cumulative > top_p[:, None]
        remove_sorted[:, 1:] = remove_sorted[:, :-1].clone()  # keep the token that crosses
        remove_sorted[:, 0] = False
        remove = remove_sorted.scatter(1, sorted_idx, remove_sorted) & use_p[:, None]
        out = out.masked_fill(remove, float("-inf"))
    return out


def sample_tokens(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    u: np.ndarray | torch.Tensor,
    max_top_k: int | None = None,
    any_top_p: bool | None = None,
    all_top1: bool = False,
) -> torch.Tensor:
    """Draw one token per row: logits [N, V], settings [N], u [N] in [0, 1) -> ids [N] int64.

    Inverse-CDF sampling of softmax(filtered logits / temperature); a filtered-out token has
    probability exactly 0 and can never be drawn. `all_top1` (every row has top_k = 1, known
    on the host) allows the greedy shortcut on CPU: where each row's largest scaled logit is
    unique, it is the only kept token, drawn with probability 1, so the draw is its index.
    (On a GPU the uniqueness check would cost a device synchronisation per draw.)
    """
    scaled = logits.float() / temperature[:, None]
    if all_top1 and scaled.device.type == "cpu":
        best, ids = scaled.max(dim=-1)  # [N] each
        if bool(((scaled == best[:, None]).sum(-1) == 1).all()):  # ties (or NaN): the full draw
            return ids
    probs = F.softmax(filter_logits(scaled, top_k, top_p, max_top_k, any_top_p), dim=-1)  # [N, V]
    cdf = probs.double().cumsum(-1)  # [N, V]
    u = torch.from_numpy(u) if isinstance(u, np.ndarray) else u
    threshold = u.to(cdf.device) * cdf[:, -1]  # [N]
    ids = torch.searchsorted(cdf, threshold[:, None], right=True)[:, 0]
    last_kept = probs.shape[-1] - 1 - (probs > 0).flip(-1).int().argmax(-1)  # [N]
    return torch.minimum(ids, last_kept)
