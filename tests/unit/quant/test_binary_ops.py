"""FLOPs / BOPs counting convention (BiBERT Table 2): checked against the closed-form count of a tiny BERT."""

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertModel

from compressor.quant.bibert import BiBertConfig, binarize_bert
from compressor.quant.binary import BinarizeConfig, binarize_
from compressor.quant.binary_ops import count_ops

B, S, H, FF, L = 2, 6, 32, 64, 2


def _model() -> BertModel:
    config = BertConfig(vocab_size=50, hidden_size=H, num_hidden_layers=L, num_attention_heads=4,
                        intermediate_size=FF, max_position_embeddings=32)
    return BertModel(config).eval()


LINEAR_MACS = L * B * S * (4 * H * H + 2 * H * FF)
ATTENTION_MACS = L * B * S * S * H  # per product (QKᵀ, then PV)
POOLER_MACS = B * H * H  # CLS token only


def _ids():
    return torch.randint(0, 50, (B, S))


def test_full_precision_counts_everything_as_flops():
    count = count_ops(_model(), _ids())
    assert count.bops == 0
    assert count.flops == 2 * (LINEAR_MACS + 2 * ATTENTION_MACS + POOLER_MACS)
    assert count.total == count.flops


def test_bibert_counts_binary_products_as_bops():
    count = count_ops(binarize_bert(_model()), _ids())
    assert count.bops == 2 * (LINEAR_MACS + 2 * ATTENTION_MACS)
    assert count.flops == 2 * POOLER_MACS  # the float pooler
    assert count.total == pytest.approx(count.flops + count.bops / 64)


def test_kbit_activations_and_softmax_attention():
    count = count_ops(binarize_bert(_model(), BiBertConfig(bits="1-1-2", attention="softmax")), _ids())
    # linears 1×2 bits; QKᵀ 2×2 bits; softmax probabilities × V is a float product
    assert count.bops == 2 * (LINEAR_MACS * 2 + ATTENTION_MACS * 4)
    assert count.flops == 2 * (ATTENTION_MACS + POOLER_MACS)


def test_binary_conv_counts():
    net = binarize_(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 3, groups=2)),
                    BinarizeConfig(modules=("1",)))
    count = count_ops(net, torch.randn(1, 3, 5, 5))
    assert count.flops == 2 * (8 * 5 * 5) * (3 * 9)
    assert count.bops == 2 * (4 * 3 * 3) * (4 * 9)
    assert set(count.by_module) == {"0", "1"}
