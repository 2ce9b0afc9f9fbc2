"""Synthetic recall (t2r.recall, `t2r recall`, the lm-eval tasks t2r_passkey / t2r_mqar): the generators are
deterministic per seed and hit their lengths; the scorer gives 100% to an oracle and exactly chance to a uniform
model; the cached scoring path agrees with full-sequence forwards and with lm-eval's log-likelihoods; bad input is one
line (a T2RError, exit code 2 from the command line)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
import transformers

import t2r
from conftest import tiny_model
from t2r import recall as rc
from t2r.errors import T2RError
from t2r.generate import new_cache
from t2r.recall import (
    RecallSettings,
    mqar_sample,
    parse_depths,
    parse_lengths,
    parse_pairs,
    passkey_sample,
    run_recall,
)
from t2r.recall_tasks import HEADER, NEEDLE, QUESTION


class FakeLM(torch.nn.Module):
    """A stand-in causal LM: it keeps every token it has read in the cache (as 1-wide keys), so it sees the whole
    sequence, and puts all its mass on `next_token(text so far)` (None or no function: all logits zero, uniform)."""

    def __init__(self, tokenizer, next_token=None):
        super().__init__()
        self.config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=8, num_hidden_layers=1,
                                               num_attention_heads=1, num_key_value_heads=1)
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # a device to read
        self.tokenizer, self.next_token = tokenizer, next_token

    def forward(self, input_ids, cache=None, use_cache=None, logits_to_keep=0, **_):
        seen = input_ids[:, None, :, None].float()  # (B, 1, T, 1)
        history = cache.update(seen, seen, 0)[0][:, 0, :, 0].long()  # (B, S): everything read so far
        keep = min(logits_to_keep or input_ids.shape[1], input_ids.shape[1])
        logits = torch.zeros(input_ids.shape[0], keep, len(self.tokenizer))  # (B, keep, V)
        for b in range(logits.shape[0] if self.next_token else 0):
            for j in range(keep):
                upto = history.shape[1] - keep + j + 1
                token = self.next_token(self.tokenizer.decode(history[b, :upto].tolist()))
                if token is not None:
                    logits[b, j, token] = 30.0
        return SimpleNamespace(logits=logits)


def oracle(tokenizer, samples):
    """A FakeLM that continues each sample's gold text (context, then each query and its right answer) byte by byte."""
    golds = [s.context + "".join(q.text + q.answer for q in s.queries) for s in samples]

    def next_token(text):
        for gold in golds:
            if gold.startswith(text):
                return tokenizer.eos_token_id if gold == text else tokenizer.encode(gold[len(text)])[0]
        return None

    return FakeLM(tokenizer, next_token)


def one_line(err) -> bool:
    return "\n" not in str(err.value) and str(err.value)


# ----------------------------------------------------------------------------- generators


def test_passkey_is_deterministic_per_seed(tokenizer):
    a = passkey_sample(tokenizer, 400, 0.5, 3, seed=7)
    assert a == passkey_sample(tokenizer, 400, 0.5, 3, seed=7)
    assert a.queries[0].answer != passkey_sample(tokenizer, 400, 0.5, 3, seed=8).queries[0].answer
    assert a.queries[0].answer != passkey_sample(tokenizer, 400, 0.5, 4, seed=7).queries[0].answer
    key = a.queries[0].answer.strip()
    assert len(key) == 5 and key.isdigit() and NEEDLE.format(key=key) in a.context
    wrong = a.queries[0].distractors
    assert len(set(wrong)) == 9 and a.queries[0].answer not in wrong and all(len(w.strip()) == 5 for w in wrong)


@pytest.mark.parametrize("length", [300, 512, 1000])
def test_passkey_hits_its_length_and_depth(tokenizer, length):
    for depth in (0.0, 0.5, 1.0):
        s = passkey_sample(tokenizer, length, depth, 0)
        assert s.tokens == len(tokenizer(s.context)["input_ids"])
        assert 0 <= length - s.tokens <= 10, (length, depth, s.tokens)  # one filler word of bytes at most
        assert s.context.startswith(HEADER) and s.context.endswith(QUESTION)
        needle = NEEDLE.format(key=s.queries[0].answer.strip())
        where, start, end = s.context.index(needle), len(HEADER) + 1, len(s.context) - len(QUESTION) - 1
        relative = (where - start) / (end - start - len(needle))  # of the filler's characters
        assert relative == 0.0 if depth == 0.0 else relative == 1.0 if depth == 1.0 else 0.2 < relative < 0.8
    with pytest.raises(T2RError, match="at least") as err:
        passkey_sample(tokenizer, 100, 0.5, 0)
    assert one_line(err)


def test_mqar_is_deterministic_per_seed():
    a = mqar_sample(32, 1, seed=3, queries=16)
    assert a == mqar_sample(32, 1, seed=3, queries=16) and a != mqar_sample(32, 1, seed=4, queries=16)
    lines = dict(line.split(": ") for line in a.context.splitlines()[1:33])
    assert len(lines) == 32 and len(a.queries) == 16
    asked = [q.text.strip().rstrip(":") for q in a.queries]
    assert len(set(asked)) == 16 and asked != sorted(asked)
    for q, key in zip(a.queries, asked):
        assert q.answer == " " + lines[key] and q.answer not in q.distractors and len(set(q.distractors)) == 9
    assert len(mqar_sample(4, 0, queries=16).queries) == 4  # at most one query per key


# ----------------------------------------------------------------------------- scoring


def test_oracle_scores_100_and_uniform_scores_chance_on_passkey(tokenizer):
    settings = RecallSettings(lengths=(300, 400), depths=(0.0, 0.5, 1.0), samples=4)
    samples = [passkey_sample(tokenizer, n, d, i) for n in settings.lengths for d in settings.depths for i in range(4)]
    perfect = run_recall(oracle(tokenizer, samples), tokenizer, settings)
    assert [(c["acc_ll"], c["acc_gen"]) for c in perfect["cells"]] == [(1.0, 1.0)] * 6
    uniform = run_recall(FakeLM(tokenizer), tokenizer, settings)
    assert uniform["chance"] == 0.1
    assert all(c["acc_ll"] == pytest.approx(0.1) and c["acc_gen"] == 0.0 for c in uniform["cells"])
    cell = perfect["cells"][0]
    assert cell["samples"] == 4 and cell["queries"] == 4 and 290 <= cell["tokens"] <= 300


def test_oracle_scores_100_and_uniform_scores_chance_on_mqar(tokenizer):
    settings = RecallSettings(task="mqar", pairs=(4, 12), samples=2, queries=5, distractors=4)
    samples = [mqar_sample(n, i, queries=5, distractors=4) for n in settings.pairs for i in range(2)]
    perfect = run_recall(oracle(tokenizer, samples), tokenizer, settings)
    assert [(c["pairs"], c["queries"], c["acc_ll"], c["acc_gen"]) for c in perfect["cells"]] == [
        (4, 8, 1.0, 1.0), (12, 10, 1.0, 1.0)]
    uniform = run_recall(FakeLM(tokenizer), tokenizer, settings)
    assert uniform["chance"] == 0.2 and all(c["acc_ll"] == pytest.approx(0.2) for c in uniform["cells"])


def full_sequence_scores(model, ids: list[int], candidates: list[list[int]]) -> list[float]:
    """The slow twin of candidate_scores: one full forward per (context + candidate)."""
    out = []
    for c in candidates:
        logp = model(input_ids=torch.tensor([ids + c])).logits[0].float().log_softmax(-1)  # (T, V)
        out.append(float(sum(logp[len(ids) - 1 + i, t] for i, t in enumerate(c))))
    return out


def naive_greedy(model, ids: list[int], steps: int) -> list[int]:
    """The slow twin of greedy_text: a full forward per new token, no cache, no early stop."""
    out = []
    for _ in range(steps):
        out.append(int(model(input_ids=torch.tensor([ids + out])).logits[0, -1].argmax()))
    return out


@pytest.mark.parametrize("kind", ["softmax", "converted"])
@pytest.mark.parametrize("budget", [1, 2**40], ids=["one-copy", "all-copies"])
@torch.inference_mode()
def test_cached_scores_match_full_forwards(tokenizer, monkeypatch, kind, budget):
    model = tiny_model("llama", vocab_size=len(tokenizer))
    if kind == "converted":
        model = t2r.convert(model, feature_map="t2r", feature_dim=8, window=4, keep_softmax_layers=(1,))
    monkeypatch.setattr(rc, "COPY_BUDGET_BYTES", budget)
    monkeypatch.setattr(rc, "PREFILL_CHUNK", 64)  # the context in pieces carrying the cache
    ids = tokenizer(passkey_sample(tokenizer, 300, 0.5, 0).context)["input_ids"]
    candidates = [tokenizer.encode(t) for t in (" 12345", " 7", " 99", " 31415926")]  # uneven: right padding
    cache = new_cache(model)
    ours = rc.candidate_scores(model, cache, rc._feed(model, cache, ids), candidates)
    assert ours == pytest.approx(full_sequence_scores(model, ids, candidates), rel=1e-4, abs=1e-4)
    assert cache.get_seq_length() == len(ids)  # the candidates ran on copies
    text = rc.greedy_text(model, tokenizer, cache, rc._feed(model, new_cache(model), ids), 6, 10**6)
    assert text == tokenizer.decode(naive_greedy(model, ids, 6), skip_special_tokens=True)


def test_ties_earn_their_share():
    assert rc.choice_credit([0.0, -1.0, -2.0]) == 1.0
    assert rc.choice_credit([-1.0, 0.0, -2.0]) == 0.0
    assert rc.choice_credit([-1.0, -1.0, -1.0, -5.0]) == pytest.approx(1 / 3)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("call, match", [
    (lambda: parse_lengths("1k,2k,abc"), "--lengths takes"),
    (lambda: parse_lengths("0"), "positive"),
    (lambda: parse_lengths(""), "empty"),
    (lambda: parse_depths("0,0.5,x"), "--depths takes"),
    (lambda: parse_depths("0,1.5"), r"\[0, 1\]"),
    (lambda: parse_pairs("8,-3"), "positive"),
    (lambda: parse_pairs("8,100000"), "at most"),
    (lambda: RecallSettings(task="niah"), "unknown recall task 'niah'; known: mqar, passkey"),
    (lambda: RecallSettings(samples=0), "samples"),
    (lambda: RecallSettings(depths=(0.5, 2.0)), "depths"),
])
def test_bad_input_is_one_line(call, match):
    with pytest.raises(T2RError, match=match) as err:
        call()
    assert one_line(err)


def test_parsers_accept_good_input():
    assert parse_lengths("1k, 2k,512,1k") == (512, 1024, 2048)
    assert parse_depths("1,0,0.25") == (0.0, 0.25, 1.0)
    assert parse_pairs("128,8,32") == (8, 32, 128)


def test_command_line_turns_bad_input_into_exit_code_2(tiny_converted_dir, monkeypatch, capsys):
    from t2r.cli import app

    for flags in (["--lengths", "1k,zz"], ["--task", "nope"], ["--depths", "0,7"]):
        assert app.main(["recall", str(tiny_converted_dir), *flags]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("t2r recall: error:") and "\n" not in err


# ----------------------------------------------------------------------------- the command


def test_recall_command_runs_student_and_teacher(tiny_converted_dir, tiny_model_dir, tmp_path):
    from t2r.cli.recall import recall_command as recall
    from t2r.cli.recall import GridSettings, render_recall

    pytest.importorskip("matplotlib")
    r = recall(str(tiny_converted_dir), grid=GridSettings(lengths="300,400", depths="0,1"), samples=2,
               plot=str(tmp_path / "r.png"))
    assert r["which"] == "converted" and r["task"] == "passkey" and r["chance"] == 0.1
    for name in ("student", "teacher"):
        cells = r[name]["cells"]
        assert [(c["length"], c["depth"]) for c in cells] == [(300, 0.0), (300, 1.0), (400, 0.0), (400, 1.0)]
        assert all(0.0 <= c["acc_ll"] <= 1.0 and 0.0 <= c["acc_gen"] <= 1.0 and c["samples"] == 2 for c in cells)
    assert (tmp_path / "r.png").stat().st_size > 0
    table = render_recall(r)
    assert "converted" in table and "original" in table and "loglik" in table
    m = recall(str(tiny_converted_dir), task="mqar", grid=GridSettings(pairs="4"), samples=1, teacher=False)
    assert "teacher" not in m and [c["pairs"] for c in m["student"]["cells"]] == [4]
    plain = recall(str(tiny_model_dir), grid=GridSettings(lengths="300", depths="0.5"), samples=1, teacher=False)
    assert plain["which"] == "plain" and "student" not in plain and len(plain["teacher"]["cells"]) == 1
    assert "model" in render_recall(plain) and "mqar" in render_recall(m)
    rc.plot_recall(m, tmp_path / "m.png")


# ----------------------------------------------------------------------------- lm-eval


@pytest.mark.parametrize("kind", ["softmax", "converted"])
def test_lm_eval_task_agrees_with_recall(tokenizer, kind):
    pytest.importorskip("lm_eval")
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from t2r.lm_eval_bridge import TASKS_DIR

    model = tiny_model("llama", vocab_size=len(tokenizer))
    if kind == "converted":
        model = t2r.convert(model, feature_map="t2r", feature_dim=8, window=4, keep_softmax_layers=(1,))
    lm = HFLM(pretrained=model, tokenizer=tokenizer, max_length=512, batch_size=4, backend="causal")
    tasks = {"t2r_passkey": {"lengths": "300,400", "depths": "0,1", "samples": 2},
             "t2r_mqar": {"pairs": "4", "samples": 1, "queries": 3}}
    for task, meta in tasks.items():
        manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False, metadata={"tokenizer": tokenizer,
                                                                                           **meta})
        out = lm_eval.simple_evaluate(model=lm, tasks=[task], task_manager=manager, limit=3, bootstrap_iters=0,
                                      log_samples=True)
        logged = out["samples"][task]
        assert len(logged) == 3 and 0.0 <= out["results"][task]["acc,none"] <= 1.0
        for s in logged:  # lm-eval's full-sequence log-likelihoods == the cached ones of t2r recall
            doc, theirs = s["doc"], [ll for ll, _ in s["filtered_resps"]]
            ids = tokenizer(doc["context"])["input_ids"]
            candidates = [rc.continuation_ids(tokenizer, doc["context"], c) for c in doc["choices"]]
            with torch.inference_mode():
                cache = new_cache(model)
                ours = rc.candidate_scores(model, cache, rc._feed(model, cache, ids), candidates)
            assert ours == pytest.approx(theirs, rel=1e-4, abs=1e-4)
            assert s["acc"] == rc.choice_credit(ours, doc["gold"])


def test_lm_eval_task_needs_a_tokenizer():
    from t2r.tasks.t2r_recall_utils import load_passkey, process_generation

    with pytest.raises(T2RError, match="tokenizer") as err:
        load_passkey(version=1.0)
    assert one_line(err)
    assert process_generation({"answer": " 12345"}, [" 12345."]) == {"acc": 1.0}
    assert process_generation({"answer": " 12345"}, [" 1234"]) == {"acc": 0.0}


def test_recall_tasks_through_t2r_lm_eval(tiny_converted_dir, capsys):
    """`t2r lm-eval DIR --tasks t2r_passkey,t2r_mqar`: the local tasks, with prompts sized by the model's tokenizer."""
    pytest.importorskip("lm_eval")
    from t2r.cli import main

    argv = ["lm-eval", str(tiny_converted_dir), "--tasks", "t2r_passkey,t2r_mqar", "--limit", "2", "--context", "2048",
            "--json"]
    assert main(argv) == 0
    results = json.loads(capsys.readouterr().out)["results"]
    assert set(results) == {"t2r_passkey", "t2r_mqar"}
    assert all(0.0 <= r["acc"] <= 1.0 for r in results.values())
