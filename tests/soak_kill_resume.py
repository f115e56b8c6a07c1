"""kill -9 at random instants of a short bin/train run, then the same command.

    python tests/soak_kill_resume.py --kills=20 [--final_kills=5] [--seed=0]

Trains the tiny run of tests/test_train.py (small_cnn with Dropout, 4 epochs)
once without interruption, then, K times, starts it in a fresh directory,
sends SIGKILL after a uniformly random delay in [0, wall time of the
uninterrupted run] (so kills land in start-up, epochs, checkpoint writes, the
final evaluation and the final save; ``--final_kills`` more land at a random
delay of 0-2 s after the "final test evaluation" log line, the few seconds a
uniform draw rarely hits), runs the same command again to the end
and checks: exit 0; results.json equal to the uninterrupted run's (accuracies,
steps, gradient evaluations, weights sha256); every epoch once in
metrics.jsonl; the resumed process started at the newest checkpoint on disk
(no completed epoch trained again). Not part of the pytest suite (minutes).
"""

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from test_train import TRAIN, _tiny  # noqa: E402

KEYS = ("clean_accuracy", "robust_accuracy", "steps", "grad_evals", "weights_sha256")


def run(args):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run(TRAIN + args, capture_output=True, text=True, env=env, cwd=REPO)


def newest_checkpoint(run_dir):
    backup = run_dir / "backup"
    names = os.listdir(backup) if backup.is_dir() else []
    return max([int(n[6:-4]) for n in names if re.fullmatch(r"epoch-\d+\.npz", n)], default=0)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--final_kills", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default="/tmp/soak_kill_resume")
    parser.add_argument("--mnist", default=str(REPO.parent / "shared" / "data" / "mnist"))
    a = parser.parse_args()
    work = Path(a.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    start = time.time()
    ref = run(_tiny(work / "reference", a.mnist))
    wall = time.time() - start
    assert ref.returncode == 0, ref.stderr[-3000:]
    reference = json.loads((work / "reference" / "results.json").read_text())
    print(f"uninterrupted run: {wall:.1f} s", flush=True)
    rng = random.Random(a.seed)
    failures = 0
    for k in range(a.kills + a.final_kills):
        run_dir = work / f"kill_{k}"
        late = k >= a.kills
        delay = rng.uniform(0, 2.0 if late else wall)
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
        proc = subprocess.Popen(TRAIN + _tiny(run_dir, a.mnist), cwd=REPO, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        err = ""
        if late:  # wait for the final phase, then the delay
            for line in proc.stderr:
                err += line
                if "final test evaluation" in line:
                    break
        time.sleep(delay)
        finished = proc.poll() is not None
        proc.send_signal(signal.SIGKILL)
        err += proc.communicate()[1]
        phase = ("finished" if finished else
                 "final evaluation or save" if "final test evaluation" in err else
                 f"training (checkpoint epoch {newest_checkpoint(run_dir)})"
                 if "starting at epoch" in err else "start-up")
        on_disk = newest_checkpoint(run_dir)
        again = run(_tiny(run_dir, a.mnist))
        problems = []
        if (run_dir / "results.json").exists() and again.returncode == 1 and \
                "already holds a finished run" in again.stderr:
            pass  # killed after results.json: the run had finished
        elif again.returncode != 0:
            problems.append(f"exit {again.returncode}: {again.stderr[-500:]}")
        else:
            match = re.search(r"starting at epoch (\d+)", again.stderr)
            if match is None or int(match.group(1)) != on_disk:
                problems.append(f"resumed at {match and match.group(1)}, checkpoint {on_disk}")
        if (run_dir / "results.json").exists():
            results = json.loads((run_dir / "results.json").read_text())
            problems += [f"{key}: {results[key]} != {reference[key]}"
                         for key in KEYS if results[key] != reference[key]]
            epochs = [json.loads(ln)["epoch"]
                      for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
            if epochs != [1, 2, 3, 4]:
                problems.append(f"metrics.jsonl epochs {epochs}")
        else:
            problems.append("no results.json")
        failures += bool(problems)
        when = f"{delay:4.2f} s after the final-phase log line" if late else f"{delay:5.1f} s"
        print(f"kill {k + 1:2d} at {when} ({phase}): "
              + ("OK" if not problems else "FAIL " + "; ".join(problems)), flush=True)
        shutil.rmtree(run_dir, ignore_errors=True)
    total = a.kills + a.final_kills
    print(f"{total - failures} of {total} kills ended with the uninterrupted results")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
