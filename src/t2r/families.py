"""Which model families t2r converts, known without importing torch or transformers: the model types of the
adapters (src/t2r/adapters/, each declares its own; tests/test_families.py checks that this list names exactly those)
and the GGUF architectures HF's loader renames. `sources` checks a model's type against it from its config.json or
GGUF header before anything heavy is imported or any weight is read."""

from __future__ import annotations

from .errors import UnsupportedModelError

MODEL_TYPES = ("bart", "gemma3_text", "gpt2", "llama", "marian", "mistral", "mt5", "olmo2", "phi3", "qwen2", "qwen3",
               "t5", "umt5")
GGUF_ARCHITECTURES = {"gemma3": "gemma3_text"}  # a GGUF `general.architecture` -> the HF model type it loads as
NOT_T5 = ("its {what} differ from T5's, and the t5 adapter (t5, mt5, umt5) was not built or tested for them; convert "
          "a T5, mT5 or UMT5 model")
REFUSED = {  # on purpose: why
    "longt5": NOT_T5.format(what="local and transient-global attention blocks"),
    "switch_transformers": NOT_T5.format(what="sparse mixture-of-experts blocks (router outputs between layers)"),
}


def base_model_type(config) -> str:
    """The family's own model_type, also for an already converted config ("t2r_llama" -> "llama")."""
    model_type = getattr(config, "model_type", "") or ""
    return model_type[len("t2r_"):] if model_type.startswith("t2r_") else model_type


def check_model_type(model_type: str, what: str = "") -> str:
    """`model_type` if t2r converts it, else UnsupportedModelError in one line naming the supported families (`what`
    describes the model, e.g. its file). Needs only the type: callers check before loading any weights."""
    if model_type in REFUSED:
        raise UnsupportedModelError(f"model type {model_type!r}{f' ({what})' if what else ''} is not converted by t2r: "
                                    f"{REFUSED[model_type]}")
    if model_type not in MODEL_TYPES:
        raise UnsupportedModelError(
            f"no t2r adapter for model type {model_type!r}{f' ({what})' if what else ''}; "
            f"supported: {', '.join(MODEL_TYPES)}")
    return model_type


def model_type_of_gguf(architecture: str) -> str:
    """The HF model type of a GGUF file's `general.architecture` (the same name unless HF's loader renames it)."""
    return GGUF_ARCHITECTURES.get(architecture, architecture)
