"""Chat (issue 17): the tokenizer's chat template in `t2r generate` (default where there is one, --raw to turn it
off), the `t2r chat` REPL on piped stdin, streaming through HF's TextStreamer, and the recurrent state carried from
turn to turn giving the same tokens as a fresh prefill of the whole conversation."""

from __future__ import annotations

import io
import json

import pytest
import torch
import transformers

import t2r
import t2r.cli
from conftest import byte_tokenizer, tiny_model
from t2r.chat import Chat, chat_text, has_chat_template
from test_cli import run_cli

TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>\n{% endfor %}"
            "{% if add_generation_prompt %}<s>assistant: {% endif %}")


def chat_tokenizer():
    tok = byte_tokenizer()
    tok.chat_template = TEMPLATE
    return tok


def linear_model(seed: int = 0):
    """A tiny converted Llama with only linear layers: its state has one size whatever the conversation's length."""
    return t2r.convert(tiny_model("llama", seed=seed), feature_map="t2r", feature_dim=8)


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("chat") / "rnn"
    t2r.save(linear_model(), path, chat_tokenizer())
    return path


@pytest.fixture(scope="module")
def raw_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("raw") / "rnn"
    t2r.save(linear_model(), path, byte_tokenizer())
    return path


def test_chat_text_uses_the_template():
    tok = chat_tokenizer()
    assert has_chat_template(tok) and not has_chat_template(byte_tokenizer())
    text = chat_text(tok, [{"role": "user", "content": "hi"}])
    assert text == "<s>user: hi</s>\n<s>assistant: "
    with pytest.raises(t2r.T2RError, match="no chat template"):
        chat_text(byte_tokenizer(), [{"role": "user", "content": "hi"}])


def test_state_carried_across_turns_equals_a_fresh_prefill():
    """Turn 2 reads only its own tokens on top of turn 1's state, and generates what a fresh prefill of the whole
    conversation (the same ids) generates; the state keeps its size."""
    model, tok = linear_model(), chat_tokenizer()
    talk = Chat(model, tok, system="be brief", max_new_tokens=6)
    first = talk.say("hello there")
    ids_after_first = talk._ids.shape[1]
    second = talk.say("and again")
    assert not first.reused_state and second.reused_state
    assert second.read_tokens < talk._ids.shape[1] - second.new_tokens  # not the whole conversation again
    assert second.state_bytes == first.state_bytes
    assert [m["role"] for m in talk.messages] == ["system", "user", "assistant", "user", "assistant"]
    prompt = talk._ids[:, :talk._ids.shape[1] - second.new_tokens]
    assert prompt.shape[1] > ids_after_first
    fresh = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), cache=t2r.new_cache(model),
                           max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=[2])
    assert torch.equal(fresh, talk._ids)


def test_reset_starts_over():
    talk = Chat(linear_model(), chat_tokenizer(), max_new_tokens=3)
    talk.say("one")
    talk.reset()
    assert talk.messages == []
    assert not talk.say("two").reused_state


def test_streamer_gets_the_reply(capsys):
    talk = Chat(linear_model(), chat_tokenizer(), max_new_tokens=8)
    reply = talk.say("hi", streamer=transformers.TextStreamer(talk.tokenizer, skip_prompt=True,
                                                               skip_special_tokens=True))
    assert capsys.readouterr().out == reply.text + "\n"



def test_generate_uses_the_template_by_default_and_raw_turns_it_off(capsys, chat_dir):
    code, out, err = run_cli(capsys, "generate", chat_dir, "--prompt", "hi", "--max-new-tokens", 5, "--json")
    assert code == 0, err
    chat = json.loads(out)
    assert chat["chat"] is True and chat["streamed"] is False
    code, out, err = run_cli(capsys, "generate", chat_dir, "--prompt", "hi", "--max-new-tokens", 5, "--raw", "--json")
    raw = json.loads(out)
    assert raw["chat"] is False
    expected = Chat(t2r.load(chat_dir), chat_tokenizer(), max_new_tokens=5).say("hi").text
    assert chat["text"] == expected


def test_generate_streams_the_text_once(capsys, chat_dir):
    code, out, err = run_cli(capsys, "generate", chat_dir, "--prompt", "hi", "--max-new-tokens", 5)
    assert code == 0, err
    code, plain, err = run_cli(capsys, "generate", chat_dir, "--prompt", "hi", "--max-new-tokens", 5, "--no-stream")
    text = Chat(t2r.load(chat_dir), chat_tokenizer(), max_new_tokens=5).say("hi").text
    assert out.count(text) == 1 and plain.count(text) == 1  # streamed, not printed a second time
    assert out.rstrip().endswith("]") and "5 tokens" in out.splitlines()[-1]


def test_generate_without_a_template(capsys, raw_dir):
    code, out, err = run_cli(capsys, "generate", raw_dir, "--prompt", "hi", "--max-new-tokens", 4, "--json")
    assert code == 0 and json.loads(out)["chat"] is False
    code, out, err = run_cli(capsys, "generate", raw_dir, "--prompt", "hi", "--max-new-tokens", 4, "--chat")
    assert code == 2 and "no chat template" in err and "--raw" in err
    code, out, err = run_cli(capsys, "generate", raw_dir, "--chat", "--raw")
    assert code == 2 and "exclude each other" in err


def test_chat_repl_on_piped_stdin(capsys, monkeypatch, chat_dir):
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n\nsecond message\n/reset\nafter reset\n/exit\nnever read\n"))
    code, out, err = run_cli(capsys, "chat", chat_dir, "--max-new-tokens", 4, "--json")
    assert code == 0, err
    r = json.loads(out)
    assert [t["user"] for t in r["turns"]] == ["hello", "second message", "after reset"]
    assert [t["reused_state"] for t in r["turns"]] == [False, True, False]
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\nsecond message\n"))
    code, out, err = run_cli(capsys, "chat", chat_dir, "--max-new-tokens", 4)
    assert code == 0, err
    for turn in r["turns"][:2]:  # the same replies, streamed
        assert turn["assistant"] in out
    assert out.strip().splitlines()[-1].startswith("[2 turn(s), 8 tokens")


def test_chat_without_a_template_stops_before_loading_the_model(capsys, monkeypatch, raw_dir):
    import t2r.persistence

    monkeypatch.setattr(t2r.persistence, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n"))
    code, out, err = run_cli(capsys, "chat", raw_dir)
    assert code == 2 and "without a chat template" in err and f"t2r generate {raw_dir} --raw" in err


def test_sampling_flags_reach_the_chat(capsys, chat_dir):
    argv = ["generate", chat_dir, "--prompt", "hi", "--max-new-tokens", 6, "--sample", "--temperature", "0.7",
            "--top-k", 20, "--seed", 3, "--json"]
    first, second = (json.loads(run_cli(capsys, *argv)[1])["text"] for _ in range(2))
    assert first == second  # seeded
    greedy = json.loads(run_cli(capsys, *argv[:6], "--json")[1])["text"]
    assert first != greedy or len(first) == 0
    code, _, err = run_cli(capsys, *argv[:6], "--temperature", "0")
    assert code == 2 and "--temperature" in err
