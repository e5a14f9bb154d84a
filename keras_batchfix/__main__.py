"""Command line: `python -m keras_batchfix diagnose module:loss --data batch.npz`.

The report gives the batch exponent, the replica factors and the
accumulation factor (see `keras_batchfix.diagnose`). The `.npz` file holds
one batch: arrays `y_true` and `y_pred` (and optionally `sample_weight`),
batch on axis 0, e.g. written with

    np.savez("batch.npz", y_true=y_batch, y_pred=model.predict(x_batch))

`module:loss` names a loss function, a `keras.losses.Loss` instance, or a
`Loss` subclass (instantiated without arguments); a bare name such as `mse`
is a Keras loss name. Exit status: 0 when the report was printed (with
`--strict`: 0 only if no fix is needed, 3 otherwise), 1 on errors.

`--help` and `--version` import no backend: Keras is imported only after the
arguments are parsed.
"""

import argparse
import importlib
import json
import math
import sys

USAGE_EXAMPLE = (
    "example: python -m keras_batchfix diagnose my_module:my_loss "
    "--data batch.npz"
)


def resolve_loss(spec):
    """`"pkg.module:attr.sub"` -> the object; a name without `:` is returned."""
    if ":" not in spec:
        if "." in spec:
            module_name, _, attr = spec.rpartition(".")
            raise ValueError(
                f"Expected `module:attribute` or a Keras loss name, received "
                f"{spec!r}; did you mean {module_name + ':' + attr!r}?"
            )
        return spec
    module_name, _, attr_path = spec.partition(":")
    if not module_name or not attr_path:
        raise ValueError(f"Expected `module:attribute`, received {spec!r}.")
    obj = importlib.import_module(module_name)
    for part in attr_path.split("."):
        obj = getattr(obj, part)
    import keras

    if isinstance(obj, type) and issubclass(obj, keras.losses.Loss):
        obj = obj()
    if not callable(obj):
        raise ValueError(f"{spec!r} is not callable (got {type(obj).__name__}).")
    return obj


def parse_repeats(text):
    """`"1,2,4"` -> `[1, 2, 4]`; a `ValueError` naming `--repeats` otherwise."""
    try:
        repeats = [int(k) for k in text.split(",") if k.strip()]
    except ValueError:
        repeats = []
    if len(set(repeats)) < 2 or min(repeats) < 1:
        raise ValueError(
            "Argument `--repeats` must be two or more distinct integers >= 1, "
            f"comma-separated (e.g. 1,2,4); received --repeats={text!r}."
        )
    return repeats


def load_batch(path):
    import numpy as np

    with np.load(path) as data:
        missing = {"y_true", "y_pred"} - set(data.files)
        if missing:
            raise ValueError(
                f"{path} must hold arrays 'y_true' and 'y_pred' (missing "
                f"{sorted(missing)}; found {sorted(data.files)})."
            )
        sample_weight = data["sample_weight"] if "sample_weight" in data.files else None
        return data["y_true"], data["y_pred"], sample_weight


def package_version():
    """The installed distribution's version, else the source tree's."""
    from importlib import metadata

    try:
        return metadata.version("keras-batchfix")
    except metadata.PackageNotFoundError:
        from keras_batchfix import __version__

        return __version__


def build_parser():
    parser = argparse.ArgumentParser(
        prog="python -m keras_batchfix",
        description="keras-batchfix diagnostics.",
        epilog=USAGE_EXAMPLE,
    )
    parser.add_argument(
        "--version", action="version", version=f"keras-batchfix {package_version()}"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    diag = commands.add_parser(
        "diagnose",
        help="does a loss's scale depend on the batch size?",
        epilog=USAGE_EXAMPLE,
    )
    diag.add_argument("loss", help="module:attribute of the loss, or a Keras loss name")
    diag.add_argument("--data", required=True, help=".npz with y_true, y_pred [, sample_weight]")
    diag.add_argument(
        "--repeats", default="1,2,4", help="tiling factors, comma-separated (default 1,2,4)"
    )
    diag.add_argument("--replicas", type=int, default=2, help="replicas of the split checks")
    diag.add_argument(
        "--accumulation-steps", type=int, default=2,
        help="micro-batches of the gradient accumulation check (default 2)",
    )
    diag.add_argument("--tolerance", type=float, default=0.1)
    diag.add_argument("--json", action="store_true", help="print the result as JSON")
    diag.add_argument(
        "--strict", action="store_true", help="exit with status 3 if a fix is needed"
    )
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        from keras_batchfix import diagnose

        repeats = parse_repeats(args.repeats)
        loss = resolve_loss(args.loss)
        y_true, y_pred, sample_weight = load_batch(args.data)
        result = diagnose(
            loss,
            y_true,
            y_pred,
            sample_weight=sample_weight,
            repeats=repeats,
            num_replicas=args.replicas,
            tolerance=args.tolerance,
            accumulation_steps=args.accumulation_steps,
        )
    except (ImportError, AttributeError, ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(_clean(result.to_dict()), default=str, indent=2))
    else:
        print(result)
    if args.strict and not result.ok:
        return 3
    return 0


def _clean(value):
    """NaN -> None (JSON has no NaN), tuples -> lists, recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _clean(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(item) for item in value]
    return value


if __name__ == "__main__":
    sys.exit(main())
