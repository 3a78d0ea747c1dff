"""Run under torchrun by test_train_loop.py: load a student as `distill train` does (sft.load_student
through parallel.load_sharded) and report this rank's peak resident memory while loading."""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path


def main(model_dir: str, out: str) -> None:
    import psutil
    import torch
    import transformers.models.llama.modeling_llama  # noqa: F401  (imported before the baseline)
    from safetensors.torch import load_file

    from distill.students.checkpoint import full_state_dict
    from distill.students.logprobs import Scorer
    from distill.students.parallel import close_distributed, init_distributed, load_sharded
    from distill.students.sft import TrainConfig, load_student, resolve_student

    torch.set_num_threads(1)
    dist = init_distributed()
    model_id, hf_config = resolve_student(model_dir)
    cfg = TrainConfig(student=model_dir, data="unused", out=Path(out))
    dist.barrier()
    baseline = psutil.Process().memory_info().rss
    scorer = load_sharded(lambda meta: load_student(model_id, hf_config, cfg, dist, meta=meta), lambda lm: Scorer(lm), dist)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    local = sum(p.to_local().numel() for p in scorer.parameters())
    state = full_state_dict(scorer.model, dist)  # gathered on rank 0, after the measurement
    equal = None
    if dist.is_main:
        saved = load_file(str(Path(model_dir) / "model.safetensors"))
        equal = all(torch.equal(state[name], tensor) for name, tensor in saved.items())
    Path(out, f"rank{dist.rank}.json").write_text(json.dumps({"rss_growth": peak - baseline, "local_params": local, "weights_equal": equal}))
    close_distributed()


if __name__ == "__main__":
    main(*sys.argv[1:])
