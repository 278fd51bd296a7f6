"""The knowledge zoo: each kind of knowledge is an `nn.Module` registered by name.

Every loss has the same call: `loss(student: Features, teacher: Features, target) -> scalar tensor`.
`Features.output` is the model's primary output (class logits, or an embedding); `Features.taps` holds
tapped intermediate tensors by tap key (see `taps.py`); `Features.attention_mask` ([B, L], 1 = real token)
lets sequence losses ignore padding. A loss reads only what it needs and says so in `needs`
("output", "taps", "target"), so a recipe that forgot to tap features fails before training.

Life cycle of a loss (the objective drives it):
1. `build_loss(name, params)`: parameters are checked here (RecipeError on a bad value).
2. `taps.bind_taps(losses, student, teacher, aliases)`: the loss's tap references (aliases, exact module
   names or globs) become concrete tap keys, paired by the loss's `layer_map`.
3. `loss.prepare(student_features, teacher_features)` on one dry-run batch: checks that the taps exist and
   shapes are comparable, and creates learned parts (FitNets/TinyBERT regressors, contrastive projections).
   Build the optimizer *after* this, over the student's and every loss's `parameters()`.
4. `loss(student, teacher, target)` every step. Teacher tensors made under `torch.inference_mode` are
   copied into normal tensors first (autograd refuses to save inference tensors for backward).

Distributions are taken over the last dimension; logits may be [B, C] or [B, L, V] (then divergences are
averaged over the positions where `attention_mask` is 1).
"""

from compressor.distill.losses.attention import DirectionMatching, MiniLM, TinyBertAttention
from compressor.distill.losses.base import (
    LOSSES,
    DistillLoss,
    Features,
    LayerMap,
    Pairs,
    build_loss,
    check_logit_shapes,
    check_same_batch,
    check_taps_present,
    prepare_losses,
    register,
)
from compressor.distill.losses.feature import (
    FSP,
    AttentionTransfer,
    FitNetsHint,
    TinyBertEmbedding,
    TinyBertHidden,
)
from compressor.distill.losses.logit import (
    CrossEntropy,
    GeneralizedJSD,
    HintonKD,
    NormalizedKD,
    ReverseKL,
    SkewKL,
    SkewReverseKL,
    SoftCrossEntropy,
    TinyBertPrediction,
    cross_entropy_only,
)
from compressor.distill.losses.relation import ContrastiveKD, RKDAngle, RKDDistance

__all__ = [
    "LOSSES",
    "Features",
    "DistillLoss",
    "HintonKD",
    "build_loss",
    "cross_entropy_only",
    "CrossEntropy",
    "check_logit_shapes",
    "check_taps_present",
    "check_same_batch",
    "prepare_losses",
    "register",
    "LayerMap",
    "Pairs",
    "ReverseKL",
    "SkewKL",
    "SkewReverseKL",
    "GeneralizedJSD",
    "SoftCrossEntropy",
    "NormalizedKD",
    "FitNetsHint",
    "TinyBertHidden",
    "TinyBertEmbedding",
    "TinyBertAttention",
    "TinyBertPrediction",
    "AttentionTransfer",
    "FSP",
    "RKDDistance",
    "RKDAngle",
    "ContrastiveKD",
    "MiniLM",
    "DirectionMatching",
]
