"""hosa_lib.loss: the VSE++ triplet loss (hand-computed, no false negatives among a batch's positives)
and InfoNCE (equal to the explicit cross-entropy, every positive counted, its temperature learned)."""
import math

import pytest
import torch

from hosa_lib.config import LossConfig
from hosa_lib.loss import infonce_loss, triplet_loss

S = torch.tensor([[0.9, 0.2, 0.6], [0.5, 0.8, 0.1], [0.6, 0.75, 0.7]])


def test_triplet_hand_computed():
    eye = torch.eye(3, dtype=torch.bool)
    warm = triplet_loss(S, eye, LossConfig(margin=0.2, warmup_steps=10), step=0)  # sum over negatives
    torch.testing.assert_close(warm["i2t"], torch.tensor(0.35))  # row 2: (.2+.6-.7) + (.2+.75-.7)
    torch.testing.assert_close(warm["t2i"], torch.tensor(0.25))  # col 1: .15, col 2: .1
    hard = triplet_loss(S, eye, LossConfig(margin=0.2, warmup_steps=10), step=10)  # hardest negatives
    torch.testing.assert_close(hard["i2t"], torch.tensor(0.25))
    torch.testing.assert_close(hard["loss"], torch.tensor(0.5))
    assert hard["hardest"] == 1 and warm["hardest"] == 0


def test_triplet_two_captions_one_image_no_false_negative():
    scores = torch.tensor([[0.9, 0.85], [0.1, 0.2]])
    pos = torch.tensor([[True, True], [False, False]])
    out = triplet_loss(scores, pos, LossConfig(margin=0.2), step=1000)
    torch.testing.assert_close(out["loss"], torch.tensor(0.0))  # its own second caption is no negative


def test_infonce_equals_explicit_cross_entropy_and_counts_every_positive():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(4, 5, generator=g)
    pos = torch.zeros(4, 5, dtype=torch.bool)
    pos[[0, 1, 2, 3, 0], [0, 1, 2, 3, 4]] = True  # image 0 has two captions
    log_scale = torch.tensor(math.log(10.0), requires_grad=True)
    out = infonce_loss(s, pos, log_scale)
    logits = s * 10
    t2i = torch.stack([-torch.log_softmax(logits[:, c], 0)[pos[:, c]].exp().sum().log() for c in range(5)]).mean()
    i2t = torch.stack([-torch.log_softmax(logits[i], 0)[pos[i]].exp().sum().log() for i in range(4)]).mean()
    torch.testing.assert_close(out["loss"], i2t + t2i)
    out["loss"].backward()
    assert log_scale.grad is not None and log_scale.grad != 0
    # an image without a caption in the batch takes no part in i2t
    pos2 = pos.clone()
    pos2[3] = False
    pos2[0, 3] = True
    assert torch.isfinite(infonce_loss(s, pos2, log_scale)["loss"])
    with pytest.raises(ValueError, match="every caption"):
        infonce_loss(s, torch.zeros_like(pos), log_scale)
