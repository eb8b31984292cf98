"""The fine-tuning recipe's long-run safety: per-epoch checkpoints, exact resume, the CSV log,
the best epoch kept by the held-out split, and top-K selection at export."""

from __future__ import annotations

import copy
import csv
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace

import pytest
import torch
import torchvision

from autoprune.cli import main
from autoprune.errors import AutopruneError
from autoprune.evaluate.metrics import accuracy
from autoprune.finetune.loop import (
    CHECKPOINT,
    LOG,
    LOG_FIELDS,
    FinetuneConfig,
    _read_checkpoint,
    finetune,
    native_bf16,
)
from tests.conftest import REPO

TINY = f"{REPO / 'tests' / 'tinynets.py'}:tiny"
RECIPE = FinetuneConfig.recipe(3, lr=0.02, batch_size=64, seed=3)


class Killed(BaseException):
    """Stands for the process being killed: raised from inside a training step."""


def _kill_after(model: torch.nn.Module, steps: int) -> None:
    calls = {"n": 0}

    def hook(module, args):
        if module.training:
            calls["n"] += 1
            if calls["n"] > steps:
                raise Killed

    model.register_forward_pre_hook(hook)


def _student(trained_tiny):
    torch.manual_seed(1)
    student = copy.deepcopy(trained_tiny)
    with torch.no_grad():  # start away from the teacher, so there is something to learn
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return student


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_killed_mid_epoch_resumes_to_the_same_weights(digits, trained_tiny, tmp_path):
    def val(m):
        return accuracy(m, digits.search_val)

    whole = _student(trained_tiny)
    done = finetune(whole, digits, RECIPE, teacher=trained_tiny, progress=False, run_dir=tmp_path / "a",
                    validate=val)
    per_epoch = len(digits.train) // RECIPE.batch_size

    killed = _student(trained_tiny)
    _kill_after(killed, per_epoch + per_epoch // 2)  # in the middle of the second epoch
    with pytest.raises(Killed):
        finetune(killed, digits, RECIPE, teacher=trained_tiny, progress=False, run_dir=tmp_path / "b",
                 validate=val)
    assert len(_rows(tmp_path / "b" / LOG)) == 1  # the first epoch was logged and checkpointed

    with pytest.raises(AutopruneError, match=r"resume=True"):  # never silently started over
        finetune(_student(trained_tiny), digits, RECIPE, teacher=trained_tiny, progress=False,
                 run_dir=tmp_path / "b", validate=val)
    with pytest.raises(AutopruneError, match="other settings"):
        finetune(_student(trained_tiny), digits, FinetuneConfig.recipe(3, lr=0.05, batch_size=64, seed=3),
                 teacher=trained_tiny, progress=False, run_dir=tmp_path / "b", resume=True, validate=val)
    # torch.compile is how the steps run, not what they compute: the checkpoint takes either
    ckpt = _read_checkpoint(tmp_path / "b" / CHECKPOINT, replace(RECIPE, compile=not RECIPE.compile), {})
    assert ckpt["epoch"] == 1

    resumed_model = _student(trained_tiny)  # a fresh process would rebuild the model as it began
    resumed = finetune(resumed_model, digits, RECIPE, teacher=trained_tiny, progress=False,
                       run_dir=tmp_path / "b", resume=True, validate=val)
    assert resumed.resumed_after == 1 and resumed.best_epoch == done.best_epoch
    for (name, a), b in zip(whole.state_dict().items(), resumed_model.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-6), name
    rows_a, rows_b = _rows(tmp_path / "a" / LOG), _rows(tmp_path / "b" / LOG)
    assert [r["epoch"] for r in rows_b] == ["1", "2", "3"]
    assert [float(r["train_loss"]) for r in rows_a] == pytest.approx([float(r["train_loss"]) for r in rows_b])


def test_log_has_one_row_per_epoch_and_the_best_epoch_is_kept(digits, trained_tiny, tmp_path):
    model = _student(trained_tiny)
    ran = finetune(model, digits, RECIPE, teacher=trained_tiny, progress=False, run_dir=tmp_path,
                   validate=lambda m: accuracy(m, digits.search_val), test=lambda m: 0.5)
    rows = _rows(tmp_path / LOG)
    assert list(rows[0]) == list(LOG_FIELDS) and [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert all(float(r["test_acc"]) == 0.5 and float(r["seconds"]) > 0 for r in rows)
    assert float(rows[-1]["lr"]) == pytest.approx(0.0, abs=1e-9)  # the cosine ends at 0
    vals = [float(r["val_acc"]) for r in rows]
    # the model as it came is scored but never kept: its held-out images are ones the dense model fit
    assert ran.val_before == pytest.approx(accuracy(_student(trained_tiny), digits.search_val))
    assert ran.best_epoch >= 1 and vals[ran.best_epoch - 1] == max(vals) == ran.val_acc
    assert accuracy(model, digits.search_val) == pytest.approx(vals[ran.best_epoch - 1])


def test_apply_logs_the_finetune_and_resume_after_sigkill(tmp_path, tiny_weights):
    (tmp_path / "p.json").write_text(json.dumps({"stem.0": 0.5, "branch_a.0": 0.25}))
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "autoprune.cli", "apply", "--model", TINY, "--weights", str(tiny_weights),
            "--dataset", "digits", "--policy", str(tmp_path / "p.json"), "-o", str(out),
            "--finetune-epochs", "30", "--finetune-batch-size", "32", "-q"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if (out / LOG).exists() and len(_rows(out / LOG)) >= 2:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the fine-tune finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    epochs_before = len(_rows(out / LOG))
    assert (out / CHECKPOINT).exists() and not (out / "metrics.json").exists()

    again = subprocess.run(argv, env=env, capture_output=True, text=True)  # without --resume: refused
    assert again.returncode == 2 and "--resume" in again.stderr and len(again.stderr.strip().splitlines()) == 1

    done = subprocess.run(argv + ["--resume"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    rows = _rows(out / LOG)
    assert [int(r["epoch"]) for r in rows] == list(range(1, 31))  # nothing lost, nothing twice
    m = json.loads((out / "metrics.json").read_text())
    assert m["finetune_run"]["resumed_after"] >= epochs_before - 1 >= 1 and m["finetune_run"]["epochs"] == 30
    assert m["finetune"]["distill"] == 0.9 and "test_acc_finetuned" in m["pruned"]
    assert not (out / CHECKPOINT).exists()  # a finished run leaves the model files and the log
    assert {p.name for p in out.iterdir()} == {"pruned.pt", "model.pt2", "policy.json", "metrics.json", LOG}


@pytest.mark.parametrize("amp", [True, False])
def test_cpu_trains_in_bfloat16_where_it_is_native_and_hands_back_float32(digits, trained_tiny, amp):
    model = _student(trained_tiny)
    seen = []
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    conv.register_forward_hook(lambda m, args, out: seen.append((m.training, out.dtype)))
    finetune(model, digits, FinetuneConfig(steps=2, batch_size=64, amp=amp), teacher=trained_tiny, progress=False)
    bf16 = amp and native_bf16("cpu")
    trained = [dtype for training, dtype in seen if training]
    assert len(trained) == 2 and set(trained) == {torch.bfloat16 if bf16 else torch.float32}
    # the caller gets its model back as it came: float32 weights, the contiguous layout
    assert all(p.dtype == torch.float32 and p.is_contiguous() for p in model.parameters())
    assert native_bf16("cuda") and not native_bf16("mps")


def test_export_top_k_finetunes_k_candidates_and_records_the_pick(tmp_path, tiny_weights, capsys):
    db = f"sqlite:///{tmp_path}/s.db"
    assert main(["search", "--model", TINY, "--weights", str(tiny_weights), "--dataset", "digits",
                 "--budget", "0.5flops", "--episodes", "8", "--storage", db, "-q"]) == 0
    capsys.readouterr()
    code = main(["export", "tinynets.tiny-digits-0.5flops-tpe", "--storage", db, "-o", str(tmp_path / "p.json"),
                 "--weights", str(tiny_weights), "--finetune-epochs", "1", "--top-k", "3",
                 "--select-epochs", "0.5", "-q"])
    _, err = capsys.readouterr()
    assert code == 0, err
    sel = json.loads((tmp_path / "p_model" / "metrics.json").read_text())["selection"]
    cands = sel["candidates"]
    assert len(cands) == 3 and [c["rank_by_proxy"] for c in cands] == [1, 2, 3]
    assert len({c["trial"] for c in cands}) == 3
    assert sel["kept"] == max(cands, key=lambda c: (c["val_acc"], -c["rank_by_proxy"]))["trial"]
    assert sel["recipe"]["epochs"] == 0.5 and all("test_acc" in c for c in cands)
    assert all(c["best_epoch"] == 1 for c in cands)  # compared after training, never as they came
    policy = json.loads((tmp_path / "p.json").read_text())
    assert policy["trial"] == sel["kept"]
    assert json.loads((tmp_path / "p_model" / "selection.json").read_text())["candidates"] == cands
    # a model folder that cannot be made is one line, before any candidate is fine-tuned
    code = main(["export", "tinynets.tiny-digits-0.5flops-tpe", "--storage", db, "-o", str(tmp_path / "q.json"),
                 "--weights", str(tiny_weights), "--model-dir", str(tmp_path / "missing" / "m"),
                 "--finetune-epochs", "1", "--top-k", "2", "-q"])
    _, err = capsys.readouterr()
    assert code == 2 and "output folder's parent" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "missing").exists() and not (tmp_path / "q.json").exists()


def test_top_k_candidates_fine_tuned_in_worker_processes_match_one_after_another(tmp_path, tiny_weights, capsys):
    db = f"sqlite:///{tmp_path}/s.db"
    assert main(["search", "--model", TINY, "--weights", str(tiny_weights), "--dataset", "digits",
                 "--budget", "0.5flops", "--episodes", "8", "--storage", db, "-q"]) == 0
    picks = {}
    for workers in (1, 3):
        out = tmp_path / f"w{workers}"
        code = main(["export", "tinynets.tiny-digits-0.5flops-tpe", "--storage", db, "-o", str(out) + ".json",
                     "--weights", str(tiny_weights), "--finetune-epochs", "0.5", "--top-k", "3",
                     "--select-epochs", "0.5", "--select-workers", str(workers), "-q"])
        assert code == 0, capsys.readouterr().err
        picks[workers] = json.loads((out.parent / f"w{workers}_model" / "metrics.json").read_text())["selection"]
    assert picks[1]["workers"] == 1 and picks[3]["workers"] == 3
    one, many = picks[1]["candidates"], picks[3]["candidates"]
    # the same candidates, in proxy order whatever order they finished in, scored as one process does
    assert [c["trial"] for c in many] == [c["trial"] for c in one] and [c["rank_by_proxy"] for c in many] == [1, 2, 3]
    for a, b in zip(one, many):
        assert b["val_acc"] == pytest.approx(a["val_acc"], abs=0.02) and b["best_epoch"] == a["best_epoch"] == 1
    assert picks[3]["kept"] == max(many, key=lambda c: (c["val_acc"], -c["rank_by_proxy"]))["trial"]
    code = main(["export", "tinynets.tiny-digits-0.5flops-tpe", "--storage", db, "-o", str(tmp_path / "z.json"),
                 "--weights", str(tiny_weights), "--finetune-epochs", "1", "--top-k", "2", "--select-workers", "0"])
    err = capsys.readouterr().err
    assert code == 2 and "--select-workers and --select-images must be at least 1" in err
    assert len(err.strip().splitlines()) == 1


def test_top_k_without_fine_tuning_picks_by_the_proxy_on_more_training_images(tmp_path, tiny_weights, capsys):
    db = f"sqlite:///{tmp_path}/s.db"
    assert main(["search", "--model", TINY, "--weights", str(tiny_weights), "--dataset", "digits", "--proxy", "ce",
                 "--budget", "0.5flops", "--episodes", "8", "--storage", db, "-q"]) == 0
    code = main(["export", "tinynets.tiny-digits-0.5flops-tpe", "--storage", db, "-o", str(tmp_path / "p.json"),
                 "--weights", str(tiny_weights), "--top-k", "4", "--select-epochs", "0", "--select-images", "300",
                 "-q"])
    assert code == 0, capsys.readouterr().err
    folder = tmp_path / "p_model"
    sel = json.loads((folder / "metrics.json").read_text())["selection"]
    cands = sel["candidates"]
    assert sel["select_images"] == 300 and sel["proxy"] == "ce" and sel["recipe"] is None
    assert [c["rank_by_proxy"] for c in cands] == [1, 2, 3, 4] and all(0 < c["more_score"] <= 1 for c in cands)
    assert sel["kept"] == max(cands, key=lambda c: (c["more_score"], -c["rank_by_proxy"]))["trial"]
    assert json.loads((tmp_path / "p.json").read_text())["trial"] == sel["kept"]
    assert not (folder / LOG).exists()  # nothing was fine-tuned


def test_more_images_are_training_images_outside_search_val_and_calibration():
    from autoprune.data.datasets import make_splits

    for source in ("train", "heldout"):
        splits = make_splits("digits", seed=0, calib_batches=2, calib_batch_size=64, search_val=source)
        everything = splits.more_images(10**6)
        calib = splits.sizes["calib"]
        # search-val from training images: the training rows but calibration's; held out: all but calibration's
        left = splits.sizes["train"] - calib
        assert len(everything) == left and len(splits.more_images(100)) == 100
        assert torch.equal(splits.more_images(50).y, splits.more_images(50).y)  # the same images each time


def test_top_k_needs_a_finetune(tmp_path, tiny_weights, capsys):
    code = main(["export", "x", "--storage", f"sqlite:///{tmp_path}/none.db", "-o", str(tmp_path / "p.json"),
                 "--weights", str(tiny_weights), "--top-k", "2"])
    _, err = capsys.readouterr()
    assert code == 2 and "--finetune-epochs" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "p.json").exists()


def test_hint_points_map_each_pruned_batchnorm_to_the_dense_channels_it_kept(tiny_task):
    from autoprune.export.apply import hint_points
    from autoprune.units.policy import Policy

    kept = tiny_task.kept(Policy.uniform(tiny_task.table, 0.5))
    pruned, _ = tiny_task.pruned(kept)
    points = hint_points(tiny_task, kept)
    bns = {n for n, m in tiny_task.dense.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert set(points) == bns  # every unit of TinyNet ends in a BatchNorm
    for name, idx in points.items():
        mine, dense = pruned.get_submodule(name), tiny_task.dense.get_submodule(name)
        assert len(idx) == mine.num_features < dense.num_features
        # the refit and recalibration change weights before and statistics of a BatchNorm, never its affine
        assert torch.equal(mine.weight, dense.weight[idx]) and torch.equal(mine.bias, dense.bias[idx])


def _hint_error(task, model, points) -> float:
    caught = {}
    hooks = [net.get_submodule(n).register_forward_hook(
        lambda m, i, o, key=(tag, n): caught.__setitem__(key, o))
        for tag, net in (("s", model), ("t", task.dense)) for n in points]
    with torch.no_grad():
        x = task.calibration_inputs()
        model.eval()(x), task.dense.eval()(x)
    for h in hooks:
        h.remove()
    return sum(float(torch.nn.functional.mse_loss(caught["s", n], caught["t", n][:, idx]))
               for n, idx in points.items()) / len(points)


def test_hints_pull_the_pruned_features_towards_the_dense_ones(tiny_task):
    from autoprune.export.apply import hint_points, run_finetune
    from autoprune.units.policy import Policy

    kept = tiny_task.kept(Policy.uniform(tiny_task.table, 0.5))
    points = hint_points(tiny_task, kept)
    errors = {}
    for hint in (0.0, 5.0):
        model, _ = tiny_task.pruned(kept)
        cfg = FinetuneConfig.recipe(1, steps=40, lr=0.02, batch_size=32, hint=hint, seed=0)
        run_finetune(tiny_task, model, cfg, quiet=True, kept=kept)
        errors[hint] = _hint_error(tiny_task, model, points)
    assert errors[5.0] < 0.7 * errors[0.0], errors
    with pytest.raises(AutopruneError, match="kept widths"):
        run_finetune(tiny_task, tiny_task.pruned(kept)[0], cfg, quiet=True)
    with pytest.raises(AutopruneError, match="hint weight"):
        FinetuneConfig.recipe(1, hint=-1.0).check()


def _teacher_calls(teacher: torch.nn.Module) -> dict:
    calls = {"n": 0}

    def hook(module, args):
        calls["n"] += module is teacher  # not a pruned copy, which carries the hook along

    teacher.register_forward_pre_hook(hook)
    return calls


def test_teacher_logits_are_stored_once_and_the_next_run_on_the_same_batches_skips_the_teacher(
        digits, trained_tiny, tmp_path):
    from autoprune.finetune import teacher as stored_logits

    stored_logits._MEMORY.clear()
    cfg = FinetuneConfig.recipe(2, batch_size=64, seed=5)
    steps = 2 * (len(digits.train) // 64)
    plain = _student(trained_tiny)
    finetune(plain, digits, cfg, teacher=copy.deepcopy(trained_tiny), progress=False, teacher_cache=False)

    runs = []
    for _ in range(2):  # the first run computes and stores, the second reads (from disk: memory cleared)
        stored_logits._MEMORY.clear()
        teacher = copy.deepcopy(trained_tiny)
        calls = _teacher_calls(teacher)
        model = _student(trained_tiny)
        finetune(model, digits, cfg, teacher=teacher, progress=False, teacher_cache=tmp_path / "logits")
        runs.append((model, calls["n"]))
    assert runs[0][1] == steps and runs[1][1] == 2  # one batch an epoch, run again to check the store
    assert len(list((tmp_path / "logits").glob("*/epoch-*.pt"))) == 2
    for model, _ in runs:  # what a step computes does not change, only what it costs
        for (name, a), b in zip(plain.state_dict().items(), model.state_dict().values()):
            assert torch.equal(a, b), name

    # another teacher, or another seed, is another key: the teacher runs on every batch
    other = copy.deepcopy(trained_tiny)
    with torch.no_grad():
        next(other.parameters()).mul_(0.5)
    for teacher, run_cfg in ((other, cfg), (copy.deepcopy(trained_tiny), replace(cfg, seed=6))):
        calls = _teacher_calls(teacher)
        finetune(_student(trained_tiny), digits, run_cfg, teacher=teacher, progress=False,
                 teacher_cache=tmp_path / "logits")
        assert calls["n"] == steps
    # an episode's few steps: a longer run reads the stored steps, computes and keeps the rest
    for n, expected in ((5, 5), (8, 1 + 3), (8, 1)):
        stored_logits._MEMORY.clear()
        calls = _teacher_calls(teacher := copy.deepcopy(trained_tiny))
        finetune(_student(trained_tiny), digits, replace(cfg, seed=9, steps=n), teacher=teacher, progress=False,
                 teacher_cache=tmp_path / "logits")
        assert calls["n"] == expected


def test_stored_teacher_logits_that_do_not_match_the_teacher_are_dropped(digits, trained_tiny, tmp_path, caplog):
    from autoprune.finetune import teacher as stored_logits

    stored_logits._MEMORY.clear()
    cfg = FinetuneConfig.recipe(1, batch_size=64, seed=7)
    finetune(_student(trained_tiny), digits, cfg, teacher=copy.deepcopy(trained_tiny), progress=False,
             teacher_cache=tmp_path)
    (path,) = tmp_path.glob("*/epoch-0.pt")
    saved = torch.load(path, weights_only=True)
    saved["logits"] = saved["logits"] + 3.0  # what a key that missed something would hand back
    torch.save(saved, path)
    stored_logits._MEMORY.clear()

    plain, model = _student(trained_tiny), _student(trained_tiny)
    finetune(plain, digits, cfg, teacher=copy.deepcopy(trained_tiny), progress=False, teacher_cache=False)
    teacher = copy.deepcopy(trained_tiny)
    calls = _teacher_calls(teacher)
    with caplog.at_level("WARNING", logger="autoprune.finetune.teacher"):
        finetune(model, digits, cfg, teacher=teacher, progress=False, teacher_cache=tmp_path)
    assert "do not match" in caplog.text and calls["n"] == 1 + len(digits.train) // 64
    for (name, a), b in zip(plain.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name


def test_teacher_logits_are_kept_only_where_batches_repeat_exactly(digits, trained_tiny, tmp_path):
    from autoprune.finetune.teacher import TeacherLogits

    teacher = copy.deepcopy(trained_tiny)
    tensors = digits.train_loader(64, seed=0)
    # image files decoded and augmented in worker processes: batches not decided by the seed alone
    files = torch.utils.data.DataLoader(torchvision.datasets.FakeData(8, (3, 8, 8)), batch_size=4, num_workers=1,
                                        generator=torch.Generator())
    workers = torch.utils.data.DataLoader(digits.train, batch_size=64, num_workers=2, generator=torch.Generator())
    kw = dict(seed=0, amp=False, layout=torch.contiguous_format, device="cpu", folder=tmp_path)
    assert TeacherLogits.for_run(teacher, tensors, **kw) is not None
    assert TeacherLogits.for_run(teacher, files, **kw) is None and TeacherLogits.for_run(teacher, workers, **kw) is None
    a = TeacherLogits.for_run(teacher, tensors, **kw).key
    assert a != TeacherLogits.for_run(teacher, digits.train_loader(32, seed=0), **kw).key
    assert a != TeacherLogits.for_run(teacher, tensors, **{**kw, "amp": True}).key
    assert a == TeacherLogits.for_run(copy.deepcopy(teacher), digits.train_loader(64, seed=0), **kw).key


def test_teacher_logits_too_large_to_keep_are_not_kept(digits, trained_tiny, tmp_path, monkeypatch):
    from autoprune.finetune import teacher as stored_logits

    stored_logits._MEMORY.clear()
    monkeypatch.setattr(stored_logits, "EPOCH_BYTES", 64)  # smaller than one batch's logits
    calls = _teacher_calls(teacher := copy.deepcopy(trained_tiny))
    finetune(_student(trained_tiny), digits, FinetuneConfig.recipe(1, batch_size=64, seed=11), teacher=teacher,
             progress=False, teacher_cache=tmp_path)
    assert calls["n"] == len(digits.train) // 64 and not list(tmp_path.rglob("*.pt")) and not stored_logits._MEMORY


def test_episode_finetune_distils_from_the_dense_model_and_studies_record_which_recipe_ran(digits, trained_tiny):
    from autoprune.finetune import teacher as stored_logits
    from autoprune.task import PruningTask, TaskConfig

    assert TaskConfig().episode_finetune is None and TaskConfig(episode_finetune_steps=5).episode_finetune == "distill"
    # a study made before the choice existed ran SGD and recorded no recipe: it resumes only as sgd
    old = {k: v for k, v in TaskConfig(episode_finetune_steps=5).to_attrs().items() if k != "task.episode_finetune"}
    assert TaskConfig(episode_finetune_steps=5).mismatch(old)[0] == "episode_finetune"
    assert TaskConfig(episode_finetune_steps=5, episode_finetune="sgd").mismatch(old) is None
    plain = {k: v for k, v in TaskConfig().to_attrs().items() if k != "task.episode_finetune"}
    assert TaskConfig().mismatch(plain) is None

    stored_logits._MEMORY.clear()
    scores, teacher_runs = {}, {}
    for recipe, steps in (("none", 0), ("distill", 6), ("sgd", 6)):
        dense = copy.deepcopy(trained_tiny)
        task = PruningTask(TaskConfig(model="tiny", dataset="digits", proxy="ce", episode_finetune_steps=steps,
                                      episode_finetune=None if recipe == "none" else recipe),
                           splits=digits, dense=dense)
        kept = [max(1, s // 2) for s in task.table.sizes()]
        task.evaluate(kept)
        calls = _teacher_calls(dense)
        _, ev = task.evaluate(kept)  # a second episode meets the same batches as the first
        scores[recipe], teacher_runs[recipe] = ev.accuracy, calls["n"]
    # distillation reads the teacher's stored logits of the first episode: one batch run again to
    # check them, beyond what an episode asks of the dense model anyway
    assert teacher_runs["distill"] == teacher_runs["none"] + 1 == teacher_runs["sgd"] + 1
    assert len(set(scores.values())) == 3  # each recipe trained (or not) its own way
