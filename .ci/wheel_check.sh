#!/usr/bin/env bash
# Builds the sdist and the wheel (the wheel from the sdist), checks what they
# hold, installs the wheel in a clean virtualenv with only keras, numpy and
# JAX, and runs an import, the command line and a 3-step `fit` there.
#
#   bash .ci/wheel_check.sh                  # everything in a temporary folder
#   KEEP_DIST=dist bash .ci/wheel_check.sh   # and copies the sdist and wheel to dist/
#   VENV=.venv-jax bash .ci/wheel_check.sh   # and keeps the clean virtualenv there
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
python=${PYTHON:-python3}
export PIP_DISABLE_PIP_VERSION_CHECK=1 TF_CPP_MIN_LOG_LEVEL=3

# A path given relative to the repository root, or absolute.
from_repo() { case $1 in /*) echo "$1" ;; *) echo "$repo/$1" ;; esac; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
start=$SECONDS

echo "== wheel check: build"
"$python" -m venv "$work/build-venv"
"$work/build-venv/bin/pip" install -q build
# `python -m build` builds the sdist, then the wheel from the unpacked sdist,
# so a file missing from the sdist fails here.
"$work/build-venv/bin/python" -m build --outdir "$work/dist" "$repo" >"$work/build.log" 2>&1 \
    || { cat "$work/build.log"; exit 1; }
sdist=$(ls "$work"/dist/*.tar.gz)
wheel=$(ls "$work"/dist/*.whl)
echo "built $(basename "$sdist") and $(basename "$wheel") ($((SECONDS - start)) s)"

echo "== wheel check: contents"
"$python" - "$wheel" "$sdist" <<'EOF'
import sys
import tarfile
import zipfile

wheel, sdist = sys.argv[1:]
names = zipfile.ZipFile(wheel).namelist()
top = sorted({name.split("/")[0] for name in names})
dist_info = [t for t in top if t.endswith(".dist-info")]
assert len(dist_info) == 1, top
assert [t for t in top if t not in dist_info] == ["keras_batchfix"], (
    f"the wheel must install one top-level package, keras_batchfix; it holds {top}"
)
assert f"{dist_info[0]}/licenses/LICENSE" in names, "LICENSE is not in the wheel"
assert "keras_batchfix/__main__.py" in names
assert not any("/tests/" in n or n.startswith("tests/") for n in names), "tests in the wheel"
top_level = zipfile.ZipFile(wheel).read(f"{dist_info[0]}/top_level.txt").decode().split()
assert top_level == ["keras_batchfix"], top_level
metadata = zipfile.ZipFile(wheel).read(f"{dist_info[0]}/METADATA").decode()
assert "License-File: LICENSE" in metadata
assert "Requires-Dist: keras" in metadata

in_sdist = {name.split("/", 1)[-1] for name in tarfile.open(sdist).getnames()}
for required in ("LICENSE", "README.md", "CHANGELOG.md", "setup.cfg", "pyproject.toml"):
    assert required in in_sdist, f"{required} is not in the sdist"
print(f"wheel: {len([n for n in names if n.startswith('keras_batchfix/')])} files under "
      f"keras_batchfix/, LICENSE in {dist_info[0]}; sdist has LICENSE and CHANGELOG.md")
EOF

echo "== wheel check: install in a clean virtualenv (keras, numpy, JAX)"
venv=$work/venv
if [ -n "${VENV:-}" ]; then
    venv=$(from_repo "$VENV")
fi
"$python" -m venv --clear "$venv"
t0=$SECONDS
"$venv/bin/pip" install -q "$wheel[jax]"
echo "installed ($((SECONDS - t0)) s): $("$venv/bin/pip" list --format=freeze 2>/dev/null \
    | grep -iE '^(keras|numpy|jax|jaxlib|keras-batchfix)==' | tr '\n' ' ')"

cd "$work"  # away from the source tree: the installed wheel is what runs
"$venv/bin/python" -m keras_batchfix --version
KERAS_BACKEND=jax "$venv/bin/python" - <<'EOF'
import importlib.metadata
import importlib.util

for absent in ("tensorflow", "torch", "matplotlib"):
    assert importlib.util.find_spec(absent) is None, f"{absent} is installed"

import keras
import numpy as np
from keras import ops

import keras_batchfix

assert keras.backend.backend() == "jax", keras.backend.backend()
assert "site-packages" in keras_batchfix.__file__, keras_batchfix.__file__
files = importlib.metadata.files("keras-batchfix")
assert any(f.name == "LICENSE" for f in files), "LICENSE is not installed"


def box_loss(y_true, y_pred):  # per sample, divided by the batch's positives
    positives = y_true[:, 0]
    per_sample = positives * ops.sum(ops.abs(y_true - y_pred), axis=-1)
    return per_sample / ops.maximum(ops.sum(positives), 1.0)


keras.utils.set_random_seed(0)
rng = np.random.default_rng(0)
x = rng.normal(size=(20, 4)).astype("float32")
y = np.concatenate([rng.integers(0, 2, (20, 1)), rng.normal(size=(20, 3))], 1).astype("float32")
model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(4)])
model.compile(optimizer="sgd", loss=keras_batchfix.compensate(box_loss))
history = model.fit(x, y, batch_size=8, epochs=1, verbose=0)  # 3 steps: 8, 8, 4
loss = history.history["loss"][0]
assert np.isfinite(loss), loss
result = keras_batchfix.diagnose(box_loss, y, model.predict(x, verbose=0))
assert result.verdict == "inverse_batch_size", result.verdict
print(f"import, 3-step fit (loss {loss:.4f}) and diagnose on JAX: ok")
EOF

if [ -n "${KEEP_DIST:-}" ]; then
    keep=$(from_repo "$KEEP_DIST")
    mkdir -p "$keep" && cp "$sdist" "$wheel" "$keep/"
fi
echo "== wheel check passed in $((SECONDS - start)) s"
