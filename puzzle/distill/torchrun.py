"""torchrun's entry for multi-process GKD: `torchrun --nproc-per-node N -m puzzle.distill.torchrun [puzzle distill
flags]` runs `distill` on every rank (puzzle/distill/fsdp.py `launch` starts it so). Its own module, above both
the command (commands.py) and the FSDP2 machinery (fsdp.py) it joins, so neither imports the other's caller."""

import os
import sys
from contextlib import nullcontext
from pathlib import Path

from puzzle.cli import _fail, _quiet_libraries, build_parser
from puzzle.errors import PuzzleError
from puzzle.run_dir import RunDir

from . import fsdp
from .commands import distill


def main(argv: list[str] | None = None) -> int:
    """`torchrun --nproc-per-node N -m puzzle.distill.torchrun [puzzle distill flags]`."""
    args = vars(build_parser("distill", distill).parse_args(argv))
    _quiet_libraries()
    locked = fsdp.rank() == 0 and not os.environ.get(fsdp.LOCK_HELD_ENV) and args.get("run_dir") is not None
    try:
        with RunDir(args["run_dir"]).lock("distill") if locked else nullcontext():
            distill.__wrapped__(**args)  # undecorated: one lock for the job, held above
    except PuzzleError as err:
        if fsdp.rank() == 0 and os.environ.get(fsdp.ERROR_FILE_ENV):
            Path(os.environ[fsdp.ERROR_FILE_ENV]).write_text(str(err))
        return _fail(str(err))
    finally:
        if fsdp.dist.is_initialized():
            fsdp.dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
