"""`t2r export --onnx`: the prefill and step graphs, run by onnxruntime through `t2r.onnx_runner` (numpy only), give
the eager model's greedy tokens on tiny models; their int8 versions stay within a logit tolerance."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers

import t2r
import t2r.cli
from conftest import tiny_model
from t2r.decode import decode
from t2r.errors import T2RError
from t2r.export_onnx import export_onnx

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from t2r.onnx_runner import OnnxRNN, main  # noqa: E402

RECIPES = {"hedgehog": dict(feature_map="hedgehog", feature_dim=8), "window": dict(feature_map="t2r", feature_dim=8,
                                                                                    window=4)}


@pytest.fixture(scope="module", params=sorted(RECIPES))
def exported(request, tmp_path_factory):
    model = t2r.convert(tiny_model("llama"), **RECIPES[request.param]).eval()
    out = tmp_path_factory.mktemp("onnx") / request.param
    written = export_onnx(model, out, prefill_chunk=4, int8=True)
    return model, out, written


def test_runner_gives_the_eager_greedy_tokens(exported):
    model, out, _ = exported
    runner = OnnxRNN(out)
    for length in (1, 4, 11):  # step graph only; one prefill piece; two pieces and three single steps
        ids = torch.randint(3, 300, (1, length), generator=torch.Generator().manual_seed(length))
        want, _ = decode(model, ids, max_new_tokens=12)
        assert runner.generate(ids[0].tolist(), max_new_tokens=12, eos_token_id=-1) == want[0].tolist()


def test_step_graph_takes_any_batch_and_matches_the_model(exported):
    model, out, _ = exported
    runner = OnnxRNN(out)
    batch = 3 if all(runner.config["dynamic_batch"].values()) else 1  # the window's unfold: batch-1 prefill
    ids = torch.randint(3, 300, (batch, 4), generator=torch.Generator().manual_seed(5))
    logits, state = runner.run("prefill", ids.numpy(), 0, runner.zero_state(batch))
    logits, _ = runner.run("step", ids[:, :1].numpy(), 4, state)
    with torch.inference_mode():
        ref = model(input_ids=torch.cat([ids, ids[:, :1]], 1)).logits[:, -1]
    np.testing.assert_allclose(logits, ref.numpy(), rtol=1e-4, atol=1e-4)


def test_int8_graphs_stay_close(exported):
    model, out, written = exported
    assert written["step_int8"] == "step.int8.onnx"
    ids = torch.randint(3, 300, (1, 8), generator=torch.Generator().manual_seed(6)).numpy()
    fp, q = OnnxRNN(out), OnnxRNN(out, int8=True)
    a, _ = fp.run("prefill", ids[:, :4], 0, fp.zero_state(1))
    b, _ = q.run("prefill", ids[:, :4], 0, q.zero_state(1))
    assert np.abs(a - b).max() / np.abs(a).max() < 0.1


def test_config_and_errors(exported, tmp_path):
    model, out, _ = exported
    config = json.loads((out / "onnx_config.json").read_text())
    assert config["prefill_chunk"] == 4 and config["files"]["step"] == "step.onnx"
    assert all(s["name"].startswith("state_") for s in config["states"])
    with pytest.raises(T2RError, match="not empty"):
        export_onnx(model, out)
    kept = t2r.convert(tiny_model("llama"), feature_map="elu", keep_softmax_layers=(1,))
    with pytest.raises(T2RError, match="keep softmax"):
        export_onnx(kept, tmp_path / "kept")
    assert main([str(tmp_path / "nothing")]) == 2


def test_cli_export_and_runner(tmp_path, tiny_model_dir, tokenizer, capsys):
    model = t2r.convert(transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir), feature_map="hedgehog",
                        feature_dim=8)
    t2r.save(model, tmp_path / "rnn", tokenizer)
    code = t2r.cli.main(["-q", "export", str(tmp_path / "rnn"), "--onnx", str(tmp_path / "onnx"), "--prefill-chunk",
                         "8", "--json"])
    assert code == 0
    assert json.loads(capsys.readouterr().out)["step"] == "step.onnx"
    prompt = "It is a truth"
    assert main([str(tmp_path / "onnx"), "--prompt", prompt, "--max-new-tokens", "5"]) == 0
    text = capsys.readouterr().out.strip()
    enc = tokenizer(prompt, return_tensors="pt")
    want, _ = decode(model.eval(), enc["input_ids"], max_new_tokens=5, eos_token_id=tokenizer.eos_token_id)
    assert text == prompt + tokenizer.decode(want[0], skip_special_tokens=True)
    assert t2r.cli.main(["export", str(tmp_path / "rnn")]) == 2
