"""The transformers engine: an explicit, batched decode loop over a Hugging Face causal LM.

    engine = HFEngine("Qwen/Qwen2.5-Math-1.5B")                  # load by hub id or path
    engine = HFEngine(hf_model=policy, tokenizer=tokenizer)        # the policy GRPO is training
    for completion in engine.generate(requests): ...               # in the order rows finish
    for scored in engine.score(score_requests): ...                 # log p of given tokens

For CPU, small GPUs, tests and the demo; vLLM is the engine for real teacher runs.

Why a decode loop of our own rather than `model.generate`: each Request is one sample with its
own seed, and a sample must come out the same whichever requests it is batched with (resume
after a crash batches the remaining requests differently). `generate` draws every row's token
from one global RNG stream, so a row's sample depends on its batch mates. Here:
- each row has its own `torch.Generator` seeded with the request's seed, and draws exactly V
  uniforms per step from it (V = vocabulary size), whatever the batch;
- the token is picked with the Gumbel-max trick, argmax(logits / T + Gumbel noise) over the
  top-p nucleus, which samples exactly softmax(logits / T) restricted to the nucleus. Unlike
  inverse-CDF sampling (`torch.multinomial`) it is insensitive to the last-bit differences that
  batch composition and padding cause in the logits: a token only changes if two perturbed
  scores are within ~1e-6 of each other. The nucleus is checked for the few best perturbed
  candidates only, so the vocabulary is not sorted each step (`sample_tokens`);
- temperature 0 is greedy (argmax).

Batching (a simplification against vLLM's continuous batching): requests are sorted by prompt
length and cut into static batches of `batch_size` rows (the n samples of a problem share a
prompt, so they share a batch with no padding); prompts are left-padded; a row that finishes
(EOS or max_tokens) is yielded at once and dropped from the batch and its KV cache, so no
compute is spent on it, but its slot is not refilled until the next batch.

Top-k log-probs (Sampling.top_logprobs = k): at each step, log_softmax of the raw logits (the
model's distribution at temperature 1, before top-p) and its k best; computed beside the
sampler, never fed to it, so the sampled tokens are the same with and without them.

Scoring (`score`): one teacher-forced forward over prompt + completion per batch, right-padded
with an attention mask; log p of each completion token at temperature 1 through
distill.students.logprobs.token_logprobs, the code the training loops use, which projects only
the completion positions through the LM head, in chunks (never (B, T, V) logits).
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Iterator, Sequence

from distill.engines import Completion, Request, Scored, ScoreRequest
from distill.errors import DistillError


class HFEngine:
    name = "hf"

    def __init__(
        self,
        model: str | None = None,
        *,
        tokenizer: Any = None,
        hf_model: Any = None,
        batch_size: int = 16,
        device: str = "auto",
        dtype: str = "auto",
        trust_remote_code: bool = False,
    ):
        import torch
        import transformers

        self.version = f"transformers {transformers.__version__}"
        if batch_size < 1:
            raise DistillError(f"hf.batch_size must be at least 1, got {batch_size}")
        self.batch_size = batch_size
        if hf_model is not None:
            # In-memory model (GRPO's policy): used where it lives, never moved or cast.
            if tokenizer is None:
                raise DistillError("HFEngine(hf_model=...) needs the model's tokenizer too: HFEngine(hf_model=model, tokenizer=tokenizer)")
            self.model = hf_model
            self.tokenizer = tokenizer
            self.model_name = model or getattr(hf_model, "name_or_path", "in-memory model")
            self._owns_model = False
        else:
            if not model:
                raise DistillError("HFEngine needs a model id or path (or hf_model= for a model in memory)")
            self.model_name = model
            target = _pick_device(device)
            self.tokenizer = tokenizer if tokenizer is not None else _load_tokenizer(model, trust_remote_code)
            self.model = _load_model(model, target, _pick_dtype(dtype, target), trust_remote_code)
            self._owns_model = True
        self.device = next(self.model.parameters()).device
        self.stop_ids = _stop_token_ids(self.model, self.tokenizer)
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else min(self.stop_ids) if self.stop_ids else 0
        self._torch = torch

    # ----------------------------------------------------------------------------------------

    def generate(self, requests: Iterable[Request]) -> Iterator[Completion]:
        """Yield one Completion per request, each as soon as its row finishes."""
        requests = list(requests)
        prompts = [self._encode(r.prompt) for r in requests]
        # Sort by prompt length so a batch pads little; the sort is stable, so the n samples of
        # a problem (same prompt) stay together.
        order = sorted(range(len(requests)), key=lambda i: len(prompts[i]))
        was_training = self.model.training
        self.model.eval()
        try:
            for start in range(0, len(order), self.batch_size):
                rows = order[start : start + self.batch_size]
                yield from self._generate_batch([requests[i] for i in rows], [prompts[i] for i in rows])
        finally:
            self.model.train(was_training)

    def score(self, requests: Iterable[ScoreRequest]) -> Iterator[Scored]:
        """Yield one Scored per request: log p(completion_ids[t] | prompt_ids + completion_ids[:t])
        at temperature 1, batched `batch_size` sequences at a time (sorted by length)."""
        requests = list(requests)
        for request in requests:
            if not request.prompt_ids:
                raise DistillError(f"score request '{request.key}': empty prompt_ids; the first completion token needs at least one token before it")
        order = sorted(range(len(requests)), key=lambda i: len(requests[i].prompt_ids) + len(requests[i].completion_ids))
        was_training = self.model.training
        self.model.eval()
        try:
            for start in range(0, len(order), self.batch_size):
                yield from self._score_batch([requests[i] for i in order[start : start + self.batch_size]])
        finally:
            self.model.train(was_training)

    def close(self) -> None:
        if self._owns_model:
            del self.model
            if self._torch.cuda.is_available():
                self._torch.cuda.empty_cache()

    # ----------------------------------------------------------------------------------------

    def _encode(self, prompt: str) -> list[int]:
        # The chat template already wrote any BOS the model wants; adding special tokens here
        # would double it (Llama-3, R1-Distill).
        ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if not ids:
            raise DistillError("empty prompt: the hf engine needs at least one prompt token")
        return list(ids)

    def _score_batch(self, requests: Sequence[ScoreRequest]) -> Iterator[Scored]:
        torch = self._torch
        from distill.students.logprobs import IGNORE, token_logprobs

        sequences = [list(r.prompt_ids) + list(r.completion_ids) for r in requests]
        width = max(len(s) for s in sequences)
        input_ids = torch.full((len(requests), width), self.pad_id, dtype=torch.long)  # (B, T) right-padded
        attention = torch.zeros((len(requests), width), dtype=torch.long)  # (B, T) 1 = real token
        targets = torch.full((len(requests), width), IGNORE, dtype=torch.long)  # (B, T) next token where scored
        for row, (request, ids) in enumerate(zip(requests, sequences)):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            attention[row, : len(ids)] = 1
            # position t predicts token t + 1: the completion's tokens are predicted from
            # positions len(prompt) - 1 ... len(ids) - 2
            first = len(request.prompt_ids) - 1
            targets[row, first : len(ids) - 1] = torch.tensor(list(request.completion_ids), dtype=torch.long)
        with torch.no_grad():
            # Right padding: positions count from 0 for every row, and causal attention keeps the
            # pads after a row's tokens out of its scores.
            logprobs = token_logprobs(self.model, input_ids.to(self.device), targets=targets.to(self.device),
                                      attention_mask=attention.to(self.device)).cpu()  # (B, T)
        for row, request in enumerate(requests):
            first = len(request.prompt_ids) - 1
            yield Scored(key=request.key, logprobs=logprobs[row, first : first + len(request.completion_ids)].tolist())

    def _generate_batch(self, requests: Sequence[Request], prompts: Sequence[list[int]]) -> Iterator[Completion]:
        torch = self._torch
        from transformers import DynamicCache

        rows = len(requests)
        width = max(len(p) for p in prompts)
        input_ids = torch.full((rows, width), self.pad_id, dtype=torch.long)  # (B, T) left-padded
        attention = torch.zeros((rows, width), dtype=torch.long)  # (B, T) 1 = real token
        for row, ids in enumerate(prompts):
            input_ids[row, width - len(ids) :] = torch.tensor(ids)
            attention[row, width - len(ids) :] = 1
        input_ids, attention = input_ids.to(self.device), attention.to(self.device)
        positions = (attention.cumsum(-1) - 1).clamp(min=0)  # (B, T) real tokens count from 0
        generators = [torch.Generator(device=self.device).manual_seed(int(r.seed)) for r in requests]
        generated: list[list[int]] = [[] for _ in range(rows)]
        tops: list[list[tuple[list[int], list[float]]]] = [[] for _ in range(rows)]  # per row, per token
        alive = list(range(rows))  # batch row -> index into `requests`
        cache = DynamicCache(config=self.model.config)
        with torch.no_grad():
            # Prefill; only the last position's logits are needed (B x T x V would not fit at 32k).
            logits = self._forward(input_ids, attention, positions, cache, logits_to_keep=1)
            next_position = positions[:, -1:] + 1  # (B, 1)
            while alive:
                tokens = sample_tokens(logits, [requests[i] for i in alive], [generators[i] for i in alive])  # (b,)
                top = top_logprobs(logits, [requests[i].sampling.top_logprobs for i in alive])
                keep: list[int] = []
                for slot, index in enumerate(alive):
                    token = int(tokens[slot])
                    generated[index].append(token)
                    if top[slot] is not None:
                        tops[index].append(top[slot])
                    done = self._finished(requests[index], generated[index], token)
                    if done is None:
                        keep.append(slot)
                    else:
                        yield self._completion(requests[index], prompts[index], generated[index], *done, tops[index])
                if not keep:
                    break
                if len(keep) < len(alive):
                    # Drop finished rows from the batch and its KV cache: no compute on them.
                    select = torch.tensor(keep, device=self.device)
                    cache.batch_select_indices(select)
                    attention, tokens, next_position = attention[select], tokens[select], next_position[select]
                    alive = [alive[slot] for slot in keep]
                attention = torch.cat([attention, attention.new_ones((len(alive), 1))], dim=1)  # (b, T + t)
                logits = self._forward(tokens[:, None], attention, next_position, cache, logits_to_keep=1)
                next_position = next_position + 1

    def _forward(self, input_ids, attention, positions, cache, logits_to_keep: int):
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=logits_to_keep,
        )
        return out.logits[:, -1, :].float()  # (b, V)

    def _finished(self, request: Request, ids: list[int], token: int) -> tuple[str, int | None] | None:
        """(finish_reason, where the text ends in characters or None) when the row is done."""
        if token in self.stop_ids:
            return "stop", None
        if request.sampling.stop:
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            cut = [text.find(s) for s in request.sampling.stop if s and s in text]
            if cut:
                return "stop", min(cut)
        if len(ids) >= request.sampling.max_tokens:
            return "length", None
        return None

    def _completion(self, request: Request, prompt: list[int], ids: list[int], reason: str, cut: int | None,
                    tops: list[tuple[list[int], list[float]]]) -> Completion:
        text_ids = ids[:-1] if ids and ids[-1] in self.stop_ids else ids
        text = self.tokenizer.decode(text_ids, skip_special_tokens=True)
        if cut is not None:
            text = text[:cut]
        return Completion(
            key=request.key,
            text=text,
            finish_reason=reason,
            prompt_tokens=len(prompt),
            completion_tokens=len(ids),
            token_ids=list(ids),
            top_logprobs=tops if request.sampling.top_logprobs > 0 else None,
        )


# --------------------------------------------------------------------------------------------
# sampling


def sample_tokens(logits, requests: Sequence[Request], generators: Sequence[Any]):
    """One token per row of logits (b, V): greedy at temperature 0, else Gumbel-max over the
    top-p nucleus, with row i's noise drawn from generators[i] alone.

    Exact without sorting the vocabulary: the answer is the token with the highest perturbed
    score log p + g that lies in the nucleus, and a token is in the nucleus iff the probability
    mass of the tokens strictly more likely than it is below top_p. So the few best perturbed
    candidates are checked in order with one masked sum each (the first is accepted unless it
    falls in the 1 - top_p tail); only if none of `_CANDIDATES` is in the nucleus does a row fall
    back to sorting.
    """
    import torch

    vocab = logits.shape[-1]
    temperature = torch.tensor([r.sampling.temperature for r in requests], device=logits.device)
    top_p = torch.tensor([r.sampling.top_p for r in requests], device=logits.device).clamp(max=1.0)
    greedy = temperature <= 0
    # Every row draws V uniforms from its own generator each step (greedy rows too), so the
    # random stream of a sample never depends on its batch mates. Token i's noise is u[i].
    uniform = torch.stack([torch.rand(vocab, generator=g, device=logits.device) for g in generators])  # (b, V)
    log_probs = (logits / torch.where(greedy, 1.0, temperature)[:, None]).log_softmax(dim=-1)  # (b, V)
    perturbed = log_probs + _gumbel(uniform)  # (b, V)
    candidates = perturbed.topk(min(vocab, _CANDIDATES), dim=-1).indices  # (b, K), best first
    probs = log_probs.exp()
    choice = candidates[:, 0].clone()
    undecided = ~greedy & (top_p < 1)  # at top_p = 1 every token is in the nucleus
    for rank in range(candidates.shape[1]):
        if not bool(undecided.any()):
            break
        rows = undecided.nonzero()[:, 0]
        token = candidates[rows, rank]  # (r,)
        p_token = probs[rows].gather(-1, token[:, None])  # (r, 1)
        above = torch.where(probs[rows] > p_token, probs[rows], 0.0).sum(dim=-1)  # (r,) mass strictly above
        accept = above < top_p[rows]
        choice[rows[accept]] = token[accept]
        undecided[rows[accept]] = False
    if bool(undecided.any()):
        rows = undecided.nonzero()[:, 0]
        outside = _outside_nucleus(probs[rows], top_p[rows])
        choice[rows] = perturbed[rows].masked_fill(outside, -math.inf).argmax(dim=-1)
    return torch.where(greedy, logits.argmax(dim=-1), choice)  # (b,)


def top_logprobs(logits, ks: Sequence[int]) -> list[tuple[list[int], list[float]] | None]:
    """Row i's ks[i] most likely tokens and their log-probs at temperature 1 (before top-p), most
    likely first, or None where ks[i] is 0. logits (b, V) raw; only read, so sampling is unchanged."""
    wanted = [min(k, logits.shape[-1]) for k in ks]
    if max(wanted, default=0) <= 0:
        return [None] * len(ks)
    rows = [i for i, k in enumerate(wanted) if k > 0]
    best = logits[rows].float().log_softmax(dim=-1).topk(max(wanted), dim=-1)  # (r, k) sorted descending
    ids, values = best.indices.tolist(), best.values.tolist()
    out: list[tuple[list[int], list[float]] | None] = [None] * len(ks)
    for slot, row in enumerate(rows):
        out[row] = (ids[slot][: wanted[row]], values[slot][: wanted[row]])
    return out


_CANDIDATES = 8  # perturbed candidates checked for nucleus membership before a full sort


def _gumbel(uniform):
    """Gumbel(0, 1) noise from uniforms in [0, 1)."""
    return -(-uniform.clamp(min=1e-20, max=1.0 - 1e-7).log()).log()


def _outside_nucleus(probs, top_p):
    """(b, V) True for tokens outside each row's top-p nucleus (the fallback: sorts). probs (b, V)."""
    sorted_probs = probs.sort(dim=-1, descending=True).values  # (b, V)
    before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass of the tokens ranked above
    # Keep the smallest set whose mass reaches top_p: a token stays if the mass above it is
    # below top_p (the most likely token always stays). Ties with the last kept token stay too,
    # as in the candidate check of sample_tokens (mass strictly above < top_p).
    kept = (before < top_p[:, None]).sum(dim=-1, keepdim=True)  # (b, 1), at least 1
    threshold = sorted_probs.gather(-1, kept - 1)  # (b, 1) probability of the last kept token
    return probs < threshold


def _stop_token_ids(model: Any, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    config = getattr(model, "generation_config", None)
    for value in (getattr(config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids


def _pick_device(device: str) -> str:
    import torch

    if device != "auto":
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def _pick_dtype(dtype: str, device: str):
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    except KeyError:
        raise DistillError(f"hf.dtype: '{dtype}' is not one of auto, float32, bfloat16, float16") from None


def _load_tokenizer(model: str, trust_remote_code: bool):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model, trust_remote_code=trust_remote_code)
    except Exception as error:  # OSError, ValueError, HF hub errors: one line naming the true cause
        from distill.hub import model_error

        raise model_error(model, error, f"cannot load the tokenizer of '{model}'") from None


def _load_model(model: str, device: str, dtype: Any, trust_remote_code: bool):
    from transformers import AutoModelForCausalLM

    try:
        loaded = AutoModelForCausalLM.from_pretrained(model, dtype=dtype, trust_remote_code=trust_remote_code)
    except Exception as error:
        from distill.hub import model_error

        raise model_error(model, error, f"cannot load '{model}'") from None
    return loaded.to(device)

