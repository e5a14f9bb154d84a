""""Decaying learning rate spikes center loss" on real data: does the center loss rise after an LR decay, and why?

Data: the `animal-mnist` package (10,000 28x28 animal silhouettes, 10
classes, MIT licence; `pip install animal-mnist --no-deps`), read from the
installed package, padded to 32x32; 2,400 training images with 20% of their
labels flipped to another class, 1,000 clean validation images.
Model: an ImageNet-style ResNet-18 layout (two basic blocks per stage) at
base width 32, i.e. 256-d features (ResNet-18 proper is width 64, 512-d:
`--width 64`); ReLU or PReLU. Training as in the seed: SGD lr 0.05,
momentum 0.9, weight decay 5e-4, batch 64, cross-entropy + 0.01 * center
loss (alpha 0.5, the report's PyTorch CenterLoss), 24 epochs with LR x0.5
after epoch 8 and x0.1 after epoch 16, no augmentation.

Each run logs per epoch the running train center loss (what the seed
plotted), the validation center loss, and, on 1,000 training images in eval
mode with the epoch-end centers, the exact split of the center loss into
within-class scatter W and the centers' lag G, the feature scale
S = mean ||x||^2, L/S, the share of S in the common mean, and dead units.
The analysis compares the rise after each decay with the same statistic at
control epochs without a decay (see `ratios`).

Usage (each call adds its runs to runs.csv in --out, replacing runs with the
same framework/variant/noise/aug/width/seed, then re-analyzes all of them):
    python reproductions/center_loss_lr_decay.py   # default: relu, prelu,
        # l2norm x seeds 0,1,2, PyTorch, 1 thread: 9 runs, ~8 min
    python reproductions/center_loss_lr_decay.py --quick --out /tmp/q  # < 60 s
    python reproductions/center_loss_lr_decay.py --variants relu,prelu \\
        --seeds 0,1,2,3,4
    python reproductions/center_loss_lr_decay.py --variants relu,prelu \\
        --noise 0,0.2 --aug 0,1 --seeds 0,1,2
    python reproductions/center_loss_lr_decay.py --framework keras \\
        --variants relu,prelu,l2norm
    python reproductions/center_loss_lr_decay.py --full   # report scale, GPU

Outputs in --out: runs.csv (one row per run and epoch), ratios.csv (per run),
summary.csv (per set-up: mean, sd over seeds, rises k of n),
center_loss_lr_decay.png and mechanism.png. The PyTorch and Keras training
runs are in `support/center_loss_torch.py` and `support/center_loss_keras.py`,
the statistics (`ratios`, `is_rise`) in `support/center_loss_statistics.py`,
the figures in `support/center_loss_figures.py`.
"""

import argparse
import functools
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from support import center_loss_torch as T  # noqa: E402
from support.center_loss_figures import plot_main, plot_mechanism  # noqa: E402
from support.center_loss_statistics import (  # noqa: E402
    analyze, read_runs, run_key, write_runs)

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(HERE, "results", "center_loss_lr_decay")


# ----------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------
def _floats(s):
    return [float(x) for x in str(s).split(",") if x != ""]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--framework", default="torch",
                   choices=["torch", "keras", "both"],
                   help="PyTorch with the report's CenterLoss, Keras "
                        "(keras_batchfix.CenterLoss on KERAS_BACKEND), or "
                        "both (--quick: both)")
    p.add_argument("--variants", default="relu,prelu,l2norm",
                   help=f"comma list from {T.VARIANTS}")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--noise", default="0.2", help="label-noise list")
    p.add_argument("--aug", default="0", help="augmentation list: 0,1")
    p.add_argument("--epochs", type=int, default=24)
    p.add_argument("--width", type=int, default=32,
                   help="ResNet base width; features 8 * width")
    p.add_argument("--blocks", type=int, default=2)
    p.add_argument("--n-train", type=int, default=2400)
    p.add_argument("--threads", type=int, default=1,
                   help="torch/TF threads (1: the committed numbers exactly)")
    p.add_argument("--out", default=DEFAULT_OUT)
    p.add_argument("--quick", action="store_true",
                   help="smoke run for the tests: width 8, 1 block per stage, "
                        "600 images, 6 epochs, relu, prelu, l2norm, PyTorch "
                        "and Keras (< 60 s)")
    p.add_argument("--full", action="store_true",
                   help="the report's scale: ResNet-18 (width 64, 512-d), "
                        "60 epochs, all 9,000 training images; on a GPU")
    p.add_argument("--analyze-only", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.width, args.blocks, args.n_train, args.epochs = 8, 1, 600, 6
        if args.variants == p.get_default("variants"):
            args.variants = "relu,prelu,l2norm"
        if args.framework == p.get_default("framework"):
            args.framework = "both"
        if args.seeds == p.get_default("seeds"):
            args.seeds = "0"
    if args.full:
        args.width, args.epochs, args.n_train = 64, 60, 9000
    variants = [v for v in args.variants.split(",") if v]
    for v in variants:
        if v not in T.VARIANTS:
            p.error(f"unknown variant {v!r}; choose from {T.VARIANTS}")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "runs.csv")
    new = {}
    if not args.analyze_only:
        import torch
        torch.set_num_threads(args.threads)
        frameworks = (["torch", "keras"] if args.framework == "both"
                      else [args.framework])
        fns = {}
        if "keras" in frameworks:
            from support import center_loss_keras as K
            _keras_threads(args.threads)
            fns["keras"] = K.run
        device = "cuda" if args.full and torch.cuda.is_available() else "cpu"
        fns["torch"] = functools.partial(T.run, device=device)
        t_start = time.time()
        setups = [(z, int(a), s) for z in _floats(args.noise)
                  for a in _floats(args.aug) for s in _floats(args.seeds)]
        for fw in frameworks:
            for noise, aug, seed in setups:
                data = T.load_splits(args.n_train, noise,
                                     noise_seed=int(seed))
                for v in variants:
                    if fw == "keras" and v not in K.KERAS_VARIANTS:
                        continue
                    print(f"== {fw} {v} noise {noise:g} aug {aug} width "
                          f"{args.width} seed {int(seed)} "
                          f"({time.time() - t_start:.0f} s so far)",
                          flush=True)
                    rows = fns[fw](v, epochs=args.epochs, width=args.width,
                                   blocks=args.blocks, seed=int(seed),
                                   data=data, aug=bool(aug),
                                   log=lambda s: print(s, flush=True))
                    key = run_key(fw, v, noise, aug, args.width, seed)
                    new[key] = rows
                    runs = read_runs(path)
                    runs[key] = rows
                    write_runs(path, runs)
        print(f"{len(new)} runs in {time.time() - t_start:.0f} s", flush=True)
    summary = analyze(args.out)
    figs = [plot_main(args.out), plot_mechanism(args.out, summary)]
    print("wrote " + ", ".join(os.path.join(args.out, n) for n in
                               ("runs.csv", "ratios.csv", "summary.csv"))
          + ", " + ", ".join(f for f in figs if f), flush=True)
    return new, summary


def _keras_threads(threads):
    import keras
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf
        try:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(threads)
        except RuntimeError:
            pass


if __name__ == "__main__":
    main()
