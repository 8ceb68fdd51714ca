#!/usr/bin/env bash
# Wheels for a GPU machine that has PyTorch, transformers and numpy/pandas but no network (Python 3.12):
# the pinned stack of pyproject.toml and what it imports, into .whl/ (git-ignored), 25-30 MB in all.
# bitsandbytes is cut to its CUDA 13.0 library (and the CPU one): the full wheel is ~60 MB.
# There, before anything else:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
#     .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD/src
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl && mkdir .whl
pins=(
  transformers==5.23.0 peft==0.21.2 trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
  xxhash==4.1.0 liger-kernel==0.8.5 sacrebleu==2.6.0 portalocker==4.4.2 tabulate==0.10.0 colorama==0.4.6
  lxml==6.2.1 nltk==3.10.4 absl-py==2.5.1 joblib==1.6.0 defusedxml==0.7.1 ruamel.yaml==0.19.1
  dvclive==3.49.1 dvc==3.67.1 dvc-data==3.18.3 dvc-objects==5.2.0 dvc-http==2.32.0 dvc-render==1.0.2
  dvc-studio-client==0.23.0 scmrepo==3.6.2 dulwich==1.2.21 orjson==3.13.0 platformdirs==4.14.9
  diskcache==5.6.3 configobj==5.0.9 pygtrie==2.6.2 voluptuous==0.16.0 funcy==2.1 dpath==2.2.0
  sqltrie==0.11.3 flufl.lock==9.2.0 atpublic==9.0.0 flatten-dict==0.5.0 zc.lockfile==4.0 wcwidth==0.9.5
  bitsandbytes==0.50.2
)
platforms=()
for n in 28 27 24 17 5; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
platforms+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d .whl "${pins[@]}"
# rouge-score ships only an sdist: build its (pure-Python) wheel here
python3 -m pip wheel -q --no-deps -w .whl rouge-score==0.1.2
# bitsandbytes: keep the CUDA 13.0 and CPU libraries, and fix RECORD so pip accepts the wheel
python3 - <<'PY'
import base64, hashlib, pathlib, re, zipfile
src = next(pathlib.Path(".whl").glob("bitsandbytes-*.whl"))
keep = re.compile(r"libbitsandbytes_(cuda130|cpu)\.so$")
tmp = src.with_suffix(".tmp")
with zipfile.ZipFile(src) as zin, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zout:
    record_name, lines = None, []
    for item in zin.infolist():
        if item.filename.endswith(".dist-info/RECORD"):
            record_name = item.filename
            continue
        if item.filename.endswith(".so") and not keep.search(item.filename):
            continue
        data = zin.read(item)
        zout.writestr(item, data)
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        lines.append(f"{item.filename},sha256={digest},{len(data)}")
    lines.append(f"{record_name},,")
    zout.writestr(record_name, "\n".join(lines) + "\n")
tmp.replace(src)
PY
ls .whl | wc -l
du -sh .whl
