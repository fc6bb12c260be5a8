"""``detr-irpe-train`` as real processes: two ranks under torchrun, and a run killed mid-way.

Both tests start the programme with ``python -m`` in subprocesses (the way users run it), on
the CPU with the Gloo backend, on tiny models and images.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from detr_irpe.checkpoint import read_checkpoint
from detr_irpe.data.synthetic import SyntheticConfig, generate_synthetic_coco

pytestmark = pytest.mark.slow

# A model small enough that a process starts and trains in seconds.
MODEL = [
    "--backbone", "resnet18", "--backbone_weights", "none", "--hidden_dim", "32",
    "--dim_feedforward", "64", "--enc_layers", "1", "--dec_layers", "1", "--nheads", "2",
    "--num_queries", "5", "--enc_rpe2d", "rpe-2.0-product-ctx-1-k", "--device", "cpu",
    "--num_workers", "0", "--no_progress",
]  # fmt: skip
LR = 1e-4


def _env() -> dict[str, str]:
    # One thread per process: two ranks share the CI machine's two cores.
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _run(argv: list[str], cwd: Path, timeout: float = 600) -> None:
    result = subprocess.run(
        argv, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout, check=False
    )
    assert result.returncode == 0, f"{argv} failed:\n{result.stdout}\n{result.stderr}"


def _log(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "log.txt").read_text().splitlines()]


@pytest.fixture(scope="module")
def square_coco(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 training images, all 64x64, so batches need no padding whatever their split; one
    object each, so every batch has as many boxes per image (see the accumulation test)."""
    config = SyntheticConfig(
        num_train=8, num_val=2, image_size=64, min_image_size=64, max_objects=1, seed=3
    )
    return generate_synthetic_coco(tmp_path_factory.mktemp("square_coco"), config)


TORCHRUN_2 = [
    sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
    "-m", "detr_irpe.cli.train",
]  # fmt: skip


@pytest.fixture(scope="module")
def one_process_run(square_coco: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Output folder of one process training 1 epoch with batches of 4 (read-only), which the
    two-process runs are compared with."""
    out = tmp_path_factory.mktemp("one_process")
    _run([sys.executable, "-m", "detr_irpe.cli.train", *_exact_run(square_coco),
          "--batch_size", "4", "--output_dir", str(out / "run")], out)  # fmt: skip
    return out / "run"


def test_two_processes_agree_with_one_on_the_same_global_batch(
    square_coco: Path, one_process_run: Path, tmp_path: Path
) -> None:
    """torchrun with 2 ranks x 2 images == 1 process x 4 images, step for step.

    Why the two runs compute the same thing: the training order of an epoch is a function of
    (seed, epoch) in both (``DistributedSampler`` hands rank r the images r, r+2, ... of the
    same permutation ``RandomSampler`` uses), so each global batch holds the same 4 images;
    there is no augmentation and no padding (equal image sizes), no dropout, and the
    batch-norm layers are frozen; rank 0 and the single process build the same initial
    weights (seed + rank 0), and DDP broadcasts rank 0's. The box losses are divided by the
    all-reduced box count and DDP averages the ranks' gradients, which gives exactly the
    single-process gradient; ``--eos_coef 1`` makes the classification loss a plain mean over
    queries, whose average over two equal halves is again the single-process mean.

    What remains is floating-point summation order (gradients are summed across ranks in
    another order): the losses agree to 1e-4 relative. AdamW moves each weight by about
    ``lr`` per step whatever the gradient's size, so a gradient component within rounding
    noise of zero may move its weight the other way: weights agree to ``2 * lr * steps``
    element-wise, and almost all of them far more closely.
    """
    two = tmp_path / "two"
    _run([*TORCHRUN_2, *_exact_run(square_coco), "--batch_size", "2", "--output_dir", str(two)],
         tmp_path)  # fmt: skip
    _assert_same_training(one_process_run, two, steps=8 // 4)


def test_two_processes_accumulating_agree_with_one_on_the_same_global_batch(
    square_coco: Path, one_process_run: Path, tmp_path: Path
) -> None:
    """torchrun with 2 ranks x 1 image x ``--grad_accum_steps 2`` == 1 process x 4 images.

    As above, plus: under DDP the gradients of the first micro-batch of a group stay local
    (``no_sync``) and the second one's backward all-reduces the sum, so each step gets the
    mean over 4 images. DETR divides the box losses by the box count of a micro-batch, not of
    the group, so the equality needs as many boxes per image in every micro-batch: one each.
    """
    two = tmp_path / "two"
    _run([*TORCHRUN_2, *_exact_run(square_coco), "--batch_size", "1", "--grad_accum_steps", "2",
          "--output_dir", str(two)], tmp_path)  # fmt: skip
    _assert_same_training(one_process_run, two, steps=8 // 4)


def _exact_run(coco: Path) -> list[str]:
    """Flags of a run without randomness left between layouts (see the first test)."""
    return [
        *MODEL, "--coco_path", str(coco), "--epochs", "1", "--lr", str(LR),
        "--lr_backbone", str(LR), "--dropout", "0", "--eos_coef", "1", "--no_crop_aug",
        "--no_flip_aug", "--train_scales", "64", "--train_max_size", "64", "--val_size", "64",
        "--val_max_size", "64", "--seed", "7",
    ]  # fmt: skip


def _assert_same_training(one: Path, two: Path, steps: int) -> None:
    """The single-process run ``one`` and the two-rank run ``two`` trained alike: the same
    losses to 1e-4 relative, the same weights to ``2 * lr * steps`` (99% to 1e-6)."""
    log_one, log_two = _log(one), _log(two)
    assert len(log_one) == len(log_two) == 1
    for key in ("train_loss", "train_loss_ce", "train_loss_bbox", "train_loss_giou"):
        assert log_two[0][key] == pytest.approx(log_one[0][key], rel=1e-4), key

    state_one = read_checkpoint(one / "checkpoint.pth")
    state_two = read_checkpoint(two / "checkpoint.pth")
    assert state_two["args"]["world_size"] == 2 and state_two["args"]["distributed"]
    close, total = 0, 0
    for name, tensor in state_one["model"].items():
        other = state_two["model"][name]
        torch.testing.assert_close(other, tensor, rtol=0, atol=2 * LR * steps + 1e-6, msg=name)
        if tensor.is_floating_point():
            close += int(((other - tensor).abs() <= 1e-6).sum())
            total += tensor.numel()
    assert close / total > 0.99


def test_a_killed_run_resumes_from_its_last_checkpoint(square_coco: Path, tmp_path: Path) -> None:
    """SIGKILL at a random moment after the first checkpoint, then ``--resume``: the
    checkpoint on disk is complete, and the resumed run continues with the next epoch and
    finishes with a log holding every epoch once."""
    out = tmp_path / "run"
    epochs = 6  # enough left after the first checkpoint for the kill to land mid-run
    argv = [
        sys.executable, "-m", "detr_irpe.cli.train", *MODEL, "--coco_path", str(square_coco),
        "--epochs", str(epochs), "--lr_drop", "3", "--batch_size", "2", "--output_dir", str(out),
        "--train_scales", "48", "64", "--train_max_size", "64", "--val_size", "64",
        "--val_max_size", "64",
    ]  # fmt: skip
    process = subprocess.Popen(
        argv, cwd=tmp_path, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 300
        while not (out / "checkpoint.pth").exists():
            assert process.poll() is None, process.stderr.read().decode()  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "no checkpoint after 300 s"
            time.sleep(0.05)
        # Somewhere in the following epochs: training, evaluation or a checkpoint write.
        time.sleep(random.Random(os.getpid()).uniform(0.0, 1.5))
        assert process.poll() is None, "the run finished before it could be killed"
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
        process.stderr.close()  # type: ignore[union-attr]

    killed_at = read_checkpoint(out / "checkpoint.pth")  # complete, not a partial file
    last_done = int(killed_at["epoch"])
    assert 0 <= last_done < epochs - 1
    _run([*argv, "--resume", str(out / "checkpoint.pth")], tmp_path)

    final = read_checkpoint(out / "checkpoint.pth")
    assert final["epoch"] == epochs - 1
    assert final["lr_scheduler"]["last_epoch"] == epochs
    # Every line parses and each epoch appears once, in order: the checkpoint carries its
    # epoch's record, and the resumed run writes it if the kill came before the log line.
    logged = [entry["epoch"] for entry in _log(out)]
    assert logged == sorted(set(logged))
    assert set(range(epochs)) - set(logged) <= {last_done}
    assert logged == list(range(epochs))
