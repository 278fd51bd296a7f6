"""The `prune` stage on a tiny random BERT inside a SentenceEncoder: heads, FFN width and depth in AGP steps."""

import copy

import pytest
import torch
from torch.utils.data import DataLoader

transformers = pytest.importorskip("transformers")

from compressor.data.loaders import DataBundle  # noqa: E402
from compressor.data.text import TokenizedText, collate  # noqa: E402
from compressor.models.hf import SentenceEncoder  # noqa: E402
from compressor.prune.stage import PRUNED_DIR, run_prune  # noqa: E402
from compressor.prune.structure import load_pruned  # noqa: E402
from compressor.recipe import parse_recipe  # noqa: E402
from compressor.stages import check_stages  # noqa: E402
from compressor.state import ModelState, RunContext  # noqa: E402

LAYERS, HEADS, FFN = 4, 4, 64
STAGE = {"kind": "prune", "heads": 0.5, "ffn": 0.5, "layers": 0.25, "steps": 2, "transformer_importance": "activation"}


def encoder(seed: int = 0) -> SentenceEncoder:
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=FFN,
        max_position_embeddings=16, attn_implementation="eager",
    )  # fmt: skip
    model = transformers.BertModel(config, add_pooling_layer=False)
    return SentenceEncoder(model)


@pytest.fixture(scope="module")
def data() -> DataBundle:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 100, (48, 8), generator=generator)
    mask = torch.ones_like(ids)
    mask[::3, 6:] = 0
    text = TokenizedText(ids, mask)
    return DataBundle(train=DataLoader(text, batch_size=16, collate_fn=collate), val=DataLoader(text, batch_size=16, collate_fn=collate))


def context(tmp_path, data, stages, resume=False) -> RunContext:
    recipe = parse_recipe(
        {
            "task": "embedding",
            "student": {"model": "compressor.models.hf:load"},
            "train": {"epochs": 1, "max_steps_per_epoch": 2},
            "distillation": {"losses": [{"name": "rkd_distance"}]},
            "stages": stages,
        }
    )
    teacher = encoder(seed=1).eval()
    return RunContext(recipe=recipe, data=data, teacher=teacher, work_dir=tmp_path, resume=resume, log=lambda _: None, show_progress=False)


def run(tmp_path, data, resume=False) -> ModelState:
    ctx = context(tmp_path, data, [STAGE], resume)
    batch = next(iter(data.val))[0]
    state = ModelState(module=encoder(), example_inputs=(batch["input_ids"][:1], batch["attention_mask"][:1]))
    return run_prune(state, ctx.recipe.stages[0].model_copy(update={"name": "0-prune"}), ctx)


def shape(module: SentenceEncoder) -> list[tuple[int, int]]:
    return [(layer.attention.self.num_attention_heads, layer.intermediate.dense.out_features) for layer in module.model.encoder.layer]


def test_heads_ffn_and_layers_reach_their_targets_and_rebuild(tmp_path, data):
    state = run(tmp_path, data)

    assert shape(state.module) == [(2, 32)] * 3
    assert state.module.model.config.num_hidden_layers == 3
    details = state.lineage[-1].details
    assert details["shapes_changed"] == {"layers": [4, 3], "heads": [16, 6], "ffn_neurons": [256, 96]}
    assert details["params_after"] < details["params_before"]
    # Records address the BERT inside the SentenceEncoder; the rebuilt student computes the same embeddings.
    rebuilt = load_pruned(encoder, tmp_path / PRUNED_DIR).eval()
    batch = next(iter(data.val))[0]
    torch.testing.assert_close(rebuilt(**batch), state.module.eval()(**batch), atol=1e-6, rtol=0)


def test_resume_replays_transformer_records(tmp_path, data):
    first = run(tmp_path, data)
    resumed = run(tmp_path, data, resume=True)
    assert shape(resumed.module) == shape(first.module)
    for key, value in first.module.state_dict().items():
        torch.testing.assert_close(resumed.module.state_dict()[key], value, atol=0, rtol=0, msg=key)


@pytest.mark.parametrize(
    "stage, message",
    [
        ({"kind": "prune", "layers": [1, 7]}, "prune.layers: layer 7 does not exist; the encoder has 4 layers (0-3)"),
        ({"kind": "prune", "layers": [0, 1, 2, 3]}, "prune.layers drops all 4 encoder layers; keep at least one"),
        ({"kind": "prune", "heads": 0.8}, "prune.heads: 0.8 of 4 heads per layer removes them all; lower it"),
        ({"kind": "prune", "ffn": 0.5, "round_to": 64}, "prune.ffn: 0.5 of 64 FFN neurons per layer with round_to 64 keeps none"),
    ],
)
def test_transformer_targets_are_checked_before_training(data, stage, message):
    from compressor.prune.structured import PruningError

    recipe = context(None, data, [stage]).recipe
    module = encoder()
    before = copy.deepcopy(module.state_dict())
    with pytest.raises(PruningError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_stages(recipe, module, ())
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())


def test_global_ranking_reaches_the_total_targets_over_steps(tmp_path, data):
    stage = {"kind": "prune", "heads": 0.5, "ffn": 0.5, "steps": 3, "global_ranking": True, "epochs": 0}
    ctx = context(tmp_path, data, [stage])
    batch = next(iter(data.val))[0]
    state = ModelState(module=encoder(), example_inputs=(batch["input_ids"][:1], batch["attention_mask"][:1]))
    state = run_prune(state, ctx.recipe.stages[0].model_copy(update={"name": "0-prune"}), ctx)

    heads, widths = zip(*shape(state.module))
    assert sum(heads) == HEADS * LAYERS // 2 and min(heads) >= 1
    assert sum(widths) == FFN * LAYERS // 2
