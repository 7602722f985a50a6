#!/usr/bin/env bash
# Make the small AV1 demo clips under demo/clips from generated video: a
# y4m written by an inline Python generator (moving gradients and a moving
# square, deterministic), encoded with Debian's aomenc. The clips are
# committed; rerun this only to change them.
#
#   demo/make_clips.sh   # demo/clips/clip64.ivf  (64x64, 10 frames: tests)
#                        # demo/clips/clip360.ivf (640x360, 60 frames, 2x2 tiles:
#                        #   the demo's multi-threaded decodes and the benchmark)
set -euo pipefail
cd "$(dirname "$0")/clips"
command -v aomenc >/dev/null || { echo "aomenc not found: apt-get install aom-tools" >&2; exit 1; }

make_y4m() { # W H FRAMES OUT
    python3 - "$@" <<'PY'
import sys
w, h, n, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
with open(out, "wb") as f:
    f.write(b"YUV4MPEG2 W%d H%d F25:1 Ip A1:1 C420jpeg\n" % (w, h))
    for t in range(n):
        f.write(b"FRAME\n")
        y = bytearray((x * 3 + r * 2 + t * 7) & 0xff for r in range(h) for x in range(w))
        s = w // 4
        for r in range(s):
            for x in range(s):
                yy, xx = (r + t * 3) % h, (x + t * 5) % w
                y[yy * w + xx] = 235
        f.write(bytes(y))
        cw, ch = w // 2, h // 2
        f.write(bytes((x * 4 + t * 3) & 0xff for r in range(ch) for x in range(cw)))
        f.write(bytes((r * 4 + 128 - t * 2) & 0xff for r in range(ch) for x in range(cw)))
PY
}

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
make_y4m 64 64 10 "$tmp/clip64.y4m"
aomenc --quiet --limit=10 -w 64 -h 64 --cpu-used=8 --end-usage=q --cq-level=30 \
    --threads=1 --ivf -o clip64.ivf "$tmp/clip64.y4m"
make_y4m 640 360 60 "$tmp/clip360.y4m"
aomenc --quiet --limit=60 -w 640 -h 360 --cpu-used=8 --end-usage=q --cq-level=32 \
    --tile-columns=1 --tile-rows=1 --threads=2 --ivf -o clip360.ivf "$tmp/clip360.y4m"
ls -l clip64.ivf clip360.ivf
