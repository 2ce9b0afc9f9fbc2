"""What `t2r bench` measures: one typed settings model (its fields are the command's flags)."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BeforeValidator, Field, model_validator

from ..errors import T2RError
from ..settings import Settings


def parse_sizes(spec: str, what: str = "--contexts") -> list[int]:
    """"128,1k,4k,16k" -> [128, 1024, 4096, 16384] (k = 1024), sorted and unique."""
    sizes = set()
    for part in spec.replace(" ", "").lower().split(","):
        if not part:
            continue
        scale = 1024 if part.endswith("k") else 1
        try:
            value = int(float(part[:-1] if scale > 1 else part) * scale)
        except (ValueError, OverflowError):  # not a number, or inf / nan
            raise T2RError(f"{what} takes comma-separated sizes like 128,1k,4k (k = 1024); got {spec!r}") from None
        if value <= 0:
            raise T2RError(f"{what} sizes must be positive; got {part!r} in {spec!r}")
        sizes.add(value)
    if not sizes:
        raise T2RError(f"{what} is empty; give sizes like 128,1k,4k")
    return sorted(sizes)


def _sizes(value: Any) -> Any:
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        return value  # a list: checked as list[int]
    try:
        return parse_sizes(value, "")
    except T2RError as err:
        raise ValueError(str(err).strip()) from None


Sizes = Annotated[list[int], BeforeValidator(_sizes)]  # "128,1k,4k" or [128, 1024, 4096]


class BenchSettings(Settings):
    """What `t2r bench` measures (`t2r.bench.run_bench`)."""

    contexts: Sizes = Field("128,1k,4k,16k", description="context lengths, comma-separated (k = 1024).")
    batch: Sizes = Field("1,8", description="batch sizes, comma-separated.")
    decode_tokens: int = Field(32, ge=1, description="timed decode steps per (model, context, batch); the median is "
                                                     "reported.")
    warmup: int = Field(4, ge=0, description="untimed decode steps before them.")
    prefill_cap_s: float = Field(120.0, ge=0, description="skip a real prefill predicted to take longer; its cache "
                                                          "is then extended from a shorter one.")
    decode_cap_s: float = Field(120.0, ge=0, description="cut a row's decode steps (to no fewer than 8) when it "
                                                         "would take longer than this.")
    train_seq: int = Field(2048, ge=2, description="sequence length of the training-step throughput measurement.")
    train_steps: int = Field(2, ge=0, description="timed training steps per model (0 = skip the measurement).")
    generate_tokens: int = Field(16, ge=0, description="tokens per run when timing HF generate against the lean "
                                                       "decode loop (0 = skip).")
    prefill_chunk: int = Field(2048, ge=0, description="prefill in forwards of this many tokens, carrying the cache "
                                                       "(0 = one forward per context).")
    quantize: str = Field("none", description="int8, fp16 or both (int8,fp16): also measure the converted model with quantized "
                                              "weights (t2r.quantize; rows named converted-int8 / converted-fp16), "
                                              "interleaved with the rest.")
    compile: bool = Field(False, description="also measure the converted model with its decode step compiled by "
                                             "torch.compile (rows named converted-compiled; float32 only).")
    llamacpp: str = Field("", description="a GGUF file: add llama.cpp's decode of it (llama-cpp-python, the "
                                          "optional extra t2r[llamacpp]) as reference rows; skipped with a note "
                                          "when the package is not installed.")
    llamacpp_prefill_cap_s: float = Field(1800.0, ge=0, description="llama.cpp cannot be handed a longer cache: a "
                                                                    "context whose prefill is predicted to take "
                                                                    "longer than this is left out of its rows.")

    @model_validator(mode="after")
    def _sorted(self) -> BenchSettings:
        for name in ("contexts", "batch"):  # a list given as such: the same order and checks as a string
            values = getattr(self, name)
            if not values or min(values) <= 0:
                raise ValueError(f"{name} must be positive sizes, got {values}")
            object.__setattr__(self, name, sorted(set(values)))
        return self
