"""rankcut.perplexity against a mean NLL computed by hand (the literature's protocol, DESIGN §4)."""

from __future__ import annotations

import math

import pytest
import torch

import rankcut
from tiny_models import llama

pytestmark = pytest.mark.usefixtures("one_thread")


def _hand_nll(model, windows: torch.Tensor, shift: int = 1) -> float:
    """Mean over every predicted token of -log softmax(logits[t])[token t+shift], one window at a time, in float64
    (``shift`` 1 is the protocol; 0 is the off-by-one a wrong label alignment would compute)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for window in windows:
            logits = model(input_ids=window[None]).logits[0].double()
            for t in range(window.numel() - 1):
                logp = logits[t] - torch.logsumexp(logits[t], 0)
                total -= float(logp[window[t + shift]])
                count += 1
    return total / count


@pytest.mark.parametrize("seq_len, max_windows", [(8, None), (16, 2), (5, 3)])
def test_perplexity_is_exp_of_the_mean_next_token_nll(seq_len, max_windows):
    model = llama()
    ids = torch.randint(0, 300, (53,), generator=torch.Generator().manual_seed(2))
    count = ids.numel() // seq_len if max_windows is None else min(max_windows, ids.numel() // seq_len)
    windows = ids[: count * seq_len].view(count, seq_len)  # non-overlapping, remainder dropped
    expected = math.exp(_hand_nll(model, windows))
    got = rankcut.perplexity(model, None, ids, seq_len=seq_len, max_windows=max_windows, batch_size=2, progress=False)
    assert got == pytest.approx(expected, rel=1e-6)
    # labels one position off give a clearly different figure: the comparison above would catch them
    assert abs(math.exp(_hand_nll(model, windows, shift=0)) - got) / got > 1e-2


def test_perplexity_rejects_text_shorter_than_one_window():
    with pytest.raises(ValueError, match="fewer than one window"):
        rankcut.perplexity(llama(), None, torch.arange(7), seq_len=8, progress=False)
