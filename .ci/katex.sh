#!/usr/bin/env bash
# KaTeX for the docs site, served from the site itself (no CDN): a pinned release from npm, copied into nbs/katex/
# (committed; _quarto.yml points html-math-method there). Its woff2 fonts only: every browser that runs KaTeX reads them.
# Usage: bash .ci/katex.sh [VERSION]   (then commit nbs/katex/)
set -euo pipefail
VERSION=${1:-0.16.22}
cd "$(dirname "$0")/.."
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && npm pack --silent "katex@$VERSION" >/dev/null && tar xzf "katex-$VERSION.tgz")
rm -rf nbs/katex; mkdir -p nbs/katex/fonts
cp "$tmp/package/dist/katex.min.js" "$tmp/package/LICENSE" nbs/katex/
cp "$tmp"/package/dist/fonts/*.woff2 nbs/katex/fonts/
sed -E 's/,url\(fonts\/[^)]*\.(woff|ttf)\) format\("(woff|truetype)"\)//g' "$tmp/package/dist/katex.min.css" > nbs/katex/katex.min.css
echo "KaTeX $VERSION in nbs/katex/"
