"""distill onpolicy: on-policy distillation. The student samples, the teacher scores every sampled token.

    distill onpolicy --student runs/sft-7b/model --teacher deepseek-ai/DeepSeek-R1-Distill-Qwen-32B --data math-train --out runs/onpolicy-7b
    distill onpolicy --recipe recipes/onpolicy/qwen3-8b-from-32b.yaml --out runs/onpolicy-qwen3-8b [key=value ...]

The method (Agarwal et al.'s GKD with lambda = 1 and the reverse KL; MiniLLM; as Qwen3's
strong-to-weak distillation ends and as Thinking Machines publish it in tinker-cookbook,
`distillation/train_on_policy.py`): the student rolls out completions of the problems, the
teacher computes log p_teacher of each sampled token given the same prefix, and each token's
advantage is the negative of the per-token reverse KL estimate

    A_t = -kl_coef * (log p_student(x_t) - log p_teacher(x_t))      [+ reward_weight * A_reward]

fed to the same clipped, importance-sampled surrogate as GRPO. Pushing up tokens the teacher
finds likelier than the student does (and down the others) descends the reverse KL
KL(student || teacher) on the student's own distribution: the student is corrected where it
actually goes, which off-policy SFT on teacher traces never shows it.

It is one loop with `distill grpo` (students/grpo.py): rollout, the update, resume, FSDP2,
LoRA, checkpoints and export are grpo's, not copied. What this module adds is a `Teacher`, the
hook that loop calls after each rollout: it takes the sampling policy's log-probs of the
completions from the trainer's own no-grad pass (as grpo's "old" log-probs: never the
engine's), has the teacher engine score the same tokens (`Engine.score`: hf forward, vLLM's
prompt log-probs, or an OpenAI-compatible server's), and sets each sample's per-token
advantages (distill.students.rl.reverse_kl_advantages).

Defaults and where they come from (tinker-cookbook's recipes/distillation; we differ where said):
- group_size 4 (cookbook), temperature 1.0 (cookbook), kl_coef 1.0 and kl_discount 0 (cookbook's
  kl_penalty_coef and kl_discount_factor: the advantage is not discounted: each token answers
  for its own KL), lr 5e-5 (the cookbook's full fine-tuning rate; 1e-4 with LoRA, as the
  recipes set), max_tokens 16384 (the cookbook's reasoning command; its code default is 4096),
  200 steps (its reasoning result: AIME24 ~76.7 after 200 steps), save_every 20 (cookbook).
- prompts_per_step 64, not the cookbook's 512-1024 groups per batch: 256 completions of 16k
  tokens is a step one 8-GPU node rolls out and updates in minutes; raise it on a cluster.
- The loss: the cookbook's `importance_sampling` loss is -ratio * A summed over tokens, with no
  clipping; here the surrogate is grpo's clipped one, which with the default mu = minibatches
  = 1 has ratio 1 and clips nothing (the same gradient), and tokens are averaged over the
  batch (`aggregation=token`: the sum divided by a constant, which Adam's update does not see
  except through grad_clip).
- reward_weight 0 (cookbook: no reward at all). With reward_weight > 0 the verifier's
  group-relative advantage (grpo's, per the variant) is added to every token of a completion,
  and group_size must be at least 2. Without it group_size 1 is allowed, and problems need no
  reference answers (the rewards are still computed and logged where there are references).
- beta (k3 KL to the initial policy) stays available, at 0.

Teachers: `teacher_engine=hf` (default; the teacher loaded in this process, on this rank's
device, every rank its own copy: fine up to a teacher that fits beside the student),
`vllm` (in-process vLLM, `teacher_engine_options` such as gpu_memory_utilization,
tensor_parallel_size), `openai` (a server such as `vllm serve TEACHER` that returns prompt
log-probs; `teacher_engine_options.base_url`; `teacher_tokenizer` names the tokenizer to check).

The teacher must tokenize as the student does: it scores the student's token ids. A teacher
whose vocabulary, special tokens or tokenization differ is refused with one line before any
model loads (cross-tokenizer distillation, e.g. GOLD's, is not done). The teacher scores the
prompt as the student's chat template renders it.

Figures: metrics.jsonl per step adds `reverse_kl` (mean per scored token of log p_student -
log p_teacher under the sampling policy: the quantity the stage minimises), `teacher_s`,
`student_logprobs_s` and `teacher_scored_tokens`; metrics.json adds `reverse_kl_first`,
`reverse_kl_last10` and `teacher_scored_tokens` to grpo's figures (train_tokens included).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Optional, Sequence

from distill.config import Loaded
from distill.students.grpo import LOCKED as GRPO_LOCKED
from distill.students.grpo import GRPOConfig, load_grpo_config


@dataclass(frozen=True)
class OnPolicyConfig(GRPOConfig):
    """GRPOConfig's fields (the same loop), with on-policy distillation's defaults and the teacher."""

    # rollouts and optimisation: tinker-cookbook's on-policy distillation where it makes sense
    group_size: int = 4
    prompts_per_step: int = 64
    max_tokens: int = 16384
    lr: float = 5e-5
    steps: int = 200
    save_every: int = 20
    aggregation: Optional[Literal["sequence", "token", "constant"]] = "token"

    # the teacher (a hub id or a model directory; for teacher_engine=openai, the served model name)
    teacher: str = field(kw_only=True)
    teacher_engine: Literal["hf", "vllm", "openai"] = field(default="hf", kw_only=True)
    teacher_engine_options: dict[str, Any] = field(default_factory=dict, kw_only=True)  # hf: batch_size, dtype; vllm: gpu_memory_utilization; openai: base_url
    teacher_tokenizer: Optional[str] = field(default=None, kw_only=True)  # the tokenizer checked against the student's (default: the teacher's own)
    kl_coef: float = field(default=1.0, kw_only=True)  # the cookbook's kl_penalty_coef
    kl_discount: float = field(default=0.0, kw_only=True)  # the cookbook's kl_discount_factor: 0, no discounting
    reward_weight: float = field(default=0.0, kw_only=True)  # weight of the verifier's group-relative advantage

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.kl_coef < 0 or self.reward_weight < 0:
            raise ValueError("kl_coef and reward_weight must be >= 0")
        if self.kl_coef == 0 and self.reward_weight == 0:
            raise ValueError("kl_coef=0 and reward_weight=0 leave nothing to learn; set kl_coef > 0 (1.0 is the default)")
        if not 0 <= self.kl_discount < 1:
            raise ValueError(f"kl_discount must be in [0, 1), got {self.kl_discount}")
        if self.variant == "dapo" or self.dynamic_sampling:
            raise ValueError("dynamic sampling (variant=dapo) drops groups whose rewards are all equal; on-policy distillation learns from every group: use variant=grpo")
        if not self.teacher:
            raise ValueError("teacher is empty: pass --teacher (a hub id or a model directory)")

    def _check_group_size(self) -> None:
        if self.group_size < 1:
            raise ValueError(f"group_size must be at least 1, got {self.group_size}")
        if self.reward_weight > 0 and self.group_size < 2:
            raise ValueError("reward_weight > 0 needs group_size >= 2: the reward's advantage is relative to the other completions of a prompt")


# grpo's locked settings, and what defines the teacher's signal
LOCKED = GRPO_LOCKED + ("teacher", "teacher_tokenizer", "kl_coef", "kl_discount", "reward_weight")


def load_onpolicy_config(recipe: str | Path | None = None, flags: Mapping[str, Any] | None = None, overrides: Sequence[str] = ()) -> Loaded[OnPolicyConfig]:
    """The config from defaults < student preset < recipe < flags < key=value (as distill grpo)."""
    return load_grpo_config(recipe, flags, overrides, cls=OnPolicyConfig)


def run(cfg: OnPolicyConfig, sources: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Train the student on-policy against the teacher; returns metrics.json's figures."""
    from distill.students import grpo

    teacher_model_id(cfg)  # a misspelt teacher is refused before anything is made or loaded
    return grpo.run(cfg, sources, teacher=Teacher(cfg))


def teacher_model_id(cfg: OnPolicyConfig) -> str:
    """The teacher as given, checked without asking the hub (a served name for openai)."""
    from distill.errors import InputError

    if cfg.teacher_engine == "openai":
        return cfg.teacher
    path = Path(cfg.teacher)
    if path.exists() and not (path / "config.json").is_file():
        raise InputError(f"teacher '{cfg.teacher}': a path without config.json, so not a model directory; pass a model directory or a hub id (org/name)")
    if not path.exists() and cfg.teacher.count("/") != 1:
        raise InputError(f"teacher '{cfg.teacher}' is neither an existing model directory nor a hub id (org/name)")
    return cfg.teacher


def tokenizer_mismatch(student, teacher) -> str | None:
    """How the teacher's tokenizer differs from the student's (the first difference found), or
    None when the teacher can score the student's token ids: the same vocabulary (ids included),
    the same special tokens, and the same ids for a probe text."""
    mine, theirs = student.get_vocab(), teacher.get_vocab()
    if mine != theirs:
        missing = sorted(set(mine) - set(theirs), key=mine.get)
        if missing:
            return f"{len(mine):,} against {len(theirs):,} tokens; the student's {missing[0]!r} (id {mine[missing[0]]}) is not in the teacher's vocabulary"
        extra = sorted(set(theirs) - set(mine), key=theirs.get)
        if extra:
            return f"{len(mine):,} against {len(theirs):,} tokens; the teacher's {extra[0]!r} (id {theirs[extra[0]]}) is not in the student's vocabulary"
        moved = min((t for t in mine if mine[t] != theirs[t]), key=mine.get)
        return f"token {moved!r} is id {mine[moved]} for the student, {theirs[moved]} for the teacher"

    def special(tokenizer) -> dict[int, str]:
        return {i: t.content for i, t in tokenizer.added_tokens_decoder.items() if t.special}

    mine_special, theirs_special = special(student), special(teacher)
    if mine_special != theirs_special:
        differ = sorted(set(mine_special.items()) ^ set(theirs_special.items()))
        whose = "the student" if differ[0] in mine_special.items() else "the teacher"
        return f"special tokens differ: {differ[0][1]!r} (id {differ[0][0]}) is special only for {whose}"
    probe = "Solve: 12+7=? <think>\nFirst, 12 + 7 = 19.\n</think>\n\nThe answer is \\boxed{19}. Ünïcode ∑ 数学"
    a = student(probe, add_special_tokens=False)["input_ids"]
    b = teacher(probe, add_special_tokens=False)["input_ids"]
    if list(a) != list(b):
        return "the same vocabulary splits text differently (other merges or normalisation)"
    return None


class Teacher:
    """The hook that turns grpo's loop into on-policy distillation (see grpo.run's `teacher`)."""

    stage = "onpolicy"
    locked = LOCKED

    def __init__(self, cfg: OnPolicyConfig):
        self.cfg = cfg
        self.model_id = teacher_model_id(cfg)
        self.tokenizer = None
        self.engine = None

    @property
    def needs_rewards(self) -> bool:
        return self.cfg.reward_weight > 0

    def describe(self) -> str:
        cfg = self.cfg
        text = f"teacher {cfg.teacher} ({cfg.teacher_engine}); per-token advantage -{cfg.kl_coef:g} x (log p_student - log p_teacher)"
        if cfg.kl_discount:
            text += f", summed over the tokens to come with discount {cfg.kl_discount:g}"
        if cfg.reward_weight:
            text += f" + {cfg.reward_weight:g} x the reward's group-relative advantage"
        return text

    def check_tokenizer(self, student_tokenizer, student_id: str) -> None:
        """Load the teacher's tokenizer (no model) and refuse a teacher that tokenizes differently."""
        from transformers import AutoTokenizer

        from distill.errors import InputError
        from distill.hub import model_error

        source = self.cfg.teacher_tokenizer or self.model_id
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(source)
        except (OSError, ValueError) as error:
            if self.cfg.teacher_engine == "openai" and not self.cfg.teacher_tokenizer:
                raise InputError(f"teacher '{self.cfg.teacher}' (openai): its tokenizer cannot be loaded under that name; set teacher_tokenizer= to a hub id or directory holding it") from None
            raise model_error(source, error, f"teacher tokenizer '{source}'") from None
        difference = tokenizer_mismatch(student_tokenizer, self.tokenizer)
        if difference:
            raise InputError(
                f"teacher {source} does not tokenize as student {student_id} does ({difference}); on-policy distillation scores the "
                "student's token ids with the teacher, so both need one tokenizer (cross-tokenizer distillation is not supported): pick a teacher of the student's family"
            )

    def start(self, dist) -> None:
        """Build the teacher engine (after the student is loaded and resumed)."""
        from distill.engines import make_engine

        options = dict(self.cfg.teacher_engine_options)
        if self.cfg.teacher_engine in ("hf", "vllm"):
            # the trainer's device and precision (vLLM's "auto" would be bf16 on CPU too)
            options.setdefault("dtype", "bfloat16" if dist.mixed_precision else "float32")
            options["tokenizer"] = self.tokenizer
        if self.cfg.teacher_engine == "hf":
            options.setdefault("device", str(dist.device))
        self.engine = make_engine(self.cfg.teacher_engine, self.model_id, **options)

    def score(self, batch, policy, dist, pad_id: int) -> dict[str, Any]:
        """Set every sample's per-token advantages; return the step's figures (over all ranks)."""
        import torch

        from distill.engines import ScoreRequest
        from distill.students import rl
        from distill.students.grpo import _sequence_logprobs, _stack

        cfg = self.cfg
        sequences = [s for group in batch for s in group.samples]
        started = time.perf_counter()
        # the sampling policy's log-probs (the trainer's own pass at the sampling temperature, as
        # grpo's "old" log-probs; the update reuses them): the student side of the KL, detached
        student = _sequence_logprobs(policy, sequences, cfg, dist, pad_id)
        student_s = time.perf_counter() - started
        started = time.perf_counter()
        requests = [ScoreRequest(str(i), tuple(s.prompt_ids), tuple(s.completion_ids)) for i, s in enumerate(sequences) if s.completion_ids]
        scored = {r.key: r for r in self.engine.score(requests)} if requests else {}
        teacher_s = time.perf_counter() - started
        teacher = []
        for i, sample in enumerate(sequences):
            logprobs = scored[str(i)].logprobs if sample.completion_ids else []
            if len(logprobs) != len(sample.completion_ids):
                raise RuntimeError(f"the {cfg.teacher_engine} teacher engine scored {len(logprobs)} of {len(sample.completion_ids)} tokens of completion {i}")
            teacher.append(torch.tensor(logprobs, dtype=torch.float32))
        reverse_kl_sum, tokens = 0.0, 0
        if sequences:
            mask = torch.zeros(len(sequences), max(max(len(s.completion_ids) for s in sequences), 1))  # (N, C)
            for i, sample in enumerate(sequences):
                mask[i, : len(sample.completion_ids)] = 1.0
            advantages, reverse_kl = rl.reverse_kl_advantages(_stack(student, mask), _stack(teacher, mask), mask, coef=cfg.kl_coef, discount=cfg.kl_discount)
            for i, sample in enumerate(sequences):
                count = len(sample.completion_ids)
                sample.sampling_logprobs = student[i]
                sample.token_advantages = advantages[i, :count] + cfg.reward_weight * sample.advantage
            reverse_kl_sum, tokens = float(reverse_kl.sum()), int(mask.sum())
        reverse_kl_sum, tokens = dist.sum([reverse_kl_sum, float(tokens)])
        return {
            "reverse_kl": reverse_kl_sum / tokens if tokens else None,
            "teacher_scored_tokens": int(tokens),
            "teacher_s": round(dist.max(teacher_s), 3),
            "student_logprobs_s": round(dist.max(student_s), 3),
        }

    def summary(self, history: list[dict[str, Any]], start_step: int, run_dir) -> dict[str, Any]:
        """metrics.json's additions, over every session of the run (metrics.jsonl) on rank 0."""
        rows = run_dir.step_rows() if run_dir is not None else history
        values = [r["reverse_kl"] for r in rows if r.get("reverse_kl") is not None]
        last = values[-10:]
        return {
            "teacher": self.cfg.teacher,
            "teacher_engine": self.cfg.teacher_engine,
            "kl_coef": self.cfg.kl_coef,
            "kl_discount": self.cfg.kl_discount,
            "reward_weight": self.cfg.reward_weight,
            "reverse_kl_first": rows[0].get("reverse_kl") if rows and rows[0]["step"] == 1 else None,
            "reverse_kl_last10": sum(last) / len(last) if last else None,
            "teacher_scored_tokens": int(sum(r.get("teacher_scored_tokens", 0) for r in rows)),
            "teacher_s_total": sum(r.get("teacher_s", 0.0) for r in rows),
        }

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
            self.engine = None
