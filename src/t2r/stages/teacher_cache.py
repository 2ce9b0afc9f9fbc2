"""Stage 2's teacher, computed once: for every training block, the teacher's k most likely next tokens with their
log-probabilities and the log of its mass on all other tokens, kept on disk and read back instead of running the
teacher at every step (`t2r finetune --kd 1 --kd-top-k 64`).

Layout: CACHE/<key>/manifest.json, and one shard per block, <sha256 of the block's tokens>.safetensors:

    ids   int32   [T-1, k]  the teacher's k most likely next tokens at each position but the last
    logp  float32 [T-1, k]  their log-probabilities
    rest  float32 [T-1]     log of the teacher's mass on every other token (-inf when k is the whole vocabulary)

<key> hashes the manifest: the teacher's weights (`t2r.evaluate.model_fingerprint`: every tensor's name, shape and
bytes, the t2r recipe and t2r's FORWARD_REVISION), k and the format. A shard is named by the bytes of its block's
tokens, in order, so the cache serves any data order or run that reads the same blocks, and other data only adds
shards. CACHE defaults to .teacher-cache beside the run directory (`default_cache_dir`).

Filled lazily: the first time a run reads a block its shard is computed (one teacher forward for all of a batch's
missing blocks) and written; from then on it is read. `TeacherCache.fill` computes shards up front. Every shard is
written with t2r.io's atomic writer, so an interrupted fill leaves no part of a shard under a shard's name; a shard
that cannot be read is recomputed, with a warning.

The loss is the exact KL(teacher || student) of the two distributions coarsened to k + 1 outcomes: the k cached
tokens and "any other token". It is >= 0 and <= the full KL (coarsening loses information), and equals it when k is
the whole vocabulary. `coarse_kl` computes it with autograd (the slow twin); `cached_teacher_loss` computes it with the
language-model loss in one pass over the logits, whose only [N, V] tensor is the gradient, where autograd's
log-softmax, masked copy and log-sum-exp each allocate one (on a CPU, at V = 49,152, together about as long as the
teacher's forward).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from ..errors import T2RError
from ..evaluate import model_fingerprint
from ..io import atomic_write, write_json
from ..transfer import follow_device

log = logging.getLogger(__name__)

FORMAT = 1
MANIFEST = "manifest.json"
CACHE_DIR = ".teacher-cache"
_FLOOR = -1e4  # a teacher log-probability of -inf (a token it rules out) counts as this: exp() is 0, no NaN


@dataclass(frozen=True)
class TeacherTargets:
    """The cached teacher for a batch: ids [B, T-1, k] (int64), logp [B, T-1, k] and rest [B, T-1] (float32)."""

    ids: torch.Tensor
    logp: torch.Tensor
    rest: torch.Tensor


def default_cache_dir(out: str | Path) -> Path:
    """.teacher-cache beside the run directory `out` (runs/ft -> runs/.teacher-cache): shared by the runs there."""
    return Path(out).absolute().parent / CACHE_DIR


def top_k_targets(logits: torch.Tensor, k: int) -> TeacherTargets:
    """The teacher's top-k log-probabilities and the log of the rest of its mass, from its logits [B, T-1, V]."""
    logp = F.log_softmax(logits.float(), dim=-1)  # (B, T-1, V)
    top, ids = logp.topk(k, dim=-1)  # (B, T-1, k)
    if k < logp.shape[-1]:
        rest = logp.scatter(-1, ids, float("-inf")).logsumexp(-1)  # (B, T-1)
    else:
        rest = torch.full(logp.shape[:-1], float("-inf"), device=logp.device)  # (B, T-1)
    return TeacherTargets(ids, top, rest)


def full_kl(logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) of next-token distributions [..., V], summed over the vocabulary and averaged over
    positions: the live teacher's distillation term (language models and translation pairs alike)."""
    return F.kl_div(F.log_softmax(logits, -1), F.log_softmax(teacher_logits, -1), log_target=True,
                    reduction="none").sum(-1).mean()


def coarse_kl(logits: torch.Tensor, targets: TeacherTargets) -> torch.Tensor:
    """KL(teacher || student) over k + 1 outcomes (the k cached tokens, then all others as one), summed over them
    and averaged over positions: the same reduction as the live teacher's full KL, which it equals at k = V.
    `logits` [B, T-1, V] are the student's (float32)."""
    student = F.log_softmax(logits, dim=-1)  # (B, T-1, V)
    ids = targets.ids  # (B, T-1, k)
    s, t = student.gather(-1, ids), targets.logp  # (B, T-1, k)
    if ids.shape[-1] < logits.shape[-1]:  # the rest bucket (none when the k tokens are the whole vocabulary)
        s_rest = student.scatter(-1, ids, float("-inf")).logsumexp(-1, keepdim=True)  # (B, T-1, 1)
        s, t = torch.cat([s, s_rest], -1), torch.cat([t, targets.rest.unsqueeze(-1)], -1)  # (B, T-1, k+1)
    return F.kl_div(s, t.clamp_min(_FLOOR), log_target=True, reduction="none").sum(-1).mean()


class _CachedTeacherLoss(torch.autograd.Function):
    """(lm [N], kl [N]): the next-token CE and the KL over k + 1 outcomes, per position, from the student's logits
    [N, V] (float32), the next tokens [N] and the cached teacher (ids [N, k], logp [N, k], rest [N]).

    The rest's log-sum-exp is taken with the k tokens masked, shifted by its own maximum (so it never underflows), and
    the full one from it and the k logits. Gradient: for a token j outside the k, g_lm p_j + g_kl (p_j - t_rest q_j)
    with q_j = p_j / p_rest; for one of the k, (g_lm + g_kl) p_j - g_kl t_j; minus g_lm at the next token. Both
    passes go over the rows in chunks of `_ROWS` elements, so that the only [N, V] tensor is the gradient."""

    @staticmethod
    def forward(ctx, logits, labels, ids, logp, rest):
        l_top = logits.gather(-1, ids)  # (N, k)
        r_max = r_sum = t_rest = None
        if ids.shape[-1] < logits.shape[-1]:
            r_max, r_sum = logits.new_empty(len(logits), 1), logits.new_empty(len(logits), 1)  # (N, 1)
            for rows in _row_chunks(logits):
                masked = logits[rows].scatter(-1, ids[rows], float("-inf"))  # (n, V)
                r_max[rows] = masked.amax(-1, keepdim=True)
                r_sum[rows] = masked.sub_(r_max[rows]).exp_().sum(-1, keepdim=True)  # >= 1
            r_lse = r_max + r_sum.log()  # (N, 1): log of the exp-sum outside the k tokens
            lse = torch.logaddexp(r_lse, l_top.logsumexp(-1, keepdim=True))  # (N, 1)
        else:
            lse = l_top.logsumexp(-1, keepdim=True)  # (N, 1)
        lm = (lse - logits.gather(-1, labels[:, None])).squeeze(-1)  # (N,)
        s_top, t_top = l_top - lse, logp.clamp_min(_FLOOR)  # (N, k)
        kl = (t_top.exp() * (t_top - s_top)).sum(-1)  # (N,)
        if r_max is not None:
            t_rest = rest.clamp_min(_FLOOR)[:, None]  # (N, 1)
            kl = kl + (t_rest.exp() * (t_rest - (r_lse - lse))).squeeze(-1)
        ctx.save_for_backward(logits, r_max, r_sum, t_rest, lse, s_top, t_top, ids, labels)
        return lm, kl

    @staticmethod
    def backward(ctx, grad_lm, grad_kl):
        logits, r_max, r_sum, t_rest, lse, s_top, t_top, ids, labels = ctx.saved_tensors
        g_lm, g_kl = grad_lm[:, None], grad_kl[:, None]  # (N, 1)
        grad = torch.empty_like(logits)  # (N, V)
        if r_max is None:
            grad.zero_()
        else:  # outside the k tokens: exp(l - r_max) * scale
            scale = (g_lm + g_kl) * (r_max - lse).exp() - g_kl * t_rest.exp() / r_sum  # (N, 1)
            for rows in _row_chunks(logits):
                part = torch.sub(logits[rows], r_max[rows], out=grad[rows]).exp_()  # (n, V)
                part.scatter_(-1, ids[rows], 0.0).mul_(scale[rows])
        grad.scatter_add_(-1, ids, (g_lm + g_kl) * s_top.exp() - g_kl * t_top.exp())
        grad.scatter_add_(-1, labels[:, None], -g_lm)
        return grad, None, None, None, None


_ROWS = 1 << 22  # elements per chunk of rows: 16 MiB of float32, reused by the allocator from one chunk to the next


def _row_chunks(logits: torch.Tensor) -> list[slice]:
    step = max(1, _ROWS // logits.shape[-1])
    return [slice(start, start + step) for start in range(0, len(logits), step)]


def cached_teacher_loss(logits: torch.Tensor, labels: torch.Tensor,
                        targets: TeacherTargets) -> tuple[torch.Tensor, torch.Tensor]:
    """(CE(student, next tokens), KL(teacher || student) over k + 1 outcomes), each averaged over positions: what
    `F.cross_entropy` and `coarse_kl` give, in one pass. `logits` [B, T-1, V] float32, `labels` [B, T-1]."""
    vocab, k = logits.shape[-1], targets.ids.shape[-1]
    lm, kl = _CachedTeacherLoss.apply(logits.reshape(-1, vocab), labels.reshape(-1), targets.ids.reshape(-1, k),
                                      targets.logp.reshape(-1, k), targets.rest.reshape(-1))
    return lm.mean(), kl.mean()


def block_name(row: torch.Tensor) -> str:
    """A block's shard name: sha256 of its token ids (int64, in order)."""
    return hashlib.sha256(row.detach().to("cpu", torch.int64).contiguous().numpy().tobytes()).hexdigest()[:32]


class TeacherCache:
    """The cached top-k teacher under `root` (see the module docstring). `targets(input_ids)` reads each block's
    shard, computing (with `teacher`) and writing those not cached yet. `fingerprint`: the teacher's
    `model_fingerprint`, if already known."""

    def __init__(self, teacher: nn.Module, root: str | Path, top_k: int, *, fingerprint: str | None = None) -> None:
        vocab = teacher.get_output_embeddings().weight.shape[0]
        if isinstance(top_k, bool) or not isinstance(top_k, int) or not 0 < top_k <= vocab:
            raise T2RError(f"--kd-top-k keeps the teacher's k most likely tokens, 0 < k <= its vocabulary ({vocab}), "
                           f"got {top_k!r}")
        self.teacher, self.top_k = teacher, top_k
        self.manifest = {"format": FORMAT, "teacher": fingerprint or model_fingerprint(teacher), "top_k": top_k,
                         "vocab": vocab, "logp": "float32"}
        key = hashlib.sha256(json.dumps(self.manifest, sort_keys=True).encode()).hexdigest()[:20]
        self.folder = Path(root) / key
        self.computed = self.read = 0  # blocks computed with the teacher / read from disk by this object
        self._open()

    def _open(self) -> None:
        path = self.folder / MANIFEST
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            if not os.access(self.folder, os.W_OK):
                raise PermissionError(13, "permission denied")
            if _read_json(path) != self.manifest:
                write_json(path, self.manifest)
        except OSError as err:
            raise T2RError(f"the teacher cache folder {self.folder} cannot be written ({err.strerror or err}): "
                           "give a writable folder with --teacher-cache DIR") from None
        log.info("teacher cache: %s (top %d tokens)", self.folder, self.top_k)

    def report(self) -> dict:
        return {"dir": str(self.folder), "top_k": self.top_k, "blocks_computed": self.computed,
                "blocks_read": self.read}

    def targets(self, input_ids: torch.Tensor) -> TeacherTargets:
        """The teacher's cached targets for blocks [B, T], on their device; missing blocks are computed first."""
        names = [block_name(row) for row in input_ids]
        shards = [self._load(name, input_ids.shape[1] - 1) for name in names]
        missing = [i for i, shard in enumerate(shards) if shard is None]
        if missing:
            for i, shard in zip(missing, self._compute(input_ids[missing])):
                self._save(names[i], shard)
                shards[i] = shard
        self.computed += len(missing)
        self.read += len(shards) - len(missing)
        ids, logp, rest = (torch.stack([s[k] for s in shards]).to(input_ids.device) for k in ("ids", "logp", "rest"))
        return TeacherTargets(ids.long(), logp, rest)

    def fill(self, blocks: torch.Tensor, *, batch_size: int = 1, progress: str | None = None) -> dict:
        """Make sure every block of [N, T] is cached: compute the shards missing (or damaged), `batch_size` blocks
        per teacher forward (`progress`: a progress bar with that label). Returns `report()`."""
        distinct = list({block_name(row): i for i, row in enumerate(blocks)}.values())
        with tqdm(total=len(distinct), desc=progress, unit="block", disable=progress is None, leave=False) as bar:
            for start in range(0, len(distinct), batch_size):
                batch = blocks[distinct[start:start + batch_size]]
                self.targets(batch)
                bar.update(len(batch))
        return self.report()

    def _compute(self, rows: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        follow_device(self.teacher, rows.device)
        self.teacher.eval()
        with torch.no_grad():
            logits = self.teacher(input_ids=rows, use_cache=False).logits[:, :-1]  # (B, T-1, V)
            found = top_k_targets(logits, self.top_k)
        return [{"ids": found.ids[i].to("cpu", torch.int32).contiguous(), "logp": found.logp[i].cpu().contiguous(),
                 "rest": found.rest[i].cpu().contiguous()} for i in range(rows.shape[0])]

    def _load(self, name: str, positions: int) -> dict[str, torch.Tensor] | None:
        """A block's shard, or None if it is not cached (or is damaged: warned, and then recomputed)."""
        path = self.folder / f"{name}.safetensors"
        if not path.is_file():
            return None
        try:
            shard = load_file(path)
            shapes = {k: (tuple(v.shape), v.dtype) for k, v in shard.items()}
        except (OSError, SafetensorError, ValueError, RuntimeError) as err:
            shard, shapes = None, f"unreadable ({' '.join(str(err).split())})"
        expected = {"ids": ((positions, self.top_k), torch.int32), "logp": ((positions, self.top_k), torch.float32),
                    "rest": ((positions,), torch.float32)}
        if shapes != expected:
            log.warning("teacher cache: %s is damaged (%s): recomputing it", path, shapes)
            return None
        return shard

    def _save(self, name: str, shard: dict[str, torch.Tensor]) -> None:
        path = self.folder / f"{name}.safetensors"
        try:
            atomic_write(path, lambda tmp: save_file(shard, tmp, metadata={"format": str(FORMAT)}))
        except OSError as err:
            raise T2RError(f"cannot write the teacher cache shard {path} ({err.strerror or err}): give a writable "
                           "folder with room to spare with --teacher-cache DIR") from None


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
