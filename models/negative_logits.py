"""Per-row sampled-softmax logits against each row's own negatives, without the big gather.

logits[n, k] = h[n] . E[ids[n, k]] for h (N, d), an item table E (n_items, d) and ids (N, K).
The plain autograd form gathers E[ids] as an (N, K, d) tensor and saves it for backward: with
the ABXI authors' negatives (K = 128 A + 128 B per position, d = 256) that is 256 KiB per row,
3.4 GB for a 256 x 50 batch. `NegativeLogits` saves only h and ids and never builds it:

- `sparse` (the CPU default when every row's ids are distinct): ids as the pattern S of an
  (N, n_items) CSR matrix. Forward = the sampled product (h E^T) at S
  (`torch.sparse.sampled_addmm`); backward, with G = S carrying the logits' gradient,
  dh = G E and dE = G^T h (CSR/CSC x dense). Row ids are sorted first (a CSR row's column
  indices must be sorted and unique); the permutation maps the logits back.
- `gather` (any device, repeated ids allowed): chunks of rows whose gathered embeddings take
  at most `chunk_bytes`; backward gathers each chunk again for dh[n] = sum_k g[n, k] E[ids[n, k]]
  and index_add_s g[n, k] h[n] into row ids[n, k] of dE. Peak extra memory: two chunks.

Both are deterministic on CPU for a given thread count. Limits: h and the table share one
floating dtype and device; no double backward; the table's gradient is dense (as
nn.Embedding's without sparse=True).
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import Tensor

# Gathered embeddings per chunk (`gather`): a few MiB stay in a CPU's cache between the gather
# and the product (on abe's shapes, K = 256 and d = 256, faster than 32 MiB chunks).
DEFAULT_CHUNK_BYTES = 4 * 2 ** 20
METHODS = ("auto", "sparse", "gather")


def _chunk_rows(k: int, d: int, itemsize: int, chunk_bytes: int) -> int:
    return max(1, chunk_bytes // max(1, k * d * itemsize))


def _csr(cols: Tensor, values: Tensor, n_items: int) -> Tensor:
    """(N, n_items) CSR matrix with K entries per row at columns `cols` (N, K), sorted and
    unique within each row."""
    n, k = cols.shape
    crow = torch.arange(0, n * k + 1, k, device=cols.device)
    with warnings.catch_warnings():  # torch flags every CSR tensor as a beta feature
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow, cols.reshape(-1), values.reshape(-1), size=(n, n_items),
                                       check_invariants=False)


class NegativeLogits(torch.autograd.Function):
    """(h (N, d), table (n_items, d), ids (N, K)) -> (N, K); see the module docstring.
    `order` (N, K) or None: the sparse path, ids sorted within rows and order[n, j] the
    column of logits that sorted entry j belongs to; None: the gather path in chunks of
    `chunk_rows` rows."""

    @staticmethod
    def forward(ctx, h: Tensor, table: Tensor, ids: Tensor, order: Optional[Tensor], chunk_rows: int,
                padding_idx: Optional[int]) -> Tensor:
        n, k = ids.shape
        d = h.shape[1]
        if order is not None:
            pattern = _csr(ids, h.new_zeros(n * k), table.shape[0])
            vals = torch.sparse.sampled_addmm(pattern, h, table.t(), beta=0.0).values().view(n, k)
            out = torch.empty_like(vals).scatter_(1, order, vals)
        else:
            out = h.new_empty(n, k)
            for s in range(0, n, chunk_rows):
                e = table.index_select(0, ids[s:s + chunk_rows].reshape(-1)).view(-1, k, d)
                torch.bmm(e, h[s:s + chunk_rows].unsqueeze(-1), out=out[s:s + chunk_rows].unsqueeze(-1))
        ctx.save_for_backward(h, table, ids, order)
        ctx.chunk_rows, ctx.padding_idx = chunk_rows, padding_idx
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        h, table, ids, order = ctx.saved_tensors
        n, k = ids.shape
        d = h.shape[1]
        need_h, need_table = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dh = dtable = None
        if order is not None:
            g = _csr(ids, grad.gather(1, order), table.shape[0])
            dh = g @ table if need_h else None
            dtable = g.t() @ h if need_table else None
        else:
            step = ctx.chunk_rows
            grad = grad.contiguous()
            dh = h.new_empty(n, d) if need_h else None
            dtable = torch.zeros_like(table) if need_table else None
            for s in range(0, n, step):
                g, idx = grad[s:s + step], ids[s:s + step].reshape(-1)
                if dh is not None:
                    e = table.index_select(0, idx).view(-1, k, d)
                    torch.bmm(g.unsqueeze(1), e, out=dh[s:s + step].unsqueeze(1))
                if dtable is not None:
                    dtable.index_add_(0, idx, (g.unsqueeze(-1) * h[s:s + step].unsqueeze(1)).view(-1, d))
        if dtable is not None and ctx.padding_idx is not None:
            dtable[ctx.padding_idx] = 0  # as nn.Embedding(padding_idx=...): that row never learns
        return dh, dtable, None, None, None, None


def negative_logits(h: Tensor, table: Tensor, ids: Tensor, padding_idx: Optional[int] = None,
                    method: str = "auto", chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Tensor:
    """logits (N, K) with logits[n, k] = h[n] . table[ids[n, k]]; h (N, d), table (n_items, d),
    ids (N, K) int64 in [0, n_items). `padding_idx`: a table row that gets no gradient.
    `method`: sparse, gather, or auto = sparse on CPU when no row repeats an id, else gather."""
    if h.dim() != 2 or table.dim() != 2 or h.shape[1] != table.shape[1]:
        raise ValueError(f"h must be (N, d) and table (n_items, d) with the same d, got h {tuple(h.shape)}, "
                         f"table {tuple(table.shape)}")
    if ids.dim() != 2 or ids.shape[0] != h.shape[0] or ids.dtype != torch.int64:
        raise ValueError(f"ids must be int64 (N, K) with N = h.shape[0] = {h.shape[0]}, got "
                         f"{ids.dtype} {tuple(ids.shape)}")
    if h.dtype != table.dtype or not h.dtype.is_floating_point:
        raise ValueError(f"h and table must share one floating dtype, got {h.dtype} and {table.dtype}")
    if h.device != table.device or ids.device != h.device:
        raise ValueError(f"h, table and ids must be on one device, got {h.device}, {table.device}, {ids.device}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if not isinstance(chunk_bytes, int) or chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be a positive int, got {chunk_bytes!r}")
    order = None
    if method == "sparse" or (method == "auto" and h.device.type == "cpu"):
        cols, order = ids.sort(dim=1)
        if bool((cols[:, 1:] == cols[:, :-1]).any()):
            if method == "sparse":
                raise ValueError("ids must not repeat an id within a row for method=sparse")
            order = None
        else:
            ids = cols
    rows = _chunk_rows(ids.shape[1], h.shape[1], h.element_size(), chunk_bytes)
    return NegativeLogits.apply(h.contiguous(), table, ids.contiguous(), order, rows, padding_idx)


def position_nll(h: Tensor, table: Tensor, target: Tensor, neg: Tensor, temperature: float,
                 padding_idx: Optional[int] = None, method: str = "auto",
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Tensor:
    """Sampled-softmax negative log-likelihood of every position's target against that
    position's own negatives: (B, L), zero where there is no target (target 0).

    h (B, L, d) user states, table (n_items, d) item embeddings, target (B, L), neg (B, L, K)
    item ids; nll = -log softmax([h . E[target], h . E[neg_1..K]] / temperature)[0]. Only the
    positions with a target are scored, so padding costs nothing and gets no gradient."""
    b, length, d = h.shape
    rows = (target.reshape(-1) > 0).nonzero().squeeze(1)
    hr = h.reshape(-1, d).index_select(0, rows)
    pos = (hr * table.index_select(0, target.reshape(-1).index_select(0, rows))).sum(-1, keepdim=True)
    negs = negative_logits(hr, table, neg.reshape(b * length, -1).index_select(0, rows), padding_idx, method,
                           chunk_bytes)
    nll = -torch.log_softmax(torch.cat([pos, negs], dim=-1) / temperature, dim=-1)[:, 0]
    return nll.new_zeros(b * length).index_copy_(0, rows, nll).view(b, length)
