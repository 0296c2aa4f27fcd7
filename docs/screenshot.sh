#!/usr/bin/env bash
# Manual check of the built documentation site: headless-chromium screenshots of the pages a reader
# lands on first (the index, the brainenc.encoding API page, the examples page, the ROI notebook). Look at the PNGs for
# broken layout, raw markup, empty sections or unreadable signatures. Not run in CI (no chromium there).
#
#   make docs-shots                                   # builds the site first, then shoots
#   bash docs/screenshot.sh [HTML_DIR] [OUT_DIR]      # defaults: docs/_build/html docs/_build/shots
#
# Needs chromium (Debian: apt-get install -y chromium).
set -euo pipefail
html_dir=$(realpath "${1:-docs/_build/html}")
out_dir=${2:-docs/_build/shots}
size=${WINDOW_SIZE:-1280,1600}

browser=$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)
if [[ -z "$browser" ]]; then
    echo "screenshot.sh: no chromium found (Debian: apt-get install -y chromium)" >&2
    exit 1
fi
mkdir -p "$out_dir"
for page in index api/generated/brainenc.encoding examples notebooks/roi_analysis; do
    src="$html_dir/$page.html"
    [[ -f "$src" ]] || { echo "screenshot.sh: $src missing; run 'make docs' first" >&2; exit 1; }
    png="$out_dir/$(basename "$page").png"
    "$browser" --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size="$size" \
        --screenshot="$png" "file://$src" 2>/dev/null
    echo "$png"
done
