"""``detr-irpe-train`` killed with SIGKILL at chosen points, then resumed: nothing is lost.

The kills are injected without hooks in the programme: each run goes through a small
``python -c`` launcher (:data:`LAUNCHER`) that patches ``os.replace`` (which
:func:`detr_irpe.atomic.atomic_write` renames its temporary file with) or registers a global
optimizer step pre-hook, so the process kills itself at the chosen moment, then calls
``detr_irpe.cli.train.main()``.

One output folder goes through a chain of kills, each followed by a ``--resume``:

1. at a random iteration of epoch 1 (mid-epoch; epoch 0 is committed),
2. right after the rename of epoch 1's ``checkpoint.pth``, before its ``log.txt`` line,
3. while writing epoch 2's checkpoint: the temporary file is complete, not yet renamed,

and the last resume finishes the run. Its weights must equal, bit for bit, those of an
uninterrupted run with the same seed (and ``--num_workers 1``, whose persistent worker draws
the augmentation of every epoch): the randomness of an epoch (augmentation with random flips
and crops, dropout, order) is a function of (seed, rank, epoch) only, on the CPU with one
thread every operation is deterministic, and a checkpoint holds the whole optimizer state.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import detr_irpe
from detr_irpe.checkpoint import read_checkpoint
from detr_irpe.data.synthetic import SyntheticConfig, generate_synthetic_coco

pytestmark = pytest.mark.slow

EPOCHS = 3
STEPS_PER_EPOCH = 4  # 8 images, batches of 2
ARGV = [
    "--backbone", "resnet18", "--backbone_weights", "none", "--hidden_dim", "32",
    "--dim_feedforward", "64", "--enc_layers", "1", "--dec_layers", "1", "--nheads", "2",
    "--num_queries", "5", "--enc_rpe2d", "rpe-2.0-product-ctx-1-k", "--device", "cpu",
    "--no_progress", "--epochs", str(EPOCHS), "--batch_size", "2", "--seed", "11",
    # Random flips and resize-crops and dropout stay on: a resumed run must draw the same.
    "--train_scales", "48", "64", "--train_max_size", "64", "--val_size", "64",
    "--val_max_size", "64",
]  # fmt: skip

# argv: MODE TARGET N, then the programme's flags. MODE "step": SIGKILL before the N-th
# optimizer step; "before"/"after": SIGKILL before/after the N-th os.replace onto a file
# named TARGET (atomic_write's rename; patching os.replace is fine in this throwaway process).
LAUNCHER = """
import os, signal, sys
from torch.optim.optimizer import register_optimizer_step_pre_hook

mode, target, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
del sys.argv[1:4]
calls = 0

def count() -> bool:
    global calls
    calls += 1
    return calls == n

def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)

if mode == "step":
    def pre_hook(optimizer, args, kwargs):
        if count():
            die()
    register_optimizer_step_pre_hook(pre_hook)
else:
    real_replace = os.replace
    def replace(src, dst, **kwargs):
        hit = os.path.basename(dst) == target and count()
        if hit and mode == "before":
            die()
        real_replace(src, dst, **kwargs)
        if hit and mode == "after":
            die()
    os.replace = replace

from detr_irpe.cli.train import main
sys.exit(main())
"""


@pytest.fixture(scope="module")
def square_coco(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 training images of 64x64 pixels, 2 validation images."""
    config = SyntheticConfig(num_train=8, num_val=2, image_size=64, min_image_size=64, seed=3)
    return generate_synthetic_coco(tmp_path_factory.mktemp("square_coco"), config)


def _env() -> dict[str, str]:
    # The processes run in another folder: PYTHONPATH made absolute, and led by the folder of
    # the detr_irpe under test, so they run the code this test imported.
    given = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    paths = [str(Path(detr_irpe.__file__).parents[1])]
    paths += [str(Path(path).resolve()) for path in given if path]
    return {
        **os.environ, "PYTHONPATH": os.pathsep.join(paths), "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
    }  # fmt: skip


def _start(flags: list[str], cwd: Path, name: str) -> tuple[subprocess.Popen[bytes], Path]:
    # Output to a file, not a pipe: a DataLoader worker of a killed run may outlive it a
    # few seconds and would hold a pipe open.
    output = cwd / f"{name}.out"
    with output.open("wb") as handle:
        process = subprocess.Popen(
            flags, cwd=cwd, env=_env(), stdout=handle, stderr=subprocess.STDOUT
        )
    return process, output


def _finish(process: subprocess.Popen[bytes], output: Path, returncode: int) -> None:
    process.wait(timeout=300)
    assert process.returncode == returncode, f"{output.name}:\n{output.read_text()[-3000:]}"


def _train(flags: list[str], cwd: Path, name: str, kill: tuple[str, str, int] | None) -> None:
    """Run the programme to its end (``kill=None``) or until the launcher kills it."""
    if kill is None:
        process, output = _start([sys.executable, "-m", "detr_irpe.cli.train", *flags], cwd, name)
        _finish(process, output, 0)
    else:
        mode, target, n = kill
        argv = [sys.executable, "-c", LAUNCHER, mode, target, str(n), *flags]
        process, output = _start(argv, cwd, name)
        _finish(process, output, -signal.SIGKILL)


def _logged_epochs(output_dir: Path) -> list[int]:
    """Epochs of ``log.txt``; every line must be one complete JSON object."""
    lines = (output_dir / "log.txt").read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["epoch"] for line in lines]


def _train_losses(output_dir: Path) -> list[float]:
    lines = (output_dir / "log.txt").read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["train_loss"] for line in lines]


def _temporaries(output_dir: Path) -> list[Path]:
    return sorted(output_dir.rglob(".*.tmp"))


def _checkpoint_epoch(output_dir: Path) -> int:
    return int(read_checkpoint(output_dir / "checkpoint.pth")["epoch"])


def test_runs_killed_at_any_point_resume_to_the_uninterrupted_weights(
    square_coco: Path, tmp_path: Path
) -> None:
    flags = [*ARGV, "--coco_path", str(square_coco)]
    reference_dir, out = tmp_path / "reference", tmp_path / "killed"
    # The uninterrupted run, alongside the chain (which is mostly process start-up).
    reference, reference_output = _start(
        [sys.executable, "-m", "detr_irpe.cli.train", *flags, "--num_workers", "1",
         "--output_dir", str(reference_dir)],
        tmp_path, "reference",
    )  # fmt: skip
    try:
        run = [*flags, "--num_workers", "0", "--output_dir", str(out)]
        resume = [*run, "--resume", str(out / "checkpoint.pth")]

        # 1. A random iteration of epoch 1.
        step = random.randrange(STEPS_PER_EPOCH + 1, 2 * STEPS_PER_EPOCH + 1)
        _train(run, tmp_path, "mid_epoch", ("step", "", step))
        assert _checkpoint_epoch(out) == 0, f"killed before step {step}"
        assert _logged_epochs(out) == [0]

        # 2. Resumed at epoch 1, killed right after its checkpoint's rename: log.txt misses
        # epoch 1, which the next resume writes from the checkpoint's record.
        _train(resume, tmp_path, "after_rename", ("after", "checkpoint.pth", 1))
        assert _checkpoint_epoch(out) == 1
        assert _logged_epochs(out) == [0]

        # 3. Resumed at epoch 2, killed between writing the temporary file and the rename.
        _train(resume, tmp_path, "before_rename", ("before", "checkpoint.pth", 1))
        assert _checkpoint_epoch(out) == 1
        assert _logged_epochs(out) == [0, 1]
        assert [p.name.startswith(".checkpoint.pth.") for p in _temporaries(out)] == [True]

        # The last resume runs epoch 2 again and finishes.
        _train(resume, tmp_path, "final", None)
    except BaseException:
        reference.kill()
        reference.wait()
        raise
    _finish(reference, reference_output, 0)

    final = read_checkpoint(out / "checkpoint.pth")
    expected = read_checkpoint(reference_dir / "checkpoint.pth")
    assert final["epoch"] == expected["epoch"] == EPOCHS - 1
    assert _logged_epochs(out) == _logged_epochs(reference_dir) == list(range(EPOCHS))
    assert _temporaries(out) == []
    assert final["model"].keys() == expected["model"].keys()
    differing = [
        name for name, tensor in expected["model"].items()
        if not torch.equal(final["model"][name], tensor)
    ]  # fmt: skip
    assert differing == [], f"{len(differing)} weight tensors differ (first: {differing[0]})"
    assert _train_losses(out) == _train_losses(reference_dir)
