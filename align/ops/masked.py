"""Statistics over the entries a mask keeps: mean, variance and whitening.

Every `*_mask` is True (or 1) where the entry counts; masked-out entries are selected away, never
multiplied by 0, so inf or nan there cannot leak in. Pure functions: tensors in, tensors out.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Added to the variance before the inverse square root, as TRL and OpenRLHF do; the reference values
# in tests/support/reference/ppo_math.json were computed with it.
WHITEN_EPS = 1e-8


def masked_mean(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of `values` where `mask` is True.

    Masked-out entries are selected away (not multiplied by 0), so inf or nan there cannot leak in.
    An all-False mask gives nan.

    Args:
        values: (batch, response_len) or any shape.
        mask: same shape as `values`, True/1 where the entry counts.
        dim: reduce over this dim only; None reduces over everything (a token-level mean).

    Returns:
        A scalar, or `values` with `dim` removed.
    """
    mask = mask.bool()
    total = torch.where(mask, values, 0).sum() if dim is None else torch.where(mask, values, 0).sum(dim)
    count = mask.sum() if dim is None else mask.sum(dim)
    return total / count


def masked_var(values: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of `values` over all entries where `mask` is True.

    Args:
        values: (batch, response_len) or any shape.
        mask: same shape as `values`, True/1 where the entry counts.
        unbiased: divide by n - 1 (Bessel's correction, as TRL does) instead of n (as OpenRLHF does).

    Returns:
        A scalar.
    """
    mask = mask.bool()
    count = int(mask.sum())
    if count < (2 if unbiased else 1):
        raise ValueError(f"masked_var needs at least {2 if unbiased else 1} masked-in entries, got {count}")
    mean = masked_mean(values, mask)
    var = masked_mean((torch.where(mask, values, 0) - mean) ** 2, mask)
    return var * count / (count - 1) if unbiased else var


def masked_whiten(values: Tensor, mask: Tensor, shift_mean: bool = True, unbiased: bool = True) -> Tensor:
    """Normalise `values` to zero mean and unit variance over the masked-in entries.

    Used on advantages before the policy update. Departs from TRL and OpenRLHF in one way: masked-out
    entries are 0 in the output (they leave whatever the arithmetic produced there), so padding never
    carries a value into a later sum.

    Args:
        values: (batch, response_len).
        mask: (batch, response_len), True/1 where the token counts.
        shift_mean: if False, add the mean back (rescale only), as TRL does when whitening rewards.
        unbiased: use the n - 1 variance (see `masked_var`).

    Returns:
        (batch, response_len), zero where `mask` is False.
    """
    mask = mask.bool()
    values = torch.where(mask, values, 0)
    mean = masked_mean(values, mask)
    var = masked_var(values, mask, unbiased=unbiased)
    whitened = (values - mean) * torch.rsqrt(var + WHITEN_EPS)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask, whitened, 0)


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> float:
    """How much of the returns' variance the value estimates explain: 1 - Var(returns - values) / Var(returns),
    over the tokens `mask` keeps (population variances; CleanRL's and OpenRLHF's critic diagnostic).

    1 is a perfect critic, 0 one no better than predicting the mean return, below 0 worse than that. A
    critic that learns shows it rising over a run; the policy loss cannot show it.

    Args:
        values: (batch, response_len) the critic's estimates V_t when the rollout was scored.
        returns: (batch, response_len) the GAE targets (`align.rl.ppo.advantages.gae`).
        mask: (batch, response_len), True/1 where the token counts.

    Returns:
        A float; nan when the returns do not vary (nothing to explain).
    """
    return explained_variance_from_sums(*explained_variance_sums(values, returns, mask))


def explained_variance_sums(values: Tensor, returns: Tensor, mask: Tensor) -> list[float]:
    """[tokens, sum of returns, of their squares, sum of residuals returns - values, of their squares] over the
    masked-in tokens, in float64: the sums of several processes' rows add up to the sums of all of them."""
    mask = mask.bool()
    returns64, residuals = returns[mask].double(), (returns - values)[mask].double()
    return [float(mask.sum()), float(returns64.sum()), float(returns64.square().sum()), float(residuals.sum()),
            float(residuals.square().sum())]


def explained_variance_from_sums(n: float, ret_sum: float, ret_sq: float, res_sum: float, res_sq: float) -> float:
    """`explained_variance` from `explained_variance_sums` (added over processes); nan when the returns do not vary."""
    var_returns = ret_sq / n - (ret_sum / n) ** 2
    return 1 - (res_sq / n - (res_sum / n) ** 2) / var_returns if var_returns > 0 else float("nan")
