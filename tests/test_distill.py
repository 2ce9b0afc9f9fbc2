"""Stage 1, attention transfer: the captured inputs and targets are the teacher's own, the linear attention rows are
`attend`'s quadratic twin, training lowers the transfer loss and touches only feature maps / window logits, resume
is exact, bad inputs raise, and the CLI function runs end to end."""

from __future__ import annotations

import json

import pytest
import torch

import t2r
from conftest import tiny_model
from t2r.attention import repeat_heads
from t2r.cli.render import render_distill
from t2r.cli.training import distill_command
from t2r.data import DataError, TokenBlocks
from t2r.errors import NotAT2RModelError, T2RError
from t2r.stages.distill import attention_transfer
from t2r.train import DistillSettings, SettingsError, TrainConfig
from t2r.transfer import AttentionTransfer, attention_rows, layer_errors, output_error


def converted(tokenizer, family="llama", window=0, feature_map="hedgehog", feature_dim=8):
    model = tiny_model(family, vocab_size=len(tokenizer), initializer_range=0.1)
    return t2r.convert(model, feature_map=feature_map, feature_dim=feature_dim, window=window)


def blocks(T: int = 64) -> TokenBlocks:
    g = torch.Generator().manual_seed(0)
    return TokenBlocks(torch.randint(3, 259, (8, T), generator=g), torch.randint(3, 259, (2, T), generator=g), {})


def config(**kw) -> TrainConfig:
    return TrainConfig(**{**dict(lr=3e-2, steps=12, warmup=0, eval_every=0, eval_blocks=2, checkpoint_every=4,
                                 progress=False), **kw})


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_targets_are_the_teachers_attention_outputs(tokenizer, family):
    """Captured hidden states + qkv + softmax attention == what the teacher's own attention feeds its output
    projection."""
    transfer = AttentionTransfer(converted(tokenizer, family))
    out_proj = "o_proj" if family == "llama" else "c_proj"
    seen = []
    for _, teacher_attn in transfer.pairs:
        getattr(teacher_attn, out_proj).register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    ids = blocks().heldout
    with torch.no_grad():
        transfer.teacher(ids)
        for (attn, _), (hidden, positions), expected in zip(transfer.pairs, transfer.capture(ids), seen):
            q, k, v = attn.qkv(hidden, positions)
            target = transfer.adapter.softmax_reference(attn, q, k, v).flatten(2)  # (B, T, H * D)
            torch.testing.assert_close(target, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window", [0, 4])
def test_linear_rows_are_the_quadratic_twin_of_attend(tokenizer, window):
    transfer = AttentionTransfer(converted(tokenizer, window=window))
    attn = transfer.pairs[1][0]
    with torch.no_grad():
        hidden, positions = transfer.capture(blocks().heldout)[1]
        q, k, v = attn.qkv(hidden, positions)
        softmax_rows, rows = attention_rows(attn, q, k, v)
        o = torch.einsum("bhts,bshd->bthd", rows, repeat_heads(v, attn.num_heads // attn.num_kv_heads))
        torch.testing.assert_close(o, attn.attend(q, k, v), rtol=1e-5, atol=1e-5)
        o_soft = torch.einsum("bhts,bshd->bthd", softmax_rows, repeat_heads(v, attn.num_heads // attn.num_kv_heads))
        reference = transfer.adapter.softmax_reference(attn, q, k, v)
        torch.testing.assert_close(o_soft, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window, attn_ce", [(0, 0.0), (4, 0.0), (0, 0.5)])
def test_transfer_lowers_the_loss_and_changes_only_feature_maps(tmp_path, tokenizer, window, attn_ce):
    model = converted(tokenizer, window=window)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = blocks()
    errors_before = layer_errors(model, data.heldout)
    summary = attention_transfer(model, data, tmp_path / "run", config(), tokenizer=tokenizer, attn_ce=attn_ce)
    errors_after = layer_errors(model, data.heldout)
    assert sum(errors_after) < 0.95 * sum(errors_before)
    assert summary["eval_after"]["transfer_mse"] < summary["eval_before"]["transfer_mse"]
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    trainable = {k for k in before if ".feature_map." in k or k.endswith("window_logit")}
    assert changed and changed <= trainable
    assert any(k.endswith("window_logit") for k in changed) == bool(window)
    saved = t2r.load(tmp_path / "run").state_dict()
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items() if k in saved)
    train = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "train"]
    assert len(train[0]["layer_errors"]) == 3 and (train[0]["ce"] > 0) == bool(attn_ce)


def test_layer_errors_put_zero_for_kept_softmax_layers(tokenizer):
    model = t2r.convert(tiny_model("llama", vocab_size=len(tokenizer), initializer_range=0.1), feature_map="hedgehog",
                        feature_dim=8, keep_softmax_layers=(1,))
    errors = layer_errors(model, blocks().heldout)
    assert len(errors) == 3 and errors[1] == 0.0 and errors[0] > 0 and errors[2] > 0


def test_resume_equals_uninterrupted(tmp_path, tokenizer):
    class Crash(Exception):
        pass

    def crash(step, record):
        if step == 6:
            raise Crash

    attention_transfer(converted(tokenizer, window=4), blocks(), tmp_path / "a", config(), tokenizer=tokenizer)
    with pytest.raises(Crash):
        attention_transfer(converted(tokenizer, window=4), blocks(), tmp_path / "b", config(), tokenizer=tokenizer,
                           on_step=crash)
    attention_transfer(converted(tokenizer, window=4), blocks(), tmp_path / "b", config(), tokenizer=tokenizer,
                       resume=True)
    a, b = t2r.load(tmp_path / "a").state_dict(), t2r.load(tmp_path / "b").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bad_inputs(tmp_path, tokenizer, tiny_model_dir, tiny_converted_dir):
    text = tmp_path / "corpus.txt"
    text.write_text("It is a truth universally acknowledged. " * 40)
    common = dict(data=str(text), block_size=64, progress=False)
    with pytest.raises(NotAT2RModelError, match="t2r convert"):
        distill_command(str(tiny_model_dir), out=str(tmp_path / "o1"), **common)
    with pytest.raises(SettingsError, match="tokens: the token budget must be positive"):
        distill_command(str(tiny_converted_dir), options=DistillSettings.parse({"tokens": "0"}),
                        out=str(tmp_path / "o2"), **common)
    with pytest.raises(SettingsError, match="tokens: a token budget is a number of tokens"):
        distill_command(str(tiny_converted_dir), options=DistillSettings.parse({"tokens": "lots"}),
                        out=str(tmp_path / "o3"), **common)
    with pytest.raises(DataError, match="unknown data source"):
        distill_command(str(tiny_converted_dir), data="no-such-corpus", out=str(tmp_path / "o4"), progress=False)
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(DataError, match="empty"):
        distill_command(str(tiny_converted_dir), data=str(tmp_path / "empty.txt"), out=str(tmp_path / "o5"),
                        progress=False)
    (tmp_path / "short.txt").write_text("too short")
    with pytest.raises(DataError, match="fewer than one block"):
        distill_command(str(tiny_converted_dir), data=str(tmp_path / "short.txt"), out=str(tmp_path / "o6"),
                        progress=False)
    with pytest.raises(T2RError, match="nothing to distill"):
        attention_transfer(converted(tokenizer, feature_map="elu", feature_dim=None), blocks(), tmp_path / "o7",
                           config())
    with pytest.raises(T2RError, match="attn-ce"):
        attention_transfer(converted(tokenizer), blocks(), tmp_path / "o8", config(), attn_ce=-1.0)
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 9))


def test_distill_command_end_to_end(tmp_path, tiny_converted_dir):
    text = tmp_path / "corpus.txt"
    text.write_text("It is a truth universally acknowledged, that a single man in possession of a good fortune. " * 30)
    out = tmp_path / "distilled"
    r = distill_command(str(tiny_converted_dir), data=str(text), options=DistillSettings(tokens="1k", eval_blocks=1),
                        out=str(out), block_size=64, progress=False)
    assert r["steps"] == 16 and r["tokens"] == 1024 and r["eval_after"]["ppl"] > 0
    json.dumps(r)
    assert "held-out ppl" in render_distill(r)
    model = t2r.load(out)
    assert model.config.t2r["window"] == 4 and t2r.persistence.load_tokenizer(out) is not None
    assert not (out / "checkpoint").exists() and (out / "train.json").is_file()


def test_checkpointed_layers_give_the_gradients_of_a_plain_backward(tokenizer):
    """Stage 1 recomputes each layer's prediction in the backward pass (one layer's graph in memory at a time); the
    gradients are those of differentiating every layer's error directly."""
    transfer = AttentionTransfer(converted(tokenizer, window=4))
    ids = blocks().heldout[:1]
    transfer(ids)["loss"].backward()
    checkpointed = {n: p.grad.clone() for n, p in transfer.student.named_parameters() if p.grad is not None}
    transfer.student.zero_grad(set_to_none=True)
    errors = []
    for (attn, _), (hidden, positions) in zip(transfer.pairs, transfer.capture(ids)):
        with torch.no_grad():
            q, k, v = attn.qkv(hidden, positions)
            target = transfer.adapter.softmax_reference(attn, q, k, v).float()
        errors.append(output_error(attn, q, k, v, target))
    torch.stack(errors).mean().backward()
    plain = {n: p.grad for n, p in transfer.student.named_parameters() if p.grad is not None}
    assert checkpointed.keys() == plain.keys() and checkpointed
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-7)
