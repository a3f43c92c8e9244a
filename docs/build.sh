#!/usr/bin/env bash
# Build the documentation site strictly (any warning fails), executing the notebooks,
# then open its main pages in headless Chromium and fail on a broken link or image.
#   bash docs/build.sh            # build + page check
#   SHARPKIT_DOCS_EXECUTE=false bash docs/build.sh   # skip notebook execution (drafting)
# Needs the docs extra (pip install -e ".[docs]") and, for the page check, chromium.
set -euo pipefail
cd "$(dirname "$0")/.."
# The notebooks' kernels inherit the environment: with MPLBACKEND=Agg (as CI sets it)
# plt.show() would draw nothing into the executed pages.
export MPLBACKEND=module://matplotlib_inline.backend_inline
export NO_MKDOCS_2_WARNING=1 PYTHONWARNINGS=ignore::DeprecationWarning
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
start=$(date +%s)
python -m mkdocs build --strict --clean
echo "docs: built build/site in $(($(date +%s) - start)) s"
if [ "${SHARPKIT_DOCS_EXECUTE:-true}" = "false" ]; then
    python docs/check_pages.py build/site --unexecuted
else
    python docs/check_pages.py build/site
fi
