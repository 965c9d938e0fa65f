"""Soft-target cross-entropy as autograd functions: ``-sum_j target_j log softmax(x)_j`` per row.

Used by :meth:`interp.data.bigram.BigramCounts.soft_cross_entropy`. Every target row sums to
one, so the loss is ``logsumexp(x) - x . target`` and its gradient ``g * (softmax(x) -
target)``: one dense pass, no stored log-softmax, no ``[rows, V]`` target for sparse targets.
"""

from __future__ import annotations

import torch

__all__ = ["DenseSoftCE", "SparseSoftCE"]


class SparseSoftCE(torch.autograd.Function):
    """Soft-target CE with sparse bigram targets plus a dense unigram part, per row.

    ``ce[n] = logZ[n] - sum_k w[k] x.flat[idx[k]] - c[n] * (x[n] . u)`` over the ``lengths[n]``
    entries of row ``n``: every target row sums to one, so no log-softmax is stored. The
    gradient ``g * (softmax(x) - target)`` is one dense pass plus one scatter of the nonzeros,
    instead of autograd's advanced-index backward (several times slower on CPU).
    """

    @staticmethod
    def forward(ctx, x, flat_idx, lengths, weights, uni_coef, unigram):
        x = x.contiguous()
        log_z = torch.logsumexp(x, dim=-1)
        picked = x.reshape(-1).index_select(0, flat_idx).mul_(weights)
        expected = torch.segment_reduce(picked, "sum", lengths=lengths, unsafe=True)
        del picked
        use_unigram = bool((uni_coef > 0).any())
        if use_unigram:
            uni_dot = x @ unigram
            bad = torch.isnan(uni_dot)  # -inf logits where the unigram is 0: 0 * -inf
            if bool(bad.any()):
                uni_dot[bad] = torch.where(unigram > 0, x[bad] * unigram, 0.0).sum(-1)
            expected = expected + uni_coef * uni_dot
        ctx.save_for_backward(x, log_z, flat_idx, lengths, weights, uni_coef, unigram)
        ctx.use_unigram = use_unigram
        return log_z - expected

    @staticmethod
    def backward(ctx, grad):
        x, log_z, flat_idx, lengths, weights, uni_coef, unigram = ctx.saved_tensors
        g = torch.exp(x - log_z[:, None]).mul_(grad[:, None])
        if ctx.use_unigram:
            g.addr_(grad * uni_coef, unigram, alpha=-1.0)
        per_entry = torch.repeat_interleave(grad, lengths, output_size=flat_idx.numel())
        g.view(-1).scatter_add_(0, flat_idx, per_entry.mul_(weights).neg_())
        return g, None, None, None, None, None


class DenseSoftCE(torch.autograd.Function):
    """Soft-target CE with dense target rows shared by positions of the same current token.

    ``ce[n] = logZ[n] - x[n] . table[inverse[n]]``; gradient ``g * (softmax(x) - target)``.
    """

    @staticmethod
    def forward(ctx, x, table, inverse):
        x = x.contiguous()
        log_z = torch.logsumexp(x, dim=-1)
        target = table[inverse]  # index_select(0, ...) is ~50x slower here for long rows
        dot = torch.bmm(x.unsqueeze(1), target.unsqueeze(2)).view(-1)
        bad = torch.isnan(dot)  # -inf logits where the target is 0: 0 * -inf
        if bool(bad.any()):
            dot[bad] = torch.where(target[bad] > 0, x[bad] * target[bad], 0.0).sum(-1)
        ctx.save_for_backward(x, log_z, table, inverse)
        return log_z - dot

    @staticmethod
    def backward(ctx, grad):
        x, log_z, table, inverse = ctx.saved_tensors
        g = torch.exp(x - log_z[:, None]).mul_(grad[:, None])
        g.sub_(table[inverse].mul_(grad[:, None]))
        return g, None, None
