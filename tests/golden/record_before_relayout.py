"""How tests/golden/converted_logits.json was recorded, on commit 4b4b541, BEFORE the relayout of issue 10 (kept for
the record; it imports the old module paths and is not run again: the expected values must not be recomputed)."""
import json, sys
sys.path.insert(0, "tests")
import torch
from conftest import FAMILIES, tiny_model
import t2r

RECIPES = {
    "hedgehog": dict(feature_map="hedgehog", feature_dim=16),
    "t2r-window-kept": dict(feature_map="t2r", feature_dim=8, window=4, keep_softmax_layers=(1,)),
    "elu-wide-window": dict(feature_map="elu", window=70),
    "taylor": dict(feature_map="taylor", feature_dim=4),
    "performer-window": dict(feature_map="performer", feature_dim=16, window=3),
    "rfa": dict(feature_map="rfa", feature_dim=8),
}
torch.set_num_threads(1)
ids = torch.randint(3, 300, (2, 37), generator=torch.Generator().manual_seed(123))
mask = torch.ones_like(ids); mask[1, :5] = 0
out = {"input_ids": ids.tolist(), "attention_mask": mask.tolist(), "cases": {}}
for family in FAMILIES:
    for name, recipe in RECIPES.items():
        model = t2r.convert(tiny_model(family), **recipe)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits.double()
        out["cases"][f"{family}/{name}"] = {
            "recipe": {k: list(v) if isinstance(v, tuple) else v for k, v in recipe.items()},
            "first": logits[:, [0, 4, 20, 36], :6].tolist(),
            "sum": float(logits.sum()), "abs_sum": float(logits.abs().sum()),
        }
json.dump(out, open("tests/golden/converted_logits.json", "w"), indent=1)
print(len(out["cases"]), "cases")
from t2r.distill import AttentionTransfer
out["transfer"] = {}
for family in FAMILIES:
    for name in ("hedgehog", "t2r-window-kept"):
        model = t2r.convert(tiny_model(family), **RECIPES[name])
        with torch.no_grad():
            r = AttentionTransfer(model, attn_ce=0.5)(ids)
        out["transfer"][f"{family}/{name}"] = {k: (v.tolist() if v.dim() else float(v)) for k, v in r.items()}
json.dump(out, open("tests/golden/converted_logits.json", "w"), indent=1)
print(len(out["transfer"]), "transfer cases")
