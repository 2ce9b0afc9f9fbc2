"""The T2R paper's translation claim at a reduced scale, on this machine: a small Marian-style transformer trained from
scratch on the gettext English -> German corpus (`t2r data gettext:de`) is the "pretrained" teacher; then, at the same
token budget each,
  (a) the transformer itself (its budget: --teacher-tokens),
  (b) swap-then-finetune (the paper's recipe): convert, finetune every weight,
  (c) attention transfer, then finetune with distillation from the teacher (t2r's recipe: cross-entropy + --kd x
      KL(teacher || student) per target token), the transfer's target tokens counted in the budget,
and, to tell the two parts of (c) apart, (b) with the same distillation and (c) without it; and
  (d) the same RNN (converted architecture) trained from random initialisation,
scored by sacrebleu BLEU and chrF of beam search (beam 4) on held-out sentences; and decode ms/token against source
length for (a) and (c) (one greedy step with the cache, the source already read).

    OMP_NUM_THREADS=1 python benchmarks/mt_small.py --out runs/mt_small

Writes results.json, decode.png and prints the markdown table of docs/RESULTS.md. Stages are cached in --out (the
teacher and each trained model are saved; a rerun reuses them).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import statistics
import time
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

import t2r
from t2r.convert import convert, reinitialize
from t2r.parallel import is_parallel_dir, load_pairs, prepare_parallel
from t2r.translation import PairTraining, heldout_loss, train_pairs, transfer_attention, translation_scores

log = logging.getLogger("mt_small")
SPECIALS = ["<pad>", "</s>", "<unk>"]


def bpe_tokenizer(pairs, vocab_size: int, path: Path) -> PreTrainedTokenizerFast:
    """One joint byte-level BPE vocabulary for both languages (as Marian shares one), `</s>` appended."""
    if (path / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast.from_pretrained(path)
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator((s for pair in pairs for s in pair), trainer)
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>",
                                        unk_token="<unk>")
    tokenizer.save_pretrained(path)
    return tokenizer


def teacher_model(vocab: int, args) -> transformers.PreTrainedModel:
    """A new teacher with random weights: Marian (sinusoidal absolute positions) or T5 (relative position bias, which
    the converted decoder self-attention drops; pre-norm, no FFN bias) of the same width, depth and heads."""
    if args.family == "t5":
        return transformers.T5ForConditionalGeneration(transformers.T5Config(
            vocab_size=vocab, d_model=args.d_model, d_kv=args.d_model // 4, d_ff=4 * args.d_model,
            num_layers=args.layers, num_decoder_layers=args.layers, num_heads=4, dropout_rate=0.1,
            feed_forward_proj="relu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, num_beams=4))
    return transformers.MarianMTModel(teacher_config(vocab, args))


def teacher_config(vocab: int, args) -> transformers.MarianConfig:
    return transformers.MarianConfig(
        vocab_size=vocab, d_model=args.d_model, encoder_layers=args.layers, decoder_layers=args.layers,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=4 * args.d_model,
        decoder_ffn_dim=4 * args.d_model, max_position_embeddings=520, pad_token_id=0, eos_token_id=1,
        decoder_start_token_id=0, forced_eos_token_id=None, dropout=0.1, attention_dropout=0.0,
        scale_embedding=True, share_encoder_decoder_embeddings=True, num_beams=4)


def stage(out: Path, name: str, make):
    """The model saved in out/name, or `make()` -> (model, info) trained and saved there (info kept in info.json)."""
    path = out / name
    if (path / "config.json").is_file():
        log.info("reusing %s", path)
        model = transformers.AutoModelForSeq2SeqLM.from_pretrained(path).eval()
        return model, json.loads((path / "info.json").read_text())
    model, info = make()
    model.save_pretrained(path)
    (path / "info.json").write_text(json.dumps(info, indent=1))
    return model, info


def progress(label: str):
    def on_step(step, loss, seen):
        if step % 50 == 0:
            log.info("%s step %d loss %.4f tokens %d", label, step, loss, seen)
    return on_step


@torch.no_grad()
def decode_ms_per_token(model, source_len: int, steps: int = 24, repeats: int = 3) -> float:
    """Median over `repeats` of the mean time of one greedy decoder step with the cache (the source already
    encoded and, for the converted model, its cross-attention state made at the first step, not timed)."""
    torch.manual_seed(0)
    src = torch.randint(3, model.config.vocab_size, (1, source_len))
    encoded = model.get_encoder()(input_ids=src)
    times = []
    for _ in range(repeats):
        cache = transformers.EncoderDecoderCache(transformers.DynamicCache(), transformers.DynamicCache())
        token = torch.zeros(1, 1, dtype=torch.long)
        out = model(encoder_outputs=encoded, decoder_input_ids=token, cache=cache)
        start = time.perf_counter()
        for _ in range(steps):
            token = out.logits[:, -1:].argmax(-1)
            out = model(encoder_outputs=encoded, decoder_input_ids=token, cache=cache)
        times.append((time.perf_counter() - start) / steps * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/mt_small")
    parser.add_argument("--data", default="data/gettext-de", help="folder of `t2r data gettext:de --out`")
    parser.add_argument("--family", choices=("marian", "t5"), default="marian", help="the teacher's architecture")
    parser.add_argument("--vocab", type=int, default=4000)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--teacher-tokens", type=int, default=1_500_000, help="target tokens to train the teacher")
    parser.add_argument("--tokens", type=int, default=300_000, help="target tokens for each of (b), (c), (d)")
    parser.add_argument("--transfer-tokens", type=int, default=50_000, help="of --tokens, for (c)'s transfer")
    parser.add_argument("--kd", type=float, default=0.5, help="(c)'s distillation weight (0: no KD rows)")
    parser.add_argument("--feature-map", default="t2r")
    parser.add_argument("--feature-dim", type=int, default=32)
    parser.add_argument("--heldout", type=int, default=0, help="held-out sentences to score (0: all)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0, help="data order of every training run (not the teacher's "
                                                            "when it is reused)")
    parser.add_argument("--skip-random", action="store_true", help="leave out (d), the RNN from random weights")
    parser.add_argument("--lengths", default="8,32,128,512")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not is_parallel_dir(args.data):
        prepare_parallel("gettext:de", args.data)
    train, heldout = load_pairs(args.data, "train"), load_pairs(args.data, "heldout")[: args.heldout or None]
    tokenizer = bpe_tokenizer(train, args.vocab, out / "tokenizer")
    common = dict(batch_size=args.batch_size, max_length=64, seed=args.seed)
    recipe = dict(feature_map=args.feature_map, feature_dim=args.feature_dim)

    def make_teacher():
        torch.manual_seed(0)
        model = teacher_model(len(tokenizer), args)
        info = train_pairs(model, tokenizer, train, PairTraining(tokens=args.teacher_tokens, lr=1e-3, **common),
                           on_step=progress("teacher"))
        return model, info

    teacher, teacher_info = stage(out, "a_teacher", make_teacher)

    def swap(kd: float):
        def make():
            model = convert(copy.deepcopy(teacher), **recipe)
            settings = PairTraining(tokens=args.tokens, lr=5e-4, kd=kd, **common)
            return model, train_pairs(model, tokenizer, train, settings, teacher=teacher, on_step=progress("swap"))
        return make

    def transfer(kd: float):
        def make():
            model = convert(copy.deepcopy(teacher), **recipe)
            settings = PairTraining(tokens=args.transfer_tokens, lr=1e-2, **common)
            info = {"transfer": transfer_attention(model, tokenizer, train, settings, on_step=progress("transfer"))}
            rest = PairTraining(tokens=args.tokens - args.transfer_tokens, lr=5e-4, kd=kd, **common)
            info["finetune"] = train_pairs(model, tokenizer, train, rest, teacher=teacher,
                                           on_step=progress("transfer+ft"))
            return model, info
        return make

    def make_random():
        model = convert(reinitialize(copy.deepcopy(teacher), seed=1), **recipe)
        return model, train_pairs(model, tokenizer, train, PairTraining(tokens=args.tokens, lr=1e-3, **common),
                                  on_step=progress("random"))

    rows = {"(a) transformer (teacher)": (teacher, teacher_info)}
    rows["(b) swap-then-finetune"] = stage(out, "b_swap_finetune", swap(0.0))
    if args.kd:
        rows[f"(b) with KD {args.kd:g}"] = stage(out, f"b_swap_kd{args.kd:g}", swap(args.kd))
        rows["(c) without KD"] = stage(out, "c_transfer_finetune", transfer(0.0))
        rows[f"(c) transfer + finetune with KD {args.kd:g}"] = stage(out, f"c_transfer_kd{args.kd:g}",
                                                                     transfer(args.kd))
    else:
        rows["(c) transfer + finetune"] = stage(out, "c_transfer_finetune", transfer(0.0))
    if not args.skip_random:
        rows["(d) RNN from random init"] = stage(out, "d_random_init", make_random)
    converted = [label for label in rows if label.startswith("(c)")][-1]
    results = {"args": vars(args), "train_pairs": len(train), "heldout_pairs": len(heldout), "rows": {}}
    hypotheses = {}
    for label, (model, info) in rows.items():
        log.info("scoring %s", label)
        scores = translation_scores(model.eval(), tokenizer, heldout, beam=4, batch_size=32, keep_hypotheses=True)
        hypotheses[label] = scores.pop("hypotheses")
        results["rows"][label] = {**scores, "heldout_loss": round(heldout_loss(model, tokenizer, heldout), 4),
                                  "train": info}
    (out / "hypotheses.json").write_text(json.dumps(hypotheses, indent=0, ensure_ascii=False))
    results["paired_bootstrap"] = paired_bootstrap(hypotheses, [t for _, t in heldout])
    lengths = [int(x) for x in args.lengths.split(",")]
    results["decode_ms_per_token"] = {
        label: {n: round(decode_ms_per_token(rows[label][0], n), 3) for n in lengths}
        for label in ("(a) transformer (teacher)", converted)}
    (out / "results.json").write_text(json.dumps(results, indent=1, ensure_ascii=False))
    plot(results, lengths, out / "decode.png")
    print(table(results))


def paired_bootstrap(hypotheses: dict[str, list[str]], references: list[str], samples: int = 1000) -> dict:
    """sacrebleu's paired bootstrap of every row's BLEU against the first row's (the teacher): the mean over
    `samples` resamplings of the held-out sentences, its 95% interval, and the p-value of the difference."""
    from sacrebleu.metrics import BLEU
    from sacrebleu.significance import PairedTest

    test = PairedTest(list(hypotheses.items()), {"BLEU": BLEU()}, [references], test_type="bs", n_samples=samples)
    _, scores = test()
    return {label: {"bleu": round(float(r.score), 2), "mean": round(float(r.mean), 2), "ci95": round(float(r.ci), 2),
                    "p_vs_teacher": None if r.p_value is None else round(float(r.p_value), 4)}
            for label, r in zip(scores["System"], scores["BLEU"])}


def plot(results: dict, lengths: list[int], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for label, ms in results["decode_ms_per_token"].items():
        ax.plot(lengths, [ms[n] for n in lengths], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("source tokens")
    ax.set_ylabel("ms per decoded token")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def table(results: dict) -> str:
    lines = ["| model | BLEU (bootstrap mean ± 95%) | p vs (a) | chrF | held-out loss/token | target tokens trained |",
             "|---|---|---|---|---|---|"]
    for label, r in results["rows"].items():
        info, boot = r["train"], results["paired_bootstrap"][label]
        tokens = info.get("target_tokens") or sum(v["target_tokens"] for k, v in info.items() if isinstance(v, dict))
        lines.append(f"| {label} | {r['bleu']:.2f} ({boot['mean']:.2f} ± {boot['ci95']:.2f}) | {boot['p_vs_teacher']} "
                     f"| {r['chrf']:.2f} | {r['heldout_loss']:.3f} | {tokens:,} |")
    lines += ["", "| source tokens | " + " | ".join(results["decode_ms_per_token"]) + " |",
              "|---|" + "---|" * len(results["decode_ms_per_token"])]
    lengths = next(iter(results["decode_ms_per_token"].values())).keys()
    for n in lengths:
        lines.append(f"| {n} | " + " | ".join(f"{ms[n]:.2f}" for ms in results["decode_ms_per_token"].values())
                     + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    assert t2r  # registers the converted classes with the Auto factories
    main()
