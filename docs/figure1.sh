#!/usr/bin/env bash
# The paper's Figure 1 from the command line: content reconstructions from conv1_2 … conv5_2
# (style weight 0), and style reconstructions (texture synthesis) from growing layer sets
# (content weight 0). usage: docs/figure1.sh CONTENT STYLE OUTDIR [nst options, e.g. --weights random]
set -euo pipefail
content=${1:?usage: figure1.sh CONTENT STYLE OUTDIR [options]}; style=${2:?}; out=${3:?}; shift 3
nst=${NST:-nst}
mkdir -p "$out"
for b in 1 2 3 4 5; do
  "$nst" stylize "$content" --style-weight 0 --content-layers "conv${b}_2" -q -o "$out/content_conv${b}_2.png" "$@"
done
layers=relu1_1
for b in 1 2 3 4 5; do
  [ "$b" -gt 1 ] && layers="$layers,relu${b}_1"
  "$nst" stylize "$content" "$style" --content-weight 0 --style-layers "$layers" -q -o "$out/style_upto_relu${b}_1.png" "$@"
done
