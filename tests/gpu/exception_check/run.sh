#!/usr/bin/env bash
# Diagnostic: build a minimal throwing op with the default compiler ($CC/$CXX, which torch uses)
# and with /usr/bin/g++, and report which one's exceptions reach Python. Usage: run.sh OUTDIR
set -u
out=${1:-/tmp/exc_check}
here=$(cd "$(dirname "$0")" && pwd)
echo "CC=${CC:-} CXX=${CXX:-}"; ${CXX:-g++} --version | head -1; /usr/bin/g++ --version | head -1
python3 -c "import torch; print('torch built with', torch.__config__.show().split('CXX_COMPILER=')[-1].split(',')[0] if 'CXX_COMPILER' in torch.__config__.show() else '?', '| CXX11 ABI', torch.compiled_with_cxx11_abi())"
for variant in default system; do
  d=$out/$variant; mkdir -p $d; cp $here/exc_check.cpp $d/
  cat > $d/setup.py <<'PY'
from setuptools import setup
from torch.utils.cpp_extension import CppExtension, BuildExtension
setup(name="exc_check", ext_modules=[CppExtension("exc_check", ["exc_check.cpp"])], cmdclass={"build_ext": BuildExtension})
PY
  ( cd $d
    if [ $variant = system ]; then export CC=/usr/bin/gcc CXX=/usr/bin/g++; fi
    python3 setup.py -q build_ext --inplace > build.log 2>&1 || { echo "$variant: build failed"; tail -5 build.log; exit 0; }
    ldd exc_check*.so | grep -E "stdc|gcc_s" | sed "s/^/  $variant: /"
    python3 -c "
import torch, exc_check
try:
    torch.ops.exc_check.f(torch.zeros(2))
except RuntimeError as e:
    print('$variant: OK, RuntimeError reached Python')
" || echo "$variant: CRASHED (rc=$?)" ) &
done
wait
