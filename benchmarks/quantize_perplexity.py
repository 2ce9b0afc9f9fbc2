"""What quantized weights (`t2r.quantize`: int8, fp16) cost in held-out perplexity: a converted model and its original,
each in float32 and quantized, on the same held-out blocks (the `t2r eval` data path).

    OMP_NUM_THREADS=1 python benchmarks/quantize_perplexity.py runs/m-hedgehog-transfer/finetune --max-blocks 8

Prints perplexity per model and precision and the relative change; `--out FILE` writes them as JSON.
"""

from __future__ import annotations

import argparse
import copy
import json

import torch

import t2r
from t2r.adapters import original_model
from t2r.data import prepare_data
from t2r.evaluate import perplexity
from t2r.persistence import load_tokenizer
from t2r.quantize import pretrained_linear_names, quantize


def _quantized(model, mode, tokenizer):
    model = copy.deepcopy(model)
    if mode != "int8-plain":
        return quantize(model, mode, tokenizer=tokenizer)
    names = pretrained_linear_names(model)
    return torch.ao.quantization.quantize_dynamic(model, {n: torch.ao.quantization.per_channel_dynamic_qconfig
                                                          for n in names}, dtype=torch.qint8, inplace=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--data", default="austen")
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--max-blocks", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--modes", default="int8,fp16,int8-plain",
                        help="t2r.quantize modes, and int8-plain: PyTorch's quantize_dynamic int8 (one activation "
                        "scale per call, no outlier channels), what t2r used before")
    parser.add_argument("--out")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    converted = t2r.load(args.model).eval()
    tokenizer = load_tokenizer(args.model)
    blocks = prepare_data(args.data, tokenizer, block_size=args.context).heldout[:args.max_blocks]
    result = {"model": args.model, "data": args.data, "blocks": int(blocks.shape[0]), "context": args.context}
    for name, model in (("converted", converted), ("original", original_model(converted).eval())):
        fp = perplexity(model, blocks, context=args.context)["ppl"]
        result[name] = {"float32": fp}
        for mode in args.modes.split(","):
            q = perplexity(_quantized(model, mode, tokenizer), blocks, context=args.context)["ppl"]
            result[name][mode] = {"ppl": q, "change": q / fp - 1}
            print(f"{name:<9} float32 {fp:8.2f}  {mode} {q:8.2f}  change {100 * (q / fp - 1):+.2f}%", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
