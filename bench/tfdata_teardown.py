#!/usr/bin/env python3
"""How long deleting a tf.data iterator takes, with and without autotuning.

    python bench/tfdata_teardown.py [--work=0.5,1.5,3,6]

For each amount of work (seconds spent pulling batches from the iterator, with
a 10 ms pause per batch standing in for a training step) a fresh iterator
over an in-memory ``map`` + ``prefetch`` pipeline is made, used, and deleted;
the time ``del iterator`` takes is printed for autotuning on (TF's default)
and off (``data.finish_pipeline``). Measured here with TF 2.21: with
autotuning on, 4 of 11 deletions waited 0.12-1.10 s when the pipeline ended in
``prefetch(AUTOTUNE)`` and 1 of 15 waited 1.04 s with ``prefetch(2)`` (this
script); with it off, all 26 took <= 3 ms. The wait (until the autotune
thread's next exponentially backed-off wake-up) is intermittent.
This is why the benchmarks and the training pipeline turn autotuning off
(BUILD_NOTES.md, "Benchmark pitfall: tf.data autotune").
"""

import argparse
import os
import pathlib
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import tensorflow as tf  # noqa: E402

from tf_backsmooth import data  # noqa: E402


def pipeline(autotune):
    ds = tf.data.Dataset.from_tensor_slices(tf.zeros([1024, 8])).repeat()
    ds = ds.map(lambda v: v * 2.0, num_parallel_calls=tf.data.AUTOTUNE).batch(32)
    if autotune:  # the same stages as finish_pipeline, autotuning left on
        return ds.prefetch(data.PREFETCH_BATCHES)
    return data.finish_pipeline(ds)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="0.5,1.5,3,6")
    args = p.parse_args()
    print(f"TF {tf.__version__}")
    print(f"{'work s':>8}{'delete s, autotune on':>24}{'delete s, off':>16}")
    for work in (float(w) for w in args.work.split(",")):
        row = []
        for autotune in (True, False):
            it = iter(pipeline(autotune))
            start = time.perf_counter()
            while time.perf_counter() - start < work:
                next(it)
                time.sleep(0.01)
            start = time.perf_counter()
            del it
            row.append(time.perf_counter() - start)
        print(f"{work:>8.1f}{row[0]:>24.3f}{row[1]:>16.3f}")


if __name__ == "__main__":
    main()
