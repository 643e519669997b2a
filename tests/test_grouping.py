from __future__ import annotations

import pytest

from divmerge_core.learned.grouping import group_tensors, layer_group

BERT = [
    "bert.embeddings.LayerNorm.weight",
    "bert.embeddings.word_embeddings.weight",
    "bert.encoder.layer.0.attention.self.query.weight",
    "bert.encoder.layer.1.output.dense.bias",
    "bert.encoder.layer.10.output.dense.bias",
    "bert.encoder.layer.2.output.dense.bias",
    "bert.pooler.dense.weight",
    "classifier.bias",
]


@pytest.mark.parametrize(
    ("name", "group"),
    [
        ("bert.encoder.layer.3.attention.self.query.weight", "bert.encoder.layer.3"),
        ("transformer.h.3.attn.c_attn.weight", "transformer.h.3"),
        ("model.layers.12.mlp.up_proj.weight", "model.layers.12"),
        ("blocks.0.attn.qkv.weight", "blocks.0"),
        ("encoder.block.0.layer.1.DenseReluDense.wi.weight", "encoder.block.0"),
        ("transformer.wte.weight", "embeddings"),
        ("transformer.wpe.weight", "embeddings"),
        ("model.embed_tokens.weight", "embeddings"),
        ("bert.embeddings.LayerNorm.bias", "embeddings"),
        ("transformer.ln_f.weight", "final_norm"),
        ("model.norm.weight", "final_norm"),
        ("lm_head.weight", "head"),
        ("classifier.out_proj.weight", "head"),
        ("score.weight", "head"),
        ("bert.pooler.dense.bias", "head"),
        ("vision.logit_scale", "vision"),
        ("logit_scale", "logit_scale"),
    ],
)
def test_layer_group(name, group):
    assert layer_group(name) == group


def test_layer_groups_are_ordered():
    groups, group_of = group_tensors(BERT, "layer")
    assert groups == [
        "embeddings",
        "bert.encoder.layer.0",
        "bert.encoder.layer.1",
        "bert.encoder.layer.2",
        "bert.encoder.layer.10",
        "head",
    ]
    assert set(group_of) == set(BERT)
    assert group_of["classifier.bias"] == "head"


def test_task_and_tensor_granularity():
    groups, group_of = group_tensors(BERT, "task")
    assert groups == ["all"] and set(group_of.values()) == {"all"}
    groups, group_of = group_tensors(BERT, "tensor")
    assert groups == BERT and all(group_of[n] == n for n in BERT)
    with pytest.raises(ValueError):
        group_tensors(BERT, "row")
