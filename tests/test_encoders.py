"""hosa_lib.encoders, directly: padding never changes what valid positions encode, the anchored global
vector is the map of the masked mean (gate 0), and the Hugging Face pooler is frozen (DDP)."""
import torch

from hosa_lib.config import ModelConfig
from hosa_lib.encoders import Anchor, ImageEncoder, TextEncoder, freeze_pooler


def _cfg(**kw):
    return ModelConfig(**{"embed": 16, "heads": 2, "ff": 32, "dropout": 0.0, "image_layers": 1, "text_layers": 1, **kw})


def test_image_encoder_ignores_padded_regions():
    torch.manual_seed(0)
    enc = ImageEncoder(_cfg(), feat_dim=12).eval()
    regions, boxes = torch.randn(2, 5, 12), torch.rand(2, 5, 4)
    mask = torch.tensor([[True, True, True, False, False], [True] * 5])
    glob, local, m = enc(regions, boxes, mask)
    assert glob.shape == (2, 16) and local.shape == (2, 5, 16) and torch.equal(m, mask)
    noisy = regions.clone()
    noisy[0, 3:] = 1e3  # garbage in the padding
    glob2, local2, _ = enc(noisy, boxes, mask)
    torch.testing.assert_close(glob2, glob)
    torch.testing.assert_close(local2[0, :3], local[0, :3])


def test_text_encoder_ignores_padding_and_keeps_the_word_mask():
    torch.manual_seed(1)
    enc = TextEncoder(_cfg(), hidden_dim=10).eval()
    hidden = torch.randn(2, 6, 10)
    text_mask = torch.tensor([[True] * 4 + [False] * 2, [True] * 6])
    word_mask = text_mask.clone()
    word_mask[:, 0] = False  # [CLS]
    glob, local, words = enc(text_mask, word_mask, hidden=hidden)
    assert torch.equal(words, word_mask) and local.shape == (2, 6, 16)
    noisy = hidden.clone()
    noisy[0, 4:] = -50.0
    glob2, local2, _ = enc(text_mask, word_mask, hidden=noisy)
    torch.testing.assert_close(glob2[0], glob[0])
    torch.testing.assert_close(local2[0, :4], local[0, :4])


def test_anchor_is_the_map_of_the_masked_mean_while_its_gate_is_closed():
    a = Anchor(in_dim=6, embed=4)
    x, mask = torch.randn(3, 5, 6), torch.tensor([[True] * 5, [True, True, False, False, False], [True] + [False] * 4])
    token = torch.randn(3, 4)
    mean = (x * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    torch.testing.assert_close(a(x, mask, token), a.map(mean))
    with torch.no_grad():
        a.gate.fill_(0.5)
    torch.testing.assert_close(a(x, mask, token), a.map(mean) + 0.5 * token)


def test_pooler_frozen_other_backbone_weights_trainable():
    from hosa_lib.text import load_backbone
    _, backbone = load_backbone("minilm", 2)
    freeze_pooler(backbone)
    assert not any(p.requires_grad for p in backbone.pooler.parameters())
    assert all(p.requires_grad for n, p in backbone.named_parameters() if not n.startswith("pooler."))


def test_a_truncated_backbone_loads_quietly_and_keeps_the_logging_level(capfd):
    """data.text_layer = k loads MiniLM's first k layers: the layers left out on purpose are not reported
    to the user as unexpected weights, and transformers' verbosity is what it was before."""
    from transformers.utils import logging as hf_logging

    from hosa_lib.text import load_backbone
    before = hf_logging.get_verbosity()
    _, model = load_backbone("minilm", 3)
    assert len(model.encoder.layer) == 3
    out, err = capfd.readouterr()
    assert "UNEXPECTED" not in out + err and "encoder.layer" not in out + err, out + err
    assert hf_logging.get_verbosity() == before
