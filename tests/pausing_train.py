"""`python -m tests.pausing_train PAUSE_DIR train ARGS...`: `python -m jaxrm.cli train ARGS...` whose
checkpoint saves stop where a test asks, so that it can SIGKILL the process right there.

With a file PAUSE_DIR/POINT.STEP, the save of STEP stops at POINT: "rename" (Orbax's files written,
its temporary directory not yet renamed) or "manifest" (renamed, jaxrm's manifest not yet written).
The process renames the file to POINT.STEP.paused and sleeps. The pauses are patched in here, from
outside jaxrm; started with `-m` from the repository root, the process imports what `python -m
jaxrm.cli` would, and `cli.main(argv)` runs the same command (tests set JAXRM_NO_TCMALLOC=1 anyway).
"""

import pathlib
import sys
import time

import orbax.checkpoint as ocp

from jaxrm import checkpoint, cli


def pause(pause_dir: pathlib.Path, point: str, step: int) -> None:
    """Sleep (until killed) when PAUSE_DIR/POINT.STEP exists, after renaming it POINT.STEP.paused."""
    request = pause_dir / f"{point}.{step}"
    if request.is_file():
        request.rename(request.with_name(request.name + ".paused"))
        time.sleep(3600)


def install_pauses(pause_dir: pathlib.Path) -> None:
    """Patch Checkpointer.save (notes the step), Orbax's rename and jaxrm's manifest write."""
    saving = {"step": -1}
    save, finalize = checkpoint.Checkpointer.save, ocp.path.atomicity.AtomicRenameTemporaryPath.finalize
    write_manifest = checkpoint.write_manifest

    def save_noting_the_step(self, step, state, meta):
        saving["step"] = step
        return save(self, step, state, meta)

    async def finalize_after_pause(self, *args, **kwargs):  # every item's and the step's rename
        pause(pause_dir, "rename", saving["step"])
        return await finalize(self, *args, **kwargs)

    def write_manifest_after_pause(step_dir):
        pause(pause_dir, "manifest", saving["step"])
        return write_manifest(step_dir)

    checkpoint.Checkpointer.save = save_noting_the_step
    ocp.path.atomicity.AtomicRenameTemporaryPath.finalize = finalize_after_pause
    checkpoint.write_manifest = write_manifest_after_pause


if __name__ == "__main__":
    install_pauses(pathlib.Path(sys.argv[1]))
    sys.exit(cli.main(sys.argv[2:]))
