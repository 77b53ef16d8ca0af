"""One training step and one evaluation of gpt3d's Trainer, recording what the memory paths
did: in which order FSDP2 all-gathered (unsharded) and reduce-scattered (post-backward) each
block during the backward, the validation loss, and what the last pipeline stage still holds
of the evaluation's microbatches afterwards.

Usage: torchrun --nproc_per_node=N memory_paths_worker.py <out_dir> --section.key=value ...
Writes <out_dir>/rank<r>.json: {"device", "events": [[event, module], ...] (backward only),
"val_loss", "last_stage_held": microbatch outputs cached by this rank's last stage}.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from torch.distributed.fsdp._fully_shard._fsdp_common import TrainingState  # noqa: E402
from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup  # noqa: E402

from gpt3d.launch import guarded_main  # noqa: E402
from gpt3d.parallel.pipeline import schedule_stages  # noqa: E402
from tests.helpers import trainer_for  # noqa: E402

EVENTS: list[list[str]] = []


def record(method: str, event: str, does_work) -> None:
    """Wrap FSDPParamGroup.<method> to note (event, module) while backward runs, when
    does_work(group) says the call does something (an unshard of an unsharded group is a
    no-op). Observing torch's own calls, not replacing them: the method runs unchanged."""
    original = getattr(FSDPParamGroup, method)

    def observed(self, *args, **kwargs):
        backward = self._training_state in (TrainingState.PRE_BACKWARD, TrainingState.POST_BACKWARD)
        if backward and does_work(self):
            EVENTS.append([event, self._module_fqn])
        return original(self, *args, **kwargs)

    setattr(FSDPParamGroup, method, observed)


def last_stage_held(trainer) -> int:
    """Microbatch outputs the rank's last pipeline stage keeps (forward cache, outputs)."""
    schedule = trainer.parts.schedule
    if schedule is None:
        return 0
    stages = schedule_stages(schedule)
    return sum(len(s.fwd_cache) + len(s.output_chunks) for s in stages if s.is_last)


def main(argv: list[str]) -> int:
    out, args = Path(argv[0]), argv[1:]
    record("unshard", "all-gather", lambda g: g._all_gather_result is None and not g.is_unsharded)
    record("post_backward", "reduce-scatter", lambda g: True)
    trainer = trainer_for(args)
    trainer.train_step()
    events = list(EVENTS)
    val_loss = trainer.evaluate()
    result = {
        "device": trainer.env.device.type,
        "events": events,
        "val_loss": val_loss,
        "last_stage_held": last_stage_held(trainer),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{trainer.env.rank}.json").write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    guarded_main(main, sys.argv[1:])
