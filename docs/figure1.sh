#!/usr/bin/env bash
# The paper's Figure 1 from the command line: content reconstructions from relu1_2 … relu5_2 (the
# paper's rectified conv*_2 layers; style weight 0), and style reconstructions (texture synthesis)
# from growing layer sets relu1_1 … relu5_1 (content weight 0), laid out in OUTDIR/figure1.png.
# usage: docs/figure1.sh CONTENT STYLE OUTDIR [nst options, e.g. --weights random]
# $NST is the command (default: nst) and $PYTHON a Python with Pillow (default: python3).
set -euo pipefail
content=${1:?usage: figure1.sh CONTENT STYLE OUTDIR [options]}; style=${2:?}; out=${3:?}; shift 3
nst=${NST:-nst}
python=${PYTHON:-python3}
here=$(dirname "${BASH_SOURCE[0]}")
mkdir -p "$out"
cells=()
for b in 1 2 3 4 5; do
  "$nst" stylize "$content" --style-weight 0 --content-layers "relu${b}_2" -q -o "$out/content_relu${b}_2.png" "$@"
  cells+=("relu${b}_2=$out/content_relu${b}_2.png")
done
layers=relu1_1 label=relu1_1
for b in 1 2 3 4 5; do
  if [ "$b" -gt 1 ]; then layers="$layers,relu${b}_1" label="+relu${b}_1"; fi
  "$nst" stylize "$content" "$style" --content-weight 0 --style-layers "$layers" -q -o "$out/style_upto_relu${b}_1.png" "$@"
  cells+=("$label=$out/style_upto_relu${b}_1.png")
done
"$python" "$here/../scripts/contact_sheet.py" "$out/figure1.png" 5 "${cells[@]}"
echo "wrote $out/figure1.png"
