#!/usr/bin/env bash
# A second small real image-caption folder for development and checks: Debian's tuxpaint-stamps-default
# (~800 stamp PNGs with transparency), each captioned with its English description (the first line of the
# stamp's .txt file). Writes DIR/images/<category>__<name>.png and DIR/captions.csv (filename,caption)
# WITHOUT a split column, as a user's own folder usually is (the store then splits by a hash of the names).
# Usage: scripts/tuxpaint-prep.sh [DIR]   (default DIR=data/tuxpaint). Needs apt-get download, python3.
set -eu
. "$(dirname "$0")/debian-unpack.sh"
DIR=${1:-data/tuxpaint}
[[ -f $DIR/captions.csv ]] && { echo "$DIR ready ($(($(wc -l < "$DIR/captions.csv") - 1)) pairs)"; exit 0; }
mkdir -p "$DIR/deb" "$DIR/images"
unpack_deb tuxpaint-stamps-default "$DIR"
python3 - "$DIR" <<'PY'
import csv, glob, os, shutil, sys
out = sys.argv[1]
root = os.path.join(out, "deb/x/usr/share/tuxpaint/stamps/")
rows = []
for png in sorted(glob.glob(root + "**/*.png", recursive=True)):
    if png.endswith(("_mirror.png", "_flip.png")) or "/." in png:
        continue
    txt = png[:-4] + ".txt"
    if not os.path.isfile(txt):
        continue
    with open(txt, encoding="utf-8", errors="replace") as fh:
        caption = " ".join(fh.readline().split())
    if not caption:
        continue
    name = os.path.relpath(png, root).replace("/", "__")
    shutil.copyfile(png, os.path.join(out, "images", name))
    rows.append((name, caption))
with open(os.path.join(out, "captions.csv"), "w", newline="", encoding="utf-8") as f:
    w = csv.writer(f); w.writerow(["filename", "caption"]); w.writerows(rows)
print(f"{len(rows)} pairs -> {out}")
PY
